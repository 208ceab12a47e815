"""GMA6Config: validation names the bad value; JSON round trip; resolution against a model."""

from __future__ import annotations

import json

import pytest

from gma6 import GMA6Config
from gma6.config import default_layers


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_slots": 0}, "num_slots=0"),
        ({"num_slots": 2.5}, "num_slots=2.5"),
        ({"num_heads": -1}, "num_heads=-1"),
        ({"memory_dim": 30, "num_heads": 4}, "not divisible"),
        ({"layers": []}, "layers=[]"),
        ({"layers": [1, 1]}, "duplicate"),
        ({"layers": [-2]}, "-2"),
        ({"memory_type": "lstm"}, "memory_type='lstm'"),
        ({"addressing": "random"}, "addressing='random'"),
        ({"usage_decay": 1.5}, "usage_decay=1.5"),
        ({"forget_bias": float("nan")}, "forget_bias"),
        ({"max_memory_usage": 0}, "max_memory_usage=0"),
        ({"offload_to_cpu": "yes"}, "offload_to_cpu='yes'"),
    ],
)
def test_bad_values_raise_value_error_naming_them(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        GMA6Config(**kwargs)


def test_json_round_trip(tmp_path):
    cfg = GMA6Config(num_slots=8, layers=[3, 1], forget_bias=2.0).resolve(640, 18, "gemma3_text")
    cfg.save(tmp_path)
    assert json.loads((tmp_path / "gma6_config.json").read_text())["layers"] == [1, 3]
    assert GMA6Config.load(tmp_path) == cfg


def test_load_rejects_unknown_fields_and_bad_json(tmp_path):
    (tmp_path / "gma6_config.json").write_text(json.dumps({"num_slots": 4, "slots_typo": 3}))
    with pytest.raises(ValueError, match="slots_typo"):
        GMA6Config.load(tmp_path)
    (tmp_path / "gma6_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GMA6Config.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="gma6_config.json"):
        GMA6Config.load(tmp_path / "missing")


def test_resolve_fills_and_checks():
    cfg = GMA6Config(memory_dim=None, num_heads=4).resolve(640, 18, "gemma3_text")
    assert cfg.slot_dim == 640 and cfg.layers == default_layers(18, 4)
    with pytest.raises(ValueError, match="beyond the model's depth"):
        GMA6Config(layers=[18]).resolve(640, 18, "gemma3_text")
    with pytest.raises(ValueError, match="hidden_size=640"):
        cfg.resolve(1152, 26, "gemma3_text")
    with pytest.raises(ValueError, match="model_type='gemma3_text'"):
        cfg.resolve(640, 18, "llama")


def test_default_layers():
    assert default_layers(18, 4) == [3, 8, 12, 17]
    assert default_layers(4, 8) == [0, 1, 2, 3]
