"""B4: fewest moves against an independent integer program.  Part of benches/placement.py."""

from __future__ import annotations

from collections import Counter

import moves_bench

from placement_parts.common import (
    RESULTS,
    table,
    target,
)


def part_b4(cat):
    print("\n== B4 fewest moves: the planner (exact search) vs an independent time-indexed integer program "
          "(benches/moves_ilp.py, HiGHS), seeded small clusters ==")
    rows = moves_bench.part_b4(cat.get("a100-40gb"), cat.get("l40s"))
    table(["seed", "family", "GPUs", "instances", "kinds allowed", "planner (moves, cold)", "ILP (moves, cold)",
           "equal", "plan ms", "ILP s"],
          [[r["seed"], r["family"], r["gpus"], r["instances"], r["allow"], r["planner"] or "none",
            r["ilp"] or "none", "yes" if r["equal"] else "NO", f"{r['plan_ms']:.1f}", f"{r['ilp_s']:.2f}"]
           for r in rows])
    eq = sum(r["equal"] for r in rows)
    feasible = sum(r["ilp"] is not None for r in rows)
    moves = Counter(r["ilp"][0] for r in rows if r["ilp"] is not None)
    print(f"cases {len(rows)}: {feasible} with a plan ({', '.join(f'{v} x {k} move(s)' for k, v in sorted(moves.items()))}), "
          f"{len(rows) - feasible} proven impossible within 4 moves; planner equal to the ILP minimum on {eq}; "
          f"also equal in cold moves on {sum(r['equal_cold'] for r in rows)}; every plan replayed step by step")
    RESULTS["B4"] = {"cases": len(rows), "equal_to_ilp": eq, "equal_cold_moves": sum(r["equal_cold"] for r in rows),
                     "with_plan": feasible, "by_moves": {str(k): v for k, v in sorted(moves.items())},
                     "max_moves": 4, "plan_ms_max": round(max(r["plan_ms"] for r in rows), 2)}
    target("B4 minimum moves equal to an independent ILP on >= 30 seeded small clusters, 100%",
           len(rows) >= 30 and eq == len(rows), f"{eq}/{len(rows)}")
