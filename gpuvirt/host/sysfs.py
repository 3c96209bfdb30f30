"""sysfs access under an injected root: the machine-facing half of the I/O seam.

Reads go straight to the files under ``root`` (on a simulated host those files are rendered by the
simulator, so the same code reads them).  Writes go through a :class:`KernelIO`: :class:`RealKernel`
writes the file like ``echo``; the simulator's ``SimKernel`` applies kernel semantics.  Either way a failed
write surfaces as ``OSError``, which :func:`translate_oserror` turns into gpuvirt's error tree with the
path, the errno name and what was being attempted.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Protocol

from gpuvirt.errors import (
    DeviceBusyError,
    DeviceExistsError,
    DeviceGoneError,
    HostPermissionError,
    InvalidArgumentError,
    NoCapacityError,
    SysfsError,
)


class KernelIO(Protocol):
    def write(self, path: str | os.PathLike[str], data: str) -> int: ...


class RealKernel:
    """Writes a sysfs attribute in one ``write(2)``, as ``echo VALUE > attr`` does."""

    def write(self, path: str | os.PathLike[str], data: str) -> int:
        fd = os.open(path, os.O_WRONLY)
        try:
            return os.write(fd, data.encode())
        finally:
            os.close(fd)


_ERRNO_CLASS = {
    errno.EEXIST: DeviceExistsError,
    errno.EBUSY: DeviceBusyError,
    errno.EAGAIN: DeviceBusyError,
    errno.ENODEV: DeviceGoneError,
    errno.ENOENT: DeviceGoneError,
    errno.EUSERS: NoCapacityError,
    errno.ENOSPC: NoCapacityError,
    errno.ENOMEM: NoCapacityError,
    errno.EDQUOT: NoCapacityError,
    errno.EPERM: HostPermissionError,
    errno.EACCES: HostPermissionError,
    errno.EROFS: HostPermissionError,
    errno.EINVAL: InvalidArgumentError,
    errno.ERANGE: InvalidArgumentError,
}


def translate_oserror(exc: OSError, action: str, path: str | os.PathLike[str], hint: str | None = None,
                      cls: type[SysfsError] | None = None, **context: object) -> SysfsError:
    """``OSError`` from a sysfs access -> gpuvirt error: "<action>: <strerror> (<ERRNO>, <path>)[; hint]"."""
    code = exc.errno or 0
    klass = cls or _ERRNO_CLASS.get(code, SysfsError)
    name = errno.errorcode.get(code, str(code))
    msg = f"{action}: {exc.strerror or 'error'} ({name}, {path})"
    if hint:
        msg += f"; {hint}"
    return klass(msg, path=str(path), errno=code, **context)


class Sysfs:
    """Paths and primitive reads/writes relative to the injected root."""

    def __init__(self, root: str | os.PathLike[str] = "/", kernel: KernelIO | None = None) -> None:
        self.root = Path(root)
        self.kernel: KernelIO = kernel or RealKernel()

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def read(self, path: Path) -> str:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def read_attr(self, path: Path) -> str:
        return self.read(path).strip()

    def write(self, path: Path, data: str, action: str, hint: str | None = None, **context: object) -> None:
        try:
            self.kernel.write(path, data)
        except OSError as exc:
            raise translate_oserror(exc, action, path, hint, **context) from exc
