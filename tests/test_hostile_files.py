"""Hostile and damaged files: a crafted workspace.json or store manifest, a concurrent
run, leftovers of a killed write, a truncated or lying .npy header, a full disk. Each
is refused with one line naming the file (or repaired), and no file outside the
directory in question is ever touched."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from semclust.inputs.embeddings import load_embeddings, load_labels
from semclust.inputs.store import (MANIFEST, IncompleteStoreError, ManifestError, StoreWriter, has_manifest, is_store,
                                   open_store)
from semclust.runtime import files, mmap, rows
from semclust.runtime.files import TMP_PREFIX, DiskFullError, atomic_write, sha256_file
from semclust.runtime.mmap import fingerprint
from semclust.runtime.workspace import LOCK, STATE, Workspace, WorkspaceBusy, WorkspaceError

D = 8
MODEL = dict(model="tiny_clip", pretrained="/ckpt/a.pt", checkpoint_sha256="ab" * 32, dim=D)


def _rows(n, d=D, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _copy(src):
    def produce(out, lo, hi):
        out[lo:hi] = src[lo:hi]

    return produce


def _one_line(e):
    return "\n" not in str(e.value)


def _tmp_files(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX))


# ---- 1. workspace.json names only files of the workspace ------------------------------

def _crafted_state(root, names, run="run-a"):
    root.mkdir(parents=True, exist_ok=True)
    arrays = {name: {"shape": [2, 2], "dtype": "float32"} for name in names}
    (root / STATE).write_text(json.dumps({"format": "semclust-workspace/1", "run": run, "arrays": arrays}))


@pytest.mark.parametrize("fresh, run", [(True, "run-a"), (True, "run-b"), (False, "run-a")])
@pytest.mark.parametrize("name", ["../victim/precious", "sub/../../victim/precious", "..", ""])
def test_workspace_state_naming_a_file_outside_is_refused(tmp_path, fresh, run, name):
    victim = tmp_path / "victim" / "precious.npy"
    victim.parent.mkdir()
    np.save(victim, np.ones((2, 2), np.float32))
    root = tmp_path / "ws"
    _crafted_state(root, [name])
    with pytest.raises(WorkspaceError, match=rf"{STATE}: field arrays\[.*\] names a file outside") as info:
        Workspace(root, run, fresh=fresh)
    assert _one_line(info)
    assert victim.is_file() and np.array_equal(np.load(victim), np.ones((2, 2), np.float32))


def test_workspace_state_with_an_absolute_name_is_refused(tmp_path):
    victim = tmp_path / "precious.npy"
    np.save(victim, np.ones((2, 2), np.float32))
    root = tmp_path / "ws"
    _crafted_state(root, [str(tmp_path / "precious")])
    with pytest.raises(WorkspaceError, match="outside"):
        Workspace(root, "run-b", fresh=True)
    assert victim.is_file()


def test_workspace_array_symlinked_out_is_refused(tmp_path):
    outside = tmp_path / "secret.npy"
    np.save(outside, np.full((2, 2), 7, np.float32))
    root = tmp_path / "ws"
    _crafted_state(root, ["evil"])
    (root / "evil.npy").symlink_to(outside)
    # a resume would otherwise map (and a fresh start unlink) what the link leads to
    with pytest.raises(WorkspaceError, match=r"arrays\['evil'\] names a file outside"):
        Workspace(root, "run-a")
    with pytest.raises(WorkspaceError):
        Workspace(root, "run-a", fresh=True)
    assert np.array_equal(np.load(outside), np.full((2, 2), 7, np.float32))


def test_workspace_state_with_a_malformed_record_is_refused(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / STATE).write_text(json.dumps({"format": "semclust-workspace/1", "run": "run-a",
                                          "arrays": {"x": {"shape": "big", "dtype": "float32"}}}))
    with pytest.raises(WorkspaceError, match=r"arrays\['x'\] must be"):
        Workspace(root, "run-a")
    (root / STATE).write_text(json.dumps({"format": "semclust-workspace/1", "run": "run-a", "arrays": []}))
    with pytest.raises(WorkspaceError, match="'arrays' must be an object"):
        Workspace(root, "run-a")


# ---- 2. one run per workspace directory ------------------------------------------------

_HOLD = textwrap.dedent("""
    import sys
    from semclust.runtime.workspace import Workspace
    ws = Workspace(sys.argv[1], "run-a")
    print("ready", flush=True)
    sys.stdin.readline()
    ws.close()
    print("closed", flush=True)
    sys.stdin.readline()
""")

_TRY = textwrap.dedent("""
    import sys
    from semclust.runtime.workspace import Workspace, WorkspaceBusy
    try:
        Workspace(sys.argv[1], "run-a").close()
    except WorkspaceBusy as e:
        print("busy:", e)
    else:
        print("free")
""")


def _holder(root):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _try_from_another_process(root, code=_TRY):
    return subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_second_process_is_refused_until_the_first_closes(tmp_path):
    root = tmp_path / "ws"
    proc = _holder(root)
    try:
        with pytest.raises(WorkspaceBusy, match=rf"another semclust run is using {root} \(pid {proc.pid}\)") as info:
            Workspace(root, "run-a")
        assert _one_line(info)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed"
        # released on close, while the process lives on
        with Workspace(root, "run-a") as ws:
            assert ws.get("x") is None
            assert _try_from_another_process(root).startswith(f"busy: another semclust run is using {root}")
        assert _try_from_another_process(root) == "free"
    finally:
        proc.kill()
        proc.wait()


_WRITE = textwrap.dedent("""
    import sys
    from semclust.inputs.store import StoreWriter
    from semclust.runtime.workspace import DirectoryBusy
    try:
        StoreWriter(sys.argv[1], "tiny_clip", "/ckpt/a.pt", "ab" * 32, 8).abandon()
    except DirectoryBusy as e:
        print("busy:", e)
    else:
        print("free")
""")


def _items(n):
    return [f"img/{i}.png" for i in range(n)]


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_second_store_writer_is_refused_while_the_first_writes(tmp_path):
    path = tmp_path / "s"
    writer = StoreWriter(path, **MODEL, shard_rows=4)
    writer.append(_rows(5), _items(5))  # one shard on disk, one row buffered
    refusal = _try_from_another_process(path, _WRITE)
    assert refusal.startswith(f"busy: another semclust process (pid {os.getpid()}) is writing the store at {path}")
    assert open_store(path, allow_incomplete=True).items == _items(4)  # the refusal touched nothing
    writer.close()
    assert open_store(path).items == _items(5)
    # the writer let go when it closed (a complete store is then refused for being complete,
    # not for being busy)
    with pytest.raises(FileExistsError):
        StoreWriter(path, **MODEL)


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_failed_or_dropped_store_writer_lets_go(tmp_path):
    path = tmp_path / "s"
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(path, **MODEL, shard_rows=4) as w:
            w.append(_rows(5), _items(5))
            raise RuntimeError("boom")
    assert _try_from_another_process(path, _WRITE) == "free"  # and the store stays incomplete, resumable
    w = StoreWriter(path, **MODEL, shard_rows=4)
    assert w.done_rows == 4
    del w  # never closed: collected, it lets go too
    assert _try_from_another_process(path, _WRITE) == "free"


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_the_lock_of_a_killed_run_does_not_block(tmp_path):
    root = tmp_path / "ws"
    proc = _holder(root)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (root / LOCK).is_file()  # stale file, but no lock: flock died with the process
    src = _rows(4, 3)
    with Workspace(root, "run-a") as ws:
        assert torch.equal(ws.fill("x", (4, 3), torch.float32, _copy(src)), src)


def test_workspaces_of_one_process_share_the_lock(tmp_path):
    root = tmp_path / "ws"
    first = Workspace(root, "run-a")
    second = Workspace(root, "run-a")  # e.g. a phase that opens the directory again
    first.close()
    src = _rows(3, 2)
    assert torch.equal(second.fill("x", (3, 2), torch.float32, _copy(src)), src)
    second.close()
    with pytest.raises(RuntimeError, match="closed"):
        second.fill("y", (3, 2), torch.float32, _copy(src))


# ---- 3. leftovers of a killed write ---------------------------------------------------

@pytest.mark.parametrize("resume", [True, False])
def test_stale_temporary_files_are_removed_by_the_next_run(tmp_path, resume):
    root = tmp_path / "ws"
    src = _rows(5, 3)
    with Workspace(root, "run-a") as ws:
        ws.fill("x", (5, 3), torch.float32, _copy(src))
    # what a SIGKILL in the middle of a fill, a state write and a checkpoint leaves
    np.lib.format.open_memmap(root / f"{TMP_PREFIX}knn_image.npy", mode="w+", dtype=np.int32, shape=(5, 2)).flush()
    (root / f"{TMP_PREFIX}{STATE}.abc123").write_text("{")
    (root / f"{TMP_PREFIX}stage1.ckpt.x9").write_bytes(b"\0" * 10)
    with Workspace(root, "run-a", fresh=not resume) as ws:
        assert _tmp_files(root) == []
        assert (ws.get("x") is not None) == resume
        assert torch.equal(ws.fill("knn_image", (5, 2), torch.int32, _copy(torch.ones(5, 2, dtype=torch.int32))),
                           torch.ones(5, 2, dtype=torch.int32))


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_temporary_files_of_a_running_writer_are_left_alone(tmp_path):
    root = tmp_path / "ws"
    proc = _holder(root)
    try:
        live = root / f"{TMP_PREFIX}knn_image.npy"
        live.write_bytes(b"being written")
        with pytest.raises(WorkspaceBusy):
            Workspace(root, "run-a")
        assert live.read_bytes() == b"being written"
    finally:
        proc.kill()
        proc.wait()


# ---- 4. fingerprints cover every byte -------------------------------------------------

def test_fingerprint_sees_every_row():
    x = _rows(5000, 6)
    fp = fingerprint(x)
    odd = x.clone()
    odd[1::2] = _rows(2500, 6, seed=9)  # the old stride (every 4th row) never looked here
    assert fingerprint(odd) != fp
    for i in (1, 2, 3, 4997, 4998):
        y = x.clone()
        y[i, 5] = torch.nextafter(y[i, 5], torch.tensor(float("inf")))  # one ulp
        assert fingerprint(y) != fp, i


def test_fingerprint_is_layout_independent_and_chunked(monkeypatch):
    x = _rows(300, 7)
    fp = fingerprint(x)
    transposed = x.t().contiguous().t()  # same values, column-major storage
    assert not transposed.is_contiguous() and fingerprint(transposed) == fp
    wide = torch.zeros(300, 14)
    wide[:, ::2] = x
    assert fingerprint(wide[:, ::2]) == fp
    # chunks of one row, of three rows: the same digest as one pass
    for chunk_bytes in (1, 3 * 7 * 4 + 5):
        monkeypatch.setattr(mmap, "_FINGERPRINT_CHUNK_BYTES", chunk_bytes)
        assert fingerprint(x) == fp
        assert fingerprint(transposed) == fp
    assert fingerprint(x.bfloat16()) != fingerprint(x.half())  # any dtype, dtype included


def test_store_fingerprint_of_an_unverified_store_checks_the_bytes(tmp_path):
    w = StoreWriter(tmp_path, **MODEL, shard_rows=4)
    w.append(_rows(10), [f"{i}" for i in range(10)])
    w.close()
    fp = open_store(tmp_path).fingerprint()
    assert open_store(tmp_path, verify=False).fingerprint() == fp
    shard = tmp_path / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01
    shard.write_bytes(bytes(data))
    # same manifest, other rows: a fingerprint from the recorded checksums alone would match
    with pytest.raises(ValueError, match="checksum mismatch in shard .*shard-00001.npy"):
        open_store(tmp_path, verify=False).fingerprint()


# ---- 5. store manifests ---------------------------------------------------------------

def _store(path, n=6, shard_rows=4):
    w = StoreWriter(path, **MODEL, shard_rows=shard_rows)
    w.append(_rows(n), [f"img/{i}.png" for i in range(n)])
    w.close()
    return json.loads((path / MANIFEST).read_text())


def _rewrite(path, meta):
    (path / MANIFEST).write_text(json.dumps(meta))


@pytest.mark.parametrize("field", ["file", "items"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_manifest_naming_a_shard_outside_the_store_is_refused(tmp_path, field, how):
    store = tmp_path / "store"
    meta = _store(store)
    entry = meta["shards"][0]
    outside = tmp_path / "outside" / f"x{'.npy' if field == 'file' else '.txt'}"
    outside.parent.mkdir()
    (store / entry[field]).rename(outside)  # the checksum still matches the moved file
    assert sha256_file(outside) == entry["sha256" if field == "file" else "items_sha256"]
    if how == "dotdot":
        entry[field] = f"../outside/{outside.name}"
    elif how == "absolute":
        entry[field] = str(outside)
    else:
        (store / entry[field]).symlink_to(outside)
    _rewrite(store, meta)
    with pytest.raises(ManifestError, match=rf"corrupt store manifest {store / MANIFEST}: field 'shards\[0\]\.{field}'"
                                            r" .* is not a file name inside") as info:
        open_store(store)
    assert _one_line(info)
    with pytest.raises(ManifestError):
        open_store(store, verify=False)


def test_symlinked_shard_inside_the_store_is_fine(tmp_path):
    meta = _store(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / meta["shards"][0]["file"]).rename(tmp_path / "data" / "s0.npy")
    (tmp_path / meta["shards"][0]["file"]).symlink_to(tmp_path / "data" / "s0.npy")
    assert len(open_store(tmp_path)) == 6


def test_corrupt_manifest_json_is_one_clear_line(tmp_path):
    _store(tmp_path)
    (tmp_path / MANIFEST).write_text('{"format": "semclust-embeddings/1", "dim": ')
    with pytest.raises(ManifestError, match=rf"^corrupt store manifest {tmp_path / MANIFEST}: ") as info:
        open_store(tmp_path)
    assert _one_line(info)
    # a store, if a damaged one: not to be taken for a folder of images
    assert has_manifest(tmp_path) and not is_store(tmp_path)
    assert not has_manifest(tmp_path / "shard-00000.npy") and not has_manifest(tmp_path.parent)
    (tmp_path / MANIFEST).write_bytes(b"\xff\xfe{}")
    with pytest.raises(ManifestError, match="^corrupt store manifest"):
        open_store(tmp_path)


@pytest.mark.parametrize("change, match", [
    (lambda m: m.pop("dim"), "field 'dim' is missing"),
    (lambda m: m.update(dim="8"), "field 'dim' has type str, expected int"),
    (lambda m: m.update(dim=True), "field 'dim' has type bool"),
    (lambda m: m.update(complete="yes"), "field 'complete' has type str, expected bool"),
    (lambda m: m.update(count=-1), "field 'count' is negative"),
    (lambda m: m.update(count=99), "field 'count' is 99 but the shards hold 6 rows"),
    (lambda m: m.update(pretrained=3), "field 'pretrained' has type int, expected str or null"),
    (lambda m: m["shards"][1].pop("sha256"), r"field 'shards\[1\].sha256' is missing"),
    (lambda m: m["shards"][0].update(rows="4"), r"field 'shards\[0\].rows' has type str"),
    (lambda m: m.update(shards={"a": 1}), "field 'shards' has type dict, expected list"),
    (lambda m: m["shards"].append(7), r"shards\[2\] must be a JSON object"),
    (lambda m: m.update(dtype="float64"), "field 'dtype' is 'float64', expected 'float16'"),
    (lambda m: m.update(dim=0), "field 'dim' must be positive"),
])
def test_manifest_schema_names_the_field(tmp_path, change, match):
    meta = _store(tmp_path)
    change(meta)
    _rewrite(tmp_path, meta)
    with pytest.raises(ManifestError, match=match) as info:
        open_store(tmp_path)
    assert str(tmp_path / MANIFEST) in str(info.value) and _one_line(info)
    # the writer reads it through the same check: no KeyError on resume either
    with pytest.raises(ManifestError, match=match):
        StoreWriter(tmp_path, **MODEL)


def test_manifest_that_is_not_an_object(tmp_path):
    (tmp_path / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="must be a JSON object"):
        open_store(tmp_path)


# ---- 6. incomplete stores -------------------------------------------------------------

def test_incomplete_store_is_refused_unless_allowed(tmp_path):
    w = StoreWriter(tmp_path, **MODEL, shard_rows=4)
    w.append(_rows(6), [f"{i}" for i in range(6)])  # one shard written, the writer still open
    with pytest.raises(IncompleteStoreError, match=rf"the store at {tmp_path} is incomplete \(4 rows so far\)") as info:
        open_store(tmp_path)
    assert _one_line(info) and "allow_incomplete=True" in str(info.value)
    s = open_store(tmp_path, allow_incomplete=True)
    assert len(s) == 4 and not s.complete
    w.close()
    assert len(open_store(tmp_path)) == 6


# ---- 7. damaged workspace arrays are computed again -----------------------------------

def test_truncated_workspace_array_is_computed_again(tmp_path, caplog):
    root = tmp_path / "ws"
    src = torch.arange(40, dtype=torch.int32).reshape(10, 4)
    with Workspace(root, "run-a") as ws:
        ws.fill("knn_image", (10, 4), torch.int32, _copy(src))
    file = root / "knn_image.npy"
    with open(file, "rb+") as f:
        f.truncate(file.stat().st_size - 17)  # a copy cut short, a disk that lost the tail
    with Workspace(root, "run-a") as ws, caplog.at_level("WARNING", logger="semclust.runtime.workspace"):
        assert ws.get("knn_image") is None
        assert str(file) in caplog.text and "computing knn_image again" in caplog.text
        calls = []

        def block(lo, hi):
            calls.append((lo, hi))
            return src[lo:hi]

        got = rows.fill(ws, "knn_image", (10, 4), torch.int32, block, chunk=4)
        assert calls and torch.equal(got, src)
    with Workspace(root, "run-a") as ws:
        assert torch.equal(ws.get("knn_image"), src)


def test_workspace_array_with_a_garbage_header_is_computed_again(tmp_path, caplog):
    root = tmp_path / "ws"
    with Workspace(root, "run-a") as ws:
        ws.fill("x", (3, 2), torch.float32, _copy(_rows(3, 2)))
        (root / "x.npy").write_bytes(b"not an npy file at all")
        with caplog.at_level("WARNING"):
            assert ws.get("x") is None
        assert "x.npy" in caplog.text


# ---- 8. .npy headers that lie ---------------------------------------------------------

def _lying_npy(path, shape, dtype="<f4", payload=64):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
        f.write(b"\0" * payload)
    return path


@pytest.mark.parametrize("mmap_mode", [False, True])
def test_npy_header_declaring_2_40_rows_is_refused(tmp_path, mmap_mode):
    path = _lying_npy(tmp_path / "huge.npy", (2**40, 4))
    with pytest.raises(ValueError, match=r"huge\.npy is damaged: its header declares float32 \(1099511627776, 4\)") as info:
        load_embeddings(path, mmap=mmap_mode)
    assert _one_line(info)


def test_truncated_npy_and_shard_folder_are_refused(tmp_path):
    good = np.ones((8, 4), np.float32)
    np.save(tmp_path / "a.npy", good)
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"a\.npy is damaged"):
        load_embeddings(tmp_path / "a.npy", mmap=True)
    folder = tmp_path / "shards"
    folder.mkdir()
    np.save(folder / "0.npy", good)
    _lying_npy(folder / "1.npy", (1000, 4))
    with pytest.raises(ValueError, match=r"1\.npy is damaged"):
        load_embeddings(folder)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"junk\.npy is not a readable \.npy file"):
        load_embeddings(tmp_path / "junk.npy")
    _lying_npy(tmp_path / "labels.npy", (2**40,), dtype="<i8")
    with pytest.raises(ValueError, match=r"labels\.npy is damaged"):
        load_labels(tmp_path / "labels.npy")


def test_truncated_shard_of_an_unverified_store_is_named(tmp_path):
    _store(tmp_path)
    shard = tmp_path / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"shard-00000\.npy is damaged"):
        open_store(tmp_path, verify=False)


# ---- 9. a full disk -------------------------------------------------------------------

def _enospc(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_cli_prints_one_line(e):
    from semclust.cli import USER_ERRORS

    assert isinstance(e, USER_ERRORS) and isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert "\n" not in str(e)


def test_atomic_write_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(DiskFullError, match=rf"cannot write state.json in {tmp_path}: No space left") as info:
        atomic_write(target, lambda f: f.write(b"new content"))
    _assert_cli_prints_one_line(info.value)
    assert target.read_text() == "old" and _tmp_files(tmp_path) == []

    def half_then_full(f):
        f.write(b"half")
        _enospc()

    monkeypatch.undo()
    with pytest.raises(DiskFullError):
        atomic_write(target, half_then_full)
    assert target.read_text() == "old" and _tmp_files(tmp_path) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def denied(*_):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError) as info:
        atomic_write(tmp_path / "x", lambda f: f.write(b"x"))
    assert not isinstance(info.value, DiskFullError) and _tmp_files(tmp_path) == []


def test_workspace_fill_on_a_full_disk(tmp_path, monkeypatch):
    root = tmp_path / "ws"
    ws = Workspace(root, "run-a")
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    with pytest.raises(DiskFullError, match=r"cannot reserve 0 MiB for \.tmp-x\.npy in .*checkpoint_dir") as info:
        ws.fill("x", (10, 4), torch.float32, _copy(_rows(10, 4)))
    _assert_cli_prints_one_line(info.value)
    monkeypatch.undo()

    # storage that allocates only when the pages are written back
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(DiskFullError, match=r"cannot write \.tmp-x\.npy in .*checkpoint_dir") as info:
        ws.fill("x", (10, 4), torch.float32, _copy(_rows(10, 4)))
    _assert_cli_prints_one_line(info.value)
    assert sorted(p.name for p in root.iterdir()) == [LOCK, STATE]
    monkeypatch.undo()

    # the array is complete but its record cannot be written: the array goes too
    real = files.atomic_write

    def full_state(path, write):
        if path.name == STATE:
            _enospc()
        real(path, write)

    monkeypatch.setattr("semclust.runtime.workspace.atomic_write", full_state)
    with pytest.raises(OSError, match="No space"):
        ws.fill("x", (10, 4), torch.float32, _copy(_rows(10, 4)))
    assert sorted(p.name for p in root.iterdir()) == [LOCK, STATE]
    monkeypatch.undo()
    assert ws.get("x") is None
    ws.close()


def test_workspace_header_write_on_a_full_disk(tmp_path, monkeypatch):
    root = tmp_path / "ws"
    ws = Workspace(root, "run-a")
    monkeypatch.setattr(np.lib.format, "open_memmap", _enospc)
    with pytest.raises(DiskFullError, match="cannot reserve"):
        ws.fill("x", (10, 4), torch.float32, _copy(_rows(10, 4)))
    assert _tmp_files(root) == []
    ws.close()


def test_store_shard_on_a_full_disk(tmp_path, monkeypatch):
    w = StoreWriter(tmp_path, **MODEL, shard_rows=4)
    w.append(_rows(4), [f"{i}" for i in range(4)])
    real_save = np.save

    def full_save(f, *a, **k):
        real_save(f, *a, **k)
        _enospc()

    monkeypatch.setattr(np, "save", full_save)
    with pytest.raises(DiskFullError, match=r"cannot write shard-00001\.npy in ") as info:
        w.append(_rows(4, seed=1), [f"{i}" for i in range(4, 8)])
    _assert_cli_prints_one_line(info.value)
    monkeypatch.undo()
    assert _tmp_files(tmp_path) == []
    assert not (tmp_path / "shard-00001.npy").exists()
    assert len(open_store(tmp_path, allow_incomplete=True)) == 4
