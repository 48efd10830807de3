"""The `ext` backend's Python face, one op at a time: its fake (meta) kernel for
torch.compile, its `torch.autograd.Function` and the implementation registered with the
dispatcher. Most kernels are forward-only; a backward recomputes the reference
(`RecomputeFunction`), applies gradients the kernel saved (`FusedStepFunction`) or, for
`batchnorm_relu`, calls its own backward kernel (`BatchNormReluFunction`).

On non-CPU tensors `assign`, `knn`, `center_update` and `batchnorm_relu` run the reference when ext was
chosen automatically and raise BackendUnavailable when it was forced.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from semclust.ops import dispatch, reference
from semclust.ops.dispatch import BackendUnavailable, register
from semclust.ops.reference import AssignResult, StepResult

from .library import NAMESPACE, REGISTERED_OPS, device_reason


def _needs_grad(*ts: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _cpu_only(op: str, device: torch.device) -> None:
    raise BackendUnavailable(
        f"backend 'ext' was forced but implements {op} on CPU tensors only (got {device.type}); "
        "use the triton or torch backend for GPU tensors"
    )


def _dt(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


class RecomputeFunction(torch.autograd.Function):
    """Extension forward for a differentiable op; the backward re-runs the reference
    under autograd (exact gradients of the same function, at the reference's speed).
    `fn(*tensors)` is the extension call, `ref(*tensors)` the reference; both return a
    tuple whose non-float entries are not differentiable (entries the reference returns
    as None get no gradient)."""

    @staticmethod
    def forward(ctx, fn, ref, *tensors):
        out = fn(*tensors)
        ctx.ref = ref
        ctx.save_for_backward(*[t if isinstance(t, Tensor) else None for t in tensors])
        ctx.mark_non_differentiable(*[o for o in out if isinstance(o, Tensor) and not o.is_floating_point()])
        return out

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) if t is not None and t.is_floating_point() else t
                      for t, need in zip(saved, ctx.needs_input_grad[2:])]
            outs = ctx.ref(*inputs)
            pairs = [(o, g) for o, g in zip(outs, grads)
                     if g is not None and isinstance(o, Tensor) and o.requires_grad]
            wanted = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
            got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                       if pairs and wanted else ())
        return (None, None, *[next(got, None) if isinstance(t, Tensor) and t.requires_grad else None for t in inputs])


# ---- assign ----------------------------------------------------------------------------

def _assign_fake(x, c, tau, return_probs):
    n, k, dt = x.shape[0], c.shape[0], _dt(x, c)
    return (x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=dt), x.new_empty(k, dtype=dt),
            x.new_empty((n if return_probs else 0, k), dtype=dt))


def assign(x: Tensor, c: Tensor, tau: float, return_probs: bool = False, chunk_size: int = 65536) -> AssignResult:
    if x.device.type != "cpu":
        if dispatch.forced() == "ext":
            _cpu_only("assign", x.device)
        return reference.assign(x, c, tau, return_probs=return_probs, chunk_size=chunk_size)
    tau, return_probs = float(tau), bool(return_probs)

    def fn(x_: Tensor, c_: Tensor) -> tuple[Tensor, ...]:
        return torch.ops.semclust_ext.assign(x_, c_, tau, return_probs)

    def ref(x_: Tensor, c_: Tensor) -> tuple[Any, ...]:
        return tuple(reference.assign(x_, c_, tau, return_probs=return_probs, chunk_size=chunk_size))

    labels, conf, colsum, probs = RecomputeFunction.apply(fn, ref, x, c) if _needs_grad(x, c) else fn(x, c)
    return AssignResult(labels, conf, colsum, probs if return_probs else None)


# ---- knn -------------------------------------------------------------------------------

def _knn_fake(x, queries, k, exclude_self):
    q = x if queries is None else queries
    return q.new_empty((q.shape[0], k)), q.new_empty((q.shape[0], k), dtype=torch.int64)


class KnnFunction(torch.autograd.Function):
    """Extension forward; scores_ij = <q_i, x_idx_ij> is differentiated directly."""

    @staticmethod
    def forward(ctx, x, queries, k, exclude_self):
        scores, idx = torch.ops.semclust_ext.knn(x, queries, k, exclude_self)
        ctx.save_for_backward(x, queries, idx)
        ctx.mark_non_differentiable(idx)
        return scores, idx

    @staticmethod
    def backward(ctx, g_scores, _g_idx):
        x, queries, idx = ctx.saved_tensors
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            qs = xs if queries is None else queries.detach().requires_grad_(True)
            dt = reference._compute_dtype(xs, qs)
            scores = (qs.to(dt)[:, None, :] * xs.to(dt)[idx]).sum(-1).to(qs.dtype)
            inputs = [xs] if queries is None else [xs, qs]
            grads = torch.autograd.grad(scores, inputs, g_scores)
        gx = grads[0] if ctx.needs_input_grad[0] else None
        gq = grads[1] if queries is not None and ctx.needs_input_grad[1] else None
        return gx, gq, None, None


def knn(x: Tensor, k: int, queries: Optional[Tensor] = None, exclude_self: bool = True,
        query_chunk: int = 4096, database_chunk: int = 65536) -> tuple[Tensor, Tensor]:
    if x.device.type != "cpu":
        if dispatch.forced() == "ext":
            _cpu_only("knn", x.device)
        return reference.knn(x, k, queries=queries, exclude_self=exclude_self, query_chunk=query_chunk,
                             database_chunk=database_chunk)
    if _needs_grad(x, queries):
        return KnnFunction.apply(x, queries, int(k), bool(exclude_self))
    return torch.ops.semclust_ext.knn(x, queries, int(k), bool(exclude_self))


# ---- center_update ---------------------------------------------------------------------

def _center_update_fake(x, k, labels, probs, normalize, previous, momentum):
    return x.new_empty((k, x.shape[1])), x.new_empty(k, dtype=_dt(x))


def center_update(x: Tensor, k: int, labels: Optional[Tensor] = None, probs: Optional[Tensor] = None,
                  normalize: bool = True, previous: Optional[Tensor] = None, momentum: float = 0.0) -> tuple[Tensor, Tensor]:
    if x.device.type != "cpu":
        if dispatch.forced() == "ext":
            _cpu_only("center_update", x.device)
        return reference.center_update(x, k, labels=labels, probs=probs, normalize=normalize, previous=previous,
                                       momentum=momentum)
    k, normalize, momentum = int(k), bool(normalize), float(momentum)

    def fn(x_, labels_, probs_, previous_):
        return torch.ops.semclust_ext.center_update(x_, k, labels_, probs_, normalize, previous_, momentum)

    def ref(x_, labels_, probs_, previous_):
        return reference.center_update(x_, k, labels=labels_, probs=probs_, normalize=normalize,
                                       previous=previous_, momentum=momentum)

    if _needs_grad(x, probs, previous):
        return RecomputeFunction.apply(fn, ref, x, labels, probs, previous)
    return fn(x, labels, probs, previous)


# ---- fused_step ------------------------------------------------------------------------

def _fused_step_fake(logits_i, logits_t, u, v, centers, prior, cluster_tau, center_tau,
                     w_instance, w_assignment, w_center, w_balance):
    k = logits_i.shape[1]
    return (logits_i.new_empty(5), torch.empty_like(logits_i), torch.empty_like(logits_t),
            torch.empty_like(logits_i), torch.empty_like(logits_t), logits_i.new_empty(k))


class FusedStepFunction(torch.autograd.Function):
    """Forward: one extension call computing the loss, its parts and both logit
    gradients. Backward: the saved gradients times the incoming scalar gradient.
    u, v, centers and prior are constants (no gradient)."""

    @staticmethod
    def forward(ctx, logits_i, logits_t, u, v, centers, prior, cluster_tau, center_tau, w_instance, w_assignment, w_center, w_balance):
        out, g_i, g_t, probs_i, probs_t, marginal = torch.ops.semclust_ext.fused_step(
            logits_i, logits_t, u, v, centers, prior,
            cluster_tau, center_tau, w_instance, w_assignment, w_center, w_balance,
        )
        ctx.save_for_backward(g_i, g_t)
        loss = out[0]
        ctx.mark_non_differentiable(out, probs_i, probs_t, marginal)
        return loss, out, probs_i, probs_t, marginal

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        g_i, g_t = ctx.saved_tensors
        return g_i * grad_loss, g_t * grad_loss, None, None, None, None, None, None, None, None, None, None


def fused_step(
    logits_i: Tensor, logits_t: Tensor, u: Tensor, v: Tensor,
    centers: Optional[Tensor] = None, prior: Optional[Tensor] = None, *,
    cluster_tau: float, center_tau: float, w_instance: float, w_assignment: float, w_center: float, w_balance: float,
) -> StepResult:
    """The ext implementation of `semclust.ops.fused_step.fused_step` (inputs validated
    there): balance = KL(p_bar || prior) + KL(q_bar || prior), prior [K] or None (uniform)."""
    reason = device_reason(logits_i.device)
    if reason is not None:
        raise BackendUnavailable(f"the ext backend cannot run fused_step: {reason}")
    in_dtype = logits_i.dtype
    dt = torch.float64 if in_dtype == torch.float64 else torch.float32
    li, lt = logits_i.to(dt), logits_t.to(dt)
    # the extension reads every input in the logits' dtype
    cast = lambda t: None if t is None else t.detach().to(dt)  # noqa: E731
    loss, out, probs_i, probs_t, marginal = FusedStepFunction.apply(
        li, lt, cast(u), cast(v), cast(centers), cast(prior),
        float(cluster_tau), float(center_tau), float(w_instance), float(w_assignment), float(w_center), float(w_balance),
    )
    return StepResult(loss, out[1], out[2], out[3], out[4], marginal, probs_i, probs_t)


# ---- batchnorm_relu --------------------------------------------------------------------

def _bn_relu_forward_fake(h, weight, bias, eps):
    dt, c = _dt(h), h.shape[1]
    return h.new_empty(h.shape, dtype=dt), h.new_empty(c, dtype=dt), h.new_empty(c, dtype=dt), h.new_empty(c, dtype=dt)


def _bn_relu_backward_fake(grad_y, h, mean, rstd, weight, bias):
    dt, c = _dt(h), h.shape[1]
    return h.new_empty(h.shape, dtype=dt), h.new_empty(c, dtype=dt), h.new_empty(c, dtype=dt)


class BatchNormReluFunction(torch.autograd.Function):
    """Training-mode forward and backward, each one extension call; the batch's mean and
    biased variance come out for the running statistics."""

    @staticmethod
    def forward(ctx, h, weight, bias, eps):
        y, mean, var, rstd = torch.ops.semclust_ext.batchnorm_relu_forward(h, weight, bias, eps)
        ctx.save_for_backward(h, mean, rstd, weight, bias)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(mean, var)
        return y.to(h.dtype), mean, var

    @staticmethod
    def backward(ctx, grad_y, _g_mean, _g_var):
        h, mean, rstd, weight, bias = ctx.saved_tensors
        dh, dw, db = torch.ops.semclust_ext.batchnorm_relu_backward(grad_y.contiguous(), h, mean, rstd, weight, bias)
        dh_t, dw_t, db_t = ctx.dtypes
        return dh.to(dh_t), dw.to(dw_t), db.to(db_t), None


def batchnorm_relu(h: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor] = None,
                   running_var: Optional[Tensor] = None, training: bool = True, momentum: Optional[float] = 0.1,
                   eps: float = 1e-5, num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """The ext implementation of `semclust.ops.batchnorm_relu` (inputs validated there):
    training mode on CPU tensors; eval mode (the running statistics, one affine map) and
    other devices run the reference, as torch's own kernels do that in one pass."""
    if h.device.type != "cpu":
        if dispatch.forced() == "ext":
            _cpu_only("batchnorm_relu", h.device)
        return reference.batchnorm_relu(h, weight, bias, running_mean, running_var, training, momentum, eps,
                                        num_batches_tracked)
    if not training:
        return reference.batchnorm_relu(h, weight, bias, running_mean, running_var, False, momentum, eps)
    y, mean, var = BatchNormReluFunction.apply(h, weight, bias, float(eps))
    m, b = reference.bn_momentum(momentum, num_batches_tracked), h.shape[0]
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - m).add_(mean.to(running_mean.dtype), alpha=m)
        if running_var is not None:  # unbiased, as nn.BatchNorm1d keeps it
            running_var.mul_(1.0 - m).add_(var.to(running_var.dtype), alpha=m * b / (b - 1))
    return y


# ---- registration ----------------------------------------------------------------------

# dispatcher op -> (its extension operators' fake kernels by operator name, implementation)
_OPS: dict[str, tuple[dict[str, Callable], Callable]] = {
    "fused_step": ({"fused_step": _fused_step_fake}, fused_step),
    "assign": ({"assign": _assign_fake}, assign),
    "knn": ({"knn": _knn_fake}, knn),
    "center_update": ({"center_update": _center_update_fake}, center_update),
    "batchnorm_relu": ({"batchnorm_relu_forward": _bn_relu_forward_fake,
                        "batchnorm_relu_backward": _bn_relu_backward_fake}, batchnorm_relu),
}
_ACTIVE = False


def activate() -> None:
    """Once the CPU library is loaded: register each op's fake kernel and its dispatcher
    implementation, and clear the backend's "not built" note."""
    global _ACTIVE
    if _ACTIVE:
        return
    _ACTIVE = True
    for op in REGISTERED_OPS:
        fakes, impl = _OPS[op]
        for name, fake in fakes.items():
            torch.library.register_fake(f"{NAMESPACE}::{name}")(fake)
        register("ext", op)(impl)
    dispatch.mark_unavailable("ext", None)
