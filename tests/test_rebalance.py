"""gpuvirt rebalance (issue 13 items 4 and 5): plans on the simulator, the executor's libvirt calls through a
recording runner, plans replayed against what the simulator holds afterwards, and a kill or failure at every
executor step leaving each VM with exactly one device and the inventory in agreement with the host."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fake_libvirt import DOMAIN, FakeVirsh

LOCAL = "qemu:///system"


def ok(res):
    assert res.exit_code == 0, res
    return res


def _ctx(root, **kw):
    from gpuvirt.context import Context, resolve_settings

    return Context(resolve_settings(sim=str(root), **kw))


def _attach(cli, root, vm, vgpu, gpu, *extra):
    ok(cli("--sim", root, *extra, "attach", vm, "--vgpu", vgpu, "--gpu", gpu, "--format", "json"))


def _domains(ctx, fake, uri=LOCAL, state="running"):
    """Define every VM of the inventory in the fake libvirt with the device it holds."""
    from gpuvirt.vmm.libvirt import insert_hostdev, mdev_hostdev, pci_hostdev

    with ctx.inventory.unit() as uow:
        for n, a in enumerate(uow.allocations(host_id=ctx.settings.host_id)):
            i = a.instance
            if i.kind not in ("mdev", "vfio-vgpu"):
                continue
            dev = mdev_hostdev(i.mdev_uuid) if i.kind == "mdev" else pci_hostdev(i.parent)
            fake.add(uri, a.vm_name, insert_hostdev(DOMAIN.format(name=a.vm_name, uuid=f"6f1b3a52-3c1e-4b8e-9a55-"
                                                                  f"0c8f2d7a1e{n:02d}"), dev), state)


def _placements(ctx, cluster=False):
    """{vm: (gpu key, start, vGPU type)} as the host (and inventory) show it now."""
    from gpuvirt.service.rebalance import load_scope

    scope = load_scope(ctx, cluster=cluster)
    return {u.vm: (u.gpu, u.placed.start if u.placed else None, u.vgpu_type) for u in scope.cluster.units if u.vm}


def _replayed(scope, doc):
    """What the plan says the cluster holds after its moves (the planner's replay, step by step checked)."""
    from gpuvirt.model.moves import PlannedMove, Slot, replay

    moves = [PlannedMove(m["unit"], m["vm"], m["kind"], Slot(f"{m['from']['host']}/{m['from']['gpu']}",
                                                              m["from"]["host"], m["from"]["placement"]),
                         Slot(f"{m['to']['host']}/{m['to']['gpu']}", m["to"]["host"], m["to"]["placement"]),
                         None, None, m["data_mib"], None) for m in doc["moves"]]
    after = replay(scope.cluster, moves)
    return {u.vm: (u.gpu, u.placed.start if u.placed else None, u.vgpu_type) for u in after.units if u.vm}


def _one_device_each(ctx, fake, uris=(LOCAL,)):
    """Every VM's XML names exactly one hostdev, that device exists on the host, and the inventory gives the
    VM exactly that vGPU (rows = host objects, no intent left open)."""
    from gpuvirt.service import intent
    from gpuvirt.vmm.libvirt import parse_domain

    sim = ctx.sim.load()
    on_host = {m["uuid"] for m in sim["mdevs"]}
    with ctx.inventory.unit() as uow:
        rows = uow.instances(ctx.settings.host_id, kinds=["mdev"])
        held = {}
        for r in rows:
            if r.allocation is not None:
                held.setdefault(r.allocation.vm_name, []).append(r.mdev_uuid)
        assert sorted(r.mdev_uuid for r in rows) == sorted(on_host)
        assert all(r.state == "active" for r in rows)
    assert not intent.open_intents(ctx)
    for uri in uris:
        for name, d in fake.domains.get(uri, {}).items():
            devs = parse_domain(d["xml"]).hostdevs
            assert len(devs) == 1, (name, devs)
            assert devs[0].uuid in on_host
            assert held.get(name) == [devs[0].uuid], (name, held)
    return held


# --- two A10 boards, one 12Q VM on each ---------------------------------------------------------------------------
@pytest.fixture
def boards(cli, make_sim):
    sim = make_sim(["a10:2"])
    _attach(cli, sim.root, "vm-a", "A10-12Q", "0")
    _attach(cli, sim.root, "vm-b", "A10-12Q", "1")
    return sim.root


def test_plan_json_names_the_move_the_target_and_the_gpus_before_and_after(cli, boards):
    before = json.loads(ok(cli("--sim", boards, "status", "--json")).stdout)
    res = ok(cli("--sim", boards, "rebalance", "--for", "A10-24Q", "--allow", "live,cold", "--json"))
    doc = res.json()
    assert doc["feasible"] and doc["minimal"] and len(doc["moves"]) == 1
    [m] = doc["moves"]
    assert set(m) >= {"vm", "kind", "from", "to", "target_xml", "data_mib"}
    assert m["kind"] == "cold"                  # within one host a move is never live
    assert {m["from"]["gpu"], m["to"]["gpu"]} == {"0000:41:00.0", "0000:42:00.0"}
    assert m["data_mib"] == 12288               # the framebuffer (guest RAM unknown to gpuvirt here)
    assert doc["unlocks"] == {"host": m["from"]["host"], "gpu": m["from"]["gpu"], "placement": None}
    pics = {g["gpu"]: (g["before"], g["after"]) for g in doc["gpus"]}
    assert pics[m["from"]["gpu"]][1] == "[*]" and len(pics[m["to"]["gpu"]][1].split()) == 2
    # planning changes nothing
    assert json.loads(ok(cli("--sim", boards, "status", "--json")).stdout)["gpus"] == before["gpus"]
    # without cold moves nothing within one host can move: exit 4, and the reason says what would
    res = cli("--sim", boards, "rebalance", "--for", "A10-24Q")
    assert res.exit_code == 4 and "--allow live,cold" in res.stdout and "its own host" in res.stdout
    text = ok(cli("--sim", boards, "rebalance", "--for", "A10-24Q", "--allow", "cold")).stdout
    assert "cold move of vm-" in text and "->  [*]" in text


@pytest.mark.parametrize("args,code,msg", [
    (["--for", "A10-99Q"], 2, "no MIG profile or vGPU type"),
    (["--for", "bad/name"], 2, "invalid profile or vGPU type name"),
    (["--for", "A10-4Q", "--allow", "warp"], 2, "unknown move kind warp"),
    (["--for", "A10-4Q", "--allow", ","], 2, "at least one move kind"),
    (["--for", "A10-4Q", "--max-moves", "9"], 2, "--max-moves"),
    (["--for", "A10-4Q", "--max-moves", "-1"], 2, "--max-moves"),
    (["--for", "1g.5gb"], 3, "no GPU in scope offers 1g.5gb"),
    (["--for", "A10-4Q", "--execute", "--allow", "cold"], 2, "without --yes"),
])
def test_bad_input_is_one_line_with_its_exit_status_and_changes_nothing(cli, boards, args, code, msg):
    before = json.loads(ok(cli("--sim", boards, "status", "--json")).stdout)
    res = cli("--sim", boards, "rebalance", *args)
    assert res.exit_code == code, res
    assert msg in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert json.loads(ok(cli("--sim", boards, "status", "--json")).stdout)["gpus"] == before["gpus"]


def test_cold_move_on_one_host_runs_exactly_these_virsh_calls_and_matches_the_plan(boards):
    from gpuvirt.service import rebalance, rebalance_exec

    ctx = _ctx(boards)
    fake = FakeVirsh()
    _domains(ctx, fake)
    scope = rebalance.load_scope(ctx)
    policy = rebalance.make_policy(allow="cold")
    doc = rebalance_exec.rebalance_and_execute(ctx, "A10-24Q", policy=policy, runner=fake)
    [m] = doc["moves"]
    assert m["result"] == "done"
    vm = m["vm"]
    verbs = [c[2:] for c in fake.calls if c[2] not in ("dumpxml", "domstate")]
    assert verbs[0] == ["shutdown", vm] and verbs[1][0] == "define" and verbs[2] == ["start", vm]
    assert all(c[:2] == ["-c", LOCAL] for c in fake.calls)
    # the XML defined is the plan's target XML: the VM now names the mdev the plan chose
    assert fake.xml_files == [m["target_xml"]] and m["to"]["uuid"] in m["target_xml"]
    assert _placements(ctx) == _replayed(scope, doc)
    held = _one_device_each(ctx, fake)
    assert held[vm] == [m["to"]["uuid"]]
    assert fake.domains[LOCAL][vm]["state"] == "running"
    # the request fits now, without moves
    assert rebalance.rebalance(ctx, "A10-24Q", runner=fake)["moves"] == []
    ctx.close()


def test_target_xml_passes_virt_xml_validate_and_the_virsh_test_driver(boards, tmp_path):
    from gpuvirt.service import rebalance

    tool, virsh = shutil.which("virt-xml-validate"), shutil.which("virsh")
    if tool is None or shutil.which("xmllint") is None:
        pytest.skip("virt-xml-validate / xmllint not installed (apt-get install libvirt-clients libxml2-utils)")
    ctx = _ctx(boards)
    fake = FakeVirsh()
    _domains(ctx, fake)
    doc = rebalance.rebalance(ctx, "A10-24Q", allow="cold", runner=fake)
    path = tmp_path / "target.xml"
    path.write_text(doc["moves"][0]["target_xml"])
    res = subprocess.run([tool, str(path), "domain"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    if virsh is not None:       # libvirt's own parser, without a daemon (the built-in test driver)
        res = subprocess.run([virsh, "-c", "test:///default", f"define {path}"], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    ctx.close()


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


# --- MIG-backed vGPUs: the GPU instance moves with its vGPU ---------------------------------------------------------
@pytest.fixture
def mig_boards(cli, make_sim):
    sim = make_sim(["a100-40gb:2"], mig_enabled=True)
    _attach(cli, sim.root, "vm-a", "A100-3-20C", "0")
    _attach(cli, sim.root, "vm-b", "A100-3-20C", "1")
    return sim.root


def test_mig_backed_vgpu_moves_with_its_gpu_instance_to_the_planned_start(mig_boards):
    from gpuvirt.service import rebalance, rebalance_exec

    ctx = _ctx(mig_boards)
    fake = FakeVirsh()
    _domains(ctx, fake)
    scope = rebalance.load_scope(ctx)
    doc = rebalance_exec.rebalance_and_execute(ctx, "7g.40gb", policy=rebalance.make_policy(allow="live,cold"),
                                               runner=fake)
    [m] = doc["moves"]
    assert m["result"] == "done" and m["kind"] == "cold" and m["to"]["placement"] is not None
    assert "MIG-backed" in m["preflight"] or "unknown" in m["preflight"]
    assert _placements(ctx) == _replayed(scope, doc)
    _one_device_each(ctx, fake)
    sim = ctx.sim.load()
    gis = {i: sorted((g["profile_id"], g["start"]) for g in d["mig"]["gpu_instances"])
           for i, d in enumerate(sim["devices"])}
    assert sorted(len(v) for v in gis.values()) == [0, 2]       # one GPU emptied for the 7g.40gb
    assert rebalance.rebalance(ctx, "7g.40gb", runner=fake)["moves"] == []
    ctx.close()


# --- two hosts of one shared inventory: a live move --------------------------------------------------------------
@pytest.fixture
def two_hosts(cli, make_sim, tmp_path):
    import os

    url = os.environ.get("GPUVIRT_TEST_PG_URL") or f"sqlite:///{tmp_path / 'shared.db'}"
    a = make_sim(["a10"], name="ha")
    b = make_sim(["a10"], name="hb")
    ok(cli("--sim", a.root, "--db", url, "--host-id", "ha", "db", "init"))
    _attach(cli, a.root, "vm-a", "A10-12Q", "0", "--db", url, "--host-id", "ha")
    _attach(cli, b.root, "vm-b", "A10-12Q", "0", "--db", url, "--host-id", "hb")
    return a.root, b.root, url


def _full_stack(db, host):
    from gpuvirt.model.preflight import HostStack

    return HostStack(driver="550.127.05", os="rhel-9.4", kernel="5.14.0", qemu="8.2.0", libvirt="10.0.0")


def test_live_move_between_two_hosts_is_virsh_migrate_live_with_the_target_xml(two_hosts, monkeypatch):
    from gpuvirt.service import rebalance, rebalance_exec

    ra, rb, url = two_hosts
    monkeypatch.setattr(rebalance, "_host_stack", _full_stack)
    ca, cb = _ctx(ra, db=url, host_id="ha"), _ctx(rb, db=url, host_id="hb")
    fake = FakeVirsh()
    _domains(ca, fake, LOCAL)
    _domains(cb, fake, "qemu+ssh://hb/system")
    scope = rebalance.load_scope(ca, cluster=True)
    doc = rebalance_exec.rebalance_and_execute(ca, "A10-24Q", cluster=True, runner=fake, peers={"hb": cb},
                                               policy=rebalance.make_policy(allow="live"))
    [m] = doc["moves"]
    assert m["kind"] == "live" and m["result"] == "done"
    assert m["preflight"] == "live migration allowed"
    src_uri = LOCAL if m["from"]["host"] == "ha" else "qemu+ssh://hb/system"
    dst_uri = LOCAL if m["to"]["host"] == "ha" else "qemu+ssh://hb/system"
    [mig] = [c for c in fake.calls if c[2] == "migrate"]
    assert mig[:2] == ["-c", src_uri]
    assert mig[2:7] == ["migrate", "--live", "--persistent", "--undefinesource", "--xml"]
    assert mig[8:] == [m["vm"], dst_uri]
    assert not [c for c in fake.calls if c[2] in ("shutdown", "start", "define")]
    assert fake.xml_files == [m["target_xml"]]
    assert m["vm"] in fake.domains[dst_uri] and m["vm"] not in fake.domains[src_uri]
    assert _placements(ca, cluster=True) == _replayed(scope, doc)
    for c in (ca, cb):
        _one_device_each(c, FakeVirsh())        # rows = host objects on both hosts, no intent open
    held = dict(_allocs(ca))
    assert held[m["vm"]] == m["to"]["host"]
    ca.close()
    cb.close()


def _allocs(ctx):
    with ctx.inventory.unit() as uow:
        return [(a.vm_name, a.instance.host_id) for a in uow.allocations()]


def test_a_cluster_plan_needing_an_unreachable_host_is_refused_before_anything_changes(cli, two_hosts):
    ra, rb, url = two_hosts
    args = ("--sim", ra, "--db", url, "--host-id", "ha")
    before = json.loads(ok(cli(*args, "status", "--json")).stdout)
    res = cli(*args, "rebalance", "--for", "A10-24Q", "--cluster", "--allow", "cold", "--execute", "--yes")
    assert res.exit_code == 5 and "cannot change" in res.stderr, res
    assert json.loads(ok(cli(*args, "status", "--json")).stdout)["gpus"] == before["gpus"]
    plan = ok(cli(*args, "rebalance", "--for", "A10-24Q", "--cluster", "--allow", "cold", "--json")).json()
    assert plan["feasible"] and plan["scope"]["hosts"] == ["ha", "hb"]
    assert plan["moves"][0]["from"]["host"] != plan["moves"][0]["to"]["host"]


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


def _copy(root):
    dst = Path(tempfile.mkdtemp(prefix="rebalance-crash-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    shutil.rmtree(dst)
    shutil.copytree(root, dst, symlinks=True)
    return dst


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


# --- attach --allow-moves -------------------------------------------------------------------------------------------
def test_attach_with_moves_makes_room_then_attaches(cli, boards):
    from gpuvirt.errors import CapacityError
    from gpuvirt.service import rebalance_exec

    res = cli("--sim", boards, "attach", "vm-c", "--vgpu", "A10-24Q")
    assert res.exit_code == 4 and "no capacity" in res.stderr
    ctx = _ctx(boards)
    fake = FakeVirsh()
    _domains(ctx, fake)
    before = _placements(ctx)
    # live only: nothing within one host can move live, so the refusal stands and says why
    with pytest.raises(CapacityError, match="moving VMs does not help.*--allow live,cold"):
        rebalance_exec.attach_with_moves(ctx, "vm-c", allow="live", runner=fake, vgpu="A10-24Q")
    # the budget is the operator's: none allowed, none made
    ctx.settings.policies["rebalance_max_moves"] = 0
    with pytest.raises(CapacityError, match="allows no moves"):
        rebalance_exec.attach_with_moves(ctx, "vm-c", allow="cold", runner=fake, vgpu="A10-24Q")
    assert _placements(ctx) == before and not [c for c in fake.calls if c[2] in ("define", "migrate")]
    ctx.settings.policies["rebalance_max_moves"] = 2
    [h] = rebalance_exec.attach_with_moves(ctx, "vm-c", allow="cold", runner=fake, vgpu="A10-24Q")
    now = _placements(ctx)
    assert now["vm-a"][0] == now["vm-b"][0] != now["vm-c"][0]       # the two 12Q share a board now
    assert len([c for c in fake.calls if c[2] == "define"]) == 1
    held = _one_device_each(ctx, fake)
    assert held["vm-c"] == [h.uuid]
    ctx.close()


@pytest.mark.parametrize("args,msg", [
    (["--vf"], "makes room for a --vgpu or --mig request"),
    (["--vgpu", "A10-24Q", "--count", "2"], "one device at a time"),
    (["--mig", "1g.5gb", "--format", "cdi"], "does not apply to --format cdi"),
    (["--vgpu", "A10-24Q", "--allow-moves", "warp"], "unknown move kind warp"),
])
def test_attach_allow_moves_bad_input(cli, boards, args, msg):
    extra = [] if "--allow-moves" in args else ["--allow-moves", "cold"]
    res = cli("--sim", boards, "attach", "vm-c", *args, *extra)
    assert res.exit_code == 2 and msg in res.stderr, res


def test_vendor_vfio_target_xml_names_the_vf_chosen_when_the_vgpu_was_created(cli, make_sim):
    from gpuvirt.service import rebalance, rebalance_exec

    sim = make_sim(["l40s:2"])
    _attach(cli, sim.root, "vm-a", "L40S-24Q", "0")
    _attach(cli, sim.root, "vm-b", "L40S-24Q", "1")
    ctx = _ctx(sim.root)
    fake = FakeVirsh()
    _domains(ctx, fake)
    scope = rebalance.load_scope(ctx)
    doc = rebalance_exec.rebalance_and_execute(ctx, "L40S-48Q", policy=rebalance.make_policy(allow="cold"),
                                               runner=fake)
    [m] = doc["moves"]
    assert m["target_xml"] is None and "chosen when its vGPU is created" in m["target_xml_error"]
    assert _placements(ctx) == _replayed(scope, doc)
    from gpuvirt.vmm.libvirt import parse_domain

    [xml] = fake.xml_files
    [dev] = parse_domain(xml).hostdevs
    with ctx.inventory.unit() as uow:
        [a] = [a for a in uow.allocations(vm_name=m["vm"])]
        assert dev.kind == "pci" and dev.address == a.instance.parent
        assert a.instance.gpu.address == m["to"]["gpu"]
    ctx.close()


@pytest.mark.parametrize("value", ["9", "-1", "true", "'2'"])
def test_rebalance_max_moves_policy_is_bounded(cli, boards, tmp_path, value):
    cfg = tmp_path / "gpuvirt.toml"
    cfg.write_text(f"[policies]\nrebalance_max_moves = {value}\n")
    res = cli("--sim", boards, "--config", cfg, "attach", "vm-c", "--vgpu", "A10-24Q", "--allow-moves", "cold")
    assert res.exit_code == 2 and "policies.rebalance_max_moves" in res.stderr, res


def test_a_free_instance_of_the_request_needs_no_move(cli, make_sim):
    sim = make_sim(["a10:2"])
    root = sim.root
    ok(cli("--sim", root, "create-profile", "one24", "--vgpu", "A10-24Q=1", "--model", "a10"))
    ok(cli("--sim", root, "apply", "one24", "--gpu", "1", "--yes"))
    _attach(cli, root, "vm-a", "A10-12Q", "0")
    doc = ok(cli("--sim", root, "rebalance", "--for", "A10-24Q", "--allow", "cold", "--json")).json()
    assert doc["feasible"] and doc["moves"] == [] and "free already" in doc["reason"]
    assert doc["unlocks"]["gpu"] == "0000:42:00.0"
    # the free instance does not move for anything else either (apply owns the profile's layout)
    res = cli("--sim", root, "rebalance", "--for", "A10-12Q", "--allow", "cold", "--json")
    assert res.exit_code == 0 and res.json()["moves"] == []      # fits beside vm-a without moves


def test_transient_devices_are_never_moved(cli, make_sim):
    sim = make_sim(["a10:2"])
    _attach(cli, sim.root, "vm-a", "A10-12Q", "0", )
    ok(cli("--sim", sim.root, "attach", "vm-b", "--vgpu", "A10-12Q", "--gpu", "1", "--transient"))
    doc = ok(cli("--sim", sim.root, "rebalance", "--for", "A10-24Q", "--allow", "cold", "--json")).json()
    assert [m["vm"] for m in doc["moves"]] == ["vm-a"]         # only the persistent one moves
    ok(cli("--sim", sim.root, "detach", "vm-a"))
    ok(cli("--sim", sim.root, "attach", "vm-a", "--vgpu", "A10-12Q", "--gpu", "0", "--transient"))
    res = cli("--sim", sim.root, "rebalance", "--for", "A10-24Q", "--allow", "cold", "--json")
    assert res.exit_code == 4 and not res.json()["feasible"]
