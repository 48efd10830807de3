from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import validate as V
from . import reference
from .dispatch import register, resolve

register("torch", "center_update")(reference.center_update)


def center_update(
    x: Tensor,
    k: int,
    labels: Optional[Tensor] = None,
    probs: Optional[Tensor] = None,
    normalize: bool = True,
    previous: Optional[Tensor] = None,
    momentum: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Cluster centres from hard labels (segment sums) or soft assignments (P^T x).

    sums_k = sum_i w_ik x_i with w = one_hot(labels) or probs; counts_k = sum_i w_ik;
    centres = normalise(sums) (spherical) or sums / counts. With `previous` [K, D]:
    c = m * previous + (1 - m) * c (then re-normalised), and an empty cluster keeps its
    previous centre; without `previous` its centre is the zero vector (counts say which).
    Exactly one of `labels` ([N] int) and `probs` ([N, K]) is given.

    Returns:
        (centers [K, D] in x's dtype, counts [K] float32/float64).
    """
    V.matrix("x", x)
    k = V.count("k", k, 1)
    if (labels is None) == (probs is None):
        raise ValueError("give exactly one of labels (hard) or probs (soft)")
    if labels is not None:
        labels = V.labels("labels", labels, x.shape[0], k)
    else:
        V.matrix("probs", probs, cols=k)
        if probs.shape[0] != x.shape[0]:
            raise ValueError(f"probs has {probs.shape[0]} rows but x has {x.shape[0]}")
    if previous is not None:
        V.matrix("previous", previous, cols=x.shape[1])
        if previous.shape[0] != k:
            raise ValueError(f"previous has {previous.shape[0]} centres, expected k={k}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    _, impl = resolve("center_update", x.device)
    return impl(x, k, labels=labels, probs=probs, normalize=normalize, previous=previous, momentum=momentum)
