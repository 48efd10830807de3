"""Triton `knn` vs `semclust.ops.reference.knn`: scores, indices, ties, chunking, gradient."""

import pytest

pytest.importorskip("triton", reason="the triton backend's tests need the triton package (pip install triton)")

import torch  # noqa: E402

import semclust.ops as ops  # noqa: E402
from semclust.ops import reference  # noqa: E402

from kernel_util import DTYPES, FP16, FP32, LAYOUTS, LOW, assert_fp32, assert_lowp, make, triton_backend  # noqa: E402


def _run(x, k, **kw):
    with triton_backend():
        return ops.knn(x, k, **kw)


def _check(x, k, queries=None, exclude_self=True, **chunks):
    s, i = _run(x, k, queries=queries, exclude_self=exclude_self, **chunks)
    q = x if queries is None else queries
    assert s.dtype == q.dtype and i.dtype == torch.int64 and s.shape == i.shape == (q.shape[0], k)
    if q.dtype in LOW:
        rs, ri = reference.knn(x.double(), k, queries=None if queries is None else queries.double(),
                               exclude_self=exclude_self)
        # the scores of the returned indices are the true top-k scores (an index may differ only on a near-tie)
        true = (q.double()[:, None, :] * x.double()[i]).sum(-1)
        naive = torch.topk(q @ x.T - (torch.eye(x.shape[0], dtype=q.dtype, device=q.device) * 1e4
                                      if queries is None and exclude_self else 0), k, dim=1).values
        assert_lowp(s, rs, naive, 1e-3, "scores")
        torch.testing.assert_close(true, rs, atol=1e-5, rtol=0)
    else:
        rs, ri = reference.knn(x, k, queries=queries, exclude_self=exclude_self, **chunks)
        assert_fp32(s, rs, "scores")
        assert torch.equal(i, ri)
    if queries is None and exclude_self:
        assert not (i == torch.arange(x.shape[0], device=i.device)[:, None]).any()
    return s, i


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,k", [(7, 3, 3), (7, 3, 6), (257, 64, 10), (257, 16, 50), (130, 3, 128)],
                         ids=["N7-k3", "N7-k6-all", "N257-k10", "N257-k50", "N130-k128"])
def test_self_search(N, D, k, dtype):
    _check(make(N, D, dtype, seed=1), k)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_queries_and_chunks(exclude_self):
    """Separate queries (exclude_self has no effect), query and database chunks that split blocks."""
    x, q = make(70, 16, seed=2), make(13, 16, seed=3)
    _check(x, 40, queries=q, exclude_self=exclude_self, query_chunk=8, database_chunk=17)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_self_excluded_across_chunks(exclude_self):
    _check(make(75, 8, seed=4), 20, exclude_self=exclude_self, query_chunk=9, database_chunk=33)


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, dtype):
    x, q = make(40, 64, dtype, layout, seed=5), make(9, 64, dtype, layout, seed=6)
    a = _run(x, 7, queries=q)
    b = _run(x.contiguous(), 7, queries=q.contiguous())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ties_keep_lower_index():
    x = make(50, 8, seed=7)
    x[[3, 17, 40, 41]] = x[10].clone()  # four copies of row 10, in different database tiles
    q = x[10:11].clone()
    s, i = _run(x, 6, queries=q)
    assert i[0, :5].tolist() == [3, 10, 17, 40, 41]
    _check(x, 6, queries=q)
    _check(x, 6)  # self search: each copy's neighbours are the other copies, in index order


def test_zero_scores_tie_like_torch():
    """+0.0 and -0.0 scores compare equal (lower index first), as in torch."""
    x = torch.zeros(6, 4)
    x[:, 0] = torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, -1.0])
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    s, i = _run(x.to(make(1, 1).device), 4, queries=q.to(make(1, 1).device))
    assert i[0].tolist() == [0, 1, 2, 3]


def test_k_larger_than_candidates_is_a_clear_error():
    x = make(5, 4, seed=8)
    with pytest.raises(ValueError, match="candidate neighbours"):
        _run(x, 5)  # self excluded: only 4 candidates
    with pytest.raises(ValueError, match="candidate neighbours"):
        _run(x, 6, queries=make(2, 4, seed=9))
    s, i = _run(x, 5, exclude_self=False)
    assert sorted(i[0].tolist()) == list(range(5))


def test_large_k_falls_back_to_reference():
    x = make(300, 4, seed=10)
    _check(x, 260)


def test_scores_gradient():
    x, q = make(30, 8, seed=11), make(6, 8, seed=12)
    g = torch.randn(6, 5, generator=torch.Generator().manual_seed(13)).to(x.device)
    grads = []
    for impl in ("triton", "torch"):
        xx, qq = x.clone().requires_grad_(), q.clone().requires_grad_()
        with ops.use_backend(impl):
            s, _ = ops.knn(xx, 5, queries=qq)
        grads.append(torch.autograd.grad((s * g).sum(), (xx, qq)))
    for a, b in zip(*grads):
        assert_fp32(a, b, "grad", atol=1e-6, rtol=1e-5)
    xx = x.clone().requires_grad_()
    (d1,) = torch.autograd.grad(_run(xx, 4)[0].sum(), (xx,))
    xr = x.clone().requires_grad_()
    (d2,) = torch.autograd.grad(reference.knn(xr, 4)[0].sum(), (xr,))
    assert_fp32(d1, d2, "self-search grad", atol=1e-6, rtol=1e-5)
