"""The DeepSpeed configuration the engine builds from ours, and a user's JSON on top of it."""

import json

import pytest
import torch

from rwkvinside.config import EngineConfig, TrainConfig
from rwkvinside.distill.engine import deepspeed_config, offloads_optimizer
from rwkvinside.errors import UserError


def test_our_settings_become_deepspeed_settings():
    train = TrainConfig(batch_size=3, grad_accum=4, grad_clip=0.5)
    config = deepspeed_config(train, EngineConfig(kind="deepspeed", zero_stage=3, offload_optimizer=True),
                              torch.bfloat16)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert deepspeed_config(train, EngineConfig(kind="deepspeed"), torch.float32)["bf16"] == {"enabled": False}


def test_a_user_json_overrides_key_by_key(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 1000, "stage": 1},
                                "gradient_clipping": 2.0}), encoding="utf-8")
    config = deepspeed_config(TrainConfig(), EngineConfig(kind="deepspeed", zero_stage=3, offload_optimizer=True,
                                                          deepspeed_config=str(path)), torch.float32)
    assert config["zero_optimization"] == {"stage": 1, "stage3_prefetch_bucket_size": 1000,
                                           "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert config["gradient_clipping"] == 2.0
    assert config["train_micro_batch_size_per_gpu"] == TrainConfig().batch_size


@pytest.mark.parametrize("ours, users, offloaded", [
    (False, {}, False),
    (True, {}, True),
    (False, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, True),
    (True, {"zero_optimization": {"offload_optimizer": {"device": "none"}}}, False),
])
def test_the_optimizer_is_offloaded_when_either_config_says_so(tmp_path, ours, users, offloaded):
    """An offloaded optimizer must be DeepSpeed's CPU Adam (DeepSpeed refuses torch's AdamW there)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(users), encoding="utf-8")
    engine = EngineConfig(kind="deepspeed", offload_optimizer=ours, deepspeed_config=str(path))
    assert offloads_optimizer(deepspeed_config(TrainConfig(), engine, torch.float32)) == offloaded


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{stage: 3}", "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_a_bad_user_json_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        deepspeed_config(TrainConfig(), EngineConfig(kind="deepspeed", deepspeed_config=str(path)), torch.float32)
