"""The intent journal: every multi-step change to a host is written down before it starts.

A change (an apply, an attach, a detach, a hook's release, reconcile's repairs) is a list of *steps*.  Each
step brings one object on the host to a wanted state - a MIG GPU instance with its compute instance at a
placement, an mdev with a UUID, a vGPU type on a VF, the SR-IOV VF count, the MIG mode - or changes one
allocation in the inventory.  The journal row (``inventory.models.Intent``) is committed before the first
host operation; each step is marked done in the same transaction that records its effect in the inventory;
the row is deleted in the transaction that completes or rolls back the change.

Every step is an *ensure* in both directions: ``forward`` makes its object reach the wanted state from any
partial state (a GPU instance left without its compute instance gets one), ``backward`` brings it back to
the state before (and withdraws a pending MIG mode change).  Both check the host first and do nothing when it
is there already, so a crash between a host operation and its record is settled by running the step again:

    begin:     intent row (kind, GPUs, steps, state before)          -- committed
    each step: [resolve deferred choices -- committed] host operation; step done + inventory rows -- committed
    end:       intent row deleted (+ the change's own closing records, e.g. the GPUs' profile) -- committed

A row that exists while nobody holds the GPUs' locks is a change a crash left unfinished.  :func:`recover`
(run by reconcile, the boot unit, and every command after it takes the GPU locks) settles it: forward first
for changes an operator asked for and nobody waits on (apply, detach, release, reconcile), backward first for
an attach (its caller never received the device); if that direction fails, the other one; if both fail, the
row stays, ``status`` shows ``unfinished-<kind>`` and the next reconcile tries again.  A partial layout is
never adopted and never reported in sync.  Two limits on switching direction: a direction whose verify could
not tell (a step's check raised: the host, e.g. libvirt, could not be asked) leaves the row for a later settle
instead (:class:`StateUnknown`), and a rollback never goes past a barrier step (a VM handover) it cannot undo,
since the steps before it made the device the VM may be using.  Intent rows name this host's GPUs by address
and other hosts' (a move between hosts) as ``host/address``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from gpuvirt.context import Context
from gpuvirt.errors import ConflictError, GpuvirtError
from gpuvirt.host.boot import process_id, root_boot_id  # noqa: F401 - part of this module's API
from gpuvirt.inventory.kinds import utcnow
from gpuvirt.service.intent_steps import (  # noqa: F401 - the step builders are used as intent.<name>_step
    DONE, INVENTORY_ONLY, OPS, PENDING, SKIPPED, UNDONE, allocate_step, cdi_step, describe, domain_xml_step,
    mdev_step, mig_mode_step, mig_step, op_of, record_vfs_step, release_step, row_id, vfs_step,
    vgpu_scheduler_step, vgpu_step, whole_gpu_step)

RUNNING, ROLLING_BACK, INCOMPLETE = "running", "rolling-back", "rollback-incomplete"
# left open on purpose, to be finished forward later (a move whose source cleanup failed after the handover)
UNFINISHED = "unfinished"

# steps a rollback does not go past when it cannot undo them (or cannot tell whether they hold): the steps
# before a VM handover made the device the VM may still name, so undoing them would take it from the guest
BARRIERS = ("vm-handover",)

# an owner renews its intent's lease this often while a host operation runs (Run.heartbeat); the lease itself,
# policies.intent_lease_seconds, must stay several beats long (context.py checks at least 4)
HEARTBEAT_SECONDS = 30.0
DEFAULT_LEASE_SECONDS = 300

# intents this process is running right now (recover() must not settle its own callers' work)
_ACTIVE: set[int] = set()
_ACTIVE_GUARD = threading.Lock()


# === running an intent ================================================================================================
class IntentFailed(GpuvirtError):
    """A step failed and the change was rolled back (``clean``) or could not be (``failures``)."""


class StateUnknown(ConflictError):
    """A step's check could not tell whether it holds (libvirt not reachable, ...): neither direction can be
    judged now, so the intent is left open rather than settled on a guess."""


def gpu_keys(host_id: str, steps: Iterable[dict[str, Any]]) -> set[str]:
    """The intent row's ``gpus`` for ``steps``: bare addresses for this host's GPUs (what every local command
    locks and settles by), ``host/address`` for a step on another host of a shared inventory."""
    return {s["gpu"] if s.get("host") in (None, host_id) else f"{s['host']}/{s['gpu']}" for s in steps}


@dataclass
class Run:
    """An intent this process is carrying out."""

    ctx: Context
    id: int
    kind: str
    steps: list[dict[str, Any]]
    actor: str | None = None
    progress: Callable[[dict[str, Any], int, int], None] | None = None
    unknown: list[str] = field(default_factory=list)     # the last verify's "cannot tell" answers

    # --- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def begin(cls, ctx: Context, kind: str, *, gpus: Iterable[str], steps: list[dict[str, Any]] | None = None,
              target: dict[str, Any] | None = None, before: dict[str, Any] | None = None,
              recovery: str = "forward", actor: str | None = None, uow: Any = None) -> "Run":
        fields = dict(host_id=ctx.settings.host_id, kind=kind, state=RUNNING, recovery=recovery,
                      gpus=sorted(set(gpus) | gpu_keys(ctx.settings.host_id, steps or [])), target=target or {},
                      before=before or {}, steps=list(steps or []), pid=os.getpid(), owner=process_id(),
                      actor=actor)
        boot = root_boot_id(ctx.settings.root)

        def add(u: Any) -> Any:
            if u.host(ctx.settings.host_id) is None:      # a first command on a new inventory
                u.touch_host(ctx.settings.host_id, root=str(ctx.settings.root),
                             simulated=ctx.settings.sim_dir is not None)
            # the host's recorded boot id is what other machines judge this intent's owner by (owner_state): it
            # must be this boot's before the row exists, also when nothing recorded the host since it booted
            u.note_boot(ctx.settings.host_id, boot)
            return u.add_intent(**fields)

        if uow is not None:
            row = add(uow)
        else:
            with ctx.inventory.unit(write=True, action=f"record the {kind} plan") as u:
                row = add(u)
        run = cls(ctx, row.id, kind, list(fields["steps"]), actor)
        with _ACTIVE_GUARD:
            _ACTIVE.add(run.id)
        return run

    @classmethod
    def adopt(cls, ctx: Context, row: Any, actor: str | None = None) -> "Run":
        run = cls(ctx, row.id, row.kind, [dict(s) for s in row.steps], actor)
        with _ACTIVE_GUARD:
            _ACTIVE.add(run.id)
        return run

    def _release(self) -> None:
        with _ACTIVE_GUARD:
            _ACTIVE.discard(self.id)

    def _save(self, uow: Any, **fields: Any) -> None:
        row = uow.intent(self.id)
        if row is None:
            raise ConflictError(f"intent {self.id} vanished from the inventory")
        row.steps = [dict(s, params=dict(s["params"])) for s in self.steps]
        gpus = sorted(set(row.gpus or []) | gpu_keys(self.ctx.settings.host_id, self.steps))
        if gpus != list(row.gpus or []):
            row.gpus = gpus
        for k, v in fields.items():
            setattr(row, k, v)

    @contextlib.contextmanager
    def heartbeat(self) -> Any:
        """Keep the intent's lease (its ``updated_at``) fresh while one host operation runs: a live move
        (``virsh migrate``), a GPU reset or a wait for vGPU types can outlast the lease, and a process on another
        machine takes an intent whose lease ran out for abandoned (:func:`owner_state`).  Every recorded step
        renews it too; a beat that fails (database busy) is only skipped, the next one tries again."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                with contextlib.suppress(GpuvirtError):
                    with self.ctx.inventory.unit(write=True, action="renew the intent's lease") as uow:
                        uow.touch_intent(self.id)

        t = threading.Thread(target=beat, name=f"gpuvirt-intent-{self.id}-heartbeat", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    # --- steps -----------------------------------------------------------------------------------------------
    def add(self, step: dict[str, Any], *, uow: Any = None) -> int:
        """Append a step (persisted before it runs); returns its index."""
        self.steps.append(step)
        if uow is not None:
            self._save(uow)
        else:
            with self.ctx.inventory.unit(write=True, action=f"record the {self.kind} plan") as u:
                self._save(u)
        return len(self.steps) - 1

    def add_done(self, uow: Any, step: dict[str, Any]) -> None:
        """Append a step the caller carries out inside ``uow`` (inventory-only), marked done there."""
        step["state"] = DONE
        self.steps.append(step)
        self._save(uow)

    def run(self, i: int) -> dict[str, Any]:
        """Carry out step ``i`` forward and record it; returns the host facts (e.g. ``pending``)."""
        step = self.steps[i]
        op = op_of(self.ctx, step)
        if op.resolve():
            with self.ctx.inventory.unit(write=True, action=f"record the {self.kind} plan") as uow:
                self._save(uow)
        try:
            with self.heartbeat():
                facts = op.forward()
        except GpuvirtError as exc:
            with contextlib.suppress(GpuvirtError):
                with self.ctx.inventory.unit(write=True) as uow:
                    uow.event(_event_name(step), target=op.describe(), result="failed", actor=self.actor,
                              detail={"error": str(exc), "intent": self.id})
            raise
        with self.ctx.inventory.unit(write=True, action=f"record: {op.describe()}") as uow:
            op.record(uow, step["present"], facts)
            step["state"] = DONE
            if facts.get("pending"):
                step["pending"] = True
            self._save(uow)
            if step["op"] not in ("mig-mode",):
                uow.event(_event_name(step), target=op.describe(), actor=self.actor, detail={"intent": self.id})
        return facts

    def run_all(self, *, resume: bool = False) -> set[str]:
        """Carry out every pending step in order; returns the GPUs left waiting for a reset (MIG mode).

        With ``resume`` (a crashed change being finished) steps marked undone are done again too."""
        pending_gpus: set[str] = set()
        todo = (PENDING, UNDONE) if resume else (PENDING,)
        total = len(self.steps)
        for i, step in enumerate(self.steps):
            if step["state"] == DONE and step.get("pending") and step["op"] == "mig-mode":
                pending_gpus.add(step["gpu"])
            if step["state"] not in todo:
                continue
            if step["gpu"] in pending_gpus and step["params"].get("needs_mig"):
                step["state"] = SKIPPED         # instances wait for the GPU reset that activates MIG mode
                continue
            if self.progress:
                self.progress(step, i, total)
            facts = self.run(i)
            if facts.get("pending"):
                pending_gpus.add(step["gpu"])
        return pending_gpus

    def rollback(self) -> list[str]:
        """Bring every step back, newest first (also the one that failed half-way); returns the failures.

        A failure is noted and the steps before it are still undone, except at a barrier step (a VM
        handover): there the rollback stops, since the steps before it made what the VM may still use."""
        failures: list[str] = []
        if not self.steps:
            return failures
        with contextlib.suppress(GpuvirtError):
            with self.ctx.inventory.unit(write=True) as uow:
                self._save(uow, state=ROLLING_BACK)
        last = max((i for i, s in enumerate(self.steps) if s["state"] in (DONE, UNDONE)), default=-1)
        # the step after the last one done may have been started (a failure or a crash half-way through it)
        upto = min(last + 1, len(self.steps) - 1)
        for i in range(upto, -1, -1):
            step = self.steps[i]
            if step["state"] == SKIPPED:
                continue
            op = None
            try:
                op = op_of(self.ctx, step)
                with self.heartbeat():
                    facts = op.backward()
                with self.ctx.inventory.unit(write=True, action=f"record: {op.describe(False)}") as uow:
                    op.record(uow, not step["present"], facts)
                    step["state"] = UNDONE if step["state"] in (DONE, UNDONE) else PENDING
                    self._save(uow)
            except GpuvirtError as exc:
                failures.append(f"{op.describe(False) if op is not None else 'undoing ' + describe(step)}: {exc}")
                if step["op"] in BARRIERS:
                    failures[-1] += " (the steps before it are left as they are: the VM may still use what they made)"
                    break
        return failures

    def verify(self, forward: bool) -> list[str]:
        """Re-read the host: does every step that ran hold in the direction just taken?  A check that raises
        (the host could not be asked) is reported too and noted in ``self.unknown``: "cannot tell"."""
        from gpuvirt.service import hostview

        self.unknown = []
        if not any(s["op"] not in INVENTORY_ONLY and s["state"] != SKIPPED for s in self.steps):
            return []               # nothing on the host to look at
        views: dict[str, Any] = {}
        bad = []
        for step in self.steps:
            if step["state"] == SKIPPED or (forward and step["state"] != DONE):
                continue
            want = step["present"] if forward else not step["present"]
            if step["op"] == "mig-mode" and forward and step.get("pending"):
                continue
            op = None
            try:
                op = op_of(self.ctx, step)
                # a step on another host of a shared inventory is checked against that host's view
                host = op.ctx.settings.host_id
                if host not in views:
                    views[host] = hostview.snapshot(op.ctx)
                if not op.holds(views[host], want):
                    bad.append(f"{op.describe(forward)} does not show on the host")
            except GpuvirtError as exc:
                bad.append(f"{op.describe(forward) if op is not None else describe(step)}: cannot tell: {exc}")
                self.unknown.append(bad[-1])
        return bad

    # --- closing ----------------------------------------------------------------------------------------------
    def finish(self, on_close: Callable[[Any], None] | None = None) -> None:
        """The change is complete: delete the intent (with the caller's closing records, one transaction)."""
        with self.ctx.inventory.unit(write=True, action=f"complete the {self.kind}") as uow:
            if on_close is not None:
                on_close(uow)
            uow.delete_intent(self.id)
        self._release()

    def abort(self, error: BaseException | str, on_clean: Callable[[Any], None] | None = None,
              on_incomplete: Callable[[Any], None] | None = None) -> list[str]:
        """Roll back, verify, and close the intent (clean) or leave it for reconcile; returns the failures."""
        failures = self.rollback()
        if not failures:
            failures = self.verify(forward=False)
        with self.ctx.inventory.unit(write=True, action=f"roll back the {self.kind}") as uow:
            if failures:
                self._save(uow, state=INCOMPLETE, error=f"{error}; rollback: " + "; ".join(failures))
                if on_incomplete is not None:
                    on_incomplete(uow)
            else:
                if on_clean is not None:
                    on_clean(uow)
                uow.delete_intent(self.id)
        self._release()
        return failures

    def leave(self, error: str, state: str = INCOMPLETE) -> None:
        """Keep the intent for reconcile (neither direction could finish, or ``state`` says why it waits)."""
        with contextlib.suppress(GpuvirtError):
            with self.ctx.inventory.unit(write=True) as uow:
                self._save(uow, state=state, error=error)
        self._release()


def _event_name(step: dict[str, Any]) -> str:
    if step["op"] in ("allocate", "release", "domain-xml", "record-vfs", "mig-mode", "vgpu-scheduler", "whole-gpu",
                      "vm-handover"):
        return step["op"]
    if step["op"] == "cdi":
        return "cdi-publish" if step["present"] else "cdi-remove"
    return "create" if step["present"] else "destroy"


# === crash recovery ================================================================================================
# what closes an intent of a kind, per direction: fn(uow, intent_row, pending_gpus)
Closer = Callable[[Any, Any, set[str]], None]
CLOSERS: dict[str, tuple[Closer | None, Closer | None]] = {}


def register_kind(kind: str, *, forward: Closer | None = None, back: Closer | None = None) -> None:
    CLOSERS[kind] = (forward, back)


def open_intents(ctx: Context) -> list[Any]:
    with ctx.inventory.unit() as uow:
        return uow.intents(ctx.settings.host_id)


def _open_with_holders(ctx: Context) -> list[tuple[Any, str | None]]:
    """The host's open intents, each with who still carries it out (:func:`owner_state`; None: nobody)."""
    from gpuvirt.service import intent_steps

    host_id = ctx.settings.host_id
    own = intent_steps.is_home(host_id)
    with ctx.inventory.unit() as uow:
        rows = uow.intents(host_id)
        h = uow.host(host_id)
        marker = h.boot_marker if h is not None else None
    boot = root_boot_id(ctx.settings.root) if own and h is not None else None
    if boot is not None and boot != marker:
        # this process runs as the host, so the boot id under its root is the host's now: recorded here, as
        # a record or an intent would, so that other machines see this host booted since a dead owner's intent
        with ctx.inventory.unit(write=True, action="record the host's boot") as uow:
            uow.note_boot(host_id, boot)
    lease = lease_seconds(ctx)
    return [(row, owner_state(row, marker, lease, own_host=own)) for row in rows]


def require_settled(ctx: Context, locked: set[str] | None, *, actor: str | None = None) -> None:
    """Settle what a crash left on these GPUs, and refuse to go on where that did not work: a new change is
    never planned over a half-made one, nor beside one another process (of any machine) still carries out."""
    bad = [r for r in recover(ctx, locked, actor=actor) if r["result"] == "failed"]
    for row, who in _open_with_holders(ctx):
        mine = set(row.gpus or []) if locked is None else set(row.gpus or []) & locked
        if who is not None and mine and not is_active(row.id) and not _of_this_boot(row.owner):
            # an owner on another machine runs where this process's GPU locks do not reach: changing the GPUs
            # beside it would build on a half-made change.  A live owner of this machine is left to the locks
            # as before: some intents (an attach taking a free instance) are written without the GPU's lock,
            # in one database transaction, and refusing beside them made racing attaches fail (exit 5)
            raise ConflictError(f"{', '.join(sorted(mine))}: {_a(row.kind)} (intent {row.id}) is in progress, run by "
                                f"{who}; wait for it to end ('After a crash' in docs/operator-guide.md: an owner "
                                "whose machine is gone for good)")
    if locked is not None:
        # a move (kind rebalance) that touches a locked GPU and others this command does not hold cannot be
        # settled here (its other GPUs may be another command's), and planning over it would build on a
        # half-made change
        for row in open_intents(ctx):
            if row.kind == "rebalance" and not is_active(row.id) and set(row.gpus or []) & locked \
                    and not set(row.gpus or []) <= locked:
                raise ConflictError(f"{', '.join(sorted(set(row.gpus) & locked))}: an unfinished move of VM "
                                    f"{row.target.get('vm')} (intent {row.id}) also touches "
                                    f"{', '.join(sorted(set(row.gpus) - locked))}; run 'gpuvirt reconcile'")
    if bad:
        r = bad[0]
        raise ConflictError(f"{', '.join(r['gpus'])}: an unfinished {r['kind']} (intent {r['intent']}) could not be "
                            f"finished or rolled back ({r.get('error')}); fix the cause and run 'gpuvirt reconcile'")


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def is_active(intent_id: int) -> bool:
    """Is this intent being carried out by this very process (a caller further up the stack)?"""
    with _ACTIVE_GUARD:
        return intent_id in _ACTIVE


def recover(ctx: Context, locked: set[str] | None, *, actor: str | None = None,
            kinds: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Settle intents a dead process left behind on GPUs whose locks this process holds (keys as in the
    row's ``gpus``: bare addresses of this host, ``host/address`` of others).  An intent whose owner may still
    run - on this machine, or on another one without evidence that it is gone (:func:`owner_state`) - is
    left alone.

    ``locked`` None: every GPU of the host is locked.  Intents of a kind in ``exclude`` are left alone.
    Returns one record per intent settled or left."""
    out = []
    wanted = set(kinds) if kinds is not None else None
    for row, who in _open_with_holders(ctx):
        if is_active(row.id) or (wanted is not None and row.kind not in wanted) or row.kind in exclude \
                or who is not None:
            continue
        if locked is not None and not set(row.gpus or []) <= locked:
            continue
        out.append(settle(ctx, row, actor=actor))
    return out


def settle(ctx: Context, row: Any, *, actor: str | None = None) -> dict[str, Any]:
    """Finish or roll back one unfinished intent (see the module docstring for the order)."""
    _ensure_kinds_registered()
    order = ["forward", "back"] if row.recovery != "back" else ["back", "forward"]
    if row.state in (ROLLING_BACK,) and row.recovery != "forward-only":
        order = ["back", "forward"]
    if row.recovery == "forward-only":
        order = ["forward"]
    run = Run.adopt(ctx, row, actor)
    fwd_close, back_close = CLOSERS.get(row.kind, (None, None))
    errors = []
    for direction in order:
        try:
            if direction == "forward":
                pending = run.run_all(resume=True)
                bad = run.verify(forward=True)
                if run.unknown:
                    raise StateUnknown("; ".join(bad))
                if bad:
                    raise ConflictError("; ".join(bad))
                run.finish(on_close=(lambda uow: fwd_close(uow, row, pending)) if fwd_close else None)
            else:
                failures = run.rollback() or run.verify(forward=False)
                if run.unknown:
                    raise StateUnknown("; ".join(failures))
                if failures:
                    raise ConflictError("; ".join(failures))
                run.finish(on_close=(lambda uow: back_close(uow, row, set())) if back_close else None)
            with ctx.inventory.unit(write=True) as uow:
                uow.event(f"recover-{row.kind}", target=", ".join(row.gpus or []), actor=actor,
                          detail={"intent": row.id, "direction": direction})
            return {"intent": row.id, "kind": row.kind, "gpus": list(row.gpus or []), "result": direction,
                    "target": row.target}
        except StateUnknown as exc:
            # whether the change holds cannot be told now (libvirt down, ...): going the other way on a guess
            # could take a device from a guest that uses it, so the intent stays for a later settle
            errors.append(f"{'finishing' if direction == 'forward' else 'rolling back'} cannot be checked now: {exc}")
            break
        except GpuvirtError as exc:
            errors.append(f"{'finishing' if direction == 'forward' else 'rolling back'} failed: {exc}")
    run.leave("; ".join(errors))
    with contextlib.suppress(GpuvirtError):
        with ctx.inventory.unit(write=True) as uow:
            uow.event(f"recover-{row.kind}", target=", ".join(row.gpus or []), result="failed", actor=actor,
                      detail={"intent": row.id, "errors": errors})
    return {"intent": row.id, "kind": row.kind, "gpus": list(row.gpus or []), "result": "failed",
            "error": "; ".join(errors), "target": row.target}


_KINDS_LOADED = False


def _ensure_kinds_registered() -> None:
    """The services that define kinds with closing records register them on import."""
    global _KINDS_LOADED
    if not _KINDS_LOADED:
        import gpuvirt.service.apply  # noqa: F401

        _KINDS_LOADED = True


def describe_open(row: Any) -> str:
    done = sum(1 for s in row.steps if s.get("state") == DONE)
    what = row.target.get("profile") or row.target.get("vm") or row.kind
    return f"{row.kind} {what}: {done} of {len(row.steps)} steps done" + \
        (f" (not settled: {row.error})" if row.state == INCOMPLETE and row.error else "") + \
        (f" (to be finished: {row.error})" if row.state == UNFINISHED and row.error else "")


def lease_seconds(ctx: Context) -> float:
    return float(ctx.settings.policies.get("intent_lease_seconds", DEFAULT_LEASE_SECONDS))


def owner_state(row: Any, host_boot: str | None, lease: float, *, own_host: bool = True,
                now: dt.datetime | None = None) -> str | None:
    """Who still carries this intent out, as a few words for messages; None when nobody does.

    Only a ``running`` or ``rolling-back`` intent has a live owner (one left behind after a failed rollback has
    none, even while the process that left it runs on).  An owner of this machine's current boot is asked
    through /proc (pid and start time, so a reused pid is not taken for it).  One of another boot id ran on
    another machine of a shared inventory, or on this one before a reboot; /proc cannot answer for it, so it
    counts as alive unless there is evidence that it is gone:

    * ``own_host``: the intent is of the host this process runs as.  Intents of a host are opened on that
      host's machine, so another boot id is an earlier boot of this one.
    * ``host_boot``: the boot id recorded for the intent's host (``hosts.boot_marker``) is not the owner's: the
      host booted since the intent was opened (opening one records the boot id, :meth:`Run.begin`).
    * the lease: the owner renews ``updated_at`` at every step and every ``HEARTBEAT_SECONDS`` during one
      (:meth:`Run.heartbeat`); older than ``lease`` seconds, the owner is taken for dead (a host that went
      down for good, a process frozen).  Hosts' clocks must agree to well within the lease: a renewal more
      than ``lease`` seconds ahead of this machine's clock counts as expired too.
    """
    if row.state not in (RUNNING, ROLLING_BACK):
        return None
    parsed = _parse_owner(row.owner)
    if parsed is None:
        return None
    boot, pid = parsed
    me = process_id()
    if me is None or row.owner == me:
        return None
    if boot == me.split(":", 1)[0]:
        return f"process {pid} on this machine" if owner_alive(row.owner) else None
    if own_host or (host_boot is not None and host_boot != boot):
        return None
    now = now or utcnow()
    seen = row.updated_at
    age = (now - seen).total_seconds() if isinstance(seen, dt.datetime) else None
    # a renewal further ahead of this clock than the lease is no evidence of life either: clocks that agree to
    # within the lease cannot write it, and counted as fresh it would hold the GPUs until this clock caught up
    # (forever, for a year-9999 value written by hand)
    if age is None or abs(age) > lease:
        return None
    heard = f"last heard from {age:.0f} s ago" if age >= 0 else \
        f"last renewed {-age:.0f} s ahead of this machine's clock"
    return (f"process {pid} on the machine of host {row.host_id} (boot id {boot[:8]}), {heard} (taken for gone "
            f"after {lease:.0f} s: policies.intent_lease_seconds)")


def _of_this_boot(owner: Any) -> bool:
    """Was the intent opened on this machine since it booted (its owner then is checked through /proc)?"""
    parsed, me = _parse_owner(owner), process_id()
    return parsed is not None and me is not None and parsed[0] == me.split(":", 1)[0]


def _parse_owner(owner: Any) -> tuple[str, int] | None:
    """(boot id, pid) of an owner as :func:`process_id` writes it; None for anything else (empty, hand-made,
    a BLOB, which SQLite hands back as bytes): such an owner names no process, so nobody carries the intent
    out.  Whitespace is refused too, since the parts are quoted into one-line messages."""
    if not isinstance(owner, str) or any(c.isspace() for c in owner):
        return None
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not (parts[1].isascii() and parts[1].isdigit()):
        return None
    return parts[0], int(parts[1])


def owner_alive(owner: str | None) -> bool:
    """Is the process that opened an intent still running (same boot, same pid, same start time)?"""
    parsed = _parse_owner(owner)
    return parsed is not None and parsed[1] > 0 and process_id(parsed[1]) == owner


__all__ = ["Run", "recover", "require_settled", "settle", "open_intents", "register_kind", "mig_step", "mdev_step", "vgpu_step",
           "vfs_step", "mig_mode_step", "vgpu_scheduler_step", "record_vfs_step", "allocate_step", "release_step",
           "domain_xml_step", "cdi_step", "whole_gpu_step",
           "describe", "describe_open", "IntentFailed", "PENDING", "DONE", "UNDONE", "SKIPPED"]
