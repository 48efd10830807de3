"""Triton `retrieve`: v_i = sum_w softmax_w(x_i . bank_w / tau) bank_w, optionally L2-normalised.

Flash-attention with keys = values = bank (one head, head dim D):

Forward (`_retrieve_fwd_kernel`), one program per block of BM queries held in registers
(the whole row, D padded to a power of two): loop over the bank in tiles of BW rows,
S = q b^T * log2(e)/tau (fp32 accumulation), online softmax (running max, running
denominator, rescaled accumulator acc += P b with P cast to the bank's dtype as
flash-attention does), then v = acc / l and, when asked, v / max(|v|, 1e-12) in the same
program. The N x W matrix is never formed; extra memory is O(N) (the log-sum-exp) plus,
when a gradient is needed, the unnormalised v in fp32 [N, D].

Backward (recompute, no stored P), the flash-attention-2 split into two deterministic
kernels: dv = d(normalise)/dv . dout and Delta_i = dv_i . v_i are O(N D) torch
elementwise work; then `_retrieve_bwd_dx_kernel` (per query block, loop over bank tiles)
accumulates dx = sum_w dS_iw b_w / tau, and `_retrieve_bwd_dbank_kernel` (per bank tile,
loop over query blocks) accumulates dbank = P^T dv + dS^T x / tau, where
dS = P * (dv b^T - Delta). No atomics, so gradients are bitwise reproducible.

Width limit: whole rows ([BM, pow2(D)] and [BW, pow2(D)]) are staged for the dots, so
the autotuner only tries configs whose estimated shared memory fits the device
(`_prune`); where not even BM = BW = 16 fits (fp32 with D > 512 on most GPUs; D = 768
pads to 1024), the op runs the reference instead. fp16/bf16 rows of D <= 1024 fit.
float64 runs the reference too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from semclust.ops import reference
from semclust.ops.dispatch import register

from . import _common as C

_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default, as in the reference


@triton.jit
def _load_rows(ptr, rows, N, D, sm, sd, BD: tl.constexpr):
    d = tl.arange(0, BD)
    return tl.load(ptr + rows[:, None] * sm + d[None, :] * sd, mask=(rows < N)[:, None] & (d < D)[None, :], other=0.0)


@triton.jit
def _retrieve_fwd_kernel(x_ptr, b_ptr, out_ptr, v_ptr, lse_ptr, N, W, D,
                         sxm, sxd, sbw, sbd, som, sod, scale, eps,
                         NORMALIZE: tl.constexpr, STORE_V: tl.constexpr,
                         BM: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < N
    q = _load_rows(x_ptr, rows, N, D, sxm, sxd, BD)
    m = tl.full([BM], -float("inf"), dtype=tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for w0 in range(0, W, BW):
        cols = w0 + tl.arange(0, BW)
        b = _load_rows(b_ptr, cols, W, D, sbw, sbd, BD)
        s = tl.dot(q, tl.trans(b), input_precision=PRECISION) * scale
        s = tl.where((cols < W)[None, :], s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(b.dtype), b, input_precision=PRECISION)
        m = m_new
    v = acc / l[:, None]
    d = tl.arange(0, BD)
    omask = rmask[:, None] & (d < D)[None, :]
    if STORE_V:
        tl.store(v_ptr + rows[:, None] * BD + d[None, :], v, mask=omask)
        tl.store(lse_ptr + rows, m + tl.log2(l), mask=rmask)
    if NORMALIZE:
        v = v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=1)), eps)[:, None]
    tl.store(out_ptr + rows[:, None] * som + d[None, :] * sod, v.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _retrieve_bwd_dx_kernel(x_ptr, b_ptr, dv_ptr, lse_ptr, delta_ptr, dx_ptr, N, W, D,
                            sxm, sxd, sbw, sbd, scale, inv_tau,
                            BM: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < N
    q = _load_rows(x_ptr, rows, N, D, sxm, sxd, BD)
    dv = _load_rows(dv_ptr, rows, N, D, BD, 1, BD)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=rmask, other=0.0)
    dx = tl.zeros([BM, BD], dtype=tl.float32)
    for w0 in range(0, W, BW):
        cols = w0 + tl.arange(0, BW)
        b = _load_rows(b_ptr, cols, W, D, sbw, sbd, BD)
        s = tl.dot(q, tl.trans(b), input_precision=PRECISION) * scale
        p = tl.where((cols < W)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(dv, tl.trans(b), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dx = tl.dot(ds.to(b.dtype), b, dx, input_precision=PRECISION)
    d = tl.arange(0, BD)
    tl.store(dx_ptr + rows[:, None] * BD + d[None, :], dx * inv_tau, mask=rmask[:, None] & (d < D)[None, :])


@triton.jit
def _retrieve_bwd_dbank_kernel(x_ptr, b_ptr, dv_ptr, lse_ptr, delta_ptr, db_ptr, N, W, D,
                               sxm, sxd, sbw, sbd, scale, inv_tau,
                               BM: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BW + tl.arange(0, BW)
    b = _load_rows(b_ptr, cols, W, D, sbw, sbd, BD)
    db_val = tl.zeros([BW, BD], dtype=tl.float32)
    db_key = tl.zeros([BW, BD], dtype=tl.float32)
    for r0 in range(0, N, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < N
        q = _load_rows(x_ptr, rows, N, D, sxm, sxd, BD)
        dv = _load_rows(dv_ptr, rows, N, D, BD, 1, BD)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=rmask, other=0.0)
        s = tl.dot(q, tl.trans(b), input_precision=PRECISION) * scale
        p = tl.where(rmask[:, None] & (cols < W)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(dv, tl.trans(b), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        db_val = tl.dot(tl.trans(p.to(dv.dtype)), dv, db_val, input_precision=PRECISION)
        db_key = tl.dot(tl.trans(ds.to(q.dtype)), q, db_key, input_precision=PRECISION)
    d = tl.arange(0, BD)
    tl.store(db_ptr + cols[:, None] * BD + d[None, :], db_val + db_key * inv_tau,
             mask=(cols < W)[:, None] & (d < D)[None, :])


# Whole rows ([BM or BW, pow2(D)]) are staged in shared memory for the dots, so the block
# sizes are bounded by D: BM = BW = 16 is there for wide fp32 rows.
_CONFIGS = [triton.Config(dict(BM=bm, BW=bw), num_warps=w, num_stages=st)
            for bm, bw, w, st in ((16, 16, 4, 1), (16, 32, 4, 2), (32, 32, 4, 2), (32, 64, 4, 3), (64, 64, 8, 3))]
# Shared memory of a config ~ (2 BM + BW) x BD elements x a factor that grows with the
# pipeline stages; the factors bound what sm_90 builds of the three kernels use (fp32
# operands also hold their tf32 splits). An estimate for pruning, not a guarantee: a
# config that still does not fit is skipped by the autotuner (OutOfResources).
_SMEM_BASE = {4: 1.7, 2: 1.2}
_SMEM_FALLBACK = 99 * 1024


def _smem_limit(device: torch.device) -> int:
    try:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - any driver trouble: assume a small (sm_86-like) limit
        return _SMEM_FALLBACK


def _smem(cfg: triton.Config, bd: int, elsize: int) -> float:
    rows = 2 * cfg.kwargs["BM"] + cfg.kwargs["BW"]
    return rows * bd * elsize * _SMEM_BASE[elsize] * (1 + 0.5 * (cfg.num_stages - 1))


def _prune(configs, named_args, **kwargs):
    x = named_args["x_ptr"]
    limit = _smem_limit(x.device)
    fits = [c for c in configs if _smem(c, kwargs["BD"], x.element_size()) <= limit]
    return fits or configs[:1]


def _fits(x: torch.Tensor) -> bool:
    """Whether the smallest config fits the device's shared memory (else: the reference)."""
    if C.interpreting() or x.device.type != "cuda":
        return True
    return _smem(_CONFIGS[0], C.pow2(x.shape[1]), x.element_size()) <= _smem_limit(x.device)


_PRUNE = dict(early_config_prune=_prune)
_fwd_tuned = triton.autotune(_CONFIGS, key=["W", "D", "NORMALIZE", "STORE_V"], prune_configs_by=_PRUNE)(
    _retrieve_fwd_kernel)
_dx_tuned = triton.autotune(_CONFIGS, key=["W", "D"], prune_configs_by=_PRUNE)(_retrieve_bwd_dx_kernel)
_db_tuned = triton.autotune(_CONFIGS, key=["D"], prune_configs_by=_PRUNE)(_retrieve_bwd_dbank_kernel)
_INTERP_META = dict(BM=16, BW=16)


def _forward(x, bank, tau, normalize, chunk_size, need_grad):
    N, D = x.shape
    W = bank.shape[0]
    BD = C.pow2(D)
    dev = x.device
    out = torch.empty(N, D, dtype=x.dtype, device=dev)
    v = torch.empty(N, BD, dtype=torch.float32, device=dev) if need_grad else None
    lse = torch.empty(N, dtype=torch.float32, device=dev) if need_grad else None
    for s in range(0, N, chunk_size):
        xs = x[s : s + chunk_size]
        n = xs.shape[0]
        os_ = out[s : s + n]
        C.launch(
            _retrieve_fwd_kernel, _fwd_tuned, lambda m: (triton.cdiv(n, m["BM"]),),
            (xs, bank, os_, v[s:] if need_grad else os_, lse[s:] if need_grad else os_, n, W, D,
             xs.stride(0), xs.stride(1), bank.stride(0), bank.stride(1), os_.stride(0), os_.stride(1),
             C.LOG2E / tau, _NORM_EPS),
            dict(NORMALIZE=normalize, STORE_V=need_grad, BD=BD, PRECISION=C.dot_precision(x.dtype)),
            _INTERP_META)
    return out, v, lse


def _backward(x, bank, tau, normalize, v, lse, dout, need_dx, need_db):
    N, D = x.shape
    W = bank.shape[0]
    BD = v.shape[1]
    v = v[:, :D]
    dout = dout.float()
    if normalize:
        # gradient of v / max(|v|, eps): the projection off v, divided by the norm
        r = v.norm(dim=1, keepdim=True)
        u = v / r.clamp_min(_NORM_EPS)
        dv = torch.where(r > _NORM_EPS, (dout - u * (u * dout).sum(1, keepdim=True)) / r.clamp_min(_NORM_EPS),
                         dout / _NORM_EPS)
    else:
        dv = dout
    delta = (dv * v).sum(1).contiguous()
    dvk = torch.zeros(N, BD, dtype=x.dtype, device=x.device)
    dvk[:, :D] = dv  # in the inputs' dtype: the dots run at the inputs' precision, as flash-attention's
    common = (x, bank, dvk, lse, delta)
    args = (N, W, D, x.stride(0), x.stride(1), bank.stride(0), bank.stride(1), C.LOG2E / tau, 1.0 / tau)
    const = dict(BD=BD, PRECISION=C.dot_precision(x.dtype))
    dx = db = None
    if need_dx:
        dx = torch.empty(N, BD, dtype=torch.float32, device=x.device)
        C.launch(_retrieve_bwd_dx_kernel, _dx_tuned, lambda m: (triton.cdiv(N, m["BM"]),),
                 common + (dx,) + args, const, _INTERP_META)
        dx = dx[:, :D]
    if need_db:
        db = torch.empty(W, BD, dtype=torch.float32, device=x.device)
        C.launch(_retrieve_bwd_dbank_kernel, _db_tuned, lambda m: (triton.cdiv(W, m["BW"]),),
                 common + (db,) + args, const, _INTERP_META)
        db = db[:, :D]
    return dx, db


class RetrieveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bank, tau, normalize, chunk_size):
        need_grad = any(ctx.needs_input_grad[:2])
        out, v, lse = _forward(x, bank, tau, normalize, chunk_size, need_grad)
        if need_grad:
            ctx.save_for_backward(x, bank, v, lse)
        ctx.tau, ctx.normalize = tau, normalize
        return out

    @staticmethod
    def backward(ctx, dout):
        x, bank, v, lse = ctx.saved_tensors
        need_dx, need_db = ctx.needs_input_grad[:2]
        dx, db = _backward(x, bank, ctx.tau, ctx.normalize, v, lse, dout, need_dx, need_db)
        return (dx.to(x.dtype) if need_dx else None), (db.to(bank.dtype) if need_db else None), None, None, None


@register("triton", "retrieve")
def retrieve(x, bank, tau, normalize=True, chunk_size=4096):
    if C.use_reference(x, bank) or not _fits(C.kernel_dtype(x)):
        return reference.retrieve(x, bank, tau, normalize=normalize, chunk_size=chunk_size)
    xk, bk = C.common_dtype(x, bank)
    return RetrieveFunction.apply(xk, bk, float(tau), bool(normalize), int(chunk_size)).to(x.dtype)
