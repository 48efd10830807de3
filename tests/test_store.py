import json
import os

import numpy as np
import pytest
import torch

from semclust.inputs.store import StoreWriter, is_store, open_store

D = 8
MODEL = dict(model="tiny_clip", pretrained="/ckpt/a.pt", checkpoint_sha256="ab" * 32, dim=D)


def _rows(n, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 3


def _items(n, start=0):
    return [f"img/{i}.png" for i in range(start, start + n)]


def _write(path, n=10, shard_rows=4, close=True):
    writer = StoreWriter(path, **MODEL, shard_rows=shard_rows)
    x = _rows(n)
    writer.append(x[:3], _items(3))
    writer.append(x[3:], _items(n - 3, 3))
    if close:
        writer.close()
    return x


def _unit_fp16(x):
    return torch.nn.functional.normalize(x.float(), dim=1).half().float()


def test_round_trip(tmp_path):
    x = _write(tmp_path / "s")
    s = open_store(tmp_path / "s")
    assert len(s) == 10 and s.dim == D and s.complete
    assert s.items == _items(10)
    assert [e["rows"] for e in s.meta["shards"]] == [4, 4, 2]
    assert s.meta["source_consumed"] == 10 and s.meta["dtype"] == "float16"
    assert np.load(tmp_path / "s" / "shard-00000.npy").dtype == np.float16
    full = s.to_tensor()
    assert full.dtype == torch.float32 and full.shape == (10, D)
    torch.testing.assert_close(full, _unit_fp16(x))
    starts, parts = zip(*s.chunks(3))  # chunks cross shard boundaries
    assert starts == (0, 3, 6, 9)
    torch.testing.assert_close(torch.cat(parts), full)
    assert s.to_tensor(torch.float16).dtype == torch.float16
    assert is_store(tmp_path / "s")


def test_is_store_rejects_other_folders(tmp_path):
    assert not is_store(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    assert not is_store(tmp_path)
    with pytest.raises(ValueError, match="format"):
        open_store(tmp_path)


def test_empty_store(tmp_path):
    StoreWriter(tmp_path, **MODEL).close()
    s = open_store(tmp_path)
    assert len(s) == 0 and s.to_tensor().shape == (0, D) and list(s.chunks()) == []


def test_context_manager_closes_only_on_success(tmp_path):
    with StoreWriter(tmp_path / "ok", **MODEL) as w:
        w.append(_rows(2), _items(2))
    assert open_store(tmp_path / "ok").complete
    with pytest.raises(KeyError):
        with StoreWriter(tmp_path / "bad", **MODEL, shard_rows=2) as w:
            w.append(_rows(3), _items(3))
            raise KeyError("boom")
    s = open_store(tmp_path / "bad", allow_incomplete=True)
    assert not s.complete and len(s) == 2


@pytest.mark.parametrize("emb, items, match", [
    (torch.randn(2, D + 1), _items(2), "shape"),
    (torch.randn(2, D), _items(3), "items"),
    (torch.randn(2, D), ["a\nb", "c"], "line breaks"),
    (torch.full((2, D), float("nan")), _items(2), "NaN"),
])
def test_append_validates(tmp_path, emb, items, match):
    with pytest.raises(ValueError, match=match):
        StoreWriter(tmp_path, **MODEL).append(emb, items)


def test_crash_mid_shard_keeps_store_readable_and_resumable(tmp_path, monkeypatch):
    path = tmp_path / "s"
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(dst) == "shard-00001.npy":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        _write(path, n=10, shard_rows=4)
    monkeypatch.setattr(os, "replace", real_replace)

    # the manifest only names what is on disk: the first shard
    s = open_store(path, allow_incomplete=True)
    assert len(s) == 4 and not s.complete and s.items == _items(4)
    assert not any(p.name.startswith(".tmp-") for p in path.iterdir())

    w = StoreWriter(path, **MODEL, shard_rows=4)
    assert w.done_rows == 4 and w.source_consumed == 4
    x = _rows(10)
    w.append(x[4:], _items(6, 4))
    w.close()
    s = open_store(path)
    assert len(s) == 10 and s.items == _items(10)
    torch.testing.assert_close(s.to_tensor(), _unit_fp16(x))


def test_resume_same_model_and_source_index(tmp_path):
    w = StoreWriter(tmp_path, **MODEL, shard_rows=3)
    # rows came from source items 0, 2, 3, 7, 8 (1, 4-6 were unreadable)
    w.append(_rows(5), _items(5), source_index=torch.tensor([0, 2, 3, 7, 8]))
    del w  # crash: the 2 buffered rows are lost
    resumed = StoreWriter(tmp_path, **MODEL)
    assert resumed.done_rows == 3 and resumed.source_consumed == 4


def test_same_checkpoint_elsewhere_resumes(tmp_path):
    _write(tmp_path, close=False)
    moved = dict(MODEL, pretrained="/elsewhere/a.pt")
    assert StoreWriter(tmp_path, **moved).done_rows == 8


@pytest.mark.parametrize("change", [
    {"model": "ViT-B-32"}, {"dim": D * 2}, {"checkpoint_sha256": "cd" * 32},
    {"pretrained": "laion2b_s34b_b79k", "checkpoint_sha256": None},
])
def test_refuses_another_model(tmp_path, change):
    _write(tmp_path, close=False)
    with pytest.raises(ValueError, match="cannot be mixed"):
        StoreWriter(tmp_path, **{**MODEL, **change})


def test_complete_store_is_not_reopened_for_writing(tmp_path):
    _write(tmp_path)
    with pytest.raises(FileExistsError, match="complete"):
        StoreWriter(tmp_path, **MODEL)


def test_checksum_mismatch_names_the_shard(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00001.npy"):
        open_store(tmp_path)
    assert len(open_store(tmp_path, verify=False)) == 10


def test_missing_shard_names_the_file(tmp_path):
    _write(tmp_path)
    (tmp_path / "shard-00002.npy").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00002.npy"):
        open_store(tmp_path, verify=False)


def test_shard_shape_disagreeing_with_manifest(tmp_path):
    _write(tmp_path)
    np.save(tmp_path / "shard-00000.npy", np.zeros((4, D + 1), np.float16))
    with pytest.raises(ValueError, match="manifest says"):
        open_store(tmp_path, verify=False)


def test_rows_slices_across_shards(tmp_path):
    x = _write(tmp_path)
    s = open_store(tmp_path)
    np.testing.assert_array_equal(s.rows(2, 9), _unit_fp16(x)[2:9].half().numpy())
    assert s.rows(10, 12).shape == (0, D)
