from __future__ import annotations

import logging
from typing import Optional, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import validate as V
from .dispatch import resolve
from .normalize import normalize_rows
from .reference import KMeansResult, kmeans_pp_init

log = logging.getLogger(__name__)

# k-means++ re-reads its pool once per seed (a [pool, D] x [D, 2 + ln k] product per
# seed, which MKL runs at ~10 GFLOP/s on one core: 0.67 us per 512-d row), so the pool
# is what seeding costs: at K = 333 over 100k x 512 rows a 32768-row pool took 5 s of a
# 17 s fit, 8192 rows 1.8 s and 4096 rows 0.9 s, and pools of 10656 and 4096 rows ended
# 20 Lloyd steps 0.1% above the 32768-row objective. 8 MiB of rows (4096 at D = 512), at
# least 8 rows per seed.
_PP_POOL_BYTES = 8 << 20
_PP_ROWS_PER_SEED = 8


class KMeansReducer(Protocol):
    """What `kmeans` needs to know of rows it does not hold (faiss contrib.clustering's
    `DatasetAssign` idea): `x` is this process's shard of N rows, and the reducer reaches
    the others. `semclust.runtime.distributed.ShardedRows` is the torch.distributed one.

    Every process calls each method with the same arguments other than its own shard,
    in the same order, so a method may be a collective.
    """

    def total_rows(self, x: Tensor) -> int:
        """N, the rows of all shards. Called first, once per `kmeans` call: check every
        shard here and raise on every process alike (a bad shard must not leave the
        others waiting in a later collective)."""
        ...

    def take(self, x: Tensor, ids: Tensor) -> Tensor:
        """The rows with global ids `ids` [m] (the same on every process), in that order:
        [m, D], any floating dtype (`kmeans` converts them to float32)."""
        ...

    def sum(self, t: Tensor) -> Tensor:
        """`t` summed over the shards, the same on every process (may work in place)."""
        ...

    def farthest(self, x: Tensor, dist: Tensor, e: int) -> Tensor:
        """The min(e, N) rows with the largest `dist` [n_local] over all shards, largest
        first and the same on every process: [min(e, N), D], any floating dtype."""
        ...


def _objective(cos: Tensor, n: int, reduce: Optional[KMeansReducer] = None) -> Tensor:
    """mean_i (1 - cos(x_i, c_label_i)) over all n rows, from each local row's cosine to
    its centre (what the nearest-centre pass returns)."""
    total = (1.0 - cos.double()).sum()
    if reduce is not None:
        total = reduce.sum(total.reshape(1))[0]
    # 1 - cos can round to -1e-8 for a point on its centre
    return (total / n).clamp_min(0.0)


def _global_means(means: Tensor, counts: Tensor, reduce: KMeansReducer) -> tuple[Tensor, Tensor]:
    """The means and counts of all shards from this shard's float32 means and counts.

    A float32 mean times its integer count (< 2^24) is exact in float64, so the shards'
    sums are added exactly as float64 and one shard gives back its means bit for bit.
    """
    acc = torch.cat([means.double() * counts.double()[:, None], counts.double()[:, None]], dim=1)
    acc = reduce.sum(acc)
    counts = acc[:, -1]
    return (acc[:, :-1] / counts.clamp_min(1.0)[:, None]).float(), counts


def _reseed_empty(x: Tensor, centers: Tensor, labels: Tensor, counts: Tensor, chunk_size: int,
                  reduce: Optional[KMeansReducer] = None) -> Tensor:
    """Empty clusters take the points worst served by their centres (farthest first)."""
    empty = torch.nonzero(counts <= 0).flatten()
    if empty.numel() == 0:
        return centers
    dist = torch.cat(
        [1.0 - (x[s : s + chunk_size].float() * centers[labels[s : s + chunk_size]].float()).sum(1)
         for s in range(0, x.shape[0], chunk_size)]
    )
    if reduce is None:
        rows = x[torch.topk(dist, min(empty.numel(), x.shape[0])).indices]
    else:
        rows = reduce.farthest(x, dist, empty.numel())
    centers = centers.clone()
    centers[empty[: rows.shape[0]]] = rows.to(centers.dtype)
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
    reduce: Optional[KMeansReducer] = None,
    max_points_per_centre: Optional[int] = None,
) -> KMeansResult:
    """Spherical k-means (cosine), seeded, best of `restarts` by objective.

    Each Lloyd step is one nearest-centre pass (`knn`, top 1, the centres as the
    database) and one `center_update` (segment sums), so it runs on whichever backend
    those ops dispatch to.
    Empty clusters are re-seeded with the farthest points. Stops early when the
    objective improves by less than `tol`.

    Sharded rows (`reduce` given, e.g. `runtime.distributed.ShardedRows()` on every
    rank): `x` is this process's shard and the loop is the same one over all N rows.
    Seeding draws global row ids from the seeded generator (the same on every process,
    whatever the sharding) and `reduce.take`s those rows; each step's per-cluster means
    and counts, weighted by the counts, and the final objective are `reduce.sum`med;
    empty clusters take `reduce.farthest` rows. Every process therefore holds the same
    centres and objective and stops at the same step; the sharding changes only the
    summation order (centres to ~1e-7, labels equal in practice), and one shard gives
    the result of `reduce=None` (up to the order among equally far re-seed rows).

    Args:
        x: [N, D] rows, L2-normalised (normalised here if not); with `reduce`, the local
            [n_local, D] shard.
        k: clusters, 1 <= k <= N.  init: "k-means++" or "random".
        init_sample: k-means++ seeds from at most this many random rows. Greedy seeding
            makes k sequential passes over its rows, which at N = 1M and k = 3000 would
            cost more than the Lloyd steps; Lloyd then runs on all N rows. Within this
            cap the pool is max(8 k, the rows of 8 MiB of float32).
        progress: a tqdm bar over the Lloyd steps of every restart (rows/s as the rate).
        reduce: the `KMeansReducer` of sharded rows; None: `x` is all the rows.
        max_points_per_centre: train on at most k x this many random rows (faiss's cap,
            whose default is 256), then assign all N rows once to the centres of the
            restart with the best objective on that sample. None: every Lloyd step reads
            all N rows. The sample is drawn by global row id from the seeded generator
            and gathered once (`reduce.take`), so every process trains on the same rows
            whatever the sharding.
    Returns:
        KMeansResult(centers [K, D] float32, labels [N] (with `reduce`: [n_local]) int64,
        objective = mean_i (1 - cos(x_i, c_label_i)) over all N rows, lower is better).
    """
    if reduce is not None:  # a collective that checks every shard first
        n = reduce.total_rows(x)
    V.matrix("x", x)
    if reduce is None:
        n = x.shape[0]
    k = V.count("k", k, 1, n, what=f" (cannot make more clusters than the {n} rows)")
    V.count("iters", iters, 1)
    V.count("restarts", restarts, 1)
    V.count("init_sample", init_sample, k, what=" (k-means++ needs at least k rows to seed from)")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    if max_points_per_centre is not None:
        V.count("max_points_per_centre", max_points_per_centre, 1)

    # rows that are already unit-norm (embedding stores are) are used as they are, even
    # memory-mapped fp16: every pass below reads them in chunks
    xf = x if V.unit_rows(x, chunk_size) else normalize_rows(x, torch.float32, chunk_size)

    def rows(ids: Tensor) -> Tensor:  # the rows with global ids `ids`
        return xf[ids] if reduce is None else reduce.take(xf, ids)

    gen = torch.Generator(device=x.device).manual_seed(seed)
    full, full_reduce, n_full = xf, reduce, n
    if max_points_per_centre is not None and n > k * max_points_per_centre:
        # Lloyd on a sample, held whole by every process (no reducer needed for it)
        n = k * max_points_per_centre
        xf = rows(torch.randperm(n_full, generator=gen, device=x.device)[:n].sort().values).float()
        reduce = None
    pool_rows = min(init_sample, max(_PP_ROWS_PER_SEED * k, _PP_POOL_BYTES // (4 * x.shape[1])))
    whole = None  # k-means++ seeds from every row when N <= its pool (gathered once if sharded)
    if init == "k-means++" and n <= pool_rows:
        whole = xf if reduce is None else reduce.take(xf, torch.arange(n, device=x.device))
    # x was checked once above: the Lloyd steps call the backends directly, since the
    # public ops' input checks re-read all of x (twice a step)
    _, knn_impl = resolve("knn", x.device)
    _, update_impl = resolve("center_update", x.device)

    def nearest(rows_: Tensor, centers_: Tensor) -> tuple[Tensor, Tensor]:
        """(label, cosine to that centre) of every row: top-1 of `knn` with the centres
        as the database (faiss's assignment step). A labels-only scan of each score tile,
        where the soft `assign` would also exponentiate it: at K = 333 over 100k x 512
        rows, one thread, 0.52-0.61 s a pass against 0.60-0.72 s. Chunked so that
        memory-mapped fp16 rows are converted a chunk at a time (64k x 512 floats:
        128 MiB)."""
        lab, cos = [], []
        for s in range(0, rows_.shape[0], chunk_size):
            # float32 queries: knn returns scores in their dtype, and the objective sums them
            sc, ix = knn_impl(centers_, 1, queries=rows_[s : s + chunk_size].float(), exclude_self=False)
            lab.append(ix[:, 0])
            cos.append(sc[:, 0])
        return torch.cat(lab), torch.cat(cos)

    best = None
    bar = tqdm(total=restarts * iters, desc=f"k-means (k={k})", unit="step", disable=not progress, leave=False)
    for r in range(restarts):
        if init == "k-means++":
            pool = whole
            if pool is None:
                pool = rows(torch.randperm(n, generator=gen, device=x.device)[:pool_rows].sort().values)
            # seeding makes k passes over its pool: convert it once (<= pool_rows rows)
            centers = kmeans_pp_init(pool.float(), k, gen, chunk_size)
        else:
            centers = rows(torch.randperm(n, generator=gen, device=x.device)[:k]).float()
        prev_obj = float("inf")
        for it in range(iters):
            labels, _ = nearest(xf, centers)
            means, counts = update_impl(xf, k, labels=labels, probs=None, normalize=False, previous=None, momentum=0.0)
            means = means.float()
            if reduce is not None:
                means, counts = _global_means(means, counts, reduce)
            # the objective of the new centres needs no pass over x: the centre of S_c
            # (its members' sum) is S_c / |S_c|, so sum_i cos(x_i, c_label_i) = sum_c |S_c|
            obj = float(1.0 - (means.norm(dim=1) * counts.float()).sum() / n)
            bar.update(1)
            bar.set_postfix(restart=r, objective=f"{obj:.4f}")
            # centres in float32 on the unit sphere whatever the storage dtype of x
            centers = torch.nn.functional.normalize(_reseed_empty(xf, means, labels, counts, chunk_size, reduce), dim=1)
            if prev_obj - obj < tol:
                break
            prev_obj = obj
        labels, cos = nearest(xf, centers)
        obj = _objective(cos, n, reduce)
        log.debug("kmeans restart %d: %d iterations, objective %.6f", r, it + 1, float(obj))
        # a restart that only ties the best within float32 rounding (the same partition,
        # its labels permuted) keeps the earlier one, so that rescaled rows pick the same
        if best is None or obj < best.objective * (1.0 - 1e-6):
            best = KMeansResult(centers, labels, obj)
        bar.update((r + 1) * iters - bar.n)  # a restart that converged early skips its remaining steps
    bar.close()
    if xf is full:
        return best
    # trained on a sample: one pass labels every row and scores the centres on all of them
    labels, cos = nearest(full, best.centers)
    return KMeansResult(best.centers, labels, _objective(cos, n_full, full_reduce))
