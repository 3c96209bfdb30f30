"""Persistent state of a simulated host, shared safely between processes.

A simulated host lives in a directory DIR that doubles as the injected root: ``DIR/sys/...`` is a sysfs
tree on disk (readable by gpuvirt and by mdevctl), ``DIR/.gpuvirt-sim/state.json`` is the truth behind it
(devices, MIG mode and instances, VFs, mdevs, vGPU types, injected faults).  Every change - a sysfs write
through :class:`gpuvirt.sim.kernel.SimKernel` or an NVML call through :class:`gpuvirt.sim.nvml.FakeNvmlLib`
- runs inside :meth:`SimHost.transaction`: an exclusive ``flock`` on ``DIR/.gpuvirt-sim/lock``, load, mutate,
atomic save, then the sysfs tree is brought in line with the new state (only the files that changed are
rewritten, each by an atomic rename, so concurrent readers never see a half-written attribute).

State document (JSON, ``version`` 1)::

    {"format": "gpuvirt-sim", "version": 1, "seed": str, "boot": int,
     "vgpu_interface": null | "mdev" | "vendor-vfio",      # host-wide mode (null in old states: per board)
     "driver_loaded": bool,                               # false: no libnvidia-ml (NVML unavailable)
     "devices": [Device], "mdevs": [Mdev], "faults": [Fault], "next_iommu_group": int}

    Device = {"model": id, "address": "0000:41:00.0" | null, "name": str, "uuid": "GPU-..." | null,
              "nvml_index": int | null, "iommu_group": int, "interface": "mdev" | "vendor-vfio" | null,
              "mig": {"current": 0|1, "pending": 0|1, "gpu_instances": [GI]} | null,
              "sriov": {"numvfs": int} | null, "vfs": [VF], "clients": [str]}
    GI  = {"id": int, "profile_id": int, "start": int, "size": int, "compute_instances": [CI]}
    CI  = {"id": int, "profile_id": int, "start": int, "size": int, "uuid": "MIG-..."}
    VF  = {"address": str, "index": int, "iommu_group": int, "current_vgpu_type": int,
           "gpu_instance_id": int | null, "open": bool}
    Mdev = {"uuid": str, "parent": str, "type": "nvidia-468", "iommu_group": int,
            "gpu_instance_id": int | null, "open": bool}
    Fault = {"op": str, "skip": int, "times": int, "errno": str | null, "nvml": int | null,
             "match": str | null, "kill": null | "before" | "after"}
    Device.vgpu_scheduler (optional) = {"policy", "arr", "timeslice_ns", "boot", ...}; rules: "vgpu_scheduler_rules"

A fault with ``kill`` does not fail the operation: it kills the calling process with SIGKILL just before
(``before``) or just after (``after``) the operation takes effect - a crash at an exact step, for testing
that ``reconcile`` repairs whatever a dead gpuvirt left behind.

``open`` marks a device whose VFIO file is held by a (simulated) running VM; ``clients`` lists processes
holding a GPU (they block MIG mode activation, like nvidia-persistenced or dcgm on a real host).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

from gpuvirt.errors import SimulatorError, SimulatorNotFoundError

STATE_DIR = ".gpuvirt-sim"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
FORMAT = "gpuvirt-sim"
VERSION = 1


class SimHost:
    """Handle on one simulated host directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.state_dir = self.root / STATE_DIR
        self.state_path = self.state_dir / STATE_FILE
        self.lock_path = self.state_dir / LOCK_FILE
        self._cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        self._tlock = threading.RLock()
        self._depth = 0
        self._current: dict[str, Any] | None = None
        self._lock_fd: int | None = None
        self._kill_after = False
        # render hook: called as hook(self, before, after) after a transaction changed the state
        self.on_change = None

    # --- reading ---------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.state_path.is_file()

    def check(self) -> None:
        if not self.root.is_dir():
            raise SimulatorNotFoundError(f"simulated host {self.root} does not exist (create it with 'gpuvirt sim init')",
                                 path=str(self.root))
        if not self.state_path.is_file():
            raise SimulatorNotFoundError(f"{self.root} is not a simulated host: {self.state_path} is missing "
                                 "(create one with 'gpuvirt sim init')", path=str(self.state_path))

    def load(self) -> dict[str, Any]:
        """Current state (a private copy).  Inside a transaction: the transaction's working copy."""
        if self._current is not None:
            return self._current
        return copy.deepcopy(self._read())

    def peek(self) -> dict[str, Any]:
        """Current state without copying; callers must not mutate it."""
        if self._current is not None:
            return self._current
        return self._read()

    def _read(self) -> dict[str, Any]:
        self.check()
        try:
            st = os.stat(self.state_path)
        except OSError as exc:
            raise SimulatorError(f"cannot read simulator state {self.state_path}: {exc.strerror}",
                                 path=str(self.state_path)) from exc
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache and self._cache[0] == key:
            return self._cache[1]
        try:
            text = self.state_path.read_text(encoding="utf-8")
            doc = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SimulatorError(f"simulator state {self.state_path} is corrupt ({exc}); "
                                 "recreate the host with 'gpuvirt sim init --force'",
                                 path=str(self.state_path)) from exc
        validate_state(doc, str(self.state_path))
        self._cache = (key, doc)
        return doc

    # --- writing ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive inter-process lock (re-entrant within this object)."""
        with self._tlock:
            if self._depth == 0:
                self.check()
                try:
                    fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                except OSError as exc:
                    raise SimulatorError(f"cannot open simulator lock {self.lock_path}: {exc.strerror}",
                                         path=str(self.lock_path)) from exc
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                    os.close(self._lock_fd)
                    self._lock_fd = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """Lock, load, yield the mutable state; save and re-render sysfs on success.

        Nested transactions share the outer one's working copy.  If the body raises, nothing is saved.
        """
        with self.locked():
            if self._current is not None:
                yield self._current
                return
            before = copy.deepcopy(self._read())
            work = copy.deepcopy(before)
            self._current = work
            try:
                yield work
            finally:
                self._current = None
            if work != before:
                self.save(work)
                if self.on_change is not None:
                    self.on_change(self, before, work)
            if self._kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    def save(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, json.dumps(state, indent=1, sort_keys=True) + "\n")
        self._cache = None

    # --- fault injection ----------------------------------------------------------------------------------
    def take_fault(self, state: dict[str, Any], op: str, target: str | None = None) -> dict[str, Any] | None:
        """Consume a matching injected fault for ``op`` (and ``target``), if one is due.

        A fault ``{"op": op, "skip": k, "times": n}`` lets ``k`` matching operations pass, then fails the
        next ``n``.  Must be called inside a transaction (the counters are part of the state).
        """
        for f in state.get("faults", []):
            if f.get("op") != op:
                continue
            if f.get("match") and (target is None or f["match"] not in target):
                continue
            if f.get("skip", 0) > 0:
                f["skip"] -= 1
                continue
            if f.get("times", 1) <= 0:
                continue
            f["times"] = f.get("times", 1) - 1
            kill = f.get("kill")
            if kill == "before":
                # power loss / SIGKILL just before the operation: persist the consumed fault, then die
                self.save(state)
                os.kill(os.getpid(), signal.SIGKILL)
            if kill == "after":
                self._kill_after = True  # the operation completes and is saved, then the process dies
                return None
            return f
        return None


def atomic_write(path: Path, text: str, mode: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def validate_state(doc: Any, origin: str) -> None:
    def bad(why: str) -> SimulatorError:
        return SimulatorError(f"simulator state {origin} is corrupt ({why}); "
                              "recreate the host with 'gpuvirt sim init --force'", path=origin)

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad("not a gpuvirt simulator state")
    if doc.get("version") != VERSION:
        raise bad(f"unsupported version {doc.get('version')!r}")
    for key, typ in (("devices", list), ("mdevs", list), ("faults", list), ("seed", str), ("boot", int)):
        if not isinstance(doc.get(key), typ):
            raise bad(f"'{key}' missing or not a {typ.__name__}")
    for i, d in enumerate(doc["devices"]):
        if not isinstance(d, dict) or not isinstance(d.get("model"), str) or not isinstance(d.get("vfs", []), list):
            raise bad(f"device #{i} malformed")
    for i, m in enumerate(doc["mdevs"]):
        if not isinstance(m, dict) or not all(isinstance(m.get(k), str) for k in ("uuid", "parent", "type")):
            raise bad(f"mdev #{i} malformed")


def os_error(code: int, path: str | os.PathLike[str], detail: str | None = None) -> OSError:
    """An OSError exactly like a failed sysfs write (errno, strerror, filename)."""
    err = OSError(code, os.strerror(code), str(path))
    if detail:
        err.add_note(detail)
    return err


__all__ = ["SimHost", "atomic_write", "validate_state", "os_error", "STATE_DIR", "errno"]
