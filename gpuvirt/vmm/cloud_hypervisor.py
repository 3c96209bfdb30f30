"""cloud-hypervisor arguments: ``--device path=<sysfs path of the VFIO device>/``.

cloud-hypervisor takes any VFIO device by its sysfs directory (docs/vfio.md); the trailing '/' is how its
documentation writes the path.  Several devices share one ``--device`` flag (``--device path=A/ path=B/``),
which :func:`gpuvirt.vmm.handoff.render` uses when it prints more than one.

NVIDIA vGPU is flagged, not refused: cloud-hypervisor has no equivalent of QEMU's ``-uuid``, which the NVIDIA
vGPU manager needs (error 0x57 without it, cloud-hypervisor issue #5319), and a 2025 report still saw the
guest driver fail (issue #7572).  Whether it works with current releases is UNVERIFIED either way, so the
arguments are produced together with a warning.
"""

from __future__ import annotations

from gpuvirt.errors import UsageError
from gpuvirt.vmm.libvirt import normalize_pci_address, normalize_uuid

NVIDIA_VGPU_WARNING = (
    "cloud-hypervisor has no -uuid equivalent, which the NVIDIA vGPU manager requires (error 0x57; "
    "cloud-hypervisor issues #5319 and #7572): treat NVIDIA vGPU on cloud-hypervisor as unsupported "
    "(UNVERIFIED either way)"
)


def device_path(kind: str, target: str) -> str:
    """sysfs directory of the device, as cloud-hypervisor's ``path=`` wants it (trailing '/')."""
    if kind == "mdev":
        return f"/sys/bus/mdev/devices/{normalize_uuid(target, 'mdev UUID')}/"
    if kind == "pci":
        return f"/sys/bus/pci/devices/{normalize_pci_address(target)}/"
    raise UsageError(f"unknown device kind {kind!r}: expected 'mdev' or 'pci'")


def ch_args(kind: str, target: str, *, nvidia: bool = False) -> tuple[list[str], list[str]]:
    """(arguments, warnings) handing one device to a cloud-hypervisor guest."""
    warnings = [NVIDIA_VGPU_WARNING] if nvidia else []
    return ["--device", f"path={device_path(kind, target)}"], warnings


__all__ = ["NVIDIA_VGPU_WARNING", "ch_args", "device_path"]
