"""status / reconcile: compare the inventory with the host and converge.

After a reboot every VF, mdev, vendor-VFIO vGPU type and MIG instance is gone (and on Hopper the MIG mode
too); the inventory still knows what should exist.  ``reconcile`` restores it in dependency order - MIG
mode, SR-IOV VFs, GPU instances (same placements), then vGPUs (same mdev UUIDs, same VFs) - and finishes
operations a crashed gpuvirt left half done: a row in state ``creating`` is completed (the host object is
adopted if it exists, created if not), a row in ``destroying`` is destroyed and removed.  Host objects
gpuvirt does not know are reported as foreign and never destroyed; ``--adopt`` records them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import GpuvirtError, ProfileError
from gpuvirt.inventory.models import ACTIVE, CREATING, DESTROYING, FAILED, GPU, MDEV, MIG, VF, VFIO_VGPU
from gpuvirt.service import hostview
from gpuvirt.service.hostview import GpuView, HostView
from gpuvirt.service import intent
from gpuvirt.service.intent_steps import is_home
from gpuvirt.service.instances import gpu_lock, instance_fields_for_mig, instance_fields_for_vgpu, lock_busy


@dataclass
class Finding:
    gpu: str
    kind: str                 # missing | leftover-creating | leftover-destroying | foreign | mig-mode | vfs | ok
    target: str
    instance_id: int | None = None
    action: str | None = None
    result: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "kind": self.kind, "target": self.target, "instance": self.instance_id,
                "action": self.action, "result": self.result}


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(self, *a: Any, **kw: Any) -> Finding:
        f = Finding(*a, **kw)
        self.findings.append(f)
        return f

    def to_dict(self) -> dict[str, Any]:
        return {"findings": [f.to_dict() for f in self.findings],
                "changed": sum(1 for f in self.findings if f.result == "done"),
                "failed": [f.to_dict() for f in self.findings if f.result == "failed"],
                "foreign": [f.to_dict() for f in self.findings if f.kind == "foreign"],
                "pending_reset": sorted({f.gpu for f in self.findings if f.result == "pending-reset"})}


def _host_keys(g: GpuView, *, half: bool = False) -> dict[tuple, Any]:
    """Host objects by inventory key.  A GPU instance without its compute instance (a crash between the two
    NVML calls) is never a finished instance: it counts as missing for its row, and as foreign, incomplete,
    without one; ``half`` lists those GPU instances instead."""
    keys: dict[tuple, Any] = {}
    for gi in g.gpu_instances:
        if bool(gi["compute_instances"]) != half:
            keys[("mig", gi["profile_id"], gi["placement"]["start"])] = gi
    if half:
        return keys
    for d in g.mdev_devices:
        keys[("mdev", d["uuid"])] = d
    for vf in g.vfio_vfs:
        if vf["current_type"]:
            keys[("vfio", vf["address"])] = vf
    return keys


def _row_key(r: Any) -> tuple:
    if r.kind == MIG:
        return ("mig", r.profile_id, r.placement_start)
    if r.kind == MDEV:
        return ("mdev", r.mdev_uuid)
    if r.kind == VFIO_VGPU:
        return ("vfio", r.parent)
    return ("vf", r.parent)


ROLLBACK_INCOMPLETE = "rollback-incomplete"    # written by apply.py


def _desired_layout(ctx: Context, g: GpuView, gpu_row: Any) -> Any:
    """The layout the GPU's desired profile gives it, or None (no profile, no entry selects it, or the profile
    no longer resolves)."""
    if not gpu_row.desired_profile or g.model is None:
        return None
    from gpuvirt.model.profile import resolve
    from gpuvirt.service.profiles import get_profile

    with contextlib.suppress(GpuvirtError):
        spec = get_profile(ctx, gpu_row.desired_profile)
        entry = spec.entry_for(g.model, g.nvml_index, g.subsystem)
        if entry is not None:
            return resolve(entry, g.model)
    return None


def _desired_mig(layout: Any, rows: list[Any]) -> bool | None:
    """Should MIG mode be on?  From the GPU's profile, else implied by recorded MIG instances."""
    if layout is not None:
        if layout.mig_enabled is not None:
            return layout.mig_enabled
        if layout.mig_counts:
            return True
    if any(r.kind == MIG for r in rows):
        return True
    return None


def _vgpu_holders(g: GpuView, rows: list[Any]) -> list[str]:
    """The NVIDIA vGPUs on the GPU now, each with the VM that holds it (for messages)."""
    by_key = {_row_key(r): r for r in rows}
    out = []
    for key, obj in _host_keys(g).items():
        if key[0] == "mdev" and not str(obj["type"]).startswith("nvidia-"):
            continue
        if key[0] == "mig":
            continue
        r = by_key.get(key)
        who = f"VM {r.allocation.vm_name}" if r is not None and r.allocation is not None else "no VM"
        out.append(f"{_foreign_label(key, obj)} ({who})")
    return out


def analyze(ctx: Context, view: HostView, uow: Any, adopt: bool = False) -> tuple[Report, list[tuple]]:
    """Findings and the work list [(finding, callable)] - nothing is changed here."""
    rep = Report()
    work: list[tuple[Finding, Any]] = []
    host_id = ctx.settings.host_id
    rows_by_gpu = hostview.record(ctx, view, uow)
    journal_gpus: set[str] = set()
    host_row = uow.host(host_id)
    for row in uow.intents(host_id):
        if intent.is_active(row.id):
            continue
        journal_gpus.update(row.gpus or [])
        busy = any(lock_busy(ctx, a) for a in row.gpus or [] if "/" not in a)   # host/address: another host's
        who = intent.owner_state(row, host_row.boot_marker if host_row is not None else None,
                                 intent.lease_seconds(ctx), own_host=is_home(host_id))
        for addr in row.gpus or []:
            rep.add(addr, f"unfinished-{row.kind}", intent.describe_open(row),
                    action="in progress (another gpuvirt holds the GPU)" if busy else
                    f"in progress, run by {who}" if who else "finish it or roll it back ('gpuvirt reconcile')")
    for g in view.gpus:
        gpu_row = rows_by_gpu[g.address]
        rows = uow.instances(host_id, gpu_id=gpu_row.id)
        keys = _host_keys(g)
        halves = _host_keys(g, half=True)
        # an apply left unfinished: waiting for a GPU reset, or failed with a rollback that did not finish
        # ("failed", written by versions that did not tell the two rollbacks apart, is left alone: those
        # GPUs were mostly rolled back cleanly)
        unfinished = None
        if g.address in journal_gpus:
            pass        # the open intent above says what is unfinished, and recover() settles it
        elif gpu_row.desired_profile and gpu_row.profile_state == "pending-reset":
            unfinished = f"finish applying {gpu_row.desired_profile} (once the GPU reset has happened)"
        elif gpu_row.desired_profile and gpu_row.profile_state == ROLLBACK_INCOMPLETE:
            unfinished = f"finish applying {gpu_row.desired_profile} (its rollback did not finish)"
        if unfinished:
            f = rep.add(g.address, "unfinished-apply", f"profile {gpu_row.desired_profile}", action=unfinished)
            work.append((f, ("finish-apply", g, gpu_row.desired_profile)))
        # MIG mode first: nothing MIG can be restored without it (Hopper forgets it on reboot)
        layout = _desired_layout(ctx, g, gpu_row)
        want_mig = _desired_mig(layout, rows)
        mig_change = want_mig is not None and g.mig_capable and bool(g.mig_current) != want_mig
        if mig_change:
            f = rep.add(g.address, "mig-mode", f"MIG mode {'on' if want_mig else 'off'}",
                        action=f"{'enable' if want_mig else 'disable'} MIG mode")
            work.append((f, ("mig-mode", g, want_mig)))
        # then the vGPU scheduler policy, before any vGPU comes back: NVML forgets it when the driver reloads
        # (a reboot) and accepts it only while no vGPU exists on the GPU
        sched = layout.vgpu_scheduler if layout is not None else None
        if sched is not None and not unfinished and g.address not in journal_gpus and \
                not sched.satisfied_by(g.vgpu_scheduler):
            now = (g.vgpu_scheduler or {}).get("policy") or "no scheduler NVML can report"
            holders = _vgpu_holders(g, rows)
            why = sched.problem_on(g.vgpu_scheduler)
            if why or holders:
                rep.add(g.address, "vgpu-scheduler", f"{sched.describe()} (the GPU runs {now}; it cannot be set "
                        + (why if why else f"while vGPUs exist: {'; '.join(holders)}") + ")")
            else:
                f = rep.add(g.address, "vgpu-scheduler", f"{sched.describe()} (the GPU runs {now})",
                            action=f"set the vGPU scheduler to {sched.policy}")
                work.append((f, ("vgpu-scheduler", g, sched, mig_change)))
        # SR-IOV VFs next: VF-hosted vGPUs and whole VFs need them (gone after a reboot)
        needs_vfs = [r for r in rows if r.kind in (MDEV, VFIO_VGPU, VF) and r.parent and r.parent != g.address
                     and r.parent not in g.mdev_parents and r.parent not in g.vfs]
        if needs_vfs and g.sriov_total and not g.sriov_num:
            count = gpu_row.sriov_num_vfs or g.sriov_total
            if any(r.kind == VF for r in rows):
                count = max(count, len([r for r in rows if r.kind == VF]))
            f = rep.add(g.address, "vfs", f"{g.sriov_total} SR-IOV VFs", action="enable VFs")
            work.append((f, ("enable-vfs", g, g.sriov_total if not any(r.kind == VF for r in rows) else count)))
        known = set()
        for r in sorted(rows, key=lambda r: (r.kind != MIG, r.id)):
            key = _row_key(r)
            known.add(key)
            # a whole GPU handed to a container is the GPU itself: there whenever the GPU is
            on_host = True if r.kind == GPU else key in keys if r.kind != VF else (r.parent in g.vfs)
            if r.state == DESTROYING:
                f = rep.add(g.address, "leftover-destroying", r.label, r.id,
                            action="destroy" if on_host else "forget")
                work.append((f, ("finish-destroy", g, r.id, on_host)))
            elif r.state == CREATING:
                f = rep.add(g.address, "leftover-creating", r.label, r.id,
                            action="adopt the created object" if on_host else "create")
                work.append((f, ("finish-create", g, r.id, on_host)))
            elif not on_host:
                if key in halves:
                    f = rep.add(g.address, "incomplete", r.label, r.id,
                                action="create its missing compute instance")
                    work.append((f, ("recreate", g, r.id)))
                elif r.persistent or r.allocation is not None and r.allocation.persistent:
                    f = rep.add(g.address, "missing", r.label, r.id, action="recreate")
                    work.append((f, ("recreate", g, r.id)))
                else:
                    f = rep.add(g.address, "missing", r.label, r.id, action="forget (transient)")
                    work.append((f, ("forget", g, r.id)))
            elif r.kind == MIG:
                gi = keys[key]
                ci = gi["compute_instances"][0] if gi["compute_instances"] else None
                if r.gi_id != gi["id"] or (ci and (r.ci_id != ci["id"] or r.mig_uuid != ci["uuid"])) or \
                        r.state == FAILED:
                    f = rep.add(g.address, "ids", r.label, r.id, action="refresh GPU/compute instance ids")
                    work.append((f, ("refresh", g, r.id)))
        foreign = False
        for key, obj in keys.items():
            if key in known:
                continue
            foreign = True
            label = _foreign_label(key, obj)
            f = rep.add(g.address, "foreign", label, action="adopt" if adopt else None)
            if adopt:
                work.append((f, ("adopt", g, key, obj, gpu_row.id)))
        for key, obj in halves.items():
            if key in known:
                continue
            foreign = True
            # never adopted: an instance nobody can use, and not ours to complete or destroy
            rep.add(g.address, "foreign", _foreign_label(key, obj) + " without a compute instance",
                    action="left alone (created outside gpuvirt and incomplete)" if adopt else None)
        if foreign or any(r.origin == "adopted" for r in rows):
            # applying a profile would destroy what another tool made (adopted or not): the operator decides
            for f, w in work:
                if w[0] == "finish-apply" and w[1] is g:
                    f.action = f"{f.action}: not while instances gpuvirt did not create are on the GPU " \
                               f"(run 'gpuvirt apply {gpu_row.desired_profile} --gpu {g.address}')"
            work[:] = [(f, w) for f, w in work if not (w[0] == "finish-apply" and w[1] is g)]
    return rep, work


def _foreign_label(key: tuple, obj: Any) -> str:
    if key[0] == "mig":
        return f"GPU instance {obj.get('profile_name') or obj['profile_id']} at {obj['placement']['start']}:" \
               f"{obj['placement']['size']} (GI {obj['id']})"
    if key[0] == "mdev":
        return f"mdev {obj['type']} {obj['uuid']} on {obj['parent']}"
    return f"vGPU type {obj['current_type']} on VF {obj['address']}"


def status(ctx: Context) -> dict[str, Any]:
    view = hostview.snapshot(ctx)
    with ctx.inventory.unit(write=True, action="status") as uow:
        rep, _ = analyze(ctx, view, uow)
        rows_by_gpu = {g.address: g for g in uow.gpus(ctx.settings.host_id)}
        gpus = []
        for g in view.gpus:
            row = rows_by_gpu.get(g.address)
            insts = uow.instances(ctx.settings.host_id, gpu_id=row.id) if row else []
            keys = _host_keys(g)
            layout = _desired_layout(ctx, g, row) if row else None
            want = layout.vgpu_scheduler if layout is not None else None
            sched = None
            if g.vgpu_scheduler is not None or want is not None:
                cur = g.vgpu_scheduler or {}
                sched = {"policy": cur.get("policy"), "timeslice_us": cur.get("timeslice_us"),
                         "desired": want.to_dict() if want is not None else None,
                         "in_sync": want is None or want.satisfied_by(g.vgpu_scheduler)}
            gpus.append({
                "address": g.address, "index": g.nvml_index, "model": g.model.id if g.model else None,
                "name": g.name, "desired_profile": row.desired_profile if row else None,
                "profile_state": row.profile_state if row else None,
                "mig": {"current": g.mig_current, "pending": g.mig_pending} if g.mig_capable else None,
                "vgpu_scheduler": sched,
                "mode": row.mode if row else None,
                "instances": [_instance_dict(i, True if i.kind == GPU else (_row_key(i) in keys) if i.kind != VF
                                             else i.parent in g.vfs) for i in insts],
                "drift": [f.to_dict() for f in rep.findings if f.gpu == g.address and f.kind != "ids"],
            })
    cdi_doc = _cdi_plan(ctx)
    cdi_rep = Report()
    _cdi_findings(cdi_rep, cdi_doc)
    cdi = [f.to_dict() for f in cdi_rep.findings]
    return {"host": ctx.settings.host_id, "gpus": gpus, "cdi": cdi,
            "in_sync": not any(f.kind != "ids" for f in rep.findings) and not cdi}


def _instance_dict(i: Any, on_host: bool) -> dict[str, Any]:
    d = {"id": i.id, "kind": i.kind, "state": i.state, "origin": i.origin, "persistent": i.persistent,
         "label": i.label, "on_host": on_host}
    if i.kind == MIG:
        d.update({"profile_id": i.profile_id, "profile_name": i.profile_name,
                  "placement": {"start": i.placement_start, "size": i.placement_size}, "gi_id": i.gi_id,
                  "ci_id": i.ci_id, "mig_uuid": i.mig_uuid})
    else:
        d.update({"uuid": i.mdev_uuid, "parent": i.parent, "type_id": i.type_id, "type_name": i.type_name})
    if i.allocation is not None:
        d["allocation"] = {"vm": i.allocation.vm_name, "vm_uuid": i.allocation.vm_uuid,
                           "tenant": i.allocation.tenant, "persistent": i.allocation.persistent,
                           "consumer": i.allocation.consumer or "vm"}
    return d


# intents the boot reconcile leaves alone: it runs before libvirt (the unit's Before=libvirtd virqemud), and a
# move's handover step can only be checked by asking libvirt where the VM is and which device it names
NEEDS_LIBVIRT = ("rebalance",)


def reconcile(ctx: Context, *, dry_run: bool = False, adopt: bool = False, only_parents: set[str] | None = None,
              actor: str | None = None, boot: bool = False, peers: Any = None) -> dict[str, Any]:
    """Converge host and inventory (docs/operator-guide.md).  ``boot``: run by the boot unit, before libvirt:
    unfinished moves (kind rebalance) are reported and left for a reconcile once libvirt runs.  ``peers``: the
    other hosts this host's unfinished moves have steps on (Contexts or peer sessions, :mod:`gpuvirt.service.peers`),
    so those moves are settled on both hosts."""
    settled: list[dict[str, Any]] = []
    if peers and not dry_run and not boot and only_parents is None:
        from gpuvirt.service import rebalance_exec

        # a move between hosts first, under its GPUs' locks on every host (those of other hosts taken by their
        # sessions), in the one order of (host, address) the executor takes them in - not after all of this
        # host's, which a rebalance run from another host that holds one of those would wait on in turn
        settled = rebalance_exec.recover(ctx, peers=peers, actor=actor)
    addresses = hostview.lock_addresses(ctx)
    with contextlib.ExitStack() as locks:
        for a in addresses:
            locks.enter_context(gpu_lock(ctx, a))
        if not dry_run:
            # first what a crash left half done: finished or rolled back as a whole, never adopted as it is.  The
            # hook's restore leaves an interrupted apply to reconcile and the boot unit (not its business)
            settled += intent.recover(ctx, None, actor=actor,
                                     kinds=None if only_parents is None else ("attach", "detach", "reconcile"),
                                     exclude=NEEDS_LIBVIRT if boot else ())
        view = hostview.snapshot(ctx)
        with ctx.inventory.unit(write=True, action="reconcile") as uow:
            rep, work = analyze(ctx, view, uow, adopt=adopt)
        for s in settled:
            what = {"forward": "finished", "back": "rolled back"}.get(s["result"], "could not settle")
            for addr in s["gpus"] or ["-"]:
                rep.add(addr, f"unfinished-{s['kind']}", _settled_label(s),
                        action=f"{what}" + (f": {s['error']}" if s.get("error") else ""),
                        result="failed" if s["result"] == "failed" else "done")
        if boot:
            for f in rep.findings:
                if f.kind in {f"unfinished-{k}" for k in NEEDS_LIBVIRT}:
                    f.action = ("left for later: settled once libvirt runs, by 'gpuvirt reconcile' or the next "
                                "command on these GPUs")
        if only_parents is not None:
            # the hook's restore brings back what its VM had; changing a GPU's layout is not its business
            work = [(f, w) for f, w in work if _touches(w, only_parents) and w[0] != "finish-apply"]
        if dry_run:
            _cdi_findings(rep, _cdi_plan(ctx))
            return {"dry_run": True, **rep.to_dict()}
        _repair(ctx, rep, work, actor)
        # last, the CDI specs of container devices: rendered from the host as the repairs left it (a MIG device
        # re-created after a reboot has a new UUID, so its spec gets a new name)
        _cdi_sync(ctx, rep, actor)
        with ctx.inventory.unit(write=True) as uow:
            out = rep.to_dict()
            uow.event("reconcile", result="failed" if out["failed"] else "ok", actor=actor,
                      detail={"changed": out["changed"], "failed": len(out["failed"]),
                              "foreign": len(out["foreign"])})
    return rep.to_dict()


def _cdi_plan(ctx: Context) -> dict[str, Any] | None:
    from gpuvirt.service import containers

    try:
        return containers.plan_sync(ctx)
    except GpuvirtError as exc:
        return {"error": str(exc)}


def _cdi_findings(rep: Report, doc: dict[str, Any] | None, done: bool = False) -> None:
    if not doc:
        return
    if doc.get("error"):
        rep.add("-", "cdi", "CDI specs", action=f"cannot check: {doc['error']}", result="failed")
        return
    for key, action in (("missing", "publish"), ("outdated", "rewrite"), ("stale", "remove")):
        for i in doc.get(key, []):
            rep.add(i.get("gpu") or "-", f"cdi-{key}", f"{i['name']} ({i['path']})", i.get("instance"),
                    action=action)
    for i in doc.get("unresolved", []):
        rep.add(i["gpu"], "cdi-unresolved", f"spec of instance {i['instance']} ({i['consumer']})", i["instance"],
                action=f"cannot render: {i['error']}")
    for i in doc.get("conflicts", []):
        rep.add("-", "cdi-conflict", i["path"], action=f"left alone: {i['why']}")


def _cdi_sync(ctx: Context, rep: Report, actor: str | None) -> None:
    from gpuvirt.service import containers

    try:
        doc = containers.sync(ctx, actor=actor)
    except GpuvirtError as exc:
        rep.add("-", "cdi", "CDI specs", action=f"cannot sync: {exc}", result="failed")
        return
    before = len(rep.findings)
    _cdi_findings(rep, doc)
    results = iter(doc.get("changes", []))
    for f in rep.findings[before:]:
        if f.kind in ("cdi-missing", "cdi-outdated", "cdi-stale"):
            r = next(results, None)
            if r is not None:
                f.result = r["result"]
                if r.get("error"):
                    f.action = f"{f.action}: {r['error']}"


def _settled_label(s: dict[str, Any]) -> str:
    t = s.get("target") or {}
    what = t.get("profile") or t.get("vm") or ""
    return f"{s['kind']} {what}".strip() + f" (intent {s['intent']})"


def _repair(ctx: Context, rep: Report, work: list[tuple], actor: str | None) -> None:
    """Carry out the work list: host changes as the steps of one journalled intent (resumed forward if this
    process dies), in dependency order - MIG mode, VFs, instances (MIG before vGPUs) - then inventory-only
    repairs, and last an unfinished apply, which plans from the host as the steps above left it."""
    host_work = [(f, w) for f, w in work if _is_host_work(ctx, w)]
    run = None
    if host_work:
        with ctx.inventory.unit(write=True, action="record the reconcile plan") as uow:
            steps = [(f, w, _step_for(ctx, uow, w)) for f, w in host_work]
            run = intent.Run.begin(ctx, "reconcile", gpus={w[1].address for _, w, _ in steps},
                                   steps=[s for _, _, s in steps], recovery="forward-only", actor=actor, uow=uow)
        order = sorted(range(len(steps)), key=lambda i: PHASES.index(steps[i][1][0]) if steps[i][1][0] in PHASES
                       else len(PHASES))
        for i in order:
            f, w, step = steps[i]
            if w[0] not in ("mig-mode", "enable-vfs") and step["params"].get("needs_mig") and \
                    any(x.result == "pending-reset" and x.gpu == f.gpu for x in rep.findings):
                f.result = "skipped"      # instances wait for the reset that activates MIG mode
                continue
            try:
                facts = run.run(i)
                f.result = "pending-reset" if facts.get("pending") else "done"
            except GpuvirtError as exc:
                _failed(ctx, f, exc, actor)
        run.finish()
    for f, w in work:
        if w[0] == "finish-apply" or _is_host_work(ctx, w):
            continue
        try:
            _do(ctx, w)
            f.result = "done"
        except GpuvirtError as exc:
            _failed(ctx, f, exc, actor)
    for f, w in work:
        if w[0] == "finish-apply":
            try:
                f.result = _finish_apply(ctx, w) or "done"
            except GpuvirtError as exc:
                _failed(ctx, f, exc, actor)


HOST_WORK = ("mig-mode", "vgpu-scheduler", "enable-vfs", "recreate", "finish-create", "finish-destroy")


def _is_host_work(ctx: Context, w: tuple) -> bool:
    if w[0] not in HOST_WORK:
        return False
    if w[0] == "finish-destroy":
        with ctx.inventory.unit() as uow:
            return uow.instance(w[2]).kind != VF     # a whole VF row is only forgotten
    return True
PHASES = ("mig-mode", "vgpu-scheduler", "enable-vfs")


def _step_for(ctx: Context, uow: Any, w: tuple) -> dict[str, Any]:
    op, g = w[0], w[1]
    if op == "mig-mode":
        return intent.mig_mode_step(g.address, g.nvml_index, w[2], was_current=bool(g.mig_current),
                                    was_pending=bool(g.mig_pending), allow_reset=False)
    if op == "vgpu-scheduler":
        cur = g.vgpu_scheduler or {}
        return intent.vgpu_scheduler_step(g.address, g.nvml_index, w[2].policy, w[2].timeslice_us,
                                          was_policy=cur.get("policy"), was_timeslice_us=cur.get("timeslice_us"),
                                          needs_mig=w[3])
    gpu_row = uow.gpu_by_address(ctx.settings.host_id, g.address)
    if op == "enable-vfs":
        return intent.vfs_step(g.address, gpu_row.id if gpu_row else None, w[2], present=True)
    r = uow.instance(w[2])
    present = op != "finish-destroy"
    if r.kind == MIG:
        if g.nvml_index is None:
            raise ProfileError(f"{g.label} is not visible through NVML")
        return intent.mig_step(g.address, r.gpu_id, g.nvml_index, r.profile_id, r.placement_start,
                               r.placement_size, present=present, fields=None, label=r.profile_name)
    if r.kind == MDEV:
        return intent.mdev_step(g.address, r.gpu_id, r.parent, r.type_id, r.mdev_uuid, present=present,
                                fields=None, needs_mig=bool(r.compute_slices))
    if r.kind == VFIO_VGPU:
        return intent.vgpu_step(g.address, r.gpu_id, r.parent, int(r.type_id), present=present, fields=None,
                                needs_mig=bool(r.compute_slices))
    # a whole VF: the VFs enabled again (its row is kept)
    return intent.vfs_step(g.address, r.gpu_id, g.sriov_num or g.sriov_total or 0, present=True)


def _failed(ctx: Context, f: Finding, exc: GpuvirtError, actor: str | None) -> None:
    f.result = "failed"
    f.action = f"{f.action}: {exc}"
    inst_id = f.instance_id
    with ctx.inventory.unit(write=True) as uow:
        if inst_id is not None:
            with contextlib.suppress(GpuvirtError):
                row = uow.instance(inst_id)
                if row.state in (ACTIVE, FAILED):
                    row.state = FAILED
                    row.error = str(exc)
        uow.event("reconcile", target=f.target, result="failed", actor=actor, detail={"error": str(exc)})


def wait_for_driver(ctx: Context, timeout: float, interval: float = 2.0) -> bool:
    """Wait (bounded) until NVML answers on a host that has NVIDIA GPUs; True when ready."""
    import time

    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        view = hostview.snapshot(ctx)
        has_nvidia = any(d["vendor"] == "nvidia" for d in view.doc["pci_gpus"])
        if not has_nvidia or view.doc["nvml"]["available"]:
            return True
        if time.monotonic() >= deadline:
            return False
        ctx.host.close()  # reopen NVML on the next snapshot
        time.sleep(interval)


def _touches(w: tuple, parents: set[str]) -> bool:
    g: GpuView = w[1]
    return g.address in parents or any(p in parents for p in g.vfs) or any(p in parents for p in g.mdev_parents)


def _finish_apply(ctx: Context, w: tuple) -> str | None:
    from gpuvirt.errors import ResetRequiredError
    from gpuvirt.service import apply as apply_svc

    g, profile = w[1], w[2]
    try:
        # the GPU locks this process holds are re-entrant; never a GPU reset from an unattended run
        apply_svc.apply(ctx, profile, g.address, reset_gpu=False)
    except ResetRequiredError:
        return "pending-reset"
    return None


def _do(ctx: Context, w: tuple) -> None:
    """Repairs of the inventory alone (one transaction each)."""
    op = w[0]
    if op == "adopt":
        g, key, obj, gpu_id = w[1], w[2], w[3], w[4]
        with ctx.inventory.unit(write=True) as uow:
            if key[0] == "mig":
                fields = instance_fields_for_mig(g.model, obj["profile_id"], obj["placement"]["start"], "adopted")
                ci = obj["compute_instances"][0] if obj["compute_instances"] else None
                fields.update(gi_id=obj["id"], ci_id=ci["id"] if ci else None, mig_uuid=ci["uuid"] if ci else None)
            elif key[0] == "mdev":
                fields = instance_fields_for_vgpu(g.model, MDEV, obj["type"], None, obj["parent"], obj["uuid"],
                                                  "adopted")
            else:
                fields = instance_fields_for_vgpu(g.model, VFIO_VGPU, str(obj["current_type"]), None,
                                                  obj["address"], None, "adopted")
            uow.add_instance(host_id=ctx.settings.host_id, gpu_id=gpu_id, state=ACTIVE, **fields)
            uow.event("adopt", target=_foreign_label(key, obj))
        return
    g: GpuView = w[1]
    inst_id: int = w[2]
    if op in ("forget", "finish-destroy"):
        with ctx.inventory.unit(write=True) as uow:
            uow.delete_instance(uow.instance(inst_id))
            uow.event("forget", target=f"instance {inst_id}", detail={"reason": "transient instance gone"})
        return
    if op == "refresh":
        _refresh(ctx, g, inst_id)
        return
    raise GpuvirtError(f"unknown reconcile step {op}")


def _refresh(ctx: Context, g: GpuView, inst_id: int) -> None:
    if g.nvml_index is None:
        return
    with ctx.inventory.unit() as uow:
        r = uow.instance(inst_id)
        if r.kind != MIG:
            return
        pid, start = r.profile_id, r.placement_start
    from gpuvirt.service.instances import find_gi

    gi = find_gi(ctx, g.nvml_index, pid, start)
    if gi is None:
        return
    ci = gi.compute_instances[0] if gi.compute_instances else None
    with ctx.inventory.unit(write=True) as uow:
        r = uow.instance(inst_id)
        r.gi_id = gi.id
        r.ci_id = ci.id if ci else None
        r.mig_uuid = ci.uuid if ci else None
        if r.state == FAILED:
            r.state = ACTIVE
            r.error = None
