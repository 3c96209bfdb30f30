"""Per-VM GPU metrics (issue 14, item 2): what the host's vGPU driver reports about each VM's vGPU, matched to the
allocation and exposed per label; passthrough devices listed as not observable; the Grafana dashboard only uses
metrics the exposition has."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest

from gpuvirt.context import Context, resolve_settings
from gpuvirt.model.catalog import MIB

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana-gpuvirt.json"
UA, UB, UC = ("6a1f0c2e-0000-4000-8000-00000000000a", "6a1f0c2e-0000-4000-8000-00000000000b",
              "6a1f0c2e-0000-4000-8000-00000000000c")
A2, AMD = "0000:41:00.0", "0000:42:00.0"


def ok(res, code=0):
    assert res.exit_code == code, res
    return res


def context(sim, host_id="h1"):
    return Context(resolve_settings(sim=str(sim.root), host_id=host_id, env={}))


def samples(text):
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(smp, name, **labels):
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    hits = [v for lab, v in smp.get(name, []) if all(lab.get(k) == v2 for k, v2 in labels.items())]
    assert len(hits) == 1, (name, labels, smp.get(name))
    return hits[0]


def handoff(res):
    """The hand-off document of a one-device attach (``uuid`` for an mdev, ``pci_address`` for a VF)."""
    doc = res.json()
    return doc[0] if isinstance(doc, list) else doc


def none(smp, name, **labels):
    return not [v for lab, v in smp.get(name, []) if all(lab.get(k) == v2 for k, v2 in labels.items())]


@pytest.fixture
def vm_host(make_sim, cli):
    """A2 (mdev vGPUs), AMD V620 (whole VFs) and mtty on one host; four VMs."""
    sim = make_sim(["a2", "amd-v620", "mtty"], vgpu_interface="mdev")
    r = sim.root

    def attach(*args):
        return handoff(ok(cli("--sim", r, "--host-id", "h1", "attach", *args, "--format", "json")))

    ok(cli("--sim", r, "--host-id", "h1", "create-profile", "vfs", "--sriov-vfs", "2", "--model", "amd-v620"))
    ok(cli("--sim", r, "--host-id", "h1", "apply", "vfs", "--gpu", "amd-v620", "--yes"))
    a = attach("vmA", "--vgpu", "A2-2Q", "--tenant", "acme", "--vm-uuid", UA)
    b = attach("vmB", "--vgpu", "A2-2Q", "--tenant", "beta", "--vm-uuid", UB)
    c = attach("vmC", "--vf", "--tenant", "acme")
    d = attach("vmD", "--mdev", "mtty-2")
    return sim, {"vmA": a, "vmB": b, "vmC": c, "vmD": d}


def test_vgpu_figures_per_vm_parsed_back_per_label(vm_host, cli, gpuvirt_proc):
    sim, att = vm_host
    mdev_a = att["vmA"]["uuid"]
    mdev_b = att["vmB"]["uuid"]
    # vmA runs, licensed until a date, using 900 MiB; vmB runs unlicensed; vmC (a whole VF) runs too
    ok(gpuvirt_proc("sim", "open", sim.root, mdev_a, "--vm-uuid", UA))
    ok(gpuvirt_proc("sim", "vgpu", sim.root, mdev_a, "--fb-used-mib", "900", "--sm", "40", "--memory", "15",
                    "--license", "licensed", "--license-expiry", "2027-05-01T12:30:00Z"))
    ok(gpuvirt_proc("sim", "open", sim.root, mdev_b, "--vm-uuid", UB))
    ok(gpuvirt_proc("sim", "vgpu", sim.root, mdev_b, "--license", "unlicensed", "--license-expiry", "none"))
    ok(gpuvirt_proc("sim", "open", sim.root, att["vmC"]["pci_address"]))
    text = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "prometheus")).stdout
    smp = samples(text)
    a = {"host": "h1", "gpu": A2, "kind": "mdev", "type": "A2-2Q", "mdev_uuid": mdev_a, "vf": "", "vm": "vmA",
         "vm_uuid": UA, "tenant": "acme"}
    b = {**a, "mdev_uuid": mdev_b, "vm": "vmB", "vm_uuid": UB, "tenant": "beta"}
    assert one(smp, "gpuvirt_vm_device_observable", **a, why="") == 1
    assert one(smp, "gpuvirt_vgpu_active", **a) == 1
    assert one(smp, "gpuvirt_vgpu_fb_used_bytes", **a) == 900 * MIB
    assert one(smp, "gpuvirt_vgpu_fb_total_bytes", **a) == 2048 * MIB
    assert one(smp, "gpuvirt_vgpu_utilization_ratio", **a, engine="sm") == pytest.approx(0.40)
    assert one(smp, "gpuvirt_vgpu_utilization_ratio", **a, engine="memory") == pytest.approx(0.15)
    assert one(smp, "gpuvirt_vgpu_licensed", **a) == 1
    assert one(smp, "gpuvirt_vgpu_license_info", **a, state="licensed", expiry_status="valid") == 1
    assert one(smp, "gpuvirt_vgpu_license_expiry_timestamp_seconds", **a) == \
        dt.datetime(2027, 5, 1, 12, 30, tzinfo=dt.timezone.utc).timestamp()
    # license state: unlicensed, no expiry date
    assert one(smp, "gpuvirt_vgpu_licensed", **b) == 0
    assert one(smp, "gpuvirt_vgpu_license_info", **b, state="unlicensed", expiry_status="not-available") == 1
    assert none(smp, "gpuvirt_vgpu_license_expiry_timestamp_seconds", vm="vmB")
    assert one(smp, "gpuvirt_vgpu_fb_used_bytes", **b) == 0
    # passthrough VF and generic mdev: listed, not observable, and no invented figure
    assert one(smp, "gpuvirt_vm_device_observable", vm="vmC", why="passthrough", kind="vf", gpu=AMD,
               vf=att["vmC"]["pci_address"], tenant="acme") == 0
    assert one(smp, "gpuvirt_vm_device_observable", vm="vmD", why="generic-mdev", gpu="mtty") == 0
    for name in ("gpuvirt_vgpu_active", "gpuvirt_vgpu_fb_used_bytes", "gpuvirt_vgpu_fb_total_bytes",
                 "gpuvirt_vgpu_utilization_ratio", "gpuvirt_vgpu_licensed"):
        assert none(smp, name, vm="vmC") and none(smp, name, vm="vmD"), name
    # the JSON document says the same
    doc = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "json")).json()
    by_vm = {d["vm"]: d for d in doc["vm_devices"]}
    assert by_vm["vmA"]["license"] == {"state": "licensed", "licensed": True, "expiry": "2027-05-01T12:30:00Z",
                                       "expiry_status": "valid"}
    assert by_vm["vmA"]["vm_id_reported"] == UA and by_vm["vmA"]["vgpu_instance"] >= 1
    assert by_vm["vmC"]["observable"] is False and by_vm["vmC"]["fb_used_bytes"] is None
    # a stopped VM: listed as observable but not running, figures gone
    ok(gpuvirt_proc("sim", "close", sim.root, mdev_a))
    smp = samples(ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "prometheus")).stdout)
    assert one(smp, "gpuvirt_vgpu_active", **a) == 0
    assert one(smp, "gpuvirt_vm_device_observable", **a, why="not-running") == 1
    assert none(smp, "gpuvirt_vgpu_fb_used_bytes", vm="vmA") and none(smp, "gpuvirt_vgpu_licensed", vm="vmA")
    # a cluster report has no host driver to ask: no per-VM section
    inv = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--cluster", "--format", "json")).json()
    assert inv["vm_devices"] is None


def test_nvml_unavailable_devices_are_not_observable(vm_host, cli, gpuvirt_proc):
    sim, att = vm_host
    ok(gpuvirt_proc("sim", "driver", sim.root, "--unloaded"))
    doc = ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "json")).json()
    a = next(d for d in doc["vm_devices"] if d["vm"] == "vmA")
    assert (a["observable"], a["why"], a["fb_used_bytes"]) == (False, "nvml-unavailable", None)


def test_vendor_vfio_vgpus_large_framebuffer_and_unallocated_ones(make_sim, cli, gpuvirt_proc):
    """vGPUs on VFs (no mdev) are matched by VM UUID and type; usage above 4 GiB comes through whole (the
    nvidia-ml-py wrapper's 4-byte buffer would cut it); a running vGPU nobody allocated is listed too."""
    import pynvml

    sim = make_sim(["l40s"])
    r = sim.root
    vf = handoff(cli("--sim", r, "--host-id", "h1", "attach", "vmX", "--vgpu", "L40S-8Q", "--vm-uuid", UC,
                     "--tenant", "acme", "--format", "json"))["pci_address"]
    ok(gpuvirt_proc("sim", "open", r, vf, "--vm-uuid", UC))
    ok(gpuvirt_proc("sim", "vgpu", r, vf, "--fb-used-mib", "6000", "--license", "licensed", "--license-expiry",
                    "permanent"))
    from gpuvirt.model.catalog import load_catalog

    t8 = next(t for t in load_catalog().get("l40s").vgpu.types if t.name == "L40S-8Q")
    with context(sim) as ctx:
        ctx.host.set_vgpu_type("0000:41:00.7", t8.id, t8.name)         # made outside gpuvirt, then started
    ok(gpuvirt_proc("sim", "open", r, "0000:41:00.7", "--vm-uuid", UA))
    smp = samples(ok(cli("--sim", r, "--host-id", "h1", "report", "--format", "prometheus")).stdout)
    x = {"host": "h1", "gpu": "0000:41:00.0", "kind": "vfio-vgpu", "type": "L40S-8Q", "mdev_uuid": "", "vf": vf,
         "vm": "vmX", "vm_uuid": UC, "tenant": "acme"}
    assert one(smp, "gpuvirt_vgpu_fb_used_bytes", **x) == 6000 * MIB
    assert one(smp, "gpuvirt_vgpu_license_info", **x, state="licensed", expiry_status="permanent") == 1
    assert none(smp, "gpuvirt_vgpu_license_expiry_timestamp_seconds", vm="vmX")
    assert one(smp, "gpuvirt_vm_device_observable", vm="", vm_uuid=UA, why="unallocated", type="L40S-8Q") == 1
    assert one(smp, "gpuvirt_vgpu_active", vm="", vm_uuid=UA) == 1
    # the simulated driver is as unforgiving as a real one with nvidia-ml-py's own wrapper
    from gpuvirt.sim.control import open_sim
    from gpuvirt.sim.nvml import FakeNvmlLib

    pynvml.nvmlLib = FakeNvmlLib(open_sim(r))
    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        ids = pynvml.nvmlDeviceGetActiveVgpus(h)
        def vm_id(i):
            v = pynvml.nvmlVgpuInstanceGetVmID(i)[0]
            return v.decode() if isinstance(v, bytes) else v

        big = next(i for i in ids if vm_id(i) == UC)
        assert pynvml.nvmlVgpuInstanceGetFbUsage(big) == (6000 * MIB) % 2 ** 32
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlVgpuInstanceGetMdevUUID(big)              # no mdev behind a VF vGPU
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlVgpuInstanceGetType(max(ids) + 1000)
        samples_ = pynvml.nvmlDeviceGetVgpuInstancesUtilizationInfo(h, 0)
        assert sorted(s.vgpuInstance for s in samples_) == sorted(ids)
    finally:
        pynvml.nvmlShutdown()
        pynvml.nvmlLib = None
        pynvml._nvmlGetFunctionPointer_cache.clear()


def test_vgpu_instance_ids_are_stable_and_not_reused(make_sim, cli):
    import uuid

    from gpuvirt.sim.control import open_sim
    from gpuvirt.sim.nvml_vgpu_instances import vgpu_instances

    sim = make_sim(["a2"], vgpu_interface="mdev")
    r = sim.root
    u1 = handoff(ok(cli("--sim", r, "--host-id", "h1", "attach", "v1", "--vgpu", "A2-2Q", "--format", "json")))
    ok(cli("--sim", r, "--host-id", "h1", "attach", "v2", "--vgpu", "A2-2Q"))
    state = open_sim(r).load()
    ids = {v["entry"]["uuid"]: v["id"] for v in vgpu_instances(state)}
    assert sorted(ids.values()) == [1, 2] and ids[u1["uuid"]] == 1
    assert {v["entry"]["uuid"]: v["id"] for v in vgpu_instances(open_sim(r).load())} == ids   # re-read: same
    parent = next(m["parent"] for m in state["mdevs"] if m["uuid"] == u1["uuid"])
    fresh = str(uuid.uuid4())
    with context(sim) as ctx:
        ctx.host.remove_mdev(u1["uuid"])
        ctx.host.create_mdev(parent, "nvidia-745", fresh)
    after = {v["entry"]["uuid"]: v["id"] for v in vgpu_instances(open_sim(r).load())}
    assert after[fresh] == 3 and 1 not in after.values()          # a new vGPU, a new id; 1 is not reused
    bad = cli("sim", "vgpu", r, fresh, "--sm", "140")
    assert bad.exit_code == 2 and bad.stderr.startswith("gpuvirt: error: "), bad
    bad = cli("sim", "vgpu", r, fresh, "--license", "gold")
    assert bad.exit_code == 2 and "unknown license state" in bad.stderr, bad


# --- the Grafana dashboard ---------------------------------------------------------------------------------------------
def test_grafana_dashboard_uses_only_exposed_metrics(vm_host, cli, make_sim):
    from prometheus_client.parser import text_string_to_metric_families

    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"] and doc["panels"] and doc.get("uid")
    used = set()
    for p in doc["panels"]:
        for t in p.get("targets", []):
            used |= set(re.findall(r"\bgpuvirt_[a-z0-9_]+", t["expr"]))
    for v in doc.get("templating", {}).get("list", []):
        used |= set(re.findall(r"\bgpuvirt_[a-z0-9_]+", json.dumps(v.get("query", ""))))
    assert {"gpuvirt_vgpu_fb_used_bytes", "gpuvirt_vgpu_utilization_ratio", "gpuvirt_vgpu_licensed",
            "gpuvirt_gpu_healthy", "gpuvirt_mig_instance_info", "gpuvirt_vm_device_observable"} <= used
    sim, _ = vm_host
    exposed = set()
    for fam in text_string_to_metric_families(
            ok(cli("--sim", sim.root, "--host-id", "h1", "report", "--format", "prometheus")).stdout):
        exposed.add(fam.name)
        exposed |= {s.name for s in fam.samples}
    assert not used - exposed, sorted(used - exposed)
