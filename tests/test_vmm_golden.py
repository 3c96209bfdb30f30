"""Golden-file tests for every VMM hand-off format (gpuvirt.vmm).

Each case renders one output and compares it byte for byte with ``tests/golden/vmm/<name>``.  The inputs
for the full-domain cases are gpuvirt's own templates ``tests/golden/vmm/base-domain-*.xml``.

After an intended change of an output format, regenerate the files and review the diff::

    GPUVIRT_REGENERATE_GOLDEN=1 .venv/bin/pytest tests/test_vmm_golden.py
    git diff tests/golden/vmm/

With the variable set, every case rewrites its golden file with the current output instead of comparing
(like virt-manager's ``--regenerate-output``); without it a missing golden file is a failure, never created
silently.  test_vmm_validate.py checks the golden domain and nodedev files against libvirt's schemas.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpuvirt.vmm import cloud_hypervisor, handoff, libvirt, mdevctl, qemu
from gpuvirt.vmm.handoff import Handoff, render

GOLDEN = Path(__file__).resolve().parent / "golden" / "vmm"
REGENERATE = os.environ.get("GPUVIRT_REGENERATE_GOLDEN") == "1"

MDEV_UUID = "aa618089-8b16-4d01-a136-25a0f3c73123"
MDEV_UUID_2 = "3c1f52b0-9d4e-4a7b-8f21-6e0d9b5a7c42"
VF = "0000:41:00.4"
VM_UUID_MDEV = "0b5c3e7e-1f0d-4c84-8e41-5b7f2a9d6c10"  # the <uuid> of base-domain-mdev.xml
VM_UUID_VF = "4d2a9c61-7e3b-4f05-b1c8-93e0d5a7f222"  # the <uuid> of base-domain-vf.xml


def check_golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if REGENERATE:
        path.write_text(actual, encoding="utf-8", newline="")
        return
    assert path.exists(), f"golden file {path} is missing; create it with GPUVIRT_REGENERATE_GOLDEN=1"
    expected = path.read_text(encoding="utf-8")
    assert actual == expected, f"{name} differs from the golden file; if intended, regenerate (see docstring)"


def base(name: str) -> str:
    return (GOLDEN / name).read_text(encoding="utf-8")


def mdev_handoff(**kw) -> Handoff:
    args = dict(vm="golden-mdev-guest", vm_uuid=VM_UUID_MDEV, tenant="acme", instance=7, kind="mdev",
                uuid=MDEV_UUID, nvidia=True)
    args.update(kw)
    return Handoff(**args)


def vf_handoff(**kw) -> Handoff:
    args = dict(vm="golden-vf-guest", vm_uuid=VM_UUID_VF, tenant="acme", instance=12, kind="pci",
                pci_address=VF, nvidia=True)
    args.update(kw)
    return Handoff(**args)


# --- libvirt ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text", [
    ("hostdev-mdev.xml", lambda: libvirt.mdev_hostdev(MDEV_UUID)),
    ("hostdev-mdev-display.xml", lambda: libvirt.mdev_hostdev(MDEV_UUID, display=True)),
    ("hostdev-mdev-display-ramfb.xml", lambda: libvirt.mdev_hostdev(MDEV_UUID, display=True, ramfb=True)),
    ("hostdev-pci-vf.xml", lambda: libvirt.pci_hostdev(VF)),
])
def test_hostdev_elements(name, text):
    check_golden(name, text())


def test_render_libvirt_is_the_hostdev_elements_only():
    out = render([mdev_handoff(display=True, ramfb=True), mdev_handoff(uuid=MDEV_UUID_2, instance=8)], "libvirt")
    check_golden("render-libvirt-two-mdevs.xml", out)
    assert out.count("<hostdev ") == 2 and "<domain" not in out


def test_domain_with_mdev_inserted():
    out = libvirt.insert_hostdev(base("base-domain-mdev.xml"),
                                 libvirt.mdev_hostdev(MDEV_UUID, display=True, ramfb=True))
    check_golden("domain-mdev.xml", out)


def test_domain_with_vf_inserted():
    out = libvirt.insert_hostdev(base("base-domain-vf.xml"), libvirt.pci_hostdev(VF))
    check_golden("domain-vf.xml", out)


def test_domain_with_two_mdevs_via_handoffs():
    text = base("base-domain-mdev.xml")
    for h in (mdev_handoff(display=True, ramfb=True), mdev_handoff(uuid=MDEV_UUID_2, instance=8, display=True)):
        text = libvirt.insert_hostdev(text, h.libvirt_xml())
    check_golden("domain-mdev-two.xml", text)


def test_nodedev_xml():
    check_golden("nodedev-mdev.xml", libvirt.nodedev_xml(MDEV_UUID, VF, "nvidia-471"))
    assert libvirt.nodedev_name(MDEV_UUID, VF) == "mdev_aa618089_8b16_4d01_a136_25a0f3c73123_0000_41_00_4"


# --- QEMU / cloud-hypervisor -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, handoffs", [
    ("qemu-mdev-nvidia.txt", lambda: [mdev_handoff()]),
    ("qemu-mdev-display-ramfb.txt", lambda: [mdev_handoff(display=True, ramfb=True)]),
    ("qemu-mdev-generic.txt", lambda: [mdev_handoff(nvidia=False, vm_uuid=None)]),
    ("qemu-vf-nvidia.txt", lambda: [vf_handoff()]),
    ("qemu-vf-plain.txt", lambda: [vf_handoff(nvidia=False)]),
    ("qemu-two-mdevs.txt", lambda: [mdev_handoff(), mdev_handoff(uuid=MDEV_UUID_2, instance=8)]),
])
def test_qemu(name, handoffs):
    check_golden(name, render(handoffs(), "qemu"))


def test_qemu_args_list_form():
    assert qemu.qemu_args("mdev", MDEV_UUID) == ["-device", f"vfio-pci,sysfsdev=/sys/bus/mdev/devices/{MDEV_UUID}"]
    assert qemu.qemu_args("pci", "41:00.4", vm_uuid=VM_UUID_VF, nvidia=True) == [
        "-device", "vfio-pci,host=0000:41:00.4", "-uuid", VM_UUID_VF]


@pytest.mark.parametrize("name, handoffs", [
    ("cloud-hypervisor-mdev.txt", lambda: [mdev_handoff(nvidia=False)]),
    ("cloud-hypervisor-vf.txt", lambda: [vf_handoff(nvidia=False)]),
    ("cloud-hypervisor-mdev-and-vf.txt",
     lambda: [mdev_handoff(nvidia=False, vm="g"), vf_handoff(nvidia=False, vm="g")]),
])
def test_cloud_hypervisor(name, handoffs):
    check_golden(name, render(handoffs(), "cloud-hypervisor"))


def test_cloud_hypervisor_nvidia_is_flagged():
    args, warnings = cloud_hypervisor.ch_args("mdev", MDEV_UUID, nvidia=True)
    assert args == ["--device", f"path=/sys/bus/mdev/devices/{MDEV_UUID}/"]
    assert warnings == [cloud_hypervisor.NVIDIA_VGPU_WARNING]
    assert "#5319" in warnings[0] and "UNVERIFIED" in warnings[0]
    assert handoff.warnings_for([mdev_handoff()], "cloud-hypervisor") == [cloud_hypervisor.NVIDIA_VGPU_WARNING]
    assert cloud_hypervisor.ch_args("pci", VF) == (["--device", f"path=/sys/bus/pci/devices/{VF}/"], [])


# --- JSON ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, handoffs", [
    ("handoff-mdev.json", lambda: [mdev_handoff(display=True, ramfb=True)]),
    ("handoff-vf.json", lambda: [vf_handoff(tenant=None)]),
    ("handoff-nvidia-no-vm-uuid.json", lambda: [mdev_handoff(vm_uuid=None)]),
    ("handoff-two.json", lambda: [mdev_handoff(), mdev_handoff(uuid=MDEV_UUID_2, instance=8)]),
])
def test_json(name, handoffs):
    check_golden(name, render(handoffs(), "json"))


def test_json_schema_keys():
    import json

    one = json.loads(render([mdev_handoff()], "json"))
    assert list(one) == ["vm", "tenant", "instance", "kind", "uuid", "libvirt_xml", "qemu_args",
                         "cloud_hypervisor_args", "warnings"]
    pci = json.loads(render([vf_handoff()], "json"))
    assert list(pci) == ["vm", "tenant", "instance", "kind", "pci_address", "libvirt_xml", "qemu_args",
                         "cloud_hypervisor_args", "warnings"]
    many = json.loads(render([mdev_handoff(), vf_handoff()], "json"))
    assert isinstance(many, list) and [d["kind"] for d in many] == ["mdev", "pci"]


# --- mdevctl ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text", [
    ("mdevctl-config-auto.json", lambda: mdevctl.config_json("nvidia-745")),
    ("mdevctl-config-manual-attrs.json",
     lambda: mdevctl.config_json("nvidia-471", "manual", [("enable_uvm", "1"), ("label", "gpu für VM")])),
])
def test_mdevctl_config(name, text):
    check_golden(name, text())


def test_golden_dir_has_no_stray_files():
    """Every golden file is produced by a case above (a leftover would never be checked again)."""
    used = {
        "base-domain-mdev.xml", "base-domain-vf.xml",
        "hostdev-mdev.xml", "hostdev-mdev-display.xml", "hostdev-mdev-display-ramfb.xml", "hostdev-pci-vf.xml",
        "render-libvirt-two-mdevs.xml", "domain-mdev.xml", "domain-vf.xml", "domain-mdev-two.xml",
        "nodedev-mdev.xml", "qemu-mdev-nvidia.txt", "qemu-mdev-display-ramfb.txt", "qemu-mdev-generic.txt",
        "qemu-vf-nvidia.txt", "qemu-vf-plain.txt", "qemu-two-mdevs.txt", "cloud-hypervisor-mdev.txt",
        "cloud-hypervisor-vf.txt", "cloud-hypervisor-mdev-and-vf.txt", "handoff-mdev.json", "handoff-vf.json",
        "handoff-nvidia-no-vm-uuid.json", "handoff-two.json", "mdevctl-config-auto.json",
        "mdevctl-config-manual-attrs.json",
    }
    present = {p.name for p in GOLDEN.iterdir()}
    assert present == used
