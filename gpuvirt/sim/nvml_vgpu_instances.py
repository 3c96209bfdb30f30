"""vGPU-instance entry points of the fake libnvidia-ml: the running vGPUs the host driver sees and what it
knows about each (VM id, type, framebuffer use, license, utilization).

**vGPU instance ids.**  NVML names a vGPU by an ``nvmlVgpuInstance_t`` (an unsigned int) that the host
driver assigns when the vGPU is created.  The simulator does the same: every NVIDIA vGPU - an mdev of an
``nvidia-<id>`` type, or a VF whose ``current_vgpu_type`` is set (vendor-specific VFIO) - gets
``vgpu_id`` from the state counter ``next_vgpu_id`` (first id 1) at the moment the simulated kernel
creates it (``assign_vgpu_id``, called from :mod:`gpuvirt.sim.kernel`).  The id is stored on the mdev or VF
entry of the state document, never reused while the state lives (not even after a reboot), and dropped
with the vGPU (mdev removed, VF type cleared to 0, VFs disabled, GPU reset taking a MIG-backed vGPU).  A
re-created vGPU therefore gets a new id.  Entries written by an older simulator have no ``vgpu_id``; they
answer to ``0x80000000 | crc32("mdev:<uuid>" | "vf:<address>") & 0x7fffffff`` so that they never collide
with counter ids.  ``vgpu_instances(state)`` and ``find_vgpu(state, id)`` resolve ids for other mixins
(metadata and migration-compatibility calls build on them).

**Active.**  ``nvmlDeviceGetActiveVgpus`` lists the vGPUs whose VFIO device a running VM holds open
(``open`` on the entry, ``gpuvirt sim open``); per-instance calls on any other id fail with ``NOT_FOUND``
(0 is ``INVALID_ARGUMENT``), as the NVML reference describes for ids that are not active.

**Values** come from the entry's ``guest`` object (``gpuvirt sim vgpu``); every field is optional::

    guest = {"vm_uuid": str, "vm_id_type": "uuid" | "domain-id", "fb_used_mib": int,
             "util": {"sm": %, "memory": %, "encoder": %, "decoder": %, "jpeg": %, "ofa": %},
             "license": {"state": "unknown" | "uninitialized" | "unlicensed-unrestricted" |
                                  "unlicensed-restricted" | "unlicensed" | "licensed",
                         "expiry": "YYYY-MM-DDTHH:MM:SSZ" | "permanent" | "not-applicable" | "invalid" | null}}

Choices where the reference is silent (all UNVERIFIED, all settable through ``guest``):

* VM id: QEMU must be started with ``-uuid`` for an NVIDIA vGPU (libvirt-vmm.md), so the id is that UUID
  (``vmIdType`` UUID).  Without ``guest.vm_uuid``: the mdev UUID (what Proxmox passes when the VM has no
  SMBIOS UUID), and for a VF a UUID derived from its address (uuid5 of ``gpuvirt-sim-vf:<address>``).
* ``nvmlVgpuInstanceGetUUID``: a UUID of its own, derived from the host seed and the vGPU id.
* ``nvmlVgpuInstanceGetMdevUUID`` on a VF vGPU (vendor-specific VFIO has no mdev): ``NOT_SUPPORTED``.
* ``nvmlVgpuInstanceGetGpuInstanceId`` of a time-sliced vGPU: 0xFFFFFFFF.
* Defaults: framebuffer use 0, utilization 0, license ``uninitialized`` with expiry not available (a guest
  whose licensing client has not reported yet).
* ``nvmlVgpuInstanceGetFbUsage``: the C function writes an ``unsigned long long``; nvidia-ml-py 13.615.71
  passes a ``c_uint``.  The fake writes what the caller's 4-byte buffer would hold (the low 32 bits), so a
  caller that trusts that wrapper gets wrong numbers above 4 GiB here as it would on a real host (where the
  8-byte write runs past the buffer).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid as uuid_mod
import zlib
from typing import Any, Iterator

from gpuvirt.model.catalog import MIB
from gpuvirt.sim import rules
from gpuvirt.sim.nvml_base import (
    ARGUMENT_VERSION_MISMATCH,
    INSUFFICIENT_SIZE,
    INVALID_ARGUMENT,
    NOT_FOUND,
    NOT_SUPPORTED,
    NvmlBase,
    _entry,
    _Fail,
    _int_arg,
    _put_string,
    _set,
    _set_fields,
    _target,
)

FIRST_VGPU_ID = 1
NO_GPU_INSTANCE = 0xFFFFFFFF
VM_ID_DOMAIN_ID, VM_ID_UUID = 0, 1
VALUE_TYPE_UNSIGNED_INT = 1
UTILIZATION_INFO_V1 = 0x01000020

LICENSE_STATES = {"unknown": 0, "uninitialized": 1, "unlicensed-unrestricted": 2, "unlicensed-restricted": 3,
                  "unlicensed": 4, "licensed": 5}
EXPIRY_NOT_AVAILABLE, EXPIRY_INVALID, EXPIRY_VALID, EXPIRY_NOT_APPLICABLE, EXPIRY_PERMANENT = 0, 1, 2, 3, 4
EXPIRY_WORDS = {"invalid": EXPIRY_INVALID, "not-applicable": EXPIRY_NOT_APPLICABLE, "permanent": EXPIRY_PERMANENT}
UTIL_KEYS = ("sm", "memory", "encoder", "decoder", "jpeg", "ofa")


# --- ids (used by the simulated kernel) ------------------------------------------------------------------------
def assign_vgpu_id(state: dict[str, Any], entry: dict[str, Any]) -> int:
    n = int(state.get("next_vgpu_id", FIRST_VGPU_ID))
    state["next_vgpu_id"] = n + 1
    entry["vgpu_id"] = n
    entry.pop("guest", None)
    return n


def forget_vgpu(entry: dict[str, Any]) -> None:
    entry.pop("vgpu_id", None)
    entry.pop("guest", None)


def _legacy_id(key: str) -> int:
    return 0x80000000 | (zlib.crc32(key.encode()) & 0x7FFFFFFF)


def vgpu_instances(state: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every NVIDIA vGPU of the simulated host: {"id", "device", "kind": "mdev" | "vf", "entry",
    "type_id", "gpu_instance_id", "active"}, by device then creation."""
    from gpuvirt.model.catalog import load_catalog

    catalog = load_catalog()
    for dev in state["devices"]:
        if dev.get("nvml_index") is None or catalog.get(dev["model"]).vgpu is None:
            continue
        parents = rules.board_parents(dev)
        for m in state.get("mdevs", []):
            if m["parent"] in parents and m["type"].startswith("nvidia-"):
                yield {"id": int(m.get("vgpu_id") or _legacy_id(f"mdev:{m['uuid']}")), "device": dev,
                       "kind": "mdev", "entry": m, "type_id": int(m["type"].split("-", 1)[1]),
                       "gpu_instance_id": m.get("gpu_instance_id"), "active": bool(m.get("open"))}
        for vf in dev.get("vfs", []):
            if vf.get("current_vgpu_type"):
                yield {"id": int(vf.get("vgpu_id") or _legacy_id(f"vf:{vf['address']}")), "device": dev,
                       "kind": "vf", "entry": vf, "type_id": int(vf["current_vgpu_type"]),
                       "gpu_instance_id": vf.get("gpu_instance_id"), "active": bool(vf.get("open"))}


def find_vgpu(state: dict[str, Any], vgpu_id: int, *, active_only: bool = True) -> dict[str, Any]:
    if vgpu_id == 0:
        raise _Fail(INVALID_ARGUMENT)
    for v in vgpu_instances(state):
        if v["id"] == vgpu_id and (v["active"] or not active_only):
            return v
    raise _Fail(NOT_FOUND)


def vm_uuid_of(v: dict[str, Any]) -> str:
    guest = v["entry"].get("guest") or {}
    if guest.get("vm_uuid"):
        return str(guest["vm_uuid"])
    if v["kind"] == "mdev":
        return str(v["entry"]["uuid"])
    return str(uuid_mod.uuid5(uuid_mod.NAMESPACE_URL, f"gpuvirt-sim-vf:{v['entry']['address']}"))


def _set_u64(ref: Any, value: int) -> None:
    obj = _target(ref)
    bits = 8 * __import__("ctypes").sizeof(obj)
    obj.value = value & ((1 << bits) - 1)


def _util_value(field: Any, pct: int) -> None:
    field.uiVal = max(0, min(int(pct), 100))


class VgpuInstanceApi(NvmlBase):
    def _active(self, handle: Any) -> list[dict[str, Any]]:
        state = self.sim.peek()
        dev, model = self._gpu(state, handle)
        if model.vgpu is None:
            raise _Fail(NOT_SUPPORTED)
        return [v for v in vgpu_instances(state) if v["device"] is dev and v["active"]]

    def _one(self, vgpu: Any) -> dict[str, Any]:
        return find_vgpu(self.sim.peek(), _int_arg(vgpu))

    @staticmethod
    def _guest(v: dict[str, Any]) -> dict[str, Any]:
        g = v["entry"].get("guest")
        return g if isinstance(g, dict) else {}

    # === active vGPUs ==========================================================================================
    @_entry()
    def nvmlDeviceGetActiveVgpus(self, handle: Any, count: Any, array: Any) -> None:
        ids = [v["id"] for v in self._active(handle)]
        if array is None or _int_arg(count) < len(ids):
            _set(count, len(ids))
            if ids:
                raise _Fail(INSUFFICIENT_SIZE)
            return
        for i, vid in enumerate(ids):
            array[i] = vid
        _set(count, len(ids))

    # === per-instance facts ===================================================================================
    @_entry()
    def nvmlVgpuInstanceGetVmID(self, vgpu: Any, buf: Any, size: Any, id_type: Any) -> None:
        v = self._one(vgpu)
        guest = self._guest(v)
        kind = VM_ID_DOMAIN_ID if guest.get("vm_id_type") == "domain-id" else VM_ID_UUID
        _put_string(buf, size, vm_uuid_of(v))
        _set(id_type, kind)

    @_entry()
    def nvmlVgpuInstanceGetUUID(self, vgpu: Any, buf: Any, size: Any) -> None:
        v = self._one(vgpu)
        seed = str(self.sim.peek().get("seed", ""))
        _put_string(buf, size, str(uuid_mod.uuid5(uuid_mod.NAMESPACE_URL, f"gpuvirt-sim-vgpu:{seed}:{v['id']}")))

    @_entry()
    def nvmlVgpuInstanceGetMdevUUID(self, vgpu: Any, buf: Any, size: Any) -> None:
        v = self._one(vgpu)
        if v["kind"] != "mdev":
            raise _Fail(NOT_SUPPORTED)
        _put_string(buf, size, v["entry"]["uuid"])

    @_entry()
    def nvmlVgpuInstanceGetType(self, vgpu: Any, ref: Any) -> None:
        _set(ref, self._one(vgpu)["type_id"])

    @_entry()
    def nvmlVgpuInstanceGetGpuInstanceId(self, vgpu: Any, ref: Any) -> None:
        gi = self._one(vgpu)["gpu_instance_id"]
        _set(ref, NO_GPU_INSTANCE if gi is None else int(gi))

    @_entry()
    def nvmlVgpuInstanceGetFrameRateLimit(self, vgpu: Any, ref: Any) -> None:
        v = self._one(vgpu)
        t = self._model(v["device"]).vgpu.type_by_id(v["type_id"])
        _set(ref, t.frl_config)

    @_entry()
    def nvmlVgpuInstanceGetFbUsage(self, vgpu: Any, ref: Any) -> None:
        v = self._one(vgpu)
        t = self._model(v["device"]).vgpu.type_by_id(v["type_id"])
        used = max(0, min(int(self._guest(v).get("fb_used_mib", 0)), t.framebuffer_mib))
        _set_u64(ref, used * MIB)

    def _license(self, v: dict[str, Any]) -> tuple[int, tuple[int, ...], int]:
        lic = self._guest(v).get("license") or {}
        state = LICENSE_STATES.get(str(lic.get("state", "uninitialized")), 1)
        expiry = lic.get("expiry")
        if expiry is None:
            return state, (0, 0, 0, 0, 0, 0), EXPIRY_NOT_AVAILABLE
        if expiry in EXPIRY_WORDS:
            return state, (0, 0, 0, 0, 0, 0), EXPIRY_WORDS[expiry]
        try:
            t = dt.datetime.strptime(str(expiry), "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            return state, (0, 0, 0, 0, 0, 0), EXPIRY_INVALID
        return state, (t.year, t.month, t.day, t.hour, t.minute, t.second), EXPIRY_VALID

    @_entry()
    def nvmlVgpuInstanceGetLicenseInfo_v2(self, vgpu: Any, ref: Any) -> None:
        v = self._one(vgpu)
        state, (y, mo, d, h, mi, s), status = self._license(v)
        info = _target(ref)
        _set_fields(info, isLicensed=1 if state == LICENSE_STATES["licensed"] else 0, currentState=state)
        _set_fields(info.licenseExpiry, year=y, month=mo, day=d, hour=h, min=mi, sec=s, status=status)

    @_entry()
    def nvmlVgpuInstanceGetLicenseStatus(self, vgpu: Any, ref: Any) -> None:
        state, _, _ = self._license(self._one(vgpu))
        _set(ref, 1 if state == LICENSE_STATES["licensed"] else 0)

    # === utilization ===========================================================================================
    def _samples(self, handle: Any, last_seen: int) -> list[tuple[dict[str, Any], int, dict[str, int]]]:
        now_us = int(time.time() * 1_000_000)
        out = []
        for v in self._active(handle):
            util = self._guest(v).get("util") or {}
            at = int(util.get("at_us", now_us))
            if at > last_seen:
                out.append((v, at, {k: int(util.get(k, 0)) for k in UTIL_KEYS}))
        return out

    @_entry()
    def nvmlDeviceGetVgpuInstancesUtilizationInfo(self, handle: Any, ref: Any) -> None:
        info = _target(ref)
        if info.version != UTILIZATION_INFO_V1:
            raise _Fail(ARGUMENT_VERSION_MISMATCH)
        samples = self._samples(handle, int(info.lastSeenTimeStamp))
        info.sampleValType = VALUE_TYPE_UNSIGNED_INT
        if not info.vgpuUtilArray or info.vgpuInstanceCount < len(samples):
            info.vgpuInstanceCount = len(samples)
            if samples:
                raise _Fail(INSUFFICIENT_SIZE)
            return
        for i, (v, at, u) in enumerate(samples):
            s = info.vgpuUtilArray[i]
            s.timeStamp, s.vgpuInstance = at, v["id"]
            for fname, key in (("smUtil", "sm"), ("memUtil", "memory"), ("encUtil", "encoder"),
                               ("decUtil", "decoder"), ("jpgUtil", "jpeg"), ("ofaUtil", "ofa")):
                _util_value(getattr(s, fname), u[key])
        info.vgpuInstanceCount = len(samples)

    @_entry()
    def nvmlDeviceGetVgpuUtilization(self, handle: Any, last_seen: Any, value_type: Any, count: Any,
                                     array: Any) -> None:
        samples = self._samples(handle, _int_arg(last_seen))
        _set(value_type, VALUE_TYPE_UNSIGNED_INT)
        if array is None or _int_arg(count) < len(samples):
            _set(count, len(samples))
            if samples:
                raise _Fail(INSUFFICIENT_SIZE)
            return
        for i, (v, at, u) in enumerate(samples):
            s = array[i]
            s.vgpuInstance, s.timeStamp = v["id"], at
            for fname, key in (("smUtil", "sm"), ("memUtil", "memory"), ("encUtil", "encoder"),
                               ("decUtil", "decoder")):
                _util_value(getattr(s, fname), u[key])
        _set(count, len(samples))


__all__ = ["VgpuInstanceApi", "assign_vgpu_id", "forget_vgpu", "vgpu_instances", "find_vgpu", "vm_uuid_of",
           "LICENSE_STATES", "UTIL_KEYS", "EXPIRY_WORDS", "FIRST_VGPU_ID"]
