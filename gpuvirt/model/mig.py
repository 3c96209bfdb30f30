"""MIG geometry rules (pure).

A GPU instance occupies ``size`` consecutive *memory* slices starting at ``start`` (the ``{starts}:size``
of ``nvidia-smi mig -lgipp``).  A layout is legal when (NVML reference + MIG User Guide):

* every instance sits at one of its profile's documented starts;
* no two instances share a memory slice (else NVML_ERROR_INSUFFICIENT_RESOURCES);
* the compute slices of all instances add up to at most the GPU's budget (7, A30: 4);
* no profile has more instances than its ``instanceCount`` (e.g. one ``+me``).

The simulator enforces exactly these functions, and the planner, profile validation and the capacity
report reason with them, so all four agree by construction; tests check them against NVML behaviour.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from gpuvirt.model.catalog import GpuInstanceProfile, MigGeometry


@dataclass(frozen=True, order=True)
class Placed:
    start: int
    size: int
    profile_id: int

    @property
    def mask(self) -> int:
        return ((1 << self.size) - 1) << self.start


def mask_of(layout: Iterable[Placed]) -> int:
    m = 0
    for p in layout:
        m |= p.mask
    return m


def compute_used(geom: MigGeometry, layout: Iterable[Placed]) -> int:
    return sum(geom.profile(p.profile_id).compute_slices for p in layout)


def place_problem(geom: MigGeometry, layout: Sequence[Placed], profile: GpuInstanceProfile, start: int) -> str | None:
    """Why ``profile`` cannot go at ``start`` next to ``layout`` (None when it can)."""
    if start not in profile.starts:
        legal = ",".join(str(s) for s in profile.starts)
        return f"{profile.name} cannot start at memory slice {start} (legal starts: {legal})"
    mask = ((1 << profile.memory_slices) - 1) << start
    if mask & mask_of(layout):
        return f"{profile.name} at {start}:{profile.memory_slices} overlaps an existing instance"
    used = compute_used(geom, layout)
    if used + profile.compute_slices > geom.compute_slices:
        return (f"{profile.name} needs {profile.compute_slices} compute slices, "
                f"only {geom.compute_slices - used} of {geom.compute_slices} are free")
    same = sum(1 for p in layout if p.profile_id == profile.id)
    if same >= profile.max_instances:
        return f"{profile.name} allows at most {profile.max_instances} instance(s) per GPU"
    return None


def can_place(geom: MigGeometry, layout: Sequence[Placed], profile: GpuInstanceProfile, start: int) -> bool:
    return place_problem(geom, layout, profile, start) is None


def free_starts(geom: MigGeometry, layout: Sequence[Placed], profile: GpuInstanceProfile) -> list[int]:
    return [s for s in profile.starts if can_place(geom, layout, profile, s)]


def remaining_capacity(geom: MigGeometry, layout: Sequence[Placed], profile: GpuInstanceProfile) -> int:
    """How many more instances of ``profile`` fit now (what ``-lgip`` shows as Free).

    min(#documented placements not overlapping used slices, free compute // g, instanceCount - existing).
    A profile's own placements never overlap one another, so this is also the exact number that can be
    placed simultaneously.
    """
    used_mask = mask_of(layout)
    free_places = sum(1 for s in profile.starts
                      if not ((((1 << profile.memory_slices) - 1) << s) & used_mask))
    free_compute = geom.compute_slices - compute_used(geom, layout)
    existing = sum(1 for p in layout if p.profile_id == profile.id)
    return max(0, min(free_places, free_compute // profile.compute_slices, profile.max_instances - existing))


def layout_problems(geom: MigGeometry, layout: Sequence[Placed]) -> list[str]:
    problems = []
    placed: list[Placed] = []
    for p in sorted(layout):
        try:
            prof = geom.profile(p.profile_id)
        except Exception:
            problems.append(f"unknown profile id {p.profile_id}")
            continue
        if p.size != prof.memory_slices:
            problems.append(f"{prof.name} has size {prof.memory_slices}, not {p.size}")
            continue
        why = place_problem(geom, placed, prof, p.start)
        if why:
            problems.append(why)
        else:
            placed.append(p)
    return problems


def driver_choice(geom: MigGeometry, layout: Sequence[Placed], profile: GpuInstanceProfile,
                  order: Mapping[int, Sequence[int]] | None = None) -> int | None:
    """Start the driver would pick for a create WITHOUT placement (order-dependent, like the real one).

    Rule (UNVERIFIED; fitted to the captures in docs/simulator-fidelity.md): first free legal start in the
    model's preference order for that memory size, then any remaining legal start in ascending order.
    """
    if remaining_capacity(geom, layout, profile) == 0:
        return None
    pref = list((order or geom.driver_placement_order).get(profile.memory_slices, ()))
    candidates = [s for s in pref if s in profile.starts] + sorted(s for s in profile.starts if s not in pref)
    for s in candidates:
        if can_place(geom, layout, profile, s):
            return s
    return None


def gi_id_for(geom: MigGeometry, start: int, size: int) -> int:
    """GPU-instance id from the usual fixed table: 0 = whole GPU, then halves, quarters, eighths.

    8-slot GPUs: size 8 -> 0, size 4 -> 1 + start/4, size 2 -> 3 + start/2, size 1 -> 7 + start
    (H100 and A100 captures: 1g at 6,4,5,0,1,2,3 got ids 13,11,12,7,8,9,10).  4-slot A30: 0, 1-2, 3-6.
    Some drivers break the table (A100-80GB on 515); never derive a placement from an id.
    """
    n = geom.memory_slices
    base = 0
    width = n
    while width > size:
        base += n // width
        width //= 2
    return base + start // max(size, 1)


# --- multisets ----------------------------------------------------------------------------------------------
def pack_counts(geom: MigGeometry, counts: Mapping[int, int], fixed: Sequence[Placed] = (),
                prefer: Sequence[Placed] = ()) -> list[Placed] | None:
    """Explicit placements for ``counts`` ({profile id: n}) next to ``fixed``; None when impossible.

    Exhaustive and exact (a GPU holds at most 7 instances).  Larger instances are placed first, and for
    each instance a start listed in ``prefer`` (for the same profile) is tried before the others, so an
    existing layout is kept where it already matches.
    """
    items: list[GpuInstanceProfile] = []
    for pid, n in counts.items():
        items.extend([geom.profile(pid)] * n)
    items.sort(key=lambda p: (-p.memory_slices, -p.compute_slices, p.id))
    if sum(p.compute_slices for p in items) + compute_used(geom, fixed) > geom.compute_slices:
        return None
    prefer_starts: dict[int, list[int]] = {}
    for p in prefer:
        prefer_starts.setdefault(p.profile_id, []).append(p.start)

    result: list[Placed] = []
    layout = list(fixed)

    def rec(i: int, min_start_same: int) -> bool:
        if i == len(items):
            return True
        prof = items[i]
        pref = [s for s in prefer_starts.get(prof.id, []) if s in prof.starts]
        order = pref + [s for s in prof.starts if s not in pref]
        same_as_prev = i > 0 and items[i - 1].id == prof.id
        for s in order:
            # identical instances are interchangeable: only try starts above the previous one's when the
            # previous one was not a preferred start (keeps the search small without losing solutions)
            if same_as_prev and s < min_start_same and s not in pref:
                continue
            if can_place(geom, layout, prof, s):
                pl = Placed(s, prof.memory_slices, prof.id)
                layout.append(pl)
                result.append(pl)
                if rec(i + 1, s):
                    return True
                layout.pop()
                result.pop()
        return False

    return sorted(result) if rec(0, -1) else None


def fits(geom: MigGeometry, counts: Mapping[int, int], fixed: Sequence[Placed] = ()) -> bool:
    return pack_counts(geom, counts, fixed) is not None


def maximal_multisets(geom: MigGeometry, profile_ids: Sequence[int] | None = None) -> list[Counter]:
    """Every profile multiset that fits one empty GPU and to which no further instance can be added."""
    profiles = [p for p in geom.gi_profiles if profile_ids is None or p.id in profile_ids]
    return [c for c in all_valid_multisets(geom, profile_ids) if _is_maximal(geom, c, profiles)]


def _is_maximal(geom: MigGeometry, counts: Counter, profiles: Sequence[GpuInstanceProfile]) -> bool:
    for prof in profiles:
        c2 = Counter(counts)
        c2[prof.id] += 1
        if fits(geom, c2):
            return False
    return True


def all_valid_multisets(geom: MigGeometry, profile_ids: Sequence[int] | None = None) -> list[Counter]:
    """Every non-empty profile multiset that fits one empty GPU (exact; a few hundred at most)."""
    profiles = [p for p in geom.gi_profiles if profile_ids is None or p.id in profile_ids]
    bounds = [min(p.max_instances, geom.compute_slices // p.compute_slices,
                  geom.memory_slices // p.memory_slices) for p in profiles]
    out = []
    for combo in itertools.product(*(range(b + 1) for b in bounds)):
        if not any(combo):
            continue
        if sum(n * p.compute_slices for n, p in zip(combo, profiles)) > geom.compute_slices:
            continue
        if sum(n * p.memory_slices for n, p in zip(combo, profiles)) > geom.memory_slices:
            continue
        counts = Counter({p.id: n for n, p in zip(combo, profiles) if n})
        if fits(geom, counts):
            out.append(counts)
    return out


def describe_counts(geom: MigGeometry, counts: Mapping[int, int]) -> str:
    parts = []
    for pid, n in sorted(counts.items(), key=lambda kv: (-geom.profile(kv[0]).compute_slices,
                                                         -geom.profile(kv[0]).memory_slices, kv[0])):
        if n <= 0:
            continue
        name = geom.profile(pid).name
        parts.append(name if n == 1 else f"{n}x {name}")
    return " + ".join(parts) if parts else "(empty)"


def slice_map(geom: MigGeometry, layout: Sequence[Placed], labels: Mapping[Placed, str] | None = None) -> str:
    """One-line picture of the memory slices: ``[1g ][1g ][2g     ][3g               ]`` style, '·' free."""
    cells = ["·"] * geom.memory_slices
    for p in sorted(layout):
        tag = (labels or {}).get(p) or geom.profile(p.profile_id).short
        for i in range(p.start, p.start + p.size):
            cells[i] = tag if i == p.start else "-"
    width = max(len(c) for c in cells)
    return "|" + "|".join(c.ljust(width) for c in cells) + "|"
