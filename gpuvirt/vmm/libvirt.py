"""libvirt hand-off: ``<hostdev>`` elements, safe domain-XML parsing, node devices (in-place editing of a domain:
:mod:`gpuvirt.vmm.libvirt_edit`, re-exported here).

Everything here is pure text processing: no libvirt connection, no sysfs, no inventory.  The hook fast path,
``attach --domain-xml`` and ``detach --domain-xml`` are built on these functions.

Parsing is done with expat directly instead of ``xml.etree``/``minidom`` for two reasons:

* safety: a DOCTYPE is refused the moment expat reports it, so no entity can ever be declared (billion laughs,
  external entities), and the input size is checked before the parser sees a byte;
* fidelity: expat reports the byte offset of every tag, so :func:`insert_hostdev` and :func:`remove_hostdev`
  splice text into / out of the original document instead of re-serialising a tree.  Every byte outside the
  inserted or removed ``<hostdev>`` element is kept as it was: comments, attribute order and quoting, character
  references, blank lines, the XML declaration, CRLF line ends.  (ElementTree would rewrite quotes, drop
  comments outside the root and normalise ``<a/>`` to ``<a />``.)

Identifiers that end up in output or in paths are validated first (:func:`normalize_uuid`,
:func:`normalize_pci_address`, :func:`validate_mdev_type`, :func:`validate_vm_name`); the output templates
only ever see the normalised values.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import xml.parsers.expat as expat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpuvirt.errors import UsageError

#: Upper bound for a domain XML document.  Real domain definitions are a few KiB; libvirtd feeds the hook the
#: live XML on stdin, and this bound keeps a hostile or broken document from costing more than a few MiB.
MAX_DOMAIN_XML_BYTES = 4 * 1024 * 1024

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HEX = frozenset("0123456789abcdefABCDEF")
# [domain:]bus:slot.function as lspci and sysfs print it; the domain is optional on input only.
_PCI_RE = re.compile(r"^(?:(?P<d>[0-9a-fA-F]{1,4}):)?(?P<b>[0-9a-fA-F]{1,2}):(?P<s>[0-9a-fA-F]{1,2})\.(?P<f>[0-7])$")
# mdev type ids are sysfs directory names such as nvidia-471 or i915-GVTg_V5_4: never a path separator,
# never a leading dot, and nothing that would need escaping in XML or JSON.
_MDEV_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")
_MAX_VM_NAME_BYTES = 255


def _short(value: object, limit: int = 60) -> str:
    """repr() of an offending value, cut so an error stays one short line."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


# --- identifiers ----------------------------------------------------------------------------------------------
def normalize_uuid(value: object, what: str = "UUID") -> str:
    """A UUID in its canonical 8-4-4-4-12 form, lower case; anything else is a :class:`UsageError`.

    The canonical form is required (rather than libvirt's laxer syntax) because mdev UUIDs become sysfs names
    (``/sys/bus/mdev/devices/<uuid>``) and mdevctl file names, which the kernel always writes in lower case.
    """
    if not isinstance(value, str) or not _UUID_RE.match(value.strip()):
        raise UsageError(f"invalid {what} {_short(value)}: expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex)")
    return value.strip().lower()


def _libvirt_uuid(value: str, what: str) -> str:
    """Parse a UUID the way libvirt's virUUIDParse accepts it, return it canonical.

    libvirt accepts surrounding spaces and a '-' between any two bytes, so a domain written by hand as
    ``6f1b3a523c1e4b8e9a550c8f2d7a1e01`` is legal; the hook gets whatever the operator wrote (for the inactive
    XML) and must not refuse what libvirt accepted.
    """
    text = value.strip(" ")
    pairs: list[str] = []
    i = 0
    while len(pairs) < 16 and i < len(text):
        if text[i] == "-":
            i += 1
            continue
        if len(text[i:i + 2]) == 2 and set(text[i:i + 2]) <= _HEX:
            pairs.append(text[i:i + 2])
            i += 2
            continue
        break
    if len(pairs) != 16 or i != len(text):
        raise UsageError(f"invalid {what} {_short(value)} in domain XML: not a UUID")
    h = "".join(pairs).lower()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def normalize_pci_address(value: object, what: str = "PCI address") -> str:
    """``0000:41:00.4`` (lower case, 4-digit domain) from ``0000:41:00.4`` / ``41:00.4``; else UsageError."""
    m = _PCI_RE.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise UsageError(f"invalid {what} {_short(value)}: expected DDDD:BB:SS.F (hex), e.g. 0000:41:00.4")
    dom, bus, slot, fn = int(m["d"] or "0", 16), int(m["b"], 16), int(m["s"], 16), int(m["f"])
    return _format_bdf(dom, bus, slot, fn, what=what, shown=value)


def _format_bdf(dom: int, bus: int, slot: int, fn: int, *, what: str, shown: object) -> str:
    # PCI limits: 5-bit device (slot) number, 3-bit function; gpuvirt only handles 16-bit segment numbers,
    # which is what every sysfs name of a GPU or VF carries.
    if not (0 <= dom <= 0xFFFF and 0 <= bus <= 0xFF and 0 <= slot <= 0x1F and 0 <= fn <= 7):
        raise UsageError(f"invalid {what} {_short(shown)}: domain <= ffff, bus <= ff, slot <= 1f, function <= 7")
    return f"{dom:04x}:{bus:02x}:{slot:02x}.{fn:x}"


def validate_mdev_type(value: object) -> str:
    """An mdev type id such as ``nvidia-471``; it is used as a sysfs name and inside XML/JSON."""
    if not isinstance(value, str) or not _MDEV_TYPE_RE.match(value):
        raise UsageError(f"invalid mdev type {_short(value)}: expected a sysfs type name such as nvidia-471")
    return value


def validate_vm_name(value: object) -> str:
    """A libvirt domain name as given; refuses what libvirt refuses and what would be unsafe in a path.

    Quotes, spaces and non-ASCII letters are legal in libvirt names and are kept unchanged (every output
    escapes them).  Refused: empty names, '/' (libvirt forbids it: the name becomes
    ``/etc/libvirt/qemu/<name>.xml``, and ``../x`` would climb out of that directory), control characters
    (they would break one-line logs and libvirt rejects newlines) and names over 255 bytes.
    """
    if not isinstance(value, str) or not value:
        raise UsageError("invalid VM name: empty")
    if "/" in value:
        raise UsageError(f"invalid VM name {_short(value)}: '/' is not allowed in libvirt domain names")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise UsageError(f"invalid VM name {_short(value)}: control characters are not allowed")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise UsageError(f"invalid VM name {_short(value)}: not valid UTF-8 (libvirt names are UTF-8)")
    if len(value.encode("utf-8")) > _MAX_VM_NAME_BYTES:
        raise UsageError(f"invalid VM name {_short(value)}: longer than {_MAX_VM_NAME_BYTES} bytes")
    return value


# --- <hostdev> generation -------------------------------------------------------------------------------------
def mdev_hostdev(uuid: str, *, display: bool = False, ramfb: bool = False) -> str:
    """The ``<hostdev type='mdev'>`` element handing mdev ``uuid`` to a guest as a vfio-pci device.

    ``managed='no'``: libvirt ignores ``managed`` for mdevs (there is no PCI device to rebind), and writing it
    explicitly matches what Nova generates, so diffs against other tools stay quiet.
    """
    u = normalize_uuid(uuid, "mdev UUID")
    if ramfb and not display:
        # The libvirt schema accepts ramfb='on' alone (virt-xml-validate passes), but QEMU's vfio-pci realize
        # refuses it ("ramfb=on requires display=on", hw/vfio/pci.c), so the VM would only fail at start.
        raise UsageError("ramfb requires display: QEMU refuses ramfb=on on a vfio-pci device without display=on")
    extra = " display='on' ramfb='on'" if ramfb else (" display='on'" if display else "")
    return (f"<hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci'{extra}>\n"
            f"  <source>\n"
            f"    <address uuid='{u}'/>\n"
            f"  </source>\n"
            f"</hostdev>")


def pci_hostdev(address: str) -> str:
    """The ``<hostdev type='pci' managed='no'>`` element for a VF (vendor-specific VFIO or plain SR-IOV).

    ``managed='no'`` on purpose: with ``managed='yes'`` libvirt would unbind the device from its driver and bind
    vfio-pci at start.  For an NVIDIA vendor-specific-VFIO VF that destroys the vGPU (the nvidia driver itself
    registers the VF with VFIO and must stay bound); for a plain SR-IOV VF gpuvirt already did the binding and
    owns it, so libvirt must not undo it at shutdown either.
    """
    a = normalize_pci_address(address)
    dom, bus, rest = a.split(":")
    slot, fn = rest.split(".")
    return ("<hostdev mode='subsystem' type='pci' managed='no'>\n"
            "  <source>\n"
            f"    <address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/>\n"
            "  </source>\n"
            "</hostdev>")


# --- node devices ---------------------------------------------------------------------------------------------
def nodedev_name(uuid: str, parent: str) -> str:
    """libvirt's node-device name of an mdev: ``mdev_<uuid, '-' as '_'>_<parent BDF, ':' and '.' as '_'>``.

    The parent suffix exists since libvirt 7.7 (one UUID may be defined under several parents).
    """
    u = normalize_uuid(uuid, "mdev UUID")
    p = normalize_pci_address(parent, "parent PCI address")
    return "mdev_" + u.replace("-", "_") + "_" + p.replace(":", "_").replace(".", "_")


def nodedev_xml(uuid: str, parent: str, type_id: str) -> str:
    """Node-device XML for ``virsh nodedev-define`` (persistent mdev; libvirt stores it through mdevctl)."""
    u = normalize_uuid(uuid, "mdev UUID")
    p = normalize_pci_address(parent, "parent PCI address")
    t = validate_mdev_type(type_id)
    pci_name = "pci_" + p.replace(":", "_").replace(".", "_")
    return ("<device>\n"
            f"  <name>{nodedev_name(u, p)}</name>\n"
            f"  <parent>{pci_name}</parent>\n"
            "  <capability type='mdev'>\n"
            f"    <type id='{t}'/>\n"
            f"    <uuid>{u}</uuid>\n"
            "  </capability>\n"
            "</device>")


# --- safe parsing -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hostdev:
    """One ``<hostdev>`` of a domain that gpuvirt can own: an mdev (by UUID) or a PCI device (by address)."""

    kind: str  # "mdev" | "pci"
    uuid: str | None = None  # mdev UUID, canonical lower case
    address: str | None = None  # PCI address as 0000:41:00.4
    display: bool = False
    ramfb: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """Identity of the source device: two hostdevs with the same key hand out the same device."""
        return (self.kind, self.uuid if self.kind == "mdev" else self.address)  # type: ignore[return-value]


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str | None  # None when the XML carries no <uuid> (libvirt then generates one at define)
    hostdevs: list[Hostdev] = field(default_factory=list)
    memory_mib: int | None = None  # guest RAM (see memory_mib()); None when absent or not understood


class _Refused(Exception):
    """Raised from expat callbacks to stop parsing a document we will not process."""


class _Node:
    __slots__ = ("tag", "attrs", "start", "tag_end", "end", "children", "text", "depth")

    def __init__(self, tag: str, attrs: dict[str, str], start: int, depth: int):
        self.tag, self.attrs, self.start, self.depth = tag, attrs, start, depth
        self.tag_end = -1  # offset just past the start tag ('>')
        self.end = -1  # offset just past the end tag (== tag_end for <x/>)
        self.children: list[_Node] = []
        self.text: list[str] = []

    def child(self, tag: str) -> _Node | None:
        return next((c for c in self.children if c.tag == tag), None)


def _tag_end(buf: bytes, start: int) -> int:
    """Offset just past the '>' closing the start tag at ``start``; quoted attribute values may contain '>'."""
    i, n = start + 1, len(buf)
    while i < n:
        c = buf[i]
        if c == 0x3E:  # '>'
            return i + 1
        if c in (0x22, 0x27):  # a quoted attribute value: it cannot contain its own quote character
            j = buf.find(bytes((c,)), i + 1)
            if j < 0:
                break
            i = j + 1
            continue
        i += 1
    raise UsageError("malformed XML: unterminated start tag")  # expat would have refused first


def _to_bytes(xml_text: str | bytes, max_bytes: int, what: str) -> bytes:
    if isinstance(xml_text, str):
        if len(xml_text) > max_bytes:  # cheap first check: every character is at least one byte
            raise UsageError(f"{what} is larger than {max_bytes} bytes; refusing to parse it")
        data = xml_text.encode("utf-8", "surrogatepass")
    elif isinstance(xml_text, (bytes, bytearray, memoryview)):
        data = bytes(xml_text)
    else:
        raise UsageError(f"{what}: expected text, got {type(xml_text).__name__}")
    if len(data) > max_bytes:
        raise UsageError(f"{what} is larger than {max_bytes} bytes; refusing to parse it")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not valid UTF-8 (byte {exc.start}); libvirt only writes UTF-8") from exc
    return data


def _keep(parent: _Node | None, depth: int) -> bool:
    """Which elements get a node: only the path domain/devices/hostdev/source/address and their siblings
    that matter, so a 4 MiB document of unrelated elements never becomes a million Python objects."""
    if depth == 1:
        return True
    if parent is None:
        return False
    if depth == 2:
        return True  # children of <domain>: <name>, <uuid>, <devices>, and the anchor for indentation
    return (depth, parent.tag) in ((3, "devices"), (4, "hostdev"), (5, "source"))


def _parse(data: bytes, what: str) -> _Node:
    """Parse ``data`` (validated UTF-8) and return the root node; refuses DTDs and malformed input."""
    parser = expat.ParserCreate(encoding="UTF-8")  # overrides any declared encoding: we checked it is UTF-8
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[_Node | None] = []
    root: list[_Node] = []

    def refuse_dtd(*_a: object) -> None:
        raise _Refused("a DOCTYPE or entity declaration (refused: entity expansion / external entities)")

    def start(tag: str, attrs: dict[str, str]) -> None:
        depth = len(stack) + 1
        parent = stack[-1] if stack else None
        node: _Node | None = None
        if _keep(parent, depth):
            node = _Node(tag, attrs, parser.CurrentByteIndex, depth)
            node.tag_end = _tag_end(data, node.start)
            if parent is not None:
                parent.children.append(node)
            else:
                root.append(node)
        stack.append(node)

    def end(tag: str) -> None:
        node = stack.pop()
        if node is None:
            return
        if data[node.tag_end - 2:node.tag_end] == b"/>":
            node.end = node.tag_end
        else:
            close = parser.CurrentByteIndex
            node.end = data.index(b">", close) + 1

    def chars(text: str) -> None:
        if stack and stack[-1] is not None and stack[-1].depth == 2:
            stack[-1].text.append(text)

    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_dtd
    parser.UnparsedEntityDeclHandler = refuse_dtd
    parser.ExternalEntityRefHandler = refuse_dtd
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.buffer_text = True
    try:
        parser.Parse(data, True)
    except _Refused as exc:
        raise UsageError(f"{what} contains {exc}") from None
    except expat.ExpatError as exc:
        raise UsageError(f"malformed {what}: {expat.ErrorString(exc.code)} at line {exc.lineno}, "
                         f"column {exc.offset}") from None
    return root[0]


def _flag(node: _Node, attr: str) -> bool:
    v = node.attrs.get(attr)
    if v is None or v == "off":
        return False
    if v == "on":
        return True
    raise UsageError(f"invalid {attr}={_short(v)} on a <hostdev>: expected 'on' or 'off'")


_C_UINT_RE = re.compile(r"^(?:0[xX][0-9a-fA-F]{1,8}|0[0-7]{0,11}|[1-9][0-9]{0,9})$")


def _c_uint(text: str, attr: str) -> int:
    """Integer the way libvirt reads PCI address attributes (strtoul base 0: 0x hex, leading 0 octal)."""
    t = text.strip()
    if not _C_UINT_RE.match(t):  # also keeps out what int() would accept but C would not ('1_0', '+1')
        raise UsageError(f"invalid PCI {attr}={_short(text)} in a <hostdev> address")
    if t[:2] in ("0x", "0X"):
        return int(t[2:], 16)
    return int(t, 8) if t.startswith("0") else int(t, 10)


def _hostdev_from(node: _Node) -> Hostdev | None:
    """A Hostdev for an mdev or PCI subsystem hostdev; None for kinds gpuvirt never owns (usb, scsi, ...)."""
    if node.attrs.get("mode", "subsystem") != "subsystem":
        return None
    kind = node.attrs.get("type")
    if kind not in ("mdev", "pci"):
        return None
    source = node.child("source")
    addr = source.child("address") if source is not None else None
    if addr is None:
        raise UsageError(f"<hostdev type='{kind}'> has no <source><address .../></source>")
    if kind == "mdev":
        if "uuid" not in addr.attrs:
            raise UsageError("<hostdev type='mdev'> source address has no uuid attribute")
        uuid = _libvirt_uuid(addr.attrs["uuid"], "mdev uuid")
        return Hostdev("mdev", uuid=uuid, display=_flag(node, "display"), ramfb=_flag(node, "ramfb"))
    missing = [a for a in ("bus", "slot", "function") if a not in addr.attrs]
    if missing:
        raise UsageError(f"<hostdev type='pci'> source address lacks {', '.join(missing)}")
    parts = [_c_uint(addr.attrs.get(a, "0"), a) for a in ("domain", "bus", "slot", "function")]
    shown = ",".join(f"{a}={addr.attrs.get(a, '0')}" for a in ("domain", "bus", "slot", "function"))
    return Hostdev("pci", address=_format_bdf(*parts, what="PCI hostdev address", shown=shown))


def _domain_from(root: _Node) -> Domain:
    if root.tag != "domain":
        raise UsageError(f"not a libvirt domain definition: root element is <{root.tag[:40]}>, not <domain>")
    names = [c for c in root.children if c.tag == "name"]
    if len(names) != 1:
        raise UsageError("domain XML must have exactly one <name>")
    # not stripped: libvirt takes the text of <name> as it is, and the hook compares it with its argv
    name = validate_vm_name("".join(names[0].text))
    uuids = [c for c in root.children if c.tag == "uuid"]
    if len(uuids) > 1:
        raise UsageError("domain XML has more than one <uuid>")
    uuid = _libvirt_uuid("".join(uuids[0].text), "domain uuid") if uuids else None
    devices = [c for c in root.children if c.tag == "devices"]
    if len(devices) > 1:
        raise UsageError("domain XML has more than one <devices> element")
    hostdevs: list[Hostdev] = []
    for dev in devices[:1]:
        for child in dev.children:
            if child.tag == "hostdev":
                h = _hostdev_from(child)
                if h is not None:
                    hostdevs.append(h)
    return Domain(name=name, uuid=uuid, hostdevs=hostdevs, memory_mib=_memory_mib(root))


# libvirt's scaled-integer units (formatdomain.html, "Memory Allocation"): no unit means KiB
_MEM_UNITS = {"b": 1, "bytes": 1, "kb": 10**3, "k": 2**10, "kib": 2**10, "mb": 10**6, "m": 2**20, "mib": 2**20,
              "gb": 10**9, "g": 2**30, "gib": 2**30, "tb": 10**12, "t": 2**40, "tib": 2**40,
              "pb": 10**15, "p": 2**50, "pib": 2**50, "eb": 10**18, "e": 2**60, "eib": 2**60}
MAX_GUEST_MEMORY_MIB = 2**32  # 4 PiB: far above any host; a larger figure is a broken document, not a guest


def _memory_mib(root: _Node) -> int | None:
    """The guest's RAM in MiB (rounded up): ``<currentMemory>`` (what the balloon leaves the guest, which is
    what a migration copies) where present, else ``<memory>``.  None when neither is there or either is not
    a plain decimal number with a unit libvirt knows: an unknown size, never a refused domain (the hook
    parses the same documents)."""
    sizes = {}
    for tag in ("memory", "currentMemory"):
        nodes = [c for c in root.children if c.tag == tag]
        if len(nodes) != 1:
            continue
        text = "".join(nodes[0].text).strip()
        unit = _MEM_UNITS.get(nodes[0].attrs.get("unit", "KiB").strip().lower())
        if unit is None or not text.isascii() or not text.isdigit() or len(text) > 24:
            return None
        mib = -(-int(text) * unit // 2**20)
        if mib > MAX_GUEST_MEMORY_MIB:
            return None
        sizes[tag] = mib
    if not sizes:
        return None
    return min(sizes.values())


def memory_mib(xml_text: str | bytes) -> int | None:
    """Guest RAM in MiB of a domain XML document (``virsh dumpxml``); None when it does not say."""
    return parse_domain(xml_text).memory_mib


def parse_domain(xml_text: str | bytes, *, max_bytes: int = MAX_DOMAIN_XML_BYTES) -> Domain:
    """Name, UUID and the mdev / PCI hostdevs of a libvirt domain XML document.

    Refused with a one-line :class:`UsageError`: input over ``max_bytes``, non-UTF-8 input, any DOCTYPE or
    entity declaration, malformed XML, a root other than ``<domain>``, a missing or illegal ``<name>``, and
    mdev / PCI hostdevs whose UUID or address is not valid.  Hostdevs of other kinds (usb, scsi, ...) and
    ``mode='capabilities'`` hostdevs are skipped.
    """
    data = _to_bytes(xml_text, max_bytes, "domain XML")
    return _domain_from(_parse(data, "domain XML"))


def parse_hostdev(xml_text: str | bytes) -> Hostdev:
    """The :class:`Hostdev` described by a single ``<hostdev>`` element (mdev or PCI)."""
    data = _to_bytes(xml_text, 64 * 1024, "hostdev XML").strip()
    if not data.startswith(b"<hostdev"):
        raise UsageError("hostdev XML must be a single bare <hostdev> element (no declaration, no comment)")
    # Parsed inside a minimal domain so the same code (and the same validation) reads it as parse_domain
    # does; the structure check below makes sure the snippet was exactly one element and nothing more.
    root = _parse(b"<domain><name>x</name><devices>" + data + b"</devices></domain>", "hostdev XML")
    devices = root.child("devices")
    if [c.tag for c in root.children] != ["name", "devices"] or devices is None or \
            [c.tag for c in devices.children] != ["hostdev"]:
        raise UsageError("hostdev XML must be a single bare <hostdev> element")
    h = _hostdev_from(devices.children[0])
    if h is None:
        raise UsageError("hostdev XML is neither an mdev nor a PCI subsystem <hostdev>")
    return h


def has_hostdev_quick(xml_bytes: bytes | str) -> bool:
    """Cheap pre-check for the hook fast path: can this document contain a ``<hostdev>`` element at all?

    Every hostdev element starts with the literal ``<hostdev`` (XML allows no space after '<' and libvirt
    never prefixes its own elements), so a miss is a definite "no"; a hit still needs :func:`parse_domain`.
    """
    if isinstance(xml_bytes, str):
        return "<hostdev" in xml_bytes
    return b"<hostdev" in bytes(xml_bytes) if isinstance(xml_bytes, memoryview) else b"<hostdev" in xml_bytes


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644,
                 owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data`` atomically: a temp file in the same directory, fsync, rename, fsync dir.

    A reader (libvirtd, mdevctl, a concurrent gpuvirt) sees the old file or the new one, never a torn one.
    ``mode`` is applied explicitly so the process umask does not decide who may read the result; ``owner``
    (uid, gid) is restored when we are allowed to (root), so editing a file does not hand it to root.
    Also used by :mod:`gpuvirt.vmm.mdevctl`.
    """
    import tempfile  # only writers need it; keeps the hook's parse-only path lighter

    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            if owner is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(fh.fileno(), *owner)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def rewrite_file_in_place(path: str | os.PathLike[str], fn: Callable[[str], str], *,
                          max_bytes: int = MAX_DOMAIN_XML_BYTES) -> bool:
    """Apply ``fn`` (text -> text) to the file at ``path`` and replace it atomically; True if it changed.

    * refuses non-regular files and files over ``max_bytes`` before reading them, and non-UTF-8 content;
    * a symlink is followed and its target rewritten, so the link itself stays a link;
    * the file keeps its permission bits (and owner, when we are root);
    * if ``fn`` raises, nothing is written; if it returns the same text, the file is not touched;
    * the read-modify-write holds an exclusive ``flock`` on the file, so two gpuvirt processes editing the
      same domain file serialise instead of losing one edit.
    """
    shown = os.fspath(path)
    real = os.path.realpath(shown)
    for _ in range(10):
        try:
            # O_NONBLOCK: opening a FIFO planted at the path must not hang us; it is refused just below
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise UsageError(f"cannot read {shown}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UsageError(f"{shown} is not a regular file")
        with os.fdopen(fd, "rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            st = os.fstat(fh.fileno())
            try:
                current = os.stat(real)
            except OSError:
                current = None
            if current is None or (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino):
                continue  # replaced by a concurrent writer while we waited for the lock: start over
            if st.st_size > max_bytes:
                raise UsageError(f"{shown} is larger than {max_bytes} bytes; refusing to edit it")
            raw = fh.read(max_bytes + 1)
            if len(raw) > max_bytes:
                raise UsageError(f"{shown} is larger than {max_bytes} bytes; refusing to edit it")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"{shown} is not valid UTF-8") from None
            new = fn(text)
            if not isinstance(new, str):
                raise TypeError("rewrite_file_in_place: fn must return str")
            if new == text:
                return False
            encoded = new.encode("utf-8")
            if len(encoded) > max_bytes:
                raise UsageError(f"the edited {shown} would be larger than {max_bytes} bytes; not written")
            try:
                atomic_write(real, encoded, mode=stat.S_IMODE(st.st_mode), owner=(st.st_uid, st.st_gid))
            except OSError as exc:
                raise UsageError(f"cannot write {shown}: {exc.strerror}") from None
            return True
    raise UsageError(f"{shown} keeps being replaced by another writer; try again")


__all__ = [
    "MAX_DOMAIN_XML_BYTES", "Domain", "Hostdev", "atomic_write", "has_hostdev_quick", "insert_hostdev",
    "mdev_hostdev", "nodedev_name", "nodedev_xml", "normalize_pci_address", "normalize_uuid", "parse_domain",
    "parse_hostdev", "pci_hostdev", "remove_hostdev", "retarget_hostdev", "rewrite_file_in_place", "validate_mdev_type",
    "validate_vm_name",
]


# the in-place editors live in libvirt_edit (split by subject); every caller keeps importing them from here
from gpuvirt.vmm.libvirt_edit import insert_hostdev, remove_hostdev, retarget_hostdev  # noqa: E402,F401
