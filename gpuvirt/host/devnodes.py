"""Device nodes, the NVIDIA driver's /proc files and CDI spec directories of a host (under the injected root).

What a container needs to reach a MIG device or a whole GPU is a handful of character devices; which ones is
read here, the way nvidia-container-toolkit reads them (``../shared/reference/containers-cdi.md``):

* ``/proc/driver/nvidia-caps/mig-minors``: ``NAME MINOR`` lines (``config``, ``monitor``,
  ``gpu<G>/gi<I>/access``, ``gpu<G>/gi<I>/ci<C>/access``; ``G`` is the GPU's minor number); malformed lines
  are skipped like the toolkit's parser does;
* ``/proc/devices``: the dynamic majors (``nvidia-caps``, ``nvidia-uvm``), for a spec that must describe a
  node the host has not created (nvidia-modprobe creates capability nodes on demand);
* ``/sys/bus/pci/devices/<bdf>/drm/``: a GPU's DRM nodes (``card<N>``, ``renderD<M>``).

Spec files are written with the project's one atomic writer (temp file, fsync, rename, fsync of the folder)
and removed only by name; nothing here decides which files are gpuvirt's (that is :mod:`gpuvirt.vmm.cdi`'s
mark, checked by the caller before it asks for a write or a removal).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from gpuvirt.errors import HostError, HostPermissionError

MIG_MINORS = "proc/driver/nvidia-caps/mig-minors"
PROC_DEVICES = "proc/devices"
MAX_PROC_BYTES = 1024 * 1024            # mig-minors for 32 GPUs is ~100 KB
MAX_SPEC_FILES = 4096                   # a spec folder holding more is not one gpuvirt can manage
_CAP = re.compile(r"(config|monitor|gpu\d+/gi\d+/access|gpu\d+/gi\d+/ci\d+/access)")


def _read_small(path: Path, limit: int = MAX_PROC_BYTES) -> str | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    if len(data) > limit:
        raise HostError(f"{path}: more than {limit} bytes, not the driver's file", path=str(path))
    return data.decode("utf-8", "replace")


class DevNodes:
    """Read-only view of a host's device nodes and driver tables."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)
        self._minors: dict[str, int] | None = None
        self._majors: dict[str, int] | None = None

    def host_path(self, dev_path: str) -> str:
        """The host's file for a node path as a container sees it (``/dev/nvidia0``)."""
        return str(self.root / dev_path.lstrip("/"))

    def mig_minors(self) -> dict[str, int]:
        """Capability name -> minor; empty when the driver has no MIG capability table (no MIG, or no driver)."""
        if self._minors is None:
            text = _read_small(self.root / MIG_MINORS) or ""
            out: dict[str, int] = {}
            for line in text.splitlines():
                parts = line.split(" ")
                if len(parts) == 2 and _CAP.fullmatch(parts[0]) and parts[1].isdigit():
                    out[parts[0]] = int(parts[1])
            self._minors = out
        return self._minors

    def char_majors(self) -> dict[str, int]:
        """Driver name -> character major from /proc/devices (the first one listed under a name)."""
        if self._majors is None:
            text = _read_small(self.root / PROC_DEVICES) or ""
            out: dict[str, int] = {}
            section = None
            for line in text.splitlines():
                if line.endswith(":"):
                    section = line[:-1].strip().lower()
                    continue
                parts = line.split(None, 1)
                if section == "character devices" and len(parts) == 2 and parts[0].isdigit():
                    out.setdefault(parts[1].strip(), int(parts[0]))
            self._majors = out
        return self._majors

    def exists(self, dev_path: str) -> bool:
        """Is there a node (or, on a host under test, a file standing for one) at this path?"""
        return os.path.lexists(self.host_path(dev_path))

    def is_char_device(self, dev_path: str) -> bool:
        try:
            return stat.S_ISCHR(os.stat(self.host_path(dev_path)).st_mode)
        except OSError:
            return False

    def drm_nodes(self, pci_address: str) -> list[str]:
        """``/dev/dri/card<N>`` and ``/dev/dri/renderD<M>`` of a PCI function, cards first (empty when nvidia-drm
        is not loaded)."""
        d = self.root / "sys/bus/pci/devices" / pci_address / "drm"
        try:
            names = sorted(os.listdir(d))
        except OSError:
            return []
        cards = [n for n in names if re.fullmatch(r"card\d+", n)]
        renders = [n for n in names if re.fullmatch(r"renderD\d+", n)]
        return [f"/dev/dri/{n}" for n in cards + renders]


# --- CDI spec folders ----------------------------------------------------------------------------------------
def list_specs(folder: str | os.PathLike[str]) -> list[str]:
    """File names of the spec folder (``*.json`` / ``*.yaml``), sorted; empty when the folder does not exist."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise HostError(f"cannot list {folder}: {exc.strerror}", path=str(folder)) from exc
    out = sorted(n for n in names if n.endswith((".json", ".yaml")) and not n.startswith("."))
    if len(out) > MAX_SPEC_FILES:
        raise HostError(f"{folder} holds {len(out)} spec files, more than the {MAX_SPEC_FILES} gpuvirt reads",
                        path=str(folder))
    return out


def read_spec(path: str | os.PathLike[str], limit: int) -> str | None:
    """A spec file's text; None when it does not exist; HostError when it is not a readable regular file of at
    most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HostError(f"{path} is not a regular file", path=str(path))
        chunks, got = [], 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:
            raise HostError(f"{path}: more than {limit} bytes, not a CDI spec", path=str(path))
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def write_spec(path: str | os.PathLike[str], text: str) -> None:
    """Publish a spec: readable by every container runtime (0644), atomically replaced, folder created 0755."""
    from gpuvirt.vmm.libvirt import atomic_write

    p = Path(path)
    try:
        p.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(p, text.encode(), mode=0o644)
    except OSError as exc:
        cls = HostPermissionError if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else HostError
        raise cls(f"cannot write CDI spec {p}: {exc.strerror}", path=str(p)) from exc


def remove_leftovers(folder: str | os.PathLike[str], prefix: str) -> None:
    """Temp files of atomic writes a crash interrupted (``.<name>.<random>.tmp``; runtimes ignore them)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for n in names:
        if n.startswith(prefix) and n.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, n))
            except OSError:
                pass


def remove_spec(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        cls = HostPermissionError if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else HostError
        raise cls(f"cannot remove CDI spec {path}: {exc.strerror}", path=str(path)) from exc


__all__ = ["DevNodes", "list_specs", "read_spec", "write_spec", "remove_spec", "remove_leftovers", "MIG_MINORS", "PROC_DEVICES"]
