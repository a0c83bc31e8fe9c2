"""`rwkvinside distill`: from a teacher to a trained student, one stage after another.

    <output>/
        config.yaml             the resolved configuration
        run.json                the stage plan and where it started
        stage1/ stage2/ stage3/ log.jsonl, tensorboard/, checkpoints/, student/ (the stage's output)
        stage1/alignment.png    per-layer alignment losses
        report.json, report.md  tokens, time, final losses, held-out perplexities

Each stage starts from the previous stage's student (or --init-from); --resume skips finished
stages and continues the unfinished one from its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rwkvinside.config import Config, load_config, save_config
from rwkvinside.data import DataConfig as LoaderConfig
from rwkvinside.data import build_train_loader, heldout_batches, resolve_sources
from rwkvinside.distill.checkpoint import checkpoints, load_checkpoint
from rwkvinside.distill.engine import (launched_world, leave_process_group, make_engine, read_deepspeed_json,
                                       resolve_device, resolve_dtype)
from rwkvinside.distill.loop import Progress, Trainer
from rwkvinside.distill.metrics import RunLog, plot_alignment, read_log
from rwkvinside.distill.stages import STAGES, Stage
from rwkvinside.errors import UserError
from rwkvinside.evaluation.perplexity import perplexity, teacher_hidden_fn
from rwkvinside.modeling.hybrid import ConversionSpec, HybridModel
from rwkvinside.modeling.loading import load_teacher, resolve_teacher
from rwkvinside.modeling.student import load_student, read_metadata, save_student

logger = logging.getLogger(__name__)

STUDENT = "student"


@dataclass
class RunPlan:
    """What `distill` was asked to do; saved as run.json so --resume repeats it."""

    stages: list[int]
    init_from: str | None = None


def plan_stages(stage: str, config: Config) -> list[int]:
    if stage == "all":
        return [1, 2, 3] if config.data.chat else [1, 2]
    if stage not in ("1", "2", "3"):
        raise UserError(f"--stage must be 1, 2, 3 or all, not '{stage}'")
    return [int(stage)]


def new_run_folder(root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder, n = root / stamp, 1
    while folder.exists():
        n += 1
        folder = root / f"{stamp}-{n}"
    return folder


def prepare_output(output: str | None, resume: bool, overwrite: bool, rank: int, world_size: int) -> Path:
    """The run folder, checked but not yet touched (an --overwrite replaces it only once the
    configuration and the inputs are known to be valid)."""
    if output is None:
        if resume:
            raise UserError("--resume needs --output: the folder of the run to continue")
        if world_size > 1:
            raise UserError("give --output when launching several processes, so they share one folder")
        return new_run_folder()
    folder = Path(output)
    holds_run = folder.is_dir() and any(folder.iterdir())
    if resume:
        if not (folder / "run.json").is_file():
            raise UserError(f"--resume: '{folder}' holds no run to continue (no run.json); check --output")
    elif holds_run and not overwrite and rank == 0:  # other ranks may already see rank 0's files
        raise UserError(f"output folder '{folder}' already holds files; pass --resume to continue that run, "
                        "--overwrite to replace it, or choose another --output")
    elif folder.exists() and not folder.is_dir():
        raise UserError(f"--output '{folder}' is a file; give a folder")
    return folder


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Teachers:
    """The teacher, loaded once per run: each stage that converts or consults it gets a copy
    only if a later stage still needs it."""

    def __init__(self, config: Config, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        self._model: nn.Module | None = None
        self.tokenizer = None

    def _load(self) -> nn.Module:
        if self._model is None:
            logger.info("loading teacher %s", self.config.teacher.source)
            self._model, self.tokenizer = load_teacher(self.config.teacher.source, dtype=self.dtype,
                                                       device="cpu",
                                                       trust_remote_code=self.config.teacher.trust_remote_code)
        return self._model

    def get(self, keep: bool, device: torch.device | None = None) -> nn.Module:
        model = self._load()
        if keep:
            model = copy.deepcopy(model)
        else:
            self._model = None
        return model.to(device or self.device)


def stage_data(stage: Stage, config: Config) -> list[str]:
    paths = config.data.chat if stage.data == "chat" else config.data.train
    if not paths:
        flag = "data.chat=PATH (chat JSONL/Parquet with `messages`)" if stage.data == "chat" else "--data PATH"
        raise UserError(f"stage {stage.number} ({stage.name}) has no training data; give {flag}")
    return paths


def check_inputs(config: Config, plan: RunPlan) -> None:
    """Fail on a wrong plan or a missing teacher, data path or --init-from folder before anything is
    written or loaded."""
    first = plan.stages[0]
    if plan.init_from is not None and first == 1:
        raise UserError("--init-from applies to stages 2 and 3; stage 1 starts from the teacher")
    if plan.init_from is None and first != 1:
        raise UserError(f"stage {first} starts from a student: give --init-from with the "
                        "output of the previous stage (e.g. runs/<run>/stage1/student)")
    stages = [STAGES[number] for number in plan.stages]
    if any(stage.aligns or stage.needs_teacher for stage in stages):
        resolve_teacher(config.teacher.source)
    for stage in stages:
        resolve_sources(stage_data(stage, config))
    if config.data.eval and config.data.eval_tokens:
        resolve_sources(config.data.eval)
    if plan.init_from is not None:
        read_metadata(Path(plan.init_from))
    if config.engine.kind == "deepspeed" and config.engine.deepspeed_config:
        read_deepspeed_json(config.engine.deepspeed_config)


def loader_for(stage: Stage, config: Config, tokenizer, rank: int, world_size: int):
    paths = stage_data(stage, config)
    loader_config = LoaderConfig(paths=list(paths), seq_len=config.data.seq_len, batch_size=config.train.batch_size,
                                 seed=config.data.seed, streaming=config.data.streaming,
                                 shuffle_buffer=config.data.shuffle_buffer)
    return build_train_loader(loader_config, tokenizer, chat=stage.data == "chat", rank=rank, world_size=world_size)


def heldout_perplexity(hidden, head, config: Config, tokenizer, device) -> tuple[float, int] | None:
    if not config.data.eval or not config.data.eval_tokens:
        return None
    batches = heldout_batches(config.data.eval, tokenizer, config.data.seq_len, batch_size=config.train.batch_size)
    return perplexity(hidden, head, batches, device, max_tokens=config.data.eval_tokens, chunk=config.train.loss_chunk)


class Pipeline:
    def __init__(self, config: Config, folder: Path, plan: RunPlan, resume: bool):
        self.config = config
        self.folder = folder
        self.plan = plan
        self.resume = resume
        self.rank, self.local_rank, self.world_size = launched_world()
        self.device = resolve_device(config.train, self.local_rank)
        self.dtype = resolve_dtype(config.train, self.device)
        self.teachers = Teachers(config, self.device, self.dtype)
        self.report: dict[str, Any] = {"output": str(folder), "stages": {}}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def run(self) -> dict[str, Any]:
        previous = Path(self.plan.init_from) if self.plan.init_from else None
        self._baseline()
        for number in self.plan.stages:
            previous = self._stage(number, previous)
        self._write_report()
        return self.report

    def _later_needs_teacher(self, number: int) -> bool:
        return any(STAGES[n].needs_teacher or (STAGES[n].aligns and n != number)
                   for n in self.plan.stages if n > number)

    def _baseline(self) -> None:
        """Held-out perplexity of the teacher and of the freshly converted student, for the report."""
        scores = self.config.data.eval and self.config.data.eval_tokens
        if not scores or self.plan.stages[0] != 1 or "baseline" in self.report:
            return
        teacher = self.teachers.get(keep=True)
        tokenizer = self.teachers.tokenizer
        teacher_ppl = heldout_perplexity(teacher_hidden_fn(teacher), teacher.get_output_embeddings(), self.config,
                                         tokenizer, self.device)
        seed_everything(self.config.train.seed)  # the very student stage 1 starts from
        fresh = HybridModel(teacher, self._spec(), align=False)
        fresh_ppl = heldout_perplexity(fresh.hidden_states, fresh.lm_head, self.config, tokenizer, self.device)
        self.report["baseline"] = {"teacher_ppl": teacher_ppl[0], "fresh_student_ppl": fresh_ppl[0],
                                   "eval_tokens": teacher_ppl[1]}
        logger.info("held-out perplexity: teacher %.2f, freshly converted student %.2f", teacher_ppl[0], fresh_ppl[0])
        del fresh, teacher

    def _spec(self) -> ConversionSpec:
        c = self.config.convert
        return ConversionSpec(layers=tuple(c.layers) if c.layers is not None else None, head_size=c.head_size,
                              init=c.init)

    def _build(self, stage: Stage, previous: Path | None) -> tuple[HybridModel, Any, nn.Module | None]:
        if stage.aligns:
            seed_everything(self.config.train.seed)
            teacher = self.teachers.get(keep=self._later_needs_teacher(stage.number))
            model, tokenizer = HybridModel(teacher, self._spec(), align=True), self.teachers.tokenizer
        else:
            model, tokenizer, _ = load_student(previous, dtype=self.dtype, device=self.device)
        full_teacher = None
        if stage.needs_teacher:
            on_cpu = self.config.train.teacher_device == "cpu"
            full_teacher = self.teachers.get(keep=self._later_needs_teacher(stage.number),
                                             device=torch.device("cpu") if on_cpu else None)
            full_teacher.requires_grad_(False).eval()
        if tokenizer is None:
            raise UserError(f"the student checkpoint {previous} has no tokenizer files; re-run the stage that wrote it")
        return model, tokenizer, full_teacher

    def _stage(self, number: int, previous: Path | None) -> Path:
        stage, stage_config = STAGES[number], self.config.stage(number)
        folder = self.folder / f"stage{number}"
        student_folder = folder / STUDENT
        if self.resume and student_folder.is_dir():
            logger.info("stage %d already finished; using %s", number, student_folder)
            self.report["stages"][number] = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
            return student_folder
        logger.info("stage %d: %s", number, stage.name)
        model, tokenizer, teacher = self._build(stage, previous)
        model.select_trainable(stage_config.trainable)
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if self.config.train.activation_checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loader = loader_for(stage, self.config, tokenizer, self.rank, self.world_size)
        engine = make_engine(model, trainable, self.config.train, self.config.engine, self.device, self.dtype)
        progress = Progress()
        saved = checkpoints(folder) if self.resume else []
        if saved:
            state = load_checkpoint(saved[-1], engine)
            progress = Progress(**state["progress"])
            loader.load_state_dict(state["data"])
            logger.info("resuming stage %d from %s (step %d)", number, saved[-1], progress.step)
        log = RunLog(folder if self.is_main else None, f"stage{number}", stage_config.max_steps or None,
                     self.config.log.progress, self.config.log.tensorboard, initial_step=progress.step)
        trainer = Trainer(stage, self.config, model, teacher, loader, engine, folder, log)
        try:
            progress = trainer.run(progress)
        finally:
            log.close()
        summary = self._summarise(stage, folder, progress, model, tokenizer)
        weights = engine.whole_weights(model)
        if self.is_main:
            provenance = {"teacher": self.config.teacher.source, "stage": number, "tokens": progress.tokens,
                          "steps": progress.step, "history": self._history(previous, number, progress)}
            # the student folder marks the stage as finished for --resume: the summary goes first
            (folder / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
            save_student(model, tokenizer, student_folder, provenance, weights)
        engine.barrier()
        self.report["stages"][number] = summary
        return student_folder

    def _history(self, previous: Path | None, number: int, progress: Progress) -> list[dict[str, Any]]:
        history = []
        if previous is not None:
            history = json.loads((previous / "rwkvinside.json").read_text(encoding="utf-8")).get("history", [])
        return history + [{"stage": number, "tokens": progress.tokens, "steps": progress.step}]

    def _summarise(self, stage: Stage, folder: Path, progress: Progress, model: HybridModel, tokenizer) -> dict:
        summary: dict[str, Any] = {"stage": stage.number, "name": stage.name, **asdict(progress)}
        log_path = folder / "log.jsonl"
        if self.is_main and log_path.is_file():
            records = read_log(log_path)
            if records:
                last = records[-1]
                summary["final"] = {k: v for k, v in last.items() if k not in ("stage",) and not k.startswith("align/")}
                if stage.aligns:
                    plot_alignment(records, folder / "alignment.png")
                    summary["final_alignment_by_layer"] = {k: v for k, v in last.items() if k.startswith("align/")}
        if model.aligning:
            model.drop_teacher_attention()
        model.eval()
        student_ppl = heldout_perplexity(model.hidden_states, model.lm_head, self.config, tokenizer, self.device)
        if student_ppl is not None:
            summary["student_ppl"], summary["eval_tokens"] = student_ppl
            logger.info("stage %d: held-out perplexity of the student %.2f", stage.number, student_ppl[0])
        return summary

    def _write_report(self) -> None:
        if not self.is_main:
            return
        (self.folder / "report.json").write_text(json.dumps(self.report, indent=2), encoding="utf-8")
        (self.folder / "report.md").write_text(render_report(self.report), encoding="utf-8")


def render_report(report: dict[str, Any]) -> str:
    lines = [f"# Distillation report: {report['output']}", ""]
    base = report.get("baseline")
    if base:
        lines += [f"Held-out perplexity ({base['eval_tokens']} tokens): teacher {base['teacher_ppl']:.2f}, "
                  f"freshly converted student {base['fresh_student_ppl']:.2f}.", ""]
    lines += ["| stage | steps | tokens | time (s) | final loss | student ppl |", "|---|---|---|---|---|---|"]
    for number, s in sorted(report["stages"].items(), key=lambda item: int(item[0])):
        loss = s.get("final", {}).get("loss")
        ppl = s.get("student_ppl")
        lines.append(f"| {number} ({s['name']}) | {s['step']} | {s['tokens']} | {s['elapsed']:.0f} | "
                     f"{'' if loss is None else f'{loss:.4g}'} | {'' if ppl is None else f'{ppl:.2f}'} |")
    return "\n".join(lines) + "\n"


def distill(config_path: str | None, overrides: list[str], stage: str, output: str | None, init_from: str | None,
            resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The `distill` command: resolve config and output folder, then run the planned stages.
    Returns the report on the main process, None on the others."""
    rank, _, world_size = launched_world()
    folder = prepare_output(output, resume, overwrite, rank, world_size)
    if resume:
        config = load_config(folder / "config.yaml", overrides)
        plan = RunPlan(**json.loads((folder / "run.json").read_text(encoding="utf-8")))
    else:
        config = load_config(config_path, overrides)
        plan = RunPlan(stages=plan_stages(stage, config), init_from=init_from)
    check_inputs(config, plan)
    if not resume and rank == 0:
        if overwrite and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_config(config, folder / "config.yaml")
        (folder / "run.json").write_text(json.dumps(asdict(plan)), encoding="utf-8")
    started = time.monotonic()
    try:
        report = Pipeline(config, folder, plan, resume).run()
    finally:
        leave_process_group()
    report["wall_time_s"] = time.monotonic() - started
    return report if rank == 0 else None
