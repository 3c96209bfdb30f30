"""What ``gpuvirt attach`` prints: one device handed to one VM, rendered for libvirt, QEMU, cloud-hypervisor or
as JSON data (the schema is documented in docs/vmm-handoff.md).

A :class:`Handoff` is plain validated data; it is built by the attach service from an inventory row and knows
nothing about the host.  Every identifier is normalised in ``__post_init__``, so no unvalidated token can reach
any of the renderings.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gpuvirt.errors import UsageError
from gpuvirt.vmm import cloud_hypervisor, qemu
from gpuvirt.vmm.libvirt import mdev_hostdev, normalize_pci_address, normalize_uuid, pci_hostdev, validate_vm_name

FORMATS = ("libvirt", "qemu", "cloud-hypervisor", "json")
_MAX_TENANT = 128

QEMU_NO_VM_UUID_WARNING = (
    "qemu_args lack -uuid: NVIDIA vGPU needs '-uuid <vm-uuid>' on the QEMU command line (error 0x57 without "
    "it) and the VM's UUID is not known; add it, or attach with the VM UUID (libvirt passes it by itself)"
)
CH_DISPLAY_WARNING = "cloud-hypervisor has no vGPU display/ramfb option; display and ramfb are ignored there"


@dataclass(frozen=True)
class Handoff:
    vm: str
    vm_uuid: str | None
    tenant: str | None
    instance: int
    kind: str  # "mdev" | "pci"
    uuid: str | None = None  # mdev UUID (kind "mdev")
    pci_address: str | None = None  # VF address (kind "pci")
    nvidia: bool = False  # an NVIDIA vGPU: QEMU needs -uuid, cloud-hypervisor is flagged
    display: bool = False
    ramfb: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("vm", validate_vm_name(self.vm))
        if self.vm_uuid is not None:
            put("vm_uuid", normalize_uuid(self.vm_uuid, "VM UUID"))
        if self.tenant is not None and (not isinstance(self.tenant, str) or not self.tenant
                                        or len(self.tenant) > _MAX_TENANT
                                        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in self.tenant)):
            raise UsageError(f"invalid tenant {str(self.tenant)[:40]!r}: 1-{_MAX_TENANT} printable characters")
        # bool is an int subclass; an instance id of True would be a bug upstream, not an id
        if not isinstance(self.instance, int) or isinstance(self.instance, bool) or self.instance < 0:
            raise UsageError(f"invalid instance id {self.instance!r}")
        if self.kind == "mdev":
            if self.pci_address is not None:
                raise UsageError("an mdev hand-off has a UUID, not a PCI address")
            put("uuid", normalize_uuid(self.uuid, "mdev UUID"))
            if self.ramfb and not self.display:
                raise UsageError("ramfb requires display: QEMU refuses ramfb=on on a vfio-pci device without "
                                 "display=on")
        elif self.kind == "pci":
            if self.uuid is not None:
                raise UsageError("a PCI hand-off has a PCI address, not an mdev UUID")
            put("pci_address", normalize_pci_address(self.pci_address))
            if self.display or self.ramfb:
                raise UsageError("display/ramfb apply to mdev devices only, not to a PCI (VF) hand-off")
        else:
            raise UsageError(f"unknown hand-off kind {self.kind!r}: expected 'mdev' or 'pci'")
        for flag in ("nvidia", "display", "ramfb"):
            put(flag, bool(getattr(self, flag)))

    @property
    def target(self) -> str:
        """The device as the VMMs name it: the mdev UUID or the PCI address."""
        return self.uuid if self.kind == "mdev" else self.pci_address  # type: ignore[return-value]

    def libvirt_xml(self) -> str:
        if self.kind == "mdev":
            return mdev_hostdev(self.target, display=self.display, ramfb=self.ramfb)
        return pci_hostdev(self.target)

    def qemu_args(self) -> list[str]:
        """Raises UsageError for an NVIDIA vGPU whose VM UUID is unknown (see :mod:`gpuvirt.vmm.qemu`)."""
        return qemu.qemu_args(self.kind, self.target, vm_uuid=self.vm_uuid, nvidia=self.nvidia,
                              display=self.display, ramfb=self.ramfb)

    def cloud_hypervisor_args(self) -> list[str]:
        return cloud_hypervisor.ch_args(self.kind, self.target, nvidia=self.nvidia)[0]

    def warnings(self, fmt: str = "json") -> list[str]:
        """Warnings that go with the rendering ``fmt`` (all of them for json)."""
        out: list[str] = []
        if fmt == "json" and self.nvidia and self.vm_uuid is None:
            # only json degrades gracefully; --format qemu refuses instead (see qemu_args)
            out.append(QEMU_NO_VM_UUID_WARNING)
        if fmt in ("cloud-hypervisor", "json"):
            out.extend(cloud_hypervisor.ch_args(self.kind, self.target, nvidia=self.nvidia)[1])
            if self.display:
                out.append(CH_DISPLAY_WARNING)
        return out

    def to_json(self) -> dict[str, Any]:
        """The hand-off as data (``attach --format json``); schema in docs/vmm-handoff.md.

        For an NVIDIA vGPU whose VM UUID is unknown, ``qemu_args`` holds the ``-device`` pair only and
        ``warnings`` says that ``-uuid`` must be added: the rest of the document is still useful (libvirt adds
        the UUID itself), so one missing field does not fail the whole attach output.
        """
        if self.nvidia and self.vm_uuid is None:
            qargs = qemu.device_args(self.kind, self.target, display=self.display, ramfb=self.ramfb)
        else:
            qargs = self.qemu_args()
        doc: dict[str, Any] = {"vm": self.vm, "tenant": self.tenant, "instance": self.instance, "kind": self.kind}
        if self.kind == "mdev":
            doc["uuid"] = self.uuid
        else:
            doc["pci_address"] = self.pci_address
        doc["libvirt_xml"] = self.libvirt_xml()
        doc["qemu_args"] = qargs
        doc["cloud_hypervisor_args"] = self.cloud_hypervisor_args()
        doc["warnings"] = self.warnings("json")
        return doc


def _as_list(handoffs: Handoff | Iterable[Handoff]) -> list[Handoff]:
    items = [handoffs] if isinstance(handoffs, Handoff) else list(handoffs)
    if not items:
        raise UsageError("nothing to render: no hand-off")
    if not all(isinstance(h, Handoff) for h in items):
        raise TypeError("render() takes Handoff objects")
    return items


def _check_one_vm(items: list[Handoff], fmt: str) -> None:
    vms = {h.vm for h in items}
    if len(vms) > 1:
        raise UsageError(f"--format {fmt} renders the devices of one VM, got {len(vms)} VMs")
    seen: set[tuple[str, str]] = set()
    for h in items:
        key = (h.kind, h.target)
        if key in seen:
            raise UsageError(f"device {h.target} appears twice for VM {h.vm}")
        seen.add(key)
    if sum(1 for h in items if h.ramfb) > 1:
        # libvirt refuses a domain with ramfb on more than one vGPU (domain_validate.c); so would QEMU's fw_cfg
        raise UsageError("ramfb can be enabled on only one vGPU per VM")


def render(handoffs: Handoff | Iterable[Handoff], fmt: str) -> str:
    """Text for ``attach --format FMT`` (no trailing newline).

    libvirt: the ``<hostdev>`` element(s), one after the other; qemu: one line of shell-quoted arguments with a
    single ``-uuid`` for NVIDIA vGPUs; cloud-hypervisor: one line, all devices under one ``--device``; json: one
    object for one hand-off, a list for several.  Warnings for a format come from :func:`warnings_for`.
    """
    items = _as_list(handoffs)
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "json":
        docs = [h.to_json() for h in items]
        return json.dumps(docs[0] if len(docs) == 1 else docs, indent=2, ensure_ascii=False)
    _check_one_vm(items, fmt)
    if fmt == "libvirt":
        return "\n".join(h.libvirt_xml() for h in items)
    if fmt == "qemu":
        args: list[str] = []
        vm_uuids = set()
        for h in items:
            a = h.qemu_args()  # raises for NVIDIA without a VM UUID: a QEMU line without -uuid cannot work
            if h.nvidia:
                vm_uuids.add(a[-1])
                a = a[:-2]
            args += a
        if len(vm_uuids) > 1:
            raise UsageError("the hand-offs disagree on the VM UUID; QEMU takes one -uuid")
        if vm_uuids:
            args += ["-uuid", vm_uuids.pop()]
        return shlex.join(args)
    # cloud-hypervisor: one --device flag followed by every path=... (its documented multi-device syntax)
    paths = [h.cloud_hypervisor_args()[1] for h in items]
    return shlex.join(["--device", *paths])


def warnings_for(handoffs: Handoff | Iterable[Handoff], fmt: str) -> list[str]:
    """De-duplicated warnings the CLI prints on stderr next to ``render(handoffs, fmt)``."""
    out: list[str] = []
    for h in _as_list(handoffs):
        for w in h.warnings(fmt):
            if w not in out:
                out.append(w)
    return out


__all__ = ["FORMATS", "Handoff", "render", "warnings_for"]
