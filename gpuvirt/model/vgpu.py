"""vGPU capacity rules of a board (pure): how many more vGPUs of a type the driver would accept now.

The same rules the simulated driver applies to sysfs writes, restated over plain inputs so that a capacity
report can be computed from inventory rows on any host, without the board at hand:

* ``model``          - the catalog entry of the board (its ``vgpu.policy``, ``vgpu.parent``, type table);
* ``existing``       - the numeric type ids of every vGPU on the board now, whichever interface made it;
* ``mig_enabled``    - whether MIG mode is on;
* ``gpu_instances``  - the GPU-instance profile ids present (one entry per GPU instance), MIG mode only;
* ``free_parents``   - SR-IOV boards: enabled VFs that host no vGPU yet (``None`` for PF-parent boards).

Policies (catalog ``vgpu.policy``): ``same-type`` allows one type per board up to its maximum;
``same-size`` allows types of one framebuffer size together, up to the type's maximum; ``mixed-size``
allows any sizes while the board's framebuffer lasts, with the type's mixed-mode maximum.  MIG-backed
types need MIG mode and one GPU instance of their profile per vGPU; time-sliced and MIG-backed types never
share a board.  On SR-IOV boards every vGPU occupies its own VF, so a VF offers 0 or 1.

Generic mdev drivers (GVT-g, the kernel's sample drivers) are covered by :func:`pool_available`: every type
draws fixed costs from one pool per parent.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

from gpuvirt.model.catalog import GpuModel, MdevDriverSpec, MdevPoolType, VgpuType


def parse_type_id(type_id: str | int | None) -> int | None:
    """Numeric vGPU type id from an mdev type dir (``nvidia-468``), a vendor-VFIO id (``1145``) or an int;
    None for anything else (generic mdev types, whole VFs)."""
    if type_id is None:
        return None
    if isinstance(type_id, int):
        return type_id
    text = type_id[7:] if type_id.startswith("nvidia-") else type_id
    return int(text) if text.isdigit() else None


def board_room(model: GpuModel, vtype: VgpuType, existing: Sequence[int], *, mig_enabled: bool,
               gpu_instances: Sequence[int] = ()) -> int:
    """How many more vGPUs of ``vtype`` the board's type rules allow, before counting free parents."""
    spec = model.vgpu
    if spec is None:
        return 0
    types = {t.id: t for t in spec.types}
    present = [types.get(tid) for tid in existing]
    if any(t is None for t in present):
        # a type the catalog does not know is on the board: its rules are unknown, promise nothing
        return 0
    ex = [t for t in present if t is not None]
    if vtype.mig_backed:
        if not mig_enabled or any(not t.mig_backed for t in ex):
            return 0
        pid = vtype.gpu_instance_profile_id
        hosts = sum(1 for p in gpu_instances if p == pid)
        # each MIG-backed vGPU sits on its own GPU instance of its type's profile
        taken = sum(1 for t in ex if t.gpu_instance_profile_id == pid)
        return max(0, hosts - taken)
    if mig_enabled or any(t.mig_backed for t in ex):
        return 0
    if spec.policy == "same-type":
        if any(t.id != vtype.id for t in ex):
            return 0
        return max(0, vtype.max_instances - len(ex))
    if spec.policy == "same-size":
        if any(t.framebuffer_mib != vtype.framebuffer_mib for t in ex):
            return 0
        return max(0, vtype.max_instances - len(ex))
    used = sum(t.framebuffer_mib for t in ex)
    same = sum(1 for t in ex if t.id == vtype.id)
    cap = vtype.mixed_size_max if vtype.mixed_size_max is not None else vtype.max_instances
    by_memory = (model.memory_mib - used) // vtype.framebuffer_mib if vtype.framebuffer_mib else 0
    return max(0, min(cap - same, by_memory))


def available(model: GpuModel, vtype: VgpuType, existing: Sequence[int], *, mig_enabled: bool,
              gpu_instances: Sequence[int] = (), free_parents: int | None = None) -> int:
    """vGPUs of ``vtype`` that could be created one after another now (the sum of ``available_instances``
    over the board's parents as creation proceeds).

    On VF-parent boards each creation uses one free VF and lowers the board's room by one, so the answer is
    the smaller of the two; a PF-parent board is limited by its room alone.
    """
    room = board_room(model, vtype, existing, mig_enabled=mig_enabled, gpu_instances=gpu_instances)
    if model.vgpu is not None and model.vgpu.parent == "vf":
        return max(0, min(room, free_parents or 0))
    return room


def availability(model: GpuModel, existing: Sequence[int], *, mig_enabled: bool,
                 gpu_instances: Sequence[int] = (), free_parents: int | None = None) -> dict[int, int]:
    """``available`` for every type of the board, by type id."""
    if model.vgpu is None:
        return {}
    return {t.id: available(model, t, existing, mig_enabled=mig_enabled, gpu_instances=gpu_instances,
                            free_parents=free_parents) for t in model.vgpu.types}


def free_vfs(enabled_vfs: int | None, vgpus_on_board: int) -> int:
    """Enabled VFs that host no vGPU: every vGPU of an SR-IOV board occupies exactly one VF."""
    return max(0, (enabled_vfs or 0) - vgpus_on_board)


# --- generic mdev pools ----------------------------------------------------------------------------------------
def registered_pool_types(spec: MdevDriverSpec) -> list[MdevPoolType]:
    """Types the driver registers: one whose cost exceeds the whole pool is never offered."""
    return [t for t in spec.types if all(spec.pool.get(r, 0) >= c for r, c in t.cost.items())]


def pool_used(spec: MdevDriverSpec, existing_type_dirs: Iterable[str]) -> dict[str, int]:
    """Resources taken from one parent's pool by the mdevs on it (given by type dir, e.g. ``mtty-2``)."""
    by_dir = {spec.type_dir(t): t for t in spec.types}
    used = {r: 0 for r in spec.pool}
    for name, n in Counter(existing_type_dirs).items():
        t = by_dir.get(name)
        if t is None:
            continue
        for r, c in t.cost.items():
            used[r] = used.get(r, 0) + c * n
    return used


def pool_available(spec: MdevDriverSpec, t: MdevPoolType, used: Mapping[str, int]) -> int:
    """How many more mdevs of type ``t`` the parent's remaining pool allows."""
    costs = [(r, c) for r, c in t.cost.items() if c > 0]
    if not costs:
        return 0
    return max(0, min((spec.pool.get(r, 0) - used.get(r, 0)) // c for r, c in costs))


__all__ = ["parse_type_id", "board_room", "available", "availability", "free_vfs", "registered_pool_types",
           "pool_used", "pool_available"]
