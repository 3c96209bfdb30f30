"""Containers through CDI (issue 12): per-GPU modes, MIG devices and whole GPUs handed to containers, the CDI specs
gpuvirt keeps true, and the simulated device nodes they are made of.

Facts: ../shared/reference/containers-cdi.md; the CDI JSON schema is read from ../shared/reference/data/cdi-schema/
(the schema test skips cleanly without it; every other test checks the parser's name rules itself).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import reference

GI, CI = 9, 1     # mig-minors: 9 minors per GPU instance (its access + 8 compute instances), 135 per GPU


def minor_gi(gpu: int, gi: int) -> int:
    return 3 + gpu * 135 + gi * 9


def minor_ci(gpu: int, gi: int, ci: int) -> int:
    return minor_gi(gpu, gi) + 1 + ci


def spec_dir(root: Path) -> Path:
    return root / "var/run/cdi"


def specs(root: Path) -> dict[str, str]:
    d = spec_dir(root)
    return {p.name: p.read_text() for p in sorted(d.iterdir())} if d.is_dir() else {}


def body(text: str) -> dict:
    """A gpuvirt spec file: two comment lines, then JSON (which YAML readers accept as it is)."""
    import yaml

    doc = yaml.safe_load(text)
    assert doc == json.loads(text.split("\n", 2)[2])
    return doc


def check_names(doc: dict) -> None:
    """The CDI parser's rules (containers-cdi.md section 2), checked independently of gpuvirt's own code."""
    vendor, klass = doc["kind"].split("/")
    assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?", vendor), vendor
    assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_-]*[A-Za-z0-9])?", klass), klass
    for d in doc["devices"]:
        assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?", d["name"]), d["name"]


def sim_state(root: Path) -> dict:
    from gpuvirt.sim.state import SimHost

    return SimHost(root).load()


def mig_uuids(root: Path) -> set[str]:
    return {ci["uuid"] for d in sim_state(root)["devices"] for gi in (d.get("mig") or {}).get("gpu_instances", [])
            for ci in gi["compute_instances"]}


def ok(cli, *args):
    r = cli(*args)
    assert r.exit_code == 0, r
    return r


def containers_profile(cli, root, name="ct-mig", *mig, mode="containers"):
    args = ["--sim", root, "create-profile", name, "--model", "a100-40gb", "--mode", mode]
    for m in mig:
        args += ["--mig", m]
    ok(cli, *args)


# --- the spec renderer (pure) --------------------------------------------------------------------------------------
def test_cdi_name_rules():
    from gpuvirt.errors import UsageError
    from gpuvirt.vmm import cdi

    for good in ("0", "0:1", "MIG-4b0c1d2e-0000-1111-2222-333344445555", "GPU-1a2b", "0000:41:00.0", "a_b.c-d"):
        assert cdi.name_problem(good) is None, good
    # the pre-R470 MIG UUID form is no valid CDI device name (containers-cdi.md section 2)
    for bad in ("MIG-GPU-4b0c/1/0", "", "-x", "x-", "a b", "x/y", "ü"):
        assert cdi.name_problem(bad) is not None, bad
    assert cdi.vendor_problem("gpuvirt.io") is None and cdi.vendor_problem("1vendor") is not None
    assert cdi.class_problem("mig") is None and cdi.class_problem("a.b") is not None   # dots need spec 0.6.0
    assert cdi.qualified("gpuvirt.io/mig", "MIG-1") == "gpuvirt.io/mig=MIG-1"
    assert cdi.parse_qualified("nvidia.com/gpu=0:1") == ("nvidia.com", "gpu", "0:1")
    with pytest.raises(UsageError):
        cdi.parse_qualified("nvidia.com/gpu=MIG-GPU-x/1/0")
    with pytest.raises(UsageError):
        cdi.kind_of("-bad", "mig")


def test_rendered_spec_is_marked_and_parses_back():
    from gpuvirt.vmm import cdi

    nodes = [cdi.Node("/dev/nvidia0", "/r/dev/nvidia0"), cdi.Node("/dev/nvidia-caps/nvidia-cap21", None, "c", 508, 21,
                                                                    0o444)]
    doc = cdi.spec("gpuvirt.io/mig", "MIG-1", cdi.device_edits(nodes, hook_path="/usr/bin/nvidia-cdi-hook"), None)
    text = cdi.render(doc, {"instance": 3})
    assert cdi.owned(text) == {"instance": 3}
    assert cdi.parse(text, "x") == doc == body(text)
    edits = doc["devices"][0]["containerEdits"]
    assert edits["deviceNodes"] == [{"path": "/dev/nvidia0", "hostPath": "/r/dev/nvidia0"},
                                    {"path": "/dev/nvidia-caps/nvidia-cap21", "type": "c", "major": 508,
                                     "minor": 21, "fileMode": 0o444}]
    assert edits["hooks"] == [{"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
                               "args": ["nvidia-cdi-hook", "chmod", "--mode", "755", "--path", "/dev/nvidia-caps"]}]
    assert cdi.owned('{"cdiVersion": "0.5.0"}') is None and cdi.problems(doc) == []


# --- the simulator's device nodes ---------------------------------------------------------------------------------------
def test_simulated_nodes_follow_nvml(make_sim):
    from gpuvirt.host.machine import Host
    from gpuvirt.sim.devctl import configure, set_minor
    from gpuvirt.sim.kernel import SimKernel
    from gpuvirt.sim.nvml import FakeNvmlLib

    sim = make_sim(["a100-40gb:2"], mig_enabled=True)
    root = sim.root
    # a real host may number minors unlike NVML: GPU 0 is minor 3 here
    set_minor(sim, "0000:41:00.0", 3)
    dev = root / "dev"
    assert sorted(p.name for p in dev.iterdir() if p.is_file()) == ["nvidia-uvm", "nvidia-uvm-tools", "nvidia1",
                                                                     "nvidia3", "nvidiactl"]
    assert (dev / "nvidiactl").read_text() == "c 195:255\n"
    assert "195 nvidia-frontend" in (root / "proc/devices").read_text()
    assert "508 nvidia-caps" in (root / "proc/devices").read_text()
    minors = dict(line.split() for line in (root / "proc/driver/nvidia-caps/mig-minors").read_text().splitlines())
    assert minors["config"] == "1" and minors["monitor"] == "2"
    assert minors["gpu0/gi11/access"] == "102" and minors["gpu0/gi11/ci0/access"] == "103"   # the reference's pair
    assert minors["gpu31/gi14/ci7/access"] == str(minor_ci(31, 14, 7))
    assert sorted(p.name for p in (dev / "nvidia-caps").iterdir()) == ["nvidia-cap1", "nvidia-cap2"]

    host = Host(root, kernel=SimKernel(sim), nvml_lib=FakeNvmlLib(sim), use_udev=False)
    nv = host.nvml()
    assert nv.minor_number(0) == 3 and nv.minor_number(1) == 1
    gi = nv.create_gpu_instance(0, 19, 6)             # 1g.5gb at 6: GI 13
    caps = dev / "nvidia-caps"
    assert (caps / f"nvidia-cap{minor_gi(3, gi.id)}").exists()
    assert (root / f"proc/driver/nvidia/capabilities/gpu3/mig/gi{gi.id}/access").read_text() == \
        f"DeviceFileMinor: {minor_gi(3, gi.id)}\nDeviceFileMode: 292\nDeviceFileModify: 1\n"
    ci = nv.create_compute_instance(0, gi.id)
    assert (caps / f"nvidia-cap{minor_ci(3, gi.id, ci.id)}").read_text() == f"c 508:{minor_ci(3, gi.id, ci.id)}\n"
    nv.destroy_compute_instance(0, gi.id, ci.id)
    assert not (caps / f"nvidia-cap{minor_ci(3, gi.id, ci.id)}").exists()
    nv.destroy_gpu_instance(0, gi.id)
    assert not (caps / f"nvidia-cap{minor_gi(3, gi.id)}").exists()
    assert not (root / f"proc/driver/nvidia/capabilities/gpu3/mig/gi{gi.id}").exists()

    # the other readings of the UNVERIFIED facts
    configure(sim, mig_minors="instances", caps_nodes="none", caps_major=300)
    assert (root / "proc/driver/nvidia-caps/mig-minors").read_text() == "config 1\nmonitor 2\n"
    assert not (dev / "nvidia-caps").exists() and "300 nvidia-caps" in (root / "proc/devices").read_text()
    host.close()


def test_binding_a_gpu_to_vfio_pci(make_sim, cli):
    sim = make_sim(["a100-40gb:2"], enable_vfs=False)
    root = sim.root
    ok(cli, "sim", "bind", root, "0000:41:00.0", "--driver", "vfio-pci")
    assert not (root / "dev/nvidia0").exists() and (root / "dev/nvidia1").exists()   # minors stay
    assert os.readlink(root / "sys/bus/pci/devices/0000:41:00.0/driver").endswith("vfio-pci")
    group = os.readlink(root / "sys/bus/pci/devices/0000:41:00.0/iommu_group").rsplit("/", 1)[1]
    assert (root / f"dev/vfio/{group}").exists() and (root / "dev/vfio/vfio").exists()
    doc = ok(cli, "--sim", root, "discover", "--json").json()
    assert [g["pci_address"] for g in doc["gpus"]] == ["0000:42:00.0"]          # NVML lost it
    assert doc["gpus"][0]["index"] == 0
    ok(cli, "sim", "bind", root, "0000:41:00.0", "--driver", "nvidia")
    assert (root / "dev/nvidia0").exists() and not (root / "dev/vfio").exists()


# --- attach / detach ---------------------------------------------------------------------------------------------------
def test_attach_mig_publishes_a_spec_with_the_right_nodes_and_detach_removes_it(make_sim, cli):
    sim = make_sim(["a100-40gb:2"], mig_enabled=True)
    root = sim.root
    ok(cli, "sim", "devnodes", root, "--minor", "0000:41:00.0=5")          # minor 5 for NVML index 0
    r = ok(cli, "--sim", root, "attach", "c1", "--mig", "1g.5gb", "--gpu", "0", "--format", "cdi", "--tenant", "t1")
    name = r.stdout.strip()
    assert re.fullmatch(r"gpuvirt\.io/mig=MIG-[0-9a-f-]{36}", name), r.stdout
    uuid = name.split("=", 1)[1]
    assert uuid in mig_uuids(root)                 # published after the instance exists, under its MIG UUID
    files = specs(root)
    assert list(files) == [f"gpuvirt_mig_{uuid}.yaml"]
    doc = body(files[f"gpuvirt_mig_{uuid}.yaml"])
    check_names(doc)
    gi = next(g for d in sim_state(root)["devices"] for g in (d["mig"] or {}).get("gpu_instances", [])
              if g["compute_instances"] and g["compute_instances"][0]["uuid"] == uuid)
    minors = dict(line.split() for line in (root / "proc/driver/nvidia-caps/mig-minors").read_text().splitlines())
    cap_gi, cap_ci = int(minors[f"gpu5/gi{gi['id']}/access"]), int(minors[f"gpu5/gi{gi['id']}/ci0/access"])
    assert (cap_gi, cap_ci) == (minor_gi(5, gi["id"]), minor_ci(5, gi["id"], 0))
    dev = doc["devices"][0]
    assert dev["name"] == uuid and doc["kind"] == "gpuvirt.io/mig" and doc["cdiVersion"] == "0.5.0"
    # NVIDIA's order: parent node, GI access capability, CI access capability; no DRM for a non-gfx profile
    assert [n["path"] for n in dev["containerEdits"]["deviceNodes"]] == [
        "/dev/nvidia5", f"/dev/nvidia-caps/nvidia-cap{cap_gi}", f"/dev/nvidia-caps/nvidia-cap{cap_ci}"]
    for n in dev["containerEdits"]["deviceNodes"]:
        assert n["hostPath"] == str(root) + n["path"] and Path(n["hostPath"]).exists()
    assert dev["containerEdits"]["hooks"][0]["args"][-2:] == ["--path", "/dev/nvidia-caps"]
    assert [n["path"] for n in doc["containerEdits"]["deviceNodes"]] == [
        "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
    # tenants and reports count it like a VM's
    rows = ok(cli, "--sim", root, "allocations", "--json").json()
    assert [(a["vm"], a["consumer"], a["tenant"]) for a in rows] == [("c1", "container", "t1")]
    rep = ok(cli, "--sim", root, "report", "--format", "json").json()
    allocs = [a for h in rep["hosts"] for g in h["gpus"] for a in g.get("allocations", [])]
    assert [(a["vm"], a["consumer"], a["item"]) for a in allocs] == [("c1", "container", "1g.5gb")]
    assert ok(cli, "--sim", root, "cdi", "list", "--json").json()[0]["name"] == name
    assert ok(cli, "--sim", root, "cdi", "check").exit_code == 0
    assert ok(cli, "--sim", root, "status", "--json").json()["in_sync"]
    # the name is the container's: a VM of that name is refused, and the hook never sees the device
    assert cli("--sim", root, "attach", "c1", "--mig", "1g.5gb", "--format", "json").exit_code == 5
    r = ok(cli, "--sim", root, "detach", "c1")
    assert specs(root) == {} and ok(cli, "--sim", root, "allocations", "--json").json() == []
    # the GPU instance an attach made stays for the next one (persistent), and is taken first
    r = ok(cli, "--sim", root, "attach", "c2", "--mig", "1g.5gb", "--format", "cdi")
    assert r.stdout.strip() == name


def test_free_instances_of_a_containers_profile_are_used_first(make_sim, cli):
    sim = make_sim(["a100-40gb"], mig_enabled=True)
    root = sim.root
    containers_profile(cli, root, "ct", "1g.5gb=2", "3g.20gb=1")
    ok(cli, "--sim", root, "apply", "ct", "--gpu", "0", "--yes")
    before = mig_uuids(root)
    names = ok(cli, "--sim", root, "attach", "c1", "--mig", "1g.5gb", "--count", "2", "--format", "cdi").stdout.split()
    assert {n.split("=")[1] for n in names} <= before and mig_uuids(root) == before     # nothing new was carved
    assert len(specs(root)) == 2
    r = cli("--sim", root, "attach", "c2", "--mig", "1g.5gb", "--format", "cdi")
    assert r.exit_code == 0 and mig_uuids(root) != before     # room left on the GPU: a new one is made
    # a containers GPU gives VMs nothing
    r = cli("--sim", root, "attach", "vm1", "--mig", "3g.20gb", "--format", "json")
    assert r.exit_code in (2, 4, 5) and "container" in r.stderr, r


def test_mixed_host_serves_vms_and_containers(make_sim, cli):
    sim = make_sim(["a100-40gb:2"], mig_enabled=True, enable_vfs=False)
    root = sim.root
    ok(cli, "--sim", root, "create-profile", "vm-mig", "--mig", "1g.5gb=7", "--vgpu", "A100-1-5C=7",
       "--model", "a100-40gb")
    containers_profile(cli, root, "ct-mig", "1g.5gb=7")
    ok(cli, "--sim", root, "apply", "vm-mig", "--gpu", "0", "--yes")
    plan = ok(cli, "--sim", root, "plan", "ct-mig", "--gpu", "1", "--json").json()
    assert plan["gpus"][0]["mode"] == {"current": None, "new": "containers"}
    ok(cli, "--sim", root, "apply", "ct-mig", "--gpu", "1", "--yes")
    gpus = {g["address"]: g["mode"] for g in ok(cli, "--sim", root, "status", "--json").json()["gpus"]}
    assert gpus == {"0000:41:00.0": "vm", "0000:42:00.0": "containers"}
    # a VM gets a vGPU on GPU 0, a container a MIG device on GPU 1, whatever order they come in
    r = ok(cli, "--sim", root, "attach", "c1", "--mig", "1g.5gb", "--format", "cdi")
    r2 = ok(cli, "--sim", root, "attach", "vm1", "--vgpu", "A100-1-5C", "--format", "json")
    rows = {a["vm"]: a for a in ok(cli, "--sim", root, "allocations", "--json").json()}
    assert rows["c1"]["gpu"] == "0000:42:00.0" and rows["c1"]["consumer"] == "container"
    assert rows["vm1"]["gpu"] == "0000:41:00.0" and rows["vm1"]["consumer"] == "vm" and r2.stdout
    assert len(specs(root)) == 1 and r.stdout.strip().split("=")[1] in next(iter(specs(root)))
    # asking across the modes is refused with the reason
    r = cli("--sim", root, "attach", "c2", "--mig", "1g.5gb", "--gpu", "0", "--format", "cdi")
    assert r.exit_code == 4 and "mode vm" in r.stderr, r
    r = cli("--sim", root, "attach", "vm2", "--vgpu", "A100-1-5C", "--gpu", "1")
    assert r.exit_code == 5 and "containers" in r.stderr, r
    # the mode changes only through apply, and not while something on the GPU is allocated
    r = cli("--sim", root, "apply", "vm-mig", "--gpu", "1", "--yes")
    assert r.exit_code == 5 and "detach" in r.stderr and "mode" in r.stderr, r
    r = cli("--sim", root, "apply", "ct-mig", "--gpu", "0", "--yes", "--force")
    assert r.exit_code == 5, r
    ok(cli, "--sim", root, "detach", "c1")
    ok(cli, "--sim", root, "apply", "vm-mig", "--gpu", "1", "--yes")
    assert ok(cli, "--sim", root, "status", "--json").json()["gpus"][1]["mode"] == "vm"


def test_a_mig_gpu_without_profile_takes_both_kinds(make_sim, cli):
    sim = make_sim(["a100-40gb"], mig_enabled=True, enable_vfs=False)
    root = sim.root
    ok(cli, "--sim", root, "attach", "c1", "--mig", "2g.10gb", "--format", "cdi")
    ok(cli, "--sim", root, "attach", "vm1", "--mig", "1g.5gb", "--format", "json")
    kinds = sorted(a["consumer"] for a in ok(cli, "--sim", root, "allocations", "--json").json())
    assert kinds == ["container", "vm", "vm"]     # the VM's MIG-backed vGPU holds its GPU instance too
    # applying a containers profile is refused while the VM holds a device there
    containers_profile(cli, root, "ct", "2g.10gb=1", "1g.5gb=1")
    r = cli("--sim", root, "apply", "ct", "--gpu", "0", "--yes")
    assert r.exit_code == 5 and "vm vm1" in r.stderr, r


def test_whole_gpu_and_vfio_form(make_sim, cli):
    sim = make_sim(["a100-40gb:2", "l40s"], mig_enabled=False, enable_vfs=False)
    root = sim.root
    r = ok(cli, "--sim", root, "attach", "w1", "--gpu", "0", "--format", "cdi")
    gpu_uuid = sim_state(root)["devices"][0]["uuid"]
    assert r.stdout.strip() == f"gpuvirt.io/gpu={gpu_uuid}"
    doc = body(specs(root)[f"gpuvirt_gpu_{gpu_uuid}.yaml"])
    check_names(doc)
    assert [n["path"] for n in doc["devices"][0]["containerEdits"]["deviceNodes"]] == ["/dev/nvidia0"]
    # taken: not twice, and no VM gets a vGPU of it either
    assert cli("--sim", root, "attach", "w2", "--gpu", "0", "--format", "cdi").exit_code == 4
    rows = ok(cli, "--sim", root, "status", "--json").json()["gpus"][0]["instances"]
    assert [(i["kind"], i["on_host"], i["allocation"]["consumer"]) for i in rows] == [("gpu", True, "container")]
    # a GPU bound to vfio-pci is handed over in the VFIO form
    ok(cli, "sim", "bind", root, "0000:42:00.0", "--driver", "vfio-pci")
    r = ok(cli, "--sim", root, "attach", "k1", "--gpu", "0000:42:00.0", "--format", "cdi")
    assert r.stdout.strip() == "gpuvirt.io/vfio=0000:42:00.0"
    doc = body(specs(root)["gpuvirt_vfio_0000:42:00.0.yaml"])
    check_names(doc)
    group = os.readlink(root / "sys/bus/pci/devices/0000:42:00.0/iommu_group").rsplit("/", 1)[1]
    assert doc["devices"][0]["containerEdits"]["deviceNodes"] == [
        {"path": f"/dev/vfio/{group}", "hostPath": f"{root}/dev/vfio/{group}"}]
    assert doc["containerEdits"] == {"deviceNodes": [{"path": "/dev/vfio/vfio", "hostPath": f"{root}/dev/vfio/vfio"}]}
    # a MIG-enabled GPU is not handed over whole
    ok(cli, "--sim", root, "detach", "w1")
    assert specs(root).keys() == {"gpuvirt_vfio_0000:42:00.0.yaml"}
    ok(cli, "--sim", root, "create-profile", "mig7", "--mig", "1g.5gb=7", "--model", "a100-40gb", "--mode",
       "containers")
    ok(cli, "--sim", root, "apply", "mig7", "--gpu", "0", "--yes")
    r = cli("--sim", root, "attach", "w3", "--gpu", "0", "--format", "cdi")
    assert r.exit_code == 4 and "MIG mode is on" in r.stderr, r
    ok(cli, "--sim", root, "detach", "k1")
    assert specs(root) == {}
    # options of a VM hand-off do not mix with --format cdi
    r = cli("--sim", root, "attach", "x", "--vgpu", "L40S-4Q", "--format", "cdi")
    assert r.exit_code == 2 and "--vgpu" in r.stderr


def test_specs_follow_relayouts_and_reboots(make_sim, cli):
    sim = make_sim(["a100-40gb"], mig_enabled=True)
    root = sim.root
    containers_profile(cli, root, "p1", "1g.5gb=2", "2g.10gb=1")
    containers_profile(cli, root, "p2", "1g.5gb=2", "3g.20gb=1")
    ok(cli, "--sim", root, "apply", "p1", "--gpu", "0", "--yes")
    a = ok(cli, "--sim", root, "attach", "c1", "--mig", "1g.5gb", "--format", "cdi").stdout.strip()
    b = ok(cli, "--sim", root, "attach", "c2", "--mig", "2g.10gb", "--format", "cdi").stdout.strip()
    assert len(specs(root)) == 2
    # a re-layout that keeps c1's instance leaves its spec alone; --force takes c2's instance, and its spec goes
    r = cli("--sim", root, "apply", "p2", "--gpu", "0", "--yes")
    assert r.exit_code == 5, r                                  # c2's 2g is allocated
    before = specs(root)[f"gpuvirt_mig_{a.split('=')[1]}.yaml"]
    ok(cli, "--sim", root, "apply", "p2", "--gpu", "0", "--yes", "--force")
    assert specs(root) == {f"gpuvirt_mig_{a.split('=')[1]}.yaml": before}
    assert [x["vm"] for x in ok(cli, "--sim", root, "allocations", "--json").json()] == ["c1"]
    assert b.split("=")[1] not in mig_uuids(root)
    # a reboot loses every instance; reconcile (the boot unit) re-creates them with new UUIDs, and the specs follow
    ok(cli, "sim", "reboot", root)
    chk = cli("--sim", root, "cdi", "check", "--json")
    assert chk.exit_code == 9 and chk.json()["stale"] and chk.json()["unresolved"], chk
    assert not ok(cli, "--sim", root, "status", "--json").json()["in_sync"]
    rec = ok(cli, "--sim", root, "reconcile", "--yes", "--json").json()
    kinds = sorted(f["kind"] for f in rec["findings"] if f["kind"].startswith("cdi"))
    assert kinds == ["cdi-missing", "cdi-stale"] and not rec["failed"], rec
    names = ok(cli, "--sim", root, "cdi", "list", "--json").json()
    new_uuid = names[0]["name"].split("=")[1]
    assert new_uuid != a.split("=")[1] and new_uuid in mig_uuids(root)
    assert list(specs(root)) == [f"gpuvirt_mig_{new_uuid}.yaml"]            # no stale file
    check_names(body(specs(root)[f"gpuvirt_mig_{new_uuid}.yaml"]))
    assert ok(cli, "--sim", root, "cdi", "check").exit_code == 0
    assert ok(cli, "--sim", root, "status", "--json").json()["in_sync"]
    assert ok(cli, "--sim", root, "reconcile", "--yes", "--json").json()["changed"] == 0


def test_foreign_specs_are_never_touched(make_sim, cli):
    sim = make_sim(["a100-40gb"], mig_enabled=True)
    root = sim.root
    d = spec_dir(root)
    d.mkdir(parents=True)
    foreign = {
        "nvidia.yaml": "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: '0'\n  containerEdits:\n"
                       "    deviceNodes:\n    - path: /dev/nvidia0\n",
        "other-tool.json": json.dumps({"cdiVersion": "0.6.0", "kind": "gpuvirt.io/mig",
                                       "devices": [{"name": "x", "containerEdits": {}}]}),
        "gpuvirt_mig_MIG-hand-made.yaml": "cdiVersion: 0.5.0\nkind: example.com/x\ndevices: []\n",
        "broken.yaml": "{{{ not yaml",
    }
    for name, text in foreign.items():
        (d / name).write_text(text)
    stamps = {n: (d / n).stat().st_mtime_ns for n in foreign}
    name = ok(cli, "--sim", root, "attach", "c1", "--mig", "1g.5gb", "--format", "cdi").stdout.strip()
    chk = cli("--sim", root, "cdi", "check", "--json")
    doc = chk.json()
    assert chk.exit_code == 9 and [c["path"].rsplit("/", 1)[1] for c in doc["conflicts"]] == ["other-tool.json"]
    assert sorted(f["path"].rsplit("/", 1)[1] for f in doc["foreign"]) == sorted(foreign)
    assert len(doc["ok"]) == 1 and doc["ok"][0]["name"] == name
    ok(cli, "sim", "reboot", root)
    ok(cli, "--sim", root, "reconcile", "--yes")
    ok(cli, "--sim", root, "detach", "c1")
    for n, text in foreign.items():
        assert (d / n).read_text() == text and (d / n).stat().st_mtime_ns == stamps[n], n
    assert sorted(p.name for p in d.iterdir()) == sorted(foreign)


def test_common_edits_come_from_nvidia_ctk_and_missing_nodes_get_numbers(make_sim, cli):
    sim = make_sim(["a100-40gb"], mig_enabled=True)
    root = sim.root
    nvidia = {"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
              "devices": [{"name": "all", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}],
              "containerEdits": {"env": ["NVIDIA_VISIBLE_DEVICES=void"],
                                 "deviceNodes": [{"path": "/dev/nvidiactl"}, {"path": "/dev/nvidia-uvm"}],
                                 "mounts": [{"hostPath": "/usr/lib/x86_64-linux-gnu/libcuda.so.570.86.15",
                                             "containerPath": "/usr/lib/x86_64-linux-gnu/libcuda.so.570.86.15",
                                             "options": ["ro", "nosuid", "nodev", "rbind", "rprivate"]}],
                                 "hooks": [{"hookName": "createContainer", "path": "/opt/nct/bin/nvidia-cdi-hook",
                                            "args": ["nvidia-cdi-hook", "update-ldcache"]}]}}
    (root / "etc/cdi").mkdir(parents=True)
    (root / "etc/cdi/nvidia.yaml").write_text(json.dumps(nvidia))
    # nvidia-modprobe never ran: no capability nodes; the spec then carries their numbers
    ok(cli, "sim", "devnodes", root, "--caps-nodes", "none", "--caps-major", "237")
    ok(cli, "--sim", root, "attach", "c1", "--mig", "1g.5gb", "--format", "cdi")
    doc = body(next(iter(specs(root).values())))
    assert doc["containerEdits"] == nvidia["containerEdits"]
    edits = doc["devices"][0]["containerEdits"]
    assert edits["hooks"][0]["path"] == "/opt/nct/bin/nvidia-cdi-hook"
    caps = [n for n in edits["deviceNodes"] if n["path"].startswith("/dev/nvidia-caps/")]
    assert [(n["type"], n["major"]) for n in caps] == [("c", 237), ("c", 237)]
    assert [n["minor"] for n in caps] == [int(n["path"].rsplit("cap", 1)[1]) for n in caps]
    assert "type" not in edits["deviceNodes"][0]          # /dev/nvidia0 exists: the runtime reads it from the host
    # once the nodes exist, reconcile rewrites the spec in NVIDIA's plain form
    ok(cli, "sim", "devnodes", root, "--caps-nodes", "instances")
    assert cli("--sim", root, "cdi", "check").exit_code == 9
    ok(cli, "--sim", root, "reconcile", "--yes")
    edits = body(next(iter(specs(root).values())))["devices"][0]["containerEdits"]
    assert all("type" not in n for n in edits["deviceNodes"])
    # the chmod hook can be turned off, the vendor changed (config [cdi])
    cfg = root / "etc/gpuvirt/gpuvirt.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('[cdi]\nvendor = "example.org"\nchmod_hook = false\n')
    ok(cli, "--sim", root, "reconcile", "--yes")
    ((name, text),) = specs(root).items()
    doc = body(text)
    assert doc["kind"] == "example.org/mig" and "hooks" not in doc["devices"][0]["containerEdits"]
    cfg.write_text('[cdi]\nvendor = "-bad"\n')
    r = cli("--sim", root, "cdi", "check")
    assert r.exit_code == 2 and "cdi.vendor" in r.stderr


def test_gfx_profiles_get_the_drm_nodes(make_sim, cli):
    sim = make_sim(["rtx-pro-6000"], mig_enabled=True)
    root = sim.root
    ok(cli, "--sim", root, "attach", "g1", "--mig", "1g.24gb+gfx", "--format", "cdi")
    ok(cli, "--sim", root, "attach", "g2", "--mig", "1g.24gb", "--format", "cdi")
    by_consumer = {}
    for text in specs(root).values():
        meta = json.loads(text.splitlines()[1].split(": ", 1)[1])
        by_consumer[meta["consumer"]] = body(text)["devices"][0]["containerEdits"]
    gfx = [n["path"] for n in by_consumer["g1"]["deviceNodes"]]
    assert gfx[3:] == ["/dev/dri/card1", "/dev/dri/renderD128"], gfx
    assert by_consumer["g1"]["hooks"][0]["args"][4:] == ["--path", "/dev/dri", "--path", "/dev/nvidia-caps"]
    assert not any("/dev/dri" in n["path"] for n in by_consumer["g2"]["deviceNodes"])


def test_profile_mode_in_files_and_validation(make_sim, cli, tmp_path):
    from gpuvirt.errors import ProfileError
    from gpuvirt.model.profile import ProfileEntry, ProfileSpec
    from gpuvirt.model.profile_formats import parse_profiles, to_gpuvirt

    with pytest.raises(ProfileError, match="serve VMs"):
        ProfileSpec("x", entries=(ProfileEntry(vgpu={"A100-4C": 1}),), mode="containers")
    with pytest.raises(ProfileError, match="mode must be"):
        ProfileSpec("x", entries=(ProfileEntry(mig={"1g.5gb": 1}),), mode="both")
    _, (spec,) = parse_profiles("name: c\nmode: containers\nmig:\n  1g.5gb: 7\n", "c.yaml")
    assert spec.mode == "containers" and to_gpuvirt([spec])["profiles"][0]["mode"] == "containers"
    with pytest.raises(ProfileError, match="c.yaml:2"):
        parse_profiles("name: c\nmode: containers\nsriov_vfs: 4\n", "c.yaml")
    sim = make_sim(["a100-40gb"])
    root = sim.root
    r = cli("--sim", root, "create-profile", "bad", "--vgpu", "A100-4C=2", "--mode", "containers")
    assert r.exit_code == 2 and "serve VMs" in r.stderr
    r = ok(cli, "--sim", root, "create-profile", "whole", "--mode", "containers", "--model", "a100-40gb")
    assert "mode containers" in r.stdout and "MIG off" in r.stdout
    shown = ok(cli, "--sim", root, "profile", "show", "whole", "--json").json()
    assert shown["mode"] == "containers"
    f = tmp_path / "p.yaml"
    f.write_text("name: fromfile\nmig:\n  3g.20gb: 2\n")
    ok(cli, "--sim", root, "create-profile", "fromfile", "--from-file", f, "--mode", "containers")
    assert ok(cli, "--sim", root, "profile", "show", "fromfile", "--json").json()["mode"] == "containers"
    exported = ok(cli, "--sim", root, "profile", "export", "fromfile").stdout
    assert "mode: containers" in exported


# --- schema --------------------------------------------------------------------------------------------------------------
def _validator():
    pytest.importorskip("jsonschema")
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    schema = json.loads(reference("data", "cdi-schema", "schema.json").read_text())
    defs = json.loads(reference("data", "cdi-schema", "defs.json").read_text())
    registry = Registry().with_resource("defs.json", Resource.from_contents(defs, default_specification=DRAFT7))
    return jsonschema.Draft7Validator(schema, registry=registry)


def test_every_spec_gpuvirt_writes_validates_against_the_cdi_schema(make_sim, cli):
    v = _validator()
    for sample in ("minimal.json", "spec-example.json"):     # the validator itself works
        v.validate(json.loads(reference("data", "cdi-schema", sample).read_text()))
    with pytest.raises(Exception):
        v.validate({"cdiVersion": "0.5.0", "kind": "a/b", "devices": [{"name": "x"}]})
    sim = make_sim(["a100-40gb:2", "rtx-pro-6000", "l40s"], mig_enabled=True, enable_vfs=False)
    root = sim.root
    ok(cli, "sim", "devnodes", root, "--caps-nodes", "none")       # the numbered form too
    ok(cli, "--sim", root, "attach", "c1", "--mig", "1g.5gb", "--count", "3", "--format", "cdi")
    ok(cli, "--sim", root, "attach", "c2", "--mig", "1g.24gb+gfx", "--format", "cdi")
    ok(cli, "--sim", root, "attach", "c3", "--gpu", "3", "--format", "cdi")
    ok(cli, "sim", "bind", root, "0000:42:00.0", "--driver", "vfio-pci")
    # 42:00.0 had MIG on: nothing on it, so it can be bound; MIG state is not a vfio-pci GPU's concern
    ok(cli, "--sim", root, "attach", "c4", "--gpu", "0000:42:00.0", "--format", "cdi")
    files = specs(root)
    assert {n.split("_")[1] for n in files} == {"mig", "gpu", "vfio"} and len(files) == 6
    for text in files.values():
        doc = body(text)
        v.validate(doc)
        check_names(doc)
    ok(cli, "sim", "devnodes", root, "--caps-nodes", "instances")
    ok(cli, "--sim", root, "reconcile", "--yes")
    for text in specs(root).values():
        v.validate(body(text))


# --- the inventory ---------------------------------------------------------------------------------------------------------
def test_revision_0005_keeps_data_and_marks_profiled_gpus_vm(tmp_path):
    from sqlalchemy import text

    from gpuvirt.inventory.store import HEAD_REVISION, Inventory

    inv = Inventory.connect(f"sqlite:///{tmp_path / 'i.db'}", "h1")
    inv.upgrade("0003_intents")
    with inv.engine.begin() as c:
        c.execute(text("INSERT INTO hosts (id, hostname, root, simulated, created_at, last_seen_at) "
                       "VALUES ('h1', 'h1', '/', 0, '2026-01-01', '2026-01-01')"))
        c.execute(text("INSERT INTO profiles (name, kind, spec, source, created_at, updated_at) "
                       "VALUES ('p', 'mig', '{}', 'user', '2026-01-01', '2026-01-01')"))
        for addr, prof in (("0000:41:00.0", "'p'"), ("0000:42:00.0", "NULL")):
            c.execute(text("INSERT INTO gpus (host_id, address, vendor, memory_mib, mig_capable, present, "
                           f"desired_profile, last_seen_at) VALUES ('h1', '{addr}', 'nvidia', 1, 1, 1, {prof}, "
                           "'2026-01-01')"))
        c.execute(text("INSERT INTO instances (host_id, gpu_id, kind, state, origin, persistent, created_at, "
                       "updated_at) VALUES ('h1', 1, 'mig', 'active', 'profile', 1, '2026-01-01', '2026-01-01')"))
        c.execute(text("INSERT INTO allocations (instance_id, host_id, vm_name, persistent, created_at) "
                       "VALUES (1, 'h1', 'vm-old', 1, '2026-01-01')"))
    inv.ensure_schema()
    assert inv.current_revision() == HEAD_REVISION and inv.check() == []
    with inv.engine.begin() as c:
        assert c.execute(text("SELECT address, mode FROM gpus ORDER BY address")).all() == [
            ("0000:41:00.0", "vm"), ("0000:42:00.0", None)]
        assert c.execute(text("SELECT vm_name, consumer FROM allocations")).all() == [("vm-old", "vm")]
    inv.close()


@pytest.mark.pg
def test_revision_0005_on_postgresql(pg_schema):
    from sqlalchemy import text

    from gpuvirt.inventory.migrate import downgrade, upgrade
    from gpuvirt.inventory.store import HEAD_REVISION, Inventory

    url = pg_schema[0]
    inv = Inventory.connect(url, "h1")
    inv.upgrade("0003_intents")
    with inv.engine.begin() as c:
        c.execute(text("INSERT INTO hosts (id, hostname, root, simulated, created_at, last_seen_at) "
                       "VALUES ('h1', 'h1', '/', false, now(), now())"))
        c.execute(text("INSERT INTO profiles (name, kind, spec, source, created_at, updated_at) "
                       "VALUES ('p', 'mig', '{}', 'user', now(), now())"))
        c.execute(text("INSERT INTO gpus (host_id, address, vendor, memory_mib, mig_capable, present, "
                       "desired_profile, last_seen_at) VALUES ('h1', 'a', 'nvidia', 1, true, true, 'p', now())"))
        c.execute(text("INSERT INTO instances (host_id, gpu_id, kind, state, origin, persistent, created_at, "
                       "updated_at) SELECT 'h1', id, 'mig', 'active', 'profile', true, now(), now() FROM gpus"))
        c.execute(text("INSERT INTO allocations (instance_id, host_id, vm_name, persistent, created_at) "
                       "SELECT id, 'h1', 'vm-old', true, now() FROM instances"))
    inv.ensure_schema()
    assert inv.current_revision() == HEAD_REVISION and inv.check() == []
    with inv.engine.begin() as c:
        assert c.execute(text("SELECT g.mode, a.consumer FROM allocations a JOIN instances i ON "
                              "i.id = a.instance_id JOIN gpus g ON g.id = i.gpu_id")).all() == [("vm", "vm")]
    downgrade(inv.engine, "0003_intents")
    upgrade(inv.engine)
    assert inv.check() == []
    inv.close()
