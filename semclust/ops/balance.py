from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import validate as V
from . import reference
from .dispatch import register, resolve
from .reference import BalanceResult

register("torch", "balance")(reference.balance)


def balance(probs_or_colsum: Tensor, n: Optional[int] = None, weights: Optional[Tensor] = None) -> BalanceResult:
    """Cluster-share statistics for the balancing regularizer.

    p_bar = mean_i P_i (from P [N, K]) or colsum / n (from colsum [K] and row count n);
    entropy = -sum_k w_k p_bar_k log p_bar_k (w = 1 unless `weights` [K] is given);
    kl = KL(p_bar || uniform) = log K + sum_k p_bar_k log p_bar_k.  Differentiable.
    Computed and returned in float32 (float64 for float64 input); `n` is used only
    with a colsum.
    """
    t = probs_or_colsum
    if not isinstance(t, Tensor) or t.dim() not in (1, 2) or not t.is_floating_point():
        raise ValueError("probs_or_colsum must be a float tensor: probs [N, K] or colsum [K]")
    if t.dim() == 1 and (n is None or n <= 0):
        raise ValueError("a colsum [K] needs n, the number of rows it sums over")
    if t.numel() == 0:
        raise ValueError("probs_or_colsum is empty")
    V.finite_("probs_or_colsum", t)
    if weights is not None and (weights.dim() != 1 or weights.shape[0] != t.shape[-1]):
        raise ValueError(f"weights must be [K={t.shape[-1]}], got {tuple(weights.shape)}")
    _, impl = resolve("balance", t.device)
    return impl(t, n=n, weights=weights)
