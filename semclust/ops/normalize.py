from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import validate as V


def normalize_rows(x: Tensor, dtype: Optional[torch.dtype] = None, chunk_size: int = 65536) -> Tensor:
    """Unit rows x_i / ||x_i||_2, safe at any finite scale; zero rows stay zero.

    x: [N, D] floating, any layout. Each row is first divided by its largest |entry| (in
    float32), then by its norm: cosine is scale-free, but ||x_i|| itself overflows
    float32 at entries ~1e19 and float16 at a unit row times 2^16, and a plain
    normalisation then returns zeros (one cluster). Computed one row chunk at a time in
    float32 (memory O(chunk_size x D) beyond the result), so the result does not depend
    on the dtype or strides it came in.

    Returns: [N, D] contiguous in `dtype` (default: x's dtype), on x's device.
    """
    V.matrix("x", x)
    V.count("chunk_size", chunk_size, 1)
    out = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    for s in range(0, x.shape[0], chunk_size):
        # a row-major float32 copy: the reductions then run in one order whatever x's layout
        c = x[s : s + chunk_size].float().contiguous()
        c = c / c.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        out[s : s + chunk_size] = torch.nn.functional.normalize(c, dim=1)
    return out
