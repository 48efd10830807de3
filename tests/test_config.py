"""Config sections check every option when built (Python or JSON) and when assigned."""

import dataclasses
import json

import pytest

from semclust.config import Config, NeighbourConfig, Stage1Config, Stage2Config


@pytest.mark.parametrize("build,message", [
    (lambda: Stage1Config(balance="dynamc"), r"Stage1Config.balance must be one of \['dynamic', 'fixed'\]"),
    (lambda: Stage1Config(predict_with="text"), "predict_with must be one of"),
    (lambda: Stage1Config(epochs=-1), "epochs must be >= 0"),
    (lambda: Stage1Config(epochs=2.5), "epochs must be an int"),
    (lambda: Stage1Config(lr=0.0), "lr must be > 0"),
    (lambda: Stage1Config(center_target="yes"), "center_target must be True or False"),
    (lambda: Stage2Config(confident_fraction=1.5), "confident_fraction must be <= 1"),
    (lambda: NeighbourConfig(method="hnsw"), "NeighbourConfig.method must be one of"),
    (lambda: NeighbourConfig(k=float("nan")), "k must be an int"),
])
def test_bad_values_raise_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_assignment_is_checked_too():
    cfg = Config()
    cfg.stage1.epochs = 3
    with pytest.raises(ValueError, match="balance must be one of"):
        cfg.stage1.balance = "bogus"
    assert cfg.stage1.balance == "dynamic"
    with pytest.raises(AttributeError, match="no option 'epoch'"):
        cfg.stage1.epoch = 3
    with pytest.raises(ValueError, match="must be one of"):
        dataclasses.replace(cfg.neighbours, method="flat")


def test_json_is_checked_like_python():
    good = Config.from_dict(json.loads('{"stage1": {"epochs": 2, "lr": 1}, "neighbours": {"k": 7}}'))
    assert good.stage1.epochs == 2 and good.stage1.lr == 1 and good.neighbours.k == 7
    assert Config.from_dict(Config().to_dict()) == Config()
    with pytest.raises(ValueError, match="balance must be one of"):
        Config.from_dict({"stage1": {"balance": "bogus"}})
    with pytest.raises(ValueError, match="unknown keys \\['knn_k'\\]"):
        Config.from_dict({"stage1": {"knn_k": 5}})
    with pytest.raises(ValueError, match="unknown config sections"):
        Config.from_dict({"stage3": {}})
    with pytest.raises(TypeError, match="Config.stage1 must be a Stage1Config"):
        Config(stage1={"epochs": 2})
