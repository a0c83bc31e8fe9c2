"""The training loop: schedule, budgets, gradient accumulation, non-finite losses, token counting,
and the all-ones padding mask of packed text left on the host."""

import copy
import gc
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from rwkvinside.config import Config, EngineConfig, StageConfig, TrainConfig
from rwkvinside.distill import loop
from rwkvinside.distill.engine import DeepSpeedEngine, PlainEngine
from rwkvinside.distill.loop import Progress, Trainer, budget_fraction, captures_steps, ended_by, schedule
from rwkvinside.distill.metrics import RunLog, read_log
from rwkvinside.distill.stages import STAGES, Stage, StepLoss
from rwkvinside.errors import UserError
from rwkvinside.modeling.alignment import attach_teacher_attention, select_trainable
from rwkvinside.modeling.convert import convert
from rwkvinside.modeling.student import RWKVInsideForCausalLM

from .conftest import tiny_teacher

CPU = torch.device("cpu")


# ---- a regression "model" and a stage around it -------------------------------------------------

def regression_batches(batch_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch_size, 4, generator=generator)
        yield {"x": x, "y": x.sum(dim=1, keepdim=True)}


def regression_step(model, teacher, batch, stage, train) -> StepLoss:
    loss = (model(batch["x"]) - batch["y"]).pow(2).sum()
    return StepLoss(loss, {"mse": loss.detach()})


def count_samples(batch) -> torch.Tensor:
    return torch.tensor(batch["x"].shape[0])


def nan_on(calls: set[int], step=regression_step):
    """A stage step whose loss is NaN on the chosen calls (1-based: micro-batches, in order)."""
    count = 0

    def step_with_nan(*args) -> StepLoss:
        nonlocal count
        count += 1
        out = step(*args)
        return StepLoss(out.loss * float("nan"), out.metrics) if count in calls else out

    return step_with_nan


class SnapshotLog(RunLog):
    """A RunLog that also keeps a copy of the model's weights after every step."""

    def __init__(self, folder, model):
        super().__init__(folder, "test", None, progress=False, tensorboard=False)
        self.model = model
        self.weights = {0: copy.deepcopy(model.state_dict())}

    def write(self, record, remaining_s):
        super().write(record, remaining_s)
        self.weights[record["step"]] = copy.deepcopy(self.model.state_dict())


def make_trainer(tmp_path, model, batches, step=regression_step, stage_config=None, count_tokens=count_samples,
                 teacher=None, trainer_class=Trainer, **train) -> Trainer:
    stage_config = stage_config or StageConfig(lr=0.05, lr_final=0.005, warmup_steps=2, max_steps=6,
                                               weight_decay=0.1)
    config = Config(train=TrainConfig(**train), stage1=stage_config)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    engine = PlainEngine(trainable, config.train, CPU)
    stage = Stage(1, "test", "text", aligns=False, needs_teacher=False, step=step, count_tokens=count_tokens)
    return trainer_class(stage, config, model, teacher, batches, engine, tmp_path, SnapshotLog(tmp_path, model))


def regression_trainer(tmp_path, step=regression_step, stage_config=None, batch_size=4, **train) -> Trainer:
    torch.manual_seed(0)
    return make_trainer(tmp_path, nn.Linear(4, 1), regression_batches(batch_size), step, stage_config, **train)


def run(trainer: Trainer) -> tuple[Progress, list[dict]]:
    try:
        progress = trainer.run(Progress())
    finally:
        trainer.log.close()
    return progress, read_log(trainer.folder / "log.jsonl")


# ---- schedule ---------------------------------------------------------------------------------

STAGE = dict(lr=1e-3, lr_final=1e-5, warmup_steps=4)
BUDGETS = {
    "steps": (dict(max_steps=100), lambda f: Progress(step=int(100 * f))),
    "tokens": (dict(max_tokens=50_000), lambda f: Progress(step=10 + int(f * 40), tokens=int(50_000 * f))),
    "time": (dict(max_time=600.0), lambda f: Progress(step=10 + int(f * 40), elapsed=600.0 * f)),
}


@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_warm_up_then_cosine_to_lr_final_at_the_end_of_the_budget(budget):
    settings, at = BUDGETS[budget]
    stage = StageConfig(**STAGE, **settings)
    warm = [schedule(Progress(step=s), stage)[0] for s in range(4)]
    assert warm == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear, reaching lr on the last warm-up step
    fractions = [0.2, 0.35, 0.5, 0.75, 0.9, 0.99, 1.0]
    lrs = [schedule(at(f), stage)[0] for f in fractions]
    for f, lr in zip(fractions, lrs):
        assert lr == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * f)))
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(1e-5)  # lr_final, exactly at the end of the budget
    assert schedule(at(1.5), stage)[0] == pytest.approx(1e-5)  # never below it


def test_the_first_budget_reached_ends_the_stage():
    stage = StageConfig(max_steps=10, max_tokens=1000, max_time=60.0)
    assert budget_fraction(Progress(step=5, tokens=900, elapsed=1.0), stage) == pytest.approx(0.9)
    assert budget_fraction(Progress(step=2, tokens=10, elapsed=61.0), stage) == 1.0


@pytest.mark.parametrize("progress, expected", [
    (Progress(step=10, tokens=900, elapsed=59.0), "max_steps"),
    (Progress(step=9, tokens=1000, elapsed=59.0), "max_tokens"),
    (Progress(step=2, tokens=10, elapsed=61.0), "max_time"),
])
def test_ended_by_names_the_budget_that_ended_the_stage(progress, expected):
    assert ended_by(progress, StageConfig(max_steps=10, max_tokens=1000, max_time=60.0)) == expected


def test_ended_by_never_names_an_unset_budget():
    """An unset budget (0) is unlimited: it cannot have ended the stage, however far the others are."""
    assert ended_by(Progress(step=3, tokens=10**9, elapsed=10**6), StageConfig(max_steps=3)) == "max_steps"
    assert ended_by(Progress(step=10**6, tokens=64), StageConfig(max_tokens=64)) == "max_tokens"
    assert ended_by(Progress(step=10**6, elapsed=5.0), StageConfig(max_time=5.0)) == "max_time"


def test_weight_decay_moves_linearly_and_spares_vectors(tmp_path):
    stage = StageConfig(max_steps=10, weight_decay=0.1, weight_decay_final=0.02)
    assert [schedule(Progress(step=s), stage)[1] for s in (0, 5, 10)] == pytest.approx([0.1, 0.06, 0.02])
    trainer = regression_trainer(tmp_path)
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.engine.set_schedule(1e-3, 0.06)
    trainer.engine.backward(sum(p.sum() for p in model.parameters()) * 0.0)  # AdamW's update of 0 is 0
    trainer.engine.finish_step()
    torch.testing.assert_close(model.weight.detach(), before["weight"] * (1 - 1e-3 * 0.06), rtol=1e-7, atol=0)
    assert torch.equal(model.bias.detach(), before["bias"])  # the matrix decays, the bias does not


def test_the_trainer_follows_the_schedule_to_the_end_of_the_budget(tmp_path):
    stage = StageConfig(lr=0.01, lr_final=0.001, warmup_steps=3, max_steps=20,
                        weight_decay=0.2, weight_decay_final=0.0)
    progress, records = run(regression_trainer(tmp_path, stage_config=stage))
    assert progress.step == 20 and [r["step"] for r in records] == list(range(1, 21))
    for r in records:
        assert (r["lr"], r["weight_decay"]) == pytest.approx(schedule(Progress(step=r["step"] - 1), stage))
    lrs = [r["lr"] for r in records]
    assert lrs[2] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[-1] - 0.001 < 0.01 * (0.01 - 0.001)  # decayed to lr_final, not stuck near the peak
    assert records[-1]["weight_decay"] == pytest.approx(0.2 / 20)
    assert ended_by(progress, stage) == "max_steps"


def test_a_token_budget_stops_the_trainer(tmp_path):
    stage = StageConfig(lr=0.01, lr_final=0.001, warmup_steps=1, max_tokens=40)
    progress, records = run(regression_trainer(tmp_path, stage_config=stage, batch_size=3, grad_accum=2))
    assert [r["tokens"] for r in records] == [6, 12, 18, 24, 30, 36, 42]
    assert progress.tokens == 42 and progress.step == 7
    assert ended_by(progress, stage) == "max_tokens"


def test_a_time_budget_stops_the_trainer(tmp_path, monkeypatch):
    clock = iter(range(0, 1000, 5))  # every reading 5 s later: each step takes 5 s
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    stage = StageConfig(lr=0.01, lr_final=0.001, warmup_steps=1, max_time=22.0)
    progress, records = run(regression_trainer(tmp_path, stage_config=stage))
    assert [r["elapsed_s"] for r in records] == [5.0, 10.0, 15.0, 20.0, 25.0]
    assert records[-1]["lr"] == pytest.approx(schedule(Progress(step=4, elapsed=20.0), stage)[0])
    assert ended_by(progress, stage) == "max_time"


# ---- gradient accumulation ------------------------------------------------------------------------

def token_batches(batch_size: int, seq_len: int = 16, sequences: int = 24):
    """The same fixed sequences in the same order, cut into batches of `batch_size`."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 320, (sequences, seq_len + 1), generator=generator)
    for start in range(0, sequences, batch_size):
        chunk = ids[start:start + batch_size]
        yield {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:],
               "attention_mask": torch.ones(len(chunk), seq_len, dtype=torch.long)}


def student(align: bool) -> RWKVInsideForCausalLM:
    """The tiny teacher's student, training its time mixers; with align, the teacher's attentions beside
    them (stage 1). Its teacher is a copy of its own, not the one stage 2 reads."""
    torch.manual_seed(0)
    teacher = tiny_teacher()
    model = convert(teacher)
    if align:
        attach_teacher_attention(model, teacher)
    select_trainable(model, "mixers")
    return model


def frozen_teacher() -> nn.Module:
    return tiny_teacher().requires_grad_(False)


def padded_batches(seq_len: int = 12):
    """Right-padded batches of sequence lengths (12, 7), then (5, 9); like SFT, the first two positions
    and the last real one have no target: length - 3 targets per sequence."""
    generator = torch.Generator().manual_seed(1)
    for lengths in ((12, 7), (5, 9)) * 10:
        ids = torch.randint(3, 320, (2, seq_len), generator=generator)
        mask = torch.zeros(2, seq_len, dtype=torch.long)
        labels = torch.full((2, seq_len), -100)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
            labels[row, 2:length - 1] = ids[row, 3:length]
        yield {"input_ids": ids.masked_fill(mask == 0, 0), "labels": labels, "attention_mask": mask}


def in_pairs(batches):
    """Each two consecutive batches as one."""
    batches = iter(batches)
    for first, second in zip(batches, batches):
        yield {key: torch.cat([first[key], second[key]]) for key in first}


ACCUMULATION_BATCHES = {
    # (one batch of 4, micro-batches of 2)
    1: (lambda: token_batches(4), lambda: token_batches(2)),  # every micro-batch aligns 32 tokens
    3: (lambda: in_pairs(padded_batches()), padded_batches),  # micro-batches of 13 and 8 targets
}
ACCUMULATION_CASES = {  # stage 1 with its default alignment loss and with the plain MSE
    "stage1": (1, {}),
    "stage1-mse": (1, {"alignment_loss": "mse"}),
    "stage3": (3, {}),
}


@pytest.mark.parametrize("case", sorted(ACCUMULATION_CASES))
def test_gradient_accumulation_equals_one_big_batch(tmp_path, case):
    """The step's loss is the mean over all its tokens, however the micro-batches split them."""
    number, settings = ACCUMULATION_CASES[case]
    stage = StageConfig(lr=1e-3, lr_final=1e-4, warmup_steps=1, max_steps=3, **settings)
    results = []
    for name, batches, grad_accum in zip(("big", "accumulated"), ACCUMULATION_BATCHES[number], (1, 2)):
        model = student(align=number == 1)
        trainer = make_trainer(tmp_path / name, model, batches(), STAGES[number].step, stage,
                               STAGES[number].count_tokens, grad_accum=grad_accum)
        _, records = run(trainer)
        trained = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        results.append((records, trained))
    (big, big_weights), (accumulated, accumulated_weights) = results
    for a, b in zip(big, accumulated):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
    assert big[0]["loss"] != pytest.approx(big[-1]["loss"], rel=1e-6)  # the weights did move
    for name, weight in big_weights.items():
        # Summing the gradients in another order moves float32 results by ~1e-7 (relative), which
        # Adam's normalisation carries into a weight wherever a gradient is near 0 (|g| ~ eps = 1e-8):
        # up to ~2e-6 here; the steps themselves are ~1e-3, and a wrong weighting of the micro-batches
        # moves weights by a sizeable share of them.
        torch.testing.assert_close(accumulated_weights[name], weight, rtol=1e-5, atol=5e-6, msg=name)


# ---- non-finite losses ----------------------------------------------------------------------------

def test_a_nan_loss_skips_the_step_without_touching_weights_or_optimizer(tmp_path):
    trainer = regression_trainer(tmp_path, step=nan_on({3}))
    optimizer_state = {}

    def after_step(original=trainer.engine.finish_step):
        result = original()
        optimizer_state[len(optimizer_state) + 1] = copy.deepcopy(trainer.engine.optimizer.state_dict()["state"])
        return result

    trainer.engine.finish_step = after_step
    progress, records = run(trainer)
    weights = trainer.log.weights
    assert progress.step == 6 and progress.bad_steps == 0
    assert math.isnan(records[2]["loss"])
    for name in weights[2]:
        assert torch.equal(weights[3][name], weights[2][name]), name
        assert not torch.equal(weights[4][name], weights[3][name]), name  # training goes on
    assert all(torch.equal(optimizer_state[3][i][key], optimizer_state[2][i][key])
               for i in optimizer_state[2] for key in optimizer_state[2][i])
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)


def test_a_nan_in_one_micro_batch_skips_the_whole_step(tmp_path):
    trainer = regression_trainer(tmp_path, step=nan_on({4}), grad_accum=2)  # step 2's second micro-batch
    progress, _ = run(trainer)
    weights = trainer.log.weights
    assert all(torch.equal(weights[2][name], weights[1][name]) for name in weights[1])
    assert not all(torch.equal(weights[3][name], weights[2][name]) for name in weights[2])
    assert progress.step == 6


def test_max_bad_steps_in_a_row_stop_the_run(tmp_path):
    trainer = regression_trainer(tmp_path, step=nan_on({2, 3, 4}), max_bad_steps=3)
    with pytest.raises(UserError, match=r"NaN/inf for 3 steps in a row .*step 4"):
        run(trainer)
    weights = trainer.log.weights
    assert all(torch.equal(weights[3][name], weights[1][name]) for name in weights[1])


def test_bad_steps_that_are_not_in_a_row_do_not_stop_the_run(tmp_path):
    progress, records = run(regression_trainer(tmp_path, step=nan_on({2, 4, 6}), max_bad_steps=2))
    assert progress.step == 6 and len(records) == 6


# ---- token counting -------------------------------------------------------------------------------

@pytest.mark.parametrize("number, per_step", [(1, [19, 14]), (3, [13, 8])])
def test_padding_never_counts_as_trained_tokens(tmp_path, number, per_step):
    """Stage 1 trains every real position (attention_mask); stage 3 every target (labels != -100)."""
    stage = StageConfig(lr=1e-3, lr_final=1e-4, warmup_steps=1, max_steps=4, trainable="mixers")
    trainer = make_trainer(tmp_path, student(align=number == 1), padded_batches(), STAGES[number].step, stage,
                           STAGES[number].count_tokens)
    progress, records = run(trainer)
    assert [r["tokens_in_step"] for r in records] == per_step * 2
    assert progress.tokens == sum(per_step) * 2 == records[-1]["tokens"]


# ---- packed text: the all-ones mask stays on the host ---------------------------------------------------

class KeepingTheMask(Trainer):
    """The reference: every batch reaches the stage as the loader made it, an all-ones mask included."""

    def _micro_batch(self):
        return {key: value.to(self.engine.device) for key, value in next(self.loader).items()}


def with_packed_and_padded(batches):
    """token_batches, every third one with a padded last position (its mask then masks something)."""
    for i, batch in enumerate(batches):
        if i % 3 == 2:
            batch = dict(batch, attention_mask=batch["attention_mask"].clone(), labels=batch["labels"].clone())
            batch["attention_mask"][:, -1] = 0
            batch["labels"][:, -1] = -100
        yield batch


@pytest.mark.parametrize("number", [1, 2])
def test_a_packed_batch_trains_as_with_its_all_ones_mask(tmp_path, number):
    """The loop drops a mask that masks nothing before the batch moves to the device, and only then:
    the losses, gradients, weights and token counts are those of the batch with its mask (stage 1
    counts input_ids.numel() where the mask is gone, as many as the mask would)."""
    stage = StageConfig(lr=1e-3, lr_final=1e-4, warmup_steps=1, max_steps=3, ce_weight=0.5)
    results, seen = {}, {}
    for name, trainer_class in (("dropped", Trainer), ("kept", KeepingTheMask)):
        masks = seen.setdefault(name, [])

        def step(model, teacher, batch, stage_config, train, masks=masks):
            masks.append("attention_mask" in batch)
            return STAGES[number].step(model, teacher, batch, stage_config, train)

        model = student(align=number == 1)
        trainer = make_trainer(tmp_path / name, model, with_packed_and_padded(token_batches(2)), step, stage,
                               STAGES[number].count_tokens, teacher=frozen_teacher() if number == 2 else None,
                               trainer_class=trainer_class)
        _, records = run(trainer)
        results[name] = (records, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
    assert seen == {"dropped": [False, False, True], "kept": [True, True, True]}
    (dropped, dropped_weights), (kept, kept_weights) = results["dropped"], results["kept"]
    per_step = [32, 32, 30]  # 2 x 16 positions, all real and all targets but in the padded batch
    assert [r["tokens_in_step"] for r in dropped] == [r["tokens_in_step"] for r in kept] == per_step
    for a, b in zip(dropped, kept):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert dropped[0]["loss"] != pytest.approx(dropped[-1]["loss"], rel=1e-6)  # the weights did move
    for name, weight in kept_weights.items():
        torch.testing.assert_close(dropped_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)


# ---- train.compile --------------------------------------------------------------------------------

def test_train_compile_trains_as_eagerly(tmp_path):
    """train.compile (the time mixers compiled around their state update, the norms and MLPs, the
    teacher's too, and the loss) changes no loss, gradient
    norm or weight beyond float32 rounding: stage 2 of the tiny student, three steps. (Without the
    copies RWKV7TimeMixer.compile_around_state_update makes of its per-head outputs, torch 2.13
    fails here.)"""
    stage = StageConfig(lr=1e-3, lr_final=1e-4, warmup_steps=1, max_steps=3)
    results = {}
    torch._dynamo.reset()  # no compiled code or recompilation count left from other tests
    counters.clear()
    for compiled in (False, True):
        model, teacher = student(align=False), frozen_teacher()
        trainer = make_trainer(tmp_path / str(compiled), model, token_batches(2), STAGES[2].step, stage,
                               STAGES[2].count_tokens, teacher=teacher, compile=compiled)
        mixer = model.converted_attention()[model.rwkv_layers[0]].mixer
        assert ("mix" in vars(mixer)) == compiled  # the compiled wrapper shadows the method
        for mlp in (model.model.layers[0].mlp, teacher.model.layers[0].mlp):  # the teacher's too
            assert (mlp._compiled_call_impl is not None) == compiled
        _, records = run(trainer)
        results[compiled] = (records, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
    assert counters["stats"]["unique_graphs"] >= 5  # mix (first layer, later layer), readout, norm, MLP
    (eager, eager_weights), (compiled, compiled_weights) = results[False], results[True]
    for a, b in zip(eager, compiled, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert eager[0]["loss"] != pytest.approx(eager[-1]["loss"], rel=1e-6)  # the weights did move
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, rtol=1e-5, atol=5e-6, msg=name)


@pytest.mark.parametrize("engine_kind, warned", [("deepspeed", True), ("plain", False)])
def test_train_compile_under_deepspeed_warns_that_it_measured_slower(tmp_path, caplog, engine_kind, warned):
    model = student(align=False)
    config = Config(train=TrainConfig(compile=True), engine=EngineConfig(kind=engine_kind))
    engine = PlainEngine({n: p for n, p in model.named_parameters() if p.requires_grad}, config.train, CPU)
    Trainer(STAGES[2], config, model, None, iter([]), engine, tmp_path, SnapshotLog(tmp_path, model))
    assert ("consider train.compile=false" in caplog.text) == warned


def test_automatic_garbage_collection_is_off_during_a_stage_and_back_after(tmp_path, monkeypatch):
    """Full collections in the middle of GPU steps cost the host more than the steps' kernels; the
    loop collects the young generations itself between steps instead."""
    seen, collected = [], []
    monkeypatch.setattr(loop.gc, "collect", lambda generation=2: collected.append(generation))

    def step(*args) -> StepLoss:
        seen.append(gc.isenabled())
        return regression_step(*args)

    monkeypatch.setattr(loop, "COLLECT_GARBAGE_EVERY", 2)
    _, records = run(regression_trainer(tmp_path, step))
    assert len(records) == 6 and seen == [False] * 6 and gc.isenabled()
    assert collected == [1, 1, 1]  # before steps 1, 3 and 5


# ---- train.cuda_graph -----------------------------------------------------------------------------

def model_on(device: torch.device) -> SimpleNamespace:
    """What captures_steps reads of a teacher: where its input embedding lives."""
    return SimpleNamespace(get_input_embeddings=lambda: SimpleNamespace(weight=SimpleNamespace(device=device)))


def test_steps_are_captured_only_by_one_process_on_a_gpu_with_the_teacher_there():
    """Where the step could not be replayed whole, it runs eagerly: DeepSpeed (collectives and its own
    step), the CPU, or a teacher offloaded to the CPU, whose work would run once, at capture."""
    on_gpu = SimpleNamespace(capturable=True, device=torch.device("cuda"))
    assert captures_steps(Config(), on_gpu, None)
    assert captures_steps(Config(), on_gpu, model_on(torch.device("cuda", 0)))
    assert not captures_steps(Config(train=TrainConfig(cuda_graph=False)), on_gpu, None)
    assert not captures_steps(Config(), on_gpu, model_on(CPU))
    assert not captures_steps(Config(), PlainEngine({"w": nn.Parameter(torch.ones(2))}, TrainConfig(), CPU), None)
    assert not DeepSpeedEngine.__new__(DeepSpeedEngine).capturable
