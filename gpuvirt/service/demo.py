"""``gpuvirt demo``: the main job end to end on a fresh simulated host and a temporary inventory.

discover -> create-profile -> apply -> status -> attach a vGPU to a VM -> libvirt XML -> simulated reboot ->
the installed libvirt hook's ``prepare`` (a real process, empty environment, XML on stdin) recreates the
device -> capacity report.  Every step goes through the same services the CLI uses.

``--dir DIR`` may name a new or empty directory, or one a previous demo ran in: the demo then removes
what that run created and starts afresh.  Any other non-empty directory is refused, never cleared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

from gpuvirt.context import Context, resolve_settings
from gpuvirt.errors import GpuvirtError, UsageError

Emit = Callable[[str, Any], None]

DEMO_GPUS = ["a100-40gb", "a2"]
VM = "demo-vm"
VM_UUID = "5e1c0c8e-1d1f-4a53-9a3b-2f1b8c6d9e01"
HOST_ID = "demo-host"
SEED = "demo"
MARK = ".gpuvirt-demo"
# everything a demo creates at the top of its directory: the simulated host's root (sysfs, /etc, /var with
# the inventory, ...), the simulator's state, the domain XML and the mark
CREATED = (MARK, ".gpuvirt-sim", "sys", "proc", "etc", "usr", "var", f"{VM}.xml")


def domain_xml(name: str, uuid: str) -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='GiB'>8</memory>
  <vcpu placement='static'>4</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <graphics type='vnc' port='-1' autoport='yes'/>
  </devices>
</domain>
"""


def _previous_demo(root: Path) -> bool:
    if (root / MARK).is_file():
        return True
    # demos from before the mark existed: the simulator seed and host id only the demo writes
    try:
        seed = json.loads((root / ".gpuvirt-sim/state.json").read_text()).get("seed")
        cfg = (root / "etc/gpuvirt/gpuvirt.toml").read_text()
    except (OSError, ValueError, AttributeError):
        return False
    return seed == SEED and cfg.strip() == f'host_id = "{HOST_ID}"'


def prepare(root: Path) -> None:
    """Make ``root`` ready for a fresh demo.

    A re-run must not keep the previous run's inventory: its instances would point at devices the rebuilt
    simulated host no longer has, and the hook would find the vGPU slots taken.
    """
    if root.exists() and not root.is_dir():
        raise UsageError(f"demo: {root} exists and is not a directory")
    if not root.is_dir() or not any(root.iterdir()):
        return
    if not _previous_demo(root):
        raise UsageError(f"demo: {root} is not empty and holds no previous demo; choose a new or empty directory")
    for name in CREATED:
        p = root / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        except OSError as exc:
            raise GpuvirtError(f"demo: cannot remove the previous demo's {p}: {exc.strerror or exc}") from None


def run(directory: str | None, emit: Emit, *, keep: bool = False) -> dict[str, Any]:
    from gpuvirt.service import apply as apply_svc
    from gpuvirt.service import attach as attach_svc
    from gpuvirt.service import hook as hook_svc
    from gpuvirt.service import profiles as profile_svc
    from gpuvirt.service import reconcile as reconcile_svc
    from gpuvirt.service import simulator
    from gpuvirt.service.discover import discover

    tmp = None
    if directory is None:
        # tmpfs when available: a simulated host is thousands of tiny sysfs files
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        tmp = tempfile.mkdtemp(prefix="gpuvirt-demo-", dir=shm)
        directory = os.path.join(tmp, "host")
    root = Path(directory).absolute()
    summary: dict[str, Any] = {"dir": str(root)}

    prepare(root)
    # marked before anything else, so that a run that fails half-way is still recognised and cleared
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / MARK).write_text("gpuvirt demo ran here; `gpuvirt demo --dir` on this directory removes what it "
                                 "created and starts afresh\n")
    except OSError as exc:
        raise GpuvirtError(f"demo: cannot use {root}: {exc.strerror or exc}") from None
    # force: prepare() has vetted the directory, and without it init_sim would refuse it for holding the mark
    emit("sim init", simulator.init(str(root), DEMO_GPUS, seed=SEED, force=True))
    # like a real host: settings live in <root>/etc/gpuvirt/gpuvirt.toml, so the libvirt hook (run with an
    # empty environment) sees the same host id and inventory
    cfg = root / "etc/gpuvirt/gpuvirt.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f'host_id = "{HOST_ID}"\n')
    settings = resolve_settings(sim=str(root), env={})
    with Context(settings) as ctx:
        emit("discover", discover(ctx))
        emit("create-profile", profile_svc.create_profile(
            ctx, "demo-mig", mig=["3g.20gb=1", "2g.10gb=1", "1g.5gb=2"], model="a100-40gb",
            description="demo: balanced A100 layout", replace=True))
        emit("create-profile", profile_svc.create_profile(
            ctx, "demo-vgpu", vgpu=["A2-2Q=8"], model="a2", description="demo: 8 x A2-2Q", replace=True))
        emit("plan", apply_svc.plan(ctx, "demo-mig", "a100-40gb"))
        emit("apply", apply_svc.apply(ctx, "demo-mig", "a100-40gb").to_dict())
        emit("apply", apply_svc.apply(ctx, "demo-vgpu", "a2").to_dict())
        emit("apply again (idempotent)", apply_svc.apply(ctx, "demo-mig", "a100-40gb").to_dict())
        emit("status", reconcile_svc.status(ctx))
        handoffs = attach_svc.attach(ctx, VM, vgpu="A2-2Q", tenant="acme", vm_uuid=VM_UUID)
        h = handoffs[0]
        emit("attach", h.to_json())
        from gpuvirt.vmm.libvirt import insert_hostdev

        xml = insert_hostdev(domain_xml(VM, VM_UUID), h.libvirt_xml())
        xml_path = root / f"{VM}.xml"
        xml_path.write_text(xml)
        emit("libvirt domain XML", xml)
        installed = hook_svc.install(ctx, force=True)
        emit("hook install", installed)

    emit("sim reboot", simulator.reboot(str(root)))
    present = (root / "sys/bus/mdev/devices" / h.uuid).exists() if h.kind == "mdev" else None
    emit("after reboot", {"device": h.uuid or h.pci_address, "present": present})
    # exactly what libvirtd does: argv <domain> prepare begin -, XML on stdin, (almost) empty environment
    proc = subprocess.run([installed["path"], VM, "prepare", "begin", "-"], input=xml.encode(),
                          capture_output=True, env={}, timeout=120)
    present_after = (root / "sys/bus/mdev/devices" / h.uuid).exists() if h.kind == "mdev" else None
    emit("hook prepare", {"exit": proc.returncode, "stderr": proc.stderr.decode(errors="replace").strip(),
                          "device": h.uuid or h.pci_address, "present": present_after})
    if proc.returncode != 0 or present_after is False:
        raise GpuvirtError(f"demo: the hook did not restore {h.uuid or h.pci_address}: "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    with Context(settings) as ctx:
        rec = reconcile_svc.reconcile(ctx)  # the boot unit's job: the MIG layout comes back too
        emit("reconcile", rec)
        from gpuvirt.service.report import report

        emit("report", report(ctx))
        summary["status"] = reconcile_svc.status(ctx)
    summary["hook_exit"] = proc.returncode
    if tmp is not None and not keep:
        shutil.rmtree(tmp, ignore_errors=True)
        summary["removed"] = True
    return summary
