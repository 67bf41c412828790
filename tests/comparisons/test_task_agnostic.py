"""The comparison is task-agnostic: it takes a `Task` and never imports a particular task."""

import ast
import subprocess
import sys
from pathlib import Path

import tl_codebook.comparisons

PACKAGE = Path(tl_codebook.comparisons.__file__).parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_comparison_module_imports_a_task() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(m for m in imported_modules(path) if "fsm" in m)
        for path in PACKAGE.rglob("*.py")
    }
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_importing_the_comparison_loads_no_task() -> None:
    code = (
        "import sys, tl_codebook.comparisons.cli, tl_codebook.comparisons.compare, "
        "tl_codebook.comparisons.report; "
        "print(sorted(m for m in sys.modules if m.startswith('tl_codebook.fsm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
