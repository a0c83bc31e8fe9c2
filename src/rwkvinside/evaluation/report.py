"""The evaluation report: a terminal table, eval.json, eval.md and one plot (passkey recall).

The report is a plain dict (what `evaluate` returns and eval.json holds):

    {"model": ..., "run": the run folder or None, "teacher": ... or None, "seq_len": N, "teacher_context": N or None,
     "files": [{"path", "tokens", "student_ppl", "teacher_ppl", "agreement", "kl",
                "start", "seen", "unseen": the same over parts of the targets (evaluation/compare.py)}],
     "passkey": {"trials": N, "rows": [{"tokens", "multiple", "student", "teacher", "past_teacher_context"}]}}

Teacher figures are None when no teacher was evaluated; a passkey row past the teacher's own context
length (config.max_position_embeddings) is shown but marked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rwkvinside.evaluation.compare import WINDOW_START

EVAL_FILE = "eval.json"
MARKDOWN_FILE = "eval.md"
PLOT_FILE = "passkey.png"
PAST_CONTEXT_MARK = "*"


def default_output(model_folder: Path, run: str | None) -> Path:
    """Where `rwkvinside eval` writes by default and where `export` looks for a report: the eval/
    folder of the run that wrote the student (recorded in its provenance), else <model>-eval."""
    if run is not None and Path(run).is_dir():
        return Path(run) / "eval"
    folder = Path(model_folder).resolve()
    return folder.with_name(folder.name + "-eval")


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


PARTS = {"start": f"first {WINDOW_START} of a window", "seen": "seen earlier in the window",
         "unseen": "not seen earlier"}
FIGURE_HEADER = ["tokens", "student ppl", "teacher ppl", "ppl ratio", "agreement", "KL(teacher ‖ student)"]


def _figure_cells(f: dict[str, Any]) -> list[str]:
    return [str(f["tokens"]), _number(f["student_ppl"], ".2f"), _number(f["teacher_ppl"], ".2f"),
            _number(f["student_ppl"] / f["teacher_ppl"] if f["teacher_ppl"] else None, ".3f"),
            _number(f["agreement"], ".1%"), _number(f["kl"], ".4f")]


def _file_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """A row per held-out file, over whole windows."""
    return ["file", *FIGURE_HEADER], [[Path(f["path"]).name, *_figure_cells(f)] for f in report["files"]]


def _part_lines(report: dict[str, Any], markdown: bool) -> list[str]:
    """The parts of each file's targets, with a note (none for a report written before they were scored)."""
    if not report["files"] or not all(part in f for f in report["files"] for part in PARTS):
        return []
    note = (f"The same over parts of the targets: the first {WINDOW_START} of each window (read with little "
            "context; a recurrent student starts from an empty state and an arbitrary first token), and "
            "the tokens the window already held at or before their position (which attention can copy) "
            "or not:")
    rows = [[Path(f["path"]).name, label, *_figure_cells(f[part])]
            for f in report["files"] for part, label in PARTS.items()]
    table = (["file", "targets", *FIGURE_HEADER], rows)
    return ["", note, "", *_markdown_table(*table)] if markdown else ["", note, *_text_table(*table)]


def _passkey_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["context (tokens)", "x seq-len", "student recall", "teacher recall"]
    rows = []
    for row in report["passkey"]["rows"]:
        teacher = _number(row["teacher"], ".0%")
        if row["teacher"] is not None and row["past_teacher_context"]:
            teacher += PAST_CONTEXT_MARK
        rows.append([str(row["tokens"]), f"{row['multiple']:g}", _number(row["student"], ".0%"), teacher])
    return header, rows


def _passkey_note(report: dict[str, Any]) -> str:
    note = f"Passkey: exact recall of a 5-digit number over {report['passkey']['trials']} trials per length."
    if any(r["past_teacher_context"] and r["teacher"] is not None for r in report["passkey"]["rows"]):
        note += (f" {PAST_CONTEXT_MARK} past the teacher's own context of {report['teacher_context']} "
                 "tokens: shown for cost, not a fair quality comparison.")
    return note


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    line = "  ".join
    return [line(h.ljust(w) for h, w in zip(header, widths, strict=True)), line("-" * w for w in widths),
            *(line(cell.rjust(w) if i else cell.ljust(w)  # the file name left, numbers right
                   for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
              for row in rows)]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def terminal_table(report: dict[str, Any]) -> str:
    lines = [*_text_table(*_file_rows(report)), *_part_lines(report, markdown=False)]
    if report["passkey"]["rows"]:
        lines += ["", *_text_table(*_passkey_rows(report)), _passkey_note(report)]
    return "\n".join(lines)


def markdown_tables(report: dict[str, Any]) -> list[str]:
    """The report's tables as Markdown lines (eval.md, and the model card of an export)."""
    teacher = report["teacher"] or "none evaluated"
    lines = [f"Teacher: `{teacher}`. Windows of {report['seq_len']} tokens.", "",
             *_markdown_table(*_file_rows(report)), *_part_lines(report, markdown=True), ""]
    if report["passkey"]["rows"]:
        lines += [*_markdown_table(*_passkey_rows(report)), "", _passkey_note(report), ""]
    return lines


def plot_passkey(report: dict[str, Any], path: Path) -> None:
    """Recall against context length, student and teacher; teacher points past its context hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["passkey"]["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(tokens, [r["student"] for r in rows], "o-", label="student")
    if any(r["teacher"] is not None for r in rows):
        ax.plot(tokens, [r["teacher"] for r in rows], "s-", color="tab:orange", label="teacher")
        past = [(r["tokens"], r["teacher"]) for r in rows if r["past_teacher_context"]]
        if past:
            ax.plot(*zip(*past, strict=True), "s", color="white", markeredgecolor="tab:orange",
                    label="teacher, past its context")
            ax.axvline(report["teacher_context"], color="tab:orange", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(tokens, [str(t) for t in tokens])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey recall")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """eval.json, eval.md and (with passkey rows) passkey.png in `folder`; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / EVAL_FILE, folder / MARKDOWN_FILE]
    (folder / EVAL_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    lines = [f"# Evaluation of {report['model']}", "", *markdown_tables(report)]
    if report["passkey"]["rows"]:
        plot_passkey(report, folder / PLOT_FILE)
        lines += [f"![passkey recall]({PLOT_FILE})", ""]
        written.append(folder / PLOT_FILE)
    (folder / MARKDOWN_FILE).write_text("\n".join(lines), encoding="utf-8")
    return written
