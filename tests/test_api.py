"""SemanticClusterer end to end: images (tiny random open_clip) and embeddings, persistence,
scikit-learn conventions, custom encoders, bad input, determinism.

Every run is tiny (24 images of 32x32 pixels, 300 synthetic embeddings, 1-2 epochs): the
tests check the contract, not the clustering quality.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from clip_fixtures import TINY_CLIP_CONFIG, save_checkpoint, tiny_encoder, torch_single_thread
from semclust import SemanticClusterer
from semclust.api import CONFIG_FILE, WEIGHTS_FILE
from semclust.config import Config
from semclust.inputs.sources import ImageSource, TensorSource
from semclust.synthetic import SyntheticSpec, make_synthetic

__all__ = ["torch_single_thread"]  # fixture used below
pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = str(TINY_CLIP_CONFIG)
K = 3
WORDS = ("cat dog car tree house bird fish boat plane flower apple chair table book phone shoe hat cup "
         "lamp clock").split()
# one saturated colour per class: even a random vision tower separates them a little, so
# the labels are not all one cluster and the round-trip comparisons mean something
CLASS_COLOURS = ((220, 30, 30), (30, 200, 40), (30, 40, 220))
BAD_FILES = ("class_0/broken.jpg", "class_1/fake.png")


def small_config(batch: int = 16) -> Config:
    cfg = Config()
    cfg.stage1.epochs, cfg.stage1.batch_size, cfg.neighbours.k, cfg.stage1.hidden = 2, batch, 5, 32
    cfg.stage2.epochs, cfg.stage2.batch_size, cfg.stage2.min_per_cluster = 1, max(8, batch // 2), 2
    cfg.semantic.kmeans_restarts, cfg.semantic.kmeans_iters = 1, 10
    cfg.chunks.encode_batch_size = 16
    return cfg


def write_image_folder(root, per_class: int = 8, seed: int = 0):
    """`per_class` noisy single-colour PNGs in class_0..2/, a truncated JPEG, a .png holding
    text, and a .txt file (not an image extension: not listed at all). Returns (root,
    indices of the two bad files in `ImageSource.from_folder(root).items`)."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(CLASS_COLOURS):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"img_{i:02d}.png")
    jpeg = root / BAD_FILES[0]
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    (root / BAD_FILES[1]).write_bytes(b"this is not an image")
    (root / "notes.txt").write_text("not an image either, and not listed")
    items = ImageSource.from_folder(root).items
    bad = sorted(items.index(str(root / name)) for name in BAD_FILES)
    return root, bad


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny_encoder(seed=1), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(SyntheticSpec(n=300, k=K, dim=16, distractor_nouns=20), seed=0)


def image_model(stage: int, pretrained=None, **kw) -> SemanticClusterer:
    return SemanticClusterer(n_clusters=K, clip=TINY, pretrained=pretrained, nouns=list(WORDS), stage=stage,
                             config=small_config(), device="cpu", **kw)


def check_image_labels(model: SemanticClusterer, labels: np.ndarray, bad: list[int], n: int = 3 * 8 + 2) -> None:
    assert labels is model.labels_
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert np.flatnonzero(labels == -1).tolist() == bad
    good = np.delete(labels, bad)
    assert ((good >= 0) & (good < K)).all()
    assert model.skipped_.count == 2
    assert sorted(os.path.basename(item) for item, _ in model.skipped_.skipped) == ["broken.jpg", "fake.png"]
    assert model.confidences_.shape == (n,) and (model.confidences_[bad] == 0).all()
    assert ((np.delete(model.confidences_, bad) > 0) & (np.delete(model.confidences_, bad) <= 1 + 1e-6)).all()
    assert model.cluster_centers_.shape == (K, 32) and np.isfinite(model.cluster_centers_).all()
    assert model.stage1_labels_.shape == (n,) and (model.stage1_labels_[bad] == -1).all()
    assert model.history_["skipped"] == 2 and model.history_["nouns_total"] == len(WORDS)


# ---- images, the tiny random open_clip model ---------------------------------------------


@pytest.mark.parametrize("stage, mode", [(2, "encoder"), (1, "stage1")])
def test_images_end_to_end_random_clip(images, tmp_path, stage, mode):
    root, bad = images
    model = image_model(stage)
    labels = model.fit_predict(root)
    check_image_labels(model, labels, bad)
    assert model.mode_ == mode
    if stage == 1:
        np.testing.assert_array_equal(model.stage1_labels_, labels)
    else:
        assert len(model.history_["stage2"]) == 1
    before = model.predict(root)
    np.testing.assert_array_equal(before, labels)
    model.save(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    loaded = SemanticClusterer.load(tmp_path / "run", device="cpu")
    assert loaded.mode_ == mode and loaded.n_clusters == K and loaded.stage == stage
    np.testing.assert_array_equal(loaded.labels_, labels)
    np.testing.assert_array_equal(loaded.confidences_, model.confidences_)
    np.testing.assert_array_equal(loaded.cluster_centers_, model.cluster_centers_)
    after = loaded.predict(root)
    assert np.flatnonzero(after == -1).tolist() == bad
    if stage == 2:
        with pytest.raises(ValueError, match="predict from images"):
            model.predict(np.zeros((4, 32), np.float32))


@pytest.mark.parametrize("stage", [2, 1])
def test_images_save_load_predict_with_checkpoint(images, checkpoint, tmp_path, stage):
    root, bad = images
    model = image_model(stage, pretrained=str(checkpoint))
    labels = model.fit_predict(root)
    check_image_labels(model, labels, bad)
    proba = model.predict_proba(root)
    np.testing.assert_array_equal(model.predict(root), labels)
    loaded = SemanticClusterer.load(model.save(tmp_path / "run"), device="cpu")
    np.testing.assert_array_equal(loaded.predict(root), labels)
    np.testing.assert_allclose(loaded.predict_proba(root), proba, atol=1e-5)  # NaN rows compare equal
    # a list of paths and a plain Dataset of PIL images are inputs too
    items = ImageSource.from_folder(root).items
    some = [0, bad[0], len(items) - 1]
    np.testing.assert_array_equal(loaded.predict([items[i] for i in some]), labels[some])

    class PILImages(Dataset):
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            with Image.open(self.paths[i]) as im:
                return im.convert("RGB"), 0

    good = [i for i in range(len(items)) if i not in bad]
    np.testing.assert_array_equal(loaded.predict(PILImages([items[i] for i in good])), labels[good])


def test_random_clip_save_load_reproduces_probabilities(images, tmp_path):
    root, _ = images
    model = image_model(2).fit(root)
    loaded = SemanticClusterer.load(model.save(tmp_path / "run"), device="cpu")
    np.testing.assert_allclose(loaded.predict_proba(root), model.predict_proba(root), atol=1e-5)


def test_refit_same_object_equals_fresh_fit(images, checkpoint):
    root, _ = images
    model = image_model(2, pretrained=str(checkpoint))
    model.config.stage2.lr = 1e-2  # large enough for the tuned encoder to show in the confidences
    first = model.fit(root).confidences_.copy()
    second = model.fit(root).confidences_
    np.testing.assert_allclose(second, first, atol=1e-6)


# ---- embeddings only ----------------------------------------------------------------------


def test_embeddings_adapter_fit_save_load_predict(synthetic, tmp_path):
    u, t = synthetic.embeddings.numpy(), synthetic.noun_embeddings.numpy()
    model = SemanticClusterer(K, nouns="ignored: fit's nouns win", config=small_config(64), device="cpu")
    labels = model.fit_predict(u, nouns=t)
    assert model.mode_ == "adapter"
    assert labels.shape == (300,) and ((labels >= 0) & (labels < K)).all()
    assert model.skipped_.count == 0 and model.n_features_in_ == 16
    assert model.cluster_centers_.shape == (K, 16)
    proba = model.predict_proba(u)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(model.predict(u), labels)
    np.testing.assert_array_equal(model.predict(torch.from_numpy(u)), labels)
    loaded = SemanticClusterer.load(model.save(tmp_path / "run"), device="cpu")
    assert loaded.mode_ == "adapter"
    np.testing.assert_array_equal(loaded.predict(u), labels)
    np.testing.assert_allclose(loaded.predict_proba(u), proba, atol=1e-6)
    # an embedding file is an input too
    np.save(tmp_path / "u.npy", u)
    np.testing.assert_array_equal(loaded.predict(tmp_path / "u.npy"), labels)


def test_embeddings_with_word_nouns_use_the_text_tower():
    u = np.random.default_rng(0).normal(size=(60, 32)).astype(np.float32)
    model = SemanticClusterer(K, clip=TINY, pretrained=None, nouns=list(WORDS), stage=1,
                              config=small_config(), device="cpu")
    labels = model.fit_predict(u)
    assert model.mode_ == "stage1" and labels.shape == (60,) and ((labels >= 0) & (labels < K)).all()
    assert model.history_["nouns_total"] == len(WORDS)
    assert model.model_.noun_bank.shape[1] == 32 and 0 < model.model_.noun_bank.shape[0] <= len(WORDS)
    torch.testing.assert_close(model.model_.noun_bank.norm(dim=1), torch.ones(model.model_.noun_bank.shape[0]))
    with pytest.raises(ValueError, match="dim 32 but image features have 16"):
        SemanticClusterer(K, clip=TINY, pretrained=None, nouns=list(WORDS), config=small_config(),
                          device="cpu").fit(u[:, :16])


# ---- scikit-learn conventions ------------------------------------------------------------


def test_constructor_stores_params_verbatim_and_does_no_work(monkeypatch):
    def no_loading(*a, **kw):
        raise AssertionError("the constructor must not load a model")

    monkeypatch.setattr("semclust.clip.encoder.ClipEncoder.load", no_loading)
    cfg, nouns = small_config(), ["a", "b"]
    params = dict(n_clusters=-5, clip="no-such-model", pretrained="/no/such/ckpt.pt", nouns=nouns, stage=7,
                  config=cfg, device="cuda:9", seed=123, progress=True)
    model = SemanticClusterer(**params)
    for name, value in params.items():
        assert getattr(model, name) is value
    assert not any(name.endswith("_") and not name.startswith("_") for name in vars(model))
    # the invalid values are reported by fit, not the constructor
    with pytest.raises(ValueError, match="n_clusters"):
        model.fit(np.ones((10, 4), np.float32))


def test_fit_returns_self_and_fit_predict_equals_labels(synthetic):
    u, t = synthetic.embeddings, synthetic.noun_embeddings
    model = SemanticClusterer(K, stage=1, config=small_config(64), device="cpu")
    assert model.fit(u, nouns=t) is model
    labels = model.fit_predict(u, nouns=t)
    assert labels is model.labels_


@pytest.mark.parametrize("call", ["predict", "predict_proba", "save"])
def test_unfitted_model_raises_clear_error(call, tmp_path):
    model = SemanticClusterer(K)
    arg = tmp_path / "run" if call == "save" else np.ones((4, 8), np.float32)
    with pytest.raises(RuntimeError, match=r"not fitted yet: call fit\(\) or load\(\) first"):
        getattr(model, call)(arg)
    assert not (tmp_path / "run").exists()


def test_n_clusters_accepts_numpy_integers(synthetic):
    model = SemanticClusterer(np.int64(K), stage=1, config=small_config(64), device="cpu")
    model.fit(synthetic.embeddings, nouns=synthetic.noun_embeddings)


# ---- a custom encoder object -------------------------------------------------------------


def test_custom_encoder_is_not_modified_and_round_trips(synthetic, tmp_path):
    enc = synthetic.encoder
    before = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    grads_before = [p.requires_grad for p in enc.parameters()]
    model = SemanticClusterer(K, clip=enc, nouns=synthetic.noun_embeddings, config=small_config(64), device="cpu")
    model.config.stage2.lr = 1e-2  # so that the tuned copy visibly differs from the original
    labels = model.fit_predict(TensorSource(synthetic.raw))
    assert model.mode_ == "encoder" and labels.shape == (300,) and (labels >= 0).all()
    assert model.model_.encoder is not enc
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), f"fit changed the user's encoder ({k})"
    assert [p.requires_grad for p in enc.parameters()] == grads_before
    assert not torch.equal(model.model_.encoder.proj.weight, before["proj.weight"])
    np.testing.assert_array_equal(model.predict(TensorSource(synthetic.raw)), labels)

    model.save(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert meta["params"]["custom_encoder"] == "SyntheticEncoder" and meta["params"]["clip"] is None
    with pytest.raises(ValueError, match="pass it as load"):
        SemanticClusterer.load(tmp_path / "run")
    fresh = make_synthetic(synthetic.spec, seed=0).encoder
    loaded = SemanticClusterer.load(tmp_path / "run", clip=fresh, device="cpu")
    np.testing.assert_array_equal(loaded.predict(TensorSource(synthetic.raw)), labels)
    with pytest.raises(TypeError, match="noun embeddings"):
        SemanticClusterer(K, clip=enc, nouns=["cat", "dog"], config=small_config(64),
                          device="cpu").fit(TensorSource(synthetic.raw))


def test_load_does_not_modify_the_passed_encoder(synthetic, tmp_path):
    model = SemanticClusterer(K, clip=synthetic.encoder, nouns=synthetic.noun_embeddings, config=small_config(64),
                              device="cpu")
    model.config.stage2.lr = 1e-2
    model.fit(TensorSource(synthetic.raw)).save(tmp_path / "run")
    fresh = make_synthetic(synthetic.spec, seed=0).encoder
    before = fresh.proj.weight.detach().clone()
    SemanticClusterer.load(tmp_path / "run", clip=fresh, device="cpu")
    assert torch.equal(fresh.proj.weight, before)


# ---- bad input -----------------------------------------------------------------------------


def _bad_embeddings(case: str):
    rng = np.random.default_rng(0)
    u, t = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(12, 8)).astype(np.float32)
    k = K
    if case == "nan":
        u[3, 2] = np.nan
    elif case == "inf":
        u[5, 0] = np.inf
    elif case == "nan nouns":
        t[0, 1] = np.nan
    elif case == "dims":
        t = t[:, :5]
    elif case == "k<2":
        k = 1
    elif case == "k>n":
        k = 41
    elif case == "int dtype":
        u = u.astype(np.int64)
    elif case == "1-d":
        u = u[:, 0]
    elif case == "empty":
        u = u[:0]
    return u, t, k


@pytest.mark.parametrize("case, message", [
    ("nan", r"embeddings has 1 row\(s\) with NaN"),
    ("inf", r"embeddings has 1 row\(s\) with NaN or Inf"),
    ("nan nouns", r"nouns has 1 row\(s\) with NaN"),
    ("dims", "nouns has dim 5 but 8 was expected"),
    ("k<2", "n_clusters must be an int >= 2"),
    ("k>n", r"n_clusters=41 is larger than the number of samples \(40\)"),
    ("int dtype", "must be float"),
    ("1-d", "must be float"),
    ("empty", "empty"),
])
def test_bad_embeddings_raise_and_leave_no_state(case, message, tmp_path):
    u, t, k = _bad_embeddings(case)
    model = SemanticClusterer(k, config=small_config(), device="cpu")
    with pytest.raises(ValueError, match=message):
        model.fit(u, nouns=t)
    assert not hasattr(model, "labels_") and not hasattr(model, "model_")


def test_failed_refit_keeps_the_previous_fit(synthetic):
    u, t = synthetic.embeddings.numpy(), synthetic.noun_embeddings.numpy()
    model = SemanticClusterer(K, stage=1, config=small_config(64), device="cpu").fit(u, nouns=t)
    labels, heads = model.labels_.copy(), model.model_.heads
    bad = u.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.fit(bad, nouns=t)
    assert model.model_.heads is heads
    np.testing.assert_array_equal(model.labels_, labels)
    np.testing.assert_array_equal(model.predict(u), labels)
    with pytest.raises(ValueError, match="NaN"):
        model.predict(bad)
    with pytest.raises(ValueError, match="dim 5 but 16 was expected"):
        model.predict(u[:, :5])


def test_stage_must_be_1_or_2():
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        SemanticClusterer(K, stage=3).fit(np.ones((10, 4), np.float32), nouns=np.ones((3, 4), np.float32))


def test_missing_and_empty_and_unreadable_folders(tmp_path):
    model = image_model(2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.fit(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files found"):
        model.fit(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_bytes(b"")
    Image.new("RGB", (40, 40), "red").save(bad / "c.png")
    (bad / "c.png").write_bytes((bad / "c.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="none of the 3 inputs could be read"):
        model.fit(bad)
    assert not hasattr(model, "labels_")


def test_pretrained_file_that_is_not_a_checkpoint(tmp_path, images):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a torch checkpoint")
    model = SemanticClusterer(K, clip=TINY, pretrained=str(junk), nouns=list(WORDS), config=small_config(),
                              device="cpu")
    with pytest.raises(ValueError, match="is not a checkpoint for the open_clip model"):
        model.fit(images[0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SemanticClusterer(K, clip=TINY, pretrained=str(tmp_path / "missing.pt"), device="cpu").fit(images[0])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, synthetic):
    model = SemanticClusterer(K, stage=1, config=small_config(64), device="cpu")
    model.fit(synthetic.embeddings, nouns=synthetic.noun_embeddings)
    return model.save(tmp_path_factory.mktemp("saved") / "run")


def _copy_run(src, dst):
    dst.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_load_rejects_what_is_not_a_model(tmp_path, saved_run):
    SemanticClusterer.load(saved_run)  # the pristine copy loads
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a semclust model directory"):
        SemanticClusterer.load(junk)
    (tmp_path / "just_weights").mkdir()
    (tmp_path / "just_weights" / WEIGHTS_FILE).write_bytes((saved_run / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match=f"needs {CONFIG_FILE}"):
        SemanticClusterer.load(tmp_path / "just_weights")
    with pytest.raises(ValueError, match="not a semclust model directory"):
        SemanticClusterer.load(tmp_path / "nowhere")


def test_load_rejects_altered_or_mixed_files(tmp_path, saved_run):
    altered = _copy_run(saved_run, tmp_path / "altered")
    data = bytearray((altered / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (altered / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        SemanticClusterer.load(altered)

    not_json = _copy_run(saved_run, tmp_path / "not_json")
    (not_json / CONFIG_FILE).write_text("{ this is not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SemanticClusterer.load(not_json)

    other_format = _copy_run(saved_run, tmp_path / "other_format")
    meta = json.loads((other_format / CONFIG_FILE).read_text())
    meta["format"] = "something-else/9"
    (other_format / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is not a semclust-model/1 file"):
        SemanticClusterer.load(other_format)


# ---- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_same_seed_same_labels(synthetic, stage):
    u, t = synthetic.embeddings.numpy(), synthetic.noun_embeddings.numpy()
    runs = [SemanticClusterer(K, stage=stage, config=small_config(64), device="cpu", seed=7).fit(u, nouns=t)
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0].labels_, runs[1].labels_)
    np.testing.assert_allclose(runs[0].confidences_, runs[1].confidences_, atol=1e-6)
    np.testing.assert_allclose(runs[0].cluster_centers_, runs[1].cluster_centers_, atol=1e-6)


# ---- scikit-learn conventions and a fresh state every fit ---------------------------------


def test_clone_get_params_and_set_params():
    from sklearn.base import clone

    cfg = small_config()
    model = SemanticClusterer(4, clip=None, stage=1, config=cfg, seed=3, device="cpu")
    params = model.get_params()
    assert params["n_clusters"] == 4 and params["config"] is cfg and params["seed"] == 3
    twin = clone(model)
    assert twin is not model and twin.get_params()["n_clusters"] == 4 and twin.stage == 1
    assert model.set_params(seed=5, stage=2) is model and model.seed == 5 and model.stage == 2
    with pytest.raises(ValueError, match="unknown parameters"):
        model.set_params(n_cluster=3)
    with pytest.raises(TypeError):
        SemanticClusterer(4, None)  # everything after n_clusters is keyword-only


@pytest.mark.parametrize("params,message", [
    (dict(n_clusters=1), "n_clusters must be an int >= 2"),
    (dict(n_clusters=True), "n_clusters"),
    (dict(stage=3), "stage must be 1 or 2"),
    (dict(seed=-1), "seed must be"),
    (dict(resume="yes"), "resume must be True or False"),
])
def test_bad_parameters_raise_before_any_work(params, message, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the fit started before its parameters were checked")

    monkeypatch.setattr("semclust.inputs.classify.as_inputs", no_work)
    monkeypatch.setattr("semclust.pipeline.fit", no_work)
    model = SemanticClusterer(**{"n_clusters": 3, "clip": None, **params})
    with pytest.raises(ValueError, match=message):
        model.fit(np.zeros((10, 4), dtype=np.float32), nouns=np.eye(4, dtype=np.float32))


def test_a_stage1_refit_reports_no_stale_stage2_history(synthetic):
    u, t = synthetic.embeddings.numpy(), synthetic.noun_embeddings.numpy()
    model = SemanticClusterer(K, clip=None, stage=2, config=small_config(64), device="cpu").fit(u, nouns=t)
    assert model.history_["stage2"] and model.mode_ == "adapter"
    model.set_params(stage=1).fit(u, nouns=t)
    assert model.history_["stage2"] == [] and model.mode_ == "stage1"
    assert "stage2" not in model.history_["seconds"]


def test_empty_clusters_warn():
    from semclust.api import ClusterCollapseWarning

    # two tight blobs asked for five clusters: some clusters must stay empty
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=1)
    u = torch.nn.functional.normalize(centres.repeat_interleave(40, 0) + 1e-3 * torch.randn(80, 8, generator=g), dim=1)
    cfg = small_config(32)
    cfg.stage1.w_balance = 0.0
    with pytest.warns(ClusterCollapseWarning, match="clusters are empty"):
        SemanticClusterer(5, clip=None, stage=1, config=cfg, device="cpu").fit(u, nouns=centres)
