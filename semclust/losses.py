"""Stage-1 losses: instance-, assignment- and centre-level consistency + balancing.

Notation: P = softmax(f_I(u)) and Q = softmax(f_T(v)) are [B, K] assignments of a
batch's images and text counterparts; P_n / Q_n are those of a random cross-modal
neighbour (an image neighbour for the text side and vice versa, as in TAC's
neighbour distillation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from . import ops

_EPS = 1e-8


def instance_loss(p: Tensor, q: Tensor, p_n: Tensor, q_n: Tensor) -> Tensor:
    """-log <p_i, q_i> (a sample agrees with its own counterpart; TAC's BCE(<p,q>, 1))
    plus the same for its cross-modal neighbours (-log <p_i, q_n_i>, -log <q_i, p_n_i>)."""
    own = -torch.log((p * q).sum(1).clamp_min(_EPS)).mean()
    nbr = -0.5 * (torch.log((p * q_n).sum(1).clamp_min(_EPS)).mean() + torch.log((q * p_n).sum(1).clamp_min(_EPS)).mean())
    return own + nbr


def cluster_infonce(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """Symmetric InfoNCE over the 2K cluster vectors of a and b ([B, K] each): column k of
    `a` is pulled to column k of `b` and pushed from every other column of both (TAC,
    temperature 0.5). Works for any [n, K] pair, e.g. [K, D] centres transposed."""
    k = a.shape[1]
    z = F.normalize(torch.cat([a.T, b.T], dim=0), dim=1)
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * k, dtype=torch.bool, device=a.device), float("-inf"))
    target = torch.cat([torch.arange(k, 2 * k), torch.arange(0, k)]).to(a.device)
    return F.cross_entropy(sim, target)


def assignment_loss(p: Tensor, q: Tensor, p_n: Tensor, q_n: Tensor, tau: float) -> Tensor:
    """Cluster-level consistency of the assignment columns across modalities and
    neighbours: InfoNCE(P, Q_n) + InfoNCE(Q, P_n), halved."""
    return 0.5 * (cluster_infonce(p, q_n, tau) + cluster_infonce(q, p_n, tau))


def soft_centers(p: Tensor, z: Tensor) -> Tensor:
    """c_k = normalise(sum_i p_ik z_i): [K, D] confidence-weighted centres."""
    return F.normalize(p.T @ z, dim=1)


def center_loss(
    p: Tensor, q: Tensor, u: Tensor, v: Tensor, centers: Optional[Tensor], tau_cluster: float, tau_center: float
) -> Tensor:
    """Centre-level consistency.

    (1) image centres sum_i p_ik u_i and text centres sum_i q_ik v_i are aligned
        by InfoNCE over the K centre pairs (temperature `tau_cluster`);
    (2) "better centre generation": `centers` [K, D] are built from BOTH modalities and
        from confident members, averaged over batches (see `update_centers`); both heads
        are pulled towards the assignment those centres give, softmax(z c^T / tau_center),
        with z = normalise(u + v) — a prototype target that is steadier than any batch.
    """
    ci, ct = soft_centers(p, u), soft_centers(q, v)
    logits = ci @ ct.T / tau_cluster
    tgt = torch.arange(ci.shape[0], device=p.device)
    loss = 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt))
    if centers is not None:
        z = F.normalize(u + v, dim=1)
        target = ops.assign(z.detach(), centers, tau_center, return_probs=True).probs
        loss = loss - 0.5 * (target * (torch.log(p.clamp_min(_EPS)) + torch.log(q.clamp_min(_EPS)))).sum(1).mean()
    return loss


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


def balance_loss(p: Tensor, q: Tensor, state: Optional[BalanceState]) -> Tensor:
    """-(H_w(p_bar) + H_w(q_bar)) / log K: the (weighted) entropy of the batch's cluster
    marginals, maximised. With `state`, weights follow the EMA of cluster shares (dynamic,
    SEIC-r); without, w = 1 (TAC's fixed entropy term). Dividing by log K keeps the
    weight comparable across K."""
    w = state.weights() if state is not None else None
    hp = ops.balance(p, weights=w)
    hq = ops.balance(q, weights=w)
    if state is not None:
        state.update(0.5 * (hp.marginal + hq.marginal))
    return -(hp.entropy + hq.entropy) / math.log(max(p.shape[1], 2))
