"""systemd units for boot restore and hot-plug restore (``gpuvirt install-units``).

Boot order that works (nvidia-vgpu.md section 5, pain-points A2): the NVIDIA vGPU manager must be up
before VFs are enabled and vGPUs created, and all of that before libvirt starts VMs.  Instead of the
``sleep 30`` found in public deployment notes, the reconcile unit is ordered after the NVIDIA services and
before libvirt, and ``reconcile --wait`` polls (bounded) until the driver answers; ``gpuvirt watch``
restores a parent's devices when the driver registers it late (``MDEV_STATE=registered``).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import UsageError

UNIT_DIR = "etc/systemd/system"


def _cmd(ctx: Context, *args: str) -> str:
    s = ctx.settings
    base = [sys.executable, "-I", "-m", "gpuvirt"]
    if s.sim_dir is not None:
        base += ["--sim", str(s.sim_dir)]
    elif str(s.root) != "/":
        base += ["--root", str(s.root)]
    if s.config_found:
        base += ["--config", str(s.config_path)]
    return " ".join(shlex.quote(a) for a in base + list(args))


def reconcile_unit(ctx: Context) -> str:
    return f"""[Unit]
Description=gpuvirt: restore MIG layouts, SR-IOV VFs and vGPUs recorded in the inventory
Documentation=file://{Path(__file__).resolve().parents[2] / 'docs' / 'hook-guide.md'}
# the vGPU manager registers vGPU types; VFs and vGPUs can only be restored after it
After=nvidia-persistenced.service nvidia-vgpud.service nvidia-vgpu-mgr.service nvidia-fabricmanager.service
After=systemd-modules-load.service local-fs.target network-online.target
# (default dependencies stay on: they order this after sysinit.target, where udev coldplug has loaded the
# GPU drivers and created the PCI devices this unit restores)
Wants=nvidia-vgpu-mgr.service
# VMs must find their devices: run before libvirt and the cloud agents that start VMs
Before=libvirtd.service virtqemud.service nova-compute.service pve-guests.service

[Service]
Type=oneshot
RemainAfterExit=yes
# --wait polls (bounded) for the NVIDIA driver instead of pausing a fixed time
ExecStart={_cmd(ctx, "reconcile", "--yes", "--wait", "120")}
TimeoutStartSec=600

[Install]
WantedBy=multi-user.target
"""


def watch_unit(ctx: Context) -> str:
    return f"""[Unit]
Description=gpuvirt: restore devices when a GPU parent (re)appears (udev)
After=gpuvirt-reconcile.service systemd-udevd.service
# Wants, not Requires: when the boot restore fails (a driver that registers late), the watcher is exactly
# what must still run to restore the parent once it appears
Wants=gpuvirt-reconcile.service

[Service]
Type=simple
ExecStart={_cmd(ctx, "watch")}
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def install(ctx: Context, *, force: bool = False) -> dict[str, Any]:
    ctx.check_sim()  # units for a simulator that is not there would fail at every boot; write nothing
    d = Path(ctx.settings.root) / UNIT_DIR
    out = []
    for name, text in (("gpuvirt-reconcile.service", reconcile_unit(ctx)), ("gpuvirt-watch.service", watch_unit(ctx))):
        path = d / name
        if path.exists() and not force and "gpuvirt" not in path.read_text(errors="replace"):
            raise UsageError(f"{path} exists and was not written by gpuvirt (use --force)")
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
        out.append(str(path))
    return {"units": out, "next": "systemctl daemon-reload && systemctl enable gpuvirt-reconcile.service "
                                  "gpuvirt-watch.service"}
