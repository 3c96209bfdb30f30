"""Alembic driven from code: the revisions ship inside the package (``gpuvirt._migrations``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine


def script_location() -> str:
    from gpuvirt._data import data_dir

    return data_dir("migrations")


def alembic_config(url: str | None = None, connection: Any = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", script_location())
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    _migrating(engine, lambda conn: command.upgrade(alembic_config(connection=conn), revision))


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    _migrating(engine, lambda conn: command.downgrade(alembic_config(connection=conn), revision))


def _migrating(engine: Engine, run: Any) -> None:
    """Run a migration in one transaction.  On SQLite, foreign keys are off meanwhile: Alembic's batch mode
    rebuilds a table by copying it and dropping the original, and with foreign keys on, that DROP deletes the
    rows of every table referencing it with ON DELETE CASCADE (allocations of instances, instances of GPUs).
    The keys are checked before the transaction commits."""
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            run(conn)
        return
    from gpuvirt.errors import InventoryError

    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        # outside any transaction (the pragma is a no-op inside one): before SQLAlchemy begins on this connection
        raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                run(conn)
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise InventoryError(f"the schema upgrade would leave {len(broken)} broken reference(s) "
                                         f"(first: {tuple(broken[0])}); nothing was changed")
        finally:
            raw.execute("PRAGMA foreign_keys=ON")


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def revisions() -> list[str]:
    """All revisions, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def drift(engine: Engine) -> list[str]:
    """Differences between the ORM models and the database after migrations (empty = in sync).

    Also reports a database that is not at the newest revision.
    """
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from gpuvirt.inventory.models import Base

    problems = []
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        current = ctx.get_current_revision()
        if current != head():
            problems.append(f"database is at revision {current or '(none)'}, newest is {head()}")
        for diff in compare_metadata(ctx, Base.metadata):
            problems.append(_describe(diff))
    return problems


def _describe(diff: Any) -> str:
    if isinstance(diff, tuple):
        op = diff[0]
        rest = ", ".join(str(getattr(x, "name", x)) for x in diff[1:] if x is not None)
        return f"{op}: {rest}"
    if isinstance(diff, list):
        return "; ".join(_describe(d) for d in diff)
    return str(diff)
