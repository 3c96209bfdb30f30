"""vGPU migration entry points of the fake libnvidia-ml: the metadata of a running vGPU and of a physical GPU,
the host driver's vGPU version range, and the compatibility of a (vGPU, physical GPU) pair.

``nvmlVgpuInstanceGetMetadata`` (on the source host), ``nvmlDeviceGetVgpuMetadata`` (on the target GPU) and
``nvmlGetVgpuCompatibility`` on the two (../shared/reference/live-migration.md section 2).  A real driver
keeps what it needs for the answer in ``opaqueData``; the simulator puts there its own encoding of the facts
:func:`gpuvirt.model.preflight.vgpu_compatibility` needs, and answers the compatibility call from that
function with the simulated host's :class:`~gpuvirt.model.preflight.MigrationRules`.  The metadata of one
simulated host can therefore be judged by another (a two-host move), as with the real library, where the
compatibility call is made on the target host.

**Host facts** (``gpuvirt sim migration DIR ...``; state keys, all optional)::

    "driver_version": str                                 # host driver (also nvmlSystemGetDriverVersion)
    "host_stack": {"os": "rhel-9.4", "kernel": str, "qemu": "8.2.0", "libvirt": "10.0.0",
                   "vgpu_supported": [min, max], "vgpu_current": [min, max] | null,
                   "pgpu_migration_cap": bool, "vgpu_migration_cap": bool}
    "migration_rules": {<MigrationRules field>: value}    # lists for the set-valued fields
    Mdev / VF "guest" += {"driver": str, "vgpu_version": int}   # the guest driver has reported (initialized)

The same ``host_stack`` renders the files gpuvirt reads for them (``etc/os-release``,
``proc/sys/kernel/osrelease`` and libvirt's QEMU capabilities cache; :func:`stack_files`).

Choices where the reference is silent (all UNVERIFIED; each settable):

* ``version`` / ``revision`` of both metadata structures: 1 and 1.  A structure with another version passed
  to the compatibility call is refused with ``ARGUMENT_VERSION_MISMATCH``; opaque data the simulator did not
  write (a real host's) with ``INVALID_ARGUMENT``.
* ``bufferSize``: the metadata structure up to its opaque data plus the bytes of opaque data written; a
  smaller size returns ``INSUFFICIENT_SIZE`` with the needed size (pynvml's wrappers ask with 0 first).
* vGPU versions are ``major << 16 | minor`` (``0x120000`` for vGPU 18.0); the driver's supported range is
  ``0x100000``..``0x120000`` by default, the current range (``nvmlGetVgpuVersion``'s second answer and the
  physical GPU metadata's ``hostSupportedVgpuRange``) the supported one unless set.
* A guest that has not reported a driver is ``UNINITIALIZED`` with empty guest driver version and guest vGPU
  version 0; one that has reports ``guest.vgpu_version`` or, unset, the top of the host's current range.
* Migration capability bits: set on every vGPU type and physical GPU (``vgpu_migration_cap`` /
  ``pgpu_migration_cap`` turn them off host-wide).
* A GPU without vGPU support (no vGPU types in the catalog) answers ``NOT_SUPPORTED`` to the device call;
  an inactive or unknown vGPU instance ``NOT_FOUND`` (0: ``INVALID_ARGUMENT``), as the other
  vGPU-instance calls do.

Faults (read-only calls, so they fail but cannot kill): ``gpuvirt sim fault --op
nvml.VgpuInstanceGetMetadata | nvml.DeviceGetVgpuMetadata | nvml.GetVgpuCompatibility``, matched against
``"<pci address> vgpu=<id>"``, ``"<pci address>"`` and ``"type=<id> target=<model>"``.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

from gpuvirt.errors import NotFoundError
from gpuvirt.model import preflight
from gpuvirt.model.catalog import load_catalog
from gpuvirt.sim.nvml_base import (
    ARGUMENT_VERSION_MISMATCH,
    INSUFFICIENT_SIZE,
    INVALID_ARGUMENT,
    NOT_SUPPORTED,
    NvmlBase,
    _entry,
    _Fail,
    _int_arg,
    _target,
)
from gpuvirt.sim.hoststack import current_range, host_stack_doc, migration_rules
from gpuvirt.sim.nvml_vgpu_instances import find_vgpu

METADATA_VERSION = 1
METADATA_REVISION = 1
OPAQUE_MAGIC = "gpuvirt-sim-1:"
GUEST_UNINITIALIZED, GUEST_INITIALIZED = 0, 1


# --- opaque data ---------------------------------------------------------------------------------------------------
def _short(text: Any, limit: int = 40) -> str | None:
    return None if text is None else str(text)[:limit]


def _encode_opaque(facts: dict[str, Any], capacity: int) -> bytes:
    data = (OPAQUE_MAGIC + json.dumps(facts, separators=(",", ":"), sort_keys=True)).encode()
    if len(data) > capacity:     # bounded fields make this unreachable; never write past the array
        raise _Fail(INSUFFICIENT_SIZE)
    return data


def _decode_opaque(raw: bytes) -> dict[str, Any]:
    text = raw.split(b"\0", 1)[0].decode(errors="replace")
    if not text.startswith(OPAQUE_MAGIC):
        raise _Fail(INVALID_ARGUMENT)
    try:
        doc = json.loads(text[len(OPAQUE_MAGIC):])
    except ValueError:
        raise _Fail(INVALID_ARGUMENT) from None
    if not isinstance(doc, dict):
        raise _Fail(INVALID_ARGUMENT)
    return doc


def _stack_facts(doc: dict[str, Any]) -> dict[str, Any]:
    # bounded so that the longest validated values (sim.hoststack.check) fit the 256 opaque bytes; a kernel
    # release cut after 48 characters keeps the version numbers the rules compare
    return {"os": _short(doc.get("os"), 41), "k": _short(doc.get("kernel"), 48), "q": _short(doc.get("qemu"), 11),
            "l": _short(doc.get("libvirt"), 11)}


def _raw(struct: Any, name: str, length: int | None = None) -> bytes:
    """A char-array field's bytes as stored (nvidia-ml-py's structures decode char fields to str on access,
    which fails on bytes that are not UTF-8, and opaque data need not be)."""
    f = getattr(type(struct), name)
    n = f.size if length is None else max(0, min(int(length), f.size))
    return ctypes.string_at(ctypes.addressof(struct) + f.offset, n)


def _text(field: Any) -> str | None:
    value = field.split(b"\0", 1)[0].decode(errors="replace") if isinstance(field, bytes) else str(field)
    return value or None


def _check_buffer(struct: Any, size_ref: Any, opaque_len: int) -> None:
    """pynvml's wrappers pass the whole structure and a size of 0 first; the size wanted is returned with
    INSUFFICIENT_SIZE (a NULL structure with a size other than 0 is INVALID_ARGUMENT)."""
    size = _target(size_ref)
    needed = type(struct).opaqueData.offset + opaque_len
    if int(size.value) < needed:
        size.value = needed
        raise _Fail(INSUFFICIENT_SIZE)
    size.value = needed


class MigrationApi(NvmlBase):
    """The metadata and compatibility entry points (see the module docstring)."""

    def _query_fault(self, op: str, target: str) -> None:
        # a read takes no lock; only when a fault for this call is pending is one taken to consume it
        if any(f.get("op") == f"nvml.{op}" for f in self.sim.peek().get("faults", [])):
            self._transact(lambda state: self._fault(state, op, target))

    @_entry()
    def nvmlVgpuInstanceGetMetadata(self, vgpu: Any, meta_ref: Any, size_ref: Any) -> None:
        if size_ref is None:
            raise _Fail(INVALID_ARGUMENT)
        state = self.sim.peek()
        v = find_vgpu(state, _int_arg(vgpu))
        if meta_ref is None:
            if int(_target(size_ref).value) != 0:
                raise _Fail(INVALID_ARGUMENT)
            raise _Fail(INSUFFICIENT_SIZE)
        meta = _target(meta_ref)
        dev = v["device"]
        model = self._model(dev)
        assert model.vgpu is not None
        vtype = model.vgpu.type_by_id(v["type_id"])
        stack = host_stack_doc(state)
        facts = {"t": v["type_id"], "n": _short(vtype.name, 24), "m": model.id,
                 "d": model.device_id, "f": model.architecture, "g": bool(vtype.mig_backed), **_stack_facts(stack)}
        opaque = _encode_opaque(facts, type(meta).opaqueData.size)
        _check_buffer(meta, size_ref, len(opaque))
        self._query_fault("VgpuInstanceGetMetadata", f"{dev.get('address')} vgpu={v['id']}")
        guest = v["entry"].get("guest") or {}
        initialized = bool(guest.get("driver"))
        meta.version, meta.revision = METADATA_VERSION, METADATA_REVISION
        meta.guestInfoState = GUEST_INITIALIZED if initialized else GUEST_UNINITIALIZED
        meta.guestDriverVersion = str(guest.get("driver") or "").encode()[:79]
        meta.hostDriverVersion = stack["driver"].encode()[:79]
        meta.vgpuVirtualizationCaps = preflight.VIRTUALIZATION_CAP_MIGRATION if stack["vgpu_migration_cap"] else 0
        if initialized:
            meta.guestVgpuVersion = int(guest.get("vgpu_version") or current_range(stack)[1])
        else:
            meta.guestVgpuVersion = 0
        meta.opaqueDataSize = len(opaque)
        meta.opaqueData = opaque

    @_entry()
    def nvmlDeviceGetVgpuMetadata(self, handle: Any, meta_ref: Any, size_ref: Any) -> None:
        if size_ref is None:
            raise _Fail(INVALID_ARGUMENT)
        state = self.sim.peek()
        dev, model = self._gpu(state, handle)
        if model.vgpu is None:
            raise _Fail(NOT_SUPPORTED)
        if meta_ref is None:
            if int(_target(size_ref).value) != 0:
                raise _Fail(INVALID_ARGUMENT)
            raise _Fail(INSUFFICIENT_SIZE)
        meta = _target(meta_ref)
        stack = host_stack_doc(state)
        facts = {"m": model.id, "d": model.device_id, "f": model.architecture, **_stack_facts(stack)}
        opaque = _encode_opaque(facts, type(meta).opaqueData.size)
        _check_buffer(meta, size_ref, len(opaque))
        self._query_fault("DeviceGetVgpuMetadata", str(dev.get("address")))
        lo, hi = current_range(stack)
        meta.version, meta.revision = METADATA_VERSION, METADATA_REVISION
        meta.hostDriverVersion = stack["driver"].encode()[:79]
        meta.pgpuVirtualizationCaps = preflight.VIRTUALIZATION_CAP_MIGRATION if stack["pgpu_migration_cap"] else 0
        meta.hostSupportedVgpuRange.minVersion = lo
        meta.hostSupportedVgpuRange.maxVersion = hi
        meta.opaqueDataSize = len(opaque)
        meta.opaqueData = opaque

    @_entry()
    def nvmlGetVgpuVersion(self, supported_ref: Any, current_ref: Any) -> None:
        stack = host_stack_doc(self.sim.peek())
        supported, current = _target(supported_ref), _target(current_ref)
        supported.minVersion, supported.maxVersion = (int(x) for x in stack["vgpu_supported"])
        current.minVersion, current.maxVersion = current_range(stack)

    @_entry()
    def nvmlGetVgpuCompatibility(self, vm_ref: Any, pgpu_ref: Any, out_ref: Any) -> None:
        vm_meta, pg_meta, out = _target(vm_ref), _target(pgpu_ref), _target(out_ref)
        for meta in (vm_meta, pg_meta):
            if int(meta.version) != METADATA_VERSION:
                raise _Fail(ARGUMENT_VERSION_MISMATCH)
        vm_facts = _decode_opaque(_raw(vm_meta, "opaqueData", vm_meta.opaqueDataSize))
        pg_facts = _decode_opaque(_raw(pg_meta, "opaqueData", pg_meta.opaqueDataSize))
        vm, pgpu = decode_pair(vm_meta, vm_facts, pg_meta, pg_facts)
        self._query_fault("GetVgpuCompatibility", f"type={vm.type_id} target={pgpu.model}")
        answer = preflight.vgpu_compatibility(vm, pgpu, migration_rules(self.sim.peek()))
        out.vgpuVmCompatibility = answer.vm_compatibility
        out.compatibilityLimitCode = answer.limit_code


def _stack(facts: dict[str, Any], driver: str | None, vgpu_range: tuple[int, int] | None) -> preflight.HostStack:
    return preflight.HostStack(driver=driver, os=facts.get("os"), kernel=facts.get("k"), qemu=facts.get("q"),
                               libvirt=facts.get("l"), vgpu_range=vgpu_range)


def decode_pair(vm_meta: Any, vm_facts: dict[str, Any], pg_meta: Any,
                pg_facts: dict[str, Any]) -> tuple[preflight.VgpuMetadata, preflight.PgpuMetadata]:
    """The preflight facts behind two metadata structures the simulator wrote."""
    try:
        catalog = load_catalog()
        target = catalog.get(str(pg_facts["m"]))
        initialized = int(vm_meta.guestInfoState) == GUEST_INITIALIZED
        guest = preflight.GuestFacts(initialized=initialized, driver=_text(_raw(vm_meta, "guestDriverVersion")),
                                     vgpu_version=int(vm_meta.guestVgpuVersion) if initialized else None)
        vm = preflight.VgpuMetadata(
            type_id=int(vm_facts["t"]), type_name=vm_facts.get("n"), model=str(vm_facts["m"]),
            device_id=vm_facts.get("d"), family=vm_facts.get("f"), mig_backed=bool(vm_facts.get("g")),
            stack=_stack(vm_facts, _text(_raw(vm_meta, "hostDriverVersion")), None), guest=guest,
            migration_cap=bool(int(vm_meta.vgpuVirtualizationCaps) & preflight.VIRTUALIZATION_CAP_MIGRATION))
        rng = pg_meta.hostSupportedVgpuRange
        pgpu = preflight.PgpuMetadata(
            model=target.id, device_id=pg_facts.get("d"), family=pg_facts.get("f"),
            supported_types=frozenset(t.id for t in target.vgpu.types) if target.vgpu else frozenset(),
            stack=_stack(pg_facts, _text(_raw(pg_meta, "hostDriverVersion")), (int(rng.minVersion), int(rng.maxVersion))),
            migration_cap=bool(int(pg_meta.pgpuVirtualizationCaps) & preflight.VIRTUALIZATION_CAP_MIGRATION))
    except (KeyError, TypeError, ValueError, NotFoundError):
        raise _Fail(INVALID_ARGUMENT) from None
    return vm, pgpu


__all__ = ["MigrationApi", "decode_pair", "METADATA_VERSION", "METADATA_REVISION"]
