"""Estimating K: finds the true K on well-separated blobs, scores nothing on data without
clusters (the null reference cancels it), respects k_range, one score row per K tried
with every criterion, checks its input, deterministic for a seed."""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from semclust.config import Config
from semclust.method import k_search
from semclust.method.k_search import CRITERIA, PARTITIONS, KSearch, choose, estimate_k, k_grid

SCORE_KEYS = {"k", "cross_modal_gap", "gap_se", "cross_modal", "null_cross_modal", "silhouette", "image_silhouette",
              "objective", "partition"}


def _search(**options):
    """A Config whose k_search section has these options (the rest its defaults)."""
    return Config.from_dict({"k_search": options})


def _blobs(k=6, n=600, d=16, seed=0):
    """k well-separated concepts: images near their concept, 3 nouns a concept, 20 distractors."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
    labels = torch.arange(n) % k
    u = F.normalize(centres[labels] + 0.15 * torch.randn(n, d, generator=g), dim=1)
    nouns = torch.cat([F.normalize(centres.repeat_interleave(3, 0) + 0.03 * torch.randn(3 * k, d, generator=g), dim=1),
                       F.normalize(torch.randn(20, d, generator=g), dim=1)])
    return u, nouns, labels


@pytest.mark.parametrize("k", [4, 7])
def test_finds_the_true_k_on_separated_blobs(k):
    u, nouns, _ = _blobs(k=k)
    ks = estimate_k(u, nouns, (2, 12), _search(points=11))
    assert [s["k"] for s in ks.scores] == list(range(2, 13))
    assert isinstance(ks, KSearch)
    assert ks.k == k
    assert ks.criterion == "cross_modal_gap" and not ks.at_range_end and ks.significant is True
    at = {s["k"]: s for s in ks.scores}[k]
    # real structure: the score stands well clear of its null reference
    assert at["cross_modal"] > at["null_cross_modal"] + 10 * at["gap_se"]


def test_no_clusters_scores_like_its_null():
    """Images from one Gaussian (what the null reference draws): the gap stays near zero at
    every K, far below the gap of the same number of rows in real clusters."""
    u_blobs, nouns, _ = _blobs(k=5)
    g = torch.Generator().manual_seed(1)
    u = F.normalize(torch.randn(u_blobs.shape[0], u_blobs.shape[1], generator=g), dim=1)
    flat = estimate_k(u, nouns, (2, 12), _search(points=6))
    clustered = estimate_k(u_blobs, nouns, (2, 12), _search(points=6))
    assert max(abs(s["cross_modal_gap"]) for s in flat.scores) < 0.25 * max(s["cross_modal_gap"] for s in clustered.scores)
    # and the search says so: no K stands out from the null, which the table prints
    assert clustered.significant and not flat.significant
    assert "no K of the range scores significantly" in flat.table()
    assert "significantly" not in clustered.table()


def test_significance_is_one_sided_and_bonferroni_corrected():
    from scipy.stats import norm

    z1, z24 = norm.isf(0.05), norm.isf(0.05 / 24)  # 1.64, 2.87
    assert k_search.significant_gap(1.0 * z1 + 1e-3, 1.0, 1, 0.05) and not k_search.significant_gap(z1 - 1e-3, 1.0, 1, 0.05)
    # the largest of 24 gaps must clear the corrected bound
    assert not k_search.significant_gap(2.5, 1.0, 24, 0.05) and k_search.significant_gap(z24 + 1e-3, 1.0, 24, 0.05)
    assert not k_search.significant_gap(-5.0, 1.0, 1, 0.05)
    assert Config().k_search.level == 0.05


def test_k_range_is_respected_and_scores_have_every_criterion():
    u, nouns, _ = _blobs(k=6)
    ks = estimate_k(u, nouns, (8, 12), _search(points=4, rounds=2))
    tried = [s["k"] for s in ks.scores]
    assert tried == k_grid(8, 12, 4) and tried[0] == 8 and tried[-1] == 12
    assert 8 <= ks.k <= 12
    assert ks.at_range_end == (ks.k in (8, 12))  # the true 6 is below the range
    for s in ks.scores:
        assert set(s) == SCORE_KEYS
        assert all(isinstance(s[c], float) for c in SCORE_KEYS - {"k", "partition"})
        assert s["partition"] in PARTITIONS
    assert 1 <= len(ks.rounds) <= 2 and ks.rounds[0]["k0"] == 12
    assert ks.sample == u.shape[0] and ks.seconds > 0
    assert "cross_modal_gap" in ks.table() and isinstance(ks.to_dict()["scores"], list)
    # a single-K range tries that K only
    one = estimate_k(u, nouns, (5, 5), _search(rounds=1))
    assert one.k == 5 and [s["k"] for s in one.scores] == [5]


def _shared_parts(k=5, n=1500, d=24, seed=0):
    """k concepts the images separate cleanly; 30% of the rows' counterparts are one of
    two nouns every concept shares (a "part": grass, sky), orthogonal to the concepts."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    concepts, parts = basis[:k], basis[k:k + 2]
    labels = torch.arange(n) % k
    u = F.normalize(concepts[labels] + 0.25 * torch.randn(n, d, generator=g), dim=1)
    shared = (torch.rand(n, generator=g) < 0.3)[:, None]
    v = torch.where(shared, parts[torch.randint(2, (n,), generator=g)], concepts[labels])
    return u, F.normalize(v + 0.1 * torch.randn(n, d, generator=g), dim=1), labels


def test_each_k_scores_its_best_candidate_partition(monkeypatch):
    """k-means of v alone spends clusters on the shared-part piles and merges concepts at
    the true K; the joint candidate keeps the concepts, so it is the one K = 5 scores."""
    from semclust.metrics import cluster_accuracy

    u, v, y = _shared_parts()
    perm = torch.randperm(u.shape[0], generator=torch.Generator().manual_seed(0))
    fit, ev = perm[:750], perm[750:]
    both = k_search._cross_modal(u, v, 5, fit, ev, Config(), 0, 1)
    assert both["partition"] == "joint"
    monkeypatch.setattr(k_search, "PARTITIONS", ("text",))
    text = k_search._cross_modal(u, v, 5, fit, ev, Config(), 0, 1)
    assert text["partition"] == "text" and both["mean"] > text["mean"] + 0.02
    assert both["objective"] == text["objective"]  # always the text partition's objective
    # what the two candidates make of the concepts
    joint = k_search.ops.kmeans(k_search._joint_space(u, v), 5, seed=0).labels
    alone = k_search.ops.kmeans(v, 5, seed=0).labels
    assert cluster_accuracy(y.numpy(), joint.numpy()) > 0.95 > 0.85 > cluster_accuracy(y.numpy(), alone.numpy())


def _long_tail(d=24, seed=0, n_big=(400, 300, 250), n_small=(20, 15, 12)):
    """Three large concepts of two sub-concepts each and three small compact ones (a long
    tail); both modalities see the same structure, the images more noisily."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    k = len(n_big) + len(n_small)
    subs = basis[k:k + 2 * len(n_big)].reshape(len(n_big), 2, d)
    labels = torch.cat([torch.full((m,), c) for c, m in enumerate(n_big + n_small)])
    big = labels < len(n_big)
    off = torch.zeros(labels.shape[0], d)
    off[big] = subs[labels[big], torch.randint(2, (int(big.sum()),), generator=g)]
    x = basis[:k][labels] + 0.8 * off
    u = F.normalize(x + 0.5 * torch.randn(x.shape, generator=g), dim=1)
    v = F.normalize(x + 0.2 * torch.randn(x.shape, generator=g), dim=1)
    return u, v, labels


@pytest.mark.parametrize("seed", [0, 3])
def test_the_tree_keeps_small_classes_that_k_means_merges(seed):
    """At the true K, k-means (either space) splits the large concepts by their sub-concepts
    and merges the small ones; the average-linkage tree of v cut at K keeps them, and it is
    the candidate K scores."""
    from semclust.metrics import cluster_accuracy

    u, v, y = _long_tail(seed=seed)
    n, k = u.shape[0], int(y.max()) + 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    fit, ev = perm[: n // 2], perm[n // 2:]
    tree = k_search._average_tree(v, perm)
    cut = k_search._cut(tree, perm, v, k, 4096)
    assert cut.shape == (n,) and int(cut.max()) + 1 == k
    acc = {"tree": cluster_accuracy(y.numpy(), cut.numpy())}
    for name, x in (("text", v), ("joint", k_search._joint_space(u, v))):
        acc[name] = cluster_accuracy(y.numpy(), k_search.ops.kmeans(x, k, seed=0, restarts=1).labels.numpy())
    assert acc["tree"] > 0.99 and max(acc["text"], acc["joint"]) < 0.75
    r = k_search._cross_modal(u, v, k, fit, ev, Config(), 0, 1, tree, perm)
    assert r["partition"] == "tree"
    assert r["mean"] > k_search._cross_modal(u, v, k, fit, ev, Config(), 0, 1)["mean"] + 0.02  # without the tree


def test_the_tree_on_a_subset_places_every_other_row():
    """Beyond k_search.tree_rows the tree is built on a random subset; every other row joins
    the cut cluster of highest mean cosine, and the tree's own rows keep their cut labels."""
    from semclust.metrics import cluster_accuracy

    u, v, y = _long_tail(seed=1)
    ids = torch.randperm(v.shape[0], generator=torch.Generator().manual_seed(1))[:600]
    tree = k_search._average_tree(v, ids)
    lab = k_search._cut(tree, ids, v, 5, 100)
    assert lab.shape == (v.shape[0],)
    # the subset's rows keep the cut; the rest joins the nearest cluster by mean cosine
    sub = torch.from_numpy(k_search.fcluster(tree, 5, criterion="maxclust") - 1)
    assert torch.equal(lab[ids], sub)
    means = torch.stack([v[ids][sub == c].mean(0) for c in range(5)])
    rest = torch.ones(v.shape[0], dtype=torch.bool).index_fill_(0, ids, False)
    assert torch.equal(lab[rest], (v[rest] @ means.T).argmax(1))
    assert cluster_accuracy(y.numpy(), lab.numpy()) > 0.95


def test_a_tree_cut_that_cannot_make_k_clusters_is_skipped():
    """Tied merge heights (duplicate rows): no cut of two distinct points makes 3 clusters,
    and k-means leaves a cluster empty, so K = 3 cannot be scored at all."""

    v = F.normalize(torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6), dim=1)
    ids = torch.arange(12)
    tree = k_search._average_tree(v, ids)
    assert k_search._cut(tree, ids, v, 3, 64) is None
    assert int(k_search._cut(tree, ids, v, 2, 64).max()) == 1
    assert k_search._cross_modal(v, v, 3, ids[::2], ids[1::2], Config(), 0, 1, tree, ids) is None
    assert k_search._cross_modal(v, v, 2, ids[::2], ids[1::2], Config(), 0, 1, tree, ids)["mean"] == 1.0


@pytest.mark.parametrize("distinct", [2, 3])
def test_no_k_beyond_the_distinct_images_is_scored(distinct):
    """Rows that repeat `distinct` images: k-means at a larger K leaves clusters empty, a
    partition of `distinct` groups that scored as if it had K (it had found K = 50 for two
    images). Those K are left out, listed, and printed; the estimate is `distinct`."""
    g = torch.Generator().manual_seed(distinct)
    u = F.normalize(torch.randn(distinct, 16, generator=g), dim=1).repeat(100, 1)
    nouns = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    ks = estimate_k(u, nouns, (2, 12), _search(points=11))
    assert ks.k == distinct and ks.significant
    assert [s["k"] for s in ks.scores] == list(range(2, distinct + 1))
    assert ks.unscorable == list(range(distinct + 1, 13))
    assert f"not scored: K = {distinct + 1}, " in ks.table()
    with pytest.raises(ValueError, match="hold fewer than 2 distinct images"):
        estimate_k(u[:1].repeat(200, 1), nouns, (2, 12), _search(points=11))


def test_a_cut_that_isolates_outliers_is_not_scored():
    """A two-lobed bulk and two far-off rows, one in each half: the tree's cut at K = 3 is
    {bulk, outlier, outlier}, whose far-off clusters give every bulk row inflated margins
    (it would score 0.58 against k-means's 0.39 on the lobes). An outlier's cluster has no
    image centre or no silhouette, so K = 3 is scored on the k-means candidates."""

    g = torch.Generator().manual_seed(0)
    e = torch.eye(8)
    lobe = torch.randint(2, (400, 1), generator=g) * 2 - 1
    bulk = F.normalize(e[0] + 0.5 * e[1] * lobe + 0.15 * torch.randn(400, 8, generator=g), dim=1)
    v = torch.cat([bulk, e[6:8]])
    ids = torch.randperm(402, generator=g)
    inner = ids[ids < 400]
    fit, ev = torch.cat([inner[:200], torch.tensor([400])]), torch.cat([inner[200:], torch.tensor([401])])
    tree = k_search._average_tree(v, ids)
    assert torch.bincount(k_search._cut(tree, ids, v, 3, 64)).tolist() == [400, 1, 1]
    with_tree = k_search._cross_modal(v, v, 3, fit, ev, Config(), 0, 1, tree, ids)
    without = k_search._cross_modal(v, v, 3, fit, ev, Config(), 0, 1)
    assert with_tree["partition"] != "tree" and with_tree["mean"] == without["mean"]


def test_a_cut_is_scored_only_where_it_describes_k_groups():
    """Every cluster needs a fit row and two held-out rows, and none may hold most rows."""
    fit, ev = torch.arange(0, 100, 2), torch.arange(1, 100, 2)
    ok = torch.arange(100) % 3  # three interleaved groups
    assert k_search._k_groups(ok, 3, fit, ev)
    sizes = torch.zeros(100, dtype=torch.long)
    sizes[:30], sizes[30:60] = 1, 2  # 40 / 30 / 30
    assert k_search._k_groups(sizes, 3, fit, ev)
    sizes[:15], sizes[30:45] = 0, 0  # 70 / 15 / 15: a bulk and two fragments
    assert not k_search._k_groups(sizes, 3, fit, ev)
    no_fit = ok.clone()
    no_fit[ev[:3]] = 3  # cluster 3: three held-out rows, no fit row
    assert not k_search._k_groups(no_fit, 4, fit, ev)
    one_ev = ok.clone()
    one_ev[torch.tensor([0, 2, 1])] = 3  # two fit rows, one held-out row
    assert not k_search._k_groups(one_ev, 4, fit, ev)
    half = (torch.arange(100) >= 50).long()
    assert k_search._k_groups(half, 2, fit, ev)  # exactly half is not "most"


def test_the_image_margin_without_another_centre_is_zero():
    """Every other cluster lacks fit rows: no image centre to compare with, margin 0 (not
    the sentinel distance's inflated value)."""
    u = F.normalize(torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.zeros(40, dtype=torch.long)
    labels[-1] = 1  # cluster 1: one held-out row, no fit row
    fit, ev = torch.arange(20), torch.arange(20, 40)
    t = k_search._image_margin(u, labels, 2, fit, ev)
    assert torch.equal(t, torch.zeros(20))
    labels[0] = 1  # now cluster 1 has a fit row: real margins
    assert (k_search._image_margin(u, labels, 2, fit, ev).abs() > 0).all()


@pytest.mark.parametrize("k", [2, 7])
def test_silhouette_rows_match_scikit_learn(k):
    """The per-row silhouette (computed from cluster sums, no [m, m] matrix) against
    scikit-learn's from the full cosine distance matrix; a singleton scores 0 in both."""
    from sklearn.metrics import silhouette_samples

    g = torch.Generator().manual_seed(k)
    x = F.normalize(torch.randn(150, 9, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(k, (150,), generator=g)
    labels[0] = k  # a singleton cluster
    ref = silhouette_samples(x.numpy(), labels.numpy(), metric="cosine")
    ours = k_search._silhouette_rows(x, labels, k + 1)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-10)
    assert ours[0] == 0.0


@pytest.mark.parametrize("n,d,block", [(2, 3, 1024), (37, 5, 8), (301, 64, 100), (130, 17, 1)])
def test_cosine_distances_match_scipy(n, d, block):
    """The tree's condensed distances (block products) against scipy's pdist "cosine" in
    float64: same pair order, blocks that do not divide n, unnormalised float32 rows, a
    parallel pair (distance 0 up to rounding, never negative) and a float16 input."""
    from scipy.spatial.distance import pdist

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g) * 3.0
    x[1] = 0.5 * x[0]
    ref = pdist(x.double().numpy(), "cosine")
    ours = k_search._cosine_distances(x, block)
    assert ours.dtype == np.float64 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert 0.0 <= ours[0] < 1e-15 and (ours >= 0).all()
    half = k_search._cosine_distances(x.half(), block)
    np.testing.assert_allclose(half, pdist(x.half().double().numpy(), "cosine"), rtol=0, atol=1e-12)


def test_grid_is_geometric_distinct_and_inclusive():
    g = k_grid(2, 200, 24)
    assert g[0] == 2 and g[-1] == 200 and len(g) == len(set(g)) and g == sorted(g)
    assert 15 <= len(g) <= 24


@pytest.mark.parametrize("criterion", CRITERIA)
def test_each_criterion_chooses_its_argmax(criterion):
    u, nouns, _ = _blobs(k=5, n=300)
    ks = estimate_k(u, nouns, (2, 10), _search(points=5, criterion=criterion))
    assert ks.k == choose(ks.scores, criterion)["k"] == max(ks.scores, key=lambda d: (d[criterion], -d["k"]))["k"]


@pytest.mark.parametrize("k_range,match", [
    ((1, 10), "2 <= k_min"), ((10, 5), "2 <= k_min"), ((2,), "two integers"), ("ab", "two integers"),
    ((2.5, 10), "two integers"), ((2, 1000), "exceeds the 600 rows"), (None, "two integers"),
])
def test_bad_k_range_errors(k_range, match):
    u, nouns, _ = _blobs()
    with pytest.raises(ValueError, match=match):
        estimate_k(u, nouns, k_range)


def test_bad_inputs_error():
    u, nouns, _ = _blobs()
    with pytest.raises(ValueError, match="u must be"):
        estimate_k(u[0], nouns)
    with pytest.raises(ValueError, match="nouns must be"):
        estimate_k(u, nouns[:, :5])
    bad = u.clone()
    bad[7, 3] = float("nan")
    with pytest.raises(ValueError, match=r"u \(its sampled rows\) has 1 row\(s\) with NaN or Inf"):
        estimate_k(bad, nouns, (2, 5))
    bad = nouns.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="nouns has 1 row"):
        estimate_k(u, bad, (2, 5))
    # the search's options are checked where they are set, before any work
    with pytest.raises(ValueError, match="k_search.criterion must be one of"):
        _search(criterion="cross_modal_1se")
    with pytest.raises(ValueError, match="k_search.sample must be >= 2"):
        _search(sample=0)
    with pytest.raises(ValueError, match="k_search.restarts must be >= 1"):
        _search(restarts=0)
    with pytest.raises(ValueError, match="k_search.level must be <= 1"):
        _search(level=2.0)
    with pytest.raises(ValueError, match="unknown keys"):
        _search(samples=100)


def test_deterministic_for_a_seed_and_runs_on_a_sample():
    u, nouns, _ = _blobs(k=5, n=900)
    a = estimate_k(u, nouns, (2, 10), _search(sample=400, points=6), seed=3)
    b = estimate_k(u, nouns, (2, 10), _search(sample=400, points=6, restarts=1, draws=1), seed=3)  # the defaults
    assert a.k == b.k and a.scores == b.scores
    assert a.sample == 400  # max(sample, 20 k_max) rows of the 900


def test_auto_k_through_the_estimator_and_the_cli(tmp_path, capsys):
    """n_clusters="auto": the fit runs at the estimated K, keeps the scores, saves and
    reloads as a fixed-K model; `fit -k auto` prints the search."""
    from semclust import SemanticClusterer
    from semclust.cli import main

    u, nouns, _ = _blobs(k=5, n=400)
    cfg = Config()
    cfg.stage1.epochs, cfg.stage1.batch_size, cfg.neighbours.k, cfg.stage1.hidden = 2, 64, 5, 32
    m = SemanticClusterer("auto", k_range=(2, 12), clip=None, stage=1, config=cfg, device="cpu", progress=False)
    m.fit(u, nouns=nouns)
    search = m.history_["k_search"]
    assert m.n_clusters_ == search["k"] == 5 and m.n_clusters == "auto"
    assert m.predict_proba(u).shape == (400, 5)
    assert all(2 <= s["k"] <= 12 for s in search["scores"])
    back = SemanticClusterer.load(m.save(tmp_path / "run"))
    assert back.n_clusters == back.n_clusters_ == 5
    np.save(tmp_path / "u.npy", u.numpy())
    np.save(tmp_path / "t.npy", nouns.numpy())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["fit", str(tmp_path / "u.npy"), "-k", "auto", "--k-range", "2,12", "--out", str(tmp_path / "cli"),
                 "--nouns", str(tmp_path / "t.npy"), "--stage", "1", "--config", str(tmp_path / "cfg.json"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "estimated K = 5 within (2, 12)" in out and "into 5 clusters" in out
    with pytest.raises(SystemExit):
        main(["fit", str(tmp_path / "u.npy"), "-k", "auto", "--k-range", "9,3", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="k_range"):
        SemanticClusterer("auto", k_range=(1, 5), clip=None).fit(u, nouns=nouns)
