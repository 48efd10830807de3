from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from . import validate as V
from .dispatch import forced, register, resolve, unavailable_reason

register("torch", "batchnorm_relu")(reference.batchnorm_relu)


def batchnorm_relu(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    *,
    training: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """ReLU after BatchNorm1d, the middle of a clustering head (Linear -> BN -> ReLU -> Linear).

    h [B, C] float, weight / bias [C]. Training: with the batch's mean_c = mean_i h_ic and
    biased variance var_c = mean_i (h_ic - mean_c)^2,
        y_ic = max(0, (h_ic - mean_c) / sqrt(var_c + eps) * weight_c + bias_c),
    and the running statistics (when given) updated in place as nn.BatchNorm1d does:
    r <- (1 - m) r + m s with s = mean_c, and var_c B / (B - 1) for running_var;
    m = momentum, or 1 / batches seen (num_batches_tracked, incremented here) when momentum
    is None. Eval (training=False): running_mean / running_var replace the batch's.
    Differentiable in h, weight and bias. Returns y [B, C] in h's dtype.
    """
    V.matrix("h", h, finite=False)  # a hot path: the loss after it is checked instead
    c = h.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} must be [C={c}], got shape {tuple(t.shape)}")
    if training and h.shape[0] < 2:
        raise ValueError(f"batch norm in training needs a batch of at least 2 rows, got {h.shape[0]}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch norm in eval mode needs running_mean and running_var")
    if momentum is None and training and num_batches_tracked is None:
        raise ValueError("momentum None (a cumulative average) needs num_batches_tracked")
    _, impl = resolve("batchnorm_relu", h.device)
    return impl(h, weight, bias, running_mean, running_var, training, momentum, float(eps), num_batches_tracked)


def covered(device: torch.device | str) -> bool:
    """Whether the backend choice covers this op on `device`: always unforced (torch
    implements it), forced only where that backend implements it. A model calls the op
    when covered and otherwise runs its own torch modules, as it does for every layer no
    backend fuses (forcing triton, which has no kernel for it, keeps nn.BatchNorm1d)."""
    name = forced()
    return name is None or unavailable_reason(name, "batchnorm_relu", torch.device(device)) is None
