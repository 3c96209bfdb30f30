"""Operator/test controls of a simulated host: create, reboot, inject faults, hold devices open.

These act on the simulator directly (they are the "world" around the host, not gpuvirt's code path):
``gpuvirt sim init|set|reboot|fault|trace|open|close|client|models|show``.
"""

from __future__ import annotations

import errno as errno_mod
import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from gpuvirt.errors import NotFoundError, SimulatorError, UsageError
from gpuvirt.model.catalog import load_catalog
from gpuvirt.sim import tree
from gpuvirt.sim.build import new_state
from gpuvirt.sim.kernel import attach_renderer
from gpuvirt.sim.state import DEFAULT_ERRNOS, DEFAULT_NVML_CODES, STATE_DIR, SimHost, behaviour

# Every operation that changes the simulated host passes exactly one of these fault points (the kernel's sysfs
# writes, the mutating NVML calls, and nvidia-vgpud registering a parent's vGPU types); the names are what
# `gpuvirt sim fault --op` and `gpuvirt sim trace` use.
FAULT_OPS = (
    "mdev.create", "mdev.remove", "vgpu.set", "vgpu.clear", "sriov.enable", "sriov.disable", "pci.reset",
    "vgpu.register",
    "nvml.CreateGpuInstance", "nvml.DestroyGpuInstance", "nvml.CreateComputeInstance",
    "nvml.DestroyComputeInstance", "nvml.SetMigMode",
)
MAX_DELAY_S = 600.0
RESET_MODES = ("function", "gpu-reset")
UNREGISTERED_VFIO = ("empty", "absent")


def open_sim(root: str | Path) -> SimHost:
    sim = SimHost(root)
    sim.peek()  # a missing or corrupt state is reported here, before anything reads the tree
    attach_renderer(sim)
    # before any reader sees the tree: a redraw a killed process left unfinished, and events now due
    sim.ensure_rendered()
    from gpuvirt.sim import world

    if world.due(sim, sim.peek()) is not None:
        with sim.transaction():
            pass
    return sim


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
    sim.state_dir.mkdir(parents=True, exist_ok=True)
    sim._mark_redraw()  # noqa: SLF001 - a kill while the first tree is drawn is repaired like any other
    sim.save(state)
    tree.sync(root, None, state)
    sim._clear_redraw()  # noqa: SLF001
    return attach_renderer(sim)


def rerender(sim: SimHost) -> None:
    """Rewrite the whole sysfs tree from the state (repairs deliberately broken entries)."""
    shutil.rmtree(sim.root / "sys", ignore_errors=True)
    tree.sync(sim.root, None, sim.load())


def reboot(sim: SimHost) -> dict[str, Any]:
    """What a host reboot does to the devices (nvidia-vgpu.md section 5, mig-nvml.md section 1.4):
    VFs, mdevs, vendor-VFIO vGPU types and GPU/compute instances vanish; MIG mode survives on Ampere
    (a pending change takes effect), and is lost on Hopper and later."""
    from gpuvirt.sim import rules

    with sim.transaction() as state:
        state["boot"] += 1
        state["mdevs"] = []
        reg_delay = float(behaviour(state)["registration_delay_s"])
        for dev in state["devices"]:
            model = load_catalog().get(dev["model"])
            dev.pop("registered", None)
            dev.pop("register_at", None)
            if reg_delay > 0 and rules.needs_registration(state, dev, pf=True):
                # a PF that is its own mdev parent (pre-Ampere) shows its types once nvidia-vgpud is up
                dev["register_at"] = time.time() + reg_delay
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
    if op == "vgpu.register" and errno is None:
        errno = "EIO"
    if op.startswith("nvml.") and nvml is None:
        nvml = 23 if "Create" in op else 19
    fault = {"op": op, "skip": skip, "times": times, "errno": errno if not op.startswith("nvml.") else None,
             "nvml": nvml, "match": match, "kill": kill}
    with sim.transaction() as state:
        state["faults"].append(fault)
    return fault


def configure(sim: SimHost, *, vf_delay: float | None = None, registration_delay: float | None = None,
              reset: str | None = None, unregistered_vfio: str | None = None,
              errnos: dict[str, str] | None = None, nvml_codes: dict[str, int] | None = None) -> dict[str, Any]:
    """Change how the simulated host behaves where the sources are silent (docs/simulator-fidelity.md
    section 2); returns the full behaviour, defaults included.  Validated before anything changes."""
    changes = check_behaviour(vf_delay=vf_delay, registration_delay=registration_delay, reset=reset,
                              unregistered_vfio=unregistered_vfio, errnos=errnos, nvml_codes=nvml_codes)
    with sim.transaction() as state:
        b = state.setdefault("behaviour", {})
        b.update(changes)
        if errnos:
            b.setdefault("errnos", {}).update(errnos)
        if nvml_codes:
            b.setdefault("nvml_codes", {}).update(nvml_codes)
        return behaviour(state)


def check_behaviour(*, vf_delay: float | None = None, registration_delay: float | None = None,
                    reset: str | None = None, unregistered_vfio: str | None = None,
                    errnos: dict[str, str] | None = None, nvml_codes: dict[str, int] | None = None) -> dict[str, Any]:
    """The validated scalar settings (UsageError for anything out of range or unknown)."""
    changes: dict[str, Any] = {}
    for name, value in (("vf_delay_s", vf_delay), ("registration_delay_s", registration_delay)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value <= MAX_DELAY_S:
            raise UsageError(f"--{name[:-2].replace('_', '-')} {value!r}: expected seconds from 0 to "
                             f"{MAX_DELAY_S:g}")
        changes[name] = float(value)
    if reset is not None:
        if reset not in RESET_MODES:
            raise UsageError(f"--reset must be one of {', '.join(RESET_MODES)}")
        changes["reset"] = reset
    if unregistered_vfio is not None:
        if unregistered_vfio not in UNREGISTERED_VFIO:
            raise UsageError(f"--unregistered-vfio must be one of {', '.join(UNREGISTERED_VFIO)}")
        changes["unregistered_vfio"] = unregistered_vfio
    for key, name in (errnos or {}).items():
        if key not in DEFAULT_ERRNOS:
            raise UsageError(f"unknown errno setting '{key}'; one of: {', '.join(DEFAULT_ERRNOS)}")
        if not isinstance(name, str) or not name.startswith("E") or not isinstance(getattr(errno_mod, name, None), int):
            raise UsageError(f"unknown errno name '{name}' for {key}")
    for key, code in (nvml_codes or {}).items():
        if key not in DEFAULT_NVML_CODES:
            raise UsageError(f"unknown NVML code setting '{key}'; one of: {', '.join(DEFAULT_NVML_CODES)}")
        if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 999:
            raise UsageError(f"NVML return code for {key} must be from 1 to 999, not {code!r}")
    return changes


def set_trace(sim: SimHost, on: bool) -> None:
    """Start (keeping what was recorded) or stop recording every fault point passed, in order."""
    with sim.transaction() as state:
        state.setdefault("trace", {"on": False, "ops": []})["on"] = on


def clear_trace(sim: SimHost) -> None:
    with sim.transaction() as state:
        t = state.setdefault("trace", {"on": False, "ops": []})
        t["ops"] = []


def trace(sim: SimHost) -> dict[str, Any]:
    """{"on": bool, "ops": [{"op", "target", "k"}]}: ``k`` counts earlier occurrences of the same op, so
    ``gpuvirt sim fault --op OP --skip k --kill before|after`` stops a replay of the traced run right there."""
    t = sim.peek().get("trace") or {}
    seen: dict[str, int] = {}
    ops = []
    for op, target in t.get("ops", []):
        ops.append({"op": op, "target": target, "k": seen.get(op, 0)})
        seen[op] = seen.get(op, 0) + 1
    return {"on": bool(t.get("on")), "ops": ops}


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
