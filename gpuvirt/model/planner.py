"""Placement planner (pure): where new MIG instances and vGPUs go, how few GPUs a set of instances needs,
and the fewest instance moves that make room for a refused request.

Every legality question is answered by :mod:`gpuvirt.model.mig` (``can_place``, ``free_starts``,
``pack_counts``, ``maximal_multisets``), the same functions the simulator enforces, so a plan produced here
is accepted by the simulator by construction.  This module only adds search and scoring on top.

Four entry points:

* :func:`choose_placement` - one new instance on one of several GPUs (``attach``, ``report --fit``).
* :func:`pack` - the fewest GPUs holding a multiset of profiles, with explicit starts (``plan --pack``).
* :func:`defrag` - the shortest sequence of instance moves after which a profile fits (``plan --defrag``).
* :func:`choose_vgpu_gpu` - which board gets a time-sliced vGPU (consolidate / spread).

Results are deterministic: every choice is the minimum of a fully specified sort key that ends with the
GPU's position in the input and the start, so equal inputs give equal plans on every run and platform.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from gpuvirt.errors import NotFoundError, UsageError
from gpuvirt.model.catalog import GpuInstanceProfile, MigGeometry
from gpuvirt.model.mig import (
    Placed,
    can_place,
    compute_used,
    free_starts,
    mask_of,
    maximal_multisets,
    pack_counts,
)

POLICIES = ("first-fit", "best-fit", "spread", "pack", "frag-aware")
DEFAULT_POLICY = "frag-aware"
VGPU_POLICIES = ("consolidate", "spread")


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
# While more than this share of the candidate GPUs (and more than one) is empty, opening an empty GPU is
# cheaper than stranding a compute slice on a used one; below it, empty GPUs are kept for whole-GPU requests
# and one stranded slice is the lesser evil.  Chosen on benches/placement.py (docs/placement.md, "stranding guard"): 0.05 was the one
# value that beat the best baseline on all four B2 runs (trace/uniform mix, with/without departures).
EMPTY_GPU_RESERVE = 0.05


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


# --- single placement ---------------------------------------------------------------------------------------------
def choose_placement(gpus: Sequence[GpuState], profile_id: int, policy: str = DEFAULT_POLICY,
                     weights: Mapping[int, float] | None = None) -> Decision | None:
    """Choose the GPU and start for one new instance of ``profile_id``; None when no GPU has a legal start.

    Candidates are every legal free ``(gpu, start)`` (``mig.free_starts``).  GPUs whose model lacks the
    profile are skipped.  The candidate with the smallest key wins; ``i`` is the GPU's position in ``gpus``:

    ============  =====================================================================  =================
    policy        key                                                                    ``score``
    ============  =====================================================================  =================
    first-fit     (i, start)                                                             GPU position
    best-fit      (free compute after, i, start)                                         free compute after
    spread        (-free compute after, i, start)                                        -free compute after
    pack          (free compute after, -placements still possible on the GPU, i, start)  free compute after
    frag-aware    (ΔS + e, free compute after, ΔF, -placements still possible, i, start)  ΔS + e
    ============  =====================================================================  =================

    ΔS is the growth of the GPU's *stranded* compute slices (free slices that no combination of further
    instances of the mix's profiles can use while the present ones stay, e.g. 3g@0 + 2g@4 on an A100), and
    ``e`` the price of opening an empty GPU: 0.5 while more than :data:`EMPTY_GPU_RESERVE` of the candidate
    GPUs (those whose model has the profile), and more than one, are empty (a fresh GPU beats a stranded
    slice), 1.5 otherwise (keep the last empty GPUs for whole-GPU requests unless two or more slices would
    be stranded).  ΔF is the growth of :func:`fragmentation` on the
    chosen GPU, with ``weights`` ({profile id: p}) the expected request mix (default: uniform over the
    model's profiles).  "Placements still possible" counts, over all profiles of the model, the legal free
    starts left after the placement, so that among equally good GPUs the start that keeps large aligned
    blocks open wins (the HAMi PR #2855 tie-break).
    """
    if policy not in POLICIES:
        raise UsageError(f"unknown placement policy '{policy}'; choose one of {', '.join(POLICIES)}")
    best: tuple | None = None
    best_decision: Decision | None = None
    wkeys: dict[int, tuple] = {}
    open_price = 0.0
    if policy == "frag-aware":
        able = [g for g in gpus if profile_id in _tables(g.geometry).by_id]
        empty = sum(1 for g in able if not g.layout)
        open_price = 0.5 if empty > max(1.0, EMPTY_GPU_RESERVE * len(able)) else 1.5
    for i, gpu in enumerate(gpus):
        t = _tables(gpu.geometry)
        prof = t.by_id.get(profile_id)
        if prof is None:
            continue
        layout = tuple(sorted(gpu.layout))
        starts = t.starts(layout, profile_id)
        if not starts:
            continue
        free_after = t.compute_free(layout) - prof.compute_slices
        if policy == "first-fit":
            key: tuple = (i, starts[0])
            cand = (key, float(i), starts[0])
        elif policy == "best-fit":
            cand = ((free_after, i, starts[0]), float(free_after), starts[0])
        elif policy == "spread":
            cand = ((-free_after, i, starts[0]), float(-free_after), starts[0])
        else:
            wkey = ()
            if policy == "frag-aware":
                wkey = wkeys.get(id(t))
                if wkey is None:
                    wkey = wkeys[id(t)] = _weights_key(gpu.geometry, weights)
            f_before = t.frag(layout, wkey) if wkey else 0.0
            pids = tuple(p for p, _ in wkey)
            s_before = t.stranded(layout, pids)
            cand = None
            for s in starts:
                after = tuple(sorted(layout + (Placed(s, prof.memory_slices, profile_id),)))
                survive = t.survivors(after)
                if policy == "pack":
                    key = (free_after, -survive, i, s)
                    score = float(free_after)
                else:
                    strand = t.stranded(after, pids) - s_before + (open_price if not layout else 0.0)
                    delta = round(t.frag(after, wkey) - f_before, 9)   # rounding: stable ties across sums
                    key = (strand, free_after, delta, -survive, i, s)
                    score = strand
                if cand is None or key < cand[0]:
                    cand = (key, score, s)
        assert cand is not None
        if best is None or cand[0] < best:
            best = cand[0]
            best_decision = Decision(gpu.key, cand[2], profile_id, cand[1])
    return best_decision


# --- packing ------------------------------------------------------------------------------------------------------
def first_fit_decreasing(geom: MigGeometry, counts: Mapping[int, int]) -> list[dict[int, int]]:
    """Per-GPU multisets from first-fit-decreasing: largest profiles first, each instance on the first GPU
    whose multiset still fits with it (placements re-solved per GPU by ``pack_counts``)."""
    t = _tables(geom)
    order = sorted((pid for pid, n in counts.items() if n > 0),
                   key=lambda pid: (-t.by_id[pid].compute_slices, -t.by_id[pid].memory_slices, pid))
    bins: list[dict[int, int]] = []
    keys: list[tuple] = []
    for pid in order:
        n = counts[pid]
        ptr = 0     # GPUs only fill up, so one that refused this profile keeps refusing it
        while n > 0:
            while ptr < len(bins) and not t.can_add(keys[ptr], pid):
                ptr += 1
            if ptr == len(bins):
                bins.append({})
                keys.append(())
            bins[ptr][pid] = bins[ptr].get(pid, 0) + 1
            keys[ptr] = _counts_key(bins[ptr])
            n -= 1
    return bins


def compute_lower_bound(geom: MigGeometry, counts: Mapping[int, int]) -> int:
    """ceil(total compute slices / slices per GPU): no packing can use fewer GPUs."""
    total = sum(geom.profile(pid).compute_slices * n for pid, n in counts.items() if n > 0)
    return -(-total // geom.compute_slices)


def pack(geometry: MigGeometry, counts: Mapping[int, int]) -> list[list[Placed]]:
    """The fewest GPUs of ``geometry`` that hold ``counts`` ({profile id: n}), with explicit placements.

    Exact: a cutting-stock integer program over the maximal per-GPU multisets ("columns"), solved by
    branch and bound with LP bounds (a small simplex, below) and first-fit-decreasing as the starting
    incumbent, so the result is never worse than FFD.  GPUs are listed fullest first.
    """
    return pack_detailed(geometry, counts).gpus


@dataclass(frozen=True)
class PackResult:
    gpus: list[list[Placed]]
    lower_bound: int            # max(compute bound, LP bound)
    ffd_gpus: int
    proven_optimal: bool        # False only when the node limit stopped the search (never seen in tests)
    nodes: int = 0


def pack_detailed(geometry: MigGeometry, counts: Mapping[int, int], node_limit: int = 20_000) -> PackResult:
    t = _tables(geometry)
    demand_map: dict[int, int] = {}
    for pid, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UsageError(f"instance count for profile {pid} must be a non-negative integer, got {n!r}")
        if pid not in t.by_id:
            raise NotFoundError(f"no GPU-instance profile with id {pid}")
        if n:
            demand_map[pid] = demand_map.get(pid, 0) + n
    if not demand_map:
        return PackResult([], 0, 0, True)
    pids = tuple(sorted(demand_map, key=lambda p: (-t.by_id[p].compute_slices, -t.by_id[p].memory_slices, p)))
    demand = tuple(demand_map[p] for p in pids)
    cols = t.columns(pids)

    ffd = first_fit_decreasing(geometry, demand_map)
    solver = _CoverSolver(t, pids, cols, demand, node_limit)
    solver.best_count = len(ffd)
    solver.best_bins = [dict(b) for b in ffd]
    root_bound = solver.solve()
    lower = max(compute_lower_bound(geometry, demand_map), root_bound)
    bins = _trim_surplus(solver.best_bins, demand_map)
    gpus = [list(t.packed(_counts_key(b))) for b in bins if any(b.values())]
    gpus.sort(key=lambda g: (-compute_used(geometry, g), -len(g), g))
    return PackResult(gpus, min(lower, len(gpus)), len(ffd), solver.proven or len(gpus) == lower, solver.nodes)


def _trim_surplus(bins: list[dict[int, int]], demand: Mapping[int, int]) -> list[dict[int, int]]:
    """Columns are maximal, so they may cover more than asked; drop the extra from the last GPUs (removing
    instances never makes a layout illegal)."""
    have: Counter = Counter()
    for b in bins:
        have.update(b)
    surplus = {pid: have[pid] - demand.get(pid, 0) for pid in have}
    out = [dict(b) for b in bins]
    for b in reversed(out):
        for pid in list(b):
            drop = min(b[pid], surplus.get(pid, 0))
            if drop:
                b[pid] -= drop
                surplus[pid] -= drop
                if not b[pid]:
                    del b[pid]
    return [b for b in out if b]


class _CoverSolver:
    """min sum(z) s.t. A z >= d, z in N^cols, by depth-first branch and bound.

    Bounds come from the LP relaxation, solved through its dual (max d.y s.t. A^T y <= 1, y >= 0): the
    origin is feasible there, so no phase one is needed, and the primal z is read off the final tableau.
    Branching on a fractional z_j adds z_j >= ceil (folded into the demand) or z_j <= floor (an extra dual
    variable).  The LP bound of cutting-stock problems is nearly always tight after rounding up, so the
    first dive usually meets the bound and the search stops at once.
    """

    def __init__(self, t: _Tables, pids: tuple[int, ...], cols: list[tuple[int, ...]], demand: tuple[int, ...],
                 node_limit: int) -> None:
        self.t = t
        self.pids = pids
        self.cols = cols
        self.demand = demand
        self.node_limit = node_limit
        self.best_count = math.inf
        self.best_bins: list[dict[int, int]] = []
        self.nodes = 0
        self.proven = True

    def solve(self) -> int:
        root = self._node({}, {})
        return root if root is not None else 0

    def _residual(self, lo: Mapping[int, int]) -> list[int]:
        d = list(self.demand)
        for j, n in lo.items():
            col = self.cols[j]
            for k in range(len(d)):
                d[k] -= col[k] * n
        return [max(0, x) for x in d]

    def _bins_from(self, mult: Mapping[int, int], residual: Sequence[int]) -> list[dict[int, int]]:
        bins = []
        for j in sorted(mult):
            col = {p: c for p, c in zip(self.pids, self.cols[j]) if c}
            bins.extend(dict(col) for _ in range(mult[j]))
        rest = {p: n for p, n in zip(self.pids, residual) if n}
        if rest:
            bins.extend(first_fit_decreasing(self.t.geom, rest))
        return bins

    def _node(self, lo: dict[int, int], hi: dict[int, int]) -> int | None:
        self.nodes += 1
        if self.nodes > self.node_limit:
            self.proven = False
            return None
        offset = sum(lo.values())
        d = self._residual(lo)
        if not any(d):
            if offset < self.best_count:
                self.best_count = offset
                self.best_bins = self._bins_from(lo, d)
            return offset
        upper = {j: hi[j] - lo.get(j, 0) for j in hi}
        if any(u < 0 for u in upper.values()):
            return None
        lp = _dual_simplex_bound(self.cols, d, upper)
        if lp is None:
            return None
        value, z = lp
        bound = offset + math.ceil(value - 1e-7)
        if bound >= self.best_count:
            return bound
        # rounding down the LP solution and first-fit-decreasing the rest gives a cheap incumbent
        mult = dict(lo)
        for j, zj in enumerate(z):
            f = math.floor(zj + 1e-9)
            if f > 0:
                mult[j] = mult.get(j, 0) + f
        rest = self._residual(mult)
        cand = self._bins_from(mult, rest)
        if len(cand) < self.best_count:
            self.best_count = len(cand)
            self.best_bins = cand
        if bound >= self.best_count:
            return bound
        frac = [(zj - math.floor(zj + 1e-9), j) for j, zj in enumerate(z) if zj - math.floor(zj + 1e-9) > 1e-7]
        if not frac:
            return bound
        _, j = max(frac)
        zj = z[j]
        up = dict(lo)
        up[j] = lo.get(j, 0) + math.ceil(zj - 1e-9)
        self._node(up, hi)
        if bound < self.best_count:
            down = dict(hi)
            down[j] = lo.get(j, 0) + math.floor(zj + 1e-9)
            self._node(lo, down)
        return bound


def _dual_simplex_bound(cols: Sequence[Sequence[int]], demand: Sequence[int],
                        upper: Mapping[int, int]) -> tuple[float, list[float]] | None:
    """LP optimum of min sum(z) s.t. sum_j cols[j] z_j >= demand, 0 <= z_j <= upper[j] (where given).

    Solved as its dual, max d.y - u.w s.t. cols[j].y - w_j <= 1, in a dense tableau (a few dozen rows).
    Returns (value, z) or None when the primal is infeasible (dual unbounded).
    """
    K = len(demand)
    ub = sorted(upper)
    ub_pos = {j: K + i for i, j in enumerate(ub)}
    nv = K + len(ub)
    m = len(cols)
    width = nv + m + 1
    rows = []
    for j, a in enumerate(cols):
        r = [0.0] * width
        for k in range(K):
            r[k] = float(a[k])
        if j in ub_pos:
            r[ub_pos[j]] = -1.0
        r[nv + j] = 1.0
        r[-1] = 1.0
        rows.append(r)
    obj = [0.0] * width
    for k in range(K):
        obj[k] = -float(demand[k])
    for j in ub:
        obj[ub_pos[j]] = float(upper[j])
    basis = [nv + j for j in range(m)]
    eps = 1e-9
    for it in range(10_000):
        # Dantzig's rule for speed, Bland's after many pivots to rule out cycling
        if it < 200:
            col, best = -1, -eps
            for c in range(width - 1):
                if obj[c] < best:
                    col, best = c, obj[c]
        else:
            col = next((c for c in range(width - 1) if obj[c] < -eps), -1)
        if col < 0:
            break
        row, ratio = -1, math.inf
        for i in range(m):
            a = rows[i][col]
            if a > eps:
                q = rows[i][-1] / a
                if q < ratio - 1e-12 or (abs(q - ratio) <= 1e-12 and basis[i] < basis[row]):
                    row, ratio = i, q
        if row < 0:
            return None
        pr = rows[row]
        pv = pr[col]
        if pv != 1.0:
            inv = 1.0 / pv
            for c in range(width):
                if pr[c]:
                    pr[c] *= inv
        nz = [c for c in range(width) if pr[c]]
        for i in range(m):
            if i != row:
                r = rows[i]
                f = r[col]
                if f:
                    for c in nz:
                        r[c] -= f * pr[c]
        f = obj[col]
        for c in nz:
            obj[c] -= f * pr[c]
        basis[row] = col
    z = [max(0.0, obj[nv + j]) for j in range(m)]
    return obj[-1], z


# --- defragmentation ------------------------------------------------------------------------------------------------
def apply_moves(gpus: Sequence[GpuState], moves: Iterable[Move]) -> list[GpuState]:
    """The GPUs after ``moves`` (pinned instances stay pinned at their new place).  Raises UsageError if a
    move is illegal in the state it meets, so it doubles as a checker for move sequences."""
    by_key = {g.key: i for i, g in enumerate(gpus)}
    layouts = [list(g.layout) for g in gpus]
    pinned = [set(g.pinned) for g in gpus]
    for n, mv in enumerate(moves, 1):
        if mv.src_gpu not in by_key or mv.dst_gpu not in by_key:
            raise UsageError(f"move {n}: unknown GPU {mv.src_gpu!r} or {mv.dst_gpu!r}")
        a, b = by_key[mv.src_gpu], by_key[mv.dst_gpu]
        if mv.instance not in layouts[a]:
            raise UsageError(f"move {n}: no instance {mv.instance} on {mv.src_gpu}")
        layouts[a].remove(mv.instance)
        was_pinned = mv.instance in pinned[a]
        pinned[a].discard(mv.instance)
        geom = gpus[b].geometry
        if _tables(geom) is not _tables(gpus[a].geometry):
            raise UsageError(f"move {n}: {mv.src_gpu} and {mv.dst_gpu} are different GPU models")
        prof = geom.profile(mv.instance.profile_id)
        if not can_place(geom, layouts[b], prof, mv.dst_start):
            raise UsageError(f"move {n}: {prof.name} cannot be recreated at {mv.dst_gpu}:{mv.dst_start}")
        layouts[b].append(mv.dst)
        if was_pinned:
            pinned[b].add(mv.dst)
    return [g.with_layout(layouts[i], pinned[i]) for i, g in enumerate(gpus)]


def defrag(gpus: Sequence[GpuState], profile_id: int, include_allocated: bool = False,
           max_moves: int | None = None, node_limit: int = 200_000) -> list[Move] | None:
    """The fewest moves after which one instance of ``profile_id`` has a legal start on some GPU.

    A move destroys an instance and recreates it elsewhere on the same host (another start, or another GPU
    of the same model); each move must be legal in the state left by the previous ones, so chains ("move B
    out of the way, then A into B's place") come out in a valid order.  Only unpinned instances move
    unless ``include_allocated``.  Returns ``[]`` when the profile already fits, and None when no sequence
    exists (proven by exhausting every reachable layout), none exists within ``max_moves``, or the search
    expanded ``node_limit`` layouts first (:func:`defrag_detailed` tells these apart).

    Method: A* over host layouts, one move per edge, so the first sequence found is a shortest one.  The
    heuristic is admissible and consistent: for each candidate target ``(gpu, start)`` the instances
    overlapping it must each move at least once, plus as many more as the compute budget and the profile's
    instance cap require, and one move changes that count by at most one.  Each layout is expanded once, so
    re-orderings of independent moves cost nothing extra.  Ties are broken by a fixed order (bound, depth,
    then generation order: source GPU, instance, destination GPU, start), so equal inputs give equal
    sequences.  In the benchmark (8-GPU hosts, up to 23 instances) every search finished far inside the
    default node limit, the slowest (a proof that no sequence exists) in under a second.
    """
    return defrag_detailed(gpus, profile_id, include_allocated, max_moves, node_limit).moves


@dataclass(frozen=True)
class DefragResult:
    moves: list[Move] | None
    complete: bool      # False: node_limit stopped the search, so None is not a proof of impossibility
    nodes: int


def defrag_detailed(gpus: Sequence[GpuState], profile_id: int, include_allocated: bool = False,
                    max_moves: int | None = None, node_limit: int = 200_000) -> DefragResult:
    search = _DefragSearch(gpus, profile_id, include_allocated, node_limit)
    moves = search.run(max_moves)
    return DefragResult(moves, search.nodes <= node_limit, search.nodes)


class _DefragSearch:
    def __init__(self, gpus: Sequence[GpuState], profile_id: int, include_allocated: bool, node_limit: int):
        self.gpus = list(gpus)
        self.pid = profile_id
        self.node_limit = node_limit
        self.nodes = 0
        self.tables = [_tables(g.geometry) for g in gpus]
        self.pinned = [frozenset() if include_allocated else frozenset(g.pinned) for g in gpus]
        self.targets = [t.by_id.get(profile_id) for t in self.tables]
        self._lb_memo: dict[tuple, float] = {}

    def _gpu_lb(self, i: int, layout: tuple[Placed, ...]) -> float:
        """Fewest moves that could leave GPU ``i`` able to take the profile (inf: never, pinned block it)."""
        key = (i, layout)
        got = self._lb_memo.get(key)
        if got is not None:
            return got
        prof = self.targets[i]
        best = math.inf
        if prof is not None:
            geom = self.gpus[i].geometry
            pinned = self.pinned[i]
            for s in prof.starts:
                mask = ((1 << prof.memory_slices) - 1) << s
                blockers = [p for p in layout if p.mask & mask]
                if any(p in pinned for p in blockers):
                    continue
                rest = [p for p in layout if not (p.mask & mask)]
                deficit = compute_used(geom, rest) + prof.compute_slices - geom.compute_slices
                extra_c = 0
                if deficit > 0:
                    sizes = sorted((geom.profile(p.profile_id).compute_slices for p in rest if p not in pinned),
                                   reverse=True)
                    for c in sizes:
                        if deficit <= 0:
                            break
                        deficit -= c
                        extra_c += 1
                    if deficit > 0:
                        continue
                same = [p for p in rest if p.profile_id == self.pid]
                excess = len(same) - (prof.max_instances - 1)
                if excess > 0 and sum(1 for p in same if p not in pinned) < excess:
                    continue
                best = min(best, len(blockers) + max(extra_c, excess, 0))
        self._lb_memo[key] = best
        return best

    def _fits(self, layouts: Sequence[tuple[Placed, ...]]) -> bool:
        return any(prof is not None and t.starts(lay, self.pid)
                   for prof, t, lay in zip(self.targets, self.tables, layouts))

    def run(self, max_moves: int | None) -> list[Move] | None:
        start = tuple(tuple(sorted(g.layout)) for g in self.gpus)
        if self._fits(start):
            return []
        lbs0 = [self._gpu_lb(i, lay) for i, lay in enumerate(start)]
        if min(lbs0) == math.inf:
            return None
        free = sum(t.compute_free(lay) for t, lay in zip(self.tables, start))
        need = min(p.compute_slices for p in self.targets if p is not None)
        if free < need:     # moves never create compute slices
            return None
        tie = itertools.count()
        frontier = [(min(lbs0), 0, next(tie), start)]      # (f, -g, tie, state): deeper first on equal f
        best_g: dict[tuple, int] = {start: 0}
        parent: dict[tuple, tuple[tuple, Move] | None] = {start: None}
        while frontier:
            _, neg_g, _, state = heapq.heappop(frontier)
            g = -neg_g
            if g > best_g[state]:
                continue
            self.nodes += 1
            if self.nodes > self.node_limit:
                return None
            if max_moves is not None and g >= max_moves:
                continue
            lbs = [self._gpu_lb(i, lay) for i, lay in enumerate(state)]
            order = sorted(range(len(lbs)), key=lambda i: lbs[i])
            for a, b, move, child in self._children(state):
                ng = g + 1
                if ng >= best_g.get(child, math.inf):
                    continue
                # only GPUs a and b changed, so the bound is the best of theirs and of the untouched rest
                others = next((lbs[i] for i in order if i != a and i != b), math.inf)
                h = min(others, self._gpu_lb(a, child[a]), self._gpu_lb(b, child[b]))
                if h == math.inf or (max_moves is not None and ng + h > max_moves):
                    continue
                best_g[child] = ng
                parent[child] = (state, move)
                if h == 0 and self._fits(child):
                    # consistent bound: nothing still open can reach a fitting layout in fewer moves
                    return self._path(parent, child)
                heapq.heappush(frontier, (ng + h, -ng, next(tie), child))
        return None

    def _children(self, state: tuple[tuple[Placed, ...], ...]):
        for a, lay in enumerate(state):
            pinned = self.pinned[a]
            for inst in lay:
                if inst in pinned:
                    continue
                without = tuple(p for p in lay if p != inst)
                for b, lay_b in enumerate(state):
                    t = self.tables[b]
                    if t is not self.tables[a]:
                        continue        # same profile id on another model is a different instance size
                    base = without if b == a else lay_b
                    for s in t.starts(base, inst.profile_id):
                        if b == a and s == inst.start:
                            continue
                        child = list(state)
                        child[a] = without
                        child[b] = tuple(sorted(base + (Placed(s, inst.size, inst.profile_id),)))
                        yield a, b, Move(self.gpus[a].key, inst, self.gpus[b].key, s), tuple(child)

    @staticmethod
    def _path(parent: dict, state: tuple) -> list[Move]:
        moves = []
        step = parent[state]
        while step is not None:
            prev, move = step
            moves.append(move)
            step = parent[prev]
        return moves[::-1]


# --- vGPU -------------------------------------------------------------------------------------------------------------
def choose_vgpu_gpu(boards: Sequence[VgpuBoard], type_id: int, policy: str = "consolidate") -> str | None:
    """The key of the board that gets one more vGPU of ``type_id``; None when no board has room.

    ``consolidate`` (oVirt "consolidated", vSphere "consolidation"): fill boards already in use before
    opening empty ones, so whole boards stay free for large types - boards already hosting this type first,
    then the one with the least room left, then the most framebuffer in use.  ``spread`` (oVirt
    "separated", vSphere "performance"): the board with the fewest vGPUs, then the most room, then the
    least framebuffer in use.  Remaining ties go to the earlier board in ``boards``.
    """
    if policy not in VGPU_POLICIES:
        raise UsageError(f"unknown vGPU placement policy '{policy}'; choose one of {', '.join(VGPU_POLICIES)}")
    best: tuple | None = None
    chosen: str | None = None
    for i, b in enumerate(boards):
        if b.room <= 0:
            continue
        same = any(t == type_id for t, _ in b.vgpus)
        if policy == "consolidate":
            key = (not same, not b.vgpus, b.room, -b.framebuffer_used_mib, i)
        else:
            key = (len(b.vgpus), -b.room, b.framebuffer_used_mib, i)
        if best is None or key < best:
            best, chosen = key, b.key
    return chosen
