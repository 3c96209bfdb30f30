"""Where a capacity report's facts come from: the inventory rows of every host (``--cluster`` / ``--host``)
or this host as sysfs and NVML show it now, matched with its rows (see :mod:`gpuvirt.service.report`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from gpuvirt.context import Context
from gpuvirt.model import vgpu as vgpu_rules
from gpuvirt.model.catalog import GpuModel
from gpuvirt.service.report import (
    I_BACK,
    I_CS,
    I_GPU,
    I_ID,
    I_KIND,
    I_MEM,
    I_PID,
    I_START,
    I_TENANT,
    I_TYPE,
    I_VM,
    MDEV,
    MIG,
    VF,
    VFIO_VGPU,
    GpuFacts,
    HostFacts,
    _foreign,
    _gpu_sort_key,
    _info,
    _iso,
    _model_of,
)


# --- gathering: inventory ------------------------------------------------------------------------------------------
def _apply_health(by_id: dict[int, GpuFacts], inst_gpu: dict[int, int], rows: list[tuple], now: dt.datetime,
                  quiet: float) -> None:
    """Mark the facts of unhealthy GPUs and instances (``Unit.report_health`` rows) whose spell is in force
    (service.health.in_force: a quiet period that has run out counts as recovered here already)."""
    from gpuvirt.service.health import in_force, recovers_at

    for kind, rid, needs_reset, since, last_at, reason in rows:
        if not in_force(needs_reset, last_at, now, quiet):
            continue
        facts = {"since": _iso(since), "reason": reason, "needs_reset": needs_reset,
                 "recovers_at": _iso(recovers_at(needs_reset, last_at, quiet))}
        if kind == "gpu":
            f = by_id.get(rid)
            if f is not None:
                f.health = facts
        else:
            f = by_id.get(inst_gpu.get(rid, -1))
            if f is not None:
                f.sick[rid] = facts


def _from_inventory(ctx: Context, host_ids: list[str] | None, now: dt.datetime, quiet: float):
    with ctx.inventory.unit(action="read the inventory for the report") as uow:
        host_rows = uow.report_hosts(host_ids)
        gpu_rows = uow.report_gpus(host_ids)
        inst_rows = uow.report_instances(host_ids)
        health_rows = uow.report_health(host_ids)
        tenants = {t.name: t for t in uow.tenants()}
        usage = None if host_ids is None else uow.tenant_usages()
    if usage is None:
        # every allocation of every host is in the rows just read: sum them here instead of a second pass
        # over the database (the figures attach checks quotas against, GPUs no longer present included)
        usage = {}
        backing = {r[I_BACK] for r in inst_rows if r[I_BACK] is not None and r[I_VM] is not None}
        for r in inst_rows:
            # as repo._not_a_backing: a MIG-backed vGPU's GPU instance is counted through its vGPU
            if r[I_VM] is not None and r[I_ID] not in backing:
                u = usage.get(r[I_TENANT])
                if u is None:
                    u = usage[r[I_TENANT]] = {"instances": 0, "memory_mib": 0, "compute_slices": 0}
                u["instances"] += 1
                u["memory_mib"] += r[I_MEM] or 0
                u["compute_slices"] += r[I_CS] or 0
    hosts = {h[0]: HostFacts(h[0], h[1], h[2], bool(h[3])) for h in host_rows}
    by_id: dict[int, GpuFacts] = {}
    models: dict[str | None, GpuModel | None] = {}
    for (gid, hid, addr, idx, model_id, name, vendor, _mem, mig_cap, mig_cur, mig_pend, iface, vtot,
         vnum) in gpu_rows:
        hf = hosts.get(hid)
        if hf is None:
            continue
        if model_id not in models:
            models[model_id] = _model_of(model_id)
        f = GpuFacts(hid, addr, idx, models[model_id], name, vendor or "unknown", bool(mig_cap), bool(mig_cur),
                     bool(mig_pend), iface, vtot, vnum)
        hf.gpus.append(f)
        by_id[gid] = f
    for r in inst_rows:
        f = by_id.get(r[1])
        if f is not None:
            f.insts.append(r)
    if health_rows:
        _apply_health(by_id, {r[I_ID]: r[I_GPU] for r in inst_rows}, health_rows, now, quiet)
    for hf in hosts.values():
        hf.gpus.sort(key=_gpu_sort_key)
    return list(hosts.values()), tenants, usage


# --- gathering: live --------------------------------------------------------------------------------------------------
def _from_live(ctx: Context, now: dt.datetime, quiet: float):
    from gpuvirt.service import hostview, vm_metrics

    view = hostview.snapshot(ctx)
    hid = ctx.settings.host_id
    with ctx.inventory.unit(write=True, action="record this host for the report") as uow:
        hostview.record(ctx, view, uow)
        host_rows = uow.report_hosts([hid])
        gpu_rows = uow.report_gpus([hid])
        inst_rows = uow.report_instances([hid], keys=True)
        health_rows = uow.report_health([hid])
        tenants = {t.name: t for t in uow.tenants()}
        usage = uow.tenant_usages()
    devices = vm_metrics.collect(ctx, view)
    h = host_rows[0]
    hf = HostFacts(h[0], h[1], h[2], bool(h[3]))
    rows_by_gpu: dict[int, list[tuple]] = {}
    for r in inst_rows:
        rows_by_gpu.setdefault(r[I_GPU], []).append(r)
    gid_of = {g[2]: g[0] for g in gpu_rows}
    by_id: dict[int, GpuFacts] = {}
    for g in view.gpus:
        f = GpuFacts(hid, g.address, g.nvml_index, g.model, g.name, g.vendor, g.mig_capable, g.mig_current,
                     g.mig_pending, g.interface, g.sriov_total, g.sriov_num)
        _live_instances(f, g, rows_by_gpu.get(gid_of.get(g.address, -1), []))
        hf.gpus.append(f)
        if g.address in gid_of:
            by_id[gid_of[g.address]] = f
    if health_rows:
        _apply_health(by_id, {r[I_ID]: r[I_GPU] for r in inst_rows}, health_rows, now, quiet)
    return [hf], tenants, usage, devices


def _live_instances(f: GpuFacts, g: Any, rows: list[tuple]) -> None:
    """Match what the host shows with the inventory rows of this GPU; unmatched host objects are foreign."""
    model = g.model
    info = _info(model)
    mig_rows = {(r[I_PID], r[I_START]): r for r in rows if r[I_KIND] == MIG}
    mdev_rows = {r[14]: r for r in rows if r[I_KIND] == MDEV and r[14]}
    vfio_rows = {r[13]: r for r in rows if r[I_KIND] == VFIO_VGPU}
    vf_rows = {r[13]: r for r in rows if r[I_KIND] == VF}
    matched: set[int] = set()
    for gi in g.gpu_instances:
        pid, start = gi["profile_id"], gi["placement"]["start"]
        r = mig_rows.get((pid, start))
        if r is not None:
            matched.add(r[I_ID])
            f.insts.append(r)
        else:
            prof = info.gi.get(pid)
            f.insts.append(_foreign(MIG, pid, start, memory_mib=prof.memory_mib if prof else None,
                                    compute_slices=prof.compute_slices if prof else None))
    for d in g.mdev_devices:
        r = mdev_rows.get(d["uuid"])
        if r is not None:
            matched.add(r[I_ID])
            f.insts.append(r)
        else:
            f.insts.append(_foreign(MDEV, type_id=d["type"], memory_mib=info.fb(d["type"])))
    for vf in g.vfio_vfs:
        if not vf["current_type"]:
            continue
        r = vfio_rows.get(vf["address"])
        if r is not None and vgpu_rules.parse_type_id(r[I_TYPE]) == int(vf["current_type"]):
            matched.add(r[I_ID])
            f.insts.append(r)
        else:
            f.insts.append(_foreign(VFIO_VGPU, type_id=str(vf["current_type"]),
                                    memory_mib=info.fb(str(vf["current_type"]))))
    for addr, r in vf_rows.items():
        if addr in g.vfs:
            matched.add(r[I_ID])
            f.insts.append(r)
    for r in rows:
        if r[I_KIND] == "gpu":              # a whole GPU for a container is there as long as the GPU is
            matched.add(r[I_ID])
            f.insts.append(r)
    f.missing = sum(1 for r in rows if r[I_ID] not in matched)
    # the order the inventory view uses (by id), so both views of one host compare equal; foreign last
    f.insts.sort(key=lambda r: (r[I_ID] is None, r[I_ID] or 0))


__all__ = ["_from_inventory", "_from_live"]
