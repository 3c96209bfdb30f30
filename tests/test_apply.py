"""plan / apply / status / reconcile on simulated hosts (issue 3 must-shows)."""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections import Counter

import pytest

from gpuvirt.model.catalog import load_catalog
from gpuvirt.model.mig import Placed, layout_problems


def host_layout(sim):
    """{address: sorted [(profile_id, start, size)]} straight from the simulator state (not gpuvirt's view)."""
    out = {}
    for d in sim.load()["devices"]:
        if d.get("mig"):
            out[d["address"]] = sorted((gi["profile_id"], gi["start"], gi["size"]) for gi in d["mig"]["gpu_instances"])
    return out


def host_mdevs(sim):
    return sorted((m["uuid"], m["parent"], m["type"]) for m in sim.load()["mdevs"])


def status(cli, root):
    r = cli("--sim", root, "status", "--json")
    assert r.exit_code == 0, r
    return r.json()


def assert_in_sync(cli, root):
    st = status(cli, root)
    assert st["in_sync"], st
    for g in st["gpus"]:
        for i in g["instances"]:
            assert i["state"] == "active" and i["on_host"], i
    return st


@pytest.mark.parametrize("order", list(itertools.permutations(["1g.5gb=2", "2g.10gb=1", "3g.20gb=1"])))
def test_all_balanced_applies_in_any_order(cli, make_sim, order):
    sim = make_sim(["a100-40gb"])
    root = sim.root
    args = [x for o in order for x in ("--mig", o)]
    assert cli("--sim", root, "create-profile", "bal", *args, "--model", "a100-40gb").exit_code == 0
    r = cli("--sim", root, "apply", "bal", "--gpu", "0", "--yes", "--json")
    assert r.exit_code == 0, r
    lay = host_layout(sim)["0000:41:00.0"]
    assert Counter(p for p, _, _ in lay) == Counter({19: 2, 14: 1, 9: 1})
    geom = load_catalog().get("a100-40gb").mig
    assert layout_problems(geom, [Placed(s, z, p) for p, s, z in lay]) == []
    # idempotent: nothing left to do
    again = cli("--sim", root, "apply", "bal", "--gpu", "0", "--yes", "--json")
    assert again.exit_code == 0 and again.json()["unchanged"] == ["0000:41:00.0"]
    assert host_layout(sim)["0000:41:00.0"] == lay
    assert_in_sync(cli, root)


def test_plan_json_lists_ordered_operations_and_keeps(cli, make_sim):
    sim = make_sim(["a100-40gb"])
    root = sim.root
    cli("--sim", root, "create-profile", "seven", "--mig", "1g.5gb=7", "--model", "a100-40gb")
    cli("--sim", root, "create-profile", "mixed", "--mig", "1g.5gb=3", "--mig", "3g.20gb=1", "--model", "a100-40gb")
    r = cli("--sim", root, "plan", "seven", "--gpu", "0", "--json")
    assert r.exit_code == 0, r
    ops = r.json()["gpus"][0]["operations"]
    assert ops[0]["op"] == "mig-mode" and ops[0]["enable"] is True
    assert [o["op"] for o in ops[1:]] == ["create-mig"] * 7
    assert sorted(o["start"] for o in ops[1:]) == list(range(7))
    assert cli("--sim", root, "apply", "seven", "--gpu", "0", "--yes").exit_code == 0
    r = cli("--sim", root, "plan", "mixed", "--gpu", "0", "--json").json()["gpus"][0]
    # three 1g instances are kept, the 3g needs four contiguous slices: no needless churn
    assert len(r["keep"]) == 3
    destroyed = [o for o in r["operations"] if o["op"] == "destroy-mig"]
    created = [o for o in r["operations"] if o["op"] == "create-mig"]
    assert len(destroyed) == 4 and len(created) == 1 and created[0]["profile_name"] == "3g.20gb"


def test_apply_refuses_to_destroy_allocated_without_force(cli, make_sim):
    sim = make_sim(["a100-40gb"])
    root = sim.root
    cli("--sim", root, "create-profile", "seven", "--mig", "1g.5gb=7", "--model", "a100-40gb")
    cli("--sim", root, "create-profile", "halves", "--mig", "3g.20gb=2", "--model", "a100-40gb")
    assert cli("--sim", root, "apply", "seven", "--gpu", "0", "--yes").exit_code == 0
    insts = status(cli, root)["gpus"][0]["instances"]
    # allocate one instance to a VM straight in the inventory (attach of MIG instances is a vGPU matter)
    from gpuvirt.context import Context, resolve_settings

    with Context(resolve_settings(sim=str(root), env={})) as ctx:
        with ctx.inventory.unit(write=True) as uow:
            uow.allocate(uow.instance(insts[0]["id"]), vm_name="vm1", vm_uuid=None, tenant="t", persistent=True)
    before = host_layout(sim)
    r = cli("--sim", root, "apply", "halves", "--gpu", "0", "--yes")
    assert r.exit_code == 5, r
    assert "allocated to VM vm1" in r.stderr and r.stderr.startswith("gpuvirt: error:")
    assert host_layout(sim) == before
    r = cli("--sim", root, "apply", "halves", "--gpu", "0", "--yes", "--force")
    assert r.exit_code == 0, r
    assert [p for p, _, _ in host_layout(sim)["0000:41:00.0"]] == [9, 9]
    assert_in_sync(cli, root)


# --- failure injection at every step ---------------------------------------------------------------------
NVML_OPS = [("nvml.DestroyComputeInstance", 7), ("nvml.DestroyGpuInstance", 7), ("nvml.CreateGpuInstance", 2),
            ("nvml.CreateComputeInstance", 2)]
STEPS = [(op, k) for op, n in NVML_OPS for k in range(n)]


@pytest.mark.parametrize("op,skip", STEPS)
def test_failure_at_each_step_rolls_back(cli, make_sim, op, skip):
    from gpuvirt.sim.control import add_fault

    sim = make_sim(["a100-40gb"])
    root = sim.root
    cli("--sim", root, "create-profile", "seven", "--mig", "1g.5gb=7", "--model", "a100-40gb")
    cli("--sim", root, "create-profile", "halves", "--mig", "3g.20gb=2", "--model", "a100-40gb")
    assert cli("--sim", root, "apply", "seven", "--gpu", "0", "--yes").exit_code == 0
    before = host_layout(sim)
    add_fault(sim, op, skip=skip)
    r = cli("--sim", root, "apply", "halves", "--gpu", "0", "--yes")
    assert r.exit_code != 0, r
    assert "rolled back to the previous layout" in r.stderr, r
    assert host_layout(sim) == before
    st = assert_in_sync(cli, root)
    # the GPU keeps the profile it is on, not the one that failed
    assert (st["gpus"][0]["desired_profile"], st["gpus"][0]["profile_state"]) == ("seven", "applied")


def test_incomplete_rollback_is_reported_until_fixed(cli, make_sim):
    from gpuvirt.sim.control import add_fault, clear_faults

    sim = make_sim(["a100-40gb"])
    root = sim.root
    cli("--sim", root, "create-profile", "seven", "--mig", "1g.5gb=7", "--model", "a100-40gb")
    cli("--sim", root, "create-profile", "halves", "--mig", "3g.20gb=2", "--model", "a100-40gb")
    assert cli("--sim", root, "apply", "seven", "--gpu", "0", "--yes").exit_code == 0
    add_fault(sim, "nvml.CreateGpuInstance", skip=1, times=50)     # the second 3g fails, and so does rollback
    r = cli("--sim", root, "apply", "halves", "--gpu", "0", "--yes")
    assert r.exit_code != 0 and "ROLLBACK INCOMPLETE" in r.stderr, r
    st = cli("--sim", root, "status", "--json").json()
    assert not st["in_sync"]
    assert (st["gpus"][0]["desired_profile"], st["gpus"][0]["profile_state"]) == ("halves", "rollback-incomplete")
    assert any(d["kind"] == "unfinished-apply" for d in st["gpus"][0]["drift"])
    # while the fault lasts reconcile fails too, and says so
    r = cli("--sim", root, "reconcile", "--yes", "--json")
    assert r.exit_code != 0 and not status(cli, root)["in_sync"]
    clear_faults(sim)
    r = cli("--sim", root, "reconcile", "--yes", "--json")         # "run 'gpuvirt reconcile'" - and it does
    assert r.exit_code == 0, r
    assert [p for p, _, _ in host_layout(sim)["0000:41:00.0"]] == [9, 9]
    assert assert_in_sync(cli, root)["gpus"][0]["profile_state"] == "applied"


@pytest.mark.parametrize("op,skip", [("mdev.create", 0), ("mdev.create", 3), ("mdev.remove", 0), ("mdev.remove", 5)])
def test_vgpu_failure_rolls_back_with_same_uuids(cli, make_sim, op, skip):
    from gpuvirt.sim.control import add_fault

    sim = make_sim(["a2"])
    root = sim.root
    cli("--sim", root, "create-profile", "q2", "--vgpu", "A2-2Q=8", "--model", "a2")
    cli("--sim", root, "create-profile", "q4", "--vgpu", "A2-4Q=4", "--model", "a2")
    assert cli("--sim", root, "apply", "q2", "--gpu", "0", "--yes").exit_code == 0
    before = host_mdevs(sim)
    assert len(before) == 8
    add_fault(sim, op, skip=skip, errno="EIO")
    r = cli("--sim", root, "apply", "q4", "--gpu", "0", "--yes")
    assert r.exit_code != 0 and "rolled back" in r.stderr, r
    assert host_mdevs(sim) == before
    assert_in_sync(cli, root)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("op,skip", [("nvml.DestroyGpuInstance", 0), ("nvml.DestroyGpuInstance", 4),
                                     ("nvml.CreateGpuInstance", 0), ("nvml.CreateGpuInstance", 1),
                                     ("nvml.CreateComputeInstance", 1)])
def test_sigkill_at_a_step_is_repaired_by_reconcile(cli, gpuvirt_proc, make_sim, op, skip, when):
    from gpuvirt.sim.control import add_fault

    sim = make_sim(["a100-40gb"])
    root = sim.root
    cli("--sim", root, "create-profile", "seven", "--mig", "1g.5gb=7", "--model", "a100-40gb")
    cli("--sim", root, "create-profile", "halves", "--mig", "3g.20gb=2", "--model", "a100-40gb")
    assert cli("--sim", root, "apply", "seven", "--gpu", "0", "--yes").exit_code == 0
    add_fault(sim, op, skip=skip, kill=when)
    r = gpuvirt_proc("--sim", root, "apply", "halves", "--gpu", "0", "--yes")
    assert r.exit_code == -9, r  # killed at that exact step
    r = cli("--sim", root, "reconcile", "--yes", "--json")
    assert r.exit_code == 0, r
    st = assert_in_sync(cli, root)
    # no leaked instance: every GPU instance on the host has exactly one inventory row, and vice versa
    on_host = host_layout(sim)["0000:41:00.0"]
    rows = sorted((i["profile_id"], i["placement"]["start"], i["placement"]["size"]) for i in st["gpus"][0]["instances"])
    assert rows == on_host
    # and the interrupted apply can simply be run again
    assert cli("--sim", root, "apply", "halves", "--gpu", "0", "--yes").exit_code == 0
    assert [p for p, _, _ in host_layout(sim)["0000:41:00.0"]] == [9, 9]


@pytest.mark.parametrize("gpus,n_mdevs,n_vfio", [(["a100-40gb", "a2"], 8, 0), (["a100-40gb", "a2", "l40s"], 0, 14)],
                         ids=["mdev-host", "vendor-vfio-host"])
def test_reboot_then_reconcile_restores_identical_placements_and_uuids(cli, make_sim, gpus, n_mdevs, n_vfio):
    from gpuvirt.sim.control import reboot

    # one host runs one vGPU interface: with an L40S on board the A2 is driven through vendor VFIO too
    sim = make_sim(gpus)
    root = sim.root
    cli("--sim", root, "create-profile", "bal", "--mig", "1g.5gb=2", "--mig", "2g.10gb=1", "--mig", "3g.20gb=1",
        "--model", "a100-40gb")
    cli("--sim", root, "create-profile", "q2", "--vgpu", "A2-2Q=8", "--model", "a2")
    cli("--sim", root, "create-profile", "l4q", "--vgpu", "L40S-4Q=6", "--model", "l40s")
    for prof, sel in (("bal", "a100-40gb"), ("q2", "a2"), ("l4q", "l40s")):
        if sel not in gpus:
            continue
        r = cli("--sim", root, "apply", prof, "--gpu", sel, "--yes")
        assert r.exit_code == 0, r
    mig_before, mdevs_before = host_layout(sim), host_mdevs(sim)
    vfio_before = sorted((vf["address"], vf["current_vgpu_type"]) for d in sim.load()["devices"]
                         for vf in d["vfs"] if vf["current_vgpu_type"])
    assert len(vfio_before) == n_vfio and len(mdevs_before) == n_mdevs
    reboot(sim)
    assert host_mdevs(sim) == [] and all(not v for v in host_layout(sim).values())
    assert not status(cli, root)["in_sync"]
    r = cli("--sim", root, "reconcile", "--yes", "--json")
    assert r.exit_code == 0, r
    assert host_layout(sim) == mig_before
    assert host_mdevs(sim) == mdevs_before
    vfio_after = sorted((vf["address"], vf["current_vgpu_type"]) for d in sim.load()["devices"]
                        for vf in d["vfs"] if vf["current_vgpu_type"])
    assert vfio_after == vfio_before
    assert_in_sync(cli, root)


def test_hopper_mig_mode_is_reapplied_after_reboot(cli, make_sim):
    from gpuvirt.sim.control import reboot

    sim = make_sim(["h100-80gb"])
    root = sim.root
    cli("--sim", root, "create-profile", "h", "--mig", "1g.10gb=7", "--model", "h100-80gb")
    assert cli("--sim", root, "apply", "h", "--gpu", "0", "--yes").exit_code == 0
    before = host_layout(sim)
    reboot(sim)
    assert sim.load()["devices"][0]["mig"]["current"] == 0  # Hopper forgets MIG mode
    assert cli("--sim", root, "reconcile", "--yes").exit_code == 0
    assert sim.load()["devices"][0]["mig"]["current"] == 1
    assert host_layout(sim) == before


def test_ampere_mig_enable_pending_reset(cli, make_sim):
    from gpuvirt.sim.control import set_client

    sim = make_sim(["a100-40gb"])
    root = sim.root
    cli("--sim", root, "create-profile", "seven", "--mig", "1g.5gb=7", "--model", "a100-40gb")
    set_client(sim, "0000:41:00.0", "nvidia-persistenced", True)
    r = cli("--sim", root, "apply", "seven", "--gpu", "0", "--yes")
    assert r.exit_code == 6, r
    assert "pending a GPU reset" in r.stderr
    st = status(cli, root)["gpus"][0]
    assert st["profile_state"] == "pending-reset" and st["mig"] == {"current": False, "pending": True}
    # a reset is refused while the client holds the GPU ...
    r = cli("--sim", root, "apply", "seven", "--gpu", "0", "--yes", "--reset-gpu")
    assert r.exit_code != 0
    # ... and works once it is gone
    set_client(sim, "0000:41:00.0", "nvidia-persistenced", False)
    r = cli("--sim", root, "apply", "seven", "--gpu", "0", "--yes", "--reset-gpu")
    assert r.exit_code == 0, r
    assert len(host_layout(sim)["0000:41:00.0"]) == 7


def test_whole_vfs_profile_and_attach(cli, make_sim):
    sim = make_sim(["amd-v620"], enable_vfs=False)
    root = sim.root
    assert cli("--sim", root, "create-profile", "four", "--sriov-vfs", "4", "--model", "amd-v620").exit_code == 0
    r = cli("--sim", root, "apply", "four", "--gpu", "amd-v620", "--yes")
    assert r.exit_code == 0, r
    st = assert_in_sync(cli, root)
    assert len([i for i in st["gpus"][0]["instances"] if i["kind"] == "vf"]) == 4
    r = cli("--sim", root, "attach", "vm1", "--vf", "--format", "json")
    assert r.exit_code == 0, r
    assert r.json()["pci_address"].startswith("0000:")


def test_foreign_instances_are_reported_not_destroyed_and_adoptable(cli, make_sim):
    from gpuvirt.host.nvml import NvmlSession
    from gpuvirt.sim.nvml import FakeNvmlLib

    sim = make_sim(["a100-40gb"], mig_enabled=True)
    root = sim.root
    with NvmlSession(FakeNvmlLib(sim)) as s:
        gi = s.create_gpu_instance(0, 9, 4)
        s.create_compute_instance(0, gi.id)
    st = status(cli, root)
    assert any(d["kind"] == "foreign" for d in st["gpus"][0]["drift"])
    r = cli("--sim", root, "reconcile", "--yes", "--json")
    assert r.exit_code == 0 and r.json()["foreign"], r
    assert host_layout(sim)["0000:41:00.0"] == [(9, 4, 4)]  # still there
    cli("--sim", root, "create-profile", "two3g", "--mig", "3g.20gb=2", "--model", "a100-40gb")
    assert cli("--sim", root, "apply", "two3g", "--gpu", "0", "--yes").exit_code == 0  # keeps the foreign one
    cli("--sim", root, "create-profile", "seven", "--mig", "1g.5gb=7", "--model", "a100-40gb")
    r = cli("--sim", root, "apply", "seven", "--gpu", "0", "--yes")
    assert r.exit_code == 5 and "not created by gpuvirt" in r.stderr, r


def test_reconcile_adopt_records_foreign(cli, make_sim):
    from gpuvirt.host.nvml import NvmlSession
    from gpuvirt.sim.nvml import FakeNvmlLib

    sim = make_sim(["a100-40gb"], mig_enabled=True)
    root = sim.root
    with NvmlSession(FakeNvmlLib(sim)) as s:
        gi = s.create_gpu_instance(0, 19, 3)
        s.create_compute_instance(0, gi.id)
    r = cli("--sim", root, "reconcile", "--yes", "--adopt", "--json")
    assert r.exit_code == 0, r
    st = assert_in_sync(cli, root)
    assert st["gpus"][0]["instances"][0]["origin"] == "adopted"


# --- bad input ---------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_changes_nothing(cli, make_sim, tmp_path):
    sim = make_sim(["a100-40gb"])
    root = sim.root
    cli("--sim", root, "create-profile", "seven", "--mig", "1g.5gb=7", "--model", "a100-40gb")
    state_before = sim.load()
    for args, code in ((["apply", "nope", "--gpu", "0", "--yes"], 3),
                       (["apply", "seven", "--gpu", "7", "--yes"], 3),
                       (["apply", "seven", "--gpu", "0000:99:00.0", "--yes"], 3),
                       (["apply", "seven", "--gpu", "l40s", "--yes"], 3),
                       (["apply", "seven", "--gpu", "0"], 2),      # non-interactive without --yes
                       (["plan", "seven", "--gpu", ""], 2)):
        r = cli("--sim", root, *args)
        assert r.exit_code == code, (args, r)
        assert r.stderr.startswith("gpuvirt: error:") and r.stderr.count("\n") == 1, r
        assert "Traceback" not in r.stderr
    assert sim.load()["devices"] == state_before["devices"]


def test_corrupt_and_readonly_and_locked_database(cli, make_sim, tmp_path, gpuvirt_proc):
    sim = make_sim(["a100-40gb"])
    root = sim.root
    assert cli("--sim", root, "status").exit_code == 0
    db = root / "var/lib/gpuvirt/inventory.db"
    assert oct(db.stat().st_mode & 0o777) == "0o600" and oct(db.parent.stat().st_mode & 0o777) == "0o700"
    # locked: another writer holds the database
    con = sqlite3.connect(db)
    con.execute("BEGIN IMMEDIATE")
    env = {"GPUVIRT_DB_BUSY_TIMEOUT_MS": "300", "PATH": "/usr/bin:/bin"}
    r = gpuvirt_proc("--sim", root, "create-profile", "x", "--mig", "1g.5gb=1", "--model", "a100-40gb", env=env)
    con.rollback()
    con.close()
    assert r.exit_code == 5 and "locked" in r.stderr and "Traceback" not in r.stderr, r
    # corrupt
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    r = cli("--sim", root, "--db", f"sqlite:///{bad}", "status")
    assert r.exit_code == 1 and "not a valid database" in r.stderr, r
    # read-only (a database file the process cannot write)
    ro = tmp_path / "ro"
    ro.mkdir()
    assert cli("--sim", root, "--db", f"sqlite:///{ro}/inv.db", "db", "init").exit_code == 0
    r = cli("--sim", root, "--db", f"sqlite:///{ro}/inv.db", "status")
    assert r.exit_code == 0
    (ro / "inv.db").chmod(0o400)
    ro.chmod(0o500)
    try:
        r = gpuvirt_proc("--sim", root, "--db", f"sqlite:///{ro}/inv.db", "create-profile", "y", "--mig", "1g.5gb=1",
                         "--model", "a100-40gb", env={"PATH": "/usr/bin:/bin"})
        import os

        if os.geteuid() != 0:  # root ignores file modes
            assert r.exit_code == 1 and "read-only" in r.stderr, r
    finally:
        ro.chmod(0o700)


# --- schema -----------------------------------------------------------------------------------------------------
def test_migrations_upgrade_from_every_revision_keeping_data(tmp_path):
    from gpuvirt.inventory.migrate import revisions
    from gpuvirt.inventory.store import HEAD_REVISION, Inventory

    revs = revisions()
    assert revs[-1] == HEAD_REVISION
    for start in revs[:-1]:
        db = tmp_path / f"{start}.db"
        inv = Inventory.connect(f"sqlite:///{db}", "h1")
        inv.upgrade(start)
        with inv.engine.begin() as conn:
            from sqlalchemy import text

            conn.execute(text("INSERT INTO hosts (id, hostname, root, simulated, created_at, last_seen_at) "
                              "VALUES ('h1', 'h1', '/', 0, '2026-01-01', '2026-01-01')"))
            conn.execute(text("INSERT INTO profiles (name, kind, spec, source, created_at, updated_at) "
                              "VALUES ('p', 'mig', '{}', 'user', '2026-01-01', '2026-01-01')"))
            # a GPU with an instance allocated to a VM: revisions that rebuild tables (SQLite batch mode) must
            # not let ON DELETE CASCADE take the rows that reference them
            conn.execute(text("INSERT INTO gpus (host_id, address, vendor, memory_mib, mig_capable, present, "
                              "desired_profile, last_seen_at) VALUES ('h1', '0000:41:00.0', 'nvidia', 1, 1, 1, "
                              "'p', '2026-01-01')"))
            conn.execute(text("INSERT INTO instances (host_id, gpu_id, kind, state, origin, persistent, created_at, "
                              "updated_at) VALUES ('h1', 1, 'mig', 'active', 'profile', 1, '2026-01-01', "
                              "'2026-01-01')"))
            conn.execute(text("INSERT INTO allocations (instance_id, host_id, vm_name, persistent, created_at) "
                              "VALUES (1, 'h1', 'vm-kept', 1, '2026-01-01')"))
        inv.ensure_schema()
        assert inv.current_revision() == HEAD_REVISION
        assert inv.check() == []
        with inv.unit() as uow:
            assert uow.host("h1") is not None and uow.profile("p") is not None
            assert [a.vm_name for a in uow.allocations(host_id="h1")] == ["vm-kept"], start
            assert [g.desired_profile for g in uow.gpus("h1")] == ["p"]
        inv.close()


def test_db_commands(cli, make_sim):
    sim = make_sim(["mtty"])
    root = sim.root
    r = cli("--sim", root, "db", "current", "--json")
    assert r.exit_code == 0, r
    assert r.json()["revision"] is None  # nothing created yet: db current does not upgrade
    assert cli("--sim", root, "db", "upgrade").exit_code == 0
    assert cli("--sim", root, "db", "check").exit_code == 0
    doc = cli("--sim", root, "db", "current", "--json").json()
    assert doc["revision"] == doc["head"] and doc["warnings"] == []


def test_config_file_supplies_db_and_host_id(cli, make_sim, tmp_path):
    sim = make_sim(["mtty"])
    root = sim.root
    cfg = root / "etc/gpuvirt/gpuvirt.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    other = tmp_path / "other.db"
    cfg.write_text(f'db_url = "sqlite:///{other}"\nhost_id = "rack1-node7"\n')
    assert cli("--sim", root, "status").exit_code == 3 and not other.exists()  # named, so never made silently
    assert cli("--sim", root, "db", "init").exit_code == 0
    assert cli("--sim", root, "status").exit_code == 0
    assert other.exists()
    con = sqlite3.connect(other)
    assert con.execute("select id from hosts").fetchall() == [("rack1-node7",)]
    con.close()
    cfg.write_text("db_url = [\n")
    r = cli("--sim", root, "status")
    assert r.exit_code == 2 and "not valid TOML" in r.stderr, r
    cfg.write_text('bogus = 1\n')
    r = cli("--sim", root, "status")
    assert r.exit_code == 2 and "unknown key" in r.stderr, r
    _ = json


def _one_line(res, code):
    assert res.exit_code == code, res
    assert res.stderr.startswith("gpuvirt: error: ") and res.stderr.count("\n") == 1, res
    assert "Traceback" not in res.stderr + res.stdout and res.stdout == "", res


def test_a_named_config_file_must_exist(cli, gpuvirt_proc, make_sim, tmp_path, monkeypatch):
    sim = make_sim(["a100-40gb"])
    missing = tmp_path / "nonexist.toml"
    for args in (["status"], ["discover", "--json"], ["report", "-f", "json"],
                 ["plan", "--pack", "3g.20gb=1", "--model", "a100-40gb"], ["hook", "install"]):
        for run in (cli, gpuvirt_proc):
            res = run("--sim", sim.root, "--config", missing, *args)
            _one_line(res, 3)
            assert f"config file {missing} does not exist" in res.stderr, (args, res)
    monkeypatch.setenv("GPUVIRT_CONFIG", str(missing))
    _one_line(cli("--sim", sim.root, "status"), 3)
    _one_line(gpuvirt_proc("--sim", sim.root, "discover", "--json"), 3)
    assert not (sim.root / "etc/libvirt").exists()          # hook install wrote nothing
    # help does not depend on valid settings
    monkeypatch.delenv("GPUVIRT_CONFIG")
    assert cli("--config", missing, "report", "--help").exit_code == 0
    # the default path (not named) stays optional
    assert cli("--sim", sim.root, "status").exit_code == 0


@pytest.mark.parametrize("line, key, bad, choices", [
    ('mig_placement = "worst-fit"', "mig_placement", "'worst-fit'", "first-fit, best-fit, spread, pack, frag-aware"),
    ('vgpu_placement = "pack"', "vgpu_placement", "'pack'", "consolidate, spread"),
    ("stale_after_seconds = -5", "stale_after_seconds", "-5", "non-negative number"),
    ('reset_gpu = "yes"', "reset_gpu", "'yes'", "true or false"),
])
def test_bad_policy_values_are_refused_when_the_config_is_read(cli, gpuvirt_proc, make_sim, tmp_path, line, key,
                                                               bad, choices):
    sim = make_sim(["a100-40gb", "a2"])
    cfg = tmp_path / "gpuvirt.toml"
    cfg.write_text(f"[policies]\n{line}\n")
    # every command refuses it the same way, not only the ones that place something (apply)
    for args in (["status"], ["plan", "--pack", "3g.20gb=1", "--model", "a100-40gb"], ["report", "--fit", "1g.5gb=1"],
                 ["report", "-f", "json", "--fit", "1g.5gb=1"], ["apply", "a100-40gb-2x3g", "--gpu", "0", "--yes"]):
        for run in (cli, gpuvirt_proc):
            res = run("--sim", sim.root, "--config", cfg, *args)
            _one_line(res, 2)
            assert f"config file {cfg}: policies.{key} = {bad}" in res.stderr and choices in res.stderr, (args, res)


def test_valid_policy_values_reach_the_commands(cli, make_sim, tmp_path):
    sim = make_sim(["a100-40gb", "a2"])
    cfg = tmp_path / "gpuvirt.toml"
    cfg.write_text('[policies]\nmig_placement = "pack"\nvgpu_placement = "spread"\nstale_after_seconds = 1.5\n'
                   "reset_gpu = true\n")
    r = cli("--sim", sim.root, "--config", cfg, "report", "-f", "json", "--fit", "1g.5gb=1")
    assert r.exit_code == 4 and r.stderr == "", r                # MIG is off: does not fit, but is answered
    assert r.json()["fit"]["policies"] == {"mig": "pack", "vgpu": "spread"}


def test_partial_layout_leaves_room_for_large_profiles(cli, make_sim):
    # two 1g instances on an empty A100: the placement policy keeps the only 4g start (0:4) free
    sim = make_sim(["a100-40gb"])
    root = sim.root
    cli("--sim", root, "create-profile", "two", "--mig", "1g.5gb=2", "--model", "a100-40gb")
    assert cli("--sim", root, "apply", "two", "--gpu", "0", "--yes").exit_code == 0
    lay = host_layout(sim)["0000:41:00.0"]
    assert all(start >= 4 for _, start, _ in lay)
    from gpuvirt.host.nvml import NvmlSession
    from gpuvirt.sim.nvml import FakeNvmlLib

    with NvmlSession(FakeNvmlLib(sim)) as s:
        s.create_gpu_instance(0, 5, 0)  # the 4g still fits: the simulator accepts it


def test_mig_profile_without_nvml_names_the_missing_driver(cli, make_sim):
    sim = make_sim(["a100-40gb"], driver_loaded=False)
    r = cli("--sim", sim.root, "apply", "a100-40gb-2x3g", "--gpu", "a100-40gb", "--yes")
    assert r.exit_code == 5 and "NVML reports no MIG state" in r.stderr and "does not support MIG" not in r.stderr


def test_reboot_and_reconcile_finish_a_pending_reset_apply(cli, make_sim):
    # apply's own advice for a MIG mode change held up by a GPU user: "reboot and run 'gpuvirt reconcile'"
    from gpuvirt.sim.control import reboot, set_client

    sim = make_sim(["a100-40gb"])
    root = sim.root
    set_client(sim, "0000:41:00.0", "nvidia-persistenced", True)
    r = cli("--sim", root, "apply", "a100-40gb-balanced", "--gpu", "0", "--yes")
    assert r.exit_code == 6 and "reboot and run 'gpuvirt reconcile'" in r.stderr, r
    st = status(cli, root)
    assert not st["in_sync"] and any(d["kind"] == "unfinished-apply" for d in st["gpus"][0]["drift"])
    set_client(sim, "0000:41:00.0", "nvidia-persistenced", False)
    reboot(sim)                                      # Ampere applies the pending MIG mode at boot
    r = cli("--sim", root, "reconcile", "--yes", "--json")
    assert r.exit_code == 0, r
    assert [p for p, _, _ in host_layout(sim)["0000:41:00.0"]] and len(host_layout(sim)["0000:41:00.0"]) == 4
    st = assert_in_sync(cli, root)
    assert st["gpus"][0]["profile_state"] == "applied"


def test_reconcile_finishes_pending_apply_when_the_users_left_without_reboot(cli, make_sim):
    from gpuvirt.sim.control import set_client

    sim = make_sim(["a100-40gb"])
    root = sim.root
    set_client(sim, "0000:41:00.0", "nvidia-persistenced", True)
    assert cli("--sim", root, "apply", "a100-40gb-balanced", "--gpu", "0", "--yes").exit_code == 6
    set_client(sim, "0000:41:00.0", "nvidia-persistenced", False)
    assert cli("--sim", root, "reconcile", "--yes").exit_code == 0          # one run is enough
    assert len(host_layout(sim)["0000:41:00.0"]) == 4
    assert_in_sync(cli, root)


def test_multi_gpu_apply_failure_restores_every_gpu_profile(cli, make_sim):
    from gpuvirt.sim.control import add_fault

    sim = make_sim(["a100-40gb:2"])
    root = sim.root
    cli("--sim", root, "create-profile", "halves", "--mig", "3g.20gb=2", "--model", "a100-40gb")
    add_fault(sim, "nvml.CreateGpuInstance", skip=2)             # the first GPU succeeds, the second fails
    r = cli("--sim", root, "apply", "halves", "--gpu", "a100-40gb", "--yes")
    assert r.exit_code != 0 and "rolled back" in r.stderr, r
    st = assert_in_sync(cli, root)
    assert [(g["desired_profile"], g["profile_state"]) for g in st["gpus"]] == [(None, None), (None, None)]
    assert all(not v for v in host_layout(sim).values())


def test_reconcile_does_not_finish_an_apply_over_foreign_instances(cli, make_sim):
    from gpuvirt.sim.control import add_fault, clear_faults
    from gpuvirt.sim.control import open_sim

    sim = make_sim(["a100-40gb"])
    root = sim.root
    cli("--sim", root, "create-profile", "seven", "--mig", "1g.5gb=7", "--model", "a100-40gb")
    cli("--sim", root, "create-profile", "halves", "--mig", "3g.20gb=2", "--model", "a100-40gb")
    assert cli("--sim", root, "apply", "seven", "--gpu", "0", "--yes").exit_code == 0
    add_fault(sim, "nvml.CreateGpuInstance", skip=1, times=50)
    assert "ROLLBACK INCOMPLETE" in cli("--sim", root, "apply", "halves", "--gpu", "0", "--yes").stderr
    clear_faults(sim)
    # another tool creates a GPU instance in a free slot
    from gpuvirt.host.nvml import NvmlSession
    from gpuvirt.sim.nvml import FakeNvmlLib

    layout_before = host_layout(sim)["0000:41:00.0"]
    free = next(s for s in range(7) if all(not (st <= s < st + sz) for _, st, sz in layout_before))
    with NvmlSession(FakeNvmlLib(open_sim(root))) as s:
        s.create_gpu_instance(0, 19, start=free)
    r = cli("--sim", root, "reconcile", "--adopt", "--yes", "--json")
    # the unfinished apply is settled by its recorded steps only: finishing it would need the slot the other
    # tool took, so it is rolled back to the previous layout, and the other tool's instance stays where it is
    assert r.exit_code == 0, r
    assert any(f["kind"] == "unfinished-apply" and f["action"] == "rolled back" for f in r.json()["findings"]), r
    layout = host_layout(sim)["0000:41:00.0"]
    assert (19, free, 1) in layout
    assert [p for p, _, _ in layout] == [19] * 7
    cli("--sim", root, "reconcile", "--yes")
    assert (19, free, 1) in host_layout(sim)["0000:41:00.0"]
    assert_in_sync(cli, root)


def test_rollback_withdraws_a_pending_mig_mode_change(cli, make_sim):
    from gpuvirt.sim.control import add_fault, reboot, set_client

    sim = make_sim(["a100-40gb:2"])
    root = sim.root
    set_client(sim, "0000:41:00.0", "myproc", True)         # GPU 0's mode change waits for a reset
    add_fault(sim, "nvml.CreateGpuInstance", skip=2)          # and GPU 1 fails part-way
    r = cli("--sim", root, "apply", "a100-40gb-balanced", "--gpu", "all", "--yes")
    assert r.exit_code != 0 and "rolled back to the previous layout" in r.stderr, r
    mig = [d["mig"] for d in sim.load()["devices"]]
    assert [(m["current"], m["pending"]) for m in mig] == [(0, 0), (0, 0)]
    set_client(sim, "0000:41:00.0", "myproc", False)
    reboot(sim)
    assert [d["mig"]["current"] for d in sim.load()["devices"]] == [0, 0]
    assert_in_sync(cli, root)
