"""plan / apply: bring GPUs to the layout a profile describes.

Principles (docs/operator-guide.md explains them for operators):

* Always explicit placements: every GPU instance is created with ``CreateGpuInstanceWithPlacement`` at a
  start chosen here, so the result never depends on creation order (the driver's own choice does; the MIG
  User Guide's "create 3g first" known issue).
* No needless churn: instances that already match the layout are kept; the largest keepable set is chosen
  exactly (a GPU holds at most 7 instances, so all subsets are tried).
* Never destroy what is not ours to destroy: an instance allocated to a VM, or one gpuvirt did not create,
  blocks the plan unless ``--force``.
* All or nothing: on any failure every change of this run is undone in reverse order (same placements,
  same mdev UUIDs), and the error says what failed and whether the rollback was clean.
* Idempotent: a second apply of the same profile finds nothing to do.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from gpuvirt.context import Context
from gpuvirt.errors import ConflictError, GpuvirtError, ProfileError, ResetRequiredError, UsageError
from gpuvirt.inventory.models import MDEV, MIG, VF, VFIO_VGPU
from gpuvirt.model.mig import Placed, pack_counts
from gpuvirt.model.profile import resolve
from gpuvirt.service import hostview
from gpuvirt.service.hostview import GpuView, HostView
from gpuvirt.service import intent
from gpuvirt.service.instances import (
    gpu_lock,
    instance_fields_for_mig,
    instance_fields_for_vgpu,
    new_uuid,
    row_allocation,
    row_fields,
)

Progress = Callable[[str, int, int], None]


@dataclass
class Op:
    action: str            # mig-mode | reset-gpu | destroy-mig | create-mig | remove-mdev | create-mdev |
    #                        clear-vgpu | set-vgpu | enable-vfs | disable-vfs | record-vfs | set-vgpu-scheduler
    gpu: str
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        p = self.params
        if self.action == "mig-mode":
            return f"{'enable' if p['enable'] else 'disable'} MIG mode"
        if self.action == "reset-gpu":
            return "reset the GPU to activate the pending MIG mode"
        if self.action == "destroy-mig":
            return f"destroy GPU instance {p['profile_name']} at {p['start']}:{p['size']} (GI {p['gi_id']})"
        if self.action == "create-mig":
            return f"create GPU instance {p['profile_name']} at {p['start']}:{p['size']} (+ full compute instance)"
        if self.action == "remove-mdev":
            return f"remove mdev {p['uuid']} ({p['type_name'] or p['type_id']}) on {p['parent']}"
        if self.action == "create-mdev":
            where = p["parent"] or "the next free VF"
            return f"create mdev {p['type_name'] or p['type_id']} on {where}"
        if self.action == "clear-vgpu":
            return f"clear vGPU type {p['type_name'] or p['type_id']} on VF {p['vf']}"
        if self.action == "set-vgpu":
            return f"set vGPU type {p['type_name'] or p['type_id']} on {p['vf'] or 'the next free VF'}"
        if self.action == "enable-vfs":
            return f"enable {p['count']} SR-IOV VFs"
        if self.action == "disable-vfs":
            return "disable SR-IOV VFs"
        if self.action == "record-vfs":
            return f"record {p['count']} whole VFs as allocatable instances"
        if self.action == "set-vgpu-scheduler":
            ts = f", {p['timeslice_us']} us time slice" if p.get("timeslice_us") is not None else ""
            return f"set the vGPU scheduler to {p['policy']}{ts} (was {p.get('was_policy') or 'unknown'})"
        return self.action

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.action, "gpu": self.gpu, "description": self.describe(), **self.params}


@dataclass
class GpuPlan:
    gpu: GpuView
    gpu_row_id: int
    profile: str
    layout_text: str
    ops: list[Op] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mode: str = "vm"                   # what the GPU serves once the profile is applied
    mode_before: str | None = None     # what it serves now (None: no profile applied, takes both)

    def to_dict(self) -> dict[str, Any]:
        g = self.gpu
        return {"gpu": {"index": g.nvml_index, "address": g.address, "model": g.model.id if g.model else None,
                        "uuid": g.uuid},
                "profile": self.profile, "layout": self.layout_text, "operations": [o.to_dict() for o in self.ops],
                "keep": self.keep, "blocked": self.blocked, "notes": self.notes,
                "mode": {"current": self.mode_before, "new": self.mode}}


# --- planning -------------------------------------------------------------------------------------------------
def _rows_by_key(rows: Iterable[Any]) -> dict[tuple, Any]:
    out = {}
    for r in rows:
        if r.kind == MIG:
            out[("mig", r.profile_id, r.placement_start)] = r
        elif r.kind == MDEV:
            out[("mdev", r.mdev_uuid)] = r
        elif r.kind == VFIO_VGPU:
            out[("vfio", r.parent)] = r
        elif r.kind == VF:
            out[("vf", r.parent)] = r
    return out


def _blocker(row: Any, what: str, force: bool) -> str | None:
    if force:
        return None
    if row is None:
        return f"{what} was not created by gpuvirt (adopt it with 'gpuvirt reconcile --adopt' or use --force)"
    if row.allocation is not None:
        return f"{what} is allocated to VM {row.allocation.vm_name} (detach it first, or use --force)"
    return None


def plan_gpu(g: GpuView, gpu_row: Any, profile_name: str, layout: Any, rows: list[Any], force: bool,
             policy: str = "frag-aware") -> GpuPlan:
    plan = GpuPlan(gpu=g, gpu_row_id=gpu_row.id, profile=profile_name, layout_text=layout.describe())
    by_key = _rows_by_key(rows)
    model = g.model
    vgpu_types = {}
    if layout.vgpu and model and model.vgpu:
        vgpu_types = {model.vgpu.type_by_id(tid): n for tid, n in layout.vgpu.items()}
    sched = layout.vgpu_scheduler
    # the scheduler policy changes only while no vGPU exists on the GPU (NVML refuses it otherwise): every
    # vGPU that would stay is removed first and created again after it, or it blocks the plan
    sched_change = bool(sched is not None and model and model.vgpu and not sched.satisfied_by(g.vgpu_scheduler))
    if sched is not None and not layout.vgpu and model and model.vgpu:
        # an entry that sets only the policy leaves the GPU's time-sliced vGPUs as they are
        vgpu_types = {}
        for e in _existing_vgpus(g, model):
            t = _vgpu_type(model, e["type"])
            if t is not None and not t.mig_backed:
                vgpu_types[t] = vgpu_types.get(t, 0) + 1
    time_sliced = any(not t.mig_backed for t in vgpu_types)
    mig_enabled = layout.mig_enabled
    if mig_enabled is None and g.mig_capable and vgpu_types:
        mig_enabled = not time_sliced  # time-sliced vGPU needs MIG off; MIG-backed needs it on

    # --- vGPUs (NVIDIA): destroy first, create last ------------------------------------------------------------
    vgpu_destroy: list[Op] = []
    vgpu_create: list[Op] = []
    if model and model.vgpu and (layout.vgpu or layout.mig_enabled is not None or layout.mig_counts
                                 or layout.sriov_vfs is not None or sched_change):
        _plan_vgpu(plan, g, model, vgpu_types, by_key, force, vgpu_destroy, vgpu_create,
                   recreate_for=sched if sched_change else None)
    sched_ops: list[Op] = []
    if sched_change:
        assert sched is not None
        why = sched.problem_on(g.vgpu_scheduler)
        if why:
            plan.blocked.append(f"{g.label}: cannot set the {sched.describe()}: {why}")
        cur = g.vgpu_scheduler or {}
        sched_ops.append(Op("set-vgpu-scheduler", g.address, {
            "policy": sched.policy, "timeslice_us": sched.timeslice_us, "was_policy": cur.get("policy"),
            "was_timeslice_us": cur.get("timeslice_us")}))
    elif sched is not None:
        plan.keep.append(sched.describe())

    # --- generic mdev (GVT-g, samples) ----------------------------------------------------------------------------
    mdev_destroy: list[Op] = []
    mdev_create: list[Op] = []
    if model and model.mdev:
        _plan_generic_mdev(plan, g, layout.mdev or {}, by_key, force, mdev_destroy, mdev_create)

    # --- MIG ---------------------------------------------------------------------------------------------------------
    mig_destroy: list[Op] = []
    mig_mode: list[Op] = []
    mig_create: list[Op] = []
    if mig_enabled is not None and g.mig_capable and model and model.mig:
        _plan_mig(plan, g, layout.mig_counts if mig_enabled else {}, mig_enabled, by_key, force,
                  mig_destroy, mig_mode, mig_create, policy)
    elif mig_enabled and not g.mig_capable:
        if model and model.mig:
            # the catalog knows the board as MIG-capable: NVML, not the board, is missing
            plan.blocked.append(f"{g.label}: NVML reports no MIG state for it (is the NVIDIA driver loaded? "
                                "see 'gpuvirt discover')")
        else:
            plan.blocked.append(f"{g.label} does not support MIG")

    # --- SR-IOV (whole VFs, and VFs as vGPU parents) ------------------------------------------------------------
    vf_ops: list[Op] = []
    if layout.sriov_vfs is not None:
        _plan_whole_vfs(plan, g, layout.sriov_vfs, by_key, force, vf_ops)
    elif (vgpu_create and model and model.sriov and model.vgpu and model.vgpu.parent == "vf"
          and not g.sriov_num):
        vf_ops.append(Op("enable-vfs", g.address, {"count": model.sriov.total_vfs}))

    plan.ops = vgpu_destroy + mdev_destroy + mig_destroy + mig_mode + \
        [o for o in vf_ops if o.action == "disable-vfs"] + [o for o in vf_ops if o.action == "enable-vfs"] + \
        mig_create + sched_ops + vgpu_create + mdev_create + [o for o in vf_ops if o.action == "record-vfs"]
    return plan


def _plan_mig(plan: GpuPlan, g: GpuView, counts: dict[int, int], enabled: bool, by_key: dict, force: bool,
              destroy: list[Op], mode: list[Op], create: list[Op], policy: str = "frag-aware") -> None:
    geom = g.model.mig  # type: ignore[union-attr]
    host_gis = [] if not g.mig_current else list(g.gpu_instances)

    def row_of(gi: dict[str, Any]) -> Any:
        return by_key.get(("mig", gi["profile_id"], gi["placement"]["start"]))

    def label(gi: dict[str, Any]) -> str:
        return f"GPU instance {gi.get('profile_name') or gi['profile_id']} at " \
               f"{gi['placement']['start']}:{gi['placement']['size']}"

    untouchable = [gi for gi in host_gis if _blocker(row_of(gi), label(gi), force)]
    cands = [gi for gi in host_gis if gi["profile_id"] in counts]
    chosen: list[dict[str, Any]] | None = None
    placements: list[Placed] | None = None
    for size in range(len(cands), -1, -1):
        best = None
        for subset in itertools.combinations(cands, size):
            if not all(u in subset for u in untouchable):
                continue
            c = Counter(gi["profile_id"] for gi in subset)
            if any(c[p] > counts.get(p, 0) for p in c):
                continue
            fixed = [Placed(gi["placement"]["start"], gi["placement"]["size"], gi["profile_id"]) for gi in subset]
            rest = {p: n - c.get(p, 0) for p, n in counts.items() if n - c.get(p, 0) > 0}
            packed = pack_counts(geom, rest, fixed)
            if packed is None:
                continue
            score = (sum(1 for gi in subset if row_of(gi) is not None and row_of(gi).allocation is not None),)
            if best is None or score > best[0]:
                best = (score, list(subset), packed)
        if best is not None:
            chosen, placements = best[1], best[2]
            break
    if chosen is not None and placements:
        # among the layouts that work, take the planner's: new instances go where they leave the free
        # slices most useful (e.g. two 1g on an empty A100 do not split the halves a 3g or 4g needs)
        fixed = [Placed(gi["placement"]["start"], gi["placement"]["size"], gi["profile_id"]) for gi in chosen]
        placements = _planner_placements(geom, fixed, Counter(p.profile_id for p in placements), policy) \
            or placements
    if chosen is None:
        why = [_blocker(row_of(gi), label(gi), force) for gi in untouchable]
        plan.blocked.append("cannot reach the layout without destroying: " + "; ".join(w for w in why if w))
        return
    for gi in host_gis:
        if gi in chosen:
            plan.keep.append(f"{gi.get('profile_name') or gi['profile_id']} at "
                             f"{gi['placement']['start']}:{gi['placement']['size']} (GI {gi['id']})")
            continue
        row = row_of(gi)
        destroy.append(Op("destroy-mig", g.address, {
            "gi_id": gi["id"], "profile_id": gi["profile_id"],
            "profile_name": gi.get("profile_name") or geom.profile(gi["profile_id"]).name,
            "start": gi["placement"]["start"], "size": gi["placement"]["size"],
            "instance_id": row.id if row is not None else None}))
    want_current = bool(enabled)
    if bool(g.mig_current) != want_current or bool(g.mig_pending) != want_current:
        if g.mig_current != want_current and g.mig_pending == want_current:
            plan.notes.append("MIG mode change is pending a GPU reset")
        mode.append(Op("mig-mode", g.address, {"enable": want_current, "was": bool(g.mig_current)}))
    for p in placements or []:
        prof = geom.profile(p.profile_id)
        create.append(Op("create-mig", g.address, {"profile_id": prof.id, "profile_name": prof.name,
                                                   "start": p.start, "size": p.size}))


def _planner_placements(geom: Any, fixed: list[Placed], counts: Counter, policy: str) -> list[Placed] | None:
    """Place ``counts`` next to ``fixed`` one by one (largest first) with the placement policy; None when the
    greedy order gets stuck, in which case the exact packer's layout is used instead."""
    from gpuvirt.model.planner import GpuState, choose_placement

    state = GpuState("gpu", geom, tuple(sorted(fixed)))
    out: list[Placed] = []
    items = sorted(counts.elements(), key=lambda pid: (-geom.profile(pid).memory_slices,
                                                        -geom.profile(pid).compute_slices, pid))
    for pid in items:
        d = choose_placement([state], pid, policy)
        if d is None:
            return None
        pl = d.placed(geom.profile(pid).memory_slices)
        out.append(pl)
        state = state.with_layout(list(state.layout) + [pl])
    return sorted(out)


def _existing_vgpus(g: GpuView, model: Any) -> list[dict[str, Any]]:
    """NVIDIA vGPUs on this GPU as {kind, key, type_id(int), parent, uuid}."""
    out = []
    for d in g.mdev_devices:
        if d["type"].startswith("nvidia-") and d["type"][7:].isdigit():
            out.append({"kind": MDEV, "key": ("mdev", d["uuid"]), "type": int(d["type"][7:]), "parent": d["parent"],
                        "uuid": d["uuid"], "type_id": d["type"]})
    for vf in g.vfio_vfs:
        if vf["current_type"]:
            out.append({"kind": VFIO_VGPU, "key": ("vfio", vf["address"]), "type": vf["current_type"],
                        "parent": vf["address"], "uuid": None, "type_id": str(vf["current_type"])})
    return out


def _vgpu_type(model: Any, tid: int) -> Any:
    try:
        return model.vgpu.type_by_id(tid)
    except GpuvirtError:
        return None


def _type_name(model: Any, tid: int) -> str | None:
    t = _vgpu_type(model, tid)
    return t.name if t is not None else None


def _plan_vgpu(plan: GpuPlan, g: GpuView, model: Any, want: dict[Any, int], by_key: dict, force: bool,
               destroy: list[Op], create: list[Op], recreate_for: Any = None) -> None:
    """``recreate_for`` (a scheduler spec): no existing vGPU may stay - those the layout keeps are removed and
    created again after the policy change, and one that cannot be removed blocks the plan, naming its VM."""
    remaining = {t.id: n for t, n in want.items()}
    stays: list[str] = []
    existing = _existing_vgpus(g, model)
    # keep allocated / recorded ones first so churn never hits a VM's device
    existing.sort(key=lambda e: (by_key.get(e["key"]) is None,
                                 by_key.get(e["key"]) is not None and by_key[e["key"]].allocation is None))
    used_parents = set()
    for e in existing:
        row = by_key.get(e["key"])
        name = _type_name(model, e["type"]) or e["type_id"]
        if recreate_for is None and remaining.get(e["type"], 0) > 0:
            remaining[e["type"]] -= 1
            used_parents.add(e["parent"])
            plan.keep.append(f"vGPU {name} on {e['parent']}" + (f" ({e['uuid']})" if e["uuid"] else ""))
            continue
        why = _blocker(row, f"vGPU {name} on {e['parent']}", force)
        if why and recreate_for is not None:
            holder = f"VM {row.allocation.vm_name}" if row is not None and row.allocation is not None else \
                "no VM (created outside gpuvirt)"
            stays.append(f"vGPU {name} on {e['parent']} held by {holder}")
            continue
        if why:
            plan.blocked.append(why)
            continue
        if e["kind"] == MDEV:
            destroy.append(Op("remove-mdev", g.address, {"uuid": e["uuid"], "parent": e["parent"],
                                                         "type_id": e["type_id"], "type_name": name,
                                                         "instance_id": row.id if row else None}))
        else:
            destroy.append(Op("clear-vgpu", g.address, {"vf": e["parent"], "type_id": e["type_id"],
                                                        "type_name": name, "instance_id": row.id if row else None}))
    if stays:
        plan.blocked.append(f"{g.label}: the {recreate_for.describe()} can be set only while no vGPU exists on the "
                            f"GPU (NVML refuses it otherwise), and {len(stays)} would stay: {'; '.join(stays)} "
                            "(detach them from their VMs first, or use --force to remove them anyway)")
    elif recreate_for is not None and destroy and any(remaining.values()):
        plan.notes.append("the vGPUs on the GPU are removed before the scheduler change and created again after "
                          "it (NVML accepts the change only while no vGPU exists)")
    interface = g.interface or (model.vgpu.interface if model.vgpu else None)
    if model.vgpu.parent == "pf":
        free = [g.address]
    else:
        free_vfs = [vf for vf in (g.vfs or []) if vf not in used_parents]
        if interface == "vendor-vfio":
            busy = {vf["address"] for vf in g.vfio_vfs if vf["current_type"]}
            freed = {o.params["vf"] for o in destroy if o.action == "clear-vgpu"}
            free_vfs = [vf for vf in free_vfs if vf not in busy or vf in freed]
        else:
            busy = {d["parent"] for d in g.mdev_devices}
            freed = {o.params["parent"] for o in destroy if o.action == "remove-mdev"}
            free_vfs = [vf for vf in free_vfs if vf not in busy or vf in freed]
        free = free_vfs
    k = 0
    for tid, n in sorted(remaining.items()):
        for _ in range(n):
            parent = None
            if model.vgpu.parent == "pf":
                parent = g.address
            elif k < len(free):
                parent = free[k]
                k += 1
            name = _type_name(model, tid)
            if interface == "vendor-vfio":
                create.append(Op("set-vgpu", g.address, {"vf": parent, "type_id": str(tid), "type_name": name}))
            else:
                create.append(Op("create-mdev", g.address, {"parent": parent, "type_id": f"nvidia-{tid}",
                                                            "type_name": name, "uuid": None}))


def _plan_generic_mdev(plan: GpuPlan, g: GpuView, want: dict[str, int], by_key: dict, force: bool,
                       destroy: list[Op], create: list[Op]) -> None:
    remaining = dict(want)
    for d in sorted(g.mdev_devices, key=lambda d: by_key.get(("mdev", d["uuid"])) is None):
        row = by_key.get(("mdev", d["uuid"]))
        if remaining.get(d["type"], 0) > 0:
            remaining[d["type"]] -= 1
            plan.keep.append(f"mdev {d['type']} {d['uuid']}")
            continue
        why = _blocker(row, f"mdev {d['type']} {d['uuid']}", force)
        if why:
            plan.blocked.append(why)
            continue
        destroy.append(Op("remove-mdev", g.address, {"uuid": d["uuid"], "parent": d["parent"], "type_id": d["type"],
                                                     "type_name": None, "instance_id": row.id if row else None}))
    parent = g.mdev_parents[0] if g.mdev_parents else g.address
    for tid, n in sorted(remaining.items()):
        for _ in range(n):
            create.append(Op("create-mdev", g.address, {"parent": parent, "type_id": tid, "type_name": None,
                                                        "uuid": None}))


def _plan_whole_vfs(plan: GpuPlan, g: GpuView, count: int, by_key: dict, force: bool, ops: list[Op]) -> None:
    current = g.sriov_num or 0
    if current != count:
        if current:
            for vf in g.vfs:
                row = by_key.get(("vf", vf))
                if row is not None and row.allocation is not None and not force:
                    plan.blocked.append(f"VF {vf} is allocated to VM {row.allocation.vm_name} (detach it first, "
                                        "or use --force)")
            ops.append(Op("disable-vfs", g.address, {"count": current}))
        if count:
            ops.append(Op("enable-vfs", g.address, {"count": count}))
    else:
        plan.keep.append(f"{count} SR-IOV VFs enabled")
    recorded = {k[1] for k in by_key if k[0] == "vf"}
    if count and (current != count or len(recorded & set(g.vfs)) != count):
        ops.append(Op("record-vfs", g.address, {"count": count}))


# --- entry points ------------------------------------------------------------------------------------------------
def _resolve_for(spec: Any, g: GpuView) -> Any:
    """The layout ``spec`` gives GPU ``g``, or None when no entry of ``spec`` selects it (mig-parted leaves
    such GPUs alone).  A profile pinned to a model applies to every board of that model's file."""
    if g.model is None:
        raise ProfileError(f"{g.label}: unknown GPU model, cannot apply a profile")
    if spec.model and spec.model not in (g.model.id, g.model.family):
        raise ProfileError(f"profile '{spec.name}' is meant for {spec.model}, not for {g.label}")
    entry = spec.entry_for(g.model, g.nvml_index, g.subsystem)
    if entry is None:
        return None
    return resolve(entry, g.model)


def make_plans(ctx: Context, profile_name: str, selector: str, *, force: bool = False,
               view: HostView | None = None, untouched: list[str] | None = None) -> tuple[Any, list[GpuPlan]]:
    """Plans for the selected GPUs that an entry of the profile selects.

    With ``--gpu all`` a GPU no entry selects is left alone (its label goes to ``untouched``), as mig-parted
    does; a GPU named explicitly (index, address, UUID, model) that no entry selects is refused - applying a
    profile to a GPU its device filters exclude is never adapted."""
    from gpuvirt.service.profiles import get_profile

    spec = get_profile(ctx, profile_name)
    view = view or hostview.snapshot(ctx)
    targets = view.select(selector)
    explicit = (selector or "").strip().lower() != "all"
    plans = []
    with ctx.inventory.unit(write=True, action="plan") as uow:
        rows = hostview.record(ctx, view, uow)
        for g in targets:
            layout = _resolve_for(spec, g)
            if layout is None:
                if explicit:
                    raise ProfileError(f"profile '{spec.name}' has no entry for {g.label}: " + _why_no_entry(spec, g))
                if untouched is not None:
                    untouched.append(g.label)
                continue
            inst = uow.instances(ctx.settings.host_id, gpu_id=rows[g.address].id)
            p = plan_gpu(g, rows[g.address], spec.name, layout, inst, force,
                         policy=ctx.settings.policies.get("mig_placement", "frag-aware"))
            _plan_mode(p, rows[g.address], spec.mode, uow.gpu_allocations(rows[g.address].id), inst)
            plans.append(p)
    return spec, plans


def _plan_mode(plan: GpuPlan, gpu_row: Any, mode: str, allocs: list[Any], rows: list[Any]) -> None:
    """A GPU's mode (vm | containers) changes only through apply, and never under an allocated device: a VM's
    vGPU or a container's MIG device would be left on a GPU that no longer serves its kind (--force does not
    override this: detach first).  A whole GPU handed to a container blocks any change of its layout."""
    from gpuvirt.inventory.models import GPU

    plan.mode, plan.mode_before = mode, gpu_row.mode
    if gpu_row.mode != mode:
        plan.notes.append(f"mode: {gpu_row.mode or 'none (takes both)'} -> {mode}")
        if gpu_row.mode is None:
            # a GPU without a profile served both kinds: only devices of the other kind are in the way
            keep = "container" if mode == "containers" else "vm"
            allocs = [a for a in allocs if (a.consumer or "vm") != keep]
        if allocs:
            holders = sorted({f"{a.consumer or 'vm'} {a.vm_name}" for a in allocs})
            plan.blocked.append(f"{plan.gpu.label}: its mode changes from {gpu_row.mode or 'none'} to {mode} while "
                                f"devices on it are allocated ({', '.join(holders[:5])}); detach them first")
    whole = [r for r in rows if r.kind == GPU and r.allocation is not None]
    if whole and plan.ops:
        plan.blocked.append(f"{plan.gpu.label} is handed whole to container {whole[0].allocation.vm_name}; detach it "
                            "first")


def _why_no_entry(spec: Any, g: GpuView) -> str:
    pci = g.model.pci_device_filter if g.model is not None else None
    parts = []
    for i, e in enumerate(spec.entries):
        if not e.matches_model(g.model, g.subsystem):
            parts.append(f"entry {i + 1} selects {','.join(e.device_filter)}")
        elif not e.for_board(g.model):
            parts.append(f"entry {i + 1} names vGPU types of another board ({', '.join(e.vgpu)})")
        elif e.devices != "all":
            parts.append(f"entry {i + 1} selects GPUs {','.join(map(str, e.devices))}")
    return f"the GPU is {pci or 'a device without a PCI id'}" + (f"; {'; '.join(parts)}" if parts else "")


def plan(ctx: Context, profile_name: str, selector: str, *, force: bool = False) -> dict[str, Any]:
    untouched: list[str] = []
    spec, plans = make_plans(ctx, profile_name, selector, force=force, untouched=untouched)
    return {"profile": spec.name, "mode": spec.mode, "gpus": [p.to_dict() for p in plans], "untouched": untouched,
            "changes": sum(len(p.ops) for p in plans), "blocked": [b for p in plans for b in p.blocked]}


@dataclass
class ApplyResult:
    profile: str
    applied: list[dict[str, Any]]
    pending_reset: list[str]
    unchanged: list[str]
    untouched: list[str] = field(default_factory=list)    # GPUs no entry of the profile selects (left as they are)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "gpus": self.applied, "pending_reset": self.pending_reset,
                "unchanged": self.unchanged, "untouched": self.untouched}


def apply(ctx: Context, profile_name: str, selector: str, *, force: bool = False, dry_run: bool = False,
          reset_gpu: bool | None = None, progress: Progress | None = None) -> ApplyResult | dict[str, Any]:
    from gpuvirt.service.profiles import ensure_stored

    if not dry_run:
        ensure_stored(ctx, profile_name)  # a built-in profile becomes a row that GPUs can reference
    addresses = hostview.lock_addresses(ctx)
    allow_reset = ctx.settings.policies.get("reset_gpu", False) if reset_gpu is None else reset_gpu
    with contextlib.ExitStack() as locks:
        for a in addresses:
            locks.enter_context(gpu_lock(ctx, a))
        if not dry_run:
            # a change a crash left unfinished on these GPUs is settled before a new one is planned over it
            intent.require_settled(ctx, set(addresses))
        view = hostview.snapshot(ctx)  # the picture apply works from: nobody else can change these GPUs now
        untouched: list[str] = []
        spec, plans = make_plans(ctx, profile_name, selector, force=force, view=view, untouched=untouched)
        blocked = [b for p in plans for b in p.blocked]
        if blocked:
            raise ConflictError(f"apply {spec.name} refused: " + "; ".join(blocked))
        if dry_run:
            return {"profile": spec.name, "dry_run": True, "gpus": [p.to_dict() for p in plans],
                    "untouched": untouched}
        result = ApplyResult(profile=spec.name, applied=[], pending_reset=[],
                             unchanged=[p.gpu.address for p in plans if not p.ops], untouched=untouched)
        changing = [p for p in plans if p.ops]
        gpu_ids = {p.gpu.address: p.gpu_row_id for p in plans}
        if not changing:
            with ctx.inventory.unit(write=True) as uow:
                _close_marks(uow, spec.name, gpu_ids, set(), spec.mode)
                uow.event("apply", target=spec.name, detail={"gpus": [p.gpu.address for p in plans], "changed": 0,
                                                              "pending_reset": []})
            return result
        with ctx.inventory.unit(write=True, action="record the apply plan") as uow:
            before = {p.gpu.address: _marks(uow, p.gpu_row_id) for p in plans}
            steps = [s for p in changing for s in _steps_for(ctx, p, uow, allow_reset)]
            run = intent.Run.begin(ctx, "apply", gpus=[p.gpu.address for p in changing], steps=steps,
                                   target={"profile": spec.name, "gpus": gpu_ids, "mode": spec.mode}, before=before,
                                   uow=uow)
        labels = {p.gpu.address: p.gpu.label for p in plans}
        order = [p.gpu.address for p in changing]
        if progress:
            def step_progress(step: dict[str, Any], i: int, n: int) -> None:
                progress(labels[step["gpu"]], order.index(step["gpu"]), len(order))
            run.progress = step_progress
        try:
            pending = run.run_all()
        except GpuvirtError as exc:
            failed_gpu = next((s["gpu"] for s in run.steps if s["state"] == intent.PENDING), order[-1])

            def incomplete(uow: Any) -> None:
                # every GPU of this apply counts as unfinished until reconcile settles the intent
                for p in changing:
                    row = uow.gpu(p.gpu_row_id)
                    row.desired_profile, row.profile_state = spec.name, ROLLBACK_INCOMPLETE
                    row.mode = spec.mode

            failures = run.abort(exc, on_clean=lambda uow: _restore_marks(uow, before), on_incomplete=incomplete)
            with ctx.inventory.unit(write=True) as uow:
                uow.event("apply", target=spec.name, result="failed",
                          detail={"gpu": failed_gpu, "error": str(exc), "rollback_failures": failures})
            state = ("rolled back to the previous layout" if not failures else
                     f"ROLLBACK INCOMPLETE ({len(failures)} step(s) could not be undone; first: {failures[0]}) - "
                     f"run 'gpuvirt reconcile' (it finishes applying {spec.name}, or rolls it back if that "
                     "cannot be done)")
            err = ApplyFailedError(f"apply {spec.name} failed on {labels.get(failed_gpu, failed_gpu)}: {exc}; "
                                   f"{state}", gpu=failed_gpu, rollback_failures=failures or None)
            err.exit_code = exc.exit_code
            raise err from exc

        def close(uow: Any) -> None:
            _close_marks(uow, spec.name, gpu_ids, pending, spec.mode)
            uow.event("apply", target=spec.name, detail={"gpus": [p.gpu.address for p in plans],
                                                          "changed": len(changing), "pending_reset": sorted(pending)})

        run.finish(on_close=close)
        _sync_cdi(ctx)
        if progress:
            progress("done", len(order), len(order))
        result.pending_reset = [a for a in order if a in pending]
        for p in changing:
            result.applied.append({"gpu": p.gpu.address, "index": p.gpu.nvml_index,
                                   "operations": [o.to_dict() for o in p.ops],
                                   "state": "pending-reset" if p.gpu.address in pending else "applied"})
    if result.pending_reset:
        raise ResetRequiredError(
            f"MIG mode change on {', '.join(result.pending_reset)} is pending a GPU reset (processes or VMs hold the "
            f"GPU): stop them and re-run 'gpuvirt apply {spec.name} --gpu {selector} --reset-gpu', or reboot and "
            "run 'gpuvirt reconcile'", pending=result.pending_reset, applied=[a["gpu"] for a in result.applied])
    return result


def _sync_cdi(ctx: Context) -> None:
    """A re-layout may have destroyed (--force) a container's MIG device: its CDI spec goes now, not at the next
    reconcile.  Best effort: the apply itself is complete, and reconcile repeats this."""
    from gpuvirt.service import containers

    with contextlib.suppress(GpuvirtError):
        containers.sync(ctx, actor="apply")


class ApplyFailedError(GpuvirtError):
    """An apply step failed; the exit status is the failed step's."""


ROLLBACK_INCOMPLETE = "rollback-incomplete"


def _marks(uow: Any, gpu_id: int) -> dict[str, Any]:
    row = uow.gpu(gpu_id)
    return {"gpu_id": gpu_id, "desired_profile": row.desired_profile, "profile_state": row.profile_state,
            "mode": row.mode}


def _restore_marks(uow: Any, before: dict[str, Any]) -> None:
    """Back on the previous layout: each GPU keeps the profile it had, so that reconcile (which derives MIG mode
    from the desired profile) does not act on one that never took."""
    for m in before.values():
        row = uow.gpu(m["gpu_id"])
        row.desired_profile, row.profile_state = m["desired_profile"], m["profile_state"]
        if "mode" in m:
            row.mode = m["mode"]


def _close_marks(uow: Any, profile: str, gpu_ids: dict[str, int], pending: set[str], mode: str = "vm") -> None:
    for addr, gpu_id in gpu_ids.items():
        row = uow.gpu(gpu_id)
        row.desired_profile = profile
        row.profile_state = "pending-reset" if addr in pending else "applied"
        row.mode = mode


def _recovered_forward(uow: Any, row: Any, pending: set[str]) -> None:
    t = row.target
    _close_marks(uow, t["profile"], {a: int(i) for a, i in t["gpus"].items()}, pending, t.get("mode") or "vm")
    uow.event("apply", target=t["profile"], detail={"finished_by": "reconcile", "pending_reset": sorted(pending)})


def _recovered_back(uow: Any, row: Any, pending: set[str]) -> None:
    _restore_marks(uow, row.before)
    uow.event("apply", target=row.target.get("profile"), result="rolled-back", detail={"rolled_back_by": "reconcile"})


intent.register_kind("apply", forward=_recovered_forward, back=_recovered_back)


# --- the plan as journal steps -------------------------------------------------------------------------------------
def _steps_for(ctx: Context, p: GpuPlan, uow: Any, allow_reset: bool) -> list[dict[str, Any]]:
    """The plan's operations as intent steps, every choice made now (mdev UUIDs) except the VF a new vGPU goes
    on, which is chosen (and recorded) right before it is created."""
    g, gid, idx = p.gpu, p.gpu_row_id, p.gpu.nvml_index
    addr = g.address
    mode_change = any(o.action == "mig-mode" for o in p.ops)
    steps: list[dict[str, Any]] = []

    def row_of(q: dict[str, Any]) -> Any:
        return uow.instance(q["instance_id"]) if q.get("instance_id") else None

    for op in p.ops:
        a, q = op.action, op.params
        if a == "destroy-mig":
            row = row_of(q)
            steps.append(intent.mig_step(addr, gid, idx, q["profile_id"], q["start"], q["size"], present=False,
                                         fields=row_fields(row) if row else None,
                                         alloc=row_allocation(row) if row else None,
                                         label=q.get("profile_name")))
        elif a == "create-mig":
            fields = instance_fields_for_mig(g.model, q["profile_id"], q["start"], "profile")
            steps.append(intent.mig_step(addr, gid, idx, q["profile_id"], q["start"], q["size"], present=True,
                                         fields=fields, needs_mig=True))
        elif a == "mig-mode":
            steps.append(intent.mig_mode_step(addr, idx, q["enable"], was_current=bool(g.mig_current),
                                              was_pending=bool(g.mig_pending), allow_reset=allow_reset))
        elif a == "remove-mdev":
            row = row_of(q)
            steps.append(intent.mdev_step(addr, gid, q["parent"], q["type_id"], q["uuid"], present=False,
                                          fields=row_fields(row) if row else None,
                                          alloc=row_allocation(row) if row else None,
                                          backing=_backing_key(uow, row)))
        elif a == "create-mdev":
            uuid = new_uuid()
            fields = instance_fields_for_vgpu(g.model, MDEV, q["type_id"], q.get("type_name"), q["parent"] or "",
                                              uuid, "profile")
            _mig_backed_slices(g, q["type_id"], fields)
            steps.append(intent.mdev_step(addr, gid, q["parent"], q["type_id"], uuid, present=True, fields=fields,
                                          needs_mig=mode_change or bool(fields.get("compute_slices"))))
        elif a == "clear-vgpu":
            row = row_of(q)
            steps.append(intent.vgpu_step(addr, gid, q["vf"], int(q["type_id"]), present=False,
                                          fields=row_fields(row) if row else None,
                                          alloc=row_allocation(row) if row else None,
                                          backing=_backing_key(uow, row)))
        elif a == "set-vgpu":
            fields = instance_fields_for_vgpu(g.model, VFIO_VGPU, str(q["type_id"]), q.get("type_name"),
                                              q["vf"] or "", None, "profile")
            _mig_backed_slices(g, q["type_id"], fields)
            steps.append(intent.vgpu_step(addr, gid, q["vf"], int(q["type_id"]), present=True, fields=fields,
                                          needs_mig=mode_change or bool(fields.get("compute_slices"))))
        elif a == "set-vgpu-scheduler":
            steps.append(intent.vgpu_scheduler_step(addr, idx, q["policy"], q["timeslice_us"],
                                                    was_policy=q["was_policy"], was_timeslice_us=q["was_timeslice_us"],
                                                    needs_mig=mode_change))
        elif a == "enable-vfs":
            steps.append(intent.vfs_step(addr, gid, q["count"], present=True))
        elif a == "disable-vfs":
            rows = uow.instances(ctx.settings.host_id, gpu_id=gid, kinds=[VF])
            snaps = [{"parent": r.parent, "origin": r.origin, "allocation": row_allocation(r)} for r in rows]
            steps.append(intent.vfs_step(addr, gid, q["count"], present=False, whole=True, snaps=snaps,
                                         memory_mib=_vf_memory(g, q["count"])))
        elif a == "record-vfs":
            existing = [r.parent for r in uow.instances(ctx.settings.host_id, gpu_id=gid, kinds=[VF])]
            steps.append(intent.record_vfs_step(addr, gid, _vf_memory(g, q["count"]), existing))
        else:  # pragma: no cover - plan and execution are written together
            raise UsageError(f"unknown operation {a}")
    return steps


def _backing_key(uow: Any, row: Any) -> tuple[int, int] | None:
    if row is None or row.backing_instance_id is None:
        return None
    from gpuvirt.errors import NotFoundError

    try:
        gi = uow.instance(row.backing_instance_id)
    except NotFoundError:
        return None
    return (gi.profile_id, gi.placement_start)


def _mig_backed_slices(g: GpuView, type_id: Any, fields: dict[str, Any]) -> None:
    tid = str(type_id)
    tid = tid[7:] if tid.startswith("nvidia-") else tid
    if not (tid.isdigit() and g.model and g.model.vgpu and g.model.mig):
        return
    with contextlib.suppress(GpuvirtError):
        vt = g.model.vgpu.type_by_id(int(tid))
        if vt.mig_backed:
            fields["compute_slices"] = g.model.mig.profile(vt.gpu_instance_profile_id).compute_slices  # type: ignore[arg-type]


def _vf_memory(g: GpuView, count: int) -> int | None:
    if g.model and g.model.sriov and g.model.memory_mib and count:
        return g.model.memory_mib // max(count, 1)
    return None


__all__ = ["plan", "apply", "make_plans", "plan_gpu", "Op", "GpuPlan", "ApplyResult"]
