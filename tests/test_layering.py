"""Layers point one way: resources and shared helpers at the bottom, families on them,
``dagster_project`` only assembling. No module of a family imports ``dagster_project``."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for name in _imports(path):
            if name.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(REPO)} imports {name}")
    return found


def test_families_do_not_import_dagster_project():
    assert _offenders("mihd_assets", ("dagster_project",)) == []


def test_resources_import_no_dagster_wiring_above_them():
    """Resources may use the families' pure data classes (e.g. ``embeddings.store``), never
    their asset, definitions or demo modules, nor ``dagster_project``."""
    assert _offenders("mihd_resources", ("dagster_project",)) == []
    wiring = [o for o in _offenders("mihd_resources", ("mihd_assets",))
              if o.rsplit(".", 1)[-1] in ("assets", "definitions", "demo", "partitions")]
    assert wiring == []


def test_the_check_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from dagster_project.cli import main\n")
    assert _imports(probe) == {"dagster_project.cli"}


def test_loading_the_definitions_imports_no_deep_learning_framework():
    """Every process that loads the code location (webserver, daemon, each run and step process,
    every `mihd` command) pays for what the definitions import: torch and cellpose are imported
    inside the steps that use them (they took about 8 of 12 s to import on two cores)."""
    import subprocess
    import sys

    probe = ("import sys, dagster_project.definitions; "
             "print(sorted(m for m in ('torch', 'cellpose', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
