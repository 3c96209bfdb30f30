#!/usr/bin/env python3
"""Benchmark: latency of the installed libvirt qemu hook, next to the cost of starting Python at all.

libvirtd runs ``/etc/libvirt/hooks/qemu.d/*`` synchronously for every start and stop of every domain, so the
hook's latency is added to each of them.  Measured, as whole processes with an empty environment and the
domain XML on stdin (exactly how libvirtd runs it), on a simulated host on tmpfs:

* ``python3 -c pass``: the interpreter the hook script execs, started the same way (``-I``); the floor;
* ``python3 -c pass`` found on PATH, for reference only (it may be a pyenv shim or another interpreter);
* no-op: ``<vm> prepare begin -`` for a domain with no ``<hostdev>`` at all (the case of most VMs);
* exists: ``prepare`` for a domain whose gpuvirt mdev exists (inventory read, nothing to create);
* recreate: ``prepare`` for the same domain after ``gpuvirt sim reboot`` (SR-IOV VFs re-enabled, mdev
  recreated with the same UUID); the reboot before each run is not timed;
* release: ``release end destroyed`` for that domain (persistent allocation: recorded as stopped);
* the peer: ``python3 -I -c 'import sqlalchemy.orm'`` with the hook's interpreter, the yardstick of issue 14
  (prepare and release at most 0.75x of it; the no-op at most 1.1x the floor);
* with ``--full``, prepare (both cases) and release again on the full path (``run_hook(..., fast=False)``:
  SQLAlchemy, discovery, reconcile), i.e. the hook as it was before its fast path, in the same run.

Median of ``--runs`` (default 15) each, after one untimed warm-up, printed side by side in milliseconds: wall
time, and the CPU time the process and its children used (user + system, from ``os.wait4``), which a loaded
machine disturbs less.  The ratios at the end are of medians measured in this same run.  ``--json`` prints
the same figures as one JSON object instead.  ``--importtime`` adds the heaviest imports of one no-op run and
of one ``prepare`` (device exists) run (``python -X importtime``).
Run: ``.venv/bin/python benches/hook.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VM = "bench-vm"
VM_UUID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"


def live_xml(name: str, mdev_uuids: list[str]) -> bytes:
    """Domain XML as libvirtd passes it at prepare: live ids, aliases and addresses, defaults explicit."""
    hostdevs = "".join(f"""
    <hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci' display='off'>
      <source>
        <address uuid='{u}'/>
      </source>
      <alias name='hostdev{i}'/>
      <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x{i:x}'/>
    </hostdev>""" for i, u in enumerate(mdev_uuids))
    return f"""<domain type='kvm' id='7'>
  <name>{name}</name>
  <uuid>{VM_UUID}</uuid>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/{name}.qcow2' index='1'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'>
      <alias name='pcie.0'/>
    </controller>{hostdevs}
    <memballoon model='virtio'>
      <alias name='balloon0'/>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </memballoon>
  </devices>
</domain>
""".encode()


def timed(cmd: list[str], stdin: bytes | None, runs: int, before=None,
          env: dict | None = None) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of each of ``runs`` runs.  cpu: user + system time of the process, read as the growth of
    this process's RUSAGE_CHILDREN (the hook script is /bin/sh exec'ing python, so one process)."""
    def once() -> tuple[float, float]:
        if before is not None:
            before()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        p = subprocess.run(cmd, input=stdin, capture_output=True, env={} if env is None else env)
        dt = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode:
            sys.exit(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.decode(errors='replace').strip()}")
        return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)

    once()  # warm-up: page cache, .pyc files
    return [once() for _ in range(runs)]


def gpuvirt(root: Path, *args: str) -> str:
    exe = str(Path(sys.executable).with_name("gpuvirt"))
    p = subprocess.run([exe, "--sim", str(root), *args], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"gpuvirt {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


PEER = "python3 -I -c 'import sqlalchemy.orm' (the peer)"
TARGETS = {  # issue 14 item 4: case -> (yardstick, most allowed)
    "noop": ("floor", 1.1), "exists": ("peer", 0.75), "recreate": ("peer", 0.75), "release": ("peer", 0.75)}


def _importtime(cmd: list[str], stdin: bytes) -> list[tuple[int, str]]:
    p = subprocess.run(cmd, input=stdin, capture_output=True, env={})
    rows = []
    for line in p.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _self, cum, name = (x.strip() for x in line[len("import time:"):].split("|"))
            rows.append((int(cum), name))
    return sorted(rows, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--importtime", action="store_true",
                    help="show the heaviest imports of a no-op run and of a prepare run")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--full", action="store_true",
                    help="also time prepare and release on the full path (hook_main.run_hook(..., fast=False): "
                         "SQLAlchemy, discovery, reconcile), the hook as it was before the fast path")
    opts = ap.parse_args()

    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    tmp = Path(tempfile.mkdtemp(prefix="gpuvirt-bench-hook-", dir=base))
    root = tmp / "host"
    try:
        subprocess.run([str(Path(sys.executable).with_name("gpuvirt")), "sim", "init", str(root), "--gpu", "a2",
                        "--seed", "bench"], check=True, capture_output=True)
        uuid = json.loads(gpuvirt(root, "attach", VM, "--vgpu", "A2-2Q", "--vm-uuid", VM_UUID,
                                  "--format", "json"))["uuid"]
        gpuvirt(root, "hook", "install")
        hook = str(root / "etc/libvirt/hooks/qemu.d/50-gpuvirt")
        exec_line = Path(hook).read_text().splitlines()[-1].split()  # "exec <python> -I -m gpuvirt ... hook ..."
        hook_python, hook_opts = exec_line[1], exec_line[2:exec_line.index("hook")]
        with_dev = live_xml(VM, [uuid])
        plain = live_xml("plain-vm", [])

        from gpuvirt.sim.control import open_sim, reboot

        sim = open_sim(root)
        cases: list[tuple[str, str, list[tuple[float, float]]]] = []
        cases.append(("floor", "python3 -I -c pass (hook's interpreter)",
                      timed([hook_python, "-I", "-c", "pass"], None, opts.runs)))
        if shutil.which("python3"):
            cases.append(("path", "python3 -c pass (first on PATH)",
                          timed(["python3", "-c", "pass"], None, opts.runs, env=dict(os.environ))))
        cases.append(("peer", PEER, timed([hook_python, "-I", "-c", "import sqlalchemy.orm"], None, opts.runs)))
        cases.append(("noop", "hook no-op: no <hostdev> (prepare)",
                      timed([hook, "plain-vm", "prepare", "begin", "-"], plain, opts.runs)))
        cases.append(("exists", "hook prepare, mdev exists", timed([hook, VM, "prepare", "begin", "-"], with_dev,
                                                                    opts.runs)))
        cases.append(("recreate", "hook prepare after reboot (recreate)",
                      timed([hook, VM, "prepare", "begin", "-"], with_dev, opts.runs, before=lambda: reboot(sim))))
        cases.append(("release", "hook release end destroyed", timed([hook, VM, "release", "end", "destroyed"],
                                                                      with_dev, opts.runs)))
        if opts.full:
            full = [hook_python, "-I", "-c", "import sys; from gpuvirt.cli.hook_main import run_hook; "
                    "sys.exit(run_hook(sys.argv[2:], sim=sys.argv[1], fast=False))", str(root)]
            cases.append(("full-exists", "full path: prepare, mdev exists",
                          timed(full + [VM, "prepare", "begin", "-"], with_dev, opts.runs)))
            cases.append(("full-recreate", "full path: prepare after reboot",
                          timed(full + [VM, "prepare", "begin", "-"], with_dev, opts.runs,
                                before=lambda: reboot(sim))))
            cases.append(("full-release", "full path: release end destroyed",
                          timed(full + [VM, "release", "end", "destroyed"], with_dev, opts.runs)))
        med = {key: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts))
               for key, _name, ts in cases}
        ratios = {}
        targets = dict(TARGETS)
        if opts.full:
            targets.update({f"full-{k}": v for k, v in TARGETS.items() if k != "noop"})
        for key, (yard, most) in targets.items():
            ratios[key] = {"vs": yard, "wall": med[key][0] / med[yard][0], "cpu": med[key][1] / med[yard][1],
                           "target": most}
        load = os.getloadavg()
        imports = {}
        if opts.importtime:
            cmd = [hook_python, "-X", "importtime", *hook_opts, "hook", "libvirt-qemu"]
            imports["noop"] = _importtime(cmd + ["plain-vm", "prepare", "begin", "-"], plain)[:12]
            imports["exists"] = _importtime(cmd + [VM, "prepare", "begin", "-"], with_dev)[:20]
        if opts.json:
            print(json.dumps({"runs": opts.runs, "loadavg": load, "python": hook_python,
                              "cases": {key: {"name": name, "wall_ms": [round(w * 1e3, 2) for w, _ in ts],
                                              "cpu_ms": [round(c * 1e3, 2) for _, c in ts],
                                              "median_wall_ms": round(med[key][0] * 1e3, 2),
                                              "median_cpu_ms": round(med[key][1] * 1e3, 2)}
                                        for key, name, ts in cases},
                              "ratios": ratios, "imports": imports}, indent=1))
            return
        floor = med["floor"][0]
        print(f"hook latency, median of {opts.runs} runs (ms); simulated host on {base or tempfile.gettempdir()}; "
              f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"{'case':48} {'median':>8} {'min':>8} {'max':>8} {'cpu':>8} {'vs floor':>9}")
        for key, name, ts in cases:
            walls = [w for w, _ in ts]
            print(f"{name:48} {med[key][0] * 1e3:8.1f} {min(walls) * 1e3:8.1f} {max(walls) * 1e3:8.1f} "
                  f"{med[key][1] * 1e3:8.1f} {med[key][0] / floor:8.2f}x")
        print("\nratios of this run (issue 14: prepare/release <= 0.75x the peer, no-op <= 1.1x the floor):")
        for key, r in ratios.items():
            name = next(n for k, n, _ in cases if k == key)
            ok = "ok" if r["wall"] <= r["target"] else "OVER"
            print(f"  {name:46} {r['wall']:5.2f}x wall  {r['cpu']:5.2f}x cpu  vs {r['vs']:5} "
                  f"(target <= {r['target']}x: {ok})")
        for key, rows in imports.items():
            print(f"\nheaviest imports of one {key} run (cumulative us):")
            for cum, name in rows:
                print(f"  {cum:8d}  {name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
