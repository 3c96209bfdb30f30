"""Inventory safety (issue 11 item 4): no silently created databases, a newer schema is one line, the state
directory must be trusted, nothing gpuvirt keeps as root is opened through a symbolic link, events are pruned."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3

import pytest

from gpuvirt import safefs


@pytest.fixture(autouse=True)
def _fresh_checks():
    # directories checked once stay trusted for the process; these tests change them under one process
    safefs.forget_checks()
    yield
    safefs.forget_checks()


def _one_line(res, code):
    assert res.exit_code == code, res
    assert res.stderr.startswith("gpuvirt: error: ") and res.stderr.count("\n") == 1, res
    return res.stderr


# --- a typo in --db ----------------------------------------------------------------------------------------------
def test_a_missing_named_sqlite_inventory_is_refused_not_created(cli, make_sim, tmp_path):
    sim = make_sim(["mtty"])
    typo = tmp_path / "typo" / "x.db"
    url = f"sqlite:///{typo}"
    for args in (["status"], ["report", "-f", "json"], ["db", "current"], ["db", "upgrade"]):
        err = _one_line(cli("--sim", sim.root, "--db", url, *args), 3)
        assert str(typo) in err and f"gpuvirt db init --db {url}" in err
    assert not typo.parent.exists()           # before: directories and an empty inventory appeared
    doc = cli("--sim", sim.root, "--db", url, "db", "init", "--json").json()
    assert doc["created"] and doc["revision"] == doc["revision"] and typo.exists()
    assert typo.stat().st_mode & 0o777 == 0o600 and typo.parent.stat().st_mode & 0o777 == 0o700
    assert cli("--sim", sim.root, "--db", url, "status").exit_code == 0
    again = cli("--sim", sim.root, "--db", url, "db", "init", "--json").json()
    assert not again["created"]


def test_the_default_inventory_is_still_created_on_first_use(cli, make_sim):
    sim = make_sim(["mtty"])
    db = sim.root / "var/lib/gpuvirt/inventory.db"
    assert not db.exists()
    assert cli("--sim", sim.root, "status").exit_code == 0
    assert db.exists() and db.stat().st_mode & 0o777 == 0o600
    # naming the default file explicitly is not a typo either
    other = make_sim(["mtty"], name="other")
    own = other.root / "var/lib/gpuvirt/inventory.db"
    assert cli("--sim", other.root, "--db", f"sqlite:///{own}", "status").exit_code == 0 and own.exists()


# --- a newer schema ---------------------------------------------------------------------------------------------
def test_an_inventory_from_a_newer_gpuvirt_is_one_line_for_every_command(cli, make_sim, gpuvirt_proc):
    from gpuvirt.inventory.store import HEAD_REVISION, gpuvirt_version

    sim = make_sim(["a2", "mtty"])
    root = sim.root
    assert cli("--sim", root, "attach", "vm1", "--mdev", "mtty-1").exit_code == 0
    db = root / "var/lib/gpuvirt/inventory.db"
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    con.commit()
    con.close()
    want = (f"this inventory is at revision 0099_from_the_future, newer than gpuvirt {gpuvirt_version()} knows "
            f"({HEAD_REVISION}); upgrade gpuvirt")
    for args in (["status"], ["reconcile", "--yes"], ["report"], ["attach", "vm2", "--mdev", "mtty-1"],
                 ["profile", "list"], ["db", "current"], ["db", "upgrade"], ["db", "check"], ["allocations"],
                 ["tenant", "list"]):
        err = _one_line(cli("--sim", root, *args), 8)
        assert want in err, args
    # the fast paths answer the same way
    for args in (["report", "-f", "json"],):
        res = gpuvirt_proc("--sim", root, *args)
        assert res.exit_code == 8 and want in res.stderr and res.stderr.count("\n") == 1, res
    con = sqlite3.connect(db)
    assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [("0099_from_the_future",)]
    con.close()


def test_known_revisions_match_alembic():
    from gpuvirt.inventory.migrate import revisions
    from gpuvirt.inventory.store import known_revisions

    assert known_revisions() == set(revisions())


# --- the state directory ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["world-writable", "group-writable", "foreign-owner"])
def test_an_untrusted_state_directory_is_refused(cli, make_sim, how):
    sim = make_sim(["a100-40gb"])
    root = sim.root
    state = root / "var/lib/gpuvirt"
    assert cli("--sim", root, "status").exit_code == 0
    if how == "world-writable":
        state.chmod(0o777)
    elif how == "group-writable":
        state.chmod(0o770)
    else:
        os.chown(state, 12345, 12345)
    safefs.forget_checks()
    err = _one_line(cli("--sim", root, "status"), 1)
    assert f"the state directory {state}" in err
    assert ("chmod go-w" in err) and ("owned by uid 12345" in err if how == "foreign-owner" else "writable by" in err)


def test_a_directory_above_the_state_directory_writable_by_others_is_refused(cli, make_sim):
    sim = make_sim(["mtty"])
    above = sim.root / "var"
    above.mkdir(exist_ok=True)
    above.chmod(0o777)                                      # no sticky bit: anyone could rename lib/ away
    err = _one_line(cli("--sim", sim.root, "status"), 1)
    assert str(above) in err and "sticky" in err
    above.chmod(0o1777)                                     # like /tmp: allowed
    safefs.forget_checks()
    assert cli("--sim", sim.root, "status").exit_code == 0


def test_lock_directory_owned_by_someone_else_is_refused(cli, make_sim):
    sim = make_sim(["a100-40gb"])
    root = sim.root
    assert cli("--sim", root, "create-profile", "one", "--mig", "1g.5gb=1", "--model", "a100-40gb").exit_code == 0
    locks = root / "var/lib/gpuvirt/locks"
    locks.mkdir(mode=0o700)
    os.chown(locks, 12345, 12345)
    err = _one_line(cli("--sim", root, "apply", "one", "--gpu", "0", "--yes"), 1)
    assert f"the lock directory {locks}" in err
    assert sim.load()["devices"][0]["mig"]["gpu_instances"] == []       # refused before touching the GPU


# --- symbolic links -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["inventory.db", "inventory.db-wal", "inventory.db-shm", "inventory.db.lock"])
def test_a_symlinked_database_file_is_refused(cli, make_sim, tmp_path, name):
    sim = make_sim(["mtty"])
    root = sim.root
    state = root / "var/lib/gpuvirt"
    state.mkdir(parents=True, mode=0o700)
    if name != "inventory.db":
        assert cli("--sim", root, "status").exit_code == 0
        (state / name).unlink(missing_ok=True)
    target = tmp_path / "elsewhere"
    (state / name).symlink_to(target)
    safefs.forget_checks()
    err = _one_line(cli("--sim", root, "status"), 1)
    assert str(state / name) in err and "symbolic link" in err
    assert not target.exists()                             # root never wrote through the link


def test_a_symlinked_gpu_lock_file_is_refused(cli, make_sim, tmp_path):
    sim = make_sim(["a100-40gb"])
    root = sim.root
    assert cli("--sim", root, "create-profile", "one", "--mig", "1g.5gb=1", "--model", "a100-40gb").exit_code == 0
    locks = root / "var/lib/gpuvirt/locks"
    locks.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (locks / "gpu-0000_41_00.0.lock").symlink_to(victim)
    err = _one_line(cli("--sim", root, "apply", "one", "--gpu", "0", "--yes"), 1)
    assert "lock file" in err and "symbolic link" in err
    assert victim.read_text() == "precious\n"
    assert sim.load()["devices"][0]["mig"]["gpu_instances"] == []


def test_a_symlinked_state_directory_is_refused(cli, make_sim, tmp_path):
    sim = make_sim(["mtty"])
    real = tmp_path / "real-state"
    real.mkdir(mode=0o700)
    (sim.root / "var/lib").mkdir(parents=True)
    (sim.root / "var/lib/gpuvirt").symlink_to(real)
    err = _one_line(cli("--sim", sim.root, "status"), 1)
    assert "symbolic link" in err and not any(real.iterdir())


# --- events --------------------------------------------------------------------------------------------------------
def _events(db, host):
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT count(*), min(at) FROM events WHERE host_id = ?", (host,)).fetchone()
    finally:
        con.close()


def test_events_are_pruned_by_age_and_by_count(cli, make_sim):
    sim = make_sim(["mtty"])
    root = sim.root
    cfg = root / "etc/gpuvirt/gpuvirt.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('host_id = "h1"\n[events]\nmax_age_days = 30\nmax_rows = 200\n')
    assert cli("--sim", root, "status").exit_code == 0
    db = root / "var/lib/gpuvirt/inventory.db"
    con = sqlite3.connect(db)
    old = (dt.datetime.utcnow() - dt.timedelta(days=400)).isoformat(sep=" ")
    recent = dt.datetime.utcnow().isoformat(sep=" ")
    rows = [(old if i < 300 else recent, "h1", "test", "noise", "ok") for i in range(1000)]
    rows += [(old, "other-host", "test", "noise", "ok")] * 50        # another host's rows are never touched
    con.executemany("INSERT INTO events (at, host_id, actor, action, result) VALUES (?, ?, ?, ?, ?)", rows)
    # counting is done when new ids cross a multiple of PRUNE_EVERY_IDS: make the next event cross one
    from gpuvirt.inventory.store import PRUNE_EVERY_IDS

    top = con.execute("SELECT max(id) FROM events").fetchone()[0]
    pad = (PRUNE_EVERY_IDS - 1 - top % PRUNE_EVERY_IDS) % PRUNE_EVERY_IDS
    con.executemany("INSERT INTO events (at, host_id, actor, action, result) VALUES (?, ?, ?, ?, ?)",
                    [(recent, "h1", "test", "noise", "ok")] * pad)
    con.commit()
    con.close()
    assert _events(db, "h1")[0] >= 1000
    # any command that records an event prunes afterwards (here: attach)
    assert cli("--sim", root, "attach", "vm1", "--mdev", "mtty-1").exit_code == 0
    count, oldest = _events(db, "h1")
    assert 200 <= count <= 205            # pruned after the first write that recorded an event
    assert oldest > (dt.datetime.utcnow() - dt.timedelta(days=31)).isoformat(sep=" ")
    assert _events(db, "other-host")[0] == 50
    # newest kept: the attach itself is among them
    con = sqlite3.connect(db)
    assert ("attach",) in con.execute("SELECT action FROM events WHERE host_id='h1' ORDER BY id DESC LIMIT 5").fetchall()
    con.close()


def test_event_pruning_can_be_switched_off(cli, make_sim):
    sim = make_sim(["mtty"])
    root = sim.root
    cfg = root / "etc/gpuvirt/gpuvirt.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('host_id = "h1"\n[events]\nmax_age_days = 0\nmax_rows = 0\n')
    assert cli("--sim", root, "status").exit_code == 0
    db = root / "var/lib/gpuvirt/inventory.db"
    con = sqlite3.connect(db)
    old = (dt.datetime.utcnow() - dt.timedelta(days=4000)).isoformat(sep=" ")
    con.executemany("INSERT INTO events (at, host_id, actor, action, result) VALUES (?, ?, ?, ?, ?)",
                    [(old, "h1", "t", "noise", "ok")] * 300)
    con.commit()
    con.close()
    assert cli("--sim", root, "attach", "vm1", "--mdev", "mtty-1").exit_code == 0
    assert _events(db, "h1")[0] >= 301


# --- a value SQLite kept that does not read back ----------------------------------------------------------------
def _damaged(cli, make_sim):
    """A host with a vGPU attached and an intent left open (as a kill leaves one); returns (root, db path)."""
    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.service import intent

    sim = make_sim(["a2"])
    assert cli("--sim", sim.root, "attach", "vm1", "--vgpu", "A2-2Q", "--format", "json").exit_code == 0
    with Context(resolve_settings(sim=str(sim.root), env={})) as ctx:
        run = intent.Run.begin(ctx, "attach", gpus=["0000:41:00.0"], target={"vm": "vm2"}, recovery="back")
        intent._ACTIVE.discard(run.id)
    return sim.root, sim.root / "var/lib/gpuvirt/inventory.db"


@pytest.mark.parametrize("table,column,value,row", [
    ("intents", "updated_at", "garbage", "id=1"),
    ("intents", "created_at", "2026-13-01 00:00:00", "id=1"),
    ("instances", "created_at", "garbage", "id=1"),
    ("allocations", "vm_state_at", 12345, "id=1"),
    ("gpus", "last_seen_at", "yesterday", "id=1"),
    ("intents", "steps", "[{not json", "id=1"),
    # JSON that reads back but not as the shape gpuvirt writes: a TypeError deep in a command
    ("intents", "steps", "null", "id=1"),
    ("intents", "steps", "[1]", "id=1"),
    ("intents", "gpus", "{}", "id=1"),
    ("intents", "target", "[]", "id=1"),
])
def test_a_stored_value_that_does_not_read_back_is_one_line_naming_table_and_column(cli, make_sim, table, column,
                                                                                    value, row):
    """A hand-edited or damaged SQLite row made status, report and reconcile end in an internal error (a bare
    ValueError from the driver's row parsing), unlike a bad hosts.last_seen_at in a cluster report."""
    root, db = _damaged(cli, make_sim)
    con = sqlite3.connect(str(db))
    try:
        con.execute(f"UPDATE {table} SET {column} = ?", (value,))
        con.commit()
    finally:
        con.close()
    before = _dump(db)
    # the commands that read such a row (a report and the allocation list read no intent)
    for args in (["status"], ["reconcile", "--yes"]) + ((["report"], ["allocations", "--json"])
                                                         if table != "intents" else ()):
        err = _one_line(cli("--sim", root, *args), 1)
        assert f"the inventory is corrupt: {table}.{column} of the row {row} is not" in err, (args, err)
        assert str(value)[:20] in err
    # nothing written, the damaged value included (a report records the host it runs on first: its, its GPUs'
    # and its stack's times of record may move)
    assert _dump(db) == before


def _dump(db):
    con = sqlite3.connect(str(db))
    try:
        return [line for line in con.iterdump() if not line.startswith(
            ('INSERT INTO "hosts"', 'INSERT INTO "gpus"', 'INSERT INTO "host_stack"'))]
    finally:
        con.close()


def test_an_error_raised_by_gpuvirt_inside_a_unit_is_not_called_corruption(make_sim):
    """Only a failure inside SQLAlchemy's reading of a row is looked for in the data; gpuvirt's own ValueError
    inside a unit of work stays what it is."""
    from gpuvirt.context import Context, resolve_settings

    sim = make_sim(["a2"])
    with Context(resolve_settings(sim=str(sim.root), env={})) as ctx:
        with pytest.raises(ValueError, match="mine"):
            with ctx.inventory.unit() as uow:
                uow.hosts()
                raise ValueError("mine")
