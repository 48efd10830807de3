import itertools

import numpy as np
import pytest
import torch

from semclust.metrics import ari, cluster_accuracy, evaluate, match_clusters, nmi

sk = pytest.importorskip("sklearn.metrics")


def brute_force_acc(t: np.ndarray, p: np.ndarray) -> float:
    """Max over all injective cluster -> class maps (tiny K only)."""
    classes, clusters = np.unique(t), np.unique(p)
    slots = list(classes) + [None] * len(clusters)  # None: cluster left unmatched
    best = 0
    for perm in itertools.permutations(slots, len(clusters)):
        hits = sum(int(np.sum((p == c) & (t == k))) for c, k in zip(clusters, perm) if k is not None)
        best = max(best, hits)
    return best / t.size


def random_labelings(n_cases: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        n = int(rng.integers(1, 300))
        k_true, k_pred = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        t = rng.integers(0, k_true, n)
        # half the cases are correlated with the truth, so scores span [0, 1]
        p = np.where(rng.random(n) < rng.random(), t % k_pred, rng.integers(0, k_pred, n))
        # arbitrary, non-contiguous ids
        yield t * 7 + 3, p * 5 + int(rng.integers(0, 100))


@pytest.mark.parametrize("seed", range(4))
def test_nmi_ari_match_sklearn(seed):
    for t, p in random_labelings(50, seed):
        assert nmi(t, p) == pytest.approx(sk.normalized_mutual_info_score(t, p), abs=1e-10)
        assert ari(t, p) == pytest.approx(sk.adjusted_rand_score(t, p), abs=1e-10)


def test_acc_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(60):
        n = int(rng.integers(1, 40))
        t = rng.integers(0, int(rng.integers(1, 5)), n)
        p = rng.integers(0, int(rng.integers(1, 5)), n) + 10
        assert cluster_accuracy(t, p) == pytest.approx(brute_force_acc(t, p))


def test_perfect_and_permuted():
    t = np.repeat(np.arange(5), 20)
    perm = np.array([3, 0, 4, 1, 2])
    p = perm[t] + 100
    assert evaluate(t, p) == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})
    assert match_clusters(t, p) == {int(perm[k]) + 100: k for k in range(5)}


def test_permutation_invariance():
    rng = np.random.default_rng(2)
    t, p = rng.integers(0, 6, 200), rng.integers(0, 8, 200)
    relabel = rng.permutation(8)
    order = rng.permutation(200)
    base = evaluate(t, p)
    assert evaluate(t, relabel[p]) == pytest.approx(base)
    assert evaluate(t[order], p[order]) == pytest.approx(base)
    assert evaluate(t, p)["nmi"] == pytest.approx(evaluate(p, t)["nmi"])


def test_unequal_cluster_counts():
    t = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 0, 1, 1])  # fewer clusters than classes: class 0 or 1 lost
    assert cluster_accuracy(t, p) == pytest.approx(4 / 6)
    assert len(match_clusters(t, p)) == 2
    p = np.arange(6)  # more clusters than classes: only 3 can be matched
    assert cluster_accuracy(t, p) == pytest.approx(3 / 6)
    assert len(match_clusters(t, p)) == 3


@pytest.mark.parametrize(
    "t, p",
    [
        ([4], [9]),  # single sample
        ([1, 1, 1, 1], [0, 0, 0, 0]),  # one class, one cluster
        ([1, 1, 1, 1], [0, 1, 2, 3]),  # one class, all singletons
        ([0, 1, 2, 3], [5, 5, 5, 5]),  # singleton classes, one cluster
        ([0, 1, 2, 3], [3, 2, 1, 0]),  # all singletons on both sides
    ],
)
def test_edge_cases_like_sklearn(t, p):
    out = evaluate(t, p)
    assert out["nmi"] == pytest.approx(sk.normalized_mutual_info_score(t, p))
    assert out["ari"] == pytest.approx(sk.adjusted_rand_score(t, p))
    assert out["acc"] == pytest.approx(brute_force_acc(np.array(t), np.array(p)))


def test_input_types():
    t, p = [0, 0, 1, 1, 2], [1, 1, 0, 0, 0]
    expected = evaluate(np.array(t), np.array(p))
    assert evaluate(torch.tensor(t), torch.tensor(p, dtype=torch.int32)) == pytest.approx(expected)
    assert evaluate(t, np.array(p, dtype=np.uint8)) == pytest.approx(expected)
    assert all(type(v) is float for v in expected.values())


def test_large_n_no_overflow():
    rng = np.random.default_rng(3)
    t = rng.integers(0, 3, 400_000)
    p = np.where(rng.random(t.size) < 0.7, t, rng.integers(0, 3, t.size))
    assert ari(t, p) == pytest.approx(sk.adjusted_rand_score(t, p), abs=1e-12)
    assert nmi(t, p) == pytest.approx(sk.normalized_mutual_info_score(t, p), abs=1e-12)


@pytest.mark.parametrize(
    "t, p, match",
    [
        ([0, 1], [0, 1, 1], "same length"),
        ([], [], "y_true is empty"),
        ([[0, 1]], [0, 1], "y_true must be 1-D"),
        ([0, 1], [0.0, 1.0], "y_pred must hold integer labels"),
        ([0, -1], [0, 1], "y_true has negative labels"),
        ([0, 1], [0, -1], "y_pred has negative labels"),
    ],
)
@pytest.mark.parametrize("fn", [cluster_accuracy, nmi, ari, evaluate, match_clusters])
def test_bad_inputs(fn, t, p, match):
    with pytest.raises(ValueError, match=match):
        fn(t, p)
