"""Per-VM device figures for live capacity reports: what the host's vGPU driver sees of each vGPU a VM holds
(framebuffer use, utilization, license state and expiry), matched to the inventory's allocations.

The host driver (NVML ``nvmlDeviceGetActiveVgpus`` and the ``nvmlVgpuInstanceGet*`` queries, through
``host.nvml_vgpu``) reports every *running* vGPU with the VM id the VM was started with.  Matching to
inventory rows:

* mdev vGPUs: by mdev UUID (``nvmlVgpuInstanceGetMdevUUID``) - exact;
* vendor-specific VFIO vGPUs (a vGPU type on a VF, no mdev): MIG-backed ones by their GPU-instance id
  (exact); time-sliced ones by (VM UUID, vGPU type) on the GPU, in VF address order against instance id
  order - two vGPUs of one type in one VM may swap labels, never VMs;
* running vGPUs no allocation matches are listed with the VM UUID the driver reports and no VM name.

Devices the host cannot see into are listed as such (``observable: false`` and why), with no figures: a
whole VF handed to a VM (passthrough), a generic mdev (GVT-g, sample drivers) and any device when NVML is
unavailable.  Nothing is estimated.
"""

from __future__ import annotations

from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import GpuvirtError
from gpuvirt.model import vgpu as vgpu_rules
from gpuvirt.model.catalog import MIB

MDEV, VFIO_VGPU, VF = "mdev", "vfio-vgpu", "vf"
PASSTHROUGH = "passthrough: a whole VF belongs to the VM; the host driver does not see into it"
GENERIC_MDEV = "the mdev parent's driver reports no per-VM figures"


def _iso(t: Any) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds") + "Z"


def _figures(info: Any) -> dict[str, Any]:
    return {"active": True, "vgpu_instance": info.id, "vm_id_reported": info.vm_id,
            "fb_used_bytes": info.fb_used_bytes, "utilization": info.utilization,
            "license": None if info.license_state is None else {
                "state": info.license_state, "licensed": info.licensed,
                "expiry": _iso(info.license_expiry), "expiry_status": info.license_expiry_status}}


def _empty(observable: bool, why: str, reason: str | None, active: bool | None) -> dict[str, Any]:
    return {"observable": observable, "why": why, "reason": reason, "active": active, "vgpu_instance": None,
            "vm_id_reported": None, "fb_used_bytes": None, "utilization": None, "license": None}


def collect(ctx: Context, view: Any) -> list[dict[str, Any]]:
    """One entry per VM device of this host (docs/capacity-report.md "VM devices"), by GPU and instance.

    The driver is asked first and the inventory read afterwards in a transaction of its own: NVML calls
    must not run while a write transaction holds the inventory (SQLite's lock would stall the hook)."""
    host = ctx.settings.host_id
    nvml = ctx.host.nvml()
    seen: dict[str, list[Any]] = {}
    failed: dict[str, str] = {}
    models = {g.address: g.model for g in view.gpus}
    if nvml.available:
        for g in view.gpus:
            if g.nvml_index is None or g.model is None or g.model.vgpu is None:
                continue
            try:
                seen[g.address] = nvml.vgpu_instances(g.nvml_index)
            except GpuvirtError as exc:
                failed[g.address] = str(exc)
    with ctx.inventory.unit(action="read this host's allocations for the report") as uow:
        return _match(uow, host, nvml, seen, failed, models)


def _match(uow: Any, host: str, nvml: Any, seen: dict[str, list[Any]], failed: dict[str, str],
           models: dict[str, Any]) -> list[dict[str, Any]]:
    devices = []
    used: set[tuple[str, int]] = set()
    vf_rows = []
    for a in uow.allocations(host_id=host):
        inst = a.instance
        if inst.kind not in (MDEV, VFIO_VGPU, VF):
            continue                # MIG GPU instances are not VM devices (metrics: per MIG instance)
        addr = inst.gpu.address
        model = models.get(addr)
        tid = vgpu_rules.parse_type_id(inst.type_id) if inst.kind != VF else None
        vtype = model.vgpu.type_by_id(tid) if (model is not None and model.vgpu is not None and tid is not None
                                                and any(t.id == tid for t in model.vgpu.types)) else None
        d = {"host": host, "gpu": addr, "instance": inst.id, "kind": inst.kind,
             "type": inst.type_name or inst.type_id or ("vf" if inst.kind == VF else None),
             "mdev_uuid": inst.mdev_uuid, "vf": inst.parent if inst.kind in (VFIO_VGPU, VF) else None,
             "vm": a.vm_name, "vm_uuid": a.vm_uuid, "tenant": a.tenant, "vm_state": a.vm_state,
             "fb_total_bytes": vtype.framebuffer_mib * MIB if vtype is not None else None}
        if inst.kind == VF:
            d.update(_empty(False, "passthrough", PASSTHROUGH, None))
        elif vtype is None:
            d.update(_empty(False, "generic-mdev", GENERIC_MDEV, None))
        elif not nvml.available:
            d.update(_empty(False, "nvml-unavailable", nvml.unavailable_reason or "NVML not available", None))
        elif addr in failed:
            d.update(_empty(False, "nvml-error", failed[addr], None))
        else:
            info = None
            if inst.kind == MDEV:
                info = next((i for i in seen.get(addr, []) if i.mdev_uuid == (inst.mdev_uuid or "").lower()), None)
            elif inst.backing_instance_id is not None:
                gi = uow.instance(inst.backing_instance_id).gi_id
                info = next((i for i in seen.get(addr, []) if gi is not None and i.gpu_instance_id == gi), None)
            else:
                vf_rows.append((d, inst, tid))
                devices.append(d)
                continue
            _place(d, info, used, addr)
        devices.append(d)
    # time-sliced VF vGPUs: by (VM UUID, type), VF address order against instance id order
    for d, inst, tid in sorted(vf_rows, key=lambda x: (x[0]["gpu"], x[1].parent or "")):
        addr = d["gpu"]
        cands = [i for i in seen.get(addr, []) if (addr, i.id) not in used and i.type_id == tid
                 and i.gpu_instance_id is None]
        by_vm = [i for i in cands if d["vm_uuid"] and (i.vm_id or "").lower() == d["vm_uuid"].lower()]
        if not d["vm_uuid"] and len(cands) == 1:
            by_vm = cands            # no VM UUID recorded: only an unambiguous match is taken
        _place(d, min(by_vm, key=lambda i: i.id) if by_vm else None, used, addr)
    # running vGPUs no allocation accounts for
    for addr, infos in seen.items():
        model = models.get(addr)
        for i in infos:
            if (addr, i.id) in used:
                continue
            vtype = next((t for t in model.vgpu.types if t.id == i.type_id), None) if model and model.vgpu else None
            devices.append({"host": host, "gpu": addr, "instance": None,
                            "kind": MDEV if i.mdev_uuid else VFIO_VGPU, "type": vtype.name if vtype else str(i.type_id),
                            "mdev_uuid": i.mdev_uuid, "vf": None, "vm": None, "vm_uuid": i.vm_id, "tenant": None,
                            "vm_state": None, "fb_total_bytes": vtype.framebuffer_mib * MIB if vtype else None,
                            "observable": True, "why": "unallocated",
                            "reason": "running, but no allocation of this host holds it",
                            **_figures(i)})
    devices.sort(key=lambda d: (d["gpu"], d["instance"] is None, d["instance"] or 0, d["vgpu_instance"] or 0))
    return devices


def _place(d: dict[str, Any], info: Any, used: set[tuple[str, int]], addr: str) -> None:
    if info is None:
        d.update(_empty(True, "not-running", "not running: the host driver lists no active vGPU for it", False))
        return
    used.add((addr, info.id))
    d.update({"observable": True, "why": None, "reason": None, **_figures(info)})


__all__ = ["collect", "PASSTHROUGH", "GENERIC_MDEV"]
