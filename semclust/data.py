"""Image and embedding inputs: folders, path lists, arrays, benchmark sets, embedding files.

Nothing here downloads: benchmark sets are read from a local copy whose expected layout
each loader's error message spells out.

Images reach the rest of the library as an `ImageSource` (a torch Dataset). A bad file
never stops a run: `ImageSource[i]` returns `(None, i, reason)` for it, `collate_skip`
drops such items from a DataLoader batch, and `SkipReport` tallies them:

    source = ImageSource.from_folder("photos/")
    source.transform = preprocess                  # PIL -> Tensor, e.g. open_clip's
    loader = DataLoader(source, batch_size=256, collate_fn=collate_skip)
    report = SkipReport()
    for x, kept, skipped in loader:
        report.update(source.items, kept, skipped)
        ...                                        # x [B, 3, H, W] holds the good images only
    if report.count:
        logger.warning("%s", report)
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_images",
    "CorruptImage",
    "ImageSource",
    "FileImageSource",
    "ArrayImageSource",
    "collate_skip",
    "SkipReport",
    "BENCHMARKS",
    "load_benchmark",
    "load_embeddings",
    "load_labels",
]

# Lower-case suffixes Pillow decodes out of the box; matched case-insensitively.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

# Rows per block when checking a (possibly memory-mapped) embedding file for NaN/Inf:
# bounds the temporary boolean mask instead of allocating one as large as the file.
_FINITE_CHECK_ROWS = 65536


# --------------------------------------------------------------------------- listing


def _hidden(name: str) -> bool:
    # ".ipynb_checkpoints/" and macOS "._x.jpg" resource forks look like classes / images but are not
    return name.startswith(".")


def _walk_images(root: Path) -> list[Path]:
    found = []
    # followlinks: dataset folders are often symlink farms (e.g. ImageNet subsets)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        found.extend(
            Path(dirpath, f) for f in filenames if not _hidden(f) and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def list_images(root_or_paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Image files of a folder, or an explicit list of files checked to exist.

    A folder is searched recursively (symlinks followed, hidden files and folders
    skipped) for files whose extension is in `IMAGE_EXTENSIONS` (any case); the result is
    sorted by relative path so the order, and with it every index, is reproducible.
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

    `kind` is one of "missing", "empty", "truncated", "unreadable", "too large";
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


class ImageSource(Dataset):
    """The uniform image input of the library: N images with optional labels.

    Build one with `from_paths`, `from_folder` or `from_arrays` (or `load_benchmark`).

    Attributes:
        items: [N] str ids: the file path, or "array:<i>" for in-memory images.
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
            logger.debug("skipping %s", err)
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
            return FileImageSource(paths)
        index = {name: k for k, name in enumerate(class_names)}
        labels = np.array([index[p.relative_to(root).parts[0]] for p in paths], dtype=np.int64)
        return FileImageSource(paths, labels=labels, class_names=class_names)

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
        return f"{text} ({kinds}): first: {item} ({reason})"


# --------------------------------------------------------------------------- benchmarks



class _CifarFormat(NamedTuple):
    dirname: str
    url: str
    files: dict[str, list[str]]  # split -> pickles, in order
    label_key: str
    meta_file: str
    names_key: str


_CIFAR = {
    "cifar10": _CifarFormat(
        "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "labels",
        "batches.meta",
        "label_names",
    ),
    # CIFAR-20 is CIFAR-100 scored on its 20 superclasses, which the pickles carry
    "cifar20": _CifarFormat(
        "cifar-100-python",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        {"train": ["train"], "test": ["test"]},
        "coarse_labels",
        "meta",
        "coarse_label_names",
    ),
}
_STL10_URL = "https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"

# Where to get the image-folder benchmarks; they are read as `<root>/<name>/...`.
_FOLDER_SOURCES = {
    "imagenet10": "the 10 ILSVRC-2012 classes of ImageNet-10 (class list in the DAC / TAC code), "
    "images from https://image-net.org",
    "imagenet-dogs": "the 15 dog classes of ImageNet-Dogs (class list in the DAC / TAC code), "
    "images from https://image-net.org",
    "dtd": "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (its images/ folder is used as is)",
    "ucf101": "frames extracted from https://www.crcv.ucf.edu/data/UCF101.php videos "
    "(e.g. the middle frame of each clip), one folder per action",
}

BENCHMARKS: tuple[str, ...] = (*_CIFAR, "stl10", *_FOLDER_SOURCES)
_SPLITS = ("train", "test", "all")


def load_benchmark(name: str, root: PathLike, split: str = "train") -> ImageSource:
    """A labelled benchmark set from a local copy (never downloaded).

    Expected layouts under `root` (`root` may also be the dataset folder itself):

        cifar10        cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
                       (the python version: pickles of uint8 [10000, 3072] + labels)
        cifar20        cifar-100-python/{train, test, meta}; labels are the 20
                       superclasses ("coarse_labels")
        stl10          stl10_binary/{train,test}_{X,y}.bin (+ class_names.txt); the
                       unlabelled split is not used
        imagenet10, imagenet-dogs, dtd, ucf101
                       <name>/<split>/<class>/<image> with split in {train, test}, or
                       <name>/<class>/<image> (no split: every split is the whole set),
                       or for DTD's archive <name>/images/<class>/<image>

    Args:
        name: one of `BENCHMARKS`.
        root: folder holding the dataset folder.
        split: "train", "test" or "all" (train followed by test).
    Returns:
        An ImageSource with `labels` [N] int64 and `class_names`.
    Raises:
        FileNotFoundError: the files are missing; the message gives the layout and source.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {list(BENCHMARKS)}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    root = Path(root)
    if name in _CIFAR:
        return _load_cifar(root, _CIFAR[name], split)
    if name == "stl10":
        return _load_stl10(root, split)
    return _load_image_folder(root, name, split)


def _dataset_dir(root: Path, dirname: str, layout: str, source: str) -> Path:
    for candidate in (root / dirname, root):
        if candidate.is_dir() and candidate.name == dirname:
            return candidate
    raise FileNotFoundError(
        f"{dirname}/ not found under {str(root)!r}. Expected layout: {layout}. "
        f"Get the data from {source} and extract it there (semclust never downloads)."
    )


def _require(path: Path, layout: str, source: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"missing {str(path)!r}. Expected layout: {layout}. Get the data from {source} (semclust never downloads)."
        )
    return path


class _ArrayUnpickler(pickle.Unpickler):
    """Reads the CIFAR pickles (dicts of lists, strings and numpy arrays) and nothing
    else: a plain pickle.load would run any code a tampered file names."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    # latin1: the official files were pickled by Python 2; this decodes their str keys
    # and numpy buffers byte for byte
    with open(path, "rb") as f:
        obj = _ArrayUnpickler(f, encoding="latin1").load()
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _split_parts(split: str) -> list[str]:
    return ["train", "test"] if split == "all" else [split]


def _load_cifar(root: Path, fmt: _CifarFormat, split: str) -> ArrayImageSource:
    """CIFAR python pickles: "data" uint8 [n, 3072] = 3 planes (R, G, B) of 32x32, row-major."""
    layout = f"<root>/{fmt.dirname}/{{{', '.join(fmt.files['train'] + fmt.files['test'])}, {fmt.meta_file}}}"
    folder = _dataset_dir(root, fmt.dirname, layout, fmt.url)
    images, labels = [], []
    for part in _split_parts(split):
        for fname in fmt.files[part]:
            batch = _read_pickle(_require(folder / fname, layout, fmt.url))
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[fmt.label_key], dtype=np.int64))
    meta = folder / fmt.meta_file
    class_names = _read_pickle(meta)[fmt.names_key] if meta.is_file() else None
    return ArrayImageSource(np.concatenate(images), labels=np.concatenate(labels), class_names=class_names)


_STL10_SIDE = 96


def _load_stl10(root: Path, split: str) -> ArrayImageSource:
    """STL-10 binaries: X uint8, each image 3 planes of 96x96 stored column-major; y uint8 in 1..10."""
    layout = "<root>/stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt}"
    folder = _dataset_dir(root, "stl10_binary", layout, _STL10_URL)
    images, labels = [], []
    for part in _split_parts(split):
        x = np.fromfile(_require(folder / f"{part}_X.bin", layout, _STL10_URL), dtype=np.uint8)
        y = np.fromfile(_require(folder / f"{part}_y.bin", layout, _STL10_URL), dtype=np.uint8)
        per_image = 3 * _STL10_SIDE * _STL10_SIDE
        if x.size % per_image or x.size // per_image != y.size:
            raise ValueError(
                f"{folder}/{part}_X.bin holds {x.size} bytes for {y.size} labels; expected "
                f"{per_image} bytes per image (is the file complete?)"
            )
        # [n, c, x, y] in memory (column-major planes) -> [n, y, x, c] = [n, H, W, 3]
        images.append(x.reshape(-1, 3, _STL10_SIDE, _STL10_SIDE).transpose(0, 3, 2, 1))
        labels.append(y.astype(np.int64) - 1)
    names_file = folder / "class_names.txt"
    class_names = names_file.read_text().split() if names_file.is_file() else None
    return ArrayImageSource(np.concatenate(images), labels=np.concatenate(labels), class_names=class_names)


def _load_image_folder(root: Path, name: str, split: str) -> FileImageSource:
    layout = f"<root>/{name}/<split>/<class>/<image> (split: train, test) or <root>/{name}/<class>/<image>"
    folder = _dataset_dir(root, name, layout, _FOLDER_SOURCES[name])
    if (folder / "images").is_dir():
        folder = folder / "images"  # DTD's archive: images/<class>/, beside labels/ and imdb/
    has_splits = any((folder / part).is_dir() for part in ("train", "test"))
    if not has_splits:
        if split != "all":
            logger.info("%s has no train/test folders: split %r is the whole set", folder, split)
        return _class_folders([folder], name, layout)
    parts = [folder / part for part in _split_parts(split)]
    for part in parts:
        if not part.is_dir():
            raise FileNotFoundError(f"missing split folder {str(part)!r}. Expected layout: {layout}.")
    return _class_folders(parts, name, layout)


def _class_folders(folders: list[Path], name: str, layout: str) -> FileImageSource:
    """Concatenate class-folder sets, labels indexing the union of their class names."""
    parts = [ImageSource.from_folder(f) for f in folders]
    if any(p.labels is None for p in parts):
        raise ValueError(f"{name}: expected one sub-folder per class in {[str(f) for f in folders]}. Layout: {layout}.")
    class_names = sorted(set().union(*(p.class_names for p in parts)))
    index = {c: k for k, c in enumerate(class_names)}
    paths = [item for p in parts for item in p.items]
    labels = np.concatenate([np.array([index[p.class_names[y]] for y in p.labels], dtype=np.int64) for p in parts])
    return FileImageSource(paths, labels=labels, class_names=class_names)


# --------------------------------------------------------------------------- embeddings


def load_embeddings(path: PathLike, mmap: bool = False, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """Embeddings [N, D] from `.npy`, `.pt`/`.pth`, `.safetensors` or a folder of `.npy` shards.

    - `.npy`: with `mmap=True` the file is memory-mapped rather than read; the map is
      copy-on-write, so writing into the tensor neither changes the file nor crashes.
    - `.pt`/`.pth`: `torch.load(weights_only=True)` of a tensor or a dict with key
      "embeddings" (`mmap` is passed on to torch.load).
    - `.safetensors`: the tensor named "embeddings".
    - folder: its `*.npy` shards in natural order ("2" before "10"), rows concatenated
      (into memory, even with `mmap=True`, unless there is a single shard).

    Args:
        path: the file or shard folder.
        mmap: memory-map instead of reading (for files larger than RAM).
        dtype: result dtype (float32 by default); None keeps the stored floating dtype,
            which with `mmap=True` on an fp16 file avoids any copy.
    Returns:
        Tensor [N, D] on CPU.
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unknown format, not 2-D, not floating, empty, or rows with NaN/Inf.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embedding file or folder {str(path)!r} does not exist")
    t = _read_embeddings(path, mmap)
    if t.dim() != 2:
        raise ValueError(f"embeddings in {str(path)!r} must be 2-D [N, D], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"embeddings in {str(path)!r} must be floating point, got {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"embeddings in {str(path)!r} are empty (shape {tuple(t.shape)})")
    _check_finite(t, path)
    if dtype is not None and t.dtype != dtype:
        if mmap:
            logger.info("converting memory-mapped %s from %s to %s copies it into memory", path, t.dtype, dtype)
        t = t.to(dtype)
    return t


def _read_embeddings(path: Path, mmap: bool) -> Tensor:
    if path.is_dir():
        shards = sorted(path.glob("*.npy"), key=_natural_key)
        if not shards:
            raise ValueError(f"embedding folder {str(path)!r} has no .npy shards")
        parts = [_read_npy(s, mmap) for s in shards]
        widths = {p.shape[1:] for p in parts}
        if len(widths) > 1 or any(p.dim() != 2 for p in parts):
            shapes = {s.name: tuple(p.shape) for s, p in zip(shards, parts)}
            raise ValueError(f"shards in {str(path)!r} must all be [n_i, D] with one D, got {shapes}")
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path, mmap)
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return _pick_tensor(obj, path)
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "embeddings" not in f.keys():
                raise ValueError(f"{str(path)!r} has no tensor named 'embeddings' (found {list(f.keys())})")
            return f.get_tensor("embeddings")
    raise ValueError(
        f"unknown embedding format {suffix!r} for {str(path)!r}; "
        "use .npy, .pt/.pth, .safetensors or a folder of .npy shards"
    )


def _read_npy(path: Path, mmap: bool) -> Tensor:
    # "c" (copy-on-write) rather than "r": torch cannot mark a tensor read-only, and a
    # write into a read-only map would crash the process
    arr = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"embeddings in {str(path)!r} must be floating point, got dtype {arr.dtype}")
    return torch.from_numpy(arr)


def _pick_tensor(obj: Any, path: Path) -> Tensor:
    if isinstance(obj, dict):
        if "embeddings" not in obj:
            raise ValueError(f"{str(path)!r} holds a dict without key 'embeddings' (keys: {list(obj)[:10]})")
        obj = obj["embeddings"]
    if not isinstance(obj, Tensor):
        raise ValueError(f"{str(path)!r} must hold a tensor or a dict with key 'embeddings', got {type(obj).__name__}")
    return obj


def _natural_key(p: Path) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", p.name)]


def _check_finite(t: Tensor, path: Path) -> None:
    bad = 0
    for start in range(0, t.shape[0], _FINITE_CHECK_ROWS):
        block = t[start : start + _FINITE_CHECK_ROWS]
        bad += int((~torch.isfinite(block)).any(dim=1).sum())
    if bad:
        raise ValueError(
            f"embeddings in {str(path)!r} have {bad} of {t.shape[0]} rows with NaN or Inf; drop or recompute them"
        )


def load_labels(path: PathLike) -> np.ndarray:
    """Integer labels [N] int64 from `.npy` (1-D integer array) or `.txt`/`.csv` (one
    integer per line; blank lines ignored).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown format, a line that is not an integer, not 1-D / integer, empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{str(path)!r} must hold a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
        labels = arr.astype(np.int64)
    elif suffix in (".txt", ".csv"):
        labels = np.array(_parse_int_lines(path), dtype=np.int64)
    else:
        raise ValueError(f"unknown labels format {suffix!r} for {str(path)!r}; use .npy, .txt or .csv")
    if labels.size == 0:
        raise ValueError(f"labels file {str(path)!r} is empty")
    return labels


def _parse_int_lines(path: Path) -> list[int]:
    values = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            try:
                values.append(int(text))
            except ValueError:
                raise ValueError(f"{str(path)!r} line {lineno}: expected one integer per line, got {text!r}") from None
    return values


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
