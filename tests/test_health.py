"""GPU health (issue 14, item 1): XIDs through the simulated NVML event API, classified, attributed to the MIG
instance and the consumer holding it, kept out of capacity, and recovered after a reset or a quiet period."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuvirt.context import Context, resolve_settings
from gpuvirt.sim.control import inject_xid

GPUVIRT = str(Path(sys.executable).with_name("gpuvirt"))
U1 = "6a1f0c2e-0000-4000-8000-000000000001"
GPU0, GPU1 = "0000:41:00.0", "0000:42:00.0"


def context(sim, host_id="h1", **policies):
    s = resolve_settings(sim=str(sim.root), host_id=host_id, env={})
    s.policies.update(policies)
    return Context(s)


def ok(res, code=0):
    assert res.exit_code == code, res
    return res


def gpu_of(doc, address):
    return next(e for h in doc["hosts"] for e in h["gpus"] if e["gpu"] == address)


def prom_samples(text):
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def rows(ctx):
    with ctx.inventory.unit() as uow:
        insts = uow.instances(ctx.settings.host_id)
        for i in insts:
            i.gpu, i.allocation      # loaded while the session is open; read after it
        return {i.id: i for i in insts}


@pytest.fixture
def mig_host(make_sim, cli):
    """Two A100s in MIG mode; GPU 0 carries two 3g.20gb GPU instances, vm1 (tenant acme) holds one of them
    through a MIG-backed vGPU; the other is free."""
    sim = make_sim(["a100-40gb:2"], mig_enabled=True)
    r = sim.root
    ok(cli("--sim", r, "--host-id", "h1", "create-profile", "two", "--mig", "3g.20gb=2", "--model", "a100-40gb"))
    ok(cli("--sim", r, "--host-id", "h1", "apply", "two", "--gpu", "0", "--yes"))
    ok(cli("--sim", r, "--host-id", "h1", "attach", "vm1", "--mig", "3g.20gb", "--tenant", "acme",
           "--vm-uuid", U1, "--gpu", "0", "--format", "json"))
    return sim


def gi_rows(ctx):
    """(GI row held by vm1, free GI row, vm1's vGPU row) on GPU 0."""
    insts = rows(ctx)
    vgpu = next(i for i in insts.values() if i.kind == "mdev")
    held = insts[vgpu.backing_instance_id]
    free = next(i for i in insts.values() if i.kind == "mig" and i.id != held.id and i.gpu.address == GPU0)
    return held, free, vgpu


def monitor(ctx):
    from gpuvirt.service.health import Monitor

    seen = []
    mon = Monitor(ctx, report=seen.append)
    sub = mon.start()
    assert sub["unavailable"] is None and set(sub["gpus"]) == {GPU0, GPU1}, sub
    return mon, seen


# --- attribution and capacity -----------------------------------------------------------------------------------------
def test_fatal_xid_on_a_mig_instance_is_attributed_to_its_vm_and_leaves_capacity(mig_host, cli):
    sim = mig_host
    with context(sim) as ctx:
        held, free, vgpu = gi_rows(ctx)
        mon, _ = monitor(ctx)
        try:
            inject_xid(sim, "0", 94, gi=held.gi_id, ci=held.ci_id)
            out = mon.poll()
        finally:
            mon.close()
        assert len(out) == 1
        o = out[0]
        assert (o["gpu"], o["xid"], o["gi"], o["severity"], o["scope"], o["instance"]) == \
            (GPU0, 94, held.gi_id, "fatal", "instance", held.id)
        assert [(c["vm"], c["vm_uuid"], c["tenant"], c["instance"], c["via"]) for c in o["consumers"]] == \
            [("vm1", U1, "acme", vgpu.id, "vgpu")]
        now = rows(ctx)
        assert now[held.id].health == "unhealthy" and now[vgpu.id].health == "unhealthy"
        assert now[free.id].health == "healthy"
        with ctx.inventory.unit() as uow:
            assert uow.gpu_by_address("h1", GPU0).health == "healthy"     # the GPU itself is fine
    # the report: the instance is unhealthy, the other GPU instance is still free and placeable
    doc = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "json")).json()
    e = gpu_of(doc, GPU0)
    assert e["health"] == {"state": "healthy"} and e["instances"]["unhealthy"] == sorted([held.id, vgpu.id])
    assert {r["instance"] for r in e["layout"]} == {held.id, free.id} and e["free_instances"] == {"3g.20gb": 1}
    prom = prom_samples(ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "prometheus")).stdout)
    base = {"host": "h1", "gpu": GPU0, "profile": "3g.20gb"}
    assert prom[("gpuvirt_mig_instance_healthy", tuple(sorted({**base, "instance": str(held.id),
                                                                "start": str(held.placement_start)}.items())))] == 0
    assert prom[("gpuvirt_mig_instance_healthy", tuple(sorted({**base, "instance": str(free.id),
                                                                "start": str(free.placement_start)}.items())))] == 1
    info = {**base, "instance": str(held.id), "start": str(held.placement_start), "state": "in_use",
            "consumer": "vm1", "tenant": "acme"}
    assert prom[("gpuvirt_mig_instance_info", tuple(sorted(info.items())))] == 1
    assert prom[("gpuvirt_instances_unhealthy", (("gpu", GPU0), ("host", "h1")))] == 2
    # the history names the VM
    h = ok(cli("--sim", sim.root, "--host-id", "h1", "health", "--json")).json()
    assert not h["healthy"]
    assert {(i["instance"], i["vm"], i["tenant"]) for i in h["instances"]} == {(held.id, "vm1", "acme"),
                                                                               (vgpu.id, "vm1", "acme")}
    ev = h["events"][0]
    assert (ev["kind"], ev["xid"], ev["gi"], ev["vm"], ev["vm_uuid"], ev["tenant"], ev["instance"]) == \
        ("xid", 94, held.gi_id, "vm1", U1, "acme", held.id)
    # a new VM still gets the healthy GPU instance of GPU 0
    ok(cli("--sim", sim.root, "--host-id", "h1", "attach", "vm2", "--mig", "3g.20gb", "--gpu", "0"))
    with context(sim) as ctx:
        vm2 = [i for i in rows(ctx).values() if i.allocation and i.allocation.vm_name == "vm2" and i.kind == "mig"]
        assert [i.id for i in vm2] == [free.id]


def test_a_free_unhealthy_gpu_instance_keeps_new_vgpus_off_its_gpu(mig_host, cli):
    sim = mig_host
    with context(sim) as ctx:
        _, free, _ = gi_rows(ctx)
        mon, _ = monitor(ctx)
        try:
            inject_xid(sim, GPU0, 1031)                 # an XID on no list: fatal; no GI id: the whole GPU
            inject_xid(sim, "0", 94, gi=free.gi_id)
            out = mon.poll()
        finally:
            mon.close()
        assert [o["scope"] for o in out] == ["gpu", "instance"]
        # the GPU-wide one made GPU 0 unhealthy as a whole; clear it so only the instance is left
        from gpuvirt.service.health import clear

        assert [c["gpu"] for c in clear(ctx, gpu=GPU0)["cleared"]] == [GPU0]
    doc = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "json")).json()
    e = gpu_of(doc, GPU0)
    assert e["health"]["state"] == "healthy" and e["free_instances"] == {}
    # the driver picks the GPU instance a new MIG-backed vGPU lands on: GPU 0 takes none while the broken one
    # is free, so the attach goes to GPU 1 (a new GPU instance there)
    r = ok(cli("--sim", sim.root, "--host-id", "h1", "attach", "vm2", "--mig", "3g.20gb", "--format", "json"))
    assert r.exit_code == 0
    refused = cli("--sim", sim.root, "--host-id", "h1", "attach", "vm3", "--mig", "3g.20gb", "--gpu", "0")
    assert refused.exit_code == 4 and refused.stderr.startswith("gpuvirt: error: "), refused
    with context(sim) as ctx:
        vm2 = next(i for i in rows(ctx).values() if i.allocation and i.allocation.vm_name == "vm2")
        assert vm2.gpu.address == GPU1


def test_xid_on_an_instance_held_directly_names_that_consumer(mig_host):
    """Attribution goes through the allocation row, so any consumer an allocation records is named (here a
    GPU instance allocated as such, the way a container consumer holds one)."""
    sim = mig_host
    with context(sim) as ctx:
        _, free, _ = gi_rows(ctx)
        with ctx.inventory.unit(write=True) as uow:
            uow.allocate(uow.instance(free.id), vm_name="train1", vm_uuid=None, tenant="beta", persistent=True)
        mon, _ = monitor(ctx)
        try:
            inject_xid(sim, "0", 94, gi=free.gi_id)
            (o,) = mon.poll()
        finally:
            mon.close()
        assert [(c["vm"], c["tenant"], c["instance"], c["via"]) for c in o["consumers"]] == \
            [("train1", "beta", free.id, "direct")]


def test_non_fatal_xid_is_recorded_and_changes_nothing(mig_host, cli):
    sim = mig_host
    before = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "json")).json()
    with context(sim) as ctx:
        held, _, _ = gi_rows(ctx)
        mon, _ = monitor(ctx)
        try:
            for code in (13, 31, 43, 45, 68, 109):
                inject_xid(sim, "0", code, gi=held.gi_id)
            out = mon.poll()
        finally:
            mon.close()
        assert [o["severity"] for o in out] == ["non-fatal"] * 6 and not any(o["changed"] for o in out)
        assert all(i.health == "healthy" for i in rows(ctx).values())
    after = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "json")).json()
    for doc in (before, after):
        for h in doc["hosts"]:
            h.pop("age_seconds"), h.pop("last_seen_at")
        doc.pop("generated_at")
    assert before["hosts"] == after["hosts"] and before["totals"] == after["totals"]
    h = ok(cli("--sim", sim.root, "--host-id", "h1", "health", "--json")).json()
    assert h["healthy"] and [e["xid"] for e in h["events"]] == [109, 68, 45, 43, 31, 13]
    assert {e["severity"] for e in h["events"]} == {"non-fatal"} and h["events"][0]["vm"] == "vm1"


def test_classification_is_configurable(mig_host, cli):
    sim = mig_host
    with context(sim, health_nonfatal_xids=[94], health_reset_xids=[31]) as ctx:
        held, _, _ = gi_rows(ctx)
        mon, _ = monitor(ctx)
        try:
            inject_xid(sim, "0", 94, gi=held.gi_id)
            inject_xid(sim, "0", 31, gi=held.gi_id)
            out = mon.poll()
        finally:
            mon.close()
        assert [(o["severity"], o["scope"]) for o in out] == [("non-fatal", "instance"), ("reset", "instance")]
        with ctx.inventory.unit() as uow:
            g = uow.gpu_by_address("h1", GPU0)
            assert g.health == "unhealthy" and g.health_needs_reset       # reset class: the whole GPU
    cfg = sim.root / "etc/gpuvirt/gpuvirt.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    for bad in ('health_nonfatal_xids = [0]', 'health_reset_xids = "79"', 'health_quiet_seconds = -1',
                'health_history_max = 0', 'health_nonfatal_xids = [true]'):
        cfg.write_text(f"[policies]\n{bad}\n")
        r = cli("--sim", sim.root, "health")
        assert r.exit_code == 2 and r.stderr.startswith("gpuvirt: error: config file") and \
            r.stderr.count("\n") == 1, (bad, r)


# --- a reset class XID, capacity, and recovery after a reset ----------------------------------------------------------
def test_reset_class_xid_takes_the_gpu_out_until_a_reset(mig_host, cli):
    sim = mig_host
    with context(sim) as ctx:
        mon, _ = monitor(ctx)
        try:
            inject_xid(sim, GPU0, 79)
            (o,) = mon.poll()
        finally:
            mon.close()
        assert (o["severity"], o["scope"]) == ("reset", "gpu")
        assert {c["vm"] for c in o["consumers"]} == {"vm1"}
    doc = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "json")).json()
    e = gpu_of(doc, GPU0)
    assert e["health"]["state"] == "unhealthy" and e["health"]["needs_reset"] and e["health"]["recovers_at"] is None
    assert set(e["placeable_now"].values()) == {0} and e["free_instances"] == {}
    assert all(t["available"] == 0 for t in e["vgpu_types"].values())
    assert gpu_of(doc, GPU1)["placeable_now"]["7g.40gb"] == 1
    prom = prom_samples(ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "prometheus")).stdout)
    assert prom[("gpuvirt_gpu_healthy", (("gpu", GPU0), ("host", "h1"), ("model", "a100-40gb")))] == 0
    assert prom[("gpuvirt_gpu_health_needs_reset", (("gpu", GPU0), ("host", "h1")))] == 1
    assert prom[("gpuvirt_gpu_healthy", (("gpu", GPU1), ("host", "h1"), ("model", "a100-40gb")))] == 1
    fit = cli("--sim", sim.root, "--host-id", "h1", "report", "--fit", "3g.20gb=3", "--format", "json")
    assert fit.exit_code == 4 and fit.json()["fit"]["requests"][0]["placed"] == 2    # GPU 1 only
    r = cli("--sim", sim.root, "--host-id", "h1", "attach", "vm2", "--mig", "3g.20gb", "--gpu", "0")
    assert r.exit_code == 4, r
    # defrag planning does not count on the broken GPU either
    r = cli("--sim", sim.root, "--host-id", "h1", "plan", "--defrag", "--for", "7g.40gb", "--gpu", "0")
    assert r.exit_code == 4 and "unhealthy" in r.stderr, r
    # a quiet period does not end a reset-class spell
    with context(sim) as ctx:
        from gpuvirt.service.health import current, utcnow

        assert GPU0 in current(ctx, now=utcnow() + dt.timedelta(days=30)).gpus
    # the reset is refused while a VM runs on the GPU, then done, and the instances are brought back
    with context(sim) as ctx:
        with ctx.inventory.unit(write=True) as uow:
            for a in uow.allocations(vm_name="vm1"):
                a.vm_state = "running"
    r = cli("--sim", sim.root, "--host-id", "h1", "health", "reset", "0", "--yes")
    assert r.exit_code == 5 and "vm1" in r.stderr, r
    with context(sim) as ctx:
        with ctx.inventory.unit(write=True) as uow:
            for a in uow.allocations(vm_name="vm1"):
                a.vm_state = None
    assert cli("--sim", sim.root, "--host-id", "h1", "health", "reset", "0").exit_code == 2   # needs --yes
    r = ok(cli("--sim", sim.root, "--host-id", "h1", "health", "reset", "0", "--yes", "--json"))
    doc = r.json()
    assert doc["reset"][0]["gpu"] == GPU0 and doc["reset"][0]["recovered"][0]["kind"] == "gpu"
    assert doc["restored"]["failed"] == []
    h = ok(cli("--sim", sim.root, "--host-id", "h1", "health", "--json")).json()
    assert h["healthy"] and h["events"][0]["kind"] == "reset"
    doc = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "json")).json()
    e = gpu_of(doc, GPU0)
    assert e["health"] == {"state": "healthy"} and e["instances"]["missing"] == 0 and len(e["layout"]) == 2
    assert e["free_instances"] == {"3g.20gb": 1}


def test_recovery_after_a_reset_by_apply(make_sim, cli, monkeypatch):
    """apply resets a GPU to switch MIG mode when allowed: that reset ends an unhealthy spell too."""
    from gpuvirt.host.nvml import NvmlSession
    from gpuvirt.service.apply import apply as svc_apply
    from gpuvirt.sim.control import set_client

    from gpuvirt.sim.control import configure

    sim = make_sim(["a100-40gb"], mig_enabled=False)
    # the reset apply writes is to activate the pending MIG mode: model the reset that does (docs/
    # simulator-fidelity.md choice 8; the default function reset leaves the mode pending)
    configure(sim, reset="gpu-reset")
    ok(cli("--sim", sim.root, "--host-id", "h1", "create-profile", "m", "--mig", "7g.40gb=1", "--model", "a100-40gb"))
    original = NvmlSession.set_mig_mode

    def client_leaves_after_the_request(self, index, enabled):
        # a process holds the GPU while the mode is requested (Ampere: it waits for a reset) and is gone by
        # the time apply resets the GPU
        set_client(sim, "0", "nvidia-persistenced", True)
        try:
            return original(self, index, enabled)
        finally:
            set_client(sim, "0", "nvidia-persistenced", False)

    with context(sim) as ctx:
        mon, _ = monitor_one(ctx)
        try:
            inject_xid(sim, "0", 79)
            assert mon.poll()[0]["severity"] == "reset"
        finally:
            mon.close()
        monkeypatch.setattr(NvmlSession, "set_mig_mode", client_leaves_after_the_request)
        svc_apply(ctx, "m", "0", reset_gpu=True)
        monkeypatch.setattr(NvmlSession, "set_mig_mode", original)
    h = ok(cli("--sim", sim.root, "--host-id", "h1", "health", "--json")).json()
    assert h["healthy"], h
    assert any(e["kind"] == "reset" and "apply" in e["detail"]["how"] for e in h["events"])


def monitor_one(ctx):
    from gpuvirt.service.health import Monitor

    seen = []
    mon = Monitor(ctx, report=seen.append)
    assert mon.start()["unavailable"] is None
    return mon, seen


# --- recovery after a quiet period ----------------------------------------------------------------------------------
def test_fatal_xid_recovers_after_the_quiet_period(mig_host, cli):
    sim = mig_host
    from gpuvirt.service.health import current, utcnow

    with context(sim, health_quiet_seconds=600) as ctx:
        held, _, vgpu = gi_rows(ctx)
        mon, _ = monitor(ctx)
        try:
            inject_xid(sim, "0", 94, gi=held.gi_id)
            inject_xid(sim, GPU1, 94)                    # GPU-wide, fatal: the whole GPU 1
            mon.poll()
        finally:
            mon.close()
        st = current(ctx)
        assert set(st.gpus) == {GPU1} and set(st.instances) == {held.id, vgpu.id}
        later = utcnow() + dt.timedelta(seconds=601)
        st = current(ctx, now=later)
        assert not st.gpus and not st.instances
        assert {(r["kind"], r["gpu"], r["instance"]) for r in st.recovered} == \
            {("gpu", GPU1, None), ("instance", GPU0, held.id), ("instance", GPU0, vgpu.id)}
        assert all(i.health == "healthy" for i in rows(ctx).values())
        with ctx.inventory.unit() as uow:
            kinds = [e.kind for e in uow.health_events(host_id="h1")]
        assert kinds.count("recovered") == 3
    # readers count a spell that ran out as over before anyone writes the recovery down
    with context(sim, health_quiet_seconds=1) as ctx:
        mon, _ = monitor(ctx)
        try:
            inject_xid(sim, GPU1, 94)
            mon.poll()
        finally:
            mon.close()
    cfg = sim.root / "etc/gpuvirt/gpuvirt.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("[policies]\nhealth_quiet_seconds = 1\n")
    assert gpu_of(ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "json")).json(),
                  GPU1)["health"]["state"] == "unhealthy"
    time.sleep(1.2)
    doc = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "json")).json()
    assert gpu_of(doc, GPU1)["health"] == {"state": "healthy"}
    cfg.write_text("[policies]\nhealth_quiet_seconds = 0\n")       # 0: never by time
    with context(sim, health_quiet_seconds=0) as ctx:
        mon, _ = monitor(ctx)
        try:
            inject_xid(sim, GPU1, 94)
            mon.poll()
        finally:
            mon.close()
        assert GPU1 in current(ctx, now=utcnow() + dt.timedelta(days=3650)).gpus


def test_operator_clear_and_history_is_bounded(mig_host, cli):
    sim = mig_host
    with context(sim, health_history_max=5) as ctx:
        mon, _ = monitor(ctx)
        try:
            for _ in range(8):
                inject_xid(sim, GPU1, 43)
            inject_xid(sim, GPU1, 94)
            out = mon.poll()
        finally:
            mon.close()
        assert len(out) == 9
        with ctx.inventory.unit() as uow:
            evs = uow.health_events(host_id="h1", limit=100)
        assert len(evs) == 5 and evs[0].xid == 94
    r = ok(cli("--sim", sim.root, "--host-id", "h1", "health", "clear", "1", "--json"))
    assert [c["gpu"] for c in r.json()["cleared"]] == [GPU1]
    assert ok(cli("--sim", sim.root, "--host-id", "h1", "health", "--json")).json()["healthy"]
    bad = cli("--sim", sim.root, "--host-id", "h1", "health", "clear")
    assert bad.exit_code == 2 and bad.stderr.startswith("gpuvirt: error: ")
    bad = cli("--sim", sim.root, "--host-id", "h1", "health", "clear", "7")
    assert bad.exit_code == 3, bad
    assert cli("--sim", sim.root, "--host-id", "h1", "health", "--limit", "0").exit_code == 2


# --- watch --once as a real process, the XID from another process ----------------------------------------------------
def _wait_for_event_set(sim, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads((sim.root / ".gpuvirt-sim/state.json").read_text())
        if any(s.get("registered") for s in state.get("event_sets", [])):
            return
        time.sleep(0.05)
    raise AssertionError("watch never registered for NVML events")


def test_watch_once_end_to_end_with_an_xid_from_another_process(mig_host, gpuvirt_proc):
    sim = mig_host
    with context(sim) as ctx:
        held, _, _ = gi_rows(ctx)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUVIRT_")}
    watcher = subprocess.Popen([GPUVIRT, "--sim", str(sim.root), "--host-id", "h1", "watch", "--once", "--wait", "60",
                                "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_event_set(sim)
        r = gpuvirt_proc("sim", "xid", sim.root, "--gpu", "0", "--xid", "94", "--gi", str(held.gi_id), "--json")
        assert r.exit_code == 0 and r.json()["delivered_to"] == 1, r
        out, err = watcher.communicate(timeout=90)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, (out, err)
    doc = json.loads(out)
    assert doc["nvml"]["gpus"] == [GPU0, GPU1]
    (ev,) = doc["events"]
    assert (ev["xid"], ev["instance"], ev["scope"], [c["vm"] for c in ev["consumers"]]) == \
        (94, held.id, "instance", ["vm1"])
    # the subscription went with the process
    state = json.loads((sim.root / ".gpuvirt-sim/state.json").read_text())
    assert state["event_sets"] == []
    h = gpuvirt_proc("--sim", sim.root, "--host-id", "h1", "health", "--json")
    assert h.exit_code == 0 and not h.json()["healthy"]
    # nothing pending: --once returns at once; an XID while nobody listens is lost, as with NVML
    assert gpuvirt_proc("sim", "xid", sim.root, "--gpu", "1", "--xid", "79", "--json").json()["delivered_to"] == 0
    r = gpuvirt_proc("--sim", sim.root, "--host-id", "h1", "watch", "--once", "--json")
    assert r.exit_code == 0 and r.json()["events"] == [], r
    bad = gpuvirt_proc("--sim", sim.root, "watch", "--wait", "3")
    assert bad.exit_code == 2 and bad.stderr.startswith("gpuvirt: error: --wait goes with --once"), bad


def test_long_running_watch_records_xids(mig_host, tmp_path):
    """The service form: udev events replayed from a file (none), NVML followed in between."""
    from gpuvirt.service.health import Monitor
    from gpuvirt.service.watch import QUIET, watch

    sim = mig_host
    seen = []

    def source():
        inject_xid(sim, GPU1, 79)
        yield QUIET
        yield QUIET

    with context(sim) as ctx:
        mon = Monitor(ctx, report=seen.append)
        mon.start()
        try:
            watch(ctx, source(), monitor=mon)
        finally:
            mon.close()
    assert [i["event"]["xid"] for i in seen if "event" in i] == [79]


# --- the simulated event API -------------------------------------------------------------------------------------------
def test_simulated_nvml_event_api_semantics(make_sim):
    import ctypes

    import pynvml

    from gpuvirt.sim.control import open_sim
    from gpuvirt.sim.nvml import FakeNvmlLib

    sim = make_sim(["a100-40gb", "t4"], mig_enabled=True)
    with context(sim) as ctx:
        nvml = ctx.host.nvml()
        gi = nvml.create_gpu_instance(0, 9)
        ci = nvml.create_compute_instance(0, gi.id)
    lib = FakeNvmlLib(open_sim(sim.root))
    pynvml.nvmlLib = lib
    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        supported = pynvml.nvmlDeviceGetSupportedEventTypes(h)
        assert supported & pynvml.nvmlEventTypeXidCriticalError and supported & pynvml.nvmlEventMigConfigChange
        t4 = pynvml.nvmlDeviceGetHandleByIndex(1)
        assert not pynvml.nvmlDeviceGetSupportedEventTypes(t4) & pynvml.nvmlEventMigConfigChange
        es = pynvml.nvmlEventSetCreate()
        # registration on a MIG device handle: not supported (per-instance reporting needs the parent)
        mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, 0)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceRegisterEvents(mig, pynvml.nvmlEventTypeXidCriticalError, es)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceRegisterEvents(t4, pynvml.nvmlEventMigConfigChange, es)
        # an XID before registration is not delivered
        assert inject_xid(sim, "0", 13)["delivered_to"] == 0
        pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, es)
        t0 = time.monotonic()
        with pytest.raises(pynvml.NVMLError_Timeout):
            pynvml.nvmlEventSetWait_v2(es, 200)
        assert time.monotonic() - t0 >= 0.19
        inject_xid(sim, "0", 43, gi=gi.id, ci=ci.id)
        inject_xid(sim, "0", 79)
        d = pynvml.nvmlEventSetWait_v2(es, 0)
        assert (d.eventType, d.eventData, d.gpuInstanceId, d.computeInstanceId) == \
            (pynvml.nvmlEventTypeXidCriticalError, 43, gi.id, ci.id)
        # the event comes on the parent GPU's handle
        assert pynvml.nvmlDeviceGetUUID(d.device) == pynvml.nvmlDeviceGetUUID(h)
        d = pynvml.nvmlEventSetWait_v2(es, 0)
        assert (d.eventData, d.gpuInstanceId, d.computeInstanceId) == (79, 0xFFFFFFFF, 0xFFFFFFFF)
        # unknown instance ids are refused by the control, not delivered
        from gpuvirt.errors import NotFoundError, UsageError

        with pytest.raises(NotFoundError):
            inject_xid(sim, "0", 43, gi=gi.id + 5)
        with pytest.raises(UsageError):
            inject_xid(sim, "1", 43, gi=1)                # the T4 has no MIG
        with pytest.raises(UsageError):
            inject_xid(sim, "0", 0)
        # without the privilege for per-instance events only whole-GPU events arrive
        with open_sim(sim.root).transaction() as state:
            state["nvml_events"] = {"privileged": False, "queue_limit": 3}
        assert inject_xid(sim, "0", 43, gi=gi.id)["delivered_to"] == 0
        for code in (61, 62, 63, 64):
            inject_xid(sim, "0", code)
        got = []
        while True:
            try:
                got.append(pynvml.nvmlEventSetWait_v2(es, 0).eventData)
            except pynvml.NVMLError_Timeout:
                break
        assert got == [62, 63, 64]                        # bounded queue: the oldest went
        state = open_sim(sim.root).load()
        assert state["event_sets"][0]["dropped"] == 1
        # a set whose process is gone is dropped when the next event is queued
        with open_sim(sim.root).transaction() as st:
            st["event_sets"].append({"id": 99, "pid": 2 ** 22 + 12345, "registered": {"0": 8}, "queue": []})
        assert inject_xid(sim, "0", 79)["delivered_to"] == 1
        assert [s["id"] for s in open_sim(sim.root).load()["event_sets"]] != [] and \
            99 not in [s["id"] for s in open_sim(sim.root).load()["event_sets"]]
        pynvml.nvmlEventSetFree(es)
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlEventSetWait_v2(es, 0)
        assert ctypes.sizeof(pynvml.c_nvmlEventData_t) > 0
    finally:
        pynvml.nvmlShutdown()
        pynvml.nvmlLib = None
        pynvml._nvmlGetFunctionPointer_cache.clear()


def test_a_reboot_ends_every_subscription(make_sim):
    from gpuvirt.sim.control import open_sim, reboot

    sim = make_sim(["a100-40gb"])
    with context(sim) as ctx:
        sub = ctx.host.nvml().events().open()
        assert open_sim(sim.root).load()["event_sets"]
        reboot(open_sim(sim.root))
        assert open_sim(sim.root).load()["event_sets"] == []
        from gpuvirt.errors import NvmlError

        with pytest.raises(NvmlError):
            sub.wait(0)
        sub.close()


# --- the schema --------------------------------------------------------------------------------------------------------
def test_health_migration_down_and_up_on_sqlite(tmp_path):
    from sqlalchemy import inspect, text

    from gpuvirt.inventory.store import HEAD_REVISION, Inventory

    inv = Inventory.connect(f"sqlite:///{tmp_path / 'inv.db'}", "h1")
    inv.upgrade("0002_tenants")
    with inv.engine.begin() as conn:
        conn.execute(text("INSERT INTO hosts (id, hostname, root, simulated, created_at, last_seen_at) "
                          "VALUES ('h1', 'h1', '/', 0, '2026-01-01', '2026-01-01')"))
        conn.execute(text("INSERT INTO gpus (host_id, address, vendor, memory_mib, mig_capable, present, "
                          "last_seen_at) VALUES ('h1', '0000:41:00.0', 'nvidia', 40960, 1, 1, '2026-01-01')"))
    inv.ensure_schema()
    assert inv.current_revision() == HEAD_REVISION and inv.check() == []
    with inv.unit() as uow:
        assert uow.gpu_by_address("h1", "0000:41:00.0").health == "healthy"     # old rows: healthy
    from gpuvirt.inventory.migrate import downgrade

    downgrade(inv.engine, "0002_tenants")
    cols = {c["name"] for c in inspect(inv.engine).get_columns("gpus")}
    assert "health" not in cols and "health_events" not in inspect(inv.engine).get_table_names()
    inv.ensure_schema()
    assert inv.check() == []
    inv.close()




@pytest.mark.pg
def test_health_migration_down_and_up_on_postgresql(pg_schema):
    from sqlalchemy import inspect, text

    from gpuvirt.inventory.store import HEAD_REVISION, Inventory

    url = pg_schema[0]
    inv = Inventory.connect(url, "h1")
    inv.upgrade("0002_tenants")
    with inv.engine.begin() as conn:
        conn.execute(text("INSERT INTO hosts (id, hostname, root, simulated, created_at, last_seen_at) "
                          "VALUES ('h1', 'h1', '/', false, now(), now())"))
        conn.execute(text("INSERT INTO gpus (host_id, address, vendor, memory_mib, mig_capable, present, "
                          "last_seen_at) VALUES ('h1', '0000:41:00.0', 'nvidia', 40960, true, true, now())"))
    inv.ensure_schema()
    assert inv.current_revision() == HEAD_REVISION and inv.check() == []
    with inv.unit(write=True) as uow:
        g = uow.gpu_by_address("h1", "0000:41:00.0")
        assert g.health == "healthy" and g.health_needs_reset is False
        uow.add_health_event(host_id="h1", kind="xid", gpu_id=g.id, gpu_address=g.address, xid=79,
                             gi_id=0xFFFFFFFE, severity="reset", scope="gpu", detail={"consumers": []})
    with inv.unit(write=True) as uow:
        assert uow.prune_health_events("h1", before=dt.datetime(2000, 1, 1), keep=0) == 1
    from gpuvirt.inventory.migrate import downgrade

    downgrade(inv.engine, "0002_tenants")
    assert "health_events" not in inspect(inv.engine).get_table_names()
    inv.ensure_schema()
    assert inv.check() == []
    inv.close()
