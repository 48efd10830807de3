"""Image inputs as item sources: folders, path lists, arrays, tensors, Datasets.

A *source* (`Source`) is a map-style torch Dataset whose items are
``(transform(x) or None, index, reason or None)`` with an ``items`` list of ids: the one
contract every consumer (encoding, prediction, stage 2) reads through `iter_batches`.
A bad file never stops a run: ``source[i]`` returns ``(None, i, reason)`` for it,
`collate_skip` drops such items from a DataLoader batch, and `SkipReport` tallies them:

    source = ImageSource.from_folder("photos/")
    report = SkipReport()
    for x, kept in iter_batches(source, preprocess, batch_size=256, report=report):
        ...                                        # x [B, 3, H, W] holds the good images only
    if report.count:
        log.warning("%s", report)
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .. import ops

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "IMAGE_EXTENSIONS", "list_images", "CorruptImage", "ImageSource", "FileImageSource", "ArrayImageSource",
    "TensorSource", "DatasetSource", "KeptSource", "collate_skip", "SkipReport", "Source", "iter_batches",
    "check_batching",
]


@runtime_checkable
class Source(Protocol):
    """What every consumer of raw items reads: a map-style Dataset with an id per item
    and a settable transform; item i is (transform(x_i), i, None), or (None, i, reason)
    for an item that cannot be read. Implemented by `ImageSource` (files, arrays),
    `TensorSource` (rows), `DatasetSource` (any Dataset) and `KeptSource` (a subset)."""

    items: Sequence[str]
    transform: Optional[Callable[[Any], Any]]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Any, int, Optional[str]]: ...

# Lower-case suffixes Pillow decodes out of the box; matched case-insensitively.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


# --------------------------------------------------------------------------- listing


def _hidden(name: str) -> bool:
    # ".ipynb_checkpoints/" and macOS "._x.jpg" resource forks look like classes / images but are not
    return name.startswith(".")


def _walk_images(root: Path) -> list[Path]:
    # Symlinks are followed (dataset folders are often symlink farms, e.g. ImageNet
    # subsets), but each real directory is walked once, at its first path in sorted
    # order: a link back up the tree (`ln -s . loop`) would otherwise repeat every image
    # per level, and two such links never end. Each real file is then kept once, at its
    # first path in sorted order.
    walked: set[tuple[int, int]] = set()
    found: list[tuple[Path, Optional[tuple[int, int]]]] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        st = folder.stat()
        if (st.st_dev, st.st_ino) in walked:
            continue
        walked.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
        except OSError as err:  # as os.walk did: an unreadable sub-folder does not stop the listing
            log.warning("cannot list %s: %s", folder, err)
            continue
        subfolders = []
        for e in entries:
            if e.is_dir():
                subfolders.append(Path(e.path))
            elif Path(e.name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((Path(e.path), _file_id(e, st.st_dev)))
        pending.extend(reversed(subfolders))  # popped in sorted order
    found.sort(key=lambda pf: pf[0].relative_to(root).as_posix())
    listed: set[tuple[int, int]] = set()
    paths = []
    for path, file_id in found:
        if file_id in listed:  # another path to a file already listed
            continue
        paths.append(path)
        if file_id is not None:
            listed.add(file_id)
    return paths


def _file_id(entry: os.DirEntry, folder_dev: int) -> Optional[tuple[int, int]]:
    """(st_dev, st_ino) of the file an entry names; None for a dangling link (listed, and
    reported as missing when loaded, as before)."""
    if not entry.is_symlink():
        # no stat call: scandir already read the inode, and a plain entry lives on its
        # folder's device
        return folder_dev, entry.inode()
    try:
        st = entry.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def list_images(root_or_paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Image files of a folder, or an explicit list of files checked to exist.

    A folder is searched recursively (symlinks followed, each real folder and file once,
    hidden files and folders skipped) for files whose extension is in `IMAGE_EXTENSIONS`
    (any case); the result is sorted by relative path so the order, and with it every
    index, is reproducible.
    A single file gives a one-element list. An explicit list keeps its order and is not
    filtered by extension (a non-image file is reported as skipped when loaded).

    Raises:
        FileNotFoundError: the folder, the file or any listed path does not exist.
        ValueError: the folder holds no image file, or the list is empty.
    """
    if isinstance(root_or_paths, (str, os.PathLike)):
        root = Path(root_or_paths)
        if not root.exists():
            raise FileNotFoundError(f"image folder or file {str(root)!r} does not exist")
        if root.is_file():
            return [root]
        paths = _walk_images(root)
        if not paths:
            raise ValueError(
                f"no image files found under folder {str(root)!r} "
                f"(searched recursively for extensions {sorted(IMAGE_EXTENSIONS)}, any case)"
            )
        return paths
    paths = [Path(p) for p in root_or_paths]
    if not paths:
        raise ValueError("the list of image paths is empty")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} image paths do not exist, e.g. {missing[:3]}")
    return paths


# --------------------------------------------------------------------------- image sources


class CorruptImage(ValueError):
    """An image that cannot be decoded.

    `kind` is one of "missing", "empty", "truncated", "unreadable", "too large", "bad name";
    `reason` ("<kind>: <detail>") is what `ImageSource.__getitem__` hands back and what
    `SkipReport` groups by.
    """

    def __init__(self, item: str, kind: str, detail: str):
        super().__init__(f"{item}: {kind}: {detail}")
        self.item = item
        self.kind = kind
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"


# What Pillow raises on bad bytes: unidentified format, truncated or broken streams
# (OSError, and SyntaxError / ValueError / EOFError from some plugins), and pixel counts
# over Image.MAX_IMAGE_PIXELS (DecompressionBombError is deliberate protection, so the file
# is skipped rather than the limit lifted).
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)


def _decode_failure(path: Path, err: BaseException) -> CorruptImage:
    item = str(path)
    if isinstance(err, FileNotFoundError):
        return CorruptImage(item, "missing", "file not found")
    if isinstance(err, Image.DecompressionBombError):
        return CorruptImage(item, "too large", str(err))
    if path.is_file() and path.stat().st_size == 0:
        return CorruptImage(item, "empty", "file has 0 bytes")
    if "truncated" in str(err).lower():
        return CorruptImage(item, "truncated", str(err))
    if isinstance(err, UnidentifiedImageError):
        return CorruptImage(item, "unreadable", "not a recognised image format")
    return CorruptImage(item, "unreadable", f"{type(err).__name__}: {err}")


def _bad_name(item: str) -> Optional[str]:
    """Why a path cannot be an item id, or None. Ids are written one per UTF-8 line (an
    embedding store's items, skip reports), so a line break, or bytes that are not UTF-8
    (which Python decodes to surrogate escapes), would stop an `embed` run at that file."""
    if "\n" in item or "\r" in item:
        return "the path contains a line break"
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        return "the path is not valid UTF-8"
    return None


def _shown(item: str) -> str:
    # a bad name is shown escaped: as is, it would split the message or fail to print
    return item if _bad_name(item) is None else ascii(item)


class ImageSource(Dataset):
    """The uniform image input of the library: N images with optional labels.

    Build one with `from_paths`, `from_folder` or `from_arrays` (or `load_benchmark`).

    Attributes:
        items: [N] str ids: the file path, or "array:<i>" for in-memory images.
        root: the folder the images were listed from (`from_folder`), else None.
        labels: [N] int64 class ids, or None.
        class_names: names of the class ids (index = id), or None.
        transform: callable PIL.Image (RGB) -> Tensor applied by `__getitem__`; None
            (default) returns the PIL image itself.
    """

    def __init__(self, items: Sequence[str], labels: Any = None, class_names: Sequence[str] | None = None):
        self.items = list(items)
        self.labels = None if labels is None else _check_labels(labels, len(self.items))
        self.class_names = None if class_names is None else list(class_names)
        self.transform: Callable[[Image.Image], Any] | None = None
        self.root: Path | None = None

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Image.Image:
        """Image i as an RGB PIL image; raises CorruptImage if it cannot be decoded."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Any, int, str | None]:
        """(transform(image) or the PIL image, i, None), or (None, i, reason) for a bad
        image; never raises for a bad file, so one corrupt image cannot stop a DataLoader."""
        try:
            img = self.load(i)
        except CorruptImage as err:
            log.debug("skipping %s", err)
            return None, i, err.reason
        return (img if self.transform is None else self.transform(img)), i, None

    @classmethod
    def from_paths(cls, paths: Iterable[PathLike], labels: Any = None) -> "FileImageSource":
        """Images from an explicit list of files (order kept); labels: [N] ints or None."""
        return FileImageSource(list_images(list(paths)), labels=labels)

    @classmethod
    def from_folder(cls, root: PathLike) -> "FileImageSource":
        """All images under `root` (see `list_images`).

        Class layout: when `root` holds no image directly but has sub-folders, each
        (non-hidden) sub-folder is a class, `class_names` are the sub-folder names sorted
        and `labels` index into them (images nested deeper belong to their top sub-folder).
        Otherwise the source has no labels.
        """
        root = Path(root)
        paths = list_images(root)
        if root.is_file():
            return FileImageSource(paths)
        class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not _hidden(d.name))
        if not class_names or any(p.parent == root for p in paths):
            source = FileImageSource(paths)
        else:
            index = {name: k for k, name in enumerate(class_names)}
            labels = np.array([index[p.relative_to(root).parts[0]] for p in paths], dtype=np.int64)
            source = FileImageSource(paths, labels=labels, class_names=class_names)
        source.root = root
        return source

    @classmethod
    def from_arrays(
        cls, images: Any, labels: Any = None, class_names: Sequence[str] | None = None
    ) -> "ArrayImageSource":
        """In-memory images: uint8 array (or tensor) [N, H, W, 3]; labels: [N] ints or None."""
        return ArrayImageSource(images, labels=labels, class_names=class_names)


class FileImageSource(ImageSource):
    """Images read from files; `items` are the paths as str."""

    def __init__(self, paths: Sequence[PathLike], labels: Any = None, class_names: Sequence[str] | None = None):
        super().__init__([str(p) for p in paths], labels=labels, class_names=class_names)

    def load(self, i: int) -> Image.Image:
        path = Path(self.items[i])
        # skipped like an unreadable image, so that a fit of the folder and a fit of its
        # embedding store see the same images
        problem = _bad_name(self.items[i])
        if problem is not None:
            raise CorruptImage(_shown(self.items[i]), "bad name", problem)
        try:
            with Image.open(path) as img:
                # Image.open only parses the header; decoding everything here is what
                # exposes a truncated file, and the pixels outlive the closed handle.
                img.load()
                return img if img.mode == "RGB" else img.convert("RGB")
        except _DECODE_ERRORS as err:
            raise _decode_failure(path, err) from err


class ArrayImageSource(ImageSource):
    """Images held as one uint8 array [N, H, W, 3]; `items` are "array:<i>"."""

    def __init__(self, images: Any, labels: Any = None, class_names: Sequence[str] | None = None):
        if isinstance(images, Tensor):
            images = images.detach().cpu().numpy()
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be an array [N, H, W, 3] (RGB, channels last), got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError("images is empty (0 images)")
        self.images = images
        super().__init__([f"array:{i}" for i in range(images.shape[0])], labels=labels, class_names=class_names)

    def load(self, i: int) -> Image.Image:
        # Image.fromarray needs a C-contiguous row; views of transposed arrays are not
        return Image.fromarray(np.ascontiguousarray(self.images[i]))


def _check_labels(labels: Any, n: int) -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must be 1-D with one entry per image ({n}), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def collate_skip(
    batch: Sequence[tuple[Any, int, str | None]],
) -> tuple[Tensor | None, Tensor, list[tuple[int, str]]]:
    """DataLoader `collate_fn` for `ImageSource` items that drops the failed ones.

    Args:
        batch: `ImageSource.__getitem__` outputs (image tensor or None, index, reason).
    Returns:
        images: [B', ...] stacked tensors of the B' good items, or None if none was good;
        kept: [B'] int64 source indices of those rows;
        skipped: [(index, reason)] of the bad items.
    Raises:
        TypeError: the source has no transform, so items are PIL images, not tensors.
    """
    good = [(x, i) for x, i, err in batch if err is None]
    skipped = [(i, err) for _, i, err in batch if err is not None]
    kept = torch.tensor([i for _, i in good], dtype=torch.long)
    if not good:
        return None, kept, skipped
    if not all(isinstance(x, Tensor) for x, _ in good):
        raise TypeError(
            "collate_skip stacks tensors but got PIL images: set source.transform to a callable "
            "returning a Tensor (e.g. the CLIP preprocess)"
        )
    return torch.stack([x for x, _ in good]), kept, skipped


@dataclass
class SkipReport:
    """Running tally of the images a pass skipped.

    Attributes:
        total: images seen (kept + skipped).
        skipped: [(item id, reason)] in the order met.
    """

    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def update(self, items: Sequence[str], kept: Tensor | Sequence[int], skipped: Sequence[tuple[int, str]]) -> None:
        """Add one `collate_skip` batch; `items` is the source's `items` (maps index -> id)."""
        self.total += len(kept) + len(skipped)
        self.skipped.extend((items[i], reason) for i, reason in skipped)

    @property
    def count(self) -> int:
        return len(self.skipped)

    def by_kind(self) -> dict[str, int]:
        """{kind: count}, most frequent first; the kind is the reason's text before ':'."""
        counts = Counter(reason.split(":", 1)[0] for _, reason in self.skipped)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def __str__(self) -> str:
        text = f"skipped {self.count} of {self.total} images"
        if not self.skipped:
            return text
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.by_kind().items())
        item, reason = self.skipped[0]
        return f"{text} ({kinds}): first: {_shown(item)} ({reason})"


class TensorSource(torch.utils.data.Dataset):
    """Rows of a tensor as a data source with the `ImageSource` item contract."""

    def __init__(self, rows: Tensor, labels: Optional[np.ndarray] = None) -> None:
        self.rows = rows
        self.labels = labels
        self.items = [f"row:{i}" for i in range(rows.shape[0])]
        self.transform: Optional[Callable[[Tensor], Tensor]] = None

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int, None]:
        x = self.rows[i]
        return (self.transform(x) if self.transform else x), i, None


class DatasetSource(Dataset):
    """Any map-style Dataset of PIL images (or (image, label) pairs) as a source:
    items ``(transform(image), index, None)``."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.items = [f"item:{i}" for i in range(len(ds))]  # type: ignore[arg-type]
        self.transform: Optional[Callable[[Any], Any]] = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, int, None]:
        item = self.ds[i]
        img = item[0] if isinstance(item, (tuple, list)) else item
        return (self.transform(img) if self.transform else img), i, None


class KeptSource(Dataset):
    """The readable items of a source, re-indexed 0..n-1 (stage 2 never sees skipped ones)."""

    def __init__(self, source: Dataset, kept: Tensor) -> None:
        self.source, self.kept = source, kept.tolist()
        self.items = [source.items[i] for i in self.kept]

    @property
    def transform(self) -> Any:
        return self.source.transform

    @transform.setter
    def transform(self, fn: Any) -> None:
        self.source.transform = fn

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, i: int) -> tuple[Any, int, Optional[str]]:
        x, _, err = self.source[self.kept[i]]
        return x, i, err


def check_batching(batch_size: int, workers: int) -> None:
    """The `iter_batches` options: ValueError (TypeError for a non-int) naming the one
    out of range. A caller that writes files checks them before creating any."""
    ops.validate.count("batch_size", batch_size, 1)
    ops.validate.count("workers", workers, 0)


def iter_batches(source: Source, transform: Optional[Callable[[Any], Any]], batch_size: int, *, workers: int = 0,
                 indices: Optional[Sequence[int]] = None, report: Optional[SkipReport] = None,
                 progress: bool = False, desc: str = "batches", pin_memory: bool = False,
                 ) -> Iterator[tuple[Optional[Tensor], Tensor, list[tuple[int, str]]]]:
    """The one batch loop over a source: sets `source.transform`, decodes `indices`
    (default: all items, in order) in `workers` processes, drops unreadable items and
    yields (batch [B', ...] or None, kept source indices [B'], skipped [(index, reason)])
    per batch; `report`, when given, tallies the skipped items."""
    check_batching(batch_size, workers)
    source.transform = transform
    # Subset keeps the source's own indices in what __getitem__ returns
    dataset = source if indices is None else Subset(source, indices)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skip,
                        pin_memory=pin_memory)
    for batch, kept, skipped in tqdm(loader, unit="batch", desc=desc, disable=not progress, leave=False):
        if report is not None:
            report.update(source.items, kept, skipped)
        yield batch, kept, list(skipped)
