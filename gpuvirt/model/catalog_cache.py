"""The catalog files, the cache of their parsed form, and the PCI lookup discovery needs (light: no YAML
parser, no dataclasses, so that a discovery on a vGPU host does not pay for the whole catalog).

Parsing the YAML files costs more than everything else discovery does on a vGPU host (about 70 ms of CPU
for the 25 files, against 2 ms for the same documents as JSON), and discovery runs on every ``gpuvirt
discover``, hook and unit start. :func:`gpuvirt.model.catalog.load_catalog` therefore keeps the parsed
documents as JSON under the user's cache directory, keyed by a digest of the YAML text, so an edited catalog
file is parsed again on the next run; the same file holds the PCI identity of every board, which is all
discovery asks of the catalog when NVML is absent. The cache holds plain data (``json.loads`` cannot run
code) and is used only when the file and its directory belong to the user and nobody else may write them;
anything odd and the YAML is parsed as if there were no cache.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from typing import Any

CACHE_ENV = "GPUVIRT_CACHE_DIR"
_FORMAT = 3
_KEEP = 8
_MAX_BYTES = 16 * 1024 * 1024

# one board's PCI identity: [id, display name, vendor, device, subsystem vendor, subsystem device, VF device,
# vGPU type prefix]
PciRow = Sequence[Any]


def models_dir() -> str:
    # the package's own directory, without importlib.resources (its import costs more than a cached catalog
    # load): gpuvirt._profiles is a plain package installed as files
    from gpuvirt._data import data_dir

    return os.path.join(data_dir("profiles"), "models")


def models_dir_files() -> list[tuple[str, str]]:
    """(file name, text) of every catalog file, sorted by name."""
    root = models_dir()
    out = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".yaml"):
            with open(os.path.join(root, name), encoding="utf-8") as fh:
                out.append((name, fh.read()))
    return out


def cache_dir() -> str | None:
    """Where the parsed catalog is cached: $GPUVIRT_CACHE_DIR ("" or "off" disables), else
    $XDG_CACHE_HOME/gpuvirt, else ~/.cache/gpuvirt; None without a home directory."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit is not None:
        return None if explicit in ("", "off") else explicit
    home = os.environ.get("HOME")
    base = os.environ.get("XDG_CACHE_HOME") or (os.path.join(home, ".cache") if home not in (None, "", "/") else None)
    return os.path.join(base, "gpuvirt") if base else None


def digest(files: Sequence[tuple[str, str]]) -> str:
    """Detects edits of the catalog files, nothing more (the cache is private to the user): two checksums and
    the length of every file. zlib is built in; hashlib would load OpenSSL, which costs more here than parsing
    the cached documents."""
    import zlib

    crc, adler, sizes = 0, 1, []
    for name, text in files:
        data = f"{name}\0{text}".encode()
        crc, adler = zlib.crc32(data, crc), zlib.adler32(data, adler)
        sizes.append(len(data))
    return f"{_FORMAT}-{crc:08x}{adler:08x}-{zlib.crc32(repr(sizes).encode()):08x}"


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _path(directory: str, key: str) -> str:
    return os.path.join(directory, f"catalog-{key}.json")


def read_cache(directory: str, key: str, part: str) -> Any:
    """``part`` ("docs": [[file name, document], ...], or "pci": [PciRow, ...]) of the cache file for ``key``;
    None when there is none usable."""
    try:
        if not _private(os.stat(directory, follow_symlinks=False)):
            return None
        fd = os.open(_path(directory, key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _private(st) or st.st_size > _MAX_BYTES:
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        doc = json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("key") != key:
        return None
    value = doc.get(part)
    if part == "docs":
        if not isinstance(value, list) or not all(isinstance(d, list) and len(d) == 2 and isinstance(d[0], str)
                                                  for d in value):
            return None
        return [(name, body) for name, body in value]
    if not isinstance(value, list) or not all(isinstance(r, list) and len(r) == 8 for r in value):
        return None
    return value


def write_cache(directory: str, key: str, docs: list[tuple[str, Any]], pci: list[PciRow]) -> None:
    """Store the parsed documents and the PCI rows (atomically: a reader sees the old file or the new one);
    older cache files beyond the newest few are removed. Failures only cost speed."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _private(os.stat(directory, follow_symlinks=False)):
            return
        data = json.dumps({"format": _FORMAT, "key": key, "pci": pci, "docs": [[n, d] for n, d in docs]},
                          separators=(",", ":")).encode()
        tmp = os.path.join(directory, f".catalog-{key}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, _path(directory, key))
        old = sorted((e for e in os.scandir(directory) if e.name.startswith("catalog-") and e.name.endswith(".json")),
                     key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True)
        for e in old[_KEEP:]:
            os.unlink(e.path)
    except (OSError, TypeError, ValueError):
        pass


def pci_lookup(rows: Sequence[PciRow], vendor_id: int, device_id: int, subsystem_vendor_id: int | None = None,
               subsystem_device_id: int | None = None) -> PciRow | None:
    """The board with this PCI identity.

    Boards sharing a device id (A2 and A16 both report 10de:25b6) are told apart by their subsystem id; when
    the device id alone is unambiguous the subsystem is not looked at (OEM boards carry their own subsystem
    ids). Shared id and no matching subsystem: None, rather than a guess."""
    found = [r for r in rows if r[2] == vendor_id and r[3] == device_id]
    if len(found) <= 1:
        return found[0] if found else None
    exact = [r for r in found if r[5] is not None and r[5] == subsystem_device_id
             and (r[4] is None or r[4] == subsystem_vendor_id)]
    return exact[0] if len(exact) == 1 else None


def vf_lookup(rows: Sequence[PciRow], vendor_id: int, device_id: int) -> PciRow | None:
    """The board whose SR-IOV VFs report this id (for a VF whose PF is not in sight); None when several do."""
    found = [r for r in rows if r[2] == vendor_id and r[6] == device_id]
    return found[0] if len(found) == 1 else None


def by_vgpu_types(rows: Sequence[PciRow], vendor_id: int, device_id: int, type_names: Sequence[str]) -> PciRow | None:
    """Of the boards with this device id (or VF device id), the one whose vGPU type names the function
    offers: "NVIDIA A2-4Q" is an A2's type, so a 10de:25b6 function offering it is an A2, whatever its
    subsystem id says (a VF reports 0000). None when the names settle nothing."""
    boards = {(name.split()[-1].split("-")[0] if name.split() else "") for name in type_names}
    found = [r for r in rows if r[2] == vendor_id and device_id in (r[3], r[6]) and r[7] in boards]
    return found[0] if len(found) == 1 else None


def pci_index() -> list[PciRow]:
    """Every board's PCI identity, from the cache when it matches the catalog files, else from the parsed
    catalog (which writes the cache for the next run)."""
    files = models_dir_files()
    directory = cache_dir()
    if directory is not None:
        rows = read_cache(directory, digest(files), "pci")
        if rows is not None:
            return rows
    from gpuvirt.model.catalog import load_catalog, pci_rows

    return pci_rows(load_catalog().models.values())


__all__ = ["CACHE_ENV", "by_vgpu_types", "cache_dir", "digest", "models_dir", "models_dir_files", "pci_index",
           "pci_lookup", "read_cache", "vf_lookup", "write_cache"]
