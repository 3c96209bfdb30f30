"""Service: manage simulated hosts (``gpuvirt sim ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from gpuvirt.errors import UsageError
from gpuvirt.sim import control
from gpuvirt.sim.state import behaviour


def models() -> list[dict[str, Any]]:
    return control.models_table()


def init(directory: str, gpus: Sequence[str], *, seed: str | None = None, vgpu_interface: str | None = None,
         enable_vfs: bool = True, mig_enabled: bool = False, no_driver: bool = False,
         force: bool = False, behaviour: dict[str, Any] | None = None) -> dict[str, Any]:
    opts = {k: v for k, v in (behaviour or {}).items() if v is not None}
    if opts:
        control.check_behaviour(**opts)     # refuse bad values before anything is created
    sim = control.init_sim(directory, gpus, seed=seed, vgpu_interface=vgpu_interface, enable_vfs=enable_vfs,
                           mig_enabled=mig_enabled, driver_loaded=not no_driver, force=force)
    if opts:
        control.configure(sim, **opts)
    return summary(sim)


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"{what} '{item}' is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def configure(directory: str, *, vf_delay: float | None = None, registration_delay: float | None = None,
              reset: str | None = None, unregistered_vfio: str | None = None, errnos: Sequence[str] = (),
              nvml_codes: Sequence[str] = ()) -> dict[str, Any]:
    codes: dict[str, int] = {}
    for k, v in _pairs(nvml_codes, "--nvml-code").items():
        if not v.isdigit() or len(v) > 3:
            raise UsageError(f"--nvml-code {k}={v}: expected an NVML return code from 1 to 999")
        codes[k] = int(v)
    return control.configure(control.open_sim(directory), vf_delay=vf_delay, registration_delay=registration_delay,
                             reset=reset, unregistered_vfio=unregistered_vfio,
                             errnos=_pairs(errnos, "--errno"), nvml_codes=codes)


def trace(directory: str, action: str) -> dict[str, Any]:
    sim = control.open_sim(directory)
    if action in ("on", "off"):
        control.set_trace(sim, action == "on")
    elif action == "clear":
        control.clear_trace(sim)
    elif action != "show":
        raise UsageError(f"unknown trace action '{action}'; one of: on, off, show, clear")
    return control.trace(sim)


def summary(sim: Any) -> dict[str, Any]:
    state = sim.load()
    devs = []
    for d in state["devices"]:
        devs.append({"model": d["model"], "address": d.get("address") or d.get("name"), "uuid": d.get("uuid"),
                     "nvml_index": d.get("nvml_index"), "vfs": len(d.get("vfs", [])),
                     "mig": (d["mig"]["current"], d["mig"]["pending"]) if d.get("mig") else None,
                     "gpu_instances": len(d["mig"]["gpu_instances"]) if d.get("mig") else 0,
                     "clients": d.get("clients", [])})
    return {"dir": str(sim.root), "boot": state["boot"], "seed": state["seed"],
            "vgpu_interface": state.get("vgpu_interface"), "driver_loaded": state.get("driver_loaded", True),
            "devices": devs, "mdevs": len(state["mdevs"]), "faults": state["faults"],
            "behaviour": behaviour(state), "trace_on": bool((state.get("trace") or {}).get("on")),
            "foreign_writes": state.get("foreign_writes", [])}


def show(directory: str) -> dict[str, Any]:
    return summary(control.open_sim(directory))


def reboot(directory: str) -> dict[str, Any]:
    sim = control.open_sim(directory)
    control.reboot(sim)
    return summary(sim)


def fault(directory: str, op: str, *, skip: int, times: int, errno: str | None, nvml: int | None,
          match: str | None, kill: str | None = None) -> dict[str, Any]:
    return control.add_fault(control.open_sim(directory), op, skip=skip, times=times, errno=errno, nvml=nvml,
                             match=match, kill=kill)


def clear_faults(directory: str) -> None:
    control.clear_faults(control.open_sim(directory))


def set_open(directory: str, device: str, is_open: bool, *, vm_uuid: str | None = None) -> None:
    control.set_open(control.open_sim(directory), device, is_open, vm_uuid=vm_uuid)


def xid(directory: str, gpu: str, code: int, *, gi: int | None = None, ci: int | None = None) -> dict[str, Any]:
    return control.inject_xid(control.open_sim(directory), gpu, code, gi=gi, ci=ci)


def vgpu(directory: str, device: str, **values: Any) -> dict[str, Any]:
    return control.set_guest(control.open_sim(directory), device, **values)


def migration(directory: str, **changes: Any) -> dict[str, Any]:
    """Set (or, with no changes, show) the simulated host's stack and migration rules."""
    from gpuvirt.sim import hoststack

    sim = control.open_sim(directory)
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return hoststack.describe(sim.peek())
    return hoststack.configure(sim, **changes)


def client(directory: str, gpu: str, name: str, present: bool) -> None:
    control.set_client(control.open_sim(directory), gpu, name, present)


def driver(directory: str, loaded: bool) -> None:
    control.set_driver_loaded(control.open_sim(directory), loaded)


def repair(directory: str) -> None:
    control.rerender(control.open_sim(directory))


def exists(directory: str) -> bool:
    return (Path(directory) / ".gpuvirt-sim" / "state.json").is_file()


def bind(directory: str, gpu: str, driver: str) -> dict[str, Any]:
    from gpuvirt.sim import devctl

    return devctl.bind(control.open_sim(directory), gpu, driver)


def devnodes(directory: str, **choices: Any) -> dict[str, Any]:
    from gpuvirt.sim import devctl

    sim = control.open_sim(directory)
    if choices.get("minor") is not None:
        gpu, minor = choices.pop("minor")
        devctl.set_minor(sim, gpu, minor)
    choices.pop("minor", None)
    return devctl.configure(sim, **choices)
