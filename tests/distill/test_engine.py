"""The engines: float32 master weights and skipped steps in one process; the DeepSpeed configuration
built from ours, and a user's JSON on top of it."""

import json

import pytest
import torch
from torch import nn

from rwkvinside.config import EngineConfig, TrainConfig
from rwkvinside.distill.engine import ADAM_BETAS, ADAM_EPS, PlainEngine, deepspeed_config, offloads_optimizer
from rwkvinside.errors import UserError

CPU = torch.device("cpu")


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


# ---- float32 master weights ------------------------------------------------------------------------

def bf16_weight() -> nn.Parameter:
    return nn.Parameter(torch.ones(64, dtype=torch.bfloat16))


def steps_of_unit_gradient(engine: PlainEngine, weight: nn.Parameter, steps: int, lr: float = 1e-4) -> None:
    """`steps` AdamW steps whose gradient is 1 everywhere: each update is exactly lr in size."""
    engine.set_schedule(lr, 0.0)
    for _ in range(steps):
        engine.backward(weight.float().sum())
        norm, applied = engine.finish_step()
        assert bool(applied) and float(norm) == pytest.approx(8.0)  # sqrt(64) ones


def test_updates_below_the_bf16_spacing_accumulate_in_the_master_weights():
    """At 1.0 a bf16 weight moves in steps of 2^-7: an update of 1e-4 rounds away when the bf16
    weight is stepped itself, which is what happened to most stage-2 updates. The float32 master
    weight keeps every update, and the model's weight follows it."""
    weight = bf16_weight()
    bare = torch.optim.AdamW([weight], lr=1e-4, weight_decay=0.0)
    for _ in range(5):
        weight.grad = torch.ones_like(weight)
        bare.step()
    assert torch.equal(weight, torch.ones_like(weight))  # the failure: five updates, nothing moved
    weight.grad = None

    engine = PlainEngine({"w": weight}, TrainConfig(grad_clip=0.0), CPU)
    steps_of_unit_gradient(engine, weight, 100)
    (master,) = engine.masters
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, torch.full_like(master, 0.99), rtol=0, atol=1e-5)  # float32 rounding of 100 steps
    assert torch.equal(weight, master.to(torch.bfloat16)) and not torch.equal(weight, torch.ones_like(weight))


def test_steps_follow_adamw_on_float32_copies_also_when_a_parameter_gets_no_gradient():
    """Several steps with changing gradients, learning rates and weight decays, the second of which
    leaves the matrix without a gradient: the master weights follow torch's AdamW stepped on float32
    copies with float32 gradients, the matrix decaying and the vector not; the parameter without a
    gradient is skipped, decay included, as AdamW skips it."""
    generator = torch.Generator().manual_seed(0)
    weights = [nn.Parameter(torch.randn(shape, generator=generator).to(torch.bfloat16)) for shape in ((5, 3), (7,))]
    references = [nn.Parameter(w.detach().float()) for w in weights]
    engine = PlainEngine({"a": weights[0], "b": weights[1]}, TrainConfig(grad_clip=0.0), CPU)
    reference = torch.optim.AdamW([{"params": references[:1]}, {"params": references[1:], "weight_decay": 0.0}],
                                  betas=ADAM_BETAS, eps=ADAM_EPS)
    for step, (lr, weight_decay) in enumerate([(1e-2, 0.1), (2e-2, 0.5), (5e-3, 0.2), (1e-2, 0.0)]):
        engine.set_schedule(lr, weight_decay)
        reference.param_groups[0].update(lr=lr, weight_decay=weight_decay)
        reference.param_groups[1].update(lr=lr)
        trained = [1] if step == 1 else [0, 1]
        gradients = {i: torch.randn(weights[i].shape, generator=generator) for i in trained}
        engine.backward(sum((weights[i].float() * gradients[i]).sum() for i in trained))
        engine.finish_step()
        for i, reference_weight in enumerate(references):
            reference_weight.grad = gradients[i].to(torch.bfloat16).float() if i in trained else None
        reference.step()
        for master, reference_weight in zip(engine.masters, references):
            torch.testing.assert_close(master, reference_weight.detach(), rtol=1e-6, atol=1e-7)
        assert all(w.grad is None for w in weights)


def test_a_float32_parameter_is_its_own_master_weight():
    weight = nn.Parameter(torch.ones(64))
    engine = PlainEngine({"w": weight}, TrainConfig(grad_clip=0.0), CPU)
    assert engine.masters[0] is weight
    steps_of_unit_gradient(engine, weight, 3)
    torch.testing.assert_close(weight.detach(), torch.full((64,), 1 - 3e-4), rtol=0, atol=1e-6)


def test_a_checkpoint_holds_the_master_weights_and_resumes_them_exactly(tmp_path):
    weight = bf16_weight()
    engine = PlainEngine({"w": weight}, TrainConfig(grad_clip=0.0), CPU)
    steps_of_unit_gradient(engine, weight, 7)
    engine.save(tmp_path)

    restored_weight = bf16_weight()
    restored = PlainEngine({"w": restored_weight}, TrainConfig(grad_clip=0.0), CPU)
    restored.load(tmp_path)
    assert torch.equal(restored.masters[0], engine.masters[0]) and torch.equal(restored_weight, weight)
    steps_of_unit_gradient(engine, weight, 3)
    steps_of_unit_gradient(restored, restored_weight, 3)
    assert torch.equal(restored.masters[0], engine.masters[0])


def test_a_checkpoint_of_other_parameters_is_refused(tmp_path):
    engine = PlainEngine({"w": bf16_weight()}, TrainConfig(), CPU)
    engine.save(tmp_path)
    with pytest.raises(UserError, match="does not hold the trained parameters"):
        PlainEngine({"v": bf16_weight()}, TrainConfig(), CPU).load(tmp_path)


def test_clipping_scales_the_step_but_reports_the_norm_before_it():
    weight = nn.Parameter(torch.zeros(4))
    engine = PlainEngine({"w": weight}, TrainConfig(grad_clip=1.0), CPU)
    engine.set_schedule(0.1, 0.0)
    engine.backward((weight * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum())
    norm, applied = engine.finish_step()
    assert float(norm) == pytest.approx(5.0) and bool(applied)
