"""Simulated kernel: what happens when gpuvirt writes a sysfs attribute of a simulated host.

gpuvirt's host layer writes through a ``KernelIO`` (``gpuvirt.host.sysfs``); on a simulated host that is
:class:`SimKernel`, which applies the semantics of the real store functions and fails with the real errno
values (``OSError`` with errno, strerror and filename, exactly what ``open(...).write`` raises on sysfs):

=====================================  ===================================================================
write                                  semantics (source: ../shared/reference, see docs/simulator-fidelity.md)
=====================================  ===================================================================
``.../mdev_supported_types/T/create``  36/37 bytes else EINVAL; bad UUID EINVAL; UUID on any parent EEXIST;
                                       no room: the driver's errno (mtty ENOSPC, mdpy/mbochs ENOMEM, NVIDIA
                                       per catalog); else the mdev appears with links and an IOMMU group
``<mdev>/remove``                      kstrtoul: junk EINVAL; 0 is a no-op; open device EBUSY (UNVERIFIED)
``<VF>/nvidia/current_vgpu_type``      kstrtol: junk EINVAL; N when set EPERM; 0 when empty EPERM; 0 while the
                                       VFIO device is open EBUSY (UNVERIFIED); unknown id (or types not
                                       registered yet) EINVAL (UNVERIFIED); no room: catalog errno
``<PF>/sriov_numvfs``                  > total ERANGE; equal: no-op; change while enabled EBUSY; 0 disables
                                       (child mdevs go with their VFs); the VFs appear after ``vf_delay_s``
``<PF>/reset``                         anything but 1: EINVAL; GPU/compute instances are lost; a pending MIG
                                       mode is applied only with ``reset: gpu-reset`` (UNVERIFIED); a GPU held
                                       by clients or an open VF/mdev: EBUSY (UNVERIFIED)
=====================================  ===================================================================

Anything else: ENOENT when the file does not exist, EACCES when it is a read-only attribute.
Injected faults (``gpuvirt sim fault``) fail an operation with a chosen errno before it takes effect.
Every UNVERIFIED errno is a setting of the simulated host (``gpuvirt.sim.state.DEFAULT_ERRNOS``).
"""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path
from typing import Any

from gpuvirt.model.catalog import load_catalog
from gpuvirt.sim import rules
from gpuvirt.sim.build import disable_vfs_on, enable_vfs_on
from gpuvirt.sim.nvml_vgpu_instances import assign_vgpu_id, forget_vgpu
from gpuvirt.sim.state import SimHost, behaviour, errno_for, os_error

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _kstrtol(text: str) -> int | None:
    t = text[:-1] if text.endswith("\n") else text
    if not t:
        return None
    try:
        return int(t, 0) if t.lower().startswith(("0x", "-0x")) else int(t, 10)
    except ValueError:
        return None


class SimKernel:
    """KernelIO for a simulated host (see ``gpuvirt.host.sysfs.KernelIO``)."""

    def __init__(self, sim: SimHost) -> None:
        self.sim = sim
        self.root = sim.root

    # --- KernelIO ----------------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike[str], data: str) -> int:
        real = os.path.realpath(path)
        root = str(self.root)
        if not (real == root or real.startswith(root + os.sep)):
            raise os_error(errno.EACCES, path, "outside the simulated root")
        rel = os.path.relpath(real, root)
        failure: OSError | None = None
        with self.sim.transaction() as state:
            # the handlers validate before they mutate, so a failed write leaves the devices untouched; the
            # transaction is still saved so that an injected fault that fired stays consumed
            try:
                self._dispatch(state, path, real, rel, data)
            except OSError as exc:
                failure = exc
        if failure is not None:
            raise failure
        return len(data)

    def _dispatch(self, state: dict[str, Any], path: Any, real: str, rel: str, data: str) -> None:
        if not os.path.exists(real) and not os.path.lexists(path):
            raise os_error(errno.ENOENT, path)
        parts = rel.split(os.sep)
        name = parts[-1]
        if name == "create" and len(parts) >= 3 and parts[-3] == "mdev_supported_types":
            self._create(state, path, parts, data)
        elif name == "remove" and len(parts) >= 2 and UUID_RE.match(parts[-2]):
            self._remove(state, path, parts[-2], data)
        elif name == "current_vgpu_type" and len(parts) >= 3 and parts[-2] == "nvidia":
            self._vgpu_type(state, path, parts[-3], data)
        elif name == "sriov_numvfs":
            self._sriov(state, path, parts[-2], data)
        elif name == "reset" and len(parts) >= 2:
            self._reset(state, path, parts[-2], data)
        elif not os.path.exists(real):
            raise os_error(errno.ENOENT, path)
        else:
            raise os_error(errno.EACCES, path, "read-only attribute")

    # --- helpers ------------------------------------------------------------------------------------------
    def _fault(self, state: dict[str, Any], op: str, path: Any, target: str) -> None:
        f = self.sim.take_fault(state, op, target)
        if f is not None:
            code = getattr(errno, f.get("errno") or "EIO", errno.EIO)
            raise os_error(code, path, f"injected fault for {op}")

    @staticmethod
    def _device_for_parent(state: dict[str, Any], parent: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        for dev in state["devices"]:
            if dev.get("address") == parent or dev.get("name") == parent:
                return dev, None
            for vf in dev.get("vfs", []):
                if vf["address"] == parent:
                    return dev, vf
        raise KeyError(parent)

    # --- mdev create / remove --------------------------------------------------------------------------------
    def _create(self, state: dict[str, Any], path: Any, parts: list[str], data: str) -> None:
        type_dir, parent = parts[-2], parts[-4]
        if len(data) not in (36, 37) or (len(data) == 37 and not data.endswith("\n")):
            raise os_error(errno.EINVAL, path)
        uuid = data[:36]
        if not UUID_RE.match(uuid):
            raise os_error(errno.EINVAL, path)
        uuid = uuid.lower()
        if any(m["uuid"] == uuid for m in state["mdevs"]):
            raise os_error(errno.EEXIST, path)
        try:
            dev, vf = self._device_for_parent(state, parent)
        except KeyError:
            raise os_error(errno.ENODEV, path) from None
        if vf is not None and not (rules.vf_present(vf) and rules.registered(vf)) or \
                vf is None and not rules.registered(dev):
            raise os_error(errno.ENOENT, path, "the parent's vGPU types are not registered")
        self._fault(state, "mdev.create", path, f"{parent}/{type_dir}/{uuid}")
        model = load_catalog().get(dev["model"])
        gi_id = None
        if type_dir.startswith("nvidia-") and model.vgpu:
            vtype = model.vgpu.type_by_id(int(type_dir.split("-", 1)[1]))
            if rules.vgpu_available(state, dev, parent, vtype) <= 0:
                raise os_error(getattr(errno, model.vgpu.create_errno), path, "no room for this vGPU type")
            if vtype.mig_backed:
                gi_id = rules.free_gpu_instance_for(state, dev, vtype)
        elif model.mdev:
            spec = model.mdev
            t = next((t for t in spec.types if spec.type_dir(t) == type_dir), None)
            if t is None:
                raise os_error(errno.ENOENT, path)
            if rules.pool_available(spec, state["mdevs"], parent, t) <= 0:
                raise os_error(getattr(errno, spec.create_errno), path, "shared pool exhausted")
        else:
            raise os_error(errno.ENOENT, path)
        entry = {"uuid": uuid, "parent": parent, "type": type_dir, "iommu_group": state["next_iommu_group"],
                 "gpu_instance_id": gi_id, "open": False}
        if type_dir.startswith("nvidia-") and model.vgpu:
            assign_vgpu_id(state, entry)   # the host driver's vGPU instance id (sim.nvml_vgpu_instances)
        state["mdevs"].append(entry)
        state["next_iommu_group"] += 1

    def _remove(self, state: dict[str, Any], path: Any, uuid: str, data: str) -> None:
        value = _kstrtol(data)
        if value is None or value < 0:
            raise os_error(errno.EINVAL, path)
        if value == 0:
            return
        m = next((m for m in state["mdevs"] if m["uuid"] == uuid.lower()), None)
        if m is None:
            raise os_error(errno.ENODEV, path)
        self._fault(state, "mdev.remove", path, uuid)
        if m.get("open"):
            raise os_error(errno_for(state, "mdev_remove_open"), path, "mdev is open by a VM (UNVERIFIED errno)")
        state["mdevs"].remove(m)

    # --- vendor-specific VFIO ------------------------------------------------------------------------------------
    def _vgpu_type(self, state: dict[str, Any], path: Any, vf_addr: str, data: str) -> None:
        value = _kstrtol(data)
        if value is None:
            raise os_error(errno.EINVAL, path)
        try:
            dev, vf = self._device_for_parent(state, vf_addr)
        except KeyError:
            raise os_error(errno.ENODEV, path) from None
        if vf is None or not rules.vf_present(vf):
            raise os_error(errno.ENOENT, path)
        model = load_catalog().get(dev["model"])
        assert model.vgpu is not None
        if value == 0:
            if not vf.get("current_vgpu_type"):
                raise os_error(errno.EPERM, path, "Failed to remove vGPU. No vGPU exists on current device")
            self._fault(state, "vgpu.clear", path, vf_addr)
            if vf.get("open"):
                raise os_error(errno_for(state, "vgpu_clear_open"), path,
                               "The VFIO device must be closed first (UNVERIFIED errno)")
            vf["current_vgpu_type"] = 0
            vf["gpu_instance_id"] = None
            forget_vgpu(vf)
            return
        if vf.get("current_vgpu_type"):
            raise os_error(errno.EPERM, path, f"vGPU device already created with type ID: {vf['current_vgpu_type']}")
        if not rules.registered(vf):
            raise os_error(errno_for(state, "vgpu_unknown_type"), path,
                           "vGPU types not registered yet (nvidia-vgpud)")
        try:
            vtype = model.vgpu.type_by_id(value)
        except Exception:
            raise os_error(errno_for(state, "vgpu_unknown_type"), path, f"unknown vGPU type id {value}") from None
        self._fault(state, "vgpu.set", path, vf_addr)
        if rules.board_room(state, dev, vtype) <= 0:
            raise os_error(getattr(errno, model.vgpu.create_errno), path, "vGPU type not creatable now")
        vf["gpu_instance_id"] = rules.free_gpu_instance_for(state, dev, vtype) if vtype.mig_backed else None
        vf["current_vgpu_type"] = value
        assign_vgpu_id(state, vf)

    # --- SR-IOV ----------------------------------------------------------------------------------------------------
    def _sriov(self, state: dict[str, Any], path: Any, pf_addr: str, data: str) -> None:
        value = _kstrtol(data)
        if value is None or value < 0:           # kstrtou16; too large for u16 is > total below: ERANGE
            raise os_error(errno.EINVAL, path)
        try:
            dev, vf = self._device_for_parent(state, pf_addr)
        except KeyError:
            raise os_error(errno.ENODEV, path) from None
        model = load_catalog().get(dev["model"])
        if vf is not None or model.sriov is None or dev.get("sriov") is None:
            raise os_error(errno.ENOENT, path)
        total = model.sriov.total_vfs
        current = dev["sriov"]["numvfs"]
        if value > total:
            raise os_error(errno.ERANGE, path)
        if value == current:
            return
        if current and value:
            raise os_error(errno.EBUSY, path, f"{current} VFs already enabled. Disable before enabling {value} VFs")
        self._fault(state, "sriov.enable" if value else "sriov.disable", path, pf_addr)
        if value == 0:
            if any(v.get("open") for v in dev["vfs"]) or any(
                    m.get("open") for m in state["mdevs"] if m["parent"] in rules.board_parents(dev)):
                raise os_error(errno_for(state, "sriov_disable_open"), path, "a VF is in use (UNVERIFIED errno)")
            disable_vfs_on(state, dev)
        else:
            enable_vfs_on(state, dev, value, now=time.time())

    # --- GPU reset -------------------------------------------------------------------------------------------------
    def _reset(self, state: dict[str, Any], path: Any, addr: str, data: str) -> None:
        value = _kstrtol(data)
        # pci reset_store: kstrtoul, then anything but 1 is EINVAL
        if value is None or value != 1:
            raise os_error(errno.EINVAL, path)
        try:
            dev, vf = self._device_for_parent(state, addr)
        except KeyError:
            raise os_error(errno.ENODEV, path) from None
        self._fault(state, "pci.reset", path, addr)
        if vf is not None:
            if vf.get("open"):
                raise os_error(errno_for(state, "vf_reset_open"), path)
            return
        if dev.get("clients") or any(v.get("open") for v in dev.get("vfs", [])) or any(
                m.get("open") for m in state["mdevs"] if m["parent"] in rules.board_parents(dev)):
            raise os_error(errno_for(state, "reset_busy"), path, "GPU in use (UNVERIFIED errno)")
        if dev.get("mig") is not None:
            # Whether a PCI function reset through sysfs activates a pending MIG mode is not established
            # (only nvidia-smi --gpu-reset is documented to): by default it does not, so gpuvirt must cope
            # with a mode that stays pending; "gpu-reset" models the nvidia-smi behaviour.
            if behaviour(state)["reset"] == "gpu-reset":
                dev["mig"]["current"] = dev["mig"]["pending"]
            dev["mig"]["gpu_instances"] = []
            # vGPUs on GPU instances vanish with them
            for v in dev.get("vfs", []):
                if v.get("gpu_instance_id") is not None:
                    v["current_vgpu_type"] = 0
                    v["gpu_instance_id"] = None
                    forget_vgpu(v)
            parents = rules.board_parents(dev)
            state["mdevs"] = [m for m in state["mdevs"]
                              if not (m["parent"] in parents and m.get("gpu_instance_id") is not None)]


def attach_renderer(sim: SimHost) -> SimHost:
    """Make every state change of ``sim`` re-render the affected parts of the sysfs tree, and let the world
    around the host (timed events, writes of other programs, a tree left stale by a crash) act before each
    transaction (:mod:`gpuvirt.sim.world`)."""
    from gpuvirt.sim import tree, world

    def on_change(host: SimHost, before: dict[str, Any], after: dict[str, Any]) -> None:
        tree.sync(Path(host.root), before, after)

    sim.on_change = on_change
    sim.on_begin = world.due
    sim.on_repair = world.repair
    sim.after_save = world.ensure_timer
    return sim
