"""Host primitives for instances (MIG ensure/remove), the per-GPU locks, and the inventory fields of instances.

The journal that makes multi-step changes crash-safe is :mod:`gpuvirt.service.intent`; the functions here are
the idempotent pieces its steps are made of.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import uuid as uuid_mod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from gpuvirt.context import Context
from gpuvirt.inventory.kinds import MDEV, MIG, VF, VFIO_VGPU
from gpuvirt.safefs import open_lock_file

if TYPE_CHECKING:  # pragma: no cover - the catalog is large; the hook's fast path takes locks without it
    from gpuvirt.model.catalog import GpuModel


# --- host primitives ---------------------------------------------------------------------------------------
def ensure_mig(ctx: Context, index: int, profile_id: int, start: int) -> dict[str, Any]:
    """The GPU instance at (profile, start) with its full-size compute instance, from whatever part exists:
    a GPU instance left without its compute instance (a crash between the two NVML calls) gets one."""
    nvml = ctx.host.nvml()
    gi = find_gi(ctx, index, profile_id, start)
    if gi is None:
        gi = nvml.create_gpu_instance(index, profile_id, start)
    ci = gi.compute_instances[0] if gi.compute_instances else None
    if ci is None:
        ci = nvml.create_compute_instance(index, gi.id)
    return {"gi_id": gi.id, "ci_id": ci.id, "mig_uuid": ci.uuid, "placement_start": gi.start,
            "placement_size": gi.size}


def remove_mig(ctx: Context, index: int, profile_id: int, start: int) -> None:
    """No GPU instance at (profile, start) any more: its compute instances first, then the instance."""
    gi = find_gi(ctx, index, profile_id, start)
    if gi is not None:
        nvml = ctx.host.nvml()
        for ci in gi.compute_instances:
            nvml.destroy_compute_instance(index, gi.id, ci.id)
        nvml.destroy_gpu_instance(index, gi.id)


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

    Another host of a shared inventory reached through a peer session (:mod:`gpuvirt.service.peers`) takes
    the lock in its own process there, so it ends with that process.
    """
    remote = getattr(ctx, "remote_lock", None)
    if remote is not None:
        with remote(address):
            yield
        return
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


def lock_busy(ctx: Context, address: str) -> bool:
    """Does some process hold this GPU's lock right now (an operation in progress, not a crashed one)?"""
    if any(k[1] == str(_lock_path(ctx, address)) for k in list(_HELD)):
        return False                    # this process: not "another"
    try:
        fd = os.open(_lock_path(ctx, address), os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _lock_path(ctx: Context, address: str) -> Path:
    return ctx.settings.state_dir / "locks" / f"gpu-{address.replace(':', '_')}.lock"


_HELD: dict[tuple[int, str], int] = {}
_HELD_GUARD = threading.Lock()


SNAP_FIELDS = ("kind", "origin", "persistent", "profile_id", "profile_name", "placement_start", "placement_size",
               "gi_id", "ci_id", "mig_uuid", "compute_slices", "mdev_uuid", "parent", "type_id", "type_name",
               "memory_mib", "backing_instance_id", "gpu_id")


def row_fields(row: Any) -> dict[str, Any]:
    """What re-creating ``row`` needs (its host ids are read again from the host; links by key, not id)."""
    return {k: getattr(row, k) for k in SNAP_FIELDS
            if k not in ("gpu_id", "backing_instance_id", "gi_id", "ci_id", "mig_uuid")}


def row_allocation(row: Any) -> dict[str, Any] | None:
    a = row.allocation
    if a is None:
        return None
    return {"vm_name": a.vm_name, "vm_uuid": a.vm_uuid, "tenant": a.tenant, "persistent": a.persistent,
            "consumer": a.consumer or "vm"}


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


__all__ = ["ensure_mig", "remove_mig", "find_gi", "new_uuid", "gpu_lock", "lock_busy", "row_fields",
           "row_allocation", "instance_fields_for_mig", "instance_fields_for_vgpu", "vf_fields", "Path"]
