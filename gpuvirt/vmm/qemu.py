"""QEMU command-line arguments for handing a gpuvirt device to a guest started without libvirt.

* mdev: ``-device vfio-pci,sysfsdev=/sys/bus/mdev/devices/<uuid>`` (the kernel's mdev documentation and
  public QEMU command lines use ``sysfsdev=``; mdevs have no PCI address to give to ``host=``);
* PCI (vendor-specific VFIO VF or plain SR-IOV VF): ``-device vfio-pci,host=<BDF>`` (as Proxmox does);
* NVIDIA vGPU additionally needs ``-uuid <vm-uuid>``: the vGPU manager's QEMU-side plugin reads the VM UUID
  from the command line and without it fails with ``vmiop_env_log: Failed to get VM UUID from QEMU
  command-line 0x57`` / ``kvm_plugin_global_init failed with error 0x57`` (DualCoder/vgpu_unlock issue #71;
  Proxmox qemu-server adds ``-uuid`` for NVIDIA devices for this reason).  libvirt always passes the domain
  UUID itself, so this only matters for hand-written QEMU command lines.
"""

from __future__ import annotations

from gpuvirt.errors import UsageError
from gpuvirt.vmm.libvirt import normalize_pci_address, normalize_uuid

MDEV_SYSFS = "/sys/bus/mdev/devices"

# QEMU only has the "ramfb" property on the vfio-pci-nohotplug variant of the device (hw/vfio/pci.c: it
# is registered for that type alone, because a boot framebuffer in guest RAM cannot be hot-unplugged);
# libvirt switches to that driver for the same reason when an mdev hostdev has ramfb='on'.
_DRIVER = "vfio-pci"
_DRIVER_RAMFB = "vfio-pci-nohotplug"


def device_args(kind: str, target: str, *, display: bool = False, ramfb: bool = False) -> list[str]:
    """The ``-device`` pair for one device, without ``-uuid`` (see :func:`qemu_args`)."""
    if kind == "mdev":
        uuid = normalize_uuid(target, "mdev UUID")
        if ramfb and not display:
            # QEMU's vfio-pci realize fails with "ramfb=on requires display=on" (hw/vfio/pci.c)
            raise UsageError("ramfb requires display: QEMU refuses ramfb=on on a vfio-pci device without "
                             "display=on")
        driver = _DRIVER_RAMFB if ramfb else _DRIVER
        opts = f"{driver},sysfsdev={MDEV_SYSFS}/{uuid}"
        if display:
            opts += ",display=on"
        if ramfb:
            opts += ",ramfb=on"
        return ["-device", opts]
    if kind == "pci":
        bdf = normalize_pci_address(target)
        if display or ramfb:
            # libvirt offers display/ramfb only for mdev hostdevs; keep the QEMU hand-off consistent with it
            raise UsageError("display/ramfb apply to mdev devices only, not to a PCI (VF) hand-off")
        return ["-device", f"{_DRIVER},host={bdf}"]
    raise UsageError(f"unknown device kind {kind!r}: expected 'mdev' or 'pci'")


def qemu_args(kind: str, target: str, *, vm_uuid: str | None = None, nvidia: bool = False, display: bool = False,
              ramfb: bool = False) -> list[str]:
    """QEMU arguments handing one device to a guest; ``target`` is the mdev UUID or the PCI address.

    ``nvidia=True`` marks an NVIDIA vGPU (mdev, or a vendor-specific-VFIO VF with a vGPU type): ``-uuid
    <vm_uuid>`` is appended, and a missing ``vm_uuid`` is an error rather than a command line that would
    only fail inside the vGPU manager at boot with error 0x57.
    """
    args = device_args(kind, target, display=display, ramfb=ramfb)
    if nvidia:
        if vm_uuid is None:
            raise UsageError("NVIDIA vGPU needs the VM UUID on the QEMU command line (-uuid): the vGPU manager "
                             "fails with error 0x57 without it; give attach the VM's UUID (or a domain XML "
                             "with a <uuid>)")
        args += ["-uuid", normalize_uuid(vm_uuid, "VM UUID")]
    return args


__all__ = ["MDEV_SYSFS", "device_args", "qemu_args"]
