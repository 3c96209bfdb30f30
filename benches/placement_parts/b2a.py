"""B2a: online acceptance as the cluster fills up (inflation), rejections by kind.  Part of benches/placement.py."""

from __future__ import annotations

import random
from collections import Counter

import moves_bench

from gpuvirt.model.rejection import AVOIDABLE, CATEGORIES
from placement_parts.common import (
    N_GPUS,
    ONLINE_POLICIES,
    RESULTS,
    UNIFORM_IDS,
    Cluster,
    _acceptance_targets,
    facts,
    fits_in,
    ilp_max_accept,
    inflation_stream,
    pct,
    table,
    target,
)


# --- B2a ------------------------------------------------------------------------------------------------------
def part_b2a(geom, wl):
    print("\n== B2a online acceptance, inflation: i.i.d. requests until 1.3x capacity asked, no departures, "
          "64 GPUs, seeds 0-9 ==")
    states = []
    for mix in ("trace", "uniform"):
        draw = ((lambda rng: wl.sample_profiles(rng, 1)[0]) if mix == "trace"
                else (lambda rng: rng.choice(UNIFORM_IDS)))
        kinds = Counter() if mix == "trace" else None
        results, upper = _b2a_runs(geom, draw, states if mix == "trace" else None, kinds)
        print(f"-- {mix} mix" + (" (the benchmark's workload)" if mix == "trace" else
                                 f" (every plain profile equally likely, ids {UNIFORM_IDS}: a contrast where "
                                 "small shapes and alignment matter)"))
        rows = []
        for p in ONLINE_POLICIES:
            r = results[p]
            rows.append([p, pct(r["acc"] / r["n"]), pct(r["alloc"] / 10), pct(r["frag"] / r["n"]),
                         pct(r["avoid"] / r["n"]),
                         pct(r["first_rej"] / r["runs_rej"]) if r["runs_rej"] else "-",
                         f"{r['active'] / 10:.1f}"])
        table(["policy", "accepted", "alloc. slices", "frag. rej.", "avoidable rej.", "alloc. at 1st rej.",
               "active GPUs"], rows)
        print(f"offline bound (ILP, same requests, <= 64 GPUs): {pct(upper['accepted'] / upper['n'])} accepted; "
              f"{upper['n'] / 10:.0f} requests per seed")
        if mix == "trace":
            _acceptance_targets("B2a", results, upper["accepted"] / upper["n"], "offline optimum")
            _b2a_kinds(geom, results, upper, kinds)
        else:
            acc = {p: results[p]["acc"] / results[p]["n"] for p in results}
            print(f"uniform mix (no target): frag-aware {pct(acc['frag-aware'])} vs best of first-fit/best-fit "
                  f"{pct(max(acc['first-fit'], acc['best-fit']))}; avoidable rejections "
                  f"{pct(results['frag-aware']['avoid'] / results['frag-aware']['n'])} vs "
                  f"{pct(min(results[p]['avoid'] / results[p]['n'] for p in ('first-fit', 'best-fit')))}")
    return states


def _b2a_kinds(geom, results, upper, kinds):
    """Rejections of the default policy by what would have avoided them (gpuvirt.model.rejection)."""
    capacity = N_GPUS * geom.compute_slices
    n = results["frag-aware"]["n"]
    rej = n - results["frag-aware"]["acc"]
    print(f"-- rejections of the default policy (frag-aware) by what avoids them: {rej} of {n} requests over 10 "
          "seeds; share of capacity = refused compute slices / (64 GPUs x 7 slices) per seed, averaged")
    rows = []
    by_kind = {}
    for c in CATEGORIES[1:] + ("avoidable",):
        cnt = sum(kinds[k] for k in AVOIDABLE) if c == "avoidable" else kinds[c]
        need = sum(kinds["need:" + k] for k in AVOIDABLE) if c == "avoidable" else kinds["need:" + c]
        by_kind[c] = {"count": cnt, "share_of_requests": cnt / n, "share_of_capacity": need / (10 * capacity)}
        rows.append([c, cnt, pct(cnt / n), pct(need / (10 * capacity))])
    table(["category", "requests", "of requests", "of capacity"], rows)
    print("shortage: no repack holds it; stranded: moves within one GPU fix it; live / cold: moves across GPUs "
          "or hosts (cold when the pre-flight refuses live for some); stop: a repack would hold it but no "
          f"sequence of <= {moves_bench.ANALYSIS.max_moves} make-before-break moves gets there. Moves: "
          "moves_bench (hosts 6-7 on another host driver, MIG-backed live allowed as a scenario)")
    if kinds["mismatch"]:
        print(f"WARNING: {kinds['mismatch']} rejections where the analysis and the ILP disagree about a repack")
    acc = {p: results[p]["acc"] / results[p]["n"] for p in results}
    base = max(acc["first-fit"], acc["best-fit"])
    opt = upper["accepted"] / upper["n"]
    closed = (acc["frag-aware"] - base) / (opt - base) if opt > base else 1.0
    greedy = upper["greedy"] / upper["n"]
    g_closed = (greedy - base) / (opt - base) if opt > base else 1.0
    print(f"perfect placement (accept exactly when a full repack of the accepted requests plus this one fits; "
          f"free migration of everything at every arrival): {pct(greedy)} accepted, {100 * g_closed:.0f}% of "
          f"the gap; the default policy: {pct(acc['frag-aware'])}, {100 * closed:.0f}%")
    RESULTS["B2a"] = {"best_baseline": round(100 * base, 2), "offline_optimum": round(100 * opt, 2),
                      "default": round(100 * acc["frag-aware"], 2), "gap_closed": round(closed, 3),
                      "repack_greedy": round(100 * greedy, 2), "repack_greedy_gap_closed": round(g_closed, 3),
                      "requests": n, "rejections": rej, "avoidable_by_kind": by_kind,
                      "policies": {p: round(100 * v, 2) for p, v in acc.items()}}
    target("B2a default closes >= 75% of the gap between the best of first-fit/best-fit and the offline optimum",
           closed >= 0.75, f"frag-aware {pct(acc['frag-aware'])}, best baseline {pct(base)}, optimum {pct(opt)}: "
           f"{100 * closed:.0f}% of the gap")


def _repack_greedy(geom, items) -> int:
    """Requests accepted by perfect placement: accept exactly when a full repack of everything accepted so
    far plus the request fits 64 GPUs (ILP), i.e. free migration of every instance at every arrival.  It
    accepts whatever fits, like every placement policy; what the offline optimum gains beyond it comes
    from choosing which requests to refuse."""
    live: Counter = Counter()
    accepted = 0
    for pid in items:
        trial = live + Counter({pid: 1})
        if fits_in(geom, trial, N_GPUS):
            live, accepted = trial, accepted + 1
    return accepted


def _b2a_runs(geom, draw, states, kinds=None):
    capacity = N_GPUS * geom.compute_slices
    results = {p: Counter() for p in ONLINE_POLICIES}
    upper = Counter()
    for seed in range(10):
        rng = random.Random(seed)
        items = inflation_stream(rng, draw, lambda pid: geom.profile(pid).compute_slices, capacity)
        upper["accepted"] += ilp_max_accept(geom, Counter(items), N_GPUS)
        upper["n"] += len(items)
        if kinds is not None:
            upper["greedy"] += _repack_greedy(geom, items)
        for policy in ONLINE_POLICIES:
            cl = Cluster(geom, policy)
            r = results[policy]
            first_rej_ratio = None
            for pid in items:
                r["n"] += 1
                if cl.place(pid) is not None:
                    r["acc"] += 1
                    continue
                if first_rej_ratio is None:
                    first_rej_ratio = cl.used() / capacity
                    r["first_rej"] += first_rej_ratio
                    r["runs_rej"] += 1
                frag = cl.frag_rejection(pid)
                r["frag"] += frag
                live = cl.live()
                live[pid] += 1
                avoid = fits_in(geom, live, N_GPUS)
                r["avoid"] += avoid
                if kinds is not None and policy == "frag-aware":
                    why = moves_bench.classify(facts(), cl.layouts, pid)
                    kinds[why.category] += 1
                    kinds["need:" + why.category] += why.need
                    kinds["mismatch"] += why.avoidable != avoid
                if states is not None and frag and policy in ("first-fit", "best-fit", "frag-aware") and \
                        not any(s[0] == (policy, seed) for s in states):
                    states.append(((policy, seed), pid, list(cl.layouts)))     # tuples: a snapshot
            r["alloc"] += cl.used() / capacity
            r["active"] += sum(1 for lay in cl.layouts if lay)
    return results, upper
