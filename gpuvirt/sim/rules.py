"""The drivers' capacity rules, as the simulator applies them (pure functions over the state document).

* NVIDIA vGPU, per board (``vgpu.policy`` in the catalog; NVIDIA documents three behaviours):
  ``same-type``  - one vGPU type per physical GPU; at most ``max_instance`` of it;
  ``same-size``  - any types of the same framebuffer size may coexist (A2 fixture: after nothing was
                   created the 4096M types show 1 on a VF; RTXA6000 after one 2Q: 2B/2Q/2A show 23);
  ``mixed-size`` - vGPU 17+: different sizes coexist while the framebuffer lasts, with a per-type maximum.
  SR-IOV boards host at most one vGPU per VF, so a VF's ``available_instances`` is 0 or 1.
  MIG-backed types need MIG mode on and a GPU instance of their profile that hosts no vGPU yet; time-sliced
  and MIG-backed types never mix on one GPU.
* Generic mdev drivers (GVT-g, mtty, mdpy, mbochs): every type draws from one shared pool on the parent;
  ``available_instances = min over resources of free // cost``.
"""

from __future__ import annotations

from typing import Any, Iterable

from gpuvirt.model.catalog import GpuModel, MdevDriverSpec, MdevPoolType, VgpuType, load_catalog


def model_of(device: dict[str, Any]) -> GpuModel:
    return load_catalog().get(device["model"])


def device_interface(state: dict[str, Any], device: dict[str, Any]) -> str | None:
    model = model_of(device)
    if model.vgpu is None:
        return None
    return state.get("vgpu_interface") or device.get("interface") or model.vgpu.interface


def vf_present(vf: dict[str, Any]) -> bool:
    """Has the VF function appeared yet (``appear_at`` is set only while it is on its way)?"""
    return "appear_at" not in vf


def registered(obj: dict[str, Any]) -> bool:
    """Are the vGPU types of this parent (a VF, or a PF that is the mdev parent) registered by nvidia-vgpud?
    Pending while ``register_at`` is set; ``registered: false`` after a failed registration."""
    return "register_at" not in obj and obj.get("registered", True) is not False


def needs_registration(state: dict[str, Any], device: dict[str, Any], *, pf: bool) -> bool:
    """Does this board's vGPU manager register types on its VFs (``pf`` False) or on the PF itself?"""
    model = model_of(device)
    if model.vgpu is None:
        return False
    if pf:
        return model.vgpu.parent == "pf" and device_interface(state, device) == "mdev"
    return model.vgpu.parent == "vf"


def board_parents(device: dict[str, Any]) -> set[str]:
    """Names of every mdev parent that belongs to this board (the PF and its VFs)."""
    names = {vf["address"] for vf in device.get("vfs", [])}
    if device.get("address"):
        names.add(device["address"])
    if device.get("name"):
        names.add(device["name"])
    return names


def board_vgpus(state: dict[str, Any], device: dict[str, Any]) -> list[tuple[int, int | None]]:
    """(type id, gpu_instance_id) of every vGPU that exists on the board, whichever interface made it."""
    parents = board_parents(device)
    out: list[tuple[int, int | None]] = []
    for m in state.get("mdevs", []):
        if m["parent"] in parents and m["type"].startswith("nvidia-"):
            out.append((int(m["type"].split("-", 1)[1]), m.get("gpu_instance_id")))
    for vf in device.get("vfs", []):
        if vf.get("current_vgpu_type"):
            out.append((int(vf["current_vgpu_type"]), vf.get("gpu_instance_id")))
    return out


def mig_enabled(device: dict[str, Any]) -> bool:
    mig = device.get("mig")
    return bool(mig and mig.get("current"))


def free_gpu_instance_for(state: dict[str, Any], device: dict[str, Any], vtype: VgpuType) -> int | None:
    """Lowest GPU-instance id of the type's profile that hosts no vGPU (UNVERIFIED choice of GI)."""
    if not mig_enabled(device):
        return None
    taken = {gi for _, gi in board_vgpus(state, device) if gi is not None}
    for gi in sorted(device["mig"]["gpu_instances"], key=lambda g: g["id"]):
        if gi["profile_id"] == vtype.gpu_instance_profile_id and gi["id"] not in taken:
            return gi["id"]
    return None


def board_room(state: dict[str, Any], device: dict[str, Any], vtype: VgpuType) -> int:
    """How many more vGPUs of ``vtype`` the board could take, ignoring how many free VFs it has."""
    model = model_of(device)
    assert model.vgpu is not None
    existing = board_vgpus(state, device)
    types = {t.id: t for t in model.vgpu.types}
    ex_types = [types.get(tid) for tid, _ in existing]
    if any(t is None for t in ex_types):
        return 0
    if vtype.mig_backed:
        if not mig_enabled(device) or any(not t.mig_backed for t in ex_types):  # type: ignore[union-attr]
            return 0
        taken = {gi for _, gi in existing if gi is not None}
        return sum(1 for gi in device["mig"]["gpu_instances"]
                   if gi["profile_id"] == vtype.gpu_instance_profile_id and gi["id"] not in taken)
    if mig_enabled(device) or any(t.mig_backed for t in ex_types):  # type: ignore[union-attr]
        return 0
    policy = model.vgpu.policy
    if policy == "same-type":
        if any(t.id != vtype.id for t in ex_types):  # type: ignore[union-attr]
            return 0
        return max(0, vtype.max_instances - len(ex_types))
    if policy == "same-size":
        if any(t.framebuffer_mib != vtype.framebuffer_mib for t in ex_types):  # type: ignore[union-attr]
            return 0
        return max(0, vtype.max_instances - len(ex_types))
    # mixed-size: framebuffer budget plus the type's own maximum in mixed mode
    used = sum(t.framebuffer_mib for t in ex_types)  # type: ignore[union-attr]
    same = sum(1 for t in ex_types if t.id == vtype.id)  # type: ignore[union-attr]
    cap = vtype.mixed_size_max if vtype.mixed_size_max is not None else vtype.max_instances
    by_memory = (model.memory_mib - used) // vtype.framebuffer_mib if vtype.framebuffer_mib else 0
    return max(0, min(cap - same, by_memory))


def vf_has_vgpu(state: dict[str, Any], vf: dict[str, Any]) -> bool:
    if vf.get("current_vgpu_type"):
        return True
    return any(m["parent"] == vf["address"] for m in state.get("mdevs", []))


def vgpu_available(state: dict[str, Any], device: dict[str, Any], parent: str, vtype: VgpuType) -> int:
    """``available_instances`` of ``nvidia-<id>`` under mdev parent ``parent`` (PF or VF) of ``device``."""
    room = board_room(state, device, vtype)
    model = model_of(device)
    assert model.vgpu is not None
    if model.vgpu.parent == "vf":
        vf = next((v for v in device.get("vfs", []) if v["address"] == parent), None)
        if vf is None or vf_has_vgpu(state, vf) or not vf_present(vf) or not registered(vf):
            return 0
        return 1 if room > 0 else 0
    return room if registered(device) else 0


def creatable_types(state: dict[str, Any], device: dict[str, Any]) -> list[VgpuType]:
    """Types the board could take one more of (what ``creatable_vgpu_types`` / NVML creatable list show)."""
    model = model_of(device)
    if model.vgpu is None:
        return []
    return [t for t in model.vgpu.types if board_room(state, device, t) > 0]


# --- generic mdev pools ----------------------------------------------------------------------------------------
def registered_pool_types(spec: MdevDriverSpec) -> list[MdevPoolType]:
    """Types the driver registers: one whose cost exceeds the whole pool is never registered (GVT-g)."""
    return [t for t in spec.types if all(spec.pool.get(r, 0) >= c for r, c in t.cost.items())]


def pool_used(spec: MdevDriverSpec, mdevs: Iterable[dict[str, Any]], parent: str) -> dict[str, int]:
    used = {r: 0 for r in spec.pool}
    by_dir = {spec.type_dir(t): t for t in spec.types}
    for m in mdevs:
        if m["parent"] != parent:
            continue
        t = by_dir.get(m["type"])
        if t is None:
            continue
        for r, c in t.cost.items():
            used[r] = used.get(r, 0) + c
    return used


def pool_available(spec: MdevDriverSpec, mdevs: Iterable[dict[str, Any]], parent: str, t: MdevPoolType) -> int:
    used = pool_used(spec, mdevs, parent)
    return max(0, min((spec.pool[r] - used.get(r, 0)) // c for r, c in t.cost.items() if c > 0))
