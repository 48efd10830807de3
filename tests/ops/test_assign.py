"""ops.assign against the full float64 softmax P = softmax(x c^T / tau)."""

from __future__ import annotations

import pytest
import torch

import semclust.ops as ops

OPS = ("assign",)
TAU = 0.1


def formula(x, c, tau):
    """(logits, P) in float64, the whole N x K matrix at once."""
    logits = x.double() @ c.double().T / tau
    return logits, torch.softmax(logits, dim=1)


def check(h, r, x, c, tau, dtype):
    """Every field of an AssignResult against the formula on the same inputs."""
    logits, p = formula(x, c, tau)
    n, k = p.shape
    atol = h.tol(dtype, tau)
    out_dtype = torch.float64 if torch.float64 in (x.dtype, c.dtype) else torch.float32
    assert r.labels.dtype == torch.int64 and r.labels.shape == (n,)
    assert r.conf.dtype == out_dtype and r.colsum.dtype == out_dtype
    h.assert_argmax(r.labels, p, atol)
    h.close(r.conf, p.max(1).values, atol, "conf")
    # colsum is a sum of n probabilities: compare the mean so the budget stays O(1)
    h.close(r.colsum / n, p.sum(0) / n, atol, "colsum")
    if r.probs is not None:
        assert r.probs.dtype == out_dtype
        h.close(r.probs, p, atol, "probs")
    return logits, p


SHAPES = [  # (N, D, K): N = 1, 7, 257; D = 3, 64; K = 1 (legal: P = 1), 10, 100
    (1, 3, 1), (1, 64, 10), (7, 3, 10), (7, 64, 1), (257, 3, 10), (257, 64, 10), (60, 64, 100),
]


@pytest.mark.parametrize("n,d,k", SHAPES)
def test_matches_formula(backend, h, n, d, k):
    x, c = h.unit(n, d), h.unit(k, d)
    r = ops.assign(x, c, TAU, return_probs=True)
    check(h, r, x, c, TAU, torch.float32)
    if k == 1:  # one centre: every row is certain
        assert bool((r.labels == 0).all()) and bool((r.conf == 1).all())


@pytest.mark.parametrize("n,d,k", [(7, 3, 10), (257, 64, 10)])
def test_without_probs_same_fields(backend, h, n, d, k):
    x, c = h.unit(n, d), h.unit(k, d)
    full = ops.assign(x, c, TAU, return_probs=True)
    lean = ops.assign(x, c, TAU)
    assert lean.probs is None
    check(h, lean, x, c, TAU, torch.float32)
    assert torch.equal(lean.labels, full.labels)
    h.close(lean.conf, full.conf, h.TOL[torch.float32])


@pytest.mark.parametrize("chunk", [7, 100, 256, 257, 1000])
def test_chunked_equals_unchunked(backend, h, chunk):
    n, d, k = 257, 64, 10  # no chunk size but 257 and 1000 divides 257
    x, c = h.unit(n, d), h.unit(k, d)
    whole = ops.assign(x, c, TAU, return_probs=True, chunk_size=100_000)
    part = ops.assign(x, c, TAU, return_probs=True, chunk_size=chunk)
    check(h, part, x, c, TAU, torch.float32)
    atol = h.TOL[torch.float32]
    assert torch.equal(part.labels, whole.labels)
    h.close(part.probs, whole.probs, atol)
    h.close(part.conf, whole.conf, atol)
    h.close(part.colsum / n, whole.colsum / n, atol)


def test_chunk_of_one_row(h):  # torch only: 257 one-row chunks
    x, c = h.unit(257, 16), h.unit(10, 16)
    check(h, ops.assign(x, c, TAU, return_probs=True, chunk_size=1), x, c, TAU, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(backend, h, dtype):
    x, c = h.unit(100, 64, dtype), h.unit(10, 64, dtype)
    check(h, ops.assign(x, c, TAU, return_probs=True, chunk_size=64), x, c, TAU, dtype)


@pytest.mark.parametrize("xd,cd", [(torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_mixed_dtypes(h, xd, cd):  # torch only: the contract does not say kernels take mixed inputs
    x, c = h.unit(50, 16, xd), h.unit(10, 16, cd)
    check(h, ops.assign(x, c, TAU, return_probs=True), x, c, TAU, xd if xd != torch.float64 else cd)


@pytest.mark.parametrize("xl", ["contiguous", "strided", "colmajor", "offset"])
@pytest.mark.parametrize("cl", ["contiguous", "strided", "colmajor", "offset"])
def test_layouts(backend, h, xl, cl):
    x, c = h.unit(37, 24), h.unit(9, 24)
    r = ops.assign(h.layout(x, xl), h.layout(c, cl), TAU, return_probs=True, chunk_size=16)
    check(h, r, x, c, TAU, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_tiny_tau_no_overflow(backend, h, dtype):
    """tau = 0.005 on unit vectors: logits up to 200, exp(200) overflows fp32 and fp16."""
    tau = 0.005
    c = h.unit(10, 64, dtype)
    # rows equal to a centre (logit exactly 1/tau) plus random rows
    x = torch.cat([c[:5], h.unit(60, 64, dtype)])
    r = ops.assign(x, c, tau, return_probs=True)
    for name in ("conf", "colsum", "probs"):
        assert bool(torch.isfinite(getattr(r, name)).all()), name
    row_sums = r.probs.double().sum(1)
    k = c.shape[0]  # each row sums K fp32 probabilities
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=h.TOL[torch.float32] * k, rtol=0)
    assert float(r.colsum.double().sum()) == pytest.approx(x.shape[0], abs=1e-3)
    check(h, r, x, c, tau, dtype)
    assert r.labels[:5].tolist() == list(range(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("tau", [0.005, 1.0])
def test_ties_go_to_lowest_index(backend, h, dtype, tau):
    """Identical centres tie exactly; like torch.argmax, the label is the first of them."""
    d = 16
    c = h.unit(8, d, dtype)
    c[5] = c[2]
    c[7] = c[2]
    x = torch.nn.functional.normalize(c[2].double() + 0.05 * torch.randn(20, d, dtype=torch.float64), dim=1).to(dtype)
    r = ops.assign(x, c, tau, return_probs=True)
    logits, p = formula(x, c, tau)
    best = logits.argmax(1)  # torch.argmax: first index among exact ties
    tied = logits[:, 2] == logits.max(1).values
    assert bool(tied.any()), "the construction should make centre 2 best for some rows"
    assert bool((best[tied] == 2).all())
    assert torch.equal(r.labels[tied], best[tied])
    check(h, r, x, c, tau, dtype)


@pytest.mark.parametrize("k", [1, 4])
def test_all_centres_equal_uniform(backend, h, k):
    c = h.unit(1, 8).expand(k, 8).contiguous()
    x = h.unit(30, 8)
    r = ops.assign(x, c, TAU, return_probs=True)
    assert bool((r.labels == 0).all())
    h.close(r.conf, torch.full((30,), 1.0 / k), h.TOL[torch.float32])
    h.close(r.colsum, torch.full((k,), 30.0 / k), 30 * h.TOL[torch.float32])


# --- gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [2, 100])
def test_gradcheck(backend, chunk):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, c):
        r = ops.assign(x, c, 0.5, return_probs=True, chunk_size=chunk)
        return r.conf, r.colsum, r.probs

    assert torch.autograd.gradcheck(f, (x, c))


def test_gradcheck_without_probs(backend):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, c):
        r = ops.assign(x, c, 0.5, chunk_size=4)
        return r.conf, r.colsum

    assert torch.autograd.gradcheck(f, (x, c))


GRAD_OUTPUTS = [("conf", "colsum", "probs"), ("conf",), ("colsum",), ("probs",)]


@pytest.mark.parametrize("k", [7, 40])
@pytest.mark.parametrize("outputs", GRAD_OUTPUTS, ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grad_matches_formula(backend, h, k, outputs, dtype):
    """Gradients for a random upstream gradient vs autograd through the fp64 formula
    (fp64 is covered by gradcheck; a backend may route fp64 elsewhere)."""
    n, d = 40, 16
    x, c = h.unit(n, d, dtype), h.unit(k, d, dtype)
    up = {"conf": torch.randn(n), "colsum": torch.randn(k), "probs": torch.randn(n, k)}

    xa, ca = x.clone().requires_grad_(), c.clone().requires_grad_()
    r = ops.assign(xa, ca, TAU, return_probs="probs" in outputs, chunk_size=16)
    sum((getattr(r, o) * up[o]).sum() for o in outputs).backward()
    assert xa.grad.dtype == dtype and ca.grad.dtype == dtype

    xb, cb = x.double().requires_grad_(), c.double().requires_grad_()
    _, p = formula(xb, cb, TAU)
    ref = {"conf": p.max(1).values, "colsum": p.sum(0), "probs": p}
    sum((ref[o] * up[o].double()).sum() for o in outputs).backward()
    # gradients are not O(1) (1/tau, sums over K or N): budget relative to their size
    h.close(xa.grad, xb.grad, h.TOL[dtype] * float(xb.grad.abs().max()), "dx")
    h.close(ca.grad, cb.grad, h.TOL[dtype] * float(cb.grad.abs().max()), "dc")


# --- errors -------------------------------------------------------------------------


def test_rejects_nan_and_inf(h):
    x, c = h.unit(5, 4), h.unit(3, 4)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="x has 1 row"):
        ops.assign(bad, c, TAU)
    bad = c.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="c has 1 row"):
        ops.assign(x, bad, TAU)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
def test_rejects_wrong_dims(h, shape):
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.assign(torch.randn(shape), h.unit(3, 4), TAU)
    with pytest.raises(ValueError, match="c must be 2-D"):
        ops.assign(h.unit(3, 4), torch.randn(shape), TAU)


def test_rejects_mismatched_dim(h):
    with pytest.raises(ValueError, match="c has dim 5 but 4"):
        ops.assign(h.unit(3, 4), h.unit(2, 5), TAU)


@pytest.mark.parametrize("tau", [0.0, -0.1, float("nan"), float("inf")])
def test_rejects_bad_tau(h, tau):
    with pytest.raises(ValueError, match="tau"):
        ops.assign(h.unit(3, 4), h.unit(2, 4), tau)


def test_rejects_empty_and_non_float(h):
    with pytest.raises(ValueError, match="c is empty"):  # K < 1
        ops.assign(h.unit(3, 4), torch.empty(0, 4), TAU)
    with pytest.raises(ValueError, match="x is empty"):
        ops.assign(torch.empty(0, 4), h.unit(2, 4), TAU)
    with pytest.raises(TypeError, match="floating"):
        ops.assign(torch.ones(3, 4, dtype=torch.int64), h.unit(2, 4), TAU)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.assign(h.unit(3, 4).numpy(), h.unit(2, 4), TAU)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.assign(h.unit(3, 4), h.unit(2, 4), TAU, chunk_size=0)
