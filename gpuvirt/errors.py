"""gpuvirt's error tree.

Every failure that reaches an operator is a :class:`GpuvirtError`.  The host layer (``gpuvirt.host``)
translates ``OSError`` errno values and ``pynvml.NVMLError`` codes into these classes at the one I/O seam,
adding context (sysfs path, GPU, profile); the CLI turns them into a one-line message and an exit status.

Exit statuses are part of the CLI contract (documented in docs/operator-guide.md):

====  =========================================================
 1    generic failure (host, inventory, internal)
 2    usage / bad input (also what typer/click use for bad options)
 3    not found (unknown profile, selector matching nothing, ...)
 4    no capacity / does not fit
 5    conflict (instance allocated, locked database, concurrent change)
 6    reboot or GPU reset required before the change can finish
 7    partial import: ``profile import`` stored some entries and skipped others (not an error class:
      the command lists the skipped entries and exits 7 after storing the rest)
 8    the inventory's schema is newer than this gpuvirt (upgrade gpuvirt)
 9    ``cdi check``: gpuvirt's CDI specs are out of line with the inventory and the host
====  =========================================================
"""

from __future__ import annotations

import errno as _errno
from typing import Any


class GpuvirtError(Exception):
    """Base class; ``str(e)`` is the one-line operator message."""

    exit_code = 1

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"error": type(self).__name__, "message": self.message}
        for k, v in self.context.items():
            d[k] = v if isinstance(v, (str, int, float, bool, list, dict)) else str(v)
        return d


# --- input -------------------------------------------------------------------------------------------
class UsageError(GpuvirtError):
    """Bad input from the operator (option values, files, names)."""

    exit_code = 2


class ConfigError(UsageError):
    """Unreadable or invalid configuration file / environment."""


class ProfileError(UsageError):
    """A partition profile is malformed or cannot be realised on the target GPU model."""


class NotFoundError(GpuvirtError):
    exit_code = 3


class ConfigNotFoundError(ConfigError, NotFoundError):
    """A config file named explicitly (``--config``, ``GPUVIRT_CONFIG``) does not exist."""

    exit_code = 3


# --- capacity / conflicts ------------------------------------------------------------------------------
class CapacityError(GpuvirtError):
    """Not enough room: no free instance, no legal placement, quota exceeded."""

    exit_code = 4


class ConflictError(GpuvirtError):
    """The change collides with something that must not be touched (allocated instance, concurrent run)."""

    exit_code = 5


class ResetRequiredError(GpuvirtError):
    """The change needs a GPU reset or a reboot before it can take effect."""

    exit_code = 6


# --- host (sysfs / NVML) ----------------------------------------------------------------------------------
class HostError(GpuvirtError):
    """Something on the machine failed (sysfs, NVML, udev)."""


class UnknownStateError(HostError):
    """The host could not be asked (libvirt unreachable, a query that failed): whether a journaled change holds
    there is *unknown*, which is neither "done" nor "not done".  Recovery leaves the intent open on it rather
    than finishing or undoing a change on a guess (a move's undo would destroy the device the VM names)."""


class SysfsError(HostError):
    """A sysfs read or write failed; carries ``path`` and ``errno`` in its context."""

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None, **context: Any):
        super().__init__(message, path=path, errno=_errno.errorcode.get(errno, errno) if errno else None,
                         **context)
        self.path = path
        self.errno = errno


class DeviceExistsError(SysfsError, ConflictError):
    """EEXIST: the UUID is already in use on some parent."""

    exit_code = 5


class DeviceBusyError(SysfsError, ConflictError):
    """EBUSY / EAGAIN: the device is open or being changed."""

    exit_code = 5


class DeviceGoneError(SysfsError, NotFoundError):
    """ENODEV / ENOENT: the device or its parent has disappeared."""

    exit_code = 3


class NoCapacityError(SysfsError, CapacityError):
    """EUSERS / ENOSPC / ENOMEM / EDQUOT on create: the parent has no room for this type."""

    exit_code = 4


class HostPermissionError(SysfsError):
    """EPERM / EACCES: the kernel refused the operation in the device's current state, or we lack rights."""


class InvalidArgumentError(SysfsError):
    """EINVAL / ERANGE: the value written was not accepted."""


class NvmlError(HostError):
    """An NVML call failed; carries the NVML return code and name."""

    def __init__(self, message: str, *, code: int | None = None, code_name: str | None = None, **context: Any):
        super().__init__(message, nvml_code=code, nvml_error=code_name, **context)
        self.code = code
        self.code_name = code_name


class NvmlUnavailableError(NvmlError):
    """No NVIDIA driver / libnvidia-ml on this host (a normal condition for discovery)."""


class NvmlInsufficientResourcesError(NvmlError, CapacityError):
    exit_code = 4


class NvmlInUseError(NvmlError, ConflictError):
    exit_code = 5


class NvmlNotSupportedError(NvmlError):
    pass


class NvmlNotFoundError(NvmlError, NotFoundError):
    exit_code = 3


# --- inventory ------------------------------------------------------------------------------------------------
class InventoryError(GpuvirtError):
    """The inventory database is unusable (corrupt, unreachable, read-only, wrong schema)."""


class DatabaseLockedError(InventoryError, ConflictError):
    exit_code = 5


class InventoryNotFoundError(InventoryError, NotFoundError):
    """A SQLite inventory named with ``--db`` (or ``GPUVIRT_DB``, ``db_url``) that does not exist: never created
    silently, a typo would otherwise start an empty inventory in which every device looks foreign."""

    exit_code = 3


class InventoryTooNewError(InventoryError):
    """The inventory's schema revision is newer than this gpuvirt knows."""

    exit_code = 8


class UnsafePathError(GpuvirtError):
    """A directory or file gpuvirt keeps as root is not safe to use (foreign owner, writable by others, a
    symbolic link)."""


class SimulatorError(GpuvirtError):
    """The simulated host is missing or its state is corrupt."""


class SimulatorNotFoundError(SimulatorError, NotFoundError):
    """``--sim DIR`` names no simulated host (no directory, or no state in it); a corrupt state stays exit 1."""

    exit_code = 3


def errno_name(code: int | None) -> str:
    if code is None:
        return "?"
    return _errno.errorcode.get(code, str(code))
