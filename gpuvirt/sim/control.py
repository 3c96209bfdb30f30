"""Operator/test controls of a simulated host: create, reboot, inject faults, hold devices open.

These act on the simulator directly (they are the "world" around the host, not gpuvirt's code path):
``gpuvirt sim init|set|reboot|fault|trace|open|close|client|models|show|xid|vgpu``.
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
    "nvml.SetVgpuSchedulerState",
)
# Read-only NVML calls that can be made to fail (they change nothing, so there is no crash point to kill at and
# the crash tests, which walk FAULT_OPS, leave them out): gpuvirt.sim.nvml_migration
QUERY_FAULT_OPS = ("nvml.VgpuInstanceGetMetadata", "nvml.DeviceGetVgpuMetadata", "nvml.GetVgpuCompatibility")
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
    try:
        exists, is_dir = root.exists(), root.is_dir()
    except OSError as exc:          # e.g. a name too long for the file system
        raise UsageError(f"{str(root)[:200]!r}: {exc.strerror}") from None
    if exists and not is_dir:
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
        state["event_sets"] = []        # every process that held one is gone
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
    if op not in FAULT_OPS and op not in QUERY_FAULT_OPS:
        raise UsageError(f"unknown fault operation '{op}'; one of: {', '.join(FAULT_OPS + QUERY_FAULT_OPS)}")
    if op in QUERY_FAULT_OPS and kill is not None:
        raise UsageError(f"{op} changes nothing: it can fail (--nvml) but not --kill")
    if skip < 0 or times < 1:
        raise UsageError("--skip must be >= 0 and --times >= 1")
    if errno is not None and not hasattr(errno_mod, errno):
        raise UsageError(f"unknown errno name '{errno}'")
    if kill not in (None, "before", "after"):
        raise UsageError("--kill must be 'before' or 'after'")
    if op == "vgpu.register" and errno is None:
        errno = "EIO"
    if op.startswith("nvml.") and nvml is None:
        nvml = 23 if "Create" in op else 3 if op in QUERY_FAULT_OPS else 19
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


def _device_entry(state: dict[str, Any], device: str) -> dict[str, Any] | None:
    key = device.strip().lower()
    for m in state["mdevs"]:
        if m["uuid"] == key:
            return m
    for dev in state["devices"]:
        for vf in dev.get("vfs", []):
            if vf["address"] == key:
                return vf
    return None


def set_open(sim: SimHost, device: str, is_open: bool, *, vm_uuid: str | None = None) -> None:
    """Mark an mdev (UUID) or VF (PCI address) as held open by a running VM's VFIO file; ``vm_uuid`` is the
    UUID the VM was started with (QEMU ``-uuid``), which the host driver reports for a vGPU."""
    if vm_uuid is not None:
        vm_uuid = _check_uuid(vm_uuid, "--vm-uuid")
    with sim.transaction() as state:
        entry = _device_entry(state, device)
        if entry is not None:
            entry["open"] = is_open
            if vm_uuid is not None and entry.get("vgpu_id") is not None:
                entry.setdefault("guest", {})["vm_uuid"] = vm_uuid
            return
    raise NotFoundError(f"no mdev or VF '{device}' on the simulated host")


def _check_uuid(text: str, what: str) -> str:
    import uuid as uuid_mod

    try:
        return str(uuid_mod.UUID(text.strip()))
    except ValueError:
        raise UsageError(f"{what} '{text}' is not a UUID") from None


def _find_gpu(state: dict[str, Any], gpu: str) -> dict[str, Any]:
    for dev in state["devices"]:
        if gpu in (dev.get("address"), dev.get("uuid"), str(dev.get("nvml_index"))):
            return dev
    raise NotFoundError(f"no GPU '{gpu}' on the simulated host")


MAX_XID = 0xFFFFFFFF


def inject_xid(sim: SimHost, gpu: str, xid: int, *, gi: int | None = None, ci: int | None = None) -> dict[str, Any]:
    """An XID critical error on a GPU (``--gi``/``--ci``: attributed to that MIG instance), delivered through
    NVML to every event set registered for it (sim.nvml_events).  Events nobody has registered for are
    lost, as on a real host."""
    from gpuvirt.sim.nvml_events import EVENT_XID, ID_ANY, queue_event

    if not 0 < xid <= MAX_XID:
        raise UsageError(f"--xid must be an XID code from 1 to {MAX_XID}, not {xid}")
    if ci is not None and gi is None:
        raise UsageError("--ci needs --gi (a compute instance is named within its GPU instance)")
    for name, v in (("--gi", gi), ("--ci", ci)):
        if v is not None and not 0 <= v < ID_ANY:
            raise UsageError(f"{name} must be an instance id from 0 to {ID_ANY - 1}, not {v}")
    with sim.transaction() as state:
        dev = _find_gpu(state, gpu)
        if dev.get("nvml_index") is None:
            raise UsageError(f"GPU '{gpu}' is not an NVIDIA GPU under NVML: it reports no XIDs")
        if not state.get("driver_loaded", True):
            raise UsageError("the simulated NVIDIA driver is not loaded: no XIDs can be reported")
        if gi is not None:
            mig = dev.get("mig") or {}
            if mig.get("current") != 1:
                raise UsageError(f"GPU {dev['nvml_index']} is not in MIG mode: an XID cannot name a GPU instance")
            gi_doc = next((g for g in mig.get("gpu_instances", []) if g["id"] == gi), None)
            if gi_doc is None:
                raise NotFoundError(f"GPU {dev['nvml_index']} has no GPU instance {gi} (GPU instances: "
                                    f"{', '.join(str(g['id']) for g in mig.get('gpu_instances', [])) or 'none'})")
            if ci is not None and not any(c["id"] == ci for c in gi_doc["compute_instances"]):
                raise NotFoundError(f"GPU instance {gi} on GPU {dev['nvml_index']} has no compute instance {ci}")
        n = queue_event(state, int(dev["nvml_index"]), EVENT_XID, xid, ID_ANY if gi is None else gi,
                        ID_ANY if ci is None else ci)
        return {"gpu": dev["nvml_index"], "address": dev.get("address"), "xid": xid, "gi": gi, "ci": ci,
                "delivered_to": n}


def set_guest(sim: SimHost, device: str, **values: Any) -> dict[str, Any]:
    """Set what the host driver reports about a vGPU (``guest`` on its entry; sim.nvml_vgpu_instances):
    vm_uuid, fb_used_mib, util (dict), license_state, license_expiry, guest_driver (a version: the guest driver has
    loaded and reported, "none": it has not), guest_vgpu_version.  None leaves a value as it is."""
    from gpuvirt.sim.nvml_vgpu_instances import EXPIRY_WORDS, LICENSE_STATES, UTIL_KEYS

    if values.get("vm_uuid") is not None:
        values["vm_uuid"] = _check_uuid(values["vm_uuid"], "--vm-uuid")
    fb = values.get("fb_used_mib")
    if fb is not None and not 0 <= fb <= 1 << 24:
        raise UsageError(f"--fb-used-mib must be from 0 to {1 << 24}, not {fb}")
    util = values.get("util") or {}
    for k, v in util.items():
        if k not in UTIL_KEYS:
            raise UsageError(f"unknown utilization engine '{k}' (one of {', '.join(UTIL_KEYS)})")
        if not 0 <= v <= 100:
            raise UsageError(f"utilization of {k} must be a percentage from 0 to 100, not {v}")
    lic_state = values.get("license_state")
    if lic_state is not None and lic_state not in LICENSE_STATES:
        raise UsageError(f"unknown license state '{lic_state}' (one of {', '.join(LICENSE_STATES)})")
    expiry = values.get("license_expiry")
    if expiry is not None and expiry != "none" and expiry not in EXPIRY_WORDS:
        import datetime as dt

        try:
            dt.datetime.strptime(expiry, "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            raise UsageError(f"--license-expiry '{expiry}' is not YYYY-MM-DDTHH:MM:SSZ, none, "
                             f"{', '.join(EXPIRY_WORDS)}") from None
    gdriver = values.get("guest_driver")
    if gdriver is not None and gdriver != "none":
        import re

        if not re.fullmatch(r"\d{1,4}(\.\d{1,4}){1,3}", gdriver, re.ASCII):
            raise UsageError(f"--guest-driver '{gdriver}': expected a driver version such as 550.127.05, or none")
    gver = values.get("guest_vgpu_version")
    if gver is not None and not 0 < gver <= 0xFFFFFFFF:
        raise UsageError(f"--guest-vgpu-version must be from 1 to 0xffffffff, not {gver}")
    with sim.transaction() as state:
        entry = _device_entry(state, device)
        if entry is None:
            raise NotFoundError(f"no mdev or VF '{device}' on the simulated host")
        if entry.get("vgpu_id") is None:
            raise UsageError(f"'{device}' is not an NVIDIA vGPU (no vGPU type on it)")
        guest = entry.setdefault("guest", {})
        if gdriver is not None:
            if gdriver == "none":
                guest.pop("driver", None)
            else:
                guest["driver"] = gdriver
        if gver is not None:
            guest["vgpu_version"] = gver
        if values.get("vm_uuid") is not None:
            guest["vm_uuid"] = values["vm_uuid"]
        if fb is not None:
            guest["fb_used_mib"] = fb
        if util:
            guest.setdefault("util", {}).update(util)
        if lic_state is not None or expiry is not None:
            lic = guest.setdefault("license", {})
            if lic_state is not None:
                lic["state"] = lic_state
            if expiry is not None:
                lic["expiry"] = None if expiry == "none" else expiry
        return {"device": device, "vgpu_id": entry["vgpu_id"], "guest": dict(guest)}


def set_client(sim: SimHost, gpu: str, client: str, present: bool) -> None:
    """Add/remove a process holding a GPU (blocks MIG mode activation and GPU reset)."""
    with sim.transaction() as state:
        dev = _find_gpu(state, gpu)
        clients = dev.setdefault("clients", [])
        if present and client not in clients:
            clients.append(client)
        if not present and client in clients:
            clients.remove(client)


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
