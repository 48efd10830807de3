"""The Triton backend of `semclust.ops`, installed as `semclust.kernels`.

Importing this package registers one implementation per op with the dispatcher
(`@register("triton", op)` in each module). Triton kernels run on CUDA tensors, or on CPU
tensors under the interpreter (`TRITON_INTERPRET=1`, set before triton is imported).
Each op module holds its kernels, a launcher that picks block sizes (autotuned when
compiled, one fixed config when interpreted) and its `torch.autograd.Function`.
"""

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as e:  # the dispatcher reports "needs 'triton'" from a ModuleNotFoundError
    if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] == "triton":
        raise
    raise ModuleNotFoundError(f"triton cannot be imported: {e}", name="triton") from e

from . import assign, balance, center_update, knn, retrieve  # noqa: E402,F401  (registration)

__all__ = ["assign", "retrieve", "knn", "center_update", "balance"]
