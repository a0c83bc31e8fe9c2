"""Imports flow one way: ops <- data <- scoring <- modeling <- generation <- evaluation <- distill, export <- cli.

Every module of the package is read (not imported) and each of its imports of the package, at module
level or inside a function, must name a layer below its own or its own package. `errors`, `config`,
`files` and `graph_capture` may be imported from anywhere; distill and export share a layer and import
neither the other.
"""

import ast
from pathlib import Path

import pytest

import rwkvinside

PACKAGE_ROOT = Path(rwkvinside.__file__).parent
LAYERS = {
    "errors": 0, "config": 0, "files": 0, "graph_capture": 0,
    "ops": 1,
    "data": 2,
    "scoring": 3,
    "modeling": 4,
    "generation": 5,
    "evaluation": 6,
    "distill": 7, "export": 7,
    "cli": 8,
}
SHARED = {"errors", "config", "files", "graph_capture"}


def part_of(module: str) -> str | None:
    """The layer name of `rwkvinside.x.y` (x), or None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every rwkvinside import in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            modules = [name for name in names if name.split(".")[0] == "rwkvinside"][:1]
            if node.module == "rwkvinside":  # `from rwkvinside import x`: x is a part, or a name of the root
                modules = [f"rwkvinside.{alias.name}" if alias.name in LAYERS else "rwkvinside"
                           for alias in node.names]
            found += [(node.lineno, module) for module in modules]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "rwkvinside"]
    return found


def wrong_way(importer: str, imported: str) -> bool:
    if imported is None or imported == importer or imported in SHARED:
        return False
    if importer is None:  # rwkvinside/__init__.py: only the shared modules
        return True
    return LAYERS[imported] >= LAYERS[importer]


MODULES = sorted(PACKAGE_ROOT.rglob("*.py"))


def test_every_part_of_the_package_has_a_layer():
    parts = {p.relative_to(PACKAGE_ROOT).parts[0].removesuffix(".py") for p in MODULES} - {"__init__"}
    assert parts <= set(LAYERS), parts - set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_imports_flow_one_way(path):
    relative = path.relative_to(PACKAGE_ROOT)
    importer = None if relative.name == "__init__.py" and len(relative.parts) == 1 else relative.parts[0].removesuffix(".py")
    bad = [f"line {line}: {module}" for line, module in imports_of(path) if wrong_way(importer, part_of(module))]
    assert not bad, f"{relative} ({importer}) imports against the layering: {bad}"


def test_the_check_catches_an_import_the_wrong_way(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from rwkvinside.distill.loop import Trainer\n", encoding="utf-8")
    (line, imported), = imports_of(module)
    assert (line, part_of(imported)) == (2, "distill")
    assert wrong_way("evaluation", "distill") and wrong_way("export", "distill") and wrong_way("distill", "export")
    assert not wrong_way("distill", "evaluation") and not wrong_way("ops", "config")
