"""Opening the inventory database: engine setup, schema upgrades, error translation, units of work.

* SQLite (default ``<root>/var/lib/gpuvirt/inventory.db``): directory 0700, file 0600, WAL journal, a busy
  timeout, foreign keys on; write transactions start with ``BEGIN IMMEDIATE`` so two writers queue on the
  database lock instead of failing half-way with SQLITE_BUSY.  Only the default inventory is created on
  first use; any other path must exist (``gpuvirt db init`` creates it), so a typo never starts an empty
  inventory.  Before SQLite opens its files, their directory must be trusted and none of them may be a
  symbolic link (``gpuvirt.safefs``): SQLite follows links, and gpuvirt runs as root.
* PostgreSQL (``postgresql+psycopg://...``): ``READ COMMITTED``; allocation paths lock rows
  (``SELECT ... FOR UPDATE SKIP LOCKED``) and a unique constraint backs them up.
* A fresh or older database is upgraded to the newest Alembic revision before use (under a file lock for
  SQLite, an advisory lock for PostgreSQL), so concurrent first runs do not race.  Checking the revision
  reads ``alembic_version`` directly; Alembic itself is imported only when an upgrade is due.  A revision this
  gpuvirt does not know was written by a newer one: refused with one line (exit 8), never "upgraded".
* The ``events`` table is pruned per host (``[events]`` in the config: ``max_age_days``, ``max_rows``) after
  writes that record events (see :meth:`Inventory._after_events`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gpuvirt.errors import (
    GpuvirtError,
    InventoryError,
    InventoryTooNewError,
    UsageError,
)

if TYPE_CHECKING:  # pragma: no cover
    from gpuvirt.inventory.repo import Unit

# shared with the hook's sqlite3 fast path, which must agree with this module on all of them
from gpuvirt.inventory.sqlite_fast import (  # noqa: E402,F401
    BUSY_TIMEOUT_MS, HEAD_REVISION, PRUNE_EVERY_IDS, PRUNE_INTERVAL_S, SQLITE_SIDE_FILES, describe_db_error)
from gpuvirt.inventory.sqlite_fast import prepare_sqlite_path as _prepare_sqlite_path  # noqa: E402


def known_revisions() -> set[str]:
    """Revision ids this gpuvirt ships (the file names of ``migrations/versions``; tested against Alembic)."""
    from gpuvirt._data import data_dir

    try:
        versions = os.path.join(data_dir("migrations"), "versions")
        return {n[:-3] for n in os.listdir(versions) if n.endswith(".py") and n[:1].isdigit()}
    except (ModuleNotFoundError, OSError):  # pragma: no cover - a broken installation
        return {HEAD_REVISION}


def gpuvirt_version() -> str:
    try:
        from importlib.metadata import version

        return version("gpuvirt")
    except Exception:  # noqa: BLE001 - running from a checkout without metadata
        return "(unknown version)"


def too_new(revision: str) -> InventoryTooNewError:
    return InventoryTooNewError(f"this inventory is at revision {revision}, newer than gpuvirt {gpuvirt_version()} "
                                f"knows ({HEAD_REVISION}); upgrade gpuvirt", revision=revision, head=HEAD_REVISION)


def translate_db_error(exc: BaseException, url: str, action: str = "inventory") -> InventoryError:
    msg = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
    return describe_db_error(msg, _describe(url), action, integrity=isinstance(exc, IntegrityError))


def _raised_by_sqlalchemy(exc: BaseException) -> bool:
    """Did ``exc`` come out of SQLAlchemy's own code (turning a stored value into a Python one), rather than
    out of the caller's code inside a unit of work?"""
    mods = []
    tb = exc.__traceback__
    while tb is not None:
        f = tb.tb_frame
        # compiled (Cython) modules of SQLAlchemy may name their frames only by a relative source path,
        # e.g. "lib/sqlalchemy/engine/_processors_cy.py"
        mods.append(f.f_globals.get("__name__") or ".".join(Path(f.f_code.co_filename).parts))
        tb = tb.tb_next
    # the frame below gpuvirt's innermost one: gpuvirt called SQLAlchemy, and the error came from inside that
    # call (its value processors, or the json module they call)
    ours = [i for i, m in enumerate(mods) if m == "gpuvirt" or m.startswith("gpuvirt.")]
    below = ours[-1] + 1 if ours else 0
    return below < len(mods) and "sqlalchemy" in mods[below].split(".")


def unreadable_value(engine: Engine) -> InventoryError | None:
    """The first stored value of a timestamp or JSON column that SQLAlchemy cannot read back, as the one-line
    "corrupt inventory" error naming table, column and row; None when every one reads.

    SQLite keeps both as text, so a hand-edited or damaged row (``created_at='garbage'``) is stored without
    complaint and fails later inside the driver's row parsing, as a bare ValueError that names neither row nor
    column, in whatever command happens to load it.  Only that failure pays for this scan, which reads each
    such column once as text and parses it as the dialect does."""
    from sqlalchemy import JSON, DateTime, String, TypeDecorator, select, type_coerce

    from gpuvirt.inventory.models import Base

    dialect = engine.dialect
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            keys = list(table.primary_key.columns)
            for col in table.columns:
                base = col.type.impl if isinstance(col.type, TypeDecorator) else col.type
                if not isinstance(base, (DateTime, JSON)):
                    continue
                parse = col.type.dialect_impl(dialect).result_processor(dialect, None)
                if parse is None:
                    continue
                q = select(*keys, type_coerce(col, String)).where(col.is_not(None)).order_by(*keys)
                for *key, raw in conn.execute(q):
                    try:
                        parse(raw)
                    except (ValueError, TypeError):
                        row = ", ".join(f"{k.name}={v!r}" for k, v in zip(keys, key))
                        shape = getattr(col.type, "describe", "JSON")
                        what = "a timestamp" if isinstance(base, DateTime) else shape
                        fix = ("a UTC time as 'YYYY-MM-DD HH:MM:SS'" if isinstance(base, DateTime)
                               else "valid JSON" if shape == "JSON" else shape)
                        return InventoryError(f"the inventory is corrupt: {table.name}.{col.name} of the row "
                                              f"{row} is not {what} ({str(raw)[:40]!r}); write {fix} there, or "
                                              "restore the inventory from a backup")
    return None


def _describe(url: str) -> str:
    try:
        u = make_url(url)
    except ArgumentError:
        return url
    if u.get_backend_name() == "sqlite":
        return str(u.database)
    return u.render_as_string(hide_password=True)


class Inventory:
    """One database; create units of work with :meth:`unit`."""

    def __init__(self, url: str, engine: Engine, host_id: str) -> None:
        self.url = url
        self.engine = engine
        self.host_id = host_id
        self.backend = engine.dialect.name
        self._sessions = sessionmaker(bind=engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(bind=engine.execution_options(gpuvirt_write=True),
                                            expire_on_commit=False)
        # events retention for this host: (max age in days, max rows); 0 = no limit, None = never prune
        self.event_limits: tuple[int, int] | None = None
        self._pruned_at: float | None = None

    # --- opening ----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Any, *, upgrade: bool = True, create: bool | None = None) -> "Inventory":
        """The inventory of ``settings``.  ``create`` None: only the default SQLite inventory (under the state
        directory, or a ``--db`` naming that same file) is created when missing."""
        url = settings.effective_db_url()
        if create is None:
            create = settings.db_url is None or _sqlite_path(url) == Path(settings.default_db_path).absolute()
        inv = cls.connect(url, settings.host_id, create=create, state_dir=settings.state_dir)
        events = getattr(settings, "events", None) or {}
        inv.event_limits = (int(events.get("max_age_days", 0)), int(events.get("max_rows", 0)))
        if upgrade:
            inv.ensure_schema()
        return inv

    @classmethod
    def connect(cls, url: str, host_id: str = "local", *, create: bool = True,
                state_dir: Path | None = None) -> "Inventory":
        try:
            u = make_url(url)
        except ArgumentError as exc:
            raise UsageError(f"invalid database URL {url!r}: {exc}") from exc
        backend = u.get_backend_name()
        try:
            if backend == "sqlite":
                if u.database in (None, "", ":memory:"):
                    raise UsageError("an in-memory SQLite inventory cannot be shared; give a file path")
                path = Path(u.database).absolute()
                _prepare_sqlite_path(path, create=create, state_dir=state_dir)
                engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000}, pool_pre_ping=False)
                _sqlite_events(engine)
            elif backend == "postgresql":
                engine = create_engine(url, pool_pre_ping=True, isolation_level="READ COMMITTED",
                                       connect_args={"connect_timeout": 10})
            else:
                engine = create_engine(url)
        except ImportError as exc:
            raise InventoryError(f"no database driver for {backend}: {exc}") from exc
        except ArgumentError as exc:
            raise UsageError(f"invalid database URL {url!r}: {exc}") from exc
        return cls(url, engine, host_id)

    def close(self) -> None:
        self.engine.dispose()

    # --- schema --------------------------------------------------------------------------------------------
    def current_revision(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                has = conn.dialect.has_table(conn, "alembic_version")
                if not has:
                    return None
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (DBAPIError, SQLAlchemyError) as exc:
            raise translate_db_error(exc, self.url, "read schema version") from exc

    def check_not_newer(self, revision: str | None = None) -> str | None:
        """The current revision; :class:`InventoryTooNewError` when a newer gpuvirt wrote it."""
        rev = self.current_revision() if revision is None else revision
        if rev is not None and rev != HEAD_REVISION and rev not in known_revisions():
            raise too_new(rev)
        return rev

    def ensure_schema(self) -> None:
        rev = self.current_revision()
        if rev == HEAD_REVISION:
            return
        self.check_not_newer(rev)
        with self._upgrade_lock():
            if self.check_not_newer() != HEAD_REVISION:
                self.upgrade()

    @contextlib.contextmanager
    def _upgrade_lock(self) -> Iterator[None]:
        if self.backend == "sqlite":
            lock_path = Path(str(make_url(self.url).database) + ".lock")
            from gpuvirt.safefs import open_nofollow

            try:
                fd = open_nofollow(lock_path, os.O_CREAT | os.O_RDWR, 0o600, what="inventory upgrade lock")
            except OSError:
                yield  # read-only directory: the upgrade itself will report the real problem
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        elif self.backend == "postgresql":
            try:
                with self.engine.connect() as conn:
                    conn.execute(text("SELECT pg_advisory_lock(7340213)"))
                    try:
                        yield
                    finally:
                        conn.execute(text("SELECT pg_advisory_unlock(7340213)"))
                        conn.commit()
            except (DBAPIError, SQLAlchemyError) as exc:
                raise translate_db_error(exc, self.url, "lock for schema upgrade") from exc
        else:
            yield

    def alembic_config(self):
        from gpuvirt.inventory.migrate import alembic_config

        return alembic_config(self.url)

    def upgrade(self, revision: str = "head") -> None:
        from gpuvirt.inventory.migrate import upgrade

        self.check_not_newer()
        try:
            upgrade(self.engine, revision)
        except (DBAPIError, SQLAlchemyError) as exc:
            raise translate_db_error(exc, self.url, "upgrade inventory schema") from exc

    def check(self) -> list[str]:
        from gpuvirt.inventory.migrate import drift

        try:
            return drift(self.engine)
        except (DBAPIError, SQLAlchemyError) as exc:
            raise translate_db_error(exc, self.url, "check inventory schema") from exc

    # --- units of work ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def unit(self, *, write: bool = False, action: str = "inventory") -> Iterator["Unit"]:
        from gpuvirt.inventory.repo import Unit

        factory = self._write_sessions if write else self._sessions
        session: Session = factory()
        try:
            uow = Unit(self, session)
            yield uow
            session.commit()
        except (DBAPIError, SQLAlchemyError) as exc:
            session.rollback()
            raise translate_db_error(exc, self.url, action) from exc
        except (ValueError, TypeError) as exc:
            session.rollback()
            from gpuvirt.inventory.models import UnreadableValue

            # JSON of the wrong shape is valid to PostgreSQL too; text that is no timestamp only SQLite keeps
            bad = unreadable_value(self.engine) if isinstance(exc, UnreadableValue) or (
                self.backend == "sqlite" and _raised_by_sqlalchemy(exc)) else None
            if bad is not None:
                raise bad from None
            raise
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
        if uow.recorded_events:
            ids = [e.id for e in uow.recorded_events if e.id is not None]
            self._after_events(ids)

    def _after_events(self, ids: list[int]) -> None:
        """Opportunistic pruning after a write that recorded events (best effort: a busy database postpones it
        rather than failing a command that already succeeded).  By age: on the first such write of a process
        and then every ``PRUNE_INTERVAL_S`` (cheap: a range on the ``at`` index).  By count: when the new ids
        cross a multiple of ``PRUNE_EVERY_IDS`` (finding the cut walks up to ``max_rows`` index entries, so it
        runs about once per ``PRUNE_EVERY_IDS`` events of the inventory)."""
        from gpuvirt.inventory.sqlite_fast import prune_due

        if self.event_limits is None or self.event_limits == (0, 0) or not ids:
            return
        by_age, by_count, self._pruned_at = prune_due(ids, self._pruned_at)
        if not by_age and not by_count:
            return
        max_age_days, max_rows = self.event_limits
        with contextlib.suppress(GpuvirtError):
            with self.unit(write=True, action="prune events") as uow:
                uow.prune_events(self.host_id, max_age_days=max_age_days if by_age else 0,
                                 max_rows=max_rows if by_count else 0)

    def prune_events_now(self) -> int:
        """Delete this host's events beyond the configured age and count now; returns how many went."""
        if self.event_limits is None:
            return 0
        max_age_days, max_rows = self.event_limits
        with self.unit(write=True, action="prune events") as uow:
            return uow.prune_events(self.host_id, max_age_days=max_age_days, max_rows=max_rows)


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
        # take transaction control from pysqlite so BEGIN IMMEDIATE can be issued for writers
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            try:
                cur.execute("PRAGMA journal_mode=WAL")
            except Exception:  # noqa: BLE001 - read-only media: stay in the current journal mode
                pass
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("gpuvirt_write") else "BEGIN")


def _sqlite_path(url: str) -> Path | None:
    try:
        u = make_url(url)
    except ArgumentError:
        return None
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database).absolute()


def check_private(path: Path) -> list[str]:
    """Permission problems of the default SQLite location (reported by ``gpuvirt db current``)."""
    out = []
    try:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o077:
            out.append(f"{path} is accessible by other users (mode {oct(stat.S_IMODE(st.st_mode))})")
    except OSError:
        pass
    return out
