"""Creating and destroying instances on the host, journalled in the inventory.

Every change follows the same three steps, each its own committed inventory transaction around the host
operation, so that a crash at any point leaves enough behind for ``reconcile`` to finish the job:

    create:  row(state=creating) -> host create -> row(state=active, host ids)
    destroy: row(state=destroying) -> host destroy -> row deleted

If the host operation fails, the row is removed again (create) or set back to active (destroy) and the
failure is recorded as an event; the caller decides whether to roll back what it did before.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import uuid as uuid_mod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from gpuvirt.context import Context
from gpuvirt.errors import GpuvirtError
from gpuvirt.inventory.models import ACTIVE, CREATING, DESTROYING, MDEV, MIG, VF, VFIO_VGPU
from gpuvirt.model.catalog import GpuModel
from gpuvirt.safefs import open_lock_file


# --- host primitives ---------------------------------------------------------------------------------------
def create_mig(ctx: Context, index: int, profile_id: int, start: int) -> dict[str, Any]:
    """GPU instance at an explicit placement plus its full-size compute instance (atomic: a failed compute
    instance removes the GPU instance again)."""
    nvml = ctx.host.nvml()
    gi = nvml.create_gpu_instance(index, profile_id, start)
    try:
        ci = nvml.create_compute_instance(index, gi.id)
    except GpuvirtError:
        with contextlib.suppress(GpuvirtError):
            nvml.destroy_gpu_instance(index, gi.id)
        raise
    return {"gi_id": gi.id, "ci_id": ci.id, "mig_uuid": ci.uuid, "placement_start": gi.start,
            "placement_size": gi.size}


def destroy_mig(ctx: Context, index: int, gi_id: int) -> None:
    nvml = ctx.host.nvml()
    for gi in nvml.gpu_instances(index):
        if gi.id == gi_id:
            for ci in gi.compute_instances:
                nvml.destroy_compute_instance(index, gi_id, ci.id)
            nvml.destroy_gpu_instance(index, gi_id)
            return


def find_gi(ctx: Context, index: int, profile_id: int, start: int) -> Any:
    for gi in ctx.host.nvml().gpu_instances(index):
        if gi.profile_id == profile_id and gi.start == start:
            return gi
    return None


def new_uuid() -> str:
    return str(uuid_mod.uuid4())


# --- locking ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def gpu_lock(ctx: Context, address: str) -> Iterator[None]:
    """One writer per GPU on this host (apply, reconcile, attach and the hook all take it).

    Re-entrant within a thread: flock() conflicts between two descriptors of the same file even in one
    process, so a nested take (attach creating the GPU instance for a MIG-backed vGPU while it already holds
    the GPU) would otherwise wait for itself forever.
    """
    d = ctx.settings.state_dir / "locks"
    path = d / f"gpu-{address.replace(':', '_')}.lock"
    key = (threading.get_ident(), str(path))
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    try:
        # the state and lock directories must be trusted and the lock file no link (gpuvirt.safefs)
        fd = open_lock_file(path, state_dir=ctx.settings.state_dir)
    except OSError:
        # read-only state directory: nothing else can change it either; the inventory still serialises
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with _HELD_GUARD:
            _HELD[key] = 1
        yield
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


_HELD: dict[tuple[int, str], int] = {}
_HELD_GUARD = threading.Lock()


# --- journal -----------------------------------------------------------------------------------------------------
@dataclass
class Undo:
    description: str
    run: Callable[[], None]


@dataclass
class Journal:
    ctx: Context
    actor: str | None = None
    done: list[Undo] = field(default_factory=list)

    def _event(self, uow: Any, action: str, target: str, result: str = "ok", **detail: Any) -> None:
        uow.event(action, target=target, result=result, detail=detail or None, actor=self.actor)

    def create(self, gpu_id: int, fields: dict[str, Any], do: Callable[[], dict[str, Any]],
               label: str, undo: Callable[[int], None] | None = None,
               on_active: Callable[[Any, Any], None] | None = None,
               cleanup: Callable[[], None] | None = None) -> int:
        """Journal a create; returns the inventory instance id.

        ``on_active(uow, row)`` runs in the same transaction that makes the row active - attach uses it to
        allocate the new instance before any other process can see it as free.  If that transaction fails
        (a quota refusal, a lost race), ``cleanup()`` removes the object from the host again and the row is
        dropped, so nothing is left half-made; without ``cleanup`` the row stays ``creating`` for reconcile.
        """
        inv = self.ctx.inventory
        host_id = self.ctx.settings.host_id
        with inv.unit(write=True, action=f"record {label}") as uow:
            inst = uow.add_instance(host_id=host_id, gpu_id=gpu_id, state=CREATING, **fields)
            inst_id = inst.id
        try:
            result = do()
        except BaseException as exc:
            with inv.unit(write=True) as uow:
                row = uow.session.get(type(inst), inst_id)
                if row is not None:
                    uow.delete_instance(row)
                self._event(uow, "create", label, "failed", error=str(exc))
            raise
        try:
            with inv.unit(write=True, action=f"record {label}") as uow:
                row = uow.instance(inst_id)
                for k, v in result.items():
                    setattr(row, k, v)
                row.state = ACTIVE
                row.error = None
                if on_active is not None:
                    on_active(uow, row)
                self._event(uow, "create", label, instance=inst_id)
        except BaseException as exc:
            if cleanup is not None:
                try:
                    cleanup()
                    with inv.unit(write=True) as uow:
                        row = uow.session.get(_instance_cls(), inst_id)
                        if row is not None:
                            uow.delete_instance(row)
                        self._event(uow, "create", label, "failed", error=str(exc), undone=True)
                except GpuvirtError:
                    pass  # the row stays 'creating': reconcile finishes or removes it
            raise
        if undo is not None:
            self.done.append(Undo(f"destroy {label}", lambda: undo(inst_id)))
        return inst_id

    def destroy(self, instance_id: int | None, do: Callable[[], None], label: str,
                undo: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """Journal a destroy; returns a snapshot of the row (and its allocation) for a later restore."""
        inv = self.ctx.inventory
        snap = None
        if instance_id is not None:
            with inv.unit(write=True, action=f"record {label}") as uow:
                row = uow.instance(instance_id)
                snap = snapshot_row(row)
                row.state = DESTROYING
        try:
            do()
        except BaseException as exc:
            with inv.unit(write=True) as uow:
                if instance_id is not None:
                    row = uow.session.get(_instance_cls(), instance_id)
                    if row is not None:
                        row.state = ACTIVE
                self._event(uow, "destroy", label, "failed", error=str(exc))
            raise
        with inv.unit(write=True, action=f"record {label}") as uow:
            if instance_id is not None:
                row = uow.session.get(_instance_cls(), instance_id)
                if row is not None:
                    uow.delete_instance(row)
            self._event(uow, "destroy", label, **({"instance": instance_id} if instance_id else {}))
        if undo is not None:
            restored = snap
            self.done.append(Undo(f"recreate {label}", lambda: undo(restored or {})))
        return snap

    def rollback(self) -> list[str]:
        """Undo what this journal did, newest first; returns the failures (empty = clean rollback)."""
        failures = []
        while self.done:
            u = self.done.pop()
            try:
                u.run()
            except GpuvirtError as exc:
                failures.append(f"{u.description}: {exc}")
        return failures


def _instance_cls():
    from gpuvirt.inventory.models import Instance

    return Instance


SNAP_FIELDS = ("kind", "origin", "persistent", "profile_id", "profile_name", "placement_start", "placement_size",
               "gi_id", "ci_id", "mig_uuid", "compute_slices", "mdev_uuid", "parent", "type_id", "type_name",
               "memory_mib", "backing_instance_id", "gpu_id")


def snapshot_row(row: Any) -> dict[str, Any]:
    snap = {k: getattr(row, k) for k in SNAP_FIELDS}
    if row.allocation is not None:
        a = row.allocation
        snap["allocation"] = {"vm_name": a.vm_name, "vm_uuid": a.vm_uuid, "tenant": a.tenant,
                              "persistent": a.persistent}
    return snap


def instance_fields_for_mig(model: GpuModel | None, profile_id: int, start: int, origin: str,
                            persistent: bool = True) -> dict[str, Any]:
    prof = model.mig.profile(profile_id) if model and model.mig else None
    return {"kind": MIG, "origin": origin, "persistent": persistent, "profile_id": profile_id,
            "profile_name": prof.name if prof else str(profile_id), "placement_start": start,
            "placement_size": prof.memory_slices if prof else None,
            "compute_slices": prof.compute_slices if prof else None,
            "memory_mib": prof.memory_mib if prof else None}


def instance_fields_for_vgpu(model: GpuModel | None, kind: str, type_id: str, type_name: str | None, parent: str,
                             mdev_uuid: str | None, origin: str, persistent: bool = True) -> dict[str, Any]:
    mem = None
    if model and model.vgpu and kind in (MDEV, VFIO_VGPU):
        from gpuvirt.model.vgpu import parse_type_id

        tid = parse_type_id(type_id)
        t = next((t for t in model.vgpu.types if t.id == tid), None)
        if t is not None:
            mem, type_name = t.framebuffer_mib, type_name or t.name
    return {"kind": kind, "origin": origin, "persistent": persistent, "type_id": type_id, "type_name": type_name,
            "parent": parent, "mdev_uuid": mdev_uuid, "memory_mib": mem}


def vf_fields(parent: str, origin: str, memory_mib: int | None = None) -> dict[str, Any]:
    return {"kind": VF, "origin": origin, "persistent": True, "parent": parent, "type_id": "vf",
            "type_name": "whole VF", "memory_mib": memory_mib}


__all__ = ["create_mig", "destroy_mig", "find_gi", "new_uuid", "gpu_lock", "Journal", "snapshot_row",
           "instance_fields_for_mig", "instance_fields_for_vgpu", "vf_fields", "Path"]
