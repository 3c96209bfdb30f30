"""Move planner and rejection analysis.

Every plan is replayed here step by step with the rules the simulator enforces (``gpuvirt.sim.rules`` on a
state document built for the GPU, and ``gpuvirt.model.mig``), with the moved instance present at its source
and its target at once, as the executor will create it.  Minimality is checked against a breadth-first search
written here from those rules and the pre-flight alone (the planner's own search is not used).
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuvirt.errors import NotFoundError, UsageError
from gpuvirt.model import mig
from gpuvirt.model.catalog import load_catalog
from gpuvirt.model.cluster import Cluster, Gpu, Host, Request, Unit
from gpuvirt.model.mig import Placed
from gpuvirt.model.moves import MovePolicy, PlannedMove, Slot, cluster_problems, plan_moves, replay
from gpuvirt.model.preflight import COLD, LIVE, HostStack, MigrationRules, check_move, pgpu_metadata, vgpu_metadata
from gpuvirt.model.rejection import analyse_rejection, summarise
from gpuvirt.sim import rules as simrules

CAT = load_catalog()
A100, H100, L40S = CAT.get("a100-40gb"), CAT.get("h100-80gb"), CAT.get("l40s")
GEOM = A100.mig
MIGTYPE = {t.gpu_instance_profile_id: t.id for t in A100.vgpu.types if t.gpu_instance_profile_id is not None}
QTYPE = {t.framebuffer_mib // 1024: t for t in L40S.vgpu.types if t.name.endswith("Q")}
S1 = HostStack(driver="550.127.05", os="rhel-9.4")
S2 = HostStack(driver="550.144.03", os="rhel-9.4")
LIVE_MIG = MigrationRules(mig_backed_live=True)
BOTH = frozenset({LIVE, COLD})
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def P(pid, start):
    return Placed(start, GEOM.profile(pid).memory_slices, pid)


def vm_unit(key, gpu, pid, start, ram=8192, **kw):
    return Unit(key, gpu, P(pid, start), MIGTYPE[pid], vm=f"vm-{key}", ram_mib=ram, **kw)


def mig_cluster(layouts, stacks=(S1,), gpus_per_host=None, **gpu_kw):
    """layouts: one list of (key, profile id, start) per GPU; GPU i on host i // gpus_per_host."""
    n = len(layouts)
    per = gpus_per_host or n
    hosts = tuple(Host(f"h{i}", stacks[i % len(stacks)]) for i in range((n + per - 1) // per))
    gpus = tuple(Gpu(f"g{i}", f"h{i // per}", A100, True, **gpu_kw) for i in range(n))
    units = tuple(vm_unit(k, f"g{i}", pid, s) for i, lay in enumerate(layouts) for k, pid, s in lay)
    return Cluster(hosts, gpus, units)


# --- the simulator's rules, applied to one GPU's contents ------------------------------------------------------------
def sim_gpu_ok(gpu: Gpu, units: list[tuple[Unit, int | None]]) -> bool:
    """Would the simulator hold these instances on this GPU?  MIG: mig.layout_problems, then every vGPU is
    created on its own GPU instance through sim.rules.board_room / vgpu_available, one free VF each.
    Time-sliced: each vGPU created in turn through sim.rules.vgpu_available on a free VF."""
    model = gpu.model
    vfs = gpu.enabled_vfs if gpu.enabled_vfs is not None else (model.sriov.total_vfs if model.sriov else 0)
    device = {"model": model.id, "address": "0000:41:00.0",
              "vfs": [{"address": f"0000:41:01.{i}"} for i in range(vfs)]}
    state: dict = {"mdevs": []}
    if gpu.mig_enabled:
        layout = [Placed(start, u.placed.size, u.placed.profile_id) for u, start in units]
        if mig.layout_problems(model.mig, layout):
            return False
        device["mig"] = {"current": True, "gpu_instances": [{"id": i, "profile_id": p.profile_id}
                                                             for i, p in enumerate(layout)]}
        order = [(u, i) for i, (u, _) in enumerate(units) if u.vgpu_type is not None]
    else:
        device["mig"] = None
        order = sorted(((u, None) for u, _ in units), key=lambda x: (model.vgpu.type_by_id(x[0].vgpu_type).max_instances,
                                                                      x[0].vgpu_type))
    for u, gi_id in order:
        vt = model.vgpu.type_by_id(u.vgpu_type)
        vf = next((v for v in device["vfs"] if not simrules.vf_has_vgpu(state, v)), None)
        if vf is None or simrules.vgpu_available(state, device, vf["address"], vt) <= 0:
            return False
        if gi_id is not None:
            # the simulator hands out the lowest free GPU instance of the type's profile; ours must be the one
            # this instance sits on, which holds when every instance of that profile carries a vGPU
            gi_id = simrules.free_gpu_instance_for(state, device, vt)
            if gi_id is None:
                return False
        state["mdevs"].append({"parent": vf["address"], "type": f"nvidia-{vt.id}", "gpu_instance_id": gi_id})
    return True


def check_steps(cluster: Cluster, moves) -> Cluster:
    """Replay ``moves`` with the simulator's rules; each mid-move GPU holds source and target at once."""
    where = {u.key: (u.gpu, u.placed.start if u.placed else None) for u in cluster.units}
    by_key = {u.key: u for u in cluster.units}
    gpus = {g.key: g for g in cluster.gpus}

    def on(gkey, extra=None):
        out = [(by_key[k], s) for k, (g, s) in where.items() if g == gkey]
        if extra:
            out.append(extra)
        return out
    for m in moves:
        assert where[m.unit] == (m.src.gpu, m.src.start), f"{m.unit} is not where the move starts"
        u = by_key[m.unit]
        assert (m.src.gpu, m.src.start) != (m.dst.gpu, m.dst.start)
        tgt = gpus[m.dst.gpu]
        assert tgt.model.id == gpus[m.src.gpu].model.id and tgt.mig_enabled == gpus[m.src.gpu].mig_enabled
        moved = u if u.placed is None else Unit(u.key + "'", u.gpu, Placed(m.dst.start, u.placed.size,
                                                                             u.placed.profile_id), u.vgpu_type)
        assert sim_gpu_ok(tgt, on(m.dst.gpu, (moved, m.dst.start))), f"target of {m.describe()} does not fit"
        where[m.unit] = (m.dst.gpu, m.dst.start)
    for g in cluster.gpus:
        assert sim_gpu_ok(g, on(g.key))
    return cluster


# --- a breadth-first reference, from the rules alone -------------------------------------------------------------------
def reference_min(cluster: Cluster, request: Request, allow, rules, pinned=frozenset(), limit=3):
    """(moves, cold moves) of the cheapest plan of at most ``limit`` moves, or None."""
    gpus = {g.key: g for g in cluster.gpus}
    hosts = {h.key: h for h in cluster.hosts}
    units = {u.key: u for u in cluster.units}

    def kind(u, a, b):
        ga, gb = gpus[a], gpus[b]
        vm = vgpu_metadata(ga.model, u.vgpu_type, stack=hosts[ga.host].stack, device_id=ga.device_id)
        pg = pgpu_metadata(gb.model, stack=hosts[gb.host].stack, device_id=gb.device_id)
        return check_move(vm, pg, allow, rules).kind

    def contents(state, gkey):
        return [(units[k], s) for k, (g, s) in state if g == gkey]

    def fits(state):
        for g in cluster.gpus:
            if request.gpus is not None and g.key not in request.gpus:
                continue
            if request.vgpu_type is not None:
                vt = g.model.vgpu.type_by_id(request.vgpu_type) if g.model.vgpu else None
                if vt is None or g.mig_enabled != vt.mig_backed:
                    continue
                if vt.mig_backed:
                    prof = g.model.mig.profile(vt.gpu_instance_profile_id)
                    places = [(Unit("req", g.key, Placed(s, prof.memory_slices, prof.id), vt.id), s) for s in prof.starts]
                else:
                    places = [(Unit("req", g.key, None, vt.id), None)]
            else:
                prof = g.model.mig.profile(request.profile_id)
                places = [(Unit("req", g.key, Placed(s, prof.memory_slices, prof.id)), s) for s in prof.starts]
            for extra in places:
                if sim_gpu_ok(g, contents(state, g.key) + [extra]):
                    return True
        return False

    start = frozenset((u.key, (u.gpu, u.placed.start if u.placed else None)) for u in cluster.units)
    best: dict = {start: 0}
    layer = {start: 0}
    for depth in range(limit + 1):
        done = [c for s, c in layer.items() if fits(s)]
        if done:
            return depth, min(done)
        if depth == limit:
            return None
        nxt: dict = {}
        for state, cold in layer.items():
            where = dict(state)
            for k, (ga, sa) in where.items():
                if k in pinned:
                    continue
                u = units[k]
                for gb, g in gpus.items():
                    if g.model.id != gpus[ga].model.id or g.mig_enabled != gpus[ga].mig_enabled:
                        continue
                    kd = kind(u, ga, gb)
                    if kd is None:
                        continue
                    starts = u.placed and g.model.mig.profile(u.placed.profile_id).starts or [None]
                    for sb in starts:
                        if (gb, sb) == (ga, sb if u.placed is None else sa) and (u.placed is None or sb == sa):
                            continue
                        if u.placed is None and gb == ga:
                            continue
                        moved = u if u.placed is None else Unit(k + "'", gb, Placed(sb, u.placed.size,
                                                                                    u.placed.profile_id), u.vgpu_type)
                        if not sim_gpu_ok(g, contents(state, gb) + [(moved, sb)]):
                            continue
                        new = frozenset((kk, (gb, sb) if kk == k else v) for kk, v in state)
                        c = cold + (kd == COLD)
                        if new not in best or c < best[new]:
                            best[new] = c
                            nxt[new] = c
        layer = nxt
    return None


# --- scenarios -----------------------------------------------------------------------------------------------------------
def test_fits_without_moves_and_plan_contract():
    cl = mig_cluster([[("a", 9, 4)], []])
    p = plan_moves(cl, Request(profile_id=0, model="a100-40gb"))
    assert p.feasible and p.moves == () and p.target == Slot("g1", "h0", 0) and p.minimal
    json.dumps(p.to_dict())


def test_one_live_move_across_gpus_then_the_request():
    cl = mig_cluster([[("a", 9, 4)], [("b", 5, 0)]])
    p = plan_moves(cl, Request(vgpu_type=MIGTYPE[0], model="a100-40gb"), MovePolicy(rules=LIVE_MIG))
    assert p.feasible and len(p.moves) == 1 and p.minimal
    m = p.moves[0]
    assert (m.unit, m.kind, m.src, m.dst) == ("a", LIVE, Slot("g0", "h0", 4), Slot("g1", "h0", 4))
    assert m.data_mib == 8192 + 20480 and p.data_mib == m.data_mib
    assert p.target == Slot("g0", "h0", 0)
    after = replay(check_steps(cl, p.moves), p.moves, LIVE_MIG)
    assert next(u for u in after.units if u.key == "a").gpu == "g1"
    d = p.to_dict()
    assert d["unlocks"] == {"host": "h0", "gpu": "g0", "start": 0}
    assert d["moves"][0]["from"] == {"host": "h0", "gpu": "g0", "start": 4} and d["moves"][0]["kind"] == "live"


def test_default_rules_make_mig_backed_moves_cold_and_the_policy_decides():
    cl = mig_cluster([[("a", 9, 4)], [("b", 5, 0)]])
    req = Request(vgpu_type=MIGTYPE[0], model="a100-40gb")
    live_only = plan_moves(cl, req, MovePolicy())
    assert not live_only.feasible and "no sequence of at most 3" in live_only.reason
    p = plan_moves(cl, req, MovePolicy(allow=BOTH))
    assert p.feasible and p.moves[0].kind == COLD
    assert "NVML_VGPU_COMPATIBILITY_LIMIT_OTHER" in p.moves[0].compatibility.message()
    with pytest.raises(UsageError, match="is not allowed"):
        replay(cl, [PlannedMove(m.unit, m.vm, LIVE, m.src, m.dst, m.profile_id, m.vgpu_type, m.data_mib, None)
                    for m in p.moves], MigrationRules())


def test_live_preferred_over_cold_at_equal_count_and_cold_across_driver_groups():
    # GPU g0 (host h0) holds a 3g that must leave; g1 on h0 and g2 on h1 (other driver) both have room
    cl = mig_cluster([[("a", 9, 4)], [("b", 5, 0)], [("c", 5, 0)]], stacks=(S1, S2), gpus_per_host=2)
    p = plan_moves(cl, Request(vgpu_type=MIGTYPE[0], model="a100-40gb", gpus=frozenset({"g0"})),
                   MovePolicy(allow=BOTH, rules=LIVE_MIG))
    assert [m.kind for m in p.moves] == [LIVE] and p.moves[0].dst.gpu == "g1"
    # only the other host has room: the move is cold, with the host-driver limit code
    cl2 = mig_cluster([[("a", 9, 4)], [("b", 5, 0), ("x", 9, 4)], [("c", 5, 0)]], stacks=(S1, S2), gpus_per_host=2)
    p2 = plan_moves(cl2, Request(vgpu_type=MIGTYPE[0], model="a100-40gb", gpus=frozenset({"g0"})),
                    MovePolicy(allow=BOTH, rules=LIVE_MIG))
    assert [m.kind for m in p2.moves] == [COLD] and p2.moves[0].dst.gpu == "g2"
    assert "NVML_VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER" in p2.moves[0].compatibility.message()
    assert not plan_moves(cl2, Request(vgpu_type=MIGTYPE[0], model="a100-40gb", gpus=frozenset({"g0"})),
                          MovePolicy(allow=frozenset({LIVE}), rules=LIVE_MIG)).feasible
    check_steps(cl2, p2.moves)


def test_fewest_moves_then_least_data():
    # g0 and g1 each hold one 3g, g2 has room for one more: freeing either GPU for a 7g takes one move; the
    # VM with less RAM goes
    cl = Cluster((Host("h0", S1),), tuple(Gpu(f"g{i}", "h0", A100, True) for i in range(3)),
                 (vm_unit("big", "g0", 9, 4, ram=65536), vm_unit("small", "g1", 9, 4, ram=2048),
                  vm_unit("x", "g2", 9, 0)))
    req = Request(vgpu_type=MIGTYPE[0], model="a100-40gb")
    p = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG))
    assert [m.unit for m in p.moves] == ["small"] and p.target.gpu == "g1"
    assert (len(p.moves), 0) == reference_min(cl, req, frozenset({LIVE}), LIVE_MIG)
    check_steps(cl, p.moves)


def test_least_fragmentation_before_least_data():
    # one move frees a GPU for a 7g either way: the small VM's 3g next to the 2g@4 on g0 would strand a slice
    # (3g@0 + 2g@4), the big VM's 2g next to the 3g@4 on g1 strands none; with prefer="fragmentation" the free
    # space decides before the data moved, by default (prefer="data", issue 13's order) the data does
    cl = Cluster((Host("h0", S1),), tuple(Gpu(f"g{i}", "h0", A100, True) for i in range(2)),
                 (vm_unit("big", "g0", 14, 4, ram=65536), vm_unit("small", "g1", 9, 4, ram=2048)))
    req = Request(vgpu_type=MIGTYPE[0], model="a100-40gb")
    p = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, prefer="fragmentation"))
    assert [m.unit for m in p.moves] == ["big"] and p.target.gpu == "g0"
    assert p.moves[0].dst.gpu == "g1" and p.moves[0].dst.start in (0, 2)    # a 2g or a 1g still fits beside
    d = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG))
    assert MovePolicy().prefer == "data"
    assert [m.unit for m in d.moves] == ["small"] and d.target.gpu == "g1" and d.data_mib < p.data_mib
    assert (d.moves[0].dst.gpu, d.moves[0].dst.start) == ("g0", 0)
    assert (1, 0) == reference_min(cl, req, frozenset({LIVE}), LIVE_MIG)
    check_steps(cl, p.moves)
    check_steps(cl, d.moves)
    with pytest.raises(UsageError, match="prefer must be"):
        MovePolicy(prefer="speed")


def test_chain_in_execution_order_and_make_before_break():
    # a 7g needs g0 empty; its 3g has nowhere to go until a 2g (or a 1g) on another GPU makes room: two
    # moves, the enabling one first
    cl = mig_cluster([[("a", 9, 4)],
                      [("b", 5, 0), ("c", 14, 4)],
                      [("d", 5, 0), ("e", 19, 6)]])
    req = Request(vgpu_type=MIGTYPE[0], model="a100-40gb")
    p = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, search="exact"))
    ref = reference_min(cl, req, frozenset({LIVE}), LIVE_MIG)
    assert p.feasible and (len(p.moves), 0) == ref == (2, 0)
    assert p.moves[-1].unit == "a" and p.target.gpu == "g0" and p.minimal
    check_steps(cl, p.moves)
    # the focused search finds the same count here
    f = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, search="focused"))
    assert len(f.moves) == 2
    check_steps(cl, f.moves)


def test_make_before_break_within_one_gpu_needs_both_places_at_once():
    # 2g@0 + 2g@2 + 3g@4 use all 7 compute slices: no instance can be recreated elsewhere on this GPU while
    # it still exists, so a 4g cannot be made room for on g0 by moves within g0 alone
    cl = mig_cluster([[("a", 14, 0), ("b", 14, 2), ("c", 9, 4)]])
    req = Request(vgpu_type=MIGTYPE[5], model="a100-40gb")
    p = plan_moves(cl, req, MovePolicy(allow=BOTH, rules=LIVE_MIG))
    assert not p.feasible
    r = analyse_rejection(cl, req, MovePolicy(allow=BOTH, rules=LIVE_MIG))
    assert r.category == "shortage"      # 2g + 2g + 3g + 4g = 11 slices on one 7-slice GPU
    # one GPU instance shifted within its GPU, its source kept until the target exists (3g@0 -> 3g@4: both
    # fit at once, 6 of 7 compute slices); then a 4g fits at 0
    cl2 = mig_cluster([[("a", 9, 0)]])
    p2 = plan_moves(cl2, Request(vgpu_type=MIGTYPE[5], model="a100-40gb"), MovePolicy(allow=BOTH, rules=LIVE_MIG))
    assert p2.feasible and [(m.src, m.dst) for m in p2.moves] == [(Slot("g0", "h0", 0), Slot("g0", "h0", 4))]
    assert p2.target == Slot("g0", "h0", 0)
    check_steps(cl2, p2.moves)
    # with a 1g in slices 4-7 the shift is impossible while the 3g exists, although destroying it first
    # and recreating it at 4 would "work": the planner never leaves a VM without its device
    cl3 = mig_cluster([[("a", 9, 0), ("b", 19, 4)]])
    p3 = plan_moves(cl3, Request(vgpu_type=MIGTYPE[5], model="a100-40gb", gpus=frozenset({"g0"})),
                    MovePolicy(allow=BOTH, rules=LIVE_MIG, max_moves=1))
    assert not p3.feasible


def test_pinned_vms_and_tenants_never_move():
    cl = Cluster((Host("h0", S1),), tuple(Gpu(f"g{i}", "h0", A100, True) for i in range(3)),
                 (vm_unit("a", "g0", 9, 4, tenant="gold"), vm_unit("b", "g1", 9, 4),
                  vm_unit("c", "g2", 5, 0), vm_unit("d", "g2", 9, 4)))
    req = Request(vgpu_type=MIGTYPE[0], model="a100-40gb")
    free = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG))
    assert free.feasible and len(free.moves) == 1
    p = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, pinned_tenants=frozenset({"gold"})))
    assert p.feasible and all(m.unit != "a" for m in p.moves)
    # with a and b pinned, g2 must be emptied instead: two moves, and never of a pinned VM
    p = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, pinned_tenants=frozenset({"gold"}),
                                       pinned_vms=frozenset({"vm-b"})))
    assert p.feasible and len(p.moves) == 2 and {m.unit for m in p.moves} == {"c", "d"}
    check_steps(cl, p.moves)
    p = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, pinned_tenants=frozenset({"gold"}),
                                       pinned_vms=frozenset({"vm-b", "vm-c"})))
    assert not p.feasible and "may not move" in p.reason
    # an instance gpuvirt did not create never moves either
    cl2 = Cluster(cl.hosts, cl.gpus, tuple(Unit(u.key, u.gpu, u.placed, u.vgpu_type, vm=u.vm, movable=False)
                                           if u.key in ("a", "b", "c") else u for u in cl.units))
    p = plan_moves(cl2, req, MovePolicy(rules=LIVE_MIG))
    assert not p.feasible and "may not move" in p.reason


def test_max_moves_bounds_the_plan():
    # freeing g0 for a 7g takes two moves (two instances on it)
    cl = mig_cluster([[("a", 19, 0), ("b", 9, 4)], [("c", 5, 0)], [("d", 5, 0)]])
    req = Request(vgpu_type=MIGTYPE[0], model="a100-40gb")
    two = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, max_moves=2))
    assert two.feasible and len(two.moves) == 2 and two.minimal
    one = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, max_moves=1))
    assert not one.feasible and one.minimal and "at most 1 move" in one.reason
    assert not plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, max_moves=0)).feasible
    with pytest.raises(UsageError):
        MovePolicy(max_moves=9)
    with pytest.raises(UsageError):
        MovePolicy(allow=frozenset({"warm"}))


def test_waves_respect_the_per_host_limit_and_run_safely_at_once():
    # a 4g on g0 needs both 1g's there gone (two moves, one host per GPU)
    cl = mig_cluster([[("a", 19, 0), ("b", 19, 2), ("c", 9, 4)], [("d", 9, 4)], [("e", 9, 4)]],
                     stacks=(S1,), gpus_per_host=1)
    req = Request(vgpu_type=MIGTYPE[5], model="a100-40gb", gpus=frozenset({"g0"}))
    p = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, search="exact"))
    assert p.feasible and len(p.moves) == 2
    assert sorted(i for w in p.waves for i in w) == list(range(len(p.moves)))
    one = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, max_per_host=1, search="exact"))
    assert all(len(w) == 1 for w in one.waves)
    # both moves leave host h0: a wave never has more moves on a host than it has moves
    for w in p.waves:
        hosts = Counter(h for i in w for h in {p.moves[i].src.host, p.moves[i].dst.host})
        assert max(hosts.values()) <= len(w)
    with pytest.raises(UsageError):
        MovePolicy(max_per_host=0)


def test_vf_limit_on_mig_backed_vgpus():
    # g1 has room for a 3g but both its VFs are taken: the 3g on g0 cannot go there
    cl = mig_cluster([[("a", 9, 4)], [("b", 19, 0), ("c", 19, 1)]], enabled_vfs=2)
    req = Request(vgpu_type=MIGTYPE[0], model="a100-40gb", gpus=frozenset({"g0"}))
    assert not plan_moves(cl, req, MovePolicy(rules=LIVE_MIG)).feasible
    cl3 = mig_cluster([[("a", 9, 4)], [("b", 19, 0), ("c", 19, 1)]], enabled_vfs=3)
    p = plan_moves(cl3, req, MovePolicy(rules=LIVE_MIG))
    assert p.feasible and len(p.moves) == 1
    check_steps(cl3, p.moves)


def test_time_sliced_boards_same_size_rule():
    hosts = (Host("h0", S1), Host("h1", S1))
    gpus = (Gpu("b0", "h0", L40S, False, enabled_vfs=8), Gpu("b1", "h0", L40S, False, enabled_vfs=8),
            Gpu("b2", "h1", L40S, False, enabled_vfs=8))
    units = (Unit("q16", "b0", None, QTYPE[16].id, vm="vm-q16", ram_mib=4096),
             Unit("q16b", "b1", None, QTYPE[16].id, vm="vm-q16b", ram_mib=8192),
             Unit("q24", "b2", None, QTYPE[24].id, vm="vm-q24", ram_mib=4096))
    cl = Cluster(hosts, gpus, units)
    req = Request(vgpu_type=QTYPE[48].id, model="l40s")
    p = plan_moves(cl, req)
    ref = reference_min(cl, req, frozenset({LIVE}), MigrationRules())
    assert p.feasible and (len(p.moves), 0) == ref == (1, 0)
    assert p.moves[0].kind == LIVE and p.target.start is None
    check_steps(cl, p.moves)
    assert p.moves[0].unit == "q16"          # the smaller VM of the two that could go
    # one 24Q more fits on b2 as it is (same size)
    assert plan_moves(cl, Request(vgpu_type=QTYPE[24].id, model="l40s")).moves == ()
    # a board's other-size vGPUs must all leave: 48Q on b2 needs the 24Q gone, and 8Q cannot share with 16Q
    r = analyse_rejection(cl, Request(vgpu_type=QTYPE[48].id, model="l40s"))
    assert r.category == "live" and r.unit == "MiB of framebuffer" and r.need == 49152


def test_dominated_units_are_not_shuffled_onto_other_targets():
    # every GPU holds one 7g: freeing one means moving a 7g onto another free GPU, which would have held
    # the request itself; the planner proves nothing works rather than suggesting a swap
    cl = mig_cluster([[("a", 0, 0)], [("b", 0, 0)]])
    p = plan_moves(cl, Request(vgpu_type=MIGTYPE[0], model="a100-40gb"), MovePolicy(rules=LIVE_MIG))
    assert not p.feasible and p.minimal


def test_plans_are_deterministic():
    rng = random.Random(7)
    cl = random_mig_cluster(rng, 6, 12)
    req = Request(vgpu_type=MIGTYPE[5], model="a100-40gb")
    a = plan_moves(cl, req, MovePolicy(allow=BOTH, rules=LIVE_MIG))
    b = plan_moves(cl, req, MovePolicy(allow=BOTH, rules=LIVE_MIG))
    assert a == b


def test_bad_input_is_refused_with_one_line():
    cl = mig_cluster([[("a", 9, 4)]])
    with pytest.raises(UsageError, match="listed twice"):
        plan_moves(Cluster(cl.hosts, cl.gpus, cl.units + cl.units), Request(profile_id=0, model="a100-40gb"))
    with pytest.raises(UsageError, match="unknown GPU"):
        plan_moves(Cluster(cl.hosts, cl.gpus, (vm_unit("z", "nope", 19, 0),)), Request(profile_id=0))
    overlap = Cluster(cl.hosts, cl.gpus, cl.units + (vm_unit("z", "g0", 19, 4),))
    with pytest.raises(UsageError, match="breaks the rules already"):
        plan_moves(overlap, Request(profile_id=0))
    assert cluster_problems(overlap) and not cluster_problems(cl)
    board = Cluster(cl.hosts, (Gpu("g0", "h0", L40S, False),), (vm_unit("a", "g0", 9, 4),))
    with pytest.raises(UsageError, match="not in MIG mode"):
        plan_moves(board, Request(profile_id=0))
    with pytest.raises(NotFoundError):
        plan_moves(cl, Request(vgpu_type=QTYPE[24].id))
    with pytest.raises(UsageError):
        plan_moves(cl, Request())
    mixed = Cluster(cl.hosts, cl.gpus + (Gpu("h", "h0", H100, True),), cl.units)
    with pytest.raises(UsageError, match="name the model"):
        plan_moves(mixed, Request(profile_id=19))
    assert plan_moves(mixed, Request(profile_id=19, model="h100-80gb")).feasible


def test_replay_refuses_bad_steps():
    cl = mig_cluster([[("a", 9, 4)], [("b", 5, 0)]])
    good = plan_moves(cl, Request(vgpu_type=MIGTYPE[0], model="a100-40gb"), MovePolicy(rules=LIVE_MIG)).moves
    m = good[0]
    with pytest.raises(UsageError, match="not at"):
        replay(cl, [PlannedMove(m.unit, m.vm, m.kind, Slot("g1", "h0", 0), m.dst, 9, m.vgpu_type, 0, None)])
    with pytest.raises(UsageError, match="while its source exists"):
        replay(cl, [PlannedMove(m.unit, m.vm, m.kind, m.src, Slot("g1", "h0", 0), 9, m.vgpu_type, 0, None)])
    with pytest.raises(UsageError, match="no instance"):
        replay(cl, [PlannedMove("zz", None, m.kind, m.src, m.dst, 9, m.vgpu_type, 0, None)])


# --- properties against the reference --------------------------------------------------------------------------------
def random_mig_cluster(rng, n_gpus, attempts, hosts=2):
    stacks = (S1, S2)
    gpus = tuple(Gpu(f"g{i}", f"h{i % hosts}", A100, True) for i in range(n_gpus))
    lays: list[list[Placed]] = [[] for _ in gpus]
    units = []
    for _ in range(attempts):
        gi, pid = rng.randrange(n_gpus), rng.choice((19, 19, 14, 9, 5))
        starts = mig.free_starts(GEOM, lays[gi], GEOM.profile(pid))
        if starts:
            s = rng.choice(starts)
            lays[gi].append(P(pid, s))
            units.append(vm_unit(f"u{len(units)}", gpus[gi].key, pid, s, ram=rng.choice((2048, 8192, 32768)),
                                 tenant=rng.choice("xyz")))
    return Cluster(tuple(Host(f"h{i}", stacks[i % 2]) for i in range(hosts)), gpus, tuple(units))


@FAST
@given(seed=st.integers(0, 10_000), pid=st.sampled_from((0, 5, 9, 14)), allow_cold=st.booleans(),
       n_gpus=st.integers(2, 3))
def test_exact_plans_are_minimal_and_valid_step_by_step(seed, pid, allow_cold, n_gpus):
    rng = random.Random(seed)
    cl = random_mig_cluster(rng, n_gpus, rng.randrange(2, 8))
    req = Request(vgpu_type=MIGTYPE[pid], model="a100-40gb")
    allow = BOTH if allow_cold else frozenset({LIVE})
    p = plan_moves(cl, req, MovePolicy(max_moves=3, allow=allow, rules=LIVE_MIG, search="exact", node_limit=10**6))
    ref = reference_min(cl, req, allow, LIVE_MIG, limit=3)
    got = (len(p.moves), p.kinds().get(COLD, 0)) if p.feasible else None
    assert got == ref
    if p.feasible:
        check_steps(cl, p.moves)
        replay(cl, p.moves, LIVE_MIG)
        assert p.minimal


@FAST
@given(seed=st.integers(0, 10_000), pinned=st.sampled_from("xyz"))
def test_pins_are_respected_and_minimal(seed, pinned):
    rng = random.Random(seed)
    cl = random_mig_cluster(rng, 3, 6)
    req = Request(vgpu_type=MIGTYPE[0], model="a100-40gb")
    p = plan_moves(cl, req, MovePolicy(rules=LIVE_MIG, pinned_tenants=frozenset({pinned}), search="exact",
                                       node_limit=10**6))
    keys = frozenset(u.key for u in cl.units if u.tenant == pinned)
    assert ((len(p.moves), 0) if p.feasible else None) == reference_min(cl, req, frozenset({LIVE}), LIVE_MIG, keys)
    assert not {m.unit for m in p.moves} & keys


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), pid=st.sampled_from((0, 5, 9, 14)))
def test_focused_search_on_a_large_cluster_gives_valid_plans(seed, pid):
    rng = random.Random(seed)
    cl = random_mig_cluster(rng, 32, 90, hosts=4)
    req = Request(vgpu_type=MIGTYPE[pid], model="a100-40gb")
    p = plan_moves(cl, req, MovePolicy(allow=BOTH, rules=LIVE_MIG))
    assert p.search == "focused"
    if p.feasible:
        check_steps(cl, p.moves)
        replay(cl, p.moves, LIVE_MIG)
        if len(p.moves) == 1:
            assert p.minimal
    else:
        # a refusal says why; when the search was exhaustive for one move, a single move cannot do it
        assert p.reason


# --- rejection analysis ---------------------------------------------------------------------------------------------------
ANALYSIS = MovePolicy(allow=BOTH, rules=MigrationRules())


def test_rejection_categories():
    req7 = Request(vgpu_type=MIGTYPE[0], model="a100-40gb")
    fits = analyse_rejection(mig_cluster([[], [("a", 5, 0)]]), req7, ANALYSIS)
    assert fits.category == "fits" and not fits.avoidable
    short = analyse_rejection(mig_cluster([[("a", 5, 0)], [("b", 5, 0)]]), req7, ANALYSIS)
    assert short.category == "shortage" and short.need == 7 and short.free == 6 and short.unit == "compute slices"
    cl = mig_cluster([[("a", 9, 4)], [("b", 5, 0)]])
    cold = analyse_rejection(cl, req7, ANALYSIS)            # MIG-backed: cold by default
    assert cold.category == "cold" and cold.avoidable and cold.plan and cold.plan.moves[0].kind == COLD
    live = analyse_rejection(cl, req7, MovePolicy(allow=BOTH, rules=LIVE_MIG))
    assert live.category == "live"
    stop = analyse_rejection(cl, req7, MovePolicy(allow=frozenset({LIVE})))
    assert stop.category == "stop" and stop.avoidable and stop.plan is None
    s = summarise([fits, short, cold, live, stop], capacity=14)
    assert s["avoidable"]["count"] == 3 and s["shortage"]["count"] == 1 and s["cold"]["need"] == 7
    assert s["avoidable"]["share_of_capacity"] == pytest.approx(21 / 14)
    json.dumps(cold.to_dict())


def test_stranded_on_one_gpu():
    # 1g@0 and 1g@4 leave no aligned place for a 3g although 5 slices are free; moving the 1g@4 to 1g@1 on
    # the same GPU opens 3g@4
    cl = mig_cluster([[("a", 19, 0), ("b", 19, 4)]])
    req = Request(vgpu_type=MIGTYPE[9], model="a100-40gb")
    r = analyse_rejection(cl, req, ANALYSIS)
    assert r.category == "stranded" and r.plan is not None
    assert all(m.src.gpu == m.dst.gpu == "g0" for m in r.plan.moves)
    check_steps(cl, r.plan.moves)


def random_board_cluster(rng, n_boards):
    sizes = (8, 12, 16, 24)
    gpus = tuple(Gpu(f"b{i}", f"h{i % 2}", L40S, False, enabled_vfs=rng.choice((2, 3, 32))) for i in range(n_boards))
    units, boards = [], [[] for _ in gpus]
    for _ in range(rng.randrange(2, 7)):
        i, t = rng.randrange(n_boards), QTYPE[rng.choice(sizes)]
        if sim_gpu_ok(gpus[i], [(Unit("x", gpus[i].key, None, v.id), None) for v in boards[i] + [t]]):
            boards[i].append(t)
            units.append(Unit(f"v{len(units)}", gpus[i].key, None, t.id, vm=f"vm{len(units)}",
                              ram_mib=rng.choice((2048, 8192))))
    return Cluster((Host("h0", S1), Host("h1", S2)), gpus, tuple(units))


@FAST
@given(seed=st.integers(0, 10_000), size=st.sampled_from((12, 16, 24, 48)), allow_cold=st.booleans())
def test_time_sliced_plans_are_minimal_and_valid(seed, size, allow_cold):
    rng = random.Random(seed)
    cl = random_board_cluster(rng, rng.choice((2, 3)))
    req = Request(vgpu_type=QTYPE[size].id, model="l40s")
    allow = BOTH if allow_cold else frozenset({LIVE})
    p = plan_moves(cl, req, MovePolicy(allow=allow, search="exact", node_limit=10**6))
    got = (len(p.moves), p.kinds().get(COLD, 0)) if p.feasible else None
    assert got == reference_min(cl, req, allow, MigrationRules())
    if p.feasible:
        check_steps(cl, p.moves)
        replay(cl, p.moves, MigrationRules())
