"""The finite check every op runs on its inputs: a sum is its fast path, so a test that
sums to a finite number must still find a NaN or Inf, and finite inputs whose sum
overflows must pass."""

import pytest
import torch

from semclust.ops import validate as V

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]])
def test_finds_every_non_finite_row(dtype, bad):
    t = torch.randn(70, 9, dtype=torch.float64).to(dtype)
    rows = [3, 40, 69][: len(bad) + 1]
    for r, v in zip(rows, bad + bad[:1]):
        t[r, r % 9] = v
    with pytest.raises(ValueError, match=f"{len(rows)} row\\(s\\) with NaN or Inf"):
        V.finite_("x", t, chunk_rows=32)  # rows in the first, second and third chunk


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_inputs_whose_sum_overflows_pass(dtype):
    # the sum overflows for bf16 / fp32 (summed in fp32) and fp64; fp16 sums in fp32 and does not
    big = torch.finfo(dtype).max
    t = torch.full((64, 8), big, dtype=dtype)
    V.finite_("x", t)
    V.matrix("x", t)


def test_vectors_and_views():
    v = torch.ones(10)
    v[7] = float("nan")
    with pytest.raises(ValueError, match="1 row"):
        V.finite_("w", v)
    m = torch.randn(20, 6)
    m[5, 0] = float("inf")
    V.finite_("x", m[:, 1:])  # the Inf is outside the view
    with pytest.raises(ValueError, match="1 row"):
        V.finite_("x", m.T.contiguous().T)
