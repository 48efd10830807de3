"""Estimating K: finds the true K on well-separated blobs, scores nothing on data without
clusters (the null reference cancels it), respects k_range, one score row per K tried
with every criterion, checks its input, deterministic for a seed."""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from semclust.method import k_search
from semclust.method.k_search import CRITERIA, PARTITIONS, KSearch, choose, estimate_k, k_grid

SCORE_KEYS = {"k", "cross_modal_gap", "gap_se", "cross_modal", "null_cross_modal", "silhouette", "image_silhouette",
              "objective", "partition"}


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
    ks = estimate_k(u, nouns, (2, 12), points=11)
    assert [s["k"] for s in ks.scores] == list(range(2, 13))
    assert isinstance(ks, KSearch)
    assert ks.k == k
    assert ks.criterion == "cross_modal_gap" and not ks.at_range_end
    at = {s["k"]: s for s in ks.scores}[k]
    # real structure: the score stands well clear of its null reference
    assert at["cross_modal"] > at["null_cross_modal"] + 10 * at["gap_se"]


def test_no_clusters_scores_like_its_null():
    """Images from one Gaussian (what the null reference draws): the gap stays near zero at
    every K, far below the gap of the same number of rows in real clusters."""
    u_blobs, nouns, _ = _blobs(k=5)
    g = torch.Generator().manual_seed(1)
    u = F.normalize(torch.randn(u_blobs.shape[0], u_blobs.shape[1], generator=g), dim=1)
    flat = estimate_k(u, nouns, (2, 12), points=6)
    clustered = estimate_k(u_blobs, nouns, (2, 12), points=6)
    assert max(abs(s["cross_modal_gap"]) for s in flat.scores) < 0.25 * max(s["cross_modal_gap"] for s in clustered.scores)


def test_k_range_is_respected_and_scores_have_every_criterion():
    u, nouns, _ = _blobs(k=6)
    ks = estimate_k(u, nouns, (8, 12), points=4, rounds=2)
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
    one = estimate_k(u, nouns, (5, 5), rounds=1)
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
    from semclust.config import Config
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


def test_grid_is_geometric_distinct_and_inclusive():
    g = k_grid(2, 200, 24)
    assert g[0] == 2 and g[-1] == 200 and len(g) == len(set(g)) and g == sorted(g)
    assert 15 <= len(g) <= 24


@pytest.mark.parametrize("criterion", CRITERIA)
def test_each_criterion_chooses_its_argmax(criterion):
    u, nouns, _ = _blobs(k=5, n=300)
    ks = estimate_k(u, nouns, (2, 10), points=5, criterion=criterion)
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
    with pytest.raises(ValueError, match="criterion"):
        estimate_k(u, nouns, (2, 5), criterion="cross_modal_1se")
    with pytest.raises(ValueError, match="sample"):
        estimate_k(u, nouns, (2, 5), sample=0)
    with pytest.raises(ValueError, match="restarts"):
        estimate_k(u, nouns, (2, 5), restarts=0)


def test_deterministic_for_a_seed_and_runs_on_a_sample():
    u, nouns, _ = _blobs(k=5, n=900)
    a = estimate_k(u, nouns, (2, 10), seed=3, sample=400, points=6)
    b = estimate_k(u, nouns, (2, 10), seed=3, sample=400, points=6, restarts=1, draws=1)  # the defaults
    assert a.k == b.k and a.scores == b.scores
    assert a.sample == 400  # max(sample, 20 k_max) rows of the 900


def test_auto_k_through_the_estimator_and_the_cli(tmp_path, capsys):
    """n_clusters="auto": the fit runs at the estimated K, keeps the scores, saves and
    reloads as a fixed-K model; `fit -k auto` prints the search."""
    from semclust import SemanticClusterer
    from semclust.cli import main
    from semclust.config import Config

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
