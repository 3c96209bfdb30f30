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
import datetime as dt
import gc
import json
import operator
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from gpuvirt.context import Context
from gpuvirt.errors import ConfigError, GpuvirtError, NotFoundError, UsageError
from gpuvirt.model import vgpu as vgpu_rules
from gpuvirt.model.catalog import GpuModel, load_catalog
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
    health: dict[str, Any] | None = None                          # None: healthy; else since/reason/...
    sick: dict[int, dict[str, Any]] = field(default_factory=dict)  # unhealthy instance id -> facts


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
    from gpuvirt.service.report_fit import _classify, parse_fit

    requests = parse_fit(fit)
    for name, _ in requests:
        _classify(name)                 # refuse unknown names before touching the host or the database
    stale_after = _stale_after(ctx)
    now = _utcnow()
    with paused_gc():
        from gpuvirt.service.report_sources import _from_inventory, _from_live

        quiet = float(ctx.settings.policies.get("health_quiet_seconds", 3600))
        vm_devices = None
        if cluster or host is not None:
            source = "inventory"
            hosts, tenants, usage = _from_inventory(ctx, None if host is None else [host], now, quiet)
            if host is not None and not hosts:
                with ctx.inventory.unit() as uow:
                    known = [h[0] for h in uow.report_hosts()]
                shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
                raise NotFoundError(f"no host '{host}' in the inventory (hosts: {shown or 'none'})")
        else:
            source = "live"
            hosts, tenants, usage, vm_devices = _from_live(ctx, now, quiet)
        doc = build_document(hosts, tenants, usage, now=now, stale_after=stale_after, source=source, by=by,
                             vm_devices=vm_devices,
                             cluster=cluster, host_filter=host, requests=requests,
                             mig_policy=str(ctx.settings.policies.get("mig_placement", "frag-aware")),
                             vgpu_policy=str(ctx.settings.policies.get("vgpu_placement", "consolidate")))
        if doc["fit"] is not None and not doc["fit"]["fits"]:
            # why the refused ones were refused; the planner is imported only here (a plain report never is)
            from gpuvirt.service.refusals import analyse_fit

            counted = {h["host"] for h in doc["hosts"] if not h["stale"]}
            analyse_fit(ctx, doc["fit"], [h for h in hosts if h.id in counted], cluster=source == "inventory")
        return doc


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


def staleness(last_seen_at: dt.datetime | None, now: dt.datetime, stale_after: int | float) -> str | None:
    """Why a host's inventory rows are not current capacity, or None when they are.

    The one rule for ``report --cluster|--host`` and ``rebalance --cluster``.  A ``last_seen_at`` more than the
    stale window *ahead* of this clock is as untrustworthy as one that far behind: one of the two clocks is
    wrong, and a host whose clock runs fast would otherwise never go stale however long it is silent."""
    if last_seen_at is None:
        return "never seen"
    age = (now - last_seen_at).total_seconds()
    if age > stale_after:
        return f"not seen for {age:.0f}s"
    if -age > stale_after:
        return f"last seen {-age:.0f}s in the future (clock skew?)"
    return None


def skew_warning(host: str, reason: str | None) -> str | None:
    """The warning line for a host treated as stale because its timestamp is in the future, else None."""
    if reason is None or not reason.startswith("last seen"):
        return None
    return f"host {host}: {reason}; treated as stale"


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
    sick = f.sick
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
                # a GPU instance handed to a VM as such cannot also host a vGPU; every other one can, but a
                # new vGPU is not placed on an unhealthy one
                if (r[I_VM] is None and not (sick and r[I_ID] in sick)) or r[I_ID] in backing:
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
        "instances": {"total": len(insts), **counts, "missing": f.missing,
                      "unhealthy": sorted(r[I_ID] for r in insts if r[I_ID] in sick) if sick else [],
                      "by_kind": by_kind},
        "allocations": allocations,
        "health": {"state": "healthy"} if f.health is None else {"state": "unhealthy", **f.health},
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
    if f.health is not None or sick:
        _health_adjust(e, f, info, backing)
    return e


def _health_adjust(e: dict[str, Any], f: GpuFacts, info: "_ModelInfo", backing: set) -> None:
    """Take unhealthy devices out of what the entry says can be handed out now: all of an unhealthy GPU,
    and each unhealthy free instance.  The memoised figures are shared between entries, so they are copied,
    never changed."""
    if f.health is not None:
        if "placeable_now" in e:
            e["placeable_now"] = dict.fromkeys(e["placeable_now"], 0)
            e["free_instances"] = {}
        for key in ("vgpu_types", "mdev_types"):
            if key in e:
                e[key] = {n: {**t, "available": 0, "free": 0} for n, t in e[key].items()}
        if "vfs" in e:
            e["vfs"] = {**e["vfs"], "free": 0}
        if "whole_available" in e:
            e["whole_available"] = 0
        return
    sick_free: Counter = Counter()
    for r in f.insts:
        if r[I_ID] in f.sick and _state(r, backing) == "free":
            sick_free[info.item(r)] += 1
    for (kind, item), n in sick_free.items():
        if kind == "mig-profile" and "free_instances" in e:
            left = e["free_instances"].get(item, 0) - n
            e["free_instances"] = {k: v for k, v in {**e["free_instances"], item: left}.items() if v > 0}
        src = {"vgpu-type": "vgpu_types", "mdev-type": "mdev_types"}.get(kind)
        if src and item in e.get(src, {}):
            e[src] = {**e[src], item: {**e[src][item], "free": max(0, e[src][item]["free"] - n)}}
        if kind == "vf" and "vfs" in e:
            e["vfs"] = {**e["vfs"], "free": max(0, e["vfs"]["free"] - n)}


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
                   vgpu_policy: str, vm_devices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    totals = _new_totals()
    host_docs = []
    held: dict[str | None, list] = {}
    live_items: list[tuple[HostFacts, dict[str, Any], GpuFacts]] = []
    models: dict[str, GpuModel] = {}
    stale_hosts = 0
    warnings: list[str] = []
    for h in hosts:
        age = (now - h.last_seen_at).total_seconds() if h.last_seen_at is not None else None
        # a live report looked at the host a moment ago; only the inventory view can be out of date
        why = staleness(h.last_seen_at, now, stale_after) if source == "inventory" else None
        stale = why is not None
        if (w := skew_warning(h.id, why)) is not None:
            warnings.append(w)
        stale_hosts += stale
        acc = _Totals()
        entries = []
        for f in h.gpus:
            e = gpu_entry(f, stale)
            entries.append(e)
            acc.add(e)
            if f.model is not None:
                models[f.model.id] = f.model
            if not stale and f.health is None:
                live_items.append((h, e, f))        # --fit places nothing on stale hosts or unhealthy GPUs
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
                          "stale_reason": why, "totals": htot, "gpus": entries})
    totals["hosts"] = len(hosts) - stale_hosts
    totals["stale_hosts"] = stale_hosts
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": _iso(now),
        "source": source,
        "scope": {"cluster": bool(cluster), "host": host_filter, "by": by},
        "stale_after_seconds": stale_after,
        "warnings": warnings,
        "models": models_section(models.values()),
        "hosts": host_docs,
        "tenants": _tenant_entries(held, tenants, usage),
        "totals": totals,
        "vm_devices": vm_devices,
        "groups": None,
        "fit": None,
    }
    if requests:
        from gpuvirt.service.report_fit import fit_requests

        doc["fit"] = fit_requests(live_items, requests, mig_policy=mig_policy, vgpu_policy=vgpu_policy)
    if by != "gpu":
        from gpuvirt.service.report_rows import GROUP_COLUMNS, group_rows

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
            from gpuvirt.service.report_rows import to_csv

            return to_csv(doc).encode()
        if fmt == "prometheus":
            from gpuvirt.service.report_metrics import to_prometheus

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


# moved to report_rows / report_metrics / report_fit; still importable from here
_MOVED = {"_from_inventory": "report_sources", "_from_live": "report_sources", "DETAIL_COLUMNS": "report_rows", "GROUP_COLUMNS": "report_rows", "detail_rows": "report_rows",
          "group_rows": "report_rows", "to_csv": "report_rows", "to_prometheus": "report_metrics",
          "parse_fit": "report_fit", "fit_requests": "report_fit"}


def __getattr__(name: str) -> Any:
    mod = _MOVED.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"gpuvirt.service.{mod}"), name)


__all__ = ["report", "build_document", "gpu_entry", "mig_figures", "write_atomic", "render_machine", "BY_CHOICES",
           "FORMATS"]
