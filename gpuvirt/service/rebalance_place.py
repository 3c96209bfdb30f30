"""The last part of ``gpuvirt rebalance --execute`` and of ``attach --allow-moves``: once the moves made room,
the request itself is placed where the plan said it fits (``unlocks``: host, GPU, GPU-instance start).

* For a VM (``rebalance --vm NAME``, ``attach --allow-moves``): :func:`gpuvirt.service.attach.attach`, the
  very function ``gpuvirt attach NAME --vgpu/--mig`` runs, pinned to the unlocked GPU (``gpu=``) and start
  (``start=``).  The executor still holds the locks of every GPU the plan touched, the unlocked one among
  them, so no other attach, detach or apply can take the room between the last move and this attach.
* Without a VM: a free instance of the request at that place, made the way ``apply`` makes the free
  instances of a profile (the same ``mig`` / ``mdev`` / ``vgpu`` journal steps, no allocation), so the next
  ``attach`` of that profile or type gets it.  It is one intent of kind ``rebalance`` (recovery: back), so a
  kill while it is made is rolled back by ``reconcile`` (or :func:`gpuvirt.service.rebalance_exec.recover`);
  the attach of a VM is an intent of kind ``attach`` and is settled like any attach.  Either way the moves
  before it are separate intents and stay done.
"""

from __future__ import annotations

from typing import Any, Mapping

from gpuvirt.context import Context
from gpuvirt.errors import ConflictError, GpuvirtError, UsageError
from gpuvirt.inventory.models import MDEV, MIG, VFIO_VGPU
from gpuvirt.service import intent


def for_vm(ctx: Context, name: str, attach_kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the name to plan room for, the attach options) for placing ``name`` at a VM.

    A VM gets a GPU-instance profile as the MIG-backed vGPU on such an instance (``attach --mig``), so room is
    planned for that vGPU type, which also needs a free VF of the board, not for the bare instance."""
    from gpuvirt.service import attach as svc

    kw = dict(attach_kw)
    if kw.get("vgpu") or kw.get("mig"):
        ref = kw.get("vgpu") or svc._mig_backed_type_for(ctx, kw["mig"], kw.get("gpu"))
        return ref, kw
    try:
        return svc._mig_backed_type_for(ctx, name, None), dict(kw, mig=name)
    except UsageError:
        return name, dict(kw, vgpu=name)


def place(contexts: Mapping[str, Context], doc: dict[str, Any], *, vm: str | None = None,
          attach_kw: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any] | None]:
    """Place ``doc``'s request at ``doc["unlocks"]``; returns (the ``placed`` entry of the plan document,
    the attach's hand-offs or None).  The caller holds the lock of the unlocked GPU."""
    u = doc["unlocks"]
    c = contexts[u["host"]]
    if vm is not None:
        from gpuvirt.service.attach import attach

        kw = {k: v for k, v in (attach_kw or {}).items() if k not in ("gpu", "start")}
        handoffs = attach(c, vm, gpu=u["gpu"], start=u["placement"], **kw)
        h = handoffs[0]
        gpu, start = _where(c, h.instance)
        return {"host": u["host"], "gpu": gpu, "placement": start, "instance": h.instance, "vm": vm,
                "tenant": h.tenant, "device": h.uuid or h.pci_address, "created": None}, handoffs
    if u.get("instance") is not None:
        # a free instance of the request existed already: that is what the next attach gets
        return {"host": u["host"], "gpu": u["gpu"], "placement": u["placement"], "instance": u["instance"],
                "vm": None, "created": False}, None
    inst = create_free(c, doc["request"], u["gpu"], u["placement"])
    gpu, start = _where(c, inst)
    return {"host": u["host"], "gpu": gpu, "placement": start, "instance": inst, "vm": None, "created": True}, None


def check_gpu(contexts: Mapping[str, Context], doc: dict[str, Any], attach_kw: dict[str, Any] | None) -> None:
    """An attach limited to some GPUs (``--gpu``) is refused before anything moves when the room the plan
    makes is elsewhere."""
    sel = (attach_kw or {}).get("gpu")
    u = doc.get("unlocks")
    if not sel or u is None:
        return
    from gpuvirt.service import hostview

    ok = {g.address for g in hostview.snapshot(contexts[u["host"]], nvml=True).select(sel)}
    if u["gpu"] not in ok:
        raise ConflictError(f"the plan makes room on GPU {u['gpu']}, which --gpu {sel} leaves out; nothing was moved")


def _where(ctx: Context, inst_id: int) -> tuple[str, int | None]:
    """(GPU address, GPU-instance start or None) of an instance row (a MIG-backed vGPU: its GPU instance's)."""
    with ctx.inventory.unit() as uow:
        row = uow.instance(inst_id)
        gi = uow.instance(row.backing_instance_id) if row.backing_instance_id is not None else row
        return row.gpu.address, gi.placement_start if gi.kind == MIG else None


def board_parent(g: Any, type_id: int) -> str | None:
    """The mdev parent for one more vGPU of ``type_id`` on GPU ``g`` (a :class:`GpuView`): None on a board
    whose vGPUs sit on SR-IOV VFs (the step takes the next free VF right before it makes the device; the GPU
    instance under a MIG-backed type makes one usable), else the parent with room now (the board itself on
    a T4)."""
    from gpuvirt.service.attach import _vgpu_board_room

    m = g.model
    if m is None or m.vgpu is None or m.vgpu.parent == "vf":
        return None
    return _vgpu_board_room(g, type_id, g.interface)[1]


def free_steps(g: Any, gpu_id: int, name: str, start: int | None) -> list[dict[str, Any]]:
    """The journal steps that make one free instance of ``name`` on GPU ``g`` (a :class:`GpuView`) at
    ``start``: a GPU instance, or a vGPU (on a GPU instance made for it when the type is MIG-backed)."""
    from gpuvirt.model.catalog import resolve_gi_profile, resolve_vgpu_type
    from gpuvirt.service.instances import instance_fields_for_mig, instance_fields_for_vgpu, new_uuid

    m = g.model
    if m is None:
        raise ConflictError(f"GPU {g.address} has no known model; nothing placed")
    # the order of service.rebalance.requests_for: a GPU-instance profile first, then a vGPU type
    if m.mig is not None and g.mig_current:
        try:
            p = resolve_gi_profile(m, name)
        except GpuvirtError:
            p = None
        if p is not None:
            if start is None:
                raise ConflictError(f"the plan names no start for {name} on GPU {g.address}; nothing placed")
            f = instance_fields_for_mig(m, p.id, start, "attach")
            return [intent.mig_step(g.address, gpu_id, g.nvml_index, p.id, start, f["placement_size"], present=True,
                                    fields=f, label=f"free GPU instance {p.name} at {start} on {g.label} (rebalance)")]
    t = resolve_vgpu_type(m, name)
    steps: list[dict[str, Any]] = []
    backing = None
    slices = None
    if t.mig_backed:
        if start is None or m.mig is None:
            raise ConflictError(f"the plan names no GPU-instance start for {name} on GPU {g.address}; nothing placed")
        prof = m.mig.profile(t.gpu_instance_profile_id)
        f = instance_fields_for_mig(m, prof.id, start, "attach")
        steps.append(intent.mig_step(g.address, gpu_id, g.nvml_index, prof.id, start, f["placement_size"],
                                     present=True, fields=f,
                                     label=f"GPU instance {prof.name} at {start} on {g.label} for a free {t.name}"))
        backing, slices = (prof.id, start), prof.compute_slices
    parent = board_parent(g, t.id)
    if g.interface == "vendor-vfio":
        f = instance_fields_for_vgpu(m, VFIO_VGPU, str(t.id), t.name, parent or "", None, "attach")
        f["compute_slices"] = slices or f.get("compute_slices")
        steps.append(intent.vgpu_step(g.address, gpu_id, parent, t.id, present=True, fields=f, backing=backing,
                                      label=f"free vGPU {t.name} on {g.label} (rebalance)"))
    else:
        uuid = new_uuid()
        f = instance_fields_for_vgpu(m, MDEV, f"nvidia-{t.id}", t.name, parent or "", uuid, "attach")
        f["compute_slices"] = slices or f.get("compute_slices")
        steps.append(intent.mdev_step(g.address, gpu_id, parent, f"nvidia-{t.id}", uuid, present=True, fields=f,
                                      backing=backing, label=f"free vGPU {t.name} {uuid} on {g.label} (rebalance)"))
    return steps


def create_free(ctx: Context, name: str, address: str, start: int | None) -> int:
    """One free instance of ``name`` on GPU ``address`` of ``ctx``'s host at ``start`` (journalled, all or
    nothing); returns its inventory id."""
    from gpuvirt.service import hostview

    g = hostview.snapshot(ctx).by_address(address)
    with ctx.inventory.unit() as uow:
        gid = next((r.id for r in uow.gpus(ctx.settings.host_id) if r.address == address), None)
    if g is None or gid is None:
        raise ConflictError(f"GPU {address} of host {ctx.settings.host_id} is gone; nothing placed")
    steps = free_steps(g, gid, name, start)
    run = intent.Run.begin(ctx, "rebalance", gpus=(), recovery="back",
                           target={"place": name, "gpu": address, "placement": start})
    for s in steps:
        run.add(s)
    try:
        for i in range(len(run.steps)):
            run.run(i)
        run.finish()
    except GpuvirtError as exc:
        failures = run.abort(exc)
        if failures:
            raise type(exc)(f"{exc}; undoing it did not finish ({failures[0]}): run 'gpuvirt reconcile'") from exc
        raise
    return intent.row_id(ctx, run.steps[-1])


__all__ = ["place", "for_vm", "create_free", "free_steps", "board_parent", "check_gpu"]
