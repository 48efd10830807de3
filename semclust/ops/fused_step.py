"""The fused stage-1 training step: the whole stage-1 loss and its gradient w.r.t. both
heads' logits in one call (the `ext` backend: C++/OpenMP on CPU, CUDA on GPU).

Shapes and math. With B the batch size, K clusters, D the feature dim:

    logits_i [2B, K]  image head on the batch's images, then on their sampled image
                      neighbours (rows B..2B-1), exactly as `method.stage1.train_stage1` stacks them
    logits_t [2B, K]  text head on the counterparts, then on the text neighbours
    u, v     [B, D]   the batch's image features and text counterparts (constants)
    centers  [K, D]   the centres in the text-counterpart space (EMA, `method.losses.update_centers`) or None
    prior    [K]      the cluster prior the marginals are pulled to, positive and summing to 1
                      (`method.losses.BalancePrior.prior()`), or None for the uniform prior 1/K

    p, p_n = softmax(logits_i).split(B);  q, q_n = softmax(logits_t).split(B)
    instance   = -mean log<p,q> - (mean log<p,q_n> + mean log<q,p_n>) / 2
    assignment = (InfoNCE(p, q_n) + InfoNCE(q, p_n)) / 2   over the 2K cluster columns, tau_cluster
    center     = InfoNCE over the K centre pairs normalise(p^T u), normalise(q^T v) (tau_cluster)
                 - mean_i sum_k T_ik (log p_ik + log q_ik) / 2,  T = softmax(v centers^T / tau_center)
                 (only with centers; v the text counterparts as given: not normalised, no u)
    balance    = KL(p_bar || prior) + KL(q_bar || prior),   p_bar = mean_i p_i, q_bar = mean_i q_i
                 (over the B batch rows, not the neighbours),
                 KL(m || prior) = sum_k m_k log m_k - sum_k m_k log prior_k   (>= 0; 0 iff m = prior)
                 d balance / d p_bar_k = log p_bar_k + 1 - log prior_k; log p_bar is clamped at
                 the dtype's tiny, and an empty cluster (p_bar_k below it) drops the "+1"
                 (the clamp passes no gradient). With prior = None this is TAC's entropy
                 term up to a constant: KL(m || U) = log K - H(m).
    loss       = w_instance instance + w_assignment assignment + w_center center + w_balance balance

(`semclust.ops.reference` holds each term and `stage1_loss`; `reference.fused_step` is
softmax + `stage1_loss`, and the tests hold the extension to it.) The extension returns the loss, its
parts, the softmaxes and dloss/dlogits_i, dloss/dlogits_t from one call; the autograd
node's backward only scales those saved gradients by the incoming gradient, so the heads'
linear layers (torch GEMMs upstream) and the optimiser step are unchanged. u, v, centers
and prior are treated as constants: gradients flow to the logits only (pass them
detached; a u or v that requires grad is an error rather than a silently missing
gradient). The prior's EMA of cluster shares (`BalancePrior.update`) stays in Python and
uses the returned `marginal` = (p_bar + q_bar) / 2. The extension's side (`csrc/ops.py`)
is `FusedStepFunction`.

Dtypes: float32 and float64 are computed in their own precision; float16/bfloat16
logits are computed in float32 and the gradients cast back.

Speed (semclust/bench/step.py, 2-core AVX-512 CPU, D = 512): the fused loss forward +
backward is 1.5-3x faster than the Python graph (fewer GEMMs: the [2K, 2K] cluster
similarity is built from three K x K blocks and its gradient is one product, where
autograd does four and two) and needs about half its peak memory at K = 1000. A whole
step also runs the heads, identical on both paths, so it gains 1.0-1.15x at K <= 100
and 1.4-1.6x at K = 1000. The CUDA kernels follow the same plan around cuBLAS (one
warp per row, fixed-order reductions, no atomics: reproducible bit for bit).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, reference
from . import validate as V
from .dispatch import BackendUnavailable, register, resolve
from .reference import PARTS, StepResult

__all__ = ["fused_step", "active", "StepResult", "PARTS"]

register("torch", "fused_step")(reference.fused_step)


def _check_inputs(logits_i, logits_t, u, v, centers, prior) -> None:
    V.matrix("logits_i", logits_i, finite=False)
    V.matrix("logits_t", logits_t, finite=False)
    V.matrix("u", u, finite=False)
    V.matrix("v", v, cols=u.shape[1], finite=False)
    if logits_t.shape != logits_i.shape:
        raise ValueError(f"logits_t has shape {tuple(logits_t.shape)} but logits_i has {tuple(logits_i.shape)}")
    if v.shape != u.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but u has {tuple(u.shape)}")
    if logits_i.shape[0] != 2 * u.shape[0]:
        raise ValueError(
            f"logits have {logits_i.shape[0]} rows but u has {u.shape[0]}: stack the batch's rows and then "
            "their neighbours' rows, 2B in all"
        )
    k = logits_i.shape[1]
    if centers is not None:
        V.matrix("centers", centers, cols=u.shape[1], finite=False)
        if centers.shape[0] != k:
            raise ValueError(f"centers has {centers.shape[0]} rows, expected K={k}")
    if prior is not None and not isinstance(prior, Tensor):
        raise TypeError(f"prior must be a torch.Tensor or None, got {type(prior).__name__}")
    V.same_device(logits_i=logits_i, logits_t=logits_t, u=u, v=v, centers=centers, prior=prior)
    if prior is not None:
        if prior.dim() != 1 or prior.shape[0] != k:
            raise ValueError(f"prior must be [K={k}], got {tuple(prior.shape)}")
        if prior.dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"prior must be a floating tensor (fp16/bf16/fp32/fp64), got {prior.dtype}")
        # one sync for both conditions (NaN fails `> 0`)
        if not bool(((prior > 0) & torch.isfinite(prior)).all()):
            raise ValueError("prior must be finite and > 0 everywhere (a cluster prior: positive, summing to 1)")
    for name, t in (("u", u), ("v", v), ("centers", centers), ("prior", prior)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"fused_step treats {name} as a constant (gradients flow to the logits only); pass {name}.detach()")


def fused_step(
    logits_i: Tensor,
    logits_t: Tensor,
    u: Tensor,
    v: Tensor,
    centers: Optional[Tensor] = None,
    prior: Optional[Tensor] = None,
    *,
    cluster_tau: float,
    center_tau: float,
    w_instance: float,
    w_assignment: float,
    w_center: float,
    w_balance: float,
) -> StepResult:
    """The stage-1 loss, its parts and (through autograd) its gradient w.r.t. both heads'
    logits. See the module docstring for the shapes and the math.

    `prior` [K] is the cluster prior of the balance term KL(p_bar || prior) +
    KL(q_bar || prior): finite and > 0 (it should sum to 1; it is not renormalised), on
    the logits' device; None means uniform. It is read in the logits' compute dtype.

    Dispatched like the other ops: `ext` (one extension call, gradients computed in the
    forward) or `torch` (`reference.fused_step`, the Python loss graph).

    Returns:
        StepResult(loss [] differentiable, instance, assignment, center, balance [] detached,
        marginal [K], probs_i [2B, K], probs_t [2B, K]).
    """
    _check_inputs(logits_i, logits_t, u, v, centers, prior)
    V.positive("cluster_tau", cluster_tau)
    V.positive("center_tau", center_tau)
    _, impl = resolve("fused_step", logits_i.device)
    return impl(
        logits_i, logits_t, u, v, centers, prior,
        cluster_tau=cluster_tau, center_tau=center_tau, w_instance=w_instance,
        w_assignment=w_assignment, w_center=w_center, w_balance=w_balance,
    )


def active(device: torch.device | str) -> bool:
    """Whether `method.stage1.train_stage1` computes its loss with `fused_step` (the ext
    backend) on `device`: when `ext` is forced (then it must be usable, else
    BackendUnavailable says why), or, unforced, when the extension is already built and
    loaded for that device. Forcing `torch` or `triton` keeps the Python loss graph."""
    dev = torch.device(device)
    name = dispatch.forced()
    if name is not None and name != "ext":
        return False
    # the ext backend's device hook says whether its library for this device is loaded
    reason = dispatch.unavailable_reason("ext", "fused_step", dev)
    if name == "ext" and reason is not None:
        raise BackendUnavailable(f"backend 'ext' was forced but cannot run fused_step: {reason}")
    return reason is None
