"""Profile entries resolved for one GPU model (pure): the :class:`Layout` a GPU of that model must carry,
with every catalog rule checked - MIG profile names and placements, vGPU types and board rules, generic mdev
pools, the vGPU scheduler - and the nearest valid alternatives when a rule is broken."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from gpuvirt.errors import ProfileError
from gpuvirt.model.catalog import (
    GpuModel,
    MdevDriverSpec,
    MdevPoolType,
    MigGeometry,
    VgpuType,
    load_catalog,
    parse_vgpu_name,
    resolve_gi_profile,
    resolve_vgpu_type,
)
from gpuvirt.model.mig import Placed, all_valid_multisets, describe_counts, fits, pack_counts
from gpuvirt.model.vgpu_scheduler import SchedulerSpec, board_problem

from gpuvirt.model.profile import MAX_ALTERNATIVES, ProfileEntry, _join_named


# --- layouts -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """What one GPU of one model should carry, in the ids the host layer uses.

    ``mig_enabled`` None means the profile does not care about MIG mode (no MIG on the board, or an entry
    that only asks for generic mdevs or SR-IOV VFs); otherwise the GPU must be in that mode.  The GPU carries exactly the MIG
    GPU instances in ``mig_counts`` ({GI profile id: n}), the vGPUs in ``vgpu`` ({type id: n}) and the
    generic mdevs in ``mdev`` ({type dir: n}); ``sriov_vfs`` None leaves the VF count alone;
    ``vgpu_scheduler`` None leaves the GPU's vGPU scheduler policy alone.
    """

    model: str
    mig_enabled: bool | None = None
    mig_counts: dict[int, int] = field(default_factory=dict)
    vgpu: dict[int, int] = field(default_factory=dict)
    mdev: dict[str, int] = field(default_factory=dict)
    sriov_vfs: int | None = None
    vgpu_scheduler: SchedulerSpec | None = None
    gpu_model: GpuModel | None = field(default=None, compare=False, repr=False)

    def _model(self) -> GpuModel:
        return self.gpu_model if self.gpu_model is not None else load_catalog().get(self.model)

    def mig_placements(self) -> list[Placed]:
        """Explicit placements of ``mig_counts`` on an empty GPU (larger instances first, lowest starts)."""
        m = self._model()
        if not self.mig_counts or m.mig is None:
            return []
        placed = pack_counts(m.mig, self.mig_counts)
        if placed is None:  # resolve() only builds layouts that fit
            raise ProfileError(f"MIG layout {describe_counts(m.mig, self.mig_counts)} does not fit the "
                               f"{m.display_name}")
        return placed

    def describe(self) -> str:
        m = self._model()
        parts = []
        if self.mig_enabled is False:
            parts.append("MIG off")
        elif self.mig_enabled:
            parts.append("MIG on: " + (describe_counts(m.mig, self.mig_counts) if m.mig and self.mig_counts
                                        else "no instances"))
        if self.vgpu and m.vgpu:
            parts.append("vGPU " + " + ".join(
                (f"{n}x " if n > 1 else "") + f"{m.vgpu.type_by_id(t).name} ({m.vgpu.type_by_id(t).sysfs_id})"
                for t, n in self.vgpu.items()))
        if self.mdev:
            parts.append("mdev " + _join_named(self.mdev))
        if self.sriov_vfs is not None:
            parts.append(f"{self.sriov_vfs} SR-IOV VFs")
        if self.vgpu_scheduler is not None:
            parts.append(self.vgpu_scheduler.describe())
        return "; ".join(parts) if parts else "nothing"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "mig_enabled": self.mig_enabled,
                "mig_counts": {str(k): v for k, v in self.mig_counts.items()},
                "vgpu": {str(k): v for k, v in self.vgpu.items()}, "mdev": dict(self.mdev),
                "sriov_vfs": self.sriov_vfs,
                "vgpu_scheduler": self.vgpu_scheduler.to_dict() if self.vgpu_scheduler else None,
                "description": self.describe()}


def resolve(entry: ProfileEntry, model: GpuModel) -> Layout:
    """The layout ``entry`` asks for on one GPU of ``model``; ProfileError (one sentence) when it can't be.

    MIG mode follows from the entry when it does not say: MIG instances or MIG-backed vGPU types need it
    on, time-sliced vGPU types need it off (the driver offers them only with MIG disabled).
    """
    disp = model.display_name
    mig_enabled = entry.mig_enabled
    if (entry.mig or entry.mig_enabled) and model.mig is None:
        what = _join_named(entry.mig) if entry.mig else "MIG mode"
        raise ProfileError(f"the {disp} does not support MIG (asked for {what})", model=model.id)
    if model.mig is None:
        mig_enabled = None          # "mig-enabled: false" on a board without MIG: nothing to do, like mig-parted
    mig_counts: dict[int, int] = {}
    if entry.mig:
        mig_counts = _resolve_mig(entry.mig, model)
        mig_enabled = True
    vgpu: dict[int, int] = {}
    if entry.vgpu:
        vgpu, mig_backed = _resolve_vgpu(entry, model, mig_counts)
        if mig_backed:
            mig_enabled = True
        else:
            if mig_counts or entry.mig_enabled:
                raise ProfileError(f"time-sliced vGPU types ({_join_named(entry.vgpu)}) run only with MIG mode "
                                   f"off on the {disp}; drop the MIG part or use MIG-backed types",
                                   model=model.id)
            if model.mig is not None:
                mig_enabled = False
    if entry.vgpu_scheduler is not None:
        mig_enabled = _resolve_scheduler(entry, model, mig_enabled, vgpu)
    mdev = _resolve_mdev(entry.mdev, model) if entry.mdev else {}
    if entry.sriov_vfs is not None:
        if model.sriov is None:
            raise ProfileError(f"the {disp} has no SR-IOV virtual functions (asked for {entry.sriov_vfs} VFs)",
                               model=model.id)
        if entry.sriov_vfs > model.sriov.total_vfs:
            raise ProfileError(f"{entry.sriov_vfs} VFs exceed the {disp}'s maximum of {model.sriov.total_vfs}; "
                               f"valid: 0 to {model.sriov.total_vfs}", model=model.id)
    return Layout(model=model.id, mig_enabled=mig_enabled, mig_counts=mig_counts, vgpu=vgpu, mdev=mdev,
                  sriov_vfs=entry.sriov_vfs, vgpu_scheduler=entry.vgpu_scheduler, gpu_model=model)


def _resolve_scheduler(entry: ProfileEntry, model: GpuModel, mig_enabled: bool | None,
                       vgpu: Mapping[int, int]) -> bool | None:
    """The MIG mode a scheduler policy needs: off.  Policies apply to time-sliced vGPUs only (NVIDIA's vGPU
    documentation), so an entry with MIG instances, MIG mode or MIG-backed types cannot have one."""
    spec = entry.vgpu_scheduler
    assert spec is not None
    why = board_problem(model, spec)
    if why:
        raise ProfileError(why, model=model.id, field="vgpu_scheduler")
    assert model.vgpu is not None
    backed = [model.vgpu.type_by_id(t).name for t in vgpu if model.vgpu.type_by_id(t).mig_backed]
    if backed or mig_enabled:
        what = f"MIG-backed vGPU types ({', '.join(backed)})" if backed else "MIG mode"
        raise ProfileError(f"the {spec.describe()} applies to time-sliced vGPUs only, the entry asks for {what} on "
                           f"the {model.display_name}; drop vgpu_scheduler or use time-sliced types with MIG off",
                           model=model.id, field="vgpu_scheduler")
    return False if model.mig is not None else mig_enabled


# --- MIG -----------------------------------------------------------------------------------------------------
def _resolve_mig(names: Mapping[str, int], model: GpuModel) -> dict[int, int]:
    geom = model.mig
    assert geom is not None
    disp = model.display_name
    counts: dict[int, int] = {}
    written: dict[int, str] = {}
    for name, n in names.items():
        try:
            prof = resolve_gi_profile(model, name)
        except ProfileError:
            raise ProfileError(f"unknown MIG profile '{name}' for the {disp}; valid: "
                               + ", ".join(p.name for p in geom.gi_profiles), model=model.id, profile=name) from None
        if prof.id in counts:
            raise ProfileError(f"'{written[prof.id]}' and '{name}' both name {prof.name} on the {disp}; list it "
                               "once with the total count", model=model.id)
        if n <= 0:
            raise ProfileError(f"the count of {prof.name} must be at least 1 (got {n})", model=model.id)
        counts[prof.id] = n
        written[prof.id] = name
    reason = mig_problem(geom, counts, disp)
    if reason:
        alts = nearest_mig_layouts(geom, counts)
        raise ProfileError(reason + ("; valid: " + ", ".join(alts) if alts else ""), model=model.id)
    return counts


def mig_problem(geom: MigGeometry, counts: Mapping[int, int], gpu_name: str = "GPU") -> str | None:
    """Why ``counts`` ({GI profile id: n}) does not fit one empty GPU, or None when it does."""
    desc = describe_counts(geom, counts)
    for pid, n in counts.items():
        prof = geom.profile(pid)
        if n > prof.max_instances:
            return (f"{desc} exceeds the {gpu_name}'s limit of {prof.max_instances} {prof.name} "
                    f"instance{'s' if prof.max_instances != 1 else ''}")
    compute = sum(geom.profile(p).compute_slices * n for p, n in counts.items())
    if compute > geom.compute_slices:
        return f"{desc} needs {compute} compute slices, the {gpu_name} has {geom.compute_slices}"
    memory = sum(geom.profile(p).memory_slices * n for p, n in counts.items())
    if memory > geom.memory_slices:
        return f"{desc} needs {memory} memory slices, the {gpu_name} has {geom.memory_slices}"
    if not fits(geom, counts):
        return (f"{desc} has no placement without overlapping memory slices on the {gpu_name} "
                "(each profile may start only at its documented slices)")
    return None


_MULTISETS: dict[Any, list[Counter]] = {}


def _valid_multisets(geom: MigGeometry) -> list[Counter]:
    # catalogs are immutable; the profile table identifies the geometry (MigGeometry itself holds dicts)
    key = (geom.memory_slices, geom.compute_slices, geom.gi_profiles)
    if key not in _MULTISETS:
        _MULTISETS[key] = all_valid_multisets(geom)
    return _MULTISETS[key]


def nearest_mig_layouts(geom: MigGeometry, counts: Mapping[int, int], limit: int = MAX_ALTERNATIVES) -> list[str]:
    """Valid layouts closest to ``counts``, best first, as ``describe_counts`` strings.

    Distance is the number of single-instance edits (remove, add, or swap one for another) turning the
    request into the layout.  Among equally distant layouts the one whose compute and memory slices are
    closest to the request's wins (a swap for a same-sized profile beats a swap for a bigger one), then a
    sub-multiset of the request (it only drops instances), then the one using more compute.
    """
    req = Counter({p: n for p, n in counts.items() if n > 0})

    def size(c: Counter) -> tuple[int, int]:
        return (sum(geom.profile(p).compute_slices * n for p, n in c.items()),
                sum(geom.profile(p).memory_slices * n for p, n in c.items()))

    req_compute, req_memory = size(req)

    def key(c: Counter) -> tuple:
        removed = sum((req - c).values())
        added = sum((c - req).values())
        compute, memory = size(c)
        return (max(removed, added), abs(compute - req_compute) + abs(memory - req_memory), added > 0,
                -compute, describe_counts(geom, c))

    ranked = sorted((c for c in _valid_multisets(geom) if c != req), key=key)
    return [describe_counts(geom, c) for c in ranked[:limit]]


# --- vGPU ----------------------------------------------------------------------------------------------------
def _resolve_vgpu(entry: ProfileEntry, model: GpuModel,
                  mig_counts: Mapping[int, int]) -> tuple[dict[int, int], bool]:
    disp = model.display_name
    spec = model.vgpu
    if spec is None:
        raise ProfileError(f"the {disp} has no NVIDIA vGPU types (asked for {_join_named(entry.vgpu)})",
                           model=model.id)
    chosen: list[tuple[VgpuType, int]] = []
    written: dict[int, str] = {}
    for ref, n in entry.vgpu.items():
        try:
            t = resolve_vgpu_type(model, ref)
        except ProfileError:
            parsed = parse_vgpu_name(ref)
            if parsed is not None and model.vgpu_prefix and parsed.board.upper() != model.vgpu_prefix.upper():
                raise ProfileError(f"vGPU type '{ref}' is a type of the {parsed.board} board, not of the {disp} "
                                   f"(whose types are {model.vgpu_prefix}-*)", model=model.id,
                                   vgpu_type=ref) from None
            raise ProfileError(f"unknown vGPU type '{ref}' for the {disp}; valid: "
                               + ", ".join(t.name for t in spec.types), model=model.id, vgpu_type=ref) from None
        if t.id in written:
            raise ProfileError(f"'{written[t.id]}' and '{ref}' both name {t.name} ({t.sysfs_id}) on the {disp}; "
                               "list it once with the total count", model=model.id)
        if n <= 0:
            raise ProfileError(f"the count of {t.name} must be at least 1 (got {n})", model=model.id)
        written[t.id] = ref
        chosen.append((t, n))
    desc = " + ".join(f"{n}x {t.name}" if n > 1 else t.name for t, n in chosen)
    backed = [(t, n) for t, n in chosen if t.mig_backed]
    sliced = [(t, n) for t, n in chosen if not t.mig_backed]
    if backed and sliced:
        raise ProfileError(f"{desc} mixes time-sliced and MIG-backed vGPU types, which never share a GPU; "
                           f"valid: {_vdesc(sliced)}, or {_vdesc(backed)}", model=model.id)
    mixed_mode = spec.policy == "mixed-size"
    for t, n in chosen:
        cap = t.mixed_size_max if mixed_mode and t.mixed_size_max is not None else t.max_instances
        if n > cap:
            raise ProfileError(f"{n}x {t.name} exceeds the {disp}'s maximum of {cap} {t.name} vGPUs; "
                               f"valid: {cap}x {t.name}", model=model.id)
    total = sum(n for _, n in chosen)
    if backed and entry.mig_enabled is False:
        raise ProfileError(f"MIG-backed vGPU types ({_vdesc(backed)}) need MIG mode on, the entry sets "
                           "mig_enabled: false", model=model.id)
    if backed:
        need: Counter = Counter()
        for t, n in backed:
            need[t.gpu_instance_profile_id] += n
        assert model.mig is not None
        for gi_pid, n in need.items():
            have = mig_counts.get(gi_pid, 0)   # type: ignore[arg-type]
            if n > have:
                prof = model.mig.profile(gi_pid)  # type: ignore[arg-type]
                alt = f"add {prof.name}={n} to its MIG part" + (f", or ask for at most {have}" if have else "")
                raise ProfileError(f"{desc} needs {n} GPU instance{'s' if n != 1 else ''} of {prof.name} (one vGPU "
                                   f"per GPU instance), the entry creates {have}; valid: {alt}", model=model.id)
    elif spec.policy == "same-type" and len(sliced) > 1:
        raise ProfileError(f"the {disp} runs one vGPU type at a time (same-type policy), the entry asks for "
                           f"{desc}; valid: " + ", ".join(_vdesc([c]) for c in sliced), model=model.id)
    elif spec.policy == "same-size":
        sizes = sorted({t.framebuffer_mib for t, _ in sliced})
        if len(sizes) > 1:
            groups = [[(t, n) for t, n in sliced if t.framebuffer_mib == s] for s in sizes]
            raise ProfileError(f"the {disp} runs vGPU types of one framebuffer size at a time (same-size policy), "
                               f"{desc} mixes " + " and ".join(f"{s} MiB" for s in sizes)
                               + "; valid: " + ", ".join(_vdesc(g) for g in groups), model=model.id)
        cap = min(t.max_instances for t, _ in sliced)
        if total > cap:
            alt = f"{cap}x {sliced[0][0].name}" if len(sliced) == 1 else f"at most {cap} of them in total"
            raise ProfileError(f"{desc} is {total} vGPUs of {sizes[0]} MiB, the {disp} holds at most {cap}; "
                               f"valid: {alt}", model=model.id)
    elif mixed_mode:
        fb = sum(t.framebuffer_mib * n for t, n in sliced)
        if fb > model.memory_mib:
            raise ProfileError(f"{desc} needs {fb} MiB of framebuffer, the {disp} has {model.memory_mib} MiB; "
                               "valid: " + ", ".join(_vdesc([(t, min(n, model.memory_mib // t.framebuffer_mib))])
                                                      for t, n in sliced), model=model.id)
    if spec.parent == "vf":
        if model.sriov is None:
            raise ProfileError(f"the {disp} hosts vGPUs on SR-IOV VFs but the catalog gives it none",
                               model=model.id)
        vfs = entry.sriov_vfs if entry.sriov_vfs is not None else model.sriov.total_vfs
        if total > vfs:
            where = "the entry enables" if entry.sriov_vfs is not None else f"the {disp} has"
            raise ProfileError(f"{desc} needs {total} VFs (each VF hosts one vGPU), {where} {vfs}; "
                               f"valid: at most {vfs} vGPUs", model=model.id)
    return {t.id: n for t, n in chosen}, bool(backed)


def _vdesc(items: Sequence[tuple[VgpuType, int]]) -> str:
    return " + ".join(f"{n}x {t.name}" if n > 1 else t.name for t, n in items)


# --- generic mdev ----------------------------------------------------------------------------------------------
def _registered(spec: MdevDriverSpec) -> list[MdevPoolType]:
    # a driver does not offer a type one instance of which exceeds the whole pool (GVT-g)
    return [t for t in spec.types if all(spec.pool.get(r, 0) >= c for r, c in t.cost.items())]


def find_mdev_type(spec: MdevDriverSpec, ref: str) -> MdevPoolType | None:
    want = ref.strip().lower()
    for t in spec.types:
        if want in (spec.type_dir(t).lower(), t.sysfs_name.lower(), (t.name or "").lower()):
            return t
    return None


def _resolve_mdev(refs: Mapping[str, int], model: GpuModel) -> dict[str, int]:
    disp = model.display_name
    spec = model.mdev
    if spec is None:
        raise ProfileError(f"the {disp} has no generic mdev types (asked for {_join_named(refs)})", model=model.id)
    offered = _registered(spec)
    valid = ", ".join(spec.type_dir(t) for t in offered)
    chosen: list[tuple[MdevPoolType, int]] = []
    for ref, n in refs.items():
        t = find_mdev_type(spec, ref)
        if t is None:
            raise ProfileError(f"unknown mdev type '{ref}' for the {disp}; valid: {valid}", model=model.id)
        if t not in offered:
            raise ProfileError(f"the {disp} does not offer {spec.type_dir(t)} (one instance needs more than its "
                               f"whole pool); valid: {valid}", model=model.id)
        if any(c is t for c, _ in chosen):
            raise ProfileError(f"mdev type {spec.type_dir(t)} is listed twice", model=model.id)
        if n <= 0:
            raise ProfileError(f"the count of {spec.type_dir(t)} must be at least 1 (got {n})", model=model.id)
        chosen.append((t, n))
    for res, size in spec.pool.items():
        used = sum(t.cost.get(res, 0) * n for t, n in chosen)
        if used > size:
            desc = " + ".join(f"{n}x {spec.type_dir(t)}" if n > 1 else spec.type_dir(t) for t, n in chosen)
            alts = ", ".join(f"{_pool_max(spec, t)}x {spec.type_dir(t)}" for t, _ in chosen)
            raise ProfileError(f"{desc} needs {used} {res} from a pool of {size} on the {disp}; valid: {alts}",
                               model=model.id)
    return {spec.type_dir(t): n for t, n in chosen}


def _pool_max(spec: MdevDriverSpec, t: MdevPoolType) -> int:
    return min(spec.pool.get(r, 0) // c for r, c in t.cost.items() if c > 0)
