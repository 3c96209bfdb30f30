"""Hostile inputs against intent ownership across machines (owner_state, the lease, the heartbeat).

The owners are forged as in tests/test_crash_owners.py: a process of the other simulated host's machine."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from types import SimpleNamespace

import pytest

from test_crash_owners import PID, _forge, _marker, _open_on_hb, hosts  # noqa: F401 - hosts is a fixture

pytestmark = pytest.mark.crash

OTHER = "0b5c3e7e-1f0d-4c84-8e41-5b7f2a9d6c10"      # a boot id of another machine


def _row(updated_at, owner=f"{OTHER}:{PID}:987654"):
    return SimpleNamespace(state="running", owner=owner, updated_at=updated_at, host_id="hb")


@pytest.mark.parametrize("ahead", [10 ** 6, 301, None])
def test_a_lease_renewed_from_far_in_the_future_does_not_hold_forever(ahead):
    """An updated_at further ahead of this machine's clock than the lease (a clock set years ahead, a row
    written by hand) made the owner alive until this clock caught up, up to forever (year 9999), while
    'status' said it was heard from "0 s ago".  Clocks must agree to within the lease, so such a renewal is
    no evidence of life, as one as far in the past is not."""
    from gpuvirt.service import intent

    now = dt.datetime(2026, 12, 6, 22, 0, 0)
    seen = dt.datetime.max if ahead is None else now + dt.timedelta(seconds=ahead)
    assert intent.owner_state(_row(seen), OTHER, 300, own_host=False, now=now) is None


def test_a_lease_slightly_ahead_still_holds():
    """Clock skew within the lease is tolerated: the owner is alive."""
    from gpuvirt.service import intent

    now = dt.datetime(2026, 12, 6, 22, 0, 0)
    who = intent.owner_state(_row(now + dt.timedelta(seconds=60)), OTHER, 300, own_host=False, now=now)
    assert who is not None and "\n" not in who


def test_an_intent_renewed_in_the_future_is_settled_once_the_lease_cannot_hold(hosts):  # noqa: F811
    from gpuvirt.service import intent, rebalance_exec

    _root, ca, cb = hosts
    iid, addr = _open_on_hb(cb)
    _forge(cb, iid, _marker(cb), age=-10 * 365 * 86400)       # renewed ten years from now
    with rebalance_exec.reach(ca, {"hb": cb}, None):
        [res] = intent.recover(cb, {addr})
    assert res["intent"] == iid and res["result"] == "back"
    assert not intent.open_intents(cb)


def test_a_heartbeat_while_another_process_holds_the_database_skips_and_the_step_ends(make_sim, monkeypatch):
    """BEGIN IMMEDIATE held by another connection for several beats: each beat fails on the lock (busy
    timeout) and is skipped without a traceback from the thread, the lease is renewed once the lock is gone,
    and the step ends (the heartbeat stops within a busy timeout of the step's end)."""
    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.inventory import store
    from gpuvirt.service import intent

    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 200)
    monkeypatch.setattr(intent, "HEARTBEAT_SECONDS", 0.05)
    crashes = []
    monkeypatch.setattr(threading, "excepthook", lambda a: crashes.append(a))
    sim = make_sim(["a2"])
    with Context(resolve_settings(sim=str(sim.root), env={})) as ctx:
        run = intent.Run.begin(ctx, "attach", gpus=["0000:41:00.0"], target={"vm": "vm2"}, recovery="back")
        with ctx.inventory.unit() as uow:
            first = uow.intent(run.id).updated_at
        db = sim.root / "var/lib/gpuvirt/inventory.db"
        other = sqlite3.connect(str(db), isolation_level=None)
        t0 = time.monotonic()
        with run.heartbeat():
            other.execute("BEGIN IMMEDIATE")
            time.sleep(0.8)                     # several beats, each waiting its busy timeout
            with ctx.inventory.unit() as uow:   # readers are not blocked (WAL)
                assert uow.intent(run.id).updated_at == first
            other.execute("COMMIT")
            time.sleep(0.4)
        took = time.monotonic() - t0
        other.close()
        with ctx.inventory.unit() as uow:
            assert uow.intent(run.id).updated_at > first
        intent._ACTIVE.discard(run.id)
    assert not crashes
    assert took < 1.2 + 1.0, took


def test_a_heartbeat_that_ends_while_the_lock_is_still_held_does_not_outlast_the_busy_timeout(make_sim,
                                                                                              monkeypatch):
    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.inventory import store
    from gpuvirt.service import intent

    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 300)
    monkeypatch.setattr(intent, "HEARTBEAT_SECONDS", 0.05)
    sim = make_sim(["a2"])
    with Context(resolve_settings(sim=str(sim.root), env={})) as ctx:
        run = intent.Run.begin(ctx, "attach", gpus=["0000:41:00.0"], target={"vm": "vm2"}, recovery="back")
        other = sqlite3.connect(str(sim.root / "var/lib/gpuvirt/inventory.db"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            t0 = time.monotonic()
            with run.heartbeat():
                time.sleep(0.2)
            took = time.monotonic() - t0
        finally:
            other.execute("ROLLBACK")
            other.close()
        intent._ACTIVE.discard(run.id)
    assert took < 0.2 + 0.3 + 0.5, took


@pytest.mark.parametrize("value", ["null", "[1]", "{}"])
def test_the_hook_refuses_a_start_over_a_journal_of_the_wrong_shape_in_one_line(cli, make_sim, value):
    """The libvirt hook (a real process, libvirtd's argv and live XML) restoring a VM's device after a reboot
    while an intent is open whose steps are valid JSON of the wrong shape: it ended in "internal error:
    TypeError"; now it refuses the start naming the row, and changes nothing."""
    from test_hook import hook, install_hook, live_xml, stderr_line
    from test_inventory_safety import _dump

    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.service import intent
    from gpuvirt.sim.control import open_sim, reboot

    sim = make_sim(["a2"])
    path = install_hook(cli, sim.root)
    assert cli("--sim", sim.root, "attach", "vm1", "--vgpu", "A2-2Q").exit_code == 0
    with Context(resolve_settings(sim=str(sim.root), env={})) as ctx:
        run = intent.Run.begin(ctx, "attach", gpus=["0000:41:00.0"], target={"vm": "vm2"}, recovery="back")
        intent._ACTIVE.discard(run.id)
    db = sim.root / "var/lib/gpuvirt/inventory.db"
    con = sqlite3.connect(str(db))
    try:
        [(uuid,)] = con.execute("SELECT mdev_uuid FROM instances").fetchall()
        con.execute("UPDATE intents SET steps = ?", (value,))
        con.commit()
    finally:
        con.close()
    reboot(open_sim(sim.root))
    # (the full path has recorded the VM's UUID on its allocation by then, as for any refusal after it)
    before = [x for x in _dump(db) if not x.startswith('INSERT INTO "allocations"')]
    p = hook(path, "vm1", "prepare", xml=live_xml("vm1", mdevs=[uuid]))
    assert p.returncode == 1, p
    line = stderr_line(p)
    assert line.startswith("gpuvirt: error: refusing to start vm1: the inventory is corrupt: intents.steps of the "
                           "row id=1 is not a JSON list of objects"), line
    assert [x for x in _dump(db) if not x.startswith('INSERT INTO "allocations"')] == before


def test_a_last_health_event_at_the_end_of_time_is_no_internal_error(cli, make_sim):
    """health_last_at '9999-12-31 23:59:59.999999' reads back (a valid datetime) but its recovery time, that
    plus policies.health_quiet_seconds, overflowed: health, report and attach ended in "internal error:
    OverflowError".  A recovery past the representable time is no recovery ('recovers' empty)."""
    sim = make_sim(["a2"])
    assert cli("--sim", sim.root, "attach", "vm1", "--vgpu", "A2-2Q").exit_code == 0
    con = sqlite3.connect(str(sim.root / "var/lib/gpuvirt/inventory.db"))
    try:
        con.execute("UPDATE gpus SET health = 'unhealthy', health_since = ?, health_last_at = ?, health_reason = "
                    "'xid 79'", ("9999-12-31 23:59:59.999999",) * 2)
        con.commit()
    finally:
        con.close()
    r = cli("--sim", sim.root, "health", "--json")
    assert r.exit_code == 0, r
    [g] = r.json()["gpus"]
    assert g["health"] == "unhealthy" and g["recovers_at"] is None, g
    for args in (["health"], ["report", "-f", "prometheus"], ["status", "--json"]):
        r = cli("--sim", sim.root, *args)
        assert r.exit_code == 0 and "internal error" not in r.stderr, (args, r)
    r = cli("--sim", sim.root, "attach", "vm2", "--vgpu", "A2-2Q")
    assert "internal error" not in r.stderr, r


@pytest.mark.pg
@pytest.mark.parametrize("value", ["null", "[1]"])
def test_on_postgresql_a_journal_of_the_wrong_shape_is_one_line(pg_schema, make_sim, cli, value):
    """PostgreSQL refuses JSON that does not parse, but keeps any valid JSON: a journal's steps of the wrong
    shape ended in an internal error there too."""
    from sqlalchemy import text

    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.service import intent

    url, admin, schema = pg_schema
    sim = make_sim(["a2"])
    assert cli("--sim", sim.root, "--db", url, "attach", "vm1", "--vgpu", "A2-2Q").exit_code == 0
    with Context(resolve_settings(sim=str(sim.root), db=url, env={})) as ctx:
        run = intent.Run.begin(ctx, "attach", gpus=["0000:41:00.0"], target={"vm": "vm2"}, recovery="back")
        intent._ACTIVE.discard(run.id)
    with admin.connect() as c:
        c.execute(text(f'UPDATE "{schema}".intents SET steps = CAST(:v AS JSON)'), {"v": value})
    for args in (["status"], ["reconcile", "--yes"]):
        r = cli("--sim", sim.root, "--db", url, *args)
        assert r.exit_code == 1 and r.stderr.count("\n") == 1, (args, r)
        assert f"the inventory is corrupt: intents.steps of the row id={run.id} is not a JSON list of objects" \
            in r.stderr, (args, r)
    with admin.connect() as c:
        assert c.execute(text(f'SELECT steps::text FROM "{schema}".intents')).scalar() == value


@pytest.mark.parametrize("owner", [b"\x00\xff:1:1", "", ":", "::", "a", "x:y:z:1:2", "x" * 100000, f"{OTHER}:-1:1",
                                   f"{OTHER}: 1\n:1", f"{OTHER}:99999999999999999999999:1"])
def test_an_owner_that_names_no_process_is_nobody(owner):
    """Every unparseable owner names no live process (the intent is settled like a crashed one); one stored
    as a BLOB (SQLite returns bytes for it) ended in "internal error: TypeError" in status, reconcile, attach."""
    from gpuvirt.service import intent

    now = dt.datetime(2026, 12, 6, 22, 0, 0)
    for own_host in (True, False):
        who = intent.owner_state(_row(now, owner=owner), OTHER, 300, own_host=own_host, now=now)
        assert who is None or (not own_host and "\n" not in who), (owner, who)
    assert intent.owner_alive(owner) is False


def test_a_binary_owner_in_the_inventory_is_settled_not_an_internal_error(cli, make_sim):
    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.service import intent

    sim = make_sim(["a2"])
    assert cli("--sim", sim.root, "attach", "vm1", "--vgpu", "A2-2Q").exit_code == 0
    with Context(resolve_settings(sim=str(sim.root), env={})) as ctx:
        run = intent.Run.begin(ctx, "attach", gpus=["0000:41:00.0"], target={"vm": "vm2"}, recovery="back")
        intent._ACTIVE.discard(run.id)
    db = sim.root / "var/lib/gpuvirt/inventory.db"
    con = sqlite3.connect(str(db))
    try:
        con.execute("UPDATE intents SET owner = ?", (b"\x00\xff:1:1",))
        con.commit()
    finally:
        con.close()
    r = cli("--sim", sim.root, "status", "--json")
    assert r.exit_code == 0, r
    r = cli("--sim", sim.root, "reconcile", "--yes")
    assert r.exit_code == 0, r
    con = sqlite3.connect(str(db))
    try:
        assert con.execute("SELECT count(*) FROM intents").fetchone() == (0,)
    finally:
        con.close()


def test_a_boot_id_that_is_not_text_is_unknown_not_an_internal_error(cli, make_sim):
    """The host's boot id file (under the root: a simulated host's, or a --root tree) holding bytes that are not
    UTF-8 ended every command that records the host or opens an intent in "internal error:
    UnicodeDecodeError"; it is an unknown boot id, as a missing file is."""
    from gpuvirt.service import intent

    sim = make_sim(["a2"])
    (sim.root / "proc/sys/kernel/random/boot_id").write_bytes(b"\xff\xfe\x00")
    assert intent.root_boot_id(sim.root) is None
    r = cli("--sim", sim.root, "attach", "vm1", "--vgpu", "A2-2Q")
    assert r.exit_code == 0, r
    assert cli("--sim", sim.root, "status").exit_code == 0


@pytest.mark.parametrize("spec", [b"\x00\xff", 12, "garbage"])
def test_the_hooks_fast_path_leaves_a_profile_it_cannot_read_to_the_full_path(cli, make_sim, spec):
    """A GPU's desired profile whose stored spec is a BLOB or a number made the hook's fast path (restoring a VM's
    device after a reboot) end in "internal error: TypeError", refusing the start; one that is no JSON was
    judged by its raw text.  Each is now left to the full path, which restores the device as reconcile would
    (the restore reads no profile spec)."""
    from test_hook import hook, install_hook, live_xml, stderr_line

    from gpuvirt.sim.control import open_sim, reboot

    sim = make_sim(["a2"])
    path = install_hook(cli, sim.root)
    assert cli("--sim", sim.root, "create-profile", "p1", "--vgpu", "A2-2Q=2").exit_code == 0
    assert cli("--sim", sim.root, "attach", "vm1", "--vgpu", "A2-2Q").exit_code == 0
    db = sim.root / "var/lib/gpuvirt/inventory.db"
    con = sqlite3.connect(str(db))
    try:
        [(uuid,)] = con.execute("SELECT mdev_uuid FROM instances").fetchall()
        con.execute("UPDATE gpus SET desired_profile = 'p1'")
        con.execute("UPDATE profiles SET spec = ?", (spec,))
        con.commit()
    finally:
        con.close()
    reboot(open_sim(sim.root))
    p = hook(path, "vm1", "prepare", xml=live_xml("vm1", mdevs=[uuid]))
    assert p.returncode == 0, p
    assert stderr_line(p).startswith("gpuvirt: vm1: restored 1 device(s) of this VM"), p
    assert (sim.root / "sys/bus/mdev/devices" / uuid).exists()


@pytest.mark.parametrize("table,column", [("instances", "parent"), ("instances", "type_id"), ("gpus", "address")])
def test_the_hooks_fast_path_names_a_blob_where_text_belongs(cli, make_sim, table, column):
    """A BLOB in a text column the fast path reads (written by hand; SQLite keeps it) ended the VM's start in
    "internal error: TypeError"; it is the one-line corrupt-inventory refusal, and nothing is changed."""
    from test_hook import hook, install_hook, live_xml, stderr_line
    from test_inventory_safety import _dump

    from gpuvirt.sim.control import open_sim, reboot

    sim = make_sim(["a2"])
    path = install_hook(cli, sim.root)
    assert cli("--sim", sim.root, "attach", "vm1", "--vgpu", "A2-2Q").exit_code == 0
    db = sim.root / "var/lib/gpuvirt/inventory.db"
    con = sqlite3.connect(str(db))
    try:
        [(uuid,)] = con.execute("SELECT mdev_uuid FROM instances").fetchall()
        con.execute(f"UPDATE {table} SET {column} = ?", (b"\x00\xff",))
        con.commit()
    finally:
        con.close()
    reboot(open_sim(sim.root))
    before = _dump(db)
    p = hook(path, "vm1", "prepare", xml=live_xml("vm1", mdevs=[uuid]))
    assert p.returncode == 1, p
    assert stderr_line(p).startswith(f"gpuvirt: error: refusing to start vm1: the inventory is corrupt: {table}."
                                     f"{column} of the row id=1 is not text"), p
    assert _dump(db) == before
