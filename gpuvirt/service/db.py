"""Service: inventory schema management (``gpuvirt db ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpuvirt.context import Context, redact_url


def _inventory(ctx: Context, upgrade: bool):
    from gpuvirt.inventory.store import Inventory

    if not ctx.settings.db_url:
        ctx.check_sim()  # as Context.inventory: never create a database inside what is not a simulated host
    inv = Inventory.open(ctx.settings, upgrade=upgrade)
    ctx._closers.append(inv.close)  # noqa: SLF001 - the context owns what it opened
    return inv


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
