"""A stand-in for libnvidia-ml.so.1, driven by a simulated host's state.

:class:`FakeNvmlLib` is installed as ``pynvml.nvmlLib`` (after clearing
``pynvml._nvmlGetFunctionPointer_cache``).  pynvml then looks up every C symbol on it with ``getattr`` and
calls it with the real ctypes objects it built, so pynvml's wrappers, structures, handle types and error
classes run unchanged - only the library underneath is simulated (reference: mig-nvml.md section 7).

Calling convention, as ctypes would present it to a C function:

* every entry point returns an ``nvmlReturn_t`` int; pynvml raises the matching ``NVMLError_*`` subclass;
* out-parameters arrive as ``byref(x)`` and are written through ``x`` (``ref._obj``);
* arrays are allocated by the caller; where NVML documents it, a NULL array means "report the count only"
  (placements, vGPU type lists);
* handles are opaque pointer values.  Here they encode (kind, NVML index, GPU-instance id,
  compute-instance id), so a handle stays meaningful across processes and across re-reads of the state;
  a handle whose instance no longer exists yields INVALID_ARGUMENT, as the NVML reference describes for
  invalidated handles;
* ``nvmlErrorString`` is a plain function attribute returning bytes (pynvml sets ``restype`` on it).

Reads use :meth:`SimHost.peek`; every change runs inside :meth:`SimHost.transaction`, so several processes
driving one simulated host serialise on its lock exactly like clients of one driver.  MIG rules come from
:mod:`gpuvirt.model.mig` (the same functions the planner uses); vGPU capacity from :mod:`gpuvirt.sim.rules`.

Injected faults (``gpuvirt sim fault nvml.<Op>``) are checked after the handle and profile were validated
and before anything changes; the match target is ``"<pci address> gi=<id> ci=<id> profile=<id>"`` with only
the parts that apply to the operation.
"""

from __future__ import annotations

from typing import Any

from gpuvirt.model.catalog import MIB, GpuModel
from gpuvirt.sim.nvml_base import (
    _DEVICE,
    _MIG_DEVICE,
    DEFAULT_CUDA_VERSION,
    DEFAULT_DRIVER_VERSION,
    ERROR_STRINGS,
    LIBRARY_NOT_FOUND,
    MEMORY_V2,
    NOT_FOUND,
    _bytes_arg,
    _check_version,
    _encode,
    _entry,
    _Fail,
    _int_arg,
    _put_string,
    _set,
    _set_fields,
    _set_handle,
    _target,
    ci_starts,
)
from gpuvirt.sim.nvml_events import EventsApi
from gpuvirt.sim.nvml_devnodes import DevnodeApi
from gpuvirt.sim.nvml_mig import MigApi
from gpuvirt.sim.nvml_migration import MigrationApi
from gpuvirt.sim.nvml_scheduler import SchedulerApi
from gpuvirt.sim.nvml_vgpu import VgpuApi
from gpuvirt.sim.nvml_vgpu_instances import VgpuInstanceApi


class FakeNvmlLib(MigApi, VgpuApi, VgpuInstanceApi, MigrationApi, EventsApi, SchedulerApi, DevnodeApi):
    """libnvidia-ml for one simulated host (see the module docstring)."""

    # === initialisation and system ==========================================================================
    @_entry(needs_init=False)
    def nvmlInitWithFlags(self, flags: Any = 0) -> None:
        # With no driver the real pynvml cannot even dlopen libnvidia-ml.so.1 and raises LIBRARY_NOT_FOUND;
        # returning that code here makes a driverless simulated host look the same to callers.
        if not self.sim.peek().get("driver_loaded", True):
            raise _Fail(LIBRARY_NOT_FOUND)
        self._init_count += 1

    @_entry(needs_init=False)
    def nvmlInit_v2(self) -> None:
        if not self.sim.peek().get("driver_loaded", True):
            raise _Fail(LIBRARY_NOT_FOUND)
        self._init_count += 1

    @_entry()
    def nvmlShutdown(self) -> None:
        self._init_count -= 1

    @_entry()
    def nvmlSystemGetDriverVersion(self, buf: Any, length: Any) -> None:
        _put_string(buf, length, str(self.sim.peek().get("driver_version") or DEFAULT_DRIVER_VERSION))

    @_entry()
    def nvmlSystemGetNVMLVersion(self, buf: Any, length: Any) -> None:
        driver = str(self.sim.peek().get("driver_version") or DEFAULT_DRIVER_VERSION)
        _put_string(buf, length, f"{DEFAULT_CUDA_VERSION // 1000}.{driver}")

    @_entry()
    def nvmlSystemGetCudaDriverVersion(self, ref: Any) -> None:
        _set(ref, DEFAULT_CUDA_VERSION)

    @_entry()
    def nvmlSystemGetCudaDriverVersion_v2(self, ref: Any) -> None:
        _set(ref, DEFAULT_CUDA_VERSION)

    # === device enumeration and identity ==================================================================
    @_entry()
    def nvmlDeviceGetCount_v2(self, ref: Any) -> None:
        _set(ref, len(self._nvml_devices(self.sim.peek())))

    @_entry()
    def nvmlDeviceGetHandleByIndex_v2(self, index: Any, ref: Any) -> None:
        i = _int_arg(index)
        self._device_at(self.sim.peek(), i)
        _set_handle(ref, _encode(_DEVICE, i))

    @_entry()
    def nvmlDeviceGetHandleByUUID(self, uuid: Any, ref: Any) -> None:
        wanted = _bytes_arg(uuid).decode(errors="replace").strip()
        for dev in self._nvml_devices(self.sim.peek()):
            if dev.get("uuid") == wanted:
                _set_handle(ref, _encode(_DEVICE, dev["nvml_index"]))
                return
            if dev.get("mig") and dev["mig"].get("current") == 1:
                for gi, ci in self._mig_devices(dev):
                    if ci.get("uuid") == wanted:
                        _set_handle(ref, _encode(_MIG_DEVICE, dev["nvml_index"], gi["id"], ci["id"]))
                        return
        raise _Fail(NOT_FOUND)

    @_entry()
    def nvmlDeviceGetHandleByPciBusId_v2(self, bus_id: Any, ref: Any) -> None:
        wanted = self._pci_parts(_bytes_arg(bus_id).decode(errors="replace"))
        for dev in self._nvml_devices(self.sim.peek()):
            if dev.get("address") and self._pci_parts(dev["address"]) == wanted:
                _set_handle(ref, _encode(_DEVICE, dev["nvml_index"]))
                return
        raise _Fail(NOT_FOUND)

    @_entry()
    def nvmlDeviceGetName(self, handle: Any, buf: Any, length: Any) -> None:
        dev, model, gi, ci = self._any_device(self.sim.peek(), handle)
        name = model.nvml_name or model.display_name
        if gi is not None and ci is not None:
            # UNVERIFIED format: CUDA device queries show "<board> MIG <profile>" for MIG devices
            name = f"{name} MIG {self._ci_name(dev, model, gi, ci)}"
        _put_string(buf, length, name)

    @_entry()
    def nvmlDeviceGetUUID(self, handle: Any, buf: Any, length: Any) -> None:
        dev, _, _, ci = self._any_device(self.sim.peek(), handle)
        _put_string(buf, length, ci["uuid"] if ci is not None else dev["uuid"])

    @_entry()
    def nvmlDeviceGetPciInfo_v3(self, handle: Any, ref: Any) -> None:
        # a MIG device reports its parent's PCI location
        dev, model, _, _ = self._any_device(self.sim.peek(), handle)
        domain, bus, slot, func = self._pci_parts(dev["address"])
        info = _target(ref)
        _set_fields(info,
                    busIdLegacy=f"{domain:04X}:{bus:02X}:{slot:02X}.{func:X}".encode(),
                    domain=domain, bus=bus, device=slot,
                    pciDeviceId=((model.device_id or 0) << 16) | (model.vendor_id or 0),
                    pciSubSystemId=((model.subsystem_device_id or 0) << 16) | (model.subsystem_vendor_id or 0),
                    busId=f"{domain:08X}:{bus:02X}:{slot:02X}.{func:X}".encode())

    def _memory_mib(self, dev: dict[str, Any], model: GpuModel, gi: dict[str, Any] | None) -> int:
        if gi is not None and model.mig is not None:
            return model.mig.profile(gi["profile_id"]).memory_mib
        return model.memory_mib

    @_entry()
    def nvmlDeviceGetMemoryInfo(self, handle: Any, ref: Any) -> None:
        dev, model, gi, _ = self._any_device(self.sim.peek(), handle)
        total = self._memory_mib(dev, model, gi) * MIB
        _set_fields(_target(ref), total=total, free=total, used=0)

    @_entry()
    def nvmlDeviceGetMemoryInfo_v2(self, handle: Any, ref: Any) -> None:
        info = _target(ref)
        _check_version(info, MEMORY_V2)
        dev, model, gi, _ = self._any_device(self.sim.peek(), handle)
        total = self._memory_mib(dev, model, gi) * MIB
        _set_fields(info, total=total, reserved=0, free=total, used=0)


__all__ = ["FakeNvmlLib", "ERROR_STRINGS", "ci_starts"]
