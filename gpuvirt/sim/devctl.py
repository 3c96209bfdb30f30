"""World controls for device nodes: which driver a GPU is bound to, and the device-node choices of
:mod:`gpuvirt.sim.devnodes` (``gpuvirt sim bind`` / ``gpuvirt sim devnodes``).

Binding a GPU to ``vfio-pci`` is what an operator (driverctl, libvirt's managed hostdevs) does to a real host
before handing a whole GPU to a VM or a VFIO container: the ``nvidia`` driver lets go of it, so NVML no longer
lists it (the other GPUs' NVML indices close up, their minor numbers stay), ``/dev/nvidia<minor>`` goes away and
``/dev/vfio/<group>`` appears.
"""

from __future__ import annotations

from typing import Any

from gpuvirt.errors import ConflictError, NotFoundError, UsageError
from gpuvirt.sim import devnodes
from gpuvirt.sim.state import SimHost

DRIVERS = ("nvidia", "vfio-pci")


def _find(state: dict[str, Any], gpu: str) -> dict[str, Any]:
    key = gpu.strip().lower()
    for dev in state["devices"]:
        if key in ((dev.get("address") or "").lower(), (dev.get("uuid") or "").lower(),
                   str(dev.get("nvml_index"))):
            return dev
    raise NotFoundError(f"no GPU '{gpu}' on the simulated host")


def bind(sim: SimHost, gpu: str, driver: str) -> dict[str, Any]:
    if driver not in DRIVERS:
        raise UsageError(f"--driver must be one of: {', '.join(DRIVERS)}")
    with sim.transaction() as state:
        dev = _find(state, gpu)
        if not dev.get("uuid"):
            raise UsageError(f"{gpu} is not an NVIDIA GPU")
        # minor numbers are handed out when the driver probes the GPUs and do not move when one is unbound
        for d in state["devices"]:
            if d.get("uuid") and d.get("minor") is None and d.get("nvml_index") is not None:
                d["minor"] = d["nvml_index"]
        if driver == "vfio-pci":
            if devnodes.bound_driver(dev) == "vfio-pci":
                return {"gpu": dev["address"], "driver": driver}
            mig = dev.get("mig") or {}
            busy = [what for what, there in (("processes hold it", dev.get("clients")),
                                             ("GPU instances exist", mig.get("gpu_instances")),
                                             ("SR-IOV VFs are enabled", dev.get("vfs")),
                                             ("mdevs exist", [m for m in state["mdevs"]
                                                              if m["parent"] == dev["address"]])) if there]
            if busy:
                raise ConflictError(f"cannot unbind {dev['address']} from nvidia: {', '.join(busy)}")
            dev["driver"] = "vfio-pci"
        else:
            dev.pop("driver", None)
        _renumber(state)
        return {"gpu": dev["address"], "driver": driver}


def _renumber(state: dict[str, Any]) -> None:
    """NVML enumerates the GPUs the nvidia driver drives, in PCI order."""
    on = sorted((d for d in state["devices"] if d.get("uuid") and devnodes.bound_driver(d) == "nvidia"),
                key=lambda d: d["address"])
    for d in state["devices"]:
        if d.get("uuid"):
            d["nvml_index"] = None
    for i, d in enumerate(on):
        d["nvml_index"] = i


def configure(sim: SimHost, **choices: Any) -> dict[str, Any]:
    """Set device-node choices (see :mod:`gpuvirt.sim.devnodes`); None leaves a choice as it is."""
    with sim.transaction() as state:
        cfg = dict(state.get("devnodes") or {})
        for k, v in choices.items():
            if v is None:
                continue
            if k not in devnodes.DEFAULTS:
                raise UsageError(f"unknown device-node setting '{k}'")
            if k in devnodes.CHOICES and str(v) not in devnodes.CHOICES[k]:
                raise UsageError(f"{k} must be one of: {', '.join(devnodes.CHOICES[k])}")
            if k.endswith("_major") and not (isinstance(v, int) and 234 <= v <= 511):
                raise UsageError(f"{k} must be a dynamic character major (234-511)")
            cfg[k] = str(v) if k in devnodes.CHOICES else v
        state["devnodes"] = cfg
        return devnodes.settings(state)


def set_minor(sim: SimHost, gpu: str, minor: int) -> None:
    """Give a GPU another minor number (real hosts do not always number minors in NVML order)."""
    if not 0 <= minor < devnodes.MAX_GPU_MINORS:
        raise UsageError(f"a GPU minor number is 0..{devnodes.MAX_GPU_MINORS - 1}")
    with sim.transaction() as state:
        dev = _find(state, gpu)
        if any(d is not dev and devnodes.gpu_minor(d) == minor for d in state["devices"] if d.get("uuid")):
            raise ConflictError(f"minor {minor} is taken by another GPU")
        dev["minor"] = minor


__all__ = ["bind", "configure", "set_minor", "DRIVERS"]
