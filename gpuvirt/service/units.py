"""systemd units for boot restore and hot-plug restore (``gpuvirt install-units``).

Boot order that works (nvidia-vgpu.md section 5, pain-points A2): the NVIDIA vGPU manager must be up
before VFs are enabled and vGPUs created, and all of that before libvirt starts VMs.  Instead of the
``sleep 30`` found in public deployment notes, the reconcile unit is ordered after the NVIDIA services and
before libvirt, and ``reconcile --wait`` polls (bounded) until the driver answers; ``gpuvirt watch``
restores a parent's devices when the driver registers it late (``MDEV_STATE=registered``).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import UsageError

UNIT_DIR = "etc/systemd/system"


ENV_REL = "etc/gpuvirt/units.env"


def _cmd(ctx: Context, *args: str) -> str:
    # the same settings the hook embeds (root/sim, config, and --db/--host-id where they differ from the
    # config file): the boot restore must read the inventory the hook and attach write.  A database URL with
    # a password does not go on the line (the watcher runs for the host's lifetime: every local user would
    # see it in ps); it comes from a root-only EnvironmentFile instead
    from gpuvirt.service.hook import exec_args, secret_on_line

    argv = exec_args(ctx)
    if secret_on_line(ctx):
        i = argv.index("--db")
        del argv[i:i + 2]
    # systemd expands %-specifiers in ExecStart, also inside quotes: a literal % is written %%
    return " ".join(shlex.quote(a) for a in argv + list(args)).replace("%", "%%")


def _env_line(ctx: Context) -> str:
    from gpuvirt.service.hook import secret_on_line

    path = str(Path(ctx.settings.root) / ENV_REL).replace("%", "%%")
    return f"EnvironmentFile={path}\n" if secret_on_line(ctx) else ""


def _env_file(ctx: Context) -> str:
    url = (ctx.settings.db_url or "").replace("\\", "\\\\").replace('"', '\\"')
    return f'# written by gpuvirt install-units: the inventory URL the units use (root-only)\nGPUVIRT_DB="{url}"\n'


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
# --boot: libvirt is not up yet, so unfinished VM moves (rebalance) are left for a later reconcile
{_env_line(ctx)}ExecStart={_cmd(ctx, "reconcile", "--yes", "--wait", "120", "--boot")}
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
{_env_line(ctx)}ExecStart={_cmd(ctx, "watch")}
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def install(ctx: Context, *, force: bool = False) -> dict[str, Any]:
    ctx.check_sim()  # units for a simulator that is not there would fail at every boot; write nothing
    from gpuvirt.service.hook import secret_on_line, write_file

    root = Path(ctx.settings.root)
    d = root / UNIT_DIR
    out = []
    changed = False
    files = [(d / "gpuvirt-reconcile.service", reconcile_unit(ctx), 0o644),
             (d / "gpuvirt-watch.service", watch_unit(ctx), 0o644)]
    if secret_on_line(ctx):
        files.append((root / ENV_REL, _env_file(ctx), 0o600))
    else:
        # units written before with a password: the file holding it goes, now that nothing loads it
        stale = root / ENV_REL
        if stale.exists() and "written by gpuvirt install-units" in stale.read_text(errors="replace"):
            try:
                stale.unlink()
            except OSError as exc:
                raise UsageError(f"cannot remove {stale}: {exc.strerror}") from exc
            changed = True
    for path, text, mode in files:
        current = path.read_text(errors="replace") if path.exists() else None
        if current is not None and not force and "gpuvirt" not in current:
            raise UsageError(f"{path} exists and was not written by gpuvirt (use --force)")
        out.append(str(path))
        if current == text and (path.stat().st_mode & 0o777) == mode:
            continue
        write_file(path, text, mode)
        changed = True
    return {"units": out, "changed": changed,
            "next": "systemctl daemon-reload && systemctl enable gpuvirt-reconcile.service gpuvirt-watch.service"}
