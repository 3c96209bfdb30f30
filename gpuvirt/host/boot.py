"""Which boot of which machine: the kernel's boot id and a process's identity across pid reuse.

The intent journal records its owner as ``<boot id>:<pid>:<start time>`` and each host's boot id
(``hosts.boot_marker``), so that a process can tell a live owner from a dead one (``service.intent``).
Kept apart from the rest of ``host/`` so that the libvirt hook's fast path imports nothing more.
"""

from __future__ import annotations

import os
from typing import Any


def process_id(pid: int | None = None) -> str | None:
    """``<boot id>:<pid>:<start time>`` of a process of this machine (None where /proc cannot tell)."""
    pid = pid or os.getpid()
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        with open(f"/proc/{pid}/stat") as fh:
            # the command name (field 2) may contain spaces and parentheses: fields are counted after the last ')'
            start = fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{boot}:{pid}:{start}"


def root_boot_id(root: Any) -> str | None:
    """The boot id of the machine (or simulated host) under ``root``: what ``hosts.boot_marker`` records."""
    try:
        with open(os.path.join(str(root), "proc/sys/kernel/random/boot_id")) as fh:
            return fh.read().strip()[:64] or None
    except (OSError, UnicodeDecodeError):      # bytes that are no text (a damaged simulated host): unknown
        return None
