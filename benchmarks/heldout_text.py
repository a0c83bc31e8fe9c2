"""Held-out modern English for judging a student beside Shakespeare, from two permissively licensed sources:

- dialogue: chatterbot-corpus 1.3.3 (PyPI, BSD-3-Clause), its English conversations;
- essays and explanations: the prose of the Python 3.11 documentation (Debian's python3.11-doc,
  Python Software Foundation License), its FAQ, HOWTO and tutorial pages, reStructuredText markup
  and code examples stripped.

Each source is split in two by document, and the halves never mix: `modern_tune.txt` (chatterbot
categories a-m, the HOWTOs) is what recipes are tuned on; `modern_report.txt` (categories n-z, the
FAQ and the tutorial) is read only to report the final figures. Nothing here trains anything.

    python benchmarks/heldout_text.py --out heldout/      # downloads both packages (PyPI, Debian)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import zipfile
from pathlib import Path

import yaml

CHATTERBOT = "chatterbot-corpus==1.3.3"
PYTHON_DOCS = "python3.11-doc"
DOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"


def chatterbot_conversations(folder: Path) -> dict[str, list[str]]:
    """Category name -> its conversations, each as alternating lines of two speakers."""
    subprocess.run(["python3", "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), CHATTERBOT], check=True)
    (wheel,) = folder.glob("chatterbot_corpus-*.whl")
    categories = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if re.fullmatch(r"chatterbot_corpus/data/english/\w+\.yml", name):
                data = yaml.safe_load(archive.read(name).decode("utf-8"))
                talks = []
                for conversation in data.get("conversations") or []:
                    turns = [str(turn).strip() for turn in conversation if str(turn).strip()]
                    talks.append("\n".join(f"{'AB'[i % 2]}: {turn}" for i, turn in enumerate(turns)))
                categories[Path(name).stem] = talks
    return categories


def strip_rst(text: str) -> str:
    """The prose of a reStructuredText page: no directives, code blocks, section rules or role markup."""
    lines, prose, skipping = text.splitlines(), [], False
    for line in lines:
        if skipping:
            if line.strip() and not line.startswith((" ", "\t")):
                skipping = False
            else:
                continue
        if line.lstrip().startswith(".."):
            skipping = True  # a directive or comment and its indented body
            continue
        if re.fullmatch(r"\s*([=\-~^*#\"'+`])\1{2,}\s*", line):
            continue  # section over- and underlines
        if line.rstrip().endswith("::"):
            skipping = True  # the literal block that follows
            line = line.rstrip()[:-1]
        line = re.sub(r":[\w:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", line)  # :role:`text <target>`
        line = re.sub(r"``([^`]*)``", r"\1", line)
        line = re.sub(r"`([^`<]*?)(?:\s*<[^>]*>)?`_*", r"\1", line)
        if line.lstrip().startswith(">>>"):
            continue
        prose.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(prose)).strip()


def python_docs(folder: Path) -> dict[str, str]:
    """'faq/design' and the like -> the page's prose."""
    subprocess.run(["apt-get", "download", PYTHON_DOCS], cwd=folder, check=True, capture_output=True)
    (package,) = folder.glob("python3.11-doc_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(package), str(folder / "root")], check=True)
    root = folder / "root" / DOCS_SOURCES
    pages = {}
    for section in ("faq", "howto", "tutorial"):
        for path in sorted((root / section).glob("*.rst.txt")):
            if path.name != "index.rst.txt":
                pages[f"{section}/{path.name.removesuffix('.rst.txt')}"] = strip_rst(path.read_text(encoding="utf-8"))
    return pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="heldout", help="folder for modern_tune.txt and modern_report.txt")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        talks = chatterbot_conversations(Path(tmp))
        pages = python_docs(Path(tmp))
    tune = [t for name, group in talks.items() if name[0] <= "m" for t in group]
    tune += [text for name, text in pages.items() if name.startswith("howto/")]
    report = [t for name, group in talks.items() if name[0] > "m" for t in group]
    report += [text for name, text in pages.items() if not name.startswith("howto/")]
    for name, documents in (("modern_tune.txt", tune), ("modern_report.txt", report)):
        (out / name).write_text("\n\n".join(documents) + "\n", encoding="utf-8")
        print(f"{out / name}: {len(documents)} documents, {sum(map(len, documents)):,} characters")


if __name__ == "__main__":
    main()
