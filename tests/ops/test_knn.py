"""ops.knn against the full float64 similarity matrix and a stable descending sort."""

from __future__ import annotations

import pytest
import torch

import semclust.ops as ops

OPS = ("knn",)


def formula(x, k, queries=None, exclude_self=True):
    """(all scores S [Q, N], top-k scores, top-k indices); ties keep the lower index."""
    q = x if queries is None else queries
    s = q.double() @ x.double().T
    if queries is None and exclude_self:
        s.fill_diagonal_(-float("inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s, s.gather(1, order), order


def check(h, scores, idx, x, k, dtype, queries=None, exclude_self=True):
    """Scores equal the true top-k; each index has the score it claims; no repeats, no self."""
    s, top_s, top_i = formula(x, k, queries, exclude_self)
    q_dtype = x.dtype if queries is None else queries.dtype
    assert scores.dtype == q_dtype and idx.dtype == torch.int64
    assert scores.shape == idx.shape == (s.shape[0], k)
    atol = h.TOL[dtype] * max(1.0, float(s[torch.isfinite(s)].abs().max()))
    h.close(scores, top_s, atol, "scores")
    h.close(s.gather(1, idx), top_s, atol, "scores of the returned indices")
    assert bool((scores[:, 1:] <= scores[:, :-1]).all()), "best first"
    srt = idx.sort(dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), "an index repeats in a row"
    if queries is None and exclude_self:
        assert not bool((idx == torch.arange(x.shape[0])[:, None]).any()), "self not excluded"
    return top_i


# each Triton launch takes ~0.1-3 s in the CPU interpreter: the backend tests keep the
# number of (query chunk x database chunk) tiles small; many-chunk cases are torch-only
SHAPES = [(2, 3, 1), (7, 3, 6), (7, 64, 3), (100, 3, 10), (100, 64, 50), (257, 64, 10)]


@pytest.mark.parametrize("n,d,k", SHAPES)
def test_matches_formula(backend, h, n, d, k):
    x = h.unit(n, d)
    scores, idx = ops.knn(x, k)
    check(h, scores, idx, x, k, torch.float32)


@pytest.mark.parametrize("q", [1, 7])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_separate_queries(backend, h, q, exclude_self):
    """With queries given, every database row is a candidate (exclude_self does nothing)."""
    x, queries = h.unit(20, 16), h.unit(q, 16)
    scores, idx = ops.knn(x, 20, queries=queries, exclude_self=exclude_self)
    check(h, scores, idx, x, 20, torch.float32, queries)


def test_queries_inside_database_are_not_dropped(backend, h):
    x = h.unit(30, 8)
    scores, idx = ops.knn(x, 3, queries=x[:5].clone())
    assert idx[:, 0].tolist() == list(range(5))  # a query's own row is a legal neighbour here
    check(h, scores, idx, x, 3, torch.float32, x[:5])


def test_keep_self(backend, h):
    x = h.unit(40, 16)
    scores, idx = ops.knn(x, 5, exclude_self=False)
    check(h, scores, idx, x, 5, torch.float32, exclude_self=False)
    assert idx[:, 0].tolist() == list(range(40))  # a unit vector is its own best match


def test_one_row_database(backend, h):  # N = 1: legal with separate queries
    x, queries = h.unit(1, 8), h.unit(4, 8)
    scores, idx = ops.knn(x, 1, queries=queries)
    assert idx.tolist() == [[0]] * 4
    h.close(scores, queries.double() @ x.double().T, h.TOL[torch.float32])


def chunked_vs_whole(h, n, qc, dc):
    x = h.unit(n, 32)
    whole = ops.knn(x, 10)
    part = ops.knn(x, 10, query_chunk=qc, database_chunk=dc)
    check(h, *part, x, 10, torch.float32)
    assert torch.equal(part[1], whole[1])
    h.close(part[0], whole[0], h.TOL[torch.float32])


@pytest.mark.parametrize("qc,dc", [(30, 40), (64, 1000), (1000, 33)])
def test_chunked_equals_unchunked(backend, h, qc, dc):  # no chunk divides 100
    chunked_vs_whole(h, 100, qc, dc)


@pytest.mark.parametrize("qc,dc", [(7, 25), (100, 64), (256, 100), (1, 256), (257, 1)])
def test_many_chunks_torch_only(h, qc, dc):
    chunked_vs_whole(h, 257, qc, dc)


def test_database_chunk_smaller_than_k(backend, h):
    """A running top-k must keep k candidates across chunks narrower than k."""
    x = h.unit(60, 8)
    check(h, *ops.knn(x, 20, database_chunk=7, query_chunk=60), x, 20, torch.float32)


@pytest.mark.parametrize("dc", [7, 300])  # the duplicates in other database chunks, or in one
def test_top1_ties_keep_the_lowest_index(backend, h, dc):
    """k = 1 (k-means' nearest centre) keeps the lowest index among equal best scores,
    within a chunk and across chunks, as the stable sort of k > 1 does."""
    x = torch.randint(-2, 3, (40, 4), generator=torch.Generator().manual_seed(1)).float()  # many exact ties
    x[[3, 11, 30]] = 3.0  # each the others' best (36), in different chunks of 7 rows
    queries = torch.cat([x[:20], -x[5:9]])
    scores, idx = ops.knn(x, 1, queries=queries, database_chunk=dc, query_chunk=13)
    _, top_s, top_i = formula(x, 1, queries)
    assert torch.equal(idx, top_i) and torch.equal(scores.double(), top_s)
    assert idx[3, 0] == 3 and idx[11, 0] == 3


def test_big_torch_only(h):
    x = h.unit(2000, 64)
    check(h, *ops.knn(x, 50, query_chunk=1000, database_chunk=700), x, 50, torch.float32)


def test_torch_tile_cap_keeps_the_lists(h, monkeypatch):
    """The torch backend narrows a database step to _KNN_TILE scores per tile whatever
    database_chunk says (the default 4096 x 65536 chunks held ~7 GB); the lists, ties
    included, are those of the uncapped search."""
    from semclust.ops import reference

    x = torch.randint(-2, 3, (300, 4)).float()  # exact ties in every query's list
    want = ops.knn(x, 12, query_chunk=300, database_chunk=300)
    steps = []  # database rows scored per tile
    real_scores = reference._scores
    monkeypatch.setattr(reference, "_KNN_TILE", 300 * 17)  # 17 database rows per tile
    monkeypatch.setattr(reference, "_scores", lambda a, b: steps.append(b.shape[0]) or real_scores(a, b))
    got = ops.knn(x, 12, query_chunk=300, database_chunk=300)
    monkeypatch.undo()
    assert max(steps) == 17 and len(steps) == -(-300 // 17)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    monkeypatch.setattr(reference, "_KNN_TILE", 5)  # below k: a step keeps k rows
    assert torch.equal(ops.knn(x, 12, query_chunk=300, database_chunk=300)[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(backend, h, dtype):
    x = h.unit(100, 64, dtype)
    scores, idx = ops.knn(x, 10, database_chunk=32)
    top_i = check(h, scores, idx, x, 10, dtype)
    if dtype == torch.float64:  # random data: no near-ties at fp64 precision
        assert torch.equal(idx, top_i)


@pytest.mark.parametrize("k", [9, 40])
def test_ties_in_long_lists(backend, h, k):
    """Lists longer than one 8-score group, over more database rows than the ext's
    1024-row block, with many exact ties at every position (small-integer rows): the
    grouped insert position and the shifted list keep the stable sort's order."""
    if backend == "triton":
        pytest.skip("2500 rows take minutes in Triton's CPU interpreter; its ties are tested above")
    x = torch.randint(-2, 3, (2500, 5)).float()
    scores, idx = ops.knn(x, k)
    _, top_s, top_i = formula(x, k)
    assert torch.equal(idx, top_i)
    assert torch.equal(scores.double(), top_s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qc,dc", [(57, 13), (20, 1000)])
def test_ties_keep_lower_index(backend, h, dtype, qc, dc):
    """Small-integer rows give exact dot products in every dtype, so ties are exact and
    the indices must equal the stable sort's, also across database chunk boundaries."""
    x = torch.randint(-2, 3, (57, 4)).to(dtype)
    # duplicated rows of the largest possible inner product with themselves (16): each is
    # the others' best match, an exact tie
    x[3] = x[10] = x[40] = 2
    scores, idx = ops.knn(x, 12, database_chunk=dc, query_chunk=qc)
    _, top_s, top_i = formula(x, 12)
    assert torch.equal(idx, top_i)
    assert torch.equal(scores.double(), top_s)
    # each duplicate lists the other two among its best, lower index first
    for row, others in ((3, [10, 40]), (10, [3, 40]), (40, [3, 10])):
        got = idx[row].tolist()
        assert [i for i in got if i in others] == others
        assert scores[row, got.index(others[1])].item() == 16


@pytest.mark.parametrize("layout", ["contiguous", "strided", "colmajor", "offset"])
def test_layouts(backend, h, layout):
    x, queries = h.unit(37, 24), h.unit(9, 24)
    check(h, *ops.knn(h.layout(x, layout), 6, database_chunk=16), x, 6, torch.float32)
    check(h, *ops.knn(h.layout(x, layout), 6, queries=h.layout(queries, layout)), x, 6, torch.float32, queries)


@pytest.mark.parametrize("n", [2, 7])
def test_k_equals_all_candidates(backend, h, n):
    x = h.unit(n, 4)
    scores, idx = ops.knn(x, n - 1)
    check(h, scores, idx, x, n - 1, torch.float32)


# --- errors -------------------------------------------------------------------------


def test_k_above_candidates_is_a_clear_error(h):
    x = h.unit(7, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\].*only 6 candidate"):
        ops.knn(x, 7)
    with pytest.raises(ValueError, match=r"only 7 candidate"):
        ops.knn(x, 8, queries=h.unit(2, 4))
    with pytest.raises(ValueError, match=r"only 0 candidate"):  # one row, self excluded
        ops.knn(h.unit(1, 4), 1)
    with pytest.raises(ValueError, match="k must be"):
        ops.knn(x, 0)


def test_rejects_bad_input(h):
    x = h.unit(7, 4)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x has 1 row"):
        ops.knn(bad, 2)
    with pytest.raises(ValueError, match="queries has 1 row"):
        ops.knn(x, 2, queries=bad)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.knn(x[None], 2)
    with pytest.raises(ValueError, match="queries must be 2-D"):
        ops.knn(x, 2, queries=x[0])
    with pytest.raises(ValueError, match="queries has dim 3 but 4"):
        ops.knn(x, 2, queries=h.unit(2, 3))
    with pytest.raises(TypeError, match="k must be an int"):
        ops.knn(x, 2.0)
    with pytest.raises(ValueError, match="database_chunk"):
        ops.knn(x, 2, database_chunk=0)
