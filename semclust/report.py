"""Per-phase wall time and peak memory of a long run, for logs and `history_`."""

from __future__ import annotations

import resource
import sys
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


class Phases:
    """``with phases("knn"): ...`` records the phase's seconds and the process's peak RSS
    at its end (and the CUDA peak when a GPU is in use)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float | str]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        row: dict[str, float | str] = {"phase": name, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
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
        lines = [f"{'phase':<14}{'seconds':>10}{'peak RSS MiB':>14}"]
        lines += [f"{r['phase']:<14}{r['seconds']:>10.1f}{r['peak_rss_mb']:>14.0f}" for r in rows]
        total = sum(float(r["seconds"]) for r in rows)
        lines.append(f"{'total':<14}{total:>10.1f}{max((r['peak_rss_mb'] for r in rows), default=0):>14.0f}")
        return "\n".join(lines)
