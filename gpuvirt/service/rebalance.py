"""``gpuvirt rebalance --for PROFILE_OR_TYPE``: the fewest moves of running VMs' GPU devices that make room
for a request that does not fit as things are (issue 13; docs/placement.md, "Rebalancing").

This module is the service side of the pure planner (:mod:`gpuvirt.model.moves`): it builds the planner's
:class:`~gpuvirt.model.cluster.Cluster` from this host (as sysfs and NVML show it, matched with its
inventory rows) or, with ``cluster=True``, from every host of a shared inventory (their rows; stale hosts
left out), resolves the request against the catalog, turns the options into a
:class:`~gpuvirt.model.moves.MovePolicy`, and answers with the plan, each move's target domain XML
(the VM's XML naming its target device) and a picture of every GPU the plan touches.  Carrying a plan out
is :mod:`gpuvirt.service.rebalance_exec`.

What moves: a VM's MIG-backed vGPU (with the GPU instance under it) and a VM's time-sliced vGPU, on GPUs
gpuvirt manages for VMs.  What never moves: anything gpuvirt did not create, instances that are not active
(half-way through a create or destroy), unhealthy ones, devices held by containers, free instances (they
are the applied profile's layout, which ``apply`` owns), transient devices (they end with the VM's run:
the libvirt hook frees them, under the GPU lock the executor holds, when a cold move stops the guest), and
everything on unhealthy GPUs, GPUs in containers mode and stale hosts (none of these is a place to move to
either).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from gpuvirt.context import Context
from gpuvirt.errors import GpuvirtError, HostError, NotFoundError, UsageError
from gpuvirt.inventory.models import MDEV, MIG, MODE_CONTAINERS, VFIO_VGPU
from gpuvirt.model import vgpu as vgpu_rules
from gpuvirt.model.catalog import GpuModel, resolve_gi_profile, resolve_vgpu_type
from gpuvirt.model.cluster import Cluster, Gpu, Host, Request, Unit
from gpuvirt.model.mig import Placed
from gpuvirt.model.moves import MAX_MOVES_LIMIT, MOVE_KINDS, PREFER, MovePolicy, Plan, plan_moves, replay
from gpuvirt.model.preflight import HostStack

Runner = Callable[[Sequence[str]], str]
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?",
                       re.ASCII)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+:-]{0,127}")
DEFAULT_MAX_MOVES = 3


# --- facts per host -------------------------------------------------------------------------------------------
def _host_stack(db: Any, host: str) -> HostStack:
    """What ``host`` runs, as far as live migration cares (driver, OS, kernel, QEMU, libvirt versions).

    ``db`` is an open inventory unit.  The facts are those the host recorded the last time it looked at itself
    (``service.hostview.record``: NVML's driver and vGPU range, os-release, kernel, libvirt's capabilities
    cache).  A host that never recorded them gets an unknown stack, which makes the pre-flight refuse live
    moves (``host driver version unknown``, LIMIT_HOST_DRIVER) and allow cold ones: no live migration is
    planned on facts nobody checked.  The executor asks NVML itself again right before a live move.
    """
    return db.host_stacks([host]).get(host, HostStack())


def libvirt_uri(host: str, local: str) -> str:
    """The libvirt connection URI of ``host`` as seen from the host ``local`` that runs gpuvirt: the system
    connection for itself, ``qemu+ssh://HOST/system`` for another host of the inventory (host ids are the
    hostnames unless configured otherwise; docs/placement.md)."""
    if host == local:
        return "qemu:///system"
    # host ids come from the shared inventory, which any of its hosts writes; one that is not a plain hostname
    # ('x/system?command=/tmp/prog#', '-oProxyCommand=...') would add libvirt URI parameters (a program run
    # in place of ssh) to every virsh call that plans or carries out a move involving it
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise HostError(f"host id {host[:80]!r} is not a hostname, so its libvirt cannot be reached as "
                        "qemu+ssh://HOST/system")
    return f"qemu+ssh://{host}/system"


# --- the cluster as the planner sees it ---------------------------------------------------------------------
@dataclass
class UnitInfo:
    """What the executor needs of one unit: where its rows are and which device the VM's XML names."""

    key: str
    host: str
    gpu: str                            # PCI address on ``host``
    instance: int | None                # the row the VM holds (vGPU row; the GPU instance for a bare one)
    backing: int | None = None          # the GPU instance row under a MIG-backed vGPU
    vm: str | None = None
    tenant: str | None = None
    kind: str | None = None             # mdev | vfio-vgpu | mig
    uuid: str | None = None             # the mdev the VM's XML names (kind mdev)
    address: str | None = None          # the VF the VM's XML names (kind vfio-vgpu)


@dataclass
class Scope:
    cluster: Cluster
    local: str
    units: dict[str, UnitInfo] = field(default_factory=dict)
    gpus: dict[str, tuple[str, str]] = field(default_factory=dict)      # gpu key -> (host, address)
    interface: dict[str, str | None] = field(default_factory=dict)      # gpu key -> mdev | vendor-vfio
    models: dict[str, GpuModel] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)                # unit key -> "vm (type)"
    ram: dict[str, int] = field(default_factory=dict)                   # unit key -> guest RAM, MiB (libvirt)
    warnings: list[str] = field(default_factory=list)                   # hosts left out for a suspect clock


def gpu_key(host: str, address: str) -> str:
    return f"{host}/{address}"


def load_scope(ctx: Context, *, cluster: bool = False) -> Scope:
    """This host (live view), or with ``cluster`` every fresh host of the inventory (this one live)."""
    from gpuvirt.service.report import _stale_after, _utcnow, skew_warning, staleness
    from gpuvirt.service.report_sources import _from_inventory, _from_live

    now = _utcnow()
    quiet = float(ctx.settings.policies.get("health_quiet_seconds", 3600))
    local = ctx.settings.host_id
    hosts = list(_from_live(ctx, now, quiet)[0])
    warnings: list[str] = []
    if cluster:
        stale_after = _stale_after(ctx)
        for h in _from_inventory(ctx, None, now, quiet)[0]:
            if h.id == local:
                continue
            why = staleness(h.last_seen_at, now, stale_after)      # the report's rule: same hosts count
            if why is None:
                hosts.append(h)
            elif (w := skew_warning(h.id, why)) is not None:
                warnings.append(w)
    scope = scope_for_hosts(ctx, hosts)
    scope.warnings = warnings
    return scope


def scope_for_hosts(ctx: Context, hosts: list[Any]) -> Scope:
    """The planner's scope over ``hosts`` (report facts, :class:`gpuvirt.service.report.HostFacts`), with each
    host's recorded stack, the GPUs' modes and which devices are transient from the inventory.  ``report
    --fit`` builds it from the very facts its fit simulation used."""
    local = ctx.settings.host_id
    with ctx.inventory.unit() as uow:
        stacks = {h.id: _host_stack(uow, h.id) for h in hosts}
        modes = {gpu_key(h.id, g.address): g.mode for h in hosts for g in uow.gpus(h.id)}
        scope = build_scope(hosts, stacks, modes, local)
        for info in scope.units.values():
            if info.vm is not None and info.instance is not None and info.kind in (MDEV, VFIO_VGPU):
                row = uow.instance(info.instance)
                info.uuid = row.mdev_uuid if info.kind == MDEV else None
                info.address = row.parent if info.kind == VFIO_VGPU else None
        # VMs (per host) that hold any transient allocation, whatever GPU it is on
        held = {(a.host_id, a.vm_name) for h in hosts for a in uow.allocations(host_id=h.id)
                if not a.persistent and a.vm_name and (a.consumer or "vm") == "vm"}
        transient = {info.key for info in scope.units.values() if (info.host, info.vm) in held}
    if transient:
        # a transient device ends with its VM's run: the libvirt hook frees it (under the GPU's lock) when a cold
        # move stops the guest.  No unit of such a VM is moved: the hook would wait for a lock the executor
        # holds while the executor waits for the guest to stop (and a transient device is not moved at all)
        from dataclasses import replace

        units = tuple(replace(u, movable=False) if u.key in transient else u for u in scope.cluster.units)
        scope.cluster = replace(scope.cluster, units=units)
    return scope


def build_scope(hosts: list[Any], stacks: dict[str, HostStack], modes: dict[str, str | None], local: str) -> Scope:
    """The planner's cluster from report facts (:class:`gpuvirt.service.report.HostFacts`)."""
    from gpuvirt.service.report import I_BACK, I_ID, I_KIND, I_PID, I_START, I_STATE, I_TENANT, I_TYPE, I_VM

    scope = Scope(Cluster((), (), ()), local)
    h_out, g_out, u_out = [], [], []
    foreign = 0
    for h in hosts:
        h_out.append(Host(h.id, stacks.get(h.id, HostStack())))
        for f in h.gpus:
            m = f.model
            key = gpu_key(h.id, f.address)
            if m is None or f.health is not None or modes.get(key) == MODE_CONTAINERS:
                continue
            mig_on = bool(f.mig_current and m.mig is not None)
            if not mig_on and m.vgpu is None:
                continue
            if any(r[I_KIND] == "gpu" for r in f.insts):
                continue            # handed whole to a container
            vf = f.vfs_enabled if (m.vgpu is not None and m.vgpu.parent == "vf") else None
            g_out.append(Gpu(key, h.id, m, mig_enabled=mig_on, enabled_vfs=vf))
            scope.gpus[key] = (h.id, f.address)
            scope.interface[key] = f.interface
            scope.models[m.id] = m
            vtypes = {t.id: t for t in m.vgpu.types} if m.vgpu is not None else {}
            vg_on = {r[I_BACK]: r for r in f.insts if r[I_BACK] is not None and r[I_KIND] in (MDEV, VFIO_VGPU)}

            def own(r: tuple) -> bool:
                return r[I_ID] is not None and r[I_STATE] == "active" and r[I_ID] not in f.sick

            for r in f.insts:
                vm = tenant = None
                vtype = None
                if mig_on and r[I_KIND] == MIG:
                    prof = next((p for p in m.mig.gi_profiles if p.id == r[I_PID]), None)  # type: ignore[union-attr]
                    if prof is None or r[I_START] is None:
                        continue
                    vg = vg_on.get(r[I_ID]) if r[I_ID] is not None else None
                    holder = vg if vg is not None else r
                    vm, tenant = holder[I_VM], holder[I_TENANT]
                    if vg is not None:
                        vtype = vgpu_rules.parse_type_id(vg[I_TYPE])
                    movable = own(r) and (vg is None or own(vg)) and vm is not None and vtype is not None \
                        and holder[-1] in (None, "vm")
                    placed = Placed(r[I_START], prof.memory_slices, prof.id)
                    ukey = str(r[I_ID]) if r[I_ID] is not None else f"foreign-{foreign}"
                    info = UnitInfo(ukey, h.id, f.address, vg[I_ID] if vg is not None else r[I_ID],
                                    r[I_ID] if vg is not None else None, vm, tenant,
                                    vg[I_KIND] if vg is not None else MIG)
                    label = prof.name
                elif not mig_on and r[I_KIND] in (MDEV, VFIO_VGPU):
                    vtype = vgpu_rules.parse_type_id(r[I_TYPE])
                    if vtype is None or vtype not in vtypes:
                        continue            # a generic mdev, not a vGPU of this board
                    vm, tenant = r[I_VM], r[I_TENANT]
                    movable = own(r) and vm is not None and r[-1] in (None, "vm")
                    placed = None
                    ukey = str(r[I_ID]) if r[I_ID] is not None else f"foreign-{foreign}"
                    info = UnitInfo(ukey, h.id, f.address, r[I_ID], None, vm, tenant, r[I_KIND])
                    label = vtypes[vtype].name
                else:
                    continue
                if r[I_ID] is None:
                    foreign += 1
                fb = vtypes[vtype].framebuffer_mib if vtype in vtypes else None
                u_out.append(Unit(ukey, key, placed=placed, vgpu_type=vtype, vm=vm, tenant=tenant, fb_mib=fb,
                                  movable=movable))
                scope.units[ukey] = info
                if vtype in vtypes:
                    label = vtypes[vtype].name
                scope.labels[ukey] = f"{vm} ({label})" if vm else (f"free {label}" if r[I_ID] is not None
                                                                     else f"foreign {label}")
    scope.cluster = Cluster(tuple(h_out), tuple(g_out), tuple(u_out))
    return scope


# --- request and policy ----------------------------------------------------------------------------------------
def _request_on(m: GpuModel, mid: str | None, name: str) -> Request | None:
    """``name`` on model ``m``: its GPU-instance profile if it has one by that name, else its vGPU type, else
    None (the catalog's resolvers refuse an unknown name with an error; here that only means "not this one")."""
    for kind, fn, field_name in (("mig", resolve_gi_profile, "profile_id"), ("vgpu", resolve_vgpu_type, "vgpu_type")):
        if getattr(m, kind) is None:
            continue
        try:
            return Request(**{field_name: fn(m, name).id}, model=mid)
        except GpuvirtError:
            continue
    return None


def requests_for(scope: Scope, name: str) -> list[Request]:
    """The request ``name`` means on each model in scope: a GPU-instance profile or a vGPU type."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"invalid profile or vGPU type name {str(name)[:60]!r}")
    out = [r for mid, m in sorted(scope.models.items()) if (r := _request_on(m, mid, name)) is not None]
    if not out:
        from gpuvirt.model.catalog import load_catalog

        if not any(_request_on(m, None, name) for m in load_catalog().models.values()):
            raise UsageError(f"{name!r} is no MIG profile or vGPU type of any known GPU model")
        raise NotFoundError(f"no GPU in scope offers {name} (in the mode it needs: MIG mode for GPU instances "
                            "and MIG-backed vGPUs, vGPU mode for time-sliced ones)")
    return out


def parse_allow(allow: str | Iterable[str]) -> frozenset[str]:
    """``"live,cold"`` -> {"live", "cold"}; unknown kinds are refused."""
    items = [a.strip() for a in allow.split(",")] if isinstance(allow, str) else [str(a).strip() for a in allow]
    items = [a for a in items if a]
    if not items:
        raise UsageError(f"--allow needs at least one move kind ({', '.join(MOVE_KINDS)})")
    bad = sorted({a for a in items if a not in MOVE_KINDS})
    if bad:
        # echoed bounded: the option's value is whatever the caller typed (megabytes, escape sequences)
        shown = [a if len(a) <= 40 and a.isprintable() else repr(a[:40]) + ("..." if len(a) > 40 else "")
                 for a in bad[:3]]
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UsageError(f"unknown move kind {', '.join(shown)}{more} in --allow; choose from {', '.join(MOVE_KINDS)}")
    return frozenset(items)


def make_policy(*, max_moves: int = DEFAULT_MAX_MOVES, allow: str | Iterable[str] = "live",
                pinned_vms: Iterable[str] = (), prefer: str = "data") -> MovePolicy:
    if isinstance(max_moves, bool) or not isinstance(max_moves, int) or not 0 <= max_moves <= MAX_MOVES_LIMIT:
        raise UsageError(f"--max-moves must be an integer from 0 to {MAX_MOVES_LIMIT}, got {max_moves!r}")
    if prefer not in PREFER:
        raise UsageError(f"--prefer must be {' or '.join(PREFER)}, got {str(prefer)[:40]!r}")
    # free instances stay (apply owns the profile's layout); moves within one host are never live (libvirt
    # does not migrate a domain to the host it runs on)
    return MovePolicy(max_moves=max_moves, allow=parse_allow(allow), move_unallocated=False,
                      pinned_vms=frozenset(pinned_vms), live_same_host=False, prefer=prefer)


def default_prefer(ctx: Context) -> str:
    """``policies.rebalance_prefer``: which of two plans with as many (cold) moves wins."""
    return str(ctx.settings.policies.get("rebalance_prefer", "data"))


# --- planning -------------------------------------------------------------------------------------------------
def _free_match(scope: Scope, req: Request, hosts: frozenset[str] | None) -> Unit | None:
    """A free instance (ours, active, healthy) that already is what the request asks for."""
    model_of = {g.key: g.model.id for g in scope.cluster.gpus}
    for u in scope.cluster.units:
        info = scope.units[u.key]
        if u.vm is not None or info.instance is None or (hosts is not None and info.host not in hosts):
            continue
        if model_of[u.gpu] != req.model:
            continue
        if req.vgpu_type is not None and u.vgpu_type == req.vgpu_type:
            return u
        if req.profile_id is not None and u.placed is not None and u.placed.profile_id == req.profile_id \
                and u.vgpu_type is None:
            return u
    return None


def best_plan(scope: Scope, name: str, policy: MovePolicy, *, hosts: frozenset[str] | None = None) -> tuple[Plan, Request]:
    """The best plan over the models that know ``name`` (fewest moves, then cold moves, then data)."""
    best: tuple[tuple, Plan, Request] | None = None
    first: tuple[Plan, Request] | None = None
    for req in requests_for(scope, name):
        if hosts is not None:
            req = Request(req.profile_id, req.vgpu_type, req.model, hosts=hosts)
        plan = plan_moves(scope.cluster, req, policy)
        if first is None or (not first[0].complete and plan.complete):
            first = (plan, req)
        if plan.feasible:
            key = (len(plan.moves), plan.kinds().get("cold", 0), plan.data_mib)
            if best is None or key < best[0]:
                best = (key, plan, req)
    if best is not None:
        return best[1], best[2]
    assert first is not None
    return first


def rebalance(ctx: Context, name: str, *, cluster: bool = False, max_moves: int = DEFAULT_MAX_MOVES,
              allow: str | Iterable[str] = "live", runner: Runner | None = None,
              hosts: Iterable[str] | None = None, prefer: str | None = None) -> dict[str, Any]:
    """The plan for ``name`` as the document of ``gpuvirt rebalance --json`` (docs/placement.md).

    ``runner`` answers ``virsh dumpxml`` for the target XML of each move (None: the real virsh); where the
    domain XML cannot be read the move's ``target_xml`` is null and ``target_xml_error`` says why.  ``hosts``
    restricts where the request itself may go (attach: this host).  ``prefer`` None: the policy's."""
    policy = make_policy(max_moves=max_moves, allow=allow, prefer=prefer or default_prefer(ctx))
    scope = load_scope(ctx, cluster=cluster)
    return plan_document(scope, name, policy, runner=runner,
                         hosts=frozenset(hosts) if hosts is not None else None, cluster=cluster)


def plan_document(scope: Scope, name: str, policy: MovePolicy, *, runner: Runner | None = None,
                  hosts: frozenset[str] | None = None, cluster: bool = False) -> dict[str, Any]:
    from gpuvirt.service.instances import new_uuid

    # a free instance of the kind asked for is what attach hands out first: nothing needs to move
    free = next((u for r in requests_for(scope, name) if (u := _free_match(scope, r, hosts)) is not None), None)
    if free is not None:
        info = scope.units[free.key]
        return {"request": name, "feasible": True, "moves": [], "minimal": True, "complete": True, "data_mib": 0,
                "reason": f"{name} is free already (instance {info.instance} on {info.host}/{info.gpu}); no move "
                          "needed", "unlocks": {"host": info.host, "gpu": info.gpu,
                                                "placement": free.placed.start if free.placed else None,
                                                "instance": info.instance},
                "ram_known": None, "waves": [], "scope": {"cluster": cluster, "hosts": sorted(h.key for h in scope.cluster.hosts)},
                "warnings": list(scope.warnings),
                "policy": {"max_moves": policy.max_moves, "allow": sorted(policy.allow)}, "gpus": []}
    xml_cache: dict[tuple[str, str], Any] = {}
    ram_known = guest_ram(scope, runner, xml_cache)
    plan, req = best_plan(scope, name, policy, hosts=hosts)
    doc: dict[str, Any] = {
        "request": name, "feasible": plan.feasible, "reason": plan.reason, "moves": [], "unlocks": None,
        "minimal": plan.minimal, "complete": plan.complete, "data_mib": plan.data_mib, "ram_known": ram_known,
        "waves": [list(w) for w in plan.waves],
        "scope": {"cluster": cluster, "hosts": sorted(h.key for h in scope.cluster.hosts)},
        "warnings": list(scope.warnings),
        "policy": {"max_moves": policy.max_moves, "allow": sorted(policy.allow)},
        "gpus": [],
    }
    if not plan.feasible and "cold" not in policy.allow and policy.max_moves > 0:
        # the pre-flight may have refused every live move: say what allowing cold moves would give
        from dataclasses import replace

        cold, _ = best_plan(scope, name, replace(policy, allow=policy.allow | {"cold"}), hosts=hosts)
        if cold.feasible:
            m = cold.moves[0]
            if m.src.host == m.dst.host:
                why = "a move within one host is cold: libvirt cannot migrate a domain to its own host"
            elif m.compatibility is not None and m.compatibility.reasons:
                why = m.compatibility.reasons[0].message()
            else:
                why = ""
            doc["reason"] += (f"; with cold moves allowed (--allow live,cold) {len(cold.moves)} move(s) would do"
                              + (f" (first move: {why})" if why else ""))
    if plan.target is not None:
        h, a = scope.gpus[plan.target.gpu]
        doc["unlocks"] = {"host": h, "gpu": a, "placement": plan.target.start}
    for mv in plan.moves:
        info = scope.units[mv.unit]
        sh, sa = scope.gpus[mv.src.gpu]
        dh, da = scope.gpus[mv.dst.gpu]
        # the target's mdev UUID is chosen now, so that the XML shown is the XML the executor uses; a
        # vendor-specific VFIO target is a VF chosen when it is created, so its XML waits for that
        uuid = new_uuid() if scope.interface.get(mv.dst.gpu) != "vendor-vfio" else None
        entry: dict[str, Any] = {
            "vm": mv.vm, "kind": mv.kind, "unit": mv.unit,
            "from": {"host": sh, "gpu": sa, "instance": info.instance, "placement": mv.src.start},
            "to": {"host": dh, "gpu": da, "placement": mv.dst.start, "uuid": uuid},
            "target_xml": None, "data_mib": mv.data_mib,
            "preflight": None if mv.compatibility is None else mv.compatibility.message(),
        }
        if mv.vm is not None:
            xml, err = _target_xml(scope, info, uuid, runner, xml_cache)
            entry["target_xml"] = xml
            if err:
                entry["target_xml_error"] = err
        doc["moves"].append(entry)
    doc["gpus"] = pictures(scope, plan, req)
    return doc


def guest_ram(scope: Scope, runner: Runner | None, cache: dict) -> bool:
    """Give every movable VM's unit its guest RAM (``<currentMemory>`` / ``<memory>`` of ``virsh dumpxml``),
    so that the planner's "least data moved" and ``data_mib`` count guest RAM + vGPU framebuffer; the
    inventory does not know guest RAM.  Returns whether it was read for every one of them; a VM whose XML
    cannot be read counts its framebuffer only.  A connection whose first call fails is not asked again
    (no libvirtd, an unreachable host): one failed call per host, not one per VM."""
    from gpuvirt.vmm.libvirt import memory_mib

    known, answered, dead = True, set(), set()
    for u in scope.cluster.units:
        if u.vm is None or not u.movable:
            continue
        info = scope.units[u.key]
        try:
            uri = libvirt_uri(info.host, scope.local)
        except HostError:
            known = False           # a host id no URI can be made of: its guests' RAM is unknown
            continue
        mib = None
        if uri not in dead:
            try:
                key = (info.host, u.vm)
                if key not in cache:
                    cache[key] = domain_xml(runner, uri, u.vm)
                answered.add(uri)
                mib = memory_mib(cache[key])
            except GpuvirtError:
                if uri not in answered:
                    dead.add(uri)
        if mib is None:
            known = False
        else:
            scope.ram[u.key] = mib
    with_ram(scope, scope)
    return known


def with_ram(scope: Scope, facts: Scope) -> Scope:
    """``scope`` with the guest RAM ``facts`` read (by unit key: inventory ids), e.g. a scope loaded again
    under the executor's locks, whose plan must be the one made with those facts."""
    from dataclasses import replace

    if facts.ram:
        scope.ram = dict(facts.ram)
        units = tuple(replace(u, ram_mib=facts.ram[u.key]) if u.key in facts.ram else u for u in scope.cluster.units)
        scope.cluster = replace(scope.cluster, units=units)
    return scope


def _target_xml(scope: Scope, info: UnitInfo, uuid: str | None, runner: Runner | None,
                cache: dict) -> tuple[str | None, str | None]:
    """The VM's domain XML naming the target device instead of the source one (None and why when not)."""
    if uuid is None:
        return None, "the target VF is chosen when its vGPU is created; the executor writes the XML then"
    try:
        key = (info.host, info.vm or "")
        if key not in cache:
            cache[key] = domain_xml(runner, libvirt_uri(info.host, scope.local), info.vm or "")
        src = source_device(info)
        from gpuvirt.vmm.libvirt import retarget_hostdev

        return retarget_hostdev(cache[key], old_uuid=src[0], old_address=src[1], new_uuid=uuid), None
    except GpuvirtError as exc:
        return None, str(exc)


def domain_xml(runner: Runner | None, uri: str, vm: str, *, inactive: bool = False) -> str:
    """``virsh -c URI dumpxml --migratable [--inactive] VM``."""
    from gpuvirt.host.virsh import VirshRunner

    run = runner or VirshRunner()
    # "--domain NAME": a VM named like an option (libvirt allows '--domain=other') stays a name (rebalance_steps)
    return run(["-c", uri, "dumpxml", "--migratable", *(["--inactive"] if inactive else []), "--domain", vm])


def source_device(info: UnitInfo) -> tuple[str | None, str | None]:
    """(mdev UUID, PCI address) of the device the VM's XML names for the unit (from its inventory row)."""
    if info.kind == MDEV and info.uuid:
        return info.uuid, None
    if info.kind == VFIO_VGPU and info.address:
        return None, info.address
    raise NotFoundError(f"instance {info.instance} of VM {info.vm} has no device a domain XML could name")


# --- pictures -------------------------------------------------------------------------------------------------
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def pictures(scope: Scope, plan: Plan, req: Request) -> list[dict[str, Any]]:
    """For every GPU the plan touches (and the one the request goes to): its contents before and after, one
    character per memory slice on a MIG GPU (``.`` free, ``*`` the request), one cell per vGPU on a board."""
    touched = []
    for mv in plan.moves:
        for k in (mv.src.gpu, mv.dst.gpu):
            if k not in touched:
                touched.append(k)
    if plan.target is not None and plan.target.gpu not in touched:
        touched.append(plan.target.gpu)
    if not touched:
        return []
    try:
        after = replay(scope.cluster, plan.moves)
    except GpuvirtError:        # pragma: no cover - the planner only returns valid sequences
        after = scope.cluster
    letters: dict[str, str] = {}
    for u in scope.cluster.units:
        if u.gpu in touched or any(m.unit == u.key for m in plan.moves):
            letters[u.key] = _LETTERS[len(letters) % len(_LETTERS)]
    gpus = {g.key: g for g in scope.cluster.gpus}
    out = []
    for k in touched:
        g = gpus[k]
        h, a = scope.gpus[k]
        before = _draw(g, [u for u in scope.cluster.units if u.gpu == k], letters, None, req)
        tgt = plan.target if plan.target is not None and plan.target.gpu == k else None
        now = _draw(g, [u for u in after.units if u.gpu == k], letters, tgt, req)
        legend = {letters[u.key]: scope.labels.get(u.key, u.key) for u in scope.cluster.units
                  if u.key in letters and (u.gpu == k or any(x.gpu == k and x.key == u.key for x in after.units))}
        out.append({"host": h, "gpu": a, "model": g.model.id, "before": before, "after": now, "legend": legend})
    return out


def _draw(g: Gpu, units: list[Unit], letters: dict[str, str], target: Any, req: Request) -> str:
    if g.mig_enabled and g.model.mig is not None:
        cells = ["."] * g.model.mig.memory_slices
        for u in units:
            if u.placed is not None:
                for s in range(u.placed.start, u.placed.start + u.placed.size):
                    if 0 <= s < len(cells):
                        cells[s] = letters.get(u.key, "#")
        if target is not None and target.start is not None:
            size = next((p.memory_slices for p in g.model.mig.gi_profiles
                         if p.id == (req.profile_id if req.profile_id is not None else _gi_of(g, req))), 1)
            for s in range(target.start, target.start + size):
                if 0 <= s < len(cells):
                    cells[s] = "*"
        return "|" + "".join(cells) + "|"
    cells = [letters.get(u.key, "#") for u in units]
    if target is not None:
        cells.append("*")
    return "[" + " ".join(cells) + "]" if cells else "[ ]"


def _gi_of(g: Gpu, req: Request) -> int | None:
    if req.vgpu_type is None or g.model.vgpu is None:
        return None
    t = next((t for t in g.model.vgpu.types if t.id == req.vgpu_type), None)
    return t.gpu_instance_profile_id if t is not None else None


__all__ = ["rebalance", "plan_document", "load_scope", "build_scope", "make_policy", "parse_allow", "requests_for",
           "best_plan", "libvirt_uri", "domain_xml", "guest_ram", "with_ram", "Scope", "scope_for_hosts", "UnitInfo",
           "DEFAULT_MAX_MOVES", "_host_stack"]
