"""Move planner (pure): the fewest moves of running GPU devices that make room for a refused request.

A *move* hands one VM's device to another place without ever leaving the VM without one: the target device
is created while the source still exists, the VM is handed over (live migration, or shut down and started
again for a cold move), then the source is released.  So the target must fit *next to* the source: on the
same GPU both instances exist for a moment (their memory slices must not overlap and their compute slices
must fit the budget together), and on an SR-IOV board the new vGPU needs a free VF of its own.  An instance
no VM holds is simply created at the target and destroyed at the source (kind ``recreate``).

What moves (:class:`Unit`): a MIG GPU instance (bare, or hosting a MIG-backed vGPU) moves to another start on
its own GPU or to a GPU of the same model in MIG mode; a time-sliced vGPU moves to another board of a model
that has its type, in vGPU (not MIG) mode.  Every legality question goes to :mod:`gpuvirt.model.mig` and
:mod:`gpuvirt.model.vgpu`, the rules the simulator enforces; every move is checked by
:mod:`gpuvirt.model.preflight` (NVML's compatibility verdict by gpuvirt's rules) and gets the best kind the
policy allows (live, else cold), or is not considered.

Entry points for the service layer (``gpuvirt rebalance``, ``attach --allow-moves``) and ``report``:

* :func:`plan_moves` - the plan for one request (:class:`Plan`: moves in execution order, waves that may
  run concurrently, the slot the request gets, whether the count is proven minimal);
* :func:`replay` - the cluster after a plan, checking every step (an executor's dry run);
* :func:`gpu_problems` - why one GPU's contents break the rules (used for every intermediate state).
* :func:`gpuvirt.model.rejection.analyse_rejection` builds on these to classify refusals.

Cost, in this order: the number of moves; then the number of cold moves (a cold move stops the guest); then
how much worse the destinations leave the free space (compute slices stranded, the frag-aware measure of
:mod:`gpuvirt.model.planner`, with its fragmentation score as a tie-break: :meth:`ClusterIndex.badness`);
then the data moved (guest RAM + vGPU framebuffer of every moved VM, 0 for ``recreate``).
That is ``MovePolicy.prefer="fragmentation"``; the default, ``prefer="data"``, swaps the last two (the
order issue 13 asks for: the least data moved right after the move counts).  Destinations of equal cost are tried in the order the
frag-aware placement would choose them (:meth:`ClusterIndex.tie`).

Search: iterative deepening on the number of moves, depth-first with a transposition table and
branch-and-bound on the secondary costs; a move may only be planned if it can still matter (see
:func:`plan_moves`); details and guarantees in docs/placement.md, "Rebalancing".
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Iterable

from gpuvirt.errors import UsageError
from gpuvirt.model.cluster import (
    INF,
    RECREATE,
    Cluster,
    ClusterIndex,
    Gpu,
    Host,
    Request,
    Unit,
)
from gpuvirt.model.mig import Placed
from gpuvirt.model.planner import GpuState, VgpuBoard, choose_placement, choose_vgpu_gpu
from gpuvirt.model.preflight import COLD, DEFAULT_RULES, LIVE, Compatibility, MigrationRules

MOVE_KINDS = (LIVE, COLD)
MAX_MOVES_LIMIT = 8
PREFER = ("fragmentation", "data")


@dataclass(frozen=True)
class MovePolicy:
    """What the planner may do.

    ``max_per_host`` limits how many moves touching one host (as source or target) run at once: it shapes
    :attr:`Plan.waves`, never the moves themselves.  ``search``: ``exact`` considers every movable unit and
    destination, ``focused`` only moves that can still matter and a few destinations per unit (for large
    clusters), ``auto`` picks exact up to ``exact_units`` movable units.  ``node_limit`` bounds the work of
    one call (search states generated and last moves checked, over all depths); when it runs out the best
    plan found so far is returned (none if none was) and ``Plan.complete`` is False.  1,500 keeps one plan
    on a 64-GPU cluster in the tens of milliseconds (docs/placement.md, "Rebalancing").  ``prefer`` orders
    the costs after the number of moves and of cold moves: ``fragmentation`` (default) takes the plan that
    leaves the free space easiest to fill, then the one moving the least data; ``data`` the other way round
    (B2b, docs/benchmarks.md: fragmentation first accepted more requests under churn).
    """

    max_moves: int = 3
    allow: frozenset[str] = frozenset({LIVE})
    move_unallocated: bool = True
    max_per_host: int | None = None
    pinned_vms: frozenset[str] = frozenset()
    pinned_tenants: frozenset[str] = frozenset()
    rules: MigrationRules = DEFAULT_RULES
    search: str = "auto"
    exact_units: int = 48
    node_limit: int = 1_500
    destinations: int = 3               # focused search: destinations tried per unit for a move that is not last
    prefer: str = "data"                # among plans with as many moves and cold moves: "data" (the least data
                                        # moved, as issue 13 specifies), then fragmentation; or "fragmentation"
                                        # first (the free space they leave; B2b runs with it)
    live_same_host: bool = True         # False: a move within one host is never live (libvirt cannot migrate
                                        # a domain to its own host; gpuvirt's executor moves it cold)

    def __post_init__(self) -> None:
        allow = frozenset(self.allow)
        bad = sorted(k for k in allow if k not in MOVE_KINDS)
        if bad:
            raise UsageError(f"unknown move kind {', '.join(bad)}; choose from {', '.join(MOVE_KINDS)}")
        object.__setattr__(self, "allow", allow)
        if not isinstance(self.max_moves, int) or not 0 <= self.max_moves <= MAX_MOVES_LIMIT:
            raise UsageError(f"max moves must be an integer from 0 to {MAX_MOVES_LIMIT}, got {self.max_moves!r}")
        if self.max_per_host is not None and (not isinstance(self.max_per_host, int) or self.max_per_host < 1):
            raise UsageError(f"max moves per host at once must be a positive integer, got {self.max_per_host!r}")
        if self.search not in ("auto", "exact", "focused"):
            raise UsageError(f"search must be auto, exact or focused, not {self.search!r}")
        if self.prefer not in PREFER:
            raise UsageError(f"prefer must be {' or '.join(PREFER)}, not {self.prefer!r}")
        if self.node_limit < 1 or self.destinations < 1:
            raise UsageError("node_limit and destinations must be positive")


# --- outputs --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """A place: the GPU, its host, and the memory-slice start (None on a time-sliced board)."""

    gpu: str
    host: str
    start: int | None = None


@dataclass(frozen=True)
class PlannedMove:
    unit: str
    vm: str | None
    kind: str                           # live | cold | recreate
    src: Slot
    dst: Slot
    profile_id: int | None
    vgpu_type: int | None
    data_mib: int                       # guest RAM + vGPU framebuffer (0 for recreate)
    compatibility: Compatibility | None  # the pre-flight verdict behind ``kind`` (None for recreate)

    def describe(self) -> str:
        def where(s: Slot) -> str:
            return f"{s.host}/{s.gpu}" + ("" if s.start is None else f"@{s.start}")
        who = self.vm or f"instance {self.unit}"
        return f"{self.kind} move of {who} from {where(self.src)} to {where(self.dst)} ({self.data_mib} MiB)"


@dataclass(frozen=True)
class Plan:
    feasible: bool
    reason: str
    moves: tuple[PlannedMove, ...] = ()
    waves: tuple[tuple[int, ...], ...] = ()     # indices into moves; a wave's moves may run at once
    target: Slot | None = None                  # where the request goes once the moves are done
    minimal: bool = False                       # no plan with fewer moves exists (proven)
    complete: bool = True                       # False: a node limit cut the search somewhere
    nodes: int = 0
    search: str = "exact"

    @property
    def data_mib(self) -> int:
        return sum(m.data_mib for m in self.moves)

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.moves:
            out[m.kind] = out.get(m.kind, 0) + 1
        return out

    def to_dict(self) -> dict:
        def slot(s: Slot | None) -> dict | None:
            return None if s is None else {"host": s.host, "gpu": s.gpu, "start": s.start}
        return {"feasible": self.feasible, "reason": self.reason, "minimal": self.minimal,
                "complete": self.complete, "data_mib": self.data_mib, "unlocks": slot(self.target),
                "waves": [list(w) for w in self.waves],
                "moves": [{"unit": m.unit, "vm": m.vm, "kind": m.kind, "from": slot(m.src), "to": slot(m.dst),
                           "profile_id": m.profile_id, "vgpu_type": m.vgpu_type, "data_mib": m.data_mib,
                           "preflight": None if m.compatibility is None else m.compatibility.message()}
                          for m in self.moves]}


class _Budget(Exception):
    pass


# --- the search -------------------------------------------------------------------------------------------------
class _Search:
    """Iterative deepening on the number of moves D; at each D, one depth-first search per target GPU (in
    order of their lower bounds), sharing the best plan found so far as a bound on the cost."""

    def __init__(self, net: ClusterIndex, req: int, targets: list[int], policy: MovePolicy, exact: bool):
        self.net = net
        self.req = req
        self.targets = targets
        self.is_target = [False] * len(net.cluster.gpus)
        for gi in targets:
            self.is_target[gi] = True
        self.policy = policy
        self.exact = exact
        self.nodes = 0
        self.complete = True
        self.best: tuple | None = None          # (cost tuple, path)
        self.root_lb: dict[int, float] = {}
        self.target = -1
        self.touched: list[int] = []            # GPUs changed along the current path
        self.tset = frozenset(targets)
        self._enabler_cache: dict[int, list] = {}
        self.pos0 = {u: (gi, st) for gi, c in enumerate(net.start) for st, u in net.cont[c]}
        self.pos = dict(self.pos0)
        self.budget_start = 0
        self.budget = policy.node_limit
        self.prefer_data = policy.prefer == "data"

    def run(self, max_moves: int) -> tuple[list | None, int]:
        """(best path or None, smallest move count not ruled out).  Depth ``D`` looks for the cheapest plan
        of exactly ``D`` moves, target by target, among the targets whose destination-aware bound
        (:meth:`ClusterIndex.lb_with_destinations`, at the start) is at most ``D``; a depth that finishes
        without one proves that ``D`` moves do not suffice (in focused mode only depth 1, which tries every
        destination, proves it)."""
        net, state = self.net, self.net.start
        if any(net.lb(self.req, gi, state[gi]) == 0 for gi in self.targets):
            return [], 0
        tset = self.tset
        plain = {gi: net.lb(self.req, gi, state[gi]) for gi in self.targets}
        # the destination-aware bound costs more: it is worked out only for targets a depth could reach
        self.root_lb = {}

        def root(gi: int) -> float:
            got = self.root_lb.get(gi)
            if got is None:
                got = self.root_lb[gi] = net.lb_with_destinations(self.req, gi, state, tset, max_moves + 1)
            return got
        h0 = min(plain.values(), default=INF)
        if h0 > max_moves:
            return None, max_moves + 1 if h0 == INF else int(h0)
        proven = int(h0)
        for depth in range(proven, max_moves + 1):
            finished = True
            eligible = sorted((gi for gi in self.targets if plain[gi] <= depth and root(gi) <= depth),
                              key=lambda gi: (self.root_lb[gi], plain[gi], gi))
            # every target gets a share of what is left of the budget, so that one hard target cannot starve
            # the others; a share left unused goes on to the next target and the next depth
            left = self.policy.node_limit - self.nodes
            for n, gi in enumerate(eligible):
                self.target = gi
                self.visited: dict[tuple, tuple] = {}
                # a search cut short by the budget unwinds without undoing its path: start clean
                self.pos = dict(self.pos0)
                self.touched = []
                self.budget_start = self.nodes
                self.budget = max(1, left // (len(eligible) - n))
                try:
                    self._dfs(state, (0, 0, 0, 0.0), [], depth)
                except _Budget:
                    finished = False
                    self.complete = False
                left -= self.nodes - self.budget_start
                if left <= 0:
                    finished = finished and n == len(eligible) - 1
                    break
            if self.best is not None:
                return self.best[1], proven
            if finished and proven == depth and (self.exact or depth == 1):
                proven = depth + 1
            if self.nodes >= self.policy.node_limit and depth < max_moves:
                self.complete = False           # deeper plans were not looked for
                break
        return None, proven

    def _tick(self) -> None:
        self.nodes += 1
        if self.nodes - self.budget_start > self.budget:
            raise _Budget

    def _record(self, cost: tuple, path: list) -> None:
        if self.best is None or cost < self.best[0]:
            self.best = (cost, list(path))

    def _h(self, content: tuple, moves: int) -> float:
        return max(self.net.lb(self.req, self.target, content), self.root_lb[self.target] - moves)

    def _dfs(self, state: tuple, g: tuple, path: list, depth: int) -> None:
        self._tick()
        h = self._h(state[self.target], g[0])
        if h == 0:
            self._record(g, path)
            return
        r = depth - g[0]
        if h > r:
            return
        if self.best is not None and (g[0] + h,) + g[1:] >= self.best[0]:
            return
        if r == 1:
            self._last(state, g, path)
            return
        for cost, child, move in self._children(state, g, r):
            if self.best is not None and cost >= self.best[0]:
                continue
            seen = self.visited.get(child)
            if seen is not None and seen <= cost:
                continue
            self.visited[child] = cost
            u, a, sa, b, sb, _ = move
            path.append(move)
            self.touched += (a, b)
            self.pos[u] = (b, sb)
            self._dfs(child, cost, path, depth)
            self.pos[u] = (a, sa)
            del self.touched[-2:]
            path.pop()

    def _move_cost(self, g: tuple, kind: str, u: int, bad: float) -> tuple:
        """The cost after one more move; ``bad`` is how much worse its destination leaves the free space
        (:meth:`ClusterIndex.badness`).  Fragmentation and data take the third and fourth places in the
        order ``policy.prefer`` gives."""
        if self.prefer_data:
            return (g[0] + 1, g[1] + (kind == COLD), g[2] + self.net.u_data[u], round(g[3] + bad, 6))
        return (g[0] + 1, g[1] + (kind == COLD), round(g[2] + bad, 6), g[3] + self.net.u_data[u])

    def _apply(self, state: tuple, u: int, a: int, sa: int, b: int, sb: int) -> tuple:
        return _apply(self.net, state, u, a, b, sb)

    def _destinations(self, state: tuple, d: int):
        """(badness, tie, gpu, start) of every legal place for demand ``d`` in ``state``, best first: the places
        of the starting state on GPUs the path has not touched, merged with those of the touched GPUs."""
        net = self.net
        touched = set(self.touched)
        base = (p for p in net.places_everywhere(d) if p[2] not in touched)
        if not touched:
            return base
        extra = sorted(p for gi in touched if gi in net.d_compat_set[d] for p in net.places(d, gi, state[gi]))
        return heapq.merge(base, extra)

    def _last(self, state: tuple, g: tuple, path: list) -> None:
        """One move left: it must take the last unit in the way off the target (a move never helps by
        arriving), so only those units are tried, each with its best legal destination."""
        net, gi = self.net, self.target
        for u in net.sole(self.req, gi, state[gi]):
            sa = self.pos[u][1]
            for bad, _, b, s in self._destinations(state, net.u_demand[u]):
                self._tick()
                if b == gi and s == sa:
                    continue
                k = net.kind(u, gi, b)
                if k is None:
                    continue
                cost = self._move_cost(g, k[0], u, bad)
                if self.best is not None and cost >= self.best[0]:
                    if k[0] != COLD:
                        break       # destinations come best first: nothing later beats this one
                    continue
                if b == gi and not net.starts(self.req, gi, self._apply(state, u, gi, sa, b, s)[gi]):
                    continue
                path.append((u, gi, sa, b, s, k))
                self._record(cost, path)
                path.pop()
                if k[0] != COLD:
                    break

    def _places(self, state: tuple, d: int, dests: dict[int, list]) -> list:
        """Legal places for demand ``d`` in ``state`` (:meth:`_destinations`), without GPUs the request may
        use when ``d`` dominates it; memoised in ``dests`` for one expansion."""
        places = dests.get(d)
        if places is None:
            places = list(self._destinations(state, d))
            if self.net.dominates(d, self.req):
                places = [p for p in places if not self.is_target[p[2]]]
            dests[d] = places
        return places

    def _has_place(self, state: tuple, d: int, dests: dict[int, list]) -> bool:
        """Whether :meth:`_places` is non-empty, without building the list when it is not yet known."""
        got = dests.get(d)
        if got is not None:
            return bool(got)
        net = self.net
        dominant = net.dominates(d, self.req)
        touched = self.touched
        for p in net.places_everywhere(d):
            if p[2] not in touched and not (dominant and self.is_target[p[2]]):
                return True
        for gi in touched:
            if gi in net.d_compat_set[d] and not (dominant and self.is_target[gi]) and \
                    net.places(d, gi, state[gi]):
                return True
        dests[d] = []
        return False

    def _children(self, state: tuple, g: tuple, r: int):
        net = self.net
        dests: dict[int, list] = {}
        if self.exact:
            rel = {u: 0 for u in self.pos if net.u_movable[u]}
        elif r == 2:
            rel = self._relevant2(state, dests)
        else:
            rel = self._relevant(state, r, g[0])
        out = []
        demand = net.u_demand
        # a unit whose shape has no legal place in this state yields no child: leaving it out before ordering
        # changes nothing else, and on a nearly full cluster it is most of the relevant units
        for _, u in sorted((c, u) for u, c in rel.items() if self._places(state, demand[u], dests)):
            a, sa = self.pos[u]
            places = dests[demand[u]]
            taken = 0
            for bad, _, b, s in places:
                k = net.kind(u, a, b)
                if k is None:
                    continue
                child = self._apply(state, u, a, sa, b, s)
                h = self._h(child[self.target], g[0] + 1)
                if 1 + h > r:
                    continue
                self._tick()
                cost = self._move_cost(g, k[0], u, bad)
                out.append(((g[0] + 1 + h,) + cost[1:], cost, child, (u, a, sa, b, s, k)))
                taken += 1
                if not self.exact and taken >= self.policy.destinations:
                    break
        out.sort(key=lambda x: x[0])
        for _, cost, child, move in out:
            yield cost, child, move

    def _cheap_hosts(self, d: int, state: tuple, most: int):
        """(removals, GPU) for every GPU where at most ``most`` removals (but at least one) open demand
        ``d``, in ``state``: the starting state's ranking for GPUs the path has not touched, recomputed for
        the touched ones."""
        net = self.net
        touched = set(self.touched)
        for v, a in net.ranked(d, net.start):
            if v > most:
                break
            if v >= 1 and a not in touched:
                yield v, a
        for a in touched:
            if a in net.d_compat_set[d]:
                v = net.lb(d, a, state[a])
                if 1 <= v <= most:
                    yield v, a

    def _relevant2(self, state: tuple, dests: dict[int, list]) -> dict[int, int]:
        """Units whose move can matter when two moves are left.  The last move takes a sole blocker ``u`` off
        the target to a free place, so this one either changes what is on the target GPU (any unit there),
        or frees a place for some ``u``: it moves a unit whose removal alone opens ``u``'s shape on its GPU.
        (Moving ``u`` itself first never helps: a place it could reach afterwards was free before, since a
        profile's places never partly overlap.)"""
        net, gi = self.net, self.target
        rel = {u: 0 for _, u in net.cont[state[gi]] if net.u_movable[u]}
        if net.lb(self.req, gi, state[gi]) == 1:
            touched = set(self.touched)
            for du in {net.u_demand[u] for u in net.sole(self.req, gi, state[gi])}:
                for dw, group in self._enablers(du):
                    if not self._has_place(state, dw, dests):
                        continue        # such a unit has nowhere to go: _children would drop it anyway
                    for a, ws in group:
                        if a not in touched:
                            for w in ws:
                                rel.setdefault(w, 1)
                dominant = net.dominates(du, self.req)
                for a in touched:
                    if a in net.d_compat_set[du] and not (dominant and self.is_target[a]) and \
                            net.lb(du, a, state[a]) == 1:
                        for w in net.sole(du, a, state[a]):
                            rel.setdefault(w, 1)
        return rel

    def _enablers(self, du: int) -> list[tuple[int, list[tuple[int, tuple[int, ...]]]]]:
        """In the starting state: each GPU where one removal opens demand ``du``, with the units whose
        removal does it (GPUs the request may use are left out when ``du`` dominates it), grouped by the
        units' own demand, so that a shape with nowhere to go is skipped as a whole."""
        got = self._enabler_cache.get(du)
        if got is None:
            net = self.net
            dominant = net.dominates(du, self.req)
            groups: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
            for v, a in net.ranked(du, net.start):
                if v == 1 and not (dominant and self.is_target[a]):
                    by: dict[int, list[int]] = {}
                    for w in net.sole(du, a, net.start[a]):
                        by.setdefault(net.u_demand[w], []).append(w)
                    for dw, ws in by.items():
                        groups.setdefault(dw, []).append((a, tuple(ws)))
            got = self._enabler_cache[du] = sorted(groups.items())
        return got

    def _relevant(self, state: tuple, r: int, moves: int) -> dict[int, int]:
        """Units whose move can still matter with ``r`` moves left: those on the target (if at most ``r``
        removals open it), then, transitively, those on a GPU whose emptying by ``k`` removals gives a
        relevant unit a destination, at a cost of ``k`` more moves, while the total stays within ``r``.
        Removals on the target or on the unit's own GPU may be moves already counted, so they add nothing."""
        net, root = self.net, self.target
        cost: dict[int, int] = {}
        v = self._h(state[root], moves)
        heap: list[tuple[int, int]] = []
        if v <= r:
            for _, u in net.cont[state[root]]:
                if net.u_movable[u]:
                    cost[u] = int(v)
                    heap.append((int(v), u))
        done: set[tuple] = set()
        # (demand, GPU) pairs whose own-GPU step is done: units come off the heap by cost, so the first unit
        # of a demand on a GPU marks that GPU at the lowest cost any later one could
        near: set[tuple[int, int]] = set()
        movable = net.u_movable
        dom: dict[int, bool] = {}

        def mark(a: int, nc: int) -> None:
            for _, w in net.cont[state[a]]:
                if movable[w] and cost.get(w, INF) > nc:
                    cost[w] = nc
                    heapq.heappush(heap, (nc, w))
        while heap:
            c, u = heapq.heappop(heap)
            if cost.get(u) != c:
                continue
            d = net.u_demand[u]
            own = self.pos[u][0]
            dominant = dom.get(d)
            if dominant is None:
                dominant = dom[d] = net.dominates(d, self.req)
            for a in (own, root) if own != root else (own,):
                if (d, a) in near:
                    continue
                near.add((d, a))
                if a in net.d_compat_set[d] and not (dominant and self.is_target[a]) and \
                        1 <= net.lb(d, a, state[a]) < INF:
                    mark(a, c)
            if (d, c) in done or c >= r:
                continue
            done.add((d, c))
            for k, a in self._cheap_hosts(d, state, r - c):
                if a != own and a != root and not (dominant and self.is_target[a]):
                    mark(a, c + int(k))
        return cost


# --- entry points -------------------------------------------------------------------------------------------------
def plan_moves(cluster: Cluster, request: Request, policy: MovePolicy = MovePolicy()) -> Plan:
    """The fewest moves (then fewest cold moves, least fragmentation, least data) after which ``request`` fits.

    Returns a feasible :class:`Plan` with no moves when the request fits already, a feasible plan whose
    moves are in execution order (every intermediate state valid, every move's target created while its
    source exists), or an infeasible one whose ``reason`` says why.  Raises ``UsageError`` /
    ``NotFoundError`` for malformed input (unknown GPU, a unit breaking the rules already, a request no
    model knows).

    Method: iterative deepening on the number of moves D, from the lower bound (the fewest units that must
    leave some target GPU) up to ``policy.max_moves``; at each D a depth-first search with a transposition
    table finds the cheapest plan of D moves.  The last move of a plan must take the last unit in the way
    off a target (arriving somewhere never helps), so it is chosen directly with its best destination.
    Earlier moves: every movable unit to every legal destination (``exact``), or (``focused``) only units
    that can still matter - those on a target at most the remaining moves can open, and, transitively,
    those on GPUs whose emptying by k moves gives such a unit a destination, while the total stays within
    the remaining moves - each to its ``policy.destinations`` best destinations.  ``exact`` is exact;
    ``focused`` is exact for one-move plans and otherwise may miss a plan (``Plan.minimal`` says when the
    count is nevertheless proven: found at the lower bound).
    """
    net = ClusterIndex(cluster, policy)
    d, targets, what = net.request_demand(request)
    mode = policy.search
    if mode == "auto":
        mode = "exact" if sum(net.u_movable) <= policy.exact_units else "focused"
    if not targets:
        return Plan(False, what, search=mode)
    state = net.start
    if any(net.starts(d, gi, state[gi]) for gi in targets):
        return Plan(True, f"{what} fits without moves", target=_target(net, d, targets, state), minimal=True,
                    search=mode)
    need, free, unit = net.need_and_free(d, state)
    if free < need:
        return Plan(False, f"{what} needs {need} {unit}; only {free} are free on the GPUs that could hold it, "
                    "and moves do not add capacity", minimal=True, search=mode)
    if net.repack_fits(d, state) is False:
        return Plan(False, f"{what} does not fit even if every instance on the GPUs that could hold it were "
                    "placed afresh, so no moves make room", minimal=True, search=mode)
    if policy.max_moves == 0:
        return Plan(False, f"{what} does not fit and the policy allows no moves", minimal=True, search=mode)
    search = _Search(net, d, targets, policy, mode == "exact")
    if min(net.lb(d, gi, state[gi]) for gi in targets) == INF:
        return Plan(False, f"instances that may not move (pinned, or not gpuvirt's) block {what} on every GPU "
                    "that could hold it", minimal=True, search=mode)
    path, proven = search.run(policy.max_moves)
    if path is None:
        if proven > policy.max_moves:
            reason = f"no sequence of at most {policy.max_moves} move(s) makes room for {what}"
        else:
            reason = (f"no sequence of at most {policy.max_moves} move(s) making room for {what} was found; "
                      f"{'the search limit was reached' if not search.complete else 'the focused search is not exhaustive'}"
                      f" (none with fewer than {proven} exists)")
        return Plan(False, reason, minimal=proven > policy.max_moves, complete=search.complete,
                    nodes=search.nodes, search=mode)
    moves, final = _materialise(net, path)
    plan = Plan(True, f"{len(moves)} move(s) make room for {what}", moves=tuple(moves),
                waves=_waves(net, path, policy.max_per_host), target=_target(net, d, targets, final),
                minimal=len(path) <= proven, complete=search.complete, nodes=search.nodes, search=mode)
    return plan


def _slot(net: ClusterIndex, gi: int, start: int) -> Slot:
    g = net.cluster.gpus[gi]
    return Slot(g.key, g.host, None if start < 0 else start)


def _materialise(net: ClusterIndex, path: list) -> tuple[list[PlannedMove], tuple]:
    state = net.start
    out = []
    for u, a, sa, b, sb, (kind, compat) in path:
        unit = net.cluster.units[u]
        out.append(PlannedMove(unit=unit.key, vm=unit.vm, kind=kind, src=_slot(net, a, sa), dst=_slot(net, b, sb),
                               profile_id=unit.placed.profile_id if unit.placed else None,
                               vgpu_type=unit.vgpu_type, data_mib=0 if kind == RECREATE else net.u_data[u],
                               compatibility=compat))
        state = _apply(net, state, u, a, b, sb)
    return out, state


def _target(net: ClusterIndex, d: int, targets: list[int], state: tuple) -> Slot | None:
    """Where the request goes in ``state``: the planner's frag-aware choice (MIG) or consolidate (vGPU)."""
    tables, pid, type_id = net.demands[d]
    fit = [gi for gi in targets if net.starts(d, gi, state[gi])]
    if not fit:
        return None
    g = net.cluster.gpus
    if pid is not None:
        gpus = [GpuState(g[gi].key, g[gi].model.mig, net.layout(state[gi])) for gi in fit]  # type: ignore[arg-type]
        dec = choose_placement(gpus, pid)
        if dec is None:     # pragma: no cover - fit is non-empty
            return None
        gi = next(i for i in fit if g[i].key == dec.gpu_key)
        return Slot(dec.gpu_key, g[gi].host, dec.start)
    boards = [VgpuBoard(g[gi].key, tuple((net.u_type[u], net.g_types[gi][net.u_type[u]].framebuffer_mib)  # type: ignore[index,misc]
                                         for _, u in net.cont[state[gi]]),
                        net._board_available(gi, type_id, net.cont[state[gi]])) for gi in fit]
    key = choose_vgpu_gpu(boards, type_id)
    gi = next(i for i in fit if g[i].key == key)
    return Slot(g[gi].key, g[gi].host, None)


def _waves(net: ClusterIndex, path: list, max_per_host: int | None) -> tuple[tuple[int, ...], ...]:
    """Group consecutive moves that may run at once: all of a wave's targets fit next to the state the wave
    starts from with every source still present, no unit moves twice in a wave, and no host takes part in
    more than ``max_per_host`` of its moves."""
    waves: list[list[int]] = []
    state = net.start
    base = state
    for i, (u, a, sa, b, sb, _) in enumerate(path):
        ok = bool(waves)
        if ok:
            cur = waves[-1] + [i]
            hosts: dict[str, int] = {}
            for j in cur:
                for h in {net.g_host[path[j][1]], net.g_host[path[j][3]]}:
                    hosts[h] = hosts.get(h, 0) + 1
            if max_per_host is not None and max(hosts.values()) > max_per_host:
                ok = False
            elif any(path[j][0] == u for j in waves[-1]):
                ok = False
            else:
                union = {path[j][3]: net.cont[base[path[j][3]]] for j in cur}
                for j in cur:
                    union[path[j][3]] = union[path[j][3]] + ((path[j][4], path[j][0]),)
                ok = all(not net.content_problems(gi, tuple(sorted(c))) for gi, c in union.items())
        if ok:
            waves[-1].append(i)
        else:
            waves.append([i])
            base = state
        state = _apply(net, state, u, a, b, sb)
    return tuple(tuple(w) for w in waves)


def _apply(net: ClusterIndex, state: tuple, u: int, a: int, b: int, sb: int) -> tuple:
    """The state after unit ``u`` moved from GPU ``a`` to (``b``, ``sb``)."""
    child = list(state)
    child[a] = net.intern(tuple(x for x in net.cont[state[a]] if x[1] != u))
    child[b] = net.intern(tuple(sorted(net.cont[child[b]] + ((sb, u),))))
    return tuple(child)


def replay(cluster: Cluster, moves: Iterable[PlannedMove], rules: MigrationRules | None = None) -> Cluster:
    """The cluster after ``moves``, checking each step as an executor would meet it: the unit is where the
    move says, its target fits next to everything present (the source included), and, when ``rules`` are
    given, the pre-flight allows the move's kind.  Raises ``UsageError`` naming the first bad step."""
    net = ClusterIndex(cluster, MovePolicy(allow=frozenset(MOVE_KINDS), max_moves=0,
                                   rules=rules or DEFAULT_RULES))
    by_key = {u.key: i for i, u in enumerate(cluster.units)}
    state = [net.cont[c] for c in net.start]
    where = {u: (gi, st) for gi, c in enumerate(state) for st, u in c}
    for n, mv in enumerate(moves, 1):
        u = by_key.get(mv.unit)
        if u is None:
            raise UsageError(f"move {n}: no instance {mv.unit!r}")
        a = net.gidx.get(mv.src.gpu)
        b = net.gidx.get(mv.dst.gpu)
        if a is None or b is None:
            raise UsageError(f"move {n}: unknown GPU {mv.src.gpu!r} or {mv.dst.gpu!r}")
        sa = -1 if mv.src.start is None else mv.src.start
        sb = -1 if mv.dst.start is None else mv.dst.start
        if where[u] != (a, sa):
            raise UsageError(f"move {n}: instance {mv.unit} is not at {mv.src.gpu}"
                             + ("" if mv.src.start is None else f"@{mv.src.start}"))
        if a == b and sa == sb:
            raise UsageError(f"move {n}: source and target are the same place")
        if b not in net.d_compat[net.u_demand[u]]:
            raise UsageError(f"move {n}: {mv.dst.gpu} cannot hold instance {mv.unit} (other model, mode or type)")
        if rules is not None and mv.kind != RECREATE:
            k = net.kind(u, a, b)
            if k is None or (mv.kind == LIVE and k[0] != LIVE):
                comp = net.kind(u, a, b)
                why = comp[1].message() if comp and comp[1] else "refused by the pre-flight"
                raise UsageError(f"move {n}: a {mv.kind} move of {mv.unit} is not allowed: {why}")
        mid = tuple(sorted(state[b] + ((sb, u),)))
        why = net.content_problems(b, mid)
        if why:
            raise UsageError(f"move {n}: {mv.dst.gpu} cannot take instance {mv.unit} while its source exists: {why[0]}")
        state[b] = mid
        state[a] = tuple(x for x in state[a] if not (x[1] == u and x[0] == sa))
        where[u] = (b, sb)
    units = []
    for i, unit in enumerate(cluster.units):
        gi, st = where[i]
        gkey = cluster.gpus[gi].key
        if gkey == unit.gpu and (unit.placed is None or unit.placed.start == st):
            units.append(unit)
        else:
            placed = None if unit.placed is None else Placed(st, unit.placed.size, unit.placed.profile_id)
            units.append(replace(unit, gpu=gkey, placed=placed))
    return replace(cluster, units=tuple(units))


def cluster_problems(cluster: Cluster) -> list[str]:
    """Every rule a cluster state breaks (empty when valid), by the same rules the planner and the simulator
    apply; malformed input (unknown GPUs, duplicate keys) raises ``UsageError``."""
    try:
        ClusterIndex(cluster, MovePolicy(max_moves=0))
    except UsageError as e:
        if "breaks the rules already" in str(e):
            return [str(e)]
        raise
    return []


__all__ = ["Host", "Gpu", "Unit", "Cluster", "Request", "MovePolicy", "Slot", "PlannedMove", "Plan",
           "plan_moves", "replay", "cluster_problems", "RECREATE", "MOVE_KINDS", "MAX_MOVES_LIMIT", "PREFER"]
