"""The card's ceilings, and how close the benchmarks' rows come to them.

    python -m benchmarks.gpu.roofline [--device cuda|cpu] [--quick] [--json out.json]

Ceilings are the datasheet's for the cards in CARDS (NVIDIA's H100, H200 and A100
datasheets: dense rates, i.e. the "with sparsity" figures halved) and are measured on
every run besides: a device-to-device copy (bytes read + written per second) and
torch.matmul at 8192^3 in bf16, fp16 and fp32 (TF32 off, as torch leaves it). The
percentages below use the datasheet where the card is known, else the measurement, and
always say which; a measured GEMM at ~80% of the datasheet's is the usual state of a
healthy card (KINDS.md recorded 790 of 989 TFLOP/s bf16 on an H200).

% of roofline = the time the row's work would take at the ceilings (the larger of
FLOPs / peak FLOP/s and minimal bytes / bandwidth) over the time it took, so 100% is the
roof for either bound. The minimal bytes are the inputs read once and the outputs
written once, a lower bound no kernel beats.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from typing import Optional, Sequence

# substring of torch.cuda.get_device_name -> datasheet figures; the first match wins, so
# the longer names come first ("H100 NVL" before "H100", "A100 80GB PCIe" before "A100")
CARDS: list[tuple[str, dict]] = [
    ("H200 NVL", dict(card="H200 NVL", bandwidth_GBps=4800, bf16_tflops=835, fp16_tflops=835, tf32_tflops=417,
                      fp32_tflops=60)),
    ("H200", dict(card="H200 SXM", bandwidth_GBps=4800, bf16_tflops=989, fp16_tflops=989, tf32_tflops=495,
                  fp32_tflops=67)),
    ("H100 NVL", dict(card="H100 NVL", bandwidth_GBps=3900, bf16_tflops=835, fp16_tflops=835, tf32_tflops=417,
                      fp32_tflops=60)),
    ("H100 PCIe", dict(card="H100 PCIe", bandwidth_GBps=2000, bf16_tflops=756, fp16_tflops=756, tf32_tflops=378,
                       fp32_tflops=51)),
    ("H100", dict(card="H100 SXM", bandwidth_GBps=3350, bf16_tflops=989, fp16_tflops=989, tf32_tflops=495,
                  fp32_tflops=67)),
    ("A100 80GB PCIe", dict(card="A100 80GB PCIe", bandwidth_GBps=1935, bf16_tflops=312, fp16_tflops=312,
                            tf32_tflops=156, fp32_tflops=19.5)),
    ("A100-SXM4-80GB", dict(card="A100 SXM 80GB", bandwidth_GBps=2039, bf16_tflops=312, fp16_tflops=312,
                            tf32_tflops=156, fp32_tflops=19.5)),
    ("A100", dict(card="A100 40GB", bandwidth_GBps=1555, bf16_tflops=312, fp16_tflops=312, tf32_tflops=156,
                  fp32_tflops=19.5)),
]
DTYPE_KEY = {"float16": "fp16", "fp16": "fp16", "bfloat16": "bf16", "bf16": "bf16", "float32": "fp32", "fp32": "fp32"}
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _sig(x: float) -> float:
    """4 significant digits: CPU dry runs give rates of 1e-3 TFLOP/s, GPUs of 1e3."""
    return float(f"{x:.4g}")


def datasheet(name: str) -> Optional[dict]:
    for key, figures in CARDS:
        if key.lower() in name.lower():
            return dict(figures)
    return None


def measure(device: str = "cuda", quick: bool = False) -> dict:
    """Achieved copy bandwidth and GEMM rates on `device` (median of timed repeats after a
    warm-up); `quick` shrinks the sizes for a CPU dry run."""
    import torch

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def timed(fn, reps: int) -> float:
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    reps = 3 if quick else 10

    def copy_seconds(nbytes: int) -> float:  # the buffers go when it returns
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        return timed(lambda: dst.copy_(src), reps)

    def gemm_seconds(n: int, dtype) -> float:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        return timed(lambda: a @ b, reps)

    # the copy: 4 GiB each way, far past the 50-60 MB L2, so it measures HBM
    nbytes = (1 << 22) if quick else (1 << 32)
    out = {"copy_GBps": _sig(2 * nbytes / copy_seconds(nbytes) / 1e9), "copy_bytes": nbytes}
    n = 256 if quick else 8192
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        out[f"{key}_tflops"] = _sig(2 * n**3 / gemm_seconds(n, dtype) / 1e12)
    out["gemm_n"] = n
    return out


def ceilings(device_name: str, measured: dict) -> dict:
    """The figures the percentages divide by: the datasheet's where the card is known,
    else the measured ones."""
    sheet = datasheet(device_name)
    if sheet is not None:
        return {**sheet, "source": "datasheet"}
    return {"card": device_name, "bandwidth_GBps": measured["copy_GBps"], "bf16_tflops": measured["bf16_tflops"],
            "fp16_tflops": measured["fp16_tflops"], "fp32_tflops": measured["fp32_tflops"], "source": "measured"}


def _pct(flops: float, nbytes: float, seconds: float, peak_tflops: float, bandwidth_GBps: float) -> dict:
    compute_s, memory_s = flops / (peak_tflops * 1e12), nbytes / (bandwidth_GBps * 1e9)
    return {"tflops": _sig(flops / seconds / 1e12), "pct_peak_flops": _sig(100 * compute_s / seconds),
            "pct_roofline": _sig(100 * max(compute_s, memory_s) / seconds),
            "bound": "compute" if compute_s >= memory_s else "memory"}


def _shape(text: str) -> dict:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}


def ops_work(op: str, shape: dict, e: int) -> tuple[float, float]:
    """(FLOPs, minimal bytes) of one bench_ops row; `e` bytes per input element. FLOPs as
    bench_ops counts them."""
    if op == "assign":  # x, c in; labels int64 + conf fp32 out
        n, k, d = shape["N"], shape["K"], shape["D"]
        return 2.0 * n * k * d, (n + k) * d * e + n * 12
    if op == "retrieve":  # x, bank in; [N, D] out
        n, w, d = shape["N"], shape["W"], shape["D"]
        return 4.0 * n * w * d, (2 * n + w) * d * e
    if op == "knn":  # x in; scores fp32 + indices int64 out
        n, d, k = shape["N"], shape["D"], shape["k"]
        return 2.0 * n * n * d, n * d * e + n * k * 12
    if op == "kmeans":  # fp32 rows read and labels written once per iteration
        n, k, d, it = shape["N"], shape["K"], shape["D"], shape["iters"]
        return 2.0 * n * k * d * it, it * (n * d * 4 + n * 8)
    raise ValueError(op)


def bench_ops_percent(report: dict, ceil: dict, measured: dict) -> list[dict]:
    """% of roofline (and of the measured GEMM) for each timed GPU row of bench_ops' JSON.
    Host rows (faiss, sklearn) run on the CPU and get none."""
    dtype = DTYPE_KEY[report["environment"]["dtype"]]
    out = []
    for r in report["rows"]:
        if r.get("time_ms") is None or "(host)" in r["impl"]:
            continue
        key = "fp32" if r["op"] == "kmeans" else dtype  # bench_ops runs k-means in float32
        flops, nbytes = ops_work(r["op"], _shape(r["shape"]), ELEMENT_BYTES[key])
        row = {"op": r["op"], "impl": r["impl"], "shape": r["shape"], "dtype": key, "time_ms": r["time_ms"],
               **_pct(flops, nbytes, r["time_ms"] / 1e3, ceil[f"{key}_tflops"], ceil["bandwidth_GBps"])}
        row["pct_measured_gemm"] = _sig(100 * flops / (r["time_ms"] / 1e3) / 1e12 / measured[f"{key}_tflops"])
        out.append(row)
    return out


def step_loss_bytes(b: int, k: int, d: int) -> int:
    """Minimal bytes of the fused loss (float32): both heads' [2B, K] logits in, their
    gradients and probabilities out, u and v [B, D] and the centres [K, D] in, the
    marginal [K] out."""
    return 4 * (3 * 2 * (2 * b * k) + 2 * b * d + k * d + k)


def bench_step_percent(report: dict, ceil: dict) -> list[dict]:
    """% of the bandwidth roof for the loss alone (memory-bound: a few passes over
    [2B, K]) of each bench_step row, eager and ext."""
    out = []
    for r in report["steps"]:
        nbytes = step_loss_bytes(r["B"], r["K"], r["D"])
        for impl in ("eager", "compile", "ext"):
            ms = r.get(impl, {}).get("loss_only", {}).get("median_ms")
            if ms is None:
                continue
            floor = nbytes / (ceil["bandwidth_GBps"] * 1e9)
            out.append({"B": r["B"], "K": r["K"], "D": r["D"], "impl": impl, "loss_ms": round(ms, 4),
                        "step_ms": round(r[impl]["median_ms"], 4), "loss_bytes": nbytes,
                        "pct_bandwidth_roofline": _sig(100 * floor / (ms / 1e3))})
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU dry run)")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    import torch

    name = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"
    measured = measure(a.device, a.quick)
    result = {"device_name": name, "datasheet": datasheet(name), "measured": measured,
              "ceilings": ceilings(name, measured)}
    text = json.dumps(result)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
