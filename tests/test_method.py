"""The method on the synthetic generator: stage 1 must beat k-means on the same frozen
features, and stage 2 must not fall below stage 1.

Margins measured on this configuration (n=2000, 20 + 5 epochs, torch 2.14 CPU), seeds
0/1/2: k-means 0.312/0.357/0.235, stage 1 0.816/0.788/0.700, stage 2 0.926/0.875/0.815
ACC, so stage 1 - k-means >= 0.431 and stage 2 - stage 1 >= 0.087. The asserted margins
are about 70% and 60% of those.
"""

import pytest
import torch

from semclust import SemanticClusterer, ops
from semclust.config import Config
from semclust.inputs.sources import TensorSource
from semclust.metrics import cluster_accuracy
from semclust.synthetic import SyntheticSpec, make_synthetic


@pytest.fixture(scope="module", params=[0, 1])
def run(request):
    seed = request.param
    data = make_synthetic(SyntheticSpec(n=2000), seed=seed)
    cfg = Config()
    cfg.stage1.epochs, cfg.stage2.epochs, cfg.stage2.lr = 20, 5, 1e-3
    km = ops.kmeans(data.embeddings, 10, iters=100, restarts=3, seed=seed)
    model = SemanticClusterer(10, clip=data.encoder, config=cfg, seed=seed, device="cpu")
    model.fit(TensorSource(data.raw), nouns=data.noun_embeddings)
    return {
        "kmeans": cluster_accuracy(data.labels, km.labels.numpy()),
        "stage1": cluster_accuracy(data.labels, model.stage1_labels_),
        "stage2": cluster_accuracy(data.labels, model.labels_),
        "model": model,
    }


@pytest.mark.slow
def test_stage1_beats_kmeans_on_the_same_features(run):
    assert run["stage1"] >= run["kmeans"] + 0.3, run


@pytest.mark.slow
def test_stage2_improves_on_stage1(run):
    # 5 points, or half the error left where stage 1 is already within 10 points of 1.0
    assert run["stage2"] >= run["stage1"] + min(0.05, 0.5 * (1.0 - run["stage1"])), run


@pytest.mark.slow
def test_no_cluster_collapses(run):
    counts = torch.bincount(torch.from_numpy(run["model"].labels_), minlength=10)
    assert int(counts.min()) >= 0.3 * 2000 / 10, counts.tolist()


@pytest.mark.parametrize("method,extra", [("tac", {}), ("pool", {"pool_per_centre": 20})])
def test_semantic_selection_keeps_on_topic_nouns(method, extra):
    from semclust.method import counterparts
    from semclust.config import SemanticSpaceConfig

    data = make_synthetic(SyntheticSpec(n=1500), seed=0)
    cfg = SemanticSpaceConfig(method=method, kmeans_restarts=1, **extra)
    space = counterparts.select_nouns(data.embeddings, data.noun_embeddings, 10, cfg)
    kept = [data.nouns[i] for i in space.noun_index]
    on_topic = sum(n.startswith("class") and "noun" in n for n in kept)
    # on-topic nouns are 80 of 490 in the vocabulary (16%); selection must enrich them (the
    # pool keeps 20 per centre, more than a class has, so it enriches less than TAC's 5)
    assert on_topic / len(kept) > (0.5 if method == "tac" else 0.32), kept
    if method == "pool":
        # with the default 200 per centre, no class loses a noun (TAC's 5 per centre can)
        space = counterparts.select_nouns(data.embeddings, data.noun_embeddings, 10, SemanticSpaceConfig(kmeans_restarts=1))
        kept = {data.nouns[i] for i in space.noun_index}
        assert {n for n in data.nouns if n.startswith("class") and "noun" in n} <= kept


@pytest.mark.parametrize("n,size", [(9, 8), (17, 8), (25, 8), (16, 8), (7, 8), (1, 8)])
def test_stage1_batches_cover_every_row_once_and_none_is_a_single_row(n, size):
    from semclust.method.stage1 import _batches

    out = _batches(n, size, torch.Generator().manual_seed(0))
    rows = torch.cat(out)
    assert sorted(rows.tolist()) == list(range(n))  # nothing dropped, nothing twice
    assert all(b.numel() >= 2 for b in out) or n == 1
