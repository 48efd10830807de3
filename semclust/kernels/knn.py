"""Triton `knn`: exact top-k inner-product neighbours, fused score tiles + running top-k.

What is fused: `_knn_kernel` handles a block of BM queries against one split of the
current database chunk. For each [BM, BN] tile it computes the scores with tl.dot (fp32
accumulation), packs score and database index into one int64 key ordered by
(score, -index) (`_common.score_keys`), masks padding and the query itself
(`exclude_self`) with the smallest key, takes the tile's top-KP ascending with a bitonic
top-k network (KP = next power of two >= k; `_topk_ascending`), and merges it into a
running top-KP kept in registers: max(best, tile_top) is the top-KP of the union as a
bitonic sequence (best descending, tile_top ascending) and one bitonic merge re-sorts it.
The networks are written with max/min over a size-2 axis (`_cas`) rather than with
tl.sort/tl.topk, whose xor reductions the interpreter runs element by element. A tile
is merged only if some row's best key in it beats that row's current KP-th key.

What is torch: each program writes its KP keys into a [query_chunk, splits * KP] int64
buffer, and `torch.topk` over that buffer (plus the running best of earlier database
chunks) keeps the k largest keys; the keys are unique, so this merge is exact and
deterministic and ties resolve to the lower index as in the reference. Splitting the
database across programs (flash-decoding's split-K) keeps the GPU busy when there are few
queries. Memory: O(query_chunk * splits * KP) besides the [Q, k] outputs; the N x N
matrix never exists.

k above `MAX_K` (256) would need a register tile too wide for a program, so those
calls run the reference. float64 runs the reference too. Scores are differentiable
(`KnnFunction`: the gradient of s_ij = q_i . x_idx_ij in torch, per query chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from semclust.ops import reference
from semclust.ops.dispatch import register

from . import _common as C

MAX_K = 256
_INVALID: tl.constexpr = tl.constexpr(C.INT64_MIN)  # key of padding and of the query itself


@triton.jit
def _cas(h, desc, J: tl.constexpr):
    """One compare-and-swap layer of a bitonic network on the columns of h [BM, n].

    Elements J apart within blocks of 2J are ordered; `desc` [1, n] says, per column,
    whether its block runs descending. The pair is viewed as an axis of size 2 and
    resolved with max/min over it (the interpreter vectorises these, unlike the xor
    reduction of tl.sort, and compiled they are the same register shuffles).
    """
    BM: tl.constexpr = h.shape[0]
    n: tl.constexpr = h.shape[1]
    ci = tl.arange(0, n)[None, :]
    h4 = tl.reshape(h, [BM, n // (2 * J), 2, J])
    mx = tl.max(h4, axis=2, keep_dims=True)
    mn = tl.min(h4, axis=2, keep_dims=True)
    take_max = tl.reshape(((ci & J) == 0) == desc, [1, n // (2 * J), 2, J])
    return tl.reshape(tl.where(take_max, mx, mn), [BM, n])


@triton.jit
def _topk_ascending(h, KP: tl.constexpr, LOG_KP: tl.constexpr, LOG_N: tl.constexpr):
    """The KP largest entries of each row of h [BM, 2^LOG_N], ascending (bitonic top-k)."""
    BM: tl.constexpr = h.shape[0]
    ci = tl.arange(0, h.shape[1])[None, :]
    # sort runs of KP columns, even runs ascending and odd runs descending
    for st in tl.static_range(1, LOG_KP + 1):
        desc = (ci & (1 << st)) != 0
        for jj in tl.static_range(st):
            h = _cas(h, desc, 1 << (st - 1 - jj))
    for _ in tl.static_range(LOG_N - LOG_KP):
        # an ascending run against the next (descending) one: the elementwise max is the
        # top KP of the pair as a bitonic sequence (the bitonic split); merge it again
        h3 = tl.max(tl.reshape(h, [BM, h.shape[1] // (2 * KP), 2, KP]), axis=2)
        h = tl.reshape(h3, [BM, h3.shape[1] * KP])
        cj = tl.arange(0, h.shape[1])[None, :]
        desc = (cj & KP) != 0
        for jj in tl.static_range(LOG_KP):
            h = _cas(h, desc, KP >> (jj + 1))
    return h


@triton.jit
def _merge_descending(best, top, KP: tl.constexpr, LOG_KP: tl.constexpr):
    """Top KP of best (descending) and top (ascending), descending."""
    h = tl.maximum(best, top)
    desc = tl.arange(0, KP)[None, :] >= 0
    for jj in tl.static_range(LOG_KP):
        h = _cas(h, desc, KP >> (jj + 1))
    return h


@triton.jit
def _knn_kernel(q_ptr, x_ptr, out_ptr, NQ, NX, D, q_base, x_base, tiles_per_split,
                sqm, sqd, sxm, sxd, som,
                EXCLUDE_SELF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                KP: tl.constexpr, LOG_KP: tl.constexpr, LOG_BN: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < NQ
    best = tl.full([BM, KP], _INVALID, dtype=tl.int64)
    for t in range(0, tiles_per_split):
        n0 = (pid_s * tiles_per_split + t) * BN
        cols = n0 + tl.arange(0, BN)
        cmask = cols < NX
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            dmask = d < D
            a = tl.load(q_ptr + rows[:, None] * sqm + d[None, :] * sqd, mask=rmask[:, None] & dmask[None, :], other=0.0)
            b = tl.load(x_ptr + cols[None, :] * sxm + d[:, None] * sxd, mask=cmask[None, :] & dmask[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        gcols = x_base + cols
        keys = C.score_keys(acc, gcols[None, :])
        valid = cmask[None, :]
        if EXCLUDE_SELF:
            valid = valid & ((q_base + rows)[:, None] != gcols[None, :])
        keys = tl.where(valid, keys, _INVALID)
        # skip the sort when no row of this tile can enter its running top-KP
        if tl.max((tl.max(keys, axis=1) > tl.min(best, axis=1)).to(tl.int32), axis=0) > 0:
            best = _merge_descending(best, _topk_ascending(keys, KP, LOG_KP, LOG_BN), KP, LOG_KP)
    j = tl.arange(0, KP)
    tl.store(out_ptr + rows[:, None] * som + (pid_s * KP + j)[None, :], best, mask=rmask[:, None])


_SPACE = [dict(BM=bm) for bm in (16, 32, 64)]


def _prune(configs, named_args, **kwargs):
    # the running top-KP and the [BM, BN] key tile are int64 registers: wide k, short blocks
    # (an sm_90 build with KP = BN = 256, BM = 32 already takes 216 KiB of shared memory)
    return [c for c in configs if c.kwargs["BM"] * kwargs["KP"] <= 4096] or configs[:1]


_knn_tuned = triton.autotune(C.configs(_SPACE, warps=(4,)), key=["NX", "D", "KP", "BN", "EXCLUDE_SELF"],
                             prune_configs_by=dict(early_config_prune=_prune))(_knn_kernel)


def _blocks(k: int, D: int) -> tuple[int, int, int]:
    kp = C.pow2(k, lo=1)
    if C.interpreting():
        return kp, max(32, kp), C.pow2(D, hi=32)
    return kp, max(64, kp), C.pow2(D, hi=64)


def _search(q, x, k, q_base, drop_self, query_chunk, database_chunk):
    """Top-k keys [Q, k] (int64) of every query of `q` against all of `x`."""
    Q, D = q.shape
    N = x.shape[0]
    kp, BN, BD = _blocks(k, D)
    bm_interp = 32
    min_bm = bm_interp if C.interpreting() else min(s["BM"] for s in _SPACE)
    target = C.num_programs_target(q.device)
    out_keys = []
    for qs in range(0, Q, query_chunk):
        qc = q[qs : qs + query_chunk]
        nq = qc.shape[0]
        best = None
        for ds in range(0, N, database_chunk):
            xc = x[ds : ds + database_chunk]
            nx = xc.shape[0]
            tiles = C.cdiv(nx, BN)
            # enough splits to fill the device when the query blocks alone do not
            splits = max(1, min(tiles, C.cdiv(target, C.cdiv(nq, min_bm))))
            per_split = C.cdiv(tiles, splits)
            splits = C.cdiv(tiles, per_split)
            buf = torch.empty(nq, splits * kp, dtype=torch.int64, device=q.device)
            C.launch(
                _knn_kernel, _knn_tuned, lambda m: (triton.cdiv(nq, m["BM"]), splits),
                (qc, xc, buf, nq, nx, D, q_base + qs, ds, per_split,
                 qc.stride(0), qc.stride(1), xc.stride(0), xc.stride(1), buf.stride(0)),
                dict(EXCLUDE_SELF=drop_self, BN=BN, BD=BD, KP=kp, LOG_KP=kp.bit_length() - 1,
                     LOG_BN=BN.bit_length() - 1, PRECISION=C.dot_precision(q.dtype)),
                dict(BM=bm_interp))
            cand = buf if best is None else torch.cat([best, buf], dim=1)
            best = torch.topk(cand, min(k, cand.shape[1]), dim=1).values
        out_keys.append(best)
    return torch.cat(out_keys)


class KnnFunction(torch.autograd.Function):
    """scores_ij = q_i . x_{idx_ij}, computed by the kernel; the gradient in torch."""

    @staticmethod
    def forward(ctx, q, x, idx, scores, query_chunk):
        ctx.save_for_backward(q, x, idx)
        ctx.query_chunk = query_chunk
        ctx.mark_non_differentiable(idx)
        return scores

    @staticmethod
    def backward(ctx, g):
        q, x, idx = ctx.saved_tensors
        need_q, need_x = ctx.needs_input_grad[:2]
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device) if need_q else None
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        for s in range(0, q.shape[0], ctx.query_chunk):
            gi, ii = g[s : s + ctx.query_chunk].float(), idx[s : s + ctx.query_chunk]
            if need_q:
                dq[s : s + gi.shape[0]] = torch.einsum("qk,qkd->qd", gi, x[ii].float())
            if need_x:
                qi = q[s : s + gi.shape[0]].float()
                dx.index_add_(0, ii.reshape(-1), (gi[:, :, None] * qi[:, None, :]).reshape(-1, q.shape[1]))
        return (dq.to(q.dtype) if need_q else None), (dx.to(x.dtype) if need_x else None), None, None, None


@register("triton", "knn")
def knn(x, k, queries=None, exclude_self=True, query_chunk=4096, database_chunk=65536):
    if C.use_reference(x, queries) or k > MAX_K:
        return reference.knn(x, k, queries=queries, exclude_self=exclude_self,
                             query_chunk=query_chunk, database_chunk=database_chunk)
    if x.shape[0] > C.MAX_INDEX:
        raise ValueError(f"the triton knn keys hold database indices below 2^31; x has {x.shape[0]} rows")
    q_all = x if queries is None else queries
    qk, xk = C.common_dtype(q_all, x)
    keys = _search(qk.detach(), xk.detach(), k, 0, queries is None and exclude_self, query_chunk, database_chunk)
    scores, idx = C.decode_keys(keys)
    scores = scores.to(q_all.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or q_all.requires_grad):
        if queries is None:
            scores = KnnFunction.apply(x, x, idx, scores, query_chunk)
        else:
            scores = KnnFunction.apply(queries, x, idx, scores, query_chunk)
    return scores, idx
