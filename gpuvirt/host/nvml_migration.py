"""NVML's vGPU migration pre-flight, as the host driver answers it: the metadata of a running vGPU, of a
physical GPU, and their compatibility (``../shared/reference/live-migration.md`` section 2).

``move_compatibility`` asks the source host's library for the vGPU's metadata
(``nvmlVgpuInstanceGetMetadata``), the target host's for the target GPU's (``nvmlDeviceGetVgpuMetadata``),
and the *target* host's library for the verdict (``nvmlGetVgpuCompatibility``): the receiving driver is the
one that must accept the vGPU, and it alone knows what it can resume.  The two sessions may be the same (a
move between GPUs of one host) or belong to different hosts (each a real libnvidia-ml or a simulated one).

The answer is returned as :class:`gpuvirt.model.preflight.Compatibility` - NVML's VM compatibility bits and
limit code unchanged, with one :class:`~gpuvirt.model.preflight.Reason` per limit bit saying what NVML names
(NVML gives codes, not reasons; the preflight rules give reasons for the same facts).  ``vgpu_metadata`` and
``pgpu_metadata`` state the same structures as :mod:`gpuvirt.model.preflight` facts, so the service layer
can compare NVML's verdict with the rules' (and explain it).

Every ``pynvml.NVMLError`` becomes the :mod:`gpuvirt.errors` class of its code, with the GPU and the vGPU
in the message.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pynvml

from gpuvirt.errors import NvmlNotFoundError
from gpuvirt.model import preflight

NO_GPU_INSTANCE = 0xFFFFFFFF
_UNAVAILABLE = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

_LIMIT_TEXT = {
    preflight.VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER: "the host drivers of source and target",
    preflight.VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER: "the guest driver",
    preflight.VGPU_COMPATIBILITY_LIMIT_GPU: "the target GPU",
    preflight.VGPU_COMPATIBILITY_LIMIT_OTHER: "something other than drivers and GPU",
}


def _text(value: Any) -> str | None:
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.strip() or None


def _model_of(session: Any, handle: Any):
    """The catalog model of a GPU from its PCI identity (None when the catalog does not know it)."""
    from gpuvirt.host.discover import _model_by_device_id

    info = session._call(pynvml.nvmlDeviceGetPciInfo, handle)
    return _model_by_device_id(int(info.pciDeviceId), int(info.pciSubSystemId)), (int(info.pciDeviceId) >> 16) & 0xFFFF


def resolve_instance(session: Any, index: int, instance: int | str) -> int:
    """The NVML vGPU instance id for ``instance``: an id already, or the mdev UUID / VM UUID of an active vGPU
    on GPU ``index``.  NvmlNotFoundError when no active vGPU there matches."""
    if isinstance(instance, int) and not isinstance(instance, bool):
        return instance
    wanted = str(instance).strip().lower()
    ref = session._gpu(index)
    what = f"find vGPU {instance} on GPU {index} ({ref.bus_id})"
    try:
        ids = list(session._call(pynvml.nvmlDeviceGetActiveVgpus, ref.handle))
    except pynvml.NVMLError as exc:
        raise session._error(exc, what, gpu=index) from None
    for vid in ids:
        for fn in (pynvml.nvmlVgpuInstanceGetMdevUUID, pynvml.nvmlVgpuInstanceGetVmID):
            try:
                got = session._call(fn, vid)
            except pynvml.NVMLError as exc:
                if exc.value in _UNAVAILABLE or exc.value == pynvml.NVML_ERROR_NOT_FOUND:
                    continue
                raise session._error(exc, what, gpu=index, vgpu_instance=vid) from None
            if isinstance(got, (list, tuple)):
                got = got[0]
            if (_text(got) or "").lower() == wanted:
                return int(vid)
    raise NvmlNotFoundError(f"{what}: no running vGPU on that GPU has that mdev or VM UUID", gpu=index,
                            vgpu=str(instance))


def _raw_vgpu(session: Any, index: int, vid: int) -> Any:
    ref = session._gpu(index)
    try:
        return session._call(pynvml.nvmlVgpuInstanceGetMetadata, vid)
    except pynvml.NVMLError as exc:
        raise session._error(exc, f"read the migration metadata of vGPU instance {vid} on GPU {index} "
                                  f"({ref.bus_id})", gpu=index, vgpu_instance=vid) from None


def _raw_pgpu(session: Any, index: int) -> Any:
    ref = session._gpu(index)
    try:
        return session._call(pynvml.nvmlDeviceGetVgpuMetadata, ref.handle)
    except pynvml.NVMLError as exc:
        raise session._error(exc, f"read the vGPU migration metadata of GPU {index} ({ref.bus_id})",
                             gpu=index) from None


def _stack(base: preflight.HostStack | None, driver: str | None,
           vgpu_range: tuple[int, int] | None) -> preflight.HostStack:
    b = base or preflight.HostStack()
    return preflight.HostStack(driver=driver or b.driver, os=b.os, kernel=b.kernel, qemu=b.qemu, libvirt=b.libvirt,
                               vgpu_range=vgpu_range if vgpu_range is not None else b.vgpu_range)


def vgpu_metadata(session: Any, index: int, instance: int | str, *,
                  stack: preflight.HostStack | None = None) -> preflight.VgpuMetadata:
    """The source side of a move as preflight facts: ``nvmlVgpuInstanceGetMetadata`` (host driver, guest
    state, guest driver and vGPU version, migration capability) plus the vGPU's type, the GPU's catalog model
    and PCI device id, and whether the vGPU is MIG-backed.  ``instance``: NVML vGPU instance id, mdev UUID
    or VM UUID; ``stack``: what else is known of the source host (OS, kernel, QEMU, libvirt -
    :func:`gpuvirt.host.stack.host_stack`), NVML's host driver version taking precedence."""
    vid = resolve_instance(session, index, instance)
    raw = _raw_vgpu(session, index, vid)
    ref = session._gpu(index)
    what = f"read vGPU instance {vid} on GPU {index} ({ref.bus_id})"
    try:
        type_id = int(session._call(pynvml.nvmlVgpuInstanceGetType, vid))
        type_name = _text(session._call(pynvml.nvmlVgpuTypeGetName, type_id))
        gi = int(session._call(pynvml.nvmlVgpuInstanceGetGpuInstanceId, vid))
        model, device_id = _model_of(session, ref.handle)
    except pynvml.NVMLError as exc:
        raise session._error(exc, what, gpu=index, vgpu_instance=vid) from None
    initialized = int(raw.guestInfoState) == pynvml.NVML_VGPU_INSTANCE_GUEST_INFO_STATE_INITIALIZED
    guest = preflight.GuestFacts(initialized=initialized, driver=_text(raw.guestDriverVersion),
                                 vgpu_version=int(raw.guestVgpuVersion) if initialized else None)
    if model is not None and model.vgpu is not None:
        vtype = next((t for t in model.vgpu.types if t.id == type_id), None)
        if vtype is not None:
            type_name = vtype.name
    return preflight.VgpuMetadata(
        type_id=type_id, type_name=type_name, model=model.id if model else f"pci-{device_id:04x}",
        device_id=device_id, family=model.architecture if model else None, mig_backed=gi != NO_GPU_INSTANCE,
        stack=_stack(stack, _text(raw.hostDriverVersion), None), guest=guest,
        migration_cap=bool(int(raw.vgpuVirtualizationCaps) & preflight.VIRTUALIZATION_CAP_MIGRATION))


def pgpu_metadata(session: Any, index: int, *, stack: preflight.HostStack | None = None) -> preflight.PgpuMetadata:
    """The target side as preflight facts: ``nvmlDeviceGetVgpuMetadata`` (host driver, supported vGPU version
    range, migration capability) plus the GPU's catalog model, PCI device id and supported vGPU types."""
    raw = _raw_pgpu(session, index)
    ref = session._gpu(index)
    try:
        model, device_id = _model_of(session, ref.handle)
        types = frozenset(int(t) for t in session._call(pynvml.nvmlDeviceGetSupportedVgpus, ref.handle))
    except pynvml.NVMLError as exc:
        raise session._error(exc, f"read the vGPU types of GPU {index} ({ref.bus_id})", gpu=index) from None
    rng = raw.hostSupportedVgpuRange
    return preflight.PgpuMetadata(
        model=model.id if model else f"pci-{device_id:04x}", device_id=device_id,
        family=model.architecture if model else None, supported_types=types,
        stack=_stack(stack, _text(raw.hostDriverVersion), (int(rng.minVersion), int(rng.maxVersion))),
        migration_cap=bool(int(raw.pgpuVirtualizationCaps) & preflight.VIRTUALIZATION_CAP_MIGRATION))


def _reasons(bits: int, code: int, vm_raw: Any, pg_raw: Any) -> tuple[preflight.Reason, ...]:
    allows = preflight.COLD if bits & preflight.VGPU_VM_COMPATIBILITY_COLD else preflight.NONE
    if bits & preflight.VGPU_VM_COMPATIBILITY_LIVE:
        allows = preflight.LIVE
    out = []
    for bit, text in sorted(_LIMIT_TEXT.items()):
        if not code & bit:
            continue
        detail = f"NVML limits the move by {text}"
        if bit == preflight.VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER:
            detail += f" ({_text(vm_raw.hostDriverVersion) or '?'} on the source, " \
                      f"{_text(pg_raw.hostDriverVersion) or '?'} on the target)"
        elif bit == preflight.VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER:
            rng = pg_raw.hostSupportedVgpuRange
            detail += f" (guest {_text(vm_raw.guestDriverVersion) or '?'}, vGPU version " \
                      f"{int(vm_raw.guestVgpuVersion):#x}; target accepts {int(rng.minVersion):#x}.." \
                      f"{int(rng.maxVersion):#x})"
        out.append(preflight.Reason(allows, bit, detail))
    return tuple(out)


def move_compatibility(src_session: Any, src_index: int, src_instance: int | str, dst_session: Any,
                       dst_index: int) -> preflight.Compatibility:
    """NVML's answer for moving vGPU ``src_instance`` (id, mdev UUID or VM UUID) of GPU ``src_index`` on the
    source host to GPU ``dst_index`` on the target host: ``vm_compatibility`` (LIVE | SLEEP | HIBERNATE |
    COLD bits) and ``limit_code`` as NVML gives them."""
    vid = resolve_instance(src_session, src_index, src_instance)
    return _compatibility(dst_session, dst_index, _raw_vgpu(src_session, src_index, vid), src_index, vid)


def vgpu_metadata_bytes(session: Any, index: int, instance: int | str) -> tuple[int, bytes]:
    """The source half of :func:`move_compatibility` for a target on another machine: (the NVML vGPU
    instance id, ``nvmlVgpuInstanceGetMetadata``'s structure as bytes, which the target's library reads)."""
    vid = resolve_instance(session, index, instance)
    return vid, bytes(_raw_vgpu(session, index, vid))


def compatibility_of(dst_session: Any, dst_index: int, vm_bytes: bytes, src_index: int,
                     vid: int) -> preflight.Compatibility:
    """The target half: the verdict of ``dst_session``'s library on a source vGPU's metadata bytes
    (:func:`vgpu_metadata_bytes` on the source host)."""
    from gpuvirt.errors import ConflictError

    if len(vm_bytes) != ctypes.sizeof(pynvml.c_nvmlVgpuMetadata_t):
        raise ConflictError(f"the vGPU metadata of instance {vid} is {len(vm_bytes)} bytes, not the "
                            f"{ctypes.sizeof(pynvml.c_nvmlVgpuMetadata_t)} this NVML library reads (a different "
                            "pynvml on the source host)")
    return _compatibility(dst_session, dst_index, pynvml.c_nvmlVgpuMetadata_t.from_buffer_copy(vm_bytes),
                          src_index, vid)


def _compatibility(dst_session: Any, dst_index: int, vm_raw: Any, src_index: int,
                   vid: int) -> preflight.Compatibility:
    pg_raw = _raw_pgpu(dst_session, dst_index)
    dst = dst_session._gpu(dst_index)
    try:
        c = dst_session._call(pynvml.nvmlGetVgpuCompatibility, vm_raw, pg_raw)
    except pynvml.NVMLError as exc:
        raise dst_session._error(exc, f"check whether vGPU instance {vid} of source GPU {src_index} can move to GPU "
                                      f"{dst_index} ({dst.bus_id})", gpu=dst_index, vgpu_instance=vid) from None
    bits, code = int(c.vgpuVmCompatibility), int(c.compatibilityLimitCode)
    return preflight.Compatibility(bits, code, _reasons(bits, code, vm_raw, pg_raw))


def vgpu_version(session: Any) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``nvmlGetVgpuVersion``: ((supported min, max), (current min, max)); None without a vGPU host driver."""
    session._require()
    try:
        (smin, smax), (cmin, cmax) = session._call(pynvml.nvmlGetVgpuVersion)
    except pynvml.NVMLError as exc:
        if exc.value in _UNAVAILABLE:
            return None
        raise session._error(exc, "read the host driver's vGPU version range") from None
    return (int(smin), int(smax)), (int(cmin), int(cmax))


__all__ = ["vgpu_metadata", "pgpu_metadata", "move_compatibility", "vgpu_metadata_bytes", "compatibility_of", "resolve_instance", "vgpu_version"]
