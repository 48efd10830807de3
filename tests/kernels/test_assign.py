"""Triton `assign` vs `semclust.ops.reference.assign`: forward and backward."""

import pytest

pytest.importorskip("triton", reason="the triton backend's tests need the triton package (pip install triton)")

import torch  # noqa: E402

import semclust.ops as ops  # noqa: E402
from semclust.ops import reference  # noqa: E402

from kernel_util import DEVICE, DTYPES, FP16, FP32, LAYOUTS, LOW, assert_fp32, assert_lowp, make, triton_backend  # noqa: E402

# (N, K, D): K = 10 fits one tile (single sweep); 37 and 1000 span tiles; none are multiples of blocks
SHAPES = [(1, 1, 3), (7, 10, 3), (257, 10, 64), (7, 37, 64), (2, 1000, 3)]


def _run(x, c, tau, **kw):
    with triton_backend():
        return ops.assign(x, c, tau, **kw)


def _naive(x, c, tau):
    """The same math in plain torch at the inputs' precision (the low-precision yardstick)."""
    p = torch.softmax((x @ c.T) / tau, dim=1)
    return p.max(dim=1).values, p.sum(0), p


def _labels_ok(labels, x, c):
    # a label must carry the row's maximal logit (exact ties are tested separately)
    s = x.double() @ c.double().T
    return bool((s.gather(1, labels[:, None]).squeeze(1) >= s.max(1).values - 1e-6).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,D", SHAPES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in SHAPES])
def test_forward(N, K, D, dtype):
    x, c = make(N, D, dtype, seed=1), make(K, D, dtype, seed=2)
    tau = 0.1
    out = _run(x, c, tau, return_probs=True, chunk_size=100)
    assert out.labels.dtype == torch.int64 and out.labels.shape == (N,)
    assert out.conf.dtype == out.colsum.dtype == out.probs.dtype == torch.float32
    assert out.probs.shape == (N, K) and out.colsum.shape == (K,)
    assert _labels_ok(out.labels, x, c)
    if dtype in LOW:
        ref = reference.assign(x.double(), c.double(), tau, return_probs=True)
        n_conf, n_col, n_p = _naive(x, c, tau)
        assert_lowp(out.conf, ref.conf, n_conf, 1e-4, "conf")
        assert_lowp(out.colsum, ref.colsum, n_col, 1e-3, "colsum")
        assert_lowp(out.probs, ref.probs, n_p, 1e-4, "probs")
    else:
        ref = reference.assign(x, c, tau, return_probs=True, chunk_size=100)
        assert torch.equal(out.labels, ref.labels)
        assert_fp32(out.conf, ref.conf, "conf")
        assert_fp32(out.colsum, ref.colsum, "colsum")
        assert_fp32(out.probs, ref.probs, "probs")


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, dtype):
    x, c = make(19, 64, dtype, layout, seed=3), make(37, 64, dtype, layout, seed=4)
    out = _run(x, c, 0.1, return_probs=True)
    ref = _run(x.contiguous(), c.contiguous(), 0.1, return_probs=True)
    assert torch.equal(out.labels, ref.labels)
    assert_fp32(out.probs, ref.probs, "probs (view vs contiguous)", atol=1e-6, rtol=1e-6)
    assert_fp32(out.colsum, ref.colsum, "colsum (view vs contiguous)", atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("K", [10, 37])
def test_tiny_tau_huge_logits(K, dtype):
    """tau = 0.005: logits ~ 200 (fp16 cannot even hold their exponentials)."""
    x, c = make(33, 64, dtype, seed=5), make(K, 64, dtype, seed=6)
    out = _run(x, c, 0.005, return_probs=True)
    assert torch.isfinite(out.probs).all() and torch.isfinite(out.conf).all()
    ref = reference.assign(x.double(), c.double(), 0.005, return_probs=True)
    torch.testing.assert_close(out.probs.double(), ref.probs, atol=2e-4, rtol=0)
    torch.testing.assert_close(out.colsum.double(), ref.colsum, atol=2e-3, rtol=0)
    torch.testing.assert_close(out.probs.sum(1), torch.ones(33, device=DEVICE), atol=1e-5, rtol=0)
    assert torch.equal(out.labels, ref.labels)


@pytest.mark.parametrize("K,dups", [(10, (2, 7)), (1000, (5, 700)), (40, (16, 17))],
                         ids=["in-tile", "across-tiles", "tile-edge"])
def test_ties_go_to_lowest_index(K, dups):
    x = make(6, 16, seed=7)
    c = make(K, 16, seed=8) * 0.1  # every other centre far below the duplicated one
    c[dups[0]] = c[dups[1]] = x[0]
    out = _run(x, c, 0.05)
    ref = reference.assign(x, c, 0.05)
    assert int(out.labels[0]) == dups[0] == int(ref.labels[0])
    assert torch.equal(out.labels, ref.labels)


def test_probs_optional_and_chunking():
    x, c = make(257, 16, seed=9), make(10, 16, seed=10)
    a = _run(x, c, 0.1, chunk_size=64)
    b = _run(x, c, 0.1, return_probs=True, chunk_size=1000)
    assert a.probs is None
    assert torch.equal(a.labels, b.labels)
    assert_fp32(a.colsum, b.colsum, "colsum over chunks", atol=1e-5, rtol=1e-6)


def _backward(fn, x, c, g):
    x = x.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    out = fn(x, c)
    loss = (out.conf.float() * g[0]).sum() + (out.colsum.float() * g[1]).sum() + (out.probs.float() * g[2]).sum()
    return torch.autograd.grad(loss, (x, c))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,D,tau", [(7, 10, 3, 0.1), (33, 37, 64, 0.05), (2, 1000, 3, 0.5), (1, 1, 3, 0.1)],
                         ids=["N7-K10", "N33-K37", "N2-K1000", "N1-K1"])
def test_backward(N, K, D, tau, dtype):
    x, c = make(N, D, dtype, seed=11), make(K, D, dtype, seed=12)
    gen = torch.Generator().manual_seed(13)
    g = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE) for s in ((N,), (K,), (N, K))]
    dx, dc = _backward(lambda a, b: _run(a, b, tau, return_probs=True, chunk_size=16), x, c, [t.float() for t in g])
    assert dx.dtype == x.dtype and dc.dtype == c.dtype
    if dtype in LOW:
        rx, rc = _backward(lambda a, b: reference.assign(a, b, tau, return_probs=True), x.double(), c.double(), g)

        def naive(a, b):
            conf, col, p = _naive(a, b, tau)
            return reference.AssignResult(None, conf, col, p)

        nx, nc = _backward(naive, x, c, [t.to(dtype) for t in g])
        assert_lowp(dx, rx, nx, 1e-3 * float(rx.abs().max()) + 1e-4, "dx")
        assert_lowp(dc, rc, nc, 1e-3 * float(rc.abs().max()) + 1e-4, "dc")
    else:
        rx, rc = _backward(lambda a, b: reference.assign(a, b, tau, return_probs=True), x, c, [t.float() for t in g])
        scale = max(float(rx.abs().max()), float(rc.abs().max()), 1.0)
        assert_fp32(dx, rx, "dx", atol=1e-5 * scale, rtol=1e-4)
        assert_fp32(dc, rc, "dc", atol=1e-5 * scale, rtol=1e-4)


def test_backward_through_balance_only():
    """The fused path of the balance regularizer: only colsum carries a gradient."""
    x, c = make(50, 16, seed=14), make(37, 16, seed=15)
    grads = []
    for impl in ("triton", "torch"):
        xx, cc = x.clone().requires_grad_(), c.clone().requires_grad_()
        with ops.use_backend(impl):
            out = ops.assign(xx, cc, 0.1)
            bal = ops.balance(out.colsum, n=50)
        (bal.entropy + bal.kl).backward()
        grads.append((xx.grad, cc.grad))
    assert_fp32(grads[0][0], grads[1][0], "dx", atol=1e-6, rtol=1e-4)
    assert_fp32(grads[0][1], grads[1][1], "dc", atol=1e-6, rtol=1e-4)


def test_mixed_dtypes_promote():
    x, c = make(9, 16, torch.float16, seed=16), make(12, 16, torch.float32, seed=17)
    out = _run(x, c, 0.1, return_probs=True)
    ref = reference.assign(x, c, 0.1, return_probs=True)
    assert torch.equal(out.labels, ref.labels)
    assert_fp32(out.probs, ref.probs, "probs")


def test_float64_matches_reference():
    x, c = make(9, 8, torch.float64, seed=18), make(5, 8, torch.float64, seed=19)
    out = _run(x, c, 0.1, return_probs=True)
    ref = reference.assign(x, c, 0.1, return_probs=True)
    assert out.conf.dtype == torch.float64
    torch.testing.assert_close(out.probs, ref.probs)
