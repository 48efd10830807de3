"""Stage 1 checkpoints: a run stopped after some epochs and resumed ends exactly where an
uninterrupted run ends; a checkpoint of another run is refused."""

import pytest
import torch

from semclust import ops
from semclust.method import counterparts, neighbours, stage1
from semclust.config import ChunkConfig, CounterpartConfig, SemanticSpaceConfig, Stage1Config
from semclust.synthetic import SyntheticSpec, make_synthetic


@pytest.fixture(scope="module")
def inputs():
    data = make_synthetic(SyntheticSpec(n=600), seed=0)
    u = data.embeddings
    with ops.use_backend("torch"):
        space = counterparts.select_nouns(u, data.noun_embeddings, 10, SemanticSpaceConfig(kmeans_restarts=1))
        v = counterparts.text_counterparts(u, space.bank(data.noun_embeddings), CounterpartConfig())
        ni, nt = neighbours.knn_lists(u, 20, ChunkConfig()), neighbours.knn_lists(v, 20, ChunkConfig())
    return u, v, ni, nt


def _train(inputs, epochs, columns=256, **kw):
    u, v, ni, nt = inputs
    cfg = Stage1Config(epochs=epochs, batch_size=128, cluster_columns=columns)
    with ops.use_backend("torch"):
        return stage1.train_stage1(u, v, 10, ni, nt, cfg, seed=3, progress=False, **kw)


@pytest.mark.parametrize("columns", [256, 4])  # all 10 clusters; a random 4 of them each step
def test_resume_equals_uninterrupted(inputs, tmp_path, columns):
    whole = _train(inputs, 4, columns)
    ck = tmp_path / "stage1.ckpt"
    first = _train(inputs, 2, columns, checkpoint=ck)
    assert ck.exists() and len(first.history) == 2
    resumed = _train(inputs, 4, columns, checkpoint=ck, resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for a, b in zip(whole.heads.state_dict().values(), resumed.heads.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(whole.labels, resumed.labels)
    assert [h["total"] for h in whole.history] == [h["total"] for h in resumed.history]


def test_without_resume_a_checkpoint_is_overwritten_not_used(inputs, tmp_path):
    ck = tmp_path / "stage1.ckpt"
    _train(inputs, 2, checkpoint=ck)
    fresh = _train(inputs, 1, checkpoint=ck)
    assert len(fresh.history) == 1 and torch.load(ck, weights_only=True)["epoch"] == 0


def test_checkpoint_of_another_run_is_refused(inputs, tmp_path):
    ck = tmp_path / "stage1.ckpt"
    _train(inputs, 1, checkpoint=ck)
    u, v, ni, nt = inputs
    with pytest.raises(ValueError, match="another run"):
        stage1.train_stage1(u, v, 10, ni, nt, Stage1Config(epochs=2, batch_size=128), seed=4, progress=False,
                            checkpoint=ck, resume=True)
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable stage-1 checkpoint"):
        _train(inputs, 2, checkpoint=ck, resume=True)


def test_data_key_stands_for_the_data_and_nothing_is_hashed_without_a_checkpoint(inputs, tmp_path, monkeypatch):
    """The caller's key replaces the hash of every byte of u (a fit passes its workspace's
    run id); without a checkpoint no signature is made at all."""
    def no_hash(t):
        raise AssertionError("u was hashed")

    monkeypatch.setattr(stage1, "fingerprint", no_hash)
    _train(inputs, 1)
    ck = tmp_path / "stage1.ckpt"
    _train(inputs, 1, checkpoint=ck, data_key="rows A")
    assert len(_train(inputs, 2, checkpoint=ck, resume=True, data_key="rows A").history) == 2
    with pytest.raises(ValueError, match="another run"):
        _train(inputs, 3, checkpoint=ck, resume=True, data_key="rows B")


def test_cluster_subset_trains_with_the_torch_loss_and_refuses_a_forced_ext(inputs, monkeypatch):
    """K above stage1.cluster_columns: the steps run the torch loss on a random subset of
    clusters (drawn afresh each step), and forcing the fused ext step says why it cannot."""
    u, v, ni, nt = inputs
    seen = []
    real = stage1.stage1_loss

    def spy(*a, columns=None, **kw):
        seen.append(None if columns is None else sorted(columns.tolist()))
        return real(*a, columns=columns, **kw)

    monkeypatch.setattr(stage1, "stage1_loss", spy)
    cfg = Stage1Config(epochs=1, batch_size=128, cluster_columns=4)
    r = stage1.train_stage1(u, v, 10, ni, nt, cfg, seed=0, progress=False)
    assert len(r.history) == 1 and len(seen) == 5  # 600 rows: 5 batches of 128 or fewer
    assert all(c is not None and len(c) == 4 and len(set(c)) == 4 and max(c) < 10 for c in seen)
    assert len({tuple(c) for c in seen}) > 1, "a fresh subset every step"
    with ops.use_backend("ext"), pytest.raises(ops.BackendUnavailable, match="cluster_columns"):
        stage1.train_stage1(u, v, 10, ni, nt, cfg, seed=0, progress=False)


@pytest.mark.parametrize("n, k, visits, epochs, expected", [
    (5000, 10, 500, 40, 40),        # K < 100: always cfg.epochs
    (5000, 99, 500, 40, 40),
    (10000, 100, 500, 40, 5),       # ceil(500 * 100 / 10000)
    (10001, 100, 500, 40, 5),       # rounds up
    (100000, 1000, 500, 40, 5),
    (1000000, 100, 500, 40, 4),     # never below 4
    (20000, 1000, 500, 40, 25),     # few rows per cluster: more epochs
    (2000, 1000, 500, 40, 40),      # ... at most cfg.epochs
    (1000000, 100, 500, 2, 2),      # a smaller cfg.epochs caps the floor too
    (10000, 100, 0, 40, 40),        # 0: the rule is off
])
def test_stage1_epochs_rule(n, k, visits, epochs, expected):
    assert stage1.stage1_epochs(Stage1Config(epochs=epochs, cluster_visits=visits), n, k) == expected


def test_large_k_trains_the_rule_s_epochs_and_resumes_across_it(tmp_path):
    """At K >= 100 a fit trains stage1_epochs() epochs, and a checkpoint resumes whatever
    cluster_visits says (it only sets how many epochs, like `epochs`)."""
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(400, 16, generator=g), dim=1)
    v = torch.nn.functional.normalize(u + 0.3 * torch.randn(400, 16, generator=g), dim=1)
    ni, nt = neighbours.knn_lists(u, 5, ChunkConfig()), neighbours.knn_lists(v, 5, ChunkConfig())
    cfg = Stage1Config(epochs=40, batch_size=128, hidden=16, cluster_visits=1)  # max(4, ceil(100 / 400)) = 4
    with ops.use_backend("torch"):
        r = stage1.train_stage1(u, v, 100, ni, nt, cfg, seed=0, progress=False, checkpoint=tmp_path / "c")
        assert [h["epoch"] for h in r.history] == [0, 1, 2, 3]
        more = Stage1Config(epochs=6, batch_size=128, hidden=16, cluster_visits=0)
        r = stage1.train_stage1(u, v, 100, ni, nt, more, seed=0, progress=False, checkpoint=tmp_path / "c", resume=True)
    assert [h["epoch"] for h in r.history] == [0, 1, 2, 3, 4, 5]
