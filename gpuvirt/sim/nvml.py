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

import ctypes
import functools
import re
from typing import Any, Callable, Iterable

from gpuvirt.model import mig as migrules
from gpuvirt.model.catalog import MIB, GpuInstanceProfile, GpuModel, MigGeometry, VgpuType, load_catalog
from gpuvirt.sim import rules
from gpuvirt.sim.build import mig_uuid
from gpuvirt.sim.state import SimHost

# nvmlReturn_t values (pynvml NVML_ERROR_*; mig-nvml.md section 6)
SUCCESS = 0
UNINITIALIZED = 1
INVALID_ARGUMENT = 2
NOT_SUPPORTED = 3
NOT_FOUND = 6
INSUFFICIENT_SIZE = 7
LIBRARY_NOT_FOUND = 12
IN_USE = 19
INSUFFICIENT_RESOURCES = 23
ARGUMENT_VERSION_MISMATCH = 25
UNKNOWN = 999

# Strings of the real nvmlErrorString where captured (3, 6, 19, 23: mig-nvml.md section 6); the others
# follow pynvml's built-in table where it has the code, else a short description of the code's name.
ERROR_STRINGS = {
    0: "Success", 1: "Uninitialized", 2: "Invalid Argument", 3: "Not Supported",
    4: "Insufficient Permissions", 5: "Already Initialized", 6: "Not Found", 7: "Insufficient Size",
    8: "Insufficient External Power", 9: "Driver Not Loaded", 10: "Timeout", 11: "Interrupt Request Issue",
    12: "NVML Shared Library Not Found", 13: "Function Not Found", 14: "Corrupted infoROM",
    15: "GPU is lost", 16: "GPU requires restart", 17: "The operating system has blocked the request.",
    18: "RM has detected an NVML/RM version mismatch.", 19: "In use by another client",
    20: "Insufficient Memory", 21: "No data", 22: "vGPU operation not available while ECC is enabled",
    23: "Insufficient Resources", 24: "Frequency not supported", 25: "Argument version mismatch",
    26: "Deprecated", 27: "Not ready", 28: "GPU not found", 29: "Invalid state", 999: "Unknown Error",
}

# Versioned structures (pynvml 13.615.71): a caller passing another version gets ARGUMENT_VERSION_MISMATCH.
GI_PROFILE_INFO_V2 = 0x02000098
CI_PROFILE_INFO_V2 = 0x02000088
MEMORY_V2 = 0x02000028

GPU_INSTANCE_PROFILE_COUNT = 0x12
COMPUTE_INSTANCE_PROFILE_COUNT = 0x09
COMPUTE_INSTANCE_ENGINE_PROFILE_COUNT = 0x01

VIRTUALIZATION_MODE_NONE = 0
VIRTUALIZATION_MODE_HOST_VGPU = 3
HOST_VGPU_MODE_NON_SRIOV = 0
HOST_VGPU_MODE_SRIOV = 1
NO_GPU_INSTANCE_PROFILE = 0xFFFFFFFF      # nvmlVgpuTypeGetGpuInstanceProfileId for time-sliced types

# Defaults when the state does not name a driver: the 570.86.15 branch appears in a MIG capture
# (mig-nvml.md [CAP-570]); the NVML version string is "<CUDA major>.<driver>" on real hosts.
DEFAULT_DRIVER_VERSION = "570.86.15"
DEFAULT_CUDA_VERSION = 12080

# handle kinds
_DEVICE, _GPU_INSTANCE, _COMPUTE_INSTANCE, _MIG_DEVICE = 1, 2, 3, 4


class _Fail(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _error_string(code: Any) -> bytes:
    value = code.value if hasattr(code, "value") else int(code)
    return ERROR_STRINGS.get(value, f"Unknown Error ({value})").encode()


# --- ctypes plumbing ------------------------------------------------------------------------------------
def _encode(kind: int, gpu: int, gi: int = 0, ci: int = 0) -> int:
    return (kind << 56) | ((gpu & 0xFFFF) << 32) | ((gi & 0xFFFF) << 16) | (ci & 0xFFFF)


def _decode(handle: Any) -> tuple[int, int, int, int]:
    addr = _address(handle)
    if not addr:
        raise _Fail(INVALID_ARGUMENT)
    return (addr >> 56) & 0xFF, (addr >> 32) & 0xFFFF, (addr >> 16) & 0xFFFF, addr & 0xFFFF


def _address(handle: Any) -> int | None:
    if handle is None:
        return None
    if isinstance(handle, int):
        return handle
    if isinstance(handle, ctypes.c_void_p):
        return handle.value
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return None


def _target(ref: Any) -> Any:
    """The ctypes object behind an out-parameter (``byref(x)``, ``pointer(x)`` or ``x`` itself)."""
    if ref is None:
        raise _Fail(INVALID_ARGUMENT)
    obj = getattr(ref, "_obj", None)
    if obj is not None:
        return obj
    if isinstance(ref, ctypes._Pointer):
        return ref.contents
    return ref


def _int_arg(value: Any) -> int:
    if isinstance(value, int):
        return value
    if hasattr(value, "_obj"):
        value = value._obj
    if hasattr(value, "value"):
        return int(value.value)
    raise _Fail(INVALID_ARGUMENT)


def _bytes_arg(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if hasattr(value, "value") and isinstance(value.value, bytes):
        return value.value
    raise _Fail(INVALID_ARGUMENT)


def _set(ref: Any, value: int) -> None:
    _target(ref).value = value


def _set_handle(ref: Any, addr: int) -> None:
    obj = _target(ref)
    ctypes.memmove(ctypes.addressof(obj), ctypes.byref(ctypes.c_void_p(addr)), ctypes.sizeof(ctypes.c_void_p))


def _set_handle_field(struct: Any, field: str, addr: int) -> None:
    ftype = dict((f[0], f[1]) for f in struct._fields_)[field]
    setattr(struct, field, ctypes.cast(ctypes.c_void_p(addr), ftype))


def _put_handles(array: Any, addrs: list[int]) -> None:
    step = ctypes.sizeof(array._type_)
    base = ctypes.addressof(array)
    for i, addr in enumerate(addrs):
        ctypes.memmove(base + i * step, ctypes.byref(ctypes.c_void_p(addr)), ctypes.sizeof(ctypes.c_void_p))


def _put_string(buf: Any, length: Any, text: str) -> None:
    data = text.encode()
    capacity = _int_arg(length)
    if len(data) + 1 > capacity:
        if hasattr(length, "_obj"):
            length._obj.value = len(data) + 1
        raise _Fail(INSUFFICIENT_SIZE)
    _target(buf).value = data


def _set_fields(struct: Any, **values: Any) -> None:
    names = {f[0] for f in struct._fields_}
    for key, value in values.items():
        if key in names:
            setattr(struct, key, value)


def _check_version(struct: Any, expected: int) -> None:
    if "version" in {f[0] for f in struct._fields_} and struct.version != expected:
        raise _Fail(ARGUMENT_VERSION_MISMATCH)


def _placement_arg(placement: Any) -> tuple[int, int]:
    p = _target(placement)
    try:
        return int(p.start), int(p.size)
    except AttributeError:
        raise _Fail(INVALID_ARGUMENT) from None


def _array_capacity(array: Any) -> int:
    try:
        return len(array)
    except TypeError:
        raise _Fail(INVALID_ARGUMENT) from None


def _entry(needs_init: bool = True) -> Callable[[Callable[..., None]], Callable[..., int]]:
    def deco(fn: Callable[..., None]) -> Callable[..., int]:
        @functools.wraps(fn)
        def wrapper(self: "FakeNvmlLib", *args: Any) -> int:
            self.call_count += 1
            if needs_init and self._init_count <= 0:
                return UNINITIALIZED
            try:
                fn(self, *args)
            except _Fail as failure:
                return failure.code
            return SUCCESS
        return wrapper
    return deco


# --- MIG helpers (placement rules are gpuvirt.model.mig's) ------------------------------------------------
def _layout(dev: dict[str, Any]) -> list[migrules.Placed]:
    return [migrules.Placed(g["start"], g["size"], g["profile_id"]) for g in dev["mig"]["gpu_instances"]]


def ci_starts(gi_compute: int, ci_compute: int) -> list[int]:
    """Compute-slice starts of a ``ci_compute``-slice CI inside a ``gi_compute``-slice GI.

    UNVERIFIED (no ``nvidia-smi mig -lcipp`` capture): starts aligned to the CI size rounded up to a power of
    two, as GPU instances are aligned in memory slices; for a 7g GI this gives 1c {0..6}, 2c {0,2,4},
    3c {0,4}, 4c {0}, 7c {0}, the layout mig-nvml.md section 1.3 expects.
    """
    width = 1
    while width < ci_compute:
        width *= 2
    return [s for s in range(0, gi_compute, width) if s + ci_compute <= gi_compute]


def _ci_mask(start: int, size: int) -> int:
    return ((1 << size) - 1) << start


class FakeNvmlLib:
    """libnvidia-ml for one simulated host (see the module docstring)."""

    def __init__(self, sim: SimHost) -> None:
        self.sim = sim
        self.call_count = 0
        self._init_count = 0
        # pynvml sets ``restype`` on this symbol, so it must be a plain function, not a bound method
        self.nvmlErrorString = _error_string

    def __repr__(self) -> str:
        return f"FakeNvmlLib({str(self.sim.root)!r})"

    # --- state lookups -----------------------------------------------------------------------------------
    @staticmethod
    def _nvml_devices(state: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted((d for d in state["devices"] if d.get("nvml_index") is not None),
                      key=lambda d: d["nvml_index"])

    def _device_at(self, state: dict[str, Any], index: int) -> dict[str, Any]:
        for d in state["devices"]:
            if d.get("nvml_index") == index:
                return d
        raise _Fail(INVALID_ARGUMENT)

    @staticmethod
    def _model(dev: dict[str, Any]) -> GpuModel:
        return load_catalog().get(dev["model"])

    def _gpu(self, state: dict[str, Any], handle: Any) -> tuple[dict[str, Any], GpuModel]:
        """A physical-GPU handle; MIG device handles are refused like the driver does for GPU-wide calls."""
        kind, index, _, _ = _decode(handle)
        if kind == _MIG_DEVICE:
            raise _Fail(NOT_SUPPORTED)
        if kind != _DEVICE:
            raise _Fail(INVALID_ARGUMENT)
        dev = self._device_at(state, index)
        return dev, self._model(dev)

    def _any_device(self, state: dict[str, Any], handle: Any) -> tuple[dict[str, Any], GpuModel,
                                                                         dict[str, Any] | None,
                                                                         dict[str, Any] | None]:
        kind, index, gi_id, ci_id = _decode(handle)
        if kind == _DEVICE:
            dev = self._device_at(state, index)
            return dev, self._model(dev), None, None
        if kind == _MIG_DEVICE:
            dev = self._device_at(state, index)
            model = self._model(dev)
            self._geometry(dev, model)
            gi = self._find_gi(dev, gi_id)
            ci = self._find_ci(gi, ci_id)
            return dev, model, gi, ci
        raise _Fail(INVALID_ARGUMENT)

    @staticmethod
    def _geometry(dev: dict[str, Any], model: GpuModel) -> MigGeometry:
        # NVML reference: GPU/compute-instance calls fail with NOT_SUPPORTED unless MIG mode is *currently*
        # enabled (a pending enable is not enough).
        if model.mig is None or not dev.get("mig") or dev["mig"].get("current") != 1:
            raise _Fail(NOT_SUPPORTED)
        return model.mig

    @staticmethod
    def _find_gi(dev: dict[str, Any], gi_id: int) -> dict[str, Any]:
        for gi in dev["mig"]["gpu_instances"]:
            if gi["id"] == gi_id:
                return gi
        raise _Fail(INVALID_ARGUMENT)

    @staticmethod
    def _find_ci(gi: dict[str, Any], ci_id: int) -> dict[str, Any]:
        for ci in gi["compute_instances"]:
            if ci["id"] == ci_id:
                return ci
        raise _Fail(INVALID_ARGUMENT)

    def _gi(self, state: dict[str, Any], handle: Any) -> tuple[dict[str, Any], MigGeometry, dict[str, Any]]:
        kind, index, gi_id, _ = _decode(handle)
        if kind != _GPU_INSTANCE:
            raise _Fail(INVALID_ARGUMENT)
        dev = self._device_at(state, index)
        geom = self._geometry(dev, self._model(dev))
        return dev, geom, self._find_gi(dev, gi_id)

    def _ci(self, state: dict[str, Any], handle: Any) -> tuple[dict[str, Any], MigGeometry, dict[str, Any],
                                                               dict[str, Any]]:
        kind, index, gi_id, ci_id = _decode(handle)
        if kind != _COMPUTE_INSTANCE:
            raise _Fail(INVALID_ARGUMENT)
        dev = self._device_at(state, index)
        geom = self._geometry(dev, self._model(dev))
        gi = self._find_gi(dev, gi_id)
        return dev, geom, gi, self._find_ci(gi, ci_id)

    @staticmethod
    def _gi_profile(geom: MigGeometry, profile_id: int) -> GpuInstanceProfile:
        for p in geom.gi_profiles:
            if p.id == profile_id:
                return p
        raise _Fail(NOT_SUPPORTED)

    @staticmethod
    def _ci_profiles(geom: MigGeometry, gi: dict[str, Any]):
        g = geom.profile(gi["profile_id"]).compute_slices
        return g, geom.ci_profiles.get(g, ())

    def _ci_profile(self, geom: MigGeometry, gi: dict[str, Any], profile_id: int):
        g, profiles = self._ci_profiles(geom, gi)
        for p in profiles:
            if p.id == profile_id:
                return g, p
        raise _Fail(NOT_SUPPORTED)

    @staticmethod
    def _mig_devices(dev: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        # nvidia-smi lists MIG devices by ascending (GI id, CI id) in every capture (mig-nvml.md section 4;
        # the rule itself is UNVERIFIED)
        out = []
        for gi in sorted(dev["mig"]["gpu_instances"], key=lambda g: g["id"]):
            for ci in sorted(gi["compute_instances"], key=lambda c: c["id"]):
                out.append((gi, ci))
        return out

    def _transact(self, body: Callable[[dict[str, Any]], None]) -> None:
        """Run a change under the host lock.  A failure must not roll back consumed fault counters, so the
        body validates before it mutates and a failure code is returned after the transaction is saved."""
        code = SUCCESS
        with self.sim.transaction() as state:
            try:
                body(state)
            except _Fail as failure:
                code = failure.code
        if code != SUCCESS:
            raise _Fail(code)

    def _fault(self, state: dict[str, Any], op: str, target: str) -> None:
        fault = self.sim.take_fault(state, f"nvml.{op}", target)
        if fault is not None:
            raise _Fail(int(fault.get("nvml") or UNKNOWN))

    @staticmethod
    def _pci_parts(address: str) -> tuple[int, int, int, int]:
        m = re.fullmatch(r"(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])", address.strip())
        if not m:
            raise _Fail(INVALID_ARGUMENT)
        return (int(m.group(1) or "0", 16), int(m.group(2), 16), int(m.group(3), 16), int(m.group(4)))

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

    # === MIG mode ============================================================================================
    @_entry()
    def nvmlDeviceGetMigMode(self, handle: Any, current: Any, pending: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        # mig-parted treats NOT_SUPPORTED from this call as "GPU is not MIG capable" (pkg/mig/mode/nvml.go)
        if model.mig is None or dev.get("mig") is None:
            raise _Fail(NOT_SUPPORTED)
        _set(current, int(dev["mig"]["current"]))
        _set(pending, int(dev["mig"]["pending"]))

    @_entry()
    def nvmlDeviceSetMigMode(self, handle: Any, mode: Any, status_ref: Any) -> None:
        wanted = _int_arg(mode)
        result: dict[str, int] = {}

        def body(state: dict[str, Any]) -> None:
            dev, model = self._gpu(state, handle)
            if model.mig is None or dev.get("mig") is None:
                raise _Fail(NOT_SUPPORTED)
            if wanted not in (0, 1):
                raise _Fail(INVALID_ARGUMENT)
            self._fault(state, "SetMigMode", dev["address"])
            mig = dev["mig"]
            if wanted == 0 and mig["current"] == 1 and mig["gpu_instances"]:
                # UNVERIFIED choice: the driver refuses to leave MIG mode while GPU instances exist; we
                # report it as the call's own IN_USE (nvidia-smi prints "In use by another client").
                raise _Fail(IN_USE)
            mig["pending"] = wanted
            if wanted == mig["current"]:
                result["status"] = SUCCESS
            elif not model.mig.enable_requires_reset or not dev.get("clients"):
                # Hopper and later switch without a GPU reset; Ampere resets the GPU, which only succeeds
                # when no process holds it (MIG User Guide "Getting Started", mig-nvml.md section 1.4).
                mig["current"] = wanted
                mig["gpu_instances"] = []
                result["status"] = SUCCESS
            else:
                # NVML reference: the call succeeds, the mode stays pending and activationStatus carries
                # the reason (IN_USE when clients hold the GPU); a reset or reboot applies it later.
                result["status"] = IN_USE

        self._transact(body)
        _set(status_ref, result["status"])

    @_entry()
    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any, ref: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        # NVML reference: zero when MIG is unsupported or not enabled
        enabled = model.mig is not None and dev.get("mig") and dev["mig"].get("current") == 1
        _set(ref, model.mig.max_mig_devices if enabled and model.mig else 0)

    # === GPU-instance profiles =================================================================================
    def _fill_gi_profile(self, info: Any, profile: GpuInstanceProfile) -> None:
        e = profile.engines
        _set_fields(info, id=profile.id, isP2pSupported=0, sliceCount=profile.compute_slices,
                    instanceCount=profile.max_instances, multiprocessorCount=profile.sm,
                    copyEngineCount=e.ce, decoderCount=e.dec, encoderCount=e.enc, jpegCount=e.jpeg,
                    ofaCount=e.ofa, memorySizeMB=profile.memory_mib,
                    # UNVERIFIED: the name field's exact text was never captured; gpuvirt computes
                    # profile names itself from memorySizeMB (mig-nvml.md section 1.2)
                    name=f"MIG {profile.name}".encode())

    def _gi_profile_by_constant(self, handle: Any, constant: int) -> GpuInstanceProfile:
        dev, model = self._gpu(self.sim.peek(), handle)
        geom = self._geometry(dev, model)
        if not 0 <= constant < GPU_INSTANCE_PROFILE_COUNT:
            raise _Fail(INVALID_ARGUMENT)
        profile = geom.by_constant(constant)
        if profile is None:
            raise _Fail(NOT_SUPPORTED)
        return profile

    @_entry()
    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: Any, constant: Any, ref: Any) -> None:
        # The argument is an NVML_GPU_INSTANCE_PROFILE_* constant; the id returned in the struct is the
        # profile id every later call takes (two ID spaces, mig-nvml.md section 1.1).
        self._fill_gi_profile(_target(ref), self._gi_profile_by_constant(handle, _int_arg(constant)))

    @_entry()
    def nvmlDeviceGetGpuInstanceProfileInfoV(self, handle: Any, constant: Any, ref: Any) -> None:
        info = _target(ref)
        _check_version(info, GI_PROFILE_INFO_V2)
        self._fill_gi_profile(info, self._gi_profile_by_constant(handle, _int_arg(constant)))

    @_entry()
    def nvmlDeviceGetGpuInstanceProfileInfoByIdV(self, handle: Any, profile_id: Any, ref: Any) -> None:
        info = _target(ref)
        _check_version(info, GI_PROFILE_INFO_V2)
        dev, model = self._gpu(self.sim.peek(), handle)
        self._fill_gi_profile(info, self._gi_profile(self._geometry(dev, model), _int_arg(profile_id)))

    @_entry()
    def nvmlDeviceGetGpuInstanceRemainingCapacity(self, handle: Any, profile_id: Any, ref: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        geom = self._geometry(dev, model)
        profile = self._gi_profile(geom, _int_arg(profile_id))
        _set(ref, migrules.remaining_capacity(geom, _layout(dev), profile))

    def _possible_placements(self, handle: Any, profile_id: Any, array: Any, count: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        profile = self._gi_profile(self._geometry(dev, model), _int_arg(profile_id))
        # NVML reference: every placement the profile allows, whether or not it is occupied now
        placements = profile.placements
        if array is None:
            _set(count, len(placements))
            return
        if _array_capacity(array) < len(placements):
            _set(count, len(placements))
            raise _Fail(INSUFFICIENT_SIZE)
        for i, (start, size) in enumerate(placements):
            array[i].start = start
            array[i].size = size
        _set(count, len(placements))

    @_entry()
    def nvmlDeviceGetGpuInstancePossiblePlacements_v2(self, handle: Any, profile_id: Any, array: Any,
                                                      count: Any) -> None:
        self._possible_placements(handle, profile_id, array, count)

    @_entry()
    def nvmlDeviceGetGpuInstancePossiblePlacements(self, handle: Any, profile_id: Any, array: Any,
                                                   count: Any) -> None:
        self._possible_placements(handle, profile_id, array, count)

    # === GPU instances ===========================================================================================
    def _create_gi(self, handle: Any, profile_id: int, placement: tuple[int, int] | None, ref: Any) -> None:
        created: dict[str, int] = {}

        def body(state: dict[str, Any]) -> None:
            dev, model = self._gpu(state, handle)
            geom = self._geometry(dev, model)
            profile = self._gi_profile(geom, profile_id)
            if placement is not None:
                start, size = placement
                # only the documented {starts}:size of the profile are valid placements (-lgipp)
                if size != profile.memory_slices or start not in profile.starts:
                    raise _Fail(INVALID_ARGUMENT)
            extra = f" profile={profile.id}"
            self._fault(state, "CreateGpuInstance", dev["address"] + extra)
            layout = _layout(dev)
            if placement is None:
                # Order-dependent driver choice (UNVERIFIED rule fitted to captures; gpuvirt.model.mig)
                start = migrules.driver_choice(geom, layout, profile)
                if start is None:
                    raise _Fail(INSUFFICIENT_RESOURCES)
            elif not migrules.can_place(geom, layout, profile, start):
                # overlap, compute budget or per-profile maximum: NVML_ERROR_INSUFFICIENT_RESOURCES
                raise _Fail(INSUFFICIENT_RESOURCES)
            gi_id = migrules.gi_id_for(geom, start, profile.memory_slices)
            if any(g["id"] == gi_id for g in dev["mig"]["gpu_instances"]):
                raise _Fail(INSUFFICIENT_RESOURCES)
            dev["mig"]["gpu_instances"].append({"id": gi_id, "profile_id": profile.id, "start": start,
                                                "size": profile.memory_slices, "compute_instances": []})
            created["index"], created["gi"] = dev["nvml_index"], gi_id

        self._transact(body)
        _set_handle(ref, _encode(_GPU_INSTANCE, created["index"], created["gi"]))

    @_entry()
    def nvmlDeviceCreateGpuInstance(self, handle: Any, profile_id: Any, ref: Any) -> None:
        self._create_gi(handle, _int_arg(profile_id), None, ref)

    @_entry()
    def nvmlDeviceCreateGpuInstanceWithPlacement(self, handle: Any, profile_id: Any, placement: Any,
                                                 ref: Any) -> None:
        self._create_gi(handle, _int_arg(profile_id), _placement_arg(placement), ref)

    @_entry()
    def nvmlGpuInstanceDestroy(self, gi_handle: Any) -> None:
        def body(state: dict[str, Any]) -> None:
            dev, _, gi = self._gi(state, gi_handle)
            self._fault(state, "DestroyGpuInstance", f"{dev['address']} gi={gi['id']}")
            # NVML reference: IN_USE while compute instances (or processes) are active on the GI; a
            # MIG-backed vGPU living on it holds it the same way.
            hosted = {g for _, g in rules.board_vgpus(state, dev) if g is not None}
            if gi["compute_instances"] or gi["id"] in hosted:
                raise _Fail(IN_USE)
            dev["mig"]["gpu_instances"] = [g for g in dev["mig"]["gpu_instances"] if g["id"] != gi["id"]]

        self._transact(body)

    @_entry()
    def nvmlDeviceGetGpuInstances(self, handle: Any, profile_id: Any, array: Any, count: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        profile = self._gi_profile(self._geometry(dev, model), _int_arg(profile_id))
        gis = sorted((g for g in dev["mig"]["gpu_instances"] if g["profile_id"] == profile.id),
                     key=lambda g: g["id"])
        # NVML reference: the caller sizes the buffer from instanceCount; a NULL buffer is invalid
        if array is None:
            raise _Fail(INVALID_ARGUMENT)
        if _array_capacity(array) < len(gis):
            _set(count, len(gis))
            raise _Fail(INSUFFICIENT_SIZE)
        _put_handles(array, [_encode(_GPU_INSTANCE, dev["nvml_index"], g["id"]) for g in gis])
        _set(count, len(gis))

    @_entry()
    def nvmlDeviceGetGpuInstanceById(self, handle: Any, gi_id: Any, ref: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        self._geometry(dev, model)
        wanted = _int_arg(gi_id)
        if not any(g["id"] == wanted for g in dev["mig"]["gpu_instances"]):
            raise _Fail(NOT_FOUND)
        _set_handle(ref, _encode(_GPU_INSTANCE, dev["nvml_index"], wanted))

    @_entry()
    def nvmlGpuInstanceGetInfo(self, gi_handle: Any, ref: Any) -> None:
        dev, _, gi = self._gi(self.sim.peek(), gi_handle)
        info = _target(ref)
        _set_handle_field(info, "device", _encode(_DEVICE, dev["nvml_index"]))
        info.id = gi["id"]
        info.profileId = gi["profile_id"]
        info.placement.start = gi["start"]
        info.placement.size = gi["size"]

    # === compute-instance profiles and compute instances =====================================================
    def _ci_sm(self, geom: MigGeometry, gi: dict[str, Any], ci_slices: int) -> int:
        gp = geom.profile(gi["profile_id"])
        # Ampere: 14 SMs per compute slice, which the proportional share reproduces; Hopper per-CI SM
        # counts were never captured (UNVERIFIED) - a full-GI CI has the GI's SM count.
        return gp.sm if ci_slices >= gp.compute_slices else gp.sm * ci_slices // gp.compute_slices

    def _ci_name(self, dev: dict[str, Any], model: GpuModel, gi: dict[str, Any], ci: dict[str, Any]) -> str:
        assert model.mig is not None
        gp = model.mig.profile(gi["profile_id"])
        return gp.name if ci["size"] >= gp.compute_slices else f"{ci['size']}c.{gp.name}"

    def _fill_ci_profile(self, gi_handle: Any, constant: Any, eng_profile: Any, ref: Any, v2: bool) -> None:
        info = _target(ref)
        if v2:
            _check_version(info, CI_PROFILE_INFO_V2)
        dev, geom, gi = self._gi(self.sim.peek(), gi_handle)
        c = _int_arg(constant)
        if not 0 <= c < COMPUTE_INSTANCE_PROFILE_COUNT or \
                not 0 <= _int_arg(eng_profile) < COMPUTE_INSTANCE_ENGINE_PROFILE_COUNT:
            raise _Fail(INVALID_ARGUMENT)
        g, profile = self._ci_profile(geom, gi, c)
        gp = geom.profile(gi["profile_id"])
        e = gp.engines
        name = gp.name if profile.compute_slices >= g else f"{profile.compute_slices}c.{gp.name}"
        # compute-instance profile ids equal the NVML_COMPUTE_INSTANCE_PROFILE_* constants (MIG guide
        # -lcip output); the engines are shared with the whole GI
        _set_fields(info, id=profile.id, sliceCount=profile.compute_slices, instanceCount=profile.max_instances,
                    multiprocessorCount=self._ci_sm(geom, gi, profile.compute_slices),
                    sharedCopyEngineCount=e.ce, sharedDecoderCount=e.dec, sharedEncoderCount=e.enc,
                    sharedJpegCount=e.jpeg, sharedOfaCount=e.ofa,
                    name=f"MIG {name}".encode())   # UNVERIFIED text, like the GI profile name

    @_entry()
    def nvmlGpuInstanceGetComputeInstanceProfileInfo(self, gi_handle: Any, constant: Any, eng_profile: Any,
                                                     ref: Any) -> None:
        self._fill_ci_profile(gi_handle, constant, eng_profile, ref, v2=False)

    @_entry()
    def nvmlGpuInstanceGetComputeInstanceProfileInfoV(self, gi_handle: Any, constant: Any, eng_profile: Any,
                                                      ref: Any) -> None:
        self._fill_ci_profile(gi_handle, constant, eng_profile, ref, v2=True)

    @staticmethod
    def _ci_used_mask(gi: dict[str, Any]) -> int:
        mask = 0
        for ci in gi["compute_instances"]:
            mask |= _ci_mask(ci["start"], ci["size"])
        return mask

    def _ci_free_starts(self, gi: dict[str, Any], g: int, profile: Any) -> list[int]:
        used = self._ci_used_mask(gi)
        existing = sum(1 for ci in gi["compute_instances"] if ci["profile_id"] == profile.id)
        if existing >= profile.max_instances:
            return []
        return [s for s in ci_starts(g, profile.compute_slices)
                if not _ci_mask(s, profile.compute_slices) & used]

    @_entry()
    def nvmlGpuInstanceGetComputeInstanceRemainingCapacity(self, gi_handle: Any, profile_id: Any,
                                                           ref: Any) -> None:
        _, geom, gi = self._gi(self.sim.peek(), gi_handle)
        g, profile = self._ci_profile(geom, gi, _int_arg(profile_id))
        existing = sum(1 for ci in gi["compute_instances"] if ci["profile_id"] == profile.id)
        free = len(self._ci_free_starts(gi, g, profile))
        _set(ref, max(0, min(free, profile.max_instances - existing)))

    @_entry()
    def nvmlGpuInstanceGetComputeInstancePossiblePlacements(self, gi_handle: Any, profile_id: Any, array: Any,
                                                            count: Any) -> None:
        _, geom, gi = self._gi(self.sim.peek(), gi_handle)
        g, profile = self._ci_profile(geom, gi, _int_arg(profile_id))
        starts = ci_starts(g, profile.compute_slices)
        if array is None:
            _set(count, len(starts))
            return
        if _array_capacity(array) < len(starts):
            _set(count, len(starts))
            raise _Fail(INSUFFICIENT_SIZE)
        for i, s in enumerate(starts):
            array[i].start = s
            array[i].size = profile.compute_slices
        _set(count, len(starts))

    def _create_ci(self, gi_handle: Any, profile_id: int, placement: tuple[int, int] | None, ref: Any) -> None:
        created: dict[str, int] = {}

        def body(state: dict[str, Any]) -> None:
            dev, geom, gi = self._gi(state, gi_handle)
            g, profile = self._ci_profile(geom, gi, profile_id)
            if placement is not None:
                start, size = placement
                if size != profile.compute_slices or start not in ci_starts(g, profile.compute_slices):
                    raise _Fail(INVALID_ARGUMENT)
            self._fault(state, "CreateComputeInstance", f"{dev['address']} gi={gi['id']} profile={profile.id}")
            free = self._ci_free_starts(gi, g, profile)
            if placement is None:
                # UNVERIFIED: lowest free start first (no capture of the driver's choice for CIs)
                if not free:
                    raise _Fail(INSUFFICIENT_RESOURCES)
                start = free[0]
            elif start not in free:
                raise _Fail(INSUFFICIENT_RESOURCES)
            taken = {ci["id"] for ci in gi["compute_instances"]}
            ci_id = next(i for i in range(len(taken) + 1) if i not in taken)   # ids restart at 0 per GI
            gi["compute_instances"].append({
                "id": ci_id, "profile_id": profile.id, "start": start, "size": profile.compute_slices,
                "uuid": mig_uuid(state["seed"], dev["uuid"], gi["id"], ci_id, state["boot"]),
            })
            created.update(index=dev["nvml_index"], gi=gi["id"], ci=ci_id)

        self._transact(body)
        _set_handle(ref, _encode(_COMPUTE_INSTANCE, created["index"], created["gi"], created["ci"]))

    @_entry()
    def nvmlGpuInstanceCreateComputeInstance(self, gi_handle: Any, profile_id: Any, ref: Any) -> None:
        self._create_ci(gi_handle, _int_arg(profile_id), None, ref)

    @_entry()
    def nvmlGpuInstanceCreateComputeInstanceWithPlacement(self, gi_handle: Any, profile_id: Any, placement: Any,
                                                          ref: Any) -> None:
        self._create_ci(gi_handle, _int_arg(profile_id), _placement_arg(placement), ref)

    @_entry()
    def nvmlComputeInstanceDestroy(self, ci_handle: Any) -> None:
        def body(state: dict[str, Any]) -> None:
            dev, _, gi, ci = self._ci(state, ci_handle)
            self._fault(state, "DestroyComputeInstance", f"{dev['address']} gi={gi['id']} ci={ci['id']}")
            gi["compute_instances"] = [c for c in gi["compute_instances"] if c["id"] != ci["id"]]

        self._transact(body)

    @_entry()
    def nvmlGpuInstanceGetComputeInstances(self, gi_handle: Any, profile_id: Any, array: Any, count: Any) -> None:
        dev, geom, gi = self._gi(self.sim.peek(), gi_handle)
        _, profile = self._ci_profile(geom, gi, _int_arg(profile_id))
        cis = sorted((c for c in gi["compute_instances"] if c["profile_id"] == profile.id), key=lambda c: c["id"])
        if array is None:
            raise _Fail(INVALID_ARGUMENT)
        if _array_capacity(array) < len(cis):
            _set(count, len(cis))
            raise _Fail(INSUFFICIENT_SIZE)
        _put_handles(array, [_encode(_COMPUTE_INSTANCE, dev["nvml_index"], gi["id"], c["id"]) for c in cis])
        _set(count, len(cis))

    @_entry()
    def nvmlGpuInstanceGetComputeInstanceById(self, gi_handle: Any, ci_id: Any, ref: Any) -> None:
        dev, _, gi = self._gi(self.sim.peek(), gi_handle)
        wanted = _int_arg(ci_id)
        if not any(c["id"] == wanted for c in gi["compute_instances"]):
            raise _Fail(NOT_FOUND)
        _set_handle(ref, _encode(_COMPUTE_INSTANCE, dev["nvml_index"], gi["id"], wanted))

    @_entry()
    def nvmlComputeInstanceGetInfo_v2(self, ci_handle: Any, ref: Any) -> None:
        dev, _, gi, ci = self._ci(self.sim.peek(), ci_handle)
        info = _target(ref)
        _set_handle_field(info, "device", _encode(_DEVICE, dev["nvml_index"]))
        _set_handle_field(info, "gpuInstance", _encode(_GPU_INSTANCE, dev["nvml_index"], gi["id"]))
        info.id = ci["id"]
        info.profileId = ci["profile_id"]
        info.placement.start = ci["start"]
        info.placement.size = ci["size"]

    # === MIG devices ================================================================================================
    @_entry()
    def nvmlDeviceIsMigDeviceHandle(self, handle: Any, ref: Any) -> None:
        kind, _, _, _ = _decode(handle)
        if kind not in (_DEVICE, _MIG_DEVICE):
            raise _Fail(INVALID_ARGUMENT)
        _set(ref, 1 if kind == _MIG_DEVICE else 0)

    def _mig_handle(self, handle: Any) -> tuple[dict[str, Any], GpuModel, dict[str, Any], dict[str, Any]]:
        dev, model, gi, ci = self._any_device(self.sim.peek(), handle)
        if gi is None or ci is None:
            raise _Fail(NOT_SUPPORTED)
        return dev, model, gi, ci

    @_entry()
    def nvmlDeviceGetGpuInstanceId(self, handle: Any, ref: Any) -> None:
        _, _, gi, _ = self._mig_handle(handle)
        _set(ref, gi["id"])

    @_entry()
    def nvmlDeviceGetComputeInstanceId(self, handle: Any, ref: Any) -> None:
        _, _, _, ci = self._mig_handle(handle)
        _set(ref, ci["id"])

    @_entry()
    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: Any, ref: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        self._geometry(dev, model)
        devices = self._mig_devices(dev)
        i = _int_arg(index)
        if not 0 <= i < len(devices):
            raise _Fail(NOT_FOUND)
        gi, ci = devices[i]
        _set_handle(ref, _encode(_MIG_DEVICE, dev["nvml_index"], gi["id"], ci["id"]))

    @_entry()
    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any, ref: Any) -> None:
        kind, _, _, _ = _decode(handle)
        if kind != _MIG_DEVICE:
            raise _Fail(INVALID_ARGUMENT)
        dev, _, _, _ = self._mig_handle(handle)
        _set_handle(ref, _encode(_DEVICE, dev["nvml_index"]))

    @_entry()
    def nvmlDeviceGetAttributes_v2(self, handle: Any, ref: Any) -> None:
        # Only MIG devices: the catalog has no SM counts for whole GPUs outside MIG mode.
        dev, model, gi, ci = self._mig_handle(handle)
        assert model.mig is not None
        gp = model.mig.profile(gi["profile_id"])
        e = gp.engines
        _set_fields(_target(ref), multiprocessorCount=self._ci_sm(model.mig, gi, ci["size"]),
                    sharedCopyEngineCount=e.ce, sharedDecoderCount=e.dec, sharedEncoderCount=e.enc,
                    sharedJpegCount=e.jpeg, sharedOfaCount=e.ofa, gpuInstanceSliceCount=gp.compute_slices,
                    computeInstanceSliceCount=ci["size"], memorySizeMB=gp.memory_mib)

    # === vGPU =======================================================================================================
    @_entry()
    def nvmlDeviceGetVirtualizationMode(self, handle: Any, ref: Any) -> None:
        _, model = self._gpu(self.sim.peek(), handle)
        _set(ref, VIRTUALIZATION_MODE_HOST_VGPU if model.vgpu else VIRTUALIZATION_MODE_NONE)

    @_entry()
    def nvmlDeviceGetHostVgpuMode(self, handle: Any, ref: Any) -> None:
        _, model = self._gpu(self.sim.peek(), handle)
        if model.vgpu is None:
            raise _Fail(NOT_SUPPORTED)
        _set(ref, HOST_VGPU_MODE_SRIOV if model.vgpu.parent == "vf" else HOST_VGPU_MODE_NON_SRIOV)

    @staticmethod
    def _type_list(ids: Iterable[int], count: Any, array: Any) -> None:
        ids = list(ids)
        # pynvml asks with count 0 and a NULL array first: SUCCESS means "none", INSUFFICIENT_SIZE returns
        # the count for the second call
        if array is None or _int_arg(count) < len(ids):
            _set(count, len(ids))
            if ids:
                raise _Fail(INSUFFICIENT_SIZE)
            return
        for i, tid in enumerate(ids):
            array[i] = tid
        _set(count, len(ids))

    @_entry()
    def nvmlDeviceGetSupportedVgpus(self, handle: Any, count: Any, array: Any) -> None:
        _, model = self._gpu(self.sim.peek(), handle)
        if model.vgpu is None:
            raise _Fail(NOT_SUPPORTED)
        self._type_list((t.id for t in model.vgpu.types), count, array)

    @_entry()
    def nvmlDeviceGetCreatableVgpus(self, handle: Any, count: Any, array: Any) -> None:
        state = self.sim.peek()
        dev, model = self._gpu(state, handle)
        if model.vgpu is None:
            raise _Fail(NOT_SUPPORTED)
        self._type_list((t.id for t in rules.creatable_types(state, dev)), count, array)

    def _vgpu_type(self, type_id: Any) -> tuple[GpuModel, VgpuType]:
        wanted = _int_arg(type_id)
        for dev in self._nvml_devices(self.sim.peek()):
            model = self._model(dev)
            if model.vgpu is None:
                continue
            for t in model.vgpu.types:
                if t.id == wanted:
                    return model, t
        raise _Fail(INVALID_ARGUMENT)

    @_entry()
    def nvmlVgpuTypeGetName(self, type_id: Any, buf: Any, length: Any) -> None:
        model, t = self._vgpu_type(type_id)
        assert model.vgpu is not None
        _put_string(buf, length, f"{model.vgpu.name_prefix}{t.name}")

    @_entry()
    def nvmlVgpuTypeGetClass(self, type_id: Any, buf: Any, length: Any) -> None:
        _, t = self._vgpu_type(type_id)
        # UNVERIFIED mapping of the series letter to NVML's class string
        classes = {"Q": "Quadro", "C": "Compute", "B": "NVS", "A": "GRID"}
        _put_string(buf, length, classes.get(t.series, "Compute"))

    @_entry()
    def nvmlVgpuTypeGetFramebufferSize(self, type_id: Any, ref: Any) -> None:
        _, t = self._vgpu_type(type_id)
        _set(ref, t.framebuffer_mib * MIB)

    @_entry()
    def nvmlVgpuTypeGetNumDisplayHeads(self, type_id: Any, ref: Any) -> None:
        _, t = self._vgpu_type(type_id)
        _set(ref, t.num_heads)

    @_entry()
    def nvmlVgpuTypeGetFrameRateLimit(self, type_id: Any, ref: Any) -> None:
        _, t = self._vgpu_type(type_id)
        _set(ref, t.frl_config)

    @_entry()
    def nvmlVgpuTypeGetResolution(self, type_id: Any, head: Any, xref: Any, yref: Any) -> None:
        _, t = self._vgpu_type(type_id)
        if _int_arg(head) >= max(t.num_heads, 1):
            raise _Fail(INVALID_ARGUMENT)
        x, _, y = t.max_resolution.partition("x")
        _set(xref, int(x))
        _set(yref, int(y))

    @_entry()
    def nvmlVgpuTypeGetMaxInstances(self, handle: Any, type_id: Any, ref: Any) -> None:
        _, model = self._gpu(self.sim.peek(), handle)
        wanted = _int_arg(type_id)
        t = next((t for t in (model.vgpu.types if model.vgpu else ()) if t.id == wanted), None)
        if t is None:
            raise _Fail(INVALID_ARGUMENT)
        _set(ref, t.max_instances)

    @_entry()
    def nvmlVgpuTypeGetGpuInstanceProfileId(self, type_id: Any, ref: Any) -> None:
        _, t = self._vgpu_type(type_id)
        _set(ref, t.gpu_instance_profile_id if t.gpu_instance_profile_id is not None else NO_GPU_INSTANCE_PROFILE)


__all__ = ["FakeNvmlLib", "ERROR_STRINGS", "ci_starts"]
