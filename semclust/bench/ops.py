"""The fused ops against their peers: time, throughput, peak memory, and a correctness check.

    python -m semclust.bench.ops [--device cuda|cpu] [--dtype fp32|fp16] [--quick] [--json out.json]
    pytest semclust/bench/ops.py --benchmark-enable      # the pytest-benchmark functions

Rows per op:
  assign    semclust (triton) | bare GEMM x c^T of the same shape (the floor; "x GEMM" = ratio)
            | torch eager chain (softmax, max, column sum: `ops.reference.assign` in one chunk)
  retrieve  semclust (triton, normalize=False) | F.scaled_dot_product_attention (q = x, k = v =
            bank, scale = 1/tau) | eager softmax(x b^T / tau) b
  knn       semclust (triton) | torch (`ops.reference.knn`, chunked) | faiss-cpu IndexFlatIP
            (exact; searches k+1 and drops the query itself); check = recall@k vs torch
  kmeans    semclust.ops.kmeans (one restart, no early stop) | faiss.Kmeans (spherical) |
            sklearn KMeans (Lloyd, Euclidean: equivalent on unit rows up to the centre norm);
            same iterations, k-means++ (faiss: random init, its only option); check = the
            objective mean_i (1 - cos(x_i, c_label_i)) computed the same way for all three

Memory: CUDA = torch.cuda.max_memory_allocated above the allocation before the call (the op's
own tensors, inputs excluded). CPU = growth of the process's peak resident set during the
call, after resetting the peak through /proc/self/clear_refs (Linux; whole-process, so it
includes Python and library allocations; tracemalloc would not see torch's buffers);
without /proc the ru_maxrss delta, which only shows growth past the earlier peak.

On CPU the Triton rows run the interpreter (TRITON_INTERPRET=1, set here before the
kernels are imported): they check that the kernels run and agree, and are labelled
"interpreter, not a speed claim". faiss-cpu always runs on the host; on a CUDA device its
time includes nothing but its own search/train on host copies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

INTERP_NOTE = "interpreter, not a speed claim"

# (quick, full) problem sizes per device type
SIZES = {
    "cpu": {
        "assign": ((1024, 32, 64), (8192, 100, 128)),  # N, K, D
        "retrieve": ((512, 256, 64), (4096, 1024, 128)),  # N, W, D
        "knn": ((512, 64, 10), (4096, 128, 50)),  # N, D, k
        "kmeans": ((2000, 10, 64, 10), (20000, 50, 128, 20)),  # N, K, D, iters
    },
    "cuda": {
        "assign": ((65536, 256, 512), (1 << 20, 1000, 512)),
        "retrieve": ((16384, 2048, 512), (262144, 8192, 512)),
        "knn": ((16384, 512, 50), (100000, 512, 50)),
        "kmeans": ((20000, 50, 512, 20), (200000, 100, 512, 20)),
    },
}
FAISS_KNN_MAX_FLOPS = 5e12  # faiss-cpu exact search above this takes minutes: skipped


@dataclass
class Row:
    op: str
    impl: str
    shape: str
    time_ms: Optional[float] = None
    throughput: str = ""
    ratio: str = ""
    peak_mb: Optional[float] = None
    check: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---- measurement -------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status() -> Optional[dict]:
    try:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in f) if k in ("VmHWM", "VmRSS")}
    except OSError:
        return None


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[Optional[float], object]:
    """Run fn once; return (peak extra bytes, result)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base), out
    st = _proc_status()
    if st is not None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            base = _proc_status()["VmRSS"]
            out = fn()
            return float(max(_proc_status()["VmHWM"] - base, 0)), out
        except OSError:
            pass
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = fn()
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base), out


def measure(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> tuple[float, Optional[float], object]:
    """(median seconds over reps, peak extra bytes of one call, result of the last call)."""
    for _ in range(warmup):  # compilation, autotuning, allocator warm-up
        fn()
    _sync(device)
    peak, out = _peak_bytes(fn, device)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak, out


def _ratio(a: Row, b: Row, what: str) -> str:
    return f"{a.time_ms / b.time_ms:.3g}x {what}"


def _fmt_rate(n: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f} {prefix}{unit}"
    return f"{n:.1f} {unit}"


# ---- environment -------------------------------------------------------------------------


def _prepare_triton(device: torch.device) -> Optional[str]:
    """Make the triton backend usable for `device`; return why not, or None."""
    if device.type == "cpu" and "semclust.kernels" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated
    from semclust import ops

    return ops.available_backends(device)["triton"]


def _try_import(name: str):
    try:
        return __import__(name)
    except Exception:  # noqa: BLE001 - any failure means "peer not available"
        return None


def _unit_rows(n: int, d: int, device: torch.device, dtype: torch.dtype, seed: int, clusters: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if clusters:  # a clustered set, so that k-means has structure to find
        centres = torch.randn(clusters, d, generator=g) * 2.0
        x = centres[torch.randint(0, clusters, (n,), generator=g)] + x
    return torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype)


# ---- sections ----------------------------------------------------------------------------


class Bench:
    def __init__(self, device: torch.device, dtype: torch.dtype, quick: bool, interpreter: bool,
                 shapes: Optional[dict] = None, reps: Optional[int] = None) -> None:
        self.device, self.dtype, self.quick = device, dtype, quick
        self.shapes = shapes or {}
        self.reps = reps or (3 if quick else 10)
        self.triton_reason = _prepare_triton(device)
        self.interp = device.type == "cpu"
        if self.interp and not interpreter and self.triton_reason is None:
            self.triton_reason = "skipped (--no-interpreter)"
        self.rows: list[Row] = []

    def size(self, op: str):
        return self.shapes.get(op) or SIZES[self.device.type][op][0 if self.quick else 1]

    def run(self, op: str, impl: str, shape: str, fn: Callable[[], object], work: float, unit: str,
            triton: bool = False, note: str = "") -> tuple[Optional[Row], object]:
        from semclust import ops

        if triton and self.triton_reason:
            self.rows.append(Row(op, impl, shape, note=f"unavailable: {self.triton_reason}"))
            return None, None
        reps = 1 if (triton and self.interp) else self.reps
        if triton:
            with ops.use_backend("triton"):
                t, peak, out = measure(fn, self.device, reps, warmup=0 if self.interp else 2)
            if self.interp:
                note = ", ".join(filter(None, [INTERP_NOTE, note]))
        else:
            t, peak, out = measure(fn, self.device, reps)
        row = Row(op, impl, shape, t * 1e3, _fmt_rate(work / t, unit), peak_mb=None if peak is None else peak / 2**20,
                  note=note)
        self.rows.append(row)
        return row, out

    # assign -------------------------------------------------------------------------------
    def assign(self) -> None:
        from semclust import ops
        from semclust.ops import reference

        N, K, D = self.size("assign")
        x = _unit_rows(N, D, self.device, self.dtype, 1)
        c = _unit_rows(K, D, self.device, self.dtype, 2)
        tau, shape, flops = 0.05, f"N={N} K={K} D={D}", 2.0 * N * K * D
        gemm, _ = self.run("assign", "bare GEMM x c^T", shape, lambda: x @ c.T, flops, "FLOP/s")
        eager, ref = self.run("assign", "torch eager chain", shape,
                              lambda: reference.assign(x, c, tau, chunk_size=N), flops, "FLOP/s")
        tri, out = self.run("assign", "semclust triton", shape,
                            lambda: ops.assign(x, c, tau), flops, "FLOP/s", triton=True)
        for r in (eager, tri):
            if r is not None and gemm is not None:
                r.ratio = _ratio(r, gemm, "GEMM")
        if tri is not None:
            agree = float((out.labels == ref.labels).float().mean())
            tri.check = f"labels agree {agree:.4f}, |conf| err {float((out.conf - ref.conf).abs().max()):.1e}"

    # retrieve ------------------------------------------------------------------------------
    def retrieve(self) -> None:
        from semclust import ops

        N, W, D = self.size("retrieve")
        x = _unit_rows(N, D, self.device, self.dtype, 3)
        bank = _unit_rows(W, D, self.device, self.dtype, 4)
        tau, shape, flops = 0.005, f"N={N} W={W} D={D}", 4.0 * N * W * D

        def eager():
            return torch.softmax((x @ bank.T).float() / tau, dim=1).to(bank.dtype) @ bank

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(x[None], bank[None], bank[None], scale=1.0 / tau)[0]

        e, ref = self.run("retrieve", "eager softmax(x b^T/tau) b", shape, eager, flops, "FLOP/s")
        s, sout = self.run("retrieve", "torch SDPA", shape, sdpa, flops, "FLOP/s")
        t, tout = self.run("retrieve", "semclust triton", shape,
                           lambda: ops.retrieve(x, bank, tau, normalize=False), flops, "FLOP/s", triton=True,
                           note="normalize=False for parity")
        for r, o in ((s, sout), (t, tout)):
            if r is not None and e is not None:
                r.ratio = _ratio(r, e, "eager")
                r.check = f"max |err| vs eager {float((o.float() - ref.float()).abs().max()):.1e}"

    # knn -----------------------------------------------------------------------------------
    def knn(self) -> None:
        from semclust import ops
        from semclust.ops import reference

        N, D, k = self.size("knn")
        x = _unit_rows(N, D, self.device, self.dtype, 5)
        shape, flops = f"N={N} D={D} k={k}", 2.0 * N * N * D
        tr, (rs, ri) = self.run("knn", "torch (reference, chunked)", shape,
                                lambda: reference.knn(x, k), flops, "FLOP/s")

        def recall(idx: torch.Tensor) -> float:
            a, b = idx.cpu(), ri.cpu()
            hits = (a[:, :, None] == b[:, None, :]).any(-1).float().sum()
            return float(hits) / b.numel()

        t, out = self.run("knn", "semclust triton", shape, lambda: ops.knn(x, k), flops, "FLOP/s", triton=True)
        if t is not None:
            t.ratio = _ratio(t, tr, "torch")
            t.check = f"recall@{k} {recall(out[1]):.4f}"
        faiss = _try_import("faiss")
        if faiss is None:
            self.rows.append(Row("knn", "faiss IndexFlatIP", shape, note="unavailable: pip install faiss-cpu"))
        elif flops > FAISS_KNN_MAX_FLOPS:
            self.rows.append(Row("knn", "faiss IndexFlatIP", shape, note="skipped: exact CPU search too large"))
        else:
            xh = x.float().cpu().numpy()
            index = faiss.IndexFlatIP(D)
            index.add(xh)

            def search():
                _, idx = index.search(xh, k + 1)
                idx = torch.from_numpy(idx)
                keep = idx != torch.arange(N)[:, None]  # drop the query itself
                return torch.stack([row[m][:k] for row, m in zip(idx, keep)])

            f, fidx = self.run("knn", "faiss IndexFlatIP (host)", shape, search, flops, "FLOP/s")
            f.ratio = _ratio(f, tr, "torch")
            f.check = f"recall@{k} {recall(fidx):.4f}"

    # kmeans --------------------------------------------------------------------------------
    def kmeans(self) -> None:
        from semclust import ops

        N, K, D, iters = self.size("kmeans")
        x = _unit_rows(N, D, self.device, torch.float32, 6, clusters=K)
        shape, work = f"N={N} K={K} D={D} iters={iters}", 2.0 * N * K * D * iters

        def objective(centres: torch.Tensor, labels: torch.Tensor) -> float:
            c = torch.nn.functional.normalize(torch.as_tensor(centres, dtype=torch.float32), dim=1).to(x.device)
            lab = torch.as_tensor(labels, dtype=torch.int64).to(x.device).reshape(-1)
            return float((1.0 - (x * c[lab]).sum(1)).mean())

        # the default dispatch (on CPU the Triton interpreter is never the default)
        from semclust.ops.dispatch import resolve

        backend = resolve("assign", self.device)[0]

        def semclust_km():
            return ops.kmeans(x, K, iters=iters, restarts=1, seed=0, tol=-math.inf)

        s, sres = self.run("kmeans", f"semclust.ops.kmeans ({backend})", shape, semclust_km, work, "FLOP/s")
        s.check = f"objective {objective(sres.centers, sres.labels):.5f}"
        faiss = _try_import("faiss")
        xh = x.cpu().numpy()
        if faiss is None:
            self.rows.append(Row("kmeans", "faiss Kmeans", shape, note="unavailable: pip install faiss-cpu"))
        else:
            params = faiss.ClusteringParameters()

            def faiss_km(init: int) -> Callable[[], tuple]:
                def run() -> tuple:
                    # the same work: every row in every step (faiss's default trains on 256 K
                    # rows) and no early stop (faiss >= 1.8 stops when the objective stalls:
                    # 13 of 20 steps on this set)
                    extra = {"early_stop_threshold": -math.inf} if hasattr(params, "early_stop_threshold") else {}
                    if hasattr(params, "init_method"):
                        extra["init_method"] = init
                    km = faiss.Kmeans(D, K, niter=iters, nredo=1, spherical=True, seed=0, verbose=False,
                                      max_points_per_centroid=N // K + 1, **extra)
                    km.train(xh)
                    if len(km.iteration_stats) != iters:
                        raise RuntimeError(f"faiss ran {len(km.iteration_stats)} of {iters} k-means steps")
                    return km.centroids, km.index.search(xh, 1)[1]
                return run

            inits = [("random init", 0)]
            if hasattr(params, "init_method"):  # faiss >= 1.12 also seeds by k-means++ (on all rows)
                inits.append(("k-means++ init", faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS))
            for note, init in inits:
                f, (fc, fl) = self.run("kmeans", "faiss Kmeans spherical (host)", shape, faiss_km(init), work,
                                       "FLOP/s", note=note)
                f.check = f"objective {objective(fc, fl):.5f}"
                f.ratio = _ratio(f, s, "semclust")
        sk = _try_import("sklearn.cluster")
        if sk is None:
            self.rows.append(Row("kmeans", "sklearn KMeans", shape, note="unavailable: pip install scikit-learn"))
        else:
            from sklearn.cluster import KMeans

            def sk_km():
                km = KMeans(K, init="k-means++", n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd",
                            random_state=0).fit(xh)
                return km.cluster_centers_, km.labels_

            r, (kc, kl) = self.run("kmeans", "sklearn KMeans lloyd (host)", shape, sk_km, work, "FLOP/s",
                                   note="Euclidean on unit rows")
            r.check = f"objective {objective(kc, kl):.5f}"
            r.ratio = _ratio(r, s, "semclust")


def environment(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "quick": quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    triton = _try_import("triton")
    env["triton"] = getattr(triton, "__version__", None)
    return env


def format_table(rows: Sequence[Row]) -> str:
    head = ["op", "impl", "shape", "time ms", "throughput", "ratio", "peak MiB", "check", "note"]
    body = [[r.op, r.impl, r.shape, "" if r.time_ms is None else f"{r.time_ms:.2f}", r.throughput, r.ratio,
             "" if r.peak_mb is None else f"{r.peak_mb:.1f}", r.check, r.note] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for r, b in zip(rows, body):
        if prev is not None and r.op != prev:
            out.append("")
        out.append(line(b))
        prev = r.op
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench_ops", description="semclust fused ops vs peers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default=None,
                   help="input dtype of assign/retrieve/knn (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--json", metavar="OUT", help="also write the rows and the environment to this file")
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (CPU: under a minute)")
    p.add_argument("--ops", default="assign,retrieve,knn,kmeans", help="comma-separated subset")
    p.add_argument("--no-interpreter", action="store_true", help="on CPU, skip the (slow) Triton interpreter rows")
    p.add_argument("--reps", type=int, default=None, help="timed calls per row, the best kept (default 10, quick 3)")
    p.add_argument("--threads", type=int, default=None, help="torch (and faiss) threads (default: torch's)")
    p.add_argument("--shape", action="append", default=[], metavar="OP=N,K,D[,ITERS]",
                   help="override an op's problem size (the tuple of SIZES), e.g. kmeans=100000,333,512,20")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
        faiss = _try_import("faiss")
        if faiss is not None:
            faiss.omp_set_num_threads(a.threads)
    shapes = {}
    for spec in a.shape:
        op, _, dims = spec.partition("=")
        try:
            shapes[op.strip()] = tuple(int(v) for v in dims.split(","))
        except ValueError:
            p.error(f"--shape {spec!r}: expected OP=N,K,D[,ITERS] with integers")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, None: torch.float16 if device.type == "cuda" else torch.float32}[a.dtype]
    bench = Bench(device, dtype, a.quick, interpreter=not a.no_interpreter, shapes=shapes,
                  reps=a.reps)
    env = environment(device, dtype, a.quick)
    print(f"semclust ops benchmark on {env['device']}, {env['dtype']}, torch {env['torch']}, triton {env['triton']}"
          f"{', quick' if a.quick else ''}", flush=True)
    t0 = time.perf_counter()
    for op in [o.strip() for o in a.ops.split(",") if o.strip()]:
        if not hasattr(bench, op) or op.startswith("_") or op in ("run", "size"):
            p.error(f"unknown op {op!r}")
        getattr(bench, op)()
    print(format_table(bench.rows))
    print(f"\nmemory: {'torch.cuda.max_memory_allocated above the pre-call allocation' if device.type == 'cuda' else 'peak RSS growth of the whole process during one call (/proc clear_refs)'}; "
          f"total {time.perf_counter() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": [asdict(r) for r in bench.rows]}, f, indent=2)
    return 0


# ---- pytest-benchmark ---------------------------------------------------------------------
# Small fixed shapes; the Triton ones run where the backend can (CUDA, or CPU when the
# interpreter is on, as in the test suite's conftest). `pytest semclust/bench/ops.py`.

_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_or_skip():
    import pytest

    from semclust import ops

    reason = ops.available_backends(_DEV)["triton"]
    if reason:
        pytest.skip(reason)
    return ops.use_backend("triton")


def test_assign_triton(benchmark):
    from semclust import ops

    x, c = _unit_rows(512, 64, _DEV, torch.float32, 1), _unit_rows(32, 64, _DEV, torch.float32, 2)
    with _triton_or_skip():
        benchmark(lambda: (ops.assign(x, c, 0.05), _sync(_DEV)))


def test_assign_gemm(benchmark):
    x, c = _unit_rows(512, 64, _DEV, torch.float32, 1), _unit_rows(32, 64, _DEV, torch.float32, 2)
    benchmark(lambda: (x @ c.T, _sync(_DEV)))


def test_assign_torch(benchmark):
    from semclust.ops import reference

    x, c = _unit_rows(512, 64, _DEV, torch.float32, 1), _unit_rows(32, 64, _DEV, torch.float32, 2)
    benchmark(lambda: (reference.assign(x, c, 0.05), _sync(_DEV)))


def test_retrieve_triton(benchmark):
    from semclust import ops

    x, b = _unit_rows(256, 64, _DEV, torch.float32, 3), _unit_rows(128, 64, _DEV, torch.float32, 4)
    with _triton_or_skip():
        benchmark(lambda: (ops.retrieve(x, b, 0.005), _sync(_DEV)))


def test_retrieve_sdpa(benchmark):
    x, b = _unit_rows(256, 64, _DEV, torch.float32, 3), _unit_rows(128, 64, _DEV, torch.float32, 4)
    f = torch.nn.functional.scaled_dot_product_attention
    benchmark(lambda: (f(x[None], b[None], b[None], scale=200.0), _sync(_DEV)))


def test_knn_triton(benchmark):
    from semclust import ops

    x = _unit_rows(256, 32, _DEV, torch.float32, 5)
    with _triton_or_skip():
        benchmark(lambda: (ops.knn(x, 10), _sync(_DEV)))


def test_knn_faiss(benchmark):
    import pytest

    faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed")
    xh = _unit_rows(256, 32, torch.device("cpu"), torch.float32, 5).numpy()
    index = faiss.IndexFlatIP(32)
    index.add(xh)
    benchmark(lambda: index.search(xh, 11))


def test_kmeans_semclust(benchmark):
    from semclust import ops

    x = _unit_rows(2000, 32, _DEV, torch.float32, 6, clusters=10)
    benchmark(lambda: ops.kmeans(x, 10, iters=10, restarts=1, seed=0, tol=-math.inf))


def test_kmeans_faiss(benchmark):
    import pytest

    faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed")
    xh = _unit_rows(2000, 32, torch.device("cpu"), torch.float32, 6, clusters=10).numpy()
    benchmark(lambda: faiss.Kmeans(32, 10, niter=10, spherical=True, seed=0).train(xh))


def test_kmeans_sklearn(benchmark):
    import pytest

    pytest.importorskip("sklearn", reason="scikit-learn is not installed")
    from sklearn.cluster import KMeans

    xh = _unit_rows(2000, 32, torch.device("cpu"), torch.float32, 6, clusters=10).numpy()
    benchmark(lambda: KMeans(10, n_init=1, max_iter=10, tol=0.0, random_state=0).fit(xh))


if __name__ == "__main__":
    sys.exit(main())
