"""docs/architecture.md's table of rooms is the imports, both ways: each module of
tracker/ and restrackfs/ has a row, and its row lists exactly the modules of
ours it imports (TYPE_CHECKING imports included: they are dependencies too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tracker", "restrackfs")
ROW = re.compile(r"^\| (`[^|]+`) \| [^|]+ \| ([^|]+) \|$")


def _name(dotted: str) -> str:
    """The table's spelling: dotted, `tracker.` left out."""
    return dotted.removeprefix("tracker.")


def _modules() -> dict[str, Path]:
    """Every module of ours with code (a package's __init__ only if it has any)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if path.name == "__init__.py":
                if len(ast.parse(path.read_text()).body) <= 1:  # a docstring alone
                    continue
                dotted = dotted.removesuffix(".__init__")
            found[dotted] = path
    return found


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or base.with_suffix(".c").exists()


def _imports(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    imported.add(full if _is_module(full) else node.module)
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return imported


def _documented() -> dict[str, set[str]]:
    """Room -> the imports its row lists ("nothing" is none)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## The rooms", 1)[1].split("\n## ", 1)[0]
    rooms = {}
    for line in table.splitlines():
        match = ROW.match(line)
        if match is None or match.group(1) == "`room`":
            continue
        listed = set(re.findall(r"`([^`]+)`", match.group(2)))
        for room in re.findall(r"`([^`]+)`", match.group(1)):
            rooms[room] = listed
    return rooms


def test_every_module_has_a_row_and_every_row_a_module() -> None:
    modules = {_name(dotted) for dotted in _modules()}
    documented = set(_documented())
    assert modules - documented == set(), "modules without a row in docs/architecture.md"
    assert documented - modules == set(), "rows for modules that do not exist"


def test_each_row_lists_exactly_what_its_module_imports() -> None:
    documented = _documented()
    wrong = {}
    for dotted, path in _modules().items():
        room = _name(dotted)
        actual = {_name(name) for name in _imports(path)} - {room}
        if room in documented:
            listed = documented[room] - {room}
            if actual != listed:
                wrong[room] = {"not listed": actual - listed, "not imported": listed - actual}
    assert not wrong, f"docs/architecture.md's imports disagree with the code: {wrong}"
