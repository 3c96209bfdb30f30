#!/usr/bin/env python3
"""Benchmark: ``gpuvirt discover --json`` vs ``mdevctl types --dumpjson`` on a 256-parent x 20-type mdev tree.

The tree is written directly in the layout that mdevctl 1.2.0 accepts (../shared/reference/running-mdevctl.md
section 3): 256 PCI parents under ``sys/devices/pci0000:00``, 20 ``nvidia-N`` types each, one active mdev per
parent (256) with its ``mdev_type`` / ``iommu_group`` links, and 256 defined devices as JSON files under
``etc/mdevctl.d/<parent>/`` - 26,624 regular files, the size of the reference timing.

Both commands are timed as whole processes, wall clock, output to /dev/null, after one untimed warm-up run:

* gpuvirt: the installed console script, ``gpuvirt --root TREE discover --json``;
* mdevctl: 1.2.0 has no root prefix, so the runs happen inside one private mount namespace with the tree
  bound over ``/sys`` and ``/etc/mdevctl.d`` (root only); a small timer inside the namespace starts mdevctl
  the same way gpuvirt is started.  Without root, ``unshare`` or ``mdevctl`` that side is reported as skipped.

Median of ``--runs`` (default 5) each, printed side by side with the ratio and whether the target
(gpuvirt no slower than mdevctl) is met.  ``--profile`` adds where gpuvirt's time goes (``-X importtime`` and
cProfile of one in-process run).  Run: ``.venv/bin/python benches/discover.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

PCI_ROOT = "sys/devices/pci0000:00"
NS_SCRIPT = 'mount --bind "$ROOT/sys" /sys && mount --bind "$ROOT/etc/mdevctl.d" /etc/mdevctl.d && exec "$@"'
TIMER = r"""
import json, subprocess, sys, time
runs = int(sys.argv[1]); cmd = sys.argv[2:]
subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)          # warm-up
out = []
for _ in range(runs):
    t = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    out.append(time.perf_counter() - t)
    if rc:
        sys.exit(f"{' '.join(cmd)} exited {rc}")
print(json.dumps(out))
"""


# --- the tree -----------------------------------------------------------------------------------------------------
def parent_address(i: int) -> str:
    return f"0000:{0x10 + i // 32:02x}:{i % 32:02x}.0"


def _file(path: Path, text: str, mode: int = 0o444) -> None:
    # one open(2) with the final mode (sysfs attributes are read-only or write-only)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if text:
            os.write(fd, text.encode())
    finally:
        os.close(fd)


def _link(path: Path, target: Path) -> None:
    os.symlink(os.path.relpath(target, path.parent), path)


def build_tree(root: Path, parents: int, types: int) -> dict[str, int]:
    sysd = root / "sys"
    for d in ("class/mdev_bus", "bus/mdev/devices", "kernel/iommu_groups", "devices/pci0000:00"):
        (sysd / d).mkdir(parents=True, exist_ok=True)
    for base in ("etc/mdevctl.d/scripts.d", "usr/lib/mdevctl/scripts.d"):
        for sub in ("callouts", "notifiers"):
            (root / base / sub).mkdir(parents=True, exist_ok=True)
    sizes = [1024, 2048, 4096, 8192, 16384]
    files = 0
    for i in range(parents):
        addr = parent_address(i)
        pdir = root / PCI_ROOT / addr
        (pdir / "mdev_supported_types").mkdir(parents=True)
        _file(pdir / "vendor", "0x10de\n")
        _file(pdir / "device", "0x1eb8\n")
        files += 2
        active_type = f"nvidia-{300 + i % types}"
        for j in range(types):
            tid = f"nvidia-{300 + j}"
            fb = sizes[j % len(sizes)]
            tdir = pdir / "mdev_supported_types" / tid
            (tdir / "devices").mkdir(parents=True)
            _file(tdir / "name", f"FAKE-T4-{fb // 1024}{'QABC'[j // 5 % 4]}\n")
            _file(tdir / "description", f"num_heads=4, frl_config=60, framebuffer={fb}M, max_resolution=5120x2880, "
                                        f"max_instance={16384 // fb}\n")
            _file(tdir / "available_instances", f"{(16384 // fb - 1) if tid == active_type else 0}\n")
            _file(tdir / "device_api", "vfio-pci\n")
            _file(tdir / "create", "", 0o200)
            files += 5
        # one active device per parent
        u = str(uuid.UUID(int=(0xA << 124) | i, version=4))
        ddir = pdir / u
        ddir.mkdir()
        _file(ddir / "remove", "", 0o200)
        files += 1
        group = 100 + i
        gdir = sysd / "kernel/iommu_groups" / str(group) / "devices"
        gdir.mkdir(parents=True)
        _link(ddir / "mdev_type", pdir / "mdev_supported_types" / active_type)
        _link(ddir / "iommu_group", gdir.parent)
        _link(gdir / u, ddir)
        _link(pdir / "mdev_supported_types" / active_type / "devices" / u, ddir)
        _link(sysd / "bus/mdev/devices" / u, ddir)
        _link(sysd / "class/mdev_bus" / addr, pdir)
        # one defined (persistent) device per parent, as mdevctl stores it
        cfg = root / "etc/mdevctl.d" / addr
        cfg.mkdir()
        d = str(uuid.UUID(int=(0xD << 124) | i, version=4))
        _file(cfg / d, json.dumps({"mdev_type": f"nvidia-{300 + (i + 1) % types}", "start": "auto",
                                   "attrs": []}, indent=2) + "\n", 0o644)
        files += 1
    return {"parents": parents, "types": types, "active": parents, "defined": parents, "files": files}


# --- running --------------------------------------------------------------------------------------------------------
GPUVIRT_EXE: str | None = None   # --gpuvirt


def gpuvirt_cmd() -> list[str]:
    if GPUVIRT_EXE:
        return [GPUVIRT_EXE]
    exe = Path(sys.executable).with_name("gpuvirt")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("gpuvirt")
    if not found:
        sys.exit("benches/discover.py: the gpuvirt console script is not installed next to this Python")
    return [found]


def time_runs(cmd: list[str], runs: int) -> list[float]:
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)   # warm-up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t)
    return out


def mdevctl_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mdevctl 1.2.0 reads only /sys; the tree is bind-mounted in a mount namespace)"
    for tool in ("mdevctl", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/etc/mdevctl.d").is_dir():
        return "/etc/mdevctl.d does not exist"
    return None


def in_namespace(root: Path, *cmd: str, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", NS_SCRIPT, "sh", *cmd],
                          env=dict(os.environ, ROOT=str(root)), capture_output=capture, text=True, timeout=300)


def check_outputs(root: Path, shape: dict[str, int], with_mdevctl: bool) -> str:
    """One untimed run of each: both must see the whole tree (the timings compare equal work)."""
    p = subprocess.run([*gpuvirt_cmd(), "--root", str(root), "discover", "--json"], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"gpuvirt discover failed: {p.stderr.strip()}")
    doc = json.loads(p.stdout)
    ours = {pa["address"]: {t["id"]: t["available_instances"] for t in pa["types"]} for pa in doc["mdev_parents"]}
    assert len(ours) == shape["parents"] and all(len(t) == shape["types"] for t in ours.values()), "gpuvirt"
    assert len(doc["mdev_devices"]) == shape["active"] and not doc["warnings"], "gpuvirt devices/warnings"
    if not with_mdevctl:
        return "gpuvirt sees the whole tree"
    p = in_namespace(root, "mdevctl", "types", "--dumpjson")
    if p.returncode:
        sys.exit(f"mdevctl types failed: {p.stderr.strip()}")
    theirs = {}
    for entry in json.loads(p.stdout):
        for parent, types in entry.items():
            theirs[parent] = {k: v["available_instances"] for t in types for k, v in t.items()}
    assert theirs == ours, "gpuvirt and mdevctl disagree on the tree"
    return "gpuvirt and mdevctl list the same parents, types and available_instances"


PHASES = r"""
import io, json, sys, time
t0 = time.perf_counter()
import gpuvirt.cli.app, gpuvirt.cli.commands, typer._adapters   # what the console script imports
t1 = time.perf_counter()
from gpuvirt.model.catalog import load_catalog
load_catalog()
t2 = time.perf_counter()
from gpuvirt.host.scan import Scanner
s = Scanner(sys.argv[1])
pci = s.pci_devices(); parents = s.mdev_parents(); devices = s.mdev_devices(); vfs = s.vfio_vfs(pci)
t3 = time.perf_counter()
from gpuvirt.host.nvml import NvmlSession
NvmlSession().open()
t4 = time.perf_counter()
from gpuvirt.host.discover import discover
from gpuvirt.host.machine import Host
doc = discover(Host(sys.argv[1]))
t5 = time.perf_counter()
json.dumps(doc, indent=2, default=str)
t6 = time.perf_counter()
ms = lambda a, b: round((b - a) * 1000)
print(json.dumps({"imports (CLI, typer, pydantic)": ms(t0, t1), "catalog (YAML)": ms(t1, t2),
                  "sysfs scan": ms(t2, t3), "NVML open": ms(t3, t4), "discover() again (warm)": ms(t4, t5),
                  "JSON (indent=2)": ms(t5, t6)}))
"""


def profile_gpuvirt(root: Path) -> None:
    print("\n--- where gpuvirt's time goes ---")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    print(f"bare interpreter start: {(time.perf_counter() - t) * 1000:.0f} ms")
    # imports of the real command, as -X importtime reports them (top-level modules, cumulative)
    p = subprocess.run([sys.executable, "-X", "importtime", *gpuvirt_cmd(), "--root", str(root), "discover",
                        "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        self_us, cum_us, raw = line.split(":", 1)[1].split("|")
        # top-level imports are indented by one space; nested ones by more
        if self_us.strip().isdigit() and raw.startswith(" ") and not raw.startswith("  "):
            rows.append((int(cum_us), raw.strip()))
    print(f"imports of 'gpuvirt --root TREE discover --json' (top level, cumulative): "
          f"{sum(c for c, _ in rows) / 1000:.0f} ms")
    for cum, name in sorted(rows, reverse=True)[:8]:
        print(f"  {cum / 1000:7.1f} ms  {name}")
    # the phases of one run, timed without a profiler
    p = subprocess.run([sys.executable, "-c", PHASES, str(root)], capture_output=True, text=True)
    if p.returncode == 0:
        print("phases (one process, no profiler):")
        for k, v in json.loads(p.stdout).items():
            print(f"  {v:7d} ms  {k}")
    else:
        print(f"phase timing failed: {p.stderr.strip()[-300:]}")
    # which functions the scan spends its time in
    code = ("import cProfile, pstats, io, sys\n"
            "from gpuvirt.host.machine import Host\nfrom gpuvirt.host.discover import discover\n"
            "discover(Host(sys.argv[1]))\n"
            "pr = cProfile.Profile(); pr.enable(); discover(Host(sys.argv[1])); pr.disable()\n"
            "s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats('cumulative').print_stats(12)\n"
            "print('cProfile of discover() (warm; profiler overhead roughly doubles the times):')\n"
            "print(s.getvalue().split('ncalls', 1)[-1][:2500])\n")
    p = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
    print(p.stdout.rstrip() or p.stderr.strip())


def default_tmpdir() -> str | None:
    # 26,624 small files take seconds to create on a disk but well under one on tmpfs; reads of a warm tree
    # cost the same syscalls either way, and both commands read the same tree
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def filesystem_of(path: Path) -> str:
    best, fstype = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1].rstrip("/") + "/") and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parents", type=int, default=256)
    ap.add_argument("--types", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", metavar="DIR", help="build the tree in DIR and keep it")
    ap.add_argument("--tmpdir", metavar="DIR",
                    help="where to build the throw-away tree (default: /dev/shm when writable, else $TMPDIR); "
                         "pass e.g. /var/tmp to time an on-disk tree like the reference (ext4, warm cache)")
    ap.add_argument("--profile", action="store_true", help="also show where gpuvirt's time goes")
    ap.add_argument("--json", action="store_true", help="print the result as JSON as well")
    ap.add_argument("--gpuvirt", metavar="PATH",
                    help="console script to time (default: the one next to this Python). An editable install "
                         "(pip install -e) adds its import hook to every start-up; the README installs with "
                         "'pip install .', which is what operators run")
    args = ap.parse_args(argv)
    global GPUVIRT_EXE
    GPUVIRT_EXE = args.gpuvirt

    started = time.perf_counter()
    tmp = None
    if args.keep:
        root = Path(args.keep).absolute()
        if root.exists() and any(root.iterdir()):
            sys.exit(f"{root} is not empty")
    else:
        tmp = tempfile.mkdtemp(prefix="gpuvirt-bench-", dir=args.tmpdir or default_tmpdir())
        root = Path(tmp)
    try:
        t = time.perf_counter()
        shape = build_tree(root, args.parents, args.types)
        print(f"tree: {shape['parents']} parents x {shape['types']} types, {shape['active']} active + "
              f"{shape['defined']} defined devices, {shape['files']} files in {root} ({filesystem_of(root)}, "
              f"{time.perf_counter() - t:.1f} s to build)")
        skipped = mdevctl_unavailable()
        if skipped is None:
            probe = in_namespace(root, "mdevctl", "--version")
            if probe.returncode:
                skipped = f"cannot run mdevctl in a mount namespace: {probe.stderr.strip()[:200]}"
            else:
                version = probe.stdout.strip()
        print("check: " + check_outputs(root, shape, skipped is None))

        ours = time_runs([*gpuvirt_cmd(), "--root", str(root), "discover", "--json"], args.runs)
        theirs: list[float] | None = None
        if skipped is None:
            p = in_namespace(root, sys.executable, "-c", TIMER, str(args.runs), "mdevctl", "types", "--dumpjson")
            if p.returncode:
                sys.exit(f"timing mdevctl failed: {p.stderr.strip()}")
            theirs = json.loads(p.stdout)

        print(f"\nmedian of {args.runs} runs (wall clock, whole process, output to /dev/null):")
        print(f"  {'command':<44} {'median':>9} {'min':>9} {'max':>9}")
        print(f"  {'gpuvirt --root TREE discover --json':<44} {median(ours):8.3f}s {min(ours):8.3f}s "
              f"{max(ours):8.3f}s")
        result = {"tree": shape, "runs": args.runs, "gpuvirt_s": ours, "gpuvirt_median_s": median(ours),
                  "mdevctl_s": theirs, "mdevctl_median_s": None, "ratio": None, "target_met": None,
                  "mdevctl_skipped": skipped}
        if theirs is None:
            print(f"  {'mdevctl types --dumpjson':<44} {'skipped':>9}  ({skipped})")
            print("\ntarget (gpuvirt no slower than mdevctl): not evaluated, mdevctl was skipped")
        else:
            ratio = median(ours) / median(theirs)
            met = ratio <= 1.0
            result.update(mdevctl_median_s=median(theirs), ratio=ratio, target_met=met)
            print(f"  {'mdevctl types --dumpjson (' + version + ')':<44} {median(theirs):8.3f}s "
                  f"{min(theirs):8.3f}s {max(theirs):8.3f}s")
            print(f"\nratio gpuvirt / mdevctl = {ratio:.2f}")
            print("target (gpuvirt no slower than mdevctl): " + ("MET" if met else "NOT MET") +
                  f" - gpuvirt is {'faster' if ratio < 1 else 'slower'} by "
                  f"{abs(median(ours) - median(theirs)) * 1000:.0f} ms")
        if args.profile:
            profile_gpuvirt(root)
        if args.json:
            print(json.dumps(result))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
