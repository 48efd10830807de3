import pytest
import torch

from semclust import ops


def _expected(x: torch.Tensor) -> torch.Tensor:
    # independent formula in float64: x / sqrt(sum x^2)
    x = x.double()
    n = x.pow(2).sum(1, keepdim=True).sqrt()
    return torch.where(n > 0, x / n, torch.zeros_like(x))


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e20, 1e37])
def test_unit_rows_at_any_finite_scale(scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 19, generator=g)
    got = ops.normalize_rows(x * scale)
    assert torch.allclose(got.double(), _expected(x), atol=1e-6)


def test_fp16_rows_whose_norm_overflows_fp16():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(33, 64, generator=g), dim=1)
    big = (x * 2**16).half()
    assert torch.isfinite(big).all() and not torch.isfinite(big.norm(dim=1)).all()
    got = ops.normalize_rows(big)
    assert got.dtype == torch.float16
    assert torch.allclose(got.double(), _expected(big.double()), atol=2e-3)


def test_layout_and_chunking_do_not_change_the_result():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(23, 51, generator=g)
    t = x.t().contiguous().t()  # same values, column-major strides
    assert not t.is_contiguous()
    a = ops.normalize_rows(x)
    assert torch.equal(a, ops.normalize_rows(t))
    assert torch.equal(a, ops.normalize_rows(x, chunk_size=5))
    assert ops.normalize_rows(t).is_contiguous()


def test_zero_rows_stay_zero_and_dtype_is_chosen():
    x = torch.zeros(3, 4)
    x[1, 2] = 5.0
    got = ops.normalize_rows(x, dtype=torch.float16)
    assert got.dtype == torch.float16
    assert torch.equal(got.float(), torch.tensor([[0.0] * 4, [0, 0, 1.0, 0], [0.0] * 4]))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="x"):
        ops.normalize_rows(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="chunk_size"):
        ops.normalize_rows(torch.ones(2, 2), chunk_size=0)
