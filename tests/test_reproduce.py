"""`semclust reproduce` on tiny generated copies of every benchmark layout, with the tiny
random CLIP: the numbers mean nothing here, the plumbing is what is tested (every
method row beside the published column, the JSON document, the embedding cache on a
rerun, one-line errors for a missing dataset, unknown name or missing weights)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

import semclust.clip.encoder as enc
from clip_fixtures import (TINY_CLIP_CONFIG, random_images, save_checkpoint, tiny_encoder, torch_single_thread,
                           write_cifar10, write_cifar100, write_colour_classes, write_stl10)
from semclust import pipeline
from semclust.cli import main
from semclust.config import Config
from semclust.inputs import benchmarks
from semclust.inputs.classify import Inputs
from semclust.inputs.sources import ImageSource
from semclust.inputs.store import EmbeddingStore
from semclust.reproduce import BENCHMARKS, FORMAT, METHODS, PUBLISHED_ROW, CroppedSource
from test_cli import assert_one_line_error, run  # main() with its output; the one-line error check

__all__ = ["torch_single_thread"]  # fixture used below
pytestmark = pytest.mark.usefixtures("torch_single_thread")

# tiny run settings for `reproduce --config`
SMALL_CONFIG = {
    "stage1": {"epochs": 1, "batch_size": 16, "hidden": 16},
    "neighbours": {"k": 3},
    "stage2": {"batch_size": 4, "min_per_cluster": 1},
    "semantic": {"kmeans_restarts": 1, "kmeans_iters": 5},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny checkpoint, a noun file and the config file."""
    root = tmp_path_factory.mktemp("reproduce")
    save_checkpoint(tiny_encoder(seed=1), root / "tiny.pt")
    (root / "words.txt").write_text("cat\ndog\ncar\ntree\nhouse\nbird\nfish\nboat\nplane\nflower\n")
    (root / "small.json").write_text(json.dumps(SMALL_CONFIG))
    return root


def args(files: Path, dataset: str, root: Path, out: Path, *extra: object) -> list[str]:
    return ["reproduce", dataset, "--root", str(root), "--out", str(out), "--clip", str(TINY_CLIP_CONFIG),
            "--pretrained", str(files / "tiny.pt"), "--nouns", str(files / "words.txt"),
            "--config", str(files / "small.json"), "--workers", "0", "--no-progress", "--device", "cpu",
            *map(str, extra)]


def check_results(out: str, doc: dict, dataset: str, stage: int) -> None:
    """Every method has a row, in the printed table and the JSON; the published numbers
    sit in the TAC heads row."""
    bench = BENCHMARKS[dataset]
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert lines[head].split() == ["method", "ACC", "NMI", "ARI", "seconds", "published"]
    table = lines[head + 2:head + 2 + len(METHODS)]
    assert [line[:len(m)] for line, m in zip(table, METHODS, strict=True)] == list(METHODS)
    shown = " / ".join("–" if v is None else f"{v:.1f}" for v in bench.published)
    assert table[METHODS.index(PUBLISHED_ROW)].endswith(shown)
    assert (table[METHODS.index("stage 2")].split()[-5:] == ["–"] * 5) == (stage == 1)

    assert doc["format"] == FORMAT and doc["dataset"] == dataset and doc["title"] == bench.title
    assert set(doc) == {"format", "dataset", "title", "k", "clip", "pretrained", "preprocess", "splits", "scores",
                        "published_by", "rows", "notes"}
    # the tiny CLIP's 32 px input; the ImageNet-derived sets are resized to 256/224 of the crop first
    assert doc["preprocess"]["crop"] == [32, 32]
    assert doc["preprocess"]["resize"] == round(32 * bench.resize_ratio) == (37 if "imagenet" in dataset else 32)
    assert [row["method"] for row in doc["rows"]] == list(METHODS)
    for row in doc["rows"]:
        assert set(row) == {"method", "acc", "nmi", "ari", "seconds", "published"}
        ran = stage == 2 or row["method"] != "stage 2"
        for m in ("acc", "nmi", "ari"):  # ARI can be negative
            assert (-100.0 <= row[m] <= 100.0) if ran else row[m] is None
        published = dict(zip(("acc", "nmi", "ari"), bench.published, strict=True))
        assert row["published"] == (published if row["method"] == PUBLISHED_ROW else None)


# ---- each layout, end to end ---------------------------------------------------------------

def write_layout(dataset: str, root: Path) -> tuple[int, int, int]:
    """A tiny copy of `dataset` in its usual layout; returns (classes, train, test images)."""
    rng = np.random.default_rng(0)
    if dataset == "cifar10":
        data = write_cifar10(root, rng, per_file=10)
        train_labels = sum((data[f"data_batch_{i}"][1] for i in range(1, 6)), [])
        return len(set(train_labels)), 50, 10
    if dataset == "cifar20":
        coarse = [c % 20 for c in range(40)]
        write_cifar100(root, {"train": (random_images(rng, 40, 32), coarse, coarse),
                              "test": (random_images(rng, 20, 32), coarse[:20], coarse[:20])})
        return 20, 40, 20
    if dataset == "stl10":
        write_stl10(root, {"train": (random_images(rng, 20, 96), np.arange(20) % 10 + 1),
                           "test": (random_images(rng, 10, 96), np.arange(10) % 10 + 1)})
        return 10, 20, 10
    folder = root / benchmarks._FOLDERS[dataset].dirname
    if dataset == "imagenet-dogs":  # class folders without split folders: both splits are the whole set
        write_colour_classes(folder, 3)
        return 3, 9, 9
    if dataset == "dtd":  # DTD's archive: images/<class>/ and labels/ with the split lists
        write_colour_classes(folder / "images", 3)
        (folder / "labels").mkdir()
        for i, split in enumerate(("train1", "val1", "test1")):
            (folder / "labels" / f"{split}.txt").write_text("".join(f"class_{c}/img_{i:02d}.png\n" for c in range(3)))
        return 3, 6, 3
    # UCF-101 as TAC's copy names its splits (train/val); ImageNet-1K's val is its test split
    test = "test" if dataset == "imagenet10" else "val"
    write_colour_classes(folder / "train", 3)
    write_colour_classes(folder / test, 1, seed=1)
    return 3, 9, 3


@pytest.mark.parametrize("dataset", ["cifar10", "cifar20", "stl10", "imagenet-dogs", "dtd", "ucf101", "imagenet1k"])
def test_each_layout_end_to_end(dataset, files, tmp_path, capsys, monkeypatch):
    classes, n_train, n_test = write_layout(dataset, tmp_path / "data")
    whole: list[str] = []  # the stores read into memory whole: only the scored split's
    real_to_tensor = EmbeddingStore.to_tensor
    monkeypatch.setattr(EmbeddingStore, "to_tensor", lambda self, *a, **k: whole.append(self.path.name)
                        or real_to_tensor(self, *a, **k))
    rc, out, err = run(capsys, *args(files, dataset, tmp_path / "data", tmp_path / "out", "--stage", 1,
                                    "--json", tmp_path / "r.json"))
    assert rc == 0, err
    assert whole == ["train" if dataset == "imagenet-dogs" else "test"]
    doc = json.loads((tmp_path / "r.json").read_text())
    check_results(out, doc, dataset, stage=1)
    assert doc["k"] == classes
    train, test = doc["splits"]["train"], doc["splits"]["test"]
    assert (train["images"], test["images"]) == (n_train, n_test)
    same = dataset == "imagenet-dogs"
    assert test["same_as_train"] == same and (test["store"] == train["store"]) == same
    assert train["encoded_now"] and test["encoded_now"] != same


# ---- stage 2, and the cache on a rerun ------------------------------------------------------

def test_stage2_then_a_rerun_encodes_nothing(files, tmp_path, capsys, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "out"
    write_colour_classes(data / "imagenet10" / "train", 4)
    (data / "imagenet10" / "train" / "class_1" / "broken.png").write_bytes(b"not an image")
    write_colour_classes(data / "imagenet10" / "test", 2, seed=1)
    encoded: list[int] = []  # items of each source the pristine encoder embedded
    fit_passes: list[int] = []  # sources encoded by pipeline.encode_source (the tuned encoder's test pass)
    real_iter, real_source = enc.ClipEncoder.iter_encode_images, pipeline.encode_source

    def iter_spy(self, source, *a, **k):
        encoded.append(len(source))
        return real_iter(self, source, *a, **k)

    def source_spy(encoder, source, *a, **k):
        fit_passes.append(len(source))
        return real_source(encoder, source, *a, **k)

    monkeypatch.setattr(enc.ClipEncoder, "iter_encode_images", iter_spy)
    monkeypatch.setattr(pipeline, "encode_source", source_spy)
    rc, stdout, err = run(capsys, *args(files, "imagenet10", data, out, "--stage2-epochs", 1,
                                        "--json", tmp_path / "r.json"))
    assert rc == 0, err
    check_results(stdout, json.loads((tmp_path / "r.json").read_text()), "imagenet10", stage=2)
    assert "note: 1 unreadable images of the train split left out" in stdout
    assert encoded == [13, 6]  # each split once, the unreadable file included
    assert fit_passes == [6]  # the fit used the stored rows: only the tuned encoder's test pass
    assert (out / "embeddings" / "train" / "manifest.json").is_file() and (out / "fit").is_dir()

    def no_image_pass(*a, **k):
        raise AssertionError("the rerun encoded images")

    for name in ("iter_encode_images", "image_features"):
        monkeypatch.setattr(enc.ClipEncoder, name, no_image_pass)
    rc, stdout, err = run(capsys, *args(files, "imagenet10", data, out, "--stage", 1, "--json", out / "r2.json"))
    assert rc == 0, err
    assert "train embeddings: " in stdout and stdout.count("(cached)") == 2
    doc = json.loads((out / "r2.json").read_text())
    check_results(stdout, doc, "imagenet10", stage=1)
    assert not doc["splits"]["train"]["encoded_now"] and not doc["splits"]["test"]["encoded_now"]


# ---- errors: one line, exit 2 ---------------------------------------------------------------

@pytest.mark.parametrize("dataset, source", [("cifar10", "cifar-10-python.tar.gz"), ("imagenet1k", "image-net.org")])
def test_missing_dataset_names_layout_and_source(dataset, source, files, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    rc, _, err = run(capsys, *args(files, dataset, tmp_path / "data", tmp_path / "out"))
    assert_one_line_error(rc, err, "reproduce", "Expected layout")
    assert source in err and "never downloads" in err
    assert not (tmp_path / "out").exists()


def test_unknown_dataset_name(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args(files, "mnist", tmp_path, tmp_path / "out"))
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("semclust reproduce: error: argument dataset: invalid choice: 'mnist'")
    assert all(name in last for name in BENCHMARKS)


def test_missing_weights_fail_at_once(files, tmp_path, capsys, monkeypatch):
    write_colour_classes(tmp_path / "data" / "imagenet10", 1)
    argv = args(files, "imagenet10", tmp_path / "data", tmp_path / "out")
    weights = argv.index("--pretrained") + 1
    argv[weights] = str(tmp_path / "nowhere.pt")
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, "reproduce", "does not exist")

    # an open_clip tag offline: the encoder's check says so within seconds, before any download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(enc, "_weights_cached", lambda arch, tag: False)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("tried to load the weights"))
    argv[argv.index("--clip") + 1], argv[weights] = "ViT-B-32", "openai"
    t0 = time.perf_counter()
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, "reproduce", "cannot fetch the open_clip weights ViT-B-32/openai")
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "out").exists()


def test_cropped_source_views_every_pass(tmp_path):
    write_colour_classes(tmp_path, 1)  # 40 x 48 images
    src = CroppedSource(ImageSource.from_folder(tmp_path), 37, (32, 32), "bicubic")
    assert len(src) == 3 and src.items == ImageSource.from_folder(tmp_path).items
    assert src[0][0].size == (32, 32)  # no consumer transform: the view alone
    src.transform = lambda im: im.size
    # the consumer sees its own transform; the source applies it after the view
    assert src[1][0] == (32, 32) and src.transform(src.source.load(0)) == (48, 40)


def test_a_fit_of_images_beside_their_features_needs_one_row_each(tmp_path):
    write_colour_classes(tmp_path, 1)  # 3 images
    inputs = Inputs(torch.randn(4, 8), ImageSource.from_folder(tmp_path))
    with pytest.raises(ValueError, match=r"images \(3\) and their features \(4 rows\) differ"):
        pipeline.encode(inputs, lambda: None, 2, Config(), torch.device("cpu"), False)


def test_every_reader_has_its_published_numbers():
    assert list(BENCHMARKS) == list(benchmarks.BENCHMARKS)


def test_help_names_the_options_and_datasets(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: semclust reproduce")
    for word in ("--root", "--pretrained", "--clip", "--out", "--json", "--stage2-epochs", "--stage", *BENCHMARKS):
        assert word in out


def test_every_reader_has_a_reproduce_entry():
    """The CLI offers the readers' names; each must have its class count and published row."""
    from semclust.inputs import benchmarks as readers

    assert set(BENCHMARKS) == set(readers.BENCHMARKS)
