"""mdevctl interop: export gpuvirt's persistent mdevs as mdevctl definitions, import mdevctl's.

libvirt builds its mdev node devices from ``mdevctl list --dumpjson [--defined]`` (formats.md 3.6), so a
definition under ``/etc/mdevctl.d/<parent>/<uuid>`` makes a gpuvirt mdev visible to ``virsh
nodedev-list`` and to tools that only know mdevctl.  gpuvirt stays the owner: it writes ``start: auto`` for
persistent instances and never deletes a definition it did not write.
"""

from __future__ import annotations

from typing import Any

from gpuvirt.context import Context
from gpuvirt.inventory.models import ACTIVE, MDEV
from gpuvirt.service import hostview
from gpuvirt.service.instances import instance_fields_for_vgpu


def export(ctx: Context) -> dict[str, Any]:
    from gpuvirt.vmm.mdevctl import read_definitions, write_definition

    root = ctx.settings.root
    existing, _warnings = read_definitions(root)
    have = {(d.parent, d.uuid): d for d in existing}
    written, unchanged = [], []
    with ctx.inventory.unit() as uow:
        rows = [r for r in uow.instances(ctx.settings.host_id, kinds=[MDEV]) if r.persistent and r.parent]
        items = [(r.parent, r.mdev_uuid, r.type_id) for r in rows]
    for parent, uuid, type_id in items:
        d = have.get((parent, uuid))
        if d is not None and d.type_id == type_id and d.start == "auto":
            unchanged.append(uuid)
            continue
        write_definition(root, parent, uuid, type_id, start="auto")
        written.append({"parent": parent, "uuid": uuid, "type": type_id})
    with ctx.inventory.unit(write=True) as uow:
        uow.event("mdevctl-export", detail={"written": len(written), "unchanged": len(unchanged)})
    return {"written": written, "unchanged": unchanged, "directory": str(root / "etc/mdevctl.d")}


def import_(ctx: Context) -> dict[str, Any]:
    from gpuvirt.vmm.mdevctl import read_definitions

    defs, warnings = read_definitions(ctx.settings.root)
    view = hostview.snapshot(ctx)
    adopted, skipped = [], []
    warn = [{"path": str(p), "message": m} for p, m in warnings]
    with ctx.inventory.unit(write=True, action="mdevctl import") as uow:
        rows = hostview.record(ctx, view, uow)
        for d in defs:
            if uow.instance_by_mdev(ctx.settings.host_id, d.uuid) is not None:
                skipped.append(d.uuid)
                continue
            g = view.gpu_of_parent(d.parent)
            if g is None:
                warn.append({"path": str(d.path), "message": f"parent {d.parent} is not a device on this host"})
                continue
            fields = instance_fields_for_vgpu(g.model, MDEV, d.type_id, None, d.parent, d.uuid, "adopted",
                                              persistent=d.start == "auto")
            uow.add_instance(host_id=ctx.settings.host_id, gpu_id=rows[g.address].id, state=ACTIVE, **fields)
            adopted.append({"uuid": d.uuid, "parent": d.parent, "type": d.type_id, "start": d.start})
        uow.event("mdevctl-import", detail={"adopted": len(adopted), "skipped": len(skipped)})
    return {"adopted": adopted, "already_known": skipped, "warnings": warn}
