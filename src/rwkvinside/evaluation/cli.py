"""`rwkvinside eval` (heavy imports wait for the handler)."""

from __future__ import annotations

import argparse

from rwkvinside.config import number_type

EVAL_HELP = """\
Student and teacher side by side: perplexity on each --data file, next-token agreement and mean
KL(teacher||student), and passkey retrieval at 1x, 2x, 4x and 8x --seq-len. Writes eval.json,
eval.md and passkey.png to --output (default: the run's eval/ folder, or <model>-eval).
"""


def add_eval(commands) -> None:
    p = commands.add_parser("eval", help="compare a student with its teacher", description=EVAL_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a student folder, an exported folder or a run folder")
    p.add_argument("--teacher", help="local HF folder, .gguf file or 'smollm2-135m' "
                                     "(default: the checkpoint's teacher)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="held-out text files")
    p.add_argument("--seq-len", type=number_type(int, minimum=2),
                   help="the training length (default: the student's, else 512)")
    p.add_argument("--output", help="report folder")
    p.add_argument("--batch-size", type=number_type(int, minimum=1), default=1, help="windows per forward pass")
    p.add_argument("--max-tokens", type=number_type(int, minimum=0), default=0,
                   help="scored tokens per file (default 0: all)")
    p.add_argument("--passkey-lengths", type=number_type(int, minimum=1), nargs="+", metavar="N",
                   help="passkey lengths in tokens")
    p.add_argument("--passkey-trials", type=number_type(int, minimum=1), default=5,
                   help="prompts per passkey length")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16, fp16")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rwkvinside.evaluation.evaluate import evaluate
    from rwkvinside.evaluation.report import default_output, terminal_table, write_report

    report = evaluate(args.model, args.data, args.teacher, args.seq_len, args.passkey_lengths,
                      args.passkey_trials, args.batch_size, args.max_tokens, args.device, args.dtype)
    output = Path(args.output) if args.output else default_output(Path(args.model), report["run"])
    written = write_report(report, output)
    print(terminal_table(report))
    print(f"\nreport: {', '.join(map(str, written))}")
    return 0
