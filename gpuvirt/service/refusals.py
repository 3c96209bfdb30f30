"""Why requests are refused, for ``report --fit`` and ``attach`` (issue 13 item 1; docs/capacity-report.md,
"Refused requests").

The classification is :func:`gpuvirt.model.rejection.analyse_rejection` (shortage / stranded / live / cold /
stop) on the planner's view of the GPUs (:mod:`gpuvirt.service.rebalance`).  This module only builds that
view from the facts the caller already has and turns the answers into the report's figures and attach's one
line.  It is imported only where something was refused, so neither a plain ``report`` nor a successful
``attach`` pays for the planner.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gpuvirt.context import Context
from gpuvirt.errors import CapacityError, GpuvirtError

if TYPE_CHECKING:
    from gpuvirt.model.cluster import Cluster, Request
    from gpuvirt.model.moves import MovePolicy, Plan
    from gpuvirt.model.rejection import Rejection
    from gpuvirt.service.rebalance import Scope

# the planner (model.moves, model.cluster, service.rebalance) is imported inside the functions: this module is
# on every CLI attach's path (attach_explained), and only a refusal needs it

# report --fit: planner analyses per name and per report (a shortage or a "stop" answers for every further
# refusal of the name at no cost, see analyse_fit); the rest are counted as not analysed
MAX_ANALYSED_PER_NAME = 8
MAX_ANALYSED_TOTAL = 32
# attach: the search budget of the explanation (nodes per plan_moves call; the default 1,500 is a full plan)
ATTACH_NODE_LIMIT = 300
# the least invasive fix first: which answer counts when a name means requests on several GPU models
_ORDER = {c: i for i, c in enumerate(("fits", "stranded", "live", "cold", "stop", "shortage"))}
_FIT_VM = "(--fit)"


def analysis_policy(max_moves: int | None = None, node_limit: int | None = None) -> MovePolicy:
    """What ``gpuvirt rebalance --allow live,cold`` would consider (free instances stay, a move within one
    host is cold; ``max_moves`` defaults to rebalance's), so that a category names a plan that command finds."""
    from gpuvirt.service import rebalance

    if max_moves is None:
        max_moves = rebalance.DEFAULT_MAX_MOVES
    policy = rebalance.make_policy(max_moves=max_moves, allow="live,cold")
    return replace(policy, node_limit=node_limit) if node_limit else policy


def classify(cluster: Cluster, reqs: list[Request], policy: MovePolicy) -> tuple[Rejection, Request]:
    """The least invasive answer over the requests a name means (one per GPU model in scope)."""
    from gpuvirt.model.rejection import analyse_rejection

    best: tuple[tuple, Rejection, Request] | None = None
    for req in reqs:
        r = analyse_rejection(cluster, req, policy)
        plan = r.plan
        key = (_ORDER[r.category], len(plan.moves) if plan else 0,
               plan.kinds().get("cold", 0) if plan else 0, plan.data_mib if plan else 0)
        if best is None or key < best[0]:
            best = (key, r, req)
    assert best is not None     # requests_for never returns an empty list
    return best[1], best[2]


# --- report --fit -----------------------------------------------------------------------------------------------
def analyse_fit(ctx: Context, fit: dict[str, Any], hosts: list[Any], *, cluster: bool = False) -> None:
    """Add ``rejections`` to every request of ``fit`` (``fit_requests``' document) that has refusals.

    ``hosts`` are the report's facts of the hosts the fit counted (stale ones left out).  The analysis runs on
    the cluster as the fit left it: the planner's view of those hosts plus every instance the fit handed out
    (as VMs that do not move).  Refusals are taken one at a time, largest requests first as the fit hands
    them out; an avoidable one is assumed made (its moves carried out and the request placed) before the
    next is classified, as successive ``attach --allow-moves`` would.  A shortage or a "stop" leaves the
    state unchanged, so it answers for every further refusal of that name without another search."""
    from gpuvirt.model.rejection import CATEGORIES, summarise
    from gpuvirt.service import rebalance

    refused = [r for r in fit["requests"] if r["missing"]]
    if not refused:
        return
    hint = "gpuvirt rebalance --for {} --allow live,cold" + (" --cluster" if cluster else "")
    scope = rebalance.scope_for_hosts(ctx, hosts)
    policy = analysis_policy()
    state, broken = _after_fit(scope, fit)
    prepared = []
    for r in refused:
        why = None
        reqs: list[Request] = []
        if r["kind"] not in ("mig", "vgpu"):
            why = f"{r['kind']} requests are not moved by gpuvirt rebalance"
        elif broken:
            why = broken
        else:
            try:
                reqs = rebalance.requests_for(scope, r["request"])
            except GpuvirtError as exc:
                why = str(exc)
        unit, capacity, need = _capacity(state, reqs, policy) if reqs else ("compute slices", 0, 0)
        prepared.append((r, reqs, why, unit, capacity, need))
    # largest first, MIG before vGPUs, as fit_requests hands them out
    prepared.sort(key=lambda p: ({"mig": 0, "vgpu": 1}.get(p[0]["kind"], 2), -p[5]))
    budget = MAX_ANALYSED_TOTAL
    n_fit = 0
    for r, reqs, why, unit, capacity, need in prepared:
        found: list = []
        reasons: dict[str, str] = {}
        searches = 0
        left = r["missing"]
        while reqs and left and searches < MAX_ANALYSED_PER_NAME and budget > 0:
            try:
                rej, req = classify(state, reqs, policy)
            except GpuvirtError as exc:         # the planner refuses the state (rules it reads differently)
                why = f"the planner cannot analyse this state: {exc}"
                break
            searches += 1
            budget -= 1
            reasons.setdefault(rej.category, rej.reason)
            if rej.category in ("shortage", "stop"):
                found.extend([rej] * left)
                left = 0
                break
            found.append(rej)
            left -= 1
            n_fit += 1
            state = _place(state, rej.plan, req, f"fit-refused-{n_fit}")
        if reqs and left and why is None:
            why = f"analysis capped at {MAX_ANALYSED_PER_NAME} searches per name and {MAX_ANALYSED_TOTAL} per report"
        summary = summarise(found, capacity or None)
        out: dict[str, Any] = {"analysed": len(found), "not_analysed": left, "why_not_analysed": why,
                               "searches": searches, "unit": unit, "capacity": capacity, "need": need}
        for c in CATEGORIES + ("avoidable",):
            v = summary[c]
            out[c] = {"count": v["count"], "need": v["need"],
                      "share_of_capacity": round(v["need"] / capacity, 6) if capacity else None}
        out["reasons"] = reasons
        out["rebalance"] = hint.format(r["request"]) if reqs else None
        r["rejections"] = out


def _capacity(cluster: Cluster, reqs: list[Request], policy: MovePolicy) -> tuple[str, int, int]:
    """(unit, capacity, size of one request): compute slices of the MIG GPUs, or framebuffer MiB of the
    boards, that could hold the name (its models, in the mode it needs), in the unit of the first model's
    answer; other models in another unit are left out of the capacity."""
    from gpuvirt.model.cluster import ClusterIndex

    net = ClusterIndex(cluster, policy)
    unit = None
    capacity = need = 0
    seen: set[int] = set()
    for req in reqs:
        d, targets, _ = net.request_demand(req)
        if d < 0 or not targets:
            continue
        n, _, u = net.need_and_free(d, net.start)
        if unit is None:
            unit, need = u, n
        if u != unit:
            continue
        for gi in net.d_compat[d]:
            if gi in seen:
                continue
            seen.add(gi)
            m = cluster.gpus[gi].model
            capacity += m.mig.compute_slices if u == "compute slices" else m.memory_mib  # type: ignore[union-attr]
    return unit or "compute slices", capacity, need


def _after_fit(scope: Scope, fit: dict[str, Any]) -> tuple[Cluster, str | None]:
    """The planner's cluster with the fit's placements added (held by a VM that does not move), and why not
    when the fit's placements cannot be matched (then the analysis is skipped)."""
    from gpuvirt.model.cluster import Unit
    from gpuvirt.model.mig import Placed
    from gpuvirt.service import rebalance
    from gpuvirt.service.report_fit import _resolve

    units = list(scope.cluster.units)
    gpus = {g.key: g for g in scope.cluster.gpus}
    n = 0

    class _Gpu:                 # what report_fit._resolve reads
        def __init__(self, model: Any) -> None:
            self.model = model

    cache: dict = {}
    for r in fit["requests"]:
        if r["kind"] not in ("mig", "vgpu") or not r["placed"]:
            continue
        for p in r["placements"]:
            g = gpus.get(rebalance.gpu_key(p["host"], p["gpu"]))
            if g is None:
                continue        # a GPU the planner does not manage (containers mode, handed out whole)
            what = _resolve(_Gpu(g.model), r["kind"], r["request"], cache)
            if what is None:
                return scope.cluster, f"the fit placed {r['request']} on {g.key}, whose model does not know it"
            if r["kind"] == "mig":
                pid, vtype, fb = what.id, None, None
            else:
                pid = what.gpu_instance_profile_id if (what.mig_backed and g.mig_enabled) else None
                vtype, fb = what.id, what.framebuffer_mib
            for _ in range(p["existing"]):
                # an existing free instance of the kind asked for: now held
                i = next((k for k, u in enumerate(units) if u.gpu == g.key and u.vm is None and (
                    u.vgpu_type == vtype if vtype is not None else
                    (u.placed is not None and u.placed.profile_id == pid and u.vgpu_type is None))), None)
                if i is None:
                    return scope.cluster, f"the fit handed out a free {r['request']} on {g.key} the planner does not see"
                units[i] = replace(units[i], vm=_FIT_VM, movable=False)
            starts = list(p["starts"])
            for k in range(p["new"]):
                n += 1
                if k < len(starts):
                    size = g.model.mig.profile(pid).memory_slices  # type: ignore[union-attr,arg-type]
                    units.append(Unit(f"fit-{n}", g.key, placed=Placed(starts[k], size, pid), vgpu_type=vtype,  # type: ignore[arg-type]
                                      vm=_FIT_VM, fb_mib=fb, movable=False))
                elif pid is not None:
                    # a MIG-backed vGPU on a free GPU instance of its profile
                    i = next((j for j, u in enumerate(units) if u.gpu == g.key and u.vm is None and u.vgpu_type is None
                              and u.placed is not None and u.placed.profile_id == pid), None)
                    if i is None:
                        return scope.cluster, f"the fit placed {r['request']} on a GPU instance of {g.key} the planner does not see"
                    units[i] = replace(units[i], vgpu_type=vtype, vm=_FIT_VM, fb_mib=fb, movable=False)
                else:
                    units.append(Unit(f"fit-{n}", g.key, vgpu_type=vtype, vm=_FIT_VM, fb_mib=fb, movable=False))
    return replace(scope.cluster, units=tuple(units)), None


def _place(cluster: Cluster, plan: Plan | None, req: Request, key: str) -> Cluster:
    """``cluster`` after ``plan``'s moves, with the request placed where the plan says."""
    from gpuvirt.model.cluster import Unit
    from gpuvirt.model.mig import Placed
    from gpuvirt.model.moves import replay

    if plan is None or plan.target is None:     # pragma: no cover - every non-shortage answer carries its plan
        return cluster
    after = replay(cluster, plan.moves) if plan.moves else cluster
    g = next(g for g in after.gpus if g.key == plan.target.gpu)
    pid, fb = req.profile_id, None
    if req.vgpu_type is not None:
        t = next(t for t in g.model.vgpu.types if t.id == req.vgpu_type)  # type: ignore[union-attr]
        fb = t.framebuffer_mib
        pid = t.gpu_instance_profile_id if (t.mig_backed and g.mig_enabled) else None
    placed = None
    if pid is not None and plan.target.start is not None:
        placed = Placed(plan.target.start, g.model.mig.profile(pid).memory_slices, pid)  # type: ignore[union-attr]
    return replace(after, units=after.units + (Unit(key, g.key, placed=placed, vgpu_type=req.vgpu_type, vm=_FIT_VM,
                                                    fb_mib=fb, movable=False),))


# --- attach -------------------------------------------------------------------------------------------------------
def attach_explained(ctx: Context, vm: str, **kw: Any) -> Any:
    """``attach`` whose refusal for lack of room says whether moves would have made it (one line, same error
    type and exit status; attach itself changed nothing by then, and the analysis changes nothing)."""
    from gpuvirt.service.attach import attach

    try:
        return attach(ctx, vm, **kw)
    except CapacityError as exc:
        if (str(exc).startswith("no capacity") and kw.get("count", 1) == 1 and kw.get("fmt") != "cdi"
                and (kw.get("vgpu") or kw.get("mig"))):
            note = explain_refusal(ctx, vm, vgpu=kw.get("vgpu"), mig=kw.get("mig"), gpu=kw.get("gpu"))
            if note:
                exc.message = f"{exc.message}; {note}"
                exc.args = (exc.message,)
        raise


def explain_refusal(ctx: Context, vm: str, *, vgpu: str | None = None, mig: str | None = None,
                    gpu: str | None = None) -> str | None:
    """The classification of a refused single ``--vgpu`` / ``--mig`` request on this host, as text: a real
    shortage, or avoidable by which moves (and the command that makes them), or not within the move budget.
    None when there is nothing to add (the planner sees room, or the analysis itself failed: an explanation
    never turns a refusal into another error)."""
    try:
        from gpuvirt.service import attach as svc
        from gpuvirt.service import rebalance

        name = vgpu or svc._mig_backed_type_for(ctx, mig or "", gpu)
        scope = rebalance.load_scope(ctx)
        local = ctx.settings.host_id
        gpus = None
        if gpu:
            from gpuvirt.service import hostview

            gpus = frozenset(rebalance.gpu_key(local, g.address)
                             for g in hostview.snapshot(ctx, nvml=True).select(gpu))
        reqs = [replace(r, hosts=frozenset({local}), gpus=gpus) for r in rebalance.requests_for(scope, name)]
        max_moves = int(ctx.settings.policies.get("rebalance_max_moves", 2))
        rej, _ = classify(scope.cluster, reqs, analysis_policy(max_moves, ATTACH_NODE_LIMIT))
    except Exception:  # noqa: BLE001 - the refusal stands as it is whatever goes wrong here
        return None
    if rej.category == "fits":
        return None
    if rej.category == "shortage":
        return "real shortage" + (f" ({rej.free} of {rej.need} {rej.unit} free on the GPUs that could hold it; "
                                  "moving VMs does not add room)" if rej.need else "")
    if rej.category == "stop":
        return (f"not avoidable by at most {max_moves} move(s) (policies.rebalance_max_moves): only stopping a VM "
                "makes room" + ("" if rej.proven else " (search limit reached)"))
    plan = rej.plan
    assert plan is not None
    kinds = plan.kinds()
    allow = ",".join(k for k in ("live", "cold") if kinds.get(k))
    n = len(plan.moves)
    what = " ".join(f"{kinds[k]} {k}" for k in ("live", "cold") if kinds.get(k))
    where = f" within GPU {plan.target.gpu.split('/', 1)[-1]}" if rej.category == "stranded" and plan.target else ""
    flag = (f"--vgpu {vgpu}" if vgpu else f"--mig {mig}") + (f" --gpu {gpu}" if gpu else "")
    return (f"avoidable by {what} move{'s' if n != 1 else ''}{where} (gpuvirt attach {vm} {flag} --allow-moves "
            f"{allow}, or gpuvirt rebalance --for {name}" + ("" if allow == "live" else f" --allow {allow}") + ")")


__all__ = ["analyse_fit", "attach_explained", "explain_refusal", "classify", "analysis_policy",
           "MAX_ANALYSED_PER_NAME", "MAX_ANALYSED_TOTAL", "ATTACH_NODE_LIMIT"]
