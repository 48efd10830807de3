"""The kNN phase: each row's k nearest other rows by cosine, exact (chunked `ops.knn`)
or approximate (faiss IVF) for large N, and the recall of the approximate lists.

Exact kNN costs N^2 D: at N = 1M, D = 512 that is 10^15 multiply-adds, hours on a CPU.
An inverted-file index scans only `nprobe` of `nlist` k-means cells per query. faiss is
an optional dependency (`pip install faiss-cpu`); asking for "ivf" without it raises.
Vectors are held in fp16 inside the index (the store's precision), so the index costs
N x D x 2 bytes, not the float32 copy a flat index would make.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import ops
from ..config import ChunkConfig, Stage1Config
from ..runtime.mmap import release


def neighbours(z: Tensor, k: int, chunks: ChunkConfig, out: Optional[Tensor] = None, progress: bool = False,
               desc: str = "knn", cfg: Optional[Stage1Config] = None, rows: Optional[tuple[int, int]] = None) -> Tensor:
    """[N, k] indices (int32 unless `out` says otherwise) of each row's k nearest other
    rows by cosine, written `chunks.knn_queries` query rows at a time so that only
    [chunk, k] results exist besides `out` (which may be memory-mapped). Exact, unless
    `cfg.knn_method` is "ivf" (faiss, approximate; see `ivf_neighbours`). `rows` = (lo, hi)
    answers only those queries (one rank's share), against all N rows."""
    n = z.shape[0]
    out = torch.empty((n, k), dtype=torch.int32) if out is None else out
    if tuple(out.shape) != (n, k):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n, k)}")
    if cfg is not None and cfg.knn_method == "ivf":
        return ivf_neighbours(z, k, out, cfg.knn_nlist, cfg.knn_nprobe, chunk=chunks.knn_database,
                                  progress=progress, desc=f"{desc} (ivf)", rows=rows)
    if cfg is not None and cfg.knn_method != "exact":
        raise ValueError(f"knn_method must be 'exact' or 'ivf', got {cfg.knn_method!r}")
    step = chunks.knn_queries
    lo, hi = rows or (0, n)
    with tqdm(total=hi - lo, desc=desc, unit="query", unit_scale=True, disable=not progress, leave=False) as bar:
        for s in range(lo, hi, step):
            q = z[s : min(s + step, hi)]
            # k + 1 with the row itself, then drop it: the same lists as exclude_self,
            # for a query chunk at any offset into the database
            idx = ops.knn(z, k + 1, queries=q, exclude_self=False, query_chunk=step, database_chunk=chunks.knn_database)[1]
            own = idx == torch.arange(s, s + q.shape[0], device=idx.device)[:, None]
            own[~own.any(1), -1] = True
            out[s : s + q.shape[0]] = idx[~own].view(q.shape[0], k).to(device=out.device, dtype=out.dtype)
            release(z, out)  # each query chunk reads every row: let them go before the next
            bar.update(q.shape[0])
    return out

def _faiss():
    try:
        import faiss
    except ImportError:
        raise RuntimeError("knn_method='ivf' needs faiss: pip install faiss-cpu (or faiss-gpu); "
                           "knn_method='exact' needs nothing") from None
    return faiss


def default_nlist(n: int) -> int:
    """4 sqrt(N) cells (faiss's guideline), at most N / 39 so every cell trains on 39 rows."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def ivf_neighbours(z: Tensor, k: int, out: Tensor, nlist: int = 0, nprobe: int = 16, chunk: int = 65536,
                   seed: int = 0, progress: bool = False, desc: str = "knn (ivf)",
                   rows: tuple[int, int] | None = None) -> Tensor:
    """Approximately the k nearest other rows of each row of z [N, D] (cosine on unit
    rows), written into `out` [N, k] chunk by chunk. Searches k + 1 and drops the row
    itself (or the last hit when the index missed it). `rows` = (lo, hi) answers only
    those queries; the index holds all N rows (trained on the same seeded sample on
    every rank, so every rank builds the same index)."""
    faiss = _faiss()
    n, d = z.shape
    nlist = nlist or default_nlist(n)
    nprobe = min(nprobe, nlist)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    g = torch.Generator().manual_seed(seed)
    train = torch.randperm(n, generator=g)[: min(n, 64 * nlist)].sort().values
    index.train(np.ascontiguousarray(z[train].float().numpy()))
    for s in range(0, n, chunk):
        index.add(np.ascontiguousarray(z[s : s + chunk].float().numpy()))
        release(z)
    index.nprobe = nprobe
    lo, hi = rows or (0, n)
    with tqdm(total=hi - lo, desc=desc, unit="query", unit_scale=True, disable=not progress, leave=False) as bar:
        for s in range(lo, hi, chunk):
            q = z[s : min(s + chunk, hi)].float().numpy()
            _, idx = index.search(np.ascontiguousarray(q), k + 1)
            idx = torch.from_numpy(idx)
            # a query that found fewer than k + 1 cells' worth of rows gets -1 slots:
            # fill them with the row's own index so the self-drop below removes one
            rows = torch.arange(s, s + q.shape[0])[:, None]
            idx = torch.where(idx < 0, rows, idx)
            own = idx == rows
            first = own & (own.cumsum(1) == 1)
            first[~first.any(1), -1] = True
            keep = idx[~first].view(q.shape[0], k)
            keep = torch.where(keep == rows, keep[:, :1], keep)  # leftover fill: repeat the best hit
            out[s : s + q.shape[0]] = keep.to(out.dtype)
            release(z, out)
            bar.update(q.shape[0])
    return out


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
    # the k-th best other row: drop the query itself from the k + 1 (or the last hit)
    own = idx == rows[:, None]
    own[~own.any(1), -1] = True
    kth = scores[~own].view(-1, k)[:, -1]
    found = approx[rows].long()
    sims = (z[found.flatten()].float().view(found.shape[0], k, -1) * q[:, None, :]).sum(-1)
    ok = (sims >= kth[:, None] - 1e-6) & (found != rows[:, None])
    return float(ok.float().mean())
