"""Per-invocation CLI state: the global options, turned into Settings and a Context on first use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import typer

from gpuvirt.context import Context, Settings, resolve_settings


@dataclass
class CliState:
    root: str | None = None
    sim: str | None = None
    db: str | None = None
    host_id: str | None = None
    config: str | None = None
    debug: bool = False
    _settings: Settings | None = field(default=None, repr=False)
    _context: Context | None = field(default=None, repr=False)

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = resolve_settings(root=self.root, sim=self.sim, db=self.db, host_id=self.host_id,
                                              config=self.config, debug=self.debug)
        return self._settings

    def context(self) -> Context:
        if self._context is None:
            self._context = Context(self.settings())
        return self._context

    def close(self) -> None:
        if self._context is not None:
            self._context.close()
            self._context = None


def state(ctx: typer.Context) -> CliState:
    obj: Any = ctx.find_root().obj
    if not isinstance(obj, CliState):
        obj = CliState()
        ctx.find_root().obj = obj
    return obj
