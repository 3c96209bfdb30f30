"""Reading the host's sysfs: PCI GPUs, SR-IOV, mdev parents/types/devices, vendor-specific VFIO VFs.

Every reader is tolerant: one broken entry (missing directory, unreadable or non-numeric file, a device
removed half-way) becomes a :class:`ScanWarning` naming its path, and the rest of the scan continues.
mdevctl fails the whole command in the same situations (``formats.md`` 3.3, mdevctl issue #56); gpuvirt
must keep working on a host where one parent is misbehaving.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

PCI_ADDR_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
VENDOR_NAMES = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel"}


class _Record:
    """Value-object plumbing for the scan's records (equality, repr) without the dataclasses module, whose
    import (inspect, ast, dis) is a sizeable part of a ``discover --json`` run (docs/benchmarks.md)."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]  # mutable records, as with @dataclass

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


class ScanWarning(_Record):
    __slots__ = ("path", "message")

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class PciDevice(_Record):
    __slots__ = ("address", "vendor_id", "device_id", "subsystem_vendor_id", "subsystem_device_id", "pci_class",
                 "driver", "iommu_group", "physfn", "sriov_total_vfs", "sriov_num_vfs", "vfs")

    def __init__(self, address: str, vendor_id: int, device_id: int, subsystem_vendor_id: int | None,
                 subsystem_device_id: int | None, pci_class: int, driver: str | None, iommu_group: int | None,
                 physfn: str | None = None, sriov_total_vfs: int | None = None, sriov_num_vfs: int | None = None,
                 vfs: list[str] | None = None) -> None:
        self.address = address
        self.vendor_id = vendor_id
        self.device_id = device_id
        self.subsystem_vendor_id = subsystem_vendor_id
        self.subsystem_device_id = subsystem_device_id
        self.pci_class = pci_class
        self.driver = driver
        self.iommu_group = iommu_group
        self.physfn = physfn                        # set on SR-IOV VFs
        self.sriov_total_vfs = sriov_total_vfs      # set on SR-IOV PFs
        self.sriov_num_vfs = sriov_num_vfs
        self.vfs = [] if vfs is None else vfs

    @property
    def is_gpu(self) -> bool:
        return (self.pci_class >> 16) == 0x03

    @property
    def vendor(self) -> str:
        return VENDOR_NAMES.get(self.vendor_id, f"0x{self.vendor_id:04x}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address, "vendor": self.vendor, "vendor_id": f"0x{self.vendor_id:04x}",
            "device_id": f"0x{self.device_id:04x}",
            "subsystem_id": (f"0x{self.subsystem_device_id:04x}{self.subsystem_vendor_id:04x}"
                             if self.subsystem_device_id is not None and self.subsystem_vendor_id is not None
                             else None),
            "class": f"0x{self.pci_class:06x}", "driver": self.driver, "iommu_group": self.iommu_group,
            "physfn": self.physfn,
            "sriov": ({"total_vfs": self.sriov_total_vfs, "num_vfs": self.sriov_num_vfs, "vfs": self.vfs}
                      if self.sriov_total_vfs is not None else None),
        }


class MdevType(_Record):
    __slots__ = ("id", "name", "description", "available_instances", "device_api")

    def __init__(self, id: str, name: str | None, description: str | None, available_instances: int,  # noqa: A002
                 device_api: str) -> None:
        self.id = id
        self.name = name
        self.description = description
        self.available_instances = available_instances
        self.device_api = device_api

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "description": self.description,
                "available_instances": self.available_instances, "device_api": self.device_api}


class MdevDevice(_Record):
    __slots__ = ("uuid", "parent", "type", "iommu_group")

    def __init__(self, uuid: str, parent: str, type: str, iommu_group: int | None) -> None:  # noqa: A002
        self.uuid = uuid
        self.parent = parent
        self.type = type
        self.iommu_group = iommu_group

    def to_dict(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "parent": self.parent, "type": self.type, "iommu_group": self.iommu_group}


class MdevParent(_Record):
    __slots__ = ("address", "path", "is_pci", "types", "devices")

    def __init__(self, address: str, path: str, is_pci: bool, types: list[MdevType] | None = None,
                 devices: list[MdevDevice] | None = None) -> None:
        self.address = address       # sysfs name: a PCI address, or e.g. "mtty" for a virtual parent
        self.path = path
        self.is_pci = is_pci
        self.types = [] if types is None else types
        self.devices = [] if devices is None else devices

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "pci": self.is_pci, "types": [t.to_dict() for t in self.types],
                "devices": [{"uuid": d.uuid, "type": d.type} for d in self.devices]}


class VfioVgpuType(_Record):
    __slots__ = ("id", "name")

    def __init__(self, id: int, name: str) -> None:  # noqa: A002
        self.id = id
        self.name = name

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}


class VfioVf(_Record):
    __slots__ = ("address", "physfn", "current_type", "creatable_types", "iommu_group")

    def __init__(self, address: str, physfn: str | None, current_type: int, creatable_types: list[VfioVgpuType],
                 iommu_group: int | None) -> None:
        self.address = address
        self.physfn = physfn
        self.current_type = current_type
        self.creatable_types = creatable_types
        self.iommu_group = iommu_group

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "physfn": self.physfn, "current_type": self.current_type,
                "creatable_types": [t.to_dict() for t in self.creatable_types], "iommu_group": self.iommu_group}


def _read(path: str) -> str:
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _read_at(dir_fd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    try:
        data = os.read(fd, 65536)  # sysfs attributes are at most a page
        if len(data) == 65536:
            rest = [data]
            while chunk := os.read(fd, 65536):
                rest.append(chunk)
            data = b"".join(rest)
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace")


def _uevent_ids(dir_fd: int, path: str) -> tuple[int, int, int | None, int | None, str | None] | None:
    """(vendor, device, subsystem vendor, subsystem device, driver) from a PCI device's uevent, or None when
    the file is missing or lacks PCI_ID (then the attribute files are read)."""
    try:
        fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
        try:
            text = os.read(fd, 4096).decode("ascii", "replace")
        finally:
            os.close(fd)
    except OSError:
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        vendor, device = (int(x, 16) for x in fields["PCI_ID"].split(":"))
        sub = fields.get("PCI_SUBSYS_ID")
        sv, sd = (int(x, 16) for x in sub.split(":")) if sub else (None, None)
    except (KeyError, ValueError):
        return None
    return vendor, device, sv, sd, fields.get("DRIVER") or None


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _link_name_at(dir_fd: int, path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path, dir_fd=dir_fd))
    except OSError:
        return None


def _exists_at(dir_fd: int, path: str) -> bool:
    try:
        os.stat(path, dir_fd=dir_fd)
    except (OSError, ValueError):
        return False
    return True


def _int_attr(path: str, base: int = 0) -> int:
    return int(_read(path).strip(), base)


class Scanner:
    """All sysfs reads of discovery; ``root`` is the injected root (``/`` on a real host)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = str(Path(root))
        self.warnings: list[ScanWarning] = []

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(ScanWarning(self._display(path), message))

    def _display(self, path: str) -> str:
        # show paths as the kernel would name them (relative to the injected root, with a leading '/')
        if self.root not in ("", "/") and path.startswith(self.root):
            return "/" + os.path.relpath(path, self.root)
        return path

    def _listdir(self, path: str, what: str, *, missing_ok: bool = True) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            if not missing_ok:
                self.warn(path, f"{what} is missing")
            return []
        except OSError as exc:
            self.warn(path, f"cannot list {what}: {exc.strerror}")
            return []

    # --- PCI -------------------------------------------------------------------------------------------------
    def pci_devices(self, *, gpus_only: bool = True) -> list[PciDevice]:
        base = self.p("sys/bus/pci/devices")
        names = self._listdir(base, "PCI device list")
        if not names:
            return []
        try:
            bfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            self.warn(base, f"cannot list PCI device list: {exc.strerror}")
            return []
        try:
            # every attribute is opened relative to the list's directory: a path of two names for the kernel
            # to walk instead of the whole root-prefixed path, on each of ~6 reads per function (a vGPU
            # host has hundreds of functions; docs/benchmarks.md)
            return [dev for name in names if (dev := self._pci_device(bfd, base, name, gpus_only)) is not None]
        finally:
            os.close(bfd)

    def _pci_device(self, bfd: int, base: str, name: str, gpus_only: bool) -> PciDevice | None:
        try:
            klass = int(_read_at(bfd, name + "/class").strip(), 16)
        except FileNotFoundError:
            self.warn(os.path.join(base, name, "class"), "PCI device has no class attribute (device removed?)")
            return None
        except (OSError, ValueError) as exc:
            self.warn(os.path.join(base, name, "class"), f"unreadable PCI class ({_why(exc)})")
            return None
        if gpus_only and (klass >> 16) != 0x03:
            return None
        # the kernel's uevent of a PCI device carries its ids and driver in one read (pci_uevent():
        # PCI_ID, PCI_SUBSYS_ID, DRIVER); the separate attribute files are the fallback
        ids = _uevent_ids(bfd, name + "/uevent")
        d = os.path.join(base, name)
        if ids is not None:
            vendor, device, sub_vendor, sub_device, driver = ids
        else:
            try:
                vendor = _int_attr(os.path.join(d, "vendor"), 16)
                device = _int_attr(os.path.join(d, "device"), 16)
            except (OSError, ValueError) as exc:
                self.warn(d, f"unreadable PCI vendor/device id ({_why(exc)})")
                return None
            sub_vendor = _opt_hex(os.path.join(d, "subsystem_vendor"))
            sub_device = _opt_hex(os.path.join(d, "subsystem_device"))
            driver = _link_name(os.path.join(d, "driver"))
        physfn = _link_name_at(bfd, name + "/physfn")
        group = _link_name_at(bfd, name + "/iommu_group")
        dev = PciDevice(address=name, vendor_id=vendor, device_id=device, subsystem_vendor_id=sub_vendor,
                        subsystem_device_id=sub_device, pci_class=klass, driver=driver,
                        iommu_group=int(group) if group and group.isdigit() else None, physfn=physfn)
        if physfn is None and _exists_at(bfd, name + "/sriov_totalvfs"):     # a VF is never a PF itself
            total = os.path.join(d, "sriov_totalvfs")
            try:
                dev.sriov_total_vfs = int(_read_at(bfd, name + "/sriov_totalvfs").strip(), 10)
                dev.sriov_num_vfs = int(_read_at(bfd, name + "/sriov_numvfs").strip(), 10)
            except (OSError, ValueError) as exc:
                self.warn(total, f"unreadable SR-IOV attributes ({_why(exc)})")
            vfs = []
            for entry in os.listdir(d):
                if entry.startswith("virtfn") and entry[6:].isdigit():
                    target = _link_name_at(bfd, f"{name}/{entry}")
                    if target:
                        vfs.append((int(entry[6:]), target))
            dev.vfs = [a for _, a in sorted(vfs)]
        return dev

    # --- mdev ----------------------------------------------------------------------------------------------------
    def mdev_parents(self, physfn: dict[str, str | None] | None = None) -> list[MdevParent]:
        """The mdev parents and their types. ``physfn``: the PF of each PCI function as :meth:`pci_devices`
        just read it (its ``physfn`` link), so that it is not read a second time; a parent not in it has
        its link read here."""
        base = self.p("sys/class/mdev_bus")
        parents = []
        static_by_pf: dict[str, tuple[list[str], dict[str, MdevType]]] = {}
        known_pf = {} if physfn is None else physfn
        for name in self._listdir(base, "mdev parent list"):
            link = os.path.join(base, name)
            types_dir = os.path.join(link, "mdev_supported_types")
            try:
                dfd = os.open(types_dir, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                # a parent that is not a directory (removed device) tells first; the check costs a stat, so
                # it is made only when the types directory cannot be opened
                if not os.path.isdir(link):
                    self.warn(link, "mdev parent link is dangling (parent device removed?)")
                    continue
                if isinstance(exc, FileNotFoundError):
                    self.warn(types_dir, "mdev parent has no mdev_supported_types directory")
                else:
                    self.warn(types_dir, f"cannot open mdev_supported_types: {exc.strerror}")
                parents.append(MdevParent(address=name, path=link, is_pci=bool(PCI_ADDR_RE.match(name))))
                continue
            parent = MdevParent(address=name, path=link, is_pci=bool(PCI_ADDR_RE.match(name)))
            # Sibling VFs of one PF register the same vGPU types with the same name, description and
            # device_api (the driver fills them from the board's type table); only available_instances
            # differs from VF to VF. They are read on the first VF of each PF and reused for its siblings
            # when the sibling lists the same types - a quarter of the reads on an SR-IOV vGPU host
            # (assumption, not a documented guarantee: docs/discover-schema.md, "Sibling VFs")
            if not parent.is_pci:
                pf = None
            elif name in known_pf:
                pf = known_pf[name]
            else:
                pf = _link_name(os.path.join(link, "physfn"))
            static = static_by_pf.get(pf) if pf else None
            try:
                # a 256-parent x 20-type host means 20k attribute reads: open them relative to a directory
                # fd with raw os.read, several times cheaper than text-mode open() on full paths
                names = sorted(os.listdir(dfd))
                if static is not None and static[0] == names:
                    parent.types = self._mdev_types_available(dfd, types_dir, names, static[1])
                else:
                    for tname in names:
                        t = self._mdev_type(dfd, types_dir, tname)
                        if t is not None:
                            parent.types.append(t)
                    if pf and pf not in static_by_pf:
                        static_by_pf[pf] = (names, {t.id: t for t in parent.types})
            except OSError as exc:
                self.warn(types_dir, f"cannot list mdev types: {exc.strerror}")
            finally:
                os.close(dfd)
            parents.append(parent)
        return parents

    def _mdev_type(self, types_fd: int, types_dir: str, tname: str) -> MdevType | None:
        tdir = os.path.join(types_dir, tname)
        try:
            avail_text = _read_at(types_fd, f"{tname}/available_instances").strip()
        except FileNotFoundError:
            if not os.path.isdir(tdir):
                self.warn(tdir, "mdev type entry is not a directory")
            else:
                self.warn(os.path.join(tdir, "available_instances"),
                          "mdev type has no available_instances (mandatory attribute)")
            return None
        except OSError as exc:
            self.warn(os.path.join(tdir, "available_instances"), f"cannot read available_instances: {exc.strerror}")
            return None
        try:
            avail = int(avail_text, 10)
        except ValueError:
            self.warn(os.path.join(tdir, "available_instances"),
                      f"available_instances is not a number: {avail_text[:40]!r}")
            return None
        try:
            api = _read_at(types_fd, f"{tname}/device_api").strip()
        except OSError as exc:
            self.warn(os.path.join(tdir, "device_api"), f"cannot read device_api (mandatory): {_why(exc)}")
            return None
        name = description = None
        try:
            name = _read_at(types_fd, f"{tname}/name").strip()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.warn(os.path.join(tdir, "name"), f"cannot read name: {exc.strerror}")
        try:
            description = _read_at(types_fd, f"{tname}/description").rstrip("\n")
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.warn(os.path.join(tdir, "description"), f"cannot read description: {exc.strerror}")
        return MdevType(id=tname, name=name, description=description, available_instances=avail, device_api=api)

    def _mdev_types_available(self, types_fd: int, types_dir: str, names: list[str],
                              known: dict[str, "MdevType"]) -> list["MdevType"]:
        """Types whose static attributes a sibling VF showed: only available_instances is read (the hot
        loop of a discovery on an SR-IOV vGPU host, hence written out)."""
        out = []
        o_rdonly, open_, read, close = os.O_RDONLY, os.open, os.read, os.close
        for tname in names:
            k = known.get(tname)
            try:
                fd = open_(tname + "/available_instances", o_rdonly, dir_fd=types_fd)
                try:
                    avail = int(read(fd, 64))
                finally:
                    close(fd)
            except (OSError, ValueError):
                k = None
            if k is None:            # the full read reports whatever is wrong
                t = self._mdev_type(types_fd, types_dir, tname)
                if t is not None:
                    out.append(t)
                continue
            out.append(MdevType(tname, k.name, k.description, avail, k.device_api))
        return out

    def mdev_devices(self) -> list[MdevDevice]:
        base = self.p("sys/bus/mdev/devices")
        out = []
        for name in self._listdir(base, "mdev device list"):
            link = os.path.join(base, name)
            if not UUID_RE.match(name):
                self.warn(link, "entry is not an mdev UUID")
                continue
            # parent and type resolved the way mdevctl does (dirname of the device's path, basename of the
            # mdev_type target); sysfs links point at canonical paths, so reading the link replaces realpath
            try:
                real = os.path.normpath(os.path.join(base, os.readlink(link)))
            except OSError:
                real = os.path.realpath(link)
            type_link = os.path.join(real, "mdev_type")
            try:
                type_real = os.path.normpath(os.path.join(real, os.readlink(type_link)))
            except OSError:
                type_real = ""
            # a link read inside the device proves the device a directory: its stat only when none was read
            if not type_real and not os.path.isdir(real):
                self.warn(link, "mdev device link is dangling (device being removed?)")
                continue
            if not type_real or not os.path.isdir(type_real):
                self.warn(type_link, "mdev device has no valid mdev_type link (half-removed device?)")
                continue
            out.append(MdevDevice(uuid=name, parent=os.path.basename(os.path.dirname(real)),
                                  type=os.path.basename(type_real),
                                  iommu_group=_group(os.path.join(real, "iommu_group"))))
        return out

    # --- vendor-specific VFIO ----------------------------------------------------------------------------------
    def vfio_vfs(self, pci: list[PciDevice] | None = None) -> list[VfioVf]:
        base = self.p("sys/bus/pci/devices")
        names = [d.address for d in pci] if pci is not None else self._listdir(base, "PCI device list")
        out = []
        try:
            bfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY) if names else -1
        except OSError:
            return out
        try:
            for name in names:
                # one stat per PCI function, relative to the list's directory; the rest only on VFs that have
                # the vendor-specific interface
                if _exists_at(bfd, name + "/nvidia/current_vgpu_type"):
                    vf = self._vfio_vf(base, name)
                    if vf is not None:
                        out.append(vf)
        finally:
            if bfd >= 0:
                os.close(bfd)
        return out

    def _vfio_vf(self, base: str, name: str) -> VfioVf | None:
        ndir = os.path.join(base, name, "nvidia")
        cur_path = os.path.join(ndir, "current_vgpu_type")
        try:
            cur_text = _read(cur_path).strip()
            current = int(cur_text, 10)
        except (OSError, ValueError) as exc:
            self.warn(cur_path, f"unreadable current_vgpu_type ({_why(exc)})")
            return None
        creatable: list[VfioVgpuType] = []
        ct_path = os.path.join(ndir, "creatable_vgpu_types")
        try:
            creatable = parse_creatable(_read(ct_path), lambda msg: self.warn(ct_path, msg))
        except OSError as exc:
            self.warn(ct_path, f"cannot read creatable_vgpu_types: {exc.strerror}")
        return VfioVf(address=name, physfn=_link_name(os.path.join(base, name, "physfn")),
                      current_type=current, creatable_types=creatable,
                      iommu_group=_group(os.path.join(base, name, "iommu_group")))


def parse_creatable(text: str, warn: Any = None) -> list[VfioVgpuType]:
    """Parse ``creatable_vgpu_types``: a header ``ID    : vGPU Name`` then ``%-5d : %s`` lines.

    The KubeVirt device plugin README shows the list without its header and with single spaces, so the
    header is optional and spacing is free.
    """
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        left, sep, right = line.partition(":")
        if not sep:
            if warn:
                warn(f"line {lineno} is not 'ID : name': {line.strip()[:60]!r}")
            continue
        left = left.strip()
        if left == "ID" and right.strip() == "vGPU Name":
            continue
        if not left.isdigit():
            if warn:
                warn(f"line {lineno} has a non-numeric type id: {left[:20]!r}")
            continue
        out.append(VfioVgpuType(id=int(left), name=right.strip()))
    return out


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _opt_hex(path: str) -> int | None:
    try:
        return int(_read(path).strip(), 16)
    except (OSError, ValueError):
        return None


def _group(link: str) -> int | None:
    name = _link_name(link)
    return int(name) if name and name.isdigit() else None
