"""The kNN phase: each row's k nearest other rows by cosine, exact (`ops.knn`) or
approximate (faiss IVF) for large N, and the recall of the approximate lists.

`searcher(z, k, cfg, chunks)` returns the per-block search `block(lo, hi) -> [hi - lo, k]`
int64 indices for query rows [lo, hi) against all N rows; `runtime.rows.fill` drives it
over this rank's rows, chunk by chunk, so the method holds no loop, page release or rank.

Exact kNN costs N^2 D: at N = 1M, D = 512 that is 10^15 multiply-adds, hours on a CPU.
An inverted-file index scans only `nprobe` of `nlist` k-means cells per query. faiss is
an optional dependency (`pip install faiss-cpu`); asking for "ivf" without it raises.
`method="auto"` (the default, `resolve_method`) searches exactly where that is cheap (on a
GPU, or up to `exact_max_rows` rows) and with IVF above.
Vectors are held in fp16 inside the index (the store's precision), so the index costs
N x D x 2 bytes, not the float32 copy a flat index would make.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .. import ops
from ..config import ChunkConfig, NeighbourConfig
from ..runtime import rows
from ..runtime.mmap import release
from ..runtime.workspace import Workspace

log = logging.getLogger(__name__)

Block = Callable[[int, int], Tensor]


def self_mask(idx: Tensor, rows: Tensor) -> Tensor:
    """[Q, k + 1] mask of the one entry to drop from each row of a k + 1 search: the
    query itself (its first occurrence), or the last hit when the search missed it (a
    tie, or an approximate index). `rows` [Q] are the queries' own indices."""
    own = idx == rows[:, None]
    first = own & (own.cumsum(1) == 1)
    first[~first.any(1), -1] = True
    return first


def exact(z: Tensor, k: int, chunks: ChunkConfig) -> Block:
    """Exact search: k + 1 nearest rows of each query (itself included), then drop it;
    the same lists as `ops.knn(exclude_self=True)`, for a query block at any offset."""

    def block(lo: int, hi: int) -> Tensor:
        q = z[lo:hi]
        idx = ops.knn(z, k + 1, queries=q, exclude_self=False, query_chunk=chunks.knn_queries,
                      database_chunk=chunks.knn_database)[1]
        rows = torch.arange(lo, hi, device=idx.device)
        return idx[~self_mask(idx, rows)].view(hi - lo, k)

    return block


def _faiss():
    try:
        import faiss
    except ImportError:
        raise RuntimeError("neighbours.method='ivf' needs faiss: pip install faiss-cpu (or faiss-gpu); "
                           "neighbours.method='exact' needs nothing") from None
    return faiss


def default_nlist(n: int) -> int:
    """sqrt(N) cells, at most N / 39 so every cell trains on 39 rows.

    Why not faiss's guideline of 4-16 sqrt(N): that sizes an index for many more rows than
    queries, while here every row is a query. The coarse quantizer's cost (training on
    64 rows per cell, assigning the N rows, routing the N queries) grows as N nlist, the
    scan of nprobe cells as N nprobe N / nlist; at a fixed number of rows scanned per query
    fewer, larger cells drop most of the first for the same recall. 10^6 CLIP-like rows,
    D = 512, k = 50, 2 threads (benchmarks/RESULTS.md): 4 sqrt(N) = 4000 cells with nprobe 16
    took 314 / 310 s (images / counterparts; recall@51 0.99953 / 0.99980), sqrt(N) = 1000 with
    nprobe 4 213 / 216 s (0.99965 / 0.99955); the scan of the fp16 codes is the rest (~200 s)."""
    return max(1, min(int(math.sqrt(n)), n // 39))


def ivf(z: Tensor, k: int, cfg: NeighbourConfig, chunk: int = 65536, seed: int = 0) -> Block:
    """Approximate search in a faiss IVF-SQfp16 index of all N rows (cosine on unit rows),
    trained on the same seeded sample on every rank, so every rank builds the same index.
    A query that found fewer than k + 1 rows gets its own index in the empty slots (the
    self-drop removes one) and the leftovers repeat its best hit."""
    faiss = _faiss()
    n, d = z.shape
    nlist = cfg.nlist or default_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    g = torch.Generator().manual_seed(seed)
    train = torch.randperm(n, generator=g)[: min(n, 64 * nlist)].sort().values
    index.train(np.ascontiguousarray(z[train].float().numpy()))
    for s in range(0, n, chunk):
        index.add(np.ascontiguousarray(z[s : s + chunk].float().numpy()))
        release(z)
    index.nprobe = min(cfg.nprobe, nlist)

    def block(lo: int, hi: int) -> Tensor:
        _, found = index.search(np.ascontiguousarray(z[lo:hi].float().numpy()), k + 1)
        found = torch.from_numpy(found)
        rows = torch.arange(lo, hi)
        found = torch.where(found < 0, rows[:, None], found)
        keep = found[~self_mask(found, rows)].view(hi - lo, k)
        return torch.where(keep == rows[:, None], keep[:, :1], keep)

    return block


def resolve_method(n: int, device: Union[str, torch.device], cfg: NeighbourConfig, warn: bool = False) -> str:
    """The search `cfg.method` names for N rows on `device`: "exact" or "ivf".

    "auto" is exact on a GPU (N^2 D there is seconds at 10^6 rows) and on a CPU up to
    `cfg.exact_max_rows` rows, IVF above. Without faiss a large CPU search stays exact
    (slow there, never wrong), with a warning (`warn`) that says what it costs and what to
    install; a forced "ivf" without faiss raises when the search starts."""
    if cfg.method != "auto":
        return cfg.method
    if torch.device(device).type != "cpu" or n <= cfg.exact_max_rows:
        return "exact"
    if importlib.util.find_spec("faiss") is None:
        if warn:
            log.warning("kNN over %d rows (neighbours.exact_max_rows = %d): faiss is not installed, so the search is "
                        "exact, N^2 D multiply-adds (hours at 10^6 rows on a CPU); pip install faiss-cpu for IVF",
                        n, cfg.exact_max_rows)
        return "exact"
    return "ivf"


def searcher(z: Tensor, k: int, cfg: NeighbourConfig, chunks: ChunkConfig, seed: int = 0) -> tuple[Block, int]:
    """(block search, query rows per block) for `cfg.method` (`resolve_method`)."""
    if resolve_method(z.shape[0], z.device, cfg) == "ivf":
        return ivf(z, k, cfg, chunk=chunks.knn_database, seed=seed), chunks.knn_database
    return exact(z, k, chunks), chunks.knn_queries


def knn_lists(z: Tensor, k: int, chunks: Optional[ChunkConfig] = None, cfg: Optional[NeighbourConfig] = None, *,
              seed: int = 0, ws: Optional[Workspace] = None, name: str = "knn", progress: bool = False) -> Tensor:
    """[N, k] int32 indices of each row's k nearest other rows of z [N, D] (cosine; exact
    or IVF as `resolve_method` reads `cfg.method`), as the workspace array `name` (reused when finished;
    default: in memory). Only [chunk, k] results exist besides the lists."""
    chunks, cfg = chunks or ChunkConfig(), cfg or NeighbourConfig()
    # a finished array is returned before `searcher` builds an IVF index for nothing
    done = ws.get(name) if ws is not None else None
    if done is not None:
        return done
    block, chunk = searcher(z, k, cfg, chunks, seed=seed)
    # each query chunk reads every row: `reads` lets their pages go before the next
    return rows.fill(ws or Workspace(None), name, (z.shape[0], k), torch.int32, block, chunk=chunk, reads=(z,),
                     desc=name.replace("_", " "), unit="query", progress=progress)


def recall_at_k(z: Tensor, approx: Tensor, k: int, sample: int = 1000, seed: int = 0,
                database_chunk: int = 65536) -> float:
    """Share of the approximate lists [N, k] that are as near as the exact k nearest other
    rows, over a random sample of query rows (the exact side costs sample x N x D).

    A found neighbour counts when its cosine reaches the exact k-th best one (to 1e-6):
    with duplicated rows (text counterparts often coincide) any of the tied rows is a
    correct answer, and counting index matches would punish the search for the tie order.
    """
    n = z.shape[0]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)[: min(sample, n)].sort().values
    q = z[rows].float()
    scores, idx = ops.knn(z, k + 1, queries=q, exclude_self=False, database_chunk=database_chunk)
    kth = scores[~self_mask(idx, rows)].view(-1, k)[:, -1]
    found = approx[rows].long()
    sims = (z[found.flatten()].float().view(found.shape[0], k, -1) * q[:, None, :]).sum(-1)
    ok = (sims >= kth[:, None] - 1e-6) & (found != rows[:, None])
    return float(ok.float().mean())
