"""ops.retrieve against v = normalise(softmax(x bank^T / tau) bank), all in float64."""

from __future__ import annotations

import pytest
import torch

import semclust.ops as ops

OPS = ("retrieve",)
TAU = 0.1


def formula(x, bank, tau, normalize=True):
    b = bank.double()
    v = torch.softmax(x.double() @ b.T / tau, dim=1) @ b
    return v / v.norm(dim=1, keepdim=True) if normalize else v


def check(h, v, x, bank, tau, dtype, normalize=True):
    assert v.dtype == x.dtype and v.shape == x.shape
    h.close(v, formula(x, bank, tau, normalize), h.tol(dtype, tau), "v")


SHAPES = [(1, 3, 1), (1, 64, 10), (7, 3, 10), (7, 64, 1), (257, 3, 10), (257, 64, 10), (60, 64, 100)]


@pytest.mark.parametrize("n,d,w", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_formula(backend, h, n, d, w, normalize):
    x, bank = h.unit(n, d), h.unit(w, d)
    v = ops.retrieve(x, bank, TAU, normalize=normalize)
    check(h, v, x, bank, TAU, torch.float32, normalize)
    if w == 1:  # a one-word bank: every counterpart is that word
        h.close(v, bank.expand(n, d), h.TOL[torch.float32])
    if normalize:
        h.close(v.double().norm(dim=1), torch.ones(n, dtype=torch.float64), h.TOL[torch.float32])


@pytest.mark.parametrize("chunk", [7, 100, 256, 1000])
def test_chunked_equals_unchunked(backend, h, chunk):
    x, bank = h.unit(257, 64), h.unit(30, 64)
    part = ops.retrieve(x, bank, TAU, chunk_size=chunk)
    whole = ops.retrieve(x, bank, TAU, chunk_size=100_000)
    check(h, part, x, bank, TAU, torch.float32)
    h.close(part, whole, h.TOL[torch.float32])


def test_chunk_of_one_row(h):  # torch only
    x, bank = h.unit(257, 16), h.unit(30, 16)
    check(h, ops.retrieve(x, bank, TAU, chunk_size=1), x, bank, TAU, torch.float32)


def test_large_bank(h):  # torch only: W = 5000 nouns (the T' size for M = 1000 centres)
    x, bank = h.unit(300, 64), h.unit(5000, 64)
    check(h, ops.retrieve(x, bank, 0.005, chunk_size=128), x, bank, 0.005, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_dtypes(backend, h, dtype, normalize):
    x, bank = h.unit(100, 64, dtype), h.unit(20, 64, dtype)
    check(h, ops.retrieve(x, bank, TAU, normalize=normalize, chunk_size=64), x, bank, TAU, dtype, normalize)


@pytest.mark.parametrize("xl", ["contiguous", "strided", "colmajor", "offset"])
@pytest.mark.parametrize("bl", ["contiguous", "strided", "colmajor", "offset"])
def test_layouts(backend, h, xl, bl):
    x, bank = h.unit(37, 24), h.unit(11, 24)
    v = ops.retrieve(h.layout(x, xl), h.layout(bank, bl), TAU, chunk_size=16)
    check(h, v, x, bank, TAU, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_tiny_tau_no_overflow(backend, h, dtype):
    """The default tau_r = 0.005: logits up to 200; a row equal to a word retrieves that word."""
    tau = 0.005
    bank = h.unit(40, 64, dtype)
    x = torch.cat([bank[:5], h.unit(60, 64, dtype)])
    v = ops.retrieve(x, bank, tau)
    assert bool(torch.isfinite(v).all())
    check(h, v, x, bank, tau, dtype)
    # other random 64-D unit words have cosine ~ +-0.125 with word j, so their weights are
    # below exp(-0.5 / 0.005): the row equal to word j gets word j back to output precision
    h.close(v[:5], bank[:5], h.TOL[dtype] + h.TOL[torch.float32])


# --- gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("chunk", [2, 100])
def test_gradcheck(backend, normalize, chunk):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: ops.retrieve(x, b, 0.5, normalize=normalize, chunk_size=chunk), (x, bank)
    )


@pytest.mark.parametrize("w", [9, 40])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grad_matches_formula(backend, h, w, normalize, dtype):
    """Gradients for a random upstream gradient vs autograd through the fp64 formula
    (fp64 is covered by gradcheck; a backend may route fp64 elsewhere)."""
    x, bank = h.unit(40, 16, dtype), h.unit(w, 16, dtype)
    g = torch.randn(40, 16)
    xa, ba = x.clone().requires_grad_(), bank.clone().requires_grad_()
    (ops.retrieve(xa, ba, TAU, normalize=normalize, chunk_size=16) * g).sum().backward()
    assert xa.grad.dtype == dtype and ba.grad.dtype == dtype
    xb, bb = x.double().requires_grad_(), bank.double().requires_grad_()
    (formula(xb, bb, TAU, normalize) * g.double()).sum().backward()
    # gradients carry 1/tau and sums over D or N: budget relative to their size
    h.close(xa.grad, xb.grad, h.TOL[dtype] * float(xb.grad.abs().max()), "dx")
    h.close(ba.grad, bb.grad, h.TOL[dtype] * float(bb.grad.abs().max()), "dbank")


# --- errors -------------------------------------------------------------------------


def test_rejects_bad_input(h):
    x, bank = h.unit(5, 4), h.unit(3, 4)
    bad = bank.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="bank has 1 row"):
        ops.retrieve(x, bad, TAU)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.retrieve(x[0], bank, TAU)
    with pytest.raises(ValueError, match="bank must be 2-D"):
        ops.retrieve(x, bank[None], TAU)
    with pytest.raises(ValueError, match="bank has dim 5 but 4"):
        ops.retrieve(x, h.unit(3, 5), TAU)
    with pytest.raises(ValueError, match="bank is empty"):
        ops.retrieve(x, torch.empty(0, 4), TAU)
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            ops.retrieve(x, bank, tau)
