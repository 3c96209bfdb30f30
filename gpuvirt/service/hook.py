"""The libvirt qemu hook: make a VM's gpuvirt devices exist at ``prepare``, free transient ones at ``release``.

libvirtd runs ``/etc/libvirt/hooks/qemu.d/*`` synchronously with argv ``<domain> <operation> <sub-op>
<extra>`` and the domain XML on stdin (``../shared/reference/libvirt-vmm.md`` section 3).  Observed on
libvirt 9.0.0: when a hook fails ``prepare``, libvirt still calls ``stopped`` and ``release`` - so release
must be idempotent and correct even when prepare never completed.  A hook must never call back into
libvirt (deadlock), so everything here works from the XML, sysfs and the inventory.

Installing: ``gpuvirt hook install`` writes ``<root>/etc/libvirt/hooks/qemu.d/50-gpuvirt``, a small shell
script that embeds the root / simulator / config it was installed for, because libvirt runs hooks with an
(almost) empty environment.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import ConflictError, GpuvirtError, UsageError
from gpuvirt.inventory.kinds import MDEV, VF, VFIO_VGPU

HOOK_REL = "etc/libvirt/hooks/qemu.d/50-gpuvirt"


def _owned(uow: Any, host_id: str, hostdevs: list[Any]) -> list[Any]:
    out = []
    for h in hostdevs:
        if h.kind == "mdev":
            inst = uow.instance_by_mdev(host_id, h.uuid)
        else:
            inst = uow.instance_by_parent(host_id, h.address, [VFIO_VGPU, VF])
        if inst is not None:
            out.append(inst)
    return out


def prepare(ctx: Context, domain: str, dom: Any) -> list[str]:
    """Allocate and, where missing, recreate every gpuvirt device of the domain.  Raises on refusal."""
    from gpuvirt.service import hostview
    from gpuvirt.service.reconcile import reconcile

    host_id = ctx.settings.host_id
    notes: list[str] = []
    with ctx.inventory.unit(write=True, action=f"hook prepare {domain}") as uow:
        owned = _owned(uow, host_id, dom.hostdevs)
        if not owned:
            return notes
        allocs = []
        for inst in owned:
            a = inst.allocation
            if a is not None and a.vm_name != domain and not (dom.uuid and a.vm_uuid == dom.uuid):
                raise ConflictError(f"{inst.label} is allocated to VM {a.vm_name}, not {domain}")
            if a is None:
                # a device named in the XML by hand: hold it for this run of the VM only
                a = uow.allocate(inst, vm_name=domain, vm_uuid=dom.uuid, tenant=None, persistent=False)
                uow.event("hook-allocate", target=domain, detail={"instance": inst.id}, actor="libvirt-hook")
            elif a.vm_uuid is None and dom.uuid:
                # learn the VM's UUID (attach is often run before the domain is defined): release then also
                # finds the allocation after a rename, and 'attach --format qemu' can print -uuid
                a.vm_uuid = dom.uuid
            allocs.append(a)
        ids = [i.id for i in owned]
        gpu_addrs = {i.gpu.address for i in owned}
        devices = [(i.kind, i.mdev_uuid, i.parent, i.type_id) for i in owned]
        # what reconcile would forget rather than restore: created by a transient attach, allocated transiently
        transient = {i.id: i.label for i, a in zip(owned, allocs) if not i.persistent and not a.persistent}
    # the usual start: every device is there.  One sysfs lookup per device settles it, without the full
    # discovery (a walk over every GPU's sysfs plus NVML initialisation, which a start does not need)
    missing: list[int] = []
    if not all(_quick_present(ctx, *d) for d in devices):
        view = hostview.snapshot(ctx)
        missing = [i for i in ids if not _present(ctx, view, i)]
    gone = [transient[i] for i in missing if i in transient]
    if gone:
        # A transient allocation ends when its VM stops; after a host restart without a clean shutdown its
        # device is gone, and the boot restore forgets such rows instead of recreating them.  Refuse with the
        # reason and change nothing: the release libvirt calls next frees the allocation.
        raise ConflictError(f"transient device(s) {', '.join(gone)} did not survive the host restart (a "
                            "transient allocation ends with its VM); attach the VM again")
    if missing:
        # the boot unit's restore path, limited to the GPUs this VM uses (VFs first, then instances)
        rep = reconcile(ctx, only_parents=gpu_addrs, actor="libvirt-hook")
        view = hostview.snapshot(ctx)
        still = [i for i in ids if not _present(ctx, view, i)]
        if still:
            # GPU-level steps (MIG mode, enabling VFs) carry no instance id, and are often the real reason
            reasons = [f["action"] for f in rep.get("failed", []) if f.get("instance") in still or
                       f.get("instance") is None]
            # cli.hook_main prefixes "refusing to start <domain>:"; this is the reason only
            raise ConflictError("; ".join(r for r in reasons if r) or
                                f"instance(s) {', '.join(map(str, still))} could not be restored")
        # the restore is GPU-wide (the VFs and the rest of the GPUs' layouts come back too): say so, or an
        # operator reading "1 device" would think the other instances are still missing
        others = rep.get("changed", 0) - len(missing)
        notes.append(f"restored {len(missing)} device(s) of this VM" +
                     (f", and {others} other step(s) on its GPU(s)" if others > 0 else ""))
    with ctx.inventory.unit(write=True) as uow:
        for inst_id in ids:
            inst = uow.instance(inst_id)
            if inst.allocation is not None:
                inst.allocation.vm_state = "running"
                inst.allocation.vm_state_at = _now()
        uow.event("hook-prepare", target=domain, detail={"instances": ids, "notes": notes}, actor="libvirt-hook")
    return notes


def _now():
    from gpuvirt.inventory.kinds import utcnow

    return utcnow()


def _quick_present(ctx: Context, kind: str, uuid: str | None, parent: str | None, type_id: str | None) -> bool:
    """The test of attach._on_host for one device, straight from sysfs; False when unsure (the caller then
    runs the full check)."""
    try:
        if kind == MDEV and uuid:
            return ctx.host.mdev_exists(uuid)
        if kind == VFIO_VGPU and parent:
            return str(ctx.host.current_vgpu_type(parent)) == type_id
        if kind == VF and parent:
            return ctx.host.pci_dir(parent).is_dir()
    except GpuvirtError:
        return False
    return False


def _present(ctx: Context, view: Any, inst_id: int) -> bool:
    from gpuvirt.service.attach import _on_host

    with ctx.inventory.unit() as uow:
        inst = uow.instance(inst_id)
        return _on_host(view, inst.gpu.address, inst)


def release(ctx: Context, domain: str, dom: Any | None) -> list[str]:
    """Free transient allocations of the domain (idempotent; safe after a failed or missing prepare)."""
    from gpuvirt.service.detach import release_instances

    host_id = ctx.settings.host_id
    notes = []
    with ctx.inventory.unit(write=True, action=f"hook release {domain}") as uow:
        allocs = uow.allocations(host_id=host_id, vm_name=domain)
        if dom is not None and dom.uuid:
            allocs += [a for a in uow.allocations(host_id=host_id) if a.vm_uuid == dom.uuid and a not in allocs]
        transient = [(a.instance_id, a.vm_name) for a in allocs if not a.persistent]
        for a in allocs:
            if a.persistent:
                a.vm_state = "stopped"
                a.vm_state_at = _now()
    for vm in sorted({v for _, v in transient}):
        ids = [i for i, v in transient if v == vm]
        try:
            # one journalled change: a crash half-way is finished by the next reconcile, never left half done
            for r in release_instances(ctx, vm, ids, actor="libvirt-hook"):
                notes.append(f"freed {r['label']}" + (" (destroyed)" if r["destroyed"] else ""))
        except GpuvirtError as exc:
            notes.append(f"could not free instance(s) {', '.join(map(str, ids))}: {exc}")
    if allocs:
        with ctx.inventory.unit(write=True) as uow:
            uow.event("hook-release", target=domain, detail={"notes": notes}, actor="libvirt-hook")
    return notes


# --- installation -------------------------------------------------------------------------------------------------
MARKER = "installed by 'gpuvirt hook install'"


def exec_args(ctx: Context) -> list[str]:
    """The command line that runs gpuvirt with this context's settings from a process that has no
    environment (libvirtd's hook, systemd units)."""
    from gpuvirt.context import read_config

    s = ctx.settings
    args = [sys.executable, "-I", "-m", "gpuvirt"]
    if s.sim_dir is not None:
        args += ["--sim", str(s.sim_dir)]
    elif str(s.root) != "/":
        args += ["--root", str(s.root)]
    if s.config_found or os.environ.get("GPUVIRT_CONFIG"):
        args += ["--config", str(s.config_path)]
    # The hook sees no environment, only the config file: embed every setting that came from an option or
    # a variable and differs from what the config file alone would give, or the hook would look at another
    # host's rows (host id) or another database (db) than the one attach wrote to.
    doc = read_config(s.config_path) if s.config_found else {}
    if s.db_url and s.db_url != doc.get("db_url"):
        args += ["--db", s.db_url]
    if s.host_id != (doc.get("host_id") or os.uname().nodename):
        args += ["--host-id", s.host_id]
    return args


def secret_on_line(ctx: Context) -> bool:
    """Does :func:`exec_args` carry a database password?"""
    from gpuvirt.context import redact_url

    db = ctx.settings.db_url or ""
    return "--db" in exec_args(ctx) and redact_url(db) != db


def hook_script(ctx: Context) -> str:
    cmd = " ".join(shlex.quote(a) for a in exec_args(ctx))
    return ("#!/bin/sh\n"
            f"# libvirt qemu hook {MARKER} - do not edit, reinstall instead.\n"
            "# libvirtd runs it with argv <domain> <operation> <sub-operation> <extra> and the domain XML on\n"
            "# stdin, and an almost empty environment: everything gpuvirt needs is on the line below.\n"
            f"exec {cmd} hook libvirt-qemu \"$@\"\n")


def _ours(path: Path) -> bool:
    # the marker line, not merely the word: an operator's own script that happens to call gpuvirt is theirs
    return MARKER in path.read_text(errors="replace")


def write_file(path: Path, text: str, mode: int) -> None:
    """Write a file libvirtd or systemd will run or read: atomically, with ``mode`` (not the umask's)."""
    from gpuvirt.vmm.libvirt import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text.encode(), mode=mode)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc


def install(ctx: Context, *, force: bool = False) -> dict[str, Any]:
    # a hook pointing at a simulator that is not there would refuse every VM start; refuse it here instead,
    # before anything is written under that directory
    ctx.check_sim()
    path = Path(ctx.settings.root) / HOOK_REL
    text = hook_script(ctx)
    if path.exists() and not force:
        current = path.read_text(errors="replace")
        if current == text:
            return {"path": str(path), "changed": False}
        if not _ours(path):
            raise UsageError(f"{path} exists and was not written by gpuvirt (use --force to replace it)")
    # a database password on the exec line must not be readable by every local user; libvirtd runs hooks
    # as root, so owner-only is enough
    mode = stat.S_IRWXU if secret_on_line(ctx) else \
        stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    write_file(path, text, mode)
    return {"path": str(path), "changed": True,
            "note": "libvirtd reads hook scripts when it starts: restart libvirtd (or virtqemud) once"}


def uninstall(ctx: Context) -> dict[str, Any]:
    path = Path(ctx.settings.root) / HOOK_REL
    if path.exists():
        if not _ours(path):
            raise UsageError(f"{path} was not written by gpuvirt; not removing it")
        path.unlink()
        return {"path": str(path), "removed": True}
    return {"path": str(path), "removed": False}
