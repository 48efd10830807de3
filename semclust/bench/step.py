"""The fused stage-1 training step and the extension's CPU op paths against their peers.

    python -m semclust.bench.step [--quick] [--threads N] [--device cpu|cuda] [--json out.json]

Step rows (batch B in {512, 4096}, D = 512, K in {10, 100, 1000}; hidden 512, Adam):
  eager     heads forward on [2B, D] x 2, the Python loss graph of `stage1.train_stage1`
            (`semclust.ops.reference.fused_step`), backward, optimiser step
  compile   the same step with heads + loss under torch.compile (inductor); compile time is
            reported apart and not counted; skipped where it fails on the machine
  ext       the heads, then `fused_step` (the C++ extension: loss and logit gradients in
            one call), backward through the heads, optimiser step
  The "loss" columns time the part the extension replaces (loss forward + backward to the
  logits) on the same inputs; the step columns include the heads' GEMMs, which are the
  same torch calls on every path.
  Floors: "GEMMs" times the heads' forward and backward GEMMs alone ("ext / GEMMs", the
  roofline of issue 11); "loss GEMMs" the GEMMs the loss itself needs (soft centres,
  centre logits and target, the cluster-level Gram matrices, with their gradients), so
  "ext / all GEMMs" is the step over every GEMM it has to run.
  loop      the step as training runs it: `stage1.train_stage1` (the default backend
            choice, the prefetch thread's gathers, the centre EMA, the balance prior) on
            16 B random unit rows with random neighbour lists, wall-clock ms per step of
            its second epoch ("loop / GEMMs"). The isolated steps above free everything
            they allocate, so glibc hands the heap's top back and the next step faults
            its pages in again (~750 faults a step at B = 512, K = 10); in training the
            tensors kept across steps hold the heap (~130 a step), so the two can differ.

With --device cuda the step runs on the GPU (ext = the CUDA part of the extension), timed
with a synchronize after each call; the op rows below are the extension's CPU paths and
are left out there.

Op rows (CPU): assign / knn through the extension vs a bare GEMM of the same shape (the
floor: x c^T for assign; the chunked N x N product into a reused buffer for knn), vs
the torch backend, and knn vs faiss-cpu IndexFlatIP (exact; it searches k+1 and drops
the query itself). center_update vs the torch backend.

Timing: median of the repeats (min in the JSON) after a warm-up call, the candidates
timed round-robin. Wall clock by default; the machine this was written on has 2 cores
shared with other work, so also compare `--threads 1 --clock cpu` (one thread on every
path, faiss's own BLAS threads included, CPU time so waiting for the other jobs is not
counted).
Memory: growth of the process's peak RSS during one call, after malloc_trim and a
reset of the peak (/proc/self/clear_refs; whole-process, Linux/glibc only; "-" elsewhere);
on CUDA, torch.cuda.max_memory_allocated above the allocation before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from semclust.runtime.mmap import trim_heap

# ---- measurement -------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in f) if k in ("VmHWM", "VmRSS")}


def peak_mb(fn: Callable[[], object]) -> Optional[float]:
    """Peak RSS growth (MiB) of one call, or None where /proc is not available; on CUDA
    (--device cuda) the growth of the CUDA allocator's peak instead."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        fn()
        torch.cuda.synchronize(DEVICE)
        return round((torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20, 1)
    try:
        trim_heap()  # a call's allocations show in the RSS, not served from memory an earlier call left
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _proc_status()["VmRSS"]
        fn()
        return round(max(_proc_status()["VmHWM"] - base, 0) / 2**20, 1)
    except OSError:
        return None


def timeit(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    return timeit_many({"f": fn}, repeats)["f"]


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of the whole process)
DEVICE = torch.device("cpu")  # --device


def _sync() -> None:
    """Wait for the GPU, so that a timed call includes its kernels, not just their launch."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timeit_many(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Time several callables round-robin (one call of each per round), so that load
    from other processes on a shared machine hits them alike."""
    for fn in fns.values():
        fn()  # warm-up
    _sync()
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = CLOCK()
            fn()
            _sync()
            ts[name].append(CLOCK() - t)
    return {name: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)} for name, v in ts.items()}


# ---- the stage-1 step ---------------------------------------------------------------------

LOSS_KW = dict(cluster_tau=0.5, center_tau=0.1, w_instance=0.5, w_assignment=1.0, w_center=1.0, w_balance=2.0)


def _step_inputs(b: int, k: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda n: F.normalize(torch.randn(n, d, generator=g), dim=1)  # noqa: E731
    u, v = unit(b), unit(b)
    x_i, x_t = torch.cat([u, unit(b)]), torch.cat([v, unit(b)])  # batch rows, then neighbour rows
    centers = unit(k)
    shares = torch.rand(k, generator=g) + 0.5
    prior = shares / shares.sum()  # a non-uniform balance prior (KL(p_bar || prior))
    return tuple(t.to(DEVICE) for t in (x_i, x_t, u, v, centers, prior))


def bench_step(b: int, k: int, d: int, repeats: int, with_compile: bool) -> dict:
    from semclust.csrc.ops import fused_step as fused_step_ext
    from semclust.method.heads import Heads
    from semclust.config import Stage1Config
    from semclust.ops.reference import fused_step as fused_step_reference
    from semclust.ops.reference import stage1_loss

    x_i, x_t, u, v, centers, prior = _step_inputs(b, k, d)
    torch.manual_seed(0)
    heads = Heads(d, k, 512).to(DEVICE)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3, fused=True)  # as stage 1's

    def make_step(loss_fn):
        def step():
            opt.zero_grad(set_to_none=True)
            li, lt = heads.image(x_i), heads.text(x_t)
            loss = loss_fn(li, lt, u, v, centers, prior, **LOSS_KW).loss
            loss.backward()
            opt.step()
            return loss
        return step

    def make_loss_only(loss_fn):
        li0, lt0 = heads.image(x_i).detach(), heads.text(x_t).detach()

        def run():
            li, lt = li0.clone().requires_grad_(), lt0.clone().requires_grad_()
            loss_fn(li, lt, u, v, centers, prior, **LOSS_KW).loss.backward()
            return li.grad
        return run

    def heads_gemms():
        """The floor of a step: the heads' forward and backward GEMMs alone, on the same
        shapes (per head: x W1^T, h W2^T, then dW2 = g^T h, dh = g W2, dW1 = dh^T x)."""
        for head, x in ((heads.image, x_i), (heads.text, x_t)):
            w1, w2 = head.net[0].weight.detach(), head.net[3].weight.detach()
            h = x @ w1.T
            g = h @ w2.T
            g.T @ h
            dh = g @ w2
            dh.T @ x

    def loss_gemms():
        """The loss's own GEMMs on the same shapes, forward and backward to the logits'
        inputs (what an ideal fused loss still computes): the soft centres P^T u, Q^T v
        and their gradients, the K x K centre logits, the centre target v c^T, and the
        two cluster-level InfoNCE Gram matrices Z Z^T (Z = [P; Q_n]^T, [2K, B]) with
        their gradients (G + G^T) Z. Inputs are made outside: GEMMs alone are timed."""
        for a, x in ((p0, u), (q0, v)):
            c = a.T @ x
            c @ x.T  # dP = dC x^T, [K, B]
        s = ci0 @ ct0.T
        s @ ct0, s.T @ ci0
        v @ centers.T
        for z in grams:
            gram = z @ z.T
            gram @ z

    row = {"B": b, "K": k, "D": d}
    impls = {"eager": fused_step_reference, "ext": fused_step_ext}
    columns = Stage1Config().cluster_columns
    if 0 < columns < k:
        # what training runs at this K: the torch loss with the cluster-level terms over a
        # random subset of clusters (stage1.cluster_columns), drawn afresh each step
        gen = torch.Generator().manual_seed(0)

        def subset_step(li, lt, u_, v_, centers_, prior_, **kw):
            (p, p_n), (q, q_n) = torch.softmax(li, 1).split(b), torch.softmax(lt, 1).split(b)
            cols = torch.randperm(k, generator=gen)[:columns].to(li.device)
            loss, _, _ = stage1_loss(p, q, p_n, q_n, u_, v_, centers_, prior_, columns=cols, **kw)
            return SimpleNamespace(loss=loss)

        impls["subset"] = subset_step
        row["subset_columns"] = columns
    if with_compile:
        try:
            compiled = torch.compile(fused_step_reference)
            t0 = time.perf_counter()
            make_step(compiled)()
            make_loss_only(compiled)()
            row["compile"] = {"compile_s": round(time.perf_counter() - t0, 1)}
            impls["compile"] = compiled
        except Exception as e:  # inductor needs a working compiler toolchain
            row["compile"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    with torch.no_grad():
        (p0, pn0), (q0, qn0) = (torch.softmax(t, 1).split(b) for t in (heads.image(x_i), heads.text(x_t)))
        ci0, ct0 = p0.T @ u, q0.T @ v
        grams = [torch.cat([p0.T, qn0.T]).contiguous(), torch.cat([q0.T, pn0.T]).contiguous()]
    steps = timeit_many({**{name: make_step(fn) for name, fn in impls.items()}, "gemms": heads_gemms,
                         "loss_gemms": loss_gemms}, repeats)
    row["gemms"], row["loss_gemms"] = steps.pop("gemms"), steps.pop("loss_gemms")
    loss_only = timeit_many({name: make_loss_only(fn) for name, fn in impls.items()}, repeats)
    for name, fn in impls.items():
        row.setdefault(name, {}).update(steps[name])
        row[name]["loss_only"] = loss_only[name]
        row[name]["peak_mb"] = peak_mb(make_step(fn))
    all_gemms = row["gemms"]["median_ms"] + row["loss_gemms"]["median_ms"]
    for name in impls:  # the roofline: step time over its GEMMs' time (1.0 = nothing but the GEMMs)
        row[name]["over_gemms"] = row[name]["median_ms"] / row["gemms"]["median_ms"]
        row[name]["over_all_gemms"] = row[name]["median_ms"] / all_gemms
    try:
        row["loop"] = bench_loop(b, k, d)
        row["loop"]["over_gemms"] = row["loop"]["median_ms"] / row["gemms"]["median_ms"]
    except Exception as e:  # a training run has more parts than the step (k-means, prefetch): one row's
        # failure there is reported with the row, not lost with the whole run (the GPU script runs once)
        row["loop"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    row["ext_speedup_step"] = row["eager"]["median_ms"] / row["ext"]["median_ms"]
    row["ext_speedup_loss"] = row["eager"]["loss_only"]["median_ms"] / row["ext"]["loss_only"]["median_ms"]
    return row


def bench_loop(b: int, k: int, d: int, steps: int = 16) -> dict[str, float]:
    """Wall-clock ms per step of `stage1.train_stage1`'s second epoch (the first warms the
    allocator and the caches) on `steps` batches of B random unit rows, K clusters."""
    from semclust.config import Stage1Config
    from semclust.method.stage1 import train_stage1

    g = torch.Generator().manual_seed(1)
    n = steps * b
    u, v = (F.normalize(torch.randn(n, d, generator=g), dim=1).to(DEVICE) for _ in range(2))
    ni, nt = (torch.randint(n, (n, 10), generator=g) for _ in range(2))
    cfg = Stage1Config(epochs=2, cluster_visits=0, batch_size=b)
    history = train_stage1(u, v, k, ni, nt, cfg, progress=False).history
    ms = 1e3 * history[-1]["seconds"] / steps
    return {"median_ms": ms, "min_ms": ms}


# ---- the CPU op paths ---------------------------------------------------------------------


def bench_ops(quick: bool, repeats: int) -> list[dict]:
    from semclust.ops import reference as R

    E = torch.ops.semclust_ext
    g = torch.Generator().manual_seed(0)
    unit = lambda n, d: F.normalize(torch.randn(n, d, generator=g), dim=1)  # noqa: E731
    rows = []
    d = 512
    for n, k in ([(20000, 10), (20000, 100)] if quick else [(50000, 10), (50000, 100), (20000, 1000)]):
        x, c = unit(n, d), unit(k, d)
        rows_per_tile = min(1024, max(16, (256 * 1024) // k))  # the ext kernel's tile (csrc/cpu_common.h)
        tile = torch.empty(rows_per_tile, k)

        def gemm_tiles():  # the kernel's own floor: the same GEMM, in its tiles, no epilogue
            for s in range(0, n, rows_per_tile):
                q = x[s : s + rows_per_tile]
                torch.mm(q, c.T, out=tile[: q.shape[0]])

        ext_t = timeit(lambda: E.assign(x, c, 0.1, False), repeats)
        gemm_t = timeit(lambda: x @ c.T, repeats)
        tiles_t = timeit(gemm_tiles, repeats)
        torch_t = timeit(lambda: R.assign(x, c, 0.1), repeats)
        rows.append({"op": "assign", "shape": f"N={n} K={k} D={d}", "ext_ms": ext_t["median_ms"],
                     "gemm_ms": gemm_t["median_ms"], "torch_ms": torch_t["median_ms"],
                     "ext_over_gemm": ext_t["median_ms"] / gemm_t["median_ms"],
                     "tiles_ms": tiles_t["median_ms"], "ext_over_tiles": ext_t["median_ms"] / tiles_t["median_ms"],
                     "speedup_vs_torch": torch_t["median_ms"] / ext_t["median_ms"],
                     "ext_peak_mb": peak_mb(lambda: E.assign(x, c, 0.1, False)),
                     "torch_peak_mb": peak_mb(lambda: R.assign(x, c, 0.1))})
    try:
        import faiss
    except ImportError:
        faiss = None
    for n, kk, dd in ([(5000, 50, 512)] if quick else [(20000, 50, 512), (20000, 50, 64)]):
        x = unit(n, dd)
        buf = torch.empty(4096, n)

        def gemm():
            for s in range(0, n, 4096):
                q = x[s : s + 4096]
                torch.mm(q, x.T, out=buf[: q.shape[0]])

        reps = max(1, repeats // 2)
        ext_t = timeit(lambda: E.knn(x, None, kk, True), reps)
        gemm_t = timeit(gemm, reps)
        row = {"op": "knn", "shape": f"N={n} D={dd} k={kk}", "ext_ms": ext_t["median_ms"], "gemm_ms": gemm_t["median_ms"],
               "ext_over_gemm": ext_t["median_ms"] / gemm_t["median_ms"],
               "ext_peak_mb": peak_mb(lambda: E.knn(x, None, kk, True))}
        if quick or n <= 5000:
            torch_t = timeit(lambda: R.knn(x, kk), 1)
            row["torch_ms"] = torch_t["median_ms"]
            row["speedup_vs_torch"] = torch_t["median_ms"] / ext_t["median_ms"]
        if faiss is not None:
            faiss.omp_set_num_threads(torch.get_num_threads())
            index = faiss.IndexFlatIP(dd)
            xn = x.numpy()
            index.add(xn)
            fa_t = timeit(lambda: index.search(xn, kk + 1), reps)
            row["faiss_ms"] = fa_t["median_ms"]
            row["faiss_over_ext"] = fa_t["median_ms"] / ext_t["median_ms"]
        rows.append(row)
    for n, k in ([(20000, 100)] if quick else [(100000, 10), (100000, 300), (512, 10)]):
        x, lab = unit(n, d), torch.randint(k, (n,), generator=g)
        p, prev = torch.softmax(torch.randn(n, k, generator=g), 1), unit(k, d)
        for mode, e_fn, t_fn in (
            ("hard", lambda: E.center_update(x, k, lab, None, True, None, 0.0), lambda: R.center_update(x, k, labels=lab)),
            ("soft+EMA", lambda: E.center_update(x, k, None, p, True, prev, 0.9),
             lambda: R.center_update(x, k, probs=p, previous=prev, momentum=0.9)),
        ):
            ext_t, torch_t = timeit(e_fn, repeats), timeit(t_fn, repeats)
            rows.append({"op": f"center_update {mode}", "shape": f"N={n} K={k} D={d}", "ext_ms": ext_t["median_ms"],
                         "torch_ms": torch_t["median_ms"], "speedup_vs_torch": torch_t["median_ms"] / ext_t["median_ms"]})
    return rows


# ---- report --------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return str(v)


def _table(rows: list[dict], cols: Sequence[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), "-" * (sum(widths) + 2 * len(widths)), *(line(r) for r in cells)])


def _flat(r: dict) -> dict:
    """One printed row of a `bench_step` result ("subset": the torch loss with the
    cluster-level terms over stage1.cluster_columns random clusters, where K exceeds it)."""
    return {"B": r["B"], "K": r["K"], "eager ms": r["eager"]["median_ms"], "compile ms": r.get("compile", {}).get("median_ms"),
            "ext ms": r["ext"]["median_ms"], "ext x step": r["ext_speedup_step"],
            "subset ms": r.get("subset", {}).get("median_ms"),
            "GEMMs ms": r["gemms"]["median_ms"], "eager / GEMMs": r["eager"]["over_gemms"],
            "ext / GEMMs": r["ext"]["over_gemms"], "loss GEMMs ms": r["loss_gemms"]["median_ms"],
            "ext / all GEMMs": r["ext"]["over_all_gemms"],
            "loop ms": r["loop"].get("median_ms"), "loop / GEMMs": r["loop"].get("over_gemms"),
            "eager loss ms": r["eager"]["loss_only"]["median_ms"], "ext loss ms": r["ext"]["loss_only"]["median_ms"],
            "ext x loss": r["ext_speedup_loss"], "eager MB": r["eager"]["peak_mb"],
            "compile MB": r.get("compile", {}).get("peak_mb"), "ext MB": r["ext"]["peak_mb"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP / faiss threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--no-ops", action="store_true", help="skip the CPU op rows")
    p.add_argument("--no-steps", action="store_true", help="skip the step rows (only the CPU op rows)")
    p.add_argument("--shape", action="append", default=[], metavar="B,K", help="step shapes instead of the default set")
    p.add_argument("--repeats", type=int, default=0, help="timed calls per candidate (default 5, 2 with --quick)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or the process's CPU time (steadier with --threads 1 on a shared machine; "
                        "with more threads it also counts OpenMP's spin-waiting)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: the step on the GPU (the op rows are CPU-only)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    global CLOCK, DEVICE
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    DEVICE = torch.device(a.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if DEVICE.type == "cuda" and a.clock == "cpu":
        p.error("--clock cpu does not see GPU time; use the wall clock with --device cuda")
    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ["OPENBLAS_NUM_THREADS"] = str(a.threads)  # faiss-cpu's BLAS, read when it loads
    from semclust import csrc as ext

    ext.build(cuda=DEVICE.type == "cuda")
    if a.repeats < 0:
        p.error(f"--repeats must be >= 1, got {a.repeats}")
    repeats = a.repeats or (2 if a.quick else 5)
    shapes = [(512, 10), (512, 100)] if a.quick else [(b, k) for b in (512, 4096) for k in (10, 100, 1000)]
    if a.shape:
        try:
            shapes = [tuple(int(t) for t in sh.split(",")) for sh in a.shape]
        except ValueError:
            p.error(f"--shape takes B,K (two integers), got {a.shape}")
        if any(len(sh) != 2 or min(sh) < 2 for sh in shapes):
            p.error(f"--shape takes B,K with B, K >= 2, got {a.shape}")
    if a.no_steps:
        shapes = []
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "clock": a.clock, "torch": torch.__version__, "python": sys.version.split()[0],
            "ext": ext.build_name("cuda" if DEVICE.type == "cuda" else "cpu"),
            "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"}
    print(f"# {meta}")
    steps = []
    for b, k in shapes:
        row = bench_step(b, k, 512, repeats, with_compile=not a.no_compile)
        steps.append(row)
        flat = _flat(row)
        print(_table([flat], list(flat)), flush=True)
        if "error" in row.get("compile", {}):
            print(f"  torch.compile: {row['compile']['error']}")
        if "error" in row["loop"]:
            print(f"  loop (stage1.train_stage1): {row['loop']['error']}")
    cols = ["B", "K", "eager ms", "compile ms", "ext ms", "ext x step", "subset ms", "GEMMs ms", "eager / GEMMs",
            "ext / GEMMs", "loss GEMMs ms", "ext / all GEMMs", "loop ms", "loop / GEMMs", "eager loss ms", "ext loss ms", "ext x loss", "eager MB", "compile MB", "ext MB"]
    table_rows = [_flat(r) for r in steps]
    if table_rows:
        print("\nstage-1 step (median ms; 'x' = eager / ext)\n" + _table(table_rows, cols))
    ops_rows = [] if a.no_ops or DEVICE.type == "cuda" else bench_ops(a.quick, repeats)
    if ops_rows:
        print("\nCPU op paths (median ms)\n" + _table(ops_rows, ["op", "shape", "ext_ms", "gemm_ms", "tiles_ms", "torch_ms", "faiss_ms",
                                                                "ext_over_gemm", "ext_over_tiles", "speedup_vs_torch",
                                                                "faiss_over_ext"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "steps": steps, "ops": ops_rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
