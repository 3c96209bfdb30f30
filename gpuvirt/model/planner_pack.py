"""Placement planner, packing (pure): the fewest GPUs that hold a multiset of GPU-instance profiles, with
explicit starts (``plan --pack``, ``apply`` of a profile).  Exact: a cutting-stock integer program over the
maximal per-GPU multisets, branch and bound with LP bounds from a small dense simplex, first-fit-decreasing
as the starting incumbent.  Public names import from :mod:`gpuvirt.model.planner` too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

from gpuvirt.errors import NotFoundError, UsageError
from gpuvirt.model.catalog import MigGeometry
from gpuvirt.model.mig import Placed, compute_used
from gpuvirt.model.planner_state import _counts_key, _tables, _Tables


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
