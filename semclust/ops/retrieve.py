from __future__ import annotations

from torch import Tensor

from . import validate as V
from . import reference
from .dispatch import register, resolve

register("torch", "retrieve")(reference.retrieve)


def retrieve(x: Tensor, bank: Tensor, tau: float, normalize: bool = True, chunk_size: int = 4096) -> Tensor:
    """Attention-style read of a bank: v_i = sum_w softmax_w(x_i . bank_w / tau) bank_w.

    Used for text counterparts (x = image embeddings, bank = selected noun embeddings,
    tau = 0.005). Never forms the full N x W score matrix: rows go in chunks.

    Args:
        x: [N, D] queries; bank: [W, D] keys = values; tau > 0.
        normalize: L2-normalise each v_i (the counterpart lives on the sphere like x).
    Returns:
        [N, D] in x's dtype; differentiable w.r.t. x and bank.
    """
    V.matrix("x", x)
    V.matrix("bank", bank, cols=x.shape[1])
    V.same_device(x=x, bank=bank)
    V.positive("tau", tau)
    V.count("chunk_size", chunk_size, 1)
    _, impl = resolve("retrieve", x.device)
    return impl(x, bank, tau, normalize=normalize, chunk_size=chunk_size)
