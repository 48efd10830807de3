"""The `semclust` command, run in-process through `semclust.cli.main` (plus one real
subprocess per entry point): help texts, the demo, embed -> fit -> predict -> evaluate on a
tiny open_clip model, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_fixtures import (TINY_CLIP_CONFIG, save_checkpoint, tiny_encoder, torch_single_thread,
                           write_colour_classes)
from semclust.api import CONFIG_FILE, SemanticClusterer
from semclust.cli import main
from semclust.inputs.sources import ImageSource
from semclust.inputs.store import open_store

__all__ = ["torch_single_thread"]  # fixture used below
pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = str(TINY_CLIP_CONFIG)
PER_CLASS = 8
N_GOOD, N_ALL = 3 * PER_CLASS, 3 * PER_CLASS + 2
# tiny run settings for `fit --config`
SMALL_CONFIG = {
    "stage1": {"epochs": 2, "batch_size": 16, "hidden": 32},
    "neighbours": {"k": 5},
    "stage2": {"epochs": 1, "batch_size": 8, "min_per_cluster": 2},
    "semantic": {"kmeans_restarts": 1, "kmeans_iters": 10},
    "chunks": {"encode_batch_size": 16},
}


def run(capsys, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, command: str, message: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"semclust {command}: error: "), err
    assert message in lines[0], err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Images (3 colour classes + a truncated JPEG + a text file named .png), a tiny
    checkpoint, a noun file, a config file and ground truth for the image folder."""
    root = tmp_path_factory.mktemp("cli")
    images = root / "images"
    rng = write_colour_classes(images, PER_CLASS)
    jpeg = images / "class_0" / "broken.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    (images / "class_1" / "fake.png").write_bytes(b"this is not an image")
    save_checkpoint(tiny_encoder(seed=1), root / "tiny.pt")
    (root / "words.txt").write_text("# nouns\ncat\ndog\ncar\ntree\nhouse\nbird\nfish\nboat\nplane\nflower\n")
    (root / "small.json").write_text(json.dumps(SMALL_CONFIG))
    src = ImageSource.from_folder(images)
    truth = np.array([int(Path(p).parent.name.split("_")[1]) for p in src.items], dtype=np.int64)
    np.save(root / "truth.npy", truth)
    return root


def clip_args(root: Path) -> list[str]:
    return ["--clip", TINY, "--pretrained", str(root / "tiny.pt"), "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def store(workdir):
    """`semclust embed` of the image folder (runs once; the test below checks its output)."""
    capture = _Capture()
    with capture:
        rc = main(["embed", str(workdir / "images"), "--out", str(workdir / "store"), "--batch-size", "8",
                   *clip_args(workdir)])
    return workdir / "store", rc, capture.out


class _Capture:
    """stdout capture for module-scoped fixtures (capsys is per test)."""

    def __enter__(self):
        import io

        self._old, self._buf = sys.stdout, io.StringIO()
        sys.stdout = self._buf
        return self

    def __exit__(self, *exc):
        sys.stdout = self._old
        self.out = self._buf.getvalue()


# ---- help --------------------------------------------------------------------------------

HELP = {
    "demo": ["--n", "-k", "--epochs", "--stage2-epochs", "--json", "--seed", "--no-progress", "--device"],
    "embed": ["images", "--out", "--batch-size", "--workers", "--clip", "--pretrained", "--seed"],
    "fit": ["input", "-k", "--out", "--nouns", "--stage", "--epochs", "--config", "--clip", "--pretrained"],
    "predict": ["run", "input", "--out", "--device"],
    "report": ["run", "--images", "--labels", "--out", "--per-cluster"],
    "evaluate": ["run", "--labels", "--predictions", "--grid", "--images"],
    "bench": ["ops", "step", "scale", "method", "k", "--json"],
}


@pytest.mark.parametrize("command", sorted(HELP))
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: semclust {command}")
    for option in HELP[command]:
        assert option in out, f"{command} --help does not mention {option}"


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in HELP:
        assert command in out


@pytest.mark.parametrize("entry", ["script", "module"])
def test_help_in_a_real_subprocess(entry):
    if entry == "script":
        exe = Path(sys.executable).parent / "semclust"
        if not exe.exists():
            exe = shutil.which("semclust")
        if exe is None:
            pytest.skip("the semclust console script is not installed")
        cmd = [str(exe), "--help"]
    else:
        cmd = [sys.executable, "-m", "semclust", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: semclust")
    assert all(c in proc.stdout for c in HELP)


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: semclust" in capsys.readouterr().err


# ---- demo --------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_prints_the_table_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "out.json"
    rc, out, _ = run(capsys, "demo", "--n", 400, "-k", 4, "--epochs", 3, "--stage2-epochs", 1, "--no-progress",
                     "--json", out_json)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("synthetic set: 400 images in 4 clusters")
    header = next(i for i, line in enumerate(lines) if line.split()[:5] == ["method", "ACC", "NMI", "ARI", "time"])
    assert set(lines[header + 1]) == {"-"}
    rows = lines[header + 2: header + 5]
    for row, name in zip(rows, ["k-means (frozen features)", "stage 1 (cross-modal heads)", "stage 2 (self-enhanced)"]):
        assert row.startswith(name)
        acc, nmi, ari, seconds = row[len(name):].split()
        assert all(0 <= float(v) <= 1 for v in (acc, nmi)) and -1 <= float(ari) <= 1
        assert seconds.endswith("s")
    assert lines[header + 5].startswith("total ")
    data = json.loads(out_json.read_text())
    assert [r["method"] for r in data["rows"]] == ["k-means (frozen features)", "stage 1 (cross-modal heads)",
                                                   "stage 2 (self-enhanced)"]
    assert len(data["history"]["stage1"]) == 3 and len(data["history"]["stage2"]) == 1


# ---- embed -> fit -> predict -> evaluate ---------------------------------------------------


def test_embed_writes_a_store_of_the_readable_images(store):
    path, rc, out = store
    assert rc == 0
    assert f"wrote {N_GOOD} embeddings (dim 32)" in out
    assert f"skipped 2 of {N_ALL} images" in out
    s = open_store(path)
    assert len(s) == N_GOOD and s.dim == 32
    assert not any(Path(item).name in ("broken.jpg", "fake.png") for item in s.items)


@pytest.fixture(scope="module")
def store_run(workdir, store):
    """`semclust fit STORE` with word nouns (text tower of the same tiny checkpoint)."""
    capture = _Capture()
    with capture:
        rc = main(["fit", str(store[0]), "-k", "3", "--out", str(workdir / "run_store"),
                   "--nouns", str(workdir / "words.txt"), "--config", str(workdir / "small.json"), "--epochs", "2",
                   *clip_args(workdir)])
    return workdir / "run_store", rc, capture.out


def test_fit_store_predict_evaluate(workdir, store, store_run, tmp_path, capsys):
    run_dir, rc, out = store_run
    assert rc == 0
    assert f"fitted {N_GOOD} samples into 3 clusters (adapter)" in out  # no images: stage 2 tunes an adapter
    labels = np.load(run_dir / "labels.npy")
    assert labels.shape == (N_GOOD,) and ((labels >= 0) & (labels < 3)).all()
    assert SemanticClusterer.load(run_dir).mode_ == "adapter"
    assert json.loads((run_dir / CONFIG_FILE).read_text())["config"]["stage1"]["hidden"] == 32

    rc, out, _ = run(capsys, "predict", run_dir, store[0], "--out", tmp_path / "pred.npy", "--device", "cpu")
    assert rc == 0 and f"predicted {N_GOOD} labels (0 unreadable)" in out
    np.testing.assert_array_equal(np.load(tmp_path / "pred.npy"), labels)

    truth = np.array([int(Path(p).parent.name.split("_")[1]) for p in open_store(store[0]).items])
    np.save(tmp_path / "truth.npy", truth)
    rc, out, _ = run(capsys, "evaluate", run_dir, "--labels", tmp_path / "truth.npy")
    assert rc == 0
    assert out.startswith("ACC ") and f"on {N_GOOD} samples" in out and "NMI " in out and "ARI " in out
    acc = float(out.split()[1])
    assert 0.3333 <= acc <= 1  # balanced classes: ACC is at least 1/3 (printed to 4 places)

    # ground truth as text, and scoring other predictions than the run's own
    (tmp_path / "truth.txt").write_text("\n".join(map(str, truth)) + "\n")
    np.save(tmp_path / "other.npy", np.zeros(N_GOOD, dtype=np.int64))
    rc, out, _ = run(capsys, "evaluate", run_dir, "--labels", tmp_path / "truth.txt",
                     "--predictions", tmp_path / "other.npy")
    assert rc == 0 and out.startswith("ACC 0.3333  NMI 0.0000  ARI 0.0000")


def test_fit_with_noun_embeddings_file(workdir, store, tmp_path, capsys):
    t = np.random.default_rng(0).normal(size=(12, 32)).astype(np.float32)
    np.save(tmp_path / "nouns.npy", t)
    rc, out, err = run(capsys, "fit", store[0], "-k", 3, "--out", tmp_path / "run", "--nouns", tmp_path / "nouns.npy",
                       "--config", workdir / "small.json", "--stage", 1, "--no-progress", "--device", "cpu")
    assert rc == 0, err


def test_fit_images_stage2_then_predict_and_grid(workdir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, out, _ = run(capsys, "fit", workdir / "images", "-k", 3, "--out", run_dir, "--stage", 2,
                     "--nouns", workdir / "words.txt", "--config", workdir / "small.json", *clip_args(workdir))
    assert rc == 0
    assert f"fitted {N_ALL} samples into 3 clusters (encoder)" in out
    assert f"skipped 2 of {N_ALL} images" in out
    labels = np.load(run_dir / "labels.npy")
    items = ImageSource.from_folder(workdir / "images").items
    bad = [i for i, p in enumerate(items) if Path(p).name in ("broken.jpg", "fake.png")]
    assert np.flatnonzero(labels == -1).tolist() == bad

    rc, out, _ = run(capsys, "predict", run_dir, workdir / "images", "--out", tmp_path / "pred.npy",
                     "--device", "cpu")
    assert rc == 0 and f"predicted {N_ALL} labels (2 unreadable)" in out
    np.testing.assert_array_equal(np.load(tmp_path / "pred.npy"), labels)

    grid = tmp_path / "grid.png"
    rc, out, _ = run(capsys, "evaluate", run_dir, "--labels", workdir / "truth.npy", "--grid", grid,
                     "--images", workdir / "images")
    assert rc == 0
    assert f"on {N_GOOD} samples (2 unreadable left out)" in out
    assert "grid of samples per cluster" in out
    with Image.open(grid) as im:
        im.load()
        clusters = len(set(labels[labels >= 0].tolist()))
        assert im.format == "PNG" and im.size == (8 * 64, clusters * 64)

    rc, _, err = run(capsys, "evaluate", run_dir, "--labels", workdir / "truth.npy", "--grid", tmp_path / "g2.png")
    assert_one_line_error(rc, err, "evaluate", "--grid needs --images")
    assert not (tmp_path / "g2.png").exists()


def test_relative_checkpoint_path_survives_a_change_of_directory(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    rc, _, err = run(capsys, "fit", "images", "-k", 3, "--out", tmp_path / "run", "--stage", 1,
                     "--nouns", "words.txt", "--config", "small.json", "--clip", TINY, "--pretrained", "tiny.pt",
                     "--no-progress", "--device", "cpu")
    assert rc == 0, err
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "predict", tmp_path / "run", workdir / "images", "--out", "pred.npy", "--device", "cpu")
    assert rc == 0, err


# ---- errors: one line on stderr, exit code 2, nothing written -------------------------------


def test_error_missing_input(tmp_path, capsys):
    rc, _, err = run(capsys, "fit", tmp_path / "nowhere", "-k", 3, "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(rc, err, "fit", "does not exist")
    assert not (tmp_path / "run").exists()
    rc, _, err = run(capsys, "embed", tmp_path / "nowhere", "--out", tmp_path / "store", "--no-progress")
    assert_one_line_error(rc, err, "embed", "does not exist")
    assert not (tmp_path / "store").exists()


def test_error_more_clusters_than_samples(store, tmp_path, capsys):
    rc, _, err = run(capsys, "fit", store[0], "-k", 50, "--out", tmp_path / "run", "--no-progress", "--device", "cpu")
    assert_one_line_error(rc, err, "fit", f"n_clusters=50 is larger than the number of samples ({N_GOOD})")
    assert not (tmp_path / "run").exists()


def test_error_labels_of_the_wrong_length(store_run, tmp_path, capsys):
    np.save(tmp_path / "short.npy", np.arange(5))
    rc, _, err = run(capsys, "evaluate", store_run[0], "--labels", tmp_path / "short.npy")
    assert_one_line_error(rc, err, "evaluate", f"--labels has 5 entries but the predictions have {N_GOOD}")
    rc, _, err = run(capsys, "evaluate", store_run[0], "--labels", tmp_path / "missing.npy")
    assert_one_line_error(rc, err, "evaluate", "does not exist")


def test_error_run_directory_that_is_not_a_model(workdir, store, tmp_path, capsys):
    rc, _, err = run(capsys, "predict", workdir / "images", store[0], "--out", tmp_path / "pred.npy")
    assert_one_line_error(rc, err, "predict", "is not a semclust model directory")
    assert not (tmp_path / "pred.npy").exists()
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "evaluate", tmp_path / "empty", "--labels", workdir / "truth.npy")
    assert_one_line_error(rc, err, "evaluate", "is not a semclust model directory")


def test_error_bad_config_file(store, tmp_path, capsys):
    (tmp_path / "cfg.json").write_text(json.dumps({"stage1": {"epochz": 3}}))
    rc, _, err = run(capsys, "fit", store[0], "-k", 3, "--out", tmp_path / "run", "--config", tmp_path / "cfg.json")
    assert_one_line_error(rc, err, "fit", "unknown keys ['epochz']")
    assert not (tmp_path / "run").exists()


def test_argparse_errors_exit_2_and_name_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "somewhere", "--out", "run"])  # -k missing
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("semclust fit: error: ")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "everything"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("semclust bench: error: ")


def test_bench_runs_from_the_installed_package(tmp_path):
    """`semclust bench` imports semclust.bench, not a checkout's benchmarks/ folder: it
    runs from any working directory and hands the options after WHAT to the benchmark."""
    out = tmp_path / "k.json"
    r = subprocess.run([sys.executable, "-m", "semclust", "bench", "k", "--quick", "--sample", "1000", "--json", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())
    assert row["scenario"] == "balanced" and 2 <= row["k"] <= 200 and row["significant"] is True
    assert "within +-20% of the true K" in r.stdout


@pytest.mark.parametrize("config,message", [('{"stage1": {"nope": 1}}', "unknown keys"), ("{not json", "--config"),
                                            ('{"stage1": {"cluster_columns": -1}}', "cluster_columns")])
def test_bench_scale_checks_its_config_before_building_a_store(tmp_path, capsys, config, message):
    from semclust.bench import scale

    with pytest.raises(SystemExit) as exc:
        scale.main(["--n", "2000", "--k", "10", "--workdir", str(tmp_path / "w"), "--config", config])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
