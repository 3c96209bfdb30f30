"""B2v: time-sliced vGPU placement.  Part of benches/placement.py."""

from __future__ import annotations

import heapq
import random
import statistics
from collections import Counter

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from gpuvirt.model import vgpu as vgpu_rules
from gpuvirt.model.catalog import load_catalog
from gpuvirt.model.planner import VgpuBoard, choose_vgpu_gpu
from placement_parts.common import (
    GPUS_PER_HOST,
    N_GPUS,
    inflation_stream,
    pct,
    table,
)

# --- B2v: time-sliced vGPU ---------------------------------------------------------------------------------------
VGPU_BOARD = "l40s"
VGPU_POLICIES_BENCH = ["first-fit", "spread", "consolidate"]


def vgpu_requests(model, shares):
    """Trace share of a GPU -> the smallest Q-series type whose framebuffer covers that share of the board."""
    qtypes = sorted((t for t in model.vgpu.types if t.name.endswith("Q") and not t.mig_backed),
                    key=lambda t: t.framebuffer_mib)
    out = []
    for f, d in shares:
        need = f * model.memory_mib
        out.append((next(t for t in qtypes if t.framebuffer_mib >= need - 1e-6), d))
    return out


class VgpuCluster:
    """64 boards under the board's real type rules (gpuvirt.model.vgpu.board_room) and VF count."""

    def __init__(self, model, policy):
        self.model, self.policy = model, policy
        self.boards: list[list] = [[] for _ in range(N_GPUS)]       # VgpuType objects per board
        self.keys = [f"h{i // GPUS_PER_HOST}g{i % GPUS_PER_HOST}" for i in range(N_GPUS)]
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.vfs = model.sriov.total_vfs if model.sriov else None

    def room(self, i, vt):
        return vgpu_rules.available(self.model, vt, [t.id for t in self.boards[i]], mig_enabled=False,
                                    free_parents=None if self.vfs is None else self.vfs - len(self.boards[i]))

    def place(self, vt):
        if self.policy == "first-fit":
            i = next((i for i in range(N_GPUS) if self.room(i, vt) > 0), None)
        else:
            boards = [VgpuBoard(k, tuple((t.id, t.framebuffer_mib) for t in b), self.room(i, vt))
                      for i, (k, b) in enumerate(zip(self.keys, self.boards))]
            key = choose_vgpu_gpu(boards, vt.id, self.policy)
            i = None if key is None else self.index[key]
        if i is None:
            return None
        self.boards[i].append(vt)
        return i

    def remove(self, i, vt):
        self.boards[i].remove(vt)

    def live(self) -> Counter:
        return Counter(t.id for b in self.boards for t in b)

    def fb_used(self) -> int:
        return sum(t.framebuffer_mib for b in self.boards for t in b)


def vgpu_boards_needed(model, counts) -> int:
    """Boards a full repack of ``counts`` needs.  Exact for same-size / same-type boards (each board holds
    one size / type, up to its per-board maximum); the bench only runs such a board."""
    types = {t.id: t for t in model.vgpu.types}
    vfs = model.sriov.total_vfs if model.sriov and model.vgpu.parent == "vf" else 10**9
    if model.vgpu.policy == "same-size":
        by_size: Counter = Counter()
        cap: dict[int, int] = {}
        for tid, n in counts.items():
            t = types[tid]
            by_size[t.framebuffer_mib] += n
            cap[t.framebuffer_mib] = min(cap.get(t.framebuffer_mib, 10**9), t.max_instances, vfs)
        return sum(-(-n // cap[sz]) for sz, n in by_size.items() if n)
    assert model.vgpu.policy == "same-type", model.vgpu.policy
    return sum(-(-n // min(types[tid].max_instances, vfs)) for tid, n in counts.items() if n)


def vgpu_max_accept(model, counts, n_boards) -> int:
    """Offline bound for B2v inflation: most of the requests that n_boards boards can hold (ILP over boards
    per size: x_s <= cap_s * b_s, x_s <= demand_s, sum b_s <= n_boards)."""
    types = {t.id: t for t in model.vgpu.types}
    vfs = model.sriov.total_vfs if model.sriov and model.vgpu.parent == "vf" else 10**9
    demand: Counter = Counter()
    cap: dict[int, int] = {}
    for tid, n in counts.items():
        sz = types[tid].framebuffer_mib
        demand[sz] += n
        cap[sz] = min(cap.get(sz, 10**9), types[tid].max_instances, vfs)
    sizes = sorted(demand)
    k = len(sizes)
    c = np.concatenate([-np.ones(k), np.zeros(k)])          # variables x_s then b_s
    rows, lo, hi = [], [], []
    for j, sz in enumerate(sizes):
        r = np.zeros(2 * k)
        r[j], r[k + j] = 1, -cap[sz]
        rows.append(r), lo.append(-np.inf), hi.append(0)
    r = np.zeros(2 * k)
    r[k:] = 1
    rows.append(r), lo.append(0), hi.append(n_boards)
    ub = np.concatenate([[demand[sz] for sz in sizes], np.full(k, n_boards)])
    res = milp(c, integrality=np.ones(2 * k), bounds=Bounds(0, ub),
               constraints=LinearConstraint(np.array(rows), lo, hi))
    assert res.success, res.message
    return int(round(-res.fun))


def part_b2v(wl, seeds_churn=(0, 1, 2, 3, 4, 5)):
    model = load_catalog().get(VGPU_BOARD)
    reqs = vgpu_requests(model, wl.shares)
    mix = Counter(t.name for t, _ in reqs)
    print(f"\n== B2v time-sliced vGPU, 64 {model.display_name} boards ({model.vgpu.policy} rule, "
          f"{model.sriov.total_vfs if model.sriov else '-'} VFs each): trace share of a GPU -> smallest Q type "
          "covering that share of the framebuffer ==")
    print("mix: " + ", ".join(f"{n} {pct(v / len(reqs))}" for n, v in
                              sorted(mix.items(), key=lambda kv: -kv[1])))
    capacity = N_GPUS * model.memory_mib
    inflation = {p: Counter() for p in VGPU_POLICIES_BENCH}
    upper = Counter()
    for seed in range(10):
        rng = random.Random(seed)
        items = inflation_stream(rng, lambda r: r.choice(reqs)[0], lambda vt: vt.framebuffer_mib, capacity)
        upper["acc"] += vgpu_max_accept(model, Counter(t.id for t in items), N_GPUS)
        upper["n"] += len(items)
        for policy in VGPU_POLICIES_BENCH:
            cl, r = VgpuCluster(model, policy), inflation[policy]
            for vt in items:
                r["n"] += 1
                if cl.place(vt) is not None:
                    r["acc"] += 1
                    continue
                live = cl.live()
                live[vt.id] += 1
                r["avoid"] += vgpu_boards_needed(model, live) <= N_GPUS
            r["fb"] += cl.fb_used() / capacity
    churn = {p: Counter() for p in VGPU_POLICIES_BENCH}
    mean_work = statistics.fmean(t.framebuffer_mib * d for t, d in reqs)
    rate = 1.1 * capacity / mean_work
    for seed in seeds_churn:
        rng = random.Random(seed)
        t, arr = 0.0, []
        for _ in range(2400):
            t += rng.expovariate(rate)
            arr.append((t,) + rng.choice(reqs))
        for policy in VGPU_POLICIES_BENCH:
            cl, r = VgpuCluster(model, policy), churn[policy]
            departures: list = []
            for k, (now, vt, dur) in enumerate(arr):
                while departures and departures[0][0] <= now:
                    _, _, i, gone = heapq.heappop(departures)
                    cl.remove(i, gone)
                i = cl.place(vt)
                if i is not None:
                    heapq.heappush(departures, (now + dur, k, i, vt))
                if k < 800:
                    continue
                r["n"] += 1
                r["fb"] += cl.fb_used() / capacity
                if i is not None:
                    r["acc"] += 1
                else:
                    live = cl.live()
                    live[vt.id] += 1
                    r["avoid"] += vgpu_boards_needed(model, live) <= N_GPUS
    rows = [[p, pct(inflation[p]["acc"] / inflation[p]["n"]), pct(inflation[p]["fb"] / 10),
             pct(inflation[p]["avoid"] / inflation[p]["n"]), pct(churn[p]["acc"] / churn[p]["n"]),
             pct(churn[p]["fb"] / churn[p]["n"]), pct(churn[p]["avoid"] / churn[p]["n"])]
            for p in VGPU_POLICIES_BENCH]
    table(["policy", "infl. accepted", "infl. framebuffer", "infl. avoidable", "churn accepted",
           "churn mean fb", "churn avoidable"], rows)
    print(f"inflation: i.i.d. until 1.3x the framebuffer is asked for, seeds 0-9, {upper['n'] / 10:.0f} requests "
          f"per seed; offline bound (ILP) {pct(upper['acc'] / upper['n'])}. churn: as B2b (1.1x offered load, "
          f"2,400 arrivals, 800 warm-up, seeds {list(seeds_churn)}). first-fit = lowest board with room; "
          "consolidate / spread = planner.choose_vgpu_gpu. avoidable = a full repack (one size per board) "
          "would have held it.")
