"""detach: take instances back from a VM, as one journalled intent (split from :mod:`gpuvirt.service.attach`).

A detach releases the VM's allocations and destroys what a transient attach created for it; the libvirt hook's
release and the rebalance executor's source clean-up use the same plan (:func:`release_instances`,
:func:`_release_plan`).
"""

from __future__ import annotations

import contextlib
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import ConflictError, GpuvirtError, NotFoundError
from gpuvirt.inventory.models import CONSUMER_VM, GPU, MDEV, MIG, VFIO_VGPU
from gpuvirt.service import intent
from gpuvirt.service.attach import check_vm_name, handoff_for
from gpuvirt.service.instances import gpu_lock, row_allocation, row_fields


def detach(ctx: Context, vm: str, *, instance: int | None = None, force: bool = False,
           domain_xml: str | None = None) -> list[dict[str, Any]]:
    vm = check_vm_name(vm)
    host_id = ctx.settings.host_id
    with ctx.inventory.unit() as uow:
        allocs = [a for a in uow.allocations(host_id=host_id, vm_name=vm)
                  if instance is None or a.instance_id == instance]
        if not allocs:
            what = f"instance {instance} " if instance is not None else ""
            raise NotFoundError(f"VM {vm} has no {what}allocation on this host")
        running = [a for a in allocs if a.vm_state == "running"]
        if running and not force:
            raise ConflictError(f"VM {vm} is running (recorded by the libvirt hook); stop it first, or use --force")
        ids = [a.instance_id for a in allocs]
        handoffs = [(a.instance.gpu.address, handoff_for(a.instance, a, a.instance.gpu)) for a in allocs
                    if a.instance.kind != MIG and (a.consumer or CONSUMER_VM) == CONSUMER_VM]
        containers_held = [a.instance_id for a in allocs if (a.consumer or CONSUMER_VM) != CONSUMER_VM]
    xml_steps = []
    if domain_xml is not None:
        xml_steps = [intent.domain_xml_step(addr, domain_xml, h.libvirt_xml(), present=False,
                                            uuid=h.uuid if h.kind == "mdev" else None,
                                            address=h.pci_address if h.kind == "pci" else None)
                     for addr, h in handoffs]
    cdi_steps: list[dict[str, Any]] = []
    if containers_held:
        from gpuvirt.service.containers import release_steps

        cdi_steps = release_steps(ctx, containers_held)
    return release_instances(ctx, vm, ids, extra_steps=xml_steps, first_steps=cdi_steps)


def release_instances(ctx: Context, vm: str, ids: list[int], *, destroy: bool = False, actor: str | None = None,
                      extra_steps: list[dict[str, Any]] | None = None,
                      first_steps: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Release the VM's allocations of ``ids``; destroy what a transient attach created for it (or everything,
    with ``destroy``).  One journalled intent, finished forward if the process dies; rolled back (the VM keeps
    its devices) when a step fails now.  ``first_steps`` run before the releases (a container's CDI specs are
    withdrawn before its devices are given back)."""
    plan, out = _release_plan(ctx, vm, ids, destroy)
    steps = list(first_steps or []) + [s for s in plan if s is not None] + list(extra_steps or [])
    if not steps:
        return out
    gpus = sorted({s["gpu"] for s in steps})
    with contextlib.ExitStack() as locks:
        if any(s["op"] not in ("release", "domain-xml") for s in steps):
            for a in gpus:
                locks.enter_context(gpu_lock(ctx, a))
        run = intent.Run.begin(ctx, "detach", gpus=gpus, steps=steps, target={"vm": vm, "instances": ids},
                               recovery="forward", actor=actor)
        try:
            run.run_all()
        except GpuvirtError as exc:
            failures = run.abort(exc)
            if failures:
                raise type(exc)(f"{exc}; restoring VM {vm}'s allocations did not finish ({failures[0]}): run "
                                "'gpuvirt reconcile'") from exc
            raise
        run.finish()
    return out


def _release_plan(ctx: Context, vm: str, ids: list[int], destroy: bool) -> tuple[list[dict[str, Any]], list]:
    from gpuvirt.service.intent_steps import instance_key

    steps: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    with ctx.inventory.unit() as uow:
        rows = [uow.instance(i) for i in dict.fromkeys(ids)]
        # a vGPU before the GPU instance under it: that one is released (and destroyed) together with it
        rows.sort(key=lambda r: r.kind == MIG)
        for inst in rows:
            if inst.id in seen:
                continue
            alloc = inst.allocation
            # A transient attach creates its instance non-persistent; that is what goes away with it.  A transient
            # attach that took a free persistent instance (from a profile, or left by an earlier persistent
            # attach) only gives it back: destroying it would silently shrink the layout the operator keeps.
            gone = destroy or inst.kind == GPU or (not inst.persistent and inst.origin == "attach")
            rec = {"instance": inst.id, "label": inst.label, "vm": vm, "destroyed": gone and inst.kind != GPU}
            out.append(rec)
            addr = inst.gpu.address
            if alloc is not None and alloc.vm_name == vm:
                steps.append(intent.release_step(addr, inst.id, row_allocation(inst), instance_key(inst)))
            backing = uow.instance(inst.backing_instance_id) if inst.backing_instance_id is not None else None
            if backing is not None and backing.allocation is not None and backing.allocation.vm_name == vm:
                steps.append(intent.release_step(addr, backing.id, row_allocation(backing), instance_key(backing)))
                out.append({"instance": backing.id, "label": backing.label, "vm": vm, "destroyed": gone})
                seen.add(backing.id)
            if gone:
                steps.append(_destroy_step(inst, backing))
                if backing is not None and (destroy or (not backing.persistent and backing.origin == "attach")):
                    steps.append(_destroy_step(backing, None))
                elif backing is not None:
                    out[-1]["destroyed"] = False
    return steps, out


def _destroy_step(inst: Any, backing: Any) -> dict[str, Any] | None:
    """The step that removes ``inst`` from the host (and its row); None for kinds that are never destroyed."""
    addr = inst.gpu.address
    fields, alloc = row_fields(inst), None
    bkey = (backing.profile_id, backing.placement_start) if backing is not None else None
    if inst.kind == MDEV:
        return intent.mdev_step(addr, inst.gpu_id, inst.parent, inst.type_id, inst.mdev_uuid, present=False,
                                fields=fields, alloc=alloc, backing=bkey)
    if inst.kind == VFIO_VGPU:
        return intent.vgpu_step(addr, inst.gpu_id, inst.parent, int(inst.type_id), present=False, fields=fields,
                                alloc=alloc, backing=bkey)
    if inst.kind == MIG:
        return intent.mig_step(addr, inst.gpu_id, inst.gpu.nvml_index, inst.profile_id, inst.placement_start,
                               inst.placement_size, present=False, fields=fields, alloc=alloc)
    if inst.kind == GPU:
        # the row only stands for the hand-over; taking it back forgets it (undo brings row and allocation back)
        return intent.whole_gpu_step(addr, inst.gpu_id, fields, row_allocation(inst), present=False)
    return None


__all__ = ["detach", "release_instances"]
