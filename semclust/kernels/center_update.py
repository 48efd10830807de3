"""Triton `center_update`: per-cluster sums (hard labels or soft P), counts, then centres.

Sums and counts are the kernels; the O(K D) epilogue (normalise or divide by counts, EMA
with `previous`, an empty cluster keeping its previous centre) is torch, written as the
reference writes it, so the semantics are identical by construction.

Hard labels, two modes, both sort-free:
  * fast (default): `_segment_sum_atomic_kernel`, one program per [BN rows, BD dims]
    block, scatters x rows into an fp32 [K, D] buffer with tl.atomic_add (counts: int32
    atomics, exact). O(N D) work, but the float sums depend on the atomics' order.
  * deterministic (when `torch.are_deterministic_algorithms_enabled()`, or
    `deterministic=True` on `cluster_sums`): `_weighted_sum_kernel` with one-hot weights.
    Program (k tile, d tile, row split) accumulates onehot(labels)^T x over its rows with
    tl.dot into registers, writes its own [BK, BD] slice of a [splits, K, D] buffer, and
    torch sums the splits: a fixed reduction order, no float atomics. O(N K D) flops on
    tensor cores (a one-hot GEMM) instead of O(N D): the price of determinism.
Soft (P^T x): the same `_weighted_sum_kernel` with the P tile as weights (tl.dot, fp32
accumulation), counts_k = sum_i P_ik in the same sweep. Deterministic.

Gradients (sums/counts are differentiable as in the reference): dx = W dsums, dP =
x dsums^T + dcounts, as torch matmuls (`CenterUpdateFunction`). float64 runs the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from semclust.ops import reference
from semclust.ops.dispatch import register

from . import _common as C


@triton.jit
def _segment_sum_atomic_kernel(x_ptr, lab_ptr, sums_ptr, counts_ptr, N, D, sxm, sxd,
                               BN: tl.constexpr, BD: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    rmask = rows < N
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    lab = tl.load(lab_ptr + rows, mask=rmask, other=0)
    xv = tl.load(x_ptr + rows[:, None] * sxm + d[None, :] * sxd, mask=rmask[:, None] & dmask[None, :], other=0.0)
    tl.atomic_add(sums_ptr + lab[:, None] * D + d[None, :], xv.to(tl.float32), mask=rmask[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.atomic_add(counts_ptr + lab, tl.full([BN], 1, tl.int32), mask=rmask)


@triton.jit
def _weighted_sum_kernel(x_ptr, w_ptr, sums_ptr, counts_ptr, N, K, D, rows_per_split,
                         sxm, sxd, swm, swk,
                         HARD: tl.constexpr, PROMOTE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         BD: tl.constexpr, PRECISION: tl.constexpr):
    """sums[split, k, d] = sum_{i in split} w_ik x_id, counts[split, k] = sum_i w_ik.

    w = onehot(labels) (HARD: w_ptr holds int64 labels) or P (w_ptr holds [N, K] probs).
    """
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    ks = pid_k * BK + tl.arange(0, BK)
    kmask = ks < K
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    acc = tl.zeros([BK, BD], dtype=tl.float32)
    cnt = tl.zeros([BK], dtype=tl.float32)
    start = pid_s.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    for n0 in range(start, end, BN):
        rows = n0 + tl.arange(0, BN)
        rmask = rows < end
        if HARD:
            lab = tl.load(w_ptr + rows, mask=rmask, other=-1)
            w = (lab[None, :] == ks[:, None]).to(tl.float32)  # [BK, BN]
        else:
            w = tl.load(w_ptr + rows[None, :] * swm + ks[:, None] * swk,
                        mask=kmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + rows[:, None] * sxm + d[None, :] * sxd, mask=rmask[:, None] & dmask[None, :], other=0.0)
        if PROMOTE:
            acc = tl.dot(w, xv.to(tl.float32), acc, input_precision=PRECISION)
        else:
            # one-hot weights are exact in any dtype; P in the inputs' dtype when they match
            acc = tl.dot(w.to(xv.dtype), xv, acc, input_precision=PRECISION)
        cnt += tl.sum(w, axis=1)
    tl.store(sums_ptr + (pid_s * K + ks)[:, None] * D + d[None, :], acc, mask=kmask[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.store(counts_ptr + pid_s * K + ks, cnt, mask=kmask)


_ATOMIC_SPACE = [dict(BN=bn, BD=bd) for bn in (32, 64) for bd in (64, 128)]
_atomic_tuned = triton.autotune(C.configs(_ATOMIC_SPACE, warps=(4,)), key=["D"],
                                reset_to_zero=["sums_ptr", "counts_ptr"])(_segment_sum_atomic_kernel)
_WSUM_SPACE = [dict(BN=bn, BK=bk, BD=64) for bn in (32, 64) for bk in (64, 128)]
_wsum_tuned = triton.autotune(C.configs(_WSUM_SPACE), key=["K", "D", "HARD", "PROMOTE"])(_weighted_sum_kernel)


def _splits(device: torch.device, n: int, k_tiles: int, d_tiles: int, bn: int) -> int:
    """Row splits so that k tiles x d tiles x splits programs fill the device."""
    want = C.cdiv(C.num_programs_target(device), k_tiles * d_tiles)
    return max(1, min(want, C.cdiv(n, bn)))


def cluster_sums(x: torch.Tensor, k: int, labels: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None,
                 deterministic: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [K, D] fp32, counts [K] fp32) by the kernels; no autograd here."""
    N, D = x.shape
    dev = x.device
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if labels is not None and not deterministic:
        sums = torch.zeros(k, D, dtype=torch.float32, device=dev)
        counts = torch.zeros(k, dtype=torch.int32, device=dev)
        C.launch(_segment_sum_atomic_kernel, _atomic_tuned,
                 lambda m: (triton.cdiv(N, m["BN"]), triton.cdiv(D, m["BD"])),
                 (x, labels, sums, counts, N, D, x.stride(0), x.stride(1)), {},
                 dict(BN=16, BD=C.pow2(D, hi=32)))
        return sums, counts.to(torch.float32)
    hard = labels is not None
    w = labels if hard else probs
    promote = (not hard) and probs.dtype != x.dtype
    interp = C.interpreting()
    bn, bk, bd = (16, 16, C.pow2(D, hi=32)) if interp else (64, 64, 64)
    splits = _splits(dev, N, C.cdiv(k, bk), C.cdiv(D, bd), bn)
    rows_per_split = C.cdiv(C.cdiv(N, splits), bn) * bn
    splits = C.cdiv(N, rows_per_split)
    sums = torch.empty(splits, k, D, dtype=torch.float32, device=dev)
    counts = torch.empty(splits, k, dtype=torch.float32, device=dev)
    sw = (0, 0) if hard else (probs.stride(0), probs.stride(1))
    C.launch(_weighted_sum_kernel, _wsum_tuned,
             lambda m: (triton.cdiv(k, m["BK"]), triton.cdiv(D, m["BD"]), splits),
             (x, w, sums, counts, N, k, D, rows_per_split, x.stride(0), x.stride(1)) + sw,
             dict(HARD=hard, PROMOTE=promote, PRECISION=C.dot_precision(torch.float32 if promote else x.dtype)),
             dict(BN=bn, BK=bk, BD=bd))
    # the split partials, summed in a fixed order
    return sums.sum(0), counts.sum(0)


class CenterUpdateFunction(torch.autograd.Function):
    """sums = W^T x, counts = W^T 1 with W = onehot(labels) or probs."""

    @staticmethod
    def forward(ctx, x, probs, labels, k):
        sums, counts = cluster_sums(x, k, labels=labels, probs=probs)
        ctx.save_for_backward(x, probs, labels)
        if labels is not None:
            ctx.mark_non_differentiable(counts)  # bincount in the reference: no gradient
        ctx.set_materialize_grads(False)
        return sums, counts

    @staticmethod
    def backward(ctx, dsums, dcounts):
        x, probs, labels = ctx.saved_tensors
        need_x, need_p = ctx.needs_input_grad[:2]
        dx = dp = None
        if dsums is not None and need_x:
            dx = (dsums[labels] if labels is not None else probs.float() @ dsums).to(x.dtype)
        if need_p:
            dp = torch.zeros(probs.shape, dtype=torch.float32, device=probs.device)
            if dsums is not None:
                dp += x.float() @ dsums.T
            if dcounts is not None:
                dp += dcounts[None, :]
            dp = dp.to(probs.dtype)
        return dx, dp, None, None


@register("triton", "center_update")
def center_update(x, k, labels=None, probs=None, normalize=True, previous=None, momentum=0.0):
    if C.use_reference(x, probs, previous):
        return reference.center_update(x, k, labels=labels, probs=probs, normalize=normalize,
                                       previous=previous, momentum=momentum)
    xk = C.kernel_dtype(x)
    pk = C.kernel_dtype(probs) if probs is not None else None
    sums, counts = CenterUpdateFunction.apply(xk, pk, labels, int(k))
    # epilogue: the reference's own formulas on [K, D]
    centers = torch.nn.functional.normalize(sums, dim=1) if normalize else sums / counts.clamp_min(1e-12)[:, None]
    if previous is not None:
        prev = previous.to(torch.float32)
        empty = counts <= 0
        # an empty cluster keeps its previous centre instead of collapsing to zero
        centers = torch.where(empty[:, None], prev, momentum * prev + (1.0 - momentum) * centers)
        if normalize:
            centers = torch.nn.functional.normalize(centers, dim=1)
    return centers.to(x.dtype), counts
