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
from torch.nn import functional as F

from .. import ops


def update_centers(
    centers: Optional[Tensor], p: Tensor, q: Tensor, u: Tensor, v: Tensor, momentum: float, confident: float = 0.5
) -> Tensor:
    """EMA of fused centres from confident members: weights w_ik = (p_ik + q_ik)/2 for
    samples whose fused confidence is at least the batch median (weaker members would
    drag centres to the cluster borders); z = normalise(u + v) mixes both modalities."""
    with torch.no_grad():
        w = 0.5 * (p + q)
        conf = w.max(1).values
        keep = conf >= conf.quantile(confident)
        z = F.normalize(u + v, dim=1)
        new, _ = ops.center_update(z[keep], w.shape[1], probs=w[keep], previous=centers, momentum=momentum if centers is not None else 0.0)
        return new


@dataclass
class BalanceState:
    """EMA of cluster shares for the dynamic balancing weights (SEIC-r, momentum 0.9)."""

    shares: Tensor  # [K]
    momentum: float = 0.9
    power: float = 1.0

    @classmethod
    def uniform(cls, k: int, momentum: float, power: float, device: torch.device | str = "cpu") -> "BalanceState":
        return cls(torch.full((k,), 1.0 / k, device=device), momentum, power)

    def update(self, marginal: Tensor) -> None:
        self.shares = self.momentum * self.shares + (1 - self.momentum) * marginal.detach()

    def weights(self) -> Tensor:
        """w_k = (K share_k)^-power, normalised to mean 1: starved clusters weigh more."""
        k = self.shares.shape[0]
        w = (k * self.shares).clamp_min(1e-3) ** (-self.power)
        return w / w.mean()
