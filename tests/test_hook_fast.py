"""The hook's fast path (issue 14 item 4): same results as the full path, really taken, crash-safe, and left to the
full path where it does not apply.

Every hook call is a real process with libvirtd's argv, the live XML on stdin and an empty environment: the
fast path through the installed script, the full path through ``hook_main.run_hook(..., fast=False)`` with the
same interpreter and ``-I``.  "Same results" is checked on two copies of one simulated host: the inventory's
instances, allocations, intents and events (timestamps aside), the simulated host's devices, the exit status and
stderr.  The full path also refreshes the host's and GPUs' discovered facts (``hostview.record``); the fast path
leaves that to reconcile, so those two tables are not compared, nor the count of foreign objects in the
``reconcile`` event (full discovery only; the fast path records None).
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_hook import VM_UUID, attach, hook, install_hook, live_xml, ok

DB_REL = "var/lib/gpuvirt/inventory.db"
OTHER_UUID = "11111111-2222-4333-8444-555555555555"
STAMPS = {"created_at", "updated_at", "vm_state_at", "at"}
FULL = ("import sys; from gpuvirt.cli.hook_main import run_hook; "
        "sys.exit(run_hook(sys.argv[2:], sim=sys.argv[1], fast=False))")


def full_hook(root, domain, op, sub="begin", extra="-", xml=b""):
    """The same hook call on the full path (SQLAlchemy, discovery, reconcile)."""
    data = xml.encode() if isinstance(xml, str) else xml
    return subprocess.run([sys.executable, "-I", "-c", FULL, str(root), domain, op, sub, extra], input=data,
                          capture_output=True, env={}, timeout=120)


def copy_host(root: Path) -> Path:
    """A second simulated host identical to ``root`` (inventory included), with its own hook installed."""
    dst = Path(tempfile.mkdtemp(prefix="gpuvirt-test-copy-", dir=str(root.parent))) / root.name
    shutil.copytree(root, dst, symlinks=True)
    return dst


def rows(root: Path, since_event: int = 0) -> dict:
    """The inventory's instances, allocations, intents and the events after ``since_event``, without timestamps."""
    con = sqlite3.connect(str(root / DB_REL))
    con.row_factory = sqlite3.Row
    out = {}
    try:
        for table, where in (("instances", ""), ("allocations", ""), ("intents", ""),
                             ("events", f" WHERE id > {since_event}")):
            out[table] = [{k: r[k] for k in r.keys() if k not in STAMPS and k not in ("pid", "owner")}
                          for r in con.execute(f"SELECT * FROM {table}{where} ORDER BY id")]
    finally:
        con.close()
    for ev in out["events"]:
        if ev["action"] == "reconcile" and ev["detail"]:
            # foreign objects are counted by the full discovery only (the fast path records None); compared apart
            ev["detail"] = json.dumps({k: v for k, v in json.loads(ev["detail"]).items() if k != "foreign"})
    # error texts name sysfs paths under the root, which differs between the two copies
    return json.loads(json.dumps(out).replace(str(root), "ROOT"))


def boot_marker(root: Path) -> str | None:
    con = sqlite3.connect(str(root / DB_REL))
    try:
        return con.execute("SELECT boot_marker FROM hosts").fetchone()[0]
    finally:
        con.close()


def last_event(root: Path) -> int:
    con = sqlite3.connect(str(root / DB_REL))
    try:
        return con.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
    finally:
        con.close()


def host_state(root: Path) -> dict:
    from gpuvirt.sim.state import SimHost

    st = SimHost(root).load()
    return {"mdevs": sorted((m["uuid"], m["parent"], m["type"]) for m in st["mdevs"]),
            "vfs": {d["address"]: (d.get("sriov") or {}).get("numvfs") for d in st["devices"]},
            "vf_types": sorted((vf["address"], vf.get("current_vgpu_type")) for d in st["devices"]
                               for vf in d.get("vfs", []) if vf.get("current_vgpu_type"))}


def imported_modules(h: Path, *argv: str, xml: bytes) -> set[str]:
    """The modules one hook call imports (``-X importtime``), through the installed script's interpreter and
    options: what the process really loaded, as ``sys.modules`` would show at its end."""
    exec_line = h.read_text().strip().splitlines()[-1].split()
    python, opts = exec_line[1], exec_line[2:exec_line.index("hook")]
    p = subprocess.run([python, "-X", "importtime", *opts, "hook", "libvirt-qemu", *argv], input=xml,
                       capture_output=True, env={}, timeout=120)
    assert p.returncode == 0, p.stderr
    return {line.rsplit("|", 1)[1].strip() for line in p.stderr.decode().splitlines()
            if line.startswith("import time:") and "cumulative" not in line}


def same_on_both_paths(cli, root: Path, calls: list[tuple], prepare_copy=None) -> list:
    """Run ``calls`` [(domain, op, sub, extra, xml), ...] on the fast path on ``root`` and on the full path on a
    copy made first; assert identical rows, host state and outputs after each; returns the fast results."""
    other = copy_host(root)
    try:
        h = install_hook(cli, root)
        out = []
        for call in calls:
            if prepare_copy is not None:
                prepare_copy(root)
                prepare_copy(other)
            e1, e2 = last_event(root), last_event(other)
            fast = hook(h, *call)
            full = full_hook(other, *call)
            assert (fast.returncode, fast.stdout, fast.stderr.replace(bytes(root), b"ROOT")) == \
                (full.returncode, full.stdout, full.stderr.replace(bytes(other), b"ROOT")), (call[:4], fast.stderr,
                                                                                          full.stderr)
            assert rows(root, e1) == rows(other, e2), call[:4]
            assert host_state(root) == host_state(other), call[:4]
            out.append(fast)
        return out
    finally:
        shutil.rmtree(other.parent, ignore_errors=True)


def _reboot(root: Path) -> None:
    from gpuvirt.sim.control import open_sim, reboot

    reboot(open_sim(root))


# --- same results -------------------------------------------------------------------------------------------------
def test_exists_recreate_release_match_the_full_path(cli, make_sim):
    sim = make_sim(["a2"])
    root = sim.root
    u = attach(cli, root, "vm1", "--vgpu", "A2-2Q")["uuid"]
    xml = live_xml("vm1", mdevs=[u])
    # the allocation learns the VM's UUID at the first prepare; the device exists
    res = same_on_both_paths(cli, root, [("vm1", "prepare", "begin", "-", xml),
                                         ("vm1", "release", "end", "destroyed", xml),
                                         ("vm1", "release", "end", "destroyed", xml)])
    assert all(p.returncode == 0 for p in res)
    # after a reboot: VFs re-enabled, the mdev recreated with its UUID, journalled (intent gone at the end)
    ok(cli("sim", "reboot", root))
    [p] = same_on_both_paths(cli, root, [("vm1", "prepare", "begin", "-", xml)])
    assert p.returncode == 0 and b"restored 1 device(s) of this VM, and 1 other step(s)" in p.stderr
    assert rows(root)["intents"] == [] and u in {m[0] for m in host_state(root)["mdevs"]}


def test_vendor_vfio_restore_matches_the_full_path(cli, make_sim):
    sim = make_sim(["l40s"])
    root = sim.root
    vf = attach(cli, root, "vm1", "--vgpu", "L40S-4Q")["pci_address"]
    con = sqlite3.connect(str(root / DB_REL))
    with con:   # an error an earlier run left on the active row: the restore's record clears it on both paths
        con.execute("UPDATE instances SET error = 'an earlier failure'")
    con.close()
    ok(cli("sim", "reboot", root))
    [p] = same_on_both_paths(cli, root, [("vm1", "prepare", "begin", "-", live_xml("vm1", pcis=[vf]))])
    assert p.returncode == 0, p.stderr
    assert (vf, 1150) in host_state(root)["vf_types"]
    assert [r["error"] for r in rows(root)["instances"]] == [None]


def _fail_vf_enable(root):
    from gpuvirt.sim.control import add_fault, open_sim

    add_fault(open_sim(root), "sriov.enable", errno="EIO", times=10)


def test_refusals_match_the_full_path(cli, make_sim):
    sim = make_sim(["a2", "mtty"])
    root = sim.root
    keep = attach(cli, root, "vm1", "--vgpu", "A2-2Q")
    other = attach(cli, root, "vm2", "--vgpu", "A2-2Q")
    ok(cli("sim", "reboot", root))
    ok(cli("sim", "fault", root, "--op", "sriov.enable", "--errno", "EIO", "--times", "10"))
    temp = attach(cli, root, "vm1", "--mdev", "mtty-2", "--transient")
    xml = live_xml("vm1", mdevs=[keep["uuid"], temp["uuid"]])
    res = same_on_both_paths(cli, root, [
        ("vm1", "prepare", "begin", "-", xml),                                      # VFs cannot come back
        ("vm2", "prepare", "begin", "-", live_xml("vm2", mdevs=[keep["uuid"]], uuid=OTHER_UUID)),  # not vm2's
        ("vm1", "release", "end", "failed", xml),                                   # frees the transient one
        ("vm1", "release", "end", "failed", xml)])
    assert [p.returncode for p in res] == [1, 1, 0, 0]
    assert b"enable VFs: " in res[0].stderr and b"recreate: " in res[0].stderr
    assert b"is allocated to VM vm1, not vm2" in res[1].stderr
    del other


def test_hand_written_device_gets_a_transient_allocation_on_both_paths(cli, make_sim):
    sim = make_sim(["mtty"])
    root = sim.root
    d = attach(cli, root, "vm3", "--mdev", "mtty-2")
    con = sqlite3.connect(str(root / DB_REL))
    with con:   # a known device nobody holds, which an operator then writes into vm4's XML by hand
        con.execute("DELETE FROM allocations WHERE instance_id = ?", (d["instance"],))
    con.close()
    xml = live_xml("vm4", mdevs=[d["uuid"]])
    res = same_on_both_paths(cli, root, [("vm4", "prepare", "begin", "-", xml),
                                         ("vm4", "release", "end", "-", xml)])
    assert [p.returncode for p in res] == [0, 0]


# --- really taken ---------------------------------------------------------------------------------------------------
def test_the_fast_path_imports_no_sqlalchemy(cli, make_sim):
    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    u = attach(cli, root, "vm1", "--vgpu", "A2-2Q")["uuid"]
    xml = live_xml("vm1", mdevs=[u]).encode()
    # (the simulator itself loads the GPU catalog, and YAML when its cache is cold: a real host does neither)
    heavy = {"sqlalchemy", "sqlalchemy.orm", "typer", "pynvml", "alembic", "gpuvirt.inventory.models",
             "gpuvirt.inventory.store", "gpuvirt.inventory.repo", "gpuvirt.service.hook", "gpuvirt.service.hostview",
             "gpuvirt.service.reconcile", "gpuvirt.service.attach", "gpuvirt.service.detach", "gpuvirt.host.nvml"}
    for before, argv in ((None, ("vm1", "prepare", "begin", "-")), (_reboot, ("vm1", "prepare", "begin", "-")),
                         (None, ("vm1", "release", "end", "destroyed"))):
        if before:
            before(root)
        mods = imported_modules(h, *argv, xml=xml)
        assert "gpuvirt.service.hook_fast" in mods and "sqlite3" in mods, argv
        assert not mods & heavy, (argv, sorted(mods & heavy))
    assert host_state(root)["mdevs"][0][0] == u and rows(root)["intents"] == []


# --- left to the full path ------------------------------------------------------------------------------------------
def test_another_schema_revision_falls_back_and_writes_nothing(cli, make_sim):
    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.service import hook_fast
    from gpuvirt.vmm.libvirt import parse_domain

    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    u = attach(cli, root, "vm1", "--vgpu", "A2-2Q")["uuid"]
    xml = live_xml("vm1", mdevs=[u])
    con = sqlite3.connect(str(root / DB_REL))
    with con:
        con.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    con.close()
    before = rows(root)
    with Context(resolve_settings(sim=str(root))) as ctx:
        assert hook_fast.prepare(ctx, "vm1", parse_domain(xml.encode())) is None
        assert hook_fast.release(ctx, "vm1", None) is None
    assert rows(root) == before
    # the full path then answers: an inventory a newer gpuvirt wrote is refused, never touched
    p = hook(h, "vm1", "prepare", xml=xml)
    assert p.returncode == 1 and b"newer than gpuvirt" in p.stderr, p.stderr
    assert rows(root) == before


def test_only_plain_sqlite_urls_take_the_fast_path():
    from gpuvirt.inventory.sqlite_fast import plain_sqlite_file

    assert plain_sqlite_file("sqlite:////var/lib/gpuvirt/inventory.db") == "/var/lib/gpuvirt/inventory.db"
    assert plain_sqlite_file("sqlite:///rel.db") == "rel.db"
    for url in ("postgresql+psycopg://gpuvirt@db/gpuvirt", "sqlite://", "sqlite:///:memory:",
                "sqlite:////x.db?mode=ro", "sqlite+pysqlite:////x.db", "sqlite:////x%20y.db"):
        assert plain_sqlite_file(url) is None, url


def test_a_mig_backed_vgpu_is_restored_by_the_full_path(cli, make_sim):
    sim = make_sim(["a100-40gb"], mig_enabled=True, enable_vfs=False)
    root = sim.root
    h = install_hook(cli, root)
    d = attach(cli, root, "vm1", "--mig", "1g.5gb")
    xml = live_xml("vm1", mdevs=[d["uuid"]])
    ok(cli("sim", "reboot", root))
    imported = imported_modules(h, "vm1", "prepare", "begin", "-", xml=xml.encode())
    assert "sqlalchemy" in imported             # the fallback: MIG needs NVML and reconcile's MIG steps
    assert d["uuid"] in {m[0] for m in host_state(root)["mdevs"]}
    assert rows(root)["intents"] == []


def test_an_open_intent_on_the_host_falls_back_and_is_settled(cli, make_sim):
    from gpuvirt.sim.control import add_fault, open_sim

    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    u = attach(cli, root, "vm1", "--vgpu", "A2-2Q")["uuid"]
    xml = live_xml("vm1", mdevs=[u])
    ok(cli("sim", "reboot", root))
    add_fault(open_sim(root), "sriov.enable", kill="before")
    p = hook(h, "vm1", "prepare", xml=xml)
    assert p.returncode == -signal.SIGKILL
    [row] = rows(root)["intents"]
    assert row["kind"] == "reconcile" and row["actor"] == "libvirt-hook"
    # the next start finds the unfinished restore: the full path settles it (reconcile's recover) and starts
    imported = imported_modules(h, "vm1", "prepare", "begin", "-", xml=xml.encode())
    assert "sqlalchemy" in imported
    assert rows(root)["intents"] == [] and u in {m[0] for m in host_state(root)["mdevs"]}


# --- crash safety ---------------------------------------------------------------------------------------------------
RESTORE_OPS = {"sriov.enable": 1, "mdev.create": 1}


@pytest.mark.crash
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("op", sorted(RESTORE_OPS))
def test_a_fast_restore_killed_at_each_host_operation_is_finished_by_reconcile(cli, make_sim, op, when):
    from gpuvirt.sim.control import add_fault, open_sim

    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    u = attach(cli, root, "vm1", "--vgpu", "A2-2Q")["uuid"]
    xml = live_xml("vm1", mdevs=[u])
    want = host_state(root)
    ok(cli("sim", "reboot", root))
    for k in range(RESTORE_OPS[op]):
        add_fault(open_sim(root), op, skip=k, kill=when)
        p = hook(h, "vm1", "prepare", xml=xml)
        assert p.returncode == -signal.SIGKILL, (op, when, p.stderr)
        # the journal holds the half-done restore; status never calls that in sync
        [row] = rows(root)["intents"]
        assert row["kind"] == "reconcile" and row["recovery"] == "forward-only"
        # with the row, the host's boot id (what processes of other machines judge the row's owner by), as
        # intent.Run.begin records it: nothing else recorded the host since the reboot
        assert boot_marker(root) == (root / "proc/sys/kernel/random/boot_id").read_text().strip()
        st = ok(cli("--sim", root, "status", "--json")).json()
        assert not st["in_sync"]
        out = ok(cli("--sim", root, "reconcile", "--yes", "--json")).json()
        assert not out["failed"], out
        assert rows(root)["intents"] == [] and host_state(root) == want
        st = ok(cli("--sim", root, "status", "--json")).json()
        assert st["in_sync"] and all(i["state"] == "active" for g in st["gpus"] for i in g["instances"])
        # and the VM starts
        p = hook(h, "vm1", "prepare", xml=xml)
        assert p.returncode == 0, p.stderr
        alloc = json.loads(ok(cli("--sim", root, "allocations", "--json")).stdout)[0]
        assert alloc["vm_state"] == "running"
        ok(cli("sim", "reboot", root))


def test_two_vms_of_one_gpu_started_at_once_after_a_reboot(cli, make_sim):
    # both wait for the GPU's lock; the second finds its device restored by the first (reconcile restores the
    # whole GPU's layout) and only records its start
    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    u1 = attach(cli, root, "vm1", "--vgpu", "A2-2Q")["uuid"]
    u2 = attach(cli, root, "vm2", "--vgpu", "A2-2Q")["uuid"]
    ok(cli("sim", "reboot", root))
    procs = [subprocess.Popen([str(h), vm, "prepare", "begin", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={})
             for vm, u in (("vm1", u1), ("vm2", u2))]
    for p, (vm, u) in zip(procs, (("vm1", u1), ("vm2", u2))):
        vm_uuid = VM_UUID if vm == "vm1" else OTHER_UUID
        out, err = p.communicate(live_xml(vm, mdevs=[u], uuid=vm_uuid).encode(), timeout=120)
        assert p.returncode == 0, err
    assert {u1, u2} <= {m[0] for m in host_state(root)["mdevs"]}
    assert rows(root)["intents"] == []
    states = {a["vm"]: a["vm_state"] for a in json.loads(ok(cli("--sim", root, "allocations", "--json")).stdout)}
    assert states == {"vm1": "running", "vm2": "running"}


RANDOM_TRIALS = 12


@pytest.mark.crash
def test_a_fast_restore_killed_at_a_random_instant_is_finished_by_reconcile(cli, make_sim):
    # kills between the journal's transactions too, not only at host operations: spread over one restore's time
    import random
    import time

    from gpuvirt.sim.control import open_sim, reboot

    sim = make_sim(["a2"])
    root = sim.root
    u = attach(cli, root, "vm1", "--vgpu", "A2-2Q")["uuid"]
    xml = live_xml("vm1", mdevs=[u]).encode()
    want = host_state(root)

    def start(r: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-I", "-m", "gpuvirt", "--sim", str(r), "hook", "libvirt-qemu", "vm1",
                              "prepare", "begin", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={})
        p.stdin.write(xml)
        p.stdin.close()
        return p

    probe = copy_host(root)
    reboot(open_sim(probe))
    t0 = time.monotonic()
    p = start(probe)
    assert p.wait(timeout=120) == 0, p.stderr.read()
    took = time.monotonic() - t0
    shutil.rmtree(probe.parent, ignore_errors=True)
    rng = random.Random(14)
    for n in range(RANDOM_TRIALS):
        r = copy_host(root)
        try:
            reboot(open_sim(r))
            p = start(r)
            time.sleep(rng.uniform(0.3, 1.0) * took)
            p.kill()
            p.wait(timeout=60)
            st = ok(cli("--sim", r, "status", "--json")).json()
            if st["in_sync"]:       # only when the kill came after the restore was complete
                assert host_state(r) == want and rows(r)["intents"] == [], n
            out = ok(cli("--sim", r, "reconcile", "--yes", "--json")).json()
            assert not out["failed"], (n, out)
            assert rows(r)["intents"] == [] and host_state(r) == want, n
            assert ok(cli("--sim", r, "status", "--json")).json()["in_sync"], n
            p = start(r)
            assert p.wait(timeout=120) == 0, (n, p.stderr.read())
        finally:
            shutil.rmtree(r.parent, ignore_errors=True)


def test_old_events_are_pruned_as_the_full_path_prunes_them(cli, make_sim):
    # the first write of a process prunes this host's events older than [events] max_age_days (default 90)
    sim = make_sim(["a2"])
    root = sim.root
    u = attach(cli, root, "vm1", "--vgpu", "A2-2Q")["uuid"]
    con = sqlite3.connect(str(root / DB_REL))
    with con:
        con.execute("UPDATE events SET at = '2020-01-01 00:00:00.000000' WHERE id = (SELECT min(id) FROM events)")
        old = con.execute("SELECT count(*) FROM events").fetchone()[0]
    con.close()
    other = copy_host(root)
    try:
        h = install_hook(cli, root)
        xml = live_xml("vm1", mdevs=[u])
        assert hook(h, "vm1", "prepare", xml=xml).returncode == 0
        assert full_hook(other, "vm1", "prepare", xml=xml).returncode == 0
        assert rows(root) == rows(other)
        assert len(rows(root)["events"]) == old      # one aged event gone, one hook-prepare event added
    finally:
        shutil.rmtree(other.parent, ignore_errors=True)
