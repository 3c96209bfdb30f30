"""``gpuvirt watch``: restore a parent's devices when it (re)appears, driven by udev events, and follow GPU
health through NVML events (XIDs; :mod:`gpuvirt.service.health`).

Relevant events: a parent registering with the mdev core (``change`` with ``MDEV_STATE=registered``, what
mdevctl's udev rule reacts to) and a PCI function being added (SR-IOV VFs after ``sriov_numvfs`` or a driver
reload).  One VF enable produces dozens of events within milliseconds, and mdevctl's rule is known to
fire retry storms (pain-points A3), so events are collected per parent and handled once the source has
been quiet for ``debounce`` seconds: one burst, one reconcile.  The event source is injectable (a file of
JSON lines, or any iterable) so tests and operators can replay events without udev.

NVML events are read between udev events (at most every ``NVML_POLL_SECONDS``) and whenever the udev source
has been quiet for ``debounce`` seconds, so an XID is recorded within about ``debounce`` seconds.
:func:`once` handles what is pending and returns (``gpuvirt watch --once``, for timers and tests); NVML only
delivers events that happen while a subscription exists, so ``--wait`` keeps it open for a while.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from gpuvirt.context import Context
from gpuvirt.errors import GpuvirtError, UsageError


@dataclass
class UEvent:
    action: str
    subsystem: str
    sys_name: str
    properties: dict[str, str] = field(default_factory=dict)


QUIET = None  # a source yields QUIET when nothing happened for `debounce` seconds
MAX_EVENT_LINE = 64 * 1024  # one udev event as JSON is a few hundred bytes; /dev/zero has no newline at all
NVML_POLL_SECONDS = 0.5
MAX_WAIT_SECONDS = 3600


def parent_of(ev: UEvent) -> str | None:
    if ev.properties.get("MDEV_STATE") == "registered":
        return ev.sys_name
    if ev.action == "add" and ev.subsystem == "pci":
        return ev.sys_name
    if ev.action == "bind" and ev.subsystem == "pci" and ev.properties.get("DRIVER") in ("nvidia", "amdgpu", "i915"):
        return ev.sys_name
    return None


def udev_source(debounce: float) -> Iterator[UEvent | None]:
    try:
        import pyudev
    except ImportError as exc:  # pragma: no cover - pyudev is a dependency
        raise UsageError("pyudev is not installed") from exc
    try:
        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context)
        monitor.start()
    except Exception as exc:  # noqa: BLE001 - no netlink in containers / no permission
        raise UsageError(f"cannot listen to udev events: {exc}") from exc
    while True:
        dev = monitor.poll(timeout=debounce)
        if dev is None:
            yield QUIET
            continue
        yield UEvent(action=dev.action or "", subsystem=dev.subsystem or "", sys_name=dev.sys_name or "",
                     properties={k: dev.properties.get(k) for k in ("MDEV_STATE", "DRIVER") if dev.properties.get(k)})


def file_source(path: str) -> Iterator[UEvent | None]:
    """JSON lines: {"action", "subsystem", "sys_name", "properties"} or {"quiet": true}; EOF is quiet."""
    try:
        fh = open(path, encoding="utf-8") if path != "-" else __import__("sys").stdin
    except OSError as exc:
        raise UsageError(f"cannot read events from {path}: {exc.strerror}") from exc
    with fh:
        n = 0
        while True:
            line = fh.readline(MAX_EVENT_LINE + 1)
            if not line:
                break
            n += 1
            if len(line) > MAX_EVENT_LINE:
                raise UsageError(f"{path}:{n}: event line longer than {MAX_EVENT_LINE} characters")
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{n}: not a JSON event ({exc.msg})") from exc
            # a valid JSON line of the wrong shape must give the same one-line error, not a traceback
            if not isinstance(d, dict):
                raise UsageError(f"{path}:{n}: an event must be a JSON object, not {type(d).__name__}")
            if d.get("quiet"):
                yield QUIET
                continue
            if not isinstance(d.get("sys_name"), str) or not d["sys_name"]:
                raise UsageError(f"{path}:{n}: event needs a sys_name")
            props = d.get("properties") or {}
            if not isinstance(props, dict):
                raise UsageError(f"{path}:{n}: event properties must be a JSON object")
            yield UEvent(str(d.get("action", "")), str(d.get("subsystem", "")), d["sys_name"],
                         {str(k): str(v) for k, v in props.items()})
    yield QUIET


def ticker_source(interval: float) -> Iterator[UEvent | None]:
    """No udev (``--no-udev``): a quiet tick every ``interval`` seconds, for the NVML health monitor."""
    while True:
        time.sleep(interval)
        yield QUIET


def watch(ctx: Context, source: Iterable[UEvent | None], *, max_runs: int | None = None,
          on_run: Callable[[dict[str, Any]], None] | None = None, monitor: Any = None) -> list[dict[str, Any]]:
    from gpuvirt.service import hostview
    from gpuvirt.service.reconcile import reconcile

    runs: list[dict[str, Any]] = []
    pending: dict[str, int] = {}
    last_poll = 0.0
    for ev in source:
        if monitor is not None and (ev is QUIET or time.monotonic() - last_poll >= NVML_POLL_SECONDS):
            monitor.poll()
            last_poll = time.monotonic()
        if ev is not QUIET:
            parent = parent_of(ev)
            if parent:
                pending[parent] = pending.get(parent, 0) + 1
            continue
        if not pending:
            continue
        # udev reports every PCI function that appears (NICs, NVMe, hot-plug bridges): act only on parents
        # that belong to a GPU this host partitions, so unrelated devices never cost a reconcile run
        try:
            view = hostview.snapshot(ctx)
            parents = {p for p in pending if view.gpu_of_parent(p) is not None}
        except GpuvirtError:
            parents = set(pending)  # cannot tell now: let the reconcile run report what is wrong
        if not parents:
            pending.clear()
            continue
        started = time.monotonic()
        try:
            rep = reconcile(ctx, only_parents=parents, actor="gpuvirt-watch")
            run = {"parents": sorted(parents), "events": sum(pending[p] for p in parents),
                   "changed": rep["changed"], "failed": len(rep["failed"]),
                   "seconds": round(time.monotonic() - started, 3)}
        except GpuvirtError as exc:
            run = {"parents": sorted(parents), "events": sum(pending[p] for p in parents), "error": str(exc)}
        pending.clear()
        runs.append(run)
        if on_run:
            on_run(run)
        if max_runs is not None and len(runs) >= max_runs:
            break
    return runs


def once(ctx: Context, *, wait: float = 0.0, source: Iterable[UEvent | None] | None = None,
         nvml: bool = True, report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``gpuvirt watch --once``: subscribe to NVML events, wait up to ``wait`` seconds for the first, handle
    every event queued by then, write down due health recoveries, replay ``source`` (udev events from a
    file) if given, and return {"nvml": subscription, "events": [...], "recovered": [...], "errors": [...],
    "runs": [...]}."""
    from gpuvirt.service.health import Monitor

    if not 0 <= wait <= MAX_WAIT_SECONDS:
        raise UsageError(f"--wait must be from 0 to {MAX_WAIT_SECONDS} seconds")
    doc: dict[str, Any] = {"nvml": None, "events": [], "recovered": [], "errors": [], "runs": []}

    def collect(item: dict[str, Any]) -> None:
        for key, into in (("event", "events"), ("recovered", "recovered"), ("error", "errors")):
            if key in item:
                doc[into].append(item[key])
        if report:
            report(item)

    if nvml:
        mon = Monitor(ctx, actor="gpuvirt-watch", report=collect)
        try:
            doc["nvml"] = mon.start()
            mon.poll(first_timeout_ms=int(wait * 1000))
        finally:
            mon.close()
    if source is not None:
        doc["runs"] = watch(ctx, source)
    return doc
