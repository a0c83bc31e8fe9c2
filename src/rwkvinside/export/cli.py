"""`rwkvinside export` (heavy imports wait for the handler)."""

from __future__ import annotations

import argparse

EXPORT_HELP = """\
Turn a student checkpoint into a Hugging Face folder that loads with
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) and needs only torch and
transformers: config, generated modeling code, safetensors weights, tokenizer and chat template,
and a model card.
"""


def add_export(commands) -> None:
    p = commands.add_parser("export", help="write a student as a Hugging Face folder",
                            description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a student checkpoint folder (e.g. runs/<run>/stage2/student)")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="weight dtype (default: bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it holds files")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from rwkvinside.export.export import export_student

    output = export_student(args.checkpoint, args.output, args.dtype, args.overwrite)
    print(f"exported to {output}")
    return 0
