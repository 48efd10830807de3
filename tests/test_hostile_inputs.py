"""Hostile inputs: scales whose row norms overflow, non-contiguous layouts, a config given
as a dict, symlink loops, file names an embedding store cannot hold, folders with nothing
readable, bad `embed` options, and unsupported inputs or missing noun files (reported
before any CLIP model is loaded).

Fits are tiny (300 embeddings in K blobs, stage 1, the settings of test_api with 10
epochs); a test compares two fits of the same data, so it checks invariance, not quality.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone

from clip_fixtures import save_checkpoint, tiny_encoder, torch_single_thread, write_random_pngs
from semclust import SemanticClusterer
from semclust.cli import main as cli_main
from semclust.inputs.classify import as_inputs
from semclust.inputs.sources import ImageSource, list_images
from semclust.inputs.store import open_store
from test_api import K, TINY, WORDS, small_config

__all__ = ["torch_single_thread"]  # fixture used below
pytestmark = pytest.mark.usefixtures("torch_single_thread")
# symlinks, and file names that are bytes rather than text
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file names and symlinks")


@pytest.fixture(scope="module")
def blobs():
    """300 unit rows in K tight blobs of 16-D and 20 unit nouns, K of them near the blob
    centres: a fit recovers the blobs exactly, so a changed label means a changed input,
    not a fit on the edge."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(K, 16, generator=g), dim=1)
    u = F.normalize(centres.repeat_interleave(100, 0) + 0.15 * torch.randn(300, 16, generator=g), dim=1)
    t = F.normalize(torch.cat([centres + 0.05 * torch.randn(K, 16, generator=g), torch.randn(17, 16, generator=g)]),
                    dim=1)
    return u, t


def fit(u, nouns, config=None) -> SemanticClusterer:
    if config is None:
        config = small_config(64)
        config.stage1.epochs = 10
    return SemanticClusterer(K, stage=1, config=config, device="cpu").fit(u, nouns=nouns)


@pytest.fixture
def reference(blobs):  # per test: fits compared to the last bit must run on the same threads
    model = fit(*blobs)
    assert sorted(np.bincount(model.labels_).tolist()) == [100] * K  # the blobs, exactly
    return model


def assert_same_fit(a: SemanticClusterer, b: SemanticClusterer) -> None:
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.confidences_, b.confidences_)


# ---- scale -------------------------------------------------------------------------------


def test_embeddings_at_1e20_cluster_like_unit_rows(blobs, reference):
    u, t = blobs
    big = u * 1e20  # finite in float32, but every row norm overflows it
    assert torch.isfinite(big).all() and not torch.isfinite(big.norm(dim=1)).any()
    # u * 1e20 itself rounds (an ulp per entry), so the labels are compared, not the last bits
    np.testing.assert_array_equal(fit(big, t).labels_, reference.labels_)
    np.testing.assert_array_equal(fit(u, t * 1e20).labels_, reference.labels_)
    np.testing.assert_array_equal(reference.predict(big), reference.labels_)
    # a power of two scales exactly, so the fit is the same to the last bit
    assert_same_fit(fit(u * 2.0**70, t * 2.0**70), reference)


def test_fp16_unit_rows_times_2_16_cluster_like_unit_rows(blobs, reference):
    u, t = blobs
    big = u.half() * 2**16  # every entry below 1, so finite in fp16; the row norms (2^16) are not
    assert torch.isfinite(big).all() and not torch.isfinite(big.norm(dim=1)).any()
    np.testing.assert_array_equal(fit(big, t).labels_, reference.labels_)
    np.testing.assert_array_equal(fit(u.half(), t).labels_, reference.labels_)
    np.testing.assert_array_equal(reference.predict(big), reference.labels_)


# ---- layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torch", "torch fp16", "numpy", "npy file"])
def test_column_major_inputs_give_the_same_fit(blobs, reference, kind, tmp_path):
    u, t = blobs
    ref = reference
    if kind == "torch fp16":
        u = u.half()
        ref = fit(u, t)
    if kind.startswith("torch"):
        u_f, t_f = u.T.contiguous().T, t.T.contiguous().T
        assert not u_f.is_contiguous() and torch.equal(u_f, u)
    else:
        u_f, t_f = np.asfortranarray(u.numpy()), np.asfortranarray(t.numpy())
        if kind == "npy file":
            np.save(tmp_path / "u.npy", u_f)  # stored with fortran_order=True
            u_f = tmp_path / "u.npy"
    assert_same_fit(fit(u_f, t_f), ref)
    np.testing.assert_array_equal(ref.predict(u_f), ref.labels_)


# ---- config as a dict --------------------------------------------------------------------


def test_config_may_be_a_dict(blobs, reference):
    u, t = blobs
    d = small_config(64).to_dict()
    d["stage1"]["epochs"] = 10
    model = SemanticClusterer(K, stage=1, config=d, device="cpu")
    assert model.get_params()["config"] is d  # kept verbatim (scikit-learn)
    assert_same_fit(model.fit(u, nouns=t), reference)
    assert_same_fit(clone(model).fit(u, nouns=t), reference)


def test_bad_configs_raise_naming_the_key_or_the_parameter():
    with pytest.raises(ValueError, match="epochz"):
        SemanticClusterer(K, config={"stage1": {"epochz": 3}})
    with pytest.raises(ValueError, match="stage9"):
        SemanticClusterer(K, config={"stage9": {}})
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        SemanticClusterer(K, config={"stage1": {"epochs": -1}})
    with pytest.raises(TypeError, match="config must be a semclust.config.Config, a dict"):
        SemanticClusterer(K, config=[("stage1", {})])
    model = SemanticClusterer(K, clip=None).set_params(config="fast")
    with pytest.raises(TypeError, match="config must be"):
        model.fit(np.eye(10, 4, dtype=np.float32), nouns=np.eye(4, dtype=np.float32))


# ---- symlink loops -----------------------------------------------------------------------


def _folder_with_links(root):
    write_random_pngs(root, n=3, size=(8, 8))
    write_random_pngs(root / "sub", n=1, size=(8, 8))
    os.symlink(".", root / "loop")  # back to the root
    os.symlink("..", root / "sub" / "up")  # a second loop, through the sub-folder
    os.symlink("sub", root / "z_alias")  # the sub-folder again, sorted after it
    os.symlink("img_0000.png", root / "z_copy.png")  # an image again
    return root


@posix_only
def test_symlink_loops_and_aliases_list_each_image_once(tmp_path):
    root = _folder_with_links(tmp_path / "imgs")
    # a separate process: before the fix, two loops never finished listing
    code = "import sys; from semclust.inputs.sources import list_images; print(*list_images(sys.argv[1]), sep='\\n')"
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    found = [os.path.relpath(p, root) for p in out.splitlines()]
    assert found == ["img_0000.png", "img_0001.png", "img_0002.png", os.path.join("sub", "img_0000.png")]
    assert [os.path.relpath(p, root) for p in list_images(root)] == found  # the same order every time


@posix_only
def test_a_dangling_image_link_is_still_reported_as_missing(tmp_path):
    write_random_pngs(tmp_path, n=1, size=(8, 8))
    os.symlink("gone.png", tmp_path / "link.png")
    src = ImageSource.from_folder(tmp_path)
    assert [os.path.basename(p) for p in src.items] == ["img_0000.png", "link.png"]
    assert src[1][2].startswith("missing")


# ---- embed: file names, nothing readable, bad options ----------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny_encoder(), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _embed(images, out, checkpoint, *options):
    return cli_main(["embed", str(images), "--out", str(out), "--clip", TINY, "--pretrained", str(checkpoint),
                     "--workers", "0", "--no-progress", *options])


@posix_only
def test_file_names_a_store_cannot_hold_are_skipped_and_counted(tmp_path, checkpoint, capsys):
    root = tmp_path / "imgs"
    good = write_random_pngs(root, n=3, size=(32, 32))
    (root / "line\nbreak.png").write_bytes(good[0].read_bytes())
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as f:  # Latin-1, not UTF-8
        f.write(good[1].read_bytes())
    source = ImageSource.from_folder(root)
    assert len(source) == 5

    assert _embed(root, tmp_path / "store", checkpoint) == 0
    store = open_store(tmp_path / "store")
    assert store.complete and store.items == [str(p) for p in good]
    printed = capsys.readouterr().out
    assert "skipped 2 of 5 images (2 bad name)" in printed
    printed.encode("utf-8")  # escaped names: printable on any terminal

    enc = tiny_encoder()
    res = enc.embed_to_store(source, tmp_path / "again", progress=False)
    assert res.skipped.by_kind() == {"bad name": 2}
    assert sorted(reason for _, reason in res.skipped.skipped) == [
        "bad name: the path contains a line break", "bad name: the path is not valid UTF-8"]
    torch.testing.assert_close(res.store.to_tensor(), store.to_tensor())


def test_a_folder_with_no_readable_image_leaves_no_store(tmp_path, checkpoint, capsys):
    root = tmp_path / "bad"
    write_random_pngs(root, n=0, corrupt=3)
    with pytest.raises(ValueError, match=f"no readable images in {root}: skipped 3 of 3 images"):
        tiny_encoder().embed_to_store(ImageSource.from_folder(root), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert _embed(root, tmp_path / "out", checkpoint) == 2
    assert "no readable images" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(num_workers=-1), "workers must be >= 0, got -1"),
])
def test_bad_embed_options_raise_before_anything_is_written(tmp_path, options, message):
    write_random_pngs(tmp_path / "imgs", n=2, size=(32, 32))
    source = ImageSource.from_folder(tmp_path / "imgs")
    with pytest.raises(ValueError, match=message):
        tiny_encoder().embed_to_store(source, tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


# ---- reported before the CLIP model loads ----------------------------------------------------


@pytest.fixture
def no_clip(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the CLIP model was loaded before the inputs were checked")

    monkeypatch.setattr("semclust.clip.encoder.ClipEncoder.load", refuse)


def test_an_unsupported_input_file_fails_before_the_model_loads(tmp_path, no_clip):
    np.savez(tmp_path / "u.npz", u=np.ones((10, 4), np.float32))
    model = SemanticClusterer(K, clip=TINY, pretrained=None, nouns=list(WORDS), config=small_config(), device="cpu")
    with pytest.raises(ValueError, match=r"unsupported input file .*u\.npz.*\.npy"):
        model.fit(tmp_path / "u.npz")
    inputs = as_inputs(np.ones((10, 4), np.float32))
    assert as_inputs(inputs) is inputs  # a caller may classify first and pass the result on


def test_a_missing_noun_file_fails_before_the_model_loads(tmp_path, no_clip):
    write_random_pngs(tmp_path / "imgs", n=4, size=(32, 32))
    model = SemanticClusterer(K, clip=TINY, pretrained=None, nouns=str(tmp_path / "nouns.txt"), config=small_config(),
                              device="cpu")
    for x in (tmp_path / "imgs", np.ones((10, 32), np.float32)):
        with pytest.raises(FileNotFoundError, match="noun file .*nouns.txt does not exist"):
            model.fit(x)
