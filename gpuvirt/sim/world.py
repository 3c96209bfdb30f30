"""The world around a simulated host: what happens without gpuvirt asking for it.

* **Timed events.**  On a real host the VFs of ``sriov_numvfs`` (``sriov-manage -e``) take a moment, and their
  vGPU types appear only after nvidia-vgpud has registered them (nvidia-vgpu.md sections 2.2 and 5); a PF that is
  itself the mdev parent registers its types some time after boot.  The state records wall-clock deadlines
  (``appear_at``, ``register_at``); :func:`settle` applies the due ones.  Registering a parent is a fault
  point (``vgpu.register``): a fault leaves its types unregistered until the VFs are re-created or the host
  reboots.
* **Writes of other programs.**  mdevctl's ``start``, udev's autostart or an operator's ``echo`` write straight
  into ``<parent>/mdev_supported_types/T/create`` (or ``remove``, ``current_vgpu_type``, ``sriov_numvfs``,
  ``reset``) of the tree on disk, bypassing :class:`gpuvirt.sim.kernel.SimKernel`.  Such a write is found by
  comparing each writable attribute with what the simulator last drew (write-only files are drawn empty), and
  applied with kernel semantics at the start of the next transaction; the writer itself has already been
  told it succeeded, so the outcome (``ok`` or the errno) is logged in the state's ``foreign_writes``.  A
  real host runs such a write the moment it happens; here it runs before the next change anyone makes, which
  keeps the races that matter (reconcile creating a UUID mdevctl just started: ``EEXIST``).
* **A timer process.**  Readers of the tree (gpuvirt's scanner, mdevctl) never call into the simulator, so
  while deadlines are pending one detached process (``python -m gpuvirt.sim.world DIR``) sleeps until each is
  due and applies it, as nvidia-vgpud would; it exits when nothing is pending.  Any transaction applies due
  events too, so a killed timer loses nothing.
* **Repair.**  :func:`repair` redraws the whole tree from the state after a process died mid-redraw.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from gpuvirt.sim import tree
from gpuvirt.sim.state import SimHost

TIMER_LOCK = "timer.lock"
MAX_FOREIGN_LOG = 50
MAX_WRITE_BYTES = 4096
TIMER_LIFETIME_S = 3600.0


# --- timed events -------------------------------------------------------------------------------------------------
def deadlines(state: dict[str, Any]) -> list[float]:
    out: list[float] = []
    for dev in state["devices"]:
        if "register_at" in dev:
            out.append(float(dev["register_at"]))
        for vf in dev.get("vfs", []):
            for key in ("appear_at", "register_at"):
                if key in vf:
                    out.append(float(vf[key]))
    return out


def next_deadline(state: dict[str, Any]) -> float | None:
    d = deadlines(state)
    return min(d) if d else None


def settle(sim: SimHost, state: dict[str, Any], now: float) -> None:
    """Apply every timed event due at ``now`` to ``state`` (inside a transaction)."""
    for dev in state["devices"]:
        if "register_at" in dev and dev["register_at"] <= now:
            _register(sim, state, dev, dev.get("address") or dev.get("name") or "")
        for vf in dev.get("vfs", []):
            if "appear_at" in vf and vf["appear_at"] <= now:
                del vf["appear_at"]
            if "appear_at" not in vf and "register_at" in vf and vf["register_at"] <= now:
                _register(sim, state, vf, vf["address"])


def _register(sim: SimHost, state: dict[str, Any], obj: dict[str, Any], target: str) -> None:
    # the fault point comes first: a kill "before" leaves the deadline in place for the next access
    fault = sim.take_fault(state, "vgpu.register", target)
    del obj["register_at"]
    if fault is not None:
        obj["registered"] = False


# --- writes of other programs ----------------------------------------------------------------------------------------
def foreign_writes(root: Path, state: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """(path, data written, text the simulator drew, mode) of each writable attribute that holds something
    other than what the simulator drew."""
    found = []
    base = str(root) + "/"
    lstat = os.lstat
    for rel, text, mode in tree.writable_attrs(state):
        full = base + rel
        try:
            size = lstat(full).st_size
        except OSError:
            continue
        if not mode & 0o444:                         # write-only: drawn empty, so any byte is a write
            if size == 0:
                continue
        elif size == len(text) and _read(full) == text:
            continue
        data = _read(full)
        if data is not None and data != text:
            found.append((rel, data, text, mode))
    return sorted(found)


def _read(full: str | Path) -> str | None:
    try:
        with open(full, "rb") as fh:
            return fh.read(MAX_WRITE_BYTES).decode("utf-8", "replace")
    except OSError:
        return None


def apply_foreign_writes(sim: SimHost, state: dict[str, Any], writes: list[tuple[str, str, str, int]]) -> None:
    from gpuvirt.sim.kernel import SimKernel

    kernel = SimKernel(sim)
    log = state.setdefault("foreign_writes", [])
    for rel, data, drawn, _mode in writes:
        full = sim.root / rel
        # the attribute reads as the simulator drew it again (the redraw after this transaction starts from
        # there), then the write takes effect like one through the kernel
        with contextlib.suppress(OSError):
            with open(full, "r+b") as fh:
                fh.truncate(0)
                fh.write(drawn.encode())
        try:
            kernel._dispatch(state, full, os.path.realpath(full), rel, data)  # noqa: SLF001 - same semantics
            result = "ok"
        except OSError as exc:
            import errno as errno_mod

            result = errno_mod.errorcode.get(exc.errno or 0, str(exc.errno))
        log.append({"path": rel, "data": data[:80], "result": result, "at": round(time.time(), 3)})
    del log[:-MAX_FOREIGN_LOG]


# --- the hooks SimHost calls ----------------------------------------------------------------------------------------
def due(sim: SimHost, state: dict[str, Any]) -> Callable[[dict[str, Any]], None] | None:
    """What the world has done since the last transaction, as a function applying it (None: nothing)."""
    now = time.time()
    nd = next_deadline(state)
    timed = nd is not None and nd <= now
    writes = foreign_writes(sim.root, state)
    if not timed and not writes:
        return None

    def apply(work: dict[str, Any]) -> None:
        if timed:
            settle(sim, work, now)
        if writes:
            apply_foreign_writes(sim, work, writes)

    return apply


def repair(sim: SimHost, state: dict[str, Any]) -> None:
    tree.repair(sim.root, state)


def ensure_timer(sim: SimHost, state: dict[str, Any]) -> None:
    """Start the timer process when deadlines are pending and none runs."""
    if next_deadline(state) is None:
        return
    lock = sim.state_dir / TIMER_LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return                                   # a timer runs and will see the new deadline
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    subprocess.Popen([sys.executable, "-m", "gpuvirt.sim.world", str(sim.root)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def run_timer(root: str) -> int:
    """The timer process: apply deadlines as they fall due, exit when none is left (or the host is gone)."""
    from gpuvirt.errors import GpuvirtError
    from gpuvirt.sim.control import open_sim

    try:
        sim = open_sim(root)
    except GpuvirtError:
        return 0
    lock = sim.state_dir / TIMER_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < TIMER_LIFETIME_S:
            try:
                nd = next_deadline(sim.peek())
            except GpuvirtError:
                return 0
            if nd is None:
                # hand over before looking once more: a deadline saved while we held the lock found the timer
                # running and started none
                fcntl.flock(fd, fcntl.LOCK_UN)
                try:
                    nd = next_deadline(sim.peek())
                except GpuvirtError:
                    return 0
                if nd is None:
                    return 0
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return 0
                continue
            # short naps: a host directory removed meanwhile (a test's temporary host) ends the timer at once
            time.sleep(min(max(0.0, nd - time.time()) + 0.002, 1.0))
            if not sim.state_path.exists():
                return 0
            if time.time() < nd:
                continue
            try:
                with sim.transaction():
                    pass                              # the transaction applies what is due
            except GpuvirtError:
                return 0
        return 0
    finally:
        os.close(fd)


if __name__ == "__main__":  # pragma: no cover - started by ensure_timer
    sys.exit(run_timer(sys.argv[1]))
