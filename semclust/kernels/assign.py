"""Triton `assign`: P = softmax(x c^T / tau), labels, conf, colsum, optional P.

Forward, one program per block of BM rows (`_assign_fwd_kernel`):
  sweep 1 over K in tiles of BK: S = x c^T * log2(e)/tau on tensor cores (tl.dot, fp32
          accumulation), online softmax in base 2: running max m, running denominator l,
          running argmax (a later tile wins only with a strictly larger max, and
          tl.argmax breaks ties to the left, so ties go to the lowest index);
  sweep 2 recomputes each S tile, P = exp2(S - lse) with lse = m + log2(l), writes P when
          asked and the block's column sums into its own row of a [programs, K] buffer.
  When K fits one tile (SINGLE) the tile is scored once and both sweeps collapse.
colsum is the torch sum of that buffer over programs: deterministic, no float atomics.
conf = max_k P = 1/l. Memory: O(chunk_size / BM * K) besides the optional P.

The max subtraction keeps tau = 0.005 safe in fp16: logits (~200) live only in the fp32
accumulator, never in the input dtype.

Backward (`_assign_bwd_kernel`, per row chunk): with g_ik = dP_ik + dcolsum_k +
dconf_i [k == label_i] the softmax backward is dS = P * (g - sum_k g_ik P_ik). The kernel
recomputes P tile by tile from the saved lse (flash-attention style, no stored P),
computes the row dots in one sweep and writes dS / tau for the chunk in a second; the two
GEMMs dX = dS c / tau and dC = dS^T x / tau run as torch fp32 matmuls on that
[chunk, K] block. float64 inputs run the reference (see `_common.use_reference`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from semclust.ops import reference
from semclust.ops.dispatch import register
from semclust.ops.reference import AssignResult

from . import _common as C


@triton.jit
def _tile_scores(x_ptr, c_ptr, rows, cols, N, K, D, sxm, sxd, sck, scd,
                 BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """[BM, BK] tile of x c^T, fp32 accumulation over D in steps of BD."""
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    rmask = rows < N
    cmask = cols < K
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        a = tl.load(x_ptr + rows[:, None] * sxm + d[None, :] * sxd, mask=rmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(c_ptr + cols[None, :] * sck + d[:, None] * scd, mask=cmask[None, :] & dmask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _emit_probs(p, rows, cols, N, K, pid, partial_ptr, p_ptr, spm, spk, STORE_P: tl.constexpr):
    rmask = rows < N
    cmask = cols < K
    p = tl.where(rmask[:, None], p, 0.0)
    tl.store(partial_ptr + pid * K + cols, tl.sum(p, axis=0), mask=cmask)
    if STORE_P:
        tl.store(p_ptr + rows[:, None] * spm + cols[None, :] * spk, p, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _assign_fwd_kernel(x_ptr, c_ptr, labels_ptr, conf_ptr, lse_ptr, partial_ptr, p_ptr,
                       N, K, D, sxm, sxd, sck, scd, spm, spk, scale,
                       STORE_P: tl.constexpr, SINGLE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                       BD: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < N
    if SINGLE:
        cols = tl.arange(0, BK)
        s = _tile_scores(x_ptr, c_ptr, rows, cols, N, K, D, sxm, sxd, sck, scd, BM, BK, BD, PRECISION) * scale
        s = tl.where((cols < K)[None, :], s, -float("inf"))
        m = tl.max(s, axis=1)
        lab = tl.argmax(s, axis=1, tie_break_left=True)
        e = tl.exp2(s - m[:, None])
        l = tl.sum(e, axis=1)
        _emit_probs(e / l[:, None], rows, cols, N, K, pid, partial_ptr, p_ptr, spm, spk, STORE_P)
    else:
        m = tl.full([BM], -float("inf"), dtype=tl.float32)
        l = tl.zeros([BM], dtype=tl.float32)
        lab = tl.zeros([BM], dtype=tl.int32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            s = _tile_scores(x_ptr, c_ptr, rows, cols, N, K, D, sxm, sxd, sck, scd, BM, BK, BD, PRECISION) * scale
            s = tl.where((cols < K)[None, :], s, -float("inf"))
            tmax = tl.max(s, axis=1)
            targ = tl.argmax(s, axis=1, tie_break_left=True) + k0
            # strict: an equal maximum in a later tile keeps the earlier (lower) index
            lab = tl.where(tmax > m, targ, lab)
            m_new = tl.maximum(m, tmax)
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log2(l)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            s = _tile_scores(x_ptr, c_ptr, rows, cols, N, K, D, sxm, sxd, sck, scd, BM, BK, BD, PRECISION) * scale
            p = tl.where((cols < K)[None, :], tl.exp2(s - lse[:, None]), 0.0)
            _emit_probs(p, rows, cols, N, K, pid, partial_ptr, p_ptr, spm, spk, STORE_P)
    tl.store(labels_ptr + rows, lab.to(tl.int64), mask=rmask)
    tl.store(conf_ptr + rows, 1.0 / l, mask=rmask)
    tl.store(lse_ptr + rows, m + tl.log2(l), mask=rmask)


@triton.jit
def _upstream(dp_ptr, dcol_ptr, rows, cols, lab, dconf, N, K, sdm, sdk,
              HAS_DP: tl.constexpr, HAS_DCOL: tl.constexpr, HAS_DCONF: tl.constexpr,
              BM: tl.constexpr, BK: tl.constexpr):
    """g_ik = dP_ik + dcolsum_k + dconf_i [k == label_i] on one tile."""
    rmask = rows < N
    cmask = cols < K
    g = tl.zeros([BM, BK], dtype=tl.float32)
    if HAS_DP:
        g += tl.load(dp_ptr + rows[:, None] * sdm + cols[None, :] * sdk,
                     mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if HAS_DCOL:
        g += tl.load(dcol_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_DCONF:
        g += tl.where(cols[None, :] == lab[:, None], dconf[:, None], 0.0)
    return g


@triton.jit
def _assign_bwd_kernel(x_ptr, c_ptr, lse_ptr, labels_ptr, dconf_ptr, dcol_ptr, dp_ptr, ds_ptr,
                       N, K, D, sxm, sxd, sck, scd, sdm, sdk, scale, inv_tau,
                       HAS_DP: tl.constexpr, HAS_DCOL: tl.constexpr, HAS_DCONF: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < N
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    lab = tl.load(labels_ptr + rows, mask=rmask, other=-1)
    dconf = tl.zeros([BM], dtype=tl.float32)
    if HAS_DCONF:
        dconf = tl.load(dconf_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    rowdot = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        s = _tile_scores(x_ptr, c_ptr, rows, cols, N, K, D, sxm, sxd, sck, scd, BM, BK, BD, PRECISION) * scale
        p = tl.where((cols < K)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        g = _upstream(dp_ptr, dcol_ptr, rows, cols, lab, dconf, N, K, sdm, sdk, HAS_DP, HAS_DCOL, HAS_DCONF, BM, BK)
        rowdot += tl.sum(g * p, axis=1)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        s = _tile_scores(x_ptr, c_ptr, rows, cols, N, K, D, sxm, sxd, sck, scd, BM, BK, BD, PRECISION) * scale
        p = tl.where((cols < K)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        g = _upstream(dp_ptr, dcol_ptr, rows, cols, lab, dconf, N, K, sdm, sdk, HAS_DP, HAS_DCOL, HAS_DCONF, BM, BK)
        ds = p * (g - rowdot[:, None]) * inv_tau
        tl.store(ds_ptr + rows[:, None] * K + cols[None, :], ds, mask=rmask[:, None] & (cols < K)[None, :])


_FWD_SPACE = [dict(BM=bm, BK=bk, BD=64) for bm in (64, 128) for bk in (64, 128)]
_fwd_tuned = triton.autotune(C.configs(_FWD_SPACE), key=["K", "D", "STORE_P"])(
    triton.heuristics({"SINGLE": lambda a: a["K"] <= a["BK"]})(_assign_fwd_kernel))
_bwd_tuned = triton.autotune(C.configs(_FWD_SPACE), key=["K", "D", "HAS_DP", "HAS_DCOL", "HAS_DCONF"])(
    _assign_bwd_kernel)
_MIN_BM = min(s["BM"] for s in _FWD_SPACE)


def _interp_meta(D: int) -> dict:
    # small blocks under the interpreter so that modest test shapes reach every branch
    return dict(BM=16, BK=16, BD=C.pow2(D, hi=32))


def _forward(x, c, tau, return_probs, chunk_size):
    N, D = x.shape
    K = c.shape[0]
    dev = x.device
    labels = torch.empty(N, dtype=torch.int64, device=dev)
    conf = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    colsum = torch.zeros(K, dtype=torch.float32, device=dev)
    probs = torch.empty(N, K, dtype=torch.float32, device=dev) if return_probs else None
    scale = C.LOG2E / tau
    meta = _interp_meta(D)
    meta["SINGLE"] = K <= meta["BK"]
    min_bm = meta["BM"] if C.interpreting() else _MIN_BM
    for s in range(0, N, chunk_size):
        xs = x[s : s + chunk_size]
        n = xs.shape[0]
        partial = torch.zeros(C.cdiv(n, min_bm), K, dtype=torch.float32, device=dev)
        ps = probs[s : s + n] if return_probs else partial  # a dummy pointer when P is not stored
        C.launch(
            _assign_fwd_kernel, _fwd_tuned, lambda m: (triton.cdiv(n, m["BM"]),),
            (xs, c, labels[s:], conf[s:], lse[s:], partial, ps, n, K, D,
             xs.stride(0), xs.stride(1), c.stride(0), c.stride(1), ps.stride(0), ps.stride(1), scale),
            dict(STORE_P=return_probs, PRECISION=C.dot_precision(x.dtype)), meta)
        colsum += partial.sum(0)
    return labels, conf, colsum, probs, lse


def _backward(x, c, tau, lse, labels, dconf, dcolsum, dprobs, chunk_size, need_dx, need_dc):
    N, D = x.shape
    K = c.shape[0]
    dev = x.device
    dx = torch.empty(N, D, dtype=torch.float32, device=dev) if need_dx else None
    dc = torch.zeros(K, D, dtype=torch.float32, device=dev) if need_dc else None
    c32 = c.float()
    dummy = lse
    meta = _interp_meta(D)
    for s in range(0, N, chunk_size):
        xs = x[s : s + chunk_size]
        n = xs.shape[0]
        ds = torch.empty(n, K, dtype=torch.float32, device=dev)
        dps = dprobs[s : s + n] if dprobs is not None else ds
        C.launch(
            _assign_bwd_kernel, _bwd_tuned, lambda m: (triton.cdiv(n, m["BM"]),),
            (xs, c, lse[s:], labels[s:], dconf[s:] if dconf is not None else dummy,
             dcolsum if dcolsum is not None else dummy, dps, ds, n, K, D,
             xs.stride(0), xs.stride(1), c.stride(0), c.stride(1), dps.stride(0), dps.stride(1),
             C.LOG2E / tau, 1.0 / tau),
            dict(HAS_DP=dprobs is not None, HAS_DCOL=dcolsum is not None, HAS_DCONF=dconf is not None,
                 PRECISION=C.dot_precision(x.dtype)), meta)
        # the two GEMMs of the backward, in fp32, on the [chunk, K] block of dS / tau
        if need_dx:
            dx[s : s + n] = ds @ c32
        if need_dc:
            dc += ds.T @ xs.float()
    return dx, dc


class AssignFunction(torch.autograd.Function):
    """labels, conf, colsum, probs = f(x, c); differentiable in x and c."""

    @staticmethod
    def forward(ctx, x, c, tau, return_probs, chunk_size):
        labels, conf, colsum, probs, lse = _forward(x, c, tau, return_probs, chunk_size)
        ctx.mark_non_differentiable(labels)
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(x, c, lse, labels)
        ctx.tau, ctx.chunk_size = tau, chunk_size
        return labels, conf, colsum, probs

    @staticmethod
    def backward(ctx, _dlabels, dconf, dcolsum, dprobs):
        x, c, lse, labels = ctx.saved_tensors
        need_dx, need_dc = ctx.needs_input_grad[:2]
        if dconf is None and dcolsum is None and dprobs is None:
            return None, None, None, None, None
        dx, dc = _backward(x, c, ctx.tau, lse, labels, dconf, dcolsum, dprobs, ctx.chunk_size, need_dx, need_dc)
        return (dx.to(x.dtype) if need_dx else None), (dc.to(c.dtype) if need_dc else None), None, None, None


@register("triton", "assign")
def assign(x, c, tau, return_probs=False, chunk_size=65536):
    if C.use_reference(x, c):
        return reference.assign(x, c, tau, return_probs=return_probs, chunk_size=chunk_size)
    xk, ck = C.common_dtype(x, c)
    labels, conf, colsum, probs = AssignFunction.apply(xk, ck, float(tau), bool(return_probs), int(chunk_size))
    return AssignResult(labels, conf, colsum, probs if return_probs else None)
