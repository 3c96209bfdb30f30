"""Running vGPUs as the host driver sees them (NVML vGPU-instance queries), for per-VM metrics.

``vgpu_instances(session, index)`` lists the active vGPUs of one physical GPU with the VM id the guest side
reported, the vGPU type, framebuffer use, license state and expiry and the latest utilization sample.  A
GPU without a vGPU host driver answers ``NOT_SUPPORTED`` and gives an empty list; a vGPU that stops between
two calls (its VM shut down) is left out rather than failing the whole list.

Two deliberate departures from nvidia-ml-py 13.615.71's wrappers, each for a defect in the wrapper:

* ``nvmlVgpuInstanceGetFbUsage`` is called with an ``unsigned long long`` as the C prototype declares; the
  wrapper passes a 4-byte ``c_uint``, which truncates usage above 4 GiB (and lets the library write past it).
* ``NVML_GRID_LICENSE_EXPIRY_*`` are tuples in that module (trailing commas), so expiry status codes are
  compared with the integer values here.
"""

from __future__ import annotations

import ctypes
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pynvml

LICENSE_STATES = {0: "unknown", 1: "uninitialized", 2: "unlicensed-unrestricted", 3: "unlicensed-restricted",
                  4: "unlicensed", 5: "licensed"}
EXPIRY_STATUS = {0: "not-available", 1: "invalid", 2: "valid", 3: "not-applicable", 4: "permanent"}
NO_GPU_INSTANCE = 0xFFFFFFFF
# an instance gone between list and query, or a query this driver does not offer: skip, do not fail
_GONE = (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT)
_UNAVAILABLE = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)


@dataclass(frozen=True)
class VgpuInstanceInfo:
    id: int
    type_id: int
    vm_id: str | None
    vm_id_type: str | None              # "uuid" | "domain-id"
    uuid: str | None
    mdev_uuid: str | None               # None for vendor-specific VFIO vGPUs (no mdev)
    gpu_instance_id: int | None         # MIG-backed vGPUs only
    fb_used_bytes: int | None
    license_state: str | None
    licensed: bool | None
    license_expiry: dt.datetime | None  # naive UTC, when the status is "valid"
    license_expiry_status: str | None
    utilization: dict[str, int] | None = field(default=None)   # percent per engine, latest sample


def _fb_usage(inst: Any) -> int:
    fn = pynvml._nvmlGetFunctionPointer("nvmlVgpuInstanceGetFbUsage")
    value = ctypes.c_ulonglong(0)
    pynvml._nvmlCheckReturn(fn(inst, ctypes.byref(value)))
    return int(value.value)


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _value(v: Any) -> int:
    # samples come as unsigned ints (NVML_VALUE_TYPE_UNSIGNED_INT) on every driver seen; the union is read so
    return int(v.uiVal)


def _utilization(session: Any, handle: Any) -> dict[int, dict[str, int]] | None:
    try:
        samples = session._call(pynvml.nvmlDeviceGetVgpuInstancesUtilizationInfo, handle, 0)
        return {int(s.vgpuInstance): {"sm": _value(s.smUtil), "memory": _value(s.memUtil),
                                      "encoder": _value(s.encUtil), "decoder": _value(s.decUtil)}
                for s in samples}
    except pynvml.NVMLError as exc:
        if exc.value not in _UNAVAILABLE:
            raise
    try:
        samples = session._call(pynvml.nvmlDeviceGetVgpuUtilization, handle, 0)
    except pynvml.NVMLError as exc:
        if exc.value in _UNAVAILABLE:
            return None
        raise
    return {int(s.vgpuInstance): {"sm": _value(s.smUtil), "memory": _value(s.memUtil),
                                  "encoder": _value(s.encUtil), "decoder": _value(s.decUtil)} for s in samples}


def _optional(session: Any, fn: Any, *args: Any) -> Any:
    try:
        return session._call(fn, *args)
    except pynvml.NVMLError as exc:
        if exc.value in _UNAVAILABLE:
            return None
        raise


def vgpu_instances(session: Any, index: int) -> list[VgpuInstanceInfo]:
    ref = session._gpu(index)
    h = ref.handle
    what = f"list the running vGPUs of GPU {index} ({ref.bus_id})"
    try:
        ids = list(session._call(pynvml.nvmlDeviceGetActiveVgpus, h))
        util = _utilization(session, h) if ids else {}
    except pynvml.NVMLError as exc:
        if exc.value in _UNAVAILABLE:
            return []
        raise session._error(exc, what, gpu=index) from None
    out = []
    for vid in ids:
        try:
            type_id = int(session._call(pynvml.nvmlVgpuInstanceGetType, vid))
            vm_id, vm_type = session._call(pynvml.nvmlVgpuInstanceGetVmID, vid)
            uuid = _optional(session, pynvml.nvmlVgpuInstanceGetUUID, vid)
            mdev = _optional(session, pynvml.nvmlVgpuInstanceGetMdevUUID, vid)
            gi = _optional(session, pynvml.nvmlVgpuInstanceGetGpuInstanceId, vid)
            fb = _optional(session, _fb_usage, vid)
            lic = _optional(session, pynvml.nvmlVgpuInstanceGetLicenseInfo_v2, vid)
        except pynvml.NVMLError as exc:
            if exc.value in _GONE:
                continue
            raise session._error(exc, f"read vGPU instance {vid} of GPU {index} ({ref.bus_id})", gpu=index,
                                 vgpu_instance=vid) from None
        expiry = status = state = None
        licensed = None
        if lic is not None:
            state = LICENSE_STATES.get(int(lic.currentState), f"state-{int(lic.currentState)}")
            licensed = bool(lic.isLicensed)
            e = lic.licenseExpiry
            status = EXPIRY_STATUS.get(int(e.status), f"status-{int(e.status)}")
            if status == "valid":
                try:
                    expiry = dt.datetime(int(e.year), int(e.month), int(e.day), int(e.hour), int(e.min), int(e.sec))
                except ValueError:
                    status = "invalid"
        out.append(VgpuInstanceInfo(
            id=int(vid), type_id=type_id, vm_id=_text(vm_id) or None,
            vm_id_type="uuid" if int(vm_type) == pynvml.NVML_VGPU_VM_ID_UUID else "domain-id",
            uuid=_text(uuid) if uuid else None, mdev_uuid=_text(mdev).lower() if mdev else None,
            gpu_instance_id=None if gi is None or int(gi) == NO_GPU_INSTANCE else int(gi),
            fb_used_bytes=None if fb is None else int(fb), license_state=state, licensed=licensed,
            license_expiry=expiry, license_expiry_status=status,
            utilization=(util or {}).get(int(vid)) if util is not None else None))
    return out


__all__ = ["VgpuInstanceInfo", "vgpu_instances", "LICENSE_STATES", "EXPIRY_STATUS"]
