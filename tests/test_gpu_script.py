"""benchmarks/gpu/run.py, the one-call GPU check, exercised on the CPU: its dry run goes
through every part at tiny sizes, a failing or hanging part leaves the others running,
the time budget cuts and skips parts as documented, and the roofline arithmetic is right.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives beside semclust, not in it
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu import roofline  # noqa: E402
from benchmarks.gpu import run as gpu  # noqa: E402

PART_NAMES = [p.name for p in gpu.PARTS]


def dry_run(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 300) -> tuple[dict, str, float]:
    """(gpu_results.json, stdout, wall seconds) of `run.py --dry-run ARGS` into tmp_path."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu.run", "--dry-run", "--out", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work"), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    wall = time.monotonic() - t0
    assert (tmp_path / "out" / "gpu_results.json").exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((tmp_path / "out" / "gpu_results.json").read_text()), r.stdout, wall


def check_schema(results: dict, parts: list[str]) -> None:
    assert results["schema"] == gpu.SCHEMA and results["order"] == parts
    assert set(results["parts"]) == set(parts)
    for name, e in results["parts"].items():
        assert e["status"] in gpu.STATUSES, (name, e)
        assert isinstance(e["seconds"], (int, float)) and e["seconds"] >= 0, (name, e)
        assert isinstance(e["figures"], dict), (name, e)
        if e["status"] == "skipped":
            assert e["reason"], name
        if e["status"] in ("failed", "timeout"):
            assert e["error"], name
    for key in ("card", "torch", "triton", "python", "wall_s", "budget_s", "dry_run"):
        assert key in results, key


@pytest.mark.slow
def test_dry_run_goes_through_every_part_and_a_failure_stops_nothing(tmp_path):
    # bench_step's smallest CPU run (B=512, hidden 512) outlasts the 60 s meant for the GPU
    # on a busy 2-core machine
    results, stdout, wall = dry_run(tmp_path, "--timeout", "bench_step=240",
                                    env={"SEMCLUST_GPU_SIMULATE": "tests_triton=fail"})
    check_schema(results, PART_NAMES)
    parts = results["parts"]
    assert parts["tests_triton"]["status"] == "failed" and "simulated" in parts["tests_triton"]["error"]
    # everything after the failed part still ran, on the CPU
    for name in ("env", "build_ext", "roofline", "bench_ops", "bench_step", "scale", "tests_pipeline"):
        assert parts[name]["status"] == "ok", (name, parts[name])
    assert parts["tests_ext"]["status"] == "skipped"  # its module needs CUDA
    assert parts["env"]["figures"]["torch"] == results["torch"]
    assert parts["tests_pipeline"]["figures"]["passed"] == 1
    assert parts["roofline"]["figures"]["ceilings"]["source"] == "measured"  # a CPU is in no datasheet
    for row in parts["bench_ops"]["figures"]["roofline"]:
        assert row["pct_roofline"] > 0 and row["bound"] in ("compute", "memory")
    assert parts["bench_step"]["figures"]["roofline"]
    assert parts["scale"]["figures"]["n"] == 2000 and "stage1" in parts["scale"]["figures"]["phases"]
    for name in PART_NAMES:  # the printed table
        assert re.search(rf"^{name}\s+{parts[name]['status']}", stdout, re.M), name
    # what comes back from the device: at most 8 plain files with plain names
    files = list((tmp_path / "out").iterdir())
    assert len(files) <= 8 and all(f.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)
    assert wall < results["budget_s"]


def test_a_hanging_part_is_killed_at_its_timeout_and_the_next_runs(tmp_path):
    results, _, wall = dry_run(tmp_path, "--only", "roofline,bench_ops", "--simulate", "roofline=hang",
                               "--timeout", "roofline=2")
    check_schema(results, ["install", "env", "roofline", "bench_ops"])
    hung, nxt = results["parts"]["roofline"], results["parts"]["bench_ops"]
    assert hung["status"] == "timeout" and hung["seconds"] < 10 and re.match(r"killed after \d+ s", hung["error"])
    assert nxt["status"] == "ok"
    assert nxt["figures"]["roofline"].startswith("no ceilings")  # reported, not a crash
    assert wall < 120


def test_the_budget_keeps_later_floors_and_skips_what_no_longer_fits(tmp_path):
    # floors: install and env 5 s, roofline 10 s. Of a 12 s budget install could take
    # -3 s and env 2 s, under their floors: both are skipped; roofline, which fits, runs
    floors = {p.name: p.floor for p in gpu.PARTS}
    assert (floors["install"], floors["env"], floors["roofline"]) == (5, 5, 10)
    results, _, wall = dry_run(tmp_path, "--only", "roofline", "--budget", "12")
    check_schema(results, ["install", "env", "roofline"])  # install and env always run
    for name in ("install", "env"):
        e = results["parts"][name]
        assert e["status"] == "skipped" and e["reason"].startswith("budget") and e["seconds"] == 0
    roof = results["parts"]["roofline"]
    assert roof["status"] == "ok" and roof["timeout_s"] <= 12
    assert wall < 12 + 10  # the allowance bounds the part, plus interpreter start-up


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_a_real_run_skips_the_cuda_parts(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu.run", "--out", str(out), "--work", str(tmp_path / "w"),
                        "--only", "tests_ext,roofline"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((out / "gpu_results.json").read_text())
    check_schema(results, ["install", "env", "tests_ext", "roofline"])
    assert results["parts"]["env"]["status"] == "ok" and results["parts"]["env"]["figures"]["cuda"] is False
    for name in ("tests_ext", "roofline"):
        assert (results["parts"][name]["status"], results["parts"][name]["reason"]) == ("skipped", "no CUDA")


def test_allowance():
    assert gpu.allowance(remaining=400, timeout=60, floor=5, reserve=100) == 60  # its own timeout
    assert gpu.allowance(remaining=150, timeout=120, floor=20, reserve=100) == 50  # cut for the later floors
    assert gpu.allowance(remaining=110, timeout=120, floor=20, reserve=100) is None  # 10 s < its floor
    assert gpu.allowance(remaining=20, timeout=300, floor=20, reserve=0) == 20  # the last part takes the rest


def test_default_parts_fit_the_budget_with_every_floor():
    assert sum(p.floor for p in gpu.PARTS) < 480 * 0.7  # room beyond the floors for the parts' real work
    assert PART_NAMES.index("build_ext") < PART_NAMES.index("tests_ext") < PART_NAMES.index("bench_step")
    for p in gpu.PARTS:
        assert all(PART_NAMES.index(r) < PART_NAMES.index(p.name) for r in p.requires)


def test_simulate_and_timeout_arguments_are_checked():
    with pytest.raises(SystemExit, match="PART=VALUE"):
        gpu.main(["--out", "unused", "--simulate", "nosuchpart=fail"])
    with pytest.raises(SystemExit, match="fail or PART=hang"):
        gpu.main(["--out", "unused", "--simulate", "env=explode"])


@pytest.mark.parametrize("name,card,bandwidth", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 3350), ("NVIDIA H100 PCIe", "H100 PCIe", 2000),
    ("NVIDIA H100 NVL", "H100 NVL", 3900), ("NVIDIA H200", "H200 SXM", 4800),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB", 2039), ("NVIDIA A100-PCIE-40GB", "A100 40GB", 1555),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 1935),
])
def test_datasheet_lookup(name, card, bandwidth):
    sheet = roofline.datasheet(name)
    assert sheet["card"] == card and sheet["bandwidth_GBps"] == bandwidth
    assert roofline.ceilings(name, {})["source"] == "datasheet"


def test_unknown_card_uses_the_measured_ceilings():
    measured = {"copy_GBps": 300.0, "bf16_tflops": 120.0, "fp16_tflops": 121.0, "fp32_tflops": 30.0}
    assert roofline.datasheet("NVIDIA L4") is None
    c = roofline.ceilings("NVIDIA L4", measured)
    assert c["source"] == "measured" and c["bandwidth_GBps"] == 300.0 and c["fp16_tflops"] == 121.0


def test_roofline_percentages():
    ceil = {"bandwidth_GBps": 1000.0, "fp16_tflops": 100.0, "bf16_tflops": 100.0, "fp32_tflops": 10.0}
    measured = {"fp16_tflops": 50.0, "fp32_tflops": 5.0}
    n, k, d = 1 << 20, 1000, 512
    flops = 2.0 * n * k * d
    at_peak_ms = flops / 100e12 * 1e3  # compute-bound at K=1000: the roof is the FLOP rate
    report = {"environment": {"dtype": "float16"}, "rows": [
        {"op": "assign", "impl": "semclust triton", "shape": f"N={n} K={k} D={d}", "time_ms": 2 * at_peak_ms},
        {"op": "knn", "impl": "faiss IndexFlatIP (host)", "shape": "N=10 D=4 k=2", "time_ms": 1.0},
        {"op": "knn", "impl": "semclust triton", "shape": "N=10 D=4 k=2", "time_ms": None},
    ]}
    (row,) = roofline.bench_ops_percent(report, ceil, measured)  # host and untimed rows get none
    assert row["bound"] == "compute" and row["pct_roofline"] == pytest.approx(50, rel=1e-3)
    assert row["pct_peak_flops"] == pytest.approx(50, rel=1e-3) and row["pct_measured_gemm"] == pytest.approx(100, rel=1e-3)
    # memory-bound: a small-K assign is held by the bytes of x, not the FLOPs
    nbytes = roofline.ops_work("assign", {"N": n, "K": 2, "D": d}, 2)[1]
    report["rows"] = [{"op": "assign", "impl": "semclust triton", "shape": f"N={n} K=2 D={d}",
                       "time_ms": nbytes / 1000e9 * 1e3}]
    (row,) = roofline.bench_ops_percent(report, ceil, measured)
    assert row["bound"] == "memory" and row["pct_roofline"] == pytest.approx(100, rel=1e-3)
    step = {"steps": [{"B": 512, "K": 10, "D": 512, "eager": {"median_ms": 2.0, "loss_only": {"median_ms": 1.0}},
                       "ext": {"median_ms": 1.0, "loss_only": {"median_ms": 0.5}}}]}
    rows = roofline.bench_step_percent(step, ceil)
    assert [r["impl"] for r in rows] == ["eager", "ext"]
    assert rows[1]["pct_bandwidth_roofline"] == pytest.approx(2 * rows[0]["pct_bandwidth_roofline"], rel=1e-3)
