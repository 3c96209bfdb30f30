"""Intents whose owner runs on another machine of a shared inventory.

An intent's owner is ``<boot id>:<pid>:<start time>``; /proc answers for owners of this machine's boot only.
Judged through /proc, an owner of another machine looked dead (its boot id is not this one), so a process
that reaches another host (the rebalance executor with ``peers``) rolled back or finished a change that
host was still carrying out.  Such an owner counts as alive until there is evidence that it is gone: its
host recorded another boot, or its lease (``updated_at``, renewed at every step and by a heartbeat during
one) is older than ``policies.intent_lease_seconds``.  The owners here are forged with the boot id the
other simulated host records, as a process of that machine would have it."""

from __future__ import annotations

import datetime as dt
import shutil
import time

import pytest

from gpuvirt.errors import ConflictError
from rebalance_support import LOCAL, FakeVirsh, _copy, _ctx, _domains, _one_device_each, _placements

pytestmark = pytest.mark.crash

REMOTE = "qemu+ssh://hb/system"
PID = 4242


def _two(root):
    url = f"sqlite:///{root / 'shared.db'}"
    return _ctx(root / "ha", db=url, host_id="ha"), _ctx(root / "hb", db=url, host_id="hb")


def _marker(ctx):
    with ctx.inventory.unit() as uow:
        return uow.host(ctx.settings.host_id).boot_marker


def _forge(ctx, intent_id, boot, *, age=None):
    """The intent's owner: process ``PID`` of the boot ``boot``, last heard from ``age`` seconds ago."""
    from gpuvirt.inventory.kinds import utcnow
    from gpuvirt.service import intent

    with ctx.inventory.unit(write=True) as uow:
        row = uow.intent(intent_id)
        row.owner, row.pid = f"{boot}:{PID}:987654", PID
        if age is not None:
            row.updated_at = utcnow() - dt.timedelta(seconds=age)
    with intent._ACTIVE_GUARD:
        intent._ACTIVE.discard(intent_id)       # not this process's: another machine's


def _open_on_hb(cb, age=None):
    """An attach of hb's board, opened by a process of hb's machine (still running there, unless aged)."""
    from gpuvirt.service import intent

    with cb.inventory.unit() as uow:
        addr = uow.gpus("hb")[0].address
    run = intent.Run.begin(cb, "attach", gpus=[addr], target={"vm": "vm-x"}, recovery="back")
    _forge(cb, run.id, _marker(cb), age=age)
    return run.id, addr


@pytest.fixture
def hosts(two_host_template):
    root = _copy(two_host_template)
    ca, cb = _two(root)
    yield root, ca, cb
    ca.close()
    cb.close()
    shutil.rmtree(root, ignore_errors=True)


def test_a_live_intent_of_another_machine_is_left_to_its_owner(hosts):
    """The reproducer: seen from ha, hb's intent owned by a live process of hb's machine was settled (rolled
    back) by recover() and did not stop require_settled()."""
    from gpuvirt.service import intent, rebalance_exec

    _root, ca, cb = hosts
    iid, addr = _open_on_hb(cb)
    with rebalance_exec.reach(ca, {"hb": cb}, None):
        assert intent.recover(cb, {addr}) == []
        with pytest.raises(ConflictError) as exc:
            intent.require_settled(cb, {addr})
    msg = str(exc.value)
    assert exc.value.exit_code == 5 and "\n" not in msg
    assert f"{addr}: an attach (intent {iid}) is in progress, run by process {PID} on the machine of host hb" in msg
    assert [r.id for r in intent.open_intents(cb)] == [iid]


def test_a_cross_host_move_is_refused_while_the_other_host_runs_a_change_there(hosts, monkeypatch):
    """The executor's own path: a move onto hb settles hb's unfinished intents first; one hb still carries out
    refuses the move, and nothing changes."""
    from gpuvirt.model.preflight import HostStack
    from gpuvirt.service import intent, rebalance, rebalance_exec

    _root, ca, cb = hosts
    fake = FakeVirsh()
    _domains(ca, fake, LOCAL)
    _domains(cb, fake, REMOTE)
    stack = HostStack(driver="550.127.05", os="rhel-9.4", kernel="5.14.0", qemu="8.2.0", libvirt="10.0.0")
    monkeypatch.setattr(rebalance, "_host_stack", lambda db, host: stack)
    before = _placements(ca, cluster=True)
    iid, addr = _open_on_hb(cb)
    with pytest.raises(ConflictError, match=rf"hb/{addr}|{addr}: an attach \(intent {iid}\) is in progress"):
        rebalance_exec.rebalance_and_execute(ca, "A10-24Q", cluster=True, runner=fake, peers={"hb": cb},
                                             policy=rebalance.make_policy(allow="live"))
    assert _placements(ca, cluster=True) == before
    assert [r.id for r in intent.open_intents(cb)] == [iid]
    _one_device_each(ca, fake, uris=(LOCAL,))
    assert [d["state"] for _u, d in fake.where("vm-b")] == ["running"]


def test_the_owners_host_booting_again_is_evidence_it_is_gone(hosts, cli):
    """hb rebooted and recorded its new boot (its boot unit's reconcile, a status): the owner is gone."""
    from gpuvirt.service import intent, rebalance_exec
    from gpuvirt.sim.control import open_sim, reboot

    root, ca, cb = hosts
    iid, addr = _open_on_hb(cb)
    old = _marker(cb)
    reboot(open_sim(root / "hb"))
    with rebalance_exec.reach(ca, {"hb": cb}, None):
        assert intent.recover(cb, {addr}) == []     # not recorded yet: no evidence
    r = cli("--sim", root / "hb", "--db", f"sqlite:///{root / 'shared.db'}", "--host-id", "hb", "status", "--json")
    assert r.exit_code == 0, r
    assert _marker(cb) != old
    with rebalance_exec.reach(ca, {"hb": cb}, None):
        [res] = intent.recover(cb, {addr})
    assert res["intent"] == iid and res["result"] == "back"
    assert not intent.open_intents(cb)


def test_an_expired_lease_is_evidence_it_is_gone(hosts):
    from gpuvirt.service import intent, rebalance_exec

    _root, ca, cb = hosts
    iid, addr = _open_on_hb(cb, age=200)
    assert cb.settings.policies["intent_lease_seconds"] == 300      # the default
    with rebalance_exec.reach(ca, {"hb": cb}, None):
        assert intent.recover(cb, {addr}) == []
        _forge(cb, iid, _marker(cb), age=301)
        [res] = intent.recover(cb, {addr})
    assert res["intent"] == iid and res["result"] == "back"


def test_an_intent_of_this_host_from_an_earlier_boot_is_settled_at_once(hosts):
    """The host this process runs as: another boot id is an earlier boot of this machine, lease or not."""
    from gpuvirt.service import intent

    _root, _ca, cb = hosts
    iid, addr = _open_on_hb(cb)
    [res] = intent.recover(cb, {addr})
    assert res["intent"] == iid and res["result"] == "back"


def test_status_names_the_owner_of_a_change_in_progress_on_another_machine(hosts):
    from gpuvirt.service import rebalance_exec, reconcile

    _root, ca, cb = hosts
    iid, addr = _open_on_hb(cb)
    with rebalance_exec.reach(ca, {"hb": cb}, None):
        st = reconcile.status(cb)
    [d] = [d for g in st["gpus"] if g["address"] == addr for d in g["drift"] if d["kind"] == "unfinished-attach"]
    assert d["action"].startswith(f"in progress, run by process {PID} on the machine of host hb"), d
    assert not st["in_sync"]


@pytest.mark.parametrize("value", [60, 0, "soon", 10 ** 9])
def test_a_lease_policy_out_of_range_is_one_line(cli, make_sim, value):
    sim = make_sim(["a10"])
    cfg = sim.root / "etc/gpuvirt/gpuvirt.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f"[policies]\nintent_lease_seconds = {value!r}\n".replace("'", '"'))
    r = cli("--sim", sim.root, "status")
    assert r.exit_code == 2 and "policies.intent_lease_seconds" in r.stderr and r.stderr.count("\n") == 1, r


def test_a_kill_during_a_long_handover_holds_the_move_until_the_lease_runs_out(hosts, monkeypatch):
    """A live move's ``virsh migrate`` outlasts several heartbeats, which keep the lease fresh; the executor is
    killed during it.  Seen from the other host, the move is in progress until the lease runs out, then it is
    rolled back: each VM holds exactly one device, on the host it started on."""
    from gpuvirt.model.preflight import HostStack
    from gpuvirt.service import intent, rebalance, rebalance_exec

    _root, ca, cb = hosts
    fake = FakeVirsh()
    _domains(ca, fake, LOCAL)
    _domains(cb, fake, REMOTE)
    stack = HostStack(driver="550.127.05", os="rhel-9.4", kernel="5.14.0", qemu="8.2.0", libvirt="10.0.0")
    monkeypatch.setattr(rebalance, "_host_stack", lambda db, host: stack)
    monkeypatch.setattr(intent, "HEARTBEAT_SECONDS", 0.05)
    before = _placements(ca, cluster=True)
    beats = []

    class Killed(BaseException):
        """The executor's process dies here."""

    def runner(argv):
        if argv[2] == "migrate":
            [row] = intent.open_intents(ca)
            start = row.updated_at
            for _ in range(40):                 # "virsh migrate" takes a while
                time.sleep(0.05)
                [row] = intent.open_intents(ca)
                if row.updated_at > start:
                    beats.append(row.updated_at)
                    if len(beats) >= 3:
                        break
            raise Killed
        return fake(argv)

    with pytest.raises(Killed):
        rebalance_exec.rebalance_and_execute(ca, "A10-24Q", cluster=True, runner=runner, peers={"hb": cb},
                                             policy=rebalance.make_policy(allow="live"))
    assert len(beats) >= 3 and beats == sorted(beats), beats      # the lease was renewed during the step
    [row] = intent.open_intents(ca)
    assert row.kind == "rebalance"
    _forge(ca, row.id, _marker(ca))             # the killed executor ran on ha's machine
    # hb's process, which reaches ha: the move is ha's business while its lease runs.  From hb, ha's libvirt
    # is qemu+ssh://ha/system and hb's own the system connection (the step recorded them as ha saw them)
    names = {"qemu+ssh://ha/system": LOCAL, LOCAL: REMOTE}

    def from_hb(argv):
        argv = list(argv)
        assert argv[1] in names, argv
        argv[1] = names[argv[1]]
        if "--desturi" in argv:
            argv[argv.index("--desturi") + 1] = names[argv[argv.index("--desturi") + 1]]
        return fake(argv)

    with rebalance_exec.reach(cb, {"ha": ca}, from_hb):
        with pytest.raises(ConflictError, match=rf"intent {row.id}\) is in progress, run by process {PID} on the "
                                                 "machine of host ha"):
            intent.require_settled(ca, None)
        ca.settings.policies["intent_lease_seconds"] = 0.5
        time.sleep(0.6)
        [res] = intent.recover(ca, None)
    assert res["intent"] == row.id and res["result"] == "back", res
    assert not intent.open_intents(ca)
    assert _placements(ca, cluster=True) == before
    _one_device_each(ca, fake, uris=(LOCAL,))
    _one_device_each(cb, fake, uris=(REMOTE,))
    for vm in ("vm-a", "vm-b"):
        [(_uri, d)] = fake.where(vm)
        assert d["state"] == "running"


@pytest.mark.pg
def test_on_postgresql_the_boot_and_the_lease_are_recorded_and_judged(pg_schema, make_sim, cli, monkeypatch):
    """The shared inventory the judgement is for: opening records the host's boot id, a heartbeat renews the
    lease during a step, and another machine's owner is left alone until the lease runs out."""
    from gpuvirt.service import intent, rebalance_exec

    from gpuvirt.sim.control import open_sim, reboot

    url, _admin, _schema = pg_schema
    sa_root = make_sim(["a10"], name="ha").root
    sb_root = make_sim(["a10"], name="hb", seed="other").root
    assert cli("--sim", sa_root, "--db", url, "db", "init").exit_code == 0
    for root, h in ((sa_root, "ha"), (sb_root, "hb")):
        r = cli("--sim", root, "--db", url, "--host-id", h, "status")
        assert r.exit_code == 0, r
    ca, cb = _ctx(sa_root, db=url, host_id="ha"), _ctx(sb_root, db=url, host_id="hb")
    try:
        reboot(open_sim(sb_root))               # a boot nothing recorded yet: opening the intent records it
        iid, addr = _open_on_hb(cb)
        assert _marker(cb) == (sb_root / "proc/sys/kernel/random/boot_id").read_text().strip()
        monkeypatch.setattr(intent, "HEARTBEAT_SECONDS", 0.05)
        run = intent.Run(cb, iid, "attach", [])
        [row] = intent.open_intents(cb)
        with run.heartbeat():
            time.sleep(0.3)
        [again] = intent.open_intents(cb)
        assert again.updated_at > row.updated_at
        with rebalance_exec.reach(ca, {"hb": cb}, None):
            assert intent.recover(cb, {addr}) == []
            with pytest.raises(ConflictError, match="in progress, run by process 4242 on the machine of host hb"):
                intent.require_settled(cb, {addr})
            _forge(cb, iid, _marker(cb), age=301)
            [res] = intent.recover(cb, {addr})
        assert res["result"] == "back" and not intent.open_intents(cb)
    finally:
        ca.close()
        cb.close()
