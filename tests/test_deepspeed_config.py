"""The shipped DeepSpeed configs and the trainer's sizing of their "auto" buffers (no process group needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from accelerate.utils import DeepSpeedPlugin
from transformers import LlamaConfig

from cqil.recovery.optim import size_deepspeed_buffers

ROOT = Path(__file__).resolve().parents[1]


def plugin(config: dict) -> DeepSpeedPlugin:
    return DeepSpeedPlugin(hf_ds_config=json.loads(json.dumps(config)))


@pytest.mark.parametrize("name", ["zero3", "zero3_offload"])
def test_shipped_zero3_buffers_are_sized_from_the_hidden_size(name):
    launch = yaml.safe_load((ROOT / f"launch/accelerate/{name}.yaml").read_text())
    path = ROOT / launch["deepspeed_config"]["deepspeed_config_file"]
    p = plugin(json.loads(path.read_text()))
    assert p.zero_stage == 3
    sized = size_deepspeed_buffers(p, LlamaConfig(hidden_size=4096))
    zero = p.deepspeed_config["zero_optimization"]
    assert zero["reduce_bucket_size"] == sized["zero_optimization.reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["stage3_param_persistence_threshold"] == 40960
    assert not any(p.is_auto(k) for k in sized)
    # What accelerate's prepare() would otherwise try to fill from the prepared model's config.
    assert p.hf_ds_config.get_value("zero_optimization.reduce_bucket_size") == 4096 * 4096


def test_numbers_written_in_the_config_stay():
    p = plugin(
        {"zero_optimization": {"stage": 3, "reduce_bucket_size": 123, "stage3_prefetch_bucket_size": "auto"}}
    )
    assert size_deepspeed_buffers(p, LlamaConfig(hidden_size=64)) == {
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * 64 * 64)
    }
    assert p.deepspeed_config["zero_optimization"]["reduce_bucket_size"] == 123
    assert size_deepspeed_buffers(plugin({"zero_optimization": {"stage": 2}}), LlamaConfig()) == {}


def test_auto_without_a_hidden_size_is_one_clear_error():
    class NoHidden:
        pass

    p = plugin({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})
    with pytest.raises(ValueError, match="reduce_bucket_size.*hidden_size"):
        size_deepspeed_buffers(p, NoHidden())
