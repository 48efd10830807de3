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


def _train(inputs, epochs, **kw):
    u, v, ni, nt = inputs
    cfg = Stage1Config(epochs=epochs, batch_size=128)
    with ops.use_backend("torch"):
        return stage1.train_stage1(u, v, 10, ni, nt, cfg, seed=3, progress=False, **kw)


def test_resume_equals_uninterrupted(inputs, tmp_path):
    whole = _train(inputs, 4)
    ck = tmp_path / "stage1.ckpt"
    first = _train(inputs, 2, checkpoint=ck)
    assert ck.exists() and len(first.history) == 2
    resumed = _train(inputs, 4, checkpoint=ck, resume=True)
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
