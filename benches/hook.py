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
* release: ``release end destroyed`` for that domain (persistent allocation: recorded as stopped).

Median of ``--runs`` (default 15) each, after one untimed warm-up, printed side by side in milliseconds.
``--importtime`` adds the heaviest imports of one no-op run (``python -X importtime``).
Run: ``.venv/bin/python benches/hook.py``.
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


def timed(cmd: list[str], stdin: bytes | None, runs: int, before=None, env: dict | None = None) -> list[float]:
    def once() -> float:
        if before is not None:
            before()
        t = time.perf_counter()
        p = subprocess.run(cmd, input=stdin, capture_output=True, env={} if env is None else env)
        dt = time.perf_counter() - t
        if p.returncode:
            sys.exit(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.decode(errors='replace').strip()}")
        return dt

    once()  # warm-up: page cache, .pyc files
    return [once() for _ in range(runs)]


def gpuvirt(root: Path, *args: str) -> str:
    exe = str(Path(sys.executable).with_name("gpuvirt"))
    p = subprocess.run([exe, "--sim", str(root), *args], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"gpuvirt {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--importtime", action="store_true", help="show the heaviest imports of a no-op run")
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
        hook_python = Path(hook).read_text().splitlines()[-1].split()[1]  # "exec <python> -I -m gpuvirt ..."
        with_dev = live_xml(VM, [uuid])
        plain = live_xml("plain-vm", [])

        from gpuvirt.sim.control import open_sim, reboot

        sim = open_sim(root)
        results: list[tuple[str, list[float]]] = []
        results.append(("python3 -c pass (hook's interpreter, -I)",
                        timed([hook_python, "-I", "-c", "pass"], None, opts.runs)))
        if shutil.which("python3"):
            results.append(("python3 -c pass (first on PATH)",
                            timed(["python3", "-c", "pass"], None, opts.runs, env=dict(os.environ))))
        results.append(("hook no-op: no <hostdev> (prepare)", timed([hook, "plain-vm", "prepare", "begin", "-"],
                                                                    plain, opts.runs)))
        results.append(("hook prepare, mdev exists", timed([hook, VM, "prepare", "begin", "-"], with_dev,
                                                           opts.runs)))
        results.append(("hook prepare after reboot (recreate)", timed([hook, VM, "prepare", "begin", "-"], with_dev,
                                                                      opts.runs, before=lambda: reboot(sim))))
        results.append(("hook release end destroyed", timed([hook, VM, "release", "end", "destroyed"], with_dev,
                                                             opts.runs)))
        floor = statistics.median(results[0][1])
        print(f"hook latency, median of {opts.runs} runs (ms); simulated host on {base or tempfile.gettempdir()}")
        print(f"{'case':44} {'median':>8} {'min':>8} {'max':>8} {'vs floor':>9}")
        for name, ts in results:
            med = statistics.median(ts)
            print(f"{name:44} {med * 1e3:8.1f} {min(ts) * 1e3:8.1f} {max(ts) * 1e3:8.1f} "
                  f"{med / floor:8.2f}x")
        if opts.importtime:
            p = subprocess.run([hook_python, "-I", "-X", "importtime", "-m", "gpuvirt", "--sim", str(root), "hook",
                                "libvirt-qemu", "plain-vm", "prepare", "begin", "-"], input=plain,
                               capture_output=True, env={})
            rows = []
            for line in p.stderr.decode().splitlines():
                if line.startswith("import time:") and "|" in line and "cumulative" not in line:
                    _self, cum, name = (x.strip() for x in line[len("import time:"):].split("|"))
                    rows.append((int(cum), name))
            print("\nheaviest imports of one no-op run (cumulative us):")
            for cum, name in sorted(rows, reverse=True)[:12]:
                print(f"  {cum:8d}  {name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
