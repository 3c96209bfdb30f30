"""attach: hand instances to VMs (taking them back is :mod:`gpuvirt.service.detach`).

An attach first looks for a free instance of the requested kind (locked rows on PostgreSQL, the write lock
on SQLite, plus a unique constraint on the allocation: two VMs never get the same instance).  When none is
free it creates one where the GPU's layout still has room - MIG instances at the planner's placement,
vGPUs on a free VF or parent - and allocates it in the same transaction that makes it active, so no other
attach can take it in between.  The create path decides under the GPU locks; when it finds no room there it
looks for a free instance once more (a writer it waited for, such as ``rebalance --execute``, may have left
one) before refusing with exit 4.  Transient attachments (``--transient``) destroy what they created when the
VM lets go.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import CapacityError, ConflictError, GpuvirtError, ProfileError, UsageError
from gpuvirt.host.machine import normalize_uuid
from gpuvirt.inventory.models import CONSUMER_VM, GPU, MDEV, MIG, MODE_CONTAINERS, VF, VFIO_VGPU
from gpuvirt.model.catalog import resolve_gi_profile, resolve_vgpu_type
from gpuvirt.model.mig import Placed
from gpuvirt.service import health, hostview
from gpuvirt.service.hostview import GpuView
from gpuvirt.service import intent
from gpuvirt.service.instances import (
    gpu_lock,
    instance_fields_for_mig,
    instance_fields_for_vgpu,
    new_uuid,
)

_VM_NAME_BAD = re.compile(r"[\x00-\x1f\x7f/]")


def check_vm_name(vm: str) -> str:
    if not vm or len(vm) > 255 or _VM_NAME_BAD.search(vm) or vm != vm.strip():
        raise UsageError(f"invalid VM name {vm!r}: 1-255 characters, no '/', no control characters, "
                         "no leading/trailing spaces")
    return vm


def check_tenant(tenant: str | None) -> str | None:
    if tenant is None:
        return None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}", tenant):
        raise UsageError(f"invalid tenant name {tenant!r} (letters, digits and ._@- up to 128 characters)")
    return tenant


@dataclass
class Request:
    kind: str                        # mig | vgpu | vf | instance | mdev
    ref: str | None = None           # profile name, vGPU type, mdev type dir
    instance_id: int | None = None

    def describe(self) -> str:
        if self.kind == "instance":
            return f"instance {self.instance_id}"
        if self.kind == "vf":
            return "a whole SR-IOV VF"
        return f"{self.kind} {self.ref}"


def make_request(*, vgpu: str | None, mig: str | None, vf: bool, instance: int | None,
                 mdev: str | None) -> Request:
    given = [k for k, v in (("vgpu", vgpu), ("mig", mig), ("vf", vf or None), ("instance", instance),
                            ("mdev", mdev)) if v is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --vgpu TYPE, --mig PROFILE, --vf, --mdev TYPE or --instance ID")
    if instance is not None:
        if instance <= 0:
            raise UsageError(f"invalid instance id {instance}")
        return Request("instance", instance_id=instance)
    if vf:
        return Request("vf")
    ref = vgpu or mig or mdev
    assert ref is not None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 ._+:-]{0,127}", ref):
        raise UsageError(f"invalid type/profile name {ref!r}")
    return Request("vgpu" if vgpu else "mig" if mig else "mdev", ref=ref)


# --- matching --------------------------------------------------------------------------------------------------
def _matches(req: Request, inst: Any, model: Any) -> bool:
    if req.kind == "instance":
        return inst.id == req.instance_id
    if req.kind == "vf":
        return inst.kind == VF
    if req.kind == "mdev":
        return inst.kind == MDEV and inst.type_id == _mdev_type_dir(model, req.ref)
    if model is None:
        return False
    if req.kind == "mig":
        if inst.kind != MIG or model.mig is None:
            return False
        try:
            return resolve_gi_profile(model, req.ref).id == inst.profile_id
        except GpuvirtError:
            return False
    if req.kind == "vgpu":
        if inst.kind not in (MDEV, VFIO_VGPU) or model.vgpu is None:
            return False
        try:
            t = resolve_vgpu_type(model, req.ref)
        except GpuvirtError:
            return False
        return inst.type_id in (f"nvidia-{t.id}", str(t.id))
    return False


def _quota_check(uow: Any, tenant: str | None, inst_rows: list[Any]) -> None:
    if tenant is None:
        return
    t = uow.tenant(tenant)
    if t is None:
        return
    if uow.backend == "postgresql":
        uow.lock_tenant(tenant)
    used = uow.tenant_usage(tenant)
    add_n = len(inst_rows)
    add_mem = sum(r.memory_mib or 0 for r in inst_rows)
    add_cs = sum(r.compute_slices or 0 for r in inst_rows)
    over = []
    if t.max_instances is not None and used["instances"] + add_n > t.max_instances:
        over.append(f"instances {used['instances']}+{add_n} > {t.max_instances}")
    if t.max_memory_mib is not None and used["memory_mib"] + add_mem > t.max_memory_mib:
        over.append(f"GPU memory {used['memory_mib']}+{add_mem} MiB > {t.max_memory_mib} MiB")
    if t.max_compute_slices is not None and used["compute_slices"] + add_cs > t.max_compute_slices:
        over.append(f"compute slices {used['compute_slices']}+{add_cs} > {t.max_compute_slices}")
    if over:
        raise CapacityError(f"tenant {tenant} would exceed its quota: " + "; ".join(over))


MIG_NOT_VFIO = ("MIG instances are not VFIO devices and cannot be handed to a VM; give the VM a MIG-backed vGPU "
                "instead (--vgpu <board>-<g>-<GB>C, e.g. A100-1-5C) or use the MIG instance on the host")


def _quota_precheck(ctx: Context, tenant: str | None, fields: dict[str, Any]) -> None:
    """Refuse an over-quota attach before anything is created on the host.

    The check in the transaction that records the new instance (the step's allocation) stays, because it is the one that holds against
    concurrent attaches; but a refusal there comes after the host object exists, and the journal then leaves
    it to reconcile.  Checked first, the common case leaves nothing behind.
    """
    if tenant is None:
        return
    from types import SimpleNamespace

    with ctx.inventory.unit() as uow:
        _quota_check(uow, tenant, [SimpleNamespace(memory_mib=fields.get("memory_mib"),
                                                   compute_slices=fields.get("compute_slices"))])


# --- handoff ------------------------------------------------------------------------------------------------------
def handoff_for(inst: Any, alloc: Any, gpu_row: Any, *, display: bool = False, ramfb: bool = False):
    from gpuvirt.vmm.handoff import Handoff

    nvidia = (gpu_row.vendor == "nvidia") and inst.kind in (MDEV, VFIO_VGPU, MIG)
    if inst.kind == MDEV:
        nvidia = nvidia and (inst.type_id or "").startswith("nvidia-")
        return Handoff(vm=alloc.vm_name, vm_uuid=alloc.vm_uuid, tenant=alloc.tenant, instance=inst.id, kind="mdev",
                       uuid=inst.mdev_uuid, nvidia=nvidia, display=display, ramfb=ramfb)
    if inst.kind in (VFIO_VGPU, VF):
        # display/ramfb are passed on so that the hand-off refuses them (mdev-only in libvirt)
        return Handoff(vm=alloc.vm_name, vm_uuid=alloc.vm_uuid, tenant=alloc.tenant, instance=inst.id, kind="pci",
                       pci_address=inst.parent, nvidia=nvidia, display=display, ramfb=ramfb)
    raise UsageError(f"instance {inst.id} is a MIG instance ({inst.label}): {MIG_NOT_VFIO}")


# --- attach ---------------------------------------------------------------------------------------------------------
@dataclass
class _Call:
    """One attach call: its request, its intent, and the GPU locks it holds until it ends."""

    ctx: Context
    vm: str
    tenant: str | None
    persistent: bool
    vm_uuid: str | None
    run: Any
    locks: contextlib.ExitStack
    consumer: str = CONSUMER_VM       # vm | container (service.containers)
    start: int | None = None          # a new GPU instance goes exactly here (rebalance placing its request)

    def alloc(self, *, quota: bool = True) -> dict[str, Any]:
        """The allocation a step gives the VM; ``quota``: the device the tenant is charged for (checked and
        recorded as the attach event), not the GPU instance under a MIG-backed vGPU."""
        return {"vm_name": self.vm, "vm_uuid": self.vm_uuid, "tenant": self.tenant, "persistent": self.persistent,
                "check_quota": quota, "event": quota, "consumer": self.consumer}

    def lock(self, addresses: list[str]) -> None:
        """Hold these GPUs until the attach ends (a rollback must not race another writer).  Always the same
        sorted candidate set for one request, so the order matches every other writer's."""
        for a in sorted(addresses):
            self.locks.enter_context(gpu_lock(self.ctx, a))
        intent.require_settled(self.ctx, set(addresses))


def attach(ctx: Context, vm: str, *, vgpu: str | None = None, mig: str | None = None, vf: bool = False,
           instance: int | None = None, mdev: str | None = None, tenant: str | None = None, count: int = 1,
           persistent: bool = True, vm_uuid: str | None = None, gpu: str | None = None, display: bool = False,
           ramfb: bool = False, domain_xml: str | None = None, fmt: str | None = None,
           start: int | None = None) -> list[Any]:
    """``start``: a GPU instance this attach creates goes at that start of the ``gpu`` (the place a
    rebalance's moves made room at, whose GPU locks the caller holds) or nowhere."""
    if fmt == "cdi":
        # a container, not a VM: MIG devices and whole GPUs through CDI specs (service.containers)
        from gpuvirt.service import containers

        bad = [o for o, v in (("--vgpu", vgpu), ("--vf", vf or None), ("--instance", instance), ("--mdev", mdev),
                              ("--vm-uuid", vm_uuid), ("--display", display or None), ("--ramfb", ramfb or None),
                              ("--domain-xml", domain_xml)) if v is not None]
        if bad:
            raise UsageError(f"--format cdi hands MIG devices (--mig) and whole GPUs (--gpu) to containers; "
                             f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} for VMs")
        return containers.attach(ctx, vm, mig=mig, gpu=gpu, tenant=tenant, count=count, persistent=persistent)
    vm = check_vm_name(vm)
    tenant = check_tenant(tenant)
    if vm_uuid:
        vm_uuid = normalize_uuid(vm_uuid)
    if count < 1 or count > 64:
        raise UsageError("--count must be between 1 and 64")
    req = make_request(vgpu=vgpu, mig=mig, vf=vf, instance=instance, mdev=mdev)
    if req.kind == "mig":
        # a MIG instance itself cannot be passed through; on KVM a VM gets a GPU instance of that profile as
        # the MIG-backed vGPU on it (the GPU instance is created first when none is free)
        req = Request("vgpu", ref=_mig_backed_type_for(ctx, req.ref or "", gpu))
    if req.kind == "instance" and count != 1:
        raise UsageError("--instance attaches exactly one instance")
    if domain_xml is not None:
        from gpuvirt.vmm.libvirt import parse_domain

        from gpuvirt.safefs import read_bounded
        from gpuvirt.vmm.libvirt import MAX_DOMAIN_XML_BYTES

        try:
            dom = parse_domain(read_bounded(domain_xml, MAX_DOMAIN_XML_BYTES, what="--domain-xml"))
        except OSError as exc:
            raise UsageError(f"cannot read --domain-xml {domain_xml}: {exc.strerror}") from exc
        if dom.name != vm:
            raise UsageError(f"--domain-xml {domain_xml} defines domain {dom.name!r}, not {vm!r}")
        vm_uuid = vm_uuid or dom.uuid
    with ctx.inventory.unit() as uow:
        from gpuvirt.service.containers import refuse_vm_name_clash

        refuse_vm_name_clash(uow, ctx.settings.host_id, vm, CONSUMER_VM)
    with contextlib.ExitStack() as locks:
        # all or nothing, and journalled: every change of this call is a step of one intent, rolled back as a
        # whole if a later step fails (the Nth of --count, the hand-off, the domain file) or the process dies
        run = intent.Run.begin(ctx, "attach", gpus=(), recovery="back",
                               target={"vm": vm, "request": req.describe(), "count": count, "tenant": tenant})
        call = _Call(ctx, vm, tenant, persistent, vm_uuid, run, locks, start=start)
        try:
            ids = [_attach_one(call, req, gpu_selector=gpu) for _ in range(count)]
            handoffs = []
            with ctx.inventory.unit() as uow:
                for inst_id in ids:
                    inst = uow.instance(inst_id)
                    handoffs.append(handoff_for(inst, inst.allocation, inst.gpu, display=display, ramfb=ramfb))
            if fmt is not None:
                from gpuvirt.vmm.handoff import render

                # rendered here, inside the all-or-nothing block: output the VMM cannot use (QEMU without the
                # VM UUID for an NVIDIA vGPU) is a failed attach and must not leave the allocation behind
                render(handoffs, fmt)
            if domain_xml is not None:
                for h, inst_id in zip(handoffs, ids):
                    i = run.add(intent.domain_xml_step(_gpu_of(ctx, inst_id), domain_xml, h.libvirt_xml(),
                                                       uuid=h.uuid if h.kind == "mdev" else None,
                                                       address=h.pci_address if h.kind == "pci" else None,
                                                       present=True))
                    run.run(i)
            run.finish()
        except GpuvirtError as exc:
            failures = run.abort(exc)
            if failures:
                raise type(exc)(f"{exc}; undoing this attach did not finish ({failures[0]}): run 'gpuvirt "
                                "reconcile'") from exc
            raise
    return handoffs


def _gpu_of(ctx: Context, inst_id: int) -> str:
    with ctx.inventory.unit() as uow:
        return uow.instance(inst_id).gpu.address


def _attach_one(call: _Call, req: Request, *, gpu_selector: str | None) -> int:
    ctx, vm = call.ctx, call.vm
    host_id = ctx.settings.host_id
    view = hostview.snapshot(ctx)
    allowed = health.usable(ctx, {g.address for g in (view.select(gpu_selector) if gpu_selector else view.gpus)})
    with ctx.inventory.unit() as uow:
        # GPUs in containers mode hand nothing to VMs (their layout is applied for containers), and a GPU handed
        # whole to a container nothing at all
        gpu_rows = uow.gpus(host_id)
        mode_of = {g.address: g.mode for g in gpu_rows}
        whole = {g.address for g in gpu_rows
                 if any(r.allocation is not None for r in uow.instances(host_id, gpu_id=g.id, kinds=[GPU]))}
    for_containers = {a for a in allowed if mode_of.get(a) == MODE_CONTAINERS or a in whole}
    if gpu_selector and for_containers and for_containers == allowed:
        raise ConflictError(f"{', '.join(sorted(for_containers))} serve{'s' if len(for_containers) == 1 else ''} "
                            "containers (mode containers); VMs get devices of GPUs in mode vm or without a profile")
    allowed -= for_containers
    models = {g.address: g.model for g in view.gpus}
    # 1. a free instance that already exists
    def take_free(view: Any) -> int | None:
        with ctx.inventory.unit(write=True, action=f"attach {req.describe()} to {vm}") as uow:
            rows = hostview.record(ctx, view, uow)
            addr_of = {r.id: a for a, r in rows.items()}
            if req.kind == "instance":
                inst = uow.instance(req.instance_id, host_id)
                if inst.kind == GPU:
                    raise UsageError(f"instance {inst.id} ({inst.label}) is a whole GPU for containers")
                if addr_of.get(inst.gpu_id) in for_containers:
                    raise ConflictError(f"instance {inst.id} ({inst.label}) is on a GPU in containers mode")
                if inst.kind == MIG:
                    raise UsageError(f"instance {inst.id} is a MIG instance ({inst.label}): {MIG_NOT_VFIO}")
                if inst.allocation is not None:
                    raise ConflictError(f"instance {inst.id} ({inst.label}) is already allocated to VM "
                                        f"{inst.allocation.vm_name}")
                if inst.state != "active":
                    raise ConflictError(f"instance {inst.id} is {inst.state}, not active")
                candidates = [inst]
            else:
                kinds = {"mig": [MIG], "vgpu": [MDEV, VFIO_VGPU], "vf": [VF], "mdev": [MDEV]}[req.kind]
                candidates = [i for i in uow.free_instances(host_id, kinds)
                              if addr_of.get(i.gpu_id) in allowed and _matches(req, i, models.get(addr_of.get(i.gpu_id)))
                              and not _backs_a_vgpu(uow, i)]
            for inst in candidates:
                present = _on_host(view, addr_of.get(inst.gpu_id), inst)
                if not present:
                    continue  # missing after a reboot: reconcile/prepare will restore it; do not hand it out now
                if not uow.try_lock_instance(inst):
                    continue  # another attach is taking this one right now: try the next candidate
                _quota_check(uow, call.tenant, [inst])
                addr = addr_of[inst.gpu_id]
                # allocated and journalled in one transaction: a rollback of this call gives it back
                uow.allocate(inst, vm_name=vm, vm_uuid=call.vm_uuid, tenant=call.tenant, persistent=call.persistent)
                call.run.add_done(uow, intent.allocate_step(addr, inst.id, call.alloc(quota=False)))
                if inst.backing_instance_id is not None:
                    # a free MIG-backed vGPU: its GPU instance is held with it, as when attach creates both
                    gi = uow.instance(inst.backing_instance_id)
                    if gi.allocation is None:
                        uow.allocate(gi, vm_name=vm, vm_uuid=call.vm_uuid, tenant=call.tenant,
                                     persistent=call.persistent)
                        call.run.add_done(uow, intent.allocate_step(addr, gi.id, call.alloc(quota=False)))
                uow.event("attach", target=vm, detail={"instance": inst.id, "label": inst.label, "tenant": call.tenant})
                return inst.id
            if req.kind == "instance":
                raise CapacityError(f"no capacity: instance {req.instance_id} is not present on the host now "
                                    "(run 'gpuvirt reconcile' to restore it)")
            if req.kind == "vf":
                raise CapacityError("no capacity: no free SR-IOV VF on this host (VFs come from a profile with "
                                    "--sriov-vfs N)")
        return None

    got = take_free(view)
    if got is not None:
        return got
    # 2. create one where the layout has room
    journalled = len(call.run.steps)
    try:
        return _create_for(call, req, view, allowed)
    except ProfileError as exc:
        if for_containers:
            raise CapacityError(f"no capacity for VMs: {exc} (left out: {', '.join(sorted(for_containers))}, which "
                                "serve containers)") from exc
        raise
    except CapacityError:
        # Step 1 read the host before the create path waited for the GPU locks; whoever held them (a
        # 'rebalance --execute' placing its request as a free instance, a detach) may have left a free
        # instance of this very kind, which is why the layout now has no room.  Look once more, under the
        # locks now held, before refusing - unless the create path already journalled steps of its own
        # (those are this call's to undo, not to mix with a found instance).
        if len(call.run.steps) != journalled:
            raise
        got = take_free(hostview.snapshot(ctx))
        if got is None:
            raise
        return got


def _mig_backed_type_for(ctx: Context, profile: str, gpu_selector: str | None) -> str:
    """The MIG-backed vGPU type that gives a VM one GPU instance of ``profile`` on this host."""
    # a selector may name an NVML index or GPU UUID, which only NVML knows
    view = hostview.snapshot(ctx, nvml=gpu_selector is not None)
    gpus = view.select(gpu_selector) if gpu_selector else view.gpus
    found: list[str] = []
    for g in gpus:
        m = g.model
        if m is None or m.mig is None or m.vgpu is None:
            continue
        try:
            pid = resolve_gi_profile(m, profile).id
        except GpuvirtError:
            continue
        # catalog order: the compute (C) series first where a board has several for one profile
        for t in sorted(m.vgpu.types, key=lambda t: (t.series != "C", t.id)):
            if t.gpu_instance_profile_id == pid:
                found.append(t.name)
                break
    if not found:
        raise UsageError(f"--mig {profile}: {MIG_NOT_VFIO}; no GPU on this host offers a MIG-backed vGPU type "
                         f"for {profile}")
    return found[0]


def _backs_a_vgpu(uow: Any, inst: Any) -> bool:
    return inst.kind == MIG and any(r.backing_instance_id == inst.id for r in uow.instances(
        inst.host_id, gpu_id=inst.gpu_id, kinds=[MDEV, VFIO_VGPU]))


def _on_host(view: Any, address: str | None, inst: Any) -> bool:
    g = view.by_address(address) if address else None
    if g is None:
        return False
    if inst.kind == MIG:
        return any(gi["profile_id"] == inst.profile_id and gi["placement"]["start"] == inst.placement_start
                   for gi in g.gpu_instances)
    if inst.kind == MDEV:
        return any(d["uuid"] == inst.mdev_uuid for d in g.mdev_devices)
    if inst.kind == VFIO_VGPU:
        return any(v["address"] == inst.parent and str(v["current_type"]) == inst.type_id for v in g.vfio_vfs)
    return inst.parent in g.vfs


def _create_for(call: _Call, req: Request, view: Any, allowed: set[str]) -> int:
    ctx = call.ctx
    policy_mig = ctx.settings.policies.get("mig_placement", "frag-aware")
    policy_vgpu = ctx.settings.policies.get("vgpu_placement", "consolidate")
    gpus = [g for g in view.gpus if g.address in allowed]
    if req.kind == "mig":
        return _create_mig_for(call, req.ref, gpus, policy_mig)
    if req.kind == "vgpu":
        return _create_vgpu_for(call, req.ref, gpus, policy_vgpu, policy_mig)
    return _create_generic_mdev_for(call, req.ref, gpus)


def _gpu_ids(ctx: Context, view_gpus: list[GpuView]) -> dict[str, int]:
    with ctx.inventory.unit() as uow:
        return {g.address: g.id for g in uow.gpus(ctx.settings.host_id)}


def _run_create(call: _Call, step: dict[str, Any]) -> int:
    """Journal a create step, carry it out (the record allocates it in the same transaction), and return the
    inventory id of the instance it made."""
    call.run.run(call.run.add(step))
    return intent.row_id(call.ctx, step)


def _create_mig_for(call: _Call, profile: str, gpus: list[GpuView], policy: str, *, backing: bool = False) -> int:
    """A new GPU instance of ``profile`` for the call's VM (``backing``: under a MIG-backed vGPU, which carries
    the quota)."""
    from gpuvirt.model.mig import free_starts
    from gpuvirt.model.planner import Decision, GpuState, choose_placement

    ctx = call.ctx
    cands = []
    for g in gpus:
        if not (g.mig_capable and g.mig_current and g.model and g.model.mig):
            continue
        try:
            pid = resolve_gi_profile(g.model, profile).id
        except GpuvirtError:
            continue
        cands.append((g, pid))
    if not cands:
        raise CapacityError(f"no capacity: no MIG-enabled GPU on this host offers {profile}")
    ids = _gpu_ids(ctx, gpus)
    # planner decides GPU and start; profile ids may differ per model, so plan per profile id group
    call.lock([g.address for g, _ in cands])
    fresh = hostview.snapshot(ctx)
    best = None
    for pid in sorted({pid for _, pid in cands}):
        states = []
        for g, p in cands:
            if p != pid:
                continue
            fg = fresh.by_address(g.address)
            if fg is None:
                continue
            states.append(GpuState(g.address, g.model.mig, tuple(fg.layout())))
        d = choose_placement(states, pid, policy)
        if call.start is not None:
            ok = [s for s in states if call.start in free_starts(s.geometry, s.layout, s.geometry.profile(pid))]
            d = Decision(ok[0].key, call.start, pid, 0.0) if ok else None
        if d is not None and (best is None or d.score < best[0].score):
            best = (d, pid)
    if best is None:
        raise CapacityError(f"no capacity: no legal placement for {profile} on any MIG GPU "
                            f"(free slices may be fragmented: see 'gpuvirt plan --defrag --for {profile}')")
    d, pid = best
    g = next(g for g, _ in cands if g.address == d.gpu_key)
    fields = instance_fields_for_mig(g.model, pid, d.start, "attach", call.persistent)
    if not backing:
        _quota_precheck(ctx, call.tenant, fields)
    alloc = call.alloc(quota=not backing)
    if backing:
        alloc["tenant"] = None      # named when the vGPU on it is recorded (see intent_steps._VgpuLike._link_backing)
    step = intent.mig_step(g.address, ids[g.address], g.nvml_index, pid, d.start, fields["placement_size"],
                           present=True, fields=fields, alloc=alloc,
                           label=f"GPU instance {fields['profile_name']} at {d.start} on {g.label} for {call.vm}")
    return _run_create(call, step)


def _vgpu_board_room(g: GpuView, type_id: int, interface: str | None) -> tuple[int, str | None]:
    """(room, parent to use) for one more vGPU of ``type_id`` on this GPU, as sysfs says now."""
    tdir = f"nvidia-{type_id}"
    if interface == "vendor-vfio":
        free = [vf for vf in g.vfio_vfs if not vf["current_type"]]
        ok = [vf for vf in free if any(t["id"] == type_id for t in vf["creatable_types"])]
        return len(ok), (ok[0]["address"] if ok else None)
    parents = [p for p in g.mdev_parents if g.parent_types.get(p, {}).get(tdir, {}).get("available_instances", 0) > 0]
    room = sum(g.parent_types[p][tdir]["available_instances"] for p in parents)
    return room, (parents[0] if parents else None)


def _create_vgpu_for(call: _Call, ref: str, gpus: list[GpuView], policy: str, mig_policy: str) -> int:
    from gpuvirt.model.planner import VgpuBoard, choose_vgpu_gpu

    ctx, vm = call.ctx, call.vm
    typed = []
    for g in gpus:
        if g.model is None or g.model.vgpu is None:
            continue
        try:
            typed.append((g, resolve_vgpu_type(g.model, ref)))
        except GpuvirtError:
            continue
    if not typed:
        raise ProfileError(f"no GPU on this host offers vGPU type '{ref}'")
    ids = _gpu_ids(ctx, gpus)
    call.lock([g.address for g, _ in typed])

    def choose(fresh: Any) -> tuple[str | None, dict[str, tuple[GpuView, Any, str | None]]]:
        boards = []
        new_gi_boards = []
        parents: dict[str, tuple[GpuView, Any, str | None]] = {}
        for g, t in typed:
            fg = fresh.by_address(g.address)
            if fg is None or (g.model.vgpu.parent == "vf" and not fg.sriov_num):
                continue                    # a VF-parent board without VFs has nowhere to put a vGPU
            if t.mig_backed and not _has_free_gi(ctx, fg, t):
                # a MIG-backed vGPU needs a GPU instance of its profile first: only where one can be made
                room = _gi_room(fg, t)
                if room:
                    new_gi_boards.append(VgpuBoard(fg.address, (), room))
                    parents[fg.address] = (fg, t, None)
                continue
            room, parent = _vgpu_board_room(fg, t.id, fg.interface)
            existing = tuple((int(d["type"][7:]), 0) for d in fg.mdev_devices
                             if d["type"].startswith("nvidia-"))
            boards.append(VgpuBoard(fg.address, existing, room))
            parents[fg.address] = (fg, t, parent)
        # GPU instances already there are used before new ones are carved out of free slices
        key = choose_vgpu_gpu(boards, typed[0][1].id, policy) or \
            choose_vgpu_gpu(new_gi_boards, typed[0][1].id, policy)
        return key, parents

    fresh = hostview.snapshot(ctx)
    key, parents = choose(fresh)
    if key is None:
        # VF-parent boards carry vGPUs on SR-IOV VFs.  With none enabled (after a boot where nothing recorded
        # needed them, or on a host set up by hand) enable them on one board, as apply would (with 0 VFs
        # nothing is lost), and only when no board has room as it is.  A step of this call: undone with it.
        failure: GpuvirtError | None = None
        for g, _t in typed:
            fg = fresh.by_address(g.address)
            if fg is None or g.model.vgpu.parent != "vf" or not fg.sriov_total or fg.sriov_num:
                continue
            i = call.run.add(intent.vfs_step(fg.address, ids[fg.address], fg.sriov_total, present=True))
            try:
                call.run.run(i)
                fresh = hostview.snapshot(ctx)
                key, parents = choose(fresh)
            except GpuvirtError as exc:
                failure, key = exc, None    # this board would not take VFs: try the next one
            if key is not None:
                break
            with contextlib.suppress(GpuvirtError):
                intent.op_of(ctx, call.run.steps[i]).backward()
            fresh = hostview.snapshot(ctx)
        if key is None and failure is not None:
            raise failure
    if key is None:
        raise CapacityError(f"no capacity: no GPU on this host can take another {ref} vGPU now")
    g, t, parent = parents[key]
    charged = instance_fields_for_vgpu(g.model, MDEV, f"nvidia-{t.id}", t.name, "", None, "attach", call.persistent)
    _add_slices(charged, g, t)
    _quota_precheck(ctx, call.tenant, charged)  # before the backing GPU instance, too
    backing = None
    if t.mig_backed:
        gi_name = g.model.mig.profile(t.gpu_instance_profile_id).name  # type: ignore[union-attr]
        free_gi = _free_gi_row(ctx, g, t)
        if free_gi is None:
            gi_id = _create_mig_for(call, gi_name, [g], mig_policy, backing=True)
        else:
            gi_id = free_gi
            with ctx.inventory.unit(write=True, action=f"attach {ref} to {vm}") as uow:
                gi = uow.instance(gi_id)
                if gi.allocation is None:
                    uow.allocate(gi, vm_name=vm, vm_uuid=call.vm_uuid, tenant=None, persistent=call.persistent)
                    call.run.add_done(uow, intent.allocate_step(g.address, gi_id,
                                                                dict(call.alloc(quota=False), tenant=None)))
        with ctx.inventory.unit() as uow:
            gi = uow.instance(gi_id)
            backing = (gi.profile_id, gi.placement_start)
        fresh = hostview.snapshot(ctx)
        g = fresh.by_address(g.address) or g
        room, parent = _vgpu_board_room(g, t.id, g.interface)
        if parent is None:
            raise CapacityError(f"no capacity: no free VF on {g.label} for {ref}")
    if parent is None:
        raise CapacityError(f"no capacity: no free parent on {g.label} for {ref}")
    if g.interface == "vendor-vfio":
        fields = instance_fields_for_vgpu(g.model, VFIO_VGPU, str(t.id), t.name, parent, None, "attach",
                                          call.persistent)
        _add_slices(fields, g, t)
        step = intent.vgpu_step(g.address, ids[g.address], parent, t.id, present=True, fields=fields,
                                alloc=call.alloc(), backing=backing, label=f"vGPU {t.name} on VF {parent} for {vm}")
    else:
        uuid = new_uuid()
        fields = instance_fields_for_vgpu(g.model, MDEV, f"nvidia-{t.id}", t.name, parent, uuid, "attach",
                                          call.persistent)
        _add_slices(fields, g, t)
        step = intent.mdev_step(g.address, ids[g.address], parent, f"nvidia-{t.id}", uuid, present=True,
                                fields=fields, alloc=call.alloc(), backing=backing,
                                label=f"vGPU {t.name} {uuid} on {parent} for {vm}")
    return _run_create(call, step)


def _add_slices(fields: dict[str, Any], g: GpuView, t: Any) -> None:
    if t.mig_backed and g.model and g.model.mig:
        fields["compute_slices"] = g.model.mig.profile(t.gpu_instance_profile_id).compute_slices


def _gi_room(g: GpuView, t: Any) -> int:
    """How many GPU instances of the MIG-backed type's profile could still be created on ``g``."""
    from gpuvirt.model.mig import remaining_capacity

    if not (g.mig_capable and g.mig_current and g.model and g.model.mig):
        return 0
    geom = g.model.mig
    return remaining_capacity(geom, list(g.layout()), geom.profile(t.gpu_instance_profile_id))


def _has_free_gi(ctx: Context, g: GpuView, t: Any) -> bool:
    return _free_gi_row(ctx, g, t) is not None


def _free_gi_row(ctx: Context, g: GpuView, t: Any) -> int | None:
    with ctx.inventory.unit() as uow:
        gpu = next((r for r in uow.gpus(ctx.settings.host_id) if r.address == g.address), None)
        if gpu is None:
            return None
        for r in uow.instances(ctx.settings.host_id, gpu_id=gpu.id, kinds=[MIG], states=["active"]):
            if r.profile_id == t.gpu_instance_profile_id and r.allocation is None and not _backs_a_vgpu(uow, r):
                return r.id
    return None


def _mdev_type_dir(model: Any, ref: str) -> str:
    """The sysfs type directory a generic mdev reference names on ``model`` (profiles accept the short name,
    e.g. GVTg_V5_4 for i915-GVTg_V5_4, so attach does too); the reference itself where the catalog does not
    know the driver."""
    from gpuvirt.model.profile import find_mdev_type

    spec = model.mdev if model is not None else None
    t = find_mdev_type(spec, ref) if spec is not None else None
    return spec.type_dir(t) if t is not None else ref


def _create_generic_mdev_for(call: _Call, ref: str, gpus: list[GpuView]) -> int:
    ctx = call.ctx
    ids = _gpu_ids(ctx, gpus)
    for g in gpus:
        type_dir = _mdev_type_dir(g.model, ref)
        for p in g.mdev_parents:
            info = g.parent_types.get(p, {}).get(type_dir)
            if info and info["available_instances"] > 0:
                uuid = new_uuid()
                fields = instance_fields_for_vgpu(g.model, MDEV, type_dir, info.get("name"), p, uuid, "attach",
                                                  call.persistent)
                _quota_precheck(ctx, call.tenant, fields)
                call.lock([g.address])
                return _run_create(call, intent.mdev_step(g.address, ids[g.address], p, type_dir, uuid,
                                                          present=True, fields=fields, alloc=call.alloc(),
                                                          label=f"mdev {type_dir} {uuid} on {p} for {call.vm}"))
    offered = sorted({t for g in gpus for p in g.mdev_parents for t in g.parent_types.get(p, {})})
    if not any(_mdev_type_dir(g.model, ref) in g.parent_types.get(p, {}) for g in gpus for p in g.mdev_parents):
        # a name no parent registers is a typo, not a full host
        shown = ", ".join(offered[:12]) + (" ..." if len(offered) > 12 else "")
        raise UsageError(f"no mdev parent on this host offers type '{ref}' (types: {shown or 'none'})")
    raise CapacityError(f"no capacity: no mdev parent on this host can create {ref} now")


def allocations(ctx: Context, vm: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
    with ctx.inventory.unit() as uow:
        return [{"vm": a.vm_name, "vm_uuid": a.vm_uuid, "tenant": a.tenant, "persistent": a.persistent,
                 "vm_state": a.vm_state, "instance": a.instance_id, "label": a.instance.label,
                 "gpu": a.instance.gpu.address, "kind": a.instance.kind, "consumer": a.consumer or CONSUMER_VM}
                for a in uow.allocations(host_id=ctx.settings.host_id, vm_name=vm, tenant=tenant)]


__all__ = ["attach", "allocations", "check_vm_name", "handoff_for", "Placed"]
