"""Device nodes and driver /proc files of a simulated host, rendered from the state document.

A pure function of the state (:func:`render`), merged into the tree :mod:`gpuvirt.sim.tree` draws, so the nodes
follow every NVML and sysfs change (GPU/compute instances created or destroyed, a reboot, a GPU bound to
vfio-pci) exactly like the sysfs files do.  Facts (``../shared/reference/containers-cdi.md``; MIG User Guide,
"Device Nodes and Capabilities"; nvidia-container-toolkit ``internal/nvcaps``):

* ``/dev/nvidia<minor>`` per GPU bound to the ``nvidia`` driver, ``/dev/nvidiactl`` (minor 255),
  ``/dev/nvidia-uvm``, ``/dev/nvidia-uvm-tools``; ``/proc/devices`` lists ``195 nvidia-frontend`` and the
  dynamic majors of ``nvidia-uvm`` and ``nvidia-caps``.
* ``/proc/driver/nvidia-caps/mig-minors``: ``config 1``, ``monitor 2``, then per GPU minor ``g``, GPU
  instance ``i`` (0..14) and compute instance ``c`` (0..7): ``gpu<g>/gi<i>/access`` = 3 + 135 g + 9 i and
  ``gpu<g>/gi<i>/ci<c>/access`` = that + 1 + c (``gpu0/gi11/access 102``, ``gpu0/gi11/ci0/access 103`` in the
  reference).  The key is the GPU's *minor number* (``nvmlDeviceGetMinorNumber``), not its NVML index.
* ``/proc/driver/nvidia/capabilities/{mig/config,mig/monitor,gpu<g>/mig/gi<i>/access,
  gpu<g>/mig/gi<i>/ci<c>/access}`` exist for the capabilities that exist now, each
  ``DeviceFileMinor: N`` / ``DeviceFileMode: M`` / ``DeviceFileModify: 1``.
* ``/dev/nvidia-caps/nvidia-cap<N>`` nodes.
* ``/dev/vfio/vfio`` and ``/dev/vfio/<group>`` for every function bound to ``vfio-pci``.
* DRM nodes ``/dev/dri/card<N>`` and ``/dev/dri/renderD<M>`` (and the ``drm/`` entries of the PCI function) when
  the host loads nvidia-drm.

Nodes are plain files here (``c MAJOR:MINOR`` inside, for tests and people to read): an unprivileged simulator
cannot create device nodes.  Choices where the facts are thin (docs/simulator-fidelity.md, section 2), set in
the optional state key ``devnodes`` (``gpuvirt sim devnodes``):

* ``mig_minors``: ``static`` (default) lists every GPU instance and compute instance a GPU minor 0..31 could
  have, as the real table does, whether the instance exists or not; ``instances`` lists only those that exist.
* ``caps_nodes``: ``instances`` (default) - ``/dev/nvidia-caps`` holds config, monitor and the nodes of the
  instances that exist; ``none`` - no node was ever created (nvidia-modprobe never ran).
* ``caps_major`` / ``uvm_major``: the dynamic majors (defaults 508 / 510).
* ``drm``: ``auto`` (default: boards with ``+gfx`` MIG profiles load nvidia-drm), ``true`` or ``false``.

Per device, ``minor`` (default: the NVML index) is the GPU's minor number, and ``driver`` (default: the
vendor's driver) which driver it is bound to.
"""

from __future__ import annotations

import functools
from typing import Any

from gpuvirt.model.catalog import load_catalog

NVIDIA_MAJOR = 195
CTL_MINOR = 255
MAX_GPU_MINORS = 32        # the driver's table covers GPU minors 0..31
GIS_PER_GPU = 15           # GPU instance ids 0..14
CIS_PER_GI = 8             # compute instance ids 0..7
DEFAULTS = {"mig_minors": "static", "caps_nodes": "instances", "caps_major": 508, "uvm_major": 510,
            "drm": "auto"}
CHOICES = {"mig_minors": ("static", "instances"), "caps_nodes": ("instances", "none"),
           "drm": ("auto", "true", "false")}
MODE_CONFIG, MODE_MONITOR, MODE_ACCESS = 0o400, 0o444, 0o444
PCI_ROOT = "sys/devices/pci0000:00"

Entry = tuple
Tree = dict[str, Entry]


def gi_minor(gpu_minor: int, gi: int) -> int:
    return 3 + gpu_minor * GIS_PER_GPU * (1 + CIS_PER_GI) + gi * (1 + CIS_PER_GI)


def ci_minor(gpu_minor: int, gi: int, ci: int) -> int:
    return gi_minor(gpu_minor, gi) + 1 + ci


def settings(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (state.get("devnodes") or {}).items() if k in DEFAULTS})
    return out


def gpu_minor(dev: dict[str, Any]) -> int | None:
    m = dev.get("minor")
    return int(m) if m is not None else dev.get("nvml_index")


def bound_driver(dev: dict[str, Any]) -> str:
    """The driver a PCI function is bound to (the ``driver`` link tree.py draws)."""
    if dev.get("driver"):
        return str(dev["driver"])
    vendor = load_catalog().get(dev["model"]).vendor
    return {"nvidia": "nvidia", "amd": "amdgpu", "intel": "i915"}.get(vendor, "")


def nvidia_gpus(state: dict[str, Any]) -> list[dict[str, Any]]:
    """GPUs the nvidia driver drives now (bound to it, driver loaded), by minor."""
    if not state.get("driver_loaded", True):
        return []
    out = [d for d in state["devices"] if d.get("uuid") and d.get("address") and bound_driver(d) == "nvidia"
           and gpu_minor(d) is not None]
    return sorted(out, key=lambda d: gpu_minor(d))  # type: ignore[arg-type, return-value]


@functools.lru_cache(maxsize=4)
def _static_minors() -> str:
    lines = ["config 1", "monitor 2"]
    for g in range(MAX_GPU_MINORS):
        for i in range(GIS_PER_GPU):
            lines.append(f"gpu{g}/gi{i}/access {gi_minor(g, i)}")
            for c in range(CIS_PER_GI):
                lines.append(f"gpu{g}/gi{i}/ci{c}/access {ci_minor(g, i, c)}")
    return "\n".join(lines) + "\n"


def _existing_caps(gpus: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(capability name, minor, mode) of the MIG capabilities that exist now."""
    out = [("config", 1, MODE_CONFIG), ("monitor", 2, MODE_MONITOR)]
    for d in gpus:
        mig = d.get("mig") or {}
        if mig.get("current") != 1:
            continue
        g = gpu_minor(d)
        assert g is not None
        for gi in sorted(mig.get("gpu_instances", []), key=lambda x: x["id"]):
            out.append((f"gpu{g}/gi{gi['id']}/access", gi_minor(g, gi["id"]), MODE_ACCESS))
            for ci in sorted(gi.get("compute_instances", []), key=lambda x: x["id"]):
                out.append((f"gpu{g}/gi{gi['id']}/ci{ci['id']}/access", ci_minor(g, gi["id"], ci["id"]),
                            MODE_ACCESS))
    return out


def _drm_on(state: dict[str, Any], dev: dict[str, Any], setting: Any) -> bool:
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    model = load_catalog().get(dev["model"])
    return bool(model.mig and any("gfx" in p.attributes for p in model.mig.gi_profiles))


def _node(tree: Tree, path: str, major: int, minor: int, mode: int = 0o666) -> None:
    tree[path] = ("file", f"c {major}:{minor}\n", mode)


def render(state: dict[str, Any]) -> Tree:
    tree: Tree = {}
    cfg = settings(state)
    for d in ("dev", "proc", "proc/driver"):
        tree[d] = ("dir",)
    gpus = nvidia_gpus(state)
    loaded = bool(state.get("driver_loaded", True)) and any(d.get("uuid") for d in state["devices"])
    chars = ["  1 mem", "  4 /dev/vc/0", "  4 tty", "  5 /dev/tty", "  5 /dev/console", " 10 misc",
             "226 drm"]
    if loaded:
        chars.append(f"{NVIDIA_MAJOR} nvidia-frontend")
        chars.append(f"{int(cfg['uvm_major'])} nvidia-uvm")
        chars.append(f"{int(cfg['caps_major'])} nvidia-caps")
    vfio = [d for d in state["devices"] if d.get("address") and bound_driver(d) == "vfio-pci"]
    if vfio:
        chars.append("511 vfio")
    chars.sort(key=lambda s: (int(s.split()[0]), s))
    tree["proc/devices"] = ("file", "Character devices:\n" + "\n".join(chars)
                            + "\n\nBlock devices:\n  7 loop\n  8 sd\n259 blkext\n", 0o444)
    if loaded:
        _node(tree, "dev/nvidiactl", NVIDIA_MAJOR, CTL_MINOR)
        _node(tree, "dev/nvidia-uvm", int(cfg["uvm_major"]), 0)
        _node(tree, "dev/nvidia-uvm-tools", int(cfg["uvm_major"]), 1)
        for d in gpus:
            _node(tree, f"dev/nvidia{gpu_minor(d)}", NVIDIA_MAJOR, gpu_minor(d))  # type: ignore[arg-type]
        tree["proc/driver/nvidia"] = ("dir",)
        tree["proc/driver/nvidia-caps"] = ("dir",)
        caps = _existing_caps(gpus)
        if cfg["mig_minors"] == "instances":
            minors = "".join(f"{name} {minor}\n" for name, minor, _ in caps)
        else:
            minors = _static_minors()
        tree["proc/driver/nvidia-caps/mig-minors"] = ("file", minors, 0o444)
        base = "proc/driver/nvidia/capabilities"
        for name, minor, mode in caps:
            if name in ("config", "monitor"):
                path = f"{base}/mig/{name}"
            else:
                gpu, rest = name.split("/", 1)
                path = f"{base}/{gpu}/mig/{rest}"
            _dirs(tree, path)
            tree[path] = ("file", f"DeviceFileMinor: {minor}\nDeviceFileMode: {mode}\nDeviceFileModify: 1\n",
                          0o444)
        if cfg["caps_nodes"] == "instances":
            tree["dev/nvidia-caps"] = ("dir",)
            for _name, minor, mode in caps:
                _node(tree, f"dev/nvidia-caps/nvidia-cap{minor}", int(cfg["caps_major"]), minor, mode)
        card = 1            # card0 is usually the BMC's display controller
        for d in gpus:
            if not _drm_on(state, d, cfg["drm"]):
                continue
            render_minor = 127 + card
            tree["dev/dri"] = ("dir",)
            _node(tree, f"dev/dri/card{card}", 226, card)
            _node(tree, f"dev/dri/renderD{render_minor}", 226, render_minor)
            ddir = f"{PCI_ROOT}/{d['address']}/drm"
            tree[ddir] = ("dir",)
            tree[f"{ddir}/card{card}"] = ("dir",)
            tree[f"{ddir}/renderD{render_minor}"] = ("dir",)
            card += 1
    if vfio:
        tree["dev/vfio"] = ("dir",)
        _node(tree, "dev/vfio/vfio", 10, 196)
        for n, d in enumerate(sorted(vfio, key=lambda d: d.get("iommu_group") or 0)):
            if d.get("iommu_group") is not None:
                _node(tree, f"dev/vfio/{d['iommu_group']}", 511, n, 0o600)
    return tree


def _dirs(tree: Tree, path: str) -> None:
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        tree.setdefault("/".join(parts[:i]), ("dir",))


__all__ = ["render", "settings", "gi_minor", "ci_minor", "gpu_minor", "bound_driver", "nvidia_gpus", "DEFAULTS",
           "CHOICES"]
