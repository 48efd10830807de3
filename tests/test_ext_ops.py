"""The extension's CPU fast paths (assign, knn, center_update, batchnorm_relu) against the reference, on
odd shapes chosen to cross the extension's fixed tiles: assign tiles of
clamp(262144 / K, 16, 1024) rows, knn query tiles of 512 x database blocks of 1024 rows, and
the zero padding of a score tile to a multiple of 8 columns (K = 1, 2, 10, 300 padded, 3000 not;
the knn's last database blocks of 6, 52 and 476 rows padded), whose scores must never count.
tests/ops runs the full op suites on the ext backend too whenever the extension is built
before the run starts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semclust import ops
from semclust.ops import dispatch
from semclust.ops import reference as R

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def ext(built_ext):
    return built_ext


@pytest.fixture(autouse=True)
def forced_ext():
    with ops.use_backend("ext"):
        yield


def unit(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


# ---- assign ------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d,k", [(1, 5, 1), (2500, 17, 10), (1000, 33, 300), (200, 8, 3000), (1025, 64, 2)])
@pytest.mark.parametrize("return_probs", [True, False])
def test_assign_matches_reference(n, d, k, return_probs):
    x, c = unit(n, d, seed=1), unit(k, d, seed=2)
    got = ops.assign(x, c, 0.1, return_probs=return_probs)
    p = torch.softmax(x.double() @ c.double().T / 0.1, 1)
    tol = 10 * TOL[torch.float32]
    picked = p.gather(1, got.labels[:, None]).squeeze(1)
    assert float((p.max(1).values - picked).max()) <= tol  # an argmax up to near-ties
    ref = R.assign(x, c, 0.1)
    assert float((got.labels != ref.labels).double().mean()) <= 0.002
    torch.testing.assert_close(got.conf.double(), p.max(1).values, atol=tol, rtol=0)
    torch.testing.assert_close(got.colsum.double() / n, p.sum(0) / n, atol=tol, rtol=0)
    assert (got.probs is not None) == return_probs
    if return_probs:
        torch.testing.assert_close(got.probs.double(), p, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_assign_dtypes_and_ties(dtype):
    c = unit(9, 16, dtype)
    c[4] = c[1]  # exact tie between centres 1 and 4: the label is 1
    x = torch.cat([c[1:2].expand(3, 16), unit(1030, 16, dtype, seed=3)])
    got = ops.assign(x, c, 0.005, return_probs=True)
    ref = R.assign(x, c, 0.005, return_probs=True)
    out = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.conf.dtype == out and got.probs.dtype == out and got.labels.dtype == torch.int64
    assert got.labels[:3].tolist() == [1, 1, 1]
    torch.testing.assert_close(got.probs, ref.probs, atol=TOL[dtype] * 20, rtol=0)


# ---- knn ---------------------------------------------------------------------------------


def knn_formula(x, k, queries=None, exclude_self=True):
    q = x if queries is None else queries
    s = q.double() @ x.double().T
    if queries is None and exclude_self:
        s.fill_diagonal_(-float("inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), order


@pytest.mark.parametrize("n,d,k", [(2, 3, 1), (2100, 7, 13), (1500, 65, 100), (1030, 31, 1029)])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_knn_float64_indices_exact(n, d, k, exclude_self):
    """In float64 random data has no near-ties: indices must equal the stable sort's."""
    x = unit(n, d, torch.float64, seed=n)
    k = min(k, n - 1) if exclude_self else k
    scores, idx = ops.knn(x, k, exclude_self=exclude_self)
    s, order = knn_formula(x, k, exclude_self=exclude_self)
    assert torch.equal(idx, order)
    torch.testing.assert_close(scores, s, atol=1e-12, rtol=0)


def test_knn_separate_queries_and_float32():
    x, q = unit(2049, 24, seed=5), unit(601, 24, seed=6)
    scores, idx = ops.knn(x, 20, queries=q)
    s, order = knn_formula(x, 20, queries=q)
    torch.testing.assert_close(scores.double(), s, atol=1e-5, rtol=0)
    torch.testing.assert_close((q.double() @ x.double().T).gather(1, idx), s, atol=1e-5, rtol=0)
    assert float((idx != order).double().mean()) < 0.01  # float32 near-ties may swap neighbours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_knn_ties_across_blocks_keep_lower_index(dtype):
    """Duplicates in different 1024-row database blocks and 512-row query tiles."""
    x = torch.randint(-2, 2, (2100, 4), generator=torch.Generator().manual_seed(0)).to(dtype)  # many exact ties
    for r in (5, 1030, 2050):
        x[r] = 2  # the largest inner product with itself (16): each is the others' best
    scores, idx = ops.knn(x, 30)
    s, order = knn_formula(x, 30)
    assert torch.equal(idx, order)
    assert torch.equal(scores.double(), s)
    assert idx[1030, :2].tolist() == [5, 2050] and idx[2050, :2].tolist() == [5, 1030]


# ---- center_update -----------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_previous", [True, False])
def test_center_update_matches_reference(normalize, with_previous):
    n, d, k = 1001, 33, 7
    x = unit(n, d, seed=7)
    labels = torch.randint(0, k - 2, (n,), generator=torch.Generator().manual_seed(0))  # clusters 5, 6 empty
    probs = torch.softmax(torch.randn(n, k, generator=torch.Generator().manual_seed(1)), 1)
    prev = unit(k, d, seed=8) if with_previous else None
    m = 0.9 if with_previous else 0.0
    for kw in ({"labels": labels}, {"labels": labels.int()}, {"probs": probs}):
        got = ops.center_update(x, k, normalize=normalize, previous=prev, momentum=m, **kw)
        ref = R.center_update(x, k, normalize=normalize, previous=prev, momentum=m, **kw)
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-6)
    assert bool(torch.isfinite(got[0]).all())


# ---- gradients, registration, fake kernels --------------------------------------------------


def test_gradients_match_the_reference():
    x, c = unit(40, 8, torch.float64, 11).requires_grad_(), unit(6, 8, torch.float64, 12).requires_grad_()
    up = torch.randn(40, 6, dtype=torch.float64)
    r = ops.assign(x, c, 0.5, return_probs=True)
    (r.probs * up).sum().add(r.conf.sum()).backward()
    gx, gc = x.grad.clone(), c.grad.clone()
    x.grad = c.grad = None
    rr = R.assign(x, c, 0.5, return_probs=True)
    (rr.probs * up).sum().add(rr.conf.sum()).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gc, c.grad)

    q = unit(9, 8, torch.float64, 13).requires_grad_()
    s, _ = ops.knn(x, 4, queries=q)
    s.sum().backward()
    s2, _ = R.knn(x.detach().requires_grad_(), 4, queries=q.detach().requires_grad_())
    torch.testing.assert_close(q.grad, (s2.sum().backward(), q.grad)[1])

    p = torch.softmax(torch.randn(40, 6, dtype=torch.float64), 1).requires_grad_()
    cen, cnt = ops.center_update(x, 6, probs=p)
    (cen.sum() + cnt.sum()).backward()
    gp = p.grad.clone()
    p.grad = None
    cen, cnt = R.center_update(x, 6, probs=p)
    (cen.sum() + cnt.sum()).backward()
    torch.testing.assert_close(gp, p.grad)


def test_registered_ops_and_default_choice(ext):
    assert ops.available_backends("cpu")["ext"] is None
    assert not hasattr(torch.ops.semclust_ext, "retrieve")  # removed: the torch / triton retrieve serve it
    with ops.use_backend(None):
        for op in ext.REGISTERED_OPS:
            assert dispatch.resolve(op, CPU)[0] == "ext", op
        for op in {"assign", "knn", "center_update", "retrieve", "balance"} - set(ext.REGISTERED_OPS):
            assert dispatch.resolve(op, CPU)[0] == "torch", op


def test_fake_kernels():
    x, c = unit(7, 5), unit(3, 5)
    E = torch.ops.semclust_ext
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(E.assign.default, (x, c, 0.1, True), test_utils=utils)
    torch.library.opcheck(E.knn.default, (x, None, 2, True), test_utils=utils)
    torch.library.opcheck(E.center_update.default, (x, 3, torch.tensor([0, 1, 2, 0, 1, 2, 0]), None, True, None, 0.0),
                          test_utils=utils)


# ---- batchnorm_relu ----------------------------------------------------------------------
# (tests/ops/test_batchnorm_relu.py has the full suite; these run it on the ext kernel even
# when the extension was not built before collection, and across its per-thread column
# ranges: their width depends on the thread count, so 1, 2 and 3 threads split C apart)


def _bn_formula(h, w, b, eps=1e-5):
    x = h.double()
    mean, var = x.mean(0), x.var(0, unbiased=False)
    return torch.clamp((x - mean) / torch.sqrt(var + eps) * w.double() + b.double(), min=0), mean, var


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("b_,c", [(2, 1), (65, 97), (300, 64), (40, 530), (1024, 512)])
def test_batchnorm_relu_forward_backward_and_running_stats(b_, c, threads):
    g = torch.Generator().manual_seed(c)
    x = (3 * torch.randn(b_, c, generator=g) + 1).requires_grad_()
    w = (1 + 0.5 * torch.randn(c, generator=g)).requires_grad_()
    bias = (0.3 * torch.randn(c, generator=g)).requires_grad_()
    rm, rv, nb = torch.zeros(c), torch.ones(c), torch.tensor(0)
    y = ops.batchnorm_relu(x, w, bias, rm, rv, momentum=0.1, num_batches_tracked=nb)
    y64, mean, var = _bn_formula(x, w, bias)
    torch.testing.assert_close(y.double(), y64, atol=1e-4, rtol=0)
    torch.testing.assert_close(rm.double(), 0.1 * mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * var * b_ / (b_ - 1), atol=1e-4, rtol=0)
    assert int(nb) == 1
    up = torch.randn(b_, c, generator=g)
    got = torch.autograd.grad(y, (x, w, bias), up)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, bias))
    want = torch.autograd.grad(_bn_formula(x64, w64, b64)[0], (x64, w64, b64), up.double())
    for name, a, e in zip(("h", "weight", "bias"), got, want):
        scale = max(1.0, float(e.abs().max()))
        torch.testing.assert_close(a.double() / scale, e / scale, atol=1e-4, rtol=0, msg=f"grad {name}")


def test_batchnorm_relu_gradcheck_and_half_precision():
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(33, 40, generator=g, dtype=torch.float64)).requires_grad_()
    w = (1 + 0.5 * torch.randn(40, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(40, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, w_, b_: ops.batchnorm_relu(x_, w_, b_), (x, w, b))
    for dt, tol in ((torch.float16, 5e-2), (torch.bfloat16, 4e-1)):
        xh = x.detach().to(dt).requires_grad_()
        y = ops.batchnorm_relu(xh, w.detach().to(dt), b.detach().to(dt))
        assert y.dtype == dt
        torch.testing.assert_close(y.double(), _bn_formula(xh.detach(), w.detach().to(dt), b.detach().to(dt))[0],
                                   atol=tol, rtol=0)
        (gx,) = torch.autograd.grad(y.sum(), xh)
        assert gx.dtype == dt and bool(torch.isfinite(gx).all())


def test_batchnorm_relu_runs_the_ext_kernel():
    """Under the forced backend the op is the extension's autograd Function, not torch's."""
    x = torch.randn(16, 8, requires_grad=True)
    y = ops.batchnorm_relu(x, torch.ones(8), torch.zeros(8))
    assert type(y.grad_fn).__name__ == "BatchNormReluFunctionBackward"
