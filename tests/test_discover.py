"""``gpuvirt discover``: the real discovery code on simulated hosts, on captured sysfs fixtures and on bad input.

Schema: docs/discover-schema.md.  Facts about the fixtures: ../shared/reference/vgpu-sysfs-samples/
(harvester/pcidevices testdata: an A2 VF acting as a classic mdev parent, an L40S VF on the vendor-specific
VFIO interface) and ../shared/reference/nvidia-vgpu.md section 7.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pynvml
import pytest

from gpuvirt.model import mig as migrules
from gpuvirt.model.catalog import load_catalog
from gpuvirt.sim.control import models_table
from gpuvirt.sim.kernel import SimKernel

from conftest import reference

CATALOG = load_catalog()
MODEL_IDS = [row["id"] for row in models_table()]       # exactly what `gpuvirt sim models` prints
PF = "0000:41:00.0"
PCI_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
FIXTURE = ("vgpu-sysfs-samples", "harvester-pcidevices")
A2_VF, L40S_VF = "0000:08:01.7", "0000:26:00.4"


def vf(i: int, bus: int = 0x41, offset: int = 4) -> str:
    devfn = offset + i
    return f"0000:{bus:02x}:{devfn // 8:02x}.{devfn % 8}"


@pytest.fixture(autouse=True)
def _reset_pynvml() -> Iterator[None]:
    yield
    pynvml.nvmlLib = None
    pynvml._nvmlGetFunctionPointer_cache.clear()


def discover_json(cli, *global_opts: str) -> dict[str, Any]:
    res = cli(*global_opts, "discover", "--json")
    assert res.exit_code == 0, res
    doc = res.json()
    check_schema(doc)
    return doc


def assert_one_line_error(res, code: int | None = None) -> None:
    assert res.exit_code != 0, res
    if code is not None:
        assert res.exit_code == code, res
    err = res.stderr.strip("\n")
    assert err.startswith("gpuvirt: error: "), res
    assert "\n" not in err, res
    assert "Traceback" not in res.stderr + res.stdout, res


# --- schema ------------------------------------------------------------------------------------------------------
def _keys(obj: Any, required: set[str], where: str) -> None:
    assert isinstance(obj, dict), where
    missing = required - set(obj)
    assert not missing, f"{where}: missing {sorted(missing)}"


def _opt(value: Any, typ: type | tuple) -> bool:
    return value is None or isinstance(value, typ)


def check_schema(doc: dict[str, Any]) -> None:
    """Every key docs/discover-schema.md promises, with its type."""
    _keys(doc, {"schema_version", "host", "nvml", "gpus", "pci_gpus", "sriov_pfs", "mdev_parents", "mdev_devices",
                "vfio_vfs", "warnings"}, "document")
    assert doc["schema_version"] == 1
    _keys(doc["host"], {"hostname", "root"}, "host")
    nv = doc["nvml"]
    _keys(nv, {"available", "reason", "driver_version"}, "nvml")
    assert isinstance(nv["available"], bool) and _opt(nv["reason"], str) and _opt(nv["driver_version"], str)
    assert (nv["reason"] is None) == nv["available"]
    for g in doc["gpus"]:
        _keys(g, {"index", "uuid", "pci_address", "name", "memory_mib", "model", "mig", "vgpu_scheduler"}, "gpus[]")
        sched = g["vgpu_scheduler"]
        if sched is not None:
            assert set(sched) == {"policy", "timeslice_us", "arr", "supported_policies", "timeslice_min_us",
                                  "timeslice_max_us", "arr_supported"}, sched
            assert sched["policy"] in (None, "best-effort", "equal-share", "fixed-share")
            assert _opt(sched["timeslice_us"], int) and isinstance(sched["arr"], bool)
            assert set(sched["supported_policies"]) <= {"best-effort", "equal-share", "fixed-share"}
            assert _opt(sched["timeslice_min_us"], int) and _opt(sched["timeslice_max_us"], int)
            assert (sched["timeslice_us"] is None) == (sched["policy"] == "best-effort")
        assert isinstance(g["index"], int) and g["uuid"].startswith("GPU-") and PCI_RE.match(g["pci_address"])
        assert isinstance(g["name"], str) and isinstance(g["memory_mib"], int)
        mig = g["mig"]
        _keys(mig, {"supported", "current", "pending", "gpu_instance_profiles", "gpu_instances"}, "gpus[].mig")
        assert isinstance(mig["supported"], bool)
        assert _opt(mig["current"], bool) and _opt(mig["pending"], bool)
        for p in mig["gpu_instance_profiles"]:
            _keys(p, {"id", "name", "memory_slices", "compute_slices", "max_instances", "placements"}, "profile")
            assert all(isinstance(p[k], int) for k in ("id", "memory_slices", "compute_slices", "max_instances"))
            assert re.match(r"^\d+g\.\d+gb", p["name"])
            for pl in p["placements"]:
                assert set(pl) == {"start", "size"} and pl["size"] == p["memory_slices"]
        for gi in mig["gpu_instances"]:
            _keys(gi, {"id", "profile_id", "profile_name", "placement", "compute_instances"}, "gpu_instances[]")
            assert set(gi["placement"]) == {"start", "size"}
            for ci in gi["compute_instances"]:
                _keys(ci, {"id", "profile_id", "placement", "uuid"}, "compute_instances[]")
    for d in doc["pci_gpus"]:
        _keys(d, {"address", "vendor", "vendor_id", "device_id", "class", "driver", "iommu_group", "physfn",
                  "sriov", "model", "name", "role"}, "pci_gpus[]")
        assert PCI_RE.match(d["address"]) and d["role"] in ("pf", "vf") and d["class"].startswith("0x03")
    for p in doc["sriov_pfs"]:
        _keys(p, {"address", "vendor", "vendor_id", "device_id", "driver", "total_vfs", "num_vfs", "vfs", "model"},
              "sriov_pfs[]")
        assert isinstance(p["total_vfs"], int) and isinstance(p["num_vfs"], int) and len(p["vfs"]) == p["num_vfs"]
    for p in doc["mdev_parents"]:
        _keys(p, {"address", "pci", "types", "devices"}, "mdev_parents[]")
        assert p["pci"] == bool(PCI_RE.match(p["address"]))
        for t in p["types"]:
            assert set(t) == {"id", "name", "description", "available_instances", "device_api"}, t
            assert isinstance(t["id"], str) and _opt(t["name"], str) and _opt(t["description"], str)
            assert isinstance(t["available_instances"], int) and isinstance(t["device_api"], str)
        for d in p["devices"]:
            assert set(d) == {"uuid", "type"} and UUID_RE.match(d["uuid"])
    for d in doc["mdev_devices"]:
        _keys(d, {"uuid", "parent", "type", "iommu_group"}, "mdev_devices[]")
    for v in doc["vfio_vfs"]:
        _keys(v, {"address", "physfn", "current_type", "creatable_types"}, "vfio_vfs[]")
        assert isinstance(v["current_type"], int)
        for t in v["creatable_types"]:
            assert set(t) == {"id", "name"} and isinstance(t["id"], int) and isinstance(t["name"], str)
    for w in doc["warnings"]:
        assert set(w) == {"path", "message"} and w["path"] and w["message"]


# --- every model --------------------------------------------------------------------------------------------------
def test_sim_models_lists_the_catalog(cli) -> None:
    res = cli("sim", "models")
    assert res.exit_code == 0, res
    listed = res.stdout.split()
    assert listed == MODEL_IDS
    assert set(listed) >= {"a100-40gb", "a100-80gb", "a30", "h100-80gb", "h100-nvl", "h200", "a2", "a10", "l40s",
                           "t4", "gvt-g", "amd-v620", "mtty"}


def _expected_mdev_types(model_id: str, *, mig_on: bool) -> list[dict[str, Any]]:
    model = CATALOG.get(model_id)
    if model.vgpu is not None:
        out = []
        for t in model.vgpu.types:
            if model.vgpu.parent == "vf":
                n = 0 if (mig_on or t.mig_backed) else 1
            else:
                n = 0 if t.mig_backed else t.max_instances
            out.append({"id": t.sysfs_id, "name": model.vgpu.name_prefix + t.name, "description": t.description(),
                        "available_instances": n, "device_api": "vfio-pci"})
        return sorted(out, key=lambda t: t["id"])
    spec = model.mdev
    out = []
    for t in spec.types:
        if not all(spec.pool.get(r, 0) >= c for r, c in t.cost.items()):
            continue                               # the driver does not register a type that never fits
        out.append({"id": spec.type_dir(t), "name": t.name if t.name is not None else spec.type_dir(t),
                    "description": t.description,
                    "available_instances": min(spec.pool[r] // c for r, c in t.cost.items() if c),
                    "device_api": t.device_api})
    return sorted(out, key=lambda t: t["id"])


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_discover_every_model(make_sim, cli, model_id: str) -> None:
    model = CATALOG.get(model_id)
    mig_on = model.mig is not None
    sim = make_sim([model_id], mig_enabled=mig_on)
    doc = discover_json(cli, "--sim", str(sim.root))
    assert doc["warnings"] == []
    assert doc["host"]["root"] == str(sim.root)

    # NVML: every NVIDIA board is an NVML GPU; MIG boards show the catalog's GPU-instance profiles
    if model.vendor == "nvidia":
        assert doc["nvml"]["available"] is True
        [g] = doc["gpus"]
        assert (g["index"], g["pci_address"], g["name"], g["memory_mib"], g["model"]) == \
            (0, PF, model.nvml_name or model.display_name, model.memory_mib, model_id)
        # the vGPU scheduler: every board with NVIDIA vGPU reports one (the driver default: best effort)
        assert (g["vgpu_scheduler"] is not None) is (model.vgpu is not None)
        if model.vgpu is not None:
            assert g["vgpu_scheduler"]["policy"] == "best-effort"
        mig = g["mig"]
        assert mig["supported"] is (model.mig is not None)
        if model.mig is not None:
            assert (mig["current"], mig["pending"]) == (True, True)
            assert mig["gpu_instances"] == [] and mig["profiles_source"] == "nvml"
            got = {p["id"]: p for p in mig["gpu_instance_profiles"]}
            assert len(got) == len(mig["gpu_instance_profiles"])
            assert {i: _strip(p) for i, p in got.items()} == {p.id: _profile(p) for p in model.mig.gi_profiles}
            for p in model.mig.gi_profiles:
                assert got[p.id]["memory_mib"] == p.memory_mib
                assert got[p.id]["remaining"] == migrules.remaining_capacity(model.mig, [], p)
        else:
            assert mig["current"] is None and mig["gpu_instance_profiles"] == [] and mig["gpu_instances"] == []
    else:
        assert doc["gpus"] == []

    # PCI identity
    pfs = [d for d in doc["pci_gpus"] if d["role"] == "pf"]
    if model.vendor_id is not None:
        [pf] = pfs
        assert (pf["vendor_id"], pf["device_id"], pf["model"]) == \
            (f"0x{model.vendor_id:04x}", f"0x{model.device_id:04x}", model_id)
        assert pf["address"] == ("0000:00:02.0" if model.vendor == "intel" else PF)
        if model.subsystem_device_id is not None:      # boards sharing a device id differ here (A2 / A16)
            assert pf["subsystem_id"] == f"0x{model.subsystem_device_id:04x}{model.subsystem_vendor_id:04x}"
        assert int(pf["class"], 16) == (model.pci_class or 0x030000)
    else:
        assert doc["pci_gpus"] == []

    # where each kind of device shows up
    parents = {p["address"]: p for p in doc["mdev_parents"]}
    if model.sriov is not None:
        vfs = [vf(i, offset=model.sriov.first_vf_offset) for i in range(model.sriov.total_vfs)]
        [spf] = doc["sriov_pfs"]
        assert (spf["address"], spf["total_vfs"], spf["num_vfs"], spf["vfs"], spf["model"]) == \
            (PF, model.sriov.total_vfs, model.sriov.total_vfs, vfs, model_id)
        vf_entries = [d for d in doc["pci_gpus"] if d["role"] == "vf"]
        assert [d["address"] for d in vf_entries] == vfs
        assert all(d["physfn"] == PF and d["model"] == model_id for d in vf_entries)
        assert {d["device_id"] for d in vf_entries} == {f"0x{model.sriov.vf_device_id:04x}"}
    else:
        vfs = []
        assert doc["sriov_pfs"] == []

    if model.vgpu is not None and model.vgpu.interface == "mdev" and model.vgpu.parent == "vf":
        # a2, a10, a100-40gb: every VF is a classic mdev parent
        assert list(parents) == vfs and doc["vfio_vfs"] == []
        for p in parents.values():
            assert p["pci"] is True and p["devices"] == []
            assert p["types"] == _expected_mdev_types(model_id, mig_on=mig_on)
    elif model.vgpu is not None and model.vgpu.interface == "mdev":
        # t4: the PF itself is the parent
        assert list(parents) == [PF] and doc["vfio_vfs"] == []
        assert parents[PF]["types"] == _expected_mdev_types(model_id, mig_on=mig_on)
    elif model.vgpu is not None:
        # l40s: vendor-specific VFIO, no mdev at all
        assert parents == {}
        assert [v["address"] for v in doc["vfio_vfs"]] == vfs
        expected = [{"id": t.id, "name": model.vgpu.name_prefix + t.name} for t in model.vgpu.types]
        for v in doc["vfio_vfs"]:
            assert (v["physfn"], v["current_type"], v["creatable_types"]) == (PF, 0, expected)
    elif model.mdev is not None:
        # gvt-g on the iGPU, the kernel samples as virtual (non-PCI) parents
        name = "0000:00:02.0" if model.mdev.parent_kind == "pci" else model.mdev.driver
        assert list(parents) == [name]
        assert parents[name]["pci"] is (model.mdev.parent_kind == "pci")
        assert parents[name]["types"] == _expected_mdev_types(model_id, mig_on=False)
        assert doc["vfio_vfs"] == []
    else:
        # amd-v620 (SR-IOV VFs handed out whole) and the MIG-only boards: nothing for mdev or vendor VFIO
        assert parents == {} and doc["vfio_vfs"] == []
        assert model.sriov is not None or model.mig is not None
    assert doc["mdev_devices"] == []


def _profile(p) -> dict[str, Any]:
    return {"id": p.id, "name": p.name, "memory_slices": p.memory_slices, "compute_slices": p.compute_slices,
            "max_instances": p.max_instances, "placements": [{"start": s, "size": z} for s, z in p.placements]}


def _strip(p: dict[str, Any]) -> dict[str, Any]:
    return {k: p[k] for k in ("id", "name", "memory_slices", "compute_slices", "max_instances", "placements")}


@pytest.mark.parametrize("model_id", [m for m in MODEL_IDS if CATALOG.get(m).mig is not None])
def test_mig_gpu_with_mig_off_still_shows_the_profile_table(make_sim, cli, model_id: str) -> None:
    model = CATALOG.get(model_id)
    sim = make_sim([model_id], enable_vfs=False)
    [g] = discover_json(cli, "--sim", str(sim.root))["gpus"]
    mig = g["mig"]
    assert (mig["supported"], mig["current"], mig["pending"]) == (True, False, False)
    assert mig["gpu_instances"] == [] and mig["profiles_source"] == "catalog"
    assert {p["id"]: _strip(p) for p in mig["gpu_instance_profiles"]} == \
        {p.id: _profile(p) for p in model.mig.gi_profiles}


def test_gpu_and_compute_instances_created_through_nvml(make_sim, cli) -> None:
    from gpuvirt.host.nvml import NvmlSession
    from gpuvirt.sim.nvml import FakeNvmlLib

    sim = make_sim(["a100-40gb", "h100-80gb"], mig_enabled=True, enable_vfs=False)
    with NvmlSession(FakeNvmlLib(sim)) as s:
        gi_a = s.create_gpu_instance(0, 9)                         # 3g.20gb where the driver puts it
        gi_b = s.create_gpu_instance(0, 19, start=6)               # 1g.5gb at slice 6
        ci = s.create_compute_instance(0, gi_a.id)                 # the whole 3g
        ci_small = s.create_compute_instance(1, s.create_gpu_instance(1, 14).id, ci_profile_id=0)
        expected = {i: s.gpu_instances(i) for i in (0, 1)}
    doc = discover_json(cli, "--sim", str(sim.root))
    g0 = doc["gpus"][0]["mig"]["gpu_instances"]
    assert [gi["id"] for gi in g0] == sorted([gi_a.id, gi_b.id])
    by_id = {gi["id"]: gi for gi in g0}
    assert by_id[gi_a.id] == {
        "id": gi_a.id, "profile_id": 9, "profile_name": "3g.20gb",
        "placement": {"start": gi_a.start, "size": 4},
        "compute_instances": [{"id": ci.id, "profile_id": ci.profile_id, "placement": {"start": 0, "size": 3},
                               "uuid": ci.uuid}]}
    assert gi_a.start == 0                                          # the driver puts the first 3g at 0
    assert by_id[gi_b.id] == {"id": 13, "profile_id": 19, "profile_name": "1g.5gb",
                              "placement": {"start": 6, "size": 1}, "compute_instances": []}
    assert ci.uuid.startswith("MIG-")
    for index in (0, 1):
        got = doc["gpus"][index]["mig"]["gpu_instances"]
        assert [(gi["id"], gi["profile_id"], gi["placement"]["start"], gi["placement"]["size"],
                 [(c["id"], c["profile_id"], c["uuid"]) for c in gi["compute_instances"]]) for gi in got] == \
            [(gi.id, gi.profile_id, gi.start, gi.size, [(c.id, c.profile_id, c.uuid) for c in gi.compute_instances])
             for gi in expected[index]]
    h100 = doc["gpus"][1]["mig"]["gpu_instances"]
    assert h100[0]["profile_name"] == "2g.20gb" and h100[0]["compute_instances"][0]["uuid"] == ci_small.uuid
    # capacity figures follow the layout
    prof = {p["id"]: p for p in doc["gpus"][0]["mig"]["gpu_instance_profiles"]}
    assert (prof[0]["remaining"], prof[9]["remaining"], prof[19]["remaining"]) == (0, 0, 2)
    # the table view draws which memory slices each instance occupies
    res = cli("--sim", str(sim.root), "discover")
    assert res.exit_code == 0, res
    assert "memory slices" in res.stdout and "GI1:3g.20gb" in res.stdout.replace("\n", "")


def test_mdev_devices_are_listed_under_their_parent(make_sim, cli) -> None:
    sim = make_sim(["a2", "mtty"])
    k = SimKernel(sim)
    u1, u2 = "6a1f0c2e-0000-4000-8000-000000000001", "6a1f0c2e-0000-4000-8000-000000000002"
    k.write(sim.root / f"sys/class/mdev_bus/{vf(3)}/mdev_supported_types/nvidia-746/create", u1)
    k.write(sim.root / "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create", u2)
    doc = discover_json(cli, "--sim", str(sim.root))
    parents = {p["address"]: p for p in doc["mdev_parents"]}
    assert parents[vf(3)]["devices"] == [{"uuid": u1, "type": "nvidia-746"}]
    assert parents["mtty"]["devices"] == [{"uuid": u2, "type": "mtty-2"}]
    assert all(not p["devices"] for a, p in parents.items() if a not in (vf(3), "mtty"))
    assert {(d["uuid"], d["parent"], d["type"]) for d in doc["mdev_devices"]} == \
        {(u1, vf(3), "nvidia-746"), (u2, "mtty", "mtty-2")}
    assert all(isinstance(d["iommu_group"], int) for d in doc["mdev_devices"])
    assert {t["id"]: t["available_instances"] for t in parents["mtty"]["types"]} == {"mtty-1": 22, "mtty-2": 11}
    assert {t["id"] for t in parents[vf(4)]["types"] if t["available_instances"]} == \
        {"nvidia-746", "nvidia-751", "nvidia-754"}


def test_root_and_sim_read_the_same_sysfs(make_sim, cli, gpuvirt_proc) -> None:
    sim = make_sim(["t4", "l40s", "gvt-g", "amd-v620", "mtty"])
    by_sim = discover_json(cli, "--sim", str(sim.root))
    res = gpuvirt_proc("--root", str(sim.root), "discover", "--json")
    assert res.exit_code == 0, res
    by_root = res.json()
    check_schema(by_root)
    for key in ("pci_gpus", "sriov_pfs", "mdev_parents", "mdev_devices", "vfio_vfs", "warnings"):
        assert by_root[key] == by_sim[key], key
    # the same through the environment
    env = dict(os.environ, GPUVIRT_SIM=str(sim.root))
    res = gpuvirt_proc("discover", "--json", env=env)
    assert res.exit_code == 0, res
    assert res.json()["mdev_parents"] == by_sim["mdev_parents"] and res.json()["nvml"]["available"] is True


# --- the captured fixtures (harvester/pcidevices testdata) --------------------------------------------------------
def _fixture_copy(tmp_path: Path, *, complete: bool) -> Path:
    src = reference(*FIXTURE)
    dst = tmp_path / "fixture"
    shutil.copytree(src, dst, symlinks=True)
    for d, _, files in os.walk(dst):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    if complete:
        # the fixture keeps only what the upstream test needed; give the L40S VF the PCI identity every
        # real VF has (class/vendor/device) and the A2 VF its sys/bus/pci/devices link - in this copy only
        vf_dir = dst / "sys/bus/pci/devices" / L40S_VF
        (vf_dir / "class").write_text("0x030200\n")
        (vf_dir / "vendor").write_text("0x10de\n")
        (vf_dir / "device").write_text("0x26b9\n")
        os.symlink(f"../../../class/mdev_bus/{A2_VF}", dst / "sys/bus/pci/devices" / A2_VF)
    return dst


def _fixture_a2_types() -> list[dict[str, Any]]:
    base = reference(*FIXTURE, "sys/class/mdev_bus", A2_VF, "mdev_supported_types")
    out = []
    for t in sorted(os.listdir(base)):
        out.append({"id": t, "name": (base / t / "name").read_text().strip(),
                    "description": (base / t / "description").read_text().rstrip("\n"),
                    "available_instances": int((base / t / "available_instances").read_text()),
                    "device_api": (base / t / "device_api").read_text().strip()})
    return out


def _fixture_l40s_types() -> list[dict[str, Any]]:
    text = reference(*FIXTURE, "sys/bus/pci/devices", L40S_VF, "nvidia/creatable_vgpu_types").read_text()
    lines = text.splitlines()
    assert lines[0].split() == ["ID", ":", "vGPU", "Name"]
    return [{"id": int(line.split(":", 1)[0]), "name": line.split(":", 1)[1].strip()} for line in lines[1:]]


def test_fixture_a2_vf_as_is(tmp_path: Path, gpuvirt_proc) -> None:
    root = _fixture_copy(tmp_path, complete=False)
    res = gpuvirt_proc("--root", str(root), "discover", "--json")
    assert res.exit_code == 0, res
    doc = res.json()
    check_schema(doc)
    [parent] = doc["mdev_parents"]
    assert parent["address"] == A2_VF and parent["pci"] is True and parent["devices"] == []
    types = parent["types"]
    assert types == _fixture_a2_types()
    assert [t["id"] for t in types] == [f"nvidia-{n}" for n in range(742, 757)]
    assert {t["id"] for t in types if t["available_instances"] == 1} == {"nvidia-746", "nvidia-751", "nvidia-754"}
    assert {t["available_instances"] for t in types} == {0, 1}
    by_id = {t["id"]: t for t in types}
    assert by_id["nvidia-746"]["name"] == "NVIDIA A2-4Q"
    assert by_id["nvidia-746"]["description"] == \
        "num_heads=4, frl_config=60, framebuffer=4096M, max_resolution=7680x4320, max_instance=4"
    assert {t["device_api"] for t in types} == {"vfio-pci"}
    # the L40S VF directory carries no PCI identity in the fixture: reported, not fatal
    assert {"path": f"/sys/bus/pci/devices/{L40S_VF}/class",
            "message": "PCI device has no class attribute (device removed?)"} in doc["warnings"]


def test_fixture_l40s_vf_vendor_vfio(tmp_path: Path, gpuvirt_proc) -> None:
    root = _fixture_copy(tmp_path, complete=True)
    res = gpuvirt_proc("--root", str(root), "discover", "--json")
    assert res.exit_code == 0, res
    doc = res.json()
    check_schema(doc)
    assert doc["warnings"] == []
    [l40s] = doc["vfio_vfs"]
    assert l40s["address"] == L40S_VF and l40s["current_type"] == 0 and l40s["physfn"] is None
    assert l40s["creatable_types"] == _fixture_l40s_types()
    assert len(l40s["creatable_types"]) == 23
    assert [t["id"] for t in l40s["creatable_types"]] == list(range(1145, 1167)) + [2164]
    assert l40s["creatable_types"][0] == {"id": 1145, "name": "NVIDIA L40S-1B"}
    assert l40s["creatable_types"][-1] == {"id": 2164, "name": "NVIDIA L40S-3B"}
    [a2] = doc["mdev_parents"]
    assert a2["types"] == _fixture_a2_types()
    models = {d["address"]: d["model"] for d in doc["pci_gpus"]}
    assert models == {A2_VF: "a2", L40S_VF: "l40s"}


def test_simulator_reproduces_the_fixtures(make_sim, cli) -> None:
    """The fixture's A2 VF shows the state after one 4096M vGPU exists on a sibling VF; the simulator gives
    the same 15 types, byte for byte, in that state.  An idle simulated L40S VF lists what the fixture lists."""
    expected_a2 = _fixture_a2_types()
    sim = make_sim(["a2"])          # two hosts: the A2 fixture is classic mdev, the L40S one vendor VFIO
    SimKernel(sim).write(sim.root / f"sys/class/mdev_bus/{vf(0)}/mdev_supported_types/nvidia-754/create",
                         "6a1f0c2e-0000-4000-8000-0000000000aa\n")
    doc = discover_json(cli, "--sim", str(sim.root))
    parents = {p["address"]: p for p in doc["mdev_parents"]}
    for i in range(1, 16):
        assert parents[vf(i)]["types"] == expected_a2
    sim = make_sim(["l40s"])
    doc = discover_json(cli, "--sim", str(sim.root))
    fixture_text = reference(*FIXTURE, "sys/bus/pci/devices", L40S_VF, "nvidia/creatable_vgpu_types").read_text()
    sim_text = (sim.root / "sys/bus/pci/devices" / vf(0) / "nvidia/creatable_vgpu_types").read_text()
    assert sim_text == fixture_text
    assert [v["creatable_types"] for v in doc["vfio_vfs"]] == [_fixture_l40s_types()] * 32


# --- broken entries become warnings -------------------------------------------------------------------------------
MTTY_DEV = "6a1f0c2e-0000-4000-8000-0000000000bb"
L40S_PF = "0000:42:00.0"


def _break_types_dir(root: Path, doc: dict) -> str:
    shutil.rmtree(root / f"sys/class/mdev_bus/{PF}/mdev_supported_types")
    next(p for p in doc["mdev_parents"] if p["address"] == PF)["types"] = []
    return f"/sys/class/mdev_bus/{PF}/mdev_supported_types"


def _break_available(root: Path, doc: dict) -> str:
    (root / "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1/available_instances").write_text("many\n")
    p = next(p for p in doc["mdev_parents"] if p["address"] == "mtty")
    p["types"] = [t for t in p["types"] if t["id"] != "mtty-1"]
    return "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1/available_instances"


def _break_device_api(root: Path, doc: dict) -> str:
    (root / f"sys/class/mdev_bus/{PF}/mdev_supported_types/nvidia-230/device_api").unlink()
    p = next(p for p in doc["mdev_parents"] if p["address"] == PF)
    p["types"] = [t for t in p["types"] if t["id"] != "nvidia-230"]
    return f"/sys/class/mdev_bus/{PF}/mdev_supported_types/nvidia-230/device_api"


def _break_mdev_link(root: Path, doc: dict) -> str:
    shutil.rmtree(root / "sys/devices/virtual/mtty/mtty" / MTTY_DEV)   # half-removed: the bus link dangles
    doc["mdev_devices"] = []
    next(p for p in doc["mdev_parents"] if p["address"] == "mtty")["devices"] = []
    return f"/sys/bus/mdev/devices/{MTTY_DEV}"


def _break_creatable(root: Path, doc: dict) -> str:
    path = root / "sys/bus/pci/devices" / vf(0, bus=0x42) / "nvidia/creatable_vgpu_types"
    path.unlink()
    path.mkdir()                                   # reading it now fails (EISDIR), even as root
    next(v for v in doc["vfio_vfs"] if v["address"] == vf(0, bus=0x42))["creatable_types"] = []
    return f"/sys/bus/pci/devices/{vf(0, bus=0x42)}/nvidia/creatable_vgpu_types"


@pytest.mark.parametrize("breaker", [_break_types_dir, _break_available, _break_device_api, _break_mdev_link,
                                     _break_creatable],
                         ids=["no-mdev_supported_types", "non-numeric-available", "no-device_api",
                              "dangling-mdev-link", "unreadable-creatable"])
def test_broken_entry_becomes_a_warning(make_sim, cli, breaker) -> None:
    # the L40S forces the vendor-VFIO interface host-wide; the T4 PF is an mdev parent only on an mdev host
    sim = make_sim(["t4", "mtty", "l40s"], vgpu_interface="vendor-vfio" if breaker is _break_creatable else "mdev")
    SimKernel(sim).write(sim.root / "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create", MTTY_DEV)
    before = discover_json(cli, "--sim", str(sim.root))
    assert before["warnings"] == []
    expected = copy.deepcopy(before)
    path = breaker(sim.root, expected)
    after = discover_json(cli, "--sim", str(sim.root))
    [warning] = after["warnings"]
    assert warning["path"] == path and "\n" not in warning["message"]
    # everything else is still listed, unchanged
    expected["warnings"] = after["warnings"]
    assert after == expected
    # the table view reports it on stderr and still succeeds
    res = cli("--sim", str(sim.root), "discover")
    assert res.exit_code == 0 and "warning:" in res.stderr and path in res.stderr.replace("\n", "")


# --- bad input ----------------------------------------------------------------------------------------------------
def test_unknown_model_in_sim_init(tmp_path: Path, cli, gpuvirt_proc) -> None:
    res = cli("sim", "init", tmp_path / "h", "--gpu", "a100-40gb", "--gpu", "b900")
    assert_one_line_error(res, 3)
    assert "unknown GPU model 'b900'" in res.stderr and "a100-40gb" in res.stderr
    assert not (tmp_path / "h" / ".gpuvirt-sim").exists()
    res = gpuvirt_proc("sim", "init", tmp_path / "p", "--gpu", "nope:2")
    assert_one_line_error(res, 3)
    res = cli("sim", "init", tmp_path / "h", "--gpu", "a2:0")
    assert_one_line_error(res, 2)


def test_wrong_root(tmp_path: Path, cli, gpuvirt_proc) -> None:
    res = gpuvirt_proc("--root", tmp_path / "does-not-exist", "discover", "--json")
    assert_one_line_error(res, 2)
    assert "does-not-exist" in res.stderr and res.stdout == ""
    (tmp_path / "file").write_text("x")
    assert_one_line_error(cli("--root", tmp_path / "file", "discover", "--json"), 2)
    # a simulated host that is not there is "not found" (3), through typer and through the fast path alike
    assert_one_line_error(cli("--sim", tmp_path / "does-not-exist", "discover", "--json"), 3)
    for args in (["discover", "--json"], ["discover"], ["report", "-f", "json"], ["status"], ["db", "current"]):
        res = gpuvirt_proc("--sim", tmp_path / "does-not-exist", *args)
        assert_one_line_error(res, 3)
        assert "does not exist" in res.stderr and res.stdout == "", (args, res)
    assert not (tmp_path / "does-not-exist").exists()       # nothing was created there (no inventory either)
    res = cli("--sim", tmp_path, "discover", "--json")                          # a directory, not a sim
    assert_one_line_error(res, 3)
    assert "gpuvirt sim init" in res.stderr
    assert_one_line_error(gpuvirt_proc("--sim", tmp_path, "discover", "--json"), 3)
    # an empty tree is a host without GPUs, not an error
    (tmp_path / "empty").mkdir()
    doc = discover_json(cli, "--root", str(tmp_path / "empty"))
    assert doc["mdev_parents"] == doc["vfio_vfs"] == doc["pci_gpus"] == doc["sriov_pfs"] == []


def test_debug_after_the_command_and_usage_errors_never_print_a_traceback(make_sim, cli, gpuvirt_proc,
                                                                          tmp_path) -> None:
    sim = make_sim(["a2"])
    # --debug is global, but is accepted after the command word too: through the fast paths (console script)
    # and through typer (table forms)
    for args in (["discover", "--json", "--debug"], ["report", "-f", "json", "--debug"], ["discover", "--debug"],
                 ["report", "--debug"], ["status", "--debug"]):
        for run in (cli, gpuvirt_proc):
            res = run("--sim", sim.root, *args)
            assert res.exit_code == 0 and res.stderr == "" and res.stdout, (args, res)
    # ... and still means "traceback on error" there
    res = gpuvirt_proc("--sim", tmp_path / "nothing", "discover", "--json", "--debug")
    assert res.exit_code == 3 and "Traceback" in res.stderr, res
    assert res.stderr.rstrip("\n").splitlines()[-1].startswith("gpuvirt: error: simulated host")
    # an unknown option is one line and exit 2, even when a traceback was asked for
    for args in (["--debug", "report", "-f", "json", "--nosuch"], ["report", "-f", "json", "--nosuch", "--debug"],
                 ["--debug", "discover", "--json", "--nosuch"], ["discover", "--nosuch"], ["--debug", "status", "-x"]):
        for run in (cli, gpuvirt_proc):
            res = run("--sim", sim.root, *args)
            assert_one_line_error(res, 2)
            assert "No such option" in res.stderr and res.stdout == "", (args, res)
    env = {**os.environ, "GPUVIRT_DEBUG": "1"}
    assert_one_line_error(gpuvirt_proc("--sim", sim.root, "discover", "--json", "--bogus", env=env), 2)


def test_host_without_nvml(tmp_path: Path, cli, gpuvirt_proc) -> None:
    res = cli("sim", "init", tmp_path / "h", "--gpu", "a2", "--gpu", "a100-80gb", "--no-driver")
    assert res.exit_code == 0, res
    doc = discover_json(cli, "--sim", str(tmp_path / "h"))
    assert doc["nvml"]["available"] is False
    assert isinstance(doc["nvml"]["reason"], str) and doc["nvml"]["reason"]
    assert doc["gpus"] == []
    assert len(doc["mdev_parents"]) == 16                        # sysfs is still read in full
    assert [p["address"] for p in doc["sriov_pfs"]] == [PF]
    assert {d["model"] for d in doc["pci_gpus"] if d["role"] == "pf"} == {"a2", "a100-80gb"}
    res = gpuvirt_proc("--sim", tmp_path / "h", "discover")
    assert res.exit_code == 0 and "unavailable" in res.stdout and "Traceback" not in res.stderr, res


def test_corrupt_sim_state(make_sim, cli, gpuvirt_proc) -> None:
    sim = make_sim(["mtty"])
    sim.state_path.write_text('{"format": "gpuvirt-sim", "vers')
    res = gpuvirt_proc("--sim", sim.root, "discover", "--json")
    assert_one_line_error(res, 1)
    assert "corrupt" in res.stderr and str(sim.state_path) in res.stderr and res.stdout == ""
    assert_one_line_error(cli("--sim", sim.root, "discover"))
    sim.state_path.write_text("[]")
    assert_one_line_error(cli("--sim", sim.root, "discover", "--json"))


def test_sibling_vfs_and_uevent_ids_read_what_the_files_say(make_sim, cli) -> None:
    """Discovery reads static type attributes once per PF and PCI ids from uevent (docs/discover-schema.md):
    the result must equal what every file says, read one by one."""
    sim = make_sim(["a2"])
    k = SimKernel(sim)
    k.write(sim.root / f"sys/class/mdev_bus/{vf(3)}/mdev_supported_types/nvidia-746/create",
            "6a1f0c2e-0000-4000-8000-0000000000aa")
    doc = discover_json(cli, "--sim", str(sim.root))
    bus = sim.root / "sys/class/mdev_bus"
    for p in doc["mdev_parents"]:
        tdir = bus / p["address"] / "mdev_supported_types"
        want = []
        for t in sorted(os.listdir(tdir)):
            def attr(name: str, strip: bool = True) -> str | None:
                f = tdir / t / name
                if not f.exists():
                    return None
                text = f.read_text()
                return text.strip() if strip else text.rstrip("\n")
            want.append({"id": t, "name": attr("name"), "description": attr("description", False),
                         "available_instances": int(attr("available_instances")), "device_api": attr("device_api")})
        assert p["types"] == want, p["address"]
    assert {t["available_instances"] for p in doc["mdev_parents"] if p["address"] != vf(3)
            for t in p["types"] if t["id"] == "nvidia-746"} == {1}
    # without uevent files the ids and drivers come from the attribute files: the same answer
    for d in (PF, vf(0), vf(3)):
        (sim.root / "sys/bus/pci/devices" / d / "uevent").resolve().unlink()
    assert discover_json(cli, "--sim", str(sim.root))["pci_gpus"] == doc["pci_gpus"]


def test_the_table_form_is_the_same_through_typer_and_the_fast_path(make_sim, cli, gpuvirt_proc) -> None:
    sim = make_sim(["a100-40gb", "a2", "mtty"])
    k = SimKernel(sim)
    k.write(sim.root / "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create",
            "6a1f0c2e-0000-4000-8000-0000000000bb")
    typer_run = cli("--sim", sim.root, "discover")
    fast = gpuvirt_proc("--sim", sim.root, "discover")
    assert typer_run.exit_code == fast.exit_code == 0, fast
    assert typer_run.stdout == fast.stdout
    lines = fast.stdout.splitlines()
    assert lines[0].startswith("Host ") and "mdev parents" in lines and "mdev devices" in lines
    # plain columns: a header, a dashed rule as wide as each column, no box drawing, no escape sequences
    i = lines.index("mdev devices")
    assert lines[i + 1].split() == ["UUID", "parent", "type", "IOMMU"]
    assert set(lines[i + 2].replace(" ", "")) == {"-"}
    assert "6a1f0c2e-0000-4000-8000-0000000000bb" in lines[i + 3]
    assert not any(c in fast.stdout for c in "│┃━─\x1b")


def test_table_cells_cannot_break_lines_or_send_escapes() -> None:
    from gpuvirt.cli.discover_view import plain_table

    lines = plain_table("t", ["a", "b"], [["x\ny", "\x1b[31mred"], [None, 7]])
    assert lines == ["t", "a    b", "---  --------", "x?y  ?[31mred", "     7", ""]
