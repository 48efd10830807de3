"""semclust.bench.step's rows: the training loop's own step ("loop") beside the isolated one."""

from __future__ import annotations

import pytest

from semclust.bench import step


@pytest.fixture(scope="module", autouse=True)
def ext(built_ext):  # the bench times the ext step beside eager
    return built_ext


def test_a_row_has_the_training_loop_step_over_the_gemms():
    row = step.bench_step(16, 3, 8, 1, with_compile=False)
    loop = row["loop"]
    assert loop["median_ms"] > 0 and loop["over_gemms"] == pytest.approx(loop["median_ms"] / row["gemms"]["median_ms"])
    flat = step._flat(row)
    assert flat["loop ms"] == loop["median_ms"] and flat["loop / GEMMs"] == loop["over_gemms"]


def test_a_failing_loop_is_reported_with_its_row(monkeypatch):
    def boom(*_):
        raise RuntimeError("no training here\nsecond line")

    monkeypatch.setattr(step, "bench_loop", boom)
    row = step.bench_step(16, 3, 8, 1, with_compile=False)
    assert row["loop"] == {"error": "RuntimeError: no training here"}
    assert step._flat(row)["loop ms"] is None  # the rest of the row stands
    assert row["ext"]["median_ms"] > 0
