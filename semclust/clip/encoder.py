"""open_clip image and text encoding: batched, normalised, streamed to an embedding store.

`ClipEncoder.load` builds an open_clip model from a registered name or a model-config
`.json`, with weights from an open_clip pretrained tag, a local checkpoint file (loaded
with `weights_only=True` or safetensors), or random weights (tests only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import open_clip
import open_clip.pretrained
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import nn
from torchvision import transforms as T
from tqdm.auto import tqdm

from ..config import ChunkConfig
from ..inputs.sources import ImageSource, SkipReport, check_batching, iter_batches
from ..inputs.store import DEFAULT_SHARD_ROWS, MANIFEST, EmbeddingStore, StoreWriter, check_same_model, open_store
from ..runtime.files import sha256_file

log = logging.getLogger(__name__)

# TAC's prompt ensemble for nouns (Image Clustering with External Guidance, ICML 2024)
TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
TEXT_BATCH = 1024
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".npy")
# weak view: resize to 256/224 of the crop (the usual ImageNet ratio), then a random crop
WEAK_RESIZE_RATIO = 256 / 224
# strong view: the SimCLR family of augmentations, with a milder crop scale floor
STRONG_CROP_SCALE = (0.3, 1.0)
STRONG_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
STRONG_JITTER_P = 0.8
STRONG_GRAY_P = 0.2
# offline, huggingface_hub retries a download for about a minute before it fails; one
# connect with this timeout answers "can the weights be fetched at all" first
HUB_PROBE_TIMEOUT_S = 2.0
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "on", "yes", "true")  # huggingface_hub's spelling of a true flag


class WeightsUnavailableError(RuntimeError):
    """An open_clip pretrained tag whose weights are not cached and cannot be downloaded."""


class EncodeResult(NamedTuple):
    """embeddings: float16 [n_kept, D] L2-normalised, CPU; kept: int64 [n_kept] source
    indices of those rows; skipped: the unreadable items with their reasons."""

    embeddings: torch.Tensor
    kept: torch.Tensor
    skipped: SkipReport


class EncodedBatch(NamedTuple):
    """One batch of `iter_encode_images`: embeddings float16 [b, D] (CPU, L2-normalised),
    kept int64 [b] source indices, skipped [(source index, reason)]."""

    embeddings: torch.Tensor
    kept: torch.Tensor
    skipped: list[tuple[int, str]]


class StoredEncoding(NamedTuple):
    """What `embed_to_store` returns: the store, and the items skipped by this run."""

    store: EmbeddingStore
    skipped: SkipReport


def _to_rgb(image: Image.Image) -> Image.Image:
    # a module-level function, not a lambda, so transforms pickle into DataLoader workers
    return image.convert("RGB")


def _resolve_model(name: str | os.PathLike) -> tuple[str, str]:
    """Return (recorded name, open_clip architecture name); registers `.json` configs."""
    text = os.fspath(name)
    if text.endswith(".json"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model config file {path} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {path} is not valid JSON: {e}") from e
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise ValueError(f"model config {path} lacks {missing}; an open_clip config needs "
                             "embed_dim, vision_cfg and text_cfg")
        # open_clip keys configs by file stem; registering makes create_model/get_tokenizer find it
        open_clip.add_model_config(path)
        return str(path.resolve()), path.stem
    if text not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {text!r}: see open_clip.list_models() for the "
                         "names, or pass the path of a model-config .json file")
    return text, text


def _resolve_pretrained(arch: str, pretrained: str | os.PathLike | None) -> tuple[str | None, Path | None]:
    """Return (open_clip tag or None, local checkpoint file or None)."""
    if pretrained is None:
        return None, None
    text = os.fspath(pretrained)
    path = Path(text).expanduser()
    if path.is_file():
        return None, path.resolve()
    if path.is_dir():
        raise ValueError(f"pretrained={text!r} is a directory; pass the checkpoint file inside it")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if text in tags:
        return text, None
    if os.sep in text or "/" in text or path.suffix in CHECKPOINT_SUFFIXES or not tags:
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    raise ValueError(f"unknown pretrained tag {text!r} for {arch}: known tags are {tags}, "
                     "or pass the path of a local checkpoint file")


def _weights_source(arch: str, tag: str) -> tuple[str | None, list[str], str]:
    """(Hugging Face repo id or None, file names open_clip tries there, download URL) of a tag,
    the way `open_clip.pretrained.download_pretrained` chooses: the hub when it has the tag
    and huggingface_hub is installed, else the plain URL."""
    cfg = open_clip.pretrained.get_pretrained_cfg(arch, tag)
    hub = cfg.get("hf_hub", "")
    if hub and open_clip.pretrained.has_hf_hub():
        repo, name = os.path.split(hub)
        name = name or open_clip.pretrained.HF_WEIGHTS_NAME
        # open_clip looks for a safetensors twin first
        safe = (open_clip.pretrained.HF_SAFE_WEIGHTS_NAME if name == open_clip.pretrained.HF_WEIGHTS_NAME
                else name[:-4] + ".safetensors" if name.endswith((".bin", ".pth")) else None)
        return repo, [n for n in (safe, name) if n], f"https://huggingface.co/{repo}"
    return None, [], cfg.get("url", "")


def _weights_cached(arch: str, tag: str) -> bool:
    """Whether open_clip would load the tag's weights from its local cache, no network needed."""
    cfg = open_clip.pretrained.get_pretrained_cfg(arch, tag)
    if "file" in cfg:
        return True
    repo, names, url = _weights_source(arch, tag)
    if repo is not None:
        from huggingface_hub import try_to_load_from_cache

        # a path when cached; None or a "known missing" marker otherwise
        return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def _probe_target(arch: str, tag: str) -> tuple[str, int]:
    """(host, port) the download would connect to first: the proxy when one is set (a
    direct connect fails behind it though the download would work), else the hub
    endpoint (HF_ENDPOINT, default huggingface.co) or the URL's host."""
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(v)), None)
    if proxy:
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    repo, _, url = _weights_source(arch, tag)
    if repo is not None:
        from huggingface_hub import constants

        url = constants.ENDPOINT
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)


def _unreachable(host: str, port: int, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why host:port cannot be connected to within `timeout` seconds, or None when it can.

    The connect runs in a daemon thread joined with the timeout: the socket timeout does
    not bound the DNS lookup, which can hang far longer on a machine without network.
    """
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{type(e).__name__}: {e}")

    probe = threading.Thread(target=connect, name="semclust-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def check_weights_reachable(arch: str, tag: str) -> None:
    """Raise WeightsUnavailableError, within a few seconds, when the weights of open_clip
    tag `tag` are neither cached nor downloadable (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE
    set, or no connection to the download host); the message says how to pass a local
    checkpoint instead."""
    if _weights_cached(arch, tag):
        return
    flag = next((v for v in OFFLINE_ENV if os.environ.get(v, "").strip().lower() in _TRUE), None)
    if flag is not None:
        why = f"{flag}={os.environ[flag]} is set and they are not in the local cache"
    else:
        host, port = _probe_target(arch, tag)
        problem = _unreachable(host, port)
        if problem is None:
            return
        why = f"{host}:{port} cannot be reached ({problem}) and they are not in the local cache"
    _, names, url = _weights_source(arch, tag)
    file = names[-1] if names else os.path.basename(url) or "open_clip_pytorch_model.bin"
    where = f" from {url}" if url else ""
    # the OpenAI weights need QuickGELU, which only the "-quickgelu" config builds from a file
    quick = (f" --clip {arch}-quickgelu" if open_clip.pretrained.get_pretrained_cfg(arch, tag).get("quick_gelu")
             and f"{arch}-quickgelu" in open_clip.list_models() else "")
    raise WeightsUnavailableError(
        f"cannot fetch the open_clip weights {arch}/{tag}: {why}; download {file}{where} on a machine with "
        f"network and pass its local file path:{quick} --pretrained /path/to/{file} (in Python: pretrained=PATH)")


def _create_model(arch: str, tag: str | None, file: Path | None, device: torch.device) -> nn.Module:
    if tag is not None:
        check_weights_reachable(arch, tag)
        try:
            return open_clip.create_model(arch, pretrained=tag, device=device)
        except Exception as e:
            raise RuntimeError(
                f"could not fetch the open_clip weights {arch}/{tag} ({e}); offline, download the "
                "checkpoint elsewhere and pass its local file path as pretrained=PATH") from e
    if file is not None:
        try:
            # open_clip loads with torch.load(weights_only=True), or safetensors by suffix
            return open_clip.create_model(arch, pretrained=str(file), device=device, weights_only=True)
        except Exception as e:
            raise ValueError(f"{file} is not a checkpoint for the open_clip model {arch}: {e}") from e
    log.warning("open_clip model %s has random weights: only for tests", arch)
    return open_clip.create_model(arch, device=device)


class ClipEncoder:
    """An open_clip model with its tokenizer and image preprocessing.

    Attributes: `model` (open_clip CLIP), `name` (as recorded in stores: the open_clip
    name, or the absolute path of the config .json), `arch` (open_clip registry name),
    `pretrained` (tag or absolute checkpoint path or None), `checkpoint_sha256` (of the
    local checkpoint file, else None), `dim` (embedding width D), `device`,
    `image_size` ((H, W) the model expects), `preprocess_cfg` (open_clip PreprocessCfg).
    """

    def __init__(self, model: nn.Module, name: str, arch: str, pretrained: str | None,
                 checkpoint_sha256: str | None, device: torch.device) -> None:
        self.model = model
        self.name = name
        self.arch = arch
        self.pretrained = pretrained
        self.checkpoint_sha256 = checkpoint_sha256
        self.device = device
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.dim = int(open_clip.get_model_config(arch)["embed_dim"])
        self.preprocess_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
        size = self.preprocess_cfg.size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.model.eval()

    @classmethod
    def load(cls, name: str | os.PathLike = "ViT-B-32", pretrained: str | os.PathLike | None = None,
             device: str | torch.device = "cpu") -> "ClipEncoder":
        """Build the encoder.

        name: an open_clip model name (`open_clip.list_models()`) or a path to a model-config
            `.json` (registered with open_clip under its file stem).
        pretrained: an open_clip pretrained tag (downloaded and cached by open_clip), a local
            checkpoint file, or None for random weights (tests only).
        Raises ValueError (unknown name/tag, a file that is not a checkpoint for this model),
        FileNotFoundError (missing config or checkpoint), RuntimeError (a tag that cannot be
        downloaded).
        """
        device = torch.device(device)
        recorded, arch = _resolve_model(name)
        tag, file = _resolve_pretrained(arch, pretrained)
        model = _create_model(arch, tag, file, device)
        digest = sha256_file(file) if file is not None else None
        return cls(model, recorded, arch, tag or (str(file) if file else None), digest, device)

    def __repr__(self) -> str:
        return (f"ClipEncoder(name={self.name!r}, pretrained={self.pretrained!r}, dim={self.dim}, "
                f"device={str(self.device)!r})")

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        # encoding runs in eval mode (no dropout, fixed norms); a caller in train mode
        # (stage 2 refreshing its pseudo-labels) gets its mode back
        was_training = self.model.training
        self.model.eval()
        try:
            # no_grad, not inference_mode: inference tensors cannot be saved for backward,
            # and these embeddings feed the heads' training
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16,
                                                 enabled=self.device.type == "cuda"):
                yield
        finally:
            self.model.train(was_training)

    # ---- images ---------------------------------------------------------------------

    @property
    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The model's own eval preprocessing: PIL -> float32 [3, H, W], normalised."""
        return image_transform_v2(self.preprocess_cfg, is_train=False)

    def iter_encode_images(self, source: ImageSource, batch_size: int = ChunkConfig.encode_batch_size,
                           num_workers: int = 0, progress: bool = True,
                           start: int = 0) -> Iterator[EncodedBatch]:
        """Encode source items [start, len(source)) batch by batch, in order, on the eval
        preprocessing. Unreadable items are skipped and reported per batch, never raised.
        """
        if not 0 <= start <= len(source):
            raise ValueError(f"start={start} is outside the source's {len(source)} items")
        for images, kept, skipped in iter_batches(source, self.eval_transform, batch_size, workers=num_workers,
                                                  indices=None if start == 0 else range(start, len(source)),
                                                  progress=progress, desc="encode images",
                                                  pin_memory=self.device.type == "cuda"):
            yield EncodedBatch(self._encode_batch(images), kept, skipped)

    def _encode_batch(self, images: torch.Tensor | None) -> torch.Tensor:
        """[B, 3, H, W] preprocessed (or None) -> float16 [B, D] on CPU, L2-normalised."""
        if images is None:
            return torch.empty((0, self.dim), dtype=torch.float16)
        # eval/no_grad per batch, never across a yield: the caller's code between batches
        # must run in its own grad mode
        with self._evaluating():
            features = self.model.encode_image(images.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1).to("cpu", torch.float16)

    def encode_images(self, source: ImageSource, batch_size: int = ChunkConfig.encode_batch_size,
                      num_workers: int = 0, progress: bool = True) -> EncodeResult:
        """Encode every item of `source` in memory; see `iter_encode_images`."""
        parts, kept, report = [], [], SkipReport()
        for batch in self.iter_encode_images(source, batch_size, num_workers, progress):
            parts.append(batch.embeddings)
            kept.append(batch.kept)
            report.update(source.items, batch.kept, batch.skipped)
        if report.count:
            log.warning("%s", report)
        embeddings = torch.cat(parts) if parts else torch.empty((0, self.dim), dtype=torch.float16)
        return EncodeResult(embeddings, torch.cat(kept) if kept else torch.empty(0, dtype=torch.long), report)

    def embed_to_store(self, source: ImageSource, out_dir: str | os.PathLike,
                       batch_size: int = ChunkConfig.encode_batch_size, num_workers: int = 0,
                       progress: bool = True, shard_rows: int = DEFAULT_SHARD_ROWS) -> StoredEncoding:
        """Encode `source` into the store at `out_dir`, resuming an interrupted run.

        The store holds only readable images (items = their ids); its manifest records how
        many source items were consumed, so a resumed run restarts after the last stored
        row. `skipped` covers this run only. A store of another model raises ValueError.
        The options are checked, and a new store is created only at the first readable
        image: bad options or a source with no readable image raise ValueError and leave
        nothing on disk.
        """
        check_batching(batch_size, num_workers)
        out_dir = Path(out_dir)
        writer = None
        if (out_dir / MANIFEST).exists():
            meta = check_same_model(out_dir, self.name, self.pretrained, self.checkpoint_sha256, self.dim)
            if meta["complete"]:
                log.info("the store at %s is already complete (%d rows)", out_dir, meta["count"])
                return StoredEncoding(open_store(out_dir, verify=False), SkipReport())
            writer = self._open_writer(out_dir, shard_rows)
            self._check_resume(writer, source)
        report = SkipReport()
        for batch in self.iter_encode_images(source, batch_size, num_workers, progress,
                                             start=0 if writer is None else writer.source_consumed):
            report.update(source.items, batch.kept, batch.skipped)
            if not len(batch.kept):
                continue
            if writer is None:  # created at the first readable image: see the doc
                writer = self._open_writer(out_dir, shard_rows)
            writer.append(batch.embeddings, [source.items[i] for i in batch.kept.tolist()], batch.kept)
        if writer is None or writer.count == 0:
            where = getattr(source, "root", None) or f"the {len(source)} items given"
            raise ValueError(f"no readable images in {where}: {report}")
        writer.close(source_consumed=len(source))
        if report.count:
            log.warning("skipped %d unreadable images: %s", report.count, report)
        return StoredEncoding(open_store(out_dir, verify=False), report)

    def _open_writer(self, out_dir: Path, shard_rows: int) -> StoreWriter:
        return StoreWriter(out_dir, self.name, self.pretrained, self.checkpoint_sha256, self.dim, shard_rows)

    @staticmethod
    def _check_resume(writer: StoreWriter, source: ImageSource) -> None:
        if writer.done_rows == 0:
            return
        # the last stored row came from source item source_consumed - 1 (see StoreWriter)
        consumed = writer.source_consumed
        last = open_store(writer.path, verify=False, allow_incomplete=True).items[-1]
        if consumed > len(source) or source.items[consumed - 1] != last:
            raise ValueError(f"the incomplete store at {writer.path} was written from another source "
                             f"(its row {writer.done_rows - 1} is {last!r}); use another output directory")
        log.info("resuming at source item %d of %d", consumed, len(source))

    # ---- stage-2 fine-tuning ------------------------------------------------------------

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, D] L2-normalised features, differentiable.

        Runs in whatever mode (train/eval) and grad context the caller set.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        return F.normalize(self.model.encode_image(images.to(self.device)), dim=-1)

    def tail_parameters(self, n_blocks: int) -> list[nn.Parameter]:
        """Freeze the whole model, then unfreeze the vision tower's last `n_blocks`
        transformer blocks plus everything after them (attention pooling, final layer norm,
        projection). Returns the trainable parameters, for the optimiser."""
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            raise TypeError(f"tail_parameters needs open_clip's VisionTransformer (transformer.resblocks); "
                            f"{self.arch} has a {type(visual).__name__} vision tower")
        blocks = visual.transformer.resblocks
        if not 0 <= n_blocks <= len(blocks):
            raise ValueError(f"n_blocks must be in [0, {len(blocks)}] for {self.arch}, got {n_blocks}")
        self.model.requires_grad_(False)
        tail: list[nn.Module] = list(blocks[len(blocks) - n_blocks:])
        tail += [m for m in (visual.attn_pool, getattr(visual, "attn_pool_contrastive", None), visual.ln_post)
                 if m is not None]
        for module in tail:
            module.requires_grad_(True)
        if visual.proj is not None:
            visual.proj.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    def view_transform(self, kind: str) -> Callable[[Image.Image], torch.Tensor]:
        """PIL -> float32 [3, H, W] normalised with the model's mean/std.

        kind: "eval" (the model's preprocessing), "weak" (resize, random crop, flip) or
        "strong" (random resized crop with scale 0.3-1, flip, colour jitter, grayscale).
        """
        cfg = self.preprocess_cfg
        bicubic = cfg.interpolation == "bicubic"
        interpolation = T.InterpolationMode.BICUBIC if bicubic else T.InterpolationMode.BILINEAR
        finish = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
        if kind == "eval":
            return self.eval_transform
        if kind == "weak":
            resize = round(min(self.image_size) * WEAK_RESIZE_RATIO)
            return T.Compose([_to_rgb, T.Resize(resize, interpolation=interpolation),
                              T.RandomCrop(self.image_size, pad_if_needed=True),
                              T.RandomHorizontalFlip(), *finish])
        if kind == "strong":
            return T.Compose([_to_rgb,
                              T.RandomResizedCrop(self.image_size, scale=STRONG_CROP_SCALE,
                                                  interpolation=interpolation),
                              T.RandomHorizontalFlip(),
                              T.RandomApply([T.ColorJitter(*STRONG_JITTER)], p=STRONG_JITTER_P),
                              T.RandomGrayscale(p=STRONG_GRAY_P), *finish])
        raise ValueError(f"kind must be 'eval', 'weak' or 'strong', got {kind!r}")

    # ---- text ---------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str], templates: Sequence[str] | None = TEMPLATES,
                     batch_size: int = TEXT_BATCH, progress: bool = False) -> torch.Tensor:
        """Texts -> float32 [W, D] on CPU, L2-normalised.

        Each text fills every template ("{}" marks the slot); the normalised text features
        of its prompts are averaged and re-normalised (TAC's prompt ensemble). templates=None
        encodes the texts as they are.
        """
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty sequence of strings")
        templates = list(templates) if templates else ["{}"]
        bad = [t for t in templates if "{}" not in t]
        if bad:
            raise ValueError(f"templates must contain '{{}}' where the text goes: {bad}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # chunk whole texts so that one forward pass holds about batch_size prompts
        per_chunk = max(1, batch_size // len(templates))
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        with self._evaluating():
            for start in tqdm(range(0, len(texts), per_chunk), desc="encode texts", disable=not progress):
                chunk = texts[start:start + per_chunk]
                # replace, not str.format: a text may contain braces
                prompts = [template.replace("{}", text) for text in chunk for template in templates]
                tokens = self.tokenizer(prompts).to(self.device)
                features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
                mean = features.view(len(chunk), len(templates), -1).mean(dim=1)
                out[start:start + len(chunk)] = F.normalize(mean, dim=-1).cpu()
        return out
