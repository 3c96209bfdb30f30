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
from gpuvirt.service import health, hostview
from gpuvirt.service.hostview import GpuView, HostView
from gpuvirt.service.instances import (
    Journal,
    create_mig,
    destroy_mig,
    gpu_lock,
    instance_fields_for_mig,
    instance_fields_for_vgpu,
    new_uuid,
    vf_fields,
)

Progress = Callable[[str, int, int], None]


@dataclass
class Op:
    action: str            # mig-mode | reset-gpu | destroy-mig | create-mig | remove-mdev | create-mdev |
    #                        clear-vgpu | set-vgpu | enable-vfs | disable-vfs | record-vfs
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

    def to_dict(self) -> dict[str, Any]:
        g = self.gpu
        return {"gpu": {"index": g.nvml_index, "address": g.address, "model": g.model.id if g.model else None,
                        "uuid": g.uuid},
                "profile": self.profile, "layout": self.layout_text, "operations": [o.to_dict() for o in self.ops],
                "keep": self.keep, "blocked": self.blocked, "notes": self.notes}


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
    time_sliced = any(not t.mig_backed for t in vgpu_types)
    mig_enabled = layout.mig_enabled
    if mig_enabled is None and g.mig_capable and vgpu_types:
        mig_enabled = not time_sliced  # time-sliced vGPU needs MIG off; MIG-backed needs it on

    # --- vGPUs (NVIDIA): destroy first, create last ------------------------------------------------------------
    vgpu_destroy: list[Op] = []
    vgpu_create: list[Op] = []
    if model and model.vgpu and (layout.vgpu or layout.mig_enabled is not None or layout.mig_counts
                                 or layout.sriov_vfs is not None):
        _plan_vgpu(plan, g, model, vgpu_types, by_key, force, vgpu_destroy, vgpu_create)

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
        mig_create + vgpu_create + mdev_create + [o for o in vf_ops if o.action == "record-vfs"]
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


def _type_name(model: Any, tid: int) -> str | None:
    try:
        return model.vgpu.type_by_id(tid).name
    except GpuvirtError:
        return None


def _plan_vgpu(plan: GpuPlan, g: GpuView, model: Any, want: dict[Any, int], by_key: dict, force: bool,
               destroy: list[Op], create: list[Op]) -> None:
    remaining = {t.id: n for t, n in want.items()}
    existing = _existing_vgpus(g, model)
    # keep allocated / recorded ones first so churn never hits a VM's device
    existing.sort(key=lambda e: (by_key.get(e["key"]) is None,
                                 by_key.get(e["key"]) is not None and by_key[e["key"]].allocation is None))
    used_parents = set()
    for e in existing:
        row = by_key.get(e["key"])
        name = _type_name(model, e["type"]) or e["type_id"]
        if remaining.get(e["type"], 0) > 0:
            remaining[e["type"]] -= 1
            used_parents.add(e["parent"])
            plan.keep.append(f"vGPU {name} on {e['parent']}" + (f" ({e['uuid']})" if e["uuid"] else ""))
            continue
        why = _blocker(row, f"vGPU {name} on {e['parent']}", force)
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
    if g.model is None:
        raise ProfileError(f"{g.label}: unknown GPU model, cannot apply a profile")
    entry = spec.entry_for(g.model, g.nvml_index)
    if entry is None:
        raise ProfileError(f"profile '{spec.name}' has no entry for {g.label}")
    if spec.model and spec.model != g.model.id:
        raise ProfileError(f"profile '{spec.name}' is meant for {spec.model}, not for {g.label}")
    return resolve(entry, g.model)


def make_plans(ctx: Context, profile_name: str, selector: str, *, force: bool = False,
               view: HostView | None = None) -> tuple[Any, list[GpuPlan]]:
    from gpuvirt.service.profiles import get_profile

    spec = get_profile(ctx, profile_name)
    view = view or hostview.snapshot(ctx)
    targets = view.select(selector)
    plans = []
    with ctx.inventory.unit(write=True, action="plan") as uow:
        rows = hostview.record(ctx, view, uow)
        for g in targets:
            layout = _resolve_for(spec, g)
            inst = uow.instances(ctx.settings.host_id, gpu_id=rows[g.address].id)
            plans.append(plan_gpu(g, rows[g.address], spec.name, layout, inst, force,
                                  policy=ctx.settings.policies.get("mig_placement", "frag-aware")))
    return spec, plans


def plan(ctx: Context, profile_name: str, selector: str, *, force: bool = False) -> dict[str, Any]:
    spec, plans = make_plans(ctx, profile_name, selector, force=force)
    return {"profile": spec.name, "gpus": [p.to_dict() for p in plans],
            "changes": sum(len(p.ops) for p in plans), "blocked": [b for p in plans for b in p.blocked]}


@dataclass
class ApplyResult:
    profile: str
    applied: list[dict[str, Any]]
    pending_reset: list[str]
    unchanged: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "gpus": self.applied, "pending_reset": self.pending_reset,
                "unchanged": self.unchanged}


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
        view = hostview.snapshot(ctx)  # the picture apply works from: nobody else can change these GPUs now
        spec, plans = make_plans(ctx, profile_name, selector, force=force, view=view)
        blocked = [b for p in plans for b in p.blocked]
        if blocked:
            raise ConflictError(f"apply {spec.name} refused: " + "; ".join(blocked))
        if dry_run:
            return {"profile": spec.name, "dry_run": True, "gpus": [p.to_dict() for p in plans]}
        journal = Journal(ctx)
        befores = {p.gpu_row_id: _marked(ctx, p) for p in plans}
        result = ApplyResult(profile=spec.name, applied=[], pending_reset=[], unchanged=[])
        total = len(plans)
        for i, p in enumerate(plans):
            if progress:
                progress(p.gpu.label, i, total)
            if not p.ops:
                result.unchanged.append(p.gpu.address)
                _mark(ctx, p, "applied")
                continue
            try:
                pending = _execute(ctx, p, journal, allow_reset)
            except GpuvirtError as exc:
                failures = journal.rollback()
                # the journal spans every GPU of this apply: the rollback undid the GPUs done before this one too
                # undo steps do not say reliably which GPU they belong to (a vGPU's names its VF): after an
                # incomplete rollback every GPU of this apply counts as unfinished, and reconcile completes the
                # profile the operator asked for on each of them
                for done in plans[:i + 1]:
                    if failures:
                        _mark(ctx, done, "rollback-incomplete", str(exc))
                    else:
                        # back on the previous layout: the GPU keeps the profile it had, so that reconcile
                        # (which derives MIG mode from the desired profile) does not act on one that never took
                        _mark(ctx, done, befores[done.gpu_row_id][1], profile=befores[done.gpu_row_id][0])
                with ctx.inventory.unit(write=True) as uow:
                    uow.event("apply", target=spec.name, result="failed",
                              detail={"gpu": p.gpu.address, "error": str(exc), "rollback_failures": failures})
                state = ("rolled back to the previous layout" if not failures else
                         "ROLLBACK INCOMPLETE: " + "; ".join(failures) + " - run 'gpuvirt reconcile' (it finishes "
                         f"applying {spec.name}) or apply another profile")
                err = ApplyFailedError(f"apply {spec.name} failed on {p.gpu.label}: {exc}; {state}",
                                       gpu=p.gpu.address, rollback_failures=failures or None)
                err.exit_code = exc.exit_code
                raise err from exc
            if pending:
                result.pending_reset.append(p.gpu.address)
                _mark(ctx, p, "pending-reset")
            else:
                _mark(ctx, p, "applied")
            result.applied.append({"gpu": p.gpu.address, "index": p.gpu.nvml_index,
                                   "operations": [o.to_dict() for o in p.ops],
                                   "state": "pending-reset" if pending else "applied"})
        if progress:
            progress("done", total, total)
        with ctx.inventory.unit(write=True) as uow:
            uow.event("apply", target=spec.name, detail={"gpus": [p.gpu.address for p in plans],
                                                          "changed": len(result.applied),
                                                          "pending_reset": result.pending_reset})
    if result.pending_reset:
        raise ResetRequiredError(
            f"MIG mode change on {', '.join(result.pending_reset)} is pending a GPU reset (processes or VMs hold the "
            f"GPU): stop them and re-run 'gpuvirt apply {spec.name} --gpu {selector} --reset-gpu', or reboot and "
            "run 'gpuvirt reconcile'", pending=result.pending_reset, applied=[a["gpu"] for a in result.applied])
    return result


class ApplyFailedError(GpuvirtError):
    """An apply step failed; the exit status is the failed step's."""


def _mark(ctx: Context, p: GpuPlan, state: str | None, error: str | None = None, *,
          profile: str | None | type = ...) -> None:
    with ctx.inventory.unit(write=True) as uow:
        row = uow.gpu(p.gpu_row_id)
        row.desired_profile = p.profile if profile is ... else profile
        row.profile_state = state


def _marked(ctx: Context, p: GpuPlan) -> tuple[str | None, str | None]:
    with ctx.inventory.unit() as uow:
        row = uow.gpu(p.gpu_row_id)
        return row.desired_profile, row.profile_state


# --- execution --------------------------------------------------------------------------------------------------
def _execute(ctx: Context, p: GpuPlan, journal: Journal, allow_reset: bool) -> bool:
    g = p.gpu
    pending = False
    host = ctx.host
    for op in p.ops:
        a, q = op.action, op.params
        if pending and a in ("create-mig",):
            continue  # the GPU must be reset before instances can be created
        if a == "destroy-mig":
            _destroy_mig(ctx, journal, g, p.gpu_row_id, q)
        elif a == "create-mig":
            _create_mig(ctx, journal, g, p.gpu_row_id, q["profile_id"], q["start"])
        elif a == "mig-mode":
            pending = _mig_mode(ctx, journal, g, q["enable"], allow_reset)
        elif a == "remove-mdev":
            _remove_mdev(ctx, journal, g, p.gpu_row_id, q)
        elif a == "create-mdev":
            parent = q["parent"] or _next_free_vf(ctx, g, "mdev")
            _create_mdev(ctx, journal, g, p.gpu_row_id, parent, q["type_id"], q.get("uuid") or new_uuid(),
                         origin="profile")
        elif a == "clear-vgpu":
            _clear_vgpu(ctx, journal, g, p.gpu_row_id, q)
        elif a == "set-vgpu":
            vf = q["vf"] or _next_free_vf(ctx, g, "vendor-vfio")
            _set_vgpu(ctx, journal, g, p.gpu_row_id, vf, int(q["type_id"]), origin="profile")
        elif a == "enable-vfs":
            before = host.sriov_state(g.address)[1]
            host.enable_vfs(g.address, q["count"])
            if before == 0:
                journal.done.append(_undo("disable VFs", lambda: host.disable_vfs(g.address)))
        elif a == "disable-vfs":
            _disable_whole_vfs(ctx, journal, g, p.gpu_row_id, q["count"])
        elif a == "record-vfs":
            _record_vfs(ctx, g, p.gpu_row_id)
        else:  # pragma: no cover - plan and execution are written together
            raise UsageError(f"unknown operation {a}")
    return pending


def _undo(desc: str, fn: Callable[[], None]):
    from gpuvirt.service.instances import Undo

    return Undo(desc, fn)


def _next_free_vf(ctx: Context, g: GpuView, interface: str) -> str:
    view = hostview.snapshot(ctx)
    fresh = view.by_address(g.address)
    if fresh is None:
        raise ConflictError(f"{g.label} disappeared during apply")
    if interface == "vendor-vfio":
        for vf in fresh.vfio_vfs:
            if not vf["current_type"]:
                return vf["address"]
    else:
        busy = {d["parent"] for d in fresh.mdev_devices}
        for vf in fresh.vfs:
            if vf not in busy and vf in fresh.mdev_parents:
                return vf
    raise ConflictError(f"no free VF left on {g.label}")


def _create_mig(ctx: Context, journal: Journal, g: GpuView, gpu_id: int, profile_id: int, start: int,
                origin: str = "profile", persistent: bool = True) -> int:
    fields = instance_fields_for_mig(g.model, profile_id, start, origin, persistent)
    index = g.nvml_index
    assert index is not None

    def undo(inst_id: int) -> None:
        with ctx.inventory.unit() as uow:
            row = uow.instance(inst_id)
            gi_id = row.gi_id
        journal_inner = Journal(ctx, journal.actor)
        journal_inner.destroy(inst_id, lambda: destroy_mig(ctx, index, gi_id),
                              f"GPU instance {fields['profile_name']} at {start} on {g.label}")

    return journal.create(gpu_id, fields, lambda: create_mig(ctx, index, profile_id, start),
                          f"GPU instance {fields['profile_name']} at {start} on {g.label}", undo)


def _destroy_mig(ctx: Context, journal: Journal, g: GpuView, gpu_id: int, q: dict[str, Any]) -> None:
    index = g.nvml_index
    assert index is not None

    def undo(snap: dict[str, Any]) -> None:
        inner = Journal(ctx, journal.actor)
        fields = instance_fields_for_mig(g.model, q["profile_id"], q["start"], snap.get("origin", "adopted"),
                                         snap.get("persistent", True))
        inst_id = inner.create(gpu_id, fields, lambda: create_mig(ctx, index, q["profile_id"], q["start"]),
                               f"GPU instance {q['profile_name']} at {q['start']} on {g.label}")
        _restore_allocation(ctx, inst_id, snap)

    journal.destroy(q.get("instance_id"), lambda: destroy_mig(ctx, index, q["gi_id"]),
                    f"GPU instance {q['profile_name']} at {q['start']} on {g.label}", undo)


def _restore_allocation(ctx: Context, inst_id: int, snap: dict[str, Any]) -> None:
    alloc = snap.get("allocation")
    if not alloc:
        return
    with ctx.inventory.unit(write=True) as uow:
        uow.allocate(uow.instance(inst_id), vm_name=alloc["vm_name"], vm_uuid=alloc["vm_uuid"],
                     tenant=alloc["tenant"], persistent=alloc["persistent"])


def _mig_mode(ctx: Context, journal: Journal, g: GpuView, enable: bool, allow_reset: bool) -> bool:
    """Set MIG mode; returns True when the change is left pending a reset."""
    index = g.nvml_index
    assert index is not None
    nvml = ctx.host.nvml()
    before_current = g.mig_current
    current, pending, status = nvml.set_mig_mode(index, enable)
    if current == enable:
        if before_current != enable:
            journal.done.append(_undo(f"{'disable' if enable else 'enable'} MIG mode on {g.label}",
                                      lambda: _restore_mode(ctx, index, g.address, before_current)))
        with ctx.inventory.unit(write=True) as uow:
            uow.event("mig-mode", target=g.address, detail={"enabled": enable})
        return False
    undo = _undo(f"{'disable' if enable else 'enable'} MIG mode on {g.label}",
                 lambda: _restore_mode(ctx, index, g.address, before_current))
    if allow_reset:
        ctx.host.reset_gpu(g.address)
        health.after_reset(ctx, g.address, how="GPU reset by apply (MIG mode)")
        current, pending = _mig_state(ctx, index)
        if current == enable:
            journal.done.append(undo)
            with ctx.inventory.unit(write=True) as uow:
                uow.event("mig-mode", target=g.address, detail={"enabled": enable, "reset": True})
            return False
    # the change waits for a reset: a rollback must withdraw it too, or the next reboot switches the mode of
    # a GPU whose apply was reported rolled back (setting the current mode again clears the pending one)
    if before_current != enable:
        journal.done.append(undo)
    with ctx.inventory.unit(write=True) as uow:
        uow.event("mig-mode", target=g.address, result="pending",
                  detail={"enabled": enable, "activation_status": status})
    return True


def _mig_state(ctx: Context, index: int) -> tuple[bool, bool]:
    for gpu in ctx.host.nvml().gpus():
        if gpu.index == index:
            return bool(gpu.mig_current), bool(gpu.mig_pending)
    return False, False


def _restore_mode(ctx: Context, index: int, address: str, enabled: bool) -> None:
    current, pending, _ = ctx.host.nvml().set_mig_mode(index, enabled)
    if current != enabled:
        raise ResetRequiredError(f"restoring MIG mode on {address} is pending a GPU reset")


def _create_mdev(ctx: Context, journal: Journal, g: GpuView, gpu_id: int, parent: str, type_id: str, uuid: str,
                 *, origin: str, persistent: bool = True) -> int:
    fields = instance_fields_for_vgpu(g.model, MDEV, type_id, None, parent, uuid, origin, persistent)
    if type_id.startswith("nvidia-") and g.model and g.model.vgpu:
        with contextlib.suppress(GpuvirtError):
            vt = g.model.vgpu.type_by_id(int(type_id[7:]))
            if vt.mig_backed and g.model.mig:
                fields["compute_slices"] = g.model.mig.profile(vt.gpu_instance_profile_id).compute_slices  # type: ignore[arg-type]
    label = f"mdev {fields.get('type_name') or type_id} {uuid} on {parent}"

    def undo(inst_id: int) -> None:
        Journal(ctx, journal.actor).destroy(inst_id, lambda: ctx.host.remove_mdev(uuid), label)

    return journal.create(gpu_id, fields, lambda: (ctx.host.create_mdev(parent, type_id, uuid), {})[1], label, undo)


def _remove_mdev(ctx: Context, journal: Journal, g: GpuView, gpu_id: int, q: dict[str, Any]) -> None:
    uuid, parent, type_id = q["uuid"], q["parent"], q["type_id"]

    def undo(snap: dict[str, Any]) -> None:
        inst_id = Journal(ctx, journal.actor).create(
            gpu_id, instance_fields_for_vgpu(g.model, MDEV, type_id, q.get("type_name"), parent, uuid,
                                             snap.get("origin", "adopted"), snap.get("persistent", True)),
            lambda: (ctx.host.create_mdev(parent, type_id, uuid), {})[1], f"mdev {uuid} on {parent}")
        _restore_allocation(ctx, inst_id, snap)

    journal.destroy(q.get("instance_id"), lambda: ctx.host.remove_mdev(uuid),
                    f"mdev {q.get('type_name') or type_id} {uuid} on {parent}", undo)


def _set_vgpu(ctx: Context, journal: Journal, g: GpuView, gpu_id: int, vf: str, type_id: int, *, origin: str,
              persistent: bool = True) -> int:
    name = _type_name(g.model, type_id) if g.model and g.model.vgpu else None
    fields = instance_fields_for_vgpu(g.model, VFIO_VGPU, str(type_id), name, vf, None, origin, persistent)
    label = f"vGPU {name or type_id} on VF {vf}"

    def undo(inst_id: int) -> None:
        Journal(ctx, journal.actor).destroy(inst_id, lambda: ctx.host.clear_vgpu_type(vf), label)

    return journal.create(gpu_id, fields, lambda: (ctx.host.set_vgpu_type(vf, type_id, name), {})[1], label, undo)


def _clear_vgpu(ctx: Context, journal: Journal, g: GpuView, gpu_id: int, q: dict[str, Any]) -> None:
    vf, type_id = q["vf"], int(q["type_id"])

    def undo(snap: dict[str, Any]) -> None:
        inst_id = Journal(ctx, journal.actor).create(
            gpu_id, instance_fields_for_vgpu(g.model, VFIO_VGPU, str(type_id), q.get("type_name"), vf, None,
                                             snap.get("origin", "adopted"), snap.get("persistent", True)),
            lambda: (ctx.host.set_vgpu_type(vf, type_id), {})[1], f"vGPU {type_id} on VF {vf}")
        _restore_allocation(ctx, inst_id, snap)

    journal.destroy(q.get("instance_id"), lambda: ctx.host.clear_vgpu_type(vf),
                    f"vGPU {q.get('type_name') or type_id} on VF {vf}", undo)


def _disable_whole_vfs(ctx: Context, journal: Journal, g: GpuView, gpu_id: int, count: int) -> None:
    with ctx.inventory.unit(write=True) as uow:
        for row in uow.instances(ctx.settings.host_id, gpu_id=gpu_id, kinds=[VF]):
            uow.delete_instance(row)
    ctx.host.disable_vfs(g.address)

    def undo() -> None:
        ctx.host.enable_vfs(g.address, count)
        _record_vfs(ctx, g, gpu_id)

    journal.done.append(_undo(f"re-enable {count} VFs on {g.label}", undo))


def _record_vfs(ctx: Context, g: GpuView, gpu_id: int) -> None:
    view = hostview.snapshot(ctx)
    fresh = view.by_address(g.address)
    vfs = fresh.vfs if fresh else []
    mem = None
    if g.model and g.model.sriov and g.model.memory_mib and g.model.sriov.total_vfs:
        mem = g.model.memory_mib // max(len(vfs), 1)
    with ctx.inventory.unit(write=True) as uow:
        existing = {r.parent for r in uow.instances(ctx.settings.host_id, gpu_id=gpu_id, kinds=[VF])}
        for vf in vfs:
            if vf not in existing:
                uow.add_instance(host_id=ctx.settings.host_id, gpu_id=gpu_id, state="active",
                                 **vf_fields(vf, "profile", mem))
        uow.event("record-vfs", target=g.address, detail={"count": len(vfs)})


__all__ = ["plan", "apply", "make_plans", "plan_gpu", "Op", "GpuPlan", "ApplyResult"]
