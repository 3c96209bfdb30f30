"""The scanner's shortcuts (reads relative to a directory fd, stats only when an open fails, a PF map handed
over from the PCI scan) report the same records and the same warnings, word for word, as the plain reads.

A hand-built sysfs tree with one SR-IOV PF, two VFs that are mdev parents, one active mdev and a set of
broken entries; every warning's path and message is pinned.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpuvirt.host.scan import Scanner

PF, VF0, VF1, NIC, ODD = "0000:41:00.0", "0000:41:00.4", "0000:41:00.5", "0000:05:00.0", "0000:06:00.0"
DEV = "6a1f0c2e-0000-4000-8000-0000000000aa"
BROKEN_DEV = "6a1f0c2e-0000-4000-8000-0000000000bb"
TYPES = {"nvidia-593": ("NVIDIA A10-1Q", "num_heads=4, max_instance=24"),
         "nvidia-594": ("NVIDIA A10-2Q", "num_heads=4, max_instance=12")}


def _w(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _ln(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, path.parent), path)


def _function(root: Path, addr: str, klass: str, *, ids: str | None = "10DE:2236", group: int = 7) -> Path:
    d = root / "sys/devices/pci0000:40" / addr
    _w(d / "class", klass + "\n")
    if ids is not None:
        _w(d / "uevent", f"DRIVER=nvidia\nPCI_CLASS={klass[2:]}\nPCI_ID={ids}\nPCI_SUBSYS_ID=10DE:1482\n")
    (root / "sys/kernel/iommu_groups" / str(group)).mkdir(parents=True, exist_ok=True)
    _ln(d / "iommu_group", root / "sys/kernel/iommu_groups" / str(group))
    _ln(root / "sys/bus/pci/devices" / addr, d)
    return d


def build(root: Path) -> None:
    pf = _function(root, PF, "0x030200", group=10)
    _w(pf / "sriov_totalvfs", "32\n")
    _w(pf / "sriov_numvfs", "2\n")
    for n, addr in enumerate((VF0, VF1)):
        d = _function(root, addr, "0x030200", group=11 + n)
        _ln(d / "physfn", pf)
        _ln(pf / f"virtfn{n}", d)
        for tid, (name, desc) in TYPES.items():
            t = d / "mdev_supported_types" / tid
            _w(t / "name", name + "\n")
            _w(t / "description", desc + "\n")
            _w(t / "device_api", "vfio-pci\n")
            _w(t / "available_instances", f"{n + 1}\n")
        _ln(root / "sys/class/mdev_bus" / addr, d)
    _function(root, NIC, "0x020000", ids="8086:1572")
    odd = _function(root, ODD, "0x030000", ids=None)         # no uevent: the attribute files
    _w(odd / "vendor", "0x1af4\n")
    _w(odd / "device", "0x1050\n")
    # an active mdev on VF0, with its type link and IOMMU group
    dev = root / "sys/devices/pci0000:40" / VF0 / DEV
    _ln(dev / "mdev_type", root / "sys/devices/pci0000:40" / VF0 / "mdev_supported_types/nvidia-593")
    _ln(dev / "iommu_group", root / "sys/kernel/iommu_groups/11")
    _ln(root / "sys/bus/mdev/devices" / DEV, dev)


def _break(root: Path) -> None:
    # a parent link to a removed device; a parent without types; a PCI function with an unreadable class and
    # one with unreadable SR-IOV counts; an mdev whose type link is gone
    _ln(root / "sys/class/mdev_bus/0000:41:01.0", root / "sys/devices/pci0000:40/0000:41:01.0")
    (root / "sys/devices/virtual/mtty/mtty").mkdir(parents=True)
    _ln(root / "sys/class/mdev_bus/mtty", root / "sys/devices/virtual/mtty/mtty")
    bad = _function(root, "0000:07:00.0", "0x030000")
    (bad / "class").write_text("zz\n")
    pf2 = _function(root, "0000:08:00.0", "0x030200")
    _w(pf2 / "sriov_totalvfs", "lots\n")
    half = root / "sys/devices/pci0000:40" / VF1 / BROKEN_DEV
    half.mkdir()
    _ln(root / "sys/bus/mdev/devices" / BROKEN_DEV, half)


def test_records_of_a_healthy_tree(tmp_path: Path) -> None:
    build(tmp_path)
    s = Scanner(tmp_path)
    pci = s.pci_devices()
    assert [d.address for d in pci] == [ODD, PF, VF0, VF1]                  # the NIC is not a GPU
    by = {d.address: d for d in pci}
    assert (by[PF].sriov_total_vfs, by[PF].sriov_num_vfs, by[PF].vfs) == (32, 2, [VF0, VF1])
    assert (by[VF0].physfn, by[VF0].iommu_group, by[VF0].driver, by[VF0].subsystem_device_id) == (PF, 11, "nvidia",
                                                                                                   0x1482)
    assert (by[ODD].vendor_id, by[ODD].device_id, by[ODD].driver, by[ODD].iommu_group) == (0x1AF4, 0x1050, None, 7)
    assert by[ODD].sriov_total_vfs is None and by[VF0].sriov_total_vfs is None
    # the PF map from the PCI scan and the links read again give the same parents
    handed = s.mdev_parents(physfn={d.address: d.physfn for d in pci})
    assert handed == Scanner(tmp_path).mdev_parents()
    assert [(p.address, [(t.id, t.name, t.available_instances) for t in p.types]) for p in handed] == [
        (VF0, [("nvidia-593", "NVIDIA A10-1Q", 1), ("nvidia-594", "NVIDIA A10-2Q", 1)]),
        (VF1, [("nvidia-593", "NVIDIA A10-1Q", 2), ("nvidia-594", "NVIDIA A10-2Q", 2)])]
    [dev] = s.mdev_devices()
    assert (dev.uuid, dev.parent, dev.type, dev.iommu_group) == (DEV, VF0, "nvidia-593", 11)
    assert s.vfio_vfs(pci) == [] and s.warnings == []


def test_broken_entries_warn_word_for_word(tmp_path: Path) -> None:
    build(tmp_path)
    _break(tmp_path)
    s = Scanner(tmp_path)
    pci = s.pci_devices()
    assert [d.address for d in pci] == [ODD, "0000:08:00.0", PF, VF0, VF1]
    parents = s.mdev_parents(physfn={d.address: d.physfn for d in pci})
    assert [(p.address, len(p.types)) for p in parents] == [(VF0, 2), (VF1, 2), ("mtty", 0)]
    assert [d.uuid for d in s.mdev_devices()] == [DEV]
    assert [(w.path, w.message) for w in s.warnings] == [
        ("/sys/bus/pci/devices/0000:07:00.0/class",
         "unreadable PCI class (invalid literal for int() with base 16: 'zz')"),
        ("/sys/bus/pci/devices/0000:08:00.0/sriov_totalvfs",
         "unreadable SR-IOV attributes (invalid literal for int() with base 10: 'lots')"),
        ("/sys/class/mdev_bus/0000:41:01.0", "mdev parent link is dangling (parent device removed?)"),
        ("/sys/class/mdev_bus/mtty/mdev_supported_types", "mdev parent has no mdev_supported_types directory"),
        (f"/sys/devices/pci0000:40/{VF1}/{BROKEN_DEV}/mdev_type",
         "mdev device has no valid mdev_type link (half-removed device?)"),
    ]
    # a device whose directory is gone altogether: the bus link dangles
    os.rmdir(tmp_path / "sys/devices/pci0000:40" / VF1 / BROKEN_DEV)
    s = Scanner(tmp_path)
    assert [d.uuid for d in s.mdev_devices()] == [DEV]
    assert [(w.path, w.message) for w in s.warnings] == [
        (f"/sys/bus/mdev/devices/{BROKEN_DEV}", "mdev device link is dangling (device being removed?)")]
