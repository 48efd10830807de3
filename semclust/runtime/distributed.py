"""torch.distributed helpers: clustering and neighbour search over rows sharded across ranks.

Each rank holds a contiguous shard `x_local` [n_r, D] of the global rows [N, D]
(`shard_range` gives the balanced split; rank r's rows have global ids
[offset_r, offset_r + n_r)). Centres and balance statistics are all-reduced, neighbours
are found by passing the database shards round a ring, and every function also runs
without a process group (world 1), where it is the single-process computation.

Backends: NCCL for CUDA tensors, gloo for CPU tensors (`init_from_env` picks one); the
tensors handed to these helpers must live on the device the backend serves. Every rank
must call a collective helper with the same arguments (other than its own shard), in
the same order, as with any torch.distributed collective. Input errors found after the
shard sizes are exchanged are raised on every rank alike, so one bad shard cannot leave
the other ranks waiting in a collective.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import timedelta
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from .. import ops
from ..ops import validate as V
from ..ops.kmeans import _HARD_TAU  # the same hard-assignment temperature as ops.kmeans: identical labels
from ..ops.reference import KMeansResult, kmeans_pp_init

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo", "init_from_env", "is_distributed", "shard_range", "all_reduce_sum",
    "all_gather_rows", "kmeans", "knn_ring", "cluster_shares", "gather_batch", "GlobalBatchNorm1d",
    "use_global_batchnorm", "barrier",
]


class DistInfo(NamedTuple):
    rank: int  # this process's rank, 0 <= rank < world
    world: int  # number of processes
    device: torch.device  # where this rank's tensors live: cuda:LOCAL_RANK for NCCL, else cpu


class _Layout(NamedTuple):
    sizes: list[int]  # rows per rank
    offsets: list[int]  # global id of each rank's first row
    total: int  # N = sum of sizes
    rank: int


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(backend: Optional[str] = None, timeout: Optional[timedelta] = None) -> DistInfo:
    """Join the process group described by torchrun's environment, once.

    Reads RANK, WORLD_SIZE and LOCAL_RANK (MASTER_ADDR / MASTER_PORT are read by the
    `env://` rendezvous). With WORLD_SIZE > 1 and no default group yet, initialises one
    with `backend` (default: "nccl" when CUDA is available, else "gloo") and binds the
    rank to cuda:LOCAL_RANK for NCCL. An already initialised group is reused as it is.
    WORLD_SIZE unset or 1 needs no process group: the helpers then run single-process.

    Args:
        backend: "nccl", "gloo" or None (automatic).
        timeout: collective timeout for the new group (torch's default when None); a
            short one turns a hung peer into an error instead of a stall.
    Returns:
        DistInfo(rank, world, device).
    """
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (automatic), got {backend!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            # NCCL binds a communicator to the current device, so choose it before init
            torch.cuda.set_device(local_rank)
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    if dist.is_available() and dist.is_initialized():
        uses_cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if uses_cuda else torch.device("cpu")
        return DistInfo(dist.get_rank(), dist.get_world_size(), device)
    uses_cuda = backend != "gloo" and torch.cuda.is_available()
    return DistInfo(0, 1, torch.device("cuda", local_rank) if uses_cuda else torch.device("cpu"))


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank` when `n` rows are split over `world` ranks.

    Contiguous and balanced: the first n % world ranks get ceil(n / world) rows, the
    others floor(n / world), so sizes differ by at most one and the ranges tile [0, n)
    in rank order (a rank gets an empty range when n < world).
    """
    n = V.count("n", n, 0)
    world = V.count("world", world, 1)
    rank = V.count("rank", rank, 0, world - 1)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over all ranks, in place (every rank ends with the same sum); returns `t`.

    A no-op without a process group. Not differentiable (see `cluster_shares` for a
    statistic whose gradient reaches the local input).
    """
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """The small integer vector `values` of every rank, in rank order."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [o.tolist() for o in out]


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate every rank's `t` [n_r, ...] along rows, in rank order: [sum_r n_r, ...].

    Meant for small tensors (candidates, samples): every rank receives all of it. Row
    counts may differ per rank (gathered first; shards are padded to the largest and
    trimmed); the trailing shape and the dtype must agree. Returns `t` itself without a
    process group. Not differentiable.
    """
    if not isinstance(t, Tensor) or t.dim() == 0:
        raise ValueError("t must be a tensor with a row dimension (at least 1-D)")
    if not is_distributed():
        return t
    shapes = _all_gather_ints(list(t.shape), t.device)
    if any(s[1:] != list(t.shape[1:]) for s in shapes):
        raise ValueError(f"all_gather_rows needs one trailing shape on every rank, got {[tuple(s) for s in shapes]}")
    rows = [s[0] for s in shapes]
    if max(rows) == 0:
        return t
    buf = t.new_zeros((max(rows),) + tuple(t.shape[1:]))
    buf[: t.shape[0]] = t
    out = [torch.empty_like(buf) for _ in rows]
    dist.all_gather(out, buf.contiguous())
    return torch.cat([o[:r] for o, r in zip(out, rows)])


def _layout(x_local: Tensor, name: str, global_offset: Optional[int]) -> _Layout:
    """Exchange shard sizes and offsets; check every shard (raised on all ranks alike).

    Default offsets are the exclusive prefix sums of the sizes in rank order; given
    offsets must tile [0, N) without gaps or overlaps.
    """
    if not isinstance(x_local, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x_local).__name__}")
    if x_local.dim() != 2 or x_local.dtype not in V.FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a 2-D floating tensor [rows, dim], got {tuple(x_local.shape)} {x_local.dtype}"
        )
    if global_offset is not None:
        global_offset = V.count("global_offset", global_offset, 0)
    finite = bool(torch.isfinite(x_local).all())
    given = -1 if global_offset is None else global_offset
    mine = [x_local.shape[0], x_local.shape[1], given, int(finite)]
    rank, world = rank_world()
    table = _all_gather_ints(mine, x_local.device) if world > 1 else [mine]
    sizes = [t[0] for t in table]
    for r, (rows, cols, _, ok) in enumerate(table):
        where = f"{name} on rank {r}" if world > 1 else name
        if rows == 0:
            raise ValueError(f"{where} is empty (0 rows); give every rank at least one row (see shard_range)")
        if cols != table[0][1]:
            raise ValueError(f"{where} has dim {cols} but rank 0 has {table[0][1]}; all shards must share D")
        if not ok:
            raise ValueError(f"{where} has rows with NaN or Inf; drop or repair them before clustering")
    if all(t[2] < 0 for t in table):
        offsets = [sum(sizes[:r]) for r in range(world)]
    elif any(t[2] < 0 for t in table):
        raise ValueError("global_offset must be given on every rank or on none")
    else:
        offsets = [t[2] for t in table]
        ends = sorted((o, o + s) for o, s in zip(offsets, sizes))
        if ends[0][0] != 0 or any(a[1] != b[0] for a, b in zip(ends, ends[1:])):
            raise ValueError(f"the shards [global_offset, global_offset + rows) must tile [0, N) exactly; got {ends}")
    return _Layout(sizes, offsets, sum(sizes), rank)


def _global_sample(xf: Tensor, lay: _Layout, sample: int, seed: int) -> Tensor:
    """Rows of the global subsample of min(N, sample) ids, identical on every rank.

    The ids are drawn with a CPU generator seeded by `seed` (so they depend on N, sample
    and seed only, never on the world size or device) and sorted; with N <= sample the
    sample is every row in global order. Each rank contributes the sampled rows it owns;
    because shards are contiguous, rank r's rows fill one contiguous block of the sorted
    ids, which every rank can locate without gathering positions.
    """
    n = lay.total
    if n <= sample:
        ids = torch.arange(n)
    else:
        # randperm costs 8 bytes per global row, once: the simplest exact draw without replacement
        ids = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample].sort().values
    off, size = lay.offsets[lay.rank], lay.sizes[lay.rank]
    lo, hi = torch.searchsorted(ids, torch.tensor([off, off + size])).tolist()
    gathered = all_gather_rows(xf[(ids[lo:hi] - off).to(xf.device)])
    out = torch.empty(ids.shape[0], xf.shape[1], dtype=xf.dtype, device=xf.device)
    start = 0
    for o, s in zip(lay.offsets, lay.sizes):
        a, b = torch.searchsorted(ids, torch.tensor([o, o + s])).tolist()
        out[a:b] = gathered[start : start + b - a]
        start += b - a
    return out


def _global_centers(xf: Tensor, labels: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """c_k = normalise(sum over all ranks of the rows labelled k), counts [K].

    Sums are accumulated and all-reduced in float64, so the centres differ across world
    sizes only by float64 summation order (~1e-16), far below what could flip a label.
    """
    acc = torch.zeros(k, xf.shape[1] + 1, dtype=torch.float64, device=xf.device)
    for s in range(0, xf.shape[0], chunk_size):
        acc[:, :-1].index_add_(0, labels[s : s + chunk_size], xf[s : s + chunk_size].double())
    acc[:, -1] = torch.bincount(labels, minlength=k).double()
    all_reduce_sum(acc)
    return torch.nn.functional.normalize(acc[:, :-1], dim=1).float(), acc[:, -1]


def _row_distances(xf: Tensor, centers: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
    """1 - cos(x_i, c_label_i) per local row [n_local], float32 as in ops.kmeans."""
    return torch.cat(
        [1.0 - (xf[s : s + chunk_size] * centers[labels[s : s + chunk_size]]).sum(1)
         for s in range(0, xf.shape[0], chunk_size)]
    )


def _objective(xf: Tensor, centers: Tensor, labels: Tensor, lay: _Layout, chunk_size: int) -> Tensor:
    """mean over all N rows of 1 - cos(x_i, c_label_i), float64, identical on every rank."""
    total = _row_distances(xf, centers, labels, chunk_size).double().sum().reshape(1)
    return (all_reduce_sum(total)[0] / lay.total).clamp_min(0.0)


def _reseed_empty(xf: Tensor, centers: Tensor, labels: Tensor, counts: Tensor, lay: _Layout, chunk_size: int) -> Tensor:
    """Empty clusters take the globally farthest points, as ops.kmeans does on one process.

    Each rank offers its e farthest rows (e = number of empty clusters); the union is
    ranked by distance, ties to the lower global id, and the first e become the centres
    of the empty clusters in index order.
    """
    empty = torch.nonzero(counts <= 0).flatten()
    if empty.numel() == 0:
        return centers
    dist_local = _row_distances(xf, centers, labels, chunk_size)
    # a stable sort, not topk: among equal distances the local offer must be the lowest ids
    top = torch.sort(dist_local, descending=True, stable=True)
    keep = top.indices[: empty.numel()]
    offer = [top.values[: keep.numel(), None], keep[:, None] + lay.offsets[lay.rank], xf[keep]]
    # one gather: distance, global id (exact in float64 below 2^53) and the row itself
    cand = all_gather_rows(torch.cat([t.double() for t in offer], dim=1))
    by_id = cand[cand[:, 1].argsort()]
    ranked = by_id[torch.sort(by_id[:, 0], descending=True, stable=True).indices]
    f = min(empty.numel(), ranked.shape[0])
    centers = centers.clone()
    centers[empty[:f]] = ranked[:f, 2:].to(centers.dtype)
    return centers


def kmeans(
    x_local: Tensor,
    k: int,
    iters: int = 100,
    restarts: int = 3,
    seed: int = 0,
    sample: int = 32768,
    global_offset: Optional[int] = None,
    tol: float = 1e-6,
    chunk_size: int = 65536,
) -> KMeansResult:
    """Spherical k-means over the union of every rank's rows; labels for the local rows.

    Minimises mean_i (1 - cos(x_i, c_label_i)) over all N rows, like `ops.kmeans`:

    * seeding: the ids of a global random subsample of m = min(N, sample) rows are drawn
      with a generator seeded by `seed` (identical on every rank and at any world size),
      the owners gather those rows, and every rank runs the same greedy k-means++
      (`ops.reference.kmeans_pp_init`) on the same sample with a generator seeded by
      `seed`, so all ranks pick the same seeds. With N <= sample the sample is all rows
      in order, which is exactly the seeding of `ops.kmeans(x, k, ..., seed=seed)`;
    * Lloyd step: local labels with `ops.assign`; per-cluster sums and counts of the
      local rows in float64, all-reduced, normalised: c_k = normalise(sum_{i: l_i = k} x_i);
    * empty clusters take the globally farthest points (each rank offers its farthest);
    * the objective is all-reduced; a restart stops when it improves by less than `tol`
      (the same float64 value on every rank, so every rank stops at the same step); the
      best restart by global objective wins.

    Reproducibility: at world 1 the result is a deterministic function of (x, k, seed,
    sample, iters, restarts). Across world sizes only the summation order of the float64
    sums and of the objective differs, so centres agree to ~1e-7 (after the float32
    cast) and labels are identical in practice; with N <= sample the same holds against
    `ops.kmeans` on the whole data.

    Args:
        x_local: [n_local, D] this rank's rows (fp16/bf16/fp32/fp64; normalised here), at
            least one row on every rank.
        k: clusters, 1 <= k <= min(N, sample).
        sample: rows the seeding sees; memory O(sample x D) on every rank.
        global_offset: global id of this rank's first row; default: ranks hold
            consecutive blocks in rank order (as `shard_range` splits them).
    Returns:
        KMeansResult(centers [K, D] float32 (same on every rank), labels [n_local] int64
        for the local rows, objective: global mean of 1 - cos, float64 scalar).
    """
    lay = _layout(x_local, "x_local", global_offset)
    sample = V.count("sample", sample, 1)
    m = min(lay.total, sample)
    k = V.count("k", k, 1, m, what=f" (the seeding sample holds {m} rows: N = {lay.total}, sample = {sample})")
    V.count("iters", iters, 1)
    V.count("restarts", restarts, 1)
    V.count("chunk_size", chunk_size, 1)
    # unit rows (a memory-mapped fp16 store) are read chunk by chunk as they are
    xf = x_local if V.unit_rows(x_local, chunk_size) else torch.nn.functional.normalize(x_local.float(), dim=1)
    seeds_from = _global_sample(xf, lay, sample, seed)
    gen = torch.Generator(device=xf.device).manual_seed(seed)
    best: Optional[KMeansResult] = None
    for r in range(restarts):
        centers = kmeans_pp_init(seeds_from, k, gen, chunk_size)
        prev_obj = math.inf
        for it in range(iters):
            labels = ops.assign(xf, centers, _HARD_TAU, chunk_size=chunk_size).labels
            centers, counts = _global_centers(xf, labels, k, chunk_size)
            centers = _reseed_empty(xf, centers, labels, counts, lay, chunk_size)
            obj = float(_objective(xf, centers, labels, lay, chunk_size))
            if prev_obj - obj < tol:
                break
            prev_obj = obj
        labels = ops.assign(xf, centers, _HARD_TAU, chunk_size=chunk_size).labels
        objective = _objective(xf, centers, labels, lay, chunk_size)
        log.debug("distributed kmeans restart %d: %d iterations, objective %.6f", r, it + 1, float(objective))
        if best is None or objective < best.objective:
            best = KMeansResult(centers, labels, objective)
    return best


def _merge_topk(best_s: Tensor, best_i: Tensor, s: Tensor, i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of the union of two candidate lists per row; ties go to the lower global id."""
    cand_s, cand_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
    # order by id first, then a stable sort by score keeps ids ascending among equal scores
    by_id = cand_i.argsort(dim=1)
    cand_s, cand_i = cand_s.gather(1, by_id), cand_i.gather(1, by_id)
    order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :k]
    return cand_s.gather(1, order), cand_i.gather(1, order)


def knn_ring(
    x_local: Tensor,
    k: int,
    exclude_self: bool = True,
    global_offset: Optional[int] = None,
    query_chunk: int = 4096,
    database_chunk: int = 65536,
) -> tuple[Tensor, Tensor]:
    """Exact top-k inner-product neighbours of the local rows among all N rows.

    The database is the union of the shards; each shard travels round a ring: at step
    s = 0..P-1 rank r scores its rows against the shard of rank (r - s) mod P with
    `ops.knn(shard, k', queries=x_local)` while that shard is passed on to rank r + 1
    and the next one arrives from rank r - 1 (`batch_isend_irecv`, sizes known from one
    exchange up front). A running top-k [n_local, k] is merged with the shard's
    candidates under global ids. With `exclude_self`, row i's own global id is dropped.
    Ties keep the lower global id, so the result is that of `ops.knn(x_all, k)` on the
    concatenated data (scores are the same dot products; a backend whose GEMM tiling
    depends on the matrix shape can change the last bit of a score).

    Scores are computed and merged in float32 (float64 for float64 input), as in
    `ops.knn`, and returned in x_local's dtype. Memory: O(n_local x k) for the running
    top-k plus two shards (the one being scored and the one arriving).

    Args:
        x_local: [n_local, D] this rank's rows (usually L2-normalised), >= 1 row per rank.
        k: neighbours, 1 <= k <= N - 1 (N with exclude_self=False); may exceed a shard.
        global_offset: global id of this rank's first row (default: consecutive blocks
            in rank order).
        query_chunk, database_chunk: tile sizes handed to `ops.knn`.
    Returns:
        (scores [n_local, k], indices [n_local, k] int64 global row ids), best first.
    """
    lay = _layout(x_local, "x_local", global_offset)
    candidates = lay.total - (1 if exclude_self else 0)
    k = V.count("k", k, 1, candidates, what=f" (only {candidates} candidate neighbours exist among N = {lay.total})")
    V.count("query_chunk", query_chunk, 1)
    V.count("database_chunk", database_chunk, 1)
    rank, world = rank_world()
    work = torch.float64 if x_local.dtype == torch.float64 else torch.float32
    queries = x_local.to(work)
    n = x_local.shape[0]
    own_ids = torch.arange(n, device=x_local.device) + lay.offsets[rank]
    # placeholders: score -inf and id N (no row has it), so every real candidate ranks first
    best_s = torch.full((n, k), -math.inf, dtype=work, device=x_local.device)
    best_i = torch.full((n, k), lay.total, dtype=torch.int64, device=x_local.device)
    shard = x_local.contiguous()
    for step in range(world):
        src = (rank - step) % world
        reqs = []
        if step < world - 1:
            incoming = shard.new_empty((lay.sizes[(src - 1) % world], shard.shape[1]))
            reqs = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, shard, (rank + 1) % world),
                dist.P2POp(dist.irecv, incoming, (rank - 1) % world),
            ])
        own = src == rank
        # one extra candidate on the own shard: the query itself, dropped below
        kk = min(k + (1 if own and exclude_self else 0), shard.shape[0])
        s, i = ops.knn(shard.to(work), kk, queries=queries, exclude_self=False,
                       query_chunk=query_chunk, database_chunk=database_chunk)
        i = i + lay.offsets[src]
        if own and exclude_self:
            s = s.masked_fill(i == own_ids[:, None], -math.inf)
        for a in range(0, n, query_chunk):  # merge a block of rows at a time: temporaries O(query_chunk x k)
            b = a + query_chunk
            best_s[a:b], best_i[a:b] = _merge_topk(best_s[a:b], best_i[a:b], s[a:b], i[a:b], k)
        for req in reqs:
            req.wait()
        if reqs:
            shard = incoming
    return best_s.to(x_local.dtype), best_i


def cluster_shares(probs_or_colsum: Tensor, n_local: Optional[int] = None) -> Tensor:
    """Global cluster shares p_bar_k = (sum over ranks of sum_i P_ik) / N, on every rank.

    Give the local soft assignments P [n_local, K], or their column sums [K] (as
    `ops.assign(...).colsum` returns) with the local row count `n_local`; colsums and
    row counts are all-reduced. `ops.balance(p_bar, n=1)` then gives the global entropy
    and KL(p_bar || uniform).

    Differentiable w.r.t. the local input: the other ranks' sums enter as constants, so
    this rank's gradient is the partial derivative through its own rows, and the sum of
    the ranks' gradients is the exact gradient of a loss on the global p_bar. DDP
    averages gradients over ranks, so scale such a loss by the world size to recover it.
    Computed in float32 (float64 for float64 input).

    Returns:
        p_bar [K], summing to 1 for rows of P that each sum to 1.
    """
    t = probs_or_colsum
    if not isinstance(t, Tensor) or t.dim() not in (1, 2) or not t.is_floating_point():
        raise ValueError("probs_or_colsum must be a float tensor: probs [n_local, K] or colsum [K]")
    if t.dim() == 1:
        if n_local is None:
            raise ValueError("a colsum [K] needs n_local, the number of local rows it sums over")
        n_local = V.count("n_local", n_local, 0)
    else:
        n_local = t.shape[0]
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    colsum = (t.sum(0) if t.dim() == 2 else t).to(work)
    totals = all_reduce_sum(torch.cat([colsum.detach().double(), colsum.new_tensor([n_local], dtype=torch.float64)]))
    if totals[-1] <= 0:
        raise ValueError("no rows on any rank: the cluster shares are undefined")
    # the value is the global sum; colsum - colsum.detach() (exactly 0) routes the gradient to the local rows
    return (totals[:-1].to(work) + colsum - colsum.detach()) / float(totals[-1])


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def gather_batch(t_local: Tensor, sizes: list[int]) -> Tensor:
    """Every rank's slice of one global batch, concatenated in rank order, differentiable.

    `sizes` are the ranks' row counts (known to all: `shard_range` of the batch). The
    backward hands each rank the sum over ranks of the gradients of its rows; a loss
    computed alike on every rank from the gathered batch therefore gives each rank
    P x its rows' share of the gradient, and DDP's average over P ranks restores the
    exact gradient of the single-process loss. Rows are padded to the largest slice
    (collectives need equal shapes) and trimmed.
    """
    if not is_distributed():
        return t_local
    top = max(sizes)
    pad = torch.cat([t_local, t_local.new_zeros((top - t_local.shape[0],) + tuple(t_local.shape[1:]))])
    parts = dist_fn.all_gather(pad)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d normalising with the statistics of the global batch (all ranks).

    torch's SyncBatchNorm runs on GPUs only; this one works with gloo too. Mean and
    variance are all-reduced in two passes (sum, then sum of squared deviations) with
    differentiable collectives, so the gradient is that of BatchNorm on the whole batch
    (scaled by P like `gather_batch`, which DDP's average undoes). Without a process
    group, or in eval mode, it is plain BatchNorm1d; state_dict keys are the same.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        count = x.new_full((1,), float(x.shape[0]))
        first = dist_fn.all_reduce(torch.cat([x.sum(0), count]))
        n = first[-1]
        mean = first[:-1] / n
        var = dist_fn.all_reduce(((x - mean) ** 2).sum(0)) / n
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
                self.num_batches_tracked.add_(1)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def use_global_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d of `module` for a GlobalBatchNorm1d (same parameters and
    buffers), in place; returns `module`."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            g = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            g.load_state_dict(child.state_dict())
            setattr(module, name, g.to(next(child.buffers()).device))
        else:
            use_global_batchnorm(child)
    return module
