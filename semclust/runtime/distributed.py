"""torch.distributed helpers: rows sharded across ranks, batches and statistics over ranks.

Each rank holds a contiguous shard `x_local` [n_r, D] of the global rows [N, D]
(`shard_range` gives the balanced split; rank r's rows have global ids
[offset_r, offset_r + n_r)). `ShardedRows` lets `ops.kmeans` cluster the union of the
shards (centres all-reduced); `gather_batch` and `GlobalBatchNorm1d` make a batch split
over ranks behave as one. Every helper also runs without a process group (world 1),
where it is the single-process computation.

Backends: NCCL for CUDA tensors, gloo for CPU tensors (`init_from_env` picks one); the
tensors handed to these helpers must live on the device the backend serves. Every rank
must call a collective helper with the same arguments (other than its own shard), in
the same order, as with any torch.distributed collective. Input errors found after the
shard sizes are exchanged are raised on every rank alike, so one bad shard cannot leave
the other ranks waiting in a collective.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from ..ops import validate as V
from ..ops.kmeans import KMeansReducer

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo", "init_from_env", "is_distributed", "shard_range", "all_reduce_sum",
    "all_gather_rows", "rank_world", "ShardedRows", "gather_batch", "GlobalBatchNorm1d",
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

    A no-op without a process group. Not differentiable (`gather_batch` and
    `GlobalBatchNorm1d` use torch's differentiable collectives).
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


class ShardedRows(KMeansReducer):
    """`ops.kmeans`'s reduction hook for rows sharded over the ranks: on every rank,
    `ops.kmeans(x_local, k, ..., reduce=ShardedRows(global_offset))`.

    The loop is `ops.kmeans`'s, over the union of the shards; labels are for the local
    rows, centres and the objective (the global mean of 1 - cos) are the same on every
    rank. Numerics are the one loop's: each step all-reduces the per-cluster float32
    means of the local rows weighted by their counts, summed exactly in float64. Hence:

    * seeding draws global row ids with `ops.kmeans`'s seeded generator (on the device
      of x_local, identical on every rank and at any world size) and the owners gather
      those rows, so every rank seeds alike, and exactly as `ops.kmeans` on all rows;
    * empty clusters take the globally farthest rows (each rank offers its farthest;
      ties go to the lower global id, so the choice does not depend on the sharding);
    * input errors (an empty shard, NaN/Inf rows, mismatched D or offsets) are found
      once the shard sizes are exchanged and raised on every rank alike.

    Across world sizes only summation orders differ (centres to ~1e-7, labels equal in
    practice), except that fp16/bf16 shards get their means from `center_update` in the
    storage dtype, as `ops.kmeans` does: centres then agree to that rounding (~2e-4 on
    fp16), labels still in practice. A cluster left empty at the end may hold a
    different one of several rows that are all (up to rounding) 0 from their centres.
    World 1 (no process group) is `ops.kmeans(x, ...)` bit for bit, up to the order
    among equally far re-seed rows.

    `total_rows` (which `ops.kmeans` calls first) binds the instance to the shard it
    checks; the other methods need it bound.

    Args:
        global_offset: global id of this rank's first row; default: ranks hold
            consecutive blocks in rank order (as `shard_range` splits them).
    """

    def __init__(self, global_offset: Optional[int] = None) -> None:
        self.global_offset = global_offset
        self._lay: Optional[_Layout] = None

    def total_rows(self, x: Tensor) -> int:
        self._lay = _layout(x, "x", self.global_offset)
        return self._lay.total

    def take(self, x: Tensor, ids: Tensor) -> Tensor:
        """Rows `ids` in that order, float32 (the shards' dtypes may differ)."""
        lay = self._lay
        owned = [(ids >= o) & (ids < o + s) for o, s in zip(lay.offsets, lay.sizes)]
        mine = ids[owned[lay.rank]] - lay.offsets[lay.rank]
        gathered = all_gather_rows(x[mine].float())  # the owners' rows, in rank order
        out = torch.empty(ids.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for mask in owned:  # every rank knows where each rank's rows go
            at = torch.nonzero(mask).flatten()
            out[at] = gathered[start : start + at.numel()]
            start += at.numel()
        return out

    def sum(self, t: Tensor) -> Tensor:
        return all_reduce_sum(t)

    def farthest(self, x: Tensor, dist: Tensor, e: int) -> Tensor:
        lay = self._lay
        # a stable sort, not topk: among equal distances the local offer must be the lowest ids
        top = torch.sort(dist, descending=True, stable=True)
        keep = top.indices[:e]
        offer = [top.values[: keep.numel(), None], keep[:, None] + lay.offsets[lay.rank], x[keep]]
        # one gather: distance, global id (exact in float64 below 2^53) and the row itself
        cand = all_gather_rows(torch.cat([t.double() for t in offer], dim=1))
        by_id = cand[cand[:, 1].argsort()]
        ranked = by_id[torch.sort(by_id[:, 0], descending=True, stable=True).indices]
        return ranked[:e, 2:]


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
