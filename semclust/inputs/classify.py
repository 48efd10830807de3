"""What the user passed to `fit` / `predict`: features, a store, an embedding file, or images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .embeddings import load_embeddings
from .sources import IMAGE_EXTENSIONS, DatasetSource, ImageSource, list_images
from .store import EmbeddingStore, has_manifest, open_store

EMBEDDING_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


@dataclass
class Inputs:
    embeddings: Optional[Tensor]  # [N, D] when given as features
    # raw items when given as images / raw inputs; beside a store or embeddings, the images
    # their rows encode, one per row (a fit then encodes nothing and tunes on them in stage 2)
    source: Optional[Dataset]
    store: Optional[EmbeddingStore] = None  # an embedding store, read memory-mapped in chunks


# what fit / predict accept; an `Inputs` is what `as_inputs` already made of one of the others
InputLike = Union[Tensor, np.ndarray, str, os.PathLike, Sequence[Union[str, os.PathLike]], Dataset, Inputs]


def _features(t: Tensor) -> Tensor:
    # fp16 features stay fp16 (a store's precision, half the memory); others become float32
    return t if t.dtype == torch.float16 else t.float()


def as_inputs(x: InputLike) -> Inputs:
    """Classify what the user passed: features, a store, an embedding file, or images.

    Loads no model and decodes no image, so a bad input fails before any work; an `Inputs`
    is returned as it is, so a caller that checked early (the CLI) can pass the result on.
    """
    if isinstance(x, Inputs):
        return x
    if isinstance(x, EmbeddingStore):
        # opened by the caller, e.g. `open_store(path, allow_incomplete=True)` to fit the
        # rows an `embed` has written so far
        return Inputs(None, None, x)
    if isinstance(x, np.ndarray):
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"an array input must be float [N, D] embeddings, got {x.dtype} {x.shape}")
        return Inputs(_features(torch.from_numpy(np.ascontiguousarray(x))), None)
    if isinstance(x, Tensor):
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"a tensor input must be float [N, D] embeddings, got {x.dtype} {tuple(x.shape)}")
        return Inputs(_features(x.detach()), None)
    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if not p.exists():
            raise FileNotFoundError(f"input {str(p)!r} does not exist")
        # a manifest makes it a store, a damaged one too: open_store says what is wrong
        # instead of the folder being listed as images
        if p.is_dir() and has_manifest(p):
            return Inputs(None, None, open_store(p))
        if p.is_dir():
            return Inputs(None, ImageSource.from_folder(p))
        if p.suffix.lower() in EMBEDDING_SUFFIXES:
            return Inputs(load_embeddings(p), None)
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            return Inputs(None, ImageSource.from_paths([p]))
        # said now, not as one unreadable image after the CLIP model has loaded
        raise ValueError(f"unsupported input file {str(p)!r}: expected embeddings ({', '.join(EMBEDDING_SUFFIXES)}), "
                         f"an embedding store, an image folder or an image ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if isinstance(x, Dataset):
        return Inputs(None, x if hasattr(x, "items") else DatasetSource(x))
    if isinstance(x, (list, tuple)) and x and all(isinstance(e, (str, os.PathLike)) for e in x):
        return Inputs(None, ImageSource.from_paths(list_images(list(x))))
    raise TypeError(
        "input must be embeddings (array/tensor [N, D], .npy/.pt/.safetensors file, embedding store), "
        f"images (folder, list of paths, Dataset), got {type(x).__name__}"
    )
