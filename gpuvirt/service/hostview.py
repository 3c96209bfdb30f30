"""A per-GPU view of a discovery snapshot, and recording it in the inventory.

"GPU" here means anything gpuvirt partitions: an NVIDIA GPU (MIG and/or vGPU), an AMD or other SR-IOV GPU
whose VFs are handed out whole, an Intel iGPU with GVT-g, or a virtual mdev parent such as mtty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from gpuvirt.context import Context
from gpuvirt.errors import NotFoundError, UsageError
from gpuvirt.host.discover import discover as host_discover
from gpuvirt.host.machine import is_pci_address, normalize_pci
from gpuvirt.model.catalog import GpuModel, load_catalog
from gpuvirt.model.mig import Placed


@dataclass
class GpuView:
    address: str
    model: GpuModel | None
    name: str | None
    vendor: str
    uuid: str | None = None
    nvml_index: int | None = None
    memory_mib: int = 0
    mig_capable: bool = False
    mig_current: bool = False
    mig_pending: bool = False
    gpu_instances: list[dict[str, Any]] = field(default_factory=list)
    sriov_total: int | None = None
    sriov_num: int | None = None
    vfs: list[str] = field(default_factory=list)
    mdev_parents: list[str] = field(default_factory=list)      # parents on this GPU (PF, VFs, or virtual name)
    mdev_devices: list[dict[str, Any]] = field(default_factory=list)
    vfio_vfs: list[dict[str, Any]] = field(default_factory=list)
    parent_types: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # parent -> type id -> info
    subsystem: str | None = None      # PCI subsystem id 0xSSSSVVVV, for device filters with a subsystem half
    vgpu_scheduler: dict[str, Any] | None = None   # discover's gpus[].vgpu_scheduler (None: NVML has none)

    @property
    def interface(self) -> str | None:
        if self.vfio_vfs:
            return "vendor-vfio"
        if self.mdev_parents:
            return "mdev"
        return None

    @property
    def label(self) -> str:
        idx = f"GPU {self.nvml_index} " if self.nvml_index is not None else ""
        return f"{idx}({self.address}, {self.model.id if self.model else self.name or '?'})"

    def layout(self) -> list[Placed]:
        return [Placed(gi["placement"]["start"], gi["placement"]["size"], gi["profile_id"])
                for gi in self.gpu_instances]


@dataclass
class HostView:
    doc: dict[str, Any]
    gpus: list[GpuView]

    def by_address(self, address: str) -> GpuView | None:
        return next((g for g in self.gpus if g.address == address), None)

    def gpu_of_parent(self, parent: str) -> GpuView | None:
        for g in self.gpus:
            if parent == g.address or parent in g.vfs or parent in g.mdev_parents:
                return g
        return None

    def select(self, selector: str) -> list[GpuView]:
        return select_gpus(self.gpus, selector)


def select_gpus(gpus: list[GpuView], selector: str) -> list[GpuView]:
    """``all``, or a comma list of NVML indices, PCI addresses, GPU UUIDs, catalog model ids or parent names."""
    sel = (selector or "").strip()
    if not sel:
        raise UsageError("empty --gpu selector (use all, indices, PCI addresses, UUIDs or a model)")
    if sel.lower() == "all":
        return list(gpus)
    catalog = load_catalog()
    chosen: list[GpuView] = []
    for raw in sel.split(","):
        item = raw.strip()
        if not item:
            continue
        if re.fullmatch(r"\d+", item):
            hits = [g for g in gpus if g.nvml_index == int(item)]
        elif item.upper().startswith("GPU-"):
            hits = [g for g in gpus if (g.uuid or "").lower() == item.lower()]
        elif is_pci_address(item):
            addr = normalize_pci(item)
            hits = [g for g in gpus if g.address == addr]
        else:
            hits = [g for g in gpus if g.address == item]
            if not hits:
                try:
                    model = catalog.get(item)
                    hits = [g for g in gpus if g.model is not None and g.model.id == model.id]
                except NotFoundError:
                    hits = []
        if not hits:
            known = ", ".join(f"{g.nvml_index if g.nvml_index is not None else '-'}:{g.address}"
                              f"({g.model.id if g.model else '?'})" for g in gpus) or "none"
            raise NotFoundError(f"GPU selector '{item}' matches no GPU on this host (GPUs: {known})")
        for g in hits:
            if g not in chosen:
                chosen.append(g)
    return chosen


def build_view(doc: dict[str, Any]) -> HostView:
    catalog = load_catalog()
    gpus: dict[str, GpuView] = {}
    pci = {d["address"]: d for d in doc["pci_gpus"]}
    for g in doc["gpus"]:
        model = catalog.get(g["model"]) if g.get("model") else None
        gpus[g["pci_address"]] = GpuView(
            address=g["pci_address"], model=model, name=g["name"], vendor="nvidia", uuid=g["uuid"],
            nvml_index=g["index"], memory_mib=g["memory_mib"], mig_capable=bool(g["mig"]["supported"]),
            mig_current=bool(g["mig"]["current"]), mig_pending=bool(g["mig"]["pending"]),
            gpu_instances=list(g["mig"]["gpu_instances"]), vgpu_scheduler=g.get("vgpu_scheduler"))
    for d in doc["pci_gpus"]:
        if d["role"] == "pf" and d["address"] in gpus:
            gpus[d["address"]].subsystem = d.get("subsystem_id")
        if d["role"] != "pf" or d["address"] in gpus:
            continue
        model = catalog.get(d["model"]) if d.get("model") else None
        gpus[d["address"]] = GpuView(address=d["address"], model=model, name=d.get("name"), vendor=d["vendor"],
                                     memory_mib=model.memory_mib if model else 0, subsystem=d.get("subsystem_id"))
    for p in doc["sriov_pfs"]:
        g = gpus.get(p["address"])
        if g is not None:
            g.sriov_total, g.sriov_num, g.vfs = p["total_vfs"], p["num_vfs"], list(p["vfs"])
    vf_to_pf = {vf: g.address for g in gpus.values() for vf in g.vfs}
    for d in pci.values():
        if d.get("physfn") and d["address"] not in vf_to_pf and d["physfn"] in gpus:
            vf_to_pf[d["address"]] = d["physfn"]
    for parent in doc["mdev_parents"]:
        name = parent["address"]
        owner = gpus.get(name) or gpus.get(vf_to_pf.get(name, ""))
        if owner is None:
            # a parent that is not a PCI GPU we know (mtty, mdpy, mbochs, or an unknown PCI device)
            model = None
            for m in catalog.models.values():
                if m.mdev and m.mdev.parent_kind == "virtual" and m.mdev.driver == name:
                    model = m
            owner = GpuView(address=name, model=model, name=model.display_name if model else name,
                            vendor="virtual" if not parent["pci"] else "unknown")
            gpus[name] = owner
        owner.mdev_parents.append(name)
        owner.parent_types[name] = {t["id"]: t for t in parent["types"]}
    for dev in doc["mdev_devices"]:
        owner = gpus.get(dev["parent"]) or gpus.get(vf_to_pf.get(dev["parent"], ""))
        if owner is not None:
            owner.mdev_devices.append(dev)
    for vf in doc["vfio_vfs"]:
        owner = gpus.get(vf.get("physfn") or "") or gpus.get(vf_to_pf.get(vf["address"], ""))
        if owner is not None:
            owner.vfio_vfs.append(vf)
    ordered = sorted(gpus.values(), key=lambda g: (g.nvml_index is None, g.nvml_index or 0, g.address))
    return HostView(doc=doc, gpus=ordered)


def snapshot(ctx: Context, *, nvml: bool = True) -> HostView:
    """The host now.  ``nvml=False`` reads sysfs only: enough to know which devices exist (e.g. to take the
    per-GPU locks in a fixed order) without the cost of querying every MIG profile.  A host reached through a peer session
    (:mod:`gpuvirt.service.peers`) is asked through it."""
    remote = getattr(ctx, "remote_view", None)
    if remote is not None:
        return remote(nvml)
    return build_view(host_discover(ctx.host, with_nvml=nvml))


def lock_addresses(ctx: Context) -> list[str]:
    """Every partitionable device of this host, in the fixed order locks are taken in."""
    return sorted(g.address for g in snapshot(ctx, nvml=False).gpus)


def record(ctx: Context, view: HostView, uow: Any) -> dict[str, Any]:
    """Upsert this host and its GPUs in the inventory; GPUs no longer seen are marked not present."""
    from gpuvirt.host.boot import root_boot_id

    s = ctx.settings
    uow.touch_host(s.host_id, hostname=view.doc["host"]["hostname"], root=str(s.root),
                   simulated=s.sim_dir is not None, boot_marker=root_boot_id(s.root))
    seen = set()
    rows = {}
    for g in view.gpus:
        seen.add(g.address)
        rows[g.address] = uow.upsert_gpu(
            s.host_id, g.address, uuid=g.uuid, nvml_index=g.nvml_index, model=g.model.id if g.model else None,
            name=g.name, vendor=g.vendor, memory_mib=g.memory_mib, mig_capable=g.mig_capable,
            mig_current=g.mig_current if g.mig_capable else None, mig_pending=g.mig_pending if g.mig_capable else None,
            vgpu_interface=g.interface, sriov_total_vfs=g.sriov_total, sriov_num_vfs=g.sriov_num, present=True)
    for row in uow.gpus(s.host_id):
        if row.address not in seen and row.present:
            row.present = False
    if view.doc.get("nvml", {}).get("available"):
        # only with NVML: a sysfs-only snapshot knows no driver range and must not blank a recorded one
        from gpuvirt.host.stack import host_stack

        uow.record_host_stack(s.host_id, host_stack(s.root, ctx.host.nvml()))
    return rows


def gpu_rows(uow: Any, host_id: str) -> dict[str, Any]:
    return {g.address: g for g in uow.gpus(host_id)}


def iter_instances(view: HostView) -> Iterable[tuple[GpuView, str, dict[str, Any]]]:
    """Every instance the host shows: ("mig", gi) / ("mdev", dev) / ("vfio-vgpu", vf)."""
    for g in view.gpus:
        for gi in g.gpu_instances:
            yield g, "mig", gi
        for d in g.mdev_devices:
            yield g, "mdev", d
        for vf in g.vfio_vfs:
            if vf["current_type"]:
                yield g, "vfio-vgpu", vf
