"""``gpuvirt rebalance --execute``: carry a move plan out, one journalled intent per move.

Each move is one intent (kind ``rebalance``) of the host running gpuvirt, with these steps, in order:

1. on the target host: the GPU instance at the planned start (a MIG-backed vGPU only), allocated to the VM;
2. on the target host: the vGPU (an mdev with the UUID shown in the plan's target XML, or a vGPU type on a
   free VF), allocated to the VM - from here until step 3 is settled both devices exist;
3. ``vm-handover`` (:mod:`gpuvirt.service.rebalance_steps`): the VM's libvirt definition names the target
   instead of the source (live migration, or shut down / redefine / start for a cold move);
4. on the source host: the VM's allocations released and the source vGPU (and its GPU instance) destroyed,
   as a detach would.

Until the handover is done the intent is rolled back after a failure or a kill (the target goes, the VM
keeps its source device); from then on it is finished forward (the source goes), by the executor itself
too: a failed release or destroy of the source is tried once more, then left open (:class:`CleanupPending`,
"source cleanup pending") for ``reconcile`` to finish - never undone, which would move the guest back.  So the VM holds exactly
one device in its XML at every point, and the inventory agrees with the hosts once ``reconcile`` (or the
next command on those GPUs) settled what a kill left.  Moves run one after another: every plan is valid in
that order, and a failure stops the rest with the moves before it complete.

After the moves, still under the GPU locks, the request is placed where the plan made room
(:mod:`gpuvirt.service.rebalance_place`: attached to a VM as ``attach`` would, or made as a free instance);
that is an intent of its own, so a failure there leaves the moves done.

Steps on another host of a shared inventory run through that host's :class:`~gpuvirt.context.Context`
(``peers``), or, with ``remote`` (the CLI), through a peer session started on that host
(:mod:`gpuvirt.service.peers`); a plan that needs a host this process cannot reach is refused before anything
changes, and so is one that places the request on a host reached through a peer session (the request is
placed by a command on its own host).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Mapping

from gpuvirt.context import Context
from gpuvirt.errors import ConflictError, GpuvirtError, HostError
from gpuvirt.inventory.models import MDEV
from gpuvirt.model.moves import MovePolicy
from gpuvirt.service import intent, intent_steps
from gpuvirt.service.rebalance import (
    Runner,
    Scope,
    UnitInfo,
    best_plan,
    libvirt_uri,
    load_scope,
    with_ram,
    plan_document,
    source_device,
)
from gpuvirt.service.rebalance_steps import handover_step, set_runner

CLEANUP_RETRY_SECONDS = 0.5         # pause before the one retry of a move's source cleanup


@contextlib.contextmanager
def reach(ctx: Context, peers: Mapping[str, Context] | None, runner: Runner | None):
    """Make the other hosts' contexts and the libvirt runner available to the journal's steps."""
    old_peers = dict(intent_steps.PEERS)
    intent_steps.PEERS.update({**(peers or {}), ctx.settings.host_id: ctx})
    intent_steps.HOME.append(ctx.settings.host_id)
    old_runner = set_runner(runner) if runner is not None else None
    try:
        yield
    finally:
        intent_steps.HOME.pop()
        intent_steps.PEERS.clear()
        intent_steps.PEERS.update(old_peers)
        if runner is not None:
            set_runner(old_runner)


def recover(ctx: Context, *, peers: Mapping[str, Context] | None = None, runner: Runner | None = None,
            actor: str | None = None) -> list[dict[str, Any]]:
    """Settle rebalance intents a dead process left (finished forward after the handover, else undone), each
    under the locks of its GPUs (those of hosts in ``peers`` too), so no attach or apply runs beside it."""
    from gpuvirt.service.instances import gpu_lock

    contexts = {ctx.settings.host_id: ctx, **{h: c for h, c in (peers or {}).items()}}
    out: list[dict[str, Any]] = []
    with reach(ctx, peers, runner):
        for row in intent.open_intents(ctx):
            if row.kind != "rebalance" or intent.is_active(row.id):
                continue
            keys = sorted(_split(ctx, k) for k in row.gpus or [])
            with contextlib.ExitStack() as locks:
                for h, a in keys:
                    if h in contexts:       # another host's lock this process cannot take: settling fails anyway
                        locks.enter_context(gpu_lock(contexts[h], a))
                # the row again, under the locks: another process may have settled it meanwhile
                out += [r for r in intent.recover(ctx, {_key(ctx, h, a) for h, a in keys}, actor=actor,
                                                  kinds=["rebalance"]) if r["intent"] == row.id]
    return out


def _key(ctx: Context, host: str, address: str) -> str:
    """The key of a GPU in an intent row of ``ctx``'s host (:func:`gpuvirt.service.intent.gpu_keys`)."""
    return address if host == ctx.settings.host_id else f"{host}/{address}"


def _split(ctx: Context, key: str) -> tuple[str, str]:
    host, sep, address = key.rpartition("/")
    return (host, address) if sep else (ctx.settings.host_id, key)


def rebalance_and_execute(ctx: Context, name: str, *, cluster: bool = False, policy: MovePolicy,
                          runner: Runner | None = None, peers: Mapping[str, Context] | None = None,
                          hosts: frozenset[str] | None = None, place: bool = True, vm: str | None = None,
                          attach_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan for ``name``, carry the plan out, then place the request where it made room (``place``): at
    the VM ``vm`` as ``attach`` would (with ``attach_kw``), else as a free instance.  Returns the plan
    document with each move's ``result`` and ``placed`` (docs/placement.md)."""
    return _plan_and_execute(ctx, name, cluster=cluster, policy=policy, runner=runner, peers=peers, hosts=hosts,
                             place=place, vm=vm, attach_kw=attach_kw)[0]


def execute_for(ctx: Context, name: str, *, policy: MovePolicy, cluster: bool = False, vm: str | None = None,
                tenant: str | None = None, vm_uuid: str | None = None, fmt: str | None = None,
                runner: Runner | None = None, peers: Mapping[str, Context] | None = None,
                remote: bool = False) -> tuple[dict[str, Any], list | None]:
    """``gpuvirt rebalance --execute [--vm VM [--tenant T]]``: the plan document and, for a VM, the attach's
    hand-offs.  With a VM the request is placed as ``attach VM --vgpu/--mig NAME --tenant T`` would place it
    (a GPU-instance profile as the MIG-backed vGPU on it, so room is planned for that vGPU type); ``fmt`` is
    rendered inside the attach, so a hand-off the VMM could not use undoes the attach (the moves stay).
    ``remote``: reach the other hosts the plan touches (not in ``peers``) through peer sessions."""
    from gpuvirt.service.attach import check_tenant, check_vm_name
    from gpuvirt.service.rebalance_place import for_vm

    kw = None
    if vm is not None:
        vm, tenant = check_vm_name(vm), check_tenant(tenant)
        if vm_uuid:
            from gpuvirt.vmm.libvirt import normalize_uuid

            # attach checks it too, but only after the moves: a bad UUID must change nothing
            vm_uuid = normalize_uuid(vm_uuid)
        name, kw = for_vm(ctx, name, {"tenant": tenant, "vm_uuid": vm_uuid, "fmt": fmt})
    elif tenant is not None or vm_uuid is not None or fmt is not None:
        from gpuvirt.errors import UsageError

        raise UsageError("--tenant, --vm-uuid and --format go with --vm")
    return _plan_and_execute(ctx, name, cluster=cluster, policy=policy, runner=runner, peers=peers, hosts=None,
                             place=True, vm=vm, attach_kw=kw, remote=remote)


def _plan_and_execute(ctx: Context, name: str, *, cluster: bool, policy: MovePolicy, runner: Runner | None,
                      peers: Mapping[str, Context] | None, hosts: frozenset[str] | None, place: bool,
                      vm: str | None, attach_kw: dict[str, Any] | None,
                      remote: bool = False) -> tuple[dict[str, Any], list | None]:
    from gpuvirt.service import peers as peer_sessions

    scope = load_scope(ctx, cluster=cluster)
    handoffs = None
    with contextlib.ExitStack() as stack:
        with reach(ctx, peers, runner):
            here = frozenset({ctx.settings.host_id})
            if remote and place and cluster and hosts is None:
                # the request can only be placed by this process, on this host: plan room *here* (moves may
                # still send VMs to other hosts); only when there is none here does the cluster-wide plan say
                # where to run the rebalance instead
                doc, hosts = plan_document(scope, name, policy, runner=runner, hosts=here, cluster=cluster), here
                if not doc["feasible"]:
                    wide = plan_document(scope, name, policy, runner=runner, hosts=None, cluster=cluster)
                    if wide["feasible"] and wide.get("unlocks"):
                        doc, hosts = wide, None     # refused below, naming the host to run it on
            else:
                doc = plan_document(scope, name, policy, runner=runner, hosts=hosts, cluster=cluster)
            if doc["feasible"] and (doc["moves"] or place):
                reached = dict(peers or {})
                missing = _needed(ctx, doc, place) - set(reached)
                if missing and remote:
                    u = doc.get("unlocks")
                    if place and u is not None and u["host"] in missing:
                        raise ConflictError(f"the plan makes room for {name} on host {u['host']}, and the request is "
                                            f"placed by the host that runs the rebalance: run it on {u['host']}, "
                                            "or plan without --cluster; nothing was changed")
                    # started only now: a plan that moves nothing elsewhere needs no other host
                    opened = stack.enter_context(peer_sessions.sessions(ctx, missing))
                    reached.update(opened)
                    intent_steps.PEERS.update(opened)
                handoffs = execute(ctx, scope, doc, name, policy, peers=reached, hosts=hosts, cluster=cluster,
                                   place=place, vm=vm, attach_kw=attach_kw)
    return doc, handoffs


def _needed(ctx: Context, doc: dict[str, Any], place: bool) -> set[str]:
    """The other hosts the moves of ``doc`` (and its placing) change."""
    out = {m[s]["host"] for m in doc["moves"] for s in ("from", "to")}
    if doc.get("unlocks") and (place or doc["moves"]):
        out.add(doc["unlocks"]["host"])
    return out - {ctx.settings.host_id}


def _contexts(ctx: Context, peers: Mapping[str, Context] | None, doc: dict[str, Any]) -> dict[str, Context]:
    out = {ctx.settings.host_id: ctx, **{h: c for h, c in (peers or {}).items()}}
    need = sorted(({m[s]["host"] for m in doc["moves"] for s in ("from", "to")}
                   | ({doc["unlocks"]["host"]} if doc.get("unlocks") else set())) - set(out))
    if need:
        raise ConflictError(f"the plan moves devices on {', '.join(need)}, which this process cannot change; run the "
                            "rebalance there, or plan without --cluster")
    return out


def execute(ctx: Context, scope: Scope, doc: dict[str, Any], name: str, policy: MovePolicy, *,
            peers: Mapping[str, Context] | None = None, hosts: frozenset[str] | None = None,
            cluster: bool = False, place: bool = False, vm: str | None = None,
            attach_kw: dict[str, Any] | None = None) -> list[Any] | None:
    """Carry out the moves of ``doc`` (a feasible plan document of ``scope``) in order; each move's entry
    gets ``result: "done"``.  Raises at the first move that fails (rolled back) with the moves before it
    done, or with :class:`CleanupPending` at a move that is done but whose source could not be removed
    (its entry gets ``cleanup: "pending"``; the later moves and the placing are not tried).  With ``place`` the request is then placed at ``doc["unlocks"]`` (:mod:`rebalance_place`) under
    the same GPU locks, and ``doc["placed"]`` says where; returns the attach's hand-offs for a ``vm``."""
    from gpuvirt.service.instances import gpu_lock
    from gpuvirt.service.rebalance_place import check_gpu, place as place_request

    contexts = _contexts(ctx, peers, doc)
    touched = {(m[s]["host"], m[s]["gpu"]) for m in doc["moves"] for s in ("from", "to")}
    u = doc.get("unlocks")
    if place and u is not None:
        touched.add((u["host"], u["gpu"]))
    # an unfinished move of this host on any of these (host, GPU)s is settled first, under the locks of all its
    # GPUs: they are taken together with these, in one sorted order
    for row in intent.open_intents(ctx):
        keys = {_split(ctx, k) for k in row.gpus or []}
        if row.kind == "rebalance" and keys & touched:
            touched |= {(h, a) for h, a in keys if h in contexts}
    touched_l = sorted(touched)
    with contextlib.ExitStack() as locks:
        for h, a in touched_l:
            locks.enter_context(gpu_lock(contexts[h], a))
        for h in sorted({h for h, _ in touched_l}):
            intent.require_settled(contexts[h], {_key(contexts[h], hh, a) for hh, a in touched_l})
        if u is None or u.get("instance") is None:
            # the plan was made before the locks were taken: it still holds only if a fresh plan is the same
            again, _ = best_plan(with_ram(load_scope(ctx, cluster=cluster), scope), name, policy, hosts=hosts)
            same = [(m.unit, m.dst.gpu, m.dst.start) for m in again.moves] == \
                [(m["unit"], scope_key(m["to"]), m["to"]["placement"]) for m in doc["moves"]]
            if u is not None:
                same = same and again.target is not None and again.target.gpu == scope_key(u) \
                    and again.target.start == u["placement"]
            if not same:
                raise ConflictError("the GPUs changed while the plan was made (another attach, detach or apply); "
                                    "run the rebalance again")
        if place and vm is not None:
            check_gpu(contexts, doc, attach_kw)
        for n, m in enumerate(doc["moves"]):
            try:
                _move(ctx, contexts, scope.units[m["unit"]], m, name)
            except CleanupPending as exc:
                # the room the later moves and the request count on is not free yet: they are not tried
                m["result"], m["cleanup"] = "done", "pending"
                rest = [f"moves {n + 2} to {len(doc['moves'])}"] if n + 1 < len(doc["moves"]) else []
                rest += [f"placing {name}"] if place and u is not None else []
                raise CleanupPending(
                    f"move {n + 1} of {len(doc['moves'])} ({m['kind']} move of VM {m['vm']}) is done, but removing "
                    f"its source failed ({exc}): source cleanup pending: run 'gpuvirt reconcile'"
                    + (f"; {' and '.join(rest)} not done" if rest else "")
                    + (f"; moves 1 to {n} are done" if n else "")) from exc
            except GpuvirtError as exc:
                done = f"; moves 1 to {n} are done" if n else ""
                raise type(exc)(f"move {n + 1} of {len(doc['moves'])} ({m['kind']} move of VM {m['vm']}) failed and "
                                f"was undone: {exc}{done}") from exc
            m["result"] = "done"
        if not place or u is None:
            return None
        try:
            doc["placed"], handoffs = place_request(contexts, doc, vm=vm, attach_kw=attach_kw)
        except GpuvirtError as exc:
            done = f"the {len(doc['moves'])} move(s) are done; " if doc["moves"] else ""
            raise type(exc)(f"{done}placing {name} on {u['host']}/{u['gpu']} failed and was undone: {exc}") from exc
        return handoffs


def scope_key(slot: dict[str, Any]) -> str:
    return f"{slot['host']}/{slot['gpu']}"


def _gpu_row(c: Context, address: str) -> Any:
    with c.inventory.unit() as uow:
        g = next((g for g in uow.gpus(c.settings.host_id) if g.address == address), None)
        if g is None:
            raise ConflictError(f"GPU {address} of host {c.settings.host_id} is not in the inventory")
        return g.id, g.nvml_index


def _check_live(src_ctx: Context, dst_ctx: Context, src_gpu: str, dst_index: int, instance: str | None,
                vm: str) -> None:
    """Ask the drivers themselves, right before a live move, what the plan assumed from recorded facts:
    ``nvmlGetVgpuCompatibility`` on the running vGPU's metadata and the target GPU's.  The recorded stack
    may be stale (a driver updated since) and the guest driver's vGPU version is known only to NVML."""
    from gpuvirt.service.peers import move_compatibility

    if not instance:
        raise ConflictError(f"VM {vm}: no mdev UUID or VM UUID to find its running vGPU by; not moved live")
    _, src_index = _gpu_row(src_ctx, src_gpu)
    compat = move_compatibility(src_ctx, src_index, instance, dst_ctx, dst_index)
    if not compat.allows("live"):
        raise ConflictError(f"VM {vm}: the drivers refuse a live move from GPU {src_gpu} of host "
                            f"{src_ctx.settings.host_id} to host {dst_ctx.settings.host_id}: {compat.message()}; "
                            "nothing was changed")


def _move(ctx: Context, contexts: Mapping[str, Context], info: UnitInfo, m: dict[str, Any], name: str) -> None:
    from gpuvirt.service.detach import _release_plan
    from gpuvirt.service.instances import row_fields

    src_host, dst_host = m["from"]["host"], m["to"]["host"]
    src_ctx, dst_ctx = contexts[src_host], contexts[dst_host]
    vm = info.vm or ""
    b = m["to"]["gpu"]
    gid_b, idx_b = _gpu_row(dst_ctx, b)
    with src_ctx.inventory.unit() as uow:
        vg = uow.instance(info.instance)
        vg_fields, vg_alloc = row_fields(vg), vg.allocation
        alloc = {"vm_name": vm, "vm_uuid": vg_alloc.vm_uuid, "tenant": vg_alloc.tenant,
                 "persistent": vg_alloc.persistent, "check_quota": False, "event": False, "consumer": "vm"}
        gi = uow.instance(info.backing) if info.backing is not None else None
        gi_fields = row_fields(gi) if gi is not None else None
    uuid = m["to"].get("uuid") if vg_fields["kind"] == MDEV else None
    parent = None
    if vg_fields["kind"] == MDEV:
        # a board whose vGPUs are mdevs of the board itself (T4) has no VF to take at creation: name the parent
        from gpuvirt.model.vgpu import parse_type_id
        from gpuvirt.service import hostview
        from gpuvirt.service.rebalance_place import board_parent

        view_b = hostview.snapshot(dst_ctx).by_address(b)
        tid = parse_type_id(vg_fields["type_id"])
        parent = board_parent(view_b, tid) if view_b is not None and tid is not None else None
    vg_fields.update(mdev_uuid=uuid, parent=parent)
    steps: list[dict[str, Any]] = []
    backing = None
    if gi_fields is not None:
        start = m["to"]["placement"]
        gi_fields.update(placement_start=start)
        backing = (gi_fields["profile_id"], start)
        steps.append(intent_steps.on_host(intent.mig_step(
            b, gid_b, idx_b, gi_fields["profile_id"], start, gi_fields.get("placement_size"), present=True,
            fields=gi_fields, alloc=dict(alloc, tenant=None), label=f"GPU instance for VM {vm} (rebalance)"),
            dst_host))
    if vg_fields["kind"] == MDEV:
        create = intent.mdev_step(b, gid_b, parent, vg_fields["type_id"], uuid, present=True, fields=vg_fields,
                                  alloc=alloc, backing=backing, label=f"vGPU {vg_fields.get('type_name')} {uuid} for "
                                  f"VM {vm} (rebalance)")
    else:
        create = intent.vgpu_step(b, gid_b, None, int(vg_fields["type_id"]), present=True, fields=vg_fields,
                                  alloc=alloc, backing=backing, label=f"vGPU {vg_fields.get('type_name')} for VM "
                                  f"{vm} (rebalance)")
    steps.append(intent_steps.on_host(create, dst_host))
    s_uuid, s_addr = source_device(info)
    local = ctx.settings.host_id
    src = {"host": src_host, "uri": libvirt_uri(src_host, local), "uuid": s_uuid, "address": s_addr}
    dst = {"host": dst_host, "uri": libvirt_uri(dst_host, local), "uuid": uuid, "address": None}
    steps.append(intent_steps.on_host(handover_step(b, vm=vm, kind=m["kind"], src=src, dst=dst), local))
    release, _ = _release_plan(src_ctx, vm, [info.instance], destroy=True)
    steps += [intent_steps.on_host(s, src_host) for s in release if s is not None]
    if m["kind"] == "live":
        _check_live(src_ctx, dst_ctx, m["from"]["gpu"], idx_b, s_uuid or alloc["vm_uuid"], vm)
    run = intent.Run.begin(ctx, "rebalance", gpus=(), recovery="back",
                           target={"vm": vm, "request": name, "kind": m["kind"], "from": m["from"], "to": m["to"]})
    handover = len(steps) - len(release) - 1
    steps[handover]["params"]["intent"] = run.id
    for s in steps:
        run.add(s)
    try:
        for i in range(handover + 1):
            if i == handover and not run.steps[i]["params"]["dst"]["uuid"]:
                # a vendor-specific VFIO target: the VF was chosen when step ``handover - 1`` created it
                run.steps[i]["params"]["dst"]["address"] = run.steps[i - 1]["params"]["vf"]
            run.run(i)
    except GpuvirtError as exc:
        failures = run.abort(exc)
        if failures:
            raise type(exc)(f"{exc}; undoing the move did not finish ({failures[0]}): run 'gpuvirt reconcile'") \
                from exc
        raise
    # the VM names its target now: the move is done, and is never undone from here (that would move the guest
    # back, a second reboot or migration).  The source's release and destroy are tried again once (a device
    # QEMU let go of a moment ago may still be busy); if they still fail, the intent stays open to be finished
    # forward by reconcile or the next command on these GPUs.
    error: GpuvirtError | None = None
    for attempt in range(2):
        if attempt:
            time.sleep(CLEANUP_RETRY_SECONDS)
        try:
            for i in range(handover + 1, len(run.steps)):
                if run.steps[i]["state"] != intent.DONE:
                    run.run(i)
            run.finish()
            return
        except GpuvirtError as exc:
            error = exc
    run.leave(f"source cleanup pending: {error}", state=intent.UNFINISHED)
    raise CleanupPending(str(error))


class CleanupPending(HostError):
    """A move is done (the VM uses its target device) but releasing or destroying its source failed twice; the
    move's intent stays open, to be finished forward by ``gpuvirt reconcile``."""


def attach_with_moves(ctx: Context, vm: str, *, allow: str, runner: Runner | None = None,
                      peers: Mapping[str, Context] | None = None, **kw: Any) -> Any:
    """``attach ... --allow-moves KINDS``: attach; when that finds no capacity, plan the fewest moves (within
    ``policies.rebalance_max_moves``) after which the request fits on this host, carry them out, and attach
    again.  Only a single ``--vgpu`` or ``--mig`` request can be planned for."""
    from gpuvirt.errors import CapacityError, UsageError
    from gpuvirt.service import attach as svc
    from gpuvirt.service.rebalance import default_prefer, make_policy
    from gpuvirt.service.rebalance_place import for_vm

    other = [o for o, v in (("--vf", kw.get("vf") or None), ("--instance", kw.get("instance")),
                            ("--mdev", kw.get("mdev")), ("--format cdi", kw.get("fmt") == "cdi" or None)) if v]
    if other or not (kw.get("vgpu") or kw.get("mig")):
        raise UsageError("--allow-moves makes room for a --vgpu or --mig request"
                         + (f", not {', '.join(other)}" if other else ""))
    if kw.get("count", 1) != 1:
        raise UsageError("--allow-moves makes room for one device at a time; drop --count")
    policy = make_policy(max_moves=int(ctx.settings.policies.get("rebalance_max_moves", 2)), allow=allow,
                         prefer=default_prefer(ctx))
    try:
        return svc.attach(ctx, vm, **kw)
    except CapacityError as exc:
        refused = exc
    # moved and placed as ``rebalance --execute --vm`` does: the attach runs under the locks the moves took
    name, kw = for_vm(ctx, "", kw)
    doc, handoffs = _plan_and_execute(ctx, name, cluster=False, policy=policy, runner=runner, peers=peers,
                                      hosts=frozenset({ctx.settings.host_id}), place=True, vm=vm, attach_kw=kw)
    if not doc["feasible"]:
        raise CapacityError(f"{refused}; moving VMs does not help: {doc['reason']}")
    return handoffs


__all__ = ["CleanupPending", "rebalance_and_execute", "execute_for", "execute", "recover", "reach", "attach_with_moves"]

