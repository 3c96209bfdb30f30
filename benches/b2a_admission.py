"""B2a admission experiment (issue 13): can an *online* admission rule on top of the default placement policy
close >= 75 % of B2a's gap between the best of first-fit/best-fit and the offline optimum?

B2a's workload (benches/placement_parts/b2a.py): 64 A100-40GB GPUs, trace requests drawn i.i.d. until 1.3x
the cluster's compute has been asked for, no departures.  Placement alone cannot close the gap (perfect
placement, a full repack at every arrival, reaches 40 %): the optimum *refuses* large requests that fit to
hold more small ones.  This script layers admission rules on ``frag-aware`` placement, chooses each rule's
parameter on training seeds (100-139 by default, the same generator) and evaluates the chosen setting once
on the bench's seeds 0-9, then on a second held-out set (200-239) and on streams that stop at other multiples
of capacity.  It changes nothing in gpuvirt/ and nothing in B2a's own figures; findings: docs/placement.md.

Rules (``c`` = the request's compute slices, ``F`` = the cluster's free compute slices after accepting it,
``s<c`` = share of the mix's compute demand that comes from profiles smaller than ``c``; a rule refuses a
request that placement could hold):

* ``trunk(t7, t4)``   trunk reservation: refuse a 7g when F < t7, a 4g when F < t4 (slices).
* ``trunk-mix(T)``    one parameter: refuse when F < T * s<c (a reserve for smaller profiles, in proportion to
                      their share of the demand).
* ``fluid(theta)``    re-solved fluid bound: refuse when F < theta * R * s<c, with R the compute still to be
                      asked (1.3x capacity minus what was asked so far).  It needs the horizon, which B2a's
                      generator fixes but an operator does not know; it is here as the better-informed bound
                      on what an online threshold rule can do.

    .venv/bin/python benches/b2a_admission.py                 # train, then evaluate on seeds 0-9 (~4 min)
    .venv/bin/python benches/b2a_admission.py --json          # the figures as one JSON object on stdout
    .venv/bin/python benches/b2a_admission.py --trace PATH    # the trace file, where ../shared is elsewhere
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import placement_parts.common as common  # noqa: E402
from placement_parts.common import N_GPUS, Cluster, Workload, ilp_max_accept, inflation_stream, pct  # noqa: E402

from gpuvirt.model import mig  # noqa: E402
from gpuvirt.model.catalog import load_catalog  # noqa: E402

FACTOR = 1.3
BENCH_SEEDS = range(10)
TRAIN_SEEDS = range(100, 140)
EXTRA_SEEDS = range(200, 240)      # a second, larger held-out set: is seeds 0-9's verdict a one-request fluke?
T7_GRID = (0, 7, 14, 21, 28, 35, 42, 49, 56, 63, 70, 84, 98)
T4_GRID = (0, 4, 7, 11, 14, 21, 28)
T_GRID = (0, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 240, 280)
THETA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


def smaller_share(geom, mix) -> dict[int, float]:
    """{compute slices c: share of the mix's expected compute demand from profiles with fewer than c}."""
    demand = {p: w * geom.profile(p).compute_slices for p, w in mix.items()}
    total = sum(demand.values())
    sizes = sorted({geom.profile(p).compute_slices for p in mix})
    return {c: sum(d for p, d in demand.items() if geom.profile(p).compute_slices < c) / total for c in sizes}


class Rule:
    """An admission rule: ``refuse(c, free_after, remaining)`` says whether to refuse a request that fits."""

    def __init__(self, kind, param, below):
        self.kind, self.param, self.below = kind, param, below

    def name(self):
        if self.kind == "none":
            return "none"
        if self.kind == "trunk":
            return f"trunk(t7={self.param[0]}, t4={self.param[1]})"
        return f"{self.kind}({self.param:g})"

    def refuse(self, c, free_after, remaining) -> bool:
        if self.kind == "none":
            return False
        if self.kind == "trunk":
            t = {7: self.param[0], 4: self.param[1]}.get(c, 0)
        elif self.kind == "trunk-mix":
            t = self.param * self.below[c]
        else:
            t = self.param * remaining * self.below[c]
        return free_after < t


def stream(geom, wl, seed, factor=FACTOR):
    """The request sequence of one B2a seed (the same draws as placement_parts/b2a.py)."""
    rng = random.Random(seed)
    return inflation_stream(rng, lambda r: wl.sample_profiles(r, 1)[0], lambda p: geom.profile(p).compute_slices,
                            N_GPUS * geom.compute_slices, factor)


def run(geom, items, rule, policy="frag-aware", factor=FACTOR):
    """Accepted requests by profile, requests by profile, refusals of requests that placement would hold, and
    the compute slices allocated at the end."""
    capacity = N_GPUS * geom.compute_slices
    cl = Cluster(geom, policy)
    acc, seen, held_back = Counter(), Counter(), Counter()
    asked = used = 0
    for pid in items:
        c = geom.profile(pid).compute_slices
        seen[pid] += 1
        asked += c
        if rule.refuse(c, capacity - used - c, factor * capacity - asked):
            # counted as the fairness cost only when placement would have held it
            gpus_free = any(mig.free_starts(geom, lay, geom.profile(pid)) for lay in cl.layouts)
            held_back[pid] += gpus_free
            continue
        if cl.place(pid) is not None:
            acc[pid] += 1
            used += c
    return acc, seen, held_back, used


class Memo:
    """Runs and references per (seed, factor), so that a grid re-uses the streams and the ILP bounds."""

    def __init__(self, geom, wl):
        self.geom, self.wl = geom, wl
        self.items, self.opt, self.base = {}, {}, {}

    def seq(self, seed, factor=FACTOR):
        if (seed, factor) not in self.items:
            self.items[seed, factor] = stream(self.geom, self.wl, seed, factor)
        return self.items[seed, factor]

    def optimum(self, seed, factor=FACTOR):
        if (seed, factor) not in self.opt:
            self.opt[seed, factor] = ilp_max_accept(self.geom, Counter(self.seq(seed, factor)), N_GPUS)
        return self.opt[seed, factor]

    def baseline(self, seed, factor=FACTOR):
        """Accepted by first-fit and by best-fit (no admission rule)."""
        if (seed, factor) not in self.base:
            none = Rule("none", None, None)
            self.base[seed, factor] = tuple(sum(run(self.geom, self.seq(seed, factor), none, p, factor)[0].values())
                                            for p in ("first-fit", "best-fit"))
        return self.base[seed, factor]


def evaluate(memo, rule, seeds, factor=FACTOR):
    """Summed over ``seeds``: accepted and asked by profile, held back by profile, allocated compute share."""
    acc, seen, held, alloc = Counter(), Counter(), Counter(), 0.0
    for s in seeds:
        a, n, h, used = run(memo.geom, memo.seq(s, factor), rule, factor=factor)
        acc.update(a), seen.update(n), held.update(h)
        alloc += used / (N_GPUS * memo.geom.compute_slices) / len(seeds)
    return acc, seen, held, alloc


def gap_figures(memo, seeds, accepted, factor=FACTOR):
    n = sum(len(memo.seq(s, factor)) for s in seeds)
    base = max(sum(memo.baseline(s, factor)[i] for s in seeds) for i in (0, 1))
    opt = sum(memo.optimum(s, factor) for s in seeds)
    closed = (accepted - base) / (opt - base) if opt > base else 1.0
    return {"requests": n, "best_baseline": base, "optimum": opt, "accepted": accepted, "gap_closed": closed,
            "needed_for_75": base + -(-3 * (opt - base) // 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=None, help="the Alibaba v2023 gpushare100 CSV (default: "
                    "benches/placement.py's path; where that is missing, its synthetic workload)")
    ap.add_argument("--train-seeds", type=int, nargs=2, default=(TRAIN_SEEDS.start, TRAIN_SEEDS.stop),
                    metavar=("FIRST", "END"), help="training seeds FIRST..END-1 (default 100 140)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object on stdout")
    args = ap.parse_args(argv)
    first, end = args.train_seeds
    if first >= end or first < BENCH_SEEDS.stop or (first < EXTRA_SEEDS.stop and end > EXTRA_SEEDS.start):
        ap.error("training seeds must be a non-empty range that leaves out the held-out seeds 0-9 and 200-239")
    if args.trace is not None and not args.trace.is_file():
        ap.error(f"no trace file at {args.trace}")
    out = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    if args.trace is not None:
        common.TRACE = args.trace
    t0 = time.perf_counter()
    geom = load_catalog().get("a100-40gb").mig
    wl = Workload(geom)
    below = smaller_share(geom, wl.mix)
    train = range(*args.train_seeds)
    memo = Memo(geom, wl)
    print(f"workload: {wl.source}; share of demand from smaller profiles: "
          + ", ".join(f"<{c}g {100 * v:.1f}%" for c, v in below.items()))
    res: dict = {"workload": wl.source, "train_seeds": [train.start, train.stop - 1], "smaller_share": below,
                 "families": {}}

    # training: each family's best setting by accepted requests over the training seeds; ties go to the
    # setting that refuses less (the grids are in increasing order of refusal)
    families = {"trunk": [Rule("trunk", (t7, t4), below) for t7 in T7_GRID for t4 in T4_GRID],
                "trunk-mix": [Rule("trunk-mix", t, below) for t in T_GRID],
                "fluid": [Rule("fluid", th, below) for th in THETA_GRID]}
    none = Rule("none", None, None)
    none_train = sum(evaluate(memo, none, train)[0].values())
    print(f"\n== training, seeds {train.start}-{train.stop - 1} ==")
    tr = gap_figures(memo, train, none_train)
    print(f"{tr['requests']} requests; best of first-fit/best-fit {tr['best_baseline']}, offline optimum "
          f"{tr['optimum']}, frag-aware {none_train} ({100 * tr['gap_closed']:.1f}% of the gap); 75% needs "
          f"{tr['needed_for_75']}")
    chosen, train_acc = {}, {}
    for fam, rules in families.items():
        scores = [(sum(evaluate(memo, r, train)[0].values()), -i, r) for i, r in enumerate(rules)]
        best = max(scores, key=lambda x: (x[0], x[1]))
        chosen[fam] = best[2]
        train_acc.update({r.name(): a for a, _, r in scores})
        g = gap_figures(memo, train, best[0])
        res["families"][fam] = {"chosen": best[2].name(), "train_accepted": best[0],
                                "train_gap_closed": round(g["gap_closed"], 3),
                                "train_grid": {r.name(): a for a, _, r in scores}}
        print(f"{fam}: chosen {best[2].name()}, {best[0]} accepted ({100 * g['gap_closed']:.1f}% of the gap)")
    print("trunk: accepted on the training seeds by t7 (rows) and t4 (columns), slices")
    common.table(["t7 \\ t4"] + list(T4_GRID),
                 [[t7] + [train_acc[Rule("trunk", (t7, t4), below).name()] for t4 in T4_GRID] for t7 in T7_GRID])
    print("trunk-mix: " + ", ".join(f"T={t} {train_acc[Rule('trunk-mix', t, below).name()]}" for t in T_GRID))
    print("fluid: " + ", ".join(f"theta={t:g} {train_acc[Rule('fluid', t, below).name()]}" for t in THETA_GRID))
    res["train"] = {k: tr[k] for k in ("requests", "best_baseline", "optimum", "needed_for_75")}
    res["train"]["frag_aware"] = none_train

    # held-out: the bench's seeds, each chosen rule evaluated once
    print(f"\n== held-out: the bench's seeds {BENCH_SEEDS.start}-{BENCH_SEEDS.stop - 1} ==")
    base_acc, seen, _, base_alloc = evaluate(memo, none, BENCH_SEEDS)
    ho = gap_figures(memo, BENCH_SEEDS, sum(base_acc.values()))
    print(f"{ho['requests']} requests; best of first-fit/best-fit {ho['best_baseline']}, offline optimum "
          f"{ho['optimum']}, frag-aware {ho['accepted']} ({100 * ho['gap_closed']:.0f}% of the gap); 75% needs "
          f"{ho['needed_for_75']}")
    res["held_out"] = {k: ho[k] for k in ("requests", "best_baseline", "optimum", "needed_for_75")}
    res["held_out"].update({"frag_aware": ho["accepted"], "frag_aware_alloc": round(base_alloc, 4),
                            "per_profile_frag_aware": {geom.profile(p).name: [base_acc[p], seen[p]] for p in seen}})
    pids = sorted(seen, key=lambda p: geom.profile(p).compute_slices)
    headers = (["rule", "accepted", "requests", "of gap", "alloc. slices"] + [geom.profile(p).name for p in pids]
               + ["held back"])
    rows = [["frag-aware (no rule)", pct(ho["accepted"] / ho["requests"]), ho["accepted"],
             f"{100 * ho['gap_closed']:.1f}%", pct(base_alloc)] + [pct(base_acc[p] / seen[p]) for p in pids] + [0]]
    for fam, rule in chosen.items():
        acc, _, held, alloc = evaluate(memo, rule, BENCH_SEEDS)
        g = gap_figures(memo, BENCH_SEEDS, sum(acc.values()))
        rows.append([rule.name(), pct(g["accepted"] / g["requests"]), g["accepted"], f"{100 * g['gap_closed']:.1f}%",
                     pct(alloc)]
                    + [f"{pct(acc[p] / seen[p])} ({100 * (acc[p] - base_acc[p]) / seen[p]:+.1f})" for p in pids]
                    + [sum(held.values())])
        res["families"][fam].update({"held_out_accepted": g["accepted"], "held_out_gap_closed": round(g["gap_closed"], 3),
                                     "held_out_alloc": round(alloc, 4),
                                     "held_out_per_profile": {geom.profile(p).name: [acc[p], seen[p]] for p in pids},
                                     "held_out_held_back": sum(held.values())})
    common.table(headers, rows)
    print("per profile: accepted / asked on seeds 0-9 (change in points against frag-aware); alloc. slices: "
          "allocated compute at the end; held back: refusals of requests that placement would have held then")
    # not used for any choice: how sharp the held-out result is around the chosen settings
    nb = {f"trunk(t7={t7}, t4=0)": sum(evaluate(memo, Rule("trunk", (t7, 0), below), BENCH_SEEDS)[0].values())
          for t7 in T7_GRID}
    nb.update({f"fluid({t:g})": sum(evaluate(memo, Rule("fluid", t, below), BENCH_SEEDS)[0].values())
               for t in THETA_GRID})
    res["held_out"]["sensitivity"] = nb
    print("held-out accepted across the grids (sensitivity only, never used to choose): "
          + ", ".join(f"{k} {v}" for k, v in nb.items()))

    print(f"\n== second held-out set: seeds {EXTRA_SEEDS.start}-{EXTRA_SEEDS.stop - 1} ==")
    fa = sum(evaluate(memo, none, EXTRA_SEEDS)[0].values())
    ex = gap_figures(memo, EXTRA_SEEDS, fa)
    print(f"{ex['requests']} requests; best of first-fit/best-fit {ex['best_baseline']}, offline optimum "
          f"{ex['optimum']}; 75% needs {ex['needed_for_75']}")
    rows = [["frag-aware (no rule)", fa, f"{100 * ex['gap_closed']:.1f}%"]]
    res["extra"] = {k: ex[k] for k in ("requests", "best_baseline", "optimum", "needed_for_75")}
    res["extra"]["frag_aware"] = fa
    for fam, rule in chosen.items():
        a = sum(evaluate(memo, rule, EXTRA_SEEDS)[0].values())
        rows.append([rule.name(), a, f"{100 * gap_figures(memo, EXTRA_SEEDS, a)['gap_closed']:.1f}%"])
        res["extra"][fam] = a
    common.table(["rule", "accepted", "of gap"], rows)

    # the horizon: the rules chosen at 1.3x, on the held-out seeds filled to other factors
    print("\n== the same chosen rules when the stream stops at another multiple of capacity (seeds 0-9) ==")
    rows = []
    res["factors"] = {}
    for factor in (1.15, 1.3, 1.5, 2.0):
        fa = sum(evaluate(memo, none, BENCH_SEEDS, factor)[0].values())
        g0 = gap_figures(memo, BENCH_SEEDS, fa, factor)
        row = [f"{factor:g}x", g0["best_baseline"], g0["optimum"], f"{fa} ({100 * g0['gap_closed']:.0f}%)"]
        res["factors"][str(factor)] = {"best_baseline": g0["best_baseline"], "optimum": g0["optimum"],
                                       "frag_aware": fa}
        for fam, rule in chosen.items():
            a = sum(evaluate(memo, rule, BENCH_SEEDS, factor)[0].values())
            g = gap_figures(memo, BENCH_SEEDS, a, factor)
            row.append(f"{a} ({100 * g['gap_closed']:.0f}%)")
            res["factors"][str(factor)][fam] = a
        rows.append(row)
    common.table(["asked", "best baseline", "optimum", "frag-aware"] + [r.name() for r in chosen.values()], rows)
    print(f"[took {time.perf_counter() - t0:.0f} s]")
    if args.json:
        sys.stdout = out
        print(json.dumps(res, sort_keys=True))


if __name__ == "__main__":
    main()
