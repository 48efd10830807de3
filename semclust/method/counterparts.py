"""Semantic-space selection and text-counterpart retrieval.

Two recipes, chosen by `SemanticSpaceConfig.method` (the counterpart step follows
`CounterpartConfig`):

"pool" (the default; the seed paper's reading of "nouns near the k-means centres"):
  1. Spherical k-means on the images with K centres (the clusters sought).
  2. Each centre keeps its `pool_per_centre` (200) nouns of highest cosine; the candidate
     pool T' is their union. A pool per cluster-level centre keeps every cluster's
     vocabulary, sub-concepts included (a superclass whose nouns name its subclasses
     still finds them), while nouns no image is near never enter.
  3. v_i = normalise(sum_{w in top_i} softmax_w(u_i . t_w / tau) t_w) over the image's
     `per_image` (50) most similar pool nouns, tau = 0.01. Under CLIP's modality gap all
     nouns sit at nearly the same cosine to an image (0.2-0.35); restricting the softmax
     to the image's own top nouns keeps the long tail of the other thousands from
     blurring the counterpart toward the text cone's mean.

"tac" (TAC, Li et al. 2024):
  1. k-means with M = max(K, N // images_per_centre) centres;
  2. every noun votes for its nearest centre (softmax over the centres at `noun_tau`);
     each centre keeps its `nouns_per_centre` voters of highest vote probability, ties
     broken by cosine;
  3. retrieval over all kept nouns (per_image = 0) at tau = 0.005.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..config import ChunkConfig, CounterpartConfig, SemanticSpaceConfig
from ..runtime import distributed as dist
from ..runtime import rows
from ..runtime.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class SemanticSpace:
    centers: Tensor  # [M, D] image k-means centres
    noun_index: Tensor  # [W'] indices into the vocabulary, sorted
    kmeans_objective: float  # mean (1 - cos) of the k-means run

    def bank(self, nouns: Tensor) -> Tensor:
        return nouns[self.noun_index]


def select_nouns(
    u: Tensor, nouns: Tensor, k: int, cfg: SemanticSpaceConfig, seed: int = 0, chunks: ChunkConfig = ChunkConfig(),
    progress: bool = False,
) -> SemanticSpace:
    """Choose the nouns near the images' semantic centres (see the module doc for the
    two methods). u [N, D] and nouns [W, D] unit rows."""
    n = u.shape[0]
    m = k if cfg.method == "pool" else min(n, max(k, n // cfg.images_per_centre))
    rank, world = dist.rank_world()
    # distributed: each rank reads its shard of rows; centres are all-reduced, identical everywhere
    lo, hi = dist.shard_range(n, rank, world)
    reduce = dist.ShardedRows(global_offset=lo) if dist.is_distributed() else None
    km = ops.kmeans(u[lo:hi], m, iters=cfg.kmeans_iters, restarts=cfg.kmeans_restarts, seed=seed,
                    max_points_per_centre=cfg.kmeans_points_per_centre or None,
                    chunk_size=chunks.assign, progress=progress and rank == 0, reduce=reduce)
    centers = km.centers.to(nouns.dtype)
    if cfg.method == "pool":
        # [W, M] cosines, a noun chunk at a time: the top nouns of every centre at once
        per = min(cfg.pool_per_centre, nouns.shape[0])
        index = torch.unique(ops.knn(nouns, per, queries=centers, exclude_self=False,
                                     database_chunk=chunks.knn_database)[1].flatten())
    else:
        votes = ops.assign(nouns, centers, cfg.noun_tau, chunk_size=chunks.assign)
        chosen = []
        for c in range(m):
            members = torch.nonzero(votes.labels == c).flatten()
            if members.numel():
                # TAC's rank: the vote's probability; at low noun_tau it saturates at 1.0 for
                # many nouns, so the cosine to the centre breaks the ties (two stable sorts)
                cos = nouns[members].float() @ km.centers[c].float()
                order = torch.argsort(cos, descending=True, stable=True)
                order = order[torch.argsort(votes.conf[members][order], descending=True, stable=True)]
                chosen.append(members[order[: cfg.nouns_per_centre]])
        index = torch.unique(torch.cat(chosen)) if chosen else torch.arange(nouns.shape[0])
    log.info("semantic space (%s): %d centres (objective %.4f), %d of %d nouns kept", cfg.method, m,
             float(km.objective), index.numel(), nouns.shape[0])
    return SemanticSpace(km.centers, index, float(km.objective))


def text_counterparts(
    u: Tensor, bank: Tensor, cfg: CounterpartConfig, chunks: Optional[ChunkConfig] = None, *,
    ws: Optional[Workspace] = None, name: str = "counterparts", progress: bool = False,
) -> Tensor:
    """[N, D] L2-normalised counterparts of the images u [N, D] from the noun bank [W', D],
    in u's dtype, as the workspace array `name` (reused when finished; default: in memory).

    v_i = normalise(sum_w softmax_w(u_i . t_w / tau) t_w), `chunks.retrieve` rows at a
    time, so u may be memory-mapped and only a [chunk, W'] block is in memory.
    """
    chunks = chunks or ChunkConfig()
    b = bank.float().to(u.device)
    top = min(cfg.per_image, b.shape[0]) if cfg.per_image else 0

    def block(lo: int, hi: int) -> Tensor:
        x = u[lo:hi].to(b.device).float()
        if not top:
            return ops.retrieve(x, b, cfg.tau, normalize=True, chunk_size=chunks.retrieve)
        # the image's `top` most similar nouns (a kernel op), softmax over them only
        s, idx = ops.knn(b, top, queries=x, exclude_self=False, query_chunk=chunks.knn_queries,
                         database_chunk=chunks.knn_database)
        w = torch.softmax(s.float() / cfg.tau, dim=1)  # softmax subtracts the row max: tau = 0.005 is safe
        out = torch.empty_like(x)
        # sum_j w_ij b[idx_ij] as a sparse [rows, W'] x [W', D] product, 1024 rows at a time
        for r in range(0, x.shape[0], 1024):
            dense = torch.zeros(min(1024, x.shape[0] - r), b.shape[0], device=b.device).scatter_(1, idx[r : r + 1024], w[r : r + 1024])
            out[r : r + 1024] = dense @ b
        return torch.nn.functional.normalize(out, dim=1)
    return rows.fill(ws or Workspace(None), name, tuple(u.shape), u.dtype, block, chunk=chunks.retrieve, reads=(u,),
                     desc="counterparts", unit="img", progress=progress)
