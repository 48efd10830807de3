"""What the Triton kernels share: launch choice, block sizes, dtype plumbing, sort keys.

Every kernel file launches through :func:`launch`: compiled on a GPU with a small
``triton.autotune`` config list, and with one fixed config under the interpreter
(``TRITON_INTERPRET=1``), where autotuning would only multiply the (slow) runs.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

# tl.dot on NVIDIA needs every dimension >= 16; the interpreter has no such limit but the
# same block sizes are used there so that the tested code is the compiled code.
MIN_DOT = 16
LOG2E = 1.4426950408889634
# Key of an invalid knn candidate (padding, self): below every real key.
INT64_MIN = -(2**63)
# knn keys keep the database index in their low 31 bits (see `score_keys`).
MAX_INDEX = 2**31 - 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pow2(n: int, lo: int = MIN_DOT, hi: Optional[int] = None) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]."""
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return p if hi is None else min(p, max(lo, hi))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands: "tf32x3" (three TF32 products) keeps ~fp32 accuracy on tensor cores;
    # plain TF32 would err ~1e-3 per logit, i.e. ~0.2 at tau = 0.005. Ignored for fp16/bf16.
    if dtype == torch.float32 and not interpreting():
        return "tf32x3"
    return "ieee"


def kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    """The tensor as the kernels will read it.

    Under the interpreter bf16 arithmetic is emulated incorrectly, so bf16 is upcast to
    fp32 there (a CPU-only debugging path; on a GPU bf16 is read as is).
    """
    if t.dtype == torch.bfloat16 and interpreting():
        return t.float()
    return t


def common_dtype(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Cast operands of one tl.dot to one dtype (the wider one), as the reference computes."""
    ts = [kernel_dtype(t) for t in ts]
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return [t if t.dtype == dt else t.to(dt) for t in ts]


def use_reference(*ts: Optional[torch.Tensor]) -> bool:
    """float64 goes to the reference: Triton's fp64 dot is a slow FMA path with no gain."""
    return any(t is not None and t.dtype == torch.float64 for t in ts)


def num_programs_target(device: torch.device) -> int:
    """Programs that keep the device busy: a few waves of SMs, a handful when interpreted."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def launch(kernel, tuned, grid: Callable[[dict], tuple], args: tuple, const: dict, interp_meta: dict) -> None:
    """Launch `tuned` (autotuned) when compiled, `kernel` with `interp_meta` when interpreted.

    `const` holds the constexprs fixed by the caller (flags, precision); `interp_meta`
    the block sizes (and whatever a heuristic derives from them) for the interpreter.
    """
    if interpreting() or tuned is None:
        meta = {**const, **interp_meta}
        kernel[grid(meta)](*args, **meta)
    else:
        tuned[grid](*args, **const)


def configs(space: list[dict], warps: tuple[int, ...] = (4, 8), stages: tuple[int, ...] = (3,)) -> list:
    return [triton.Config(dict(s), num_warps=w, num_stages=st) for s in space for w in warps for st in stages]


# ---- order-preserving keys for top-k (knn) ---------------------------------------------


@triton.jit
def score_keys(s, idx):
    """Pack fp32 scores and int indices into int64 keys ordered by (score, -index).

    The float bits are mapped to an int32 that sorts like the float (negative floats get
    their magnitude bits flipped), shifted above 31 bits of (2^31 - 1 - index): larger
    key = larger score, and among equal scores the lower index. -0.0 is folded onto +0.0
    so that the two compare equal, as in torch.
    """
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `score_keys` on the host: (scores float32, indices int64)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), MAX_INDEX - (keys & 0xFFFFFFFF)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
