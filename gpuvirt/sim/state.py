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
     "devices": [Device], "mdevs": [Mdev], "faults": [Fault], "next_iommu_group": int,
     "behaviour": Behaviour,                              # optional; missing keys take DEFAULT_BEHAVIOUR
     "trace": {"on": bool, "ops": [[op, target], ...]},   # optional: fault points passed, in order
     "foreign_writes": [{"path", "data", "result"}]}      # optional: writes made by other programs, applied

    Device = {"model": id, "address": "0000:41:00.0" | null, "name": str, "uuid": "GPU-..." | null,
              "nvml_index": int | null, "iommu_group": int, "interface": "mdev" | "vendor-vfio" | null,
              "mig": {"current": 0|1, "pending": 0|1, "gpu_instances": [GI]} | null,
              "sriov": {"numvfs": int} | null, "vfs": [VF], "clients": [str]}
    GI  = {"id": int, "profile_id": int, "start": int, "size": int, "compute_instances": [CI]}
    CI  = {"id": int, "profile_id": int, "start": int, "size": int, "uuid": "MIG-..."}
    VF  = {"address": str, "index": int, "iommu_group": int, "current_vgpu_type": int,
           "gpu_instance_id": int | null, "open": bool,
           "appear_at": float,      # only while the VF is still being created (wall-clock deadline)
           "register_at": float,    # only while nvidia-vgpud has not registered its vGPU types yet
           "registered": false}     # only when registration failed (an injected vgpu.register fault)
    (a PF that is itself the mdev parent - pre-Ampere boards - carries ``register_at`` / ``registered`` too)
    Mdev = {"uuid": str, "parent": str, "type": "nvidia-468", "iommu_group": int,
            "gpu_instance_id": int | null, "open": bool}
    Fault = {"op": str, "skip": int, "times": int, "errno": str | null, "nvml": int | null,
             "match": str | null, "kill": null | "before" | "after"}
    Device.vgpu_scheduler (optional) = {"policy", "arr", "timeslice_ns", "boot", ...}; rules: "vgpu_scheduler_rules"

Optional keys (absent in states written by older versions; readers use defaults):

    "next_vgpu_id": int                                   # next NVML vGPU instance id (sim.nvml_vgpu_instances)
    Mdev / VF += {"vgpu_id": int, "guest": Guest}           # NVIDIA vGPUs only; Guest: nvml_vgpu_instances
    "event_sets": [EventSet], "next_event_set_id": int    # NVML event sets of live processes (sim.nvml_events)
    EventSet = {"id": int, "pid": int, "registered": {"<nvml index>": event type mask},
                "queue": [{"gpu": int, "type": int, "data": int, "gi": int, "ci": int}], "dropped": int}
    "nvml_events": {"mig_handles": "not-supported" | "parent", "privileged": bool, "queue_limit": int,
                    "supported": event type mask}       # choices where NVML's reference is silent

A fault with ``kill`` does not fail the operation: it kills the calling process with SIGKILL just before
(``before``) or just after (``after``) the operation takes effect - a crash at an exact step, for testing
that ``reconcile`` repairs whatever a dead gpuvirt left behind.

``open`` marks a device whose VFIO file is held by a (simulated) running VM; ``clients`` lists processes
holding a GPU (they block MIG mode activation, like nvidia-persistenced or dcgm on a real host).

The tree is redrawn after the state is saved.  A process killed in between would leave them out of step,
so a transaction first creates ``DIR/.gpuvirt-sim/redraw`` and removes it once the tree matches the saved
state; whoever finds the marker (the next transaction, or :func:`gpuvirt.sim.control.open_sim`, which every
gpuvirt command with ``--sim`` passes through before it reads the tree) redraws the tree from the state first.
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
REDRAW_MARKER = "redraw"
FORMAT = "gpuvirt-sim"
VERSION = 1
MAX_TRACE = 100_000

# Choices where the sources are silent or UNVERIFIED (docs/simulator-fidelity.md section 2), switchable per
# simulated host with ``gpuvirt sim set`` / ``sim init``.  Durations are wall-clock seconds, so every
# process driving the host sees the same timeline.
DEFAULT_ERRNOS: dict[str, str] = {
    "mdev_remove_open": "EBUSY",       # remove an mdev a VM holds open
    "vgpu_clear_open": "EBUSY",        # write 0 to current_vgpu_type while the VF's VFIO device is open
    "vgpu_unknown_type": "EINVAL",     # a type id the board (or a VF not registered yet) does not know
    "sriov_disable_open": "EBUSY",     # sriov_numvfs 0 while a VM holds one of the VFs
    "reset_busy": "EBUSY",             # GPU reset while processes or VMs hold the GPU
    "vf_reset_open": "EBUSY",          # VF reset while its VFIO device is open
}
DEFAULT_NVML_CODES: dict[str, int] = {
    "leave_mig_with_instances": 19,    # SetMigMode(0) while GPU instances exist: IN_USE
}
DEFAULT_BEHAVIOUR: dict[str, Any] = {
    "vf_delay_s": 0.0,                 # sriov_numvfs write -> VF functions appear
    "registration_delay_s": 0.0,       # VF appeared (or boot, for a PF parent) -> vGPU types registered
    "unregistered_vfio": "empty",      # vendor-VFIO VF before registration: "empty" list | "absent" nvidia/ dir
    "reset": "function",               # <PF>/reset: "function" (pending MIG mode stays pending) | "gpu-reset"
    "errnos": DEFAULT_ERRNOS,
    "nvml_codes": DEFAULT_NVML_CODES,
}


def behaviour(state: dict[str, Any]) -> dict[str, Any]:
    """The host's behaviour settings with defaults filled in (read-only view)."""
    b = state.get("behaviour") or {}
    out = {**DEFAULT_BEHAVIOUR, **{k: v for k, v in b.items() if k not in ("errnos", "nvml_codes")}}
    out["errnos"] = {**DEFAULT_ERRNOS, **(b.get("errnos") or {})}
    out["nvml_codes"] = {**DEFAULT_NVML_CODES, **(b.get("nvml_codes") or {})}
    return out


def errno_for(state: dict[str, Any], key: str) -> int:
    name = behaviour(state)["errnos"][key]
    return getattr(errno, name, errno.EIO)


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
        self.redraw_path = self.state_dir / REDRAW_MARKER
        # hooks installed by gpuvirt.sim.kernel.attach_renderer:
        #   on_change(self, before, after)  redraw the tree after a transaction changed the state
        #   on_begin(self, state) -> fn     world events due before a transaction (None: nothing to do);
        #                                   fn(work) applies them to a copy of the state
        #   on_repair(self, state)          redraw the whole tree from the state (after a crash)
        #   after_save(self, state)         e.g. start the timer process when deadlines are pending
        self.on_change = None
        self.on_begin = None
        self.on_repair = None
        self.after_save = None

    # --- reading ---------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.state_path.is_file()

    def check(self) -> None:
        try:
            is_dir, is_file = self.root.is_dir(), self.state_path.is_file()
        except OSError as exc:      # a name too long for the file system, a path through a non-directory...
            raise SimulatorNotFoundError(f"simulated host {str(self.root)[:200]!r} cannot be opened: {exc.strerror}",
                                         path=str(self.root)[:200]) from None
        if not is_dir:
            raise SimulatorNotFoundError(f"simulated host {self.root} does not exist (create it with 'gpuvirt sim init')",
                                 path=str(self.root))
        if not is_file:
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
        Before the body runs, a tree left stale by a killed process is redrawn and world events that are
        due (VFs appearing, vGPU types registering, writes other programs made to sysfs files) are applied
        and committed on their own, so the body sees the host as it is now.
        """
        with self.locked():
            if self._current is not None:
                yield self._current
                return
            before = self._read()
            if self.redraw_path.exists():
                self._repair(before)
            if self.on_begin is not None:
                apply_due = self.on_begin(self, before)
                if apply_due is not None:
                    due = copy.deepcopy(before)
                    apply_due(due)
                    if due != before:
                        self._commit(before, due)
                    before = due
            before = copy.deepcopy(before)
            work = copy.deepcopy(before)
            self._current = work
            try:
                yield work
            finally:
                self._current = None
            if work != before:
                self._commit(before, work)
            if self._kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    def _commit(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """Save ``after`` and redraw the tree from ``before``; the marker covers a kill anywhere in between."""
        self._mark_redraw()
        self.save(after)
        if self.on_change is not None:
            self.on_change(self, before, after)
        self._clear_redraw()
        if self.after_save is not None:
            self.after_save(self, after)

    def _mark_redraw(self) -> None:
        fd = os.open(self.redraw_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def _clear_redraw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.redraw_path)

    def _repair(self, state: dict[str, Any]) -> None:
        if self.on_repair is not None:
            self.on_repair(self, state)
            self._clear_redraw()

    def ensure_rendered(self) -> bool:
        """Redraw a tree left stale by a killed process before anyone reads it; True when it was stale."""
        if not self.redraw_path.exists():
            return False
        with self.locked():
            if self.redraw_path.exists():
                self._repair(self._read())
                return True
        return False

    def save(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, json.dumps(state, indent=1, sort_keys=True) + "\n")
        self._cache = None

    # --- fault injection ----------------------------------------------------------------------------------
    def take_fault(self, state: dict[str, Any], op: str, target: str | None = None) -> dict[str, Any] | None:
        """Consume a matching injected fault for ``op`` (and ``target``), if one is due.

        A fault ``{"op": op, "skip": k, "times": n}`` lets ``k`` matching operations pass, then fails the
        next ``n``.  Must be called inside a transaction (the counters are part of the state).

        Every call is a fault point: while tracing is on (``gpuvirt sim trace DIR on``) it is appended to the
        state's trace as ``[op, target]``, so a test can replay a command with a kill at each point in turn.
        """
        trace = state.get("trace")
        if trace and trace.get("on") and len(trace.setdefault("ops", [])) < MAX_TRACE:
            trace["ops"].append([op, target or ""])
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
                # power loss / SIGKILL just before the operation: persist the consumed fault, then die; the
                # marker makes the next access check the tree against what was saved
                self._mark_redraw()
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


__all__ = ["SimHost", "atomic_write", "validate_state", "os_error", "STATE_DIR", "errno", "behaviour", "errno_for",
           "DEFAULT_BEHAVIOUR", "DEFAULT_ERRNOS", "DEFAULT_NVML_CODES"]
