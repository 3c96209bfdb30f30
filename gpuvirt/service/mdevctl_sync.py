"""mdevctl interop: export gpuvirt's persistent mdevs as mdevctl definitions, import mdevctl's.

libvirt builds its mdev node devices from ``mdevctl list --dumpjson [--defined]`` (formats.md 3.6), so a
definition under ``/etc/mdevctl.d/<parent>/<uuid>`` makes a gpuvirt mdev visible to ``virsh
nodedev-list`` and to tools that only know mdevctl.  gpuvirt stays the owner: it writes ``start: auto`` for
persistent instances and never deletes a definition it did not write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import UsageError
from gpuvirt.inventory.models import ACTIVE, MDEV
from gpuvirt.service import hostview
from gpuvirt.service.instances import instance_fields_for_vgpu


LEDGER = "mdevctl-exported.json"


def _read_ledger(path: Path) -> set[tuple[str, str]]:
    """(parent, uuid) of every definition the previous export wrote; empty when unknown (never guess)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return {(str(p), str(u)) for p, u in doc["definitions"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def export(ctx: Context) -> dict[str, Any]:
    from gpuvirt.host.machine import is_pci_address
    from gpuvirt.vmm.libvirt import atomic_write
    from gpuvirt.vmm.mdevctl import read_definitions, remove_definition, write_definition

    ctx.check_sim()  # with --db elsewhere nothing else would notice that the simulated host is missing
    root = ctx.settings.root
    existing, _warnings = read_definitions(root)
    have = {(d.parent, d.uuid): d for d in existing}
    written, unchanged, skipped, removed = [], [], [], []
    with ctx.inventory.unit() as uow:
        rows = [r for r in uow.instances(ctx.settings.host_id, kinds=[MDEV]) if r.persistent and r.parent]
        items = [(r.parent, r.mdev_uuid, r.type_id) for r in rows]
    current = set()
    for parent, uuid, type_id in items:
        if not is_pci_address(parent):
            # a virtual parent (mtty, mdpy, ...): the definition files gpuvirt writes are for PCI parents only,
            # and one such device must not stop the export of all the others
            skipped.append({"parent": parent, "uuid": uuid, "reason": "parent is not a PCI device"})
            continue
        current.add((parent, uuid))
        d = have.get((parent, uuid))
        if d is not None and d.type_id == type_id and d.start == "auto":
            unchanged.append(uuid)
            continue
        write_definition(root, parent, uuid, type_id, start="auto")
        written.append({"parent": parent, "uuid": uuid, "type": type_id})
    # A definition this command wrote earlier for an mdev that is no longer a persistent instance (destroyed
    # by apply or detach) would make mdevctl / libvirt autostart recreate a stale device at boot, occupying
    # the board that reconcile must restore.  Only definitions recorded in the ledger are removed: gpuvirt
    # never deletes one it did not write.
    ledger = ctx.settings.state_dir / LEDGER
    for parent, uuid in sorted(_read_ledger(ledger) - current):
        try:
            if remove_definition(root, parent, uuid):  # validates both before building the path
                removed.append({"parent": parent, "uuid": uuid})
        except UsageError as exc:
            skipped.append({"parent": parent, "uuid": uuid, "reason": f"not removed: {exc}"})
    from gpuvirt.safefs import ensure_private_dir

    ensure_private_dir(ledger.parent)
    try:
        atomic_write(ledger, json.dumps({"definitions": sorted(current)}).encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise UsageError(f"cannot record exported definitions in {ledger}: {exc.strerror}") from exc
    with ctx.inventory.unit(write=True) as uow:
        uow.event("mdevctl-export", detail={"written": len(written), "unchanged": len(unchanged),
                                             "removed": len(removed), "skipped": len(skipped)})
    return {"written": written, "unchanged": unchanged, "removed": removed, "skipped": skipped,
            "directory": str(root / "etc/mdevctl.d")}


def _no_room(g: Any, d: Any, recorded: list[Any]) -> str | None:
    """Why the board cannot hold definition ``d`` on top of the ``recorded`` mdevs (None when it can)."""
    from gpuvirt.model import vgpu as rules
    from gpuvirt.model.profile import find_mdev_type

    model = g.model
    if model is None:
        return None                     # unknown board: its rules are unknown, the kernel will decide
    if d.type_id.startswith("nvidia-") and model.vgpu is not None:
        tid = rules.parse_type_id(d.type_id)
        vtype = next((t for t in model.vgpu.types if t.id == tid), None)
        if vtype is None:
            return f"{model.display_name} has no vGPU type {d.type_id}"
        existing = [t for t in (rules.parse_type_id(r.type_id) for r in recorded) if t is not None]
        room = rules.board_room(model, vtype, existing, mig_enabled=bool(g.mig_current),
                                gpu_instances=[gi["profile_id"] for gi in g.gpu_instances])
        if room <= 0:
            return (f"the {model.display_name} cannot hold another {vtype.name} next to the "
                    f"{len(existing)} vGPU(s) gpuvirt already records on it")
        return None
    if model.mdev is not None:
        t = find_mdev_type(model.mdev, d.type_id)
        if t is None:
            return f"{model.display_name} has no mdev type {d.type_id}"
        used = rules.pool_used(model.mdev, [r.type_id for r in recorded if r.parent == d.parent])
        if rules.pool_available(model.mdev, t, used) <= 0:
            return f"parent {d.parent} has no room for another {d.type_id} next to what gpuvirt records on it"
    return None


def import_(ctx: Context) -> dict[str, Any]:
    from gpuvirt.vmm.mdevctl import read_definitions

    defs, warnings = read_definitions(ctx.settings.root)
    view = hostview.snapshot(ctx)
    adopted, skipped = [], []
    warn = [{"path": str(p), "message": m} for p, m in warnings]
    with ctx.inventory.unit(write=True, action="mdevctl import") as uow:
        rows = hostview.record(ctx, view, uow)
        active = {m["uuid"] for g in view.gpus for m in g.mdev_devices}
        for d in defs:
            if uow.instance_by_mdev(ctx.settings.host_id, d.uuid) is not None:
                skipped.append(d.uuid)
                continue
            if d.start != "auto" and d.uuid not in active:
                # a manual definition that is not running: adopted, it would be a non-persistent instance that
                # is missing on the host, which the next reconcile forgets again; start it first to adopt it
                warn.append({"path": str(d.path), "message": "start 'manual' and not active: not adopted "
                                                             "(start it, or define it with --auto)"})
                continue
            g = view.gpu_of_parent(d.parent)
            if g is None:
                warn.append({"path": str(d.path), "message": f"parent {d.parent} is not a device on this host"})
                continue
            if d.uuid not in active:
                # it would be created by the next reconcile: only where the board's rules leave room next to
                # everything already recorded (else every reconcile would fail on it)
                why = _no_room(g, d, uow.instances(ctx.settings.host_id, gpu_id=rows[g.address].id,
                                                   kinds=[MDEV]))
                if why:
                    warn.append({"path": str(d.path), "message": f"not adopted: {why}"})
                    continue
            fields = instance_fields_for_vgpu(g.model, MDEV, d.type_id, None, d.parent, d.uuid, "adopted",
                                              persistent=d.start == "auto")
            uow.add_instance(host_id=ctx.settings.host_id, gpu_id=rows[g.address].id, state=ACTIVE, **fields)
            adopted.append({"uuid": d.uuid, "parent": d.parent, "type": d.type_id, "start": d.start})
        uow.event("mdevctl-import", detail={"adopted": len(adopted), "skipped": len(skipped)})
    return {"adopted": adopted, "already_known": skipped, "warnings": warn}
