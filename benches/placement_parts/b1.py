"""B1: packing against the exact optimum.  Part of benches/placement.py."""

from __future__ import annotations

import random
import time
from collections import Counter

from gpuvirt.model import mig
from gpuvirt.model.planner import pack_detailed
from placement_parts.common import (
    UNIFORM_IDS,
    ffd,
    ilp_min_gpus,
    online_first_fit_gpus,
    table,
    target,
)


# --- B1 -------------------------------------------------------------------------------------------------------
def part_b1(models):
    print("\n== B1 static packing: GPUs used, planner vs exact ILP vs first-fit-decreasing ==")
    rows = []
    all_equal = True
    worst_ms = 0.0
    never_worse = True
    for model_id, (geom, wl) in models.items():
        for mixname in ("trace", "uniform"):
            for n in (50, 200, 1000):
                eq = 0
                sums = Counter()
                tmax = 0.0
                for seed in range(10):
                    rng = random.Random(1000 * n + seed)
                    items = (wl.sample_profiles(rng, n) if mixname == "trace"
                             else [rng.choice(UNIFORM_IDS) for _ in range(n)])
                    counts = Counter(items)
                    t0 = time.perf_counter()
                    res = pack_detailed(geom, counts)
                    dt = time.perf_counter() - t0
                    for lay in res.gpus:
                        assert not mig.layout_problems(geom, lay)
                    assert Counter(p.profile_id for lay in res.gpus for p in lay) == counts
                    opt = ilp_min_gpus(geom, counts)
                    f = len(ffd(geom, counts))
                    o = online_first_fit_gpus(geom, items)
                    lb = -(-sum(geom.profile(k).compute_slices * v for k, v in counts.items()) // 7)
                    eq += len(res.gpus) == opt
                    never_worse &= len(res.gpus) <= f
                    sums.update(planner=len(res.gpus), ilp=opt, ffd=f, online=o, lb=lb)
                    tmax = max(tmax, dt)
                all_equal &= eq == 10
                worst_ms = max(worst_ms, tmax * 1000)
                rows.append([model_id, mixname, n, f"{sums['lb'] / 10:.1f}", f"{sums['ilp'] / 10:.1f}",
                             f"{sums['planner'] / 10:.1f}", f"{eq}/10", f"{sums['ffd'] / 10:.1f}",
                             f"{sums['online'] / 10:.1f}", f"{tmax * 1000:.1f}"])
    table(["model", "mix", "N", "LB", "ILP opt", "planner", "=opt", "FFD", "online FF", "max ms"], rows)
    print("(means over seeds 0-9; LB = ceil(compute slices / 7); online FF = arrival order, lowest GPU/start)")
    target("B1 planner equals the ILP optimum on every instance", all_equal, f"{len(rows) * 10} instances")
    target("B1 never more GPUs than FFD", never_worse, "all instances")
    target("B1 N=1000 packing well under 1 s", worst_ms < 1000, f"slowest {worst_ms:.1f} ms")
