"""Shared parts of the placement benchmark (benches/placement.py): the workload, the exact references
(scipy ILPs, independent of the planner), the baselines, the 64-GPU cluster harness and the output helpers
(tables, targets and the figures printed by --json)."""

from __future__ import annotations

import csv
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benches"))

import moves_bench  # noqa: E402  (benches/moves_bench.py)
import numpy as np  # noqa: E402
from scipy.optimize import Bounds, LinearConstraint, milp  # noqa: E402

from gpuvirt.model import mig  # noqa: E402
from gpuvirt.model.catalog import load_catalog  # noqa: E402
from gpuvirt.model.mig import Placed  # noqa: E402
from gpuvirt.model.planner import (  # noqa: E402
    GpuState,
    choose_placement,
)

TRACE = REPO.parent / "shared" / "reference" / "data" / "alibaba-gpu-v2023" / "openb_pod_list_gpushare100.csv"

# Fallback when the trace is absent: the compute-slice shares computed from that trace file under the
# mapping above (1g 73, 2g 641, 3g 949, 4g 2213, 7g 3188 of 7064 GPU tasks) and lognormal durations with
# the trace's median (435 s) and a spread (sigma 2.2) that reproduces its 90th percentile (about 7,100 s).
SYNTHETIC_SLICE_SHARES = {1: 73, 2: 641, 3: 949, 4: 2213, 7: 3188}
SYNTHETIC_MEDIAN_S = 435.0
SYNTHETIC_SIGMA = 2.2

HOSTS, GPUS_PER_HOST = 8, 8
N_GPUS = HOSTS * GPUS_PER_HOST
ONLINE_POLICIES = ["driver", "hami", "first-fit", "best-fit", "spread", "pack", "frag-aware", "frag-aware+mix"]


# --- workload ---------------------------------------------------------------------------------------------
def plain_profile_for(geom, slices: int) -> int:
    """Smallest profile without attributes (+me) having at least ``slices`` compute slices."""
    cands = [p for p in geom.gi_profiles if not p.attributes and p.compute_slices >= slices]
    return min(cands, key=lambda p: (p.compute_slices, p.memory_slices, p.id)).id


class Workload:
    def __init__(self, geom):
        self.geom = geom
        self.tasks: list[tuple[int, float]] = []      # (profile id, duration s)
        self.shares: list[tuple[float, float]] = []   # (share of one GPU asked for, duration s), for B2v
        if TRACE.exists():
            self.source = f"Alibaba v2023 trace {TRACE.name}"
            with TRACE.open() as f:
                for row in csv.DictReader(f):
                    n, milli = int(row["num_gpu"]), int(row["gpu_milli"])
                    if n <= 0:
                        continue
                    dur = max(1.0, float(int(row["deletion_time"]) - int(row["creation_time"])))
                    if milli < 1000:
                        self.tasks.append((plain_profile_for(geom, math.ceil(7 * milli / 1000)), dur))
                        self.shares.append((milli / 1000, dur))
                    else:
                        self.tasks.extend((plain_profile_for(geom, 7), dur) for _ in range(n))
                        self.shares.extend((1.0, dur) for _ in range(n))
        else:
            self.source = ("SYNTHETIC (trace not found at ../shared/reference/...): slice shares "
                           f"{SYNTHETIC_SLICE_SHARES}, lognormal durations median {SYNTHETIC_MEDIAN_S:.0f} s "
                           f"sigma {SYNTHETIC_SIGMA}")
            rng = random.Random(12345)
            for slices, n in SYNTHETIC_SLICE_SHARES.items():
                for _ in range(n):
                    dur = max(1.0, rng.lognormvariate(math.log(SYNTHETIC_MEDIAN_S), SYNTHETIC_SIGMA))
                    self.tasks.append((plain_profile_for(geom, slices), dur))
                    self.shares.append((slices / 7, dur))
        # a handful of tasks run for the whole trace window; capping at the 99th percentile keeps the churn
        # experiment from being a slow fill-up with never-leaving tasks
        durs = sorted(d for _, d in self.tasks)
        self.cap = durs[int(0.99 * len(durs))]
        self.tasks = [(p, min(d, self.cap)) for p, d in self.tasks]
        self.shares = [(f, min(d, self.cap)) for f, d in self.shares]
        mix = Counter(p for p, _ in self.tasks)
        self.mix = {p: n / len(self.tasks) for p, n in sorted(mix.items())}

    def sample_profiles(self, rng: random.Random, n: int) -> list[int]:
        return [rng.choice(self.tasks)[0] for _ in range(n)]


UNIFORM_IDS = (19, 15, 14, 9, 5, 0)     # every plain profile, for a mix where small shapes matter


# --- exact references (scipy, independent of the planner) ------------------------------------------------------
_COLS: dict = {}


def columns(geom, pids):
    key = (id(geom), tuple(sorted(pids)))
    if key not in _COLS:
        _COLS[key] = mig.maximal_multisets(geom, sorted(pids))
    return _COLS[key]


def ilp_min_gpus(geom, counts) -> int:
    counts = {k: v for k, v in counts.items() if v}
    if not counts:
        return 0
    ids = sorted(counts)
    cols = columns(geom, ids)
    a = np.array([[c.get(k, 0) for c in cols] for k in ids], dtype=float)
    res = milp(np.ones(len(cols)), integrality=np.ones(len(cols)), bounds=Bounds(0, np.inf),
               constraints=LinearConstraint(a, [counts[k] for k in ids], np.inf))
    assert res.success, res.message
    return int(round(res.fun))


def fits_in(geom, counts, n_gpus) -> bool:
    """Does a full repack of ``counts`` fit on ``n_gpus`` GPUs?  Cheap bounds first, then the ILP."""
    total = sum(geom.profile(k).compute_slices * v for k, v in counts.items())
    if total > n_gpus * geom.compute_slices:
        return False
    if len(ffd(geom, counts)) <= n_gpus:
        return True
    return ilp_min_gpus(geom, counts) <= n_gpus


def ilp_max_accept(geom, counts, n_gpus) -> int:
    """Most requests of the multiset that n_gpus GPUs can hold (offline bound for B2a)."""
    ids = sorted(k for k, v in counts.items() if v)
    cols = columns(geom, ids)
    nc, nk = len(cols), len(ids)
    # variables: z_c (GPUs using column c), x_k (accepted of profile k)
    c = np.concatenate([np.zeros(nc), -np.ones(nk)])
    rows, lo, hi = [], [], []
    for j, k in enumerate(ids):
        r = np.zeros(nc + nk)
        r[:nc] = [col.get(k, 0) for col in cols]
        r[nc + j] = -1
        rows.append(r), lo.append(0), hi.append(np.inf)
    r = np.zeros(nc + nk)
    r[:nc] = 1
    rows.append(r), lo.append(0), hi.append(n_gpus)
    ub = np.concatenate([np.full(nc, np.inf), [counts[k] for k in ids]])
    res = milp(c, integrality=np.ones(nc + nk), bounds=Bounds(0, ub),
               constraints=LinearConstraint(np.array(rows), lo, hi))
    assert res.success, res.message
    return int(round(-res.fun))


def ilp_min_changed(gpus, pid, include_allocated) -> int | None:
    """B3 reference: fewest instances whose (GPU, start) changes so that ``pid`` fits (no sequencing)."""
    inst = [(gi, p) for gi, g in enumerate(gpus) for p in g.layout]
    var = []                        # (instance index or -1 for the new one, gpu, start)
    for ii, (gi, p) in enumerate(inst):
        prof = gpus[gi].geometry.profile(p.profile_id)
        pinned = not include_allocated and p in gpus[gi].pinned
        for g in range(len(gpus)):
            for s in prof.starts:
                if pinned and (g, s) != (gi, p.start):
                    continue
                var.append((ii, g, s))
    for g in range(len(gpus)):
        for s in gpus[g].geometry.profile(pid).starts:
            var.append((-1, g, s))
    nv = len(var)
    rows, lo, hi = [], [], []

    def add(coeffs, low, high):
        r = np.zeros(nv)
        for j, v in coeffs:
            r[j] += v
        rows.append(r), lo.append(low), hi.append(high)

    for ii in range(-1, len(inst)):
        add([(j, 1) for j, v in enumerate(var) if v[0] == ii], 1, 1)
    for g, gpu in enumerate(gpus):
        geom = gpu.geometry

        def prof_of(ii):
            return geom.profile(pid if ii < 0 else inst[ii][1].profile_id)

        for m in range(geom.memory_slices):
            add([(j, 1) for j, (ii, gg, s) in enumerate(var)
                 if gg == g and s <= m < s + prof_of(ii).memory_slices], 0, 1)
        add([(j, prof_of(ii).compute_slices) for j, (ii, gg, s) in enumerate(var) if gg == g],
            0, geom.compute_slices)
        for prof in geom.gi_profiles:
            add([(j, 1) for j, (ii, gg, s) in enumerate(var) if gg == g and prof_of(ii).id == prof.id],
                0, prof.max_instances)
    cost = np.array([0.0 if ii < 0 or (g, s) == (inst[ii][0], inst[ii][1].start) else 1.0
                     for ii, g, s in var])
    res = milp(cost, integrality=np.ones(nv), bounds=Bounds(0, 1),
               constraints=LinearConstraint(np.array(rows), lo, hi))
    if res.status == 2:             # infeasible
        return None
    assert res.success, res.message
    return int(round(res.fun))


# --- baselines ----------------------------------------------------------------------------------------------
_FFD_MEMO: dict = {}


def ffd(geom, counts) -> list[Counter]:
    """First-fit-decreasing (written here from mig.fits, not the planner's): largest profiles first, each
    on the lowest-numbered GPU whose multiset still fits with it."""
    order = sorted((k for k, v in counts.items() if v),
                   key=lambda k: (-geom.profile(k).compute_slices, -geom.profile(k).memory_slices, k))
    bins: list[Counter] = []
    memo = _FFD_MEMO.setdefault(id(geom), {})
    for k in order:
        ptr = 0
        for _ in range(counts[k]):
            while ptr < len(bins):
                key = (tuple(sorted(bins[ptr].items())), k)
                if key not in memo:
                    trial = Counter(bins[ptr])
                    trial[k] += 1
                    memo[key] = mig.fits(geom, trial)
                if memo[key]:
                    break
                ptr += 1
            if ptr == len(bins):
                bins.append(Counter())
            bins[ptr][k] += 1
    return bins


def online_first_fit_gpus(geom, items) -> int:
    """Arrival order, lowest GPU and lowest start, placements never revised."""
    layouts: list[list[Placed]] = []
    first_open: dict[int, int] = {}     # without departures a GPU that refused a profile keeps refusing it
    for k in items:
        prof = geom.profile(k)
        i = first_open.get(k, 0)
        while i < len(layouts) and not mig.free_starts(geom, layouts[i], prof):
            i += 1
        first_open[k] = i
        if i == len(layouts):
            layouts.append([])
        layouts[i].append(Placed(mig.free_starts(geom, layouts[i], prof)[0], prof.memory_slices, k))
    return len(layouts)


def baseline_choice(policy, geom, layouts, pid):
    """Placement rules of the two baselines the planner does not offer (index, start) or None.

    driver: the first GPU with room, start chosen by the simulator's model of the driver's own choice
    (mig.driver_choice, fitted to nvidia-smi captures).  hami: HAMi before PR #2855 - the first GPU with
    room, 1g and 3g scanned from the highest start, the rest from the lowest."""
    prof = geom.profile(pid)
    for i, lay in enumerate(layouts):
        if policy == "driver":
            s = mig.driver_choice(geom, lay, prof)
            if s is not None:
                return i, s
        else:
            starts = mig.free_starts(geom, lay, prof)
            if starts:
                return i, (max(starts) if prof.compute_slices in (1, 3) else min(starts))
    return None


class Cluster:
    def __init__(self, geom, policy):
        self.geom = geom
        self.policy = policy
        self.layouts: list[tuple[Placed, ...]] = [() for _ in range(N_GPUS)]
        self.keys = [f"h{i // GPUS_PER_HOST}g{i % GPUS_PER_HOST}" for i in range(N_GPUS)]
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.seen: Counter = Counter()          # requests seen so far, by profile (frag-aware+mix)
        self.latency: list[float] = []

    def place(self, pid):
        self.seen[pid] += 1
        t0 = time.perf_counter()
        if self.policy in ("driver", "hami"):
            got = baseline_choice(self.policy, self.geom, self.layouts, pid)
        else:
            gpus = [GpuState(k, self.geom, lay) for k, lay in zip(self.keys, self.layouts)]
            weights = None
            policy = self.policy
            if policy == "frag-aware+mix":
                # FGD's weighting: the request mix observed so far, this request included (no knowledge of
                # the future); profiles never asked for weigh nothing, so they neither count as stranding
                # nor as fragmentation
                total = sum(self.seen.values())
                weights = {k: v / total for k, v in self.seen.items()}
                policy = "frag-aware"
            d = choose_placement(gpus, pid, policy, weights)
            got = None if d is None else (self.index[d.gpu_key], d.start)
        self.latency.append(time.perf_counter() - t0)
        if got is None:
            return None
        i, s = got
        pl = Placed(s, self.geom.profile(pid).memory_slices, pid)
        assert mig.can_place(self.geom, self.layouts[i], self.geom.profile(pid), s)
        self.layouts[i] = tuple(sorted(self.layouts[i] + (pl,)))
        return i, pl

    def remove(self, i, pl):
        lay = list(self.layouts[i])
        lay.remove(pl)
        self.layouts[i] = tuple(lay)

    def live(self) -> Counter:
        return Counter(p.profile_id for lay in self.layouts for p in lay)

    def used(self) -> int:
        return sum(mig.compute_used(self.geom, lay) for lay in self.layouts)

    def frag_rejection(self, pid) -> bool:
        need = self.geom.profile(pid).compute_slices
        return any(self.geom.compute_slices - mig.compute_used(self.geom, lay) >= need for lay in self.layouts)

    def host(self, h):
        return [GpuState(self.keys[i], self.geom, self.layouts[i])
                for i in range(h * GPUS_PER_HOST, (h + 1) * GPUS_PER_HOST)]


# --- output helpers -------------------------------------------------------------------------------------------
def table(headers, rows):
    RESULTS.setdefault("tables", {}).setdefault(CURRENT[0], []).append(
        {"headers": [str(h) for h in headers], "rows": [[c if isinstance(c, (int, float)) else str(c) for c in r]
                                                         for r in rows]})
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).rjust(w) for h, w in zip(headers, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def pct(x):
    return f"{100 * x:.1f}%"


TARGETS: list[tuple[str, bool, str]] = []
RESULTS: dict = {}          # every figure, printed as one JSON object by --json (keys: docs/benchmarks.md)
CURRENT = ["-"]             # the part being run (tables are filed under it)
def target(name, met, detail):
    TARGETS.append((name, met, detail))
    RESULTS.setdefault("targets", []).append({"name": name, "met": bool(met), "detail": detail})
    print(f"TARGET {name}: {'MET' if met else 'MISSED'} ({detail})")


def inflation_stream(rng, draw, size, capacity, factor=1.3):
    """Requests drawn i.i.d. until ``factor`` x ``capacity`` has been asked for (FGD's load inflation)."""
    items, asked = [], 0
    while asked < factor * capacity:
        item = draw(rng)
        items.append(item)
        asked += size(item)
    return items


def _acceptance_targets(name, results, ceiling, ceiling_name):
    acc = {p: results[p]["acc"] / results[p]["n"] for p in results}
    base = max(acc["first-fit"], acc["best-fit"])
    d = acc["frag-aware"]
    print(f"{name}: frag-aware {pct(d)} vs best of first-fit/best-fit {pct(base)}; frag-aware+mix "
          f"{pct(acc['frag-aware+mix'])}; {ceiling_name} {pct(ceiling)} = best baseline + "
          f"{100 * (ceiling - base):.1f} points (the old +10 points target is withdrawn: issue 13)")
    av = results["frag-aware"]["avoid"] / results["frag-aware"]["n"]
    target(f"{name} avoidable rejections <= 1% of requests (default policy)", av <= 0.01, pct(av))


_FACTS: list = []


def facts():
    """moves_bench.Facts of the 64-GPU cluster (A100-40GB, the B2 host layout), built once."""
    if not _FACTS:
        _FACTS.append(moves_bench.Facts(load_catalog().get("a100-40gb"), HOSTS, GPUS_PER_HOST,
                                        [f"h{i // GPUS_PER_HOST}g{i % GPUS_PER_HOST}" for i in range(N_GPUS)]))
    return _FACTS[0]

