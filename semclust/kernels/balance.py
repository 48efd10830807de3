"""Triton-backend `balance`: a thin torch computation, on purpose.

balance works on a length-K vector (or reduces probs [N, K] to one). Its fusion with the
big pass is in `assign`, whose kernel already emits colsum_k = sum_i P_ik (per-block partial
sums reduced without atomics) and whose backward takes dL/dcolsum; `balance(colsum, n)`
then costs O(K) and a kernel launch would cost more than the arithmetic. Given probs
[N, K] instead, the column mean is one bandwidth-bound torch reduction. So this module
registers the reference formula itself (identical semantics and autograd).
"""

from __future__ import annotations

from semclust.ops import reference
from semclust.ops.dispatch import register


@register("triton", "balance")
def balance(probs_or_colsum, n=None, weights=None):
    return reference.balance(probs_or_colsum, n=n, weights=weights)
