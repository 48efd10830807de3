"""The stateful parts of the stage-1 loss: the EMA of fused centres and the EMA of
cluster shares behind the dynamic balance weights.

The loss itself is one pure function, `semclust.ops.reference.stage1_loss` (its terms
sit beside it), used by the torch path of `method.stage1` and as the definition of the
fused step; these two states are updated once per step, after either path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..runtime import distributed as dist


def update_centers(
    centers: Optional[Tensor], p: Tensor, q: Tensor, v: Tensor, momentum: float, confident: float = 0.5
) -> Tensor:
    """EMA of the text-space centres from confident members: weights w_ik = (p_ik + q_ik)/2
    for samples whose fused confidence is at least the batch median (weaker members would
    drag centres to the cluster borders), features v the text counterparts."""
    with torch.no_grad():
        w = 0.5 * (p + q)
        conf = w.max(1).values
        keep = conf >= conf.quantile(confident)
        new, _ = ops.center_update(v[keep], w.shape[1], probs=w[keep], previous=centers,
                                   momentum=momentum if centers is not None else 0.0)
        return new


def initial_centers(v: Tensor, k: int, seed: int, restarts: int = 3, chunk_size: int = 65536) -> Tensor:
    """[K, D] k-means centres of the text counterparts v [N, D] (all ranks together)."""
    n = v.shape[0]
    rank, world = dist.rank_world()
    lo, hi = dist.shard_range(n, rank, world)
    reduce = dist.ShardedRows(global_offset=lo) if dist.is_distributed() else None
    return ops.kmeans(v[lo:hi], k, restarts=restarts, seed=seed, chunk_size=chunk_size, reduce=reduce).centers.float()


def similarity_spread(v: Tensor, centers: Tensor, sample: int = 65536) -> float:
    """Mean over rows of the std over centres of v_i . c_k: how far apart the centres look
    from a sample. Under CLIP's modality gap counterparts sit in a narrow cone (spread
    ~0.05), without one it is ~0.25: a temperature in units of this spread gives targets
    of the same sharpness on both. A strided sample of <= `sample` rows bounds the cost."""
    step = max(1, v.shape[0] // sample)
    with torch.no_grad():
        sims = v[::step].to(centers.device, torch.float32) @ centers.float().T
        return float(sims.std(1).mean().clamp_min(1e-6))


@dataclass
class BalancePrior:
    """The dynamic balancing regularizer's estimate of the cluster prior.

    pi = (1 - mix) s + mix U, where s is the EMA of the batch marginals (the model's own
    cluster shares: the EM estimate of a mixture's weights) and U the uniform prior. The
    balance term KL(p_bar || pi) then lets clusters keep the sizes the data give them
    (a long tail stays a long tail) while the uniform part still pulls a starving
    cluster back (its pull grows as log(s_k K / mix) when s_k -> 0), so none dies.
    mix = 1 is TAC's uniform target.
    """

    shares: Tensor  # [K]
    momentum: float = 0.99
    mix: float = 0.5

    @classmethod
    def uniform(cls, k: int, momentum: float, mix: float, device: torch.device | str = "cpu") -> "BalancePrior":
        return cls(torch.full((k,), 1.0 / k, device=device), momentum, mix)

    def update(self, marginal: Tensor) -> None:
        self.shares = self.momentum * self.shares + (1 - self.momentum) * marginal.detach().to(self.shares.dtype)

    def prior(self, mix: Optional[float] = None) -> Tensor:
        """[K] pi, positive and summing to 1."""
        lam = self.mix if mix is None else mix
        s = self.shares / self.shares.sum()
        return (1.0 - lam) * s + lam / s.shape[0]
