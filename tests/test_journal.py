"""The intent journal (gpuvirt.service.intent): plans recorded before they run, rollback verified against the
host, and the reproducers of issue 11's "Why" that are not kill points (tests/test_crash.py has those)."""

from __future__ import annotations

import pytest

from gpuvirt.context import Context, resolve_settings


def _ctx(sim):
    return Context(resolve_settings(sim=str(sim.root), env={}))


def _gis(sim, i=0):
    dev = sim.load()["devices"][i]
    return sorted((g["profile_id"], g["start"], g["size"], len(g["compute_instances"]))
                  for g in dev["mig"]["gpu_instances"])


def _status(cli, root):
    r = cli("--sim", root, "status", "--json")
    assert r.exit_code == 0, r
    return r.json()


def _open_intents(sim):
    with _ctx(sim) as ctx:
        from gpuvirt.service.intent import open_intents

        return open_intents(ctx)


def test_a_failed_destroy_keeps_every_compute_instance_and_uuid(cli, make_sim):
    """Issue 11: a GPU instance whose destroy fails after its compute instance went (NVML IN_USE) got no
    compute instance back, and the inventory kept a MIG UUID that no longer existed."""
    from gpuvirt.sim.control import add_fault

    sim = make_sim(["a100-40gb"])
    root = sim.root
    assert cli("--sim", root, "apply", "a100-40gb-balanced", "--gpu", "0", "--yes").exit_code == 0
    before = _gis(sim)
    add_fault(sim, "nvml.DestroyGpuInstance", nvml=3)
    r = cli("--sim", root, "apply", "a100-40gb-mig-vgpu-7x1-5c", "--gpu", "0", "--yes")
    assert r.exit_code != 0 and "rolled back to the previous layout" in r.stderr, r
    assert _gis(sim) == before and all(n == 1 for *_, n in before)
    st = _status(cli, root)
    assert st["in_sync"], st
    host_uuids = {c["uuid"] for g in sim.load()["devices"][0]["mig"]["gpu_instances"] for c in g["compute_instances"]}
    rows = st["gpus"][0]["instances"]
    assert {r["mig_uuid"] for r in rows if r["kind"] == "mig"} == host_uuids
    assert not _open_intents(sim)


def test_a_failed_reset_withdraws_the_pending_mig_mode(cli, make_sim):
    """Issue 11: apply --reset-gpu whose reset fails said "rolled back" while MIG mode stayed pending, to switch
    on at the next reboot with no profile recorded."""
    from gpuvirt.sim.control import add_fault, reboot, set_client

    sim = make_sim(["a100-40gb"])
    root = sim.root
    set_client(sim, "0000:41:00.0", "dcgm", True)            # the mode change has to wait for a reset
    add_fault(sim, "pci.reset", errno="EIO")
    r = cli("--sim", root, "apply", "a100-40gb-7x1g", "--gpu", "0", "--yes", "--reset-gpu")
    assert r.exit_code != 0 and "rolled back to the previous layout" in r.stderr, r
    mig = sim.load()["devices"][0]["mig"]
    assert (mig["current"], mig["pending"]) == (0, 0)
    set_client(sim, "0000:41:00.0", "dcgm", False)
    reboot(sim)
    mig = sim.load()["devices"][0]["mig"]
    assert (mig["current"], mig["pending"]) == (0, 0)
    st = _status(cli, root)
    assert st["in_sync"] and st["gpus"][0]["desired_profile"] is None, st


def test_the_plan_is_recorded_before_the_first_host_operation(cli, make_sim, gpuvirt_proc):
    from gpuvirt.sim.control import add_fault

    sim = make_sim(["a100-40gb"])
    root = sim.root
    assert cli("--sim", root, "apply", "a100-40gb-balanced", "--gpu", "0", "--yes").exit_code == 0
    add_fault(sim, "nvml.DestroyComputeInstance", kill="before")      # the very first host operation
    r = gpuvirt_proc("--sim", root, "apply", "a100-40gb-mig-vgpu-7x1-5c", "--gpu", "0", "--yes")
    assert r.exit_code == -9, r
    [row] = _open_intents(sim)
    assert row.kind == "apply" and row.target["profile"] == "a100-40gb-mig-vgpu-7x1-5c"
    ops = [(s["op"], s["present"]) for s in row.steps]
    assert ops[:2] == [("mig", False), ("mig", False)] and ops.count(("mig", True)) == 5
    assert ops.count(("mdev", True)) == 7 and all(s["state"] == "pending" for s in row.steps)
    assert row.before["0000:41:00.0"]["desired_profile"] == "a100-40gb-balanced"
    # status tells: not in sync, an unfinished apply (and nobody holds the GPU: not "in progress")
    st = _status(cli, root)
    drift = st["gpus"][0]["drift"]
    assert not st["in_sync"] and any(d["kind"] == "unfinished-apply" and "in progress" not in d["action"]
                                     for d in drift), st
    # the next command that takes the GPU lock settles it first (here: an apply of the same profile)
    r = cli("--sim", root, "apply", "a100-40gb-mig-vgpu-7x1-5c", "--gpu", "0", "--yes")
    assert r.exit_code == 0, r
    assert not _open_intents(sim) and _status(cli, root)["in_sync"]
    assert [p for p, *_ in _gis(sim)] == [19] * 7


def test_verification_failure_leaves_the_intent_for_reconcile(cli, make_sim, monkeypatch):
    """Rollback re-reads the host; when what it sees is not the old layout, it says so and keeps the journal."""
    from gpuvirt.sim.control import add_fault, clear_faults
    from gpuvirt.service import intent

    sim = make_sim(["a100-40gb"])
    root = sim.root
    assert cli("--sim", root, "apply", "a100-40gb-balanced", "--gpu", "0", "--yes").exit_code == 0
    add_fault(sim, "nvml.CreateGpuInstance", skip=2)
    real = intent.Run.rollback

    def rollback_then_lose_an_instance(self):
        failures = real(self)
        # something else takes a GPU instance away between the rollback and its verification
        from gpuvirt.service.instances import remove_mig

        remove_mig(self.ctx, 0, 14, 0)
        return failures

    monkeypatch.setattr(intent.Run, "rollback", rollback_then_lose_an_instance)
    r = cli("--sim", root, "apply", "a100-40gb-mig-vgpu-7x1-5c", "--gpu", "0", "--yes")
    assert r.exit_code != 0 and "ROLLBACK INCOMPLETE" in r.stderr and "does not show on the host" in r.stderr, r
    monkeypatch.setattr(intent.Run, "rollback", real)
    [row] = _open_intents(sim)
    assert row.state == "rollback-incomplete"
    assert not _status(cli, root)["in_sync"]
    clear_faults(sim)
    r = cli("--sim", root, "reconcile", "--yes", "--json")
    assert r.exit_code == 0, r
    assert not _open_intents(sim) and _status(cli, root)["in_sync"]


def test_a_live_operation_is_never_settled_by_another_process(cli, make_sim):
    """An intent whose owner still runs is in progress, not unfinished: recover() leaves it alone."""
    from gpuvirt.service import intent

    sim = make_sim(["a100-40gb"])
    with _ctx(sim) as ctx:
        run = intent.Run.begin(ctx, "attach", gpus=["0000:41:00.0"], target={"vm": "x"}, recovery="back")
        assert run.id in {r.id for r in intent.open_intents(ctx)}
        # this process is the owner; another process sees it as in progress
        with ctx.inventory.unit(write=True) as uow:
            row = uow.intent(run.id)
            row.owner = intent.process_id(1)     # pid 1 is alive (init)
        intent._ACTIVE.discard(run.id)
        assert intent.recover(ctx, None) == []
        with ctx.inventory.unit(write=True) as uow:
            uow.intent(run.id).owner = "not-a-boot:999999:1"
        [res] = intent.recover(ctx, None)
        assert res["result"] in ("back", "forward") and not intent.open_intents(ctx)


@pytest.mark.parametrize("fault", ["mdev.create", "nvml.CreateGpuInstance"])
def test_a_failed_attach_leaves_nothing(cli, make_sim, fault):
    from gpuvirt.sim.control import add_fault

    sim = make_sim(["a100-40gb"], mig_enabled=True, enable_vfs=False)
    root = sim.root
    add_fault(sim, fault, errno="EIO")
    r = cli("--sim", root, "attach", "vm1", "--mig", "1g.5gb", "--format", "json")
    assert r.exit_code != 0, r
    dev = sim.load()["devices"][0]
    assert dev["mig"]["gpu_instances"] == [] and sim.load()["mdevs"] == [] and dev["sriov"]["numvfs"] == 0
    assert not _open_intents(sim) and _status(cli, root)["in_sync"]
    assert cli("--sim", root, "allocations", "--json").json() == []
