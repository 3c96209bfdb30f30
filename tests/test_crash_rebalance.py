"""Crash safety of ``gpuvirt rebalance --execute`` (issue 13 item 4): the executor killed before and after
every journal step of a move - a time-sliced vGPU (create, handover, release, destroy) and a MIG-backed one
(GPU instance, vGPU, handover, two releases, two destroys) -, at every step of placing the request after the
move (a free instance, or the attach of a VM), and a failed handover.  After recovery each VM's
libvirt definition names exactly one device, that device exists on the simulated host, the inventory agrees
with the host with no intent left open, the guest runs as before, and the next rebalance works.  A kill once
the handover is recorded is finished forward; any earlier kill is undone (even one right after libvirt moved
the VM, which then moves back)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from gpuvirt.errors import HostError
from rebalance_support import LOCAL, FakeVirsh, _copy, _ctx, _domains, _one_device_each, _placements

pytestmark = pytest.mark.crash


# --- a kill at every executor step ---------------------------------------------------------------------------------
class Killed(BaseException):
    """The process dies here (nothing of gpuvirt's catches it)."""


def _killing(monkeypatch, k, after):
    from gpuvirt.service import intent

    real = intent.op_of
    seen = [0]

    def op_of(ctx, step):
        op = real(ctx, step)
        fwd = op.forward

        def forward():
            n = seen[0]
            seen[0] += 1
            if n == k and not after:
                raise Killed
            res = fwd()
            if n == k and after:
                raise Killed            # the host changed, its record was never written
            return res
        op.forward = forward
        return op
    monkeypatch.setattr(intent, "op_of", op_of)
    return seen


CASES = {"time-sliced": (["a10:2"], "A10-12Q", "A10-24Q", 4),
         "mig-backed": (["a100-40gb:2"], "A100-3-20C", "7g.40gb", 7)}


@pytest.fixture(scope="module", params=sorted(CASES))
def crash_template(request, tmp_path_factory):
    from typer.testing import CliRunner

    from gpuvirt.cli.app import app
    from gpuvirt.sim.control import init_sim

    gpus, vgpu, want, steps = CASES[request.param]
    root = Path(tempfile.mkdtemp(prefix="rebalance-tpl-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    init_sim(root / "h", gpus, seed="crash", mig_enabled=gpus[0].startswith("a100"))
    for vm, g in (("vm-a", "0"), ("vm-b", "1")):
        r = CliRunner().invoke(app, ["--sim", str(root / "h"), "attach", vm, "--vgpu", vgpu, "--gpu", g])
        assert r.exit_code == 0, r.stderr
    yield root / "h", want, steps
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_a_kill_at_every_executor_step_is_settled_to_one_device_per_vm(crash_template, monkeypatch, after):
    from gpuvirt.service import intent, rebalance, rebalance_exec

    tpl, want, steps = crash_template
    outcomes = []
    for k in range(steps):
        root = _copy(tpl)
        try:
            ctx = _ctx(root)
            fake = FakeVirsh()
            _domains(ctx, fake)
            before = _placements(ctx)
            seen = _killing(monkeypatch, k, after)
            with pytest.raises(Killed):
                rebalance_exec.rebalance_and_execute(ctx, want, policy=rebalance.make_policy(allow="cold"),
                                                     runner=fake)
            monkeypatch.undo()
            assert seen[0] == k + 1
            with intent._ACTIVE_GUARD:
                intent._ACTIVE.clear()      # the process that ran the intent is gone
            [res] = rebalance_exec.recover(ctx, runner=fake)
            assert res["result"] in ("forward", "back"), res
            now = _placements(ctx)
            moved = now != before
            # the handover is step steps-4+... : a kill once the VM names its target finishes the move
            handover = steps - (4 if steps == 7 else 2) - 1
            # killed once the handover is recorded: finished forward; before (even right after libvirt moved
            # the VM, its record unwritten): undone, the VM handed back to its source device
            assert moved == (k > handover), (k, after, res)
            _one_device_each(ctx, fake)
            assert all(d["state"] == "running" for d in fake.domains[LOCAL].values())
            outcomes.append(res["result"])
            # and the next rebalance works from whatever state the recovery left
            doc = rebalance_exec.rebalance_and_execute(ctx, want, policy=rebalance.make_policy(allow="cold"),
                                                       runner=fake)
            assert doc["feasible"]
            _one_device_each(ctx, fake)
            ctx.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    assert "back" in outcomes and "forward" in outcomes


def test_a_failed_handover_is_undone_and_the_vm_keeps_its_device(boards):
    from gpuvirt.errors import HostError
    from gpuvirt.service import rebalance, rebalance_exec

    ctx = _ctx(boards)
    fake = FakeVirsh()
    _domains(ctx, fake)
    before = _placements(ctx)
    fake.fail_on = "define"
    with pytest.raises(HostError, match="move 1 of 1 .*failed and was undone.*injected failure"):
        rebalance_exec.rebalance_and_execute(ctx, "A10-24Q", policy=rebalance.make_policy(allow="cold"),
                                             runner=fake)
    assert _placements(ctx) == before
    _one_device_each(ctx, fake)
    # the guest was shut down for the move; undoing it starts it again
    assert all(d["state"] == "running" for d in fake.domains[LOCAL].values())
    ctx.close()


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_a_kill_during_a_live_move_between_two_hosts_is_settled_on_both(two_host_template, monkeypatch, after):
    from gpuvirt.model.preflight import HostStack
    from gpuvirt.service import intent, rebalance, rebalance_exec

    stack = HostStack(driver="550.127.05", os="rhel-9.4", kernel="5.14.0", qemu="8.2.0", libvirt="10.0.0")
    remote = "qemu+ssh://hb/system"
    outcomes = []
    for k in range(4):      # vGPU on hb, handover, release and destroy on ha
        root = _copy(two_host_template)
        try:
            url = f"sqlite:///{root / 'shared.db'}"
            ca, cb = _ctx(root / "ha", db=url, host_id="ha"), _ctx(root / "hb", db=url, host_id="hb")
            fake = FakeVirsh()
            _domains(ca, fake, LOCAL)
            _domains(cb, fake, remote)
            monkeypatch.setattr(rebalance, "_host_stack", lambda db, host: stack)
            before = _placements(ca, cluster=True)
            _killing(monkeypatch, k, after)
            with pytest.raises(Killed):
                rebalance_exec.rebalance_and_execute(ca, "A10-24Q", cluster=True, runner=fake, peers={"hb": cb},
                                                     policy=rebalance.make_policy(allow="live"))
            monkeypatch.undo()
            with intent._ACTIVE_GUARD:
                intent._ACTIVE.clear()
            # another process on ha, which cannot reach hb, leaves the move open rather than half-settle it
            if k == 0 and after:
                [res] = rebalance_exec.recover(ca, runner=fake)
                assert res["result"] == "failed" and "cannot reach" in res["error"]
                with intent._ACTIVE_GUARD:
                    intent._ACTIVE.clear()
            [res] = rebalance_exec.recover(ca, runner=fake, peers={"hb": cb})
            assert res["result"] in ("forward", "back"), res
            moved = _placements(ca, cluster=True) != before
            assert moved == (k > 1), (k, after, res)
            _one_device_each(ca, fake, uris=(LOCAL,))
            _one_device_each(cb, fake, uris=(remote,))
            # each VM is defined on exactly one host, running
            for vm in ("vm-a", "vm-b"):
                where = fake.where(vm)
                assert len(where) == 1 and where[0][1]["state"] == "running", (vm, where)
            outcomes.append(res["result"])
            ca.close()
            cb.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    assert "back" in outcomes and "forward" in outcomes


# --- a kill while the request is placed after the moves ----------------------------------------------------------
def _gis(ctx):
    """(GPU address, profile, start) of every GPU instance, as the simulated host and as the inventory say."""
    sim = ctx.sim.load()
    host = sorted((d["address"], g["profile_id"], g["start"]) for d in sim["devices"]
                  for g in (d.get("mig") or {}).get("gpu_instances", []))
    with ctx.inventory.unit() as uow:
        rows = sorted((r.gpu.address, r.profile_id, r.placement_start)
                      for r in uow.instances(ctx.settings.host_id, kinds=["mig"]))
    return host, rows


@pytest.mark.parametrize("vm", [None, "vm-c"], ids=["free-instance", "attach-vm"])
def test_a_kill_while_the_request_is_placed_is_settled_and_the_moves_stay_done(crash_template, monkeypatch, vm):
    from gpuvirt.service import intent, rebalance, rebalance_exec

    tpl, want, steps = crash_template
    policy = rebalance.make_policy(allow="cold")
    root = _copy(tpl)
    try:            # how many journal steps the whole run takes, the move's `steps` first
        ctx = _ctx(root)
        fake = FakeVirsh()
        _domains(ctx, fake)
        seen = _killing(monkeypatch, -1, False)
        doc, _ = rebalance_exec.execute_for(ctx, want, policy=policy, vm=vm, runner=fake)
        monkeypatch.undo()
        total = seen[0]
        assert len(doc["moves"]) == 1 and doc["placed"]["vm"] == vm and total > steps
        ctx.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for k in range(steps, total):
        for after in (False, True):
            root = _copy(tpl)
            try:
                ctx = _ctx(root)
                fake = FakeVirsh()
                _domains(ctx, fake)
                before = _placements(ctx)
                _killing(monkeypatch, k, after)
                with pytest.raises(Killed):
                    rebalance_exec.execute_for(ctx, want, policy=policy, vm=vm, runner=fake)
                monkeypatch.undo()
                with intent._ACTIVE_GUARD:
                    intent._ACTIVE.clear()
                moved = {n: p for n, p in _placements(ctx).items() if n != vm}
                # what reconcile does first: every intent a dead process left, the placing one (kind rebalance
                # for a free instance, attach for a VM) rolled back
                res = intent.recover(ctx, None)
                assert [r["result"] for r in res] == ["back"], (k, after, res)
                # the move before it stays done, and nothing of the request is left half made
                assert moved != before and {n: p for n, p in _placements(ctx).items() if n != vm} == moved
                assert vm not in _placements(ctx)
                _one_device_each(ctx, fake)
                host, rows = _gis(ctx)
                assert host == rows, (k, after)
                assert all(d["state"] == "running" for d in fake.domains[LOCAL].values())
                # placing again needs no move now and works
                doc, _ = rebalance_exec.execute_for(ctx, want, policy=policy, vm=vm, runner=fake)
                assert doc["moves"] == [] and doc["placed"]["vm"] == vm and doc["placed"]["instance"]
                _one_device_each(ctx, fake)
                ctx.close()
            finally:
                shutil.rmtree(root, ignore_errors=True)


# --- recovery while libvirt cannot be asked (review finding 1) ------------------------------------------------------
class _Down(FakeVirsh):
    """libvirt not reachable yet (the boot unit runs before libvirtd): every virsh call fails."""

    down = False

    def __call__(self, argv):
        if self.down:
            self.calls.append(list(argv))
            raise HostError("virsh: error: failed to connect to the hypervisor")
        return super().__call__(argv)


def _killed_after_handover(ctx, fake, monkeypatch):
    """Run the move of vm-a and kill the executor right after the handover was recorded."""
    from gpuvirt.service import intent, rebalance, rebalance_exec

    real = intent.op_of

    def op_of(c, step):
        op = real(c, step)
        if step["op"] == "release":
            def boom():
                raise Killed
            op.forward = boom
        return op
    monkeypatch.setattr(intent, "op_of", op_of)
    with pytest.raises(Killed):
        rebalance_exec.rebalance_and_execute(ctx, "A10-24Q", policy=rebalance.make_policy(allow="cold"), runner=fake)
    monkeypatch.undo()
    with intent._ACTIVE_GUARD:
        intent._ACTIVE.clear()
    # the host rebooted: guests are off, libvirt not up yet
    for d in fake.domains[LOCAL].values():
        d["state"] = "shut off"
        fake._hold(LOCAL, d["xml"], False)
    fake.down = True


def _vm_devices_exist(ctx, fake):
    """Every VM's XML names devices that exist, and the inventory gives them to that VM."""
    from gpuvirt.vmm.libvirt import parse_domain

    on_host = {m["uuid"] for m in ctx.sim.load()["mdevs"]}
    with ctx.inventory.unit() as uow:
        held = {r.mdev_uuid: r.allocation.vm_name for r in uow.instances(ctx.settings.host_id, kinds=["mdev"])
                if r.allocation is not None}
    for name, d in fake.domains[LOCAL].items():
        for h in parse_domain(d["xml"]).hostdevs:
            assert h.uuid in on_host and held.get(h.uuid) == name, (name, h.uuid, held)


def test_recovery_while_libvirt_is_down_leaves_the_move_open(boards, monkeypatch):
    """Review finding 1: with the handover done and libvirt unreachable, recovery once fell back to undoing
    the move, destroyed the target device the VM names and re-created the source under a new row without its
    allocation.  Now the handover's check cannot tell (UnknownStateError) and the settle stops there: nothing is
    undone, the VM keeps the device its XML names, and the move is finished forward once libvirt answers.  (A
    rollback that does run stops at a handover it cannot undo, and a released source comes back with its
    allocation, found by its UUID: test_journal.py and the tests below.)"""
    from gpuvirt.service import intent, rebalance_exec

    ctx = _ctx(boards)
    fake = _Down()
    _domains(ctx, fake)
    before = _placements(ctx)
    _killed_after_handover(ctx, fake, monkeypatch)
    [res] = rebalance_exec.recover(ctx, runner=fake)
    assert res["result"] == "failed", res
    _vm_devices_exist(ctx, fake)
    with ctx.inventory.unit() as uow:
        mine = [r.mdev_uuid for r in uow.instances(ctx.settings.host_id, kinds=["mdev"])
                if r.allocation is not None and r.allocation.vm_name == "vm-a"]
    # the device the VM's XML names, nothing undone around it
    assert len(mine) == 1 and mine[0] in fake.domains[LOCAL]["vm-a"]["xml"], mine
    from gpuvirt.service.reconcile import status

    st = status(ctx)        # the move shows as unfinished, and says why it was not settled
    drift = [f for g in st["gpus"] for f in g["drift"] if f["kind"] == "unfinished-rebalance"]
    assert not st["in_sync"] and drift and "not settled" in drift[0]["target"], drift
    [row] = intent.open_intents(ctx)
    assert row.recovery == "forward" and [s["state"] for s in row.steps if s["op"] == "vm-handover"] == ["done"]
    with intent._ACTIVE_GUARD:
        intent._ACTIVE.clear()
    fake.down = False
    for d in fake.domains[LOCAL].values():     # libvirt up, the guests started again
        d["state"] = "running"
        fake._hold(LOCAL, d["xml"], True)
    [res] = rebalance_exec.recover(ctx, runner=fake)
    assert res["result"] == "forward", res
    assert _placements(ctx) != before
    _one_device_each(ctx, fake)
    ctx.close()


def test_a_check_that_cannot_tell_leaves_the_move_open_without_going_back(boards, monkeypatch):
    """Review finding 1 (b): when the handover's check raises (libvirt cannot be asked: "cannot tell"), the
    settle does not fall back to undoing the move; it leaves the intent for a later settle."""
    from gpuvirt.service import intent, rebalance_exec
    from gpuvirt.service.rebalance_steps import VmHandoverOp

    ctx = _ctx(boards)
    fake = _Down()
    _domains(ctx, fake)
    _killed_after_handover(ctx, fake, monkeypatch)
    real = VmHandoverOp.holds

    def holds(self, view, present):
        if fake.down:
            raise HostError("virsh: error: failed to connect to the hypervisor")
        return real(self, view, present)
    monkeypatch.setattr(VmHandoverOp, "holds", holds)
    n = len(fake.calls)
    [res] = rebalance_exec.recover(ctx, runner=fake)
    assert res["result"] == "failed" and "cannot be checked now" in res["error"] and "rolling back" not in res["error"]
    [row] = intent.open_intents(ctx)
    assert all(s["state"] == "done" for s in row.steps), row.steps   # nothing undone
    _vm_devices_exist(ctx, fake)
    assert len(fake.calls) == n         # virsh was not even tried for a way back
    with intent._ACTIVE_GUARD:
        intent._ACTIVE.clear()
    fake.down = False
    [res] = rebalance_exec.recover(ctx, runner=fake)
    assert res["result"] == "forward", res
    ctx.close()


def test_a_failed_source_cleanup_after_the_handover_never_moves_the_vm_back(boards, monkeypatch):
    """Review finding 2: removing the source mdev failed (EBUSY) after the handover, and the executor aborted
    backward - shut the guest down and started it again on its source (for a live move: a second migration).
    Now the move is done: the cleanup is retried once, then left for reconcile to finish forward."""
    from gpuvirt.service import intent, rebalance, rebalance_exec

    monkeypatch.setattr(rebalance_exec, "CLEANUP_RETRY_SECONDS", 0)
    ctx = _ctx(boards)
    fake = FakeVirsh()
    _domains(ctx, fake)
    before = _placements(ctx)
    host, real = ctx.host, ctx.host.remove_mdev
    fails = [2]

    def remove_mdev(uuid, *a, **k):
        if fails[0]:
            fails[0] -= 1
            raise HostError("injected: remove_mdev EBUSY")
        return real(uuid, *a, **k)
    monkeypatch.setattr(host, "remove_mdev", remove_mdev)
    with pytest.raises(rebalance_exec.CleanupPending, match=r"move 1 of 1 \(cold move of VM vm-a\) is done.*"
                       r"source cleanup pending: run 'gpuvirt reconcile'") as exc:
        rebalance_exec.rebalance_and_execute(ctx, "A10-24Q", policy=rebalance.make_policy(allow="cold"), runner=fake)
    assert exc.value.exit_code == 1
    verbs = [c[2] for c in fake.calls]
    assert verbs.count("shutdown") == 1 and verbs.count("start") == 1 and verbs.count("define") == 1, verbs
    assert _placements(ctx) != before
    [row] = intent.open_intents(ctx)
    assert row.recovery == "forward" and row.state == intent.UNFINISHED
    with intent._ACTIVE_GUARD:
        intent._ACTIVE.clear()
    [res] = rebalance_exec.recover(ctx, runner=fake)
    assert res["result"] == "forward", res
    _one_device_each(ctx, fake)
    assert [c[2] for c in fake.calls].count("shutdown") == 1
    ctx.close()


def test_one_failed_source_cleanup_is_retried_and_the_move_finishes(boards, monkeypatch):
    from gpuvirt.service import intent, rebalance, rebalance_exec

    monkeypatch.setattr(rebalance_exec, "CLEANUP_RETRY_SECONDS", 0)
    ctx = _ctx(boards)
    fake = FakeVirsh()
    _domains(ctx, fake)
    host, real = ctx.host, ctx.host.remove_mdev
    fails = [1]

    def remove_mdev(uuid, *a, **k):
        if fails[0]:
            fails[0] -= 1
            raise HostError("injected: remove_mdev EBUSY")
        return real(uuid, *a, **k)
    monkeypatch.setattr(host, "remove_mdev", remove_mdev)
    doc = rebalance_exec.rebalance_and_execute(ctx, "A10-24Q", policy=rebalance.make_policy(allow="cold"),
                                               runner=fake)
    assert [m["result"] for m in doc["moves"]] == ["done"] and doc["placed"]
    assert [c[2] for c in fake.calls].count("shutdown") == 1
    assert not intent.open_intents(ctx)
    _one_device_each(ctx, fake)
    ctx.close()


def test_the_boot_reconcile_leaves_an_unfinished_move_to_the_reconcile_after_libvirt(boards, monkeypatch, cli):
    """Review finding 1 (d): the boot unit runs before libvirtd, where no move can be checked; it reports the
    move as unfinished and leaves it; a reconcile once libvirt runs finishes it."""
    from gpuvirt.service import intent, rebalance_steps
    from gpuvirt.service.reconcile import reconcile
    from gpuvirt.service.units import reconcile_unit

    ctx = _ctx(boards)
    fake = _Down()
    _domains(ctx, fake)
    _killed_after_handover(ctx, fake, monkeypatch)
    assert "reconcile --yes --wait 120 --boot\n" in reconcile_unit(ctx)
    old = rebalance_steps.set_runner(fake)
    n = len(fake.calls)
    try:
        r = cli("--sim", boards, "reconcile", "--yes", "--boot", "--json")
        assert r.exit_code == 0, r
        [f] = [f for f in r.json()["findings"] if f["kind"] == "unfinished-rebalance"][:1]
        assert "once libvirt runs" in f["action"] and f["result"] is None, f
        assert len(fake.calls) == n, fake.calls[n:]       # libvirt was not even asked
        [row] = intent.open_intents(ctx)
        assert [s["state"] for s in row.steps][-2:] == ["pending", "pending"]     # nothing tried
        _vm_devices_exist(ctx, fake)
        fake.down = False
        doc = reconcile(ctx)
        assert any(f["kind"] == "unfinished-rebalance" and f["result"] == "done" for f in doc["findings"]), doc
        assert not intent.open_intents(ctx)
        _one_device_each(ctx, fake)
    finally:
        rebalance_steps.set_runner(old)
    ctx.close()


def test_a_move_between_hosts_records_host_qualified_gpus(two_host_template, monkeypatch):
    """Review finding 6: the intent of a move between hosts held bare addresses of both hosts under the
    executing host's id, so a command on the executing host's GPU of the same address as the target took it
    for its own.  The target's GPU is recorded as host/address; a command holding only the local GPU is refused
    (the move is settled where both hosts are reachable), and recovery settles the move under both GPUs' locks."""
    from gpuvirt.errors import ConflictError
    from gpuvirt.model.preflight import HostStack
    from gpuvirt.service import intent, rebalance, rebalance_exec

    stack = HostStack(driver="550.127.05", os="rhel-9.4", kernel="5.14.0", qemu="8.2.0", libvirt="10.0.0")
    remote = "qemu+ssh://hb/system"
    root = _copy(two_host_template)
    try:
        url = f"sqlite:///{root / 'shared.db'}"
        ca, cb = _ctx(root / "ha", db=url, host_id="ha"), _ctx(root / "hb", db=url, host_id="hb")
        fake = FakeVirsh()
        _domains(ca, fake, LOCAL)
        _domains(cb, fake, remote)
        monkeypatch.setattr(rebalance, "_host_stack", lambda db, host: stack)
        _killing(monkeypatch, 0, True)          # the target vGPU made on hb, its record never written
        with pytest.raises(Killed):
            rebalance_exec.rebalance_and_execute(ca, "A10-24Q", cluster=True, runner=fake, peers={"hb": cb},
                                                 policy=rebalance.make_policy(allow="live"))
        monkeypatch.undo()
        with intent._ACTIVE_GUARD:
            intent._ACTIVE.clear()
        [row] = intent.open_intents(ca)
        [addr] = sorted(g for g in row.gpus if "/" not in g)
        assert row.gpus == sorted([addr, f"hb/{addr}"]), row.gpus
        with pytest.raises(ConflictError, match=f"also touches hb/{addr}"):
            intent.require_settled(ca, {addr})
        assert intent.recover(cb, {addr}) == []         # not hb's intent: hb's commands leave it alone
        [res] = rebalance_exec.recover(ca, runner=fake, peers={"hb": cb})
        assert res["result"] == "back", res
        _one_device_each(ca, fake, uris=(LOCAL,))
        _one_device_each(cb, fake, uris=(remote,))
        ca.close()
        cb.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_recover_takes_the_locks_of_the_gpus_it_settles(boards, monkeypatch):
    """Review nit: rebalance_exec.recover() settled moves without taking their GPUs' locks (an attach could
    run beside it)."""
    import contextlib

    from gpuvirt.service import instances, intent, rebalance_exec

    ctx = _ctx(boards)
    fake = _Down()
    _domains(ctx, fake)
    _killed_after_handover(ctx, fake, monkeypatch)
    fake.down = False
    [row] = intent.open_intents(ctx)
    held, seen = [], []
    real_lock, real_settle = instances.gpu_lock, intent.settle

    @contextlib.contextmanager
    def gpu_lock(c, address):
        with real_lock(c, address):
            held.append(address)
            try:
                yield
            finally:
                held.remove(address)
    monkeypatch.setattr(instances, "gpu_lock", gpu_lock)
    monkeypatch.setattr(intent, "settle", lambda c, r, **kw: seen.append(sorted(held)) or real_settle(c, r, **kw))
    [res] = rebalance_exec.recover(ctx, runner=fake)
    assert res["result"] == "forward" and seen == [sorted(row.gpus)], (res, seen)
    ctx.close()


def test_the_executor_settles_an_unfinished_move_on_any_gpu_it_touches(boards, monkeypatch):
    """Review finding 6: the executor's pre-check settled only intents whose GPUs all lay among the plan's; a
    move left open on the plan's GPU and another one was planned over.  Now it locks that move's GPUs too and
    settles it first."""
    from gpuvirt.service import intent, rebalance, rebalance_exec

    ctx = _ctx(boards)
    fake = _Down()
    _domains(ctx, fake)
    _killed_after_handover(ctx, fake, monkeypatch)
    fake.down = False
    [row] = intent.open_intents(ctx)
    doc = rebalance_exec.rebalance_and_execute(ctx, "A10-12Q", policy=rebalance.make_policy(allow="cold"),
                                               runner=fake)
    assert doc["moves"] == [] and doc["placed"] and doc["unlocks"]["gpu"] != sorted(row.gpus)[1], doc["unlocks"]
    assert not intent.open_intents(ctx)     # the move was finished before the request was placed
    _one_device_each(ctx, fake)
    ctx.close()
