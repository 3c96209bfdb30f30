"""Discovery: one consistent picture of a host from sysfs and NVML (schema: docs/discover-schema.md)."""

from __future__ import annotations

import gc
import os
from typing import Any

from gpuvirt.errors import GpuvirtError, NvmlError
from gpuvirt.host.machine import Host, normalize_pci
from gpuvirt.host.scan import ScanWarning

SCHEMA_VERSION = 1


def _udev_names(addresses: list[str]) -> dict[str, str]:
    """Model names from the udev hardware database, where udev is present (never required)."""
    try:
        import pyudev  # noqa: PLC0415 - optional at run time
    except ImportError:
        return {}
    names: dict[str, str] = {}
    try:
        ctx = pyudev.Context()
        for addr in addresses:
            try:
                dev = pyudev.Devices.from_name(ctx, "pci", addr)
            except Exception:  # noqa: BLE001 - udev db may be absent (containers, no udevd)
                continue
            name = dev.properties.get("ID_MODEL_FROM_DATABASE")
            if name:
                names[addr] = name
    except Exception:  # noqa: BLE001
        return {}
    return names


def discover(host: Host, *, with_nvml: bool = True) -> dict[str, Any]:
    # tens of thousands of small acyclic objects (records, dicts) on a vGPU host: the cyclic collector would
    # scan the young generation every 700 of them, about 3 ms of a 80 ms discovery (docs/benchmarks.md);
    # reference counting frees everything, and the collector runs again afterwards
    was = gc.isenabled()
    gc.disable()
    try:
        return _discover(host, with_nvml=with_nvml)
    finally:
        if was:
            gc.enable()


def _discover(host: Host, *, with_nvml: bool) -> dict[str, Any]:
    scanner = host.scanner()
    pci = scanner.pci_devices()
    parents = scanner.mdev_parents(physfn={d.address: d.physfn for d in pci})
    devices = scanner.mdev_devices()
    vfio = scanner.vfio_vfs(pci)
    by_parent: dict[str, list] = {}
    for d in devices:
        by_parent.setdefault(d.parent, []).append(d)
    for p in parents:
        p.devices = by_parent.get(p.address, [])
    known_parents = {p.address for p in parents}
    warnings: list[ScanWarning] = list(scanner.warnings)
    for d in devices:
        if d.parent not in known_parents:
            warnings.append(ScanWarning(f"/sys/bus/mdev/devices/{d.uuid}",
                                        f"mdev's parent {d.parent} is not registered in /sys/class/mdev_bus"))

    udev = _udev_names([d.address for d in pci]) if host.use_udev else {}
    pci_gpus = []
    rows: list = []
    if pci:
        # the PCI identities only, not the whole catalog (docs: gpuvirt/model/catalog_cache.py)
        from gpuvirt.model.catalog_cache import (
            by_vgpu_types,
            pci_index,
            pci_lookup,
            vf_lookup,
        )

        rows = pci_index()
        pf_rows = {d.address: pci_lookup(rows, d.vendor_id, d.device_id, d.subsystem_vendor_id, d.subsystem_device_id)
                   for d in pci if not d.physfn}
        parent_of = {p.address: p for p in parents}
    for d in pci:
        entry = d.to_dict()
        if d.physfn:
            # a VF is a function of its PF's board (an A2 VF reports subsystem 0000, which tells nothing)
            row = pf_rows.get(d.physfn) or vf_lookup(rows, d.vendor_id, d.device_id)
        else:
            row = pf_rows[d.address]
        if row is None and d.address in parent_of:
            # a device id two boards share, no telling subsystem id (a VF whose PF is out of sight): the
            # vGPU types the function offers name the board (listed only here: the rare case)
            offered = [t.name for t in parent_of[d.address].types if t.name]
            if offered:
                row = by_vgpu_types(rows, d.vendor_id, d.device_id, offered)
        entry["model"] = row[0] if row else None
        entry["name"] = udev.get(d.address) or (row[1] if row else None)
        entry["role"] = "vf" if d.physfn else "pf"
        pci_gpus.append(entry)

    sriov_pfs = [{"address": d.address, "vendor": d.vendor, "vendor_id": f"0x{d.vendor_id:04x}",
                  "device_id": f"0x{d.device_id:04x}", "driver": d.driver, "total_vfs": d.sriov_total_vfs,
                  "num_vfs": d.sriov_num_vfs, "vfs": d.vfs,
                  "model": next((g["model"] for g in pci_gpus if g["address"] == d.address), None)}
                 for d in pci if d.sriov_total_vfs is not None]

    nvml_info: dict[str, Any] = {"available": False, "reason": None, "driver_version": None}
    gpus: list[dict[str, Any]] = []
    if with_nvml and not any(d.vendor_id == 0x10DE for d in pci):
        # no NVIDIA device in sysfs: nothing NVML could add (and under --root the real library would
        # describe a different machine than the tree)
        nvml_info["reason"] = "no NVIDIA GPU in sysfs"
    elif with_nvml and (missing := host.nvml_library_missing()) is not None:
        nvml_info["reason"] = missing
    elif with_nvml:
        try:
            session = host.nvml()
            if session.available:
                nvml_info["available"] = True
                nvml_info["driver_version"] = session.driver_version()
                gpus = _nvml_gpus(session, warnings)
            else:
                nvml_info["reason"] = session.unavailable_reason
        except NvmlError as exc:
            nvml_info["reason"] = str(exc)
            warnings.append(ScanWarning("nvml", str(exc)))
    else:
        nvml_info["reason"] = "skipped"

    return {
        "schema_version": SCHEMA_VERSION,
        "host": {"hostname": os.uname().nodename, "root": str(host.root)},
        "nvml": nvml_info,
        "gpus": gpus,
        "pci_gpus": pci_gpus,
        "sriov_pfs": sriov_pfs,
        "mdev_parents": [p.to_dict() for p in parents],
        "mdev_devices": [d.to_dict() for d in devices],
        "vfio_vfs": [v.to_dict() for v in vfio],
        "warnings": [w.to_dict() for w in warnings],
    }


def _nvml_gpus(session: Any, warnings: list[ScanWarning]) -> list[dict[str, Any]]:
    from gpuvirt.model.catalog import load_catalog

    catalog = load_catalog()
    out = []
    for g in session.gpus():
        # the PCI identity first: it tells board variants and boards sharing a device id apart (by subsystem)
        model = _model_by_device_id(g.pci_device_id, g.pci_subsystem_id) or catalog.by_nvml_name(g.name)
        entry: dict[str, Any] = {
            "index": g.index, "uuid": g.uuid, "pci_address": normalize_pci(g.pci_address), "name": g.name,
            "memory_mib": g.memory_mib, "model": model.id if model else None,
            "pci_device_id": f"0x{g.pci_device_id:08X}",
            "mig": {"supported": g.mig_capable, "current": g.mig_current, "pending": g.mig_pending,
                    "gpu_instance_profiles": [], "gpu_instances": []},
            "vgpu_scheduler": None,
        }
        try:
            sched = session.vgpu_scheduler(g.index)
            entry["vgpu_scheduler"] = sched.to_dict() if sched is not None else None
        except GpuvirtError as exc:
            warnings.append(ScanWarning(f"nvml:gpu{g.index}", f"cannot read the vGPU scheduler: {exc}"))
        if g.mig_capable and g.mig_current:
            entry["mig"]["profiles_source"] = "nvml"
            try:
                profiles = session.gi_profiles(g.index)
                names = {p.id: p.name for p in profiles}
                entry["mig"]["gpu_instance_profiles"] = [
                    {"id": p.id, "name": p.name, "memory_slices": p.memory_slices,
                     "compute_slices": p.compute_slices, "max_instances": p.max_instances,
                     "memory_mib": p.memory_mib, "remaining": p.remaining,
                     "placements": [{"start": s, "size": z} for s, z in p.placements]}
                    for p in profiles]
                entry["mig"]["gpu_instances"] = [
                    {"id": gi.id, "profile_id": gi.profile_id, "profile_name": names.get(gi.profile_id),
                     "placement": {"start": gi.start, "size": gi.size},
                     "compute_instances": [
                         {"id": ci.id, "profile_id": ci.profile_id, "placement": {"start": ci.start, "size": ci.size},
                          "uuid": ci.uuid} for ci in gi.compute_instances]}
                    for gi in session.gpu_instances(g.index)]
            except GpuvirtError as exc:
                warnings.append(ScanWarning(f"nvml:gpu{g.index}", f"cannot read MIG state: {exc}"))
        elif g.mig_capable and model is not None and model.mig is not None:
            # NVML answers NOT_SUPPORTED for profile queries while MIG mode is off, yet operators plan before
            # enabling it: show the catalog's table for this model, marked as such
            entry["mig"]["profiles_source"] = "catalog"
            entry["mig"]["gpu_instance_profiles"] = [
                {"id": p.id, "name": p.name, "memory_slices": p.memory_slices, "compute_slices": p.compute_slices,
                 "max_instances": p.max_instances, "memory_mib": p.memory_mib, "remaining": None,
                 "placements": [{"start": s, "size": z} for s, z in p.placements]}
                for p in model.mig.gi_profiles]
        out.append(entry)
    return out


def _model_by_device_id(pci_device_id: int, pci_subsystem_id: int | None = None):
    from gpuvirt.model.catalog import load_catalog

    dev = (pci_device_id >> 16) & 0xFFFF
    ven = pci_device_id & 0xFFFF
    sub = pci_subsystem_id or 0
    return load_catalog().by_pci(ven, dev, sub & 0xFFFF, (sub >> 16) & 0xFFFF)
