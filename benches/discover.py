#!/usr/bin/env python3
"""Benchmark: ``gpuvirt discover`` vs ``mdevctl types`` on a realistic vGPU host tree.

The tree is what a host with eight NVIDIA A10 boards in SR-IOV mode shows (../shared/reference/
nvidia-vgpu.md section 2.2, running-mdevctl.md section 3): 8 physical functions and 248 virtual functions
- 256 NVIDIA PCI functions with vendor, device, subsystem, class, driver and IOMMU group, SR-IOV attributes
and virtfnN / physfn links - plus the host's other PCI functions (bridges, NICs, NVMe, the GPUs' audio
functions). Every VF is a classic mdev parent with the A10's 23 vGPU types as the catalog describes them
(name, description, available_instances, device_api); half the VFs hold an active vGPU (its mdev_type and
iommu_group links) and every VF has a defined device under ``etc/mdevctl.d``. That is the work a real vGPU
host gives discovery: PCI GPU functions (so the model catalog is loaded) and NVIDIA devices (so NVML is
probed; here libnvidia-ml is absent, as on a host whose driver is not loaded).

Timed as whole processes, cold (a new process each run), output to /dev/null, in alternating order inside
one private mount namespace so that both see the same tree under the same load:

* JSON: ``gpuvirt --root TREE discover --json``  vs  ``mdevctl types --dumpjson``
* table: ``gpuvirt --root TREE discover``        vs  ``mdevctl types``

mdevctl 1.2.0 has no root prefix, so the tree is bound over ``/sys`` and ``/etc/mdevctl.d`` in the
namespace (root only). Each pair is run ``--runs`` times (default 11), alternating; the medians of CPU time
(user + system of the child, the latency measure the load of a shared machine disturbs least) and of wall
time are printed with their ratios and the load average. Targets: JSON <= 1.0x, table <= 1.5x, on CPU time.
``--profile`` adds where gpuvirt's time goes (``-X importtime``, phases, cProfile).
Run: ``.venv/bin/python benches/discover.py``.
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
# run inside the namespace: alternate the commands of each pair, record CPU and wall time per run
TIMER = r"""
import json, os, resource, subprocess, sys, time
runs = int(sys.argv[1]); pairs = json.loads(sys.argv[2])
def once(cmd):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN); t = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t; r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        sys.exit(f"{' '.join(cmd)} exited {rc}")
    return {"wall": wall, "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)}
out = {name: {"gpuvirt": [], "mdevctl": []} for name in pairs}
for name, (ours, theirs) in pairs.items():          # one untimed warm-up of each
    once(ours); once(theirs)
for i in range(runs):
    for name, (ours, theirs) in pairs.items():
        first, second = (("gpuvirt", ours), ("mdevctl", theirs)) if i % 2 == 0 else (("mdevctl", theirs), ("gpuvirt", ours))
        for who, cmd in (first, second):
            out[name][who].append(once(cmd))
print(json.dumps(out))
"""


# --- the tree -----------------------------------------------------------------------------------------------------
BOARDS = 8
VFS_PER_BOARD = 31          # of sriov_totalvfs 32 (the A10's)
VF_OFFSET = 4               # VF n at devfn PF+4+n (NVIDIA: function .4 onwards)


def pf_address(b: int) -> str:
    return f"0000:{0x41 + b:02x}:00.0"


def vf_address(b: int, n: int) -> str:
    devfn = VF_OFFSET + n
    return f"0000:{0x41 + b:02x}:{devfn // 8:02x}.{devfn % 8}"


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


class _Tree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        self.group = 16
        self.files = 0

    def pci_function(self, addr: str, vendor: int, device: int, sub_vendor: int, sub_device: int, klass: int,
                     driver: str | None) -> Path:
        d = self.root / PCI_ROOT / addr
        d.mkdir(parents=True)
        uevent = ((f"DRIVER={driver}\n" if driver else "") + f"PCI_CLASS={klass:X}\nPCI_ID={vendor:04X}:{device:04X}\n"
                  f"PCI_SUBSYS_ID={sub_vendor:04X}:{sub_device:04X}\nPCI_SLOT_NAME={addr}\n"
                  f"MODALIAS=pci:v{vendor:08X}d{device:08X}sv{sub_vendor:08X}sd{sub_device:08X}"
                  f"bc{klass >> 16:02X}sc{(klass >> 8) & 0xFF:02X}i{klass & 0xFF:02X}\n")
        for name, text in (("uevent", uevent), ("vendor", f"0x{vendor:04x}\n"), ("device", f"0x{device:04x}\n"),
                           ("subsystem_vendor", f"0x{sub_vendor:04x}\n"), ("subsystem_device", f"0x{sub_device:04x}\n"),
                           ("class", f"0x{klass:06x}\n"), ("numa_node", "0\n"), ("reset_method", "flr\n")):
            _file(d / name, text)
            self.files += 1
        _link(self.sys / "bus/pci/devices" / addr, d)
        if driver:
            drv = self.sys / "bus/pci/drivers" / driver
            drv.mkdir(parents=True, exist_ok=True)
            _link(d / "driver", drv)
            _link(drv / addr, d)
        g = self.sys / "kernel/iommu_groups" / str(self.group) / "devices"
        g.mkdir(parents=True)
        _link(d / "iommu_group", g.parent)
        _link(g / addr, d)
        self.group += 1
        return d


def _a10_types() -> list[dict[str, str]]:
    """The A10's vGPU types as the catalog describes them (what the simulator and gpuvirt's tests use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gpuvirt.model.catalog import load_catalog

    m = load_catalog().get("a10")
    return [{"id": t.sysfs_id, "name": m.vgpu.name_prefix + t.name, "description": t.description(),
             "fb": t.framebuffer_mib} for t in m.vgpu.types]


def build_tree(root: Path, boards: int = BOARDS, vfs: int = VFS_PER_BOARD) -> dict[str, int]:
    t = _Tree(root)
    for d in ("class/mdev_bus", "bus/mdev/devices", "bus/pci/devices", "kernel/iommu_groups", "devices/pci0000:00"):
        (t.sys / d).mkdir(parents=True, exist_ok=True)
    for base in ("etc/mdevctl.d/scripts.d", "usr/lib/mdevctl/scripts.d"):
        for sub in ("callouts", "notifiers"):
            (root / base / sub).mkdir(parents=True, exist_ok=True)
    # the rest of the host: root ports, NICs, NVMe, SATA, USB, BMC display (not NVIDIA)
    others = [("0000:00:00.0", 0x1022, 0x14a4, 0x060000, None), ("0000:00:07.1", 0x1022, 0x14a7, 0x060400, "pcieport"),
              ("0000:01:00.0", 0x15b3, 0x101d, 0x020000, "mlx5_core"), ("0000:01:00.1", 0x15b3, 0x101d, 0x020000,
                                                                          "mlx5_core"),
              ("0000:02:00.0", 0x144d, 0xa80a, 0x010802, "nvme"), ("0000:03:00.0", 0x1a03, 0x2000, 0x030000, "ast"),
              ("0000:04:00.0", 0x1022, 0x7901, 0x010601, "ahci"), ("0000:05:00.3", 0x1022, 0x15b6, 0x0c0330, "xhci_hcd")]
    for i in range(boards):
        others.append((f"0000:{0x30 + i:02x}:00.0", 0x1022, 0x14a5, 0x060400, "pcieport"))
    for addr, ven, dev, klass, drv in others:
        t.pci_function(addr, ven, dev, ven, 0x0001, klass, drv)
    types = _a10_types()
    active = 0
    for b in range(boards):
        pf = t.pci_function(pf_address(b), 0x10DE, 0x2236, 0x10DE, 0x1482, 0x030200, "nvidia")
        _file(pf / "sriov_totalvfs", "32\n")
        _file(pf / "sriov_numvfs", f"{vfs}\n", 0o644)
        _file(pf / "sriov_vf_device", "2236\n")
        t.files += 3
        for n in range(vfs):
            addr = vf_address(b, n)
            vf = t.pci_function(addr, 0x10DE, 0x2236, 0x10DE, 0x0000, 0x030200, "nvidia")
            _link(vf / "physfn", pf)
            _link(pf / f"virtfn{n}", vf)
            _link(t.sys / "class/mdev_bus" / addr, vf)
            holds = n % 2 == 0                      # every other VF holds a vGPU (A10-4Q)
            active_type = "nvidia-593" if holds else None
            for ty in types:
                tdir = vf / "mdev_supported_types" / ty["id"]
                (tdir / "devices").mkdir(parents=True)
                _file(tdir / "name", ty["name"] + "\n")
                _file(tdir / "description", ty["description"] + "\n")
                _file(tdir / "available_instances", "0\n" if holds else "1\n")
                _file(tdir / "device_api", "vfio-pci\n")
                _file(tdir / "create", "", 0o200)
                t.files += 5
            if holds:
                u = str(uuid.UUID(int=(0xA << 124) | (b << 8) | n, version=4))
                ddir = vf / u
                ddir.mkdir()
                _file(ddir / "remove", "", 0o200)
                gdir = t.sys / "kernel/iommu_groups" / str(t.group) / "devices"
                gdir.mkdir(parents=True)
                t.group += 1
                _link(ddir / "mdev_type", vf / "mdev_supported_types" / active_type)
                _link(ddir / "iommu_group", gdir.parent)
                _link(gdir / u, ddir)
                _link(vf / "mdev_supported_types" / active_type / "devices" / u, ddir)
                _link(t.sys / "bus/mdev/devices" / u, ddir)
                t.files += 1
                active += 1
            cfg = root / "etc/mdevctl.d" / addr
            cfg.mkdir()
            d = str(uuid.UUID(int=(0xD << 124) | (b << 8) | n, version=4))
            _file(cfg / d, json.dumps({"mdev_type": "nvidia-593", "start": "auto", "attrs": []}, indent=2) + "\n",
                  0o644)
            t.files += 1
    return {"nvidia_functions": boards * (1 + vfs), "pfs": boards, "vfs": boards * vfs, "other_functions": len(others),
            "parents": boards * vfs, "types": len(types), "active": active, "defined": boards * vfs,
            "files": t.files}


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
    nvidia = [d for d in doc["pci_gpus"] if d["vendor_id"] == "0x10de"]
    assert len(nvidia) == shape["nvidia_functions"] and {d["model"] for d in nvidia} == {"a10"}, "gpuvirt PCI"
    assert len(doc["sriov_pfs"]) == shape["pfs"], "gpuvirt SR-IOV"
    assert doc["nvml"]["available"] is False, "NVML must be probed and absent"
    if not with_mdevctl:
        return "gpuvirt sees the whole tree (catalog loaded, NVML probed)"
    p = in_namespace(root, "mdevctl", "types", "--dumpjson")
    if p.returncode:
        sys.exit(f"mdevctl types failed: {p.stderr.strip()}")
    theirs = {}
    for entry in json.loads(p.stdout):
        for parent, types in entry.items():
            theirs[parent] = {k: v["available_instances"] for t in types for k, v in t.items()}
    assert theirs == ours, "gpuvirt and mdevctl disagree on the tree"
    return ("gpuvirt and mdevctl list the same parents, types and available_instances; gpuvirt also reads "
            f"{shape['nvidia_functions']} NVIDIA PCI functions, SR-IOV and the catalog, and probes NVML")


PHASES = r"""
import gc, sys, time
cpu = time.process_time
marks = [("interpreter start (site, .pth files)", cpu())]
def mark(name): marks.append((name, cpu()))
import re                                                   # what the console script imports first
mark("'import re' (the console script's)")
from gpuvirt.cli import _settings
from gpuvirt.context import Context
from gpuvirt.service.discover import discover
mark("imports of the fast path (context, host, scan)")
gc.disable()                                                # as the fast path does
ctx = Context(_settings({"--root": sys.argv[1]}))
mark("settings, context")
doc = discover(ctx)
mark("discover() (cold: scan, catalog PCI index, NVML probe, document)")
from gpuvirt.cli.render import emit_json
import os
real_stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
emit_json(doc, compact=True)
sys.stdout.flush()
mark("JSON encoding and writing (1.2 MB)")
sys.stdout = real_stdout
# the same discovery again, step by step (warm: the code has run once)
from gpuvirt.model.catalog_cache import pci_index
sc = ctx.host.scanner()
pci = sc.pci_devices(); mark("  of which: PCI scan (warm)")
parents = sc.mdev_parents(physfn={d.address: d.physfn for d in pci}); mark("  of which: mdev parents and types (warm)")
sc.mdev_devices(); sc.vfio_vfs(pci); mark("  of which: mdev devices, vendor VFIO (warm)")
pci_index(); ctx.host.nvml_library_missing(); mark("  of which: catalog PCI index, NVML probe (warm)")
[p.to_dict() for p in parents]; mark("  of which: mdev parents as dicts (warm)")
import json
out = {}
prev = 0.0
for name, at in marks:
    out[name] = at - prev
    prev = at
print(json.dumps(out))
"""


def gpuvirt_python() -> str:
    """The interpreter of the console script being timed (its shebang), so that the profile looks at the
    same installation (a 'pip install .' venv, or the development one)."""
    try:
        with open(gpuvirt_cmd()[0], "rb") as fh:
            first = fh.readline().decode("utf-8", "replace").strip()
    except OSError:
        return sys.executable
    exe = first[2:].strip().split()[0] if first.startswith("#!") and first[2:].strip() else ""
    # pip writes '#!/bin/sh' and an exec line when the interpreter's path is too long for a shebang
    ok = os.path.basename(exe).startswith("python") and os.path.isabs(exe) and os.access(exe, os.X_OK)
    return exe if ok else sys.executable


STALE_BYTECODE = (
    "import importlib.util, os, pkgutil, gpuvirt\n"
    "stale = []\n"
    "for m in pkgutil.walk_packages(gpuvirt.__path__, 'gpuvirt.'):\n"
    "    spec = importlib.util.find_spec(m.name)\n"
    "    src = spec.origin if spec else None\n"
    "    if not src or not src.endswith('.py'):\n"
    "        continue\n"
    "    pyc = importlib.util.cache_from_source(src)\n"
    "    if not os.path.exists(pyc) or os.path.getmtime(pyc) < os.path.getmtime(src):\n"
    "        stale.append(m.name)\n"
    "print(len(stale), os.path.dirname(gpuvirt.__file__))\n")


def bytecode_warning() -> str | None:
    """A warning when the timed installation's modules have no up-to-date bytecode: each run then compiles
    them from source (about 20 ms here). 'pip install .' writes bytecode; an editable install gets it from
    the first run, unless PYTHONDONTWRITEBYTECODE is set (as on some development machines)."""
    # -I -B: this check itself must neither see the environment's settings nor write bytecode
    p = subprocess.run([gpuvirt_python(), "-I", "-B", "-c", STALE_BYTECODE], capture_output=True, text=True)
    if p.returncode or not p.stdout.strip():
        return None
    count, where = p.stdout.split(maxsplit=1)
    if count == "0":
        return None
    return (f"warning: {count} gpuvirt modules in {where.strip()} have no up-to-date bytecode, so every run "
            f"compiles them (PYTHONDONTWRITEBYTECODE and an editable install?); "
            f"'{gpuvirt_python()} -m compileall -q {where.strip()}' writes it")


def profile_gpuvirt(root: Path, runs: int = 5) -> None:
    print("\n--- where gpuvirt's time goes ---")
    # -I: neither the current directory nor the environment adds to sys.path, so the modules are those of
    # the installation the console script belongs to
    py = [gpuvirt_python(), "-I"]
    print(f"interpreter: {py[0]}")
    # imports of the real command, as -X importtime reports them (top-level modules, cumulative)
    p = subprocess.run([*py, "-X", "importtime", *gpuvirt_cmd(), "--root", str(root), "discover", "--json"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        self_us, cum_us, raw = line.split(":", 1)[1].split("|")
        # top-level imports are indented by one space; nested ones by more
        if self_us.strip().isdigit() and raw.startswith(" ") and not raw.startswith("  "):
            rows.append((int(cum_us), raw.strip()))
    print(f"imports of 'gpuvirt --root TREE discover --json' (-X importtime, top level, cumulative; the tool's "
          f"own overhead inflates them): {sum(c for c, _ in rows) / 1000:.0f} ms")
    for cum, name in sorted(rows, reverse=True)[:8]:
        print(f"  {cum / 1000:7.1f} ms  {name}")
    # the phases of the fast path, CPU time of cold processes without a profiler (median of a few)
    samples: list[dict[str, float]] = []
    for _ in range(runs):
        p = subprocess.run([*py, "-c", PHASES, str(root)], capture_output=True, text=True)
        if p.returncode:
            print(f"phase timing failed: {p.stderr.strip()[-300:]}")
            break
        samples.append(json.loads(p.stdout))
    if samples:
        print(f"phases of 'discover --json' (CPU time, cold processes, median of {len(samples)}; "
              f"load average {load_average()}):")
        for k in samples[0]:
            print(f"  {median([s[k] for s in samples]) * 1000:7.1f} ms  {k}")
    # which functions the scan spends its time in
    code = ("import cProfile, pstats, io, sys\n"
            "from gpuvirt.host.machine import Host\nfrom gpuvirt.host.discover import discover\n"
            "discover(Host(sys.argv[1]))\n"
            "pr = cProfile.Profile(); pr.enable(); discover(Host(sys.argv[1])); pr.disable()\n"
            "s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats('tottime').print_stats(12)\n"
            "print('cProfile of discover() (warm, by own time; profiler overhead roughly doubles the times):')\n"
            "print(s.getvalue().split('ncalls', 1)[-1][:2500])\n")
    p = subprocess.run([*py, "-c", code, str(root)], capture_output=True, text=True)
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


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def summarize(rows: list[dict[str, float]], key: str) -> float:
    return median([r[key] for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boards", type=int, default=BOARDS)
    ap.add_argument("--vfs", type=int, default=VFS_PER_BOARD)
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--keep", metavar="DIR", help="build the tree in DIR and keep it")
    ap.add_argument("--tmpdir", metavar="DIR",
                    help="where to build the throw-away tree (default: /dev/shm when writable, else $TMPDIR); "
                         "pass e.g. /var/tmp to time an on-disk tree (ext4, warm cache)")
    ap.add_argument("--profile", action="store_true", help="also show where gpuvirt's time goes")
    ap.add_argument("--json", action="store_true", help="print the result as JSON as well")
    ap.add_argument("--gpuvirt", metavar="PATH",
                    help="console script to time (default: the one next to this Python). An editable install "
                         "(pip install -e) adds its import hook to every start-up; the README installs with "
                         "'pip install .', which is what operators run")
    args = ap.parse_args(argv)
    global GPUVIRT_EXE
    GPUVIRT_EXE = args.gpuvirt
    if args.runs < 1 or args.boards < 1 or not 1 <= args.vfs <= 32:
        sys.exit("--runs and --boards must be at least 1, --vfs 1 to 32")

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
        shape = build_tree(root, args.boards, args.vfs)
        print(f"tree: {shape['nvidia_functions']} NVIDIA PCI functions ({shape['pfs']} A10 PFs + {shape['vfs']} VFs) "
              f"and {shape['other_functions']} others; {shape['parents']} mdev parents x {shape['types']} types, "
              f"{shape['active']} active + {shape['defined']} defined devices; {shape['files']} files in {root} "
              f"({filesystem_of(root)}, {time.perf_counter() - t:.1f} s to build)")
        skipped = mdevctl_unavailable()
        version = "?"
        if skipped is None:
            probe = in_namespace(root, "mdevctl", "--version")
            if probe.returncode:
                skipped = f"cannot run mdevctl in a mount namespace: {probe.stderr.strip()[:200]}"
            else:
                version = probe.stdout.strip()
        print("check: " + check_outputs(root, shape, skipped is None))
        stale = bytecode_warning()
        if stale:
            print(stale)
        ours_json = [*gpuvirt_cmd(), "--root", str(root), "discover", "--json"]
        ours_table = [*gpuvirt_cmd(), "--root", str(root), "discover"]
        pairs = {"json": (ours_json, ["mdevctl", "types", "--dumpjson"]),
                 "table": (ours_table, ["mdevctl", "types"])}
        result: dict = {"tree": shape, "runs": args.runs, "mdevctl_skipped": skipped, "load_before": load_average()}
        if skipped is not None:
            print(f"mdevctl: skipped ({skipped}); only gpuvirt is timed")
            pairs = {k: (v[0], [sys.executable, "-c", "pass"]) for k, v in pairs.items()}
            p = subprocess.run([sys.executable, "-c", TIMER, str(args.runs), json.dumps(pairs)],
                               capture_output=True, text=True, timeout=1800)
        else:
            p = in_namespace(root, sys.executable, "-c", TIMER, str(args.runs), json.dumps(pairs))
        if p.returncode:
            sys.exit(f"timing failed: {p.stderr.strip()}")
        timings = json.loads(p.stdout)
        result["load_after"] = load_average()
        print(f"\n{args.runs} alternating runs of each pair, cold processes, output to /dev/null; medians "
              f"(load average before {result['load_before']}, after {result['load_after']}, "
              f"{os.cpu_count()} CPUs):")
        targets = {"json": 1.0, "table": 1.5}
        met_all = True
        for name, (ours, theirs) in pairs.items():
            g, m = timings[name]["gpuvirt"], timings[name]["mdevctl"]
            row = {"gpuvirt_cpu_s": summarize(g, "cpu"), "gpuvirt_wall_s": summarize(g, "wall"),
                   "mdevctl_cpu_s": summarize(m, "cpu"), "mdevctl_wall_s": summarize(m, "wall"),
                   "gpuvirt_command": " ".join(ours), "mdevctl_command": " ".join(theirs)}
            print(f"  {name}:")
            print(f"    {'$ ' + ' '.join(ours):<70} cpu {row['gpuvirt_cpu_s'] * 1000:6.0f} ms  "
                  f"wall {row['gpuvirt_wall_s'] * 1000:6.0f} ms")
            if skipped is None:
                print(f"    {'$ ' + ' '.join(theirs) + ' (' + version + ')':<70} cpu {row['mdevctl_cpu_s'] * 1000:6.0f} ms  "
                      f"wall {row['mdevctl_wall_s'] * 1000:6.0f} ms")
                row["ratio_cpu"] = row["gpuvirt_cpu_s"] / row["mdevctl_cpu_s"]
                row["ratio_wall"] = row["gpuvirt_wall_s"] / row["mdevctl_wall_s"]
                row["target"] = targets[name]
                row["target_met"] = row["ratio_cpu"] <= targets[name]
                met_all &= row["target_met"]
                print(f"    ratio gpuvirt / mdevctl: cpu {row['ratio_cpu']:.2f}, wall {row['ratio_wall']:.2f}  "
                      f"(target <= {targets[name]:.1f} on cpu: {'MET' if row['target_met'] else 'NOT MET'})")
            result[name] = row
        if skipped is None:
            print("\ntargets (JSON <= 1.0x, table <= 1.5x, CPU time): " + ("MET" if met_all else "NOT MET"))
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
