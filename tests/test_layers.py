"""Layering rules of docs/architecture.md that a refactoring could quietly break."""

from __future__ import annotations

import ast
from pathlib import Path

import gpuvirt

PKG = Path(gpuvirt.__file__).parent


def _imports(path: Path, *, top_only: bool = False) -> set[str]:
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in (tree.body if top_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_vmm_only_renders_and_parses():
    # issue 11 item 6: the hook's entry point (a face calling the service layer) lives in cli/, not vmm/
    for path in sorted((PKG / "vmm").glob("*.py")):
        bad = {m for m in _imports(path) if m.startswith(("gpuvirt.service", "gpuvirt.cli", "gpuvirt.inventory",
                                                          "gpuvirt.context", "gpuvirt.host"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"
    assert not (PKG / "vmm" / "hookmain.py").exists()
    assert (PKG / "cli" / "hook_main.py").exists()


def test_hook_entry_point_stays_light():
    # what the no-<hostdev> fast path may import: the cli package and the entry module, nothing heavier
    imported = _imports(PKG / "cli" / "hook_main.py", top_only=True)
    top_level = {m for m in imported if not m.startswith("gpuvirt")}
    assert top_level <= {"__future__", "os", "sys"}, top_level
