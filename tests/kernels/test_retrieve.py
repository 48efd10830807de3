"""Triton `retrieve` vs `semclust.ops.reference.retrieve`: forward and backward."""

import pytest

pytest.importorskip("triton", reason="the triton backend's tests need the triton package (pip install triton)")

import torch  # noqa: E402

import semclust.ops as ops  # noqa: E402
from semclust.ops import reference  # noqa: E402

from kernel_util import DTYPES, FP16, FP32, LAYOUTS, LOW, assert_fp32, assert_lowp, make, triton_backend  # noqa: E402

# (N, W, D): W = 10 fits one bank tile, 37 and 1000 span several; D = 3 is padded to 16
SHAPES = [(1, 1, 3), (7, 10, 3), (257, 10, 64), (7, 37, 64), (2, 1000, 3)]


def _run(x, bank, tau, **kw):
    with triton_backend():
        return ops.retrieve(x, bank, tau, **kw)


def _naive(x, bank, tau, normalize):
    v = torch.softmax((x @ bank.T) / tau, dim=1) @ bank
    return torch.nn.functional.normalize(v, dim=1) if normalize else v


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,W,D", SHAPES, ids=[f"N{n}-W{w}-D{d}" for n, w, d in SHAPES])
def test_forward(N, W, D, dtype, normalize):
    x, bank = make(N, D, dtype, seed=1), make(W, D, dtype, seed=2)
    tau = 0.05
    out = _run(x, bank, tau, normalize=normalize, chunk_size=100)
    assert out.dtype == dtype and out.shape == (N, D)
    if dtype in LOW:
        ref = reference.retrieve(x.double(), bank.double(), tau, normalize=normalize)
        assert_lowp(out, ref, _naive(x, bank, tau, normalize), 1e-3, "v")
    else:
        assert_fp32(out, reference.retrieve(x, bank, tau, normalize=normalize, chunk_size=100), "v")


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, dtype):
    x, bank = make(19, 64, dtype, layout, seed=3), make(37, 64, dtype, layout, seed=4)
    out = _run(x, bank, 0.05)
    ref = _run(x.contiguous(), bank.contiguous(), 0.05)
    assert_fp32(out, ref, "view vs contiguous", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_tiny_tau_huge_logits(dtype):
    """tau = 0.005 (the counterpart temperature of the method): logits ~ 200."""
    x, bank = make(33, 64, dtype, seed=5), make(40, 64, dtype, seed=6)
    out = _run(x, bank, 0.005)
    assert torch.isfinite(out).all()
    ref = reference.retrieve(x.double(), bank.double(), 0.005)
    if dtype in LOW:
        assert_lowp(out, ref, _naive(x, bank, 0.005, True), 1e-3, "v")
    else:
        assert_fp32(out, ref, "v", atol=1e-5, rtol=1e-5)


def _backward(fn, x, bank, g):
    x = x.detach().clone().requires_grad_()
    bank = bank.detach().clone().requires_grad_()
    return torch.autograd.grad((fn(x, bank).to(g.dtype) * g).sum(), (x, bank))


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,W,D,tau", [(7, 10, 3, 0.1), (33, 37, 64, 0.05), (2, 200, 3, 0.5), (1, 1, 3, 0.1)],
                         ids=["N7-W10", "N33-W37", "N2-W200", "N1-W1"])
def test_backward(N, W, D, tau, dtype, normalize):
    x, bank = make(N, D, dtype, seed=7), make(W, D, dtype, seed=8)
    g = torch.randn(N, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(x.device)
    dx, db = _backward(lambda a, b: _run(a, b, tau, normalize=normalize), x, bank, g.to(dtype))
    assert dx.dtype == dtype and db.dtype == dtype
    if dtype in LOW:
        rx, rb = _backward(lambda a, b: reference.retrieve(a, b, tau, normalize=normalize), x.double(), bank.double(), g)
        nx, nb = _backward(lambda a, b: _naive(a, b, tau, normalize), x, bank, g.to(dtype))
        assert_lowp(dx, rx, nx, 2e-3 * float(rx.abs().max()) + 1e-3, "dx")
        assert_lowp(db, rb, nb, 2e-3 * float(rb.abs().max()) + 1e-3, "dbank")
    else:
        rx, rb = _backward(lambda a, b: reference.retrieve(a, b, tau, normalize=normalize), x, bank, g.float())
        scale = max(float(rx.abs().max()), float(rb.abs().max()), 1.0)
        assert_fp32(dx, rx, "dx", atol=1e-5 * scale, rtol=1e-4)
        assert_fp32(db, rb, "dbank", atol=1e-5 * scale, rtol=1e-4)


def test_backward_bank_only_and_x_only():
    x, bank = make(9, 16, seed=10), make(21, 16, seed=11)
    g = torch.randn(9, 16, generator=torch.Generator().manual_seed(12)).to(x.device)
    xb = bank.clone().requires_grad_()
    (db,) = torch.autograd.grad((_run(x, xb, 0.1) * g).sum(), (xb,))
    rb = bank.clone().requires_grad_()
    (rdb,) = torch.autograd.grad((reference.retrieve(x, rb, 0.1) * g).sum(), (rb,))
    assert_fp32(db, rdb, "dbank", atol=1e-5, rtol=1e-4)
    xx = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad((_run(xx, bank, 0.1) * g).sum(), (xx,))
    rx = x.clone().requires_grad_()
    (rdx,) = torch.autograd.grad((reference.retrieve(rx, bank, 0.1) * g).sum(), (rx,))
    assert_fp32(dx, rdx, "dx", atol=1e-5, rtol=1e-4)


def test_float64_matches_reference():
    x, bank = make(9, 8, torch.float64, seed=13), make(5, 8, torch.float64, seed=14)
    torch.testing.assert_close(_run(x, bank, 0.1), reference.retrieve(x, bank, 0.1))
