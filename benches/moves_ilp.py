"""Reference for the move planner (B4): the fewest make-before-break moves as a time-indexed integer program.

Written from the rules alone - GPU-instance geometry from the catalog (starts, memory and compute slices,
per-profile caps), vGPU board limits from the catalog (one framebuffer size per ``same-size`` board, one type
per ``same-type`` board, the type's maximum, one VF per vGPU) and the pre-flight verdict of
``gpuvirt.model.preflight.check_move`` for each (instance, source GPU, target GPU) - and solved by scipy's
HiGHS.  It shares no code with ``gpuvirt.model.moves`` / ``gpuvirt.model.cluster``; it only reads their input
dataclasses.

Model, for K steps (one move per step at most):

* ``x[u,p,t]`` (binary): instance u sits at place p after step t (t = 0 is the current state, fixed);
* ``m[u,t]`` (binary): u moves at step t; a change of place needs it; at most one move per step;
* ``w[u,p,t]`` (continuous, >= x[u,p,t-1] and >= x[u,p,t]): u occupies p *during* step t - before and after
  a move both places are held (the target is created while the source exists), and every capacity rule is
  imposed on w, so each mid-move state is valid;
* a move from GPU a to GPU b is forbidden when the pre-flight gives no kind the policy allows, and counted
  as cold when the best allowed kind is cold;
* after step K the request takes one place of its own, and the final state with it must be valid.

Objective: 1000 x moves + cold moves (so the number of moves is minimised first, then cold moves).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from gpuvirt.model.preflight import COLD, LIVE, check_move, pgpu_metadata, vgpu_metadata


class _Lp:
    def __init__(self):
        self.names: list = []
        self.index: dict = {}
        self.integer: list[int] = []
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.rows: list[dict[int, float]] = []
        self.rlo: list[float] = []
        self.rhi: list[float] = []

    def var(self, name, integer=True, lo=0.0, hi=1.0) -> int:
        i = len(self.names)
        self.names.append(name)
        self.index[name] = i
        self.integer.append(1 if integer else 0)
        self.lo.append(lo)
        self.hi.append(hi)
        return i

    def row(self, coeffs, lo, hi):
        r: dict[int, float] = defaultdict(float)
        for j, v in coeffs:
            r[j] += v
        self.rows.append(r)
        self.rlo.append(lo)
        self.rhi.append(hi)

    def solve(self, cost: dict[int, float]):
        n = len(self.names)
        c = np.zeros(n)
        for j, v in cost.items():
            c[j] = v
        a = np.zeros((len(self.rows), n))
        for i, r in enumerate(self.rows):
            for j, v in r.items():
                a[i, j] = v
        return milp(c, integrality=np.array(self.integer), bounds=Bounds(np.array(self.lo), np.array(self.hi)),
                    constraints=LinearConstraint(a, np.array(self.rlo), np.array(self.rhi)),
                    options={"time_limit": 60})


def _places(cluster, gi, unit_like):
    """Legal places of an instance shape on GPU gi ignoring other instances: (gpu, start) pairs."""
    g = cluster.gpus[gi]
    kind, key = unit_like
    if kind == "gi":
        if not g.mig_enabled or g.model.mig is None:
            return []
        prof = next((p for p in g.model.mig.gi_profiles if p.id == key[0]), None)
        if prof is None or g.model.id != key[2]:
            return []
        if key[1] is not None and (g.model.vgpu is None or all(t.id != key[1] for t in g.model.vgpu.types)):
            return []
        return [(gi, s) for s in prof.starts]
    if g.mig_enabled or g.model.vgpu is None:
        return []
    t = next((t for t in g.model.vgpu.types if t.id == key), None)
    if t is None or t.gpu_instance_profile_id is not None:
        return []
    return [(gi, -1)]


def min_moves(cluster, request, allow, rules, max_moves, pinned=frozenset()):
    """(moves, cold moves) of the cheapest plan with at most ``max_moves`` moves, or None when none exists.

    ``request`` is a ``gpuvirt.model.cluster.Request`` (its ``model`` must be set); ``pinned`` holds unit keys
    that must not move (the caller resolves pinned VMs / tenants)."""
    gpus = cluster.gpus
    hosts = {h.key: h for h in cluster.hosts}
    gidx = {g.key: i for i, g in enumerate(gpus)}
    units = list(cluster.units)
    lp = _Lp()
    K = max_moves

    def shape(u):
        if u.placed is not None:
            return ("gi", (u.placed.profile_id, u.vgpu_type, gpus[gidx[u.gpu]].model.id))
        return ("vgpu", u.vgpu_type)

    def vtype(gi, tid):
        return next(t for t in gpus[gi].model.vgpu.types if t.id == tid)

    kinds: dict = {}

    def kind(ui, a, b):
        key = (ui, a, b)
        if key not in kinds:
            u = units[ui]
            ga, gb = gpus[a], gpus[b]
            vm = vgpu_metadata(ga.model, u.vgpu_type, stack=hosts[ga.host].stack, guest=u.guest,
                               device_id=ga.device_id, migration_cap=u.migration_cap)
            pg = pgpu_metadata(gb.model, stack=hosts[gb.host].stack, device_id=gb.device_id,
                               migration_cap=gb.migration_cap)
            if u.vm is None:
                chk = check_move(vm, pg, (LIVE, COLD), rules)
                kinds[key] = None if chk.compatibility.verdict == "none" else "recreate"
            else:
                kinds[key] = check_move(vm, pg, allow, rules).kind
        return kinds[key]

    places = []
    for ui, u in enumerate(units):
        own = (gidx[u.gpu], -1 if u.placed is None else u.placed.start)
        ps = [own]
        if u.key not in pinned:
            for gi in range(len(gpus)):
                ps += [p for p in _places(cluster, gi, shape(u)) if p != own]
        places.append(ps)
    x = {}
    for ui in range(len(units)):
        for p in places[ui]:
            for t in range(K + 1):
                fixed = 1.0 if (t == 0 and p == places[ui][0]) else 0.0
                x[ui, p, t] = lp.var(("x", ui, p, t), lo=fixed if t == 0 else 0.0, hi=fixed if t == 0 else 1.0)
    m = {(ui, t): lp.var(("m", ui, t)) for ui in range(len(units)) for t in range(1, K + 1)}
    cold = {(ui, t): lp.var(("c", ui, t)) for ui in range(len(units)) for t in range(1, K + 1)}
    w = {}
    for ui in range(len(units)):
        for p in places[ui]:
            for t in range(1, K + 1):
                w[ui, p, t] = lp.var(("w", ui, p, t), integer=False)
                lp.row([(w[ui, p, t], 1), (x[ui, p, t - 1], -1)], 0, np.inf)
                lp.row([(w[ui, p, t], 1), (x[ui, p, t], -1)], 0, np.inf)
    for ui in range(len(units)):
        for t in range(K + 1):
            lp.row([(x[ui, p, t], 1) for p in places[ui]], 1, 1)
        for t in range(1, K + 1):
            for p in places[ui]:
                lp.row([(x[ui, p, t], 1), (x[ui, p, t - 1], -1), (m[ui, t], -1)], -np.inf, 0)
            # a move to a GPU whose pre-flight refuses, or which the policy does not allow, is impossible;
            # one the pre-flight allows only cold is counted as cold
            on = defaultdict(list)
            for p in places[ui]:
                on[p[0]].append(p)
            for a, pa in on.items():
                for b, pb in on.items():
                    k = kind(ui, a, b)
                    was = [(x[ui, p, t - 1], 1) for p in pa]
                    now = [(x[ui, p, t], 1) for p in pb]
                    if a != b:
                        if k is None:
                            lp.row(was + now, -np.inf, 1)
                        elif k == COLD:
                            lp.row([(cold[ui, t], 1)] + [(j, -1) for j, _ in was + now], -1, np.inf)
                        continue
                    # within one GPU only a change of place is a move
                    if k is None:
                        for p in pa:
                            lp.row([(x[ui, p, t], 1)] + [(x[ui, q, t - 1], 1) for q in pa if q != p], -np.inf, 1)
                    elif k == COLD:
                        lp.row([(cold[ui, t], 1), (m[ui, t], -1)] + [(j, -1) for j, _ in was + now], -2, np.inf)
    for t in range(1, K + 1):
        lp.row([(m[ui, t], 1) for ui in range(len(units))], 0, 1)
        for ui in range(len(units)):
            lp.row([(cold[ui, t], 1), (m[ui, t], -1)], -np.inf, 0)

    # the request's own places (final state only)
    req_places = []
    for gi, g in enumerate(gpus):
        if request.model is not None and g.model.id != request.model:
            continue
        if request.hosts is not None and g.host not in request.hosts:
            continue
        if request.gpus is not None and g.key not in request.gpus:
            continue
        if request.vgpu_type is not None:
            t = next((t for t in g.model.vgpu.types if t.id == request.vgpu_type), None) if g.model.vgpu else None
            if t is None:
                continue
            if t.gpu_instance_profile_id is not None:
                sh = ("gi", (t.gpu_instance_profile_id, t.id, g.model.id))
            else:
                sh = ("vgpu", t.id)
        else:
            sh = ("gi", (request.profile_id, None, g.model.id))
        req_places += _places(cluster, gi, sh)
    r = {p: lp.var(("r", p)) for p in req_places}
    lp.row([(v, 1) for v in r.values()], 1, 1)
    req_shape = (request.profile_id, request.vgpu_type)

    def unit_profile(ui):
        u = units[ui]
        return u.placed.profile_id if u.placed is not None else None

    # capacity rules, on w during each step and on x + r after the last
    def capacity(occ, step):
        """occ: list of (var, unit index or None for the request, place)."""
        by_gpu = defaultdict(list)
        for var, ui, p in occ:
            by_gpu[p[0]].append((var, ui, p))
        for gi, items in by_gpu.items():
            g = gpus[gi]
            if g.mig_enabled:
                geom = g.model.mig

                def prof_of(ui):
                    pid = req_profile if ui is None else unit_profile(ui)
                    return next(p for p in geom.gi_profiles if p.id == pid)
                for sl in range(geom.memory_slices):
                    lp.row([(v, 1) for v, ui, p in items
                            if p[1] <= sl < p[1] + prof_of(ui).memory_slices], -np.inf, 1)
                lp.row([(v, prof_of(ui).compute_slices) for v, ui, p in items], -np.inf, geom.compute_slices)
                for prof in geom.gi_profiles:
                    same = [(v, 1) for v, ui, p in items if prof_of(ui).id == prof.id]
                    if same:
                        lp.row(same, -np.inf, prof.max_instances)
                vgpu_items = [(v, 1) for v, ui, p in items
                              if (units[ui].vgpu_type if ui is not None else request.vgpu_type) is not None]
                if vgpu_items and g.model.vgpu is not None and g.model.vgpu.parent == "vf":
                    vf = g.enabled_vfs if g.enabled_vfs is not None else g.model.sriov.total_vfs
                    lp.row(vgpu_items, -np.inf, vf)
            else:
                spec = g.model.vgpu
                classes = defaultdict(list)
                caps: dict = {}
                for v, ui, p in items:
                    tid = request.vgpu_type if ui is None else units[ui].vgpu_type
                    t = vtype(gi, tid)
                    cls = t.id if spec.policy == "same-type" else t.framebuffer_mib
                    classes[cls].append(v)
                    caps[cls] = min(caps.get(cls, 10**9), t.max_instances)
                assert spec.policy in ("same-type", "same-size"), spec.policy
                zs = []
                for cls, vs in classes.items():
                    z = lp.var(("z", gi, cls, step))
                    zs.append(z)
                    lp.row([(v, 1) for v in vs] + [(z, -caps[cls])], -np.inf, 0)
                lp.row([(z, 1) for z in zs], -np.inf, 1)
                if spec.parent == "vf":
                    vf = g.enabled_vfs if g.enabled_vfs is not None else g.model.sriov.total_vfs
                    lp.row([(v, 1) for v, _, _ in items], -np.inf, vf)

    if request.vgpu_type is not None:
        tt = None
        for g in gpus:
            if g.model.vgpu is not None:
                tt = next((t for t in g.model.vgpu.types if t.id == request.vgpu_type), tt)
        req_profile = tt.gpu_instance_profile_id if tt is not None else None
    else:
        req_profile = request.profile_id
    del req_shape
    for t in range(1, K + 1):
        capacity([(w[ui, p, t], ui, p) for ui in range(len(units)) for p in places[ui]], t)
    capacity([(x[ui, p, K], ui, p) for ui in range(len(units)) for p in places[ui]]
             + [(v, None, p) for p, v in r.items()], "final")
    cost = {j: 1000.0 for j in m.values()}
    cost.update({j: 1.0 for j in cold.values()})
    res = lp.solve(cost)
    if res.status == 2:
        return None
    assert res.success, res.message
    val = res.x
    moves = int(round(sum(val[j] for j in m.values())))
    colds = int(round(sum(val[j] for j in cold.values())))
    return moves, colds
