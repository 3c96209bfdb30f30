"""The libvirt hook's fast path: ``prepare`` and ``release`` without SQLAlchemy, discovery or NVML.

:mod:`gpuvirt.service.hook` is the reference: every function here does what its counterpart there does, with the
same inventory rows, journal rows, events and host operations, only through :mod:`gpuvirt.inventory.sqlite_fast`
(plain ``sqlite3``) and single sysfs lookups instead of the ORM and a full host snapshot.  Importing SQLAlchemy
alone costs more than a VM start may wait for the hook (issue 14; docs/hook-guide.md "Hook latency").

Each function returns None where it does not handle the case, before it has written anything that the full path
would not write the same way; the caller then runs the full path, which is correct for everything:

* the inventory is not a plain SQLite file at the schema revision this gpuvirt knows (``open_fast``);
* ``prepare``: a hostdev names an instance kind other than an mdev, a vendor-VFIO vGPU or a whole VF;
* ``release``: the VM holds a transient allocation (freeing it is a journalled device removal: the full path);
* a device is missing and its restore is not the plain case - enable the GPU's SR-IOV VFs if they are gone, then
  recreate mdevs / vendor-VFIO types from their rows - that the restore below handles: an open intent on the
  host, a MIG-capable GPU or a profile that sets the vGPU scheduler (NVML), rows that are not plain active vGPUs
  (MIG, whole VFs, half-made or half-destroyed rows, MIG-backed vGPUs), a missing transient device of another VM
  (reconcile forgets those), container allocations or CDI specs of gpuvirt's on the host (reconcile keeps
  those in step).

The restore is the work ``reconcile(only_parents=...)`` does in that case, journalled the same way: one intent
row of kind ``reconcile`` (recovery ``forward-only``) with ``vfs`` and ``mdev`` / ``vgpu`` steps built by
:mod:`gpuvirt.service.intent_steps` and carried out by its step classes, written before the first host operation;
each step marked done in the transaction that records its event; the row deleted at the end.  A kill anywhere
leaves a row that ``intent.recover`` (reconcile, the boot unit, the next command on the GPU) finishes.  It holds
the per-GPU locks of the VM's GPUs (``instances.gpu_lock``) throughout, as reconcile holds them.  What it leaves
out is what needs the full discovery (NVML included): reconcile's refresh of the host's and GPUs' discovered facts
(``hostview.record``) and its count of foreign objects in the ``reconcile`` event (recorded as None); the boot
unit's reconcile does both.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import ConflictError, GpuvirtError
from gpuvirt.inventory.kinds import ACTIVE, MDEV, VF, VFIO_VGPU, instance_label
from gpuvirt.inventory.sqlite_fast import FastInventory, Row, open_fast

ACTOR = "libvirt-hook"
_KINDS_OWNED = (VFIO_VGPU, VF)


class _Fallback(Exception):
    """Not the fast path's case: roll back what this transaction did and take the full path."""


def _label(r: Row) -> str:
    return instance_label(r.kind, profile_name=r.profile_name, placement_start=r.placement_start,
                          placement_size=r.placement_size, type_name=r.type_name, type_id=r.type_id,
                          mdev_uuid=r.mdev_uuid, parent=r.parent)


def _open(ctx: Context) -> FastInventory | None:
    if not ctx.settings.db_url:
        ctx.check_sim()     # as Context.inventory: a missing simulated host fails before the database is touched
    return open_fast(ctx.settings)


# --- prepare -----------------------------------------------------------------------------------------------------
def prepare(ctx: Context, domain: str, dom: Any) -> list[str] | None:
    """``hook.prepare`` on the fast path; None: take the full path."""
    inv = _open(ctx)
    if inv is None:
        return None
    with inv:
        notes: list[str] = []
        try:
            with inv.tx(write=True, action=f"hook prepare {domain}") as t:
                owned = []
                for h in dom.hostdevs:
                    inst = t.instance_by_mdev(h.uuid) if h.kind == "mdev" else \
                        t.instance_by_parent(h.address, _KINDS_OWNED)
                    if inst is not None:
                        if inst.kind not in (MDEV, VFIO_VGPU, VF):
                            raise _Fallback
                        owned.append(inst)
                if not owned:
                    return notes
                allocs = []
                for inst in owned:
                    a = t.allocation_of(inst.id)
                    if a is not None and a.vm_name != domain and not (dom.uuid and a.vm_uuid == dom.uuid):
                        raise ConflictError(f"{_label(inst)} is allocated to VM {a.vm_name}, not {domain}")
                    if a is None:
                        # a device named in the XML by hand: held for this run of the VM only (hook.prepare)
                        a = t.allocate(inst, vm_name=domain, vm_uuid=dom.uuid, persistent=False)
                        t.event("hook-allocate", target=domain, detail={"instance": inst.id}, actor=ACTOR)
                    elif a.vm_uuid is None and dom.uuid:
                        t.set_vm_uuid(a.id, dom.uuid)
                    allocs.append(a)
                ids = [i.id for i in owned]
                gpu_ids = sorted({i.gpu_id for i in owned})
                gpu_addrs = {t.gpu(g).address for g in gpu_ids}
                transient = {i.id: _label(i) for i, a in zip(owned, allocs) if not i.persistent and not a.persistent}
        except _Fallback:
            return None
        missing = [i.id for i in owned if not _quick_present(ctx, i)]
        gone = [transient[i] for i in missing if i in transient]
        if gone:
            raise ConflictError(f"transient device(s) {', '.join(gone)} did not survive the host restart (a "
                                "transient allocation ends with its VM); attach the VM again")
        if missing:
            rep = _restore(ctx, inv, gpu_ids, gpu_addrs)
            if rep is None:
                return None     # the allocation records above are the full path's own first step: it redoes none
            still = [i.id for i in owned if not _quick_present(ctx, i)]
            if still:
                reasons = [f["action"] for f in rep["failed"] if f.get("instance") in still or
                           f.get("instance") is None]
                raise ConflictError("; ".join(r for r in reasons if r) or
                                    f"instance(s) {', '.join(map(str, still))} could not be restored")
            others = rep["changed"] - len(missing)
            notes.append(f"restored {len(missing)} device(s) of this VM" +
                         (f", and {others} other step(s) on its GPU(s)" if others > 0 else ""))
        with inv.tx(write=True) as t:
            for inst in owned:
                a = t.allocation_of(inst.id)
                if a is not None:
                    t.set_vm_state(a.id, "running")
            t.event("hook-prepare", target=domain, detail={"instances": ids, "notes": notes}, actor=ACTOR)
        return notes


def _quick_present(ctx: Context, inst: Row) -> bool:
    """``hook._quick_present`` for a row of this module."""
    try:
        if inst.kind == MDEV and inst.mdev_uuid:
            return ctx.host.mdev_exists(inst.mdev_uuid)
        if inst.kind == VFIO_VGPU and inst.parent:
            return str(ctx.host.current_vgpu_type(inst.parent)) == inst.type_id
        if inst.kind == VF and inst.parent:
            return ctx.host.pci_dir(inst.parent).is_dir()
    except GpuvirtError:
        return False
    return False


# --- the restore: reconcile's work for the plain case, journalled the same way ---------------------------------------
def _cdi_specs_present(ctx: Context) -> bool:
    """Any spec file of gpuvirt's in the CDI folder?  Reconcile would bring those in step (containers.sync)."""
    import os
    from pathlib import Path

    from gpuvirt.vmm.cdi import FILE_PREFIX

    spec_dir = ctx.settings.cdi.get("spec_dir") or str(ctx.settings.root / "var/run/cdi")
    try:
        return any(n.startswith(FILE_PREFIX) for n in os.listdir(Path(spec_dir)))
    except FileNotFoundError:
        return False
    except OSError:
        return True             # cannot tell: the full path decides


def _plan(ctx: Context, t: Any, gpu_ids: list[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """The steps reconcile would journal for these GPUs, each with its finding; None when it is not the plain
    case (see the module docstring)."""
    from gpuvirt.service import intent_steps as steps_mod

    if t.has_intents() or t.has_container_allocations() or not t.host_known() or _cdi_specs_present(ctx):
        return None
    host = ctx.host
    steps: list[dict[str, Any]] = []
    findings: list[dict[str, Any]] = []
    for gpu_id in gpu_ids:
        g = t.gpu(gpu_id)
        if g is None or g.mig_capable or g.profile_state in ("pending-reset", "rollback-incomplete"):
            return None
        if g.desired_profile and not _plain_profile(t.profile_spec(g.desired_profile)):
            return None
        rows = t.gpu_instances(gpu_id)
        for r in rows:
            if r.kind not in (MDEV, VFIO_VGPU) or r.state != ACTIVE or r.compute_slices or r.backing_instance_id \
                    or not r.parent or not r.type_id:
                return None
        try:
            total, num = host.sriov_state(g.address)
        except GpuvirtError:
            total, num = 0, 0
        try:
            needs_vfs = [r for r in rows if r.parent != g.address and not host.pci_dir(r.parent).is_dir()]
        except GpuvirtError:
            return None         # a parent that is no PCI function (mtty, i915 GVT-g): not the plain case
        if needs_vfs:
            if not total or num:
                return None     # VFs there but not the rows' parents, or no SR-IOV: not the plain case
            findings.append({"gpu": g.address, "target": f"{total} SR-IOV VFs", "instance": None,
                             "action": "enable VFs"})
            steps.append(steps_mod.vfs_step(g.address, g.id, total, present=True))
        for r in rows:
            vf_gone = r in needs_vfs
            if r.kind == MDEV:
                there = not vf_gone and host.mdev_exists(r.mdev_uuid)
            else:
                cur = 0 if vf_gone else _vfio_type(host, r.parent)
                if cur is None or (cur and str(cur) != r.type_id):
                    return None     # another type on the VF: reconcile counts it present; not ours to judge
                there = bool(cur)
            if there:
                continue
            alloc = t.allocation_of(r.id)
            if not (r.persistent or alloc is not None and alloc.persistent):
                return None         # reconcile forgets a missing transient device rather than restoring it
            findings.append({"gpu": g.address, "target": _label(r), "instance": r.id, "action": "recreate"})
            if r.kind == MDEV:
                steps.append(steps_mod.mdev_step(g.address, r.gpu_id, r.parent, r.type_id, r.mdev_uuid, present=True,
                                                 fields=None, needs_mig=False))
            else:
                steps.append(steps_mod.vgpu_step(g.address, r.gpu_id, r.parent, int(r.type_id), present=True,
                                                 fields=None, needs_mig=False))
    return steps, findings


def _vfio_type(host: Any, vf: str) -> int | None:
    from gpuvirt.errors import DeviceGoneError

    try:
        return host.current_vgpu_type(vf)
    except DeviceGoneError:
        return 0
    except GpuvirtError:
        return None


def _plain_profile(spec: Any) -> bool:
    """Can the fast path restore under this desired profile's stored spec?  Only one stored as the ORM writes it
    (the text of a JSON object) that sets no vGPU scheduler (that needs NVML).  A BLOB, a number or text that is
    no JSON object is the full path's to judge: it names the corrupt value in one line."""
    if not isinstance(spec, str) or "scheduler" in spec:
        return False
    try:
        return isinstance(json.loads(spec), dict)
    except ValueError:
        return False


def _restore(ctx: Context, inv: FastInventory, gpu_ids: list[int], gpu_addrs: set[str]) -> dict[str, Any] | None:
    """Restore the VM's GPUs as ``reconcile(only_parents=...)`` would; its report (``changed``, ``failed``), or
    None when this is not the plain case (nothing written then)."""
    from gpuvirt.service import intent_steps as steps_mod
    from gpuvirt.host.boot import process_id, root_boot_id
    from gpuvirt.service.instances import gpu_lock

    with contextlib.ExitStack() as locks:
        # the VM's GPUs, in reconcile's (sorted) order: a subset of what reconcile locks, taken the same way
        for a in sorted(gpu_addrs):
            locks.enter_context(gpu_lock(ctx, a))
        with inv.tx(write=True, action="record the reconcile plan") as t:
            planned = _plan(ctx, t, gpu_ids)
            if planned is None:
                return None
            steps, findings = planned
            if not steps:
                # another start restored these GPUs while this one waited for their locks; reconcile would
                # record a run that changed nothing (the caller then checks the devices again)
                t.event("reconcile", actor=ACTOR, detail={"changed": 0, "failed": 0, "foreign": None})
                return {"changed": 0, "failed": []}
            # no lease heartbeat here (Run.heartbeat): this inventory is one machine's SQLite file, so the
            # row's owner is only ever judged through /proc, and the boot id recorded with it
            intent_id = t.add_intent(kind="reconcile", state="running", recovery="forward-only",
                                     gpus=sorted({s["gpu"] for s in steps}), steps=steps, owner=process_id(),
                                     actor=ACTOR, boot_marker=root_boot_id(ctx.settings.root))
        # reconcile._repair's order: the GPU-wide phase (VFs) first, then the instances in plan order
        order = sorted(range(len(steps)), key=lambda i: 0 if steps[i]["op"] == "vfs" else 1)
        for i in order:
            step, f = steps[i], findings[i]
            op = steps_mod.op_of(ctx, step)
            try:
                op.forward()
            except GpuvirtError as exc:
                _failed(inv, step, op, f, exc, intent_id)
                continue
            with inv.tx(write=True, action=f"record: {op.describe()}") as t:
                # the step's record(): the row exists, active, with its allocation; only an old error goes
                if f["instance"] is not None:
                    t.instance_restored(f["instance"])
                step["state"] = steps_mod.DONE
                t.save_steps(intent_id, [dict(s, params=dict(s["params"])) for s in steps])
                t.event("create", target=op.describe(), actor=ACTOR, detail={"intent": intent_id})
            f["result"] = "done"
        with inv.tx(write=True, action="complete the reconcile") as t:
            t.delete_intent(intent_id)
        failed = [f for f in findings if f.get("result") == "failed"]
        changed = sum(1 for f in findings if f.get("result") == "done")
        with inv.tx(write=True) as t:
            # "foreign": reconcile counts the objects of the whole host it does not know, which takes the full
            # discovery (NVML included); not counted here (None), the boot unit's reconcile reports them
            t.event("reconcile", result="failed" if failed else "ok", actor=ACTOR,
                    detail={"changed": changed, "failed": len(failed), "foreign": None})
    return {"changed": changed, "failed": failed}


def _failed(inv: FastInventory, step: dict[str, Any], op: Any, f: dict[str, Any], exc: GpuvirtError,
            intent_id: int) -> None:
    """What ``intent.Run.run`` and ``reconcile._failed`` record for a step that failed."""
    with contextlib.suppress(GpuvirtError):
        with inv.tx(write=True) as t:
            t.event("create", target=op.describe(), result="failed", actor=ACTOR,
                    detail={"error": str(exc), "intent": intent_id})
    f["result"] = "failed"
    f["action"] = f"{f['action']}: {exc}"
    with inv.tx(write=True) as t:
        if f["instance"] is not None:
            t.instance_failed(f["instance"], str(exc))
        t.event("reconcile", target=f["target"], result="failed", actor=ACTOR, detail={"error": str(exc)})


# --- release -----------------------------------------------------------------------------------------------------
def release(ctx: Context, domain: str, dom: Any | None) -> list[str] | None:
    """``hook.release`` on the fast path (persistent allocations: marked stopped); None: take the full path."""
    inv = _open(ctx)
    if inv is None:
        return None
    with inv:
        try:
            with inv.tx(write=True, action=f"hook release {domain}") as t:
                allocs = t.allocations(domain)
                if dom is not None and dom.uuid:
                    seen = {a.id for a in allocs}
                    allocs += [a for a in t.allocations() if a.vm_uuid == dom.uuid and a.id not in seen]
                if any(not a.persistent for a in allocs):
                    raise _Fallback     # freeing a transient device is a journalled removal: the full path's
                for a in allocs:
                    t.set_vm_state(a.id, "stopped")
                if allocs:
                    t.event("hook-release", target=domain, detail={"notes": []}, actor=ACTOR)
        except _Fallback:
            return None
    return []
