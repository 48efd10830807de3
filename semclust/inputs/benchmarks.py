"""Benchmark image sets from their usual on-disk layouts: CIFAR-10/20, STL-10, class folders,
ImageNet-1K.

Nothing here downloads: each set is read from a local copy whose expected layout the
loader's error message spells out. Pickled CIFAR batches are read with a restricted
unpickler that builds arrays and nothing else.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .sources import ArrayImageSource, FileImageSource, ImageSource, PathLike

log = logging.getLogger(__name__)


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


class _FolderFormat(NamedTuple):
    dirname: str  # read as <root>/<dirname>/...
    source: str  # where to get it
    # the folder of each split, the first of these that exists (TAC's own copies name them
    # trainval and val)
    train_folders: tuple[str, ...] = ("train", "trainval")
    test_folders: tuple[str, ...] = ("test", "val")


_FOLDERS = {
    "imagenet10": _FolderFormat(
        "imagenet10", "the 10 ILSVRC-2012 classes of ImageNet-10 (class list in the DAC / TAC code), "
        "images from https://image-net.org"),
    "imagenet-dogs": _FolderFormat(
        "imagenet-dogs", "the 15 dog classes of ImageNet-Dogs (class list in the DAC / TAC code), "
        "images from https://image-net.org"),
    "dtd": _FolderFormat("dtd", "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (its images/ and labels/ folders as "
                                "extracted)"),
    "ucf101": _FolderFormat(
        "ucf101", "frames extracted from https://www.crcv.ucf.edu/data/UCF101.php videos "
        "(e.g. the middle frame of each clip), one folder per action"),
    # ILSVRC-2012 as torchvision's ImageFolder reads it: its labelled held-out split is val
    # (a test/ folder, when extracted, holds the unlabelled test images)
    "imagenet1k": _FolderFormat(
        "imagenet", "ILSVRC-2012 from https://image-net.org: train/ as extracted, val/ sorted into one "
        "folder per wnid (e.g. by the valprep.sh of the PyTorch ImageNet example)", ("train",), ("val",)),
}
# DTD's split lists (labels/<list>.txt, one images/-relative path per line): split 1, with
# its train and val lists trained on (TAC's trainval) and its test list scored
_DTD_LISTS = {"train": ("train1", "val1"), "test": ("test1",)}

BENCHMARKS: tuple[str, ...] = (*_CIFAR, "stl10", *_FOLDERS)
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
                       <name>/<split>/<class>/<image> with split in {train or trainval,
                       test or val}, or <name>/<class>/<image> (no split: every split is
                       the whole set)
        dtd            also DTD's archive dtd/images/<class>/<image> with
                       dtd/labels/{train1,val1,test1}.txt: split 1, train1 + val1 as
                       "train", test1 as "test"; images/ without the lists is the whole set
        imagenet1k     imagenet/{train,val}/<wnid>/<image>.JPEG (torchvision's ImageFolder
                       layout, val sorted into wnid folders); split "test" reads val/

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
    fmt = _FOLDERS[name]
    names = {"train": fmt.train_folders, "test": fmt.test_folders}
    layout = (f"<root>/{fmt.dirname}/<split>/<class>/<image> (splits: {' or '.join(fmt.train_folders)}, "
              f"{' or '.join(fmt.test_folders)}) or <root>/{fmt.dirname}/<class>/<image>")
    folder = _dataset_dir(root, fmt.dirname, layout, fmt.source)
    if (folder / "images").is_dir():  # DTD's archive: images/<class>/, beside labels/ and imdb/
        lists = {part: [folder / "labels" / f"{f}.txt" for f in files] for part, files in _DTD_LISTS.items()}
        if all(f.is_file() for files in lists.values() for f in files):
            return _listed(folder / "images", [f for part in _split_parts(split) for f in lists[part]])
        folder = folder / "images"
    found = {part: next((folder / f for f in candidates if (folder / f).is_dir()), None)
             for part, candidates in names.items()}
    if not any(found.values()):
        if split != "all":
            log.info("%s has no split folders: split %r is the whole set", folder, split)
        return _class_folders([folder], name, layout)
    for part in _split_parts(split):
        if found[part] is None:
            raise FileNotFoundError(f"no {' or '.join(names[part])} folder in {str(folder)!r}. Expected layout: "
                                    f"{layout}. Get the data from {fmt.source} (semclust never downloads).")
    return _class_folders([found[part] for part in _split_parts(split)], name, layout)


def _listed(images: Path, lists: list[Path]) -> FileImageSource:
    """The images the split lists name (one `<class>/<file>` path under `images` per line),
    labels indexing their sorted class names."""
    rel = [line.strip() for f in lists for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    classes = [r.split("/", 1)[0] for r in rel]
    class_names = sorted(set(classes))
    index = {c: k for k, c in enumerate(class_names)}
    return FileImageSource([images / r for r in rel], labels=np.array([index[c] for c in classes], dtype=np.int64),
                           class_names=class_names)


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


