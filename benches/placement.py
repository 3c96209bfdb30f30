"""Placement planner benchmark: packing (B1), online acceptance (B2a inflation, B2b churn, B2v time-sliced
vGPU), minimum-move defragmentation (B3), fewest moves across GPUs and hosts against an integer program (B4)
and decision latency, as defined in docs/placement.md.  This file is the driver; each part is a module of
benches/placement_parts/ (b1, b2a, b2b, b2v, b3, b4, latency; shared workload, references and output
helpers in common), and the move planner's harness is benches/moves_bench.py.

    .venv/bin/python benches/placement.py            # everything, one run, all numbers printed
    .venv/bin/python benches/placement.py --part B1  # one part (B1, B2a, B2b, B2v, B3, B4, latency)
    .venv/bin/python benches/placement.py --json     # every figure as one JSON object (docs/benchmarks.md)

Seeded and reproducible.  The reference optima come from integer programs solved by scipy's HiGHS
(``scipy.optimize.milp``), which share nothing with the planner except the placement rules in
gpuvirt.model.mig; scipy is a benchmark-only dependency (``pip install .[bench]``).

Workload: the Alibaba GPU trace v2023 (``openb_pod_list_gpushare100.csv``, read from
``<repo>/../shared/reference/data/alibaba-gpu-v2023/``; it is never copied into the repository).  A task
asking for ``gpu_milli`` thousandths of a GPU becomes the smallest plain MIG profile with at least
ceil(7 * gpu_milli / 1000) compute slices; a task with whole GPUs becomes that many 7g requests.  Without
the file, a synthetic workload is used instead and the run says so (see SYNTHETIC_* below).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from placement_parts.b1 import part_b1  # noqa: E402
from placement_parts.b2a import part_b2a  # noqa: E402
from placement_parts.b2b import part_b2b  # noqa: E402
from placement_parts.b2v import part_b2v  # noqa: E402
from placement_parts.b3 import part_b3  # noqa: E402
from placement_parts.b4 import part_b4  # noqa: E402
from placement_parts.common import CURRENT, RESULTS, TARGETS, Workload, pct  # noqa: E402
from placement_parts.latency import part_latency  # noqa: E402

from gpuvirt.model.catalog import load_catalog  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["B1", "B2a", "B2b", "B2v", "B3", "B4", "latency", "all"], default="all")
    ap.add_argument("--json", action="store_true", help="print every figure as one JSON object on stdout "
                    "(the human-readable report goes to stderr)")
    args = ap.parse_args(argv)
    if args.json:
        real_stdout = sys.stdout
        sys.stdout = sys.stderr
    cat = load_catalog()
    a100 = cat.get("a100-40gb").mig
    h100 = cat.get("h100-80gb").mig
    wl_a100, wl_h100 = Workload(a100), Workload(h100)
    print(f"workload: {wl_a100.source}; {len(wl_a100.tasks)} GPU tasks; profile mix (A100 ids) "
          + ", ".join(f"{a100.profile(p).name} {pct(v)}" for p, v in wl_a100.mix.items())
          + f"; durations capped at {wl_a100.cap:.0f} s")
    RESULTS["workload"] = {"source": wl_a100.source, "tasks": len(wl_a100.tasks),
                           "mix": {a100.profile(p).name: round(v, 4) for p, v in wl_a100.mix.items()}}
    timings = {}

    def timed(name, fn, *a):
        CURRENT[0] = name
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*a)
        timings[name] = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2)}
        print(f"[{name} took {timings[name]['wall_s']:.1f} s wall, {timings[name]['cpu_s']:.1f} s CPU]")
        return out

    if args.part in ("B1", "all"):
        timed("B1", part_b1, {"a100-40gb": (a100, wl_a100), "h100-80gb": (h100, wl_h100)})
    states = []
    if args.part in ("B2a", "B3", "all"):
        states = timed("B2a", part_b2a, a100, wl_a100)
    if args.part in ("B2b", "all"):
        timed("B2b", part_b2b, a100, wl_a100)
    if args.part in ("B2v", "all"):
        timed("B2v", part_b2v, wl_a100)
    if args.part in ("B3", "all"):
        timed("B3", part_b3, a100, wl_a100, states)
    if args.part in ("B4", "all"):
        timed("B4", part_b4, cat)
    if args.part in ("latency", "all"):
        timed("latency", part_latency, a100, wl_a100)
    print("\n== targets ==")
    for name, met, detail in TARGETS:
        print(f"{'MET   ' if met else 'MISSED'} {name} ({detail})")
    print("part times: " + ", ".join(f"{k} {v['wall_s']:.1f} s ({v['cpu_s']:.1f} s CPU)" for k, v in timings.items()))
    RESULTS["timings"] = timings
    if args.json:
        sys.stdout = real_stdout
        print(json.dumps(RESULTS, sort_keys=True))


if __name__ == "__main__":
    main()
