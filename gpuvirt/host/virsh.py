"""The one place gpuvirt runs ``virsh``: the libvirt calls of the rebalance executor (live and offline
migration, define, start, shutdown) and its read-only questions (dumpxml, domstate, list).

A runner is any callable ``runner(argv) -> stdout`` that raises a :class:`~gpuvirt.errors.HostError` with one
line when the command fails; the service layer composes the argument lists
(:mod:`gpuvirt.service.rebalance_steps`, :mod:`gpuvirt.service.rebalance`), so tests replace this runner by
one that records them.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Sequence

from gpuvirt.errors import HostError

# a live migration copies guest RAM and the vGPU framebuffer: minutes for a large guest, never hours
VIRSH_TIMEOUT_SECONDS = 3600


class VirshRunner:
    """Runs ``virsh ARGV...`` and returns its standard output."""

    def __init__(self, virsh: str | None = None, timeout: float = VIRSH_TIMEOUT_SECONDS) -> None:
        self.virsh = virsh
        self.timeout = timeout

    def __call__(self, argv: Sequence[str]) -> str:
        exe = self.virsh or shutil.which("virsh")
        if exe is None:
            raise HostError("virsh is not installed (libvirt-clients); gpuvirt needs it to move VMs")
        try:
            proc = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=self.timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise HostError(f"virsh {' '.join(argv[2:4])} did not finish within {self.timeout:g} s") from exc
        except OSError as exc:
            raise HostError(f"cannot run virsh: {exc.strerror}") from exc
        if proc.returncode != 0:
            why = " ".join((proc.stderr or proc.stdout or f"exit {proc.returncode}").split())[:300]
            raise HostError(f"virsh {' '.join(argv[2:4])}: {why}")
        return proc.stdout


__all__ = ["VirshRunner", "VIRSH_TIMEOUT_SECONDS"]
