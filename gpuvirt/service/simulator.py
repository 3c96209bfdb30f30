"""Service: manage simulated hosts (``gpuvirt sim ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from gpuvirt.sim import control


def models() -> list[dict[str, Any]]:
    return control.models_table()


def init(directory: str, gpus: Sequence[str], *, seed: str | None = None, vgpu_interface: str | None = None,
         enable_vfs: bool = True, mig_enabled: bool = False, no_driver: bool = False,
         force: bool = False) -> dict[str, Any]:
    sim = control.init_sim(directory, gpus, seed=seed, vgpu_interface=vgpu_interface, enable_vfs=enable_vfs,
                           mig_enabled=mig_enabled, driver_loaded=not no_driver, force=force)
    return summary(sim)


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
            "devices": devs, "mdevs": len(state["mdevs"]), "faults": state["faults"]}


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


def set_open(directory: str, device: str, is_open: bool) -> None:
    control.set_open(control.open_sim(directory), device, is_open)


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
