"""Building the state of a new simulated host from ``--gpu MODEL[:COUNT]`` specs."""

from __future__ import annotations

import re
import secrets
import uuid
from typing import Any, Sequence

from gpuvirt.errors import NotFoundError, UsageError
from gpuvirt.model.catalog import VGPU_INTERFACES, GpuModel, load_catalog
from gpuvirt.sim.state import FORMAT, VERSION

_NS = uuid.UUID("6c1f6b0e-4f0c-4b43-9e4a-7d5a1b9f2c11")
MAX_GPUS = 64
FIRST_BUS = 0x41


def parse_gpu_spec(spec: str) -> tuple[GpuModel, int]:
    m = re.fullmatch(r"\s*([A-Za-z0-9._+-]+)\s*(?::\s*(\S+))?\s*", spec)
    if not m:
        raise UsageError(f"invalid --gpu value '{spec}' (expected MODEL[:COUNT], e.g. a100-40gb:2)")
    try:
        model = load_catalog().get(m.group(1))
    except NotFoundError as exc:
        raise NotFoundError(f"unknown GPU model '{m.group(1)}' in --gpu; run 'gpuvirt sim models' "
                            f"(known: {', '.join(load_catalog().ids())})") from exc
    count = 1
    if m.group(2) is not None:
        if not m.group(2).isdigit() or not (1 <= int(m.group(2)) <= MAX_GPUS):
            raise UsageError(f"invalid count in --gpu '{spec}': must be an integer from 1 to {MAX_GPUS}")
        count = int(m.group(2))
    return model, count


def gpu_uuid(seed: str, address: str) -> str:
    return "GPU-" + str(uuid.uuid5(_NS, f"{seed}/{address}"))


def mig_uuid(seed: str, gpu_uuid_: str, gi: int, ci: int, boot: int) -> str:
    # MIG device UUIDs are new after every (re)creation on real drivers; include the boot counter and ids
    return "MIG-" + str(uuid.uuid5(_NS, f"{seed}/{gpu_uuid_}/{boot}/{gi}/{ci}"))


def vf_address(pf_address: str, index: int, offset: int) -> str:
    dom, bus, rest = pf_address.split(":")
    devfn = offset + index
    return f"{dom}:{bus}:{devfn // 8:02x}.{devfn % 8}"


def host_vgpu_interface(models: Sequence[GpuModel]) -> str | None:
    """The one vGPU interface of a host holding these boards (reference nvidia-vgpu.md section 1: a host
    runs either classic mdev or the vendor-specific VFIO interface, never both).  Boards that agree get
    their usual interface; a mix gets vendor-vfio, because the vGPU manager that drives the newer board
    (vGPU 17+ on a >= 6.8 kernel) offers no mdev at all - UNVERIFIED, see docs/simulator-fidelity.md."""
    usual = {m.vgpu.interface for m in models if m.vgpu is not None}
    if not usual:
        return None
    return usual.pop() if len(usual) == 1 else "vendor-vfio"


def new_state(specs: Sequence[str], *, seed: str | None = None, vgpu_interface: str | None = None,
              enable_vfs: bool = True, mig_enabled: bool = False, driver_loaded: bool = True) -> dict[str, Any]:
    if not specs:
        raise UsageError("give at least one --gpu MODEL[:COUNT] (see 'gpuvirt sim models')")
    if vgpu_interface is not None and vgpu_interface not in VGPU_INTERFACES:
        raise UsageError(f"--vgpu-interface must be one of: {', '.join(VGPU_INTERFACES)}")
    seed = seed or secrets.token_hex(8)
    parsed = [parse_gpu_spec(s) for s in specs]
    total = sum(c for _, c in parsed)
    if total > MAX_GPUS:
        raise UsageError(f"at most {MAX_GPUS} devices per simulated host (asked for {total})")
    if vgpu_interface is None:
        vgpu_interface = host_vgpu_interface([m for m, _ in parsed])

    state: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "seed": seed, "boot": 1,
        "vgpu_interface": vgpu_interface, "driver_loaded": driver_loaded,
        "devices": [], "mdevs": [], "faults": [], "next_iommu_group": 16,
    }
    bus = FIRST_BUS
    seen_singletons: set[str] = set()
    for model, count in parsed:
        for _ in range(count):
            dev: dict[str, Any] = {"model": model.id, "address": None, "name": None, "uuid": None,
                                   "nvml_index": None, "iommu_group": None, "interface": None,
                                   "mig": None, "sriov": None, "vfs": [], "clients": []}
            if model.vendor == "virtual":
                if model.id in seen_singletons:
                    raise UsageError(f"the {model.id} sample driver registers one parent; use {model.id}:1")
                seen_singletons.add(model.id)
                assert model.mdev is not None
                dev["name"] = model.mdev.driver
            elif model.vendor == "intel":
                if "intel-igpu" in seen_singletons:
                    raise UsageError("a host has one Intel integrated GPU (0000:00:02.0); use gvt-g:1")
                seen_singletons.add("intel-igpu")
                dev["address"] = "0000:00:02.0"
            else:
                if bus > 0xFF:
                    raise UsageError("too many PCI GPUs for one simulated host")
                dev["address"] = f"0000:{bus:02x}:00.0"
                bus += 1
            if dev["address"]:
                dev["iommu_group"] = state["next_iommu_group"]
                state["next_iommu_group"] += 1
            if model.vendor == "nvidia":
                dev["uuid"] = gpu_uuid(seed, dev["address"])
            if model.vgpu:
                dev["interface"] = vgpu_interface or model.vgpu.interface
            if model.mig:
                on = 1 if mig_enabled else 0
                dev["mig"] = {"current": on, "pending": on, "gpu_instances": []}
            if model.sriov:
                dev["sriov"] = {"numvfs": 0}
                if enable_vfs:
                    enable_vfs_on(state, dev, model.sriov.total_vfs)
            state["devices"].append(dev)

    nvidia = sorted((d for d in state["devices"] if d["uuid"]), key=lambda d: d["address"])
    for i, d in enumerate(nvidia):
        d["nvml_index"] = i
    return state


def enable_vfs_on(state: dict[str, Any], dev: dict[str, Any], numvfs: int, *, now: float | None = None) -> None:
    """Create ``numvfs`` VFs.  With ``now`` (a write to ``sriov_numvfs``, not ``sim init``), the host's
    ``vf_delay_s`` and ``registration_delay_s`` apply: the functions appear, and nvidia-vgpud registers their
    vGPU types, at those wall-clock deadlines (applied by :mod:`gpuvirt.sim.world`)."""
    from gpuvirt.sim import rules
    from gpuvirt.sim.state import behaviour

    model = load_catalog().get(dev["model"])
    assert model.sriov is not None
    dev["sriov"]["numvfs"] = numvfs
    dev["vfs"] = []
    vf_delay = reg_delay = 0.0
    if now is not None:
        b = behaviour(state)
        vf_delay, reg_delay = float(b["vf_delay_s"]), float(b["registration_delay_s"])
    register = reg_delay > 0 and rules.needs_registration(state, dev, pf=False)
    for i in range(numvfs):
        vf: dict[str, Any] = {"address": vf_address(dev["address"], i, model.sriov.first_vf_offset), "index": i,
                              "iommu_group": state["next_iommu_group"], "current_vgpu_type": 0,
                              "gpu_instance_id": None, "open": False}
        if vf_delay > 0:
            vf["appear_at"] = now + vf_delay  # type: ignore[operator]
        if register:
            vf["register_at"] = now + vf_delay + reg_delay  # type: ignore[operator]
        dev["vfs"].append(vf)
        state["next_iommu_group"] += 1


def disable_vfs_on(state: dict[str, Any], dev: dict[str, Any]) -> None:
    gone = {vf["address"] for vf in dev.get("vfs", [])}
    state["mdevs"] = [m for m in state["mdevs"] if m["parent"] not in gone]
    dev["vfs"] = []
    if dev.get("sriov") is not None:
        dev["sriov"]["numvfs"] = 0
