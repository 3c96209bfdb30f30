"""GPU health: XID events classified, attributed to the device and consumer they hit, recorded, and kept out of
"placeable now" until the device recovers.

Where events come from: :class:`Monitor` (used by ``gpuvirt watch``) holds an NVML event subscription over
every GPU of the host (``host.nvml_events``) and hands what it drains to :func:`handle`.

Classification (policies, docs/operator-guide.md "Health"):

* ``non-fatal`` - ``policies.health_nonfatal_xids``, default 13, 31, 43, 45, 68, 109: application-level
  errors that NVIDIA's device plugin also leaves the GPU healthy for (k8s-device-plugin #1340,
  ``internal/rm/health.go``).  Recorded in the history; nothing changes.
* ``reset`` - ``policies.health_reset_xids``, default 48, 74, 79, 95, 119, 120 (double-bit ECC, NVLink,
  fallen off the bus, uncontained ECC, GSP errors): the whole GPU is unhealthy, even when the event names a
  MIG instance, and only a successful GPU reset (or an operator's ``gpuvirt health clear``) ends it.
* ``fatal`` - every other XID: the MIG instance the event names (its GPU-instance id), or the GPU when it
  names none, is unhealthy until a reset, or until ``policies.health_quiet_seconds`` (default 3600; 0:
  never) pass without another fatal XID on it.

Attribution: NVML reports an XID on the physical GPU with the GPU-instance / compute-instance ids of the MIG
instance it concerns (0xFFFFFFFF: none).  The GPU-instance id selects the inventory's MIG row on that GPU;
the consumers are whoever holds an allocation on that row (a VM, or any other kind of consumer an allocation
records) and on the vGPUs it backs (a MIG-backed vGPU's ``backing_instance_id``).  A GPU-instance id that no
row of ours carries is recorded as ``foreign`` and changes no state (gpuvirt does not own that instance).

State lives on the inventory rows (``health`` columns of gpus / instances, revision 0004) and the history
in ``health_events``, pruned by age and count.  A quiet-period recovery is in force as soon as the period
has passed - readers (reports, attach, the planner) test :func:`in_force` - and is written down (with a
``recovered`` event) the next time the monitor, ``gpuvirt health`` or an attach looks.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from gpuvirt.context import Context
from gpuvirt.errors import (
    CapacityError,
    ConflictError,
    GpuvirtError,
    NotFoundError,
    NvmlUnavailableError,
    UsageError,
)

NONFATAL, FATAL, RESET = "non-fatal", "fatal", "reset"
HEALTHY, UNHEALTHY = "healthy", "unhealthy"
ID_ANY = 0xFFFFFFFF
MAX_CONSUMERS = 64              # listed per event; a GPU-wide event on a busy GPU names the first ones
MAX_LIST = 1000                 # `gpuvirt health --limit`


@dataclass(frozen=True)
class Policy:
    nonfatal: frozenset[int]
    reset: frozenset[int]
    quiet_seconds: float
    history_days: float
    history_max: int

    def classify(self, xid: int) -> str:
        if xid in self.reset:
            return RESET
        if xid in self.nonfatal:
            return NONFATAL
        return FATAL


def policy(ctx: Context) -> Policy:
    p = ctx.settings.policies
    return Policy(nonfatal=frozenset(p["health_nonfatal_xids"]), reset=frozenset(p["health_reset_xids"]),
                  quiet_seconds=float(p["health_quiet_seconds"]), history_days=float(p["health_history_days"]),
                  history_max=int(p["health_history_max"]))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def in_force(needs_reset: bool, last_at: dt.datetime | None, now: dt.datetime, quiet_seconds: float) -> bool:
    """Whether a stored 'unhealthy' still holds: always until a reset when one is needed, else until the
    quiet period has passed since the last fatal event (never, with a period of 0)."""
    if needs_reset or quiet_seconds <= 0 or last_at is None:
        return True
    return (now - last_at).total_seconds() < quiet_seconds


def recovers_at(needs_reset: bool, last_at: dt.datetime | None, quiet_seconds: float) -> dt.datetime | None:
    if needs_reset or quiet_seconds <= 0 or last_at is None:
        return None
    try:
        return last_at + dt.timedelta(seconds=quiet_seconds)
    except OverflowError:
        # a last event stamped near year 9999 (a clock set wrong, a value written by hand) reads back, but its
        # recovery lies past what a datetime holds: it never comes, as in_force agrees
        return None


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds") + "Z"


# --- handling events --------------------------------------------------------------------------------------------
def _consumer(alloc: Any, inst: Any, via: str) -> dict[str, Any]:
    return {"vm": alloc.vm_name, "vm_uuid": alloc.vm_uuid, "tenant": alloc.tenant, "instance": inst.id,
            "device": inst.label, "via": via}


def _mark(row: Any, severity: str, reason: str, now: dt.datetime, quiet: float) -> bool:
    """Set a GPU / instance row unhealthy; True when it was healthy (or its last spell had run out)."""
    was = row.health == UNHEALTHY and in_force(bool(row.health_needs_reset), row.health_last_at, now, quiet)
    if not was:
        row.health_since = now
        row.health_needs_reset = False
    row.health = UNHEALTHY
    row.health_last_at = now
    row.health_reason = reason
    if severity == RESET:
        row.health_needs_reset = True
    return not was


def _heal(row: Any) -> None:
    row.health = HEALTHY
    row.health_since = row.health_last_at = row.health_reason = None
    row.health_needs_reset = False


def _known_addresses(ctx: Context, events: Iterable[Any]) -> None:
    """Record this host's GPUs when an event names one the inventory has not seen yet."""
    from gpuvirt.service import hostview

    wanted = {e.pci_address for e in events if e.pci_address}
    if not wanted:
        return
    with ctx.inventory.unit() as uow:
        missing = [a for a in wanted if uow.gpu_by_address(ctx.settings.host_id, a) is None]
    if missing:
        view = hostview.snapshot(ctx)
        with ctx.inventory.unit(write=True, action="record this host's GPUs") as uow:
            hostview.record(ctx, view, uow)


def handle(ctx: Context, events: list[Any], *, actor: str | None = None,
           now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Classify, attribute and record NVML events (``host.nvml_events.NvmlEvent``); returns one outcome per
    event: {"gpu", "xid", "gi", "ci", "severity", "scope", "instance", "consumers", "changed"}."""
    from gpuvirt.host.nvml_events import DOUBLE_BIT_ECC, XID

    if not events:
        return []
    pol = policy(ctx)
    now = now or utcnow()
    host = ctx.settings.host_id
    _known_addresses(ctx, events)
    out = []
    with ctx.inventory.unit(write=True, action="record GPU health events") as uow:
        for ev in events:
            if ev.event_type == XID:
                xid: int | None = int(ev.data)
                severity = pol.classify(int(ev.data))
                reason = f"XID {ev.data} ({severity})"
            elif ev.event_type == DOUBLE_BIT_ECC:
                xid, severity, reason = None, RESET, "double-bit ECC error"
            else:
                continue                        # only XIDs and ECC events are subscribed to
            g = uow.gpu_by_address(host, ev.pci_address) if ev.pci_address else None
            scope, inst, consumers, changed = "gpu", None, [], False
            if g is None:
                scope = "unknown"
            elif ev.gi is not None:
                rows = uow.mig_instances_by_gi(g.id, ev.gi)
                inst = next((r for r in rows if r.state == "active"), rows[0] if rows else None)
                scope = "instance" if inst is not None else "foreign"
            if inst is not None:
                backed = uow.vgpus_backed_by(inst.id)
                for v in backed:
                    if v.allocation is not None:
                        consumers.append(_consumer(v.allocation, v, "vgpu"))
                if inst.allocation is not None and not any(c["vm"] == inst.allocation.vm_name for c in consumers):
                    consumers.append(_consumer(inst.allocation, inst, "direct"))
                if severity != NONFATAL:
                    for row in [inst, *backed]:
                        changed |= _mark(row, severity, reason, now, pol.quiet_seconds)
            elif g is not None and scope == "gpu":
                for a in uow.allocations(host_id=host):
                    if a.instance.gpu_id == g.id and len(consumers) < MAX_CONSUMERS:
                        consumers.append(_consumer(a, a.instance, "gpu"))
            if g is not None and (severity == RESET or (severity == FATAL and scope == "gpu")):
                changed |= _mark(g, severity, reason, now, pol.quiet_seconds)
            first = consumers[0] if consumers else {}
            outcome = {"gpu": ev.pci_address, "index": ev.gpu_index, "uuid": ev.gpu_uuid, "xid": xid, "gi": ev.gi,
                       "ci": ev.ci, "severity": severity, "scope": scope,
                       "instance": inst.id if inst is not None else None,
                       "device": inst.label if inst is not None else None, "consumers": consumers[:MAX_CONSUMERS],
                       "changed": changed}
            uow.add_health_event(host_id=host, at=now, kind="xid" if xid is not None else "ecc",
                                 gpu_id=g.id if g is not None else None, gpu_address=ev.pci_address,
                                 instance_id=inst.id if inst is not None else None, xid=xid, gi_id=ev.gi,
                                 ci_id=ev.ci, severity=severity, scope=scope, vm_name=first.get("vm"),
                                 vm_uuid=first.get("vm_uuid"), tenant=first.get("tenant"),
                                 detail={"consumers": outcome["consumers"], "device": outcome["device"],
                                         "gpu_uuid": ev.gpu_uuid, "event_type": ev.event_type})
            if changed:
                uow.event("health", target=ev.pci_address, result=UNHEALTHY, actor=actor,
                          detail={"reason": reason, "scope": scope, "instance": outcome["instance"],
                                  "vms": sorted({c["vm"] for c in consumers})})
            out.append(outcome)
        _prune(uow, host, pol, now)
    return out


def _prune(uow: Any, host: str, pol: Policy, now: dt.datetime) -> int:
    return uow.prune_health_events(host, before=now - dt.timedelta(days=pol.history_days), keep=pol.history_max)


# --- current state ---------------------------------------------------------------------------------------------
@dataclass
class HealthState:
    gpus: dict[str, dict[str, Any]] = field(default_factory=dict)        # address -> facts, in force only
    instances: dict[int, dict[str, Any]] = field(default_factory=dict)   # instance id -> facts, in force only
    recovered: list[dict[str, Any]] = field(default_factory=list)        # written down by this call

    def gpu_ok(self, address: str) -> bool:
        return address not in self.gpus

    def instance_ok(self, instance_id: int) -> bool:
        return instance_id not in self.instances


def _facts(row: Any, pol: Policy) -> dict[str, Any]:
    return {"since": _iso(row.health_since), "last_event": _iso(row.health_last_at), "reason": row.health_reason,
            "needs_reset": bool(row.health_needs_reset),
            "recovers_at": _iso(recovers_at(bool(row.health_needs_reset), row.health_last_at, pol.quiet_seconds))}


def current(ctx: Context, *, now: dt.datetime | None = None, persist: bool = True,
            actor: str | None = None) -> HealthState:
    """This host's devices that are unhealthy now; quiet periods that have run out are written down as
    recoveries (``persist``) so that the stored state, the history and the audit log agree."""
    pol = policy(ctx)
    now = now or utcnow()
    host = ctx.settings.host_id
    st = HealthState()

    def force(r: Any) -> bool:
        return in_force(bool(r.health_needs_reset), r.health_last_at, now, pol.quiet_seconds)

    def facts(uow: Any, gpus: list[Any], insts: list[Any]) -> None:
        for r in gpus:
            if force(r):
                st.gpus[r.address] = {"gpu_id": r.id, **_facts(r, pol)}
        for r in insts:
            if force(r):
                # a free unhealthy GPU instance: the driver, not gpuvirt, picks the GPU instance a new
                # MIG-backed vGPU lands on (sim.rules.free_gpu_instance_for: the lowest free one), so while it
                # is free no new vGPU on that GPU can be kept off it
                free_gi = r.kind == "mig" and r.allocation is None and not uow.vgpus_backed_by(r.id)
                st.instances[r.id] = {"gpu_id": r.gpu_id, "gpu": r.gpu.address, "free_gpu_instance": free_gi,
                                      **_facts(r, pol)}

    with ctx.inventory.unit() as uow:
        if not uow.report_health([host]):
            return st                       # the usual case: two plain column reads, no ORM rows
        gpus, insts = uow.unhealthy(host)
        due = [r for r in [*gpus, *insts] if not force(r)]
        if not due or not persist:
            facts(uow, gpus, insts)         # the usual case (nothing unhealthy): one read, one transaction
            return st
    with ctx.inventory.unit(write=True, action="record GPU health recoveries") as uow:
        gpus, insts = uow.unhealthy(host)       # again, under the write lock
        for kind, rows in (("gpu", gpus), ("instance", insts)):
            for r in rows:
                if force(r):
                    continue
                address = r.address if kind == "gpu" else r.gpu.address
                rec = {"kind": kind, "gpu": address, "instance": None if kind == "gpu" else r.id,
                       "reason": r.health_reason, "quiet_seconds": pol.quiet_seconds}
                uow.add_health_event(host_id=host, at=now, kind="recovered",
                                     gpu_id=r.id if kind == "gpu" else r.gpu_id, gpu_address=address,
                                     instance_id=None if kind == "gpu" else r.id, scope=kind,
                                     detail={"after": "quiet period", **rec})
                uow.event("health", target=address, result=HEALTHY, actor=actor,
                          detail={"after": "quiet period", "instance": rec["instance"]})
                _heal(r)
                st.recovered.append(rec)
        _prune(uow, host, pol, now)
        uow.session.flush()
        facts(uow, *uow.unhealthy(host))
    return st


def usable(ctx: Context, addresses: set[str]) -> set[str]:
    """The GPUs among ``addresses`` that may take new work (attach's candidates): unhealthy GPUs are left
    out, and GPUs where an unhealthy MIG GPU instance is free (a new vGPU could land on it).  Unhealthy
    instances themselves are left out by the inventory's free-instance query; this call first writes down
    recoveries that are due, so that query sees the health in force."""
    st = current(ctx)
    blocked = set(st.gpus) | {f["gpu"] for f in st.instances.values() if f["free_gpu_instance"]}
    left = {a for a in addresses if a not in blocked}
    if addresses and not left:
        names = sorted(addresses & blocked)
        raise CapacityError(f"no capacity: {', '.join(names)} {'is' if len(names) == 1 else 'are'} unhealthy or "
                            "holds an unhealthy free GPU instance (see 'gpuvirt health'); nothing new is placed "
                            "there until it recovers, is reset or cleared")
    return left


# --- recovery --------------------------------------------------------------------------------------------------
def after_reset(ctx: Context, address: str, *, actor: str | None = None, how: str = "GPU reset") -> dict[str, Any]:
    """A GPU was reset successfully: it and every instance on it are healthy again."""
    host = ctx.settings.host_id
    now = utcnow()
    with ctx.inventory.unit(write=True, action=f"record the reset of {address}") as uow:
        g = uow.gpu_by_address(host, address)
        if g is None:
            return {"gpu": address, "recovered": []}
        healed = []
        if g.health == UNHEALTHY:
            healed.append({"kind": "gpu", "gpu": address, "instance": None, "reason": g.health_reason})
            _heal(g)
        for r in uow.instances(host, gpu_id=g.id):
            if r.health == UNHEALTHY:
                healed.append({"kind": "instance", "gpu": address, "instance": r.id, "reason": r.health_reason})
                _heal(r)
        uow.add_health_event(host_id=host, at=now, kind="reset", gpu_id=g.id, gpu_address=address, scope="gpu",
                             detail={"how": how, "recovered": healed[:MAX_CONSUMERS]})
        if healed:
            uow.event("health", target=address, result=HEALTHY, actor=actor, detail={"after": how,
                                                                                    "recovered": len(healed)})
    return {"gpu": address, "recovered": healed}


def reset(ctx: Context, gpu: str, *, restore: bool = True, actor: str | None = None) -> dict[str, Any]:
    """``gpuvirt health reset GPU``: reset the GPU(s) (PCI function reset), which ends an unhealthy spell,
    then bring back the instances the reset took (``reconcile`` of those GPUs) unless ``restore`` is off.

    Refused while a VM recorded as running holds anything on the GPU: the kernel would refuse too (the VFIO
    device is open), and naming the VMs says what to stop first."""
    from gpuvirt.service import hostview
    from gpuvirt.service.instances import gpu_lock

    view = hostview.snapshot(ctx)
    targets = view.select(gpu)
    for g in targets:
        if g.nvml_index is None:
            raise UsageError(f"{g.label} is not an NVIDIA GPU under NVML: gpuvirt resets only those")
    host = ctx.settings.host_id
    with ctx.inventory.unit() as uow:
        ids = {g.address: r.id for g in targets if (r := uow.gpu_by_address(host, g.address)) is not None}
        running = sorted({(a.instance.gpu.address, a.vm_name) for a in uow.allocations(host_id=host)
                          if a.instance.gpu_id in ids.values() and a.vm_state == "running"})
    if running:
        raise ConflictError("cannot reset while VMs run on the GPU: " + ", ".join(
            f"{vm} ({addr})" for addr, vm in running) + "; stop them first")
    done = []
    for g in targets:
        with gpu_lock(ctx, g.address):
            ctx.host.reset_gpu(g.address)
            done.append(after_reset(ctx, g.address, actor=actor))
    restored = None
    if restore:
        from gpuvirt.service.reconcile import reconcile

        rep = reconcile(ctx, only_parents={g.address for g in targets}, actor=actor or "gpuvirt-health")
        restored = {"changed": rep["changed"], "failed": rep["failed"]}
    return {"reset": done, "restored": restored}


def clear(ctx: Context, *, gpu: str | None = None, instance: int | None = None,
          actor: str | None = None) -> dict[str, Any]:
    """An operator's word that a device is healthy (after a repair, or a reset done outside gpuvirt)."""
    if (gpu is None) == (instance is None):
        raise UsageError("give a GPU or --instance N (one of them)")
    host = ctx.settings.host_id
    now = utcnow()
    healed: list[dict[str, Any]] = []
    with ctx.inventory.unit(write=True, action="clear GPU health") as uow:
        if instance is not None:
            inst = uow.instance(instance, host)
            targets = [(inst, inst.gpu.address, inst.gpu_id, inst.id)]
        else:
            from gpuvirt.service import hostview

            wanted = {v.address for v in hostview.select_gpus(_known_gpus(uow, host), gpu)}
            targets = [(r, r.address, r.id, None) for r in uow.gpus(host) if r.address in wanted]
        for row, address, gpu_id, inst_id in targets:
            if row.health != UNHEALTHY:
                continue
            healed.append({"gpu": address, "instance": inst_id, "reason": row.health_reason})
            _heal(row)
            uow.add_health_event(host_id=host, at=now, kind="cleared", gpu_id=gpu_id, gpu_address=address,
                                 instance_id=inst_id, scope="gpu" if inst_id is None else "instance",
                                 detail={"by": actor or "operator", "reason": healed[-1]["reason"]})
            uow.event("health", target=address, result=HEALTHY, actor=actor,
                      detail={"after": "cleared by operator", "instance": inst_id})
    return {"cleared": healed}


def _known_gpus(uow: Any, host: str) -> list[Any]:
    """GPU rows dressed as the selector expects (address, nvml_index, uuid, model)."""
    from gpuvirt.model.catalog import load_catalog
    from gpuvirt.service.hostview import GpuView

    cat = load_catalog()
    out = []
    for r in uow.gpus(host):
        model = cat.models.get(r.model) if r.model else None
        out.append(GpuView(address=r.address, model=model, name=r.name, vendor=r.vendor, uuid=r.uuid,
                           nvml_index=r.nvml_index))
    if not out:
        raise NotFoundError("no GPU of this host is in the inventory yet (run 'gpuvirt status' first)")
    return out


# --- listing ----------------------------------------------------------------------------------------------------
def listing(ctx: Context, *, limit: int = 50, gpu: str | None = None) -> dict[str, Any]:
    """``gpuvirt health``: every GPU of this host with its health, unhealthy instances with their consumers,
    and the newest health events."""
    if not 1 <= limit <= MAX_LIST:
        raise UsageError(f"--limit must be from 1 to {MAX_LIST}")
    pol = policy(ctx)
    st = current(ctx)
    host = ctx.settings.host_id
    with ctx.inventory.unit() as uow:
        rows = [r for r in uow.gpus(host) if r.present]
        if gpu is not None:
            from gpuvirt.service import hostview

            wanted = {v.address for v in hostview.select_gpus(_known_gpus(uow, host), gpu)}
            rows = [r for r in rows if r.address in wanted]
        addresses = {r.address for r in rows}
        gpus = [{"gpu": r.address, "index": r.nvml_index, "model": r.model,
                 "health": UNHEALTHY if r.address in st.gpus else HEALTHY, **(st.gpus.get(r.address) or {})}
                for r in rows]
        for gdoc in gpus:
            gdoc.pop("gpu_id", None)
        insts = []
        for iid, facts in sorted(st.instances.items()):
            inst = uow.instance(iid)
            if inst.gpu.address not in addresses:
                continue
            holders = [v for v in uow.vgpus_backed_by(iid) if v.allocation is not None]
            consumer = (holders[0].allocation if holders else inst.allocation)
            insts.append({"instance": iid, "gpu": inst.gpu.address, "kind": inst.kind, "device": inst.label,
                          "gi": inst.gi_id, "vm": consumer.vm_name if consumer else None,
                          "vm_uuid": consumer.vm_uuid if consumer else None,
                          "tenant": consumer.tenant if consumer else None,
                          **{k: v for k, v in facts.items() if k != "gpu_id"}})
        events = [_event_doc(e) for e in uow.health_events(host_id=host, limit=limit)
                  if gpu is None or e.gpu_address in addresses]
    return {"host": host, "generated_at": _iso(utcnow()),
            "policy": {"nonfatal_xids": sorted(pol.nonfatal), "reset_xids": sorted(pol.reset),
                       "quiet_seconds": pol.quiet_seconds, "history_days": pol.history_days,
                       "history_max": pol.history_max},
            "healthy": not any(g["health"] == UNHEALTHY for g in gpus) and not insts,
            "gpus": gpus, "instances": insts, "recovered_now": st.recovered, "events": events}


def _event_doc(e: Any) -> dict[str, Any]:
    d = e.detail or {}
    return {"id": e.id, "at": _iso(e.at), "kind": e.kind, "gpu": e.gpu_address, "xid": e.xid, "gi": e.gi_id,
            "ci": e.ci_id, "severity": e.severity, "scope": e.scope, "instance": e.instance_id,
            "device": d.get("device"), "vm": e.vm_name, "vm_uuid": e.vm_uuid, "tenant": e.tenant,
            "consumers": d.get("consumers", []), "detail": {k: v for k, v in d.items()
                                                            if k not in ("consumers", "device")}}


# --- the monitor ------------------------------------------------------------------------------------------------
class Monitor:
    """NVML event subscription plus :func:`handle`, for ``gpuvirt watch``.

    ``poll()`` drains what NVML has queued, records it, and every ``recovery_interval`` seconds writes down
    quiet-period recoveries.  Events that could not be recorded (inventory unreachable) are kept, up to
    ``MAX_BACKLOG``, and recorded on a later poll.  A failed wait (NVML error, GPU lost) closes the
    subscription; a poll at least ``RESUBSCRIBE_SECONDS`` later opens a new one.
    """

    MAX_BACKLOG = 10_000
    RESUBSCRIBE_SECONDS = 30.0

    def __init__(self, ctx: Context, *, actor: str = "gpuvirt-watch",
                 report: Callable[[dict[str, Any]], None] | None = None, recovery_interval: float = 30.0) -> None:
        self.ctx = ctx
        self.actor = actor
        self.report = report or (lambda _doc: None)
        self.recovery_interval = recovery_interval
        self.sub: Any = None
        self.unavailable: str | None = None
        self.backlog: list[Any] = []
        self._next_recovery = 0.0
        self._next_subscribe = time.monotonic() + self.RESUBSCRIBE_SECONDS   # start() subscribes first

    def start(self) -> dict[str, Any]:
        """Open the subscription; {"gpus": [registered addresses], "skipped": [...], "unavailable": reason}."""
        nvml = self.ctx.host.nvml()
        if not nvml.available:
            self.unavailable = nvml.unavailable_reason or "NVML not available"
            return {"gpus": [], "skipped": [], "unavailable": self.unavailable}
        try:
            self.sub = nvml.events().open()
        except NvmlUnavailableError as exc:
            self.unavailable = str(exc)
            return {"gpus": [], "skipped": [], "unavailable": self.unavailable}
        self.unavailable = None
        return {"gpus": [r.pci_address for r in self.sub.registered],
                "skipped": [{"gpu": r.pci_address, "why": r.note} for r in self.sub.registrations if not r.mask],
                "unavailable": None}

    def poll(self, first_timeout_ms: int = 0) -> list[dict[str, Any]]:
        if self.sub is None and time.monotonic() >= self._next_subscribe:
            self._next_subscribe = time.monotonic() + self.RESUBSCRIBE_SECONDS
            if self.unavailable is not None:
                # the driver may have come up since (a watcher starts early at boot): a new NVML session
                self.ctx.host.close()
            try:
                self.start()
            except GpuvirtError as exc:
                self.report({"error": f"cannot subscribe to NVML events: {exc}"})
        if self.sub is not None:
            try:
                self.backlog.extend(self.sub.drain(first_timeout_ms=first_timeout_ms))
            except GpuvirtError as exc:
                self.report({"error": f"NVML event wait failed: {exc}; subscribing again"})
                self.sub.close()
                self.sub = None
        if len(self.backlog) > self.MAX_BACKLOG:
            dropped = len(self.backlog) - self.MAX_BACKLOG
            del self.backlog[:dropped]
            self.report({"error": f"{dropped} NVML event(s) dropped: the inventory could not take them"})
        outcomes: list[dict[str, Any]] = []
        if self.backlog:
            try:
                outcomes = handle(self.ctx, self.backlog, actor=self.actor)
                self.backlog = []
            except GpuvirtError as exc:
                self.report({"error": f"cannot record {len(self.backlog)} health event(s): {exc}"})
        for o in outcomes:
            self.report({"event": o})
        if time.monotonic() >= self._next_recovery:
            self._next_recovery = time.monotonic() + self.recovery_interval
            try:
                for rec in current(self.ctx, actor=self.actor).recovered:
                    self.report({"recovered": rec})
            except GpuvirtError as exc:
                self.report({"error": f"cannot check health recoveries: {exc}"})
        return outcomes

    def close(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None


__all__ = ["Policy", "policy", "handle", "current", "usable", "after_reset", "reset", "clear",
           "listing", "in_force", "Monitor", "HealthState", "NONFATAL", "FATAL", "RESET"]
