"""Semantic-space selection and text-counterpart retrieval (TAC's recipe).

1. Spherical k-means on the images with M = max(K, N // images_per_centre) centres.
2. Every noun votes for its nearest centre (softmax over the centres); each centre keeps
   its gamma nouns most similar to it; T' is their union (<= gamma M nouns). Nouns no
   image is near never enter, which keeps a 20k-noun vocabulary from drowning the
   signal. Ranking by the cosine to the centre rather than by the vote's softmax
   probability is a choice made here: at TAC's temperatures the probability saturates
   at 1.0 for most nouns, and ties would make the pick arbitrary.
3. v_i = normalise(sum_w softmax_w(u_i . t'_w / tau) t'_w): each image's text counterpart.
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
    """Choose the nouns near the images' semantic centres. u [N, D], nouns [W, D]."""
    n = u.shape[0]
    m = min(n, max(k, n // cfg.images_per_centre))
    rank, world = dist.rank_world()
    # distributed: each rank reads its shard of rows; centres are all-reduced, identical everywhere
    lo, hi = dist.shard_range(n, rank, world)
    reduce = dist.ShardedRows(global_offset=lo) if dist.is_distributed() else None
    km = ops.kmeans(u[lo:hi], m, iters=cfg.kmeans_iters, restarts=cfg.kmeans_restarts, seed=seed,
                    chunk_size=chunks.assign, progress=progress and rank == 0, reduce=reduce)
    votes = ops.assign(nouns, km.centers.to(nouns.dtype), cfg.noun_tau, chunk_size=chunks.assign)
    chosen = []
    for c in range(m):
        members = torch.nonzero(votes.labels == c).flatten()
        if members.numel():
            sim = nouns[members].float() @ km.centers[c].float()
            top = torch.topk(sim, min(cfg.nouns_per_centre, members.numel())).indices
            chosen.append(members[top])
    index = torch.unique(torch.cat(chosen)) if chosen else torch.arange(nouns.shape[0])
    log.info("semantic space: %d centres (objective %.4f), %d of %d nouns kept", m, float(km.objective), index.numel(), nouns.shape[0])
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

    def block(lo: int, hi: int) -> Tensor:
        return ops.retrieve(u[lo:hi].to(b.device).float(), b, cfg.tau, normalize=True, chunk_size=chunks.retrieve)

    return rows.fill(ws or Workspace(None), name, tuple(u.shape), u.dtype, block, chunk=chunks.retrieve, reads=(u,),
                     desc="counterparts", unit="img", progress=progress)
