"""Cluster names (`SemanticClusterer.cluster_names_`): how they are computed, saved,
validated, restored, rendered by the report and printed by the CLI; and the CLI's
`fit --allow-incomplete` and `predict`'s early input check."""

import json
import re

import numpy as np
import pytest
import torch

from semclust import SemanticClusterer
from semclust import model as fitted
from semclust.cli import main
from semclust.config import Config
from semclust.inputs.store import StoreWriter
from semclust.metrics import match_clusters
from semclust.pipeline import NAMES_PER_CLUSTER, name_clusters, noun_labels
from semclust.report import _cluster_names
from semclust.synthetic import make_scenario

# the CLI fits below are a few epochs on a few hundred rows: some clusters stay empty
pytestmark = pytest.mark.filterwarnings("ignore::semclust.api.ClusterCollapseWarning")


def small_config() -> Config:
    return Config.from_dict({"stage1": {"epochs": 8}, "stage2": {"epochs": 1},
                             "semantic": {"kmeans_restarts": 1}})


class WordEncoder:
    """The synthetic set's nouns as a "text tower": word nouns without CLIP."""

    pretrained = None  # never cached by clip.vocab

    def __init__(self, words: list[str], embeddings: torch.Tensor) -> None:
        self.rows = {w: i for i, w in enumerate(words)}
        self.embeddings = embeddings

    def encode_texts(self, texts, *args, **kwargs) -> torch.Tensor:
        return self.embeddings[[self.rows[t] for t in texts]]

    def image_features(self, x: torch.Tensor) -> torch.Tensor:  # never called: the fit is on embeddings
        raise AssertionError("images were encoded")


@pytest.fixture(scope="module")
def gap():
    return make_scenario("gap", 0, n=2000)


@pytest.fixture(scope="module")
def word_model(gap):
    model = SemanticClusterer(10, clip=WordEncoder(gap.nouns, gap.noun_embeddings), stage=1,
                              config=small_config(), device="cpu")
    return model.fit(gap.embeddings, nouns=gap.nouns)


# ---- the computation -----------------------------------------------------------------------

def test_name_clusters_nearest_nouns_to_the_text_centre():
    bank = torch.eye(4)
    v = torch.tensor([[1.0, 0.3, 0, 0], [1.0, 0.1, 0, 0], [0, 0, 0.6, 0.8]])
    names = name_clusters(v, torch.tensor([0, 0, 2]), bank, ["a", "b", "c", "d"], k=3, top=2)
    assert [n for n, _ in names[0]] == ["a", "b"] and names[0][0][1] == pytest.approx(1 / 1.04 ** 0.5, abs=1e-4)
    assert names[1] == []  # empty cluster: no centre, no names
    assert [n for n, _ in names[2]] == ["d", "c"] and [s for _, s in names[2]] == pytest.approx([0.8, 0.6])


def test_noun_labels_words_or_rows():
    index = torch.tensor([3, 17])
    assert noun_labels(["w0", "w1", "w2", "w3"] + [f"w{i}" for i in range(4, 20)], index) == ["w3", "w17"]
    assert noun_labels(np.zeros((20, 4)), index) == ["noun 3", "noun 17"]


def test_word_names_name_the_matched_class(word_model, gap):
    names = word_model.cluster_names_
    assert len(names) == 10 and all(len(row) == NAMES_PER_CLUSTER for row in names)
    assert all(isinstance(n, str) and isinstance(s, float) for row in names for n, s in row)
    assert all(row[0][1] >= row[-1][1] for row in names)  # best first
    assert _share_named(gap, word_model.labels_, [row[0][0] for row in names]) >= 0.9


def _share_named(data, labels: np.ndarray, first: list[str]) -> float:
    """The share of clusters whose first name is a noun of its Hungarian-matched class."""
    mapping = match_clusters(data.labels, labels)
    found = [re.match(r"class(\d+)-", name) for name in first]
    return sum(m is not None and mapping.get(c) == int(m.group(1)) for c, m in enumerate(found)) / len(first)


def test_embedding_nouns_are_named_by_row(gap):
    model = SemanticClusterer(10, clip=gap.encoder, stage=1, config=small_config(), device="cpu")
    model.fit(gap.embeddings, nouns=gap.noun_embeddings)
    rows = [n for row in model.cluster_names_ for n, _ in row]
    assert rows and all(re.fullmatch(r"noun \d+", n) for n in rows)
    # the row is the given matrix's, so it indexes the synthetic vocabulary's words
    first = [gap.nouns[int(row[0][0].split()[1])] for row in model.cluster_names_]
    assert _share_named(gap, model.labels_, first) >= 0.9


# ---- the model directory -------------------------------------------------------------------

def test_names_saved_restored_and_rendered(word_model, tmp_path):
    word_model.save(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / fitted.CONFIG_FILE).read_text())
    assert meta["cluster_names"] == [[n for n, _ in row] for row in word_model.cluster_names_]
    assert meta["cluster_name_scores"] == [[s for _, s in row] for row in word_model.cluster_names_]
    loaded = SemanticClusterer.load(tmp_path / "run", device="cpu")
    assert loaded.cluster_names_ == word_model.cluster_names_
    # `semclust report` shows each cluster's names
    shown = _cluster_names(meta, 10)
    assert shown[0] == ", ".join(n for n, _ in word_model.cluster_names_[0])


def _meta(word_model, tmp_path):
    word_model.save(tmp_path / "run")
    return json.loads((tmp_path / "run" / fitted.CONFIG_FILE).read_text())


@pytest.mark.parametrize("field, value, match", [
    ("cluster_names", "dog", "field cluster_names is 'dog'; it must be a list with a string or a list of strings"),
    ("cluster_names", [[1]] * 10, "field cluster_names"),
    ("cluster_names", ...,  "field cluster_name_scores must hold one score per name"),
    ("cluster_name_scores", [["x"]] * 10, "field cluster_name_scores .* a list of lists of numbers"),
    ("cluster_name_scores", [[0.5]] * 10, "one score per name"),
])
def test_check_meta_validates_names(word_model, tmp_path, field, value, match):
    meta = _meta(word_model, tmp_path)
    if value is ...:
        del meta[field]
    else:
        meta[field] = value
    with pytest.raises(ValueError, match=match):
        fitted.check_meta(meta, "semclust.json")


def test_names_of_another_k_are_refused_on_read(word_model, tmp_path):
    meta = _meta(word_model, tmp_path)
    meta["cluster_names"], meta["cluster_name_scores"] = [["a"]] * 9, [[0.5]] * 9
    fitted.check_meta(meta, "semclust.json")  # well-formed on its own
    (tmp_path / "run" / fitted.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="field cluster_names holds 9 clusters but params.n_clusters is 10"):
        SemanticClusterer.load(tmp_path / "run", device="cpu")


def test_run_saved_without_names_loads(word_model, tmp_path):
    meta = _meta(word_model, tmp_path)
    del meta["cluster_names"], meta["cluster_name_scores"]
    fitted.check_meta(meta, "semclust.json")
    (tmp_path / "run" / fitted.CONFIG_FILE).write_text(json.dumps(meta))
    assert SemanticClusterer.load(tmp_path / "run", device="cpu").cluster_names_ is None


def test_names_written_by_hand_load_without_scores(word_model, tmp_path):
    # what `semclust report` reads: a name or a list of names per cluster, no scores
    meta = _meta(word_model, tmp_path)
    del meta["cluster_name_scores"]
    meta["cluster_names"] = ["cats", ["dog", "puppy"]] + [f"c{i}" for i in range(8)]
    (tmp_path / "run" / fitted.CONFIG_FILE).write_text(json.dumps(meta))
    names = SemanticClusterer.load(tmp_path / "run", device="cpu").cluster_names_
    assert names[:2] == [[("cats", None)], [("dog", None), ("puppy", None)]]


# ---- the command line ----------------------------------------------------------------------

CLI_CONFIG = {"stage1": {"epochs": 2, "hidden": 32}, "stage2": {"epochs": 1}, "neighbours": {"k": 5},
              "semantic": {"kmeans_restarts": 1, "kmeans_iters": 10}}


@pytest.fixture(scope="module")
def files(tmp_path_factory, gap):
    root = tmp_path_factory.mktemp("names_cli")
    np.save(root / "u.npy", gap.embeddings[:600].numpy())
    np.save(root / "nouns.npy", gap.noun_embeddings.numpy())
    (root / "small.json").write_text(json.dumps(CLI_CONFIG))
    return root


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _incomplete_store(path, rows: np.ndarray):
    writer = StoreWriter(path, model="synthetic", pretrained=None, checkpoint_sha256=None, dim=rows.shape[1],
                         shard_rows=200)
    writer.append(torch.from_numpy(rows), [f"img/{i}.png" for i in range(len(rows))])  # never closed
    return path


@pytest.mark.parametrize("k, shown", [(4, 4), (25, 10)])
def test_cli_fit_prints_names_and_predict_json_holds_them(files, capsys, k, shown):
    run = files / f"run{k}"
    rc, out, err = _cli(capsys, "fit", files / "u.npy", "-k", k, "--out", run, "--nouns", files / "nouns.npy",
                        "--config", files / "small.json", "--stage", 1, "--no-progress", "--device", "cpu")
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.startswith("  cluster ")]
    assert len(lines) == shown and re.fullmatch(r"  cluster 0 \(\d+\): (noun \d+ -?\d\.\d{3}(, )?)+|  cluster 0 \(0\): \(empty\)",
                                               lines[0])
    assert (f"... {k - shown} more clusters" in out) == (shown < k)
    rc, out, err = _cli(capsys, "predict", run, files / "u.npy", "--out", files / f"p{k}.npy",
                        "--json", files / f"p{k}.json", "--device", "cpu")
    assert rc == 0, err
    summary = json.loads((files / f"p{k}.json").read_text())
    saved = json.loads((run / fitted.CONFIG_FILE).read_text())
    assert summary["samples"] == 600 and sum(summary["sizes"]) == 600
    assert [[n for n, _ in row] for row in summary["cluster_names"]] == saved["cluster_names"]


def test_cli_fit_incomplete_store_needs_the_flag(files, capsys, gap):
    store = _incomplete_store(files / "store_incomplete", gap.embeddings[:500].numpy().astype(np.float16))
    rc, _, err = _cli(capsys, "fit", store, "-k", 4, "--out", files / "run_inc", "--nouns", files / "nouns.npy",
                      "--config", files / "small.json", "--stage", 1, "--no-progress", "--device", "cpu")
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("semclust fit: error: the store at") and "pass --allow-incomplete" in err
    assert "allow_incomplete=True" not in err
    rc, out, err = _cli(capsys, "fit", store, "-k", 4, "--out", files / "run_inc", "--nouns", files / "nouns.npy",
                        "--config", files / "small.json", "--stage", 1, "--no-progress", "--device", "cpu",
                        "--allow-incomplete")
    assert rc == 0, err
    assert "fitted 400 samples" in out  # the two whole shards written so far


def test_cli_allow_incomplete_needs_a_store(files, capsys):
    rc, _, err = _cli(capsys, "fit", files / "u.npy", "-k", 4, "--out", files / "run_x", "--allow-incomplete")
    assert rc == 2 and "--allow-incomplete applies to an embedding store" in err


def test_cli_predict_checks_the_input_before_loading_the_model(files, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(SemanticClusterer, "load", load)
    (files / "notes.txt").write_text("not an input")
    (files / "some_run").mkdir(exist_ok=True)
    rc, _, err = _cli(capsys, "predict", files / "some_run", files / "notes.txt", "--out", files / "q.npy")
    assert rc == 2 and "unsupported input file" in err
