"""semclust.runtime.distributed: gloo runs on 2 and 3 local ranks against one process on all rows.

One spawn per world size runs every case on every rank (each rank holds a shard of the
same synthetic data) and saves its results; the tests compare them, in this process,
with the single-process computation on the whole data (world 1, no process group).
Both sides force the torch backend so the same kernels score the same dot products.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import semclust.runtime.distributed as D
import semclust.ops as ops

N, DIM, K = 600, 16, 5
N_ODD = 601  # uneven shards
KM = dict(k=K, iters=30, restarts=2, seed=3)
SAMPLE = 200  # < N: the subsampled seeding path
SPAWN_TIMEOUT_S = 120  # a hung collective fails the test instead of blocking CI
GROUP_TIMEOUT = timedelta(seconds=60)


def blobs(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n L2-normalised points round K random unit directions in DIM dimensions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(K, DIM, generator=g), dim=1)
    x = centres[torch.arange(n) % K] + 0.35 * torch.randn(n, DIM, generator=g)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def duplicates() -> torch.Tensor:
    """3 distinct rows, each 40 times: K=4 k-means must leave a cluster empty and re-seed it."""
    return blobs(3, seed=5).repeat(40, 1)


def reversed_shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank r holds the block shard_range gives rank world-1-r: offsets not in rank order."""
    return D.shard_range(n, world - 1 - rank, world)


# --------------------------------------------------------------------------- workers


def sharded_kmeans(x_local: torch.Tensor, *args, global_offset=None, **kw):
    return ops.kmeans(x_local, *args, reduce=D.ShardedRows(global_offset), **kw)


def _run_cases(rank: int, world: int) -> dict:
    out: dict = {}
    assert D.rank_world() == (rank, world)
    s, e = D.shard_range(N, rank, world)
    x = blobs(N)[s:e]
    out["kmeans"] = tuple(sharded_kmeans(x, **KM))
    out["kmeans_sampled"] = tuple(sharded_kmeans(x, init_sample=SAMPLE, **KM))
    rs, re_ = reversed_shard(N, rank, world)
    out["kmeans_reversed"] = tuple(sharded_kmeans(blobs(N)[rs:re_], init_sample=SAMPLE, global_offset=rs, **KM))
    s2, e2 = D.shard_range(N_ODD, rank, world)
    out["kmeans_random_fp16"] = tuple(sharded_kmeans(blobs(N_ODD, dtype=torch.float16)[s2:e2], init="random", **KM))
    ds, de = D.shard_range(120, rank, world)
    out["kmeans_empty"] = tuple(sharded_kmeans(duplicates()[ds:de], 4, iters=10, restarts=2, seed=0))

    out["gathered"] = D.all_gather_rows(torch.full((rank + 1, 2), float(rank)))
    out["reduced"] = D.all_reduce_sum(torch.tensor([float(rank), 1.0]))
    bad = blobs(N)[s:e].clone()
    if rank == world - 1:
        bad[0, 0] = float("nan")
    try:
        sharded_kmeans(bad, 3)
        out["error"] = None
    except ValueError as err:  # every rank must raise, none may wait in a collective
        out["error"] = str(err)
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = D.init_from_env(backend="gloo", timeout=GROUP_TIMEOUT)
    try:
        with ops.use_backend("torch"):
            out = _run_cases(rank, world)
        out["info"] = tuple(info)
        out["is_distributed"] = D.is_distributed()
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# Spawned ranks unpickle `_worker` by module name. Under pytest's importlib import mode
# this file is `tests.test_distributed`, which a child cannot import; tests/ is on
# sys.path (conftest), so the children import it by its file name instead.
_worker.__module__ = "test_distributed"
sys.modules.setdefault("test_distributed", sys.modules[__name__])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, out_dir: Path) -> list[dict]:
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{world} gloo ranks did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory) -> list[dict]:
    return _spawn(request.param, tmp_path_factory.mktemp(f"world{request.param}"))


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):
        yield


def assert_same_kmeans(ranks: list[dict], key: str, want, order=None, objective_atol=1e-6, centre_atol=1e-5,
                       occupied_only=False) -> None:
    """Every rank holds `want`'s centres and objective; the ranks' labels, in shard order, are want's.

    The objective (a float64 sum of float32 chunk sums) depends on where the shards split,
    hence 1e-6. `occupied_only`: a cluster left empty keeps one of several rows that are
    all (up to rounding) 0 away from their centres, so only the occupied centres must agree.
    """
    labels = torch.cat([ranks[i][key][1] for i in (order or range(len(ranks)))])
    assert torch.equal(labels, want.labels)
    keep = torch.bincount(want.labels, minlength=want.centers.shape[0]) > 0 if occupied_only else slice(None)
    for r in ranks:  # every rank holds the same centres and objective
        torch.testing.assert_close(r[key][0][keep], want.centers[keep], atol=centre_atol, rtol=0)
        assert float(r[key][2]) == pytest.approx(float(want.objective), abs=objective_atol)
    assert all(torch.equal(r[key][0], ranks[0][key][0]) and float(r[key][2]) == float(ranks[0][key][2]) for r in ranks)


# --------------------------------------------------------------------------- multi-rank


def test_ranks_joined_a_gloo_group(ranks):
    world = len(ranks)
    assert [tuple(r["info"]) for r in ranks] == [(i, world, torch.device("cpu")) for i in range(world)]
    assert all(r["is_distributed"] for r in ranks)


def test_kmeans_equals_one_process(ranks):
    want = sharded_kmeans(blobs(N), **KM)  # world 1: no process group
    assert_same_kmeans(ranks, "kmeans", want)


def test_kmeans_with_all_rows_sampled_equals_ops_kmeans(ranks):
    """N <= init_sample: the seeding sees every row in order, exactly as ops.kmeans seeds."""
    assert_same_kmeans(ranks, "kmeans", ops.kmeans(blobs(N), **KM))


def test_kmeans_subsampled_seeding_equals_one_process(ranks):
    want = ops.kmeans(blobs(N), init_sample=SAMPLE, **KM)
    assert_same_kmeans(ranks, "kmeans_sampled", want)
    # the subsample depends on the seed, not on how the rows are sharded
    assert_same_kmeans(ranks, "kmeans_reversed", want, order=list(reversed(range(len(ranks)))))


def test_kmeans_random_init_fp16_uneven_shards(ranks):
    """fp16 rows: each shard's means come back from center_update in fp16 (as ops.kmeans's
    do), so the centres agree to fp16 rounding (~2e-4 here) and the labels exactly."""
    x = blobs(N_ODD, dtype=torch.float16)
    assert_same_kmeans(ranks, "kmeans_random_fp16", ops.kmeans(x, init="random", **KM), centre_atol=1e-3)


def test_kmeans_reseeds_empty_clusters_identically(ranks, monkeypatch):
    emptied = []
    farthest = D.ShardedRows.farthest

    def spy(self, x, dist, e):
        emptied.append(e)
        return farthest(self, x, dist, e)

    monkeypatch.setattr(D.ShardedRows, "farthest", spy)
    want = sharded_kmeans(duplicates(), 4, iters=10, restarts=2, seed=0)
    assert max(emptied, default=0) > 0, "the duplicated rows should have emptied a cluster"
    assert_same_kmeans(ranks, "kmeans_empty", want, occupied_only=True)
    want = ops.kmeans(duplicates(), 4, iters=10, restarts=2, seed=0)
    assert_same_kmeans(ranks, "kmeans_empty", want, occupied_only=True)


def test_collectives(ranks):
    world = len(ranks)
    rows = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(world)])
    for r in ranks:
        assert torch.equal(r["gathered"], rows)
        assert torch.equal(r["reduced"], torch.tensor([float(sum(range(world))), float(world)]))


def test_a_bad_shard_raises_on_every_rank(ranks):
    world = len(ranks)
    for r in ranks:
        assert r["error"] is not None and f"rank {world - 1}" in r["error"] and "NaN" in r["error"]


# --------------------------------------------------------------------------- world 1


@pytest.mark.parametrize("n,world", [(0, 1), (5, 1), (10, 3), (11, 4), (3, 5), (601, 2), (10**7 + 3, 8)])
def test_shard_range_tiles_and_balances(n, world):
    ranges = [D.shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), "contiguous"
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        D.shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="world"):
        D.shard_range(10, 0, 0)


def test_world_one_needs_no_process_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_from_env(backend="gloo") == D.DistInfo(0, 1, torch.device("cpu"))
    assert not dist.is_initialized() and not D.is_distributed() and D.rank_world() == (0, 1)
    x = blobs(N)
    t = torch.ones(3)
    assert D.all_reduce_sum(t) is t and D.all_gather_rows(t) is t
    for kw in ({}, {"init_sample": SAMPLE}, {"init": "random"}):
        r = sharded_kmeans(x, **KM, **kw)
        want = ops.kmeans(x, **KM, **kw)  # one shard is ops.kmeans bit for bit (no empty cluster here)
        assert torch.equal(r.centers, want.centers) and torch.equal(r.labels, want.labels)
        assert float(r.objective) == float(want.objective)
    assert not dist.is_initialized()


def test_input_errors():
    x = blobs(20)
    with pytest.raises(ValueError, match="init_sample"):
        sharded_kmeans(x, 9, init_sample=8)
    with pytest.raises(ValueError, match=r"k must be in \[1, 20\]"):
        sharded_kmeans(x, 21)
    with pytest.raises(ValueError, match="empty"):
        sharded_kmeans(x[:0], 2)
    with pytest.raises(ValueError, match="tile"):
        sharded_kmeans(x, 3, global_offset=4)
    with pytest.raises(ValueError, match="NaN"):
        sharded_kmeans(torch.full((4, 3), float("nan")), 2)
    with pytest.raises(ValueError, match="backend"):
        D.init_from_env(backend="mpi")
