import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clip_fixtures import random_images, write_cifar10, write_cifar100, write_stl10
from semclust.inputs.benchmarks import load_benchmark
from semclust.inputs.embeddings import load_embeddings, load_labels
from semclust.inputs.sources import (
    ArrayImageSource,
    CorruptImage,
    FileImageSource,
    ImageSource,
    SkipReport,
    collate_skip,
    list_images,
)

RNG = np.random.default_rng(0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def write_image(path: Path, size=(8, 6), fmt=None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


# --------------------------------------------------------------------------- listing


def test_list_images_recursive_sorted_case_insensitive(tmp_path):
    for name in ["b/2.JPG", "a/1.png", "c.jpeg", "a/z/3.Webp", ".hidden/4.png", "a/._5.jpg"]:
        write_image(tmp_path / name, fmt="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/1.png", "a/z/3.Webp", "b/2.JPG", "c.jpeg"]


def test_list_images_errors(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        list_images(tmp_path)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        list_images(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="1 of 2"):
        list_images([tmp_path / "readme.txt", tmp_path / "gone.jpg"])
    with pytest.raises(ValueError, match="empty"):
        list_images([])


# --------------------------------------------------------------------------- sources and skipping


@pytest.fixture
def messy_folder(tmp_path):
    """2 good images, then every kind of bad file, all with image extensions."""
    good = {"a_good.jpg": write_image(tmp_path / "a_good.jpg"), "b_good.png": write_image(tmp_path / "b_good.png")}
    write_image(tmp_path / "c_trunc.jpg", size=(64, 64))
    data = (tmp_path / "c_trunc.jpg").read_bytes()
    (tmp_path / "c_trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "d_text.jpg").write_text("this is not a jpeg")
    (tmp_path / "e_empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "f_gray.png")
    return tmp_path, good


def test_load_and_getitem_on_bad_files(messy_folder):
    root, good = messy_folder
    src = ImageSource.from_folder(root)
    assert isinstance(src, FileImageSource) and src.labels is None and len(src) == 6
    assert np.array_equal(np.asarray(src.load(1)), good["b_good.png"])
    assert src.load(5).mode == "RGB"  # grayscale converted
    kinds = {}
    for i in (2, 3, 4):
        with pytest.raises(CorruptImage) as err:
            src.load(i)
        kinds[Path(src.items[i]).name] = err.value.kind
        assert src.items[i] in str(err.value)
        x, idx, reason = src[i]  # never raises
        assert x is None and idx == i and reason.startswith(err.value.kind)
    assert kinds == {"c_trunc.jpg": "truncated", "d_text.jpg": "unreadable", "e_empty.png": "empty"}
    img, idx, reason = src[0]
    assert isinstance(img, Image.Image) and reason is None  # default transform: PIL


def test_missing_file_after_listing_is_skipped(tmp_path):
    write_image(tmp_path / "x.png")
    src = ImageSource.from_paths([tmp_path / "x.png"])
    (tmp_path / "x.png").unlink()
    assert src[0][2].startswith("missing")


def test_dataloader_skips_and_reports(messy_folder):
    root, good = messy_folder
    src = ImageSource.from_folder(root)
    src.transform = lambda img: to_tensor(img.resize((4, 4)))
    report = SkipReport()
    seen = []
    for x, kept, skipped in DataLoader(src, batch_size=4, collate_fn=collate_skip):
        assert x.shape == (len(kept), 3, 4, 4) and x.dtype == torch.uint8
        report.update(src.items, kept, skipped)
        seen += kept.tolist()
    assert seen == [0, 1, 5]
    assert report.count == 3 and report.total == 6
    assert report.by_kind() == {"empty": 1, "truncated": 1, "unreadable": 1}
    text = str(report)
    assert text.startswith("skipped 3 of 6 images (1 empty, 1 truncated, 1 unreadable): first: ")
    assert "c_trunc.jpg (truncated: image file is truncated" in text


def test_collate_skip_edge_cases():
    x, kept, skipped = collate_skip([(None, 3, "unreadable: x"), (None, 4, "empty: y")])
    assert x is None and kept.tolist() == [] and kept.dtype == torch.long
    assert skipped == [(3, "unreadable: x"), (4, "empty: y")]
    with pytest.raises(TypeError, match="transform"):
        collate_skip([(Image.new("RGB", (2, 2)), 0, None)])
    assert str(SkipReport(total=5)) == "skipped 0 of 5 images"


def test_from_folder_class_subfolders(tmp_path):
    for name in ["dog/1.jpg", "cat/2.png", "cat/sub/3.png", "dog/4.jpg"]:
        write_image(tmp_path / name)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()
    src = ImageSource.from_folder(tmp_path)
    assert src.class_names == ["cat", "dog", "empty_class"]
    assert [Path(i).name for i in src.items] == ["2.png", "3.png", "1.jpg", "4.jpg"]
    assert src.labels.tolist() == [0, 0, 1, 1] and src.labels.dtype == np.int64
    write_image(tmp_path / "loose.jpg")  # an image at the top: no class layout
    assert ImageSource.from_folder(tmp_path).labels is None


def test_from_paths_labels(tmp_path):
    paths = [tmp_path / "b.png", tmp_path / "a.png"]
    for p in paths:
        write_image(p)
    src = ImageSource.from_paths(paths, labels=[1, 0])
    assert src.items == [str(p) for p in paths] and src.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="one entry per image"):
        ImageSource.from_paths(paths, labels=[1])


def test_from_arrays():
    arr = RNG.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    src = ImageSource.from_arrays(arr, labels=np.array([0, 2, 1]))
    assert isinstance(src, ArrayImageSource)
    assert src.items == ["array:0", "array:1", "array:2"]
    assert np.array_equal(np.asarray(src.load(2)), arr[2])
    src.transform = to_tensor
    x, kept, skipped = collate_skip([src[i] for i in range(3)])
    assert torch.equal(x, torch.from_numpy(arr).permute(0, 3, 1, 2)) and skipped == []
    assert np.array_equal(np.asarray(ImageSource.from_arrays(torch.from_numpy(arr)).load(0)), arr[0])
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        ImageSource.from_arrays(arr[..., 0])
    with pytest.raises(ValueError, match="uint8"):
        ImageSource.from_arrays(arr.astype(np.float32))
    with pytest.raises(ValueError, match="integers"):
        ImageSource.from_arrays(arr, labels=[0.0, 1.0, 2.0])


# --------------------------------------------------------------------------- benchmarks


@pytest.fixture
def fake_cifar10(tmp_path):
    return tmp_path, write_cifar10(tmp_path, RNG)


def test_cifar10(fake_cifar10):
    root, data = fake_cifar10
    train = load_benchmark("cifar10", root)
    assert len(train) == 10 and train.images.shape == (10, 32, 32, 3)
    assert train.labels.tolist() == sum((data[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert np.array_equal(np.asarray(train.load(3)), data["data_batch_2"][0][1])  # pixel round-trip
    assert train.class_names == [f"c{i}" for i in range(10)]
    test = load_benchmark("cifar10", root / "cifar-10-batches-py", split="test")  # dataset folder itself
    assert test.labels.tolist() == data["test_batch"][1]
    assert len(load_benchmark("cifar10", root, split="all")) == 12


def test_cifar20_uses_coarse_labels(tmp_path):
    imgs = random_images(RNG, 4, 32)
    write_cifar100(tmp_path, {split: (imgs, [99, 50, 3, 0], [19, 0, 7, 7]) for split in ("train", "test")})
    src = load_benchmark("cifar20", tmp_path, split="test")
    assert src.labels.tolist() == [19, 0, 7, 7] and src.class_names is None
    assert np.array_equal(src.images, imgs)


def test_cifar_refuses_code_in_pickles(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "train").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load .*print"):
        load_benchmark("cifar20", tmp_path)


def test_stl10_column_major(tmp_path):
    data = {split: (random_images(RNG, n, 96), RNG.integers(1, 11, n).astype(np.uint8))
            for split, n in (("train", 3), ("test", 2))}
    d = write_stl10(tmp_path, data)
    src = load_benchmark("stl10", tmp_path, split="all")
    assert src.images.shape == (5, 96, 96, 3)
    assert src.labels.tolist() == [int(y) - 1 for y in np.concatenate([data["train"][1], data["test"][1]])]
    assert np.array_equal(np.asarray(src.load(4)), data["test"][0][1])
    assert src.class_names == [f"c{i}" for i in range(10)]
    (d / "test_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="bytes per image"):
        load_benchmark("stl10", tmp_path, split="test")


def test_image_folder_benchmarks(tmp_path):
    for split, names in (("train", ["n01/a.jpg", "n02/b.jpg", "n02/c.jpg"]), ("test", ["n02/d.jpg", "n03/e.jpg"])):
        for name in names:
            write_image(tmp_path / "imagenet10" / split / name)
    train = load_benchmark("imagenet10", tmp_path)
    assert train.class_names == ["n01", "n02"] and train.labels.tolist() == [0, 1, 1]
    both = load_benchmark("imagenet10", tmp_path, split="all")
    assert both.class_names == ["n01", "n02", "n03"] and both.labels.tolist() == [0, 1, 1, 1, 2]
    # DTD's own archive layout: dtd/images/<class>/, no split folders
    for name in ["images/banded/1.jpg", "images/zigzagged/2.jpg", "labels/train1.txt"]:
        write_image(tmp_path / "dtd" / name, fmt="JPEG")
    dtd = load_benchmark("dtd", tmp_path, split="test")
    assert dtd.class_names == ["banded", "zigzagged"] and dtd.labels.tolist() == [0, 1]
    write_image(tmp_path / "ucf101" / "frame.jpg")
    with pytest.raises(ValueError, match="one sub-folder per class"):
        load_benchmark("ucf101", tmp_path)


@pytest.mark.parametrize(
    "name, hint",
    [
        ("cifar10", "cifar-10-python.tar.gz"),
        ("cifar20", "cifar-100-python"),
        ("stl10", "stl10_binary.tar.gz"),
        ("imagenet-dogs", "image-net.org"),
        ("ucf101", "UCF101"),
    ],
)
def test_benchmark_missing_says_layout_and_source(tmp_path, name, hint):
    with pytest.raises(FileNotFoundError, match="Expected layout") as err:
        load_benchmark(name, tmp_path)
    assert hint in str(err.value) and "never downloads" in str(err.value)


def test_benchmark_missing_file_and_bad_args(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_benchmark("cifar10", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mnist", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_benchmark("cifar10", tmp_path, split="val")


# --------------------------------------------------------------------------- embeddings


def emb(n=5, d=4, dtype=np.float32):
    return RNG.standard_normal((n, d)).astype(dtype)


def test_embeddings_formats(tmp_path):
    from safetensors.torch import save_file

    e = emb()
    np.save(tmp_path / "e.npy", e)
    torch.save(torch.from_numpy(e), tmp_path / "e.pt")
    torch.save({"embeddings": torch.from_numpy(e), "ids": [1, 2]}, tmp_path / "d.pth")
    save_file({"embeddings": torch.from_numpy(e)}, str(tmp_path / "e.safetensors"))
    np.save(tmp_path / "e64.npy", e.astype(np.float64))
    for name in ["e.npy", "e.pt", "d.pth", "e.safetensors", "e64.npy"]:
        t = load_embeddings(tmp_path / name)
        assert t.dtype == torch.float32 and t.shape == (5, 4), name
        assert np.allclose(t.numpy(), e), name


def test_embeddings_mmap(tmp_path):
    e = emb(dtype=np.float16)
    np.save(tmp_path / "e.npy", e)
    t = load_embeddings(tmp_path / "e.npy", mmap=True, dtype=None)
    assert t.dtype == torch.float16 and np.array_equal(t.numpy(), e)
    t[0] = 0  # copy-on-write: allowed, and the file is untouched
    assert np.array_equal(np.load(tmp_path / "e.npy"), e)
    assert load_embeddings(tmp_path / "e.npy", mmap=True).dtype == torch.float32


def test_embeddings_shards_natural_order(tmp_path):
    parts = {name: emb(n) for name, n in (("shard_2.npy", 2), ("shard_10.npy", 3), ("shard_1.npy", 1))}
    for name, a in parts.items():
        np.save(tmp_path / name, a)
    t = load_embeddings(tmp_path)
    expected = np.concatenate([parts["shard_1.npy"], parts["shard_2.npy"], parts["shard_10.npy"]])
    assert np.array_equal(t.numpy(), expected)
    np.save(tmp_path / "shard_11.npy", emb(2, 7))
    with pytest.raises(ValueError, match="one D"):
        load_embeddings(tmp_path)


def test_embeddings_errors(tmp_path):
    bad = emb(6)
    bad[1, 0], bad[4, 2], bad[4, 3] = np.nan, np.inf, np.nan
    cases = {
        "nan.npy": (bad, "2 of 6 rows with NaN or Inf"),
        "vec.npy": (emb()[0], "2-D"),
        "int.npy": (np.ones((3, 2), np.int64), "floating"),
        "empty.npy": (np.zeros((0, 4), np.float32), "empty"),
    }
    for name, (arr, match) in cases.items():
        np.save(tmp_path / name, arr)
        with pytest.raises(ValueError, match=match):
            load_embeddings(tmp_path / name)
    torch.save({"feats": torch.zeros(2, 2)}, tmp_path / "k.pt")
    with pytest.raises(ValueError, match="'embeddings'"):
        load_embeddings(tmp_path / "k.pt")
    (tmp_path / "e.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown embedding format"):
        load_embeddings(tmp_path / "e.h5")
    with pytest.raises(FileNotFoundError):
        load_embeddings(tmp_path / "missing.npy")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no .npy shards"):
        load_embeddings(tmp_path / "none")


def test_load_labels(tmp_path):
    np.save(tmp_path / "y.npy", np.array([3, 1, 2], dtype=np.int32))
    (tmp_path / "y.txt").write_text("3\n1\n\n2\n")
    (tmp_path / "y.csv").write_text("3\r\n1\r\n2\r\n")
    for name in ["y.npy", "y.txt", "y.csv"]:
        y = load_labels(tmp_path / name)
        assert y.dtype == np.int64 and y.tolist() == [3, 1, 2], name
    (tmp_path / "h.csv").write_text("label\n1\n")
    with pytest.raises(ValueError, match="line 1"):
        load_labels(tmp_path / "h.csv")
    np.save(tmp_path / "f.npy", np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="integer"):
        load_labels(tmp_path / "f.npy")
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_labels(tmp_path / "e.txt")
    with pytest.raises(FileNotFoundError):
        load_labels(tmp_path / "nope.txt")
