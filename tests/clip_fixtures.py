"""Test helpers for anything that needs a CLIP model or image files (no downloads).

Import the plain functions (the tiny CLIP, image folders, the benchmarks' own file
formats), or the pytest fixtures into a test module:

    from clip_fixtures import tiny_clip, png_folder, tiny_encoder, write_random_pngs
    pytestmark = pytest.mark.usefixtures("torch_single_thread")  # optional, for speed
"""

from __future__ import annotations

import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semclust.clip.encoder import ClipEncoder

# the tiny open_clip architecture shipped with the package (embed_dim 32, 32x32 images)
TINY_CLIP_CONFIG = Path(str(resources.files("semclust").joinpath("tiny_clip.json")))


def tiny_encoder(seed: int = 0, device: str = "cpu") -> ClipEncoder:
    """A ClipEncoder of the tiny config with random weights drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClipEncoder.load(TINY_CLIP_CONFIG, pretrained=None, device=device)


def save_checkpoint(encoder: ClipEncoder, path: str | Path) -> Path:
    """Write the encoder's state_dict to `path` (.safetensors by suffix, else torch.save)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


# three well-separated colours: the tiny random CLIP tells them apart, so a fit has classes
CLASS_COLOURS = ((220, 30, 30), (30, 200, 40), (30, 40, 220))


def write_colour_classes(images: Path, per_class: int = 8, seed: int = 0) -> np.random.Generator:
    """`images/class_<c>/img_<i>.png`: `per_class` noisy 40x48 PNGs of each of CLASS_COLOURS.
    Returns the generator, for callers that draw more files from the same stream."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(CLASS_COLOURS):
        (images / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / f"class_{c}" / f"img_{i:02d}.png")
    return rng


def write_random_pngs(root: str | Path, n: int = 8, size: tuple[int, int] = (40, 48), n_classes: int = 0,
                      corrupt: int = 0, seed: int = 0) -> list[Path]:
    """Write `n` random RGB PNGs (H, W = size) under `root`, plus `corrupt` bad ".png" files.

    n_classes > 0 puts the images into `class_<k>/` sub-folders (round robin), the layout
    `ImageSource.from_folder` reads as labels. Bad files alternate between a truncated PNG
    and bytes that are no image at all. Returns every written path, good ones first.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n + corrupt):
        folder = root / f"class_{i % n_classes}" if n_classes else root
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:04d}.png"
        if i < n:
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        elif (i - n) % 2 == 0:
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_bytes(b"this is not an image")
        paths.append(path)
    return paths


# ---- tiny copies of the benchmarks' own file formats (`semclust.inputs.benchmarks`) ----------

def random_images(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """uint8 [n, side, side, 3] random RGB images."""
    return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 32, 32, 3] -> the official rows [n, 3072]: the R plane, then G, then B,
    each 32x32 row-major."""
    return np.stack([np.concatenate([im[:, :, c].flatten(order="C") for c in range(3)]) for im in images])


def write_py2_style_pickle(path: Path, obj: object) -> None:
    # the official files were written by Python 2 with numpy 1.x: protocol 2, numpy.core
    blob = pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(blob)


def write_cifar10(root: Path, rng: np.random.Generator, per_file: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    """`root/cifar-10-batches-py/`: data_batch_1..5 and test_batch of `per_file` random
    images each (labels drawn from 0..9) and batches.meta naming the classes c0..c9.
    Returns file name -> (images [per_file, 32, 32, 3], labels)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs, labels = random_images(rng, per_file, 32), rng.integers(0, 10, per_file).tolist()
        write_py2_style_pickle(d / name, {"batch_label": name, "data": cifar_rows(imgs), "labels": labels})
        data[name] = (imgs, labels)
    write_py2_style_pickle(d / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return data


def write_cifar100(root: Path, splits: dict[str, tuple[np.ndarray, list[int], list[int]]]) -> None:
    """`root/cifar-100-python/<split>` per split (images [n, 32, 32, 3], fine labels,
    coarse labels), with the bytes keys of the Python 2 originals; no meta file."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split, (imgs, fine, coarse) in splits.items():
        entry = {"data": cifar_rows(imgs), "fine_labels": fine, "coarse_labels": coarse}
        with open(d / split, "wb") as f:
            pickle.dump({k.encode(): v for k, v in entry.items()}, f, protocol=2)


def write_stl10(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """`root/stl10_binary/`: per split (images [n, 96, 96, 3], labels uint8 in 1..10)
    <split>_X.bin, each image 3 planes of 96x96 in column-major order, and <split>_y.bin;
    class_names.txt naming c0..c9. Returns the folder."""
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    for split, (imgs, labels) in splits.items():
        raw = np.stack([np.concatenate([im[:, :, c].flatten(order="F") for c in range(3)]) for im in imgs])
        raw.tofile(d / f"{split}_X.bin")
        np.asarray(labels, dtype=np.uint8).tofile(d / f"{split}_y.bin")
    (d / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    return d


@pytest.fixture
def torch_single_thread():
    """Run the test with one intra-op thread: tiny tensors on a busy shared machine are
    many times slower with thread hand-offs than without."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_clip() -> ClipEncoder:
    """A fresh tiny random-weight ClipEncoder (seed 0) on CPU."""
    return tiny_encoder()


@pytest.fixture
def png_folder(tmp_path: Path) -> Path:
    """A folder of 10 random PNGs in 2 class sub-folders plus 2 corrupt files."""
    root = tmp_path / "images"
    write_random_pngs(root, n=10, n_classes=2, corrupt=2)
    return root
