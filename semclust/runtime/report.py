"""Per-phase wall time and peak memory of a long run, for logs and `history_`."""

from __future__ import annotations

import resource
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (memory-mapped pages it
    touched count too, as the OS counts them). Linux: VmHWM, this program's own peak
    (getrusage's maximum would include the parent's resident set at fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _status_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return float("nan")


def _reset_peak() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _AnonSampler:
    """Highest anonymous (not file-backed) resident memory seen, sampled every 50 ms: the
    memory a run really needs, apart from memory-mapped pages the OS can drop."""

    def __init__(self) -> None:
        self.peak = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="semclust-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon"))


class Phases:
    """``with phases("knn"): ...`` records the phase's seconds, its peak RSS (VmHWM reset
    at the phase's start where Linux allows; else the process's peak so far), its peak
    anonymous RSS (sampled) and, with a GPU in use, the CUDA peak."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float | str]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        _reset_peak()
        anon = _AnonSampler()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            row: dict[str, float | str] = {"phase": name, "seconds": time.perf_counter() - t0,
                                           "peak_rss_mb": peak_rss_mb(), "peak_anon_mb": anon.stop()}
            if cuda:
                row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            self.rows.append(row)

    @property
    def seconds(self) -> dict[str, float]:
        return {str(r["phase"]): float(r["seconds"]) for r in self.rows}

    def table(self) -> str:
        return self.format(self.rows)

    @staticmethod
    def format(rows: list[dict]) -> str:
        """The rows as a small table: phase, seconds, peak RSS at its end; then the total."""
        lines = [f"{'phase':<14}{'seconds':>10}{'peak RSS MiB':>14}{'of it anon':>12}"]
        lines += [f"{r['phase']:<14}{r['seconds']:>10.1f}{r['peak_rss_mb']:>14.0f}{r.get('peak_anon_mb', float('nan')):>12.0f}"
                  for r in rows]
        total = sum(float(r["seconds"]) for r in rows)
        top = max((r["peak_rss_mb"] for r in rows), default=0)
        anon = max((r.get("peak_anon_mb", 0) for r in rows), default=0)
        lines.append(f"{'total':<14}{total:>10.1f}{top:>14.0f}{anon:>12.0f}")
        return "\n".join(lines)
