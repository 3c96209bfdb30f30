"""In-place editing of libvirt domain XML: insert, remove and retarget a ``<hostdev>`` (split from
:mod:`gpuvirt.vmm.libvirt`, which parses; the functions are imported from there by every caller).

Each edit splices bytes into or out of the original document at the offsets expat reports, so every byte
outside the edited element stays as it was (comments, attribute order and quoting, CRLF line ends).
"""

from __future__ import annotations

from gpuvirt.errors import UsageError
from gpuvirt.vmm.libvirt import (
    MAX_DOMAIN_XML_BYTES,
    _domain_from,
    _hostdev_from,
    _parse,
    _to_bytes,
    mdev_hostdev,
    normalize_pci_address,
    normalize_uuid,
    parse_hostdev,
    pci_hostdev,
)


def _line_indent(buf: bytes, pos: int) -> bytes | None:
    """The whitespace between the start of the line and ``pos``, or None if other text precedes ``pos``."""
    nl = buf.rfind(b"\n", 0, pos)
    lead = buf[nl + 1:pos]
    return lead if lead.strip(b" \t") == b"" else None


def _newline(buf: bytes) -> bytes:
    return b"\r\n" if b"\r\n" in buf else b"\n"


def _block(lines: list[bytes], indent: bytes, nl: bytes, unit: bytes = b"  ") -> bytes:
    """Lines of an element, each on a new line after ``indent``; the element's own two-space nesting is
    re-expressed in the document's indentation ``unit`` (a tab-indented file stays tab-indented)."""
    out = []
    for line in lines:
        body = line.lstrip(b" ")
        depth, odd = divmod(len(line) - len(body), 2)
        out.append(nl + indent + unit * depth + b" " * odd + body)
    return b"".join(out)


def _hostdev_lines(hostdev_xml: str) -> list[bytes]:
    return [ln.rstrip().encode("utf-8") for ln in hostdev_xml.strip().splitlines() if ln.strip()]


def _unit(outer: bytes | None, inner: bytes | None) -> bytes:
    """The indentation step of the document, from an element's indent and its first child's."""
    if outer is not None and inner is not None and inner.startswith(outer) and len(inner) > len(outer):
        return inner[len(outer):]
    return b"  "


def insert_hostdev(domain_xml: str | bytes, hostdev_xml: str, *, max_bytes: int = MAX_DOMAIN_XML_BYTES) -> str:
    """``domain_xml`` with ``hostdev_xml`` appended to ``<devices>``; unchanged if that source is present.

    The element goes after the last child of ``<devices>`` (``<devices>`` is created before ``</domain>`` when
    absent), on its own lines, indented like its siblings; each of its lines keeps its own relative
    indentation.  Everything else in the document is preserved byte for byte (see the module docstring).
    A second mdev with ``ramfb='on'`` is refused: libvirt allows ramfb on one vGPU per domain.
    """
    data = _to_bytes(domain_xml, max_bytes, "domain XML")
    root = _parse(data, "domain XML")
    dom = _domain_from(root)
    new = parse_hostdev(hostdev_xml)
    if any(h.key == new.key for h in dom.hostdevs):
        return data.decode("utf-8")  # idempotent: that device is already handed to this domain
    if new.ramfb and any(h.ramfb for h in dom.hostdevs):
        raise UsageError("the domain already has an mdev with ramfb='on'; libvirt allows ramfb on only one vGPU")
    lines = _hostdev_lines(hostdev_xml)
    nl = _newline(data)
    devices = root.child("devices")
    # indentation of <domain>'s children (the root itself is never indented): also the document's step
    dom_ci = next((i for c in root.children if (i := _line_indent(data, c.start)) is not None), None)
    unit = _unit(b"", dom_ci) if dom_ci else b"  "
    if devices is None:
        # no <devices> at all (legal for libvirt): add one as the last child of <domain>
        close = data.rindex(b"</", 0, root.end)
        k = _ws_start(data, close, root.tag_end)
        ci = dom_ci if dom_ci is not None else unit
        block = nl + ci + b"<devices>" + _block(lines, ci + unit, nl, unit) + nl + ci + b"</devices>"
        if b"\n" not in data[k:close]:
            block += nl
        return (data[:k] + block + data[k:]).decode("utf-8")
    dev_indent = _line_indent(data, devices.start)
    child_indent: bytes | None = None
    if devices.children:
        child_indent = _line_indent(data, devices.children[0].start)
        unit = _unit(dev_indent, child_indent) if child_indent is not None else unit
    elif dev_indent is not None:
        child_indent = dev_indent + unit
    pretty = child_indent is not None and dev_indent is not None
    if devices.end == devices.tag_end:  # <devices/>: rewrite the empty-element tag as a start/end pair
        open_tag = data[devices.start:devices.tag_end - 2].rstrip() + b">"
        if pretty:
            body = open_tag + _block(lines, child_indent, nl, unit) + nl + dev_indent + b"</devices>"
        else:
            body = open_tag + b"".join(ln.strip() for ln in lines) + b"</devices>"
        return (data[:devices.start] + body + data[devices.end:]).decode("utf-8")
    close = data.rindex(b"</", devices.tag_end, devices.end)
    k = _ws_start(data, close, devices.tag_end)
    if not pretty:
        # a one-line <devices>...</devices>: stay on that line rather than invent a layout
        out = data[:close] + b"".join(ln.strip() for ln in lines) + data[close:]
    elif b"\n" in data[k:close]:
        out = data[:k] + _block(lines, child_indent, nl, unit) + data[k:]
    else:
        out = data[:k] + _block(lines, child_indent, nl, unit) + nl + dev_indent + data[close:]
    return out.decode("utf-8")


def _ws_start(data: bytes, pos: int, floor: int) -> int:
    """Start of the run of whitespace that ends at ``pos`` (not before ``floor``)."""
    k = pos
    while k > floor and data[k - 1:k] in (b" ", b"\t", b"\r", b"\n"):
        k -= 1
    return k


def _own_lines(data: bytes, s: int, e: int) -> tuple[int, int]:
    """The span to cut for the element at [s, e): with the newline and indentation in front of it when the
    element has its line to itself, so that removing it leaves no blank line."""
    nxt = data.find(b"\n", e)
    if _line_indent(data, s) is not None and data[e:nxt if nxt >= 0 else len(data)].strip() == b"":
        k = data.rfind(b"\n", 0, s)
        if k > 0 and data[k - 1:k] == b"\r":
            k -= 1
        s = max(k, 0)
    return s, e


def remove_hostdev(domain_xml: str | bytes, uuid: str | None = None, address: str | None = None, *,
                   max_bytes: int = MAX_DOMAIN_XML_BYTES) -> str:
    """``domain_xml`` without the mdev hostdev ``uuid`` (or the PCI hostdev ``address``); unchanged if absent.

    The element's own lines go with it; surrounding text, including any comment above it, is kept.
    """
    if (uuid is None) == (address is None):
        raise UsageError("remove_hostdev needs exactly one of uuid (mdev) or address (PCI)")
    want = ("mdev", normalize_uuid(uuid, "mdev UUID")) if uuid is not None else \
        ("pci", normalize_pci_address(address))
    data = _to_bytes(domain_xml, max_bytes, "domain XML")
    root = _parse(data, "domain XML")
    _domain_from(root)  # validates the whole document, so we never edit something libvirt would refuse
    devices = root.child("devices")
    spans: list[tuple[int, int]] = []
    for node in devices.children if devices is not None else []:
        if node.tag != "hostdev":
            continue
        h = _hostdev_from(node)
        if h is None or h.key != want:
            continue
        spans.append(_own_lines(data, node.start, node.end))
    if not spans:
        return data.decode("utf-8")
    out = data
    for s, e in reversed(spans):
        out = out[:s] + out[e:]
    # attach adds a <devices> to a domain that had none; the last hostdev going takes it along again, so
    # that insert then remove gives back the original bytes (an empty <devices> means the same to libvirt)
    dev = _parse(out, "domain XML").child("devices")
    if dev is not None and not dev.children and dev.end != dev.tag_end:
        close = out.rindex(b"</", dev.tag_end, dev.end)
        if out[dev.tag_end:close].strip() == b"":
            s, e = _own_lines(out, dev.start, dev.end)
            out = out[:s] + out[e:]
    return out.decode("utf-8")


def retarget_hostdev(domain_xml: str | bytes, *, old_uuid: str | None = None, old_address: str | None = None,
                     new_uuid: str | None = None, new_address: str | None = None,
                     max_bytes: int = MAX_DOMAIN_XML_BYTES) -> str:
    """``domain_xml`` with the hostdev of the old device (mdev ``old_uuid`` or PCI ``old_address``) made to name
    the new device (``new_uuid`` / ``new_address``): the target XML of a VM moved to another GPU (``virsh
    migrate --xml`` / ``--persistent-xml``, or ``virsh define`` for a cold move).

    The element is edited where it stands, never rebuilt: libvirt's migration check pairs hostdevs by their
    position and guest ``<address>``, and the guest must find its vGPU at the same PCI slot after a move.  So
    only the ``<address>`` inside ``<source>`` is replaced, and every other child (guest ``<address>``,
    ``<alias>``, ``<boot>``, ``<rom>``, ...) and every other byte stays.  Between an mdev and a PCI device the
    start tag becomes the new kind's (``type``/``model``; ``display``/``ramfb`` only exist for an mdev) and
    what only a PCI hostdev may carry (``<driver>``, ``<teaming>``, ``<source>`` attributes) goes.
    Idempotent: a document that already names the new device and not the old one comes back unchanged.
    Raises ``UsageError`` when the document holds neither device (it is not this VM's XML).
    """
    if (old_uuid is None) == (old_address is None) or (new_uuid is None) == (new_address is None):
        raise UsageError("retarget_hostdev needs one old device and one new device (an mdev UUID or a PCI address)")
    old = ("mdev", normalize_uuid(old_uuid, "mdev UUID")) if old_uuid is not None else \
        ("pci", normalize_pci_address(old_address))
    new = ("mdev", normalize_uuid(new_uuid, "mdev UUID")) if new_uuid is not None else \
        ("pci", normalize_pci_address(new_address))
    data = _to_bytes(domain_xml, max_bytes, "domain XML")
    root = _parse(data, "domain XML")
    dom = _domain_from(root)  # validates the whole document, so we never edit something libvirt would refuse
    have = {h.key for h in dom.hostdevs}
    if old not in have:
        if new in have:
            return data.decode("utf-8")
        raise UsageError(f"domain {dom.name!r} has no <hostdev> for {old[1]} (nor for {new[1]})")
    if new in have:  # both named (a half-edited document): the new one stays where it is, the old one goes
        return remove_hostdev(data, uuid=old_uuid, address=old_address, max_bytes=max_bytes)
    devices = root.child("devices")
    assert devices is not None  # a hostdev was found in it
    node = next(c for c in devices.children if c.tag == "hostdev" and (h := _hostdev_from(c)) is not None
                and h.key == old)
    source = node.child("source")
    addr = source.child("address") if source is not None else None
    assert source is not None and addr is not None  # _hostdev_from refuses a hostdev without them
    edits: list[tuple[int, int, bytes]] = []  # (start, end, replacement), spans within the hostdev
    if new[0] == "mdev":
        edits.append((addr.start, addr.end, f"<address uuid='{new[1]}'/>".encode()))
    else:
        d, b, rest = new[1].split(":")
        sl, fn = rest.split(".")
        edits.append((addr.start, addr.end,
                      f"<address domain='0x{d}' bus='0x{b}' slot='0x{sl}' function='0x{fn}'/>".encode()))
    if new[0] != old[0]:
        # the start tag of the new kind, as attach writes it (managed='no': see mdev_hostdev / pci_hostdev)
        tag = mdev_hostdev(new[1]) if new[0] == "mdev" else pci_hostdev(new[1])
        edits.append((node.start, node.tag_end, tag[:tag.index(">") + 1].encode()))
        if source.attrs:  # startupPolicy / writeFiltering belong to a PCI source only
            edits.append((source.start, source.tag_end, b"<source>"))
        for child in node.children:
            if child.tag in ("driver", "teaming"):
                edits.append(_own_lines(data, child.start, child.end) + (b"",))
    out = data
    for s, e, text in sorted(edits, reverse=True):
        out = out[:s] + text + out[e:]
    return out.decode("utf-8")
