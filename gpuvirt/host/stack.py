"""What a host runs, as far as moving VMs between hosts cares: the NVIDIA host driver, the hypervisor release,
the kernel, QEMU and libvirt (:class:`gpuvirt.model.preflight.HostStack`).

Every fact is read from a file under the injected root, so a simulated host answers through the same code
(its tree provides the files: :mod:`gpuvirt.sim.hoststack`), and nothing is executed:

* hypervisor release: ``etc/os-release`` (else ``usr/lib/os-release``, as os-release(5) says), as
  ``<ID>-<VERSION_ID>``, e.g. ``rhel-9.4``;
* kernel: ``proc/sys/kernel/osrelease`` (what ``uname -r`` prints);
* QEMU and libvirt: libvirt's QEMU capabilities cache, ``var/cache/libvirt/qemu/capabilities/*.xml``.
  libvirtd writes one file per emulator binary when it probes QEMU and rewrites it when the binary or libvirtd
  itself changes; ``<version>`` is QEMU's version and ``<selfvers>`` libvirt's, both as
  ``major * 10^6 + minor * 10^3 + micro``.  Running ``qemu-system-x86_64 --version`` / ``libvirtd
  --version`` instead would describe the machine gpuvirt runs on, not the injected root, and RHEL names its
  QEMU ``/usr/libexec/qemu-kvm``; the cache is what libvirt itself uses.  With several files the newest
  QEMU wins and libvirt is the largest ``selfvers`` (a file older than the running libvirtd is re-probed and
  rewritten on its next start).  A host where libvirtd has never run has no cache: QEMU and libvirt unknown;
* host driver: NVML's ``nvmlSystemGetDriverVersion`` when a session is given, else ``sys/module/nvidia/version``;
  the vGPU version range: ``nvmlGetVgpuVersion``'s current range (None without a vGPU host driver).

Unknown facts are None; a live move then gets refused by the preflight rules (they cannot vouch for it).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from gpuvirt.model.preflight import HostStack

CAPS_DIR = "var/cache/libvirt/qemu/capabilities"
MAX_FILE_BYTES = 4 << 20          # a capabilities file is ~200 KiB; never read more than this
MAX_CACHE_FILES = 64
_QEMU_VERSION = re.compile(r"^[ \t]*<version>([0-9]{1,10})</version>[ \t\r]*$", re.M)
_LIBVIRT_VERSION = re.compile(r"^[ \t]*<selfvers>([0-9]{1,10})</selfvers>[ \t\r]*$", re.M)
_FIELD = re.compile(r"[A-Za-z0-9._+~:-]{1,64}")


def _read(path: Path, limit: int = 64 << 10) -> str | None:
    # O_NONBLOCK and the regular-file check: a FIFO (or a device) planted at one of these names would block the
    # open or the read for ever, and every command that looks at the host records its stack
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            return fh.read(limit).decode(errors="replace")
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def os_release(root: str | os.PathLike[str]) -> str | None:
    """``<ID>-<VERSION_ID>`` from os-release under ``root`` (None when either is missing or odd)."""
    for rel in ("etc/os-release", "usr/lib/os-release"):
        text = _read(Path(root) / rel)
        if text is None:
            continue
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip().strip("'\"")
        os_id, version = values.get("ID", "").lower(), values.get("VERSION_ID", "")
        if os_id and version and _FIELD.fullmatch(os_id) and _FIELD.fullmatch(version):
            return f"{os_id}-{version}"
        return None
    return None


def kernel_release(root: str | os.PathLike[str]) -> str | None:
    text = _read(Path(root) / "proc/sys/kernel/osrelease", 256)
    value = (text or "").strip()
    return value if value and _FIELD.fullmatch(value) else None


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


def qemu_libvirt(root: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """(QEMU version, libvirt version) from libvirt's QEMU capabilities cache under ``root``."""
    base = Path(root) / CAPS_DIR
    try:
        names = sorted(n for n in os.listdir(base) if n.endswith(".xml"))[:MAX_CACHE_FILES]
    except OSError:
        return None, None
    qemu = libvirt = 0
    for name in names:
        text = _read(base / name, MAX_FILE_BYTES)
        if not text or "<qemuCaps>" not in text:
            continue
        # the top-level elements are flat lines; hostCPU/machine entries use other element names.  Blanks are
        # spaces and tabs only: '^\s*' also crosses newlines, so a file of 4 MiB of empty lines took hours
        q = _QEMU_VERSION.search(text)
        s = _LIBVIRT_VERSION.search(text)
        qemu = max(qemu, int(q.group(1)) if q else 0)
        libvirt = max(libvirt, int(s.group(1)) if s else 0)
    return (_version(qemu) if qemu else None), (_version(libvirt) if libvirt else None)


def host_stack(root: str | os.PathLike[str], session: Any = None) -> HostStack:
    """The host's stack: files under ``root``, the driver and vGPU range from the NVML ``session`` when it is
    available (else the driver from ``sys/module/nvidia/version``)."""
    driver = None
    vgpu_range = None
    if session is not None and getattr(session, "available", False):
        from gpuvirt.host.nvml_migration import vgpu_version

        driver = session.driver_version()
        versions = vgpu_version(session)
        vgpu_range = versions[1] if versions is not None else None
    if driver is None:
        text = (_read(Path(root) / "sys/module/nvidia/version", 256) or "").strip()
        driver = text if text and _FIELD.fullmatch(text) else None
    qemu, libvirt = qemu_libvirt(root)
    return HostStack(driver=driver, os=os_release(root), kernel=kernel_release(root), qemu=qemu, libvirt=libvirt,
                     vgpu_range=vgpu_range)


__all__ = ["host_stack", "os_release", "kernel_release", "qemu_libvirt", "CAPS_DIR"]
