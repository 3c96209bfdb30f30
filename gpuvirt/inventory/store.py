"""Opening the inventory database: engine setup, schema upgrades, error translation, units of work.

* SQLite (default ``<root>/var/lib/gpuvirt/inventory.db``): directory 0700, file 0600, WAL journal, a busy
  timeout, foreign keys on; write transactions start with ``BEGIN IMMEDIATE`` so two writers queue on the
  database lock instead of failing half-way with SQLITE_BUSY.
* PostgreSQL (``postgresql+psycopg://...``): ``READ COMMITTED``; allocation paths lock rows
  (``SELECT ... FOR UPDATE SKIP LOCKED``) and a unique constraint backs them up.
* A fresh or older database is upgraded to the newest Alembic revision before use (under a file lock for
  SQLite, an advisory lock for PostgreSQL), so concurrent first runs do not race.  Checking the revision
  reads ``alembic_version`` directly; Alembic itself is imported only when an upgrade is due.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gpuvirt.errors import ConflictError, DatabaseLockedError, InventoryError, UsageError

HEAD_REVISION = "0005_containers"         # keep equal to the newest file in migrations/versions (tested)
BUSY_TIMEOUT_MS = int(os.environ.get("GPUVIRT_DB_BUSY_TIMEOUT_MS", "30000"))


def translate_db_error(exc: BaseException, url: str, action: str = "inventory") -> InventoryError:
    msg = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
    low = msg.lower()
    where = _describe(url)
    if "database is locked" in low or "database table is locked" in low or "lock timeout" in low:
        return DatabaseLockedError(f"{action}: the inventory {where} is locked by another gpuvirt process "
                                   f"(waited {BUSY_TIMEOUT_MS / 1000:g}s); retry when it has finished")
    if "readonly database" in low or "read-only" in low or "permission denied" in low:
        return InventoryError(f"{action}: the inventory {where} is read-only for this user ({msg})")
    if "file is not a database" in low or "malformed" in low or "file is encrypted" in low:
        return InventoryError(f"{action}: the inventory {where} is not a valid database ({msg}); restore it from "
                              "a backup or move it aside")
    if "unable to open database" in low:
        return InventoryError(f"{action}: cannot open the inventory {where} ({msg})")
    if "could not connect" in low or "connection refused" in low or "connection failed" in low:
        return InventoryError(f"{action}: cannot connect to the inventory {where} ({msg})")
    if isinstance(exc, IntegrityError):
        return ConflictError(f"{action}: concurrent change in the inventory ({msg})")
    return InventoryError(f"{action}: inventory error on {where}: {msg}")


def _describe(url: str) -> str:
    try:
        u = make_url(url)
    except ArgumentError:
        return url
    if u.get_backend_name() == "sqlite":
        return str(u.database)
    return u.render_as_string(hide_password=True)


def _prepare_sqlite_path(path: Path) -> None:
    directory = path.parent
    if not directory.exists():
        try:
            directory.mkdir(parents=True, mode=0o700)
        except OSError as exc:
            raise InventoryError(f"cannot create the inventory directory {directory}: {exc.strerror}") from exc
    if not path.exists():
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        except OSError as exc:
            raise InventoryError(f"cannot create the inventory {path}: {exc.strerror}") from exc
    elif path.is_dir():
        raise InventoryError(f"the inventory path {path} is a directory")


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

    # --- opening ----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Any, *, upgrade: bool = True) -> "Inventory":
        url = settings.effective_db_url()
        inv = cls.connect(url, settings.host_id)
        if upgrade:
            inv.ensure_schema()
        return inv

    @classmethod
    def connect(cls, url: str, host_id: str = "local") -> "Inventory":
        try:
            u = make_url(url)
        except ArgumentError as exc:
            raise UsageError(f"invalid database URL {url!r}: {exc}") from exc
        backend = u.get_backend_name()
        try:
            if backend == "sqlite":
                if u.database in (None, "", ":memory:"):
                    raise UsageError("an in-memory SQLite inventory cannot be shared; give a file path")
                path = Path(u.database)
                _prepare_sqlite_path(path)
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

    def ensure_schema(self) -> None:
        if self.current_revision() == HEAD_REVISION:
            return
        with self._upgrade_lock():
            if self.current_revision() != HEAD_REVISION:
                self.upgrade()

    @contextlib.contextmanager
    def _upgrade_lock(self) -> Iterator[None]:
        if self.backend == "sqlite":
            lock_path = Path(str(make_url(self.url).database) + ".lock")
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
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
            yield Unit(self, session)
            session.commit()
        except (DBAPIError, SQLAlchemyError) as exc:
            session.rollback()
            raise translate_db_error(exc, self.url, action) from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()


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
