"""The ``Host`` facade: every change gpuvirt makes to a machine goes through these methods.

Tokens that end up in paths (parent names, type ids, UUIDs, PCI addresses) are validated and normalised
here before any path is built: a VM name or a hook argument can never reach the filesystem unchecked.
Failures carry the device, the type and what the host says about capacity, instead of a bare errno
(mdevctl issue #115 shows how little "Invalid argument (os error 22)" tells an operator).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from gpuvirt.errors import (
    CapacityError,
    DeviceGoneError,
    InvalidArgumentError,
    NoCapacityError,
    SysfsError,
    UsageError,
)
from gpuvirt.host.scan import PCI_ADDR_RE, UUID_RE, Scanner, parse_creatable
from gpuvirt.host.sysfs import KernelIO, RealKernel, Sysfs, translate_oserror

_SHORT_PCI = re.compile(r"^([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
_LONG_PCI = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
_NVML_PCI = re.compile(r"^([0-9a-fA-F]{8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
_PARENT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_TYPE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def normalize_pci(text: str) -> str:
    """Canonical ``dddd:bb:ss.f`` lowercase from ``41:00.4``, ``0000:41:00.4``, ``00000000:41:00.4``."""
    t = text.strip()
    m = _LONG_PCI.match(t)
    if m:
        return f"{m.group(1)}:{m.group(2)}:{m.group(3)}.{m.group(4)}".lower()
    m = _NVML_PCI.match(t)
    if m:
        return f"{int(m.group(1), 16):04x}:{m.group(2)}:{m.group(3)}.{m.group(4)}".lower()
    m = _SHORT_PCI.match(t)
    if m:
        return f"0000:{m.group(1)}:{m.group(2)}.{m.group(3)}".lower()
    raise UsageError(f"'{text}' is not a PCI address (expected dddd:bb:ss.f, e.g. 0000:41:00.4)")


def is_pci_address(text: str) -> bool:
    try:
        normalize_pci(text)
        return True
    except UsageError:
        return False


def normalize_uuid(text: str) -> str:
    t = text.strip().lower()
    if not UUID_RE.match(t):
        raise UsageError(f"'{text}' is not a UUID (expected 8-4-4-4-12 hex digits)")
    return t


def normalize_parent(text: str) -> str:
    t = text.strip()
    if is_pci_address(t):
        return normalize_pci(t)
    if _PARENT_NAME.match(t):
        return t
    raise UsageError(f"'{text}' is not an mdev parent name (a PCI address or a driver name like mtty)")


def check_type_id(text: str) -> str:
    t = text.strip()
    if not _TYPE_ID.match(t):
        raise UsageError(f"'{text}' is not an mdev type id (e.g. nvidia-468, i915-GVTg_V5_4, mtty-1)")
    return t


NVML_LIBRARY = "libnvidia-ml.so.1"
NVML_LIBRARY_MISSING = f"NVML not available: NVIDIA driver library {NVML_LIBRARY} not found"


class Host:
    """One machine (real or simulated) seen through sysfs under ``root`` and NVML."""

    def __init__(self, root: str | os.PathLike[str] = "/", kernel: KernelIO | None = None,
                 nvml_lib: Any = None, use_udev: bool | None = None, registration_wait: float = 0.0) -> None:
        self.root = Path(root)
        self.sysfs = Sysfs(self.root, kernel or RealKernel())
        self._nvml_lib = nvml_lib
        self._nvml = None
        self.use_udev = (str(self.root) == "/") if use_udev is None else use_udev
        # SR-IOV VFs can take a moment to appear and nvidia-vgpud registers their vGPU types some time later
        # (nvidia-vgpu.md sections 2.2 and 5): what waits for them shares this budget, per Host object
        self.registration_wait = max(0.0, float(registration_wait))
        self._wait_deadline: float | None = None

    # --- waiting for the host to settle -------------------------------------------------------------------------------
    def _wait_until(self, ready: Any) -> bool:
        """Poll ``ready()`` until it is true or the shared registration budget is spent."""
        if ready():
            return True
        if self.registration_wait <= 0:
            return False
        import time

        if self._wait_deadline is None:
            self._wait_deadline = time.monotonic() + self.registration_wait
        delay = 0.05
        while time.monotonic() < self._wait_deadline:
            time.sleep(min(delay, max(0.0, self._wait_deadline - time.monotonic())))
            if ready():
                return True
            delay = min(delay * 2, 0.5)
        return ready()

    def _vfs_on_their_way(self) -> bool:
        """Has some PF more VFs enabled (``sriov_numvfs``) than functions present (``virtfnN``)?"""
        base = self.sysfs.path("sys/bus/pci/devices")
        try:
            names = os.listdir(base)
        except OSError:
            return False
        for name in names:
            d = base / name
            try:
                num = int(self.sysfs.read_attr(d / "sriov_numvfs"))
            except (OSError, ValueError):
                continue
            if num and sum(1 for e in os.listdir(d) if e.startswith("virtfn")) < num:
                return True
        return False

    def _registering(self, parent: str) -> bool:
        """Could the vGPU types of PCI function ``parent`` still appear?  True while it is a VF on its way, or
        a function bound to ``nvidia`` that is not an mdev parent / has an empty creatable list yet."""
        if not is_pci_address(parent):
            return False
        d = self.pci_dir(parent)
        if not d.exists():
            return self._vfs_on_their_way()
        try:
            driver = os.path.basename(os.readlink(d / "driver"))
        except OSError:
            return False
        if driver != "nvidia":
            return False
        if (d / "mdev_supported_types").is_dir():
            return False
        creatable = d / "nvidia" / "creatable_vgpu_types"
        if not creatable.exists():
            return True
        try:
            if parse_creatable(self.sysfs.read(creatable)):
                return False
        except OSError:
            return True
        # an empty list also means "board full": only a board without any vGPU can still be registering
        return not self._board_has_vgpu(d)

    def _board_has_vgpu(self, vf_dir: Path) -> bool:
        pf = (vf_dir / "physfn").resolve() if (vf_dir / "physfn").exists() else vf_dir
        for entry in os.listdir(pf) if pf.is_dir() else []:
            if entry.startswith("virtfn"):
                try:
                    if int(self.sysfs.read_attr(pf / entry / "nvidia" / "current_vgpu_type")):
                        return True
                except (OSError, ValueError):
                    continue
        return False

    # --- sessions ---------------------------------------------------------------------------------------------
    def scanner(self) -> Scanner:
        return Scanner(self.root)

    def nvml_library_missing(self) -> str | None:
        """Why NVML cannot be opened, found without importing pynvml: the reason NvmlSession would give when
        libnvidia-ml.so.1 cannot be loaded, else None (then open the session to know more).

        Discovery asks first: on a host whose driver is not installed, importing pynvml to learn that costs
        more than the rest of discovery.  pynvml itself loads nothing but ``CDLL("libnvidia-ml.so.1")`` on
        Linux, so the same load failing here means the same answer."""
        if self._nvml is not None or self._nvml_lib is not None:
            return None
        import ctypes

        try:
            ctypes.CDLL(NVML_LIBRARY)
        except OSError:
            return NVML_LIBRARY_MISSING
        return None

    def nvml(self):
        """The host's NVML session (opened once; ``available`` is False on hosts without the driver)."""
        if self._nvml is None:
            from gpuvirt.host.nvml import NvmlSession

            self._nvml = NvmlSession(self._nvml_lib)
            self._nvml.open()
        return self._nvml

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- paths ------------------------------------------------------------------------------------------------
    def pci_dir(self, address: str) -> Path:
        return self.sysfs.path(f"sys/bus/pci/devices/{normalize_pci(address)}")

    def mdev_parent_dir(self, parent: str) -> Path:
        return self.sysfs.path(f"sys/class/mdev_bus/{normalize_parent(parent)}")

    def mdev_dir(self, uuid: str) -> Path:
        return self.sysfs.path(f"sys/bus/mdev/devices/{normalize_uuid(uuid)}")

    # --- mdev ---------------------------------------------------------------------------------------------------
    def mdev_exists(self, uuid: str) -> bool:
        return self.mdev_dir(uuid).is_dir()

    def mdev_available(self, parent: str, type_id: str) -> int | None:
        p = self.mdev_parent_dir(parent) / "mdev_supported_types" / check_type_id(type_id) / "available_instances"
        try:
            return int(self.sysfs.read_attr(p))
        except (OSError, ValueError):
            return None

    def create_mdev(self, parent: str, type_id: str, uuid: str) -> None:
        parent = normalize_parent(parent)
        type_id = check_type_id(type_id)
        uuid = normalize_uuid(uuid)
        pdir = self.mdev_parent_dir(parent)
        tdir = pdir / "mdev_supported_types" / type_id
        if not tdir.is_dir() and self._registering(parent):
            self._wait_until(lambda: tdir.is_dir() or not self._registering(parent))
        if not pdir.exists():
            raise DeviceGoneError(f"mdev parent {parent} does not exist on this host "
                                  "(SR-IOV VFs not enabled, or the vGPU manager not loaded?)", path=str(pdir))
        if not tdir.is_dir():
            raise InvalidArgumentError(f"mdev parent {parent} does not support type {type_id}", path=str(tdir))
        action = f"create mdev {uuid} of type {type_id}{self._type_label(tdir)} on {parent}"
        try:
            self.sysfs.kernel.write(tdir / "create", uuid + "\n")
        except OSError as exc:
            raise self._create_error(exc, action, parent, type_id, tdir) from exc

    def _type_label(self, tdir: Path) -> str:
        try:
            return f" ({self.sysfs.read_attr(tdir / 'name')})"
        except OSError:
            return ""

    def _create_error(self, exc: OSError, action: str, parent: str, type_id: str, tdir: Path) -> SysfsError:
        avail = None
        try:
            avail = int(self.sysfs.read_attr(tdir / "available_instances"))
        except (OSError, ValueError):
            pass
        import errno as E

        if exc.errno == E.EEXIST:
            return translate_oserror(exc, action, tdir / "create", "that UUID is already used by another mdev")
        if avail == 0 or exc.errno in (E.EUSERS, E.ENOSPC, E.ENOMEM, E.EDQUOT):
            active = self.active_types_near(parent)
            hint = "no capacity: available_instances is 0"
            if active:
                hint += "; active on this GPU: " + ", ".join(f"{n} x{c}" for n, c in sorted(active.items()))
            return translate_oserror(exc, action, tdir / "create", hint, cls=NoCapacityError)
        return translate_oserror(exc, action, tdir / "create")

    def active_types_near(self, parent: str) -> dict[str, int]:
        """Types of the mdevs on this parent and on its sibling VFs (the same physical GPU)."""
        parents = {parent}
        pci = self.sysfs.path(f"sys/bus/pci/devices/{parent}")
        physfn = pci / "physfn"
        pf = pci if not physfn.exists() else physfn.resolve()
        if pf.exists():
            parents.add(pf.name)
            for entry in os.listdir(pf) if pf.is_dir() else []:
                if entry.startswith("virtfn"):
                    parents.add(os.path.basename(os.readlink(pf / entry)))
        counts: dict[str, int] = {}
        for dev in self.scanner().mdev_devices():
            if dev.parent in parents:
                tdir = self.sysfs.path(f"sys/class/mdev_bus/{dev.parent}/mdev_supported_types/{dev.type}")
                label = self._type_label(tdir).strip(" ()") or dev.type
                counts[label] = counts.get(label, 0) + 1
        return counts

    def remove_mdev(self, uuid: str) -> None:
        uuid = normalize_uuid(uuid)
        d = self.mdev_dir(uuid)
        if not d.exists():
            raise DeviceGoneError(f"mdev {uuid} does not exist", path=str(d))
        self.sysfs.write(d / "remove", "1\n", f"remove mdev {uuid}",
                         hint=None, uuid=uuid)

    # --- vendor-specific VFIO ----------------------------------------------------------------------------------
    def vf_nvidia_dir(self, vf: str) -> Path:
        return self.pci_dir(vf) / "nvidia"

    def current_vgpu_type(self, vf: str) -> int:
        p = self.vf_nvidia_dir(vf) / "current_vgpu_type"
        try:
            return int(self.sysfs.read_attr(p))
        except FileNotFoundError as exc:
            raise DeviceGoneError(f"{normalize_pci(vf)} is not a vendor-specific VFIO vGPU VF", path=str(p)) from exc
        except (OSError, ValueError) as exc:
            raise SysfsError(f"cannot read {p}: {exc}", path=str(p)) from exc

    def creatable_vgpu_types(self, vf: str) -> dict[int, str]:
        p = self.vf_nvidia_dir(vf) / "creatable_vgpu_types"
        try:
            return {t.id: t.name for t in parse_creatable(self.sysfs.read(p))}
        except OSError as exc:
            raise translate_oserror(exc, f"read creatable vGPU types of {vf}", p) from exc

    def set_vgpu_type(self, vf: str, type_id: int, type_name: str | None = None) -> None:
        vf = normalize_pci(vf)
        if not isinstance(type_id, int) or type_id <= 0:
            raise UsageError(f"invalid vGPU type id {type_id!r}")
        p = self.vf_nvidia_dir(vf) / "current_vgpu_type"
        label = f"{type_id}" + (f" ({type_name})" if type_name else "")
        if self._registering(vf):
            self._wait_until(lambda: not self._registering(vf))
        try:
            self.sysfs.kernel.write(p, f"{type_id}\n")
        except OSError as exc:
            import errno as E

            if exc.errno == E.EPERM:
                hint = f"the VF already carries vGPU type {self._safe_current(vf)}; clear it first"
                raise translate_oserror(exc, f"set vGPU type {label} on VF {vf}", p, hint) from exc
            creatable = {}
            try:
                creatable = self.creatable_vgpu_types(vf)
            except SysfsError:
                pass
            if type_id not in creatable:
                hint = "type not creatable on this GPU now" + (
                    f" (creatable: {', '.join(sorted(set(creatable.values())))})" if creatable else
                    " (no type is creatable: the GPU is full)")
                raise translate_oserror(exc, f"set vGPU type {label} on VF {vf}", p, hint,
                                        cls=NoCapacityError) from exc
            raise translate_oserror(exc, f"set vGPU type {label} on VF {vf}", p) from exc

    def _safe_current(self, vf: str) -> str:
        try:
            return str(self.current_vgpu_type(vf))
        except SysfsError:
            return "?"

    def clear_vgpu_type(self, vf: str) -> None:
        vf = normalize_pci(vf)
        p = self.vf_nvidia_dir(vf) / "current_vgpu_type"
        self.sysfs.write(p, "0\n", f"clear vGPU type on VF {vf}",
                         hint="a VM may still hold the VF open (the VFIO device must be closed first)")

    # --- SR-IOV / reset -----------------------------------------------------------------------------------------
    def sriov_state(self, pf: str) -> tuple[int, int]:
        d = self.pci_dir(pf)
        try:
            return (int(self.sysfs.read_attr(d / "sriov_totalvfs")), int(self.sysfs.read_attr(d / "sriov_numvfs")))
        except FileNotFoundError as exc:
            raise DeviceGoneError(f"{normalize_pci(pf)} is not an SR-IOV physical function", path=str(d)) from exc
        except (OSError, ValueError) as exc:
            raise SysfsError(f"cannot read SR-IOV state of {pf}: {exc}", path=str(d)) from exc

    def enable_vfs(self, pf: str, count: int | None = None) -> int:
        """Enable ``count`` VFs (default: all).  Idempotent when that many are already enabled.

        Written to ``sriov_numvfs`` like the kernel expects; changing a non-zero count needs 0 first
        (``sriov_numvfs_store`` returns EBUSY), which we do not do silently because it destroys every VF.
        """
        total, current = self.sriov_state(pf)
        want = total if count is None else count
        if want < 0 or want > total:
            raise UsageError(f"{normalize_pci(pf)} supports 0..{total} VFs, not {want}")
        if current == want:
            return current
        d = self.pci_dir(pf)
        self.sysfs.write(d / "sriov_numvfs", f"{want}\n", f"enable {want} SR-IOV VFs on {pf}",
                         hint=(f"{current} VFs are already enabled; disable them first" if current else None))
        # the write returns before every function exists on some drivers: wait (bounded) for them, so the
        # caller can use them at once; their vGPU types are waited for where they are used
        self._wait_until(lambda: sum(1 for e in os.listdir(d) if e.startswith("virtfn")) >= want)
        return want

    def disable_vfs(self, pf: str) -> None:
        self.sysfs.write(self.pci_dir(pf) / "sriov_numvfs", "0\n", f"disable SR-IOV VFs on {pf}")

    def reset_gpu(self, address: str) -> None:
        addr = normalize_pci(address)
        self.sysfs.write(self.pci_dir(addr) / "reset", "1\n", f"reset GPU {addr}",
                         hint="stop every process and VM using the GPU, or reboot")

    def require_capacity(self, parent: str, type_id: str) -> int:
        avail = self.mdev_available(parent, type_id)
        if avail is None:
            raise DeviceGoneError(f"{parent} has no mdev type {type_id}")
        if avail <= 0:
            raise CapacityError(f"no capacity for {type_id} on {parent}")
        return avail


__all__ = ["Host", "normalize_pci", "normalize_uuid", "normalize_parent", "check_type_id", "is_pci_address",
           "PCI_ADDR_RE"]
