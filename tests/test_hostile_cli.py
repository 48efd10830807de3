"""Hostile input to the `semclust` command and the model directory: bad config files and
option values, malicious or corrupt tensor files, edited or escaping model directories,
full disks. Each ends in one line on stderr ("semclust <command>: error: ...") with exit
code 2 (the input) or 1 (the system), nothing written and nothing expensive started."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_fixtures import torch_single_thread
from semclust import model as fitted
from semclust.cli import main
from semclust.synthetic import SyntheticSpec, make_synthetic

__all__ = ["torch_single_thread"]  # fixture used below
pytestmark = pytest.mark.usefixtures("torch_single_thread")

K = 3
TINY_CONFIG = {
    "stage1": {"epochs": 1, "batch_size": 32, "hidden": 16},
    "stage2": {"epochs": 1, "batch_size": 32, "min_per_cluster": 2, "adapter_hidden": 8},
    "neighbours": {"k": 5},
    "semantic": {"kmeans_restarts": 1, "kmeans_iters": 5},
}


def run(capsys, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def usage_error(capsys, *argv: object) -> str:
    """The last stderr line of an argparse usage error (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def assert_one_line(rc: int, err: str, command: str, *parts: str, code: int = 2) -> None:
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"semclust {command}: error: "), err
    for part in parts:
        assert part in lines[0], err


class Evil:
    """Pickles to a call of os.mkdir(marker): proof if code ever runs on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Embeddings and nouns (.npy), a config file, and hostile tensor files."""
    root = tmp_path_factory.mktemp("hostile")
    data = make_synthetic(SyntheticSpec(n=120, k=K, dim=16, distractor_nouns=20), seed=0)
    np.save(root / "u.npy", data.embeddings.numpy())
    np.save(root / "nouns.npy", data.noun_embeddings.numpy())
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    torch.save({"embeddings": Evil(root / "pwned")}, root / "evil.pt")
    with open(root / "evil_legacy.pt", "wb") as f:
        pickle.dump(Evil(root / "pwned"), f)
    rng = np.random.default_rng(0)
    (root / "random.pt").write_bytes(rng.bytes(300))
    torch.save(torch.zeros(3, 4), root / "good.pt")
    (root / "truncated.pt").write_bytes((root / "good.pt").read_bytes()[:200])
    (root / "empty.pt").write_bytes(b"")
    (root / "random.safetensors").write_bytes(rng.bytes(300))
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return root


@pytest.fixture(scope="module")
def run_dir(files, tmp_path_factory) -> Path:
    """`semclust fit` of the embeddings: a stage-2 "adapter" model directory."""
    out = tmp_path_factory.mktemp("run") / "run"
    rc = main(["fit", str(files / "u.npy"), "-k", str(K), "--out", str(out), "--nouns", str(files / "nouns.npy"),
               "--config", str(files / "tiny.json"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    return out


@pytest.fixture
def no_clip(monkeypatch):
    """Fail the test if a CLIP model is loaded: the checks must come before it."""
    from semclust.clip.encoder import ClipEncoder

    def refuse(*args, **kwargs):
        raise AssertionError("a CLIP model was loaded before the cheap checks")

    monkeypatch.setattr(ClipEncoder, "load", refuse)


def fit_args(files: Path, out: Path, *extra: object) -> list[object]:
    return ["fit", files / "u.npy", "-k", K, "--out", out, "--nouns", files / "nouns.npy", "--no-progress",
            "--device", "cpu", *extra]


# ---- config files and option values -------------------------------------------------------


@pytest.mark.parametrize("content,parts", [
    ([{"stage1": {"epochs": 2}}], ["config file must hold a JSON object", "got a JSON array"]),
    ("stage1", ["config file must hold a JSON object", "got a JSON string"]),
    ({"stage1": {"epochs": "ten"}}, ["stage1.epochs must be an int, got 'ten'"]),
    ({"stage1": {"batch_size": 0}}, ["stage1.batch_size must be >= 2, got 0"]),
    ({"neighbours": {"k": 0}}, ["neighbours.k must be >= 1, got 0"]),
    ({"chunks": {"assign": 0}}, ["chunks.assign must be >= 1, got 0"]),
    ({"stage1": {"balance": "bogus"}}, ["stage1.balance must be one of ['dynamic', 'fixed'], got 'bogus'"]),
    ({"stage1": {"center_target": 1}}, ["stage1.center_target must be True or False, got 1"]),
    ({"stage2": {"epochs": "3"}}, ["stage2.epochs must be an int, got '3'"]),
    ({"stage1": [2]}, ["config section 'stage1' must be a dict"]),
    ({"stage1": {"epochz": 3}}, ["unknown keys ['epochz']"]),
])
def test_bad_config_file_is_one_line_before_any_work(files, tmp_path, capsys, no_clip, content, parts):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(content))
    rc, _, err = run(capsys, *fit_args(files, tmp_path / "run", "--config", cfg))
    assert_one_line(rc, err, "fit", f"--config {cfg}", *parts)
    assert not (tmp_path / "run").exists()


def test_config_file_that_is_not_json_or_missing(files, tmp_path, capsys, no_clip):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{ not json")
    rc, _, err = run(capsys, *fit_args(files, tmp_path / "run", "--config", cfg))
    assert_one_line(rc, err, "fit", f"--config {cfg} is not valid JSON")
    rc, _, err = run(capsys, *fit_args(files, tmp_path / "run", "--config", tmp_path / "missing.json"))
    assert_one_line(rc, err, "fit", f"No such file or directory: {tmp_path / 'missing.json'}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,message", [
    (["fit", "x.npy", "-k", "3", "--out", "run", "--epochs", "-1"], "argument --epochs: must be >= 0, got -1"),
    (["fit", "x.npy", "-k", "1", "--out", "run"], "argument -k: must be >= 2, got 1"),
    (["fit", "x.npy", "-k", "3", "--out", "run", "--seed", "-5"], "argument --seed: must be >= 0"),
    (["demo", "--epochs", "-1"], "argument --epochs: must be >= 0, got -1"),
    (["demo", "--stage2-epochs", "-2"], "argument --stage2-epochs: must be >= 0, got -2"),
    (["demo", "--n", "ten"], "argument --n: must be an int, got 'ten'"),
    (["embed", "imgs", "--out", "s", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["embed", "imgs", "--out", "s", "--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    (["fit", "", "-k", "3", "--out", "run"], "argument input: must not be empty"),  # "" used to mean the cwd
    (["predict", "run", "x.npy", "--out", ""], "argument --out: must not be empty"),
])
def test_option_ranges_are_usage_errors(capsys, monkeypatch, argv, message):
    # `fit/demo --epochs -1` used to get as far as the config (demo: after building its data)
    import semclust.synthetic

    monkeypatch.setattr(semclust.synthetic, "make_synthetic", lambda *a, **k: pytest.fail("demo started"))
    line = usage_error(capsys, *argv)
    assert line.startswith(f"semclust {argv[0]}: error: ") and message in line


def test_demo_checks_its_options_before_building_data(tmp_path, capsys, monkeypatch):
    import semclust.synthetic

    monkeypatch.setattr(semclust.synthetic, "make_synthetic", lambda *a, **k: pytest.fail("demo started"))
    rc, _, err = run(capsys, "demo", "--n", 5, "-k", 10)
    assert_one_line(rc, err, "demo", "--n 5 must be at least -k 10")
    rc, _, err = run(capsys, "demo", "--json", tmp_path / "no" / "such" / "out.json")
    assert_one_line(rc, err, "demo", "--json", "does not exist")


def test_missing_nouns_file_and_out_that_is_a_file_fail_first(files, tmp_path, capsys, no_clip):
    rc, _, err = run(capsys, "fit", files / "u.npy", "-k", K, "--out", tmp_path / "run",
                     "--nouns", tmp_path / "words.txt")
    assert_one_line(rc, err, "fit", "--nouns", "is not 'default', 'wordnet' or an existing file")
    (tmp_path / "file").write_text("x")
    rc, _, err = run(capsys, *fit_args(files, tmp_path / "file"))
    assert_one_line(rc, err, "fit", "exists and is not a directory")
    assert not (tmp_path / "run").exists()


# ---- tensor files: never unpickled, one line naming the file ----------------------------------


@pytest.mark.parametrize("name,reason", [
    ("evil.pt", "not a safe tensor file"),
    ("evil_legacy.pt", "not a safe tensor file"),
    ("random.pt", "not a safe tensor file"),
    ("truncated.pt", "not a safe tensor file"),
    ("empty.pt", "not a safe tensor file"),
    ("random.safetensors", "not a safe tensor file"),
    ("objects.npy", "Object arrays cannot be loaded"),
])
@pytest.mark.parametrize("where", ["--nouns", "input", "predict"])
def test_hostile_tensor_file_is_one_line_naming_it(files, run_dir, tmp_path, capsys, no_clip, name, reason, where):
    bad = files / name
    if where == "--nouns":
        argv = ["fit", files / "u.npy", "-k", K, "--out", tmp_path / "run", "--nouns", bad, "--no-progress"]
    elif where == "input":
        argv = ["fit", bad, "-k", K, "--out", tmp_path / "run", "--nouns", files / "nouns.npy", "--no-progress"]
    else:
        argv = ["predict", run_dir, bad, "--out", tmp_path / "pred.npy"]
    rc, _, err = run(capsys, *argv)
    assert_one_line(rc, err, argv[0], f"cannot load {where if where != 'predict' else 'input'} {bad}", reason)
    assert not (files / "pwned").exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "pred.npy").exists()


# ---- predict --out --------------------------------------------------------------------------


def test_predict_prints_the_path_it_writes(files, run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "predict", run_dir, files / "u.npy", "--out", "labels")
    assert rc == 0, err
    assert out.strip().endswith("-> labels.npy") and (tmp_path / "labels.npy").is_file()
    (tmp_path / "preds").mkdir()
    rc, out, err = run(capsys, "predict", run_dir, files / "u.npy", "--out", "preds")
    assert rc == 0, err
    assert out.strip().endswith(f"-> {Path('preds') / 'labels.npy'}")
    np.testing.assert_array_equal(np.load(tmp_path / "preds" / "labels.npy"), np.load(tmp_path / "labels.npy"))


def test_predict_refuses_a_missing_folder_before_loading(files, run_dir, tmp_path, capsys, monkeypatch):
    from semclust.api import SemanticClusterer

    monkeypatch.setattr(SemanticClusterer, "load", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    rc, _, err = run(capsys, "predict", run_dir, files / "u.npy", "--out", tmp_path / "no" / "pred.npy")
    assert_one_line(rc, err, "predict", "--out", "does not exist")
    rc, _, err = run(capsys, "predict", run_dir, tmp_path / "nowhere.npy", "--out", tmp_path / "pred.npy")
    assert_one_line(rc, err, "predict", "input", "does not exist")
    rc, _, err = run(capsys, "evaluate", run_dir, "--labels", tmp_path / "missing.npy")
    assert_one_line(rc, err, "evaluate", "--labels", "does not exist")


# ---- the system refusing: one line naming the file, exit 1 ---------------------------------------


@pytest.mark.parametrize("error,parts", [
    (OSError(28, "No space left on device"), ["No space left on device (while writing"]),
    (PermissionError(13, "Permission denied", "/somewhere/pred.npy"), ["Permission denied: /somewhere/pred.npy"]),
])
def test_os_errors_are_one_line_exit_1(files, run_dir, tmp_path, capsys, monkeypatch, error, parts):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(np, "save", fail)
    rc, _, err = run(capsys, "predict", run_dir, files / "u.npy", "--out", tmp_path / "pred.npy")
    assert_one_line(rc, err, "predict", *parts, code=1)


@pytest.mark.parametrize("flag", ["--debug", "-v"])
def test_debug_shows_the_traceback_and_bugs_are_not_hidden(files, run_dir, tmp_path, monkeypatch, flag):
    with pytest.raises(FileNotFoundError):
        main([flag, "predict", str(run_dir), str(tmp_path / "nowhere.npy"), "--out", str(tmp_path / "p.npy")])
    from semclust.api import SemanticClusterer

    monkeypatch.setattr(SemanticClusterer, "predict", lambda *a: {}["bug"])
    with pytest.raises(KeyError):
        main(["predict", str(run_dir), str(files / "u.npy"), "--out", str(tmp_path / "p.npy")])


# ---- the model directory: one schema, files inside it, weights that match -----------------------


def edited(run_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the run whose semclust.json went through `edit(meta)`."""
    copy = tmp_path / "edited"
    shutil.copytree(run_dir, copy)
    meta = json.loads((copy / fitted.CONFIG_FILE).read_text())
    edit(meta)
    (copy / fitted.CONFIG_FILE).write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.__setitem__("mode", "bogus"), "field mode is 'bogus'; it must be one of"),
    # an adapter model relabelled "stage1" used to load and predict without its adapter
    (lambda m: m.__setitem__("mode", "stage1"), "field mode 'stage1' does not match the weights"),
    (lambda m: m["params"].__setitem__("n_clusters", 4), "field params.n_clusters is 4 but the weights hold"),
    (lambda m: m.__setitem__("dim", 17), "field dim is 17 but the weights hold"),
    (lambda m: m.__setitem__("dim", "16"), "field dim is '16'; it must be an int >= 1"),
    (lambda m: m.pop("weights_sha256"), "field weights_sha256 is missing"),
    (lambda m: m.__setitem__("params", [3]), "field params is [3]; it must be an object"),
    (lambda m: m["params"].pop("seed"), "field params.seed is missing"),
    (lambda m: m["params"].__setitem__("custom_encoder", 5), "field params.custom_encoder is 5"),
    (lambda m: m["config"]["stage1"].__setitem__("balance", "bogus"), "field config: stage1.balance must be one of"),
    (lambda m: m["config"]["stage1"].__setitem__("hidden", 17), "the heads.* weights do not fit the model"),
    (lambda m: m.__setitem__("format", "semclust-model/9"), "is not a semclust-model/1 file"),
])
def test_edited_model_file_is_one_line_naming_the_field(files, run_dir, tmp_path, capsys, edit, message):
    bad = edited(run_dir, tmp_path, edit)
    with pytest.raises(ValueError) as exc:
        fitted.build(fitted.read(bad), torch.device("cpu"))
    assert str(exc.value).startswith(f"invalid model file {bad / fitted.CONFIG_FILE}: ")
    assert message in str(exc.value) and "\n" not in str(exc.value)
    rc, _, err = run(capsys, "predict", bad, files / "u.npy", "--out", tmp_path / "pred.npy")
    assert_one_line(rc, err, "predict", "invalid model file", message)
    assert not (tmp_path / "pred.npy").exists()


@pytest.mark.parametrize("name", [fitted.CONFIG_FILE, fitted.WEIGHTS_FILE])
def test_model_files_must_not_lead_outside_the_directory(run_dir, tmp_path, name):
    escaping = tmp_path / "escaping"
    shutil.copytree(run_dir, escaping)
    outside = tmp_path / f"outside-{name}"
    (escaping / name).rename(outside)
    (escaping / name).symlink_to(outside)
    with pytest.raises(ValueError, match=f"{name} points outside the model directory"):
        fitted.read(escaping)
    inside = tmp_path / "inside"  # a link within the directory is fine
    shutil.copytree(run_dir, inside)
    (inside / name).rename(inside / f"real-{name}")
    (inside / name).symlink_to(inside / f"real-{name}")
    fitted.read(inside)
