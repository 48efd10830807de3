"""neighbours.knn_lists: chunked kNN lists, the same lists as ops.knn with exclude_self
whatever the chunk sizes, kept in the fit's workspace."""

import pytest
import torch

from semclust import ops
from semclust.method import neighbours
from semclust.config import ChunkConfig, NeighbourConfig


def _rows(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _expected(z, k):
    return ops.knn(z, k, exclude_self=True)[1]


def _naive(z, k):
    """Brute force in float64: the k most similar other rows, ties to the lower index."""
    z = z.double()
    sim = z @ z.T
    sim.fill_diagonal_(float("-inf"))
    return torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]


def _ks(n):
    return sorted({1, n - 1, min(5, n - 1)})


CASES = [(n, d, k) for n in (2, 7, 33, 130) for d in (3, 16) for k in _ks(n)]


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):
        yield


@pytest.mark.parametrize("n,d,k", CASES)
def test_same_as_knn_for_any_chunking(n, d, k):
    z = torch.nn.functional.normalize(_rows(n, d, seed=n * 31 + d), dim=1)
    want = _expected(z, k)
    # the op itself agrees with a brute force (random rows: no near-ties at this scale)
    assert torch.equal(want, _naive(z, k))
    # chunk sizes below N that do not divide it, single rows, and one chunk for all
    chunkings = [(1, n), (n, 1), (2, 3), (3, 4), (5, 7), (7, 5), (n, n), (n + 4, n + 4)]
    if n <= 33:
        chunkings.append((1, 1))
    for q, b in chunkings:
        got = neighbours.knn_lists(z, k, ChunkConfig(knn_queries=q, knn_database=b))
        assert got.shape == (n, k) and got.dtype == torch.int32, (q, b)
        assert torch.equal(got.long(), want), (n, d, k, q, b)


def test_default_chunks_and_unnormalised_rows():
    """Inner products, not cosines, of raw rows: the row itself need not be its own best
    match (row 7 = 3 x row 2 beats row 2 for row 2), and the lists still match
    knn(exclude_self)."""
    z = _rows(40, 5, seed=3) * torch.linspace(0.1, 10, 40)[:, None]
    z[7] = 3 * z[2]
    want = _expected(z, 6)
    got = neighbours.knn_lists(z, 6, ChunkConfig(knn_queries=6, knn_database=9))
    assert torch.equal(got.long(), want)
    assert torch.equal(neighbours.knn_lists(z, 6, ChunkConfig()).long(), want)
    assert bool((got != torch.arange(40, dtype=torch.int32)[:, None]).all())


def test_lists_live_in_the_workspace_and_are_reused(tmp_path):
    from semclust.runtime.workspace import Workspace

    z = torch.nn.functional.normalize(_rows(33, 8, seed=1), dim=1)
    ws = Workspace(tmp_path, "run")
    got = neighbours.knn_lists(z, 4, ChunkConfig(knn_queries=5, knn_database=6), ws=ws, name="knn_image")
    assert got.dtype == torch.int32 and torch.equal(got.long(), _expected(z, 4))
    assert (tmp_path / "knn_image.npy").is_file()
    # a finished array is returned as it is: nothing is searched again
    again = neighbours.knn_lists(z * float("nan"), 4, ws=Workspace(tmp_path, "run"), name="knn_image")
    assert torch.equal(again, got)


@pytest.mark.parametrize("q,b", [(1, 1), (2, 3), (4, 5), (7, 100), (100, 2)])
def test_exact_ties_go_to_the_lower_index(q, b):
    """Duplicated rows score exactly the same: the row itself is dropped and ties keep the
    lower index, as in knn(exclude_self), even when the row is not among its top k + 1.

    Small integer entries make every inner product exact in float32, whatever order a
    matrix product sums in (duplicated random unit rows can score 1 ulp apart depending
    on where they fall in a BLAS tile, which is no tie at all)."""
    base = torch.randint(-3, 4, (4, 6), generator=torch.Generator().manual_seed(4)).float()
    base[0] = torch.tensor([3.0, -3, 3, 3, -3, 3])  # the longest row: each copy's best are the copies
    z = base[torch.tensor([0, 1, 0, 2, 0, 0, 3, 1, 0, 2, 1, 0, 3])]  # six copies of row 0
    n = z.shape[0]
    for k in (1, 2, 3, 4, 6, n - 1):
        want = _expected(z, k)
        assert torch.equal(want, _naive(z, k)), k
        got = neighbours.knn_lists(z, k, ChunkConfig(knn_queries=q, knn_database=b))
        assert torch.equal(got.long(), want), (k, q, b)
    # e.g. the last copy of row 0 (index 11) has the four lowest other copies as its top 4
    assert neighbours.knn_lists(z, 4, ChunkConfig(knn_queries=q, knn_database=b))[11].tolist() == [0, 2, 4, 5]
    assert neighbours.knn_lists(z, 4, ChunkConfig(knn_queries=q, knn_database=b))[0].tolist() == [2, 4, 5, 8]


@pytest.mark.parametrize("n,k", [(7, 6), (33, 5), (130, 1)])
def test_float16_input(n, k):
    z = torch.nn.functional.normalize(_rows(n, 16, seed=n), dim=1).half()
    want = _expected(z, k)
    for q, b in ((1, n), (n, 1), (4, 7), (n, n)):
        got = neighbours.knn_lists(z, k, ChunkConfig(knn_queries=q, knn_database=b))
        assert got.dtype == torch.int32
        assert torch.equal(got.long(), want), (q, b)
    assert bool((got != torch.arange(n, dtype=torch.int32)[:, None]).all())


# ---- neighbours.method = "auto" ----------------------------------------------------------

def test_auto_is_exact_up_to_the_limit_and_on_a_gpu(monkeypatch):
    cfg = NeighbourConfig()
    assert cfg.method == "auto"  # the default
    limit = cfg.exact_max_rows
    assert neighbours.resolve_method(limit, "cpu", cfg) == "exact"
    # a GPU searches exactly at any N; nothing is looked up for it
    assert neighbours.resolve_method(10**7, "cuda", cfg) == "exact"
    monkeypatch.setattr(neighbours.importlib.util, "find_spec", lambda name: object())
    assert neighbours.resolve_method(limit + 1, "cpu", cfg) == "ivf"
    # a forced method is taken as it is, at any N
    assert neighbours.resolve_method(10**7, "cpu", NeighbourConfig(method="exact")) == "exact"
    assert neighbours.resolve_method(3, "cpu", NeighbourConfig(method="ivf")) == "ivf"


def test_auto_without_faiss_stays_exact_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(neighbours.importlib.util, "find_spec", lambda name: None)
    cfg = NeighbourConfig(exact_max_rows=10)
    with caplog.at_level("WARNING", logger=neighbours.log.name):
        assert neighbours.resolve_method(11, "cpu", cfg) == "exact"
        assert not caplog.records  # quiet unless asked: the pipeline asks once per fit
        assert neighbours.resolve_method(11, "cpu", cfg, warn=True) == "exact"
    assert "pip install faiss-cpu" in caplog.text and "11 rows" in caplog.text


def test_auto_above_the_limit_searches_with_ivf(monkeypatch):
    pytest.importorskip("faiss")
    built = []
    real_ivf = neighbours.ivf
    monkeypatch.setattr(neighbours, "ivf", lambda *a, **kw: built.append(a[0].shape) or real_ivf(*a, **kw))
    z = torch.nn.functional.normalize(_rows(400, 16, seed=3), dim=1)
    # nprobe = nlist scans every cell: the IVF lists equal the exact ones up to fp16 ties
    cfg = NeighbourConfig(exact_max_rows=100, nlist=4, nprobe=4)
    got = neighbours.knn_lists(z, 5, cfg=cfg)
    assert built == [(400, 16)]
    want = _expected(z, 5)
    sims = lambda idx: (z[idx.long()] * z[:, None, :]).sum(-1)  # noqa: E731
    assert torch.allclose(sims(got), sims(want), atol=2e-3)
    # below the limit the same call is the exact search, bit for bit
    assert torch.equal(neighbours.knn_lists(z, 5, cfg=NeighbourConfig(exact_max_rows=400)).long(), want)
    assert len(built) == 1


def test_default_ivf_cells_scan_four_sqrt_n_rows_per_query():
    """sqrt(N) cells (at most N / 39, faiss's floor of training rows per cell) and 4 scanned
    per query: ~4 sqrt(N) rows per query, as faiss's 16 of 4 sqrt(N) cells would scan."""
    assert neighbours.default_nlist(1_000_000) == 1000
    assert neighbours.default_nlist(250_000) == 500
    assert neighbours.default_nlist(1000) == 1000 // 39  # sqrt: 31 cells of 32 rows, too few to train
    assert neighbours.default_nlist(10) == 1
    assert NeighbourConfig().nprobe == 4
