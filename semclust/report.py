"""`semclust report`: one self-contained HTML page about a fitted run.

The page needs nothing at view time: thumbnails are base64 JPEGs, plots hand-written
inline SVG (the confusion matrix an embedded PNG heatmap inside one), and the template
(`templates/report.html.j2`) carries its own CSS. It stays small and opens fast for
K = 1000 clusters and N = 1M rows because nothing in it grows with N: per-cluster
statistics are numpy bincounts over row chunks, thumbnails are a sample (at most
`per_cluster` per cluster and `MAX_THUMBNAILS` in all: the most and the least confident
members), and every histogram is one SVG path.

The labels and confidences are the ones the fit saved in the run directory (the
`semclust-model/1` format always holds them), so no model is built and no CLIP weights
are needed. Images, when given, must be the input the run was fitted on, in its order:
the image folder, or an embedding store whose rows name image files.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import jinja2
import numpy as np
from markupsafe import Markup, escape
from PIL import Image

from . import model as fitted
from .inputs.embeddings import load_labels
from .inputs.sources import list_images
from .inputs.store import is_store, open_store
from .metrics import evaluate, match_clusters
from .runtime.files import atomic_write

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

PER_CLUSTER = 8
MAX_THUMBNAILS = 2000
THUMB_PX = 64
HIST_BINS = 20
CHUNK_ROWS = 1 << 20
# beyond this many cells (e.g. 2000 classes x 2000 clusters) the confusion heatmap would
# be unreadable and its table large; the metrics are still shown
MAX_CONFUSION_CELLS = 4_000_000
# counts are written into the heatmap's cells only where they stay legible
MAX_ANNOTATED = 30
# history entries shown as plots or tables of their own, not in the summary table
_HISTORY_SHOWN = ("stage1", "stage2", "seconds", "phases")


@dataclass
class ClusterStats:
    sizes: np.ndarray  # [K] int64 members (unreadable rows, label -1, belong to none)
    mean_conf: np.ndarray  # [K] float64, NaN for an empty cluster
    hist: np.ndarray  # [K, HIST_BINS] int64 confidences binned over [0, 1]


@dataclass
class Summary:
    """What `write_report` wrote, for the command's one line."""
    path: Path
    clusters: int
    rows: int
    thumbnails: int


def cluster_stats(labels: np.ndarray, conf: np.ndarray, k: int, bins: int = HIST_BINS,
                  chunk: int = CHUNK_ROWS) -> ClusterStats:
    """Sizes, mean confidence and confidence histograms of the K clusters, one row chunk
    at a time so temporaries stay bounded by `chunk` however large N is."""
    sizes = np.zeros(k, np.int64)
    sums = np.zeros(k, np.float64)
    hist = np.zeros(k * bins, np.int64)
    for s in range(0, len(labels), chunk):
        lab, c = labels[s:s + chunk], conf[s:s + chunk]
        ok = lab >= 0
        lab, c = lab[ok], np.nan_to_num(c[ok].astype(np.float64))
        sizes += np.bincount(lab, minlength=k)
        sums += np.bincount(lab, weights=c, minlength=k)
        # a confidence of exactly 1 belongs to the last bin, not one past it
        b = np.clip((c * bins).astype(np.int64), 0, bins - 1)
        hist += np.bincount(lab * bins + b, minlength=k * bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(sizes > 0, sums / sizes, np.nan)
    return ClusterStats(sizes, mean, hist.reshape(k, bins))


def thumbnail_quota(sizes: np.ndarray, per_cluster: int = PER_CLUSTER, total: int = MAX_THUMBNAILS) -> np.ndarray:
    """[K] how many thumbnails each cluster gets: the same number for every non-empty
    cluster within `total`; with more clusters than `total`, one each for the largest."""
    nonempty = int((sizes > 0).sum())
    quota = np.zeros(len(sizes), np.int64)
    if nonempty == 0 or total <= 0:
        return quota
    each = min(per_cluster, total // nonempty)
    if each > 0:
        quota[sizes > 0] = each
    else:
        quota[np.argsort(-sizes, kind="stable")[:total]] = 1
    return np.minimum(quota, sizes)


def pick_samples(labels: np.ndarray, conf: np.ndarray, quota: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{cluster: (rows of its most confident members, most first; rows of its least
    confident, least first)}, half of its quota each (the odd one to the most). One
    sort of all N rows (an int64 index, 8 MB a million rows) serves every cluster."""
    k = len(quota)
    order = np.lexsort((-conf, labels))  # by cluster, then by falling confidence
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    starts = int((labels < 0).sum()) + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    picked = {}
    for c in np.flatnonzero(quota):
        members = order[starts[c]:starts[c] + sizes[c]]
        n_most = (int(quota[c]) + 1) // 2
        n_least = int(quota[c]) - n_most
        picked[int(c)] = (members[:n_most], members[len(members) - n_least:][::-1])
    return picked


def image_items(images: PathLike) -> list[str]:
    """The image file of every row of the run's input: an image folder (in the order the
    fit read it) or an embedding store (the paths its rows were encoded from)."""
    if is_store(images):
        return list(open_store(images, verify=False).items)
    return [str(p) for p in list_images(images)]


def _thumbnail(path: str, px: int) -> Optional[str]:
    try:
        with Image.open(path) as im:
            # JPEG decodes straight at 1/2 .. 1/8 scale: large photos cost little
            im.draft("RGB", (px, px))
            small = im.convert("RGB")
        small.thumbnail((px, px))
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=60, optimize=True)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        log.debug("report: no thumbnail of %s (%s)", path, e)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnails(paths: Sequence[str], px: int = THUMB_PX) -> list[Optional[str]]:
    """Data URIs of the images (None where one cannot be read), decoded on a few threads
    (PIL releases the GIL while it decodes)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        uris = list(pool.map(lambda p: _thumbnail(p, px), paths))
    missing = [p for p, u in zip(paths, uris) if u is None]
    if missing:
        log.warning("report: %d of %d sampled images could not be read (e.g. %s); their tiles are left blank",
                    len(missing), len(paths), missing[0])
    return uris


# ---- plots (inline SVG) -----------------------------------------------------------------

def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def histogram_svg(counts: np.ndarray, width: int = 240, height: int = 64, label: str = "confidence") -> Markup:
    """Bars of `counts` over [0, 1] as one path (a thousand of these stay light)."""
    plot_h = height - 14
    top = max(int(counts.max()), 1)
    step = width / len(counts)
    bars = "".join(f"M{_num(i * step)} {plot_h}v-{_num(plot_h * n / top)}h{_num(step * 0.9)}V{plot_h}z"
                   for i, n in enumerate(counts.tolist()) if n)
    title = f"{label} histogram over [0, 1], {len(counts)} bins; tallest bin {top}"
    return Markup(
        f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
        f"<title>{escape(title)}</title><path d=\"{bars}\" class=\"bar\"/>"
        f'<line x1="0" y1="{plot_h}" x2="{width}" y2="{plot_h}" class="axis"/>'
        f'<text x="0" y="{height - 2}">0</text><text x="{width}" y="{height - 2}" text-anchor="end">1</text>'
        f'<text x="{width / 2}" y="{height - 2}" text-anchor="middle">{escape(label)}</text></svg>')


def sizes_svg(sizes: np.ndarray, width: int = 800, height: int = 160) -> Markup:
    """Cluster sizes, largest first, as one path of bars."""
    plot_h = height - 16
    ordered = np.sort(sizes)[::-1]
    top = max(int(ordered[0]) if len(ordered) else 0, 1)
    step = width / max(len(ordered), 1)
    bars = "".join(f"M{_num(i * step)} {plot_h}v-{_num(plot_h * n / top)}h{_num(max(step * 0.85, 0.5))}V{plot_h}z"
                   for i, n in enumerate(ordered.tolist()) if n)
    return Markup(
        f'<svg class="sizes" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
        f"<title>cluster sizes, largest first (largest {top})</title><path d=\"{bars}\" class=\"bar\"/>"
        f'<line x1="0" y1="{plot_h}" x2="{width}" y2="{plot_h}" class="axis"/>'
        f'<text x="0" y="10">{top}</text>'
        f'<text x="{width / 2}" y="{height - 2}" text-anchor="middle">{len(sizes)} clusters, largest first</text></svg>')


def curve_svg(values: Sequence[float], label: str, width: int = 360, height: int = 120) -> Markup:
    """A training curve (one value per epoch) as a polyline with its range."""
    plot_h = height - 16
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    span = hi - lo or 1.0
    step = width / max(len(v) - 1, 1)
    points = " ".join(f"{_num(i * step)},{_num(2 + (plot_h - 4) * (hi - x) / span)}" for i, x in enumerate(v.tolist())
                      if math.isfinite(x))
    return Markup(
        f'<svg class="curve" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
        f"<title>{escape(label)} per epoch: {lo:.4g} .. {hi:.4g}</title>"
        f'<polyline points="{points}" class="line"/>'
        f'<line x1="0" y1="{plot_h}" x2="{width}" y2="{plot_h}" class="axis"/>'
        f'<text x="2" y="10">{hi:.4g}</text><text x="2" y="{plot_h - 3}">{lo:.4g}</text>'
        f'<text x="{width / 2}" y="{height - 2}" text-anchor="middle">{escape(label)}, {len(v)} epochs</text></svg>')


# ---- ground truth ----------------------------------------------------------------------------

@dataclass
class Confusion:
    table: np.ndarray  # [C, K] counts, rows and columns in Hungarian order (matched pairs on the diagonal)
    classes: np.ndarray  # [C] class ids of the rows
    clusters: np.ndarray  # [K] cluster ids of the columns


def confusion(truth: np.ndarray, pred: np.ndarray, k: int, mapping: dict[int, int]) -> Optional[Confusion]:
    """Classes x clusters counts ordered so the Hungarian pairs lie on the diagonal (the
    unmatched ones after them); None when it would exceed `MAX_CONFUSION_CELLS`."""
    classes, t = np.unique(truth, return_inverse=True)
    if len(classes) * k > MAX_CONFUSION_CELLS:
        return None
    table = np.zeros(len(classes) * k, np.int64)
    for s in range(0, len(t), CHUNK_ROWS):
        table += np.bincount(t[s:s + CHUNK_ROWS] * k + pred[s:s + CHUNK_ROWS], minlength=len(classes) * k)
    table = table.reshape(len(classes), k)
    pairs = sorted(mapping.items(), key=lambda cc: cc[1])
    rows = [int(np.searchsorted(classes, cls)) for _, cls in pairs]
    cols = [c for c, _ in pairs]
    rows += sorted(set(range(len(classes))) - set(rows))
    cols += sorted(set(range(k)) - set(cols))
    return Confusion(table[np.ix_(rows, cols)], classes[rows], np.asarray(cols))


def confusion_svg(cm: Confusion, size: int = 640) -> Markup:
    """The row-normalised matrix as a PNG heatmap (one pixel a cell, so a 1000 x 1000
    matrix is one small image, not a million SVG elements), counts written in when small."""
    c, k = cm.table.shape
    share = cm.table / np.maximum(cm.table.sum(1, keepdims=True), 1)
    dark = np.array([8, 48, 107], np.float64)
    rgb = (255 - share[..., None] * (255 - dark)).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "PNG", optimize=True)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    margin = 40
    cell = min(32.0, size / max(c, k))  # a few classes get legible cells, not a 640-pixel block each
    w, h = cell * k, cell * c
    # wide enough for the axis title even when the matrix is a few cells
    view_w, view_h = _num(max(w, 180) + margin), _num(max(h, 60) + margin)
    parts = [f'<svg class="confusion" viewBox="0 0 {view_w} {view_h}" width="{view_w}" height="{view_h}" role="img">'
             f"<title>confusion matrix: {c} classes (rows) x {k} clusters (columns), Hungarian order, "
             "each row normalised</title>"
             f'<image x="{margin}" y="{margin}" width="{_num(w)}" height="{_num(h)}" preserveAspectRatio="none" '
             f'href="{uri}" style="image-rendering: pixelated"/>'
             f'<text x="{margin}" y="12">clusters (Hungarian order) &#8594;</text>'
             f'<text x="8" y="{margin}" transform="rotate(90 8 {margin})">classes &#8594;</text>']
    if c <= MAX_ANNOTATED and k <= MAX_ANNOTATED:
        for j, cluster in enumerate(cm.clusters.tolist()):
            parts.append(f'<text x="{_num(margin + (j + .5) * cell)}" y="{margin - 4}" text-anchor="middle">{cluster}</text>')
        for i, cls in enumerate(cm.classes.tolist()):
            y = _num(margin + (i + .5) * cell)
            parts.append(f'<text x="{margin - 4}" y="{y}" text-anchor="end" dominant-baseline="middle">{cls}</text>')
            for j, n in enumerate(cm.table[i].tolist()):
                if n:
                    dark_cell = ' class="on-dark"' if share[i, j] > 0.5 else ""
                    parts.append(f'<text x="{_num(margin + (j + .5) * cell)}" y="{y}" text-anchor="middle" '
                                 f'dominant-baseline="middle"{dark_cell}>{n}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


# ---- the page ---------------------------------------------------------------------------------

def _cluster_names(meta: dict[str, Any], k: int) -> list[str]:
    """Names per cluster from the optional `cluster_names` (K strings or K lists of
    strings); anything else is ignored with a warning: it only labels the page."""
    names = meta.get("cluster_names")
    if names is None:
        return [""] * k
    ok = isinstance(names, list) and len(names) == k and all(
        isinstance(n, str) or isinstance(n, list) and all(isinstance(w, str) for w in n) for n in names)
    if not ok:
        log.warning("report: field cluster_names of the run is not %d strings or lists of strings; not shown", k)
        return [""] * k
    return [n if isinstance(n, str) else ", ".join(n) for n in names]


def _compact(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _phases(history: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the per-phase table: `phases` rows, else the `seconds` map."""
    rows = history.get("phases")
    if not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        seconds = history.get("seconds")
        rows = [{"phase": p, "seconds": s} for p, s in seconds.items()] if isinstance(seconds, dict) else []
    cols = list(dict.fromkeys(key for r in rows for key in r))

    def cell(x: Any) -> str:
        return f"{x:.1f}" if isinstance(x, float) else _compact(x)

    return cols, [[cell(r.get(c, "")) for c in cols] for r in rows]


def _curves(history: dict[str, Any]) -> list[Markup]:
    """Loss per epoch of each stage whose history rows carry one."""
    out = []
    for stage in ("stage1", "stage2"):
        rows = history.get(stage)
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            continue
        key = "total" if "total" in rows[0] else "loss"
        values = [r.get(key) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out.append(curve_svg(values, f"{stage} {key} loss" if key == "total" else f"{stage} loss"))
    return out


def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("semclust", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")


def write_report(run: PathLike, out: PathLike, *, images: Optional[PathLike] = None, labels: Optional[PathLike] = None,
                 per_cluster: int = PER_CLUSTER, max_thumbnails: int = MAX_THUMBNAILS) -> Summary:
    """Write the report of run directory `run` to `out` (atomically). `images`: the
    run's input (folder or store) for thumbnails; `labels`: ground truth for ACC / NMI /
    ARI and the confusion matrix. ValueError for a run, images or labels that do not
    fit together."""
    loaded = fitted.read(run)
    meta = loaded.meta
    k = int(meta["params"]["n_clusters"])
    pred = loaded.tensors["labels"].numpy().astype(np.int64, copy=False)
    conf = loaded.tensors["confidences"].numpy()
    if len(pred) and (pred.min() < -1 or pred.max() >= k):
        raise ValueError(f"invalid model file {loaded.path}: its labels lie in [{pred.min()}, {pred.max()}], "
                         f"outside [-1, {k - 1}]")
    items = image_items(images) if images is not None else None
    if items is not None and len(items) != len(pred):
        raise ValueError(f"--images has {len(items)} images but the run labelled {len(pred)} rows: give the input "
                         "the run was fitted on")
    truth = load_labels(labels) if labels is not None else None
    if truth is not None and len(truth) != len(pred):
        raise ValueError(f"--labels has {len(truth)} entries but the run labelled {len(pred)} rows")

    stats = cluster_stats(pred, conf, k)
    names = _cluster_names(meta, k)
    samples = pick_samples(pred, conf, thumbnail_quota(stats.sizes, per_cluster, max_thumbnails)) if items else {}
    rows = [int(r) for most, least in samples.values() for r in (*most, *least)]
    uris = dict(zip(rows, thumbnails([items[r] for r in rows]))) if items else {}

    def tiles(idx: np.ndarray) -> list[dict[str, Any]]:
        return [{"uri": uris[int(r)], "row": int(r), "conf": float(conf[r]), "name": Path(items[r]).name}
                for r in idx]

    metrics, matrix, matched = None, None, {}
    ok = pred >= 0
    if truth is not None and ok.any():
        t, p = truth[ok], pred[ok]
        metrics = evaluate(t, p) | {"rows": int(ok.sum())}
        mapping = match_clusters(t, p)
        cm = confusion(t, p, k, mapping)
        matrix = confusion_svg(cm) if cm is not None else None
        # share of each matched cluster's members that are of its class
        target = np.full(k, -1, np.int64)
        target[list(mapping)] = list(mapping.values())
        hits = np.bincount(p[t == target[p]], minlength=k)
        matched = {c: (cls, hits[c] / max(stats.sizes[c], 1)) for c, cls in mapping.items()}

    clusters = []
    for c in range(k):
        most, least = samples.get(c, (np.empty(0, np.int64), np.empty(0, np.int64)))
        clusters.append({
            "id": c, "name": names[c], "size": int(stats.sizes[c]),
            "share": stats.sizes[c] / max(int(ok.sum()), 1),
            "mean_conf": None if stats.sizes[c] == 0 else float(stats.mean_conf[c]),
            "hist": histogram_svg(stats.hist[c]) if stats.sizes[c] else None,
            "most": tiles(most), "least": tiles(least), "matched": matched.get(c),
        })
    history = meta.get("history") or {}
    phase_cols, phase_rows = _phases(history)
    nonempty = stats.sizes[stats.sizes > 0]
    html = _template().render(
        run=str(run), mode=meta["mode"], dim=meta["dim"], k=k, n=len(pred), unreadable=int((~ok).sum()),
        empty=int((stats.sizes == 0).sum()), size_min=int(nonempty.min()) if len(nonempty) else 0,
        size_median=int(np.median(nonempty)) if len(nonempty) else 0,
        size_max=int(nonempty.max()) if len(nonempty) else 0,
        mean_conf=float(np.nan_to_num(conf[ok]).mean()) if ok.any() else None,
        sizes_plot=sizes_svg(stats.sizes), conf_plot=histogram_svg(stats.hist.sum(0), width=480, height=90),
        has_images=items is not None, thumbnails=len(rows),
        metrics=metrics, confusion=matrix, confusion_skipped=metrics is not None and matrix is None,
        max_cells=MAX_CONFUSION_CELLS,
        params={key: _compact(v) for key, v in meta["params"].items()},
        config={section: {key: _compact(v) for key, v in values.items()} for section, values in loaded.config.to_dict().items()},
        fit_summary={key: _compact(v) for key, v in history.items() if key not in _HISTORY_SHOWN},
        phase_cols=phase_cols, phase_rows=phase_rows, curves=_curves(history), clusters=clusters,
    )
    blob = html.encode("utf-8")
    atomic_write(Path(out), lambda f: f.write(blob))
    return Summary(Path(out), k, len(pred), len(rows))
