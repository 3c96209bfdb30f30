"""Service: inventory schema management (``gpuvirt db ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpuvirt.context import Context, redact_url


def _inventory(ctx: Context, upgrade: bool, create: bool | None = None):
    from gpuvirt.inventory.store import Inventory

    if not ctx.settings.db_url:
        ctx.check_sim()  # as Context.inventory: never create a database inside what is not a simulated host
    inv = Inventory.open(ctx.settings, upgrade=upgrade, create=create)
    ctx._closers.append(inv.close)  # noqa: SLF001 - the context owns what it opened
    if not upgrade:
        inv.check_not_newer()  # every command, db current included, refuses a newer schema the same way
    return inv


def init(ctx: Context) -> dict[str, Any]:
    """Create the inventory named by the settings (SQLite: the file and its directory, modes 0600 / 0700) and
    bring its schema to the newest revision; an existing one is only upgraded."""
    from gpuvirt.inventory.store import _sqlite_path

    path = _sqlite_path(ctx.settings.effective_db_url())
    existed = path is not None and path.exists()
    inv = _inventory(ctx, upgrade=True, create=True)
    return {"url": redact_url(inv.url), "backend": inv.backend, "path": str(path) if path else None,
            "created": path is not None and not existed, "revision": inv.current_revision()}


def upgrade(ctx: Context, revision: str = "head") -> str:
    inv = _inventory(ctx, upgrade=False)
    inv.upgrade(revision)
    return f"{redact_url(inv.url)}: now at revision {inv.current_revision()}"


def current(ctx: Context) -> dict[str, Any]:
    from gpuvirt.inventory.migrate import head
    from gpuvirt.inventory.store import check_private

    inv = _inventory(ctx, upgrade=False)
    warnings = []
    if inv.backend == "sqlite":
        warnings = check_private(Path(str(inv.engine.url.database)))
    return {"url": redact_url(inv.url), "backend": inv.backend, "revision": inv.current_revision(),
            "head": head(), "warnings": warnings}


def check(ctx: Context) -> list[str]:
    inv = _inventory(ctx, upgrade=False)
    return inv.check()
