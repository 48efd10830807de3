"""TAC baselines (semclust.method.tac): shapes, determinism, the losses as TAC defines them, and
that TAC's heads beat k-means on images alone on the modality-gap scenario."""

import numpy as np
import pytest
import torch

from semclust import ops
from semclust.method import tac
from semclust.metrics import cluster_accuracy
from semclust.synthetic import make_scenario


@pytest.fixture(scope="module")
def small():
    d = make_scenario("gap", seed=0, n=600)
    u = d.embeddings
    cp = tac.tac_counterparts(u, d.noun_embeddings, d.spec.k, kmeans_restarts=1)
    return d, u, cp.v, tac.tac_neighbours(u, 10), tac.tac_neighbours(cp.v, 10)


def test_counterparts_shapes(small):
    d, u, v, _, _ = small
    cp = tac.tac_counterparts(u, d.noun_embeddings, 10, kmeans_restarts=1)
    assert cp.centres == 10  # max(K, N // 300)
    assert v.shape == u.shape and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), torch.ones(len(u)))
    assert 1 <= cp.selected.numel() <= 5 * cp.centres
    assert cp.selected.unique().numel() == cp.selected.numel()
    assert tac.tac_counterparts(u, d.noun_embeddings, 10, centres=30, kmeans_restarts=1).centres == 30


def test_neighbours_exclude_self(small):
    _, u, _, ni, _ = small
    assert ni.shape == (600, 10) and ni.dtype == torch.int64
    assert not (ni == torch.arange(600)[:, None]).any()


def test_training_free_shapes_and_determinism(small):
    _, u, v, _, _ = small
    a = tac.tac_training_free(u, v, 10, seed=0, restarts=2)
    assert a.shape == (600,) and a.dtype == np.int64 and set(a.tolist()) <= set(range(10))
    assert np.array_equal(a, tac.tac_training_free(u, v, 10, seed=0, restarts=2))


def test_heads_shapes_history_and_determinism(small):
    _, u, v, ni, nt = small
    kw = dict(epochs=3, batch_size=128, hidden=64, seed=1)
    state = torch.random.get_rng_state()
    lab, conf, hist = tac.train_tac_heads(u, v, 10, ni, nt, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert lab.shape == (600,) and lab.dtype == np.int64 and lab.min() >= 0 and lab.max() < 10
    assert conf.shape == (600,) and conf.dtype == np.float32 and (conf > 0).all() and (conf <= 1).all()
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert all(set(h) == {"epoch", "distill", "consist", "entropy", "loss"} for h in hist)
    assert all(np.isfinite(list(h.values())).all() for h in hist)
    lab2, conf2, hist2 = tac.train_tac_heads(u, v, 10, ni, nt, **kw)
    assert np.array_equal(lab, lab2) and np.array_equal(conf, conf2) and hist == hist2
    lab3, _, _ = tac.train_tac_heads(u, v, 10, ni, nt, **{**kw, "seed": 2})
    assert not np.array_equal(lab, lab3)
    lab4, conf4, _ = tac.train_tac_heads(u, v, 10, ni, nt, **kw, predict="mean")
    assert lab4.shape == (600,) and conf4.shape == (600,)


def test_cluster_infonce_matches_the_masked_formulation():
    """TAC's DistillLoss: 2K cluster columns, positive = the same cluster of the other
    view, negatives = all but self and positive, CE summed / 2K."""
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(32, 5, generator=g), 1)
    b = torch.softmax(torch.randn(32, 5, generator=g), 1)
    k, tau = 5, 0.5
    c = torch.nn.functional.normalize(torch.cat([a.T, b.T]), dim=1)
    sim = c @ c.T / tau
    mask = torch.ones(2 * k, 2 * k, dtype=torch.bool)
    mask.fill_diagonal_(False)
    for i in range(k):
        mask[i, k + i] = mask[k + i, i] = False
    pos = torch.cat([torch.diag(sim, k), torch.diag(sim, -k)])[:, None]
    logits = torch.cat([pos, sim[mask].reshape(2 * k, -1)], 1)
    ref = torch.nn.functional.cross_entropy(logits, torch.zeros(2 * k, dtype=torch.long), reduction="sum") / (2 * k)
    # TAC and semclust share one definition of the term
    torch.testing.assert_close(tac.cluster_infonce(a, b, tau), ref)


def test_consistency_and_entropy():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    torch.testing.assert_close(tac._consistency(p, q), -torch.tensor([1.0, 0.5]).log().mean())
    torch.testing.assert_close(tac._entropy_of_mean(torch.full((4, 8), 1 / 8)), torch.tensor(np.log(8.0), dtype=torch.float32))


def test_settings_rule():
    small, large = tac.tac_settings(99), tac.tac_settings(100)
    assert (small["epochs"], small["batch_size"], small["tau"]) == (20, 512, 0.5)
    assert (large["epochs"], large["batch_size"], large["tau"]) == (100, 8192, 5.0)
    assert tac.tac_settings(10)["entropy_weight"] == 5.0 and tac.tac_settings(1000) == large
    with pytest.raises(ValueError):
        tac.tac_settings(1)


def test_heads_beat_image_kmeans_on_gap():
    d = make_scenario("gap", seed=0, n=3000)
    u, y, k = d.embeddings, d.labels, d.spec.k
    cp = tac.tac_counterparts(u, d.noun_embeddings, k, kmeans_restarts=1)
    lab, _, _ = tac.train_tac_heads(u, cp.v, k, tac.tac_neighbours(u, 50), tac.tac_neighbours(cp.v, 50), hidden=256)
    acc_heads = cluster_accuracy(y, lab)
    acc_km = cluster_accuracy(y, ops.kmeans(u, k, seed=0, restarts=3).labels)
    assert acc_heads > acc_km + 0.25, (acc_heads, acc_km)


def test_bad_input_raises(small):
    _, u, v, ni, nt = small
    with pytest.raises(ValueError, match="k must be"):
        tac.train_tac_heads(u[:8], v[:8], 9, ni[:8] % 8, nt[:8] % 8)  # K > N
    with pytest.raises(ValueError, match="k must be"):
        tac.tac_training_free(u[:5], v[:5], 6)
    with pytest.raises(ValueError, match="same shape"):
        tac.train_tac_heads(u, v[:, :32], 10, ni, nt)
    with pytest.raises(ValueError, match="same shape"):
        tac.tac_training_free(u, v[:-1], 10)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        tac.tac_training_free(u[0], v[0], 10)
    with pytest.raises(ValueError, match="image_neighbours"):
        tac.train_tac_heads(u, v, 10, ni[:-1], nt)
    with pytest.raises(ValueError, match="outside"):
        tac.train_tac_heads(u, v, 10, ni, nt + 600)
    with pytest.raises(ValueError, match="predict"):
        tac.train_tac_heads(u, v, 10, ni, nt, predict="text")
    with pytest.raises(ValueError, match="dim"):
        tac.tac_counterparts(u, torch.randn(20, 32), 10)
    with pytest.raises(ValueError, match="k must be"):
        tac.tac_counterparts(u[:5], torch.randn(20, 64), 6)


def test_stage1_objective_tac_is_tacs_head_training(small):
    from semclust.config import Stage1Config
    from semclust.method import stage1

    _, u, v, ni, nt = small
    r = stage1.train_stage1(u, v, 10, ni, nt, Stage1Config(objective="tac", hidden=64), seed=3, progress=False)
    st = tac.tac_settings(10)
    lab, conf, hist = tac.train_tac_heads(u, v, 10, ni, nt, epochs=st["epochs"], batch_size=st["batch_size"],
                                          tau=st["tau"], hidden=64, seed=3)
    assert np.array_equal(r.labels.numpy(), lab)
    np.testing.assert_allclose(r.conf.numpy(), conf, rtol=1e-6)
    assert len(r.history) == st["epochs"] == len(hist)


def test_config_tac_fits_end_to_end_and_differs_from_the_default():
    from semclust import SemanticClusterer
    from semclust.config import Config

    d = make_scenario("gap", seed=1, n=600)
    cfg = Config.tac()
    assert (cfg.semantic.method, cfg.counterparts.per_image, cfg.stage1.objective) == ("tac", 0, "tac")
    m = SemanticClusterer(10, clip=None, config=cfg, stage=1, seed=0, device="cpu", progress=False)
    m.fit(d.embeddings, nouns=d.noun_embeddings)
    assert m.labels_.shape == (600,) and cluster_accuracy(d.labels, m.labels_) > 0.3
    assert m.history_["nouns_selected"] <= 5 * 10  # M = max(K, 600 // 300) = 10 centres x 5 nouns


def test_objective_tac_refuses_several_ranks(monkeypatch, small):
    from semclust.config import Stage1Config
    from semclust.method import stage1
    from semclust.runtime import distributed as dist

    _, u, v, ni, nt = small
    monkeypatch.setattr(dist, "rank_world", lambda: (0, 2))
    with pytest.raises(ValueError, match="one process"):
        stage1.train_stage1(u, v, 10, ni, nt, Stage1Config(objective="tac"), progress=False)
