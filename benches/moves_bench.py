"""Moves in the placement benchmark: the cluster facts the move planner sees, the "+moves" online policy
(B2b), the rejection analysis of B2a, and B4 (fewest moves against an independent integer program).

Imported by benches/placement_parts/ (B2a, B2b, B4); see docs/placement.md ("Rebalancing") and docs/benchmarks.md.

The 64-GPU cluster of B2 is given migration facts: 8 hosts on RHEL 9.4, hosts 0-5 on vGPU host driver
550.127.05 and hosts 6-7 on 550.144.03 (a rolling upgrade half done), so a move between the two groups is
cold-only (host drivers must match).  Every instance is a MIG-backed vGPU (the A100-40GB ``A100-<g>-<n>C``
type of its profile) in a VM with 8 GiB of RAM per compute slice.  The rules allow live migration of
MIG-backed vGPUs (``mig_backed_live=True``): a scenario, since no public source says NVIDIA supports it
(gpuvirt's default refuses it, and every move would then be cold).
"""

from __future__ import annotations

import random
import time

from gpuvirt.model import mig
from gpuvirt.model import vgpu as vgpu_rules
from gpuvirt.model.cluster import Cluster as MoveCluster
from gpuvirt.model.cluster import Gpu, Host, Request, Unit
from gpuvirt.model.mig import Placed
from gpuvirt.model.moves import MovePolicy, plan_moves, replay
from gpuvirt.model.preflight import COLD, LIVE, HostStack, MigrationRules
from gpuvirt.model.rejection import analyse_rejection

RULES = MigrationRules(mig_backed_live=True)
STACK_A = HostStack(driver="550.127.05", os="rhel-9.4")
STACK_B = HostStack(driver="550.144.03", os="rhel-9.4")
RAM_PER_SLICE_MIB = 8192
# B2b "+moves": on a refusal, the fewest moves (live or cold), at most 3, within a budget of 1,500 search
# nodes (see docs/placement.md, "Rebalancing": 4 moves gained 0.2 points of acceptance and tripled the p99)
# Among plans with as many (cold) moves the least fragmenting wins (prefer="fragmentation", not the product's
# default "data"): a bench of acceptance under churn measures the order that serves later requests (over 24
# seeds it accepted 58 more of 38,400 than "data"; docs/placement.md, "Benchmark")
POLICY = MovePolicy(max_moves=3, allow=frozenset({LIVE, COLD}), rules=RULES, node_limit=1500,
                    prefer="fragmentation")
ANALYSIS = POLICY


class Facts:
    """Hosts, GPUs and the vGPU type of each profile for one model and the bench's host layout."""

    def __init__(self, model, hosts: int, gpus_per_host: int, keys):
        self.model = model
        self.hosts = tuple(Host(f"h{h}", STACK_A if h < hosts - 2 else STACK_B) for h in range(hosts))
        self.gpus = tuple(Gpu(keys[i], f"h{i // gpus_per_host}", model, True) for i in range(hosts * gpus_per_host))
        self.vtype = {t.gpu_instance_profile_id: t.id for t in model.vgpu.types if t.gpu_instance_profile_id is not None}

    def unit(self, key: str, gpu: str, pl: Placed) -> Unit:
        g = self.model.mig.profile(pl.profile_id).compute_slices
        return Unit(key, gpu, pl, self.vtype[pl.profile_id], vm=f"vm-{key}", ram_mib=RAM_PER_SLICE_MIB * g)

    def cluster(self, layouts, name_of) -> MoveCluster:
        units = tuple(self.unit(name_of(i, pl), self.gpus[i].key, pl) for i, lay in enumerate(layouts) for pl in lay)
        return MoveCluster(self.hosts, self.gpus, units)

    def request(self, pid: int) -> Request:
        return Request(vgpu_type=self.vtype[pid], model=self.model.id)


def moves_place(facts: Facts, cl, pid, who, loc, stats):
    """On a refusal: the move plan, applied to the bench's cluster (layouts and request bookkeeping), then
    the request placed where the plan says.  Returns ((gpu index, placement) or None, moves)."""
    c = facts.cluster(cl.layouts, lambda i, pl: str(who[(i, pl)]))
    t0 = time.process_time()
    plan = plan_moves(c, facts.request(pid), POLICY)
    stats["latency"].append(time.process_time() - t0)
    stats["plan"] = plan                # the caller files a refusal by why the planner gave up
    if not plan.feasible:
        return None, ()
    replay(c, plan.moves, RULES)        # every step legal under the rules and the pre-flight, or it raises
    for mv in plan.moves:
        req = int(mv.unit)
        old = loc[req]
        cl.remove(*old)
        del who[old]
        pl = Placed(mv.dst.start, old[1].size, old[1].profile_id)
        b = cl.index[mv.dst.gpu]
        cl.layouts[b] = tuple(sorted(cl.layouts[b] + (pl,)))
        loc[req] = (b, pl)
        who[(b, pl)] = req
    i = cl.index[plan.target.gpu]
    prof = cl.geom.profile(pid)
    assert mig.can_place(cl.geom, cl.layouts[i], prof, plan.target.start)
    pl = Placed(plan.target.start, prof.memory_slices, pid)
    cl.layouts[i] = tuple(sorted(cl.layouts[i] + (pl,)))
    return (i, pl), plan.moves


def classify(facts: Facts, layouts, pid):
    """The rejection category of ``pid`` refused on ``layouts`` (gpuvirt.model.rejection)."""
    c = facts.cluster(layouts, lambda i, pl: f"{i}/{pl.start}")
    return analyse_rejection(c, facts.request(pid), ANALYSIS)


# --- B4 ---------------------------------------------------------------------------------------------------------
def b4_case(seed, a100, l40s):
    """A small seeded cluster (1-2 hosts, 2-4 GPUs, some instances pinned through their tenant) with a request
    that does not fit as things are but would fit the free capacity.  Four families in turn: A100 MIG with
    MIG-backed vGPUs (twice), L40S time-sliced boards (same-size rule, few VFs), A100 MIG with few VFs."""
    rng = random.Random(seed)
    family = ("mig", "mig", "vgpu", "vf")[seed % 4]
    nh = rng.choice((1, 2, 2))
    hosts = tuple(Host(f"h{i}", STACK_A if i == 0 or rng.random() < 0.5 else STACK_B) for i in range(nh))
    units = []
    if family in ("mig", "vf"):
        geom = a100.mig
        vtype = {t.gpu_instance_profile_id: t.id for t in a100.vgpu.types if t.gpu_instance_profile_id is not None}
        ng = rng.choice((2, 3, 3, 4))
        gpus = tuple(Gpu(f"g{i}", f"h{i % nh}", a100, True,
                         enabled_vfs=rng.choice((3, 4)) if family == "vf" else None) for i in range(ng))
        lays: list[list[Placed]] = [[] for _ in gpus]
        fill = rng.uniform(0.55, 0.85) * geom.compute_slices * ng
        for _ in range(60):
            if sum(mig.compute_used(geom, lay) for lay in lays) >= fill:
                break
            gi, pid = rng.randrange(ng), rng.choice((19, 19, 14, 14, 9, 5))
            prof = geom.profile(pid)
            starts = mig.free_starts(geom, lays[gi], prof)
            if not starts or (family == "vf" and len(lays[gi]) >= gpus[gi].enabled_vfs):
                continue
            lays[gi].append(Placed(rng.choice(starts), prof.memory_slices, pid))
            n = len(units)
            units.append(Unit(f"u{n}", gpus[gi].key, lays[gi][-1], vtype[pid], vm=f"vm{n}", tenant=rng.choice("abc"),
                              ram_mib=rng.choice((4096, 8192, 16384))))
        free = geom.compute_slices * ng - sum(mig.compute_used(geom, lay) for lay in lays)

        def room(pid):
            prof = geom.profile(pid)
            return any(mig.free_starts(geom, lay, prof) and (family != "vf" or len(lay) < g.enabled_vfs)
                       for lay, g in zip(lays, gpus))
        cands = [p for p in (19, 14, 9, 5, 0) if geom.profile(p).compute_slices <= free and not room(p)]
        if not cands:
            return None
        request = Request(vgpu_type=vtype[rng.choice(cands)], model=a100.id)
    else:
        ng = rng.choice((2, 3, 4))
        gpus = tuple(Gpu(f"g{i}", f"h{i % nh}", l40s, False, enabled_vfs=rng.choice((3, 4, 32))) for i in range(ng))
        qs = sorted((t for t in l40s.vgpu.types if t.name.endswith("Q") and t.framebuffer_mib >= 8192),
                    key=lambda t: t.framebuffer_mib)
        boards: list[list] = [[] for _ in gpus]
        fill = rng.uniform(0.5, 0.85) * l40s.memory_mib * ng

        def avail(t, b, g):
            return vgpu_rules.available(l40s, t, [x.id for x in b], mig_enabled=False,
                                        free_parents=g.enabled_vfs - len(b))
        for _ in range(30):
            if sum(x.framebuffer_mib for b in boards for x in b) >= fill:
                break
            gi, t = rng.randrange(ng), rng.choice(qs)
            if avail(t, boards[gi], gpus[gi]) <= 0:
                continue
            boards[gi].append(t)
            n = len(units)
            units.append(Unit(f"u{n}", gpus[gi].key, None, t.id, vm=f"vm{n}", tenant=rng.choice("abc"), ram_mib=4096))
        free = l40s.memory_mib * ng - sum(x.framebuffer_mib for b in boards for x in b)
        cands = [t for t in qs if t.framebuffer_mib <= free
                 and not any(avail(t, b, g) > 0 for b, g in zip(boards, gpus))]
        if not cands:
            return None
        request = Request(vgpu_type=rng.choice(cands).id, model=l40s.id)
    allow = frozenset({LIVE}) if rng.random() < 0.5 else frozenset({LIVE, COLD})
    pinned = frozenset({"c"}) if rng.random() < 0.3 else frozenset()
    return family, MoveCluster(hosts, gpus, tuple(units)), request, allow, pinned


def part_b4(a100, l40s, min_cases=48, max_moves=4):
    """Fewest moves by the planner (exact search) vs the time-indexed integer program of moves_ilp."""
    from moves_ilp import min_moves     # benches/ is on sys.path when run as a script

    rows = []
    seed = 0
    while len(rows) < min_cases:
        case = b4_case(seed, a100, l40s)
        seed += 1
        if case is None:
            continue
        family, cluster, request, allow, pinned = case
        policy = MovePolicy(max_moves=max_moves, allow=allow, rules=RULES, pinned_tenants=pinned, search="exact",
                            node_limit=10**6)
        t0 = time.process_time()
        plan = plan_moves(cluster, request, policy)
        t_plan = time.process_time() - t0
        mine = (len(plan.moves), plan.kinds().get(COLD, 0)) if plan.feasible else None
        if plan.feasible:
            replay(cluster, plan.moves, RULES)
        # the program looks for anything with fewer moves than the planner (or any plan at all when the
        # planner found none), so a smaller horizon than max_moves loses nothing
        horizon = mine[0] if mine else max_moves
        t0 = time.process_time()
        ref = min_moves(cluster, request, allow, RULES, horizon,
                        frozenset(u.key for u in cluster.units if u.tenant in pinned)) if horizon else (0, 0)
        t_ilp = time.process_time() - t0
        rows.append({"seed": seed - 1, "family": family, "instances": len(cluster.units), "gpus": len(cluster.gpus),
                     "allow": "+".join(sorted(allow)), "planner": mine, "ilp": ref,
                     "equal": (mine is None and ref is None) or (mine is not None and ref is not None and mine[0] == ref[0]),
                     "equal_cold": mine == ref, "plan_ms": 1000 * t_plan, "ilp_s": t_ilp})
    return rows
