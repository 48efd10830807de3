"""Workspace: per-row arrays in memory or as memory-mapped .npy files that a later fit of
the same run finds again; fingerprint and as_tensor."""

import json
import os
import warnings

import numpy as np
import pytest
import torch

from semclust.runtime.files import TMP_PREFIX
from semclust.runtime.mmap import as_tensor, fingerprint
from semclust.runtime.workspace import LOCK, STATE, Workspace


def _rows(n, d, seed=0, dtype=torch.float32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _writer(src, chunk=3):
    """A `produce` that writes `src` into `out` a few rows at a time, as the phases do."""

    def produce(out, lo, hi):
        assert tuple(out.shape) == tuple(src.shape) and out.dtype == src.dtype
        for s in range(0, src.shape[0], chunk):
            out[s : s + chunk] = src[s : s + chunk]

    return produce


def _mapped_file(t):
    """The file whose memory map holds the tensor's data (Linux /proc/self/maps), or None."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) == 6 else None
    return None


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX))


def test_in_memory_round_trip():
    ws = Workspace(None)
    assert not ws.on_disk and ws.path("a") is None
    assert ws.get("a") is None
    src = _rows(10, 4)
    out = ws.fill("a", (10, 4), torch.float32, _writer(src))
    assert torch.equal(out, src)
    assert ws.get("a") is out
    assert ws.get("b") is None


def test_in_memory_failed_produce_publishes_nothing():
    ws = Workspace(None)

    def produce(out, lo, hi):
        out[:] = 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ws.fill("a", (3, 2), torch.float32, produce)
    assert ws.get("a") is None


def test_on_disk_fill_is_memory_mapped_and_found_again(tmp_path):
    root = tmp_path / "ws"
    ws = Workspace(root, "run-a")
    assert ws.on_disk and ws.path("x") == root / "x"
    assert ws.get("x") is None
    src = _rows(11, 5)
    out = ws.fill("x", (11, 5), torch.float32, _writer(src))
    assert torch.equal(out, src)
    np.testing.assert_array_equal(np.load(root / "x.npy"), src.numpy())
    # the result is a view of the published file, not a copy in memory
    if os.path.exists("/proc/self/maps"):
        assert _mapped_file(out) == str((root / "x.npy").resolve())
        assert _mapped_file(src) != str((root / "x.npy").resolve())  # the check can tell
    assert _leftovers(root) == []
    state = json.loads((root / STATE).read_text())
    assert state["run"] == "run-a" and state["arrays"]["x"] == {"shape": [11, 5], "dtype": "float32"}

    again = Workspace(root, "run-a", fresh=False)
    got = again.get("x")
    assert got is not None and torch.equal(got, src)
    if os.path.exists("/proc/self/maps"):
        assert _mapped_file(got) == str((root / "x.npy").resolve())
    assert again.get("y") is None


def test_fresh_drops_earlier_arrays(tmp_path):
    root = tmp_path / "ws"
    ws = Workspace(root, "run-a")
    ws.fill("x", (4, 2), torch.float32, _writer(_rows(4, 2)))
    ws.fill("y", (4, 3), torch.float32, _writer(_rows(4, 3, seed=1)))
    assert (root / "x.npy").exists() and (root / "y.npy").exists()
    again = Workspace(root, "run-a", fresh=True)
    assert again.get("x") is None and again.get("y") is None
    assert not (root / "x.npy").exists() and not (root / "y.npy").exists()
    assert json.loads((root / STATE).read_text())["arrays"] == {}


def test_another_run_is_refused_unless_fresh(tmp_path):
    root = tmp_path / "ws"
    src = _rows(6, 3)
    Workspace(root, "run-a").fill("x", (6, 3), torch.float32, _writer(src))
    with pytest.raises(ValueError, match="another run"):
        Workspace(root, "run-b", fresh=False)
    with pytest.raises(ValueError, match="another run"):
        Workspace(root, "run-b")  # fresh=False is the default
    # the refusal changed nothing: run-a still finds its array
    assert torch.equal(Workspace(root, "run-a").get("x"), src)

    ws = Workspace(root, "run-b", fresh=True)
    assert ws.get("x") is None
    assert json.loads((root / STATE).read_text())["run"] == "run-b"
    # and now run-a is the other run
    with pytest.raises(ValueError, match="another run"):
        Workspace(root, "run-a")
    new = _rows(6, 3, seed=5)
    ws.fill("x", (6, 3), torch.float32, _writer(new))
    assert torch.equal(Workspace(root, "run-b").get("x"), new)


def test_fresh_over_another_run_deletes_its_files(tmp_path):
    root = tmp_path / "ws"
    Workspace(root, "run-a").fill("x", (6, 3), torch.float32, _writer(_rows(6, 3)))
    Workspace(root, "run-b", fresh=True)
    assert not (root / "x.npy").exists()


def test_failed_produce_leaves_nothing(tmp_path):
    root = tmp_path / "ws"
    ws = Workspace(root, "run-a")
    seen = []

    def produce(out, lo, hi):
        out[:2] = 7.0
        seen.append(sorted(p.name for p in root.iterdir()))
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError, match="killed mid-way"):
        ws.fill("x", (5, 3), torch.float32, produce)
    # the array was being written under a temporary name ...
    assert any(name.startswith(TMP_PREFIX) for name in seen[0]) and "x.npy" not in seen[0]
    # ... which is gone, and nothing was published
    assert _leftovers(root) == []
    assert not (root / "x.npy").exists()
    assert ws.get("x") is None
    assert Workspace(root, "run-a").get("x") is None
    assert json.loads((root / STATE).read_text())["arrays"] == {}
    # the same name can be filled afterwards
    src = _rows(5, 3)
    assert torch.equal(ws.fill("x", (5, 3), torch.float32, _writer(src)), src)


def test_damaged_state_file(tmp_path):
    root = tmp_path / "ws"
    Workspace(root, "run-a").fill("x", (2, 2), torch.float32, _writer(_rows(2, 2)))
    (root / STATE).write_text('{"format": "semclust-workspace/1", "run": "run-a", "arr')
    with pytest.raises(ValueError, match="damaged"):
        Workspace(root, "run-a")
    (root / STATE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="damaged"):
        Workspace(root, "run-a")
    (root / STATE).write_text(json.dumps({"format": "something-else/9", "run": "run-a", "arrays": {}}))
    with pytest.raises(ValueError, match="not a"):
        Workspace(root, "run-a")


def test_array_of_wrong_shape_is_computed_again(tmp_path, caplog):
    """A file that is not what its record says is damaged: not finished, with a warning
    naming it, and the next fill replaces it."""
    root = tmp_path / "ws"
    ws = Workspace(root, "run-a")
    ws.fill("x", (6, 4), torch.float32, _writer(_rows(6, 4)))
    np.save(root / "x.npy", np.zeros((5, 4), dtype=np.float32))
    with caplog.at_level("WARNING", logger="semclust.runtime.workspace"):
        assert Workspace(root, "run-a").get("x") is None
    assert "x.npy" in caplog.text and "damaged" in caplog.text
    np.save(root / "x.npy", np.zeros((6, 4), dtype=np.float64))  # right shape, wrong dtype
    assert ws.get("x") is None
    src = _rows(6, 4, seed=2)
    assert torch.equal(ws.fill("x", (6, 4), torch.float32, _writer(src)), src)
    assert torch.equal(Workspace(root, "run-a").get("x"), src)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int32])
def test_dtypes_round_trip(tmp_path, dtype):
    root = tmp_path / "ws"
    if dtype.is_floating_point:
        src = _rows(9, 3, dtype=dtype)
    else:
        src = torch.randint(-(2**31), 2**31 - 1, (9, 3), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
        src = src.to(dtype)
    out = Workspace(root, "run-a").fill("a", (9, 3), dtype, _writer(src, chunk=4))
    assert out.dtype == dtype and torch.equal(out, src)
    got = Workspace(root, "run-a").get("a")
    assert got.dtype == dtype and torch.equal(got, src)
    assert np.load(root / "a.npy").dtype == src.numpy().dtype


def test_fingerprint():
    n = 5000
    x = _rows(n, 6)
    fp = fingerprint(x)
    assert isinstance(fp, str) and len(fp) == 64
    assert fingerprint(x.clone()) == fp  # equal tensors, another storage
    assert fingerprint(_rows(n, 6)) == fp
    for i, j in [(8, 3), (0, 0), (4999, 5), (1, 2)]:
        y = x.clone()
        y[i, j] = -y[i, j]
        assert fingerprint(y) != fp, (i, j)
    assert fingerprint(_rows(n, 6, seed=1)) != fp
    # the shape and the dtype are part of it: same bytes, other shape or dtype
    assert fingerprint(torch.zeros(4, 6)) != fingerprint(torch.zeros(6, 4))
    assert fingerprint(torch.zeros(4, 6, dtype=torch.int32)) != fingerprint(torch.zeros(4, 6))
    assert fingerprint(x.half()) != fingerprint(x)
    s = _rows(10, 3)
    t = s.clone()
    t[7, 1] += 0.5
    assert fingerprint(s) != fingerprint(t)
    assert fingerprint(s) == fingerprint(s.clone())


def test_as_tensor_of_read_only_memmap(tmp_path):
    src = np.arange(24, dtype=np.float32).reshape(6, 4) * 0.5
    np.save(tmp_path / "a.npy", src)
    arr = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert not arr.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = as_tensor(arr)
    assert t.dtype == torch.float32 and tuple(t.shape) == (6, 4)
    np.testing.assert_array_equal(t.numpy(), src)
    # copy-on-write: writing to the tensor never reaches the file
    t[0, 0] = 123.0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), src)


def test_as_tensor_of_plain_array_is_zero_copy():
    a = np.arange(6, dtype=np.int32).reshape(3, 2)
    t = as_tensor(a)
    a[1, 1] = 99
    assert int(t[1, 1]) == 99


def test_full_disk_is_a_clear_error_before_any_row_is_written(tmp_path, monkeypatch):
    """The array file is reserved up front (posix_fallocate), so a full disk raises an
    OSError naming the file and the remedy (a RuntimeError too, which the command line
    prints as one line), and leaves no temporary file or record."""
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    root = tmp_path / "ws"
    ws = Workspace(root, "run-a")
    called = []
    with pytest.raises(OSError, match="No space left on device.*checkpoint_dir") as info:
        ws.fill("x", (100, 4), torch.float32, lambda o, lo, hi: called.append(1))
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, RuntimeError)
    assert "x.npy" in str(info.value) and "\n" not in str(info.value)
    assert not called  # nothing was computed into a file that could not hold it
    assert ws.get("x") is None
    assert sorted(p.name for p in root.iterdir()) == [LOCK, "workspace.json"]


def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or not hasattr(os, "confstr")
                    or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""), reason="glibc on Linux only")
def test_trim_heap_returns_freed_memory_below_the_top_of_the_heap():
    """200 MB of heap blocks (64 KB: below glibc's mmap threshold) freed under one live
    block stay resident (free() trims only the heap's top) until trim_heap."""
    from semclust.runtime.mmap import trim_heap

    blocks = [torch.ones(16 * 1024) for _ in range(3200)]
    top = torch.ones(16 * 1024)  # allocated last: it pins the heap's top
    before = _anon_mb()
    del blocks
    freed = _anon_mb()
    trim_heap()
    after = _anon_mb()
    assert freed > before - 50, "free() handed the blocks back on its own: the test no longer tests trim_heap"
    assert after < freed - 150
    del top
