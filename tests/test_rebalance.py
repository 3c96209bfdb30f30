"""gpuvirt rebalance and attach --allow-moves (issue 13 items 4 and 5): plans on the simulator, bad input, the
executor's libvirt calls through a recording runner, target XML validated, and plans replayed against what the
simulator holds afterwards (kills and failures at every executor step: tests/test_crash_rebalance.py)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from rebalance_support import (LOCAL, FakeVirsh, _allocs, _attach, _ctx, _domains, _one_device_each, _placements,
                               _replayed, ok)


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
def shared_url(tmp_path):
    """One inventory for two hosts: a fresh schema of the PostgreSQL server in GPUVIRT_TEST_PG_URL when set,
    else one SQLite file."""
    import os
    import uuid

    pg = os.environ.get("GPUVIRT_TEST_PG_URL")
    if not pg:
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    from sqlalchemy import create_engine, text

    schema = f"gpuvirt_rb_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001
        admin.dispose()
        pytest.skip(f"PostgreSQL at GPUVIRT_TEST_PG_URL is not reachable: {str(exc).splitlines()[0]}")
    try:
        yield f"{pg}{'&' if '?' in pg else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def two_hosts(cli, make_sim, shared_url):
    url = shared_url
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
