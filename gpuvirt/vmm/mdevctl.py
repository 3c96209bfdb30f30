"""mdevctl's persistent definitions: ``<root>/etc/mdevctl.d/<parent>/<uuid>``, read and written like mdevctl.

Why: libvirt builds its mdev node devices by running ``mdevctl list --dumpjson [--defined]``, so an mdev that
gpuvirt keeps persistent is only visible to ``virsh nodedev-*`` (and to operators' mdevctl habits) if a
definition file exists there.  Conversely, definitions written by mdevctl or by ``virsh nodedev-define`` can be
adopted into the inventory.

File format (mdevctl 1.2.0, checked by running it; see tests/test_vmm_parse.py): pretty-printed JSON with a
two-space indent, keys in the order ``mdev_type``, ``start`` (``auto`` | ``manual``), ``attrs`` (a list of
single-key objects with string values, applied in order to ``/sys/bus/mdev/devices/<uuid>/<name>`` at start),
non-ASCII characters written as UTF-8, no trailing newline.  mdevctl creates the parent directory with the
process umask (0755 / 0644 under the usual 022); gpuvirt sets 0755 / 0644 explicitly so that a restrictive
umask cannot hide definitions from libvirtd or from an unprivileged ``mdevctl list``.

Reading differs from mdevctl on purpose: mdevctl 1.2.0 aborts the whole command on one corrupt file (and
panics on a non-string attribute value); :func:`read_definitions` turns every bad entry into a warning that
names its path and carries on with the rest.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gpuvirt.errors import UsageError
from gpuvirt.vmm.libvirt import atomic_write, normalize_pci_address, normalize_uuid, validate_mdev_type

CONFIG_DIR = Path("etc") / "mdevctl.d"
#: mdevctl 1.2.0 keeps its callout/notifier directories here; it is not a parent device
SCRIPTS_DIR = "scripts.d"
START_MODES = ("auto", "manual")
DIR_MODE = 0o755
FILE_MODE = 0o644
#: a definition is a few hundred bytes; anything far larger is not one
MAX_DEFINITION_BYTES = 64 * 1024
_MAX_ATTR_VALUE_BYTES = 4096  # one sysfs page: what a sysfs attribute write accepts
# attr names become file names under /sys/bus/mdev/devices/<uuid>/ when mdevctl starts the device
_ATTR_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_CANONICAL_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_CANONICAL_BDF_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")

Attrs = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Definition:
    parent: str  # PCI address of the parent device, e.g. 0000:41:00.4
    uuid: str
    type_id: str
    start: str  # "auto" | "manual"
    attrs: Attrs  # ((name, value), ...) in the order mdevctl applies them
    path: Path


def _attrs(attrs: Iterable[object] | Mapping[str, str]) -> Attrs:
    """Normalise attrs given as (name, value) pairs, single-key mappings or one mapping; validate them."""
    items: list[tuple[object, object]] = []
    if isinstance(attrs, Mapping):
        items = list(attrs.items())
    else:
        for a in attrs:
            if isinstance(a, Mapping):
                if len(a) != 1:
                    raise UsageError("each mdev attr must have exactly one name: {\"name\": \"value\"}")
                items.append(next(iter(a.items())))
            elif isinstance(a, (tuple, list)) and len(a) == 2:
                items.append((a[0], a[1]))
            else:
                raise UsageError(f"invalid mdev attr {a!r}: expected (name, value)")
    out = []
    for name, value in items:
        if not isinstance(name, str) or not _ATTR_NAME_RE.match(name):
            raise UsageError(f"invalid mdev attr name {name!r}: expected a sysfs file name such as 'enable'")
        if not isinstance(value, str):
            raise UsageError(f"mdev attr {name} must be a string (mdevctl only accepts string values)")
        if "\0" in value or len(value.encode("utf-8", "surrogatepass")) > _MAX_ATTR_VALUE_BYTES:
            raise UsageError(f"mdev attr {name}: value must be text without NUL, at most 4096 bytes")
        out.append((name, value))
    return tuple(out)


def config_json(type_id: str, start: str = "auto", attrs: Iterable[object] | Mapping[str, str] = ()) -> str:
    """The definition file's content, byte for byte as mdevctl 1.2.0 writes it."""
    t = validate_mdev_type(type_id)
    if start not in START_MODES:
        raise UsageError(f"invalid start mode {start!r}: expected 'auto' or 'manual'")
    doc = {"mdev_type": t, "start": start, "attrs": [{n: v} for n, v in _attrs(attrs)]}
    # serde_json's pretty printer: 2-space indent, ", " never at line ends, ": " after keys, UTF-8 kept as is,
    # "[]" for an empty list and no final newline - json.dumps with these options produces the same bytes.
    return json.dumps(doc, indent=2, ensure_ascii=False)


def definition_path(root: str | os.PathLike[str], parent: str, uuid: str) -> Path:
    """``<root>/etc/mdevctl.d/<parent>/<uuid>``, built only from a validated PCI address and UUID."""
    p = normalize_pci_address(parent, "mdev parent PCI address")
    u = normalize_uuid(uuid, "mdev UUID")
    return Path(root) / CONFIG_DIR / p / u


def _mkdir(path: Path) -> None:
    """Create ``path`` and missing ancestors with 0755 (mode set explicitly, see the module docstring)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # created concurrently: fine
        os.chmod(d, DIR_MODE)
    if not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory")


def write_definition(root: str | os.PathLike[str], parent: str, uuid: str, type_id: str, start: str = "auto",
                     attrs: Iterable[object] | Mapping[str, str] = ()) -> Path:
    """Write (or replace) the mdevctl definition of ``uuid`` under ``parent`` atomically; returns its path."""
    path = definition_path(root, parent, uuid)
    content = config_json(type_id, start, attrs).encode("utf-8")
    try:
        _mkdir(path.parent)
        atomic_write(path, content, mode=FILE_MODE)
    except OSError as exc:
        raise UsageError(f"cannot write mdevctl definition {path}: {exc.strerror}") from None
    return path


def remove_definition(root: str | os.PathLike[str], parent: str, uuid: str) -> bool:
    """Delete the definition; True if it existed.  The parent directory stays, as with ``mdevctl undefine``."""
    path = definition_path(root, parent, uuid)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UsageError(f"cannot remove mdevctl definition {path}: {exc.strerror}") from None
    return True


def _load(path: Path, parent: str, uuid: str) -> tuple[Definition | None, list[str]]:
    """One definition file -> (Definition or None, problems)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        return None, [f"cannot open: {exc.strerror}"]
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None, ["not a regular file"]
        raw = fh.read(MAX_DEFINITION_BYTES + 1)
    if len(raw) > MAX_DEFINITION_BYTES:
        return None, [f"larger than {MAX_DEFINITION_BYTES} bytes; not an mdevctl definition"]
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, ["not UTF-8"]
    except json.JSONDecodeError as exc:
        return None, [f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
    if not isinstance(doc, dict):
        return None, ["invalid definition: expected a JSON object"]
    problems: list[str] = []
    type_id, start = doc.get("mdev_type"), doc.get("start")
    if not isinstance(type_id, str) or not isinstance(start, str):
        return None, ["invalid definition: mdev_type and start are required strings"]
    try:
        validate_mdev_type(type_id)
    except UsageError as exc:
        return None, [str(exc)]
    if start not in START_MODES:
        # mdevctl reads anything but "auto" as manual; say so instead of guessing silently
        problems.append(f"start {start[:20]!r} is neither 'auto' nor 'manual'; read as 'manual' (as mdevctl does)")
        start = "manual"
    raw_attrs = doc.get("attrs", [])
    if not isinstance(raw_attrs, list):
        return None, problems + ["invalid definition: attrs must be a list"]
    try:
        attrs = _attrs(raw_attrs)
    except UsageError as exc:
        return None, problems + [f"invalid attrs: {exc}"]
    return Definition(parent, uuid, type_id, start, attrs, path), problems


def read_definitions(root: str | os.PathLike[str]) -> tuple[list[Definition], list[tuple[Path, str]]]:
    """All definitions under ``<root>/etc/mdevctl.d``, sorted by parent then UUID, and (path, problem) warnings.

    Skipped with a warning: parent directories whose name is not a PCI address (gpuvirt only manages PCI
    parents; mdevctl itself accepts any name), file names that are not lower-case UUIDs, symlinks and other
    non-regular entries, unreadable/corrupt/oversized files and invalid fields.  The ``scripts.d`` directory
    and stray files directly in ``etc/mdevctl.d`` (which mdevctl ignores too) are skipped silently.  A
    missing ``etc/mdevctl.d`` is simply "no definitions".
    """
    base = Path(root) / CONFIG_DIR
    defs: list[Definition] = []
    warnings: list[tuple[Path, str]] = []
    try:
        parents = sorted(os.scandir(base), key=lambda e: e.name)
    except FileNotFoundError:
        return defs, warnings
    except OSError as exc:
        return defs, [(base, f"cannot list: {exc.strerror}")]
    for pe in parents:
        if pe.name == SCRIPTS_DIR:
            continue
        ppath = Path(pe.path)
        if pe.is_symlink():
            warnings.append((ppath, "symlink; not followed"))
            continue
        if not pe.is_dir(follow_symlinks=False):
            continue
        if not _CANONICAL_BDF_RE.match(pe.name):
            warnings.append((ppath, "parent name is not a PCI address (0000:41:00.4); ignored"))
            continue
        try:
            files = sorted(os.scandir(ppath), key=lambda e: e.name)
        except OSError as exc:
            warnings.append((ppath, f"cannot list: {exc.strerror}"))
            continue
        for fe in files:
            fpath = Path(fe.path)
            if not _CANONICAL_UUID_RE.match(fe.name):
                warnings.append((fpath, "file name is not a lower-case UUID; ignored"))
                continue
            if fe.is_symlink():
                warnings.append((fpath, "symlink; not followed"))
                continue
            d, problems = _load(fpath, pe.name, fe.name)
            warnings.extend((fpath, p) for p in problems)
            if d is not None:
                defs.append(d)
    return defs, warnings


__all__ = [
    "CONFIG_DIR", "Definition", "SCRIPTS_DIR", "config_json", "definition_path", "read_definitions",
    "remove_definition", "write_definition",
]
