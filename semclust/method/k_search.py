"""Estimating the number of clusters K from the data (`SemanticClusterer(n_clusters="auto")`).

Criterion: the cross-modal silhouette
-------------------------------------
For each K of a geometric grid over `k_range`, spherical k-means (`ops.kmeans`) partitions
the text counterparts v of a row sample (built as a fit builds them:
`counterparts.select_nouns` + `counterparts.text_counterparts`, on the sample). The
sample is split into disjoint halves F and E (E capped at `eval_rows`); per held-out
row i in E:

* s_i, the cosine silhouette of row i in v, within E (text side: is its cluster compact
  and apart from the nearest other cluster?);
* t_i, the *image* side's centroid silhouette: image centres c_k = normalise(mean of u
  over the rows of F labelled k), a_i = 1 - cos(u_i, c_own), b_i = 1 - max_{k != own}
  cos(u_i, c_k), t_i = (b_i - a_i) / max(a_i, b_i): the margin by which the images alone
  put row i in its text cluster (t_i > 0 iff the nearest image centre is its own).

    cross_modal(K) = mean_{i in E} s_i max(t_i, 0),      K_hat = argmax_K cross_modal(K)

(ties: the smaller K). A row counts toward its cluster's quality only when both
modalities place it there, by the product of the two margins; an image side that
disagrees gives 0, not a penalty (frozen image features are noisy, see below).

Why this one. Each side alone is biased, in opposite directions:

* the text silhouette rewards splitting a concept into its nouns. Counterparts are a
  peaked softmax over an image's top nouns, so v piles up near single noun vectors and
  the silhouette in v keeps rising towards the number of *nouns* (measured: argmax 90-164
  on "balanced", true K 10, whose 80 class nouns are 8 per class);
* on frozen CLIP features dominated by style, the image side alone (k-means or the
  silhouette on u) finds the styles, not the concepts (argmax 2 on most scenarios), and
  coarse partitions are the easiest to reproduce from the images.

A split that separates two nouns of one concept is one the images barely make (the
images of that concept sit around one image centre), so t_i collapses for those rows
and the product stops rising where the text side is no longer backed by the image
side; merging two concepts lowers s_i. Style does not bias t_i: every image centre
averages over the same mix of styles, so the style part of u_i . c_k is nearly the same
for every k and cancels in b_i - a_i. The image centres come from the other half of the
sample so that a row never scores against a centre it helped build (with K = 200 and
~20 rows a cluster, that bias is large).

Measured (`semclust/bench/k.py`, 6 scenarios x 3 seeds, defaults): 13 of 18 runs
within +-20% of the true K (the issue asks for 80%): gap 3/3 (12, 10, 9), longtail10 3/3
(8, 8, 9), k100 3/3 (90, 110, 90), superclass 3/3 at its sub-class level (73 x 3 for 80;
20 is never chosen), balanced 1/3 (12, 15, 15: one grid step over 12), longtail100 0/3
(4, 5, 6); k200 (not in the 18) 3/3 (200, 164, 164). "cross_modal_1se" differs once
(balanced seed 2: 12), 14 of 18. The long tail is the known weak case: a class of 0.4% of the rows moves a row
average by < 0.4%, and "longtail100"'s four smallest classes (20-93 of 5000 rows) hold
4% of them together.

Every K's text silhouette, image silhouette, the product with a hard image vote
(`cross_modal_vote`, s_i [t_i > 0]), the image agreement and its chance-corrected form
(Cohen's kappa), the k-means objective and the Calinski-Harabasz index of v are kept in
`KSearch.scores`, so another rule can be read off the same run; `criterion=` picks which
one chooses K (`CRITERIA`; "cross_modal_1se": the smallest K within one standard error
of the best cross_modal, the gap statistic's rule).

Rounds. The noun pool depends on a provisional K (`select_nouns` keeps the nouns near K
image centres). The search builds it at k0 = k_max: the nouns near k_max image centres
cover those of any coarser partition, so no K of the range is favoured by the
vocabulary. `rounds=2` rebuilds the counterparts at k0 = the first estimate and searches
again (stopping when the estimate does not move); measured, that pulls the estimate
towards the provisional K (a pool fit to K1 makes K1's partition look cleaner) and was
worse (10 of 18 runs within +-20% against 13 of 18), so the default is one round.

Cost. Everything runs on a sample of S = min(N, max(sample, 20 k_max)) rows (8000 by
default), so beyond reading the S sampled rows the cost does not grow with N: one
k-means at k0 (the fit's iterations and restarts) and the counterparts of the S rows,
then per K of the grid one k-means on the S rows and an [|E|, |E|] silhouette
(|E| <= 2000). `restarts` per K defaults to 1: measured, 3 restarts gave no better
estimates (10 of 18 runs within +-20% against 13 of 18; the choice moves by a grid step
either way). In all about S x sum(grid) x iters x D multiply-adds: with the default grid
(24 K from 2 to 200, sum 1101) and S = 8000, as much as one k-means restart at K = 100 on
9 x 10^4 rows, so at 100k rows about one third of a fit's k-means (3 restarts) and at 1M
rows a few percent of it, let alone of a whole fit (kNN and the heads also scale with N).
Seconds measured on 1 CPU thread of a shared machine: 7.5-9.5 s at 5000 rows (S = N),
7-17 s at 10^4 rows, 26 s at 10^5 and 24 s at 10^6 rows (S = 8000; the 10^6 figure
excludes drawing the data); a fit at 5000 rows (counterparts, kNN, stage 1) took 13-19 s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import ops
from ..config import Config
from . import counterparts

log = logging.getLogger(__name__)

CRITERIA = ("cross_modal", "cross_modal_1se", "cross_modal_vote", "silhouette", "image_silhouette", "calinski_harabasz")


@dataclass
class KSearch:
    """The outcome of `estimate_k`: the chosen `k`, and one dict per K tried (last round)
    with every criterion's value (`scores`), for `history_["k_search"]`."""

    k: int
    criterion: str
    scores: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)  # per round: {"k0", "k", "seconds"}
    sample: int = 0  # rows the search ran on
    seconds: float = 0.0
    # the chosen K is an end of k_range (other than 2): the best K may lie beyond it, widen the range
    at_range_end: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The scores as a fixed-width text table (the CLI prints it)."""
        keys = ["k", "cross_modal", "cross_modal_vote", "silhouette", "image_silhouette", "agreement", "kappa",
                "calinski_harabasz", "objective"]
        lines = [" ".join(f"{c:>17s}" if i else f"{c:>5s}" for i, c in enumerate(keys))]
        for s in self.scores:
            mark = " *" if s["k"] == self.k else ""
            lines.append(" ".join(f"{s[c]:17.4f}" if i else f"{s[c]:5d}" for i, c in enumerate(keys)) + mark)
        return "\n".join(lines)


def k_grid(lo: int, hi: int, points: int = 24) -> list[int]:
    """Up to `points` distinct K from lo to hi (both included), geometrically spaced: every
    integer when the range has at most `points` of them, else a step of at least one."""
    if hi - lo + 1 <= points:
        return list(range(lo, hi + 1))
    ks: list[int] = []
    for j in range(points):
        x = int(round(lo * (hi / lo) ** (j / (points - 1))))
        ks.append(max(x, ks[-1] + 1) if ks else x)
    return sorted({k for k in ks if k < hi} | {hi})


def choose(scores: list[dict], criterion: str = "cross_modal") -> dict:
    """The score row that `criterion` picks: its argmax (ties: the smaller K). For
    "cross_modal_1se", the smallest K whose cross_modal is within one standard error of
    the best (the one-standard-error rule of Tibshirani et al.'s gap statistic)."""
    if criterion == "cross_modal_1se":
        best = max(scores, key=lambda d: (d["cross_modal"], -d["k"]))
        return min((d for d in scores if d["cross_modal"] >= best["cross_modal"] - best["cross_modal_se"]),
                   key=lambda d: d["k"])
    return max(scores, key=lambda d: (d[criterion], -d["k"]))


def _check_range(k_range: Sequence[int], n: int) -> tuple[int, int]:
    try:
        lo, hi = (int(k) for k in k_range)
        ok = all(float(k) == int(k) for k in k_range)
    except (TypeError, ValueError):
        raise ValueError(f"k_range must be two integers (k_min, k_max), got {k_range!r}") from None
    if not ok or isinstance(k_range, (str, bytes)):
        raise ValueError(f"k_range must be two integers (k_min, k_max), got {k_range!r}")
    if lo < 2 or hi < lo:
        raise ValueError(f"k_range must satisfy 2 <= k_min <= k_max, got {k_range!r}")
    if hi > n:
        raise ValueError(f"k_range's k_max = {hi} exceeds the {n} rows (cannot make more clusters than rows); "
                         f"lower k_max to at most {n}")
    return lo, hi


def _silhouette_rows(x: Tensor, labels: Tensor, k: int) -> Tensor:
    """Per-row cosine silhouette of rows x [m, D] with labels [m] (among these m rows)."""
    dist = (1.0 - x @ x.T).clamp_min(0.0)
    oh = F.one_hot(labels, k).to(x.dtype)
    cnt = oh.sum(0)
    sums = dist @ oh  # [m, k]: summed distance of each row to each cluster
    own = sums.gather(1, labels[:, None]).squeeze(1)
    a = own / (cnt[labels] - 1).clamp_min(1)
    mean = sums / cnt.clamp_min(1)
    mean[:, cnt == 0] = float("inf")
    mean.scatter_(1, labels[:, None], float("inf"))
    b = mean.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s[(cnt[labels] <= 1) | ~torch.isfinite(b)] = 0.0  # singletons (and K = 1 within E) score 0
    return s


def _scores(u: Tensor, v: Tensor, k: int, fit: Tensor, ev: Tensor, cfg: Config, seed: int, restarts: int) -> dict:
    km = ops.kmeans(v, k, iters=cfg.semantic.kmeans_iters, restarts=restarts, seed=seed, chunk_size=cfg.chunks.assign)
    lab = km.labels
    s = _silhouette_rows(v[ev], lab[ev], k)
    # image centres from the fit half; the held-out half votes (a row never votes for a centre it built)
    cu = torch.zeros(k, u.shape[1], dtype=torch.float32, device=u.device).index_add_(0, lab[fit], u[fit])
    empty = cu.norm(dim=1) == 0
    cu = F.normalize(cu, dim=1)
    sim = u[ev] @ cu.T
    sim[:, empty] = -2.0  # below any cosine: a centre without fit rows is nobody's
    own = sim.gather(1, lab[ev][:, None]).squeeze(1)
    other = sim.scatter(1, lab[ev][:, None], -2.0).max(1).values
    # the image side's (simplified, centroid) silhouette of each held-out row: its margin
    # for its own cluster's image centre over the nearest other one, in cosine distance
    a_u, b_u = 1.0 - own, 1.0 - other
    s_u = (b_u - a_u) / torch.maximum(a_u, b_u).clamp_min(1e-12)
    pred = sim.argmax(1)
    agree = (pred == lab[ev]).float()
    po = float(agree.mean())
    pe = float((torch.bincount(lab[ev], minlength=k).float() / ev.numel()
                @ (torch.bincount(pred, minlength=k).float() / ev.numel())))
    # Calinski-Harabasz of v (Euclidean on unit rows): from the members' sums only
    n = v.shape[0]
    sums = torch.zeros(k, v.shape[1], dtype=torch.float32, device=v.device).index_add_(0, lab, v)
    cnt = torch.bincount(lab, minlength=k).float()
    within = float(n - (sums.norm(dim=1) ** 2 / cnt.clamp_min(1)).sum())
    total = float(n - n * v.mean(0).norm() ** 2)
    ch = ((total - within) / (k - 1)) / (within / (n - k)) if within > 0 and n > k else float("inf")
    both = s * s_u.clamp_min(0.0)
    return {"k": k, "cross_modal": float(both.mean()),
            "cross_modal_se": float(both.std() / both.numel() ** 0.5) if both.numel() > 1 else 0.0,
            "cross_modal_vote": float((s * agree).mean()), "silhouette": float(s.mean()),
            "image_silhouette": float(s_u.mean()), "agreement": po,
            "kappa": (po - pe) / (1 - pe) if pe < 1 else 0.0, "calinski_harabasz": float(ch),
            "objective": float(km.objective)}


def estimate_k(
    u: Tensor,
    nouns: Tensor,
    k_range: Sequence[int] = (2, 200),
    cfg: Optional[Config] = None,
    seed: int = 0,
    sample: int = 8000,
    *,
    points: int = 24,
    rounds: int = 1,
    restarts: int = 1,
    eval_rows: int = 2000,
    criterion: str = "cross_modal",
) -> KSearch:
    """Estimate the number of clusters of the images u (see the module doc).

    Args:
        u: [N, D] unit image embeddings (frozen CLIP; may be memory-mapped: only the
            sampled rows are read).
        nouns: [W, D] unit noun embeddings (the vocabulary a fit would use).
        k_range: (k_min, k_max), 2 <= k_min <= k_max <= N, both tried.
        cfg: the fit's Config (its semantic-space, counterpart and chunk settings).
        seed: the sample, k-means seeding and split; the result is deterministic for it.
        sample: rows to search on (at least 20 k_max, at most N).
        points: K values on the geometric grid.  rounds: counterpart rebuilds (>= 1; see
            the module doc).  restarts: k-means restarts per K (see the module doc).
        eval_rows: held-out rows scored per K (silhouette is O(eval_rows^2 K)).
        criterion: which score chooses K, one of `CRITERIA`.
    Returns:
        KSearch(k, criterion, scores = one dict per K of the last round, rounds, sample,
        seconds, at_range_end: k is k_max, or k_min > 2: widen k_range and search again).
    """
    t0 = time.perf_counter()
    cfg = cfg or Config()
    if not isinstance(u, Tensor) or u.ndim != 2 or u.shape[0] < 1:
        raise ValueError(f"u must be a [N, D] tensor of image embeddings, got {getattr(u, 'shape', type(u).__name__)}")
    if not isinstance(nouns, Tensor) or nouns.ndim != 2 or nouns.shape[1] != u.shape[1] or nouns.shape[0] < 1:
        raise ValueError(f"nouns must be a [W, {u.shape[1]}] tensor (the images' dimension), "
                         f"got {getattr(nouns, 'shape', type(nouns).__name__)}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    for name, value, low in (("sample", sample, 2), ("points", points, 1), ("rounds", rounds, 1),
                             ("eval_rows", eval_rows, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    n = u.shape[0]
    lo, hi = _check_range(k_range, n)

    # the row sample: sorted ids, so a memory-mapped u is read front to back
    s = min(n, max(sample, 20 * hi))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n, generator=gen)[:s].sort().values if s < n else torch.arange(n)
    us = F.normalize(u[ids.to(u.device)].float(), dim=1)
    ns = F.normalize(nouns.float().to(us.device), dim=1)
    # disjoint halves: k-means sees all S rows; image centres from `fit`, scores on `ev`
    perm = torch.randperm(s, generator=gen).to(us.device)
    half = s // 2
    fit, ev = perm[:half], perm[half : half + min(eval_rows, s - half)]
    grid = k_grid(lo, hi, points)

    k0, out_rounds, scores, k = hi, [], [], hi
    for r in range(rounds):
        tr = time.perf_counter()
        space = counterparts.select_nouns(us, ns, min(k0, s), cfg.semantic, seed=seed, chunks=cfg.chunks)
        v = counterparts.text_counterparts(us, space.bank(ns), cfg.counterparts, cfg.chunks).float()
        scores = [_scores(us, v, kk, fit, ev, cfg, seed, restarts) for kk in grid]
        best = choose(scores, criterion)
        k = int(best["k"])
        out_rounds.append({"k0": int(k0), "k": k, "seconds": time.perf_counter() - tr})
        log.info("k search round %d: k0 = %d, estimate %d by %s (cross_modal %.4f)", r + 1, k0, k, criterion,
                 best["cross_modal"])
        if k == k0:
            break
        k0 = k
    if k == hi or (k == lo and lo > 2):
        log.warning("k search: the estimate %d is an end of k_range (%d, %d); the best K may lie beyond it", k, lo, hi)
    return KSearch(k=k, criterion=criterion, scores=scores, rounds=out_rounds, sample=int(s),
                   seconds=time.perf_counter() - t0, at_range_end=k == hi or (k == lo and lo > 2))
