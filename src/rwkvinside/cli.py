"""The `rwkvinside` command line: distill | export | generate | chat | eval | synth.

Problems a user can fix end as one line on stderr and exit status 2, never a traceback: a bad or
out-of-range argument too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from rwkvinside.config import looks_like_override, number_type
from rwkvinside.errors import UserError
from rwkvinside.evaluation.cli import add_eval
from rwkvinside.export.cli import add_export
from rwkvinside.generation.cli import add_chat, add_generate, add_synth

logger = logging.getLogger("rwkvinside")

DISTILL_HELP = """\
Distil a teacher into an RWKV-7 student: stage 1 aligns each converted attention, stage 2 distils
the teacher's logits (KL), stage 3 fine-tunes on chat data. With no arguments: the embedded demo
(SmolLM2-135M-Instruct on Shakespeare, stages 1 and 2, on the CPU in minutes).

Any config key can be overridden as SECTION.KEY=VALUE, e.g. stage1.lr=5e-4 train.grad_accum=4,
anywhere on the command line (also after --data). A budget given so (stage1.max_time=140) replaces
the stage's budget from the config file.
"""


def add_distill(commands) -> None:
    p = commands.add_parser("distill", help="train a student (stages 1-3)", description=DISTILL_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides, e.g. stage2.lr=1e-4")
    p.add_argument("--config", help="YAML config file (default: the embedded demo, configs/demo.yaml)")
    p.add_argument("--teacher", help="local HF folder, .gguf file, or 'smollm2-135m' (the embedded teacher)")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="training text: .txt/.jsonl/.parquet files, folders, HF datasets folders, globs")
    p.add_argument("--stage", default="all", help="1, 2, 3 or all (1 -> 2 -> 3; 3 only with chat data)")
    p.add_argument("--output", help="run folder (default: a new runs/<start time>)")
    p.add_argument("--init-from", help="the run folder (its last stage's student) or student folder of an "
                                       "earlier stage to start stage 2 or 3 from")
    p.add_argument("--max-steps", type=number_type(int, minimum=1), help="optimizer steps per stage")
    p.add_argument("--max-tokens", type=number_type(int, minimum=1), help="trained tokens per stage")
    p.add_argument("--seq-len", type=number_type(int, minimum=2),
                   help="tokens the student reads per training sequence (its lead included)")
    p.add_argument("--batch-size", type=number_type(int, minimum=1), help="sequences per micro-batch per process")
    p.add_argument("--save-every", type=number_type(int, minimum=0), help="optimizer steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --output")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output")
    p.set_defaults(handler=run_distill)


def distill_overrides(args: argparse.Namespace) -> list[str]:
    """The dedicated flags as KEY=VALUE overrides, applied after the positional ones (flags win).

    Paths travel as JSON strings, which YAML reads back verbatim: a folder named `2024` or `null`
    stays a path. A budget flag replaces every stage's budget rather than adding a second limit."""
    overrides = list(args.overrides)
    if args.teacher:
        overrides.append(f"teacher.source={json.dumps(args.teacher)}")
    if args.data:
        overrides.append(f"data.train={json.dumps(args.data)}")
    if args.seq_len is not None:
        overrides.append(f"data.seq_len={args.seq_len}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.save_every is not None:
        overrides.append(f"checkpoint.save_every={args.save_every}")
    if args.max_steps is not None or args.max_tokens is not None:
        budget = {"max_steps": args.max_steps or 0, "max_tokens": args.max_tokens or 0, "max_time": 0}
        overrides += [f"stage{n}.{key}={value}" for n in (1, 2, 3) for key, value in budget.items()]
    return overrides


def run_distill(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from rwkvinside.distill.pipeline import distill, render_report

    config = args.config
    if config is None and not args.resume:
        config = str(files("rwkvinside").joinpath("configs/demo.yaml"))
    report = distill(config, distill_overrides(args), args.stage, args.output, args.init_from, args.resume,
                     args.overwrite)
    if report is not None:  # the main process's report; other ranks return None
        print(render_report(report))
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block), as every other user error."""

    def error(self, message: str):
        self.exit(2, f"rwkvinside: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rwkvinside", description="Turn a transformer LLM into an RWKV-7 model.")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only errors and the final summary: no progress bars, no info lines")
    # The `deepspeed` launcher puts --local_rank=N right after the module, before the command; the
    # rank is read from LOCAL_RANK, which every launcher sets.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


COMMANDS: list[Callable] = [add_distill, add_export, add_generate, add_chat, add_eval, add_synth]


def setup_logging(quiet: bool) -> None:
    from rwkvinside.distill.engine import launched_world

    level = logging.WARNING if quiet or launched_world()[0] != 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if level > logging.INFO:  # -q, or a rank other than 0: no progress bars either
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the arguments for argparse, the `section.key=value` overrides of `distill` wherever they stand):
    argparse alone would read one after --data as a data path, and refuse one before an option."""
    command = next((i for i, arg in enumerate(argv) if arg == "distill"), None)
    if command is None:
        return argv, []
    rest = argv[command + 1:]
    overrides = [arg for arg in rest if looks_like_override(arg)]
    return argv[:command + 1] + [arg for arg in rest if not looks_like_override(arg)], overrides


def main(argv: Sequence[str] | None = None) -> int:
    argv, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    if args.command == "distill":
        args.overrides = overrides + args.overrides
    setup_logging(args.quiet)
    try:
        return args.handler(args)
    except UserError as error:
        print(f"rwkvinside: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rwkvinside: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
