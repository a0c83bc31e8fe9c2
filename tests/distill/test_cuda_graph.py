"""The training step replayed from a CUDA graph trains exactly as the eager step (GPU only)."""

import dataclasses
import logging

import pytest
import torch

from rwkvinside.config import Config, StageConfig, TrainConfig
from rwkvinside.distill.cuda_graph import WARMUP_STEPS
from rwkvinside.distill.engine import PlainEngine
from rwkvinside.distill.loop import Progress, Trainer
from rwkvinside.distill.metrics import RunLog, read_log
from rwkvinside.distill.stages import STAGES, StepLoss

from .test_loop import frozen_teacher, student, token_batches

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("fla_untuned")]

CUDA = torch.device("cuda")
STEPS = WARMUP_STEPS + 4  # eager warm-up, the captured step, replays
LR = 1e-3


def gpu_trainer(folder, number, batches, cuda_graph, step=None, **train) -> Trainer:
    model = student(align=number == 1).cuda()
    teacher = frozen_teacher().cuda() if number == 2 else None
    stage_config = StageConfig(lr=LR, lr_final=LR / 10, warmup_steps=2, max_steps=STEPS, weight_decay=0.1)
    config = Config(train=TrainConfig(cuda_graph=cuda_graph, **train), stage1=stage_config, stage2=stage_config)
    stage = STAGES[number] if step is None else dataclasses.replace(STAGES[number], step=step)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    engine = PlainEngine(trainable, config.train, CUDA)
    log = RunLog(folder, f"stage{number}", None, progress=False, tensorboard=False)
    return Trainer(stage, config, model, teacher, batches, engine, folder, log)


def train(trainer: Trainer) -> tuple[list[dict], dict[str, torch.Tensor]]:
    try:
        trainer.run(Progress())
    finally:
        trainer.log.close()
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return read_log(trainer.folder / "log.jsonl"), weights


def assert_same_training(eager, graphed, eager_again):
    """Every loss and gradient norm as in the eager run, every weight within 2% of one learning-rate
    step of it. The replayed kernels are the eager step's, but cuBLAS may choose other algorithms
    for the capture stream: their sums round differently (float32 epsilon), and AdamW turns a gradient
    of rounding noise (a LoRA factor that starts at zero) into steps of up to the learning rate; a
    KL of 0.02, a small difference of large log-probabilities, then moves by 2e-5 of itself. Two
    eager runs agree exactly; a learning rate or weight decay left stale in the graph moves weights
    by a sizeable fraction of a step."""
    (eager_records, eager_weights), (graphed_records, graphed_weights) = eager, graphed
    for a, b in zip(eager_records, graphed_records, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["tokens_in_step"] == b["tokens_in_step"]
    assert eager_records[0]["loss"] != pytest.approx(eager_records[-1]["loss"], rel=1e-6)  # it trained
    differences = {name: float((graphed_weights[name] - w).abs().max()) for name, w in eager_weights.items()}
    spreads = {name: float((eager_again[1][name] - w).abs().max()) for name, w in eager_weights.items()}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 0.02 * LR + 2 * spreads[worst], (
        f"{worst}: differs from the eager run by up to {differences[worst]:.3g} (a second eager run: "
        f"{spreads[worst]:.3g})")


def train_three_times(tmp_path, number, batches, step=None, **train_settings) -> tuple[list, Trainer]:
    """Eager, eager again, replayed from a CUDA graph: the three runs and the last run's trainer.
    batches: makes the batch iterator, afresh for each run."""
    runs = []
    for name, cuda_graph in (("eager", False), ("again", False), ("graphed", True)):
        trainer = gpu_trainer(tmp_path / name, number, batches(), cuda_graph, step, **train_settings)
        runs.append(train(trainer))
    return runs, trainer


@pytest.mark.parametrize("number, compiled", [(1, False), (2, False), (1, True), (2, True)])
def test_the_replayed_step_trains_as_the_eager_step(tmp_path, number, compiled):
    """Stage 1 and stage 2, eager and with train.compile, two micro-batches a step."""
    (eager, again, graphed), trainer = train_three_times(tmp_path, number, lambda: token_batches(2),
                                                         grad_accum=2, compile=compiled)
    assert trainer.captured.replays == STEPS - WARMUP_STEPS  # the capture step replays too
    assert trainer.captured.graph is None  # given back at the end of the stage
    assert_same_training(eager, graphed, again)


def with_padding_at(steps: set[int]):
    """Packed batches (their all-ones mask dropped by the loop), but those of the given steps padded."""
    for step, batch in enumerate(token_batches(2, sequences=2 * STEPS), start=1):
        if step in steps:
            batch["attention_mask"][1, -3:] = 0
        yield batch


def test_a_padded_batch_after_capture_runs_eagerly_and_the_replays_go_on(tmp_path):
    (eager, again, graphed), trainer = train_three_times(tmp_path, 2, lambda: with_padding_at({WARMUP_STEPS + 2}))
    assert trainer.captured.replays == STEPS - WARMUP_STEPS - 1
    assert_same_training(eager, graphed, again)


def test_a_step_that_cannot_be_captured_runs_eagerly_with_a_warning(tmp_path, caplog):
    def reads_back(*args) -> StepLoss:
        out = STAGES[2].step(*args)
        out.loss.item()  # a read back to the host: capture fails on it
        return out

    with caplog.at_level(logging.WARNING):
        (eager, again, graphed), trainer = train_three_times(tmp_path, 2, lambda: token_batches(2), reads_back)
    assert trainer.captured.failed and trainer.captured.replays == 0
    assert "capturing the training step in a CUDA graph failed" in caplog.text
    assert_same_training(eager, graphed, again)
    torch.randn(1, device=CUDA)  # the failed capture left the random generator usable
