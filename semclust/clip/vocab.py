"""The noun vocabulary: the shipped default list, a user file, or WordNet when installed.

`embed_nouns` encodes nouns with the CLIP text tower (prompt ensemble) and caches the
result on disk, keyed by everything that determines it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..runtime.files import atomic_save_tensors
from .encoder import TEMPLATES, TEXT_BATCH

if TYPE_CHECKING:
    from .encoder import ClipEncoder

log = logging.getLogger(__name__)

# timm ships the lemmas of all ImageNet-21k synsets: "n01443537<TAB>goldfish, Carassius auratus"
_TIMM_LEMMAS = ("_info", "imagenet_synset_to_lemma.txt")
_WORDNET_HELP = "pip install nltk (or semclust[wordnet]), then python -m nltk.downloader wordnet"
_CACHE_KEY = "embeddings"


def _dedupe(words: Iterable[str]) -> list[str]:
    """Strip, collapse inner whitespace, drop empties and case-insensitive repeats, keep order.

    Case is folded because CLIP's tokenizer lower-cases: "Apple" and "apple" embed alike.
    """
    seen: set[str] = set()
    out = []
    for word in words:
        word = " ".join(word.split())
        key = word.casefold()
        if word and key not in seen:
            seen.add(key)
            out.append(word)
    return out


@functools.lru_cache(maxsize=1)
def _default_nouns() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    text = resources.files("timm.data").joinpath(*_TIMM_LEMMAS).read_text(encoding="utf-8")
    lemmas = (line.split("\t", 1)[1].split(",", 1)[0] for line in text.splitlines() if "\t" in line)
    return tuple(_dedupe([*IMAGENET_CLASSNAMES, *lemmas]))


def default_nouns() -> list[str]:
    """The offline default vocabulary (~20k nouns): open_clip's ImageNet-1k class names,
    then the first lemma of every ImageNet-21k synset shipped with timm."""
    return list(_default_nouns())


def wordnet_nouns() -> list[str]:
    """All WordNet noun lemmas (~120k; underscores -> spaces). Needs nltk and its wordnet
    data; raises RuntimeError saying which is missing and how to install it."""
    try:
        from nltk.corpus import wordnet
    except ImportError as e:
        raise RuntimeError(f"wordnet nouns need nltk, which is not installed: {_WORDNET_HELP}") from e
    try:
        names = list(wordnet.all_lemma_names(pos="n"))
    except LookupError as e:
        raise RuntimeError(f"nltk is installed but its wordnet data is missing: {_WORDNET_HELP}") from e
    return _dedupe(name.replace("_", " ") for name in names)


def _read_noun_file(path: Path) -> list[str]:
    """One noun per line; `#` starts a comment; blank lines are ignored."""
    if not path.is_file():
        raise FileNotFoundError(f"noun file {path} does not exist")
    nouns = _dedupe(line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())
    if not nouns:
        raise ValueError(f"noun file {path} holds no nouns (only blank lines or comments)")
    return nouns


def load_nouns(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Resolve a vocabulary spec to a deduplicated list of nouns.

    spec: "default" (`default_nouns`), "wordnet" (`wordnet_nouns`), a path to a text file
    (one noun per line, `#` comments), or a sequence of strings.
    """
    if isinstance(spec, str) and spec == "default":
        return default_nouns()
    if isinstance(spec, str) and spec == "wordnet":
        return wordnet_nouns()
    if isinstance(spec, (str, os.PathLike)):
        return _read_noun_file(Path(spec).expanduser())
    words = list(spec)
    if not all(isinstance(w, str) for w in words):
        raise ValueError("a noun list must hold only strings")
    nouns = _dedupe(words)
    if not nouns:
        raise ValueError("the noun list is empty")
    return nouns


def default_cache_dir() -> Path:
    """$SEMCLUST_CACHE/nouns, else ~/.cache/semclust/nouns."""
    root = os.environ.get("SEMCLUST_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "semclust") / "nouns"


def _cache_key(encoder: "ClipEncoder", nouns: Sequence[str], templates: Sequence[str] | None) -> str:
    blob = json.dumps({
        "model": encoder.name,
        # the checkpoint's content when known: the same weights under another path share a key
        "weights": encoder.checkpoint_sha256 or encoder.pretrained,
        "templates": list(templates) if templates else None,
        "nouns": list(nouns),
    })
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _load_cached(file: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    try:
        tensor = load_file(file)[_CACHE_KEY]
    except (OSError, SafetensorError, KeyError) as e:
        log.warning("ignoring unreadable noun cache %s (%s)", file, e)
        return None
    if tuple(tensor.shape) != shape or tensor.dtype != torch.float32 or not torch.isfinite(tensor).all():
        log.warning("ignoring noun cache %s: holds %s %s, expected float32 %s",
                       file, tensor.dtype, tuple(tensor.shape), shape)
        return None
    return tensor


def _save_cached(file: Path, tensor: torch.Tensor, encoder: "ClipEncoder") -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(file, {_CACHE_KEY: tensor}, metadata={"model": encoder.name})


def embed_nouns(encoder: "ClipEncoder", nouns: Sequence[str], cache_dir: str | os.PathLike | None = None,
                batch_size: int = TEXT_BATCH, templates: Sequence[str] | None = TEMPLATES,
                progress: bool = False) -> torch.Tensor:
    """Nouns -> float32 [W, D] on CPU, L2-normalised (`ClipEncoder.encode_texts`), cached.

    The cache file (safetensors, written atomically) lives under `cache_dir` (default
    `default_cache_dir()`), keyed by sha256 of (model, weights, templates, nouns). An
    encoder with random weights is never cached: two such encoders differ.
    """
    nouns = list(nouns)
    if encoder.pretrained is None:
        return encoder.encode_texts(nouns, templates, batch_size, progress)
    file = Path(cache_dir or default_cache_dir()) / f"{_cache_key(encoder, nouns, templates)}.safetensors"
    shape = (len(nouns), encoder.dim)
    if file.is_file():
        cached = _load_cached(file, shape)
        if cached is not None:
            log.info("noun embeddings from cache %s", file)
            return cached
    embeddings = encoder.encode_texts(nouns, templates, batch_size, progress)
    _save_cached(file, embeddings, encoder)
    return embeddings
