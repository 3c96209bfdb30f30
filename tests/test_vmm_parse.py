"""Bad input, in-place editing and mdevctl interop of gpuvirt.vmm.

* hostile or broken domain XML (malformed, huge, DOCTYPE / entities, wrong root, odd names, invalid UUIDs and
  addresses) is refused with a one-line UsageError and nothing is written;
* insert/remove are idempotent and keep the rest of the document byte for byte;
* rewrite_file_in_place is atomic, keeps the mode, follows symlinks and serialises concurrent editors;
* mdevctl definition files are byte-identical to what the real mdevctl 1.2.0 writes, in both directions.  mdevctl
  1.2.0 hard-codes ``/etc/mdevctl.d`` and ``/sys``, so it runs in a private mount namespace with a tmp tree
  bind-mounted over them (running-mdevctl.md); those tests need root and ``unshare`` and skip otherwise.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from gpuvirt.errors import UsageError
from gpuvirt.vmm import libvirt, mdevctl
from gpuvirt.vmm.handoff import Handoff, render
from gpuvirt.vmm.libvirt import (
    has_hostdev_quick, insert_hostdev, mdev_hostdev, parse_domain, pci_hostdev, remove_hostdev,
    rewrite_file_in_place,
)
from gpuvirt.vmm.qemu import qemu_args

GOLDEN = Path(__file__).resolve().parent / "golden" / "vmm"
U1 = "aa618089-8b16-4d01-a136-25a0f3c73123"
U2 = "3c1f52b0-9d4e-4a7b-8f21-6e0d9b5a7c42"
PARENT = "0000:41:00.4"


def dom(name: str = "vm1", devices: str = "", extra: str = "") -> str:
    return f"<domain type='kvm'>\n  <name>{name}</name>\n{extra}  <devices>\n{devices}  </devices>\n</domain>\n"


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg, msg
    return msg


# --- hostile / broken domain XML --------------------------------------------------------------------------------
BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<domain><name>&lol3;</name></domain>"""
EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domain><name>&xxe;</name></domain>"""
PARAM_ENTITY = ('<!DOCTYPE domain [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]>'
                '<domain><name>x</name></domain>')
BARE_DOCTYPE = """<!DOCTYPE domain><domain><name>x</name></domain>"""


@pytest.mark.parametrize("text, match", [
    ("", "malformed"),
    ("<domain><name>x</name>", "malformed"),
    ("<domain><name>x</nam></domain>", "malformed"),
    ("<domain><name>x</name></domain><domain/>", "malformed"),
    ("<domain><name>&undefined;</name></domain>", "malformed"),
    ("<domain><name>x\x00</name></domain>", "malformed"),
    ("not xml at all", "malformed"),
    (BILLION_LAUGHS, "DOCTYPE"),
    (EXTERNAL_ENTITY, "DOCTYPE"),
    (PARAM_ENTITY, "DOCTYPE"),
    (BARE_DOCTYPE, "DOCTYPE"),
    ("<network><name>x</name></network>", "root element is <network>"),
    ("<qemu:domain xmlns:qemu='urn:x'><name>x</name></qemu:domain>", "root element"),
    ("<domain><uuid>6f1b3a52-3c1e-4b8e-9a55-0c8f2d7a1e01</uuid></domain>", "exactly one <name>"),
    ("<domain><name>a</name><name>b</name></domain>", "exactly one <name>"),
    ("<domain><name>x</name><uuid>not-a-uuid</uuid></domain>", "domain uuid"),
    ("<domain><name>x</name><uuid>6f1b3a52-3c1e-4b8e-9a55-0c8f2d7a1e0</uuid></domain>", "domain uuid"),
    ("<domain><name>x</name><devices/><devices/></domain>", "more than one <devices>"),
    (dom(devices="<hostdev type='mdev'><source><address uuid='not-a-uuid'/></source></hostdev>\n"), "mdev uuid"),
    (dom(devices="<hostdev type='mdev'><source><address uuid='aa618089-8b16-4d01-a136-25a0f3c7312g'/></source>"
                 "</hostdev>\n"), "mdev uuid"),
    (dom(devices="<hostdev type='mdev'><source/></hostdev>\n"), "no <source><address"),
    (dom(devices="<hostdev type='pci'><source><address bus='0x41' slot='0x00' function='0x8'/></source>"
                 "</hostdev>\n"), "function <= 7"),
    (dom(devices="<hostdev type='pci'><source><address bus='0x41' slot='0x20' function='0'/></source>"
                 "</hostdev>\n"), "slot <= 1f"),
    (dom(devices="<hostdev type='pci'><source><address bus='0x100' slot='0' function='0'/></source>"
                 "</hostdev>\n"), "bus <= ff"),
    (dom(devices="<hostdev type='pci'><source><address bus='zz' slot='0' function='0'/></source>"
                 "</hostdev>\n"), "invalid PCI bus"),
    (dom(devices="<hostdev type='pci'><source><address bus='0x41' slot='0'/></source></hostdev>\n"),
     "lacks function"),
    (dom(devices=f"<hostdev type='mdev' display='yes'><source><address uuid='{U1}'/></source></hostdev>\n"),
     "display"),
    (b"<domain><name>caf\xe9</name></domain>", "UTF-8"),
])
def test_bad_domain_xml_is_refused(text, match):
    with pytest.raises(UsageError) as exc:
        parse_domain(text)
    assert match in one_line(exc)


def test_billion_laughs_as_bytes_is_refused():
    # expat would expand internal entities; the DOCTYPE is refused before any declaration is read
    with pytest.raises(UsageError, match="DOCTYPE"):
        parse_domain(BILLION_LAUGHS.encode())


def test_huge_domain_xml_is_refused_before_parsing():
    filler = "<!--" + "x" * (4 * 1024 * 1024) + "-->"
    huge = dom(extra=filler)
    with pytest.raises(UsageError, match="larger than 4194304 bytes"):
        parse_domain(huge)
    with pytest.raises(UsageError, match="larger than 4194304 bytes"):
        parse_domain(huge.encode())
    with pytest.raises(UsageError, match="larger than 100 bytes"):
        parse_domain(dom(extra="<!--" + "y" * 200 + "-->"), max_bytes=100)
    # exactly at the limit is fine
    text = dom().encode()
    assert parse_domain(text, max_bytes=len(text)).name == "vm1"


@pytest.mark.parametrize("name", ["vm with spaces", "it's \"quoted\"", "gpu-vm-ü-数据", "a&b<c>", "..", "-",
                                  "x" * 255])
def test_odd_but_legal_vm_names_round_trip(name):
    from xml.sax.saxutils import escape

    d = parse_domain(dom(name=escape(name)))
    assert d.name == name
    h = Handoff(vm=name, vm_uuid=None, tenant=None, instance=1, kind="mdev", uuid=U1)
    assert json.loads(render([h], "json"))["vm"] == name


@pytest.mark.parametrize("name, match", [
    ("../etc/passwd", "'/'"), ("a/b", "'/'"), ("/abs", "'/'"), ("", "empty"), ("line\nbreak", "control"),
    ("tab\there", "control"), ("x" * 256, "longer than 255"),
])
def test_illegal_vm_names_are_refused(name, match):
    from xml.sax.saxutils import escape

    with pytest.raises(UsageError) as exc:
        parse_domain(dom(name=escape(name)))
    assert match in one_line(exc)
    with pytest.raises(UsageError):
        Handoff(vm=name, vm_uuid=None, tenant=None, instance=1, kind="mdev", uuid=U1)


def test_domain_parsing_normalises_and_filters():
    devices = (f"    <hostdev mode='subsystem' type='mdev' model='vfio-pci' display='on'>"
               f"<source><address uuid='{U1.upper()}'/></source></hostdev>\n"
               "    <hostdev mode='subsystem' type='pci' managed='yes'><source>"
               "<address domain='0x0000' bus='0x41' slot='0x1' function='4'/></source>"
               "<address type='pci' domain='0' bus='9' slot='9' function='0'/></hostdev>\n"
               "    <hostdev mode='subsystem' type='pci'><source><address bus='65' slot='010' function='0x2'/>"
               "</source></hostdev>\n"
               "    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0xbeef'/>"
               "</source></hostdev>\n"
               "    <hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/></source></hostdev>\n"
               "    <hostdev mode='capabilities' type='misc'><source><char>/dev/x</char></source></hostdev>\n"
               "    <interface type='hostdev'><source><address type='pci' bus='0x42' slot='0' function='1'/>"
               "</source></interface>\n")
    # libvirt also accepts a UUID without dashes (virUUIDParse)
    d = parse_domain(dom(devices=devices, extra="  <uuid>6F1B3A523C1E4B8E9A550C8F2D7A1E01</uuid>\n"))
    assert d.uuid == "6f1b3a52-3c1e-4b8e-9a55-0c8f2d7a1e01"
    assert [(h.kind, h.uuid or h.address, h.display) for h in d.hostdevs] == [
        ("mdev", U1, True), ("pci", "0000:41:01.4", False), ("pci", "0000:41:08.2", False)]
    assert parse_domain(dom()).uuid is None


def test_live_xml_as_libvirt_sends_it_to_the_hook():
    live = ("<domain type='qemu' id='7'>\n  <name>hooktest-vgpu</name>\n"
            "  <uuid>6f1b3a52-3c1e-4b8e-9a55-0c8f2d7a1e01</uuid>\n"
            "  <devices>\n"
            "    <hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci' display='off'>\n"
            f"      <source>\n        <address uuid='{U1}'/>\n      </source>\n"
            "      <alias name='hostdev0'/>\n"
            "      <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>\n"
            "    </hostdev>\n  </devices>\n</domain>\n")
    assert has_hostdev_quick(live.encode())
    d = parse_domain(live.encode())
    assert d.name == "hooktest-vgpu" and d.hostdevs == [libvirt.Hostdev("mdev", uuid=U1)]


def test_has_hostdev_quick():
    assert not has_hostdev_quick(dom().encode())
    assert not has_hostdev_quick(b"")
    assert has_hostdev_quick(dom(devices="<hostdev type='usb'/>\n").encode())
    assert has_hostdev_quick(dom(devices="<hostdev type='usb'/>\n"))


# --- generation: invalid identifiers never reach the output ------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "x", f"{U1}x", f"{U1}/../..", "aa618089-8b16-4d01-a136-25a0f3c7312", " ' or '",
                                 "aa618089_8b16_4d01_a136_25a0f3c73123", None, 42])
def test_invalid_mdev_uuid_is_refused_everywhere(bad):
    for fn in (lambda: mdev_hostdev(bad), lambda: qemu_args("mdev", bad), lambda: libvirt.nodedev_name(bad, PARENT),
               lambda: Handoff(vm="v", vm_uuid=None, tenant=None, instance=1, kind="mdev", uuid=bad),
               lambda: remove_hostdev(dom(), uuid=bad)):
        with pytest.raises(UsageError) as exc:
            fn()
        one_line(exc)


@pytest.mark.parametrize("bad", ["", "41:00", "0000:41:00.8", "0000:41:20.0", "00000:41:00.0", "0000:141:00.0",
                                 "0000:41:00.4/../..", "0000:41:00.4'", "zz:00.0", None])
def test_invalid_pci_address_is_refused_everywhere(bad):
    for fn in (lambda: pci_hostdev(bad), lambda: qemu_args("pci", bad),
               lambda: Handoff(vm="v", vm_uuid=None, tenant=None, instance=1, kind="pci", pci_address=bad),
               lambda: libvirt.nodedev_xml(U1, bad, "nvidia-471"), lambda: remove_hostdev(dom(), address=bad)):
        with pytest.raises(UsageError) as exc:
            fn()
        one_line(exc)


def test_identifiers_are_normalised():
    assert "uuid='aa618089-8b16-4d01-a136-25a0f3c73123'" in mdev_hostdev(U1.upper())
    assert "bus='0x41' slot='0x00' function='0x4'" in pci_hostdev("41:00.4")
    assert qemu_args("pci", "0000:41:00.4".upper()) == ["-device", "vfio-pci,host=0000:41:00.4"]
    with pytest.raises(UsageError, match="mdev type"):
        libvirt.nodedev_xml(U1, PARENT, "nvidia-471'/><x y='")


def test_display_rules():
    with pytest.raises(UsageError, match="ramfb requires display"):
        mdev_hostdev(U1, ramfb=True)
    with pytest.raises(UsageError, match="ramfb requires display"):
        qemu_args("mdev", U1, display=False, ramfb=True)
    with pytest.raises(UsageError, match="mdev devices only"):
        qemu_args("pci", PARENT, display=True)
    with pytest.raises(UsageError, match="mdev devices only"):
        Handoff(vm="v", vm_uuid=None, tenant=None, instance=1, kind="pci", pci_address=PARENT, display=True)
    # QEMU has the ramfb property only on vfio-pci-nohotplug
    assert qemu_args("mdev", U1, display=True, ramfb=True)[1].startswith("vfio-pci-nohotplug,")
    assert qemu_args("mdev", U1, display=True)[1].startswith("vfio-pci,")


def test_nvidia_qemu_needs_vm_uuid():
    with pytest.raises(UsageError) as exc:
        qemu_args("mdev", U1, nvidia=True)
    assert "0x57" in one_line(exc) and "-uuid" in str(exc.value)
    h = Handoff(vm="v", vm_uuid=None, tenant=None, instance=1, kind="mdev", uuid=U1, nvidia=True)
    with pytest.raises(UsageError, match="0x57"):
        render([h], "qemu")
    doc = h.to_json()  # json degrades instead: device args plus a warning
    assert "-uuid" not in doc["qemu_args"] and any("-uuid" in w for w in doc["warnings"])


def test_render_refusals():
    a = Handoff(vm="v", vm_uuid=None, tenant=None, instance=1, kind="mdev", uuid=U1, display=True, ramfb=True)
    b = Handoff(vm="v", vm_uuid=None, tenant=None, instance=2, kind="mdev", uuid=U2, display=True, ramfb=True)
    c = Handoff(vm="w", vm_uuid=None, tenant=None, instance=3, kind="pci", pci_address=PARENT)
    with pytest.raises(UsageError, match="only one vGPU"):
        render([a, b], "libvirt")
    with pytest.raises(UsageError, match="one VM"):
        render([a, c], "qemu")
    with pytest.raises(UsageError, match="twice"):
        render([a, a], "cloud-hypervisor")
    with pytest.raises(UsageError, match="unknown format"):
        render([a], "firecracker")
    with pytest.raises(UsageError, match="no hand-off"):
        render([], "json")
    x = Handoff(vm="v", vm_uuid="6f1b3a52-3c1e-4b8e-9a55-0c8f2d7a1e01", tenant=None, instance=1, kind="mdev",
                uuid=U1, nvidia=True)
    y = Handoff(vm="v", vm_uuid="6f1b3a52-3c1e-4b8e-9a55-0c8f2d7a1e02", tenant=None, instance=2, kind="mdev",
                uuid=U2, nvidia=True)
    with pytest.raises(UsageError, match="VM UUID"):
        render([x, y], "qemu")
    for bad in (dict(instance=-1), dict(instance=True), dict(tenant=""), dict(tenant="a\nb"), dict(kind="usb"),
                dict(pci_address=PARENT), dict(vm_uuid="nope")):
        kw = dict(vm="v", vm_uuid=None, tenant=None, instance=1, kind="mdev", uuid=U1)
        kw.update(bad)
        with pytest.raises(UsageError):
            Handoff(**kw)


# --- insert / remove --------------------------------------------------------------------------------------------
def test_insert_is_idempotent_and_remove_restores_the_original_bytes():
    for base_name, xml in (("base-domain-mdev.xml", mdev_hostdev(U1, display=True)),
                           ("base-domain-vf.xml", pci_hostdev(PARENT))):
        base = (GOLDEN / base_name).read_text()
        once = insert_hostdev(base, xml)
        assert once != base
        assert insert_hostdev(once, xml) == once
        h = libvirt.parse_hostdev(xml)
        back = remove_hostdev(once, uuid=h.uuid) if h.kind == "mdev" else remove_hostdev(once, address=h.address)
        assert back == base
        assert (remove_hostdev(back, uuid=h.uuid) if h.kind == "mdev" else remove_hostdev(back, address=h.address)) \
            == base


def test_identical_source_with_other_attributes_is_unchanged():
    base = insert_hostdev(dom(), mdev_hostdev(U1))
    assert insert_hostdev(base, mdev_hostdev(U1.upper(), display=True)) == base
    base = insert_hostdev(dom(), pci_hostdev(PARENT))
    # same VF written differently (decimal bus, managed='yes') is the same device
    other = "<hostdev mode='subsystem' type='pci' managed='yes'><source><address bus='65' slot='0' function='4'/>" \
            "</source></hostdev>"
    assert insert_hostdev(base, other) == base


def test_insert_preserves_everything_else():
    base = ("<?xml version='1.0' encoding='UTF-8'?>\n<!-- head comment -->\n"
            "<domain type=\"kvm\" xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n"
            "  <name>keep &amp; care</name>\n"
            "  <description><![CDATA[<raw> & text]]></description>\n"
            "  <devices>\n"
            "    <disk device='disk' type=\"file\"><source file='/a&apos;b'/><target dev='vda' bus='virtio'/></disk>\n"
            "\n"
            "    <!-- keep me -->\n"
            "  </devices>\n"
            "  <qemu:commandline><qemu:arg value='-x'/></qemu:commandline>\n"
            "</domain>\n<!-- tail comment -->\n")
    out = insert_hostdev(base, mdev_hostdev(U1))
    assert out.startswith(base[:base.index("    <!-- keep me -->\n") + len("    <!-- keep me -->\n")])
    assert out.endswith("  </devices>\n" + base.split("  </devices>\n", 1)[1])
    assert out.count("<hostdev ") == 1
    assert remove_hostdev(out, uuid=U1) == base
    assert parse_domain(out).name == "keep & care"


def test_insert_refuses_bad_hostdev_snippets():
    for bad in ("<hostdev type='usb'><source/></hostdev>",
                f"<hostdev type='mdev'><source><address uuid='{U1}'/></source></hostdev><hostdev/>",
                f"<hostdev type='mdev'><source><address uuid='{U1}'/></source></hostdev></devices><x>",
                "<disk/>", "", "<!DOCTYPE x><hostdev/>",
                f"<?xml version='1.0'?><hostdev type='mdev'><source><address uuid='{U1}'/></source></hostdev>"):
        with pytest.raises(UsageError):
            insert_hostdev(dom(), bad)


def test_insert_into_domain_without_devices_and_empty_devices():
    for base in ("<domain>\n  <name>x</name>\n</domain>\n", "<domain>\n  <name>x</name>\n  <devices/>\n</domain>\n"):
        out = insert_hostdev(base, pci_hostdev(PARENT))
        assert parse_domain(out).hostdevs == [libvirt.Hostdev("pci", address=PARENT)]
        assert "\n  <devices>\n    <hostdev " in out and "\n  </devices>\n</domain>\n" in out
    # the <devices> attach had to add goes with the last hostdev: the original bytes come back
    # (a one-line domain keeps the line break insert put before </domain>: it cannot be told apart)
    for base in ("<domain>\n  <name>x</name>\n</domain>\n", "<domain>\r\n\t<name>x</name>\r\n</domain>\r\n"):
        assert remove_hostdev(insert_hostdev(base, pci_hostdev(PARENT)), address=PARENT) == base


def test_remove_needs_exactly_one_target():
    with pytest.raises(UsageError):
        remove_hostdev(dom())
    with pytest.raises(UsageError):
        remove_hostdev(dom(), uuid=U1, address=PARENT)


def test_remove_only_touches_the_matching_device():
    text = dom()
    for x in (mdev_hostdev(U1), mdev_hostdev(U2), pci_hostdev(PARENT)):
        text = insert_hostdev(text, x)
    out = remove_hostdev(text, uuid=U2)
    assert [h.uuid or h.address for h in parse_domain(out).hostdevs] == [U1, PARENT]
    assert remove_hostdev(out, uuid=U2) == out


# --- retarget_hostdev (a moved VM's target XML) -----------------------------------------------------------------
U3 = "6d2e8c41-0b7a-4f3e-9c15-2a8b7e4d1f60"
VF = "0000:42:00.5"
# two vGPUs as a live ``virsh dumpxml --migratable`` shows them: guest PCI slots, aliases, a boot order, a ROM
TWO_LIVE = dom(name="mover", devices=f"""\
    <disk type='file' device='disk'>
      <source file='/srv/mover.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci' display='on'>
      <source>
        <address uuid='{U1}'/>
      </source>
      <alias name='hostdev0'/>
      <boot order='2'/>
      <rom bar='off'/>
      <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>
    </hostdev>
    <hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci'>
      <source>
        <address uuid='{U2}'/>
      </source>
      <alias name='hostdev1'/>
      <address type='pci' domain='0x0000' bus='0x08' slot='0x00' function='0x0'/>
    </hostdev>
    <memballoon model='virtio'/>
""")


def test_retarget_edits_the_hostdev_in_place_and_keeps_its_guest_address():
    """Review finding 4: the hostdev was rebuilt and appended, so a live move of a two-vGPU VM was refused
    (libvirt pairs hostdevs by position) and a cold-moved guest found its vGPU at another PCI slot."""
    out = libvirt.retarget_hostdev(TWO_LIVE, old_uuid=U1, new_uuid=U3)
    # exactly the UUID changed: order, guest <address>, <alias>, <boot>, <rom>, display='on' all stay
    assert out == TWO_LIVE.replace(U1, U3)
    assert [h.uuid for h in parse_domain(out).hostdevs] == [U3, U2]
    out2 = libvirt.retarget_hostdev(TWO_LIVE, old_uuid=U2, new_uuid=U3)
    assert out2 == TWO_LIVE.replace(U2, U3)
    # idempotent, and a document naming neither device is not this VM's
    assert libvirt.retarget_hostdev(out, old_uuid=U1, new_uuid=U3) == out
    with pytest.raises(UsageError, match="no <hostdev>"):
        libvirt.retarget_hostdev(TWO_LIVE, old_uuid=U3, new_uuid="0" * 8 + "-0000-4000-8000-" + "0" * 12)


def test_retarget_between_an_mdev_and_a_vf_changes_the_kind_in_place():
    to_vf = libvirt.retarget_hostdev(TWO_LIVE, old_uuid=U1, new_address=VF)
    first = to_vf[to_vf.index("<hostdev"):to_vf.index("</hostdev>")]
    assert first.startswith("<hostdev mode='subsystem' type='pci' managed='no'>")   # no model / display
    assert "<address domain='0x0000' bus='0x42' slot='0x00' function='0x5'/>" in first
    for kept in ("<alias name='hostdev0'/>", "<boot order='2'/>", "<rom bar='off'/>",
                 "<address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>"):
        assert kept in first
    assert [h.address or h.uuid for h in parse_domain(to_vf).hostdevs] == [VF, U2]
    # and back: a VF hostdev as libvirt shows it live (<driver name='vfio'/>, a source attribute only PCI has)
    live_vf = to_vf.replace("<source>", "<source writeFiltering='no'>", 1).replace(
        "<alias name='hostdev0'/>", "<driver name='vfio'/>\n      <alias name='hostdev0'/>", 1)
    back = libvirt.retarget_hostdev(live_vf, old_address=VF, new_uuid=U1)
    assert back == TWO_LIVE.replace(" display='on'", "", 1)     # display was the old mdev's, not the VF's
    assert libvirt.retarget_hostdev(back, old_address=VF, new_uuid=U1) == back


def test_retarget_of_a_half_edited_document_keeps_the_new_device_where_it_is():
    both = TWO_LIVE.replace(U2, U3)                 # names old U1 and new U3 already
    out = libvirt.retarget_hostdev(both, old_uuid=U1, new_uuid=U3)
    assert [h.uuid for h in parse_domain(out).hostdevs] == [U3]
    assert "hostdev0" not in out and "hostdev1" in out


# --- rewrite_file_in_place ---------------------------------------------------------------------------------------
def _snapshot(d: Path) -> dict[str, tuple[bytes, int, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in d.iterdir()}


@pytest.mark.parametrize("content", [
    BILLION_LAUGHS, EXTERNAL_ENTITY, "<domain><name>x</name>", "<network><name>x</name></network>",
    dom(name="../escape"), dom(devices="<hostdev type='mdev'><source><address uuid='bad'/></source></hostdev>\n"),
])
def test_bad_domain_file_is_left_untouched(tmp_path, content):
    path = tmp_path / "vm.xml"
    path.write_text(content)
    before = _snapshot(tmp_path)
    with pytest.raises(UsageError) as exc:
        rewrite_file_in_place(path, lambda t: insert_hostdev(t, mdev_hostdev(U1)))
    one_line(exc)
    assert _snapshot(tmp_path) == before  # same bytes, same inode, no temp file left behind


def test_rewrite_is_atomic_and_keeps_mode(tmp_path):
    path = tmp_path / "vm.xml"
    path.write_text(dom())
    os.chmod(path, 0o640)
    ino = path.stat().st_ino
    assert rewrite_file_in_place(path, lambda t: insert_hostdev(t, mdev_hostdev(U1))) is True
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_ino != ino  # replaced by rename, not rewritten in place
    assert parse_domain(path.read_bytes()).hostdevs == [libvirt.Hostdev("mdev", uuid=U1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.xml"]
    # a no-op edit does not touch the file at all
    before = _snapshot(tmp_path)
    assert rewrite_file_in_place(path, lambda t: insert_hostdev(t, mdev_hostdev(U1))) is False
    assert _snapshot(tmp_path) == before


def test_rewrite_follows_symlink_and_keeps_it(tmp_path):
    real = tmp_path / "real.xml"
    real.write_text(dom())
    link = tmp_path / "link.xml"
    link.symlink_to(real.name)
    assert rewrite_file_in_place(link, lambda t: insert_hostdev(t, pci_hostdev(PARENT)))
    assert link.is_symlink()
    assert parse_domain(real.read_bytes()).hostdevs == [libvirt.Hostdev("pci", address=PARENT)]


def test_rewrite_refuses_large_missing_and_special_files(tmp_path):
    big = tmp_path / "big.xml"
    big.write_bytes(b" " * (libvirt.MAX_DOMAIN_XML_BYTES + 1))
    with pytest.raises(UsageError, match="larger than"):
        rewrite_file_in_place(big, lambda t: pytest.fail("must not be called"))
    with pytest.raises(UsageError, match="cannot read"):
        rewrite_file_in_place(tmp_path / "missing.xml", lambda t: t)
    with pytest.raises(UsageError, match="not a regular file"):
        rewrite_file_in_place(tmp_path, lambda t: t)
    fifo = tmp_path / "fifo.xml"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):  # and it does not block on the FIFO
        rewrite_file_in_place(fifo, lambda t: t)
    small = tmp_path / "small.xml"
    small.write_text(dom())
    with pytest.raises(UsageError, match="larger than 10 bytes"):
        rewrite_file_in_place(small, lambda t: t, max_bytes=10)


def test_rewrite_exception_in_fn_writes_nothing(tmp_path):
    path = tmp_path / "vm.xml"
    path.write_text(dom())
    before = _snapshot(tmp_path)

    def boom(_t: str) -> str:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        rewrite_file_in_place(path, boom)
    assert _snapshot(tmp_path) == before


def _insert_vf(path: str, fn: int) -> None:
    rewrite_file_in_place(path, lambda t: insert_hostdev(t, pci_hostdev(f"0000:41:00.{fn}")))


def test_concurrent_editors_do_not_lose_edits(tmp_path):
    path = tmp_path / "vm.xml"
    path.write_text(dom())
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_insert_vf, args=(str(path), fn)) for fn in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    got = sorted(h.address for h in parse_domain(path.read_bytes()).hostdevs)
    assert got == [f"0000:41:00.{fn}" for fn in range(8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.xml"]


# --- mdevctl files (pure) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("parent, uuid", [
    ("../../etc", U1), ("0000:41:00.4/..", U1), ("0000:41:00.4/../x", U1), ("", U1), (PARENT, "../../x"),
    (PARENT, f"{U1}/x"), (PARENT, "not-a-uuid"), (PARENT, ""), (None, U1),
])
def test_mdevctl_paths_are_validated_before_use(tmp_path, parent, uuid):
    for fn in (lambda: mdevctl.write_definition(tmp_path, parent, uuid, "nvidia-471"),
               lambda: mdevctl.remove_definition(tmp_path, parent, uuid),
               lambda: mdevctl.definition_path(tmp_path, parent, uuid)):
        with pytest.raises(UsageError) as exc:
            fn()
        one_line(exc)
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.parametrize("kw", [
    dict(type_id="../x"), dict(type_id=""), dict(type_id="a b"), dict(start="sometimes"),
    dict(attrs=[("../x", "1")]), dict(attrs=[("a", 1)]), dict(attrs=[{"a": "1", "b": "2"}]), dict(attrs=["x"]),
    dict(attrs=[("a", "x\0y")]), dict(attrs=[("a", "x" * 5000)]),
])
def test_mdevctl_bad_definition_values(tmp_path, kw):
    args = dict(root=tmp_path, parent=PARENT, uuid=U1, type_id="nvidia-471")
    args.update(kw)
    with pytest.raises(UsageError):
        mdevctl.write_definition(**args)
    assert list(tmp_path.iterdir()) == []


def test_mdevctl_write_read_remove(tmp_path):
    p = mdevctl.write_definition(tmp_path, "41:00.4", U1.upper(), "nvidia-471", "manual", {"enable": "1"})
    assert p == tmp_path / "etc" / "mdevctl.d" / PARENT / U1
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o755
    defs, warns = mdevctl.read_definitions(tmp_path)
    assert warns == []
    assert defs == [mdevctl.Definition(PARENT, U1, "nvidia-471", "manual", (("enable", "1"),), p)]
    mdevctl.write_definition(tmp_path, PARENT, U1, "nvidia-472")  # replace
    assert mdevctl.read_definitions(tmp_path)[0][0].type_id == "nvidia-472"
    assert mdevctl.remove_definition(tmp_path, PARENT, U1) is True
    assert mdevctl.remove_definition(tmp_path, PARENT, U1) is False
    assert p.parent.is_dir()  # like mdevctl undefine, the parent directory stays
    assert mdevctl.read_definitions(tmp_path / "nowhere") == ([], [])


def test_mdevctl_dirs_ignore_umask(tmp_path):
    old = os.umask(0o077)
    try:
        p = mdevctl.write_definition(tmp_path, PARENT, U1, "nvidia-471")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    for d in (p.parent, p.parent.parent, p.parent.parent.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_mdevctl_corrupt_and_unexpected_entries_become_warnings(tmp_path):
    good = mdevctl.write_definition(tmp_path, PARENT, U1, "nvidia-471")
    base = tmp_path / "etc" / "mdevctl.d"
    (base / PARENT / U2).write_text("{not json")
    u3, u4, u5, u6 = (f"{n}1f52b0-9d4e-4a7b-8f21-6e0d9b5a7c42" for n in ("4c", "5c", "6c", "7c"))
    (base / PARENT / u3).write_text('{"mdev_type": "nvidia-471", "start": "auto", "attrs": [{"a": 1}]}')
    (base / PARENT / u4).write_text('{"mdev_type": "nvidia-471", "start": "bogus"}')
    (base / PARENT / u5).write_text('["mdev_type"]')
    (base / PARENT / u6).symlink_to(good)
    (base / PARENT / "not-a-uuid").write_text("{}")
    (base / PARENT / U1.upper()).write_text("{}")
    (base / "weird-parent").mkdir()
    (base / "scripts.d" / "callouts").mkdir(parents=True)
    (base / "stray-file").write_text("x")
    defs, warns = mdevctl.read_definitions(tmp_path)
    assert [(d.uuid, d.start) for d in defs] == [(u4, "manual"), (U1, "auto")]  # sorted by UUID
    by_path = {p: m for p, m in warns}
    assert "invalid JSON" in by_path[base / PARENT / U2]
    assert "must be a string" in by_path[base / PARENT / u3]
    assert "neither 'auto' nor 'manual'" in by_path[base / PARENT / u4]
    assert "JSON object" in by_path[base / PARENT / u5]
    assert "symlink" in by_path[base / PARENT / u6]
    assert "lower-case UUID" in by_path[base / PARENT / "not-a-uuid"]
    assert "lower-case UUID" in by_path[base / PARENT / U1.upper()]
    assert "not a PCI address" in by_path[base / "weird-parent"]
    assert not any("scripts.d" in str(p) or "stray-file" in str(p) for p in by_path)


def test_mdevctl_commands_print_warnings_like_every_other_command(cli, make_sim):
    sim = make_sim(["a2", "mtty"])
    root = sim.root
    base = root / "etc" / "mdevctl.d" / PARENT
    base.mkdir(parents=True)
    (base / U2).write_text("{not json")
    res = cli("--sim", root, "mdevctl", "import")
    assert res.exit_code == 0, res
    [line] = res.stderr.splitlines()
    assert line.startswith(f"gpuvirt: warning: {base / U2}: ") and "invalid JSON" in line, res
    # export skips a virtual parent (mtty) with a warning, in the same form
    assert cli("--sim", root, "attach", "serial-vm", "--mdev", "mtty-2").exit_code == 0
    res = cli("--sim", root, "mdevctl", "export")
    assert res.exit_code == 0, res
    [line] = res.stderr.splitlines()
    assert line.startswith("gpuvirt: warning: mtty/") and "skipped: parent is not a PCI device" in line, res


# --- against the real mdevctl 1.2.0 ---------------------------------------------------------------------------------
def _mdevctl_tree(root: Path) -> Path:
    for d in ("sys/bus/mdev/devices", "sys/class/mdev_bus", "etc/mdevctl.d/scripts.d/callouts",
              "etc/mdevctl.d/scripts.d/notifiers"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def _mdevctl(root: Path, *args: str, umask: str = "022") -> subprocess.CompletedProcess:
    script = ('umask "$G_UMASK" && mount --bind "$G_ROOT/sys" /sys && '
              'mount --bind "$G_ROOT/etc/mdevctl.d" /etc/mdevctl.d && exec mdevctl "$@"')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "G_ROOT": str(root), "G_UMASK": umask}
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *args],
                          capture_output=True, text=True, env=env, timeout=30)


@pytest.fixture
def mdevctl_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("running mdevctl 1.2.0 against a tmp tree needs root (private mount namespace)")
    for tool in ("unshare", "mdevctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    root = _mdevctl_tree(tmp_path / "tree")
    probe = _mdevctl(root, "--version")
    if probe.returncode != 0:
        pytest.skip(f"cannot run mdevctl in a mount namespace here: {probe.stderr.strip()[:200]}")
    if "1.2.0" not in probe.stdout:
        pytest.skip(f"these checks pin mdevctl 1.2.0, found {probe.stdout.strip()!r}")
    return root


@pytest.mark.root
def test_mdevctl_writes_what_gpuvirt_writes(mdevctl_root, tmp_path):
    attrs = [("enable_uvm", "1"), ("label", "gpu für VM\tα \"q\" \\ /\x01")]
    run = _mdevctl(mdevctl_root, "define", "-u", U1, "-p", PARENT, "-t", "nvidia-471", "--auto")
    assert run.returncode == 0, run.stderr
    run = _mdevctl(mdevctl_root, "define", "-u", U2, "-p", PARENT, "-t", "nvidia-472")
    assert run.returncode == 0, run.stderr
    for name, value in attrs:
        run = _mdevctl(mdevctl_root, "modify", "-u", U2, "--addattr", name, "--value", value)
        assert run.returncode == 0, run.stderr
    theirs = mdevctl_root / "etc" / "mdevctl.d" / PARENT
    assert (theirs / U1).read_bytes() == mdevctl.config_json("nvidia-471", "auto").encode()
    assert (theirs / U2).read_bytes() == mdevctl.config_json("nvidia-472", "manual", attrs).encode()
    ours = tmp_path / "ours"
    mdevctl.write_definition(ours, PARENT, U1, "nvidia-471", "auto")
    p2 = mdevctl.write_definition(ours, PARENT, U2, "nvidia-472", "manual", attrs)
    for name in (U1, U2):
        assert (ours / "etc" / "mdevctl.d" / PARENT / name).read_bytes() == (theirs / name).read_bytes()
    # same permissions as mdevctl under the usual umask 022
    assert stat.S_IMODE(p2.stat().st_mode) == stat.S_IMODE((theirs / U2).stat().st_mode) == 0o644
    assert stat.S_IMODE(p2.parent.stat().st_mode) == stat.S_IMODE(theirs.stat().st_mode) == 0o755
    # and gpuvirt reads what mdevctl wrote
    defs, warns = mdevctl.read_definitions(mdevctl_root)
    assert warns == []
    assert [(d.parent, d.uuid, d.type_id, d.start, d.attrs) for d in defs] == [
        (PARENT, U2, "nvidia-472", "manual", tuple(attrs)), (PARENT, U1, "nvidia-471", "auto", ())]


@pytest.mark.root
def test_mdevctl_reads_what_gpuvirt_writes(mdevctl_root):
    parent2 = "0000:41:00.5"
    mdevctl.write_definition(mdevctl_root, PARENT, U1, "nvidia-471", "auto")
    mdevctl.write_definition(mdevctl_root, parent2, U2, "nvidia-472", "manual", [("enable_uvm", "1")])
    run = _mdevctl(mdevctl_root, "list", "--defined", "--dumpjson")
    assert run.returncode == 0, run.stderr
    listed = {}
    for entry in json.loads(run.stdout):
        for parent, devs in entry.items():
            for dev in devs:
                for uuid, cfg in dev.items():
                    listed[uuid] = (parent, cfg)
    assert listed == {
        U1: (PARENT, {"mdev_type": "nvidia-471", "start": "auto", "attrs": []}),
        U2: (parent2, {"mdev_type": "nvidia-472", "start": "manual", "attrs": [{"enable_uvm": "1"}]}),
    }
    run = _mdevctl(mdevctl_root, "list", "--defined")
    assert f"{U1} {PARENT} nvidia-471 auto" in run.stdout
    # one UUID: mdevctl prints the bare config object, which is our file content
    run = _mdevctl(mdevctl_root, "list", "--defined", "-u", U1, "--dumpjson")
    assert run.stdout.strip() == mdevctl.config_json("nvidia-471", "auto")


@pytest.mark.root
def test_corrupt_definition_breaks_mdevctl_but_not_gpuvirt(mdevctl_root):
    mdevctl.write_definition(mdevctl_root, PARENT, U1, "nvidia-471")
    bad = mdevctl_root / "etc" / "mdevctl.d" / PARENT / U2
    bad.write_text("{not json")
    run = _mdevctl(mdevctl_root, "list", "--defined")
    assert run.returncode != 0  # mdevctl 1.2.0 fails the whole command, without naming the file
    defs, warns = mdevctl.read_definitions(mdevctl_root)
    assert [d.uuid for d in defs] == [U1]
    assert [p for p, _ in warns] == [bad]


def test_mdevctl_import_skips_a_definition_the_board_cannot_hold(cli, make_sim):
    # eight A2-2Q fill an A2; a ninth defined with mdevctl (start auto, not running) would make every later
    # reconcile fail on it, so it is reported and not adopted
    import json as _json

    sim = make_sim(["a2"])
    root = sim.root
    for i in range(8):
        assert cli("--sim", root, "attach", f"v{i}", "--vgpu", "A2-2Q").exit_code == 0
    parent = "0000:41:01.4"
    d = root / "etc" / "mdevctl.d" / parent
    d.mkdir(parents=True, exist_ok=True)
    ninth = "11111111-2222-3333-4444-555555555555"
    (d / ninth).write_text(_json.dumps({"mdev_type": "nvidia-745", "start": "auto", "attrs": []}))
    res = cli("--sim", root, "mdevctl", "import", "--json")
    assert res.exit_code == 0, res
    doc = res.json()
    assert doc["adopted"] == [] and any("cannot hold another" in w["message"] for w in doc["warnings"])
    st = cli("--sim", root, "status", "--json").json()
    assert st["in_sync"], st
