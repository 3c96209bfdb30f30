"""Plumbing shared by the fake libnvidia-ml: return codes, ctypes helpers, handle encoding and the state
lookups every entry point uses (see :mod:`gpuvirt.sim.nvml`)."""

from __future__ import annotations

import ctypes
import functools
import re
from typing import Any, Callable

from gpuvirt.model import mig as migrules
from gpuvirt.model.catalog import (
    GpuInstanceProfile,
    GpuModel,
    MigGeometry,
    load_catalog,
)
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
        def wrapper(self: "NvmlBase", *args: Any) -> int:
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


class NvmlBase:
    """State lookups and the change protocol shared by every group of entry points."""

    def __init__(self, sim: SimHost) -> None:
        self.sim = sim
        self.call_count = 0
        self._init_count = 0
        # pynvml sets ``restype`` on this symbol, so it must be a plain function, not a bound method
        self.nvmlErrorString = _error_string

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.sim.root)!r})"

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
