"""Clustering metrics against ground truth: ACC (Hungarian), NMI, ARI.

All three come from one contingency table n_ij = #{samples of class i in cluster j}
(classes = distinct values of `y_true`, clusters = distinct values of `y_pred`), so the
labels may be any non-negative integers and the numbers of classes and clusters may
differ. NMI and ARI match scikit-learn's `normalized_mutual_info_score` (arithmetic
normalisation) and `adjusted_rand_score`, edge cases included; scikit-learn is only the
tests' oracle, never imported here.

Notation: N samples; a_i = sum_j n_ij (class sizes); b_j = sum_i n_ij (cluster sizes).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

Labels = Union[np.ndarray, torch.Tensor, Sequence[int]]

__all__ = ["cluster_accuracy", "nmi", "ari", "evaluate", "match_clusters"]


def cluster_accuracy(y_true: Labels, y_pred: Labels) -> float:
    """Clustering accuracy under the best one-to-one cluster -> class mapping.

    ACC = max_m (1/N) sum_j n_{m(j), j}, the max over injective maps m from clusters to
    classes, solved exactly by the Hungarian algorithm on the contingency table. With
    more clusters than classes the unmatched clusters count as wrong (and vice versa).

    Args:
        y_true: [N] non-negative integer class ids (numpy array, list or torch tensor).
        y_pred: [N] non-negative integer cluster ids, any numbering.
    Returns:
        ACC in [0, 1].
    """
    t, p = _validate(y_true, y_pred)
    table = _contingency(t, p)[2].toarray()
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / t.size)


def match_clusters(y_true: Labels, y_pred: Labels) -> dict[int, int]:
    """The Hungarian mapping behind `cluster_accuracy`: {cluster id: class id}.

    Clusters left unmatched (more clusters than classes) are absent from the dict.
    `np.vectorize(mapping.get)(y_pred)` relabels predictions into class ids.

    Args:
        y_true: [N] non-negative integer class ids.
        y_pred: [N] non-negative integer cluster ids.
    Returns:
        dict mapping each matched original cluster id to its original class id (ints).
    """
    t, p = _validate(y_true, y_pred)
    classes, clusters, table = _contingency(t, p)
    rows, cols = linear_sum_assignment(table.toarray(), maximize=True)
    return {int(clusters[c]): int(classes[r]) for r, c in zip(rows, cols)}


def nmi(y_true: Labels, y_pred: Labels) -> float:
    """Normalised mutual information, arithmetic normalisation.

    MI = sum_ij (n_ij/N) log(N n_ij / (a_i b_j));  H(a) = -sum_i (a_i/N) log(a_i/N);
    NMI = MI / ((H(a) + H(b)) / 2).  As in scikit-learn: 1.0 when both labelings have a
    single group (nothing to split, a perfect match), 0.0 when MI = 0 otherwise.

    Args:
        y_true: [N] non-negative integer class ids.
        y_pred: [N] non-negative integer cluster ids.
    Returns:
        NMI in [0, 1].
    """
    t, p = _validate(y_true, y_pred)
    return _nmi(*_contingency(t, p))


def ari(y_true: Labels, y_pred: Labels) -> float:
    """Adjusted Rand index (Hubert & Arabie), from pair counts.

    Over ordered pairs of distinct samples: tp = sum_ij n_ij^2 - N (same class, same
    cluster); fp = sum_j b_j^2 - sum n_ij^2; fn = sum_i a_i^2 - sum n_ij^2;
    tn = N^2 - N - tp - fp - fn.  ARI = 2 (tp tn - fn fp) / ((tp+fn)(fn+tn) + (tp+fp)(fp+tn)),
    and 1.0 when fp = fn = 0 (the labelings agree on every pair), as scikit-learn does.

    Args:
        y_true: [N] non-negative integer class ids.
        y_pred: [N] non-negative integer cluster ids.
    Returns:
        ARI in [-0.5, 1]; ~0 for random labelings.
    """
    t, p = _validate(y_true, y_pred)
    return _ari(_contingency(t, p)[2])


def evaluate(y_true: Labels, y_pred: Labels) -> dict[str, float]:
    """ACC, NMI and ARI from one validation and one contingency table.

    Args:
        y_true: [N] non-negative integer class ids.
        y_pred: [N] non-negative integer cluster ids.
    Returns:
        {"acc": float, "nmi": float, "ari": float}.
    """
    t, p = _validate(y_true, y_pred)
    classes, clusters, table = _contingency(t, p)
    dense = table.toarray()
    rows, cols = linear_sum_assignment(dense, maximize=True)
    return {
        "acc": float(dense[rows, cols].sum() / t.size),
        "nmi": _nmi(classes, clusters, table),
        "ari": _ari(table),
    }


def _as_labels(name: str, y: Labels) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per sample), got shape {arr.shape}; flatten with .ravel()")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; metrics need at least one sample")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must hold integer labels, got dtype {arr.dtype}; "
            "convert with .astype(np.int64) if the values are whole numbers"
        )
    if arr.min() < 0:
        # negative ids usually mean "noise / unassigned" (e.g. DBSCAN's -1): scoring them
        # as one more cluster would silently reward or punish that choice
        raise ValueError(
            f"{name} has negative labels (min {arr.min()}); map them to an id >= 0 or drop those samples"
        )
    return arr


def _validate(y_true: Labels, y_pred: Labels) -> tuple[np.ndarray, np.ndarray]:
    t = _as_labels("y_true", y_true)
    p = _as_labels("y_pred", y_pred)
    if t.size != p.size:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}")
    return t, p


def _contingency(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """(classes [R], clusters [C], int64 sparse table [R, C]); sparse because N singleton
    clusters would make a dense table N x R."""
    classes, ti = np.unique(t, return_inverse=True)
    clusters, pi = np.unique(p, return_inverse=True)
    ones = np.ones(t.size, dtype=np.int64)
    table = sp.coo_matrix((ones, (ti.ravel(), pi.ravel())), shape=(classes.size, clusters.size)).tocsr()
    table.sum_duplicates()
    return classes, clusters, table


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of the distribution counts / counts.sum()."""
    counts = counts[counts > 0].astype(np.float64)
    total = counts.sum()
    return float(-np.sum(counts / total * (np.log(counts) - math.log(total))))


def _nmi(classes: np.ndarray, clusters: np.ndarray, table: sp.csr_matrix) -> float:
    if classes.size == 1 and clusters.size == 1:
        return 1.0
    a = np.asarray(table.sum(axis=1)).ravel()
    b = np.asarray(table.sum(axis=0)).ravel()
    if a.size == 1 or b.size == 1:
        return 0.0  # one side is constant: it carries no information about the other
    rows, cols, n_ij = sp.find(table)
    n = float(n_ij.sum())
    n_ij = n_ij.astype(np.float64)
    # log(N n_ij / (a_i b_j)) as a sum of logs: the product a_i b_j overflows int64 past ~3e9 samples
    log_ab = np.log(a[rows].astype(np.float64)) + np.log(b[cols].astype(np.float64))
    terms = n_ij / n * (np.log(n_ij) + math.log(n) - log_ab)
    mi = max(float(terms.sum()), 0.0)  # rounding can leave a tiny negative for independent labelings
    if mi == 0.0:
        return 0.0
    return mi / ((_entropy(a) + _entropy(b)) / 2.0)


def _ari(table: sp.csr_matrix) -> float:
    # Python ints: the products below reach N^4 and would overflow int64 for N ~ 1e5
    n = int(table.sum())
    sum_sq = int((table.data.astype(np.int64) ** 2).sum())
    a_sq = int((np.asarray(table.sum(axis=1), dtype=np.int64).ravel() ** 2).sum())
    b_sq = int((np.asarray(table.sum(axis=0), dtype=np.int64).ravel() ** 2).sum())
    tp = sum_sq - n
    fp = b_sq - sum_sq
    fn = a_sq - sum_sq
    tn = n * n - n - tp - fp - fn
    if fp == 0 and fn == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))
