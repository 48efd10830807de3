"""`semclust report`: the statistics it is built from, the HTML it writes (one section per
cluster, nothing fetched from the network), the page in a real headless Chromium, and a
K = 1000, N = 200k report that stays small and quick."""

from __future__ import annotations

import json
import os
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_fixtures import (TINY_CLIP_CONFIG, save_checkpoint, tiny_encoder, torch_single_thread,
                           write_colour_classes)
from semclust import model as fitted
from semclust.cli import main
from semclust.config import Config
from semclust.inputs.sources import ImageSource
from semclust.inputs.store import StoreWriter
from semclust.method.heads import Heads
from semclust.report import cluster_stats, image_items, pick_samples, thumbnail_quota

__all__ = ["torch_single_thread"]  # fixture used below
pytestmark = pytest.mark.usefixtures("torch_single_thread")

PER_CLASS = 8
# a uniform balance prior keeps the tiny fit from collapsing, so every cluster has members
SMALL_CONFIG = {
    "stage1": {"epochs": 10, "batch_size": 16, "hidden": 32, "balance": "fixed"},
    "neighbours": {"k": 5},
    "semantic": {"kmeans_restarts": 1, "kmeans_iters": 10},
    "chunks": {"encode_batch_size": 16},
}
SCREENSHOT = Path("/tmp/report_screenshot.png")
BIG_K, BIG_N = 1000, 200_000


class Page(HTMLParser):
    """The parts of a report the tests read: cluster sections, images, every src/href."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and "cluster" in (a.get("class") or "").split():
            self.sections.append(a.get("id") or "")
        if tag == "img":
            self.images.append(a.get("src") or "")
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def synthetic_run(path: Path, labels: np.ndarray, conf: np.ndarray, k: int, meta: dict | None = None) -> Path:
    """A model directory holding `labels` and `confidences` as a fit would (heads of random
    weights: a report never runs the model); `meta` adds fields to its semclust.json."""
    dim = 8
    model = fitted.Stage1Model(Heads(dim, k, 16), torch.randn(4, dim), Config())
    params = {"n_clusters": k, "stage": 1, "seed": 0, "clip": None, "pretrained": None, "custom_encoder": None}
    history = {"seconds": {"kmeans": 0.5, "stage1": 2.0}, "stage1": [{"epoch": e, "total": 3.0 - e / 10} for e in range(10)]}
    fitted.save(path, model, params=params, dim=dim, history=history, cluster_centers=np.zeros((k, dim), np.float32),
                labels=labels, confidences=conf)
    if meta:
        cfile = path / fitted.CONFIG_FILE
        cfile.write_text(json.dumps(json.loads(cfile.read_text()) | meta))
    return path


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A stage-1 fit of the tiny random CLIP on 3 colour classes of PNGs (plus one file
    that is no image, so one row is unreadable), and the classes as ground truth."""
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    write_colour_classes(images, PER_CLASS)
    (images / "class_1" / "fake.png").write_bytes(b"this is not an image")
    save_checkpoint(tiny_encoder(seed=1), root / "tiny.pt")
    (root / "words.txt").write_text("cat\ndog\ncar\ntree\nhouse\nbird\nfish\nboat\nplane\nflower\n")
    (root / "small.json").write_text(json.dumps(SMALL_CONFIG))
    rc = main(["fit", str(images), "-k", "3", "--out", str(root / "run"), "--stage", "1", "--nouns",
               str(root / "words.txt"), "--config", str(root / "small.json"), "--clip", str(TINY_CLIP_CONFIG),
               "--pretrained", str(root / "tiny.pt"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    truth = np.array([int(Path(p).parent.name.split("_")[1]) for p in ImageSource.from_folder(images).items])
    np.save(root / "truth.npy", truth)
    return root


@pytest.fixture(scope="module")
def big_report(tmp_path_factory) -> tuple[Path, float]:
    """The report of an embeddings-only run of K = 1000 clusters and N = 200k rows with
    ground truth (70% agreeing with the clusters), and the seconds it took."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, BIG_K, BIG_N)
    labels[:100] = -1
    truth = np.where(rng.random(BIG_N) < 0.7, np.maximum(labels, 0), rng.integers(0, BIG_K, BIG_N))
    np.save(root / "truth.npy", truth)
    run = synthetic_run(root / "run", labels, rng.beta(5, 2, BIG_N).astype(np.float32), BIG_K)
    t0 = time.perf_counter()
    assert main(["report", str(run), "--labels", str(root / "truth.npy"), "--out", str(root / "big.html")]) == 0
    return root / "big.html", time.perf_counter() - t0


@pytest.fixture(scope="module")
def image_report(image_run):
    out = image_run / "report.html"
    rc = main(["report", str(image_run / "run"), "--images", str(image_run / "images"), "--labels",
               str(image_run / "truth.npy"), "--out", str(out)])
    assert rc == 0
    return out


# ---- the statistics ---------------------------------------------------------------------

def test_cluster_stats_match_a_direct_count_across_chunks():
    rng = np.random.default_rng(1)
    k, n, bins = 5, 103, 10
    labels = rng.integers(-1, k, n)
    labels[labels == 3] = 4  # an empty cluster
    conf = rng.random(n).astype(np.float32)
    conf[:3] = 1.0  # the top edge belongs to the last bin
    s = cluster_stats(labels, conf, k, bins=bins, chunk=7)
    for c in range(k):
        members = conf[labels == c].astype(np.float64)
        assert s.sizes[c] == len(members)
        expected = np.histogram(members, bins=bins, range=(0, 1))[0]
        np.testing.assert_array_equal(s.hist[c], expected)
        if len(members):
            assert s.mean_conf[c] == pytest.approx(members.mean())
        else:
            assert np.isnan(s.mean_conf[c])


def test_thumbnail_quota_stays_within_the_total():
    sizes = np.array([0, 1, 50, 50, 50])
    np.testing.assert_array_equal(thumbnail_quota(sizes, per_cluster=8, total=2000), [0, 1, 8, 8, 8])
    np.testing.assert_array_equal(thumbnail_quota(sizes, per_cluster=8, total=8), [0, 1, 2, 2, 2])
    # more clusters than thumbnails: one each for the largest
    many = np.arange(3000)
    quota = thumbnail_quota(many, per_cluster=8, total=2000)
    assert quota.sum() == 2000 and quota[-2000:].all() and not quota[:1000].any()


def test_samples_are_the_most_and_least_confident_members():
    labels = np.array([0, 1, 0, 0, -1, 0, 1, 0])
    conf = np.array([0.5, 0.9, 0.8, 0.1, 1.0, 0.7, 0.2, 0.3])
    picked = pick_samples(labels, conf, np.array([4, 1]))
    most, least = picked[0]
    assert most.tolist() == [2, 5] and least.tolist() == [3, 7]  # most first / least first
    assert picked[1][0].tolist() == [1] and picked[1][1].tolist() == []


def test_image_items_of_a_store_are_its_row_paths(tmp_path):
    paths = [str(tmp_path / f"img_{i}.png") for i in range(3)]
    with StoreWriter(tmp_path / "store", model="tiny", pretrained=None, checkpoint_sha256=None, dim=4) as w:
        w.append(np.eye(3, 4, dtype=np.float32), paths)
    assert image_items(tmp_path / "store") == paths


# ---- the page ---------------------------------------------------------------------------

def test_report_of_an_image_fit(image_run, image_report, capsys):
    html = image_report.read_text()
    page = Page(html)
    assert page.sections == ["cluster-0", "cluster-1", "cluster-2"]
    # nothing is fetched at view time: every image is inline data, every link an anchor
    external = [u for u in page.links if not (u.startswith("data:") or u.startswith("#"))]
    assert external == [], external[:3]
    assert "http://" not in html and "https://" not in html
    # up to 8 of each cluster (half most, half least confident), each image once
    sizes = np.bincount(np.load(image_run / "run" / "labels.npy") + 1, minlength=4)[1:]
    assert len(page.images) == np.minimum(sizes, 8).sum() > 0
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.images)
    assert "ACC " in html and "NMI " in html and "ARI " in html and 'class="confusion"' in html
    assert html.count('class="hist"') == 3 + 1  # one per cluster and the overview's
    # the fit's cluster names (nouns of words.txt) head each non-empty cluster
    names = json.loads((image_run / "run" / "semclust.json").read_text())["cluster_names"]
    for c, row in enumerate(names):
        assert (f"cluster {c} &middot; {', '.join(row)}</h3>" if row else f"cluster {c}</h3>") in html
    # the settings and per-phase times of the fit
    assert "stage1" in html and "kmeans" in html and "peak_rss_mb" in html


def test_report_names_clusters_and_handles_embeddings_only_runs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    run = synthetic_run(tmp_path / "run", labels, rng.random(40).astype(np.float32), 3,
                        meta={"cluster_names": ["cats", ["dog", "puppy"], "cars & <trucks>"]})
    rc = main(["report", str(run), "--out", str(tmp_path / "r.html")])
    out, _ = capsys.readouterr()
    assert rc == 0 and "report of 40 rows in 3 clusters (0 thumbnails)" in out
    html = (tmp_path / "r.html").read_text()
    assert len(Page(html).sections) == 3 and Page(html).images == []
    assert "cats" in html and "dog, puppy" in html and "cars &amp; &lt;trucks&gt;" in html  # escaped
    assert "stage1 total loss" in html  # the training curve of the history


def test_report_of_1000_clusters_and_200k_rows_is_small_and_quick(big_report):
    path, seconds = big_report
    size = path.stat().st_size
    assert seconds < 15, f"the report took {seconds:.1f}s"
    assert size < 3e6, f"the report is {size / 1e6:.1f} MB"
    page = Page(path.read_text())
    assert page.sections == [f"cluster-{c}" for c in range(BIG_K)]
    assert 'class="confusion"' in path.read_text()


def test_report_errors_are_one_line(image_run, tmp_path, capsys):
    rc = main(["report", str(image_run / "run"), "--images", str(image_run / "images" / "class_0"),
               "--out", str(tmp_path / "r.html")])
    _, err = capsys.readouterr()
    assert rc == 2 and "--images has 8 images but the run labelled 25 rows" in err and len(err.splitlines()) == 1
    rc = main(["report", str(image_run / "run"), "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert rc == 2 and "is a directory" in err
    rc = main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")])
    _, err = capsys.readouterr()
    assert rc == 2 and "does not exist" in err
    assert not (tmp_path / "r.html").exists()


def test_report_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: semclust report")
    assert all(option in out for option in ("run", "--images", "--labels", "--out", "--per-cluster"))


# ---- in a real browser -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium() -> str:
    """The system Chromium; the test is skipped without one (before its fixtures fit a
    run), except under CI (.ci/run installs it), where a missing browser must not pass as
    a skip."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI must run the browser test (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium; CI installs it)")
    return exe


def _open(browser, path: Path) -> tuple[object, float]:
    """(the page of `path`, seconds to load and paint it); asserts that it logged no error
    and fetched nothing but the file itself and its data URIs."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url))
    t0 = time.perf_counter()
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
    seconds = time.perf_counter() - t0
    assert errors == []
    assert [u for u in fetched if not u.startswith(("file:", "data:"))] == []
    return page, seconds


def test_report_in_headless_chromium(chromium, image_report, big_report, image_run):
    from playwright.sync_api import sync_playwright  # the dev extra's: only the browser may be missing

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page, _ = _open(browser, image_report)
            k = int(json.loads((image_run / "run" / fitted.CONFIG_FILE).read_text())["params"]["n_clusters"])
            assert page.locator("section.cluster").count() == k
            # every thumbnail decoded (a broken data URI has no natural width)
            broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
            assert broken == 0 and page.evaluate("document.images.length") > 0
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            big, seconds = _open(browser, big_report[0])
            assert big.locator("section.cluster").count() == BIG_K
            assert seconds < 20, f"the K = {BIG_K} report took {seconds:.1f}s to open"
        finally:
            browser.close()
    pixels = np.asarray(Image.open(SCREENSHOT).convert("L"), dtype=np.float64)
    assert pixels.std() > 20, f"the screenshot looks blank (pixel std {pixels.std():.1f})"
