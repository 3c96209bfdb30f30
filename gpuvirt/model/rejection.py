"""Why a request was refused, and what would have avoided it (pure).

Vocabulary (``../shared/reference/live-migration.md`` section 4), in the order tried:

``fits``       nothing was refused: the request fits as things are;
``shortage``   real shortage: even placing every instance afresh (a full repack of the GPUs that could hold
               the request) leaves no room, so only more hardware or fewer instances help;
``stranded``   stranded on one GPU: the GPU's own instances, arranged differently, leave room, and moves that
               stay on that GPU get there (a GPU instance cannot change place while in use, so these are
               moves of the VMs' devices too);
``live``       fixable by live moves across GPUs or hosts;
``cold``       fixable only if some moves are cold (the pre-flight refuses live for them);
``stop``       a repack would fit, but no sequence of at most ``policy.max_moves`` moves gets there (every
               move needs its target free while its source still exists), so only stopping something, or a
               bigger rebuild, makes room.

Every category but ``fits`` and ``shortage`` is an *avoidable* rejection.  :func:`analyse_rejection` also
gives the request's size and the free capacity in the same unit (compute slices for GPU instances, MiB of
framebuffer for time-sliced vGPUs), so a report can state avoidable rejections as a count and as a share
of capacity; :func:`summarise` adds them up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from gpuvirt.model import mig
from gpuvirt.model.cluster import Cluster, ClusterIndex, Request
from gpuvirt.model.moves import MovePolicy, Plan, plan_moves
from gpuvirt.model.preflight import COLD, LIVE

CATEGORIES = ("fits", "shortage", "stranded", "live", "cold", "stop")
AVOIDABLE = ("stranded", "live", "cold", "stop")
DEFAULT_ANALYSIS_POLICY = MovePolicy(allow=frozenset({LIVE, COLD}))


@dataclass(frozen=True)
class Rejection:
    category: str                    # one of CATEGORIES
    reason: str                      # one line for an operator
    need: int                        # the request's size, in ``unit``
    free: int                        # free capacity on the GPUs that could hold it, in ``unit``
    unit: str                        # "compute slices" or "MiB of framebuffer"
    plan: Plan | None = None         # the fix, for stranded / live / cold
    proven: bool = True              # False: a search limit was hit, so stop might be a longer plan missed

    @property
    def avoidable(self) -> bool:
        return self.category in AVOIDABLE

    def to_dict(self) -> dict:
        return {"category": self.category, "reason": self.reason, "avoidable": self.avoidable,
                "need": self.need, "free": self.free, "unit": self.unit, "proven": self.proven,
                "plan": None if self.plan is None else self.plan.to_dict()}


def analyse_rejection(cluster: Cluster, request: Request,
                      policy: MovePolicy = DEFAULT_ANALYSIS_POLICY) -> Rejection:
    """Classify ``request`` on ``cluster`` (see the module docstring).

    ``policy`` bounds the moves considered (``max_moves``, pins, node budget) and which kinds count at all:
    with ``allow={"live"}`` a refusal that needs a cold move is reported as ``stop``.  Raises like
    :func:`gpuvirt.model.moves.plan_moves` for malformed input.
    """
    net = ClusterIndex(cluster, policy)
    d, targets, what = net.request_demand(request)
    if d < 0 or not targets:
        return Rejection("shortage", what, 0, 0, "compute slices")
    need, free, unit = net.need_and_free(d, net.start)
    now = plan_moves(cluster, request, replace(policy, max_moves=0))
    if now.feasible:
        return Rejection("fits", now.reason, need, free, unit, plan=now)
    repack = net.repack_fits(d, net.start)
    if free < need or repack is False:
        return Rejection("shortage", f"{what} does not fit even if every instance were placed afresh "
                         f"({free} {unit} free, {need} needed)", need, free, unit)
    best = _stranded(cluster, net, d, targets, request, policy)
    if best is not None:
        g = best.target.gpu if best.target else "?"
        return Rejection("stranded", f"{len(best.moves)} move(s) within GPU {g} make room for {what}", need, free,
                         unit, plan=best)
    proven = True
    if LIVE in policy.allow:
        live = plan_moves(cluster, request, replace(policy, allow=frozenset({LIVE})))
        if live.feasible:
            return Rejection("live", f"{len(live.moves)} live move(s) make room for {what}", need, free, unit,
                             plan=live)
        proven = live.minimal
    if COLD in policy.allow:
        cold = plan_moves(cluster, request, policy)
        if cold.feasible:
            n = cold.kinds().get(COLD, 0)
            return Rejection("cold", f"{len(cold.moves)} move(s), {n} of them cold, make room for {what}", need,
                             free, unit, plan=cold)
        proven = proven and cold.minimal
    return Rejection("stop", f"a repack would hold {what}, but no sequence of at most {policy.max_moves} "
                     "move(s) gets there: only stopping an instance (or a rebuild) makes room"
                     + ("" if proven else " (search limit reached)"), need, free, unit, proven=proven)


def _stranded(cluster: Cluster, net: ClusterIndex, d: int, targets: list[int], request: Request,
              policy: MovePolicy) -> Plan | None:
    """The cheapest plan that stays on one target GPU, among GPUs whose own instances plus the request
    fit one GPU (MIG; a time-sliced board cannot rearrange)."""
    tables, pid, _ = net.demands[d]
    if pid is None:
        return None
    best: Plan | None = None
    for gi in targets:
        content = net.cont[net.start[gi]]
        if not content:
            continue
        counts: dict[int, int] = {pid: 1}
        for _, u in content:
            q = net.u_placed[u].profile_id  # type: ignore[union-attr]
            counts[q] = counts.get(q, 0) + 1
        if not mig.fits(tables.geom, counts):
            continue
        g = cluster.gpus[gi]
        sub = Cluster(tuple(h for h in cluster.hosts if h.key == g.host), (g,),
                      tuple(u for u in cluster.units if u.gpu == g.key))
        plan = plan_moves(sub, replace(request, gpus=frozenset({g.key}), hosts=None), policy)
        if plan.feasible and plan.moves and (best is None or _rank(plan) < _rank(best)):
            best = plan
    return best


def _rank(plan: Plan) -> tuple:
    return (len(plan.moves), plan.kinds().get(COLD, 0), plan.data_mib)


def summarise(rejections: Iterable[Rejection], capacity: int | None = None) -> dict:
    """Counts and summed sizes per category; ``share_of_capacity`` (when ``capacity`` is given, in the same
    unit as the sizes) is the refused size over capacity."""
    out: dict = {c: {"count": 0, "need": 0} for c in CATEGORIES}
    for r in rejections:
        out[r.category]["count"] += 1
        out[r.category]["need"] += r.need
    avoid = {"count": sum(out[c]["count"] for c in AVOIDABLE), "need": sum(out[c]["need"] for c in AVOIDABLE)}
    out["avoidable"] = avoid
    if capacity:
        for v in out.values():
            v["share_of_capacity"] = v["need"] / capacity
    return out


__all__ = ["CATEGORIES", "AVOIDABLE", "DEFAULT_ANALYSIS_POLICY", "Rejection", "analyse_rejection", "summarise"]
