"""Operator/test controls of a simulated host: create, reboot, inject faults, hold devices open.

These act on the simulator directly (they are the "world" around the host, not gpuvirt's code path):
``gpuvirt sim init|reboot|fault|open|close|client|models|show``.
"""

from __future__ import annotations

import errno as errno_mod
import shutil
from pathlib import Path
from typing import Any, Sequence

from gpuvirt.errors import NotFoundError, SimulatorError, UsageError
from gpuvirt.model.catalog import load_catalog
from gpuvirt.sim import tree
from gpuvirt.sim.build import new_state
from gpuvirt.sim.kernel import attach_renderer
from gpuvirt.sim.state import STATE_DIR, SimHost

FAULT_OPS = (
    "mdev.create", "mdev.remove", "vgpu.set", "vgpu.clear", "sriov.enable", "sriov.disable", "pci.reset",
    "nvml.CreateGpuInstance", "nvml.DestroyGpuInstance", "nvml.CreateComputeInstance",
    "nvml.DestroyComputeInstance", "nvml.SetMigMode",
    "nvml.SetVgpuSchedulerState",
)


def open_sim(root: str | Path) -> SimHost:
    sim = SimHost(root)
    sim.peek()  # a missing or corrupt state is reported here, before anything reads the tree
    return attach_renderer(sim)


def init_sim(root: str | Path, specs: Sequence[str], *, seed: str | None = None, vgpu_interface: str | None = None,
             enable_vfs: bool = True, mig_enabled: bool = False, driver_loaded: bool = True,
             force: bool = False) -> SimHost:
    root = Path(root).absolute()
    state = new_state(specs, seed=seed, vgpu_interface=vgpu_interface, enable_vfs=enable_vfs,
                      mig_enabled=mig_enabled, driver_loaded=driver_loaded)
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} exists and is not a directory")
    if (root / STATE_DIR).exists():
        if not force:
            raise UsageError(f"{root} already holds a simulated host (use --force to replace it)")
        for sub in ("sys", STATE_DIR):
            shutil.rmtree(root / sub, ignore_errors=True)
    elif root.is_dir() and any(p for p in root.iterdir() if p.name not in ("etc", "var", "usr")):
        if not force:
            raise UsageError(f"{root} is not empty; choose an empty directory or use --force")
    root.mkdir(parents=True, exist_ok=True)
    sim = SimHost(root)
    sim.save(state)
    tree.sync(root, None, state)
    return attach_renderer(sim)


def rerender(sim: SimHost) -> None:
    """Rewrite the whole sysfs tree from the state (repairs deliberately broken entries)."""
    shutil.rmtree(sim.root / "sys", ignore_errors=True)
    tree.sync(sim.root, None, sim.load())


def reboot(sim: SimHost) -> dict[str, Any]:
    """What a host reboot does to the devices (nvidia-vgpu.md section 5, mig-nvml.md section 1.4):
    VFs, mdevs, vendor-VFIO vGPU types and GPU/compute instances vanish; MIG mode survives on Ampere
    (a pending change takes effect), and is lost on Hopper and later."""
    with sim.transaction() as state:
        state["boot"] += 1
        state["mdevs"] = []
        for dev in state["devices"]:
            model = load_catalog().get(dev["model"])
            if dev.get("sriov") is not None:
                dev["sriov"]["numvfs"] = 0
                dev["vfs"] = []
            if dev.get("mig") is not None and model.mig is not None:
                mig = dev["mig"]
                mig["gpu_instances"] = []
                if model.mig.mode_survives_reboot:
                    mig["current"] = mig["pending"]
                else:
                    mig["current"] = mig["pending"] = 0
        return {"boot": state["boot"]}


def add_fault(sim: SimHost, op: str, *, skip: int = 0, times: int = 1, errno: str | None = None,
              nvml: int | None = None, match: str | None = None, kill: str | None = None) -> dict[str, Any]:
    if op not in FAULT_OPS:
        raise UsageError(f"unknown fault operation '{op}'; one of: {', '.join(FAULT_OPS)}")
    if skip < 0 or times < 1:
        raise UsageError("--skip must be >= 0 and --times >= 1")
    if errno is not None and not hasattr(errno_mod, errno):
        raise UsageError(f"unknown errno name '{errno}'")
    if kill not in (None, "before", "after"):
        raise UsageError("--kill must be 'before' or 'after'")
    if op.startswith("nvml.") and nvml is None:
        nvml = 23 if "Create" in op else 19
    fault = {"op": op, "skip": skip, "times": times, "errno": errno if not op.startswith("nvml.") else None,
             "nvml": nvml, "match": match, "kill": kill}
    with sim.transaction() as state:
        state["faults"].append(fault)
    return fault


def clear_faults(sim: SimHost) -> None:
    with sim.transaction() as state:
        state["faults"] = []


def set_open(sim: SimHost, device: str, is_open: bool) -> None:
    """Mark an mdev (UUID) or VF (PCI address) as held open by a running VM's VFIO file."""
    key = device.strip().lower()
    with sim.transaction() as state:
        for m in state["mdevs"]:
            if m["uuid"] == key:
                m["open"] = is_open
                return
        for dev in state["devices"]:
            for vf in dev.get("vfs", []):
                if vf["address"] == key:
                    vf["open"] = is_open
                    return
    raise NotFoundError(f"no mdev or VF '{device}' on the simulated host")


def set_client(sim: SimHost, gpu: str, client: str, present: bool) -> None:
    """Add/remove a process holding a GPU (blocks MIG mode activation and GPU reset)."""
    with sim.transaction() as state:
        for dev in state["devices"]:
            if gpu in (dev.get("address"), dev.get("uuid"), str(dev.get("nvml_index"))):
                clients = dev.setdefault("clients", [])
                if present and client not in clients:
                    clients.append(client)
                if not present and client in clients:
                    clients.remove(client)
                return
    raise NotFoundError(f"no GPU '{gpu}' on the simulated host")


def set_driver_loaded(sim: SimHost, loaded: bool) -> None:
    with sim.transaction() as state:
        state["driver_loaded"] = loaded


def models_table() -> list[dict[str, Any]]:
    out = []
    for m in load_catalog().models.values():
        out.append({"id": m.id, "name": m.display_name, "vendor": m.vendor, "capabilities": m.capabilities(),
                    "pci_id": (f"{m.vendor_id:04x}:{m.device_id:04x}" if m.vendor_id is not None else None),
                    "memory_mib": m.memory_mib})
    return sorted(out, key=lambda r: r["id"])


def require_sim(root: str | Path) -> SimHost:
    try:
        return open_sim(root)
    except SimulatorError:
        raise
