"""The on-disk embedding store: the one module that reads and writes its format.

A store is a directory::

    manifest.json              {"format": "semclust-embeddings/1", "model", "pretrained",
                                "checkpoint_sha256", "dim", "count", "dtype": "float16",
                                "shard_rows", "shards": [{"file", "rows", "sha256",
                                "items", "items_sha256"}], "complete", "source_consumed"}
    shard-00000.npy            float16 [rows, dim], L2-normalised rows
    shard-00000.items.txt      one id / path per row, in row order

Every file is written to a temporary name in the same directory, fsync'd and then
`os.replace`d, and the manifest is rewritten the same way after each shard, so the
manifest never names a file that is not completely on disk: a crash loses at most the
rows buffered since the last shard, and a writer opened on the same directory resumes.

A manifest is input like any other file: it is checked against `_SCHEMA` before any of
its values is used, and a shard it names must be a file inside the store directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..ops import normalize_rows
from ..runtime.files import TMP_PREFIX, atomic_write, npy_header, plain_name, resolves_inside, sha256_file
from ..runtime.workspace import DirectoryBusy, hold_directory

log = logging.getLogger(__name__)

FORMAT = "semclust-embeddings/1"
MANIFEST = "manifest.json"
DTYPE = "float16"
DEFAULT_SHARD_ROWS = 65536
DEFAULT_CHUNK_ROWS = 65536


class ManifestError(ValueError):
    """A manifest.json that is not a valid manifest of this store format."""


class IncompleteStoreError(ValueError):
    """A store whose writer is still running or was interrupted."""


_OPTIONAL_STR = (str, type(None))
# every field a manifest must have, with its JSON type (an int field never takes a bool)
_SCHEMA: dict[str, Any] = {
    "format": str, "model": str, "pretrained": _OPTIONAL_STR, "checkpoint_sha256": _OPTIONAL_STR,
    "dim": int, "count": int, "dtype": str, "shard_rows": int, "shards": list, "complete": bool,
    "source_consumed": int,
}
_SHARD_SCHEMA: dict[str, Any] = {"file": str, "rows": int, "sha256": str, "items": str, "items_sha256": str}


def _check_fields(obj: Any, schema: dict[str, Any], where: str) -> str | None:
    """Why `obj` does not match `schema` (naming the field), or None when it does."""
    if not isinstance(obj, dict):
        return f"{where or 'the manifest'} must be a JSON object, got {type(obj).__name__}"
    for field, kind in schema.items():
        name = f"{where}.{field}" if where else field
        if field not in obj:
            return f"field {name!r} is missing"
        value = obj[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = "str or null" if kind is _OPTIONAL_STR else kind.__name__
            return f"field {name!r} has type {type(value).__name__}, expected {expected}"
        if kind is int and value < 0:
            return f"field {name!r} is negative ({value})"
    return None


def _manifest_problem(path: Path, meta: Any) -> str | None:
    """Why `meta` is not a valid manifest of the store at `path`, or None: the one place
    that knows the schema, so no reader meets a missing key or a foreign path."""
    problem = _check_fields(meta, _SCHEMA, "")
    if problem:
        return problem
    if meta["dtype"] != DTYPE:
        return f"field 'dtype' is {meta['dtype']!r}, expected {DTYPE!r}"
    for field in ("dim", "shard_rows"):
        if not meta[field]:
            return f"field {field!r} must be positive"
    for i, entry in enumerate(meta["shards"]):
        problem = _check_fields(entry, _SHARD_SCHEMA, f"shards[{i}]")
        if problem:
            return problem
        for field in ("file", "items"):
            # joined to the store directory and read: a crafted name must not reach outside
            if not plain_name(entry[field]) or not resolves_inside(path, entry[field]):
                return f"field 'shards[{i}].{field}' ({entry[field]!r}) is not a file name inside {path}"
    rows = sum(entry["rows"] for entry in meta["shards"])
    if rows != meta["count"]:
        return f"field 'count' is {meta['count']} but the shards hold {rows} rows"
    return None


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not an embedding store: {MANIFEST} is missing")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"corrupt store manifest {file}: {e}") from None
    if isinstance(meta, dict) and meta.get("format") != FORMAT:
        raise ManifestError(f"{file} has format {meta.get('format')!r}; this version of semclust reads {FORMAT!r}")
    problem = _manifest_problem(path, meta)
    if problem:
        raise ManifestError(f"corrupt store manifest {file}: {problem}")
    return meta


def has_manifest(path: str | os.PathLike) -> bool:
    """True when `path` is a directory with a manifest.json: a store, perhaps a damaged
    one (`open_store` says what is wrong), and never a folder of images."""
    return (Path(path) / MANIFEST).is_file()


def is_store(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding a readable semclust embedding manifest."""
    try:
        _read_manifest(Path(path))
    except (OSError, ValueError):
        return False
    return True


def _same_model(meta: dict[str, Any], model: str, pretrained: str | None,
                checkpoint_sha256: str | None, dim: int) -> bool:
    if meta["model"] != model or int(meta["dim"]) != int(dim):
        return False
    # a checkpoint is identified by its content: the same file moved elsewhere still matches
    if meta.get("checkpoint_sha256") and checkpoint_sha256:
        return meta["checkpoint_sha256"] == checkpoint_sha256
    return meta.get("pretrained") == pretrained and meta.get("checkpoint_sha256") == checkpoint_sha256


def check_same_model(path: str | os.PathLike, model: str, pretrained: str | None,
                     checkpoint_sha256: str | None, dim: int) -> dict[str, Any]:
    """Return the store's manifest, or raise ValueError if another model/weights/dim wrote it."""
    meta = _read_manifest(Path(path))
    if not _same_model(meta, model, pretrained, checkpoint_sha256, dim):
        raise ValueError(
            f"the store at {path} holds embeddings of model={meta['model']!r} "
            f"pretrained={meta.get('pretrained')!r} dim={meta['dim']}, not of model={model!r} "
            f"pretrained={pretrained!r} dim={dim}; embeddings of different models cannot be "
            "mixed: choose another output directory or delete the old store"
        )
    return meta


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def _items_name(index: int) -> str:
    return f"shard-{index:05d}.items.txt"


def _normalised_fp16(embeddings: torch.Tensor | np.ndarray, dim: int) -> np.ndarray:
    """[n, dim] any float -> float16 [n, dim] with unit rows (normalised in float32)."""
    x = torch.as_tensor(embeddings).detach().to("cpu", torch.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"embeddings must have shape [n, {dim}], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or Inf; refusing to store them")
    return normalize_rows(x, torch.float16).numpy()


class StoreWriter:
    """Append embeddings to a store, one atomically written shard at a time.

    Opening a writer on an existing incomplete store written by the same model resumes it:
    `done_rows` rows are already stored and `source_consumed` source items were used to
    produce them (the caller continues from there); the stored `shard_rows` applies. A
    store of another model raises ValueError; a complete store raises FileExistsError.
    """

    def __init__(self, path: str | os.PathLike, model: str, pretrained: str | None,
                 checkpoint_sha256: str | None, dim: int,
                 shard_rows: int = DEFAULT_SHARD_ROWS) -> None:
        if dim <= 0 or shard_rows <= 0:
            raise ValueError(f"dim and shard_rows must be positive, got dim={dim} shard_rows={shard_rows}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # one writer per store: two processes appending to one manifest would each write
        # shard i under the same name and lose the other's rows
        where = self.path
        # (a writer dropped without close(), after an error in the caller's loop, lets go too)
        self._lock, _ = hold_directory(self, where, lambda pid: DirectoryBusy(
            f"another semclust process (pid {pid}) is writing the store at {where}; wait for it to end "
            "or choose another output directory"))
        try:
            self._open(model, pretrained, checkpoint_sha256, dim, shard_rows)
        except BaseException:
            self.abandon()
            raise

    def _open(self, model: str, pretrained: str | None, checkpoint_sha256: str | None, dim: int,
              shard_rows: int) -> None:
        self._closed = False
        self._buffer: list[np.ndarray] = []
        self._buffer_items: list[str] = []
        self._buffer_source: list[int] = []
        if (self.path / MANIFEST).exists():
            self._meta = self._resume(model, pretrained, checkpoint_sha256, dim)
        else:
            self._meta = {
                "format": FORMAT, "model": model, "pretrained": pretrained,
                "checkpoint_sha256": checkpoint_sha256, "dim": int(dim), "count": 0,
                "dtype": DTYPE, "shard_rows": int(shard_rows), "shards": [],
                "complete": False, "source_consumed": 0,
            }
            self._write_manifest()
        self.done_rows: int = self._meta["count"]
        self.source_consumed: int = self._meta["source_consumed"]
        self._next_source = self.source_consumed

    def _resume(self, model: str, pretrained: str | None, checkpoint_sha256: str | None,
                dim: int) -> dict[str, Any]:
        meta = check_same_model(self.path, model, pretrained, checkpoint_sha256, dim)
        if meta["complete"]:
            raise FileExistsError(f"the store at {self.path} is already complete ({meta['count']} rows)")
        for stale in self.path.glob(TMP_PREFIX + "*"):
            # temp files of a writer that died mid-shard; the manifest never names them
            stale.unlink()
        log.info("resuming the store at %s after %d rows", self.path, meta["count"])
        return meta

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def count(self) -> int:
        """Rows stored on disk plus rows buffered for the next shard."""
        return self._meta["count"] + len(self._buffer_items)

    def append(self, embeddings: torch.Tensor | np.ndarray, items: Sequence[str],
               source_index: Sequence[int] | torch.Tensor | None = None) -> None:
        """Buffer rows; every `shard_rows` rows are written as one shard.

        embeddings: [n, dim] float (any float dtype, any device); stored as float16 after
            L2 normalisation.
        items: n ids (paths), one per row; no line breaks.
        source_index: [n] position of each row in the caller's source, increasing. Rows the
            caller skipped (unreadable images) are not stored, so the manifest's
            `source_consumed` (where a resumed run starts) comes from these. Default: the
            rows are consecutive source items.
        """
        if self._closed:
            raise RuntimeError("append() after close()")
        rows = _normalised_fp16(embeddings, self.dim)
        items = [str(item) for item in items]
        if len(items) != len(rows):
            raise ValueError(f"got {len(rows)} embeddings but {len(items)} items")
        if any("\n" in item or "\r" in item for item in items):
            raise ValueError("items must not contain line breaks (items.txt holds one per line)")
        if source_index is None:
            source = list(range(self._next_source, self._next_source + len(rows)))
        else:
            source = [int(i) for i in torch.as_tensor(source_index).reshape(-1).tolist()]
            if len(source) != len(rows):
                raise ValueError(f"got {len(rows)} embeddings but {len(source)} source indices")
        if source:
            self._next_source = source[-1] + 1
        self._buffer.append(rows)
        self._buffer_items.extend(items)
        self._buffer_source.extend(source)
        while len(self._buffer_items) >= self._meta["shard_rows"]:
            self._flush(self._meta["shard_rows"])

    def _flush(self, rows: int) -> None:
        """Write the first `rows` buffered rows as the next shard, then the manifest."""
        block = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        shard, rest = block[:rows], block[rows:]
        index = len(self._meta["shards"])
        npy, txt = self.path / _shard_name(index), self.path / _items_name(index)
        items_bytes = "".join(item + "\n" for item in self._buffer_items[:rows]).encode("utf-8")
        atomic_write(txt, lambda f: f.write(items_bytes))
        atomic_write(npy, lambda f: np.save(f, np.ascontiguousarray(shard), allow_pickle=False))
        self._meta["shards"].append({
            "file": npy.name, "rows": int(rows), "sha256": sha256_file(npy),
            "items": txt.name, "items_sha256": hashlib.sha256(items_bytes).hexdigest(),
        })
        self._meta["count"] += int(rows)
        self._meta["source_consumed"] = self._buffer_source[rows - 1] + 1
        self._write_manifest()
        self._buffer = [rest] if len(rest) else []
        del self._buffer_items[:rows], self._buffer_source[:rows]

    def _write_manifest(self) -> None:
        text = json.dumps(self._meta, indent=1).encode("utf-8")
        atomic_write(self.path / MANIFEST, lambda f: f.write(text))

    def close(self, source_consumed: int | None = None) -> None:
        """Write the buffered rows as the last shard and mark the store complete.

        source_consumed: how many source items the caller used in total (counts trailing
            skipped items); default: one past the last stored row's source index.
        """
        if self._closed:
            return
        if self._buffer_items:
            self._flush(len(self._buffer_items))
        if source_consumed is not None:
            self._meta["source_consumed"] = int(source_consumed)
        self._meta["complete"] = True
        self._write_manifest()
        self.abandon()

    def abandon(self) -> None:
        """Stop writing without completing the store (it stays resumable) and let
        another writer have it."""
        self._closed = True
        if self._lock is not None:
            self._lock()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type: type | None, *_: Any) -> None:
        # on an error the store stays incomplete (and resumable) instead of looking finished
        if exc_type is None:
            self.close()
        else:
            self.abandon()


class EmbeddingStore:
    """Read access to a store: shards memory-mapped, rows served as float32 chunks."""

    def __init__(self, path: Path, meta: dict[str, Any], shards: list[np.ndarray],
                 items: list[str], verified: bool) -> None:
        self.path = path
        self.meta = meta
        self._shards = shards
        self._starts = np.cumsum([0] + [len(s) for s in shards])
        self.items = items
        self._verified = verified

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r}, rows={len(self)}, dim={self.dim}, model={self.meta['model']!r})"

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    def shard(self, i: int) -> np.ndarray:
        """Shard `i` as its read-only memory map, float16 [rows, dim]."""
        return self._shards[i]

    def fingerprint(self) -> str:
        """sha256 over the shards' checksums, which cover every byte of every shard (its
        header too: shape and dtype). A store opened with verify=False has its checksums
        verified now, once: a recorded checksum is only the content's if it matches."""
        if not self._verified:
            for entry in self.meta["shards"]:
                _verify(self.path, entry)
            self._verified = True
        sums = [e["sha256"] for e in self.meta["shards"]]
        return hashlib.sha256(json.dumps([self.meta["dim"], sums]).encode()).hexdigest()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a float16 array [stop - start, dim] (copied out of the shards)."""
        start, stop = max(0, start), min(len(self), stop)
        parts = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for s in range(max(first, 0), len(self._shards)):
            lo, hi = int(self._starts[s]), int(self._starts[s + 1])
            if lo >= stop:
                break
            parts.append(self._shards[s][max(start, lo) - lo:min(stop, hi) - lo])
        if not parts:
            return np.empty((0, self.dim), dtype=np.float16)
        return np.concatenate(parts)

    def chunks(self, rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, float32 tensor [<= rows, dim]) covering all rows in order."""
        if rows <= 0:
            raise ValueError(f"rows must be positive, got {rows}")
        for start in range(0, len(self), rows):
            yield start, torch.from_numpy(self.rows(start, start + rows).astype(np.float32))

    def to_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows as one [N, dim] tensor of `dtype` in memory."""
        out = torch.empty((len(self), self.dim), dtype=dtype)
        for start, chunk in self.chunks():
            out[start:start + len(chunk)] = chunk
        return out


def _verify(path: Path, entry: dict[str, Any]) -> None:
    npy, txt = path / entry["file"], path / entry["items"]
    if sha256_file(npy) != entry["sha256"]:
        raise ValueError(f"checksum mismatch in shard {npy}: the file is corrupt or was modified")
    if sha256_file(txt) != entry["items_sha256"]:
        raise ValueError(f"checksum mismatch in {txt}: the file is corrupt or was modified")


def _open_shard(path: Path, entry: dict[str, Any], dim: int, verify: bool) -> tuple[np.ndarray, list[str]]:
    npy, txt = path / entry["file"], path / entry["items"]
    for file in (npy, txt):
        if not file.is_file():
            raise FileNotFoundError(f"shard file {file.name} named in {path / MANIFEST} is missing")
    if verify:
        _verify(path, entry)
    # unverified, a truncated shard must still be named, not fail inside the memory map
    shape, dtype, fortran = npy_header(npy)
    if dtype != np.float16 or shape != (entry["rows"], dim) or fortran:
        raise ValueError(f"shard {npy} holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, "
                         f"the manifest says float16 {(entry['rows'], dim)}")
    array = np.load(npy, mmap_mode="r", allow_pickle=False)
    items = txt.read_text(encoding="utf-8").split("\n")[:-1]
    if len(items) != entry["rows"]:
        raise ValueError(f"{txt} lists {len(items)} items for {entry['rows']} rows")
    return array, items


def open_store(path: str | os.PathLike, verify: bool = True, *, allow_incomplete: bool = False) -> EmbeddingStore:
    """Open a store read-only; shards are memory-mapped.

    verify: check every shard's sha256 against the manifest (reads all bytes once).
    allow_incomplete: open a store whose writer is still running or was interrupted,
        with the rows written so far (a resuming writer, a look at the progress);
        otherwise such a store raises IncompleteStoreError, since its rows are not the
        whole input.
    Raises FileNotFoundError naming a missing shard, ManifestError naming the manifest
    and field that is wrong, ValueError naming a corrupt shard.
    """
    path = Path(path)
    meta = _read_manifest(path)
    if not meta["complete"] and not allow_incomplete:
        raise IncompleteStoreError(
            f"the store at {path} is incomplete ({meta['count']} rows so far): its writer is still running or "
            "was interrupted; run `semclust embed` again to finish it (or pass allow_incomplete=True to read the "
            "rows so far)")
    shards, items = [], []
    for entry in meta["shards"]:
        array, shard_items = _open_shard(path, entry, meta["dim"], verify)
        shards.append(array)
        items.extend(shard_items)
    if not meta["complete"]:
        log.info("the store at %s is incomplete (%d rows so far)", path, meta["count"])
    return EmbeddingStore(path, meta, shards, items, verify)
