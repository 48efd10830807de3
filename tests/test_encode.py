import hashlib
import json
import logging

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_fixtures import (TINY_CLIP_CONFIG, png_folder, save_checkpoint, tiny_clip, tiny_encoder,
                           torch_single_thread, write_random_pngs)
from semclust.inputs.sources import ImageSource
from semclust.clip.encoder import TEMPLATES, ClipEncoder
from semclust.inputs.store import StoreWriter, open_store

__all__ = ["png_folder", "tiny_clip", "torch_single_thread"]  # fixtures used below
pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _other_config(tmp_path, embed_dim=16):
    """A second tiny architecture: the tiny config with another embedding width."""
    cfg = json.loads(TINY_CLIP_CONFIG.read_text())
    cfg["embed_dim"] = embed_dim
    path = tmp_path / f"tiny_clip_{embed_dim}.json"
    path.write_text(json.dumps(cfg))
    return path


def _image_batch(encoder, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *encoder.image_size, generator=g)


def _features(encoder, images):
    with torch.no_grad():
        return encoder.image_features(images)


# ---- loading ------------------------------------------------------------------------


def test_load_from_json_config(tiny_clip, caplog):
    assert tiny_clip.arch == "tiny_clip" and tiny_clip.name == str(TINY_CLIP_CONFIG.resolve())
    assert tiny_clip.dim == 32 and tiny_clip.image_size == (32, 32)
    assert tiny_clip.pretrained is None and tiny_clip.checkpoint_sha256 is None
    assert not tiny_clip.model.training
    with caplog.at_level(logging.WARNING, logger="semclust.clip.encoder"):
        tiny_encoder()
    assert "random weights: only for tests" in caplog.text


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip(tiny_clip, tmp_path, suffix):
    ckpt = save_checkpoint(tiny_clip, tmp_path / f"tiny{suffix}")
    loaded = ClipEncoder.load(TINY_CLIP_CONFIG, pretrained=ckpt)
    assert loaded.pretrained == str(ckpt.resolve())
    assert loaded.checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    images = _image_batch(tiny_clip)
    torch.testing.assert_close(_features(loaded, images), _features(tiny_clip, images), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_texts(["cat"]), tiny_clip.encode_texts(["cat"]), rtol=0, atol=0)
    assert not torch.equal(_features(tiny_encoder(seed=1), images), _features(tiny_clip, images))


def test_wrong_checkpoints_are_refused(tiny_clip, tmp_path):
    torch.save(torch.randn(3, 3), tmp_path / "tensor.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    save_checkpoint(ClipEncoder.load(_other_config(tmp_path)), tmp_path / "other.pt")
    for name in ("tensor.pt", "garbage.pt", "other.pt"):
        with pytest.raises(ValueError, match="is not a checkpoint for the open_clip model tiny_clip"):
            ClipEncoder.load(TINY_CLIP_CONFIG, pretrained=tmp_path / name)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ClipEncoder.load(TINY_CLIP_CONFIG, pretrained=tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):
        ClipEncoder.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="list_models"):
        ClipEncoder.load("ViT-Nonexistent-7")
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="vision_cfg"):
        ClipEncoder.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="known tags"):
        ClipEncoder.load("ViT-B-32", pretrained="no_such_tag")


def test_tag_download_failure_points_to_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights: no network")

    monkeypatch.setattr(open_clip, "create_model", offline)
    # past the quick offline check (tests/test_offline.py): the download itself fails
    monkeypatch.setattr("semclust.clip.encoder.check_weights_reachable", lambda arch, tag: None)
    with pytest.raises(RuntimeError, match="local file path"):
        ClipEncoder.load("ViT-B-32", pretrained="laion2b_s34b_b79k")


# ---- images -------------------------------------------------------------------------


def test_encode_folder_skips_corrupt_files(tiny_clip, png_folder):
    source = ImageSource.from_folder(png_folder)
    assert len(source) == 12
    result = tiny_clip.encode_images(source, batch_size=5, progress=False)
    good = [i for i, item in enumerate(source.items) if int(item[-8:-4]) < 10]
    assert result.embeddings.dtype == torch.float16 and result.embeddings.shape == (10, 32)
    torch.testing.assert_close(result.embeddings.float().norm(dim=1), torch.ones(10), atol=2e-3, rtol=0)
    assert result.kept.tolist() == good
    assert result.skipped.count == 2 and result.skipped.total == 12
    assert {kind for kind in result.skipped.by_kind()} <= {"truncated", "unreadable"}
    # one image per batch gives the same rows: batching does not change the embeddings
    single = tiny_clip.encode_images(source, batch_size=1, progress=False)
    torch.testing.assert_close(single.embeddings.float(), result.embeddings.float(), atol=2e-3, rtol=0)


def test_encode_matches_image_features_and_restores_train_mode(tiny_clip):
    rng = np.random.default_rng(0)
    source = ImageSource.from_arrays(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    tiny_clip.model.train()
    result = tiny_clip.encode_images(source, batch_size=2, progress=False)
    assert tiny_clip.model.training
    tiny_clip.model.eval()
    images = torch.stack([tiny_clip.eval_transform(source.load(i)) for i in range(5)])
    torch.testing.assert_close(result.embeddings.float(), _features(tiny_clip, images), atol=2e-3, rtol=0)
    assert result.skipped.count == 0


def test_iter_encode_images_from_start(tiny_clip, tmp_path):
    source = ImageSource.from_paths(write_random_pngs(tmp_path, n=6))
    batches = []
    for batch in tiny_clip.iter_encode_images(source, batch_size=2, progress=False, start=3):
        assert torch.is_grad_enabled()  # no_grad stays inside the generator
        batches.append(batch)
    assert torch.cat([b.kept for b in batches]).tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="start"):
        next(tiny_clip.iter_encode_images(source, start=7))


def test_embed_to_store_resumes_after_a_crash(tiny_clip, png_folder, tmp_path, monkeypatch):
    source = ImageSource.from_folder(png_folder)
    fresh = tiny_clip.embed_to_store(source, tmp_path / "fresh", batch_size=3, progress=False, shard_rows=4)
    assert len(fresh.store) == 10 and fresh.skipped.count == 2
    assert fresh.store.meta["source_consumed"] == 12 and fresh.store.meta["model"] == tiny_clip.name

    out = tmp_path / "resumed"
    real_flush = StoreWriter._flush
    calls = []

    def crash_on_second_shard(self, rows):
        if len(self._meta["shards"]) == 1:
            raise KeyboardInterrupt
        real_flush(self, rows)

    monkeypatch.setattr(StoreWriter, "_flush", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        tiny_clip.embed_to_store(source, out, batch_size=3, progress=False, shard_rows=4)
    monkeypatch.setattr(StoreWriter, "_flush", real_flush)
    assert len(open_store(out, allow_incomplete=True)) == 4

    real_iter = ClipEncoder.iter_encode_images

    def spy(self, *args, **kwargs):
        calls.append(kwargs["start"])
        return real_iter(self, *args, **kwargs)

    monkeypatch.setattr(ClipEncoder, "iter_encode_images", spy)
    resumed = tiny_clip.embed_to_store(source, out, batch_size=3, progress=False)
    first_unstored = source.items.index(open_store(out).items[4])
    assert calls == [source.items.index(fresh.store.items[3]) + 1] and calls[0] <= first_unstored
    assert resumed.store.items == fresh.store.items and resumed.store.complete
    torch.testing.assert_close(resumed.store.to_tensor(), fresh.store.to_tensor(), atol=2e-3, rtol=0)

    # complete: nothing is encoded again
    again = tiny_clip.embed_to_store(source, out, progress=False)
    assert calls == calls[:1] and len(again.store) == 10


def test_embed_to_store_refuses_other_model_and_other_source(tiny_clip, png_folder, tmp_path):
    source = ImageSource.from_folder(png_folder)
    tiny_clip.embed_to_store(source, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="cannot be mixed"):
        ClipEncoder.load(_other_config(tmp_path)).embed_to_store(source, tmp_path / "a", progress=False)
    # an interrupted store, resumed with another image list
    w = StoreWriter(tmp_path / "b", tiny_clip.name, None, None, tiny_clip.dim, shard_rows=2)
    w.append(torch.randn(2, 32), ["x.png", "y.png"])
    other = ImageSource.from_paths(write_random_pngs(tmp_path / "other", n=4))
    with pytest.raises(ValueError, match="another source"):
        tiny_clip.embed_to_store(other, tmp_path / "b", progress=False)


# ---- fine-tuning hooks ----------------------------------------------------------------


def test_image_features_are_normalised_and_differentiable(tiny_clip):
    params = tiny_clip.tail_parameters(1)
    tiny_clip.model.train()
    features = tiny_clip.image_features(_image_batch(tiny_clip))
    assert features.shape == (4, 32)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(4))
    features.sum().backward()
    assert all(p.grad is not None for p in params)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        tiny_clip.image_features(torch.zeros(3, 32, 32))


def test_tail_parameters_freezes_all_but_the_tail(tiny_clip):
    visual = tiny_clip.model.visual
    last_block = sum(p.numel() for p in visual.transformer.resblocks[-1].parameters())
    post = sum(p.numel() for p in visual.ln_post.parameters()) + visual.proj.numel()
    params = tiny_clip.tail_parameters(1)
    trainable = [p for p in tiny_clip.model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable}
    assert sum(p.numel() for p in params) == last_block + post
    assert not any(p.requires_grad for p in tiny_clip.model.transformer.parameters())  # text tower
    assert sum(p.numel() for p in tiny_clip.tail_parameters(0)) == post
    assert len(tiny_clip.tail_parameters(2)) > len(params)
    with pytest.raises(ValueError, match="n_blocks"):
        tiny_clip.tail_parameters(3)


@pytest.mark.parametrize("kind", ["eval", "weak", "strong"])
def test_view_transforms(tiny_clip, kind):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    view = tiny_clip.view_transform(kind)(image)
    assert view.shape == (3, 32, 32) and view.dtype == torch.float32
    gray = tiny_clip.view_transform(kind)(image.convert("L"))
    assert gray.shape == (3, 32, 32)


def test_view_transform_rejects_unknown_kind(tiny_clip):
    with pytest.raises(ValueError, match="strong"):
        tiny_clip.view_transform("medium")


# ---- text ---------------------------------------------------------------------------


def test_encode_texts_averages_normalised_template_features(tiny_clip):
    texts = ["cat", "sports car", "a {weird} one"]
    out = tiny_clip.encode_texts(texts)
    assert out.shape == (3, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        for row, text in zip(out, texts):
            tokens = tiny_clip.tokenizer([t.replace("{}", text) for t in TEMPLATES])
            features = F.normalize(tiny_clip.model.encode_text(tokens), dim=-1)
            torch.testing.assert_close(row, F.normalize(features.mean(0), dim=0))
        plain = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(texts)), dim=-1)
    torch.testing.assert_close(tiny_clip.encode_texts(texts, templates=None), plain)
    # fewer prompts per pass than templates: one text per pass, same result
    torch.testing.assert_close(tiny_clip.encode_texts(texts, batch_size=3), out)


def test_encode_texts_validates(tiny_clip):
    with pytest.raises(ValueError, match="non-empty"):
        tiny_clip.encode_texts([])
    with pytest.raises(ValueError, match="templates"):
        tiny_clip.encode_texts(["cat"], templates=["a photo"])
