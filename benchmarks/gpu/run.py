"""Everything only a GPU shows, in one command that fits one device call (benchmarks/gpu/run.sh).

    python -m benchmarks.gpu.run --out DIR [--dry-run] [--budget 480] [--only a,b]
                                 [--timeout PART=S] [--simulate PART=fail|hang]
    python -m benchmarks.gpu.run --report OUT/gpu_results.json    # a RESULTS.md section

Parts, in order (each in its own child process with its own timeout; a failed, timed-out
or skipped part never stops the ones after it):
  install       the carried wheels (benchmarks/gpu/wheels, from fetch_wheels.sh) into
                WORK/site, ahead on every child's PYTHONPATH; the checkout itself is
                imported from its folder (run.sh puts it on PYTHONPATH), so the machine's
                torch is never touched
  env           card, compute capability, torch / triton / CUDA / nvcc versions, optional
                packages; decides whether the CUDA parts can run
  build_ext     the C++ extension, CPU part then CUDA part for this card's architecture
  tests_triton  tests/kernels on CUDA (the Triton kernels compiled, bf16 included)
  tests_ext     benchmarks/gpu/test_cuda_ext.py: the extension's CUDA fused_step, which
                nothing under tests/ runs (their ext tests use CPU tensors, as in CI)
  roofline      datasheet ceilings of the card and measured copy / GEMM rates
  bench_ops     semclust/bench/ops.py on CUDA, with % of roofline per row
  bench_step    semclust/bench/step.py on CUDA (the stage-1 step, eager vs ext)
  scale         semclust/bench/scale.py: a streamed 1M-row fit on the GPU, per phase
  tests_pipeline  tests/test_api.py and tests/test_streaming_fit.py, whose fits default to
                the GPU where there is one; last, on the time the others leave
tests/ops is left out: its backend matrix runs on CPU tensors only, as in CI.

Time: the whole run stays within --budget seconds (480: a 10-minute device call with
room for the machine's start-up and the transfers). A part may run for its own timeout,
cut so that every later part keeps its floor (the least time worth starting it with); a
part whose floor no longer fits is skipped ("budget"). Time a part leaves unused goes to
the ones after it, the 1M fit last.

--dry-run runs every part on the CPU at tiny sizes (the Triton tests under the
interpreter, the CPU extension only), so the orchestration is tested without a GPU
(tests/test_gpu_script.py). Without --dry-run and without CUDA the CUDA parts are
skipped with "no CUDA".

Results: OUT/gpu_results.json (rewritten after every part, so a killed run keeps what
finished), OUT/run.log (every child's output), the junit XML of the three test parts
and the JSON of each benchmark: 8 files, the most the device tool brings back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
WHEELS = Path(__file__).resolve().parent / "wheels"
SCHEMA = 1
STATUSES = ("ok", "failed", "timeout", "skipped")


class Skip(Exception):
    """The part does not apply here; the message says why."""


class PartFailed(Exception):
    """The part ran and failed; `figures` keeps what it measured."""

    def __init__(self, message: str, figures: Optional[dict] = None) -> None:
        super().__init__(message)
        self.figures = figures or {}


class PartTimeout(Exception):
    """The part's child outlived its allowance and was killed."""


@dataclass
class Part:
    name: str
    timeout: float  # the most it may take
    floor: float  # less time left than this: not worth starting
    fn: Callable[["Run"], dict]
    needs_cuda: bool = True  # outside a dry run: skipped without CUDA
    requires: tuple[str, ...] = ()  # parts of this run that must have passed (else it would redo them)


def allowance(remaining: float, timeout: float, floor: float, reserve: float) -> Optional[float]:
    """Seconds a part may run: its timeout, cut so that `reserve` (the floors of the parts
    after it) stays free; None when that leaves less than its own floor."""
    allowed = min(timeout, remaining - reserve)
    return allowed if allowed >= floor else None


class Run:
    """One run's state: options, the children's environment, what earlier parts found."""

    def __init__(self, out: Path, work: Path, dry: bool, simulate: dict[str, str]) -> None:
        self.out, self.work, self.dry, self.simulate = out, work, dry, simulate
        self.log_path = out / "run.log"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if not dry:
            # a broken extension build fails its tests instead of skipping them (tests/conftest.py)
            self.env["CI"] = "1"
        self.facts: dict = {}  # env part's findings: cuda, capability, device name
        self.ceilings: Optional[dict] = None  # roofline part's, for the benchmarks' percentages
        self.measured: Optional[dict] = None
        self.part = ""
        self.limit = 0.0  # the running part's allowance
        self.started = 0.0

    @property
    def cuda(self) -> bool:
        """The GPU is there and in use (a dry run stays on the CPU even where one is)."""
        return not self.dry and bool(self.facts.get("cuda"))

    def left(self) -> float:
        return self.limit - (time.monotonic() - self.started)

    def sh(self, args: Sequence[str]) -> tuple[int, str]:
        """Run a child in its own process group (pytest and bench_scale start children of
        their own: a timeout kills them all), its output appended to run.log. Returns
        (exit code, its output); raises PartTimeout when it outlives the part's time."""
        budget = self.left()
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {self.part}: {' '.join(map(str, args))}\n")
            log.flush()
            start = log.tell()
            proc = subprocess.Popen([str(a) for a in args], cwd=ROOT, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(budget, 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        with open(self.log_path) as log:
            log.seek(start)
            output = log.read()
        if rc is None:
            raise PartTimeout(f"killed after {budget:.0f} s; last output:\n{output[-1500:]}")
        return rc, output

    def python(self, *args: str) -> tuple[int, str]:
        return self.sh([sys.executable, *args])


def _last_json(output: str) -> dict:
    """The last line of a child's output that parses as a JSON object."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise PartFailed(f"no JSON result in the output:\n{output[-1500:]}")


def _checked(rc: int, output: str, what: str) -> str:
    if rc != 0:
        raise PartFailed(f"{what} exited with {rc}:\n{output[-2000:]}")
    return output


# ---- the parts ----------------------------------------------------------------------------


def part_install(run: Run) -> dict:
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        raise Skip(f"no wheels in {WHEELS.relative_to(ROOT)} (benchmarks/gpu/fetch_wheels.sh fetches them); "
                   "tests needing the missing packages skip")
    site = run.work / "site"
    _checked(*run.python("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                         "--upgrade", "--target", str(site), *map(str, wheels)), "pip install")
    # ahead of the checkout's folder but the image's own site-packages stay where they are:
    # only packages missing there are carried
    run.env["PYTHONPATH"] = os.pathsep.join([str(site), run.env["PYTHONPATH"]])
    return {"wheels": [w.name for w in wheels], "target": str(site)}


ENV_SCRIPT = r"""
import importlib, json, os, platform, shutil, subprocess
import torch
out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "cuda": torch.cuda.is_available(), "cpus": os.cpu_count()}
unavailable = {}  # module -> why it did not import: a broken install must show, not read as absent
try:
    import triton
    out["triton"] = triton.__version__
except Exception as e:  # not only ImportError: a triton that finds no usable CUDA raises others
    out["triton"] = None
    unavailable["triton"] = f"{type(e).__name__}: {e}"
if out["cuda"]:
    p = torch.cuda.get_device_properties(0)
    out.update(device_name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
               memory_gib=round(p.total_memory / 2**30, 1))
from semclust.csrc import library
home = library._find_cuda_home()  # the toolkit the extension's build will use
out["cuda_home"] = home
nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
if nvcc:
    out["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
optional = {}
for name in ("faiss", "open_clip", "sklearn", "hypothesis", "ftfy", "xdist"):
    try:
        optional[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as e:  # faiss and open_clip can fail past ImportError (a missing symbol, a CUDA mismatch)
        optional[name] = None
        unavailable[name] = f"{type(e).__name__}: {e}"
out["optional"] = optional
out["unavailable"] = unavailable
print(json.dumps(out))
"""


def part_env(run: Run) -> dict:
    rc, output = run.python("-c", ENV_SCRIPT)
    facts = _last_json(_checked(rc, output, "the environment probe"))
    run.facts = facts
    if run.cuda:
        # the extension for this card's architecture only: half the nvcc time of the default
        # "8.0;9.0". Set here, for every child, since the list is part of the build's cache
        # key: a rerun with --only finds the build an earlier run left on the machine
        run.env["TORCH_CUDA_ARCH_LIST"] = facts["capability"]
    return facts


# Both parts compile at once, each in a child of its own (build(load_it=False)) into the
# cache, since one nvcc file takes as long as the five C++ ones; the last build() only
# loads them, which checks that the CUDA kernels register onto the CPU part's operators.
BUILD_SCRIPT = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from semclust import csrc

def timed(cuda=False):
    part = "cuda" if cuda else "cpu"
    if csrc.is_built(part):  # build(load_it=False) would compile again
        return 0.0
    t = time.perf_counter()
    csrc.build(cuda=cuda, directory=csrc.build_dir(part), load_it=False)
    return round(time.perf_counter() - t, 1)

cuda = sys.argv[1] == "1"
out = {}
try:
    with ThreadPoolExecutor(2) as pool:
        cpu = pool.submit(timed)
        gpu = pool.submit(timed, cuda=True) if cuda else None
        out["cpu_build_s"] = cpu.result()
        if gpu is not None:
            out["cuda_build_s"] = gpu.result()
    t = time.perf_counter()
    csrc.build(cuda=cuda)
    out["load_s"] = round(time.perf_counter() - t, 1)
except csrc.ExtensionBuildError as e:
    out["error"] = str(e)
out["info"] = csrc.info()
print(json.dumps(out))
"""


def part_build_ext(run: Run) -> dict:
    run.env["MAX_JOBS"] = str(os.cpu_count() or 4)
    rc, output = run.python("-c", BUILD_SCRIPT, "1" if run.cuda else "0")
    figures = _last_json(_checked(rc, output, "the build"))
    if "error" in figures:
        raise PartFailed(figures.pop("error"), figures)
    figures["arch_list"] = run.env.get("TORCH_CUDA_ARCH_LIST")
    return figures


def _junit(path: Path) -> dict:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "not_passed": bad[:30], "junit": path.name}


def _pytest(run: Run, junit: str, args: Sequence[str]) -> dict:
    xml = run.out / junit
    xml.unlink(missing_ok=True)  # a crashed pytest must not leave an earlier run's counts
    workers = []
    if run.cuda and run.facts.get("optional", {}).get("xdist"):
        # parallel workers (pytest-xdist is in the GPU image): Triton compiles every kernel
        # variant afresh there, which is CPU work; the card runs several processes at once
        workers = ["-n", str(min(8, max(1, (run.facts.get("cpus") or 2) // 2)))]
    rc, output = run.python("-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", f"--junitxml={xml}",
                            *workers, *args)
    figures = _junit(xml) if xml.exists() else {}
    last = output.strip().splitlines()[-1] if output.strip() else ""
    if rc == 5 or (rc == 0 and figures.get("tests") == figures.get("skipped")):
        raise Skip(f"every test skipped or none collected: {last}")
    if rc != 0:
        raise PartFailed(f"pytest exited with {rc}: {last}", figures)
    return figures


def part_tests_triton(run: Run) -> dict:
    if run.dry:  # one small file under the interpreter (tests/conftest.py sets it without CUDA)
        return _pytest(run, "junit-triton.xml", ["tests/kernels/test_balance.py"])
    # not the "slow" compile check: it builds for sm_90 ahead of time, which running on the card does anyway
    return _pytest(run, "junit-triton.xml", ["tests/kernels", "-m", "not slow"])


def part_tests_ext(run: Run) -> dict:
    # the CUDA fused_step only: the extension's tests under tests/ put CPU tensors alone
    # through it, as CI does (on the CPU this module skips whole: status "skipped")
    return _pytest(run, "junit-ext.xml", ["benchmarks/gpu/test_cuda_ext.py"])


def part_tests_pipeline(run: Run) -> dict:
    if run.dry:
        return _pytest(run, "junit-pipeline.xml", ["tests/test_streaming_fit.py::test_unknown_knn_method_is_refused"])
    # SemanticClusterer's device defaults to cuda where there is one: the API and
    # streaming-fit tests that name no device run their fits on the GPU here. The API
    # tests build a tiny open_clip model, a package the image lacks unless carried
    files = ["tests/test_streaming_fit.py"]
    if run.facts.get("optional", {}).get("open_clip"):
        files.insert(0, "tests/test_api.py")
    figures = _pytest(run, "junit-pipeline.xml", [*files, "-m", "not slow"])
    if "tests/test_api.py" not in files:
        figures["left_out"] = "tests/test_api.py: no open_clip (benchmarks/gpu/fetch_wheels.sh, carry benchmarks/gpu/wheels)"
    return figures


def part_roofline(run: Run) -> dict:
    args = ["--device", "cpu", "--quick"] if run.dry else ["--device", "cuda"]
    rc, output = run.python("-m", "benchmarks.gpu.roofline", *args)
    figures = _last_json(_checked(rc, output, "the roofline probe"))
    run.ceilings, run.measured = figures["ceilings"], figures["measured"]
    return figures


def part_bench_ops(run: Run) -> dict:
    from benchmarks.gpu import roofline

    # the full GPU sizes for the kernels; k-means at the quick size, since its faiss and
    # sklearn peers run on the host and would spend the GPU's minutes on the CPU
    calls = ([["--device", "cpu", "--quick", "--no-interpreter", "--ops", "assign,knn"]] if run.dry else
             [["--device", "cuda", "--ops", "assign,retrieve,knn"], ["--device", "cuda", "--quick", "--ops", "kmeans"]])
    reports = []
    for i, args in enumerate(calls):
        path = run.work / f"bench_ops_{i}.json"
        _checked(*run.python("-m", "semclust.bench.ops", *args, "--json", str(path)), "bench_ops")
        reports.append(json.loads(path.read_text()))
    merged = {"environment": reports[0]["environment"], "rows": [r for rep in reports for r in rep["rows"]]}
    (run.out / "bench_ops.json").write_text(json.dumps(merged, indent=1))
    figures = {"rows": len(merged["rows"]), "json": "bench_ops.json"}
    if run.ceilings is None:
        figures["roofline"] = "no ceilings: the roofline part did not finish"
    else:
        figures["roofline"] = [row for rep in reports for row in roofline.bench_ops_percent(rep, run.ceilings, run.measured)]
        figures["ceilings_source"] = run.ceilings["source"]
    return figures


def part_bench_step(run: Run) -> dict:
    from benchmarks.gpu import roofline

    path = run.out / "bench_step.json"
    args = ["--device", "cpu", "--quick"] if run.dry else ["--device", "cuda"]
    # torch.compile would recompile for each of the six shapes (minutes); eager vs ext is the GPU question
    _checked(*run.python("-m", "semclust.bench.step", *args, "--no-ops", "--no-compile", "--json", str(path)),
             "bench_step")
    report = json.loads(path.read_text())
    figures = {"json": path.name, "steps": [{"B": r["B"], "K": r["K"], "eager_ms": round(r["eager"]["median_ms"], 3),
                                             "ext_ms": round(r["ext"]["median_ms"], 3),
                                             "ext_speedup_step": round(r["ext_speedup_step"], 2),
                                             "ext_speedup_loss": round(r["ext_speedup_loss"], 2)} for r in report["steps"]]}
    if run.ceilings is not None:
        figures["roofline"] = roofline.bench_step_percent(report, run.ceilings)
    return figures


def part_scale(run: Run) -> dict:
    path = run.out / "bench_scale.json"
    if run.dry:
        args = ["--device", "cpu", "--n", "2000", "--k", "10", "--epochs", "1", "--kmeans-iters", "2"]
    else:  # exact kNN: on the GPU it is the fast path (IVF would run faiss on the host)
        args = ["--device", "cuda", "--n", "1000000", "--k", "1000"]
    _checked(*run.python("-m", "semclust.bench.scale", *args, "--restarts", "1", "--knn", "exact", "--no-peers",
                         "--workdir", str(run.work / "scale"), "--json", str(path)), "bench_scale")
    row = json.loads(path.read_text())[0]
    phases = {p["phase"]: {k: round(v, 2) if isinstance(v, float) else v for k, v in p.items() if k != "phase"}
              for p in row["ours"]["phases"]}
    return {"n": row["n"], "k": row["k"], "kmeans_iters": row["kmeans_iters"], "epochs": row["epochs"],
            "knn": row["knn"], "fit_seconds": round(sum(p["seconds"] for p in phases.values()), 1),
            "phases": phases, "clusters_used": row["ours"]["clusters_used"], "json": path.name}


PARTS = [
    Part("install", 60, 5, part_install, needs_cuda=False),
    Part("env", 60, 5, part_env, needs_cuda=False),
    Part("build_ext", 240, 30, part_build_ext, needs_cuda=False),
    Part("tests_triton", 180, 30, part_tests_triton),
    Part("tests_ext", 90, 20, part_tests_ext, requires=("build_ext",)),
    Part("roofline", 45, 10, part_roofline),
    Part("bench_ops", 120, 20, part_bench_ops),
    Part("bench_step", 60, 15, part_bench_step, requires=("build_ext",)),
    Part("scale", 300, 120, part_scale),
    Part("tests_pipeline", 150, 30, part_tests_pipeline),
]


ALWAYS = ("install", "env")


def _hang(run: Run) -> dict:
    run.python("-c", "import time; time.sleep(3600)")
    raise PartFailed("the simulated hang returned")


def run_part(run: Run, part: Part, limit: float) -> dict:
    run.part, run.limit, run.started = part.name, limit, time.monotonic()
    entry: dict = {"status": "ok", "timeout_s": round(limit, 1), "figures": {}}
    try:
        mode = run.simulate.get(part.name)
        if mode == "fail":
            raise RuntimeError("simulated failure (--simulate)")
        if part.needs_cuda and not run.dry and not run.cuda:
            raise Skip("no CUDA")
        entry["figures"] = (_hang if mode == "hang" else part.fn)(run)
    except Skip as e:
        entry.update(status="skipped", reason=str(e))
    except PartTimeout as e:
        entry.update(status="timeout", error=str(e))
    except PartFailed as e:
        entry.update(status="failed", error=str(e), figures=e.figures)
    except Exception as e:  # noqa: BLE001 - a broken part is reported; the others still run
        entry.update(status="failed", error=f"{type(e).__name__}: {e}")
    entry["seconds"] = round(time.monotonic() - run.started, 2)
    return entry


def _summary(name: str, e: dict) -> str:
    f = e.get("figures") or {}
    if e["status"] != "ok":
        text = e.get("reason") or e.get("error") or ""
        return text.strip().splitlines()[0][:100] if text.strip() else ""
    if name == "env":
        card = f"{f['device_name']} sm_{f['capability'].replace('.', '')}" if f.get("cuda") else "no CUDA"
        return f"{card}, torch {f['torch']}, triton {f['triton']}"
    if name == "install":
        return f"{len(f['wheels'])} wheels"
    if name == "build_ext":
        return f"cpu {f.get('cpu_build_s')} s, cuda {f.get('cuda_build_s', '-')} s"
    if name.startswith("tests"):
        return f"{f['passed']} passed, {f['failures'] + f['errors']} failed, {f['skipped']} skipped"
    if name == "roofline":
        m, c = f["measured"], f["ceilings"]
        return (f"copy {m['copy_GBps']} GB/s of {c['bandwidth_GBps']}, bf16 GEMM {m['bf16_tflops']} TFLOP/s "
                f"of {c['bf16_tflops']} ({c['source']})")
    if name == "bench_ops" and isinstance(f.get("roofline"), list):
        best = {}
        for r in f["roofline"]:
            if r["impl"].startswith("semclust"):
                best[r["op"]] = max(best.get(r["op"], 0.0), r["pct_roofline"])
        return ", ".join(f"{op} {pct:.0f}% roofline" for op, pct in best.items())
    if name == "bench_step":
        s = f["steps"][-1]
        return f"B={s['B']} K={s['K']}: ext {s['ext_ms']} ms vs eager {s['eager_ms']} ms"
    if name == "scale":
        return f"N={f['n']} K={f['k']}: " + ", ".join(f"{p} {v['seconds']:.1f}s" for p, v in f["phases"].items())
    return ""


def table(results: dict) -> str:
    lines = [f"{'part':<14} {'status':<8} {'seconds':>8}  summary", "-" * 100]
    for name in results["order"]:
        e = results["parts"][name]
        lines.append(f"{name:<14} {e['status']:<8} {e['seconds']:>8.1f}  {_summary(name, e)}")
    lines.append(f"{'total':<14} {'':<8} {results['wall_s']:>8.1f}  budget {results['budget_s']:.0f} s")
    roof = results["parts"].get("bench_ops", {}).get("figures", {}).get("roofline")
    if isinstance(roof, list) and roof:
        lines += ["", f"{'op':<9} {'impl':<30} {'dtype':<5} {'ms':>9} {'TFLOP/s':>9} {'%peak':>7} {'%roof':>7} "
                      f"{'%gemm':>7}  bound"]
        lines += [f"{r['op']:<9} {r['impl'][:30]:<30} {r['dtype']:<5} {r['time_ms']:>9.3f} {r['tflops']:>9.4g} "
                  f"{r['pct_peak_flops']:>7.1f} {r['pct_roofline']:>7.1f} {r['pct_measured_gemm']:>7.1f}  {r['bound']}"
                  for r in roof]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """A section for benchmarks/RESULTS.md from gpu_results.json (`--report FILE`)."""
    parts = results["parts"]
    lines = [f"## GPU: `benchmarks/gpu/run.sh` ({results.get('card') or 'no CUDA'}, torch {results.get('torch')}, "
             f"triton {results.get('triton')}, {results['started'][:10]})", "",
             "| part | status | s | summary |", "| --- | --- | ---: | --- |"]
    lines += [f"| {n} | {parts[n]['status']} | {parts[n]['seconds']:.1f} | {_summary(n, parts[n]).replace('|', '/')} |"
              for n in results["order"]]
    roof = parts.get("bench_ops", {}).get("figures", {}).get("roofline")
    if isinstance(roof, list) and roof:
        src = parts["bench_ops"]["figures"].get("ceilings_source")
        lines += ["", f"bench_ops, % of the card's roofline (ceilings: {src}; %gemm: of the measured torch.matmul rate)",
                  "", "| op | impl | shape | dtype | ms | TFLOP/s | % peak | % roofline | % gemm | bound |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {r['op']} | {r['impl']} | {r['shape']} | {r['dtype']} | {r['time_ms']:.3f} | {r['tflops']} | "
                  f"{r['pct_peak_flops']} | {r['pct_roofline']} | {r['pct_measured_gemm']} | {r['bound']} |" for r in roof]
    step = parts.get("bench_step", {}).get("figures", {}).get("roofline")
    if step:
        lines += ["", "bench_step: the loss alone (ms) and its share of the bandwidth roof; step = heads + loss + Adam",
                  "", "| B | K | impl | loss ms | step ms | % bandwidth roof |", "| ---: | ---: | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['B']} | {r['K']} | {r['impl']} | {r['loss_ms']} | {r['step_ms']} | {r['pct_bandwidth_roofline']} |"
                  for r in step]
    scale = parts.get("scale", {}).get("figures", {}).get("phases")
    if scale:
        f = parts["scale"]["figures"]
        lines += ["", f"scale: N={f['n']} K={f['k']}, {f['knn']} kNN, {f['kmeans_iters']} k-means iterations, "
                      f"{f['epochs']} epochs", "", "| phase | s | peak RSS MiB | CUDA peak MiB |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {p} | {v['seconds']} | {v.get('peak_rss_mb')} | {v.get('cuda_peak_mb', '-')} |"
                  for p, v in scale.items()]
    return "\n".join(lines)


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        for pair in filter(None, item.split(",")):
            name, sep, value = pair.partition("=")
            if not sep or name not in {p.name for p in PARTS}:
                raise SystemExit(f"{what} takes PART=VALUE with PART one of {[p.name for p in PARTS]}; got {pair!r}")
            out[name] = value
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="folder for the results (the device tool's $OUT)")
    ap.add_argument("--report", metavar="JSON", help="print a RESULTS.md section from a gpu_results.json, run nothing")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "semclust-gpu-work"),
                    help="scratch folder: the installed wheels, the 1M-row store (~1 GB) and its workspace")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    ap.add_argument("--only", default="", help="comma-separated parts to run (default: all); install and env "
                                                "always run, since every part depends on what they find")
    ap.add_argument("--timeout", action="append", default=[], metavar="PART=S", help="a part's own timeout")
    ap.add_argument("--simulate", action="append", default=[os.environ.get("SEMCLUST_GPU_SIMULATE", "")],
                    metavar="PART=fail|hang", help="make a part fail, or hang until its timeout (tests)")
    a = ap.parse_args(argv)
    if a.report:
        print(markdown(json.loads(Path(a.report).read_text())))
        return 0
    if not a.out:
        ap.error("--out is required (or --report)")
    t0 = time.monotonic()
    simulate = _pairs(a.simulate, "--simulate")
    if set(simulate.values()) - {"fail", "hang"}:
        raise SystemExit("--simulate takes PART=fail or PART=hang")
    timeouts = {k: float(v) for k, v in _pairs(a.timeout, "--timeout").items()}
    only = [s for s in a.only.split(",") if s]
    unknown = set(only) - {p.name for p in PARTS}
    if unknown:
        raise SystemExit(f"--only: unknown parts {sorted(unknown)}; choose from {[p.name for p in PARTS]}")
    parts = [p for p in PARTS if not only or p.name in only or p.name in ALWAYS]
    out, work = Path(a.out).resolve(), Path(a.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    run = Run(out, work, a.dry_run, simulate)
    (out / "run.log").write_text("")
    results = {"schema": SCHEMA, "dry_run": a.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "budget_s": a.budget, "host_python": platform.python_version(), "order": [p.name for p in parts],
               "parts": {}, "wall_s": 0.0}
    # a timeout given below a part's floor lowers the floor with it
    timeout = {p.name: timeouts.get(p.name, p.timeout) for p in parts}
    floor = {p.name: min(p.floor, timeout[p.name]) for p in parts}
    for i, part in enumerate(parts):
        remaining = a.budget - (time.monotonic() - t0)
        reserve = sum(floor[p.name] for p in parts[i + 1:])
        limit = allowance(remaining, timeout[part.name], floor[part.name], reserve)
        unmet = [f"{r} ({results['parts'][r]['status']})" for r in part.requires
                 if r in results["parts"] and results["parts"][r]["status"] != "ok"]
        if unmet:
            entry = {"status": "skipped", "seconds": 0.0, "timeout_s": 0.0, "figures": {},
                     "reason": f"needs {', '.join(unmet)}"}
        elif limit is None:
            entry = {"status": "skipped", "seconds": 0.0, "timeout_s": 0.0, "figures": {},
                     "reason": f"budget: {remaining:.0f} s left, {reserve:.0f} s of it kept for the later parts' "
                               f"floors, {part.name} needs {floor[part.name]:.0f} s"}
        else:
            print(f"[{time.monotonic() - t0:6.1f} s] {part.name} (up to {limit:.0f} s) ...", flush=True)
            entry = run_part(run, part, limit)
            print(f"[{time.monotonic() - t0:6.1f} s] {part.name}: {entry['status']}", flush=True)
        results["parts"][part.name] = entry
        results["wall_s"] = round(time.monotonic() - t0, 1)
        facts = run.facts
        results.update(card=facts.get("device_name"), torch=facts.get("torch"), triton=facts.get("triton"),
                       python=facts.get("python"))
        (out / "gpu_results.json").write_text(json.dumps(results, indent=1))
    print(table(results), flush=True)
    return 0 if all(e["status"] in ("ok", "skipped") for e in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
