"""NVML through nvidia-ml-py: the machine-facing half of the I/O seam for MIG and vGPU queries.

The same code runs on a real host (pynvml dlopens ``libnvidia-ml.so.1``) and on a simulated one (a
:class:`gpuvirt.sim.nvml.FakeNvmlLib` is handed in as ``lib`` and installed as ``pynvml.nvmlLib``).  Every
``pynvml.NVMLError`` is translated here into :mod:`gpuvirt.errors` with the GPU, profile and operation in
the message, e.g. ``create GPU instance 3g.20gb at 4:4 on GPU 0 (00000000:41:00.0): Insufficient
Resources``.

pynvml keeps its library in a module global.  A session remembers the library it initialised and puts it
back before each call when another session has swapped it, so several sessions - real or simulated, on
different simulated hosts - can be used one after another or interleaved in one process.

A host without the NVIDIA driver is normal for discovery: :meth:`NvmlSession.open` then sets
``available = False`` and ``unavailable_reason`` instead of raising.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import pynvml

from gpuvirt.errors import (
    NvmlError,
    NvmlInsufficientResourcesError,
    NvmlInUseError,
    NvmlNotFoundError,
    NvmlNotSupportedError,
    NvmlUnavailableError,
)
from gpuvirt.host.machine import NVML_LIBRARY_MISSING
from gpuvirt.model.catalog import MIB, Engines, mig_profile_name
from gpuvirt.model.vgpu_scheduler import NVML_POLICY, POLICY_NAME

# NVML_GPU_INSTANCE_PROFILE_* constants whose profiles carry a name attribute (mig-nvml.md section 1.2)
_ATTRIBUTES_BY_CONSTANT: dict[int, tuple[str, ...]] = {
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1: ("me",),
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1: ("me",),
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME: ("me.all",),
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME: ("me.all",),
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX: ("gfx",),
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX: ("gfx",),
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX: ("gfx",),
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX: ("gfx",),
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME: ("-me",),
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME: ("-me",),
}

_CODE_NAMES: dict[int, str] = {0: "SUCCESS"}
for _name in dir(pynvml):
    if _name.startswith("NVML_ERROR_") and isinstance(getattr(pynvml, _name), int):
        _CODE_NAMES.setdefault(getattr(pynvml, _name), _name[len("NVML_ERROR_"):])

_ERROR_CLASSES: dict[int, type[NvmlError]] = {
    pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES: NvmlInsufficientResourcesError,
    pynvml.NVML_ERROR_IN_USE: NvmlInUseError,
    pynvml.NVML_ERROR_NOT_SUPPORTED: NvmlNotSupportedError,
    pynvml.NVML_ERROR_NOT_FOUND: NvmlNotFoundError,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: NvmlUnavailableError,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: NvmlUnavailableError,
}

_UNAVAILABLE_REASONS = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: NVML_LIBRARY_MISSING,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "NVML not available: the NVIDIA kernel driver is not loaded",
    pynvml.NVML_ERROR_NO_PERMISSION: "NVML not available: insufficient permissions to initialise NVML",
}

# Constants a profile walk skips, like go-nvlib's VisitMigProfiles: the driver answers either for a
# profile the GPU does not have.
_ABSENT = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT)

# Serialises library swaps and calls: pynvml's library pointer and function cache are process-global.
_LOCK = threading.RLock()


def code_name(code: int) -> str:
    return _CODE_NAMES.get(code, str(code))


def normalize_bus_id(bus_id: str) -> str:
    """NVML's ``00000000:41:00.0`` -> sysfs' ``0000:41:00.0`` (lower case, 4-digit domain)."""
    text = bus_id.strip().lower()
    parts = text.split(":")
    if len(parts) == 3:
        domain = int(parts[0], 16)
        return f"{domain:04x}:{parts[1]}:{parts[2]}"
    if len(parts) == 2:
        return f"0000:{text}"
    return text


@dataclass(frozen=True)
class NvmlGpu:
    index: int
    uuid: str
    name: str
    pci_address: str                 # sysfs form, "0000:41:00.0"
    pci_device_id: int               # 0xDDDDVVVV (device id in the upper half)
    pci_subsystem_id: int            # 0xSSSSVVVV
    memory_total_bytes: int
    memory_mib: int
    mig_capable: bool
    mig_current: bool | None         # None when not MIG capable
    mig_pending: bool | None


@dataclass(frozen=True)
class GiProfileInfo:
    id: int                          # what Create/RemainingCapacity/... take
    nvml_constant: int               # NVML_GPU_INSTANCE_PROFILE_* that GetGpuInstanceProfileInfo took
    name: str                        # computed like the driver: "3g.20gb", "1g.5gb+me"
    compute_slices: int
    memory_slices: int
    max_instances: int
    memory_mib: int
    sm: int
    engines: Engines
    placements: list[tuple[int, int]]
    remaining: int


@dataclass(frozen=True)
class CiInfo:
    id: int
    profile_id: int
    start: int
    size: int
    uuid: str | None                 # MIG device UUID; None when no MIG device maps to it


@dataclass(frozen=True)
class GpuInstanceInfo:
    id: int
    profile_id: int
    start: int
    size: int
    compute_instances: list[CiInfo] = field(default_factory=list)


@dataclass(frozen=True)
class VgpuTypeInfo:
    id: int
    name: str
    framebuffer_mib: int
    max_instances: int
    gpu_instance_profile_id: int | None
    creatable: bool


@dataclass(frozen=True)
class VgpuSchedulerInfo:
    """A GPU's vGPU scheduler: state (``nvmlDeviceGetVgpuSchedulerState``) and capabilities."""

    policy: str | None               # best-effort | equal-share | fixed-share; None: a value NVML does not define
    arr: bool                        # adaptive round robin in effect
    timeslice_us: int | None         # None under best effort (NVML: "not relevant")
    supported_policies: list[str]
    timeslice_min_us: int | None
    timeslice_max_us: int | None
    arr_supported: bool

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "timeslice_us": self.timeslice_us, "arr": self.arr,
                "supported_policies": list(self.supported_policies), "timeslice_min_us": self.timeslice_min_us,
                "timeslice_max_us": self.timeslice_max_us, "arr_supported": self.arr_supported}


def _us(ns: int) -> int | None:
    return ns // 1000 if ns else None


@dataclass
class _GpuRef:
    handle: Any
    bus_id: str
    uuid: str | None = None


def _is_real_library(lib: Any) -> bool:
    return isinstance(lib, ctypes.CDLL)


def _install(lib: Any) -> None:
    pynvml.nvmlLib = lib
    pynvml._nvmlGetFunctionPointer_cache.clear()


class NvmlSession:
    """One NVML initialisation (``nvmlInit`` ... ``nvmlShutdown``) with gpuvirt-level methods."""

    def __init__(self, lib: Any = None) -> None:
        self._requested_lib = lib
        self._lib: Any = None
        self._open = False
        self.available = False
        self.unavailable_reason: str | None = None
        self.call_count = 0
        self._gpus: dict[int, _GpuRef] = {}
        self._profiles: dict[int, list[GiProfileInfo]] = {}

    # --- lifecycle -----------------------------------------------------------------------------------------
    def __enter__(self) -> "NvmlSession":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> "NvmlSession":
        with _LOCK:
            if self._open:
                return self
            if self._requested_lib is not None:
                _install(self._requested_lib)
            elif pynvml.nvmlLib is not None and not _is_real_library(pynvml.nvmlLib):
                # a substitute left by an earlier session: drop it so pynvml loads libnvidia-ml.so.1
                _install(None)
            self._open = True
            try:
                self.call_count += 1
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                reason = _UNAVAILABLE_REASONS.get(exc.value)
                if reason is None:
                    self._open = False
                    raise self._error(exc, "initialise NVML") from None
                self.available = False
                self.unavailable_reason = reason
                return self
            self._lib = pynvml.nvmlLib
            self.available = True
            self.unavailable_reason = None
        return self

    def close(self) -> None:
        with _LOCK:
            if not self._open:
                return
            self._open = False
            if self.available:
                self.available = False
                self._reinstall()
                try:
                    self.call_count += 1
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError:
                    pass
            self._gpus.clear()
            self._profiles.clear()

    # --- plumbing --------------------------------------------------------------------------------------------
    def _reinstall(self) -> None:
        if self._lib is not None and pynvml.nvmlLib is not self._lib:
            _install(self._lib)

    def _require(self) -> None:
        if not self._open:
            raise NvmlError("NVML session is not open")
        if not self.available:
            raise NvmlUnavailableError(self.unavailable_reason or "NVML not available")

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with _LOCK:
            self._reinstall()
            self.call_count += 1
            return fn(*args)

    def _error(self, exc: pynvml.NVMLError, what: str, **context: Any) -> NvmlError:
        code = int(exc.value)
        with _LOCK:
            self._reinstall()
            try:
                text = str(exc)
            except Exception:   # pynvml asks the library for unknown codes; never mask the real error
                text = f"NVML error {code}"
        cls = _ERROR_CLASSES.get(code, NvmlError)
        return cls(f"{what}: {text}", code=code, code_name=code_name(code), operation=what, **context)

    def _gpu(self, index: int) -> _GpuRef:
        self._require()
        ref = self._gpus.get(index)
        if ref is not None:
            return ref
        try:
            handle = self._call(pynvml.nvmlDeviceGetHandleByIndex, index)
            bus_id = self._call(pynvml.nvmlDeviceGetPciInfo, handle).busId
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_INVALID_ARGUMENT:
                raise NvmlNotFoundError(f"no GPU with NVML index {index}", code=exc.value,
                                        code_name=code_name(exc.value), gpu=index) from None
            raise self._error(exc, f"open GPU {index}", gpu=index) from None
        ref = _GpuRef(handle, bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id))
        self._gpus[index] = ref
        return ref

    def _where(self, index: int) -> str:
        return f"GPU {index} ({self._gpu(index).bus_id})"

    def _ctx(self, index: int, **extra: Any) -> dict[str, Any]:
        ref = self._gpu(index)
        return {"gpu": index, "pci": normalize_bus_id(ref.bus_id), "uuid": ref.uuid, **extra}

    # --- system ----------------------------------------------------------------------------------------------
    def driver_version(self) -> str:
        self._require()
        try:
            return str(self._call(pynvml.nvmlSystemGetDriverVersion))
        except pynvml.NVMLError as exc:
            raise self._error(exc, "read the NVIDIA driver version") from None

    def gpu_count(self) -> int:
        self._require()
        try:
            return int(self._call(pynvml.nvmlDeviceGetCount))
        except pynvml.NVMLError as exc:
            raise self._error(exc, "count GPUs") from None

    def gpus(self) -> list[NvmlGpu]:
        out = []
        for index in range(self.gpu_count()):
            ref = self._gpu(index)
            h = ref.handle
            what = f"read {self._where(index)}"
            try:
                name = str(self._call(pynvml.nvmlDeviceGetName, h))
                uuid = str(self._call(pynvml.nvmlDeviceGetUUID, h))
                pci = self._call(pynvml.nvmlDeviceGetPciInfo, h)
                mem = self._call(pynvml.nvmlDeviceGetMemoryInfo, h)
            except pynvml.NVMLError as exc:
                raise self._error(exc, what, **self._ctx(index)) from None
            ref.uuid = uuid
            try:
                current, pending = self._call(pynvml.nvmlDeviceGetMigMode, h)
                mig: tuple[bool, bool | None, bool | None] = (True, bool(current), bool(pending))
            except pynvml.NVMLError as exc:
                # NOT_SUPPORTED is how NVML says "no MIG on this GPU" (mig-parted reads it the same way)
                if exc.value != pynvml.NVML_ERROR_NOT_SUPPORTED:
                    raise self._error(exc, f"read MIG mode of {self._where(index)}", **self._ctx(index)) from None
                mig = (False, None, None)
            out.append(NvmlGpu(index=index, uuid=uuid, name=name, pci_address=normalize_bus_id(ref.bus_id),
                               pci_device_id=int(pci.pciDeviceId), pci_subsystem_id=int(pci.pciSubSystemId),
                               memory_total_bytes=int(mem.total), memory_mib=int(mem.total) // MIB,
                               mig_capable=mig[0], mig_current=mig[1], mig_pending=mig[2]))
        return out

    # --- MIG: profiles ----------------------------------------------------------------------------------------
    def gi_profiles(self, index: int) -> list[GiProfileInfo]:
        """Every GPU-instance profile of the GPU with its placements and current free count.

        Empty when the GPU has no MIG or MIG mode is not enabled (NVML answers NOT_SUPPORTED then).
        """
        ref = self._gpu(index)
        h = ref.handle
        ctx = self._ctx(index)
        try:
            total = int(self._call(pynvml.nvmlDeviceGetMemoryInfo, h).total)
        except pynvml.NVMLError as exc:
            raise self._error(exc, f"read memory of {self._where(index)}", **ctx) from None
        out = []
        for constant in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                info = self._call(pynvml.nvmlDeviceGetGpuInstanceProfileInfo, h, constant)
            except pynvml.NVMLError as exc:
                if exc.value in _ABSENT:
                    continue
                raise self._error(exc, f"read GPU-instance profile constant {constant} of {self._where(index)}",
                                  **ctx) from None
            name = mig_profile_name(int(info.sliceCount), int(info.memorySizeMB), total,
                                    _ATTRIBUTES_BY_CONSTANT.get(constant, ()))
            what = f"read placements of GPU-instance profile {name} (id {info.id}) on {self._where(index)}"
            try:
                placements = self._gi_placements(h, int(info.id))
                remaining = int(self._call(pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity, h, info.id))
            except pynvml.NVMLError as exc:
                raise self._error(exc, what, profile=name, profile_id=int(info.id), **ctx) from None
            out.append(GiProfileInfo(
                id=int(info.id), nvml_constant=constant, name=name, compute_slices=int(info.sliceCount),
                memory_slices=placements[0][1] if placements else 0, max_instances=int(info.instanceCount),
                memory_mib=int(info.memorySizeMB), sm=int(info.multiprocessorCount),
                engines=Engines(ce=int(info.copyEngineCount), dec=int(info.decoderCount),
                                enc=int(info.encoderCount), jpeg=int(info.jpegCount), ofa=int(info.ofaCount)),
                placements=placements, remaining=remaining))
        self._profiles[index] = out
        return out

    def _gi_placements(self, handle: Any, profile_id: int) -> list[tuple[int, int]]:
        count = ctypes.c_uint(0)
        self._call(pynvml.nvmlDeviceGetGpuInstancePossiblePlacements, handle, profile_id, None,
                   ctypes.byref(count))
        if count.value == 0:
            return []
        array = (pynvml.c_nvmlGpuInstancePlacement_t * count.value)()
        self._call(pynvml.nvmlDeviceGetGpuInstancePossiblePlacements, handle, profile_id, array,
                   ctypes.byref(count))
        return [(int(array[i].start), int(array[i].size)) for i in range(count.value)]

    def _profile(self, index: int, profile_id: int) -> GiProfileInfo | None:
        # Only the static fields are used from the cache: NVML documents profile information as immutable
        # for the lifetime of a MIG mode, so set_mig_mode() is the one place that drops it.
        profiles = self._profiles.get(index)
        if profiles is None:
            profiles = self.gi_profiles(index)
        return next((p for p in profiles if p.id == profile_id), None)

    def _profile_label(self, index: int, profile_id: int) -> str:
        p = self._profile(index, profile_id)
        return p.name if p is not None else f"profile {profile_id}"

    # --- MIG: instances ---------------------------------------------------------------------------------------
    def _mig_device_uuids(self, index: int) -> dict[tuple[int, int], str]:
        h = self._gpu(index).handle
        out: dict[tuple[int, int], str] = {}
        count = int(self._call(pynvml.nvmlDeviceGetMaxMigDeviceCount, h))
        for i in range(count):
            try:
                mig = self._call(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, h, i)
            except pynvml.NVMLError as exc:
                # NVML reference: NOT_FOUND when no MIG device sits at this index
                if exc.value == pynvml.NVML_ERROR_NOT_FOUND:
                    continue
                raise
            gi = int(self._call(pynvml.nvmlDeviceGetGpuInstanceId, mig))
            ci = int(self._call(pynvml.nvmlDeviceGetComputeInstanceId, mig))
            out[(gi, ci)] = str(self._call(pynvml.nvmlDeviceGetUUID, mig))
        return out

    def _gi_info(self, gi_handle: Any) -> Any:
        return self._call(pynvml.nvmlGpuInstanceGetInfo, gi_handle)

    def _ci_profiles_of(self, gi_handle: Any) -> list[Any]:
        out = []
        for constant in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
            try:
                out.append(self._call(pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo, gi_handle, constant,
                                      pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED))
            except pynvml.NVMLError as exc:
                if exc.value in _ABSENT:
                    continue
                raise
        return out

    def _compute_instances(self, gi_handle: Any, gi_id: int, uuids: dict[tuple[int, int], str]) -> list[CiInfo]:
        out = []
        for prof in self._ci_profiles_of(gi_handle):
            n = max(int(prof.instanceCount), 1)
            array = (pynvml.c_nvmlComputeInstance_t * n)()
            count = ctypes.c_uint(0)
            self._call(pynvml.nvmlGpuInstanceGetComputeInstances, gi_handle, prof.id, array, ctypes.byref(count))
            for k in range(count.value):
                info = self._call(pynvml.nvmlComputeInstanceGetInfo, array[k])
                out.append(CiInfo(id=int(info.id), profile_id=int(info.profileId),
                                  start=int(info.placement.start), size=int(info.placement.size),
                                  uuid=uuids.get((gi_id, int(info.id)))))
        return sorted(out, key=lambda c: c.id)

    def gpu_instances(self, index: int) -> list[GpuInstanceInfo]:
        """GPU instances with their compute instances, by GI id.  Empty when MIG mode is not enabled."""
        profiles = self._profiles.get(index) or self.gi_profiles(index)
        if not profiles:
            return []
        h = self._gpu(index).handle
        ctx = self._ctx(index)
        try:
            uuids = self._mig_device_uuids(index)
            out = []
            for p in profiles:
                array = (pynvml.c_nvmlGpuInstance_t * max(p.max_instances, 1))()
                count = ctypes.c_uint(0)
                self._call(pynvml.nvmlDeviceGetGpuInstances, h, p.id, array, ctypes.byref(count))
                for k in range(count.value):
                    info = self._gi_info(array[k])
                    out.append(GpuInstanceInfo(
                        id=int(info.id), profile_id=int(info.profileId), start=int(info.placement.start),
                        size=int(info.placement.size),
                        compute_instances=self._compute_instances(array[k], int(info.id), uuids)))
        except pynvml.NVMLError as exc:
            raise self._error(exc, f"list GPU instances on {self._where(index)}", **ctx) from None
        return sorted(out, key=lambda g: g.id)

    def set_mig_mode(self, index: int, enabled: bool) -> tuple[bool, bool, str]:
        """Request MIG mode; returns (current, pending, activation status name).

        The call itself succeeds when the change only has to wait for a GPU reset: the activation status then
        says why (``IN_USE``: processes hold the GPU; ``RESET_REQUIRED``: VM passthrough), and ``pending``
        differs from ``current``.
        """
        h = self._gpu(index).handle
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if enabled else pynvml.NVML_DEVICE_MIG_DISABLE
        what = f"{'enable' if enabled else 'disable'} MIG mode on {self._where(index)}"
        try:
            status = int(self._call(pynvml.nvmlDeviceSetMigMode, h, mode))
            current, pending = self._call(pynvml.nvmlDeviceGetMigMode, h)
        except pynvml.NVMLError as exc:
            raise self._error(exc, what, **self._ctx(index)) from None
        finally:
            self._profiles.pop(index, None)
        return bool(current), bool(pending), code_name(status)

    def create_gpu_instance(self, index: int, profile_id: int, start: int | None = None) -> GpuInstanceInfo:
        """Create a GPU instance; without ``start`` the driver picks the placement (order-dependent)."""
        h = self._gpu(index).handle
        prof = self._profile(index, profile_id)
        label = prof.name if prof is not None else f"profile {profile_id}"
        where = ""
        if start is not None:
            size = prof.memory_slices if prof is not None else 0
            where = f" at {start}:{size}"
        what = f"create GPU instance {label}{where} on {self._where(index)}"
        try:
            if start is None:
                gi = self._call(pynvml.nvmlDeviceCreateGpuInstance, h, profile_id)
            else:
                placement = pynvml.c_nvmlGpuInstancePlacement_t(start, prof.memory_slices if prof else 0)
                gi = self._call(pynvml.nvmlDeviceCreateGpuInstanceWithPlacement, h, profile_id,
                                ctypes.byref(placement))
            info = self._gi_info(gi)
        except pynvml.NVMLError as exc:
            raise self._error(exc, what, profile=label, profile_id=profile_id, start=start,
                              **self._ctx(index)) from None
        return GpuInstanceInfo(id=int(info.id), profile_id=int(info.profileId), start=int(info.placement.start),
                               size=int(info.placement.size), compute_instances=[])

    def _gi_handle(self, index: int, gi_id: int, what: str) -> Any:
        try:
            return self._call(pynvml.nvmlDeviceGetGpuInstanceById, self._gpu(index).handle, gi_id)
        except pynvml.NVMLError as exc:
            raise self._error(exc, what, gpu_instance=gi_id, **self._ctx(index)) from None

    def destroy_gpu_instance(self, index: int, gi_id: int) -> None:
        what = f"destroy GPU instance {gi_id} on {self._where(index)}"
        gi = self._gi_handle(index, gi_id, what)
        try:
            self._call(pynvml.nvmlGpuInstanceDestroy, gi)
        except pynvml.NVMLError as exc:
            raise self._error(exc, what, gpu_instance=gi_id, **self._ctx(index)) from None

    def create_compute_instance(self, index: int, gi_id: int, ci_profile_id: int | None = None,
                                start: int | None = None) -> CiInfo:
        """Create a compute instance in GPU instance ``gi_id`` (default profile: the whole GPU instance)."""
        what = f"create compute instance in GPU instance {gi_id} on {self._where(index)}"
        gi = self._gi_handle(index, gi_id, what)
        try:
            profiles = self._ci_profiles_of(gi)
            if ci_profile_id is None:
                if not profiles:
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
                prof = max(profiles, key=lambda p: int(p.sliceCount))
            else:
                prof = next((p for p in profiles if int(p.id) == ci_profile_id), None)
            pid = int(prof.id) if prof is not None else int(ci_profile_id)   # type: ignore[arg-type]
            label = f"profile {pid}"
            if prof is not None:
                gi_prof = self._profile(index, int(self._gi_info(gi).profileId))
                gi_name = gi_prof.name if gi_prof else f"{int(prof.sliceCount)}g"
                full = gi_prof is None or int(prof.sliceCount) >= gi_prof.compute_slices
                label = gi_name if full else f"{int(prof.sliceCount)}c.{gi_name}"
            what = f"create compute instance {label}" + (f" at {start}" if start is not None else "") + \
                f" in GPU instance {gi_id} on {self._where(index)}"
            if start is None:
                ci = self._call(pynvml.nvmlGpuInstanceCreateComputeInstance, gi, pid)
            else:
                size = int(prof.sliceCount) if prof is not None else 0
                placement = pynvml.c_nvmlComputeInstancePlacement_t(start, size)
                ci = self._call(pynvml.nvmlGpuInstanceCreateComputeInstanceWithPlacement, gi, pid,
                                ctypes.byref(placement))
            info = self._call(pynvml.nvmlComputeInstanceGetInfo, ci)
            uuid = self._mig_device_uuids(index).get((gi_id, int(info.id)))
        except pynvml.NVMLError as exc:
            raise self._error(exc, what, gpu_instance=gi_id, compute_profile_id=ci_profile_id,
                              **self._ctx(index)) from None
        return CiInfo(id=int(info.id), profile_id=int(info.profileId), start=int(info.placement.start),
                      size=int(info.placement.size), uuid=uuid)

    def destroy_compute_instance(self, index: int, gi_id: int, ci_id: int) -> None:
        what = f"destroy compute instance {ci_id} of GPU instance {gi_id} on {self._where(index)}"
        gi = self._gi_handle(index, gi_id, what)
        try:
            ci = self._call(pynvml.nvmlGpuInstanceGetComputeInstanceById, gi, ci_id)
            self._call(pynvml.nvmlComputeInstanceDestroy, ci)
        except pynvml.NVMLError as exc:
            raise self._error(exc, what, gpu_instance=gi_id, compute_instance=ci_id, **self._ctx(index)) from None

    # --- vGPU -------------------------------------------------------------------------------------------------
    def vgpu_types(self, index: int) -> list[VgpuTypeInfo]:
        """vGPU types the host driver offers on this GPU; empty when it runs no vGPU host driver."""
        h = self._gpu(index).handle
        ctx = self._ctx(index)
        what = f"list vGPU types of {self._where(index)}"
        try:
            supported = list(self._call(pynvml.nvmlDeviceGetSupportedVgpus, h))
            creatable = set(self._call(pynvml.nvmlDeviceGetCreatableVgpus, h))
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                return []
            raise self._error(exc, what, **ctx) from None
        out = []
        for tid in supported:
            try:
                name = str(self._call(pynvml.nvmlVgpuTypeGetName, tid))
                fb = int(self._call(pynvml.nvmlVgpuTypeGetFramebufferSize, tid))
                max_instances = int(self._call(pynvml.nvmlVgpuTypeGetMaxInstances, h, tid))
                gip = int(self._call(pynvml.nvmlVgpuTypeGetGpuInstanceProfileId, tid))
            except pynvml.NVMLError as exc:
                raise self._error(exc, f"read vGPU type {tid} of {self._where(index)}", vgpu_type=tid,
                                  **ctx) from None
            out.append(VgpuTypeInfo(id=int(tid), name=name, framebuffer_mib=fb // MIB, max_instances=max_instances,
                                    gpu_instance_profile_id=None if gip == 0xFFFFFFFF else gip,
                                    creatable=tid in creatable))
        return out

    # --- device nodes -----------------------------------------------------------------------------------------
    def minor_number(self, index: int) -> int:
        """The GPU's minor number: ``/dev/nvidia<minor>``, and the ``gpu<N>`` of its MIG capabilities."""
        h = self._gpu(index).handle
        try:
            return int(self._call(pynvml.nvmlDeviceGetMinorNumber, h))
        except pynvml.NVMLError as exc:
            raise self._error(exc, f"read the minor number of {self._where(index)}", **self._ctx(index)) from None

    # --- events and running vGPUs (host.nvml_events, host.nvml_vgpu) -------------------------------------------
    def events(self, types: int | None = None):
        """A new, not yet opened, NVML event subscription over every GPU (XID critical errors by default)."""
        from gpuvirt.host.nvml_events import XID, EventSubscription

        return EventSubscription(self, XID if types is None else types)

    def vgpu_instances(self, index: int):
        """The vGPUs running on GPU ``index`` as its host driver sees them (empty without a vGPU driver)."""
        from gpuvirt.host.nvml_vgpu import vgpu_instances

        return vgpu_instances(self, index)


    # --- vGPU scheduler ----------------------------------------------------------------------------------------
    def vgpu_scheduler(self, index: int) -> VgpuSchedulerInfo | None:
        """The GPU's vGPU scheduler; None on a GPU that is not in vGPU host mode (a bare-metal or passthrough
        driver has no vGPU scheduler, whatever its scheduler calls would answer) or when NVML says NOT_SUPPORTED."""
        h = self._gpu(index).handle
        try:
            mode = int(self._call(pynvml.nvmlDeviceGetVirtualizationMode, h))
        except pynvml.NVMLError as exc:
            if exc.value in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
                return None
            raise self._error(exc, f"read the virtualization mode of {self._where(index)}",
                              **self._ctx(index)) from None
        if mode != pynvml.NVML_GPU_VIRTUALIZATION_MODE_HOST_VGPU:
            return None
        try:
            caps = self._call(pynvml.nvmlDeviceGetVgpuSchedulerCapabilities, h)
            st = self._call(pynvml.nvmlDeviceGetVgpuSchedulerState, h)
        except pynvml.NVMLError as exc:
            if exc.value in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
                return None
            raise self._error(exc, f"read the vGPU scheduler of {self._where(index)}", **self._ctx(index)) from None
        policy = POLICY_NAME.get(int(st.schedulerPolicy))
        arr = int(st.arrMode) == pynvml.NVML_VGPU_SCHEDULER_ARR_ENABLE
        ts = int(st.schedulerParams.vgpuSchedDataWithARR.timeslice if arr else st.schedulerParams.vgpuSchedData.timeslice)
        return VgpuSchedulerInfo(
            policy=policy, arr=arr, timeslice_us=None if policy == "best-effort" else _us(ts),
            supported_policies=[POLICY_NAME[int(p)] for p in caps.supportedSchedulers if int(p) in POLICY_NAME],
            timeslice_min_us=_us(int(caps.minTimeslice)), timeslice_max_us=_us(int(caps.maxTimeslice)),
            arr_supported=bool(caps.isArrModeSupported))

    def set_vgpu_scheduler(self, index: int, policy: str, timeslice_us: int | None = None) -> None:
        """Set the policy (and the time slice of a share policy; None: the driver's default).  Round-robin
        adaptation is not asked for: the time slice is what gpuvirt's profiles state."""
        h = self._gpu(index).handle
        what = f"set the vGPU scheduler of {self._where(index)} to {policy}" + \
            (f" with a {timeslice_us} us time slice" if timeslice_us else "")
        st = pynvml.c_nvmlVgpuSchedulerSetState_t()
        st.schedulerPolicy = NVML_POLICY[policy]
        st.enableARRMode = 0
        st.schedulerParams.vgpuSchedData.timeslice = (timeslice_us or 0) * 1000
        try:
            self._call(pynvml.nvmlDeviceSetVgpuSchedulerState, h, st)
        except pynvml.NVMLError as exc:
            err = self._error(exc, what, policy=policy, timeslice_us=timeslice_us, **self._ctx(index))
            if exc.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                # NVML answers the same for a GPU with vGPUs on it, one in MIG mode and one without vGPU support
                err.message += " (NVML refuses a scheduler change while vGPUs exist on the GPU or MIG mode is on)"
                err.args = (err.message,)
            raise err from None


__all__ = ["NvmlSession", "NvmlGpu", "VgpuSchedulerInfo", "GiProfileInfo", "GpuInstanceInfo", "CiInfo", "VgpuTypeInfo",
           "normalize_bus_id", "code_name"]
