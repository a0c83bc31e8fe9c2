"""`rwkvinside export` (heavy imports wait for the handler)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
                   help="a student folder (e.g. runs/<run>/stage2/student) or a run folder (its last stage's)")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="weight dtype (default: bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it holds files")
    p.add_argument("--eval-report", metavar="EVAL_JSON",
                   help="an `rwkvinside eval` report for the model card (default: the run's eval/eval.json)")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from rwkvinside.export.export import export_student

    evaluation, distillation = reports_for(args.checkpoint, args.eval_report)
    output = export_student(args.checkpoint, args.output, args.dtype, args.overwrite, evaluation, distillation)
    print(f"exported to {output}")
    return 0


def reports_for(checkpoint: str, eval_report: str | None) -> tuple[dict | None, dict | None]:
    """(evaluation report, distillation report) for the model card: the given eval report, else the
    one `rwkvinside eval` writes by default; the report of the run recorded in the student's provenance."""
    from rwkvinside.errors import UserError
    from rwkvinside.evaluation.report import EVAL_FILE, default_output
    from rwkvinside.modeling.student_folder import read_metadata, resolve_student_folder

    folder = resolve_student_folder(checkpoint)
    run = read_metadata(folder).get("run")
    if eval_report is not None and not Path(eval_report).is_file():
        raise UserError(f"--eval-report '{eval_report}' does not exist; give the eval.json that "
                        "`rwkvinside eval` wrote")
    evaluation_path = Path(eval_report) if eval_report else default_output(folder, run) / EVAL_FILE
    distillation_path = Path(run) / "report.json" if run else None
    return _json_or_none(evaluation_path), _json_or_none(distillation_path)


def _json_or_none(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        from rwkvinside.errors import UserError

        raise UserError(f"{path} is not a JSON report; delete it or give another with --eval-report") from None
