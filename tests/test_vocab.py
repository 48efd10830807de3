import sys
import types
from unittest import mock

import pytest
import torch

from semclust.clip.encoder import TEMPLATES
from semclust.clip.vocab import default_cache_dir, default_nouns, embed_nouns, load_nouns, wordnet_nouns


def test_default_nouns():
    nouns = default_nouns()
    assert len(nouns) > 5000
    assert len({n.casefold() for n in nouns}) == len(nouns)
    assert all(n == " ".join(n.split()) and n for n in nouns)
    assert nouns[:2] == ["tench", "goldfish"]  # ImageNet-1k class names come first
    assert "sports car" in nouns and "Granny Smith" in nouns
    assert "heterotroph" in nouns  # a first lemma from timm's ImageNet-21k list
    nouns.append("mutated")
    assert default_nouns()[-1] != "mutated"  # callers get a copy


def test_wordnet_without_nltk(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    with pytest.raises(RuntimeError, match="pip install nltk"):
        wordnet_nouns()


def _fake_nltk(monkeypatch, all_lemma_names):
    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = types.SimpleNamespace(all_lemma_names=all_lemma_names)
    nltk = types.ModuleType("nltk")
    nltk.corpus = corpus
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)


def test_wordnet_without_its_data(monkeypatch):
    def missing(pos):
        raise LookupError("Resource wordnet not found")

    _fake_nltk(monkeypatch, missing)
    with pytest.raises(RuntimeError, match="nltk.downloader wordnet"):
        wordnet_nouns()


def test_wordnet_lemmas(monkeypatch):
    _fake_nltk(monkeypatch, lambda pos: iter(["ice_cream", "Dog", "dog", "sea_anemone"]))
    assert wordnet_nouns() == ["ice cream", "Dog", "sea anemone"]
    assert load_nouns("wordnet") == ["ice cream", "Dog", "sea anemone"]


def test_load_nouns_from_file(tmp_path):
    path = tmp_path / "nouns.txt"
    path.write_text("# my nouns\ncat\n\n  sports   car  \ndog  # a comment\nCat\n")
    assert load_nouns(path) == ["cat", "sports car", "dog"]
    assert load_nouns(str(path)) == ["cat", "sports car", "dog"]
    path.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no nouns"):
        load_nouns(path)
    with pytest.raises(FileNotFoundError):
        load_nouns(tmp_path / "missing.txt")


def test_load_nouns_specs():
    assert load_nouns(["a", "b", "A", " "]) == ["a", "b"]
    assert load_nouns("default") == default_nouns()
    with pytest.raises(ValueError, match="empty"):
        load_nouns([])
    with pytest.raises(ValueError, match="strings"):
        load_nouns(["a", 3])


def _mock_encoder(pretrained="laion2b_s34b_b79k", dim=4):
    encoder = mock.Mock(spec=["name", "pretrained", "checkpoint_sha256", "dim", "encode_texts"])
    encoder.name, encoder.pretrained, encoder.checkpoint_sha256, encoder.dim = "ViT-B-32", pretrained, None, dim
    encoder.encode_texts.side_effect = lambda texts, *a, **k: torch.nn.functional.normalize(
        torch.randn(len(texts), encoder.dim), dim=1)
    return encoder


def test_embed_nouns_cache_hit_skips_the_encoder(tmp_path):
    encoder = _mock_encoder()
    first = embed_nouns(encoder, ["cat", "dog"], cache_dir=tmp_path)
    assert first.shape == (2, 4) and encoder.encode_texts.call_count == 1
    assert encoder.encode_texts.call_args.args[1] == TEMPLATES
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = embed_nouns(encoder, ["cat", "dog"], cache_dir=tmp_path)
    assert encoder.encode_texts.call_count == 1 and torch.equal(again, first)
    # anything that changes the result changes the key
    embed_nouns(encoder, ["cat", "dog", "car"], cache_dir=tmp_path)
    embed_nouns(encoder, ["cat", "dog"], cache_dir=tmp_path, templates=None)
    encoder.pretrained = "openai"
    embed_nouns(encoder, ["cat", "dog"], cache_dir=tmp_path)
    assert encoder.encode_texts.call_count == 4


def test_embed_nouns_recomputes_a_bad_cache(tmp_path):
    encoder = _mock_encoder()
    embed_nouns(encoder, ["cat"], cache_dir=tmp_path)
    (file,) = tmp_path.glob("*.safetensors")
    file.write_bytes(b"garbage")
    assert embed_nouns(encoder, ["cat"], cache_dir=tmp_path).shape == (1, 4)
    assert encoder.encode_texts.call_count == 2
    # a readable file of the wrong shape is also recomputed
    encoder.dim = 5
    assert embed_nouns(encoder, ["cat"], cache_dir=tmp_path).shape == (1, 5)
    assert encoder.encode_texts.call_count == 3


def test_random_weights_are_never_cached(tmp_path):
    encoder = _mock_encoder(pretrained=None)
    embed_nouns(encoder, ["cat"], cache_dir=tmp_path)
    embed_nouns(encoder, ["cat"], cache_dir=tmp_path)
    assert encoder.encode_texts.call_count == 2 and not any(tmp_path.iterdir())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMCLUST_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "nouns"
    monkeypatch.delenv("SEMCLUST_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "semclust", "nouns")
