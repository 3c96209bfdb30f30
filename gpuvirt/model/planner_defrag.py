"""Placement planner, defragmentation (pure): the fewest instance moves within one host after which a
refused profile fits (``plan --defrag``), by A* over host layouts, and :func:`apply_moves`, which replays
and checks such a sequence.  Public names import from :mod:`gpuvirt.model.planner` too.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from gpuvirt.errors import UsageError
from gpuvirt.model.mig import Placed, can_place, compute_used
from gpuvirt.model.planner_state import GpuState, Move, _tables


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
