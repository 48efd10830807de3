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
    drag centres to the cluster borders), features v the text counterparts.

    The EMA is mass-weighted: centre k moves with momentum m_k = momentum ** (n_k / n_bar),
    n_k = sum_i w_ik its mass in the batch and n_bar the mass of an average cluster. A
    plain EMA would move every centre by the same step towards its weighted batch mean,
    and for a cluster with little mass in the batch that mean is close to the mean of the
    whole batch: at K = 200 (two to three members per cluster in a batch of 512) the
    starving centres drift to the global mean, merge, and the target collapses the
    partition to a third of K. With m_k a centre moves as much as its members say,
    per sample, whatever K and the batch size."""
    with torch.no_grad():
        w = 0.5 * (p + q)
        conf = w.max(1).values
        keep = conf >= conf.quantile(confident)
        new, mass = ops.center_update(v[keep], w.shape[1], probs=w[keep])
        if centers is None:
            return new
        m = (momentum ** (mass / mass.mean().clamp_min(1e-12)))[:, None].to(new.dtype)
        return torch.nn.functional.normalize(m * centers.to(new.dtype) + (1 - m) * new, dim=1)


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


# the K at which the default `Stage1Config.center_tau` was chosen (the ten-class scenarios)
REFERENCE_K = 10


def center_temperature(v: Tensor, centers: Tensor, scale: float, sample: int = 65536) -> float:
    """tau_a of the centre target softmax(v c^T / tau_a): scale x spread x min(1, 10 / K).

    The spread (`similarity_spread`) gives the target the same sharpness with and without
    a modality gap. The factor min(1, REFERENCE_K / K) keeps it from flattening as K
    grows: a row's target mass on its best centre competes with K - 1 rivals, so at one
    temperature the target tends to uniform with K (measured on the gap scenarios at
    2 x spread: mean top-1 probability 0.27 at K = 10, 0.06 at K = 100, 0.035 at K = 200,
    entropy 0.93-0.97 of log K). A flat target pulls both heads towards uniform rows and
    lets neighbouring clusters merge (stage-1 ACC 0.17 at K = 200, 0.51 with the factor;
    the sweep is in the README). K = v's centre count."""
    k = centers.shape[0]
    return scale * similarity_spread(v, centers, sample) * min(1.0, REFERENCE_K / k)


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
