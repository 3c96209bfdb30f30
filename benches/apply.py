#!/usr/bin/env python3
"""Benchmark: apply 7 x 1g on 8 simulated H100-80GB GPUs, then re-apply (a no-op).

Prints wall time and the number of NVML calls gpuvirt made for each run, measured through the real code
path (service layer -> host layer -> pynvml -> simulated libnvidia-ml), plus the same two runs as whole
CLI processes (`gpuvirt apply ... --yes`).  Peer figure for context: mig-parted creates each GPU instance
with a driver-chosen placement and, when that fails, retries every distinct creation order; gpuvirt makes
one explicit-placement call per instance and none at all when the layout already matches.

usage: .venv/bin/python benches/apply.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpuvirt.context import Context, resolve_settings  # noqa: E402
from gpuvirt.service import apply as apply_svc  # noqa: E402
from gpuvirt.service import profiles  # noqa: E402
from gpuvirt.sim.control import init_sim  # noqa: E402

GPUS = 8


def tmpdir() -> str:
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="gpuvirt-bench-apply-", dir=shm)


def run_service(root: Path) -> list[tuple[str, float, int, int]]:
    out = []
    settings = resolve_settings(sim=str(root), host_id="bench", env={})
    with Context(settings) as ctx:
        profiles.create_profile(ctx, "h100-7x1g", mig=["1g.10gb=7"], model="h100-80gb", replace=True)
    for label in ("apply (7 x 1g on 8 GPUs)", "re-apply (no-op)"):
        with Context(settings) as ctx:
            t0 = time.perf_counter()
            res = apply_svc.apply(ctx, "h100-7x1g", "all")
            dt = time.perf_counter() - t0
            calls = ctx.host.nvml().call_count
            ops = sum(len(g["operations"]) for g in res.to_dict()["gpus"])
        out.append((label, dt, calls, ops))
    return out


def run_cli(root: Path) -> list[tuple[str, float]]:
    exe = str(Path(sys.executable).with_name("gpuvirt"))
    out = []
    env = dict(os.environ, GPUVIRT_HOST_ID="bench-cli")
    subprocess.run([exe, "--sim", str(root), "create-profile", "h100-7x1g", "--mig", "1g.10gb=7", "--model",
                    "h100-80gb", "--replace"], check=True, capture_output=True, env=env)
    for label in ("CLI apply", "CLI re-apply (no-op)"):
        t0 = time.perf_counter()
        p = subprocess.run([exe, "--sim", str(root), "apply", "h100-7x1g", "--gpu", "all", "--yes"],
                           capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"{label} failed: {p.stderr}")
        out.append((label, dt))
    return out


def main() -> None:
    base = tmpdir()
    try:
        root = Path(base) / "svc"
        init_sim(root, [f"h100-80gb:{GPUS}"], seed="bench")
        svc = run_service(root)
        root2 = Path(base) / "cli"
        init_sim(root2, [f"h100-80gb:{GPUS}"], seed="bench")
        cli = run_cli(root2)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"apply benchmark: {GPUS} x H100-80GB (simulated), profile 7 x 1g.10gb per GPU")
    print(f"{'run':32} {'wall s':>8} {'NVML calls':>11} {'host ops':>9}")
    for label, dt, calls, ops in svc:
        print(f"{label:32} {dt:8.3f} {calls:11d} {ops:9d}")
    for label, dt in cli:
        print(f"{label:32} {dt:8.3f} {'':>11} {'':>9}")
    first, second = svc
    print(f"no-op re-apply made {second[3]} host changes and {second[2]} NVML calls "
          f"({second[2] / max(first[2], 1):.0%} of the first apply's, all reads)")


if __name__ == "__main__":
    main()
