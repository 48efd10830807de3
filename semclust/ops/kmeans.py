from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import validate as V
from .assign import assign
from .center_update import center_update
from .reference import KMeansResult, kmeans_pp_init

log = logging.getLogger(__name__)

# Hard assignment through the soft `assign` op: at this temperature the softmax is an
# argmax for any cosine gap above ~1e-4, and the labels are the argmax either way.
_HARD_TAU = 1e-2


def _objective(x: Tensor, centers: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk_size):
        xs = x[s : s + chunk_size].float()
        total += (1.0 - (xs * centers[labels[s : s + chunk_size]].float()).sum(1)).sum().double()
    # 1 - cos can round to -1e-8 for a point on its centre
    return (total / x.shape[0]).clamp_min(0.0)


def _reseed_empty(x: Tensor, centers: Tensor, labels: Tensor, counts: Tensor, chunk_size: int) -> Tensor:
    """Empty clusters take the points worst served by their centres (farthest first)."""
    empty = torch.nonzero(counts <= 0).flatten()
    if empty.numel() == 0:
        return centers
    dist = torch.cat(
        [1.0 - (x[s : s + chunk_size].float() * centers[labels[s : s + chunk_size]].float()).sum(1)
         for s in range(0, x.shape[0], chunk_size)]
    )
    far = torch.topk(dist, min(empty.numel(), x.shape[0])).indices
    centers = centers.clone()
    centers[empty[: far.numel()]] = x[far].to(centers.dtype)
    return centers


def kmeans(
    x: Tensor,
    k: int,
    iters: int = 100,
    restarts: int = 3,
    seed: int = 0,
    init: str = "k-means++",
    tol: float = 1e-6,
    chunk_size: int = 65536,
    init_sample: int = 32768,
    progress: bool = False,
) -> KMeansResult:
    """Spherical k-means (cosine), seeded, best of `restarts` by objective.

    Each Lloyd step is one `assign` pass (labels only) and one `center_update`
    (segment sums, normalised), so it runs on whichever backend those ops dispatch to.
    Empty clusters are re-seeded with the farthest points. Stops early when the
    objective improves by less than `tol`.

    Args:
        x: [N, D] rows, L2-normalised (normalised here if not).
        k: clusters, 1 <= k <= N.  init: "k-means++" or "random".
        init_sample: k-means++ seeds from at most this many random rows. Greedy seeding
            makes k sequential passes over its rows, which at N = 1M and k = 3000 would
            cost more than the Lloyd steps; Lloyd then runs on all N rows.
        progress: a tqdm bar over the Lloyd steps of every restart (rows/s as the rate).
    Returns:
        KMeansResult(centers [K, D] float32, labels [N] int64,
        objective = mean_i (1 - cos(x_i, c_label_i)), lower is better).
    """
    V.matrix("x", x)
    k = V.count("k", k, 1, x.shape[0], what=f" (cannot make more clusters than the {x.shape[0]} rows)")
    V.count("iters", iters, 1)
    V.count("restarts", restarts, 1)
    V.count("init_sample", init_sample, k, what=" (k-means++ needs at least k rows to seed from)")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    # rows that are already unit-norm (embedding stores are) are used as they are, even
    # memory-mapped fp16: every pass below reads them in chunks
    xf = x if V.unit_rows(x, chunk_size) else torch.nn.functional.normalize(x.float(), dim=1)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    best = None
    bar = tqdm(total=restarts * iters, desc=f"k-means (k={k})", unit="step", disable=not progress, leave=False)
    for r in range(restarts):
        if init == "k-means++":
            pool = xf
            if xf.shape[0] > init_sample:
                pool = xf[torch.randperm(xf.shape[0], generator=gen, device=x.device)[:init_sample].sort().values]
            # seeding makes k passes over its pool: convert it once (<= init_sample rows)
            centers = kmeans_pp_init(pool.float(), k, gen, chunk_size)
        else:
            centers = xf[torch.randperm(xf.shape[0], generator=gen, device=x.device)[:k]].float()
        prev_obj = float("inf")
        for it in range(iters):
            labels = assign(xf, centers, _HARD_TAU, chunk_size=chunk_size).labels
            means, counts = center_update(xf, k, labels=labels, normalize=False)
            means = means.float()
            # the objective of the new centres needs no pass over x: the centre of S_c
            # (its members' sum) is S_c / |S_c|, so sum_i cos(x_i, c_label_i) = sum_c |S_c|
            obj = float(1.0 - (means.norm(dim=1) * counts.float()).sum() / x.shape[0])
            bar.update(1)
            bar.set_postfix(restart=r, objective=f"{obj:.4f}")
            # centres in float32 on the unit sphere whatever the storage dtype of x
            centers = torch.nn.functional.normalize(_reseed_empty(xf, means, labels, counts, chunk_size), dim=1)
            if prev_obj - obj < tol:
                break
            prev_obj = obj
        labels = assign(xf, centers, _HARD_TAU, chunk_size=chunk_size).labels
        obj = _objective(xf, centers, labels, chunk_size)
        log.debug("kmeans restart %d: %d iterations, objective %.6f", r, it + 1, float(obj))
        if best is None or obj < best.objective:
            best = KMeansResult(centers, labels, obj)
        bar.update((r + 1) * iters - bar.n)  # a restart that converged early skips its remaining steps
    bar.close()
    return best
