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

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rwkvinside.config import (Config, WeightedPath, load_config, resolve_device, resolve_dtype, save_config,
                               train_entries)
from rwkvinside.data import build_train_loader, eos_id, pad_id, resolve_sources
from rwkvinside.distill.checkpoint import checkpoints, load_checkpoint
from rwkvinside.distill.engine import (join_process_group, launched_world, leave_process_group, make_engine,
                                       read_deepspeed_json, sum_over_processes)
from rwkvinside.distill.loop import Progress, Trainer, ended_by
from rwkvinside.distill.metrics import SPIKE_FACTOR, SPIKE_WINDOW, RunLog, gradient_spikes, plot_alignment, read_log
from rwkvinside.distill.stages import STAGES, Stage
from rwkvinside.errors import UserError
from rwkvinside.evaluation.compare import WINDOW_START, compare_on_file
from rwkvinside.modeling.alignment import (alignment_losses, attach_teacher_attention, calibrate_output_scale,
                                           detach_teacher_attention, is_aligning, learning_rate_scales,
                                           select_trainable, swap_scores)
from rwkvinside.modeling.convert import ConversionSpec, convert, keep_teacher_attention
from rwkvinside.modeling.loading import load_teacher, resolve_teacher
from rwkvinside.modeling.student import RWKVInsideForCausalLM
from rwkvinside.modeling.student_folder import (STUDENT, load_student, read_metadata, resolve_student_folder,
                                               save_student, student_config)

logger = logging.getLogger(__name__)



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


class Teacher:
    """The teacher, loaded once per run on first use and kept while a stage still needs it.

    Converting and aligning use it on the training device; stage 2's logits come from it on the CPU
    instead when train.teacher_device is "cpu" (`model(offloaded=True)` moves it there).
    """

    def __init__(self, config: Config, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        self._model: nn.Module | None = None
        self._tokenizer = None

    def model(self, offloaded: bool = False) -> nn.Module:
        if self._model is None:
            logger.info("loading teacher %s", self.config.teacher.source)
            self._model, self._tokenizer = load_teacher(
                self.config.teacher.source, dtype=self.dtype, device="cpu",
                trust_remote_code=self.config.teacher.trust_remote_code)
            self._model.requires_grad_(False)
        on_cpu = offloaded and self.config.train.teacher_device == "cpu"
        return self._model.to(torch.device("cpu") if on_cpu else self.device).eval()

    def tokenizer(self):
        self.model()
        return self._tokenizer

    def release(self) -> None:
        self._model = None


def stage_data(stage: Stage, config: Config) -> list[str | WeightedPath]:
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
        raise UserError(f"stage {first} starts from a student: give --init-from with the output of the "
                        "previous stage (its run folder, or e.g. runs/<run>/stage1/student)")
    stages = [STAGES[number] for number in plan.stages]
    if any(stage.aligns or stage.needs_teacher for stage in stages):
        resolve_teacher(config.teacher.source)
    for stage in stages:
        resolve_sources([path for path, _ in train_entries(stage_data(stage, config))])
    if config.data.eval and config.data.eval_tokens:
        resolve_sources(config.data.eval)
    if plan.init_from is not None:
        folder = resolve_student_folder(plan.init_from)
        reads_lead = student_config(folder, read_metadata(folder)).lead_token_id is not None
        if reads_lead != config.convert.lead:
            raise UserError(f"the student in '{folder}' {'reads' if reads_lead else 'has no'} lead token but "
                            f"convert.lead is {str(config.convert.lead).lower()}; the training windows follow "
                            f"the student: pass convert.lead={str(reads_lead).lower()}")
    if config.engine.kind == "deepspeed" and config.engine.deepspeed_config:
        read_deepspeed_json(config.engine.deepspeed_config)
    if config.convert.keep_attention and 1 in plan.stages and config.engine.kind == "deepspeed" \
            and config.engine.zero_stage == 3:
        raise UserError("convert.keep_attention rebuilds the student after stage 1, which needs its weights whole; "
                        "use engine.zero_stage 0-2 for stage 1")


def loader_for(stage: Stage, config: Config, tokenizer, rank: int, world_size: int):
    # A student with a lead reads it as the first of its data.seq_len tokens (windows one token shorter),
    # so that it reads the length it is configured, sized and compiled for, not one more.
    data = replace(config.data, seq_len=config.data.seq_len - 1) if config.convert.lead else config.data
    return build_train_loader(data, stage_data(stage, config), config.train.batch_size, tokenizer,
                              chat=stage.data == "chat", rank=rank, world_size=world_size)


def conversion_spec(config: Config, tokenizer) -> ConversionSpec:
    c = config.convert
    return ConversionSpec(layers=tuple(c.layers) if c.layers is not None else None, head_size=c.head_size,
                          init=c.init, untie_embeddings=c.untie_embeddings,
                          lead_token_id=eos_id(tokenizer) if c.lead else None)


class Pipeline:
    def __init__(self, config: Config, folder: Path, plan: RunPlan, resume: bool):
        self.config = config
        self.folder = folder
        self.plan = plan
        self.resume = resume
        self.rank, self.local_rank, self.world_size = launched_world()
        self.device = resolve_device(config.train.device, self.local_rank)
        self.dtype = resolve_dtype(config.train.dtype, self.device)
        self.teacher = Teacher(config, self.device, self.dtype)
        # whether a training window may start mid-text with no EOS before the student's first token
        windows_cut_mid_text = not config.convert.lead and config.data.eos_first_fraction < 1
        self.report: dict[str, Any] = {"output": str(folder), "stages": {},
                                       "windows_cut_mid_text": windows_cut_mid_text}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def run(self) -> dict[str, Any]:
        previous = Path(self.plan.init_from) if self.plan.init_from else None
        join_process_group(self.config.engine, self.device)
        self._baseline()
        for number in self.plan.stages:
            previous = self._stage(number, previous)
        if self.is_main:  # from the saved student: no collective (ZeRO-3) is left to take part in
            student, tokenizer, _ = load_student(previous, dtype=self.dtype, device=self.device)
            self.report["continuations"] = self._continuations(student, tokenizer)
        self.teacher.release()
        self._write_report()
        return self.report

    def _teacher_needed_after(self, number: int) -> bool:
        return any(STAGES[n].needs_teacher or STAGES[n].aligns for n in self.plan.stages if n > number)


    def _heldout(self, model: nn.Module, teacher: nn.Module | None, tokenizer) -> list[dict[str, Any]] | None:
        """Each held-out file's scores (data.eval_tokens target tokens of it), with the teacher beside
        the model where one is given; None when data.eval or data.eval_tokens is unset."""
        data = self.config.data
        if not data.eval or not data.eval_tokens:
            return None
        model.eval()
        return [compare_on_file(path, model, teacher, tokenizer, data.seq_len, self.config.train.batch_size,
                                self.device, data.eval_tokens, self.config.train.loss_chunk)
                for path in resolve_sources(data.eval)]

    def _baseline(self) -> None:
        """Held-out scores of the teacher, for the report (the freshly converted student's follow in
        stage 1, once it is the student that stage trains from)."""
        if self.plan.stages[0] != 1 or "baseline" in self.report:
            return
        teacher_scores = self._heldout(self.teacher.model(), None, self.teacher.tokenizer())
        if teacher_scores is None:
            return
        self.report["baseline"] = {"teacher": teacher_scores}
        for scores in teacher_scores:
            logger.info("held-out %s: perplexity of the teacher %.2f", Path(scores["path"]).name,
                        scores["student_ppl"])

    def _score_fresh_student(self, student: RWKVInsideForCausalLM, tokenizer) -> None:
        """Stage 1's student before its first step, beside the teacher: the report's starting point."""
        if "baseline" not in self.report:
            return
        teacher = self.teacher.model()
        detach_teacher_attention(student)  # its own outputs flow on, as after training
        fresh = self._heldout(student, teacher, tokenizer)
        attach_teacher_attention(student, teacher)
        self.report["baseline"]["fresh_student"] = fresh
        for scores in fresh:
            logger.info("held-out %s: perplexity of the freshly converted student %.2f",
                        Path(scores["path"]).name, scores["student_ppl"])

    def _build(self, stage: Stage, previous: Path | None) -> tuple[RWKVInsideForCausalLM, Any, nn.Module | None]:
        """The stage's student (stage 1 converts the teacher and attaches its attentions; later stages
        load the previous stage's student), its tokenizer, and the whole teacher where the stage needs it."""
        if stage.aligns:
            seed_everything(self.config.train.seed)
            teacher = self.teacher.model()
            tokenizer = self.teacher.tokenizer()
            student = convert(teacher, conversion_spec(self.config, tokenizer))
            attach_teacher_attention(student, teacher)
        else:
            student, tokenizer, _ = load_student(previous, dtype=self.dtype, device=self.device)
            if tokenizer is None:
                raise UserError(f"the student {previous} has no tokenizer files; re-run the stage that wrote it")
        return student, tokenizer, self.teacher.model(offloaded=True) if stage.needs_teacher else None

    def _stage(self, number: int, previous: Path | None) -> Path:
        stage, stage_config = STAGES[number], self.config.stage(number)
        folder = self.folder / f"stage{number}"
        student_folder = folder / STUDENT
        if self.resume and student_folder.is_dir():
            logger.info("stage %d already finished; using %s", number, student_folder)
            self.report["stages"][number] = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
            return student_folder
        logger.info("stage %d: %s", number, stage.name)
        student, tokenizer, teacher = self._build(stage, previous)
        loader = loader_for(stage, self.config, tokenizer, self.rank, self.world_size)
        saved = checkpoints(folder) if self.resume else []
        if stage.aligns and self.config.convert.init == "teacher" and not saved:
            batch = self._batches(loader, 1)[0]
            factors = calibrate_output_scale(student, batch["input_ids"], batch["attention_mask"],
                                             reduce=sum_over_processes)
            logger.info("stage 1: output scale calibrated per layer (factors %.3g to %.3g)",
                        min(factors.values()), max(factors.values()))
        if stage.aligns and not saved:
            self._score_fresh_student(student, tokenizer)
        trainable = select_trainable(student, stage_config.trainable)
        if self.config.train.activation_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine = make_engine(student, trainable, self.config.train, self.config.engine, self.device, self.dtype,
                             learning_rate_scales(student, trainable, stage_config.teacher_lr_scale))
        progress = Progress()
        if saved:
            state = load_checkpoint(saved[-1], engine)
            progress = Progress(**state["progress"])
            loader.load_state_dict(state["data"])
            logger.info("resuming stage %d from %s (step %d)", number, saved[-1], progress.step)
        log = RunLog(folder if self.is_main else None, f"stage{number}", stage_config.max_steps or None,
                     self.config.log.progress, self.config.log.tensorboard, initial_step=progress.step)
        trainer = Trainer(stage, self.config, student, teacher, loader, engine, folder, log)
        try:
            progress = trainer.run(progress)
        finally:
            log.close()
        kept = None
        if stage.aligns and self.config.convert.keep_attention:
            student, kept = self._keep_attention(student, loader, engine)
        if is_aligning(student):
            detach_teacher_attention(student)
        summary = self._summarise(stage, folder, progress, student, tokenizer)
        if kept is not None:
            summary["kept_attention"] = kept
        if not self._teacher_needed_after(number) and number != self.plan.stages[-1]:
            self.teacher.release()
        weights = engine.whole_weights(student)
        if self.is_main:
            student.config.trained_context = self.config.data.seq_len
            provenance = {"teacher": self.config.teacher.source, "run": str(self.folder.resolve()),
                          "stage": number, "tokens": progress.tokens, "steps": progress.step,
                          "history": self._history(previous, number, progress)}
            # the student folder marks the stage as finished for --resume: the summary goes first
            (folder / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
            save_student(student, tokenizer, student_folder, provenance, weights)
        engine.barrier()
        self.report["stages"][number] = summary
        return student_folder

    def _continuations(self, student: RWKVInsideForCausalLM, tokenizer) -> list[dict[str, str | None]]:
        """The final student's and the teacher's greedy continuations of the same prompts (the chat one
        through the tokenizer's chat template, where it has one)."""
        uses_teacher = any(STAGES[n].aligns or STAGES[n].needs_teacher for n in self.plan.stages)
        teacher = self.teacher.model() if uses_teacher else None
        prompts = list(CONTINUATION_PROMPTS)
        if tokenizer.chat_template:
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], tokenize=False,
                                                         add_generation_prompt=True))
        student.eval()
        rows = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
            row = {"prompt": prompt}
            for name, model in (("student", student), ("teacher", teacher)):
                row[name] = None
                if model is not None:
                    with torch.no_grad():
                        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=CONTINUATION_TOKENS,
                                             do_sample=False, pad_token_id=pad_id(tokenizer))
                    row[name] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            rows.append(row)
        return rows

    def _batches(self, loader, count: int) -> list[dict[str, torch.Tensor]]:
        """The next `count` training batches on the device, as the model takes them."""
        batches = [next(loader) for _ in range(count)]
        return [{"input_ids": b["input_ids"].to(self.device), "attention_mask": b["attention_mask"].to(self.device),
                 "labels": b["labels"].to(self.device)} for b in batches]

    def _keep_attention(self, student: RWKVInsideForCausalLM, loader, engine) -> tuple[RWKVInsideForCausalLM, dict]:
        """keep_attention: score every candidate layer on two fresh training batches (the same scores
        on every process: they are averaged), give the worst back to the teacher's attention."""
        convert_config = self.config.convert
        candidates = list(student.rwkv_layers[1:])  # the first converted layer makes v_first
        batches = self._batches(loader, 2)
        student.eval()
        with torch.no_grad():
            if convert_config.keep_criterion == "kl":
                scores = swap_scores(student, self.teacher.model(), batches, candidates, self.config.train.loss_chunk)
            else:
                relative = self.config.stage1.alignment_loss == "relative"
                losses = [alignment_losses(student, b["input_ids"], b["attention_mask"], relative=relative)
                          for b in batches]
                scores = {i: float(sum(loss[i] for loss in losses) / len(losses)) for i in candidates}
        averaged = engine.all_reduce_sum(torch.tensor([scores[i] for i in candidates], device=self.device))
        scores = dict(zip(candidates, (averaged / self.world_size).tolist()))
        kept = sorted(sorted(candidates, key=scores.get, reverse=True)[:convert_config.keep_attention])
        logger.info("keeping attention in layers %s (%s: %s)", kept, convert_config.keep_criterion,
                    {i: round(v, 4) for i, v in scores.items()})
        detach_teacher_attention(student)
        student = keep_teacher_attention(student, self.teacher.model(), kept)
        return student, {"criterion": convert_config.keep_criterion, "layers": kept,
                         "scores": {str(i): v for i, v in scores.items()}}

    def _history(self, previous: Path | None, number: int, progress: Progress) -> list[dict[str, Any]]:
        history = read_metadata(previous).get("history", []) if previous is not None else []
        return history + [{"stage": number, "tokens": progress.tokens, "steps": progress.step}]

    def _summarise(self, stage: Stage, folder: Path, progress: Progress, student: RWKVInsideForCausalLM,
                   tokenizer) -> dict:
        stage_config = self.config.stage(stage.number)
        summary: dict[str, Any] = {"stage": stage.number, "name": stage.name, **asdict(progress),
                                   "ended_by": ended_by(progress, stage_config)}
        log_path = folder / "log.jsonl"
        if self.is_main and log_path.is_file():
            records = read_log(log_path)
            if records:
                last = records[-1]
                summary["final"] = {k: v for k, v in last.items() if k not in ("stage",) and not k.startswith("align/")}
                summary["gradient_spikes"] = gradient_spikes(records)
                if stage.aligns:
                    plot_alignment(records, folder / "alignment.png")
                    summary["final_alignment_by_layer"] = {k: v for k, v in last.items() if k.startswith("align/")}
        uses_teacher = any(STAGES[n].aligns or STAGES[n].needs_teacher for n in self.plan.stages)
        heldout = self._heldout(student, self.teacher.model() if uses_teacher else None, tokenizer)
        if heldout is not None:
            summary["heldout"] = heldout
            for scores in heldout:
                logger.info("stage %d: held-out %s: perplexity of the student %.2f", stage.number,
                            Path(scores["path"]).name, scores["student_ppl"])
        return summary

    def _write_report(self) -> None:
        if not self.is_main:
            return
        (self.folder / "report.json").write_text(json.dumps(self.report, indent=2), encoding="utf-8")
        (self.folder / "report.md").write_text(render_report(self.report), encoding="utf-8")


CONTINUATION_PROMPTS = ("The capital of France is", "Once upon a time, there was a little girl",
                        "The three laws of thermodynamics state that", "def fibonacci(n):")
CHAT_PROMPT = "What is the boiling point of water in degrees Fahrenheit?"
CONTINUATION_TOKENS = 40


def _part_ratios(scores: dict[str, Any]) -> tuple[float | None, float | None]:
    """The student's perplexity as a multiple of the teacher's over the start of each window and over
    the targets seen earlier in it (None without a teacher, or for a report written before the
    parts were scored)."""
    parts = [scores.get(part) or {} for part in ("start", "seen")]
    return tuple(part["student_ppl"] / part["teacher_ppl"] if part.get("teacher_ppl") else None for part in parts)


def _ratio(student: float, teacher: float | None) -> str:
    return f"{student / teacher:.3f}x" if teacher else ""


def render_report(report: dict[str, Any]) -> str:
    """report.md: the stages, then each held-out file with teacher and student side by side."""
    lines = [f"# Distillation report: {report['output']}", "",
             "| stage | steps | tokens | time (s) | ended by | final loss |", "|---|---|---|---|---|---|"]
    stages = sorted(report["stages"].items(), key=lambda item: int(item[0]))
    for number, s in stages:
        loss = s.get("final", {}).get("loss")
        lines.append(f"| {number} ({s['name']}) | {s['step']} | {s['tokens']} | {s['elapsed']:.0f} | "
                     f"{s.get('ended_by', '')} | {'' if loss is None else f'{loss:.4g}'} |")
    spiky = [(number, s["gradient_spikes"]) for number, s in stages if (s.get("gradient_spikes") or {}).get("count")]
    causes = ("windows cut mid-text with no EOS before them (data.eos_first below 1 without convert.lead) put an "
              "arbitrary token at position 0, the teacher's attention sink, and in the RWKV-7 layers its state "
              "reaches every later token; or a learning rate too high for some parameters"
              if report.get("windows_cut_mid_text", True) else
              "every window starts after the EOS here, so look at the learning rates (stageN.lr, "
              "stageN.teacher_lr_scale) and warm-up")
    for number, spikes in spiky:
        worst = spikes["worst"]
        lines += ["", f"Stage {number}: {spikes['count']} of {spikes['steps_judged']} steps had a gradient norm above "
                  f"{SPIKE_FACTOR:g}x the median of the {SPIKE_WINDOW} steps before (the worst: {worst['grad_norm']:.4g} "
                  f"at step {worst['step']}, median {worst['median']:.3g}); clipping bounded the updates, but "
                  f"such spikes point to an unstable recipe: {causes}."]
    base = report.get("baseline") or {}
    teacher_ppl = {f["path"]: f["student_ppl"] for f in base.get("teacher") or []}
    rows = [(f["path"], "teacher", f["student_ppl"], None, None, (None, None)) for f in base.get("teacher") or []]
    rows += [(f["path"], "freshly converted student", f["student_ppl"], f["agreement"], f["kl"], _part_ratios(f))
             for f in base.get("fresh_student") or []]
    for number, s in stages:
        rows += [(f["path"], f"student after stage {number}", f["student_ppl"], f["agreement"], f["kl"],
                  _part_ratios(f)) for f in s.get("heldout") or []]
        for f in s.get("heldout") or []:  # scored beside the teacher: a run without a baseline has it too
            if f.get("teacher_ppl") is not None:
                teacher_ppl.setdefault(f["path"], f["teacher_ppl"])
    if rows:
        lines += ["", "Held-out text in windows of the training length, each file scored on up to "
                  "data.eval_tokens target tokens:", "",
                  ("| file | model | perplexity | x teacher | agreement with the teacher | KL(teacher ‖ model) "
                   f"| x teacher, first {WINDOW_START} tokens of a window | x teacher, tokens seen earlier in it |"),
                  "|---|---|---|---|---|---|---|---|"]
        for path, model, ppl, agreement, kl, parts in sorted(rows, key=lambda row: row[0]):
            cells = [Path(path).name, model, f"{ppl:.2f}", _ratio(ppl, teacher_ppl.get(path)),
                     "" if agreement is None else f"{agreement:.1%}", "" if kl is None else f"{kl:.4f}",
                     *("" if ratio is None else f"{ratio:.3f}x" for ratio in parts)]
            lines.append("| " + " | ".join(cells) + " |")
    for number, s in stages:
        kept = s.get("kept_attention")
        if kept:
            lines += ["", f"Stage {number} gave layers {', '.join(map(str, kept['layers']))} back to the teacher's "
                      f"attention (keep_attention, judged by {kept['criterion']}; the higher, the worse):", "",
                      "| layer | score |", "|---|---|"]
            lines += [f"| {layer} | {score:.4g} |" for layer, score in kept["scores"].items()]
    if report.get("continuations"):
        lines += ["", "Greedy continuations of the final student and the teacher:", ""]
        for row in report["continuations"]:
            lines += [f"- prompt: {json.dumps(row['prompt'], ensure_ascii=False)}",
                      f"  - student: {json.dumps(row['student'], ensure_ascii=False)}"]
            if row["teacher"] is not None:
                lines.append(f"  - teacher: {json.dumps(row['teacher'], ensure_ascii=False)}")
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
        if init_from is not None:  # a run folder stands for its last stage's student
            init_from = str(resolve_student_folder(init_from))
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
