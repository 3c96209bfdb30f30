"""Capacity report: what is left on one host or across every host sharing the inventory, and whose the rest is.

Two sources, one document (schema: docs/capacity-report.md):

* **live** (``gpuvirt report`` on a host): the host as sysfs and NVML show it now, matched with this
  host's inventory rows for ids, allocations and tenants.  Objects on the host that gpuvirt did not create
  are counted as ``foreign``: they take capacity but cannot be handed out.  The snapshot is also recorded in
  the inventory, so a host that runs the report from a timer keeps its ``last_seen_at`` fresh.
* **inventory** (``--cluster`` / ``--host H``): the rows every host recorded.  MIG layouts are rebuilt from
  instance rows (profile id + placement) and the catalog's geometry; vGPU availability from the board rules
  (:mod:`gpuvirt.model.vgpu`) over the vGPU rows.  Hosts silent for longer than
  ``policies.stale_after_seconds`` are shown with ``stale: true`` and are not counted as capacity.

Numbers per GPU are computed by the same rule functions the simulator enforces (``mig.remaining_capacity``,
the board rules), so "placeable now" is what NVML would still accept, not a slice count: free slices that
are not aligned for a profile do not count, and slices no profile can use now are reported as stranded.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import gc
import io
import json
import operator
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from gpuvirt.context import Context
from gpuvirt.errors import ConfigError, GpuvirtError, NotFoundError, UsageError
from gpuvirt.model import vgpu as vgpu_rules
from gpuvirt.model.catalog import GpuModel, load_catalog, resolve_gi_profile, resolve_vgpu_type
from gpuvirt.model.mig import Placed, compute_used, free_starts, mask_of, remaining_capacity, slice_map

SCHEMA_VERSION = 1
BY_CHOICES = ("host", "gpu", "type", "profile", "tenant")
FORMATS = ("table", "json", "csv", "prometheus")

MIG, MDEV, VFIO_VGPU, VF = "mig", "mdev", "vfio-vgpu", "vf"     # instance kinds (inventory.models)
STATES = ("in_use", "free", "pending", "foreign")


# --- normalised facts: what either source says about one GPU ---------------------------------------------------
# An instance is a plain tuple, in the column order of ``Unit.report_instances`` (inventory rows are used as
# they come from the driver; a cluster has tens of thousands of them):
I_ID, I_GPU, I_KIND, I_STATE, I_PID, I_START, I_TYPE, I_MEM, I_CS, I_BACK, I_VM, I_TENANT, I_VMSTATE = range(13)
# live reports also read (parent, mdev_uuid, type_name) after those; objects on the host that the inventory
# does not know ("foreign") are tuples of the first 13 fields with id None.


def _foreign(kind: str, pid: int | None = None, start: int | None = None, type_id: str | None = None,
             memory_mib: int | None = None, compute_slices: int | None = None) -> tuple:
    return (None, None, kind, "active", pid, start, type_id, memory_mib, compute_slices, None, None, None, None)


@dataclass
class GpuFacts:
    host: str
    address: str
    index: int | None
    model: GpuModel | None
    name: str | None
    vendor: str
    mig_capable: bool
    mig_current: bool
    mig_pending: bool
    interface: str | None           # vGPU host interface in use: mdev | vendor-vfio | None
    vfs_total: int | None
    vfs_enabled: int | None
    insts: list[tuple] = field(default_factory=list)
    missing: int = 0                # live only: inventory rows whose object is not on the host now


@dataclass
class HostFacts:
    id: str
    hostname: str | None
    last_seen_at: dt.datetime | None
    simulated: bool
    gpus: list[GpuFacts] = field(default_factory=list)


# --- entry point ---------------------------------------------------------------------------------------------
def report(ctx: Context, *, by: str = "gpu", cluster: bool = False, host: str | None = None,
           fit: Sequence[str] = ()) -> dict[str, Any]:
    """The capacity report document (docs/capacity-report.md)."""
    if by not in BY_CHOICES:
        raise UsageError(f"unknown --by '{by}'; choose one of {', '.join(BY_CHOICES)}")
    if cluster and host is not None:
        raise UsageError("--cluster (every host) and --host (one host) exclude each other")
    requests = parse_fit(fit)
    for name, _ in requests:
        _classify(name)                 # refuse unknown names before touching the host or the database
    stale_after = _stale_after(ctx)
    now = _utcnow()
    with paused_gc():
        if cluster or host is not None:
            source = "inventory"
            hosts, tenants, usage = _from_inventory(ctx, None if host is None else [host])
            if host is not None and not hosts:
                with ctx.inventory.unit() as uow:
                    known = [h[0] for h in uow.report_hosts()]
                shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
                raise NotFoundError(f"no host '{host}' in the inventory (hosts: {shown or 'none'})")
        else:
            source = "live"
            hosts, tenants, usage = _from_live(ctx)
        return build_document(hosts, tenants, usage, now=now, stale_after=stale_after, source=source, by=by,
                              cluster=cluster, host_filter=host, requests=requests,
                              mig_policy=str(ctx.settings.policies.get("mig_placement", "frag-aware")),
                              vgpu_policy=str(ctx.settings.policies.get("vgpu_placement", "consolidate")))


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Hold the cyclic garbage collector while a report is built or serialised.

    A cluster report allocates a few hundred thousand small, acyclic objects (rows, dicts); every 700
    allocations CPython would scan the young generation, and repeatedly the whole heap, which measured as
    a third of the report's time at 1,000 hosts.  Reference counting still frees everything; the collector
    runs again afterwards.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _utcnow() -> dt.datetime:
    # the inventory stores naive UTC timestamps (inventory.models.utcnow)
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _stale_after(ctx: Context) -> int | float:
    raw = ctx.settings.policies.get("stale_after_seconds", 900)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw < 0:
        raise ConfigError(f"policies.stale_after_seconds must be a non-negative number of seconds, got {raw!r}")
    return raw


def _model_of(model_id: str | None) -> GpuModel | None:
    if not model_id:
        return None
    cat = load_catalog()
    m = cat.models.get(model_id)
    if m is None:
        try:
            m = cat.get(model_id)
        except GpuvirtError:
            return None
    return m


def _gpu_sort_key(f: "GpuFacts") -> tuple:
    return (f.index is None, f.index or 0, f.address)


# --- gathering: inventory ------------------------------------------------------------------------------------------
def _from_inventory(ctx: Context, host_ids: list[str] | None):
    with ctx.inventory.unit(action="read the inventory for the report") as uow:
        host_rows = uow.report_hosts(host_ids)
        gpu_rows = uow.report_gpus(host_ids)
        inst_rows = uow.report_instances(host_ids)
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
    for hf in hosts.values():
        hf.gpus.sort(key=_gpu_sort_key)
    return list(hosts.values()), tenants, usage


# --- gathering: live --------------------------------------------------------------------------------------------------
def _from_live(ctx: Context):
    from gpuvirt.service import hostview

    view = hostview.snapshot(ctx)
    hid = ctx.settings.host_id
    with ctx.inventory.unit(write=True, action="record this host for the report") as uow:
        hostview.record(ctx, view, uow)
        host_rows = uow.report_hosts([hid])
        gpu_rows = uow.report_gpus([hid])
        inst_rows = uow.report_instances([hid], keys=True)
        tenants = {t.name: t for t in uow.tenants()}
        usage = uow.tenant_usages()
    h = host_rows[0]
    hf = HostFacts(h[0], h[1], h[2], bool(h[3]))
    rows_by_gpu: dict[int, list[tuple]] = {}
    for r in inst_rows:
        rows_by_gpu.setdefault(r[I_GPU], []).append(r)
    gid_of = {g[2]: g[0] for g in gpu_rows}
    for g in view.gpus:
        f = GpuFacts(hid, g.address, g.nvml_index, g.model, g.name, g.vendor, g.mig_capable, g.mig_current,
                     g.mig_pending, g.interface, g.sriov_total, g.sriov_num)
        _live_instances(f, g, rows_by_gpu.get(gid_of.get(g.address, -1), []))
        hf.gpus.append(f)
    return [hf], tenants, usage


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


# --- per-model lookups ------------------------------------------------------------------------------------------------
class _ModelInfo:
    """Catalog lookups of one model, cached: the report asks them once per instance."""

    def __init__(self, model: GpuModel | None) -> None:
        self.model = model
        self.gi = {p.id: p for p in model.mig.gi_profiles} if model is not None and model.mig else {}
        self.vtypes = {t.id: t for t in model.vgpu.types} if model is not None and model.vgpu else {}
        self._tid: dict[str | None, int | None] = {}
        self.items: dict[tuple, tuple[str, str]] = {}      # (kind, profile id, type id) -> item()

    def tid(self, type_id: str | None) -> int | None:
        got = self._tid.get(type_id, -1)
        if got == -1:
            got = self._tid[type_id] = vgpu_rules.parse_type_id(type_id)
        return got

    def fb(self, type_id: str | None) -> int | None:
        t = self.vtypes.get(self.tid(type_id))
        return t.framebuffer_mib if t else None

    def item(self, r: tuple) -> tuple[str, str]:
        """(row kind, item name) an instance is counted under: the MIG profile, vGPU type or mdev type dir."""
        kind = r[I_KIND]
        if kind == MIG:
            p = self.gi.get(r[I_PID])
            return "mig-profile", p.name if p else str(r[I_PID])
        if kind == VF:
            return "vf", "vf"
        if kind == "gpu":                   # a whole GPU handed to a container (inventory.models.GPU)
            return "whole-gpu", "whole GPU"
        tid = self.tid(r[I_TYPE])
        if tid is None:
            # a generic mdev type is known by its type dir (mtty-2), as attach --mdev names it
            return "mdev-type", r[I_TYPE] or "?"
        t = self.vtypes.get(tid)
        return "vgpu-type", t.name if t else (r[I_TYPE] or "?")


_INFO: dict[str | None, _ModelInfo] = {}


def _info(model: GpuModel | None) -> _ModelInfo:
    key = model.id if model is not None else None
    got = _INFO.get(key)
    if got is None or got.model is not model:
        got = _INFO[key] = _ModelInfo(model)
    return got


# --- per-GPU figures --------------------------------------------------------------------------------------------------
# Many GPUs of a cluster share a layout (the same profile applied everywhere), so the rule answers are
# memoised on (model, layout) and (model, board state); the entries are shared between GPUs and never
# mutated afterwards.
_MIG_MEMO: dict[tuple, dict[str, Any]] = {}
_VGPU_MEMO: dict[tuple, dict[int, int]] = {}
_PART_MEMO: dict[tuple, dict[str, Any]] = {}
_MIG_BY_KEY: dict[tuple, dict[str, Any]] = {}      # (model, ((start, profile id), ...)) -> mig_figures()
_by_start = operator.itemgetter(I_START)
_MEMO_LIMIT = 50_000


def _remember(memo: dict, key: Any, value: Any) -> Any:
    if len(memo) > _MEMO_LIMIT:
        memo.clear()
    memo[key] = value
    return value


def mig_figures(model: GpuModel, layout: tuple[Placed, ...]) -> dict[str, Any]:
    """Free memory/compute slices, placeable-now counts, stranded slices and the slice map of one layout."""
    key = (model.id, layout)
    got = _MIG_MEMO.get(key)
    if got is not None:
        return got
    geom = model.mig
    assert geom is not None
    full = (1 << geom.memory_slices) - 1
    used = mask_of(layout) & full
    covered = 0
    placeable = {}
    for p in geom.gi_profiles:
        placeable[p.name] = remaining_capacity(geom, layout, p)
        for s in free_starts(geom, layout, p):
            covered |= ((1 << p.memory_slices) - 1) << s
    free_mask = full & ~used
    return _remember(_MIG_MEMO, key, {
        "memory_slices": geom.memory_slices,
        "compute_slices": geom.compute_slices,
        "free_memory_slices": bin(free_mask).count("1"),
        "free_compute_slices": geom.compute_slices - compute_used(geom, layout),
        "stranded_slices": bin(free_mask & ~covered).count("1"),
        "placeable_now": placeable,
        "slice_map": slice_map(geom, layout),
    })


def vgpu_availability(model: GpuModel, existing: Sequence[int], mig_on: bool, hostable_gis: Sequence[int],
                      free_parents: int | None) -> dict[int, int]:
    """``model.vgpu.available`` for every type of the board, memoised on the board state."""
    key = (model.id, tuple(sorted(existing)), mig_on, tuple(sorted(hostable_gis)), free_parents)
    got = _VGPU_MEMO.get(key)
    if got is None:
        got = _remember(_VGPU_MEMO, key, vgpu_rules.availability(
            model, list(existing), mig_enabled=mig_on, gpu_instances=list(hostable_gis), free_parents=free_parents))
    return got


def gpu_mode(f: GpuFacts) -> str:
    m = f.model
    if m is not None and m.mig is not None and f.mig_current:
        return "MIG"
    if m is not None and m.vgpu is not None:
        return "vGPU"
    if m is not None and m.mdev is not None:
        return "mdev"
    if f.vfs_total:
        return "VF"
    return "whole"


def _state(r: tuple, backing: set) -> str:
    if r[I_ID] is None:
        return "foreign"
    if r[I_STATE] != "active":
        return "pending"
    if r[I_VM] is not None or r[I_ID] in backing:
        return "in_use"
    return "free"


def _zero() -> dict[str, int]:
    return {"in_use": 0, "free": 0, "pending": 0, "foreign": 0}


def gpu_entry(f: GpuFacts, stale: bool) -> dict[str, Any]:
    """The document entry of one GPU (docs/capacity-report.md, "GPU entry")."""
    model = f.model
    info = _info(model)
    mode = gpu_mode(f)
    insts = f.insts
    backing = {r[I_BACK] for r in insts if r[I_BACK] is not None}
    counts = _zero()
    by_kind: dict[str, dict[str, int]] = {}
    per_item: dict[tuple[str, str], dict[str, int]] = {}
    allocations = []
    mig_rows = []
    hostable: list[int] = []
    existing: list[int] = []
    mdevs: list[str] = []
    is_mig = mode == "MIG"
    items = info.items
    tally: dict[tuple, int] = {}        # (kind, profile id, type id, state) -> instances
    for r in insts:
        # inline _state(): this loop runs once per instance of the cluster
        if r[I_ID] is None:
            st = "foreign"
        elif r[I_STATE] != "active":
            st = "pending"
        elif r[I_VM] is not None or r[I_ID] in backing:
            st = "in_use"
        else:
            st = "free"
        kind = r[I_KIND]
        tk = (kind, r[I_PID], r[I_TYPE], st)
        tally[tk] = tally.get(tk, 0) + 1
        if r[I_VM] is not None:
            ck = (kind, r[I_PID], r[I_TYPE])
            ik = items.get(ck)
            if ik is None:
                ik = items[ck] = info.item(r)
            allocations.append({"instance": r[I_ID], "kind": kind, "item": ik[1], "vm": r[I_VM],
                                "tenant": r[I_TENANT], "vm_state": r[I_VMSTATE],
                                "consumer": r[-1] or "vm"})      # the consumer is the rows' last column
        if kind == MIG:
            if is_mig and r[I_START] is not None and r[I_PID] in info.gi:
                mig_rows.append(r)
                # a GPU instance handed to a VM as such cannot also host a vGPU; every other one can
                if r[I_VM] is None or r[I_ID] in backing:
                    hostable.append(r[I_PID])
        elif kind == MDEV or kind == VFIO_VGPU:
            tid = info.tid(r[I_TYPE])
            if tid is not None:
                existing.append(tid)
            elif r[I_TYPE]:
                mdevs.append(r[I_TYPE])
    for (kind, pid, type_id, st), n in tally.items():
        counts[st] += n
        bk = by_kind.get(kind)
        if bk is None:
            bk = by_kind[kind] = _zero()
        bk[st] += n
        ck = (kind, pid, type_id)
        ik = items.get(ck)
        if ik is None:
            ik = items[ck] = info.item((None, None, kind, None, pid, None, type_id))
        slot = per_item.get(ik)
        if slot is None:
            slot = per_item[ik] = _zero()
        slot[st] += n
    e: dict[str, Any] = {
        "host": f.host, "gpu": f.address, "index": f.index, "model": model.id if model else None, "name": f.name,
        "vendor": f.vendor, "mode": mode, "stale": stale,
        "mig_mode": (None if not f.mig_capable else
                     ("on" if f.mig_current else "off") + ("" if f.mig_pending == f.mig_current else "-pending")),
        "instances": {"total": len(insts), **counts, "missing": f.missing, "by_kind": by_kind},
        "allocations": allocations,
    }
    if is_mig and model is not None and model.mig is not None:
        mig_rows.sort(key=_by_start)
        lay_key = tuple((r[I_START], r[I_PID]) for r in mig_rows)
        fig = _MIG_BY_KEY.get((model.id, lay_key))
        if fig is None:
            layout = tuple(sorted(Placed(st_, info.gi[pid].memory_slices, pid) for st_, pid in lay_key))
            fig = _remember(_MIG_BY_KEY, (model.id, lay_key), mig_figures(model, layout))
        e.update(fig)
        e["free_instances"] = {item: slot["free"] for (k, item), slot in per_item.items()
                               if k == "mig-profile" and slot["free"]}
        gi = info.gi
        e["layout"] = [{"instance": r[I_ID], "profile": gi[r[I_PID]].name, "start": r[I_START],
                        "size": gi[r[I_PID]].memory_slices, "state": _state(r, backing)} for r in mig_rows]
    if model is not None and model.vgpu is not None:
        free_parents = vgpu_rules.free_vfs(f.vfs_enabled, len(existing)) if model.vgpu.parent == "vf" else None
        avail = vgpu_availability(model, existing, is_mig, hostable, free_parents)
        counts_key = tuple(sorted((item, tuple(slot.values())) for (k, item), slot in per_item.items()
                                  if k == "vgpu-type"))
        key = ("vgpu", id(avail), counts_key)
        types = _PART_MEMO.get(key)
        if types is None or types.get("_avail") is not avail:
            t_slots = {item: slot for (k, item), slot in per_item.items() if k == "vgpu-type"}
            body = {}
            for t in model.vgpu.types:
                slot = t_slots.get(t.name)
                body[t.name] = {"available": avail.get(t.id, 0), "in_use": slot["in_use"] if slot else 0,
                                "free": slot["free"] if slot else 0}
            types = _remember(_PART_MEMO, key, {"_avail": avail, "body": body})
        e["vgpu_interface"] = f.interface
        e["free_parents"] = free_parents
        e["vgpu_types"] = types["body"]
    if model is not None and model.mdev is not None:
        spec = model.mdev
        used = vgpu_rules.pool_used(spec, mdevs)
        types = {}
        for t in vgpu_rules.registered_pool_types(spec):
            tdir = spec.type_dir(t)
            slot = per_item.get(("mdev-type", tdir))
            types[tdir] = {"available": vgpu_rules.pool_available(spec, t, used),
                           "in_use": slot["in_use"] if slot else 0, "free": slot["free"] if slot else 0}
        e["mdev_types"] = types
    if f.vfs_total and (model is None or model.vgpu is None):
        slot = per_item.get(("vf", "vf"))
        e["vfs"] = {"total": f.vfs_total, "enabled": f.vfs_enabled or 0, "in_use": slot["in_use"] if slot else 0,
                    "free": slot["free"] if slot else 0}
    if mode == "whole":
        e["whole_available"] = 0 if insts else 1
    return e


def models_section(models: Iterable[GpuModel]) -> dict[str, Any]:
    """Static facts of the models in the report, so GPU entries need not repeat them."""
    out = {}
    for m in sorted(models, key=lambda m: m.id):
        d: dict[str, Any] = {"display_name": m.display_name, "memory_mib": m.memory_mib}
        if m.mig is not None:
            d["mig"] = {"memory_slices": m.mig.memory_slices, "compute_slices": m.mig.compute_slices,
                        "profiles": {p.name: {"id": p.id, "memory_slices": p.memory_slices,
                                              "compute_slices": p.compute_slices, "memory_mib": p.memory_mib,
                                              "max_instances": p.max_instances, "starts": list(p.starts)}
                                     for p in m.mig.gi_profiles}}
        if m.vgpu is not None:
            d["vgpu"] = {"policy": m.vgpu.policy, "parent": m.vgpu.parent, "interface": m.vgpu.interface,
                         "types": {t.name: {"id": t.id, "framebuffer_mib": t.framebuffer_mib,
                                            "max_instances": t.max_instances,
                                            "gpu_instance_profile": (m.mig.profile(t.gpu_instance_profile_id).name
                                                                     if t.mig_backed and m.mig else None)}
                                   for t in m.vgpu.types}}
        if m.mdev is not None:
            d["mdev"] = {"types": {m.mdev.type_dir(t): {"name": t.name or t.sysfs_name}
                                   for t in vgpu_rules.registered_pool_types(m.mdev)}}
        out[m.id] = d
    return out


# --- the document -----------------------------------------------------------------------------------------------------
def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds") + "Z"


def _new_totals() -> dict[str, Any]:
    return {"gpus": 0, "instances": _zero(), "mig_gpus": 0, "free_memory_slices": 0,
            "free_compute_slices": 0, "stranded_slices": 0, "mig_placeable_now": {}, "vgpu_available": {},
            "mdev_available": {}, "vfs_free": 0, "whole_gpus_free": 0}


class _Totals:
    """Sums over GPU entries.  Entries share their per-profile / per-type dicts (memoised), so those are
    counted by identity first and added once per distinct dict, times how often it occurs."""

    def __init__(self) -> None:
        self.t = _new_totals()
        self.shared: dict[int, list] = {}

    def add(self, e: dict[str, Any]) -> None:
        t = self.t
        t["gpus"] += 1
        ti = t["instances"]
        ei = e["instances"]
        for s in STATES:
            ti[s] += ei[s]
        if "placeable_now" in e:
            t["mig_gpus"] += 1
            t["free_memory_slices"] += e["free_memory_slices"]
            t["free_compute_slices"] += e["free_compute_slices"]
            t["stranded_slices"] += e["stranded_slices"]
            self._count("mig_placeable_now", e["placeable_now"], False)
        if "vgpu_types" in e:
            self._count("vgpu_available", e["vgpu_types"], True)
        if "mdev_types" in e:
            self._count("mdev_available", e["mdev_types"], True)
        if "vfs" in e:
            t["vfs_free"] += e["vfs"]["free"]
        t["whole_gpus_free"] += e.get("whole_available", 0)

    def _count(self, key: str, d: dict[str, Any], nested: bool) -> None:
        got = self.shared.get(id(d))
        if got is None:
            self.shared[id(d)] = [key, d, nested, 1]
        else:
            got[3] += 1

    def result(self) -> dict[str, Any]:
        for key, d, nested, n in self.shared.values():
            into = self.t[key]
            for name, v in d.items():
                into[name] = into.get(name, 0) + n * (v["available"] if nested else v)
        self.shared.clear()
        return self.t


def _merge_totals(into: dict[str, Any], t: dict[str, Any]) -> None:
    into["gpus"] += t["gpus"]
    for s in STATES:
        into["instances"][s] += t["instances"][s]
    for k in ("mig_gpus", "free_memory_slices", "free_compute_slices", "stranded_slices", "vfs_free",
              "whole_gpus_free"):
        into[k] += t[k]
    for k in ("mig_placeable_now", "vgpu_available", "mdev_available"):
        for name, v in t[k].items():
            into[k][name] = into[k].get(name, 0) + v


def build_document(hosts: list[HostFacts], tenants: dict[str, Any], usage: dict[str | None, dict[str, int]], *,
                   now: dt.datetime, stale_after: int | float, source: str, by: str, cluster: bool,
                   host_filter: str | None, requests: list[tuple[str, int]], mig_policy: str,
                   vgpu_policy: str) -> dict[str, Any]:
    totals = _new_totals()
    host_docs = []
    held: dict[str | None, list] = {}
    live_items: list[tuple[HostFacts, dict[str, Any], GpuFacts]] = []
    models: dict[str, GpuModel] = {}
    stale_hosts = 0
    for h in hosts:
        age = (now - h.last_seen_at).total_seconds() if h.last_seen_at is not None else None
        # a live report looked at the host a moment ago; only the inventory view can be out of date
        stale = source == "inventory" and (age is None or age > stale_after)
        stale_hosts += stale
        acc = _Totals()
        entries = []
        for f in h.gpus:
            e = gpu_entry(f, stale)
            entries.append(e)
            acc.add(e)
            if f.model is not None:
                models[f.model.id] = f.model
            if not stale:
                live_items.append((h, e, f))
            backing = {r[I_BACK] for r in f.insts if r[I_BACK] is not None and r[I_VM] is not None}
            for r in f.insts:
                # the GPU instance under an allocated MIG-backed vGPU: counted through it (repo._not_a_backing)
                if r[I_VM] is not None and r[I_ID] not in backing:
                    t = held.get(r[I_TENANT])
                    if t is None:
                        t = held[r[I_TENANT]] = [0, 0, 0, set()]
                    t[0] += 1
                    t[1] += r[I_MEM] or 0
                    t[2] += r[I_CS] or 0
                    t[3].add(h.id)
        htot = acc.result()
        if not stale:
            _merge_totals(totals, htot)
        host_docs.append({"host": h.id, "hostname": h.hostname, "simulated": h.simulated,
                          "last_seen_at": _iso(h.last_seen_at),
                          "age_seconds": None if age is None else round(max(age, 0.0), 1), "stale": stale,
                          "totals": htot, "gpus": entries})
    totals["hosts"] = len(hosts) - stale_hosts
    totals["stale_hosts"] = stale_hosts
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": _iso(now),
        "source": source,
        "scope": {"cluster": bool(cluster), "host": host_filter, "by": by},
        "stale_after_seconds": stale_after,
        "models": models_section(models.values()),
        "hosts": host_docs,
        "tenants": _tenant_entries(held, tenants, usage),
        "totals": totals,
        "groups": None,
        "fit": None,
    }
    if requests:
        doc["fit"] = fit_requests(live_items, requests, mig_policy=mig_policy, vgpu_policy=vgpu_policy)
    if by != "gpu":
        doc["groups"] = {"by": by, "columns": list(GROUP_COLUMNS[by]), "rows": group_rows(doc, by)}
    return doc


def _tenant_entries(held: dict[str | None, list], tenants: dict[str, Any],
                    usage: dict[str | None, dict[str, int]]) -> list[dict[str, Any]]:
    names = set(held) | set(tenants)
    out = []
    for name in sorted(names, key=lambda n: (n is None, n or "")):
        n_inst, mem, cs, hosts = held.get(name) or (0, 0, 0, set())
        row = tenants.get(name) if name is not None else None
        used = usage.get(name) or {"instances": 0, "memory_mib": 0, "compute_slices": 0}
        quota = None
        remaining = None
        over = False
        if row is not None:
            quota = {"instances": row.max_instances, "memory_mib": row.max_memory_mib,
                     "compute_slices": row.max_compute_slices}
            remaining = {k: (None if v is None else v - used[k]) for k, v in quota.items()}
            over = any(v is not None and v < 0 for v in remaining.values())
        out.append({"tenant": name, "instances": n_inst, "memory_mib": mem, "compute_slices": cs,
                    "hosts": sorted(hosts), "quota": quota, "usage": dict(used), "remaining": remaining,
                    "over_quota": over})
    return out


# --- rows (CSV and --by) ----------------------------------------------------------------------------------------------
DETAIL_COLUMNS = ("host", "stale", "gpu", "index", "model", "mode", "kind", "item", "in_use", "free", "pending",
                  "foreign", "available", "free_memory_slices", "free_compute_slices", "stranded_slices", "tenants")
GROUP_COLUMNS = {
    "gpu": DETAIL_COLUMNS,
    "host": ("host", "stale", "kind", "item", "gpus", "in_use", "free", "pending", "foreign", "available",
             "free_memory_slices", "free_compute_slices", "stranded_slices", "tenants"),
    "type": ("kind", "item", "models", "hosts", "gpus", "in_use", "free", "pending", "foreign", "available",
             "tenants"),
    "profile": ("kind", "item", "models", "hosts", "gpus", "in_use", "free", "pending", "foreign", "available",
                "free_memory_slices", "free_compute_slices", "stranded_slices", "tenants"),
    "tenant": ("tenant", "instances", "memory_mib", "compute_slices", "hosts", "quota_instances",
               "quota_memory_mib", "quota_compute_slices", "used_instances", "used_memory_mib",
               "used_compute_slices", "over_quota"),
}


def _tenants_text(d: dict[str, int]) -> str:
    # "acme=2;beta=1": allocations of the row's item per tenant ("" = no tenant)
    return ";".join(f"{k}={v}" for k, v in sorted(d.items()))


def _parse_tenants_text(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, text.split(";")):
        k, _, v = part.rpartition("=")
        out[k] = out.get(k, 0) + int(v)
    return out


def detail_rows(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One row per (host, GPU, profile / type / VF / whole GPU), columns ``DETAIL_COLUMNS``."""
    for h in doc["hosts"]:
        for e in h["gpus"]:
            base = {"host": e["host"], "stale": e["stale"], "gpu": e["gpu"], "index": e["index"],
                    "model": e["model"], "mode": e["mode"]}
            per_item: dict[tuple[str, str], dict[str, Any]] = {}
            for a in e["allocations"]:
                kind = {MIG: "mig-profile", MDEV: "vgpu-type" if a["item"] in e.get("vgpu_types", {}) else
                        "mdev-type", VFIO_VGPU: "vgpu-type", VF: "vf"}.get(a["kind"], a["kind"])
                d = per_item.setdefault((kind, a["item"]), {})
                tk = a["tenant"] or ""
                d[tk] = d.get(tk, 0) + 1
            layout_counts: dict[str, dict[str, int]] = {}
            for r in e.get("layout", []):
                c = layout_counts.setdefault(r["profile"], dict.fromkeys(STATES, 0))
                c[r["state"]] += 1
            if "placeable_now" in e:
                for name, n in e["placeable_now"].items():
                    c = layout_counts.get(name) or dict.fromkeys(STATES, 0)
                    yield {**base, "kind": "mig-profile", "item": name, **c, "available": n,
                           "free_memory_slices": e["free_memory_slices"],
                           "free_compute_slices": e["free_compute_slices"], "stranded_slices": e["stranded_slices"],
                           "tenants": _tenants_text(per_item.get(("mig-profile", name), {}))}
            for src, kind in (("vgpu_types", "vgpu-type"), ("mdev_types", "mdev-type")):
                for name, t in e.get(src, {}).items():
                    yield {**base, "kind": kind, "item": name, "in_use": t["in_use"], "free": t["free"],
                           "pending": 0, "foreign": 0, "available": t["available"], "free_memory_slices": None,
                           "free_compute_slices": None, "stranded_slices": None,
                           "tenants": _tenants_text(per_item.get((kind, name), {}))}
            if "vfs" in e:
                v = e["vfs"]
                yield {**base, "kind": "vf", "item": "vf", "in_use": v["in_use"], "free": v["free"], "pending": 0,
                       "foreign": 0, "available": v["free"], "free_memory_slices": None,
                       "free_compute_slices": None, "stranded_slices": None,
                       "tenants": _tenants_text(per_item.get(("vf", "vf"), {}))}
            if "whole_available" in e:
                yield {**base, "kind": "whole", "item": "gpu", "in_use": 0, "free": 0, "pending": 0, "foreign": 0,
                       "available": e["whole_available"], "free_memory_slices": None, "free_compute_slices": None,
                       "stranded_slices": None, "tenants": ""}


_SUMMED = ("in_use", "free", "pending", "foreign", "available", "free_memory_slices", "free_compute_slices",
           "stranded_slices")


def group_rows(doc: dict[str, Any], by: str) -> list[dict[str, Any]]:
    """Rows of the ``--by`` view (columns ``GROUP_COLUMNS[by]``).

    ``host``: per (host, kind, item), stale hosts included and flagged.  ``type`` / ``profile``: per
    (kind, item) over the GPUs of hosts that are not stale.  ``tenant``: one row per tenant.
    """
    if by == "gpu":
        return list(detail_rows(doc))
    if by == "tenant":
        out = []
        for t in doc["tenants"]:
            q = t["quota"] or {}
            out.append({"tenant": t["tenant"], "instances": t["instances"], "memory_mib": t["memory_mib"],
                        "compute_slices": t["compute_slices"], "hosts": len(t["hosts"]),
                        "quota_instances": q.get("instances"), "quota_memory_mib": q.get("memory_mib"),
                        "quota_compute_slices": q.get("compute_slices"), "used_instances": t["usage"]["instances"],
                        "used_memory_mib": t["usage"]["memory_mib"],
                        "used_compute_slices": t["usage"]["compute_slices"], "over_quota": t["over_quota"]})
        return out
    kinds = {"type": ("vgpu-type", "mdev-type"), "profile": ("mig-profile",),
             "host": ("mig-profile", "vgpu-type", "mdev-type", "vf", "whole")}[by]
    groups: dict[tuple, dict[str, Any]] = {}
    for r in detail_rows(doc):
        if r["kind"] not in kinds or (by != "host" and r["stale"]):
            continue
        key = (r["host"], r["kind"], r["item"]) if by == "host" else (r["kind"], r["item"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"kind": r["kind"], "item": r["item"], "gpus": 0, "_hosts": set(), "_models": set(),
                               "_tenants": Counter(), **{k: None for k in _SUMMED}}
            if by == "host":
                g["host"], g["stale"] = r["host"], r["stale"]
        g["gpus"] += 1
        g["_hosts"].add(r["host"])
        if r["model"]:
            g["_models"].add(r["model"])
        g["_tenants"].update(_parse_tenants_text(r["tenants"]))
        for k in _SUMMED:
            if r[k] is not None:
                g[k] = (g[k] or 0) + r[k]
    out = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        g = groups[key]
        g["hosts"] = len(g.pop("_hosts"))
        g["models"] = ";".join(sorted(g.pop("_models")))
        g["tenants"] = _tenants_text(dict(g.pop("_tenants")))
        out.append({c: g.get(c) for c in GROUP_COLUMNS[by]})
    return out


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def to_csv(doc: dict[str, Any]) -> str:
    """CSV of the report's rows: ``--by gpu`` gives one row per (host, GPU, item), other groupings their rows.
    Empty cell = not applicable; booleans are ``true`` / ``false``."""
    by = doc["scope"]["by"]
    cols = GROUP_COLUMNS[by]
    rows = doc["groups"]["rows"] if doc.get("groups") else detail_rows(doc)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_csv_value(r.get(c)) for c in cols])
    return buf.getvalue()


# --- Prometheus -------------------------------------------------------------------------------------------------------
def to_prometheus(doc: dict[str, Any]) -> bytes:
    """Prometheus text exposition of the report (gauges; docs/capacity-report.md "Metrics").

    Stale hosts contribute ``gpuvirt_host_stale 1`` and their age only: their last figures are not capacity.
    """
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()

    def g(name: str, doc_: str, labels: Sequence[str]) -> Gauge:
        return Gauge(name, doc_, list(labels), registry=reg)

    host_stale = g("gpuvirt_host_stale", "1 when the host has not reported within stale_after_seconds", ["host"])
    host_age = g("gpuvirt_host_last_seen_age_seconds", "Seconds since the host last recorded itself", ["host"])
    gpu_info = g("gpuvirt_gpu_info", "One per GPU counted as capacity, with its model and mode",
                 ["host", "gpu", "model", "mode"])
    insts = g("gpuvirt_instances", "Instances per GPU by kind and state (in_use, free, pending, foreign)",
              ["host", "gpu", "kind", "state"])
    placeable = g("gpuvirt_mig_placeable_now", "More instances of the MIG profile that fit the GPU now, given the "
                  "actual placements", ["host", "gpu", "model", "profile"])
    mig_free_inst = g("gpuvirt_mig_free_instances", "Existing unallocated MIG instances of the profile",
                      ["host", "gpu", "model", "profile"])
    free_mem = g("gpuvirt_mig_free_memory_slices", "Free MIG memory slices", ["host", "gpu", "model"])
    free_cs = g("gpuvirt_mig_free_compute_slices", "Free MIG compute slices", ["host", "gpu", "model"])
    stranded = g("gpuvirt_mig_stranded_slices", "Free memory slices no MIG profile of the model can use now",
                 ["host", "gpu", "model"])
    vavail = g("gpuvirt_vgpu_available", "More vGPUs of the type the board would accept now",
               ["host", "gpu", "type"])
    vfree = g("gpuvirt_vgpu_free_instances", "Existing unallocated vGPUs of the type", ["host", "gpu", "type"])
    mavail = g("gpuvirt_mdev_available", "More mdevs of the (non-NVIDIA) type the parent's pool allows",
               ["host", "gpu", "type"])
    vfs_free = g("gpuvirt_vfs_free", "Unallocated whole SR-IOV VFs recorded by gpuvirt", ["host", "gpu"])
    t_inst = g("gpuvirt_tenant_instances", "Instances held by the tenant in the report's scope", ["tenant"])
    t_mem = g("gpuvirt_tenant_memory_mib", "GPU memory held by the tenant in the report's scope", ["tenant"])
    t_cs = g("gpuvirt_tenant_compute_slices", "MIG compute slices held by the tenant in the report's scope",
             ["tenant"])
    q_inst = g("gpuvirt_tenant_quota_instances", "Instance quota of the tenant (absent: none)", ["tenant"])
    q_mem = g("gpuvirt_tenant_quota_memory_mib", "GPU memory quota of the tenant (absent: none)", ["tenant"])
    q_cs = g("gpuvirt_tenant_quota_compute_slices", "Compute slice quota of the tenant (absent: none)", ["tenant"])
    u_inst = g("gpuvirt_tenant_quota_used_instances", "Instances counted against the quota (all hosts)",
               ["tenant"])
    u_mem = g("gpuvirt_tenant_quota_used_memory_mib", "GPU memory counted against the quota (all hosts)",
              ["tenant"])
    u_cs = g("gpuvirt_tenant_quota_used_compute_slices", "Compute slices counted against the quota (all hosts)",
             ["tenant"])
    fit_req = g("gpuvirt_fit_requested", "Instances asked for with --fit", ["request"])
    fit_placed = g("gpuvirt_fit_placeable", "Of those, how many could be placed now", ["request"])
    generated = g("gpuvirt_report_generated_timestamp_seconds", "When the report was made (Unix time)", [])

    for h in doc["hosts"]:
        host_stale.labels(h["host"]).set(1 if h["stale"] else 0)
        if h["age_seconds"] is not None:
            host_age.labels(h["host"]).set(h["age_seconds"])
        if h["stale"]:
            continue
        for e in h["gpus"]:
            hid, gid, model = e["host"], e["gpu"], e["model"] or ""
            gpu_info.labels(hid, gid, model, e["mode"]).set(1)
            for kind, d in e["instances"]["by_kind"].items():
                for state, n in d.items():
                    insts.labels(hid, gid, kind, state).set(n)
            if "placeable_now" in e:
                for prof, n in e["placeable_now"].items():
                    placeable.labels(hid, gid, model, prof).set(n)
                    mig_free_inst.labels(hid, gid, model, prof).set(e["free_instances"].get(prof, 0))
                free_mem.labels(hid, gid, model).set(e["free_memory_slices"])
                free_cs.labels(hid, gid, model).set(e["free_compute_slices"])
                stranded.labels(hid, gid, model).set(e["stranded_slices"])
            for name, t in e.get("vgpu_types", {}).items():
                vavail.labels(hid, gid, name).set(t["available"])
                vfree.labels(hid, gid, name).set(t["free"])
            for name, t in e.get("mdev_types", {}).items():
                mavail.labels(hid, gid, name).set(t["available"])
            if "vfs" in e:
                vfs_free.labels(hid, gid).set(e["vfs"]["free"])
    for t in doc["tenants"]:
        name = t["tenant"] or ""
        t_inst.labels(name).set(t["instances"])
        t_mem.labels(name).set(t["memory_mib"])
        t_cs.labels(name).set(t["compute_slices"])
        q = t["quota"]
        if q is not None:
            for gauge, key in ((q_inst, "instances"), (q_mem, "memory_mib"), (q_cs, "compute_slices")):
                if q[key] is not None:
                    gauge.labels(name).set(q[key])
            u_inst.labels(name).set(t["usage"]["instances"])
            u_mem.labels(name).set(t["usage"]["memory_mib"])
            u_cs.labels(name).set(t["usage"]["compute_slices"])
    if doc.get("fit"):
        for r in doc["fit"]["requests"]:
            fit_req.labels(r["request"]).set(r["count"])
            fit_placed.labels(r["request"]).set(r["placed"])
    generated.set(dt.datetime.fromisoformat(doc["generated_at"].rstrip("Z")).replace(
        tzinfo=dt.timezone.utc).timestamp())
    return generate_latest(reg)


def render_machine(doc: dict[str, Any], fmt: str, *, pretty: bool = False) -> bytes:
    """The json / csv / prometheus bytes of a report document (the table view is the CLI's business)."""
    with paused_gc():
        if fmt == "json":
            if pretty:
                return (json.dumps(doc, indent=2) + "\n").encode()
            try:
                import orjson  # a cluster document is tens of MB: orjson encodes it ~10x faster
            except ImportError:  # pragma: no cover - orjson is a dependency; keep working without it
                return (json.dumps(doc, separators=(",", ":")) + "\n").encode()
            return orjson.dumps(doc) + b"\n"
        if fmt == "csv":
            return to_csv(doc).encode()
        if fmt == "prometheus":
            return to_prometheus(doc)
    raise UsageError(f"format {fmt!r} is not a machine format")


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` as a whole or not at all (temp file in the same directory, fsync, rename), so a reader
    such as node_exporter's textfile collector never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    base = os.path.basename(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise UsageError(f"cannot write --output {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UsageError(f"cannot write --output {path}: {exc.strerror}") from exc


# --- --fit ------------------------------------------------------------------------------------------------------------
_FIT_ITEM = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9 ._+:-]*?)\s*=\s*(?P<count>[^=]*?)\s*$")
MAX_FIT_COUNT = 1_000_000


def parse_fit(specs: Iterable[str]) -> list[tuple[str, int]]:
    """``["3g.40gb=20,A2-2Q=8", ...]`` -> [(name, count)] in order of first mention; repeated names add up."""
    out: dict[str, int] = {}
    for spec in specs:
        if spec is None or not str(spec).strip():
            raise UsageError("empty --fit; expected NAME=COUNT[,NAME=COUNT...], e.g. 3g.40gb=20,A2-2Q=8")
        for item in str(spec).split(","):
            m = _FIT_ITEM.match(item)
            if not m:
                raise UsageError(f"malformed --fit item '{item.strip()}': expected NAME=COUNT (a MIG profile, "
                                 "vGPU type, mdev type or 'vf'), e.g. 3g.40gb=20,A2-2Q=8")
            count = m.group("count")
            if not re.fullmatch(r"\d+", count) or not 1 <= int(count) <= MAX_FIT_COUNT:
                raise UsageError(f"--fit count '{count}' for {m.group('name')} must be an integer from 1 to "
                                 f"{MAX_FIT_COUNT}")
            out[m.group("name")] = out.get(m.group("name"), 0) + int(count)
    return list(out.items())


def _classify(name: str) -> str:
    """mig | vgpu | mdev | vf: what the name means for at least one catalog model; UsageError when nothing."""
    if name.lower() == "vf":
        return "vf"
    cat = load_catalog()
    for m in cat.models.values():
        if m.mig is not None:
            try:
                resolve_gi_profile(m, name)
                return "mig"
            except GpuvirtError:
                pass
    for m in cat.models.values():
        if m.vgpu is not None:
            try:
                resolve_vgpu_type(m, name)
                return "vgpu"
            except GpuvirtError:
                pass
    for m in cat.models.values():
        if m.mdev is not None and any(m.mdev.type_dir(t) == name for t in m.mdev.types):
            return "mdev"
    raise UsageError(f"--fit: '{name}' is no MIG profile, vGPU type or mdev type of any known GPU model")


class _FitGpu:
    """One GPU's capacity while --fit hands out instances in simulation."""

    def __init__(self, host: str, e: dict[str, Any], f: GpuFacts) -> None:
        self.host, self.address, self.model = host, e["gpu"], f.model
        self.key = f"{host}/{e['gpu']}"
        self.mig_on = e["mode"] == "MIG"
        info = _info(f.model)
        backing = {r[I_BACK] for r in f.insts if r[I_BACK] is not None}
        self.layout: list[Placed] = []
        self.free_mig: Counter = Counter()          # profile id -> free existing MIG instances
        self.hostable: list[int] = []                # GI profile ids able to host / hosting a MIG-backed vGPU
        self.vgpus: list[int] = []
        self.free_vgpu: Counter = Counter()         # type id -> free existing vGPUs
        self.mdevs: list[str] = []
        self.free_mdev: Counter = Counter()
        self.free_vf = 0
        for r in f.insts:
            st = _state(r, backing)
            kind = r[I_KIND]
            if kind == MIG and self.mig_on:
                p = info.gi.get(r[I_PID])
                if p is None or r[I_START] is None:
                    continue
                self.layout.append(Placed(r[I_START], p.memory_slices, p.id))
                if st == "free":
                    self.free_mig[p.id] += 1
                if r[I_VM] is None or r[I_ID] in backing:
                    self.hostable.append(p.id)
            elif kind in (MDEV, VFIO_VGPU):
                tid = info.tid(r[I_TYPE])
                if tid is not None:
                    self.vgpus.append(tid)
                    if st == "free":
                        self.free_vgpu[tid] += 1
                elif r[I_TYPE]:
                    self.mdevs.append(r[I_TYPE])
                    if st == "free":
                        self.free_mdev[r[I_TYPE]] += 1
            elif kind == VF and st == "free":
                self.free_vf += 1
        self.vfs_enabled = f.vfs_enabled

    def free_parents(self) -> int | None:
        if self.model is None or self.model.vgpu is None or self.model.vgpu.parent != "vf":
            return None
        return vgpu_rules.free_vfs(self.vfs_enabled, len(self.vgpus))

    def room(self, vtype: Any) -> int:
        assert self.model is not None
        return vgpu_availability(self.model, self.vgpus, self.mig_on, self.hostable,
                                 self.free_parents()).get(vtype.id, 0)


def fit_requests(items: list[tuple[Any, dict[str, Any], GpuFacts]], requests: list[tuple[str, int]], *,
                 mig_policy: str, vgpu_policy: str) -> dict[str, Any]:
    """Where ``requests`` could be placed now, handed out one instance at a time the way successive attaches
    would (free existing instances first, then new ones at the planner's choice), or what is missing.

    Larger MIG profiles go first (they need aligned blocks that small ones would break up), then MIG-backed
    vGPUs, then time-sliced vGPUs by framebuffer size, then generic mdevs and whole VFs.
    """
    from gpuvirt.model.planner import GpuState, VgpuBoard, choose_placement, choose_vgpu_gpu

    gpus = [_FitGpu(h.id, e, f) for h, e, f in items]
    kinds = {name: _classify(name) for name, _ in requests}

    def mig_weight(name: str) -> tuple:
        best = (0, 0)
        for gg in gpus:
            if gg.model is not None and gg.model.mig is not None:
                try:
                    p = resolve_gi_profile(gg.model, name)
                    best = max(best, (p.compute_slices, p.memory_slices))
                except GpuvirtError:
                    pass
        return best

    def vgpu_weight(name: str) -> tuple:
        for gg in gpus:
            if gg.model is not None and gg.model.vgpu is not None:
                try:
                    t = resolve_vgpu_type(gg.model, name)
                    return (0 if t.mig_backed else 1, -t.framebuffer_mib)
                except GpuvirtError:
                    pass
        return (2, 0)

    order_kind = {"mig": 0, "vgpu": 1, "mdev": 2, "vf": 3}
    ordered = sorted(range(len(requests)), key=lambda k: (
        order_kind[kinds[requests[k][0]]],
        tuple(-x for x in mig_weight(requests[k][0])) if kinds[requests[k][0]] == "mig" else
        vgpu_weight(requests[k][0]) if kinds[requests[k][0]] == "vgpu" else (), k))
    results: dict[int, dict[str, Any]] = {}
    for k in ordered:
        name, count = requests[k]
        kind = kinds[name]
        where: dict[str, dict[str, Any]] = {}

        def note(gg: _FitGpu, existing: bool, start: int | None = None) -> None:
            w = where.setdefault(gg.key, {"host": gg.host, "gpu": gg.address, "count": 0, "existing": 0,
                                          "new": 0, "starts": []})
            w["count"] += 1
            w["existing" if existing else "new"] += 1
            if start is not None:
                w["starts"].append(start)

        placed = 0
        offered = False
        for _ in range(count):
            if kind == "mig":
                ok, off = _fit_one_mig(gpus, name, mig_policy, note, GpuState, choose_placement)
            elif kind == "vgpu":
                ok, off = _fit_one_vgpu(gpus, name, vgpu_policy, mig_policy, note, GpuState, VgpuBoard,
                                        choose_placement, choose_vgpu_gpu)
            elif kind == "mdev":
                ok, off = _fit_one_mdev(gpus, name, note)
            else:
                ok, off = _fit_one_vf(gpus, note)
            offered = offered or off
            if not ok:
                break
            placed += 1
        missing = count - placed
        reason = None
        if missing:
            reason = _missing_reason(gpus, name, kind, offered, missing)
        results[k] = {"request": name, "kind": kind, "count": count, "placed": placed, "missing": missing,
                      "placements": sorted(where.values(), key=lambda w: (w["host"], w["gpu"])), "reason": reason}
    reqs = [results[k] for k in range(len(requests))]
    return {"fits": all(r["missing"] == 0 for r in reqs), "requests": reqs,
            "policies": {"mig": mig_policy, "vgpu": vgpu_policy}}


def _resolve(gg: _FitGpu, kind: str, name: str, cache: dict) -> Any:
    """A MIG profile ("mig") or vGPU type ("vgpu") of this GPU's model by name; None when the model has none.

    Memoised per (model, kind, name): a fit over thousands of GPUs of a few models resolves each name once.
    """
    key = (gg.model.id if gg.model else None, kind, name)
    if key not in cache:
        found = None
        m = gg.model
        if m is not None and (m.mig if kind == "mig" else m.vgpu) is not None:
            try:
                found = resolve_gi_profile(m, name) if kind == "mig" else resolve_vgpu_type(m, name)
            except GpuvirtError:
                found = None
        cache[key] = found
    return cache[key]


_RESOLVED: dict = {}


def _place_new_gi(cands: list[tuple[_FitGpu, Any]], policy: str, GpuState: Any, choose_placement: Any):
    """Planner choice among ``cands`` [(gpu, GI profile)]: (gpu, profile, start) or None."""
    best = None
    for pid in sorted({p.id for _, p in cands}):
        group = [(gg, p) for gg, p in cands if p.id == pid]
        states = [GpuState(gg.key, gg.model.mig, tuple(sorted(gg.layout))) for gg, _ in group]
        d = choose_placement(states, pid, policy)
        if d is not None and (best is None or d.score < best[0].score):
            best = (d, group)
    if best is None:
        return None
    d, group = best
    gg, p = next((gg, p) for gg, p in group if gg.key == d.gpu_key)
    return gg, p, d.start


def _fit_one_mig(gpus, name, policy, note, GpuState, choose_placement) -> tuple[bool, bool]:
    cands = []
    for gg in gpus:
        if not gg.mig_on:
            continue
        p = _resolve(gg, "mig", name, _RESOLVED)
        if p is not None:
            cands.append((gg, p))
    if not cands:
        return False, False
    for gg, p in cands:
        if gg.free_mig[p.id] > 0:
            gg.free_mig[p.id] -= 1
            # an existing free instance handed to a VM can no longer host a vGPU
            if p.id in gg.hostable:
                gg.hostable.remove(p.id)
            note(gg, True)
            return True, True
    got = _place_new_gi(cands, policy, GpuState, choose_placement)
    if got is None:
        return False, True
    gg, p, start = got
    gg.layout.append(Placed(start, p.memory_slices, p.id))
    note(gg, False, start)
    return True, True


def _fit_one_vgpu(gpus, name, policy, mig_policy, note, GpuState, VgpuBoard, choose_placement,
                  choose_vgpu_gpu) -> tuple[bool, bool]:
    cands = []
    for gg in gpus:
        t = _resolve(gg, "vgpu", name, _RESOLVED)
        if t is not None:
            cands.append((gg, t))
    if not cands:
        return False, False
    for gg, t in cands:
        if gg.free_vgpu[t.id] > 0:
            gg.free_vgpu[t.id] -= 1
            note(gg, True)
            return True, True
    boards = []
    by_key = {}
    for gg, t in cands:
        room = gg.room(t)
        if room > 0:
            fb = {x.id: x.framebuffer_mib for x in gg.model.vgpu.types}
            # type ids are per board model: mark "the requested type" as -1 so that boards of different
            # models compare alike in the planner's "already hosts this type" preference
            boards.append(VgpuBoard(gg.key, tuple((-1 if tid == t.id else tid, fb.get(tid, 0)) for tid in gg.vgpus),
                                    room))
            by_key[gg.key] = (gg, t)
    if boards:
        key = choose_vgpu_gpu(boards, -1, policy)
        if key is not None:
            gg, t = by_key[key]
            gg.vgpus.append(t.id)
            note(gg, False)
            return True, True
    # MIG-backed types: a new GPU instance of the type's profile can host one, where the board allows
    gi_cands = []
    for gg, t in cands:
        if not (t.mig_backed and gg.mig_on and gg.model is not None and gg.model.mig is not None):
            continue
        fp = gg.free_parents()
        if fp is not None and fp <= 0:
            continue
        trial = vgpu_rules.board_room(gg.model, t, gg.vgpus, mig_enabled=True,
                                      gpu_instances=gg.hostable + [t.gpu_instance_profile_id])
        if trial <= 0:
            continue
        gi_cands.append((gg, gg.model.mig.profile(t.gpu_instance_profile_id)))
    got = _place_new_gi(gi_cands, mig_policy, GpuState, choose_placement) if gi_cands else None
    if got is None:
        return False, True
    gg, p, start = got
    gg.layout.append(Placed(start, p.memory_slices, p.id))
    gg.hostable.append(p.id)
    t = next(t for g2, t in cands if g2 is gg)
    gg.vgpus.append(t.id)
    note(gg, False, start)
    return True, True


def _fit_one_mdev(gpus, name, note) -> tuple[bool, bool]:
    offered = False
    for gg in gpus:
        spec = gg.model.mdev if gg.model is not None else None
        if spec is None:
            continue
        t = next((t for t in vgpu_rules.registered_pool_types(spec) if spec.type_dir(t) == name), None)
        if t is None:
            continue
        offered = True
        if gg.free_mdev[name] > 0:
            gg.free_mdev[name] -= 1
            note(gg, True)
            return True, True
        if vgpu_rules.pool_available(spec, t, vgpu_rules.pool_used(spec, gg.mdevs)) > 0:
            gg.mdevs.append(name)
            note(gg, False)
            return True, True
    return False, offered


def _fit_one_vf(gpus, note) -> tuple[bool, bool]:
    for gg in gpus:
        if gg.free_vf > 0:
            gg.free_vf -= 1
            note(gg, True)
            return True, True
    return False, any(gg.vfs_enabled for gg in gpus)


def _missing_reason(gpus: list[_FitGpu], name: str, kind: str, offered: bool, missing: int) -> str:
    if not offered:
        return f"no GPU in scope offers {name}" + (" with MIG mode on" if kind == "mig" else "")
    if kind == "mig":
        fragmented = []
        for gg in gpus:
            p = _resolve(gg, "mig", name, _RESOLVED) if gg.mig_on else None
            if p is None:
                continue
            geom = gg.model.mig
            layout = tuple(sorted(gg.layout))
            free_mem = geom.memory_slices - bin(mask_of(layout)).count("1")
            free_cs = geom.compute_slices - compute_used(geom, layout)
            if free_mem >= p.memory_slices and free_cs >= p.compute_slices:
                fragmented.append(gg.key)
        text = f"{missing} more {name} do not fit"
        if fragmented:
            shown = ", ".join(fragmented[:5]) + (" ..." if len(fragmented) > 5 else "")
            text += (f"; {len(fragmented)} GPU(s) have enough free slices but no aligned placement "
                     f"(fragmentation: {shown}; see 'gpuvirt plan --defrag --for {name}')")
        return text
    if kind == "vgpu":
        return (f"{missing} more {name} do not fit: the boards offering it are full, hold another type or size, "
                "or have no free VF")
    if kind == "mdev":
        return f"{missing} more {name} do not fit: the parents' resource pools are used up"
    return f"{missing} whole VF{'s' if missing != 1 else ''} more than are free would be needed"


__all__ = ["report", "build_document", "gpu_entry", "mig_figures", "detail_rows", "group_rows", "to_csv",
           "to_prometheus", "write_atomic", "parse_fit", "fit_requests", "DETAIL_COLUMNS", "GROUP_COLUMNS",
           "BY_CHOICES", "FORMATS"]
