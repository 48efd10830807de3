"""ops.kmeans: fixed-point, objective, seeding and restarts, and sklearn as a yardstick."""

from __future__ import annotations

import sys

import pytest
import torch

import semclust.ops as ops

# `semclust.ops.kmeans` the attribute is the function; the module is needed for patching
kmeans_module = sys.modules["semclust.ops.kmeans"]

OPS = ("assign", "center_update")  # every Lloyd step is one of each


def unit64(x):
    return torch.nn.functional.normalize(x.double(), dim=1)


def blobs(n, d, k, spread, seed=0, orthogonal=False):
    """Points around k random unit directions, L2-normalised; returns (x, true labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    if orthogonal:  # k <= d mutually orthogonal directions: the best-separated blobs
        centres = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0].T.float()
    y = torch.arange(n) % k
    x = centres[y] + spread * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1), y


def objective(x, centers, labels):
    """mean_i (1 - cos(x_i, c_label_i)) in float64."""
    return float((1 - (unit64(x) * unit64(centers)[labels]).sum(1)).mean())


def check_result(h, r, x, k):
    n = x.shape[0]
    assert r.centers.shape == (k, x.shape[1]) and r.centers.dtype == torch.float32
    assert r.labels.shape == (n,) and r.labels.dtype == torch.int64
    assert r.objective.shape == ()
    h.close(r.centers.double().norm(dim=1), torch.ones(k, dtype=torch.float64), 1e-5, "unit centres")
    # the labels are the argmax of x . centres (up to fp32 near-ties)
    h.assert_argmax(r.labels, unit64(x) @ r.centers.double().T, 1e-5)
    # the objective is the one recomputed from the returned centres and labels
    assert float(r.objective) == pytest.approx(objective(x, r.centers, r.labels), abs=1e-5)


@pytest.mark.parametrize("n,d,k", [(1, 3, 1), (7, 3, 1), (7, 3, 3), (60, 8, 4), (120, 16, 10)])
def test_result_is_consistent(backend, h, n, d, k):
    x, _ = blobs(n, d, k, 0.3)
    r = ops.kmeans(x, k, iters=20, restarts=2, seed=1)
    check_result(h, r, x, k)


def test_converged_centres_are_normalised_means(backend, h):
    """At a Lloyd fixed point each centre is the normalised mean of its members."""
    x, y = blobs(90, 8, 3, 0.15, orthogonal=True)
    r = ops.kmeans(x, 3, iters=50, restarts=2, seed=0)
    check_result(h, r, x, 3)
    sums = torch.zeros(3, 8, dtype=torch.float64).index_add(0, r.labels, x.double())
    h.close(r.centers, unit64(sums), 1e-5, "centres vs normalised member means")
    # well-separated blobs: the clustering is the truth up to a relabelling
    assert len(set(zip(r.labels.tolist(), y.tolist()))) == 3


def test_k_equals_one(h):
    x = torch.randn(50, 6)
    r = ops.kmeans(x, 1, iters=5, restarts=1)
    mean_dir = unit64(unit64(x).sum(0, keepdim=True))
    h.close(r.centers, mean_dir, 1e-5, "the one centre is the normalised mean")
    assert bool((r.labels == 0).all())
    assert float(r.objective) == pytest.approx(objective(x, mean_dir, r.labels), abs=1e-6)


def test_k_equals_n(h):
    """As many clusters as rows: each row is its own centre, objective 0."""
    x = torch.randn(7, 5)
    r = ops.kmeans(x, 7, iters=5, restarts=1)
    assert sorted(r.labels.tolist()) == list(range(7))
    h.close(r.centers[r.labels], unit64(x), 1e-6, "centres are the rows")
    assert float(r.objective) == pytest.approx(0.0, abs=1e-6)


def test_unnormalised_and_low_precision_input(h):
    """Rows are normalised inside: scaling rows or rounding to fp16 changes little."""
    x, _ = blobs(200, 16, 5, 0.2)
    scaled = x * (0.1 + 10 * torch.rand(200, 1))
    r1 = ops.kmeans(x, 5, seed=3)
    r2 = ops.kmeans(scaled, 5, seed=3)
    assert torch.equal(r1.labels, r2.labels)
    check_result(h, r2, x, 5)
    r3 = ops.kmeans(x.half(), 5, seed=3)
    check_result(h, r3, x.half(), 5)
    assert float(r3.objective) == pytest.approx(float(r1.objective), abs=1e-3)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_seed_reproducible(h, init):
    x, _ = blobs(300, 16, 8, 0.4)
    a = ops.kmeans(x, 8, restarts=2, seed=7, init=init)
    b = ops.kmeans(x, 8, restarts=2, seed=7, init=init)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centers, b.centers)
    assert float(a.objective) == float(b.objective)
    check_result(h, a, x, 8)


def test_seed_is_local(h):
    """The seed drives a private generator: the global RNG neither matters nor moves."""
    x, _ = blobs(200, 16, 6, 0.4)
    torch.manual_seed(123)
    a = ops.kmeans(x, 6, restarts=1, seed=5)
    after = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(100)
    b = ops.kmeans(x, 6, restarts=1, seed=5)
    assert torch.equal(a.labels, b.labels)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)


def test_restarts_pick_the_best(h, monkeypatch):
    """The result is the restart with the lowest objective (each restart's last objective
    is recorded by wrapping the module's objective function)."""
    x, _ = blobs(300, 8, 10, 0.6)
    events = []
    real_init, real_obj = kmeans_module.kmeans_pp_init, kmeans_module._objective

    def init(*a, **kw):
        events.append("init")
        return real_init(*a, **kw)

    def obj(*a, **kw):
        v = real_obj(*a, **kw)
        events.append(float(v))
        return v

    monkeypatch.setattr(kmeans_module, "kmeans_pp_init", init)
    monkeypatch.setattr(kmeans_module, "_objective", obj)
    r = ops.kmeans(x, 10, iters=30, restarts=4, seed=0)
    finals = [events[i - 1] for i in range(1, len(events)) if events[i] == "init"] + [events[-1]]
    assert len(finals) == 4 and events.count("init") == 4
    assert len(set(finals)) > 1, "restarts should differ on overlapping blobs; the test would be void"
    assert float(r.objective) == min(finals)
    check_result(h, r, x, 10)


def test_more_restarts_never_worse(h):
    """Restart 0 is the same for every `restarts` with one seed, so best-of-n cannot lose."""
    x, _ = blobs(300, 8, 10, 0.6)
    one = ops.kmeans(x, 10, iters=30, restarts=1, seed=2)
    many = ops.kmeans(x, 10, iters=30, restarts=5, seed=2)
    assert float(many.objective) <= float(one.objective)


# (noise per coordinate, blob set): from separated (noise norm 0.57) to overlapping (1.7);
# the middle sets are ones where plain (non-greedy) k-means++ seeding lost 5-18%
@pytest.mark.parametrize("spread,data_seed", [(0.1, 0), (0.12, 2), (0.12, 3), (0.15, 3), (0.15, 4), (0.3, 4)])
def test_as_good_as_sklearn(h, spread, data_seed):
    """Spherical objective within 3% of sklearn's KMeans (Lloyd, greedy k-means++, same
    restarts) on normalised blobs, sklearn's partition scored with its best (normalised
    mean) centres."""
    sk = pytest.importorskip("sklearn.cluster")
    x, _ = blobs(2000, 32, 10, spread, seed=data_seed)
    ours = ops.kmeans(x, 10, iters=100, restarts=3, seed=0)
    check_result(h, ours, x, 10)
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    with threadpool_limits(1):  # OpenMP threads spinning on 2 shared cores cost seconds
        km = sk.KMeans(n_clusters=10, n_init=3, random_state=0).fit(x.double().numpy())
    lab = torch.from_numpy(km.labels_).long()
    sums = torch.zeros(10, 32, dtype=torch.float64).index_add(0, lab, x.double())
    theirs = objective(x, sums, lab)
    assert float(ours.objective) <= theirs * 1.03 + 1e-9, (float(ours.objective), theirs)


def test_duplicate_points_and_empty_clusters(h):
    """Only 3 distinct points but k = 5: k-means++ runs out of spread, clusters empty out;
    the result must still be finite and consistent."""
    base = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    x = base.repeat(10, 1)
    r = ops.kmeans(x, 5, iters=10, restarts=2)
    assert bool(torch.isfinite(r.centers).all())
    check_result(h, r, x, 5)
    assert float(r.objective) == pytest.approx(0.0, abs=1e-6)


# --- errors -------------------------------------------------------------------------


def test_rejects_bad_input():
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\].*6 rows"):
        ops.kmeans(x, 7)  # K > N
    with pytest.raises(ValueError, match="k must be"):
        ops.kmeans(x, 0)  # K < 1
    with pytest.raises(ValueError, match="iters"):
        ops.kmeans(x, 2, iters=0)
    with pytest.raises(ValueError, match="restarts"):
        ops.kmeans(x, 2, restarts=0)
    with pytest.raises(ValueError, match="init must be"):
        ops.kmeans(x, 2, init="forgy")
    bad = x.clone()
    bad[4, 0] = float("nan")
    with pytest.raises(ValueError, match="x has 1 row"):
        ops.kmeans(bad, 2)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.kmeans(x[0], 2)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.kmeans(x[None], 2)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.kmeans(x, 2.0)


# --- k-means++ on a sample of the rows --------------------------------------------


def _spy_init(monkeypatch):
    """Record the pool each k-means++ seeding is given."""
    pools = []
    real = kmeans_module.kmeans_pp_init

    def init(pool, *a, **kw):
        pools.append(pool.clone())
        return real(pool, *a, **kw)

    monkeypatch.setattr(kmeans_module, "kmeans_pp_init", init)
    return pools


def _is_subset_of_rows(pool, x):
    """Each pool row is some row of x, and no row of x is taken twice."""
    match = (pool[:, None, :] == x[None, :, :]).all(2)  # [P, N]
    first = match.float().argmax(1)
    return bool(match.any(1).all()) and first.unique().numel() == pool.shape[0]


def test_init_sample_smaller_than_n_still_finds_the_blobs(h, monkeypatch):
    x, y = blobs(600, 8, 4, 0.15, seed=1, orthogonal=True)
    pools = _spy_init(monkeypatch)
    r = ops.kmeans(x, 4, iters=30, restarts=2, seed=3, init_sample=50)
    check_result(h, r, x, 4)
    # seeding saw 50 distinct rows of x per restart, Lloyd then labelled all 600
    assert [p.shape for p in pools] == [torch.Size([50, 8])] * 2
    assert all(_is_subset_of_rows(p, x) for p in pools)
    assert not torch.equal(pools[0], pools[1]), "each restart should draw its own sample"
    # the labels are the blob ids up to a permutation: 4 (label, blob) pairs, one per blob
    pairs = set(zip(r.labels.tolist(), y.tolist()))
    assert len(pairs) == 4 and {a for a, _ in pairs} == {0, 1, 2, 3}

    again = ops.kmeans(x, 4, iters=30, restarts=2, seed=3, init_sample=50)
    assert torch.equal(again.labels, r.labels) and torch.equal(again.centers, r.centers)
    assert float(again.objective) == float(r.objective)
    assert len(pools) == 4 and all(torch.equal(a, b) for a, b in zip(pools[:2], pools[2:]))


def test_init_sample_at_least_n_seeds_from_all_rows(monkeypatch):
    x, _ = blobs(60, 8, 4, 0.15, orthogonal=True)
    pools = _spy_init(monkeypatch)
    ops.kmeans(x, 4, iters=5, restarts=1, seed=0, init_sample=60)
    ops.kmeans(x, 4, iters=5, restarts=1, seed=0, init_sample=1000)
    assert len(pools) == 2 and all(torch.equal(p, x) for p in pools)


def test_init_sample_depends_on_seed(monkeypatch):
    x, _ = blobs(600, 8, 4, 0.15, seed=1, orthogonal=True)
    pools = _spy_init(monkeypatch)
    ops.kmeans(x, 4, iters=2, restarts=1, seed=0, init_sample=50)
    ops.kmeans(x, 4, iters=2, restarts=1, seed=1, init_sample=50)
    assert not torch.equal(pools[0], pools[1])


def test_init_sample_below_k_is_rejected():
    x, _ = blobs(100, 8, 4, 0.15)
    with pytest.raises(ValueError, match="init_sample"):
        ops.kmeans(x, 4, init_sample=3)
    with pytest.raises(ValueError, match="init_sample"):
        ops.kmeans(x, 4, init_sample=0)
    # exactly k rows to seed from is enough
    r = ops.kmeans(x, 4, iters=5, restarts=1, init_sample=4)
    assert r.labels.shape == (100,)


# --- the reduction hook (sharded rows) ----------------------------------------------


class OneShard:
    """A KMeansReducer for a single shard holding every row; records the calls."""

    def __init__(self):
        self.calls = []

    def total_rows(self, x):
        self.calls.append("total_rows")
        return x.shape[0]

    def take(self, x, ids):
        self.calls.append("take")
        return x[ids]

    def sum(self, t):
        self.calls.append("sum")
        return t

    def farthest(self, x, dist, e):
        self.calls.append("farthest")
        return x[torch.topk(dist, min(e, x.shape[0])).indices]


@pytest.mark.parametrize("case", ["all rows", "init_sample", "random", "fp16", "empty clusters", "sample"])
def test_one_shard_reducer_is_the_plain_loop(case):
    """Every reduction goes through the hook, and one shard gives reduce=None bit for bit."""
    x, _ = blobs(300, 8, 6, 0.4)
    k, kw = 6, dict(iters=20, restarts=2, seed=4)
    if case == "init_sample":
        kw["init_sample"] = 40
    elif case == "random":
        kw["init"] = "random"
    elif case == "fp16":
        x = x.half()
    elif case == "empty clusters":
        x, k = x[:3].repeat(20, 1), 5
    elif case == "sample":
        kw["max_points_per_centre"] = 20
    red = OneShard()
    got = ops.kmeans(x, k, reduce=red, **kw)
    want = ops.kmeans(x, k, **kw)
    assert torch.equal(got.centers, want.centers) and torch.equal(got.labels, want.labels)
    assert float(got.objective) == float(want.objective)
    assert red.calls[0] == "total_rows" and red.calls.count("total_rows") == 1
    # seeding rows come through take (the whole of x once when it fits in init_sample)
    assert red.calls.count("take") == (1 if case in ("all rows", "fp16", "empty clusters", "sample") else 2)
    assert "sum" in red.calls
    assert ("farthest" in red.calls) == (case == "empty clusters")


def test_reducer_checks_the_shards_first():
    """A sharded run asks the reducer first, so every rank raises a bad shard alike."""

    class Refuses(OneShard):
        def total_rows(self, x):
            raise ValueError("x on rank 1 has rows with NaN or Inf")

    bad = torch.full((4, 3), float("nan"))
    with pytest.raises(ValueError, match="rank 1"):
        ops.kmeans(bad, 2, reduce=Refuses())
    with pytest.raises(ValueError, match=r"k must be in \[1, 12\].*12 rows"):
        ops.kmeans(torch.randn(6, 3), 13, reduce=type("Twice", (OneShard,), {"total_rows": lambda self, x: 12})())


def test_trained_on_a_sample_then_every_row_assigned():
    """faiss's points-per-centre cap: Lloyd on k x cap rows, one pass labels all N, and the
    objective (on all rows) is within 1% of the run on every row."""
    x, _ = blobs(6000, 16, 8, 0.5)
    full = ops.kmeans(x, 8, restarts=2, seed=1)
    got = ops.kmeans(x, 8, restarts=2, seed=1, max_points_per_centre=256)
    assert got.labels.shape == (6000,)
    assert torch.equal(got.labels, ops.assign(x, got.centers, 1e-2).labels)
    want_obj = float((1 - (x * got.centers[got.labels]).sum(1)).mean())
    assert float(got.objective) == pytest.approx(want_obj, rel=1e-5)
    assert float(got.objective) <= 1.01 * float(full.objective)
    # the sample is drawn from the seed
    again = ops.kmeans(x, 8, restarts=2, seed=1, max_points_per_centre=256)
    assert torch.equal(again.centers, got.centers)


def test_sample_cap_above_n_is_the_plain_run():
    x, _ = blobs(300, 8, 6, 0.4)
    a = ops.kmeans(x, 6, seed=3)
    b = ops.kmeans(x, 6, seed=3, max_points_per_centre=50)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)


def test_sample_cap_must_be_positive():
    x, _ = blobs(300, 8, 6, 0.4)
    with pytest.raises(ValueError, match="max_points_per_centre"):
        ops.kmeans(x, 6, max_points_per_centre=0)
