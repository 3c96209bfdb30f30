"""The SQLite inventory through the standard library's ``sqlite3`` alone: the libvirt hook's fast path.

libvirtd waits for the hook at every VM start and stop, and importing SQLAlchemy's ORM alone costs more than the
hook may take (issue 14: prepare and release within 0.75x of ``python -c 'import sqlalchemy.orm'``).  The few
statements a start or stop needs - an instance by mdev UUID or VF address, its allocation, the VM state, an
audit event, an intent row of the journal - are written here in SQL, with exactly the values the ORM stores for
them (``models.py``): booleans as 0/1, datetimes as ``YYYY-MM-DD HH:MM:SS.ffffff`` (naive UTC), JSON columns as
``json.dumps`` text.  So a row written here reads back through the ORM the same as one the ORM wrote, and an
intent left by a killed fast path is finished by ``gpuvirt.service.intent.recover`` like any other.

Same safety as :mod:`gpuvirt.inventory.store`: the directory and the files are checked before SQLite opens them
(``prepare_sqlite_path``, which ``store`` uses as well), the same pragmas (WAL, busy timeout, foreign keys), and
writes run in ``BEGIN IMMEDIATE`` transactions, so they queue behind every other gpuvirt writer on the
database lock exactly as the ORM's units do.

:func:`open_fast` answers None - the caller then takes the full path - for anything this module does not speak:
a PostgreSQL (or any non-SQLite) inventory, a URL with options, a database that does not exist yet (the full path
creates the default one), or a schema at another revision than :data:`HEAD_REVISION` (the full path upgrades it,
or refuses one a newer gpuvirt wrote).  This module is the only code besides the ORM that talks to the
database; nothing outside ``gpuvirt.inventory`` writes SQL (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from gpuvirt.errors import ConflictError, DatabaseLockedError, InventoryError, InventoryNotFoundError

HEAD_REVISION = "0007_intent_recovery"          # keep equal to the newest file in migrations/versions (tested)
BUSY_TIMEOUT_MS = int(os.environ.get("GPUVIRT_DB_BUSY_TIMEOUT_MS", "30000"))
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal", ".lock")
PRUNE_INTERVAL_S = 600.0
PRUNE_EVERY_IDS = 100

# the columns of an instance the hook reads, in this order (Row below names them)
_INSTANCE_COLS = ("id", "gpu_id", "kind", "state", "persistent", "mdev_uuid", "parent", "type_id", "type_name",
                  "compute_slices", "backing_instance_id", "profile_name", "placement_start", "placement_size")
_ALLOC_COLS = ("id", "instance_id", "vm_name", "vm_uuid", "tenant", "persistent", "consumer", "vm_state")


class Row(dict):
    """A row as a dict with attribute access (``r.kind``), the way the ORM's objects are read."""

    __getattr__ = dict.get


def _row(table: str, cols: tuple[str, ...], values: tuple) -> Row:
    """``values`` of ``table`` as a Row.  No column the hook reads is ever written as a BLOB, but SQLite keeps
    one written by hand, and bytes where text belongs ended the VM's start in an internal TypeError; it is the
    corrupt-inventory error, naming table, column and row as ``store.unreadable_value`` does."""
    for c, v in zip(cols, values):
        if isinstance(v, bytes):
            raise InventoryError(f"the inventory is corrupt: {table}.{c} of the row id={values[0]!r} is not text "
                                 f"({v[:20]!r}); write the value gpuvirt recorded there, or restore the inventory "
                                 "from a backup")
    return Row(zip(cols, values))


def stamp(when: dt.datetime | None = None) -> str:
    """A datetime as SQLAlchemy's SQLite dialect stores it (naive UTC, microseconds always written)."""
    d = when or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    return f"{d:%Y-%m-%d %H:%M:%S}.{d.microsecond:06d}"


def describe_db_error(msg: str, where: str, action: str, *, integrity: bool = False) -> InventoryError:
    """The one-line error for a database failure (``store.translate_db_error`` and this module share it)."""
    low = msg.lower()
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
    if integrity:
        return ConflictError(f"{action}: concurrent change in the inventory ({msg})")
    return InventoryError(f"{action}: inventory error on {where}: {msg}")


def prepare_sqlite_path(path: Path, *, create: bool, state_dir: Path | None = None) -> None:
    """Check (and with ``create``, make) the SQLite inventory at ``path`` before SQLite opens it.

    SQLite opens the database and its ``-wal``/``-shm``/``-journal`` files itself and follows symbolic links,
    so the directory must be trusted (nobody else can plant a link there) and none of the files may be a link
    now.  Without ``create`` a missing database is refused with the command that creates it.
    """
    from gpuvirt.safefs import check_file, check_private_dir, ensure_private_dir, open_nofollow

    directory = path.parent
    what = "state directory" if state_dir is not None and directory == Path(state_dir).absolute() else \
        "inventory directory"
    exists = os.path.lexists(path)
    if not exists and not create:
        raise InventoryNotFoundError(
            f"the inventory {path} does not exist; create it with 'gpuvirt db init --db sqlite:///{path}' "
            "(or correct the path)", path=str(path))
    if create:
        ensure_private_dir(directory, what=what)
    else:
        check_private_dir(directory, what=what)
    if os.path.isdir(path) and not os.path.islink(path):
        raise InventoryError(f"the inventory path {path} is a directory")
    check_file(path, what="inventory")
    for suffix in SQLITE_SIDE_FILES:
        check_file(Path(str(path) + suffix), what="inventory file")
    if not os.path.lexists(path):
        try:
            os.close(open_nofollow(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600, what="inventory"))
        except FileExistsError:
            check_file(path, what="inventory")   # another process created it first
        except OSError as exc:
            raise InventoryError(f"cannot create the inventory {path}: {exc.strerror}") from exc


def plain_sqlite_file(url: str) -> str | None:
    """The database file of a plain ``sqlite:///PATH`` URL (as SQLAlchemy reads it), else None: other drivers,
    query options and %-escapes are left to the full path, which parses URLs completely."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or "?" in url or "%" in url or "#" in url:
        return None
    path = url[len(prefix):]
    return path if path and path != ":memory:" else None


def open_fast(settings: Any) -> "FastInventory | None":
    """The inventory of ``settings`` through sqlite3, or None when the full path must handle it (module doc)."""
    url = settings.effective_db_url()
    raw = plain_sqlite_file(url)
    if raw is None:
        return None
    path = Path(raw).absolute()
    if not os.path.lexists(path):
        return None             # the full path creates the default inventory, or names the command that does
    prepare_sqlite_path(path, create=False, state_dir=settings.state_dir)
    inv = FastInventory(raw, path, settings.host_id, settings.events)
    try:
        rev = inv.revision()
    except BaseException:
        inv.close()
        raise
    if rev != HEAD_REVISION:
        inv.close()
        return None
    return inv


def prune_due(ids: list[int], pruned_at: float | None) -> tuple[bool, bool, float | None]:
    """Whether events are due for pruning after a write that recorded ``ids``: (by age, by count, the new
    "pruned at" time).  By age on the first such write of a process and then every ``PRUNE_INTERVAL_S``; by
    count when the ids cross a multiple of ``PRUNE_EVERY_IDS``.  Shared with ``store.Inventory`` so that both
    paths prune at the same moments."""
    now = time.monotonic()
    by_age = pruned_at is None or now - pruned_at >= PRUNE_INTERVAL_S
    by_count = max(ids) // PRUNE_EVERY_IDS != (min(ids) - 1) // PRUNE_EVERY_IDS
    return by_age, by_count, now if by_age else pruned_at


class FastInventory:
    """One connection; reads in plain ``BEGIN`` transactions, writes in ``BEGIN IMMEDIATE`` ones (:meth:`tx`)."""

    def __init__(self, where: str, path: Path, host_id: str, events: dict[str, Any] | None = None) -> None:
        self.where = where              # as messages name it (store._describe: the URL's database part)
        self.host_id = host_id
        ev = events or {}
        # events retention, as store.Inventory.event_limits
        self.event_limits = (int(ev.get("max_age_days", 0)), int(ev.get("max_rows", 0)))
        self._pruned_at: float | None = None
        try:
            self.conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            cur = self.conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            with contextlib.suppress(sqlite3.Error):     # read-only media: stay in the current journal mode
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise describe_db_error(str(exc), self.where, "inventory") from exc

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "FastInventory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def revision(self) -> str | None:
        try:
            row = self.conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise describe_db_error(str(exc), self.where, "read schema version") from exc
        except sqlite3.Error as exc:
            raise describe_db_error(str(exc), self.where, "read schema version") from exc
        return row[0] if row else None

    @contextlib.contextmanager
    def tx(self, *, write: bool = False, action: str = "inventory") -> Iterator["Tx"]:
        """A transaction (committed when the block ends, rolled back when it raises), as ``Inventory.unit``;
        events recorded in it are pruned afterwards as ``Inventory._after_events`` does."""
        t = Tx(self)
        try:
            self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield t
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise describe_db_error(str(exc), self.where, action,
                                    integrity=isinstance(exc, sqlite3.IntegrityError)) from exc
        except BaseException:
            self._rollback()
            raise
        if t.event_ids:
            self._after_events(t.event_ids)

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")

    def _after_events(self, ids: list[int]) -> None:
        """``store.Inventory._after_events``, statement for statement (best effort: a busy database postpones
        the pruning rather than failing a start that already succeeded)."""
        if self.event_limits == (0, 0):
            return
        by_age, by_count, self._pruned_at = prune_due(ids, self._pruned_at)
        if not by_age and not by_count:
            return
        max_age_days, max_rows = self.event_limits
        with contextlib.suppress(InventoryError):
            with self.tx(write=True, action="prune events") as t:
                if by_age and max_age_days > 0:
                    cutoff = stamp(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
                                   - dt.timedelta(days=max_age_days))
                    t.x("DELETE FROM events WHERE events.at < ? AND coalesce(events.host_id, ?) = ?",
                        (cutoff, "", self.host_id))
                if by_count and max_rows > 0:
                    cut = t.x("SELECT events.id FROM events WHERE events.host_id = ? ORDER BY events.id DESC "
                              "LIMIT 1 OFFSET ?", (self.host_id, max_rows)).fetchone()
                    if cut is not None:
                        t.x("DELETE FROM events WHERE events.host_id = ? AND events.id <= ?", (self.host_id, cut[0]))


class Tx:
    """The statements of the hook's fast path, inside one transaction of :class:`FastInventory`."""

    def __init__(self, inv: FastInventory) -> None:
        self.inv = inv
        self.host_id = inv.host_id
        self.event_ids: list[int] = []

    def x(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        return self.inv.conn.execute(sql, params)

    # --- reads -----------------------------------------------------------------------------------------------
    def _instances(self, where: str, params: tuple, *, first: bool = False) -> list[Row]:
        cols = ", ".join(f"instances.{c}" for c in _INSTANCE_COLS)
        sql = f"SELECT {cols} FROM instances WHERE {where}" + (" LIMIT 1" if first else "")
        return [_row("instances", _INSTANCE_COLS, r) for r in self.x(sql, params)]

    def instance_by_mdev(self, uuid: str) -> Row | None:
        """``Unit.instance_by_mdev``: the same statement, so SQLite picks the same row."""
        got = self._instances("instances.host_id = ? AND instances.mdev_uuid = ?", (self.host_id, uuid), first=True)
        return got[0] if got else None

    def instance_by_parent(self, parent: str, kinds: tuple[str, ...]) -> Row | None:
        marks = ", ".join("?" * len(kinds))
        got = self._instances(f"instances.host_id = ? AND instances.parent = ? AND instances.kind IN ({marks})",
                              (self.host_id, parent, *kinds), first=True)
        return got[0] if got else None

    def gpu_instances(self, gpu_id: int) -> list[Row]:
        """A GPU's instances in ``Unit.instances`` order (by GPU, then id)."""
        return self._instances("instances.host_id = ? AND instances.gpu_id = ? ORDER BY instances.gpu_id, "
                               "instances.id", (self.host_id, gpu_id))

    def allocation_of(self, instance_id: int) -> Row | None:
        r = self.x(f"SELECT {', '.join(_ALLOC_COLS)} FROM allocations WHERE instance_id = ?",
                   (instance_id,)).fetchone()
        return _row("allocations", _ALLOC_COLS, r) if r else None

    def allocations(self, vm_name: str | None = None) -> list[Row]:
        """This host's allocations (of one VM name), by id, as ``Unit.allocations``."""
        sql = f"SELECT {', '.join(_ALLOC_COLS)} FROM allocations WHERE host_id = ?"
        params: tuple = (self.host_id,)
        if vm_name is not None:
            sql += " AND vm_name = ?"
            params += (vm_name,)
        return [_row("allocations", _ALLOC_COLS, r) for r in self.x(sql + " ORDER BY id", params)]

    def gpu(self, gpu_id: int) -> Row | None:
        cols = ("id", "address", "mig_capable", "desired_profile", "profile_state", "sriov_num_vfs")
        r = self.x(f"SELECT {', '.join(cols)} FROM gpus WHERE id = ?", (gpu_id,)).fetchone()
        return _row("gpus", cols, r) if r else None

    def profile_spec(self, name: str) -> str | None:
        r = self.x("SELECT spec FROM profiles WHERE name = ?", (name,)).fetchone()
        return r[0] if r else None

    def has_intents(self) -> bool:
        return self.x("SELECT 1 FROM intents WHERE host_id = ? LIMIT 1", (self.host_id,)).fetchone() is not None

    def has_container_allocations(self) -> bool:
        return self.x("SELECT 1 FROM allocations WHERE host_id = ? AND consumer = 'container' LIMIT 1",
                      (self.host_id,)).fetchone() is not None

    def host_known(self) -> bool:
        return self.x("SELECT 1 FROM hosts WHERE id = ?", (self.host_id,)).fetchone() is not None

    # --- writes ----------------------------------------------------------------------------------------------
    def allocate(self, inst: Row, *, vm_name: str, vm_uuid: str | None, persistent: bool) -> Row:
        """``Unit.allocate`` without tenant (the hook's hand-written devices have none)."""
        try:
            cur = self.x("INSERT INTO allocations (instance_id, host_id, vm_name, vm_uuid, tenant, persistent, "
                         "created_at, vm_state, vm_state_at, consumer) VALUES (?, ?, ?, ?, NULL, ?, ?, NULL, NULL, "
                         "'vm')", (inst.id, self.host_id, vm_name, vm_uuid, int(persistent), stamp()))
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"instance {inst.id} was allocated by someone else at the same time") from exc
        return Row(id=cur.lastrowid, instance_id=inst.id, vm_name=vm_name, vm_uuid=vm_uuid, tenant=None,
                   persistent=persistent, consumer="vm", vm_state=None)

    def set_vm_uuid(self, alloc_id: int, vm_uuid: str) -> None:
        self.x("UPDATE allocations SET vm_uuid = ? WHERE id = ?", (vm_uuid, alloc_id))

    def set_vm_state(self, alloc_id: int, state: str) -> None:
        self.x("UPDATE allocations SET vm_state = ?, vm_state_at = ? WHERE id = ?", (state, stamp(), alloc_id))

    def instance_failed(self, instance_id: int, error: str) -> None:
        """What reconcile records for a device it could not restore (``reconcile._failed``); ``updated_at``
        moves only when a value changes, as the ORM's ``onupdate`` does."""
        self.x("UPDATE instances SET state = 'failed', error = ?, updated_at = ? WHERE id = ? AND state IN "
               "('active', 'failed') AND NOT (state = 'failed' AND error IS ?)", (error, stamp(), instance_id, error))

    def instance_restored(self, instance_id: int) -> None:
        """What a create step's record makes of an existing active row (``intent_steps._upsert_row``): active,
        without an error."""
        self.x("UPDATE instances SET state = 'active', error = NULL, updated_at = ? WHERE id = ? AND "
               "(state != 'active' OR error IS NOT NULL)", (stamp(), instance_id))

    def event(self, action: str, *, target: str | None = None, result: str = "ok",
              detail: dict[str, Any] | None = None, actor: str) -> int:
        cur = self.x("INSERT INTO events (at, host_id, actor, action, target, result, detail) VALUES "
                     "(?, ?, ?, ?, ?, ?, ?)", (stamp(), self.host_id, actor, action, target, result,
                                               None if detail is None else json.dumps(detail)))
        self.event_ids.append(cur.lastrowid)
        return cur.lastrowid

    # --- the intent journal (models.Intent; service.intent reads these rows back) ------------------------------
    def add_intent(self, *, kind: str, state: str, recovery: str, gpus: list[str], steps: list[dict[str, Any]],
                   owner: str | None, actor: str | None, boot_marker: str | None = None) -> int:
        """``Unit.note_boot`` and ``Unit.add_intent``: the host's boot id is recorded with the row, as
        ``intent.Run.begin`` does, since other processes judge the row's owner by it."""
        now = stamp()
        if boot_marker is not None:
            self.x("UPDATE hosts SET boot_marker = ? WHERE id = ? AND boot_marker IS NOT ?",
                   (boot_marker, self.host_id, boot_marker))
        cur = self.x('INSERT INTO intents (host_id, kind, state, recovery, gpus, target, "before", steps, pid, owner, '
                     "actor, error, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                     (self.host_id, kind, state, recovery, json.dumps(gpus), json.dumps({}), json.dumps({}),
                      json.dumps(steps), os.getpid(), owner, actor, now, now))
        return cur.lastrowid

    def save_steps(self, intent_id: int, steps: list[dict[str, Any]]) -> None:
        n = self.x("UPDATE intents SET steps = ?, updated_at = ? WHERE id = ?",
                   (json.dumps(steps), stamp(), intent_id)).rowcount
        if not n:
            raise ConflictError(f"intent {intent_id} vanished from the inventory")

    def delete_intent(self, intent_id: int) -> None:
        self.x("DELETE FROM intents WHERE id = ?", (intent_id,))
