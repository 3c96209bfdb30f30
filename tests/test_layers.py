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


def test_only_the_inventory_talks_to_the_database():
    # the hook's fast path speaks sqlite3 directly (inventory/sqlite_fast.py); that stays inside inventory/ too
    for path in sorted(PKG.rglob("*.py")):
        # Alembic's revisions: migrations/ in a checkout, gpuvirt/_migrations/ once installed (pyproject)
        if path.parent.name == "inventory" or {"migrations", "_migrations"} & set(path.parts):
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] in ("sqlite3", "sqlalchemy", "alembic")}
        assert not bad, f"{path.relative_to(PKG)} imports {sorted(bad)}"


def test_hook_fast_path_modules_stay_off_sqlalchemy_at_import():
    # what the fast path imports at module level must not pull the ORM in (it is what the fast path avoids)
    for rel in ("service/hook_fast.py", "service/intent.py", "service/intent_steps.py", "service/instances.py",
                "inventory/sqlite_fast.py", "inventory/kinds.py", "context.py"):
        top = _imports(PKG / rel, top_only=True)
        bad = {m for m in top if m.split(".")[0] in ("sqlalchemy", "typer", "pynvml", "yaml")
               or m in ("gpuvirt.inventory.models", "gpuvirt.inventory.store", "gpuvirt.inventory.repo",
                        "gpuvirt.model.catalog", "gpuvirt.service.hostview")}
        assert not bad, f"{rel} imports {sorted(bad)} at module level"
