"""Placement planner, state and scoring (pure): the data types the planner works on (:class:`GpuState`,
:class:`Decision`, :class:`Move`, :class:`VgpuBoard`) and the per-geometry memo tables behind every score -
legal starts, free compute, stranded slices, fragmentation - all computed from :mod:`gpuvirt.model.mig`.

The policies that use them are in :mod:`gpuvirt.model.planner`, packing in :mod:`gpuvirt.model.planner_pack`,
defragmentation in :mod:`gpuvirt.model.planner_defrag`; public names import from :mod:`gpuvirt.model.planner`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from gpuvirt.errors import UsageError
from gpuvirt.model.catalog import GpuInstanceProfile, MigGeometry
from gpuvirt.model.mig import (
    Placed,
    compute_used,
    free_starts,
    mask_of,
    maximal_multisets,
    pack_counts,
)


# --- data types ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuState:
    """One MIG-enabled GPU as the planner sees it.

    ``pinned`` are instances in use (attached to a VM): :func:`defrag` never moves them unless asked to.
    ``choose_placement`` and ``pack`` do not care about pinning, since they never move anything.
    """

    key: str
    geometry: MigGeometry
    layout: tuple[Placed, ...] = ()
    pinned: frozenset[Placed] = frozenset()

    def with_layout(self, layout: Iterable[Placed], pinned: Iterable[Placed] | None = None) -> "GpuState":
        return GpuState(self.key, self.geometry, tuple(sorted(layout)),
                        frozenset(self.pinned if pinned is None else pinned))


@dataclass(frozen=True)
class Decision:
    """Where to create one instance.  ``score`` is the policy's own figure (lower is better), see
    :func:`choose_placement`; it is informational and comparable only within one policy."""

    gpu_key: str
    start: int
    profile_id: int
    score: float

    def placed(self, size: int) -> Placed:
        return Placed(self.start, size, self.profile_id)


@dataclass(frozen=True)
class Move:
    """Destroy ``instance`` on ``src_gpu`` and recreate the same profile at ``dst_start`` on ``dst_gpu``."""

    src_gpu: str
    instance: Placed
    dst_gpu: str
    dst_start: int

    @property
    def dst(self) -> Placed:
        return Placed(self.dst_start, self.instance.size, self.instance.profile_id)


@dataclass(frozen=True)
class VgpuBoard:
    """A vGPU-capable board (or VF parent) as the caller sees it.

    ``vgpus`` holds ``(type id, framebuffer MiB)`` for each vGPU already created on it; ``room`` is how many
    more of the *requested* type the driver would still accept there (the caller computes it from the
    board's same-type / same-size rules, e.g. ``available_instances``).
    """

    key: str
    vgpus: tuple[tuple[int, int], ...] = ()
    room: int = 0

    @property
    def framebuffer_used_mib(self) -> int:
        return sum(fb for _, fb in self.vgpus)


# --- per-geometry memo tables ---------------------------------------------------------------------------------
# Keyed by content (the profile tuple and slice counts fully determine the rules), because load_catalog()
# builds fresh objects on every call and equal models should share one table; _BY_ID below is only a fast
# path to the same tables.
_TABLES: dict[tuple, "_Tables"] = {}
_MEMO_LIMIT = 200_000


class _Tables:
    """Memoised rule answers for one geometry; values all come from mig.py."""

    def __init__(self, geom: MigGeometry) -> None:
        self.geom = geom
        self.by_id: dict[int, GpuInstanceProfile] = {p.id: p for p in geom.gi_profiles}
        self._starts: dict[tuple, tuple[int, ...]] = {}
        self._fits: dict[tuple, bool] = {}
        self._packed: dict[tuple, tuple[Placed, ...]] = {}
        self._columns: dict[tuple, list[tuple[int, ...]]] = {}
        self._frag: dict[tuple, float] = {}
        self._free: dict[tuple, int] = {}
        self._survive: dict[tuple, int] = {}
        self._fill: dict[tuple, int] = {}
        self._fill_state: dict[tuple, int] = {}

    def _trim(self, memo: dict) -> None:
        if len(memo) > _MEMO_LIMIT:
            memo.clear()

    def starts(self, layout: tuple[Placed, ...], pid: int) -> tuple[int, ...]:
        key = (layout, pid)
        got = self._starts.get(key)
        if got is None:
            self._trim(self._starts)
            got = tuple(free_starts(self.geom, layout, self.by_id[pid]))
            self._starts[key] = got
        return got

    def compute_free(self, layout: tuple[Placed, ...]) -> int:
        got = self._free.get(layout)
        if got is None:
            self._trim(self._free)
            got = self._free[layout] = self.geom.compute_slices - compute_used(self.geom, layout)
        return got

    def survivors(self, layout: tuple[Placed, ...]) -> int:
        """Legal free starts left over all profiles: how many shapes the GPU can still take, and where."""
        got = self._survive.get(layout)
        if got is None:
            self._trim(self._survive)
            got = self._survive[layout] = sum(len(self.starts(layout, pid)) for pid in self.by_id)
        return got

    def fillable(self, layout: tuple[Placed, ...], pids: tuple[int, ...]) -> int:
        """Most compute slices that instances of ``pids`` added to ``layout`` can still occupy."""
        key = (layout, pids)
        got = self._fill.get(key)
        if got is None:
            capped = tuple(p for p in pids if self.by_id[p].max_instances < len(self.by_id[p].starts))
            counts = tuple(sum(1 for q in layout if q.profile_id == p) for p in capped)
            got = self._fill_dp(mask_of(layout), self.geom.compute_slices - self.compute_free(layout),
                                counts, pids, capped)
            self._trim(self._fill)
            self._fill[key] = got
        return got

    def _fill_dp(self, mask: int, used: int, counts: tuple[int, ...], pids: tuple[int, ...],
                 capped: tuple[int, ...]) -> int:
        # The state that decides every later placement under mig.place_problem's rules (legal starts, no
        # memory overlap, compute budget, per-profile instance cap) is (memory mask, compute used, counts of
        # the profiles whose cap can bind).  Branching on the lowest memory slice still open - leave it
        # empty for good, or start an instance there - visits each set of placements once, not once per
        # creation order.
        key = (mask, used, counts, pids)
        got = self._fill_state.get(key)
        if got is not None:
            return got
        total = self.geom.compute_slices
        m = 0
        while m < self.geom.memory_slices and mask >> m & 1:
            m += 1
        got = 0
        if m < self.geom.memory_slices and used < total:
            got = self._fill_dp(mask | 1 << m, used, counts, pids, capped)
            for pid in pids:
                prof = self.by_id[pid]
                if m not in prof.starts or used + prof.compute_slices > total:
                    continue
                bits = ((1 << prof.memory_slices) - 1) << m
                if bits & mask:
                    continue
                nxt = counts
                if pid in capped:
                    j = capped.index(pid)
                    if counts[j] >= prof.max_instances:
                        continue
                    nxt = counts[:j] + (counts[j] + 1,) + counts[j + 1:]
                got = max(got, prof.compute_slices + self._fill_dp(mask | bits, used + prof.compute_slices, nxt,
                                                                   pids, capped))
                if used + got == total:
                    break
        self._trim(self._fill_state)
        self._fill_state[key] = got
        return got

    def stranded(self, layout: tuple[Placed, ...], pids: tuple[int, ...]) -> int:
        """Free compute slices no combination of further instances of ``pids`` can use while ``layout``
        stays (3g@0 + 2g@4 on an A100 strands one: only a 1g fits in slices 6-7).  With no profiles
        expected nothing counts as stranded."""
        if not pids:
            return 0
        return self.compute_free(layout) - self.fillable(layout, pids)

    def can_add(self, counts_key: tuple[tuple[int, int], ...], pid: int) -> bool:
        key = (counts_key, pid)
        got = self._fits.get(key)
        if got is None:
            self._trim(self._fits)
            c = dict(counts_key)
            c[pid] = c.get(pid, 0) + 1
            got = pack_counts(self.geom, c) is not None
            self._fits[key] = got
        return got

    def packed(self, counts_key: tuple[tuple[int, int], ...]) -> tuple[Placed, ...]:
        got = self._packed.get(counts_key)
        if got is None:
            self._trim(self._packed)
            res = pack_counts(self.geom, dict(counts_key))
            if res is None:     # callers only ask for sub-multisets of fitting columns
                raise AssertionError(f"multiset {counts_key} does not fit one GPU")
            got = tuple(res)
            self._packed[counts_key] = got
        return got

    def columns(self, pids: tuple[int, ...]) -> list[tuple[int, ...]]:
        got = self._columns.get(pids)
        if got is None:
            cols = maximal_multisets(self.geom, list(pids))
            got = sorted((tuple(c.get(p, 0) for p in pids) for c in cols), reverse=True)
            self._columns[pids] = got
        return got

    def frag(self, layout: tuple[Placed, ...], weights: tuple[tuple[int, float], ...]) -> float:
        key = (layout, weights)
        got = self._frag.get(key)
        if got is None:
            self._trim(self._frag)
            free = self.compute_free(layout)
            got = 0.0
            if free > 0:
                for pid, w in weights:
                    if w and not self.starts(layout, pid):
                        got += w * free
            self._frag[key] = got
        return got


_BY_ID: dict[int, tuple[MigGeometry, _Tables]] = {}


def _tables(geom: MigGeometry) -> _Tables:
    # hashing the profile tuple is costly and this runs once per GPU per decision: try identity first
    hit = _BY_ID.get(id(geom))
    if hit is not None and hit[0] is geom:
        return hit[1]
    key = (geom.memory_slices, geom.compute_slices, geom.gi_profiles)
    t = _TABLES.get(key)
    if t is None:
        if len(_TABLES) > 32:
            _TABLES.clear()
            _BY_ID.clear()
        t = _Tables(geom)
        _TABLES[key] = t
    if len(_BY_ID) > 64:
        _BY_ID.clear()
    _BY_ID[id(geom)] = (geom, t)     # holding geom keeps its id from being reused
    return t


def clear_caches() -> None:
    """Forget every memoised rule answer (benchmarks use it to measure cold starts)."""
    _TABLES.clear()
    _BY_ID.clear()


def _counts_key(counts: Mapping[int, int]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((p, n) for p, n in counts.items() if n))


# --- fragmentation ----------------------------------------------------------------------------------------------
def default_weights(geom: MigGeometry) -> dict[int, float]:
    """Uniform over the model's GPU-instance profiles: with no workload history every shape counts."""
    n = len(geom.gi_profiles)
    return {p.id: 1.0 / n for p in geom.gi_profiles}


def _weights_key(geom: MigGeometry, weights: Mapping[int, float] | None) -> tuple[tuple[int, float], ...]:
    w = default_weights(geom) if weights is None else weights
    ids = {p.id for p in geom.gi_profiles}
    for pid, v in w.items():
        if v < 0 or math.isnan(v):
            raise UsageError(f"fragmentation weight for profile {pid} must be >= 0, got {v}")
    return tuple(sorted((pid, float(v)) for pid, v in w.items() if pid in ids and v))


def fragmentation(geom: MigGeometry, layout: Sequence[Placed], weights: Mapping[int, float] | None = None) -> float:
    """FGD-style fragmentation of one GPU: the free compute slices, weighted by how likely the next request
    is of a profile that has no legal free placement here.  0 for an empty or a full GPU."""
    return _tables(geom).frag(tuple(sorted(layout)), _weights_key(geom, weights))
