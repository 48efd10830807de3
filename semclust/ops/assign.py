from __future__ import annotations

from torch import Tensor

from . import validate as V
from .dispatch import register, resolve
from . import reference
from .reference import AssignResult

register("torch", "assign")(reference.assign)


def assign(x: Tensor, c: Tensor, tau: float, return_probs: bool = False, chunk_size: int = 65536) -> AssignResult:
    """Soft assignment of rows to centres, in one pass over `x`.

    P = softmax(x c^T / tau) row-wise;  labels_i = argmax_k P_ik;  conf_i = max_k P_ik;
    colsum_k = sum_i P_ik.  Only a [chunk, K] block of P exists at a time unless
    `return_probs` asks for all of it.

    Args:
        x: [N, D] fp16/bf16/fp32/fp64 rows (usually L2-normalised).
        c: [K, D] centres, same dim.
        tau: temperature > 0; small tau (0.005) gives logits ~ 1/tau, made safe by the
            max subtraction of the softmax.
        return_probs: also return P [N, K].
        chunk_size: rows per block (bounds memory to chunk_size x K).
    Returns:
        AssignResult(labels [N] int64, conf [N], colsum [K], probs [N, K] or None); floats
        in float32 (float64 for float64 inputs). Differentiable through conf/colsum/probs.
    """
    V.matrix("x", x)
    V.matrix("c", c, cols=x.shape[1])
    V.same_device(x=x, c=c)
    V.positive("tau", tau)
    V.count("chunk_size", chunk_size, 1)
    _, impl = resolve("assign", x.device)
    return impl(x, c, tau, return_probs=return_probs, chunk_size=chunk_size)
