"""Triton `center_update` vs `semclust.ops.reference.center_update`: hard (atomic and
deterministic), soft, EMA with the empty-cluster rule, gradients."""

import pytest

pytest.importorskip("triton", reason="the triton backend's tests need the triton package (pip install triton)")

import torch  # noqa: E402

import semclust.ops as ops  # noqa: E402
from semclust.kernels import center_update as kcu  # noqa: E402
from semclust.ops import reference  # noqa: E402

from kernel_util import DEVICE, DTYPES, FP16, FP32, LAYOUTS, LOW, assert_fp32, assert_lowp, make, triton_backend  # noqa: E402

SHAPES = [(1, 1, 3), (7, 10, 3), (257, 10, 64), (33, 37, 64), (5, 1000, 3)]


def _labels(n, k, seed=0, skip=()):
    lab = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))
    keep = next(c for c in range(k) if c not in skip)
    for s in skip:  # leave these clusters empty
        lab[lab == s] = keep
    return lab.to(DEVICE)


def _probs(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 3, 1).to(dtype).to(DEVICE)


def _run(x, k, **kw):
    with triton_backend():
        return ops.center_update(x, k, **kw)


def _naive(x, k, labels=None, probs=None, normalize=True, previous=None, momentum=0.0):
    """The reference's math with the inputs' own dtype (the low-precision yardstick)."""
    if labels is not None:
        w = torch.nn.functional.one_hot(labels, k).to(x.dtype)
    else:
        w = probs.to(x.dtype)
    sums, counts = w.T @ x, w.sum(0)
    c = torch.nn.functional.normalize(sums, dim=1) if normalize else sums / counts.clamp_min(1e-12)[:, None]
    if previous is not None:
        prev = previous.to(x.dtype)
        c = torch.where((counts <= 0)[:, None], prev, momentum * prev + (1 - momentum) * c)
        if normalize:
            c = torch.nn.functional.normalize(c, dim=1)
    return c, counts


def _compare(x, k, **kw):
    c, n = _run(x, k, **kw)
    assert c.dtype == x.dtype and c.shape == (k, x.shape[1])
    assert n.dtype == torch.float32 and n.shape == (k,)
    if x.dtype in LOW:
        kw64 = {a: (b.double() if isinstance(b, torch.Tensor) and b.is_floating_point() else b) for a, b in kw.items()}
        rc, rn = reference.center_update(x.double(), k, **kw64)
        nc, nn = _naive(x, k, **kw)
        assert_lowp(c, rc, nc, 2e-3, "centers")
        assert_lowp(n, rn, nn, 1e-4, "counts")
    else:
        rc, rn = reference.center_update(x, k, **kw)
        assert_fp32(c, rc, "centers", atol=1e-5, rtol=1e-5)
        assert_fp32(n, rn, "counts", atol=1e-5, rtol=1e-6)
    return c, n


@pytest.fixture(params=["atomic", "deterministic"])
def mode(request):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param == "deterministic")
    yield request.param
    torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,D", SHAPES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in SHAPES])
def test_hard(N, K, D, dtype, mode):
    _compare(make(N, D, dtype, seed=1), K, labels=_labels(N, K, seed=2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,D", SHAPES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in SHAPES])
def test_soft(N, K, D, dtype):
    _compare(make(N, D, dtype, seed=3), K, probs=_probs(N, K, seed=4))


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "mean"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_ema_and_empty_clusters(kind, normalize, mode):
    """An empty cluster keeps its previous centre; the others move by the momentum."""
    N, K, D = 40, 12, 16
    x = make(N, D, seed=5)
    previous = make(K, D, seed=6)
    if kind == "hard":
        w = dict(labels=_labels(N, K, seed=7, skip=(0, 5, 11)))
    else:
        p = _probs(N, K, seed=8)
        p[:, [0, 5]] = 0.0  # zero columns: empty soft clusters
        w = dict(probs=p)
    c, n = _compare(x, K, previous=previous, momentum=0.9, normalize=normalize, **w)
    assert (n[[0, 5]] == 0).all(), n
    ref = previous[[0, 5]] / (previous[[0, 5]].norm(dim=1, keepdim=True) if normalize else 1)
    assert_fp32(c[[0, 5]], ref, "empty clusters keep the previous centre", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, dtype, mode):
    x = make(50, 64, dtype, layout, seed=9)
    lab = _labels(50, 7, seed=10)
    p = make(50, 7, torch.float32, layout, normalize=False, seed=11).abs()
    for kw in (dict(labels=lab), dict(probs=p)):
        a = _run(x, 7, **kw)
        b = _run(x.contiguous(), 7, **{k: v.contiguous() for k, v in kw.items()})
        assert_fp32(a[0], b[0], "view vs contiguous", atol=1e-6, rtol=1e-5)
        assert_fp32(a[1], b[1], "counts view vs contiguous", atol=1e-6, rtol=1e-6)


def test_deterministic_mode_is_bitwise_reproducible():
    x, lab = make(300, 16, seed=12), _labels(300, 9, seed=13)
    a = kcu.cluster_sums(x, 9, labels=lab, deterministic=True)
    b = kcu.cluster_sums(x, 9, labels=lab, deterministic=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    fast = kcu.cluster_sums(x, 9, labels=lab, deterministic=False)
    assert_fp32(fast[0], a[0], "atomic vs deterministic sums", atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[1], a[1])


def test_mixed_dtypes_soft():
    """fp16 rows with fp32 probabilities: the dot runs in fp32 as the reference computes."""
    x, p = make(33, 16, torch.float16, seed=14), _probs(33, 10, seed=15)
    c, n = _run(x, 10, probs=p)
    rc, rn = reference.center_update(x, 10, probs=p)
    assert_fp32(c, rc, "centers", atol=1e-3, rtol=1e-3)
    assert_fp32(n, rn, "counts")


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "mean"])
def test_backward(kind, normalize):
    N, K, D = 33, 10, 16
    x = make(N, D, seed=16)
    p = _probs(N, K, seed=17)
    lab = _labels(N, K, seed=18)
    prev = make(K, D, seed=19)
    gen = torch.Generator().manual_seed(20)
    gc, gn = torch.randn(K, D, generator=gen).to(DEVICE), torch.randn(K, generator=gen).to(DEVICE)
    grads = []
    for impl in ("triton", "torch"):
        xx, pp = x.clone().requires_grad_(), p.clone().requires_grad_()
        kw = dict(labels=lab) if kind == "hard" else dict(probs=pp)
        with ops.use_backend(impl):
            c, n = ops.center_update(xx, K, normalize=normalize, previous=prev, momentum=0.5, **kw)
        loss = (c * gc).sum() + ((n * gn).sum() if n.requires_grad else 0)
        ins = (xx,) if kind == "hard" else (xx, pp)
        grads.append(torch.autograd.grad(loss, ins))
    for a, b in zip(*grads):
        scale = max(float(b.abs().max()), 1.0)
        assert_fp32(a, b, f"{kind} grad", atol=1e-5 * scale, rtol=1e-4)


def test_float64_matches_reference():
    x, lab = make(9, 8, torch.float64, seed=21), _labels(9, 4, seed=22)
    c, n = _run(x, 4, labels=lab)
    rc, rn = reference.center_update(x, 4, labels=lab)
    torch.testing.assert_close(c, rc)
    torch.testing.assert_close(n, rn)


def test_kmeans_runs_on_triton():
    """kmeans is built on the dispatched assign + center_update: same result as torch."""
    g = torch.Generator().manual_seed(23)
    centres = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1) * 4
    x = (centres[torch.arange(60) % 4] + torch.randn(60, 8, generator=g)).to(DEVICE)
    with ops.use_backend("triton"):
        a = ops.kmeans(x, 4, iters=10, restarts=1, seed=0)
    with ops.use_backend("torch"):
        b = ops.kmeans(x, 4, iters=10, restarts=1, seed=0)
    assert torch.equal(a.labels, b.labels)
    assert abs(float(a.objective) - float(b.objective)) < 1e-5
