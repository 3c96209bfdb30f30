"""Queries and changes of the inventory, as a unit of work over one database transaction.

Services never write SQL: they call these methods inside ``with inventory.unit(write=True) as uow:``; the
transaction commits when the block ends and rolls back when it raises.  Returned ORM objects stay usable
after the block (``expire_on_commit=False``) as plain records.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
from typing import Any, Iterable, Sequence

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, selectinload

from gpuvirt.errors import ConflictError, NotFoundError
from gpuvirt.inventory.models import (
    ACTIVE,
    Allocation,
    MIG,
    UNHEALTHY,
    Event,
    Gpu,
    HealthEvent,
    Host,
    HostStackRow,
    Instance,
    Intent,
    Profile,
    Tenant,
    utcnow,
)


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - hooks may run without a passwd entry
        user = str(os.getuid())
    return os.environ.get("GPUVIRT_ACTOR") or f"{user}@{os.uname().nodename}"


class Unit:
    def __init__(self, inventory: Any, session: Session) -> None:
        self.inventory = inventory
        self.session = session
        self.backend = inventory.backend
        self.recorded_events: list[Event] = []

    # --- hosts ----------------------------------------------------------------------------------------------
    def host(self, host_id: str) -> Host | None:
        return self.session.get(Host, host_id)

    def touch_host(self, host_id: str, *, hostname: str | None = None, root: str = "/",
                   simulated: bool = False, boot_marker: str | None = None) -> Host:
        h = self.session.get(Host, host_id)
        now = utcnow()
        if h is None:
            h = Host(id=host_id, hostname=hostname or os.uname().nodename, root=root, simulated=simulated,
                     created_at=now, last_seen_at=now, boot_marker=boot_marker)
            try:
                # added inside the savepoint so that its rollback also takes the pending row out of the
                # session; added outside, the next query's autoflush inserted it again and failed the whole
                # transaction (several processes of one new host at once on PostgreSQL)
                with self.session.begin_nested():
                    self.session.add(h)
                    self.session.flush()
            except IntegrityError:
                # another process registered the host at the same moment
                h = self.session.scalars(select(Host).where(Host.id == host_id)
                                         .execution_options(populate_existing=True)).one()
        h.last_seen_at = now
        if hostname:
            h.hostname = hostname
        h.root = root
        h.simulated = simulated
        if boot_marker is not None:
            h.boot_marker = boot_marker
        return h

    def note_boot(self, host_id: str, boot_marker: str | None) -> None:
        """Record the boot id the host runs now (when known and new): owners of intents on other machines are
        judged by it (``service.intent.owner_state``)."""
        if boot_marker is not None:
            self.session.execute(update(Host).where(Host.id == host_id, or_(Host.boot_marker.is_(None),
                                                                            Host.boot_marker != boot_marker))
                                 .values(boot_marker=boot_marker))

    def hosts(self) -> list[Host]:
        return list(self.session.scalars(select(Host).order_by(Host.id)))

    # --- GPUs ------------------------------------------------------------------------------------------------
    def gpus(self, host_id: str, *, present_only: bool = False) -> list[Gpu]:
        q = select(Gpu).where(Gpu.host_id == host_id)
        if present_only:
            q = q.where(Gpu.present.is_(True))
        return list(self.session.scalars(q.order_by(Gpu.address)))

    def gpu(self, gpu_id: int) -> Gpu:
        g = self.session.get(Gpu, gpu_id)
        if g is None:
            raise NotFoundError(f"no GPU with inventory id {gpu_id}")
        return g

    def gpu_by_address(self, host_id: str, address: str) -> Gpu | None:
        return self.session.scalars(select(Gpu).where(Gpu.host_id == host_id, Gpu.address == address)).first()

    def upsert_gpu(self, host_id: str, address: str, **fields: Any) -> Gpu:
        g = self.gpu_by_address(host_id, address)
        if g is None:
            g = Gpu(host_id=host_id, address=address, **fields)
            g.last_seen_at = utcnow()
            try:
                # PostgreSQL, READ COMMITTED: two processes of one host recording a new GPU at once both miss
                # it, and the second insert fails on uq_gpus_host_address once the first commits.  A savepoint
                # keeps that from aborting the caller's whole transaction; the winner's row is updated instead.
                with self.session.begin_nested():
                    self.session.add(g)
                    self.session.flush()
            except IntegrityError:
                g = self.session.scalars(select(Gpu).where(Gpu.host_id == host_id, Gpu.address == address)
                                         .execution_options(populate_existing=True)).one()
            else:
                return g
        for k, v in fields.items():
            setattr(g, k, v)
        g.last_seen_at = utcnow()
        self.session.flush()
        return g

    def lock_gpu(self, gpu: Gpu) -> Gpu:
        """Serialise changes to one GPU's layout across processes/hosts (no-op on SQLite: the write
        transaction already holds the database lock)."""
        if self.backend == "postgresql":
            self.session.execute(select(Gpu.id).where(Gpu.id == gpu.id).with_for_update())
        return gpu

    # --- instances -------------------------------------------------------------------------------------------
    def instances(self, host_id: str, *, gpu_id: int | None = None, kinds: Sequence[str] | None = None,
                  states: Sequence[str] | None = None) -> list[Instance]:
        q = select(Instance).where(Instance.host_id == host_id).options(selectinload(Instance.allocation))
        if gpu_id is not None:
            q = q.where(Instance.gpu_id == gpu_id)
        if kinds:
            q = q.where(Instance.kind.in_(list(kinds)))
        if states:
            q = q.where(Instance.state.in_(list(states)))
        return list(self.session.scalars(q.order_by(Instance.gpu_id, Instance.id)))

    def instance(self, instance_id: int, host_id: str | None = None) -> Instance:
        inst = self.session.get(Instance, instance_id)
        if inst is None or (host_id is not None and inst.host_id != host_id):
            raise NotFoundError(f"no instance {instance_id} on this host")
        return inst

    def instance_by_mdev(self, host_id: str, uuid: str) -> Instance | None:
        return self.session.scalars(select(Instance).where(Instance.host_id == host_id,
                                                           Instance.mdev_uuid == uuid)).first()

    def instance_by_parent(self, host_id: str, parent: str, kinds: Sequence[str]) -> Instance | None:
        return self.session.scalars(select(Instance).where(Instance.host_id == host_id, Instance.parent == parent,
                                                           Instance.kind.in_(list(kinds)))).first()

    def add_instance(self, **fields: Any) -> Instance:
        inst = Instance(**fields)
        self.session.add(inst)
        self.session.flush()
        return inst

    def delete_instance(self, inst: Instance) -> None:
        self.session.delete(inst)
        self.session.flush()

    def free_instances(self, host_id: str, kinds: Sequence[str], *, lock: bool = False,
                       extra: Any = None) -> list[Instance]:
        """Active, healthy instances with no allocation; with ``lock`` the rows are locked (PostgreSQL: SKIP
        LOCKED, so concurrent allocators take different rows instead of queueing on the same one).  Health as
        stored: ``service.health.usable`` writes due recoveries down before an attach asks."""
        q = (select(Instance).outerjoin(Allocation, Allocation.instance_id == Instance.id)
             .where(Instance.host_id == host_id, Instance.kind.in_(list(kinds)), Instance.state == ACTIVE,
                    Instance.health != UNHEALTHY, Allocation.id.is_(None)))
        if extra is not None:
            q = q.where(extra)
        q = q.order_by(Instance.gpu_id, Instance.id)
        if lock and self.backend == "postgresql":
            q = q.with_for_update(skip_locked=True, of=Instance)
        return list(self.session.scalars(q))

    def try_lock_instance(self, inst: Instance) -> bool:
        """Lock one candidate row for allocation; False when another transaction holds it (PostgreSQL
        ``FOR UPDATE SKIP LOCKED``).  Locking candidates one at a time, after filtering, keeps concurrent
        attaches from skipping every free row of the host at once.  SQLite: the write transaction already
        holds the database lock."""
        if self.backend != "postgresql":
            return True
        # lock, then make sure nobody allocated it between our unlocked read and the lock
        got = self.session.execute(select(Instance.id).where(Instance.id == inst.id)
                                   .with_for_update(skip_locked=True)).first()
        if got is None:
            return False
        taken = self.session.execute(select(Allocation.id).where(Allocation.instance_id == inst.id)).first()
        return taken is None

    # --- allocations -------------------------------------------------------------------------------------------
    def allocate(self, inst: Instance, *, vm_name: str, vm_uuid: str | None, tenant: str | None,
                 persistent: bool, consumer: str = "vm") -> Allocation:
        alloc = Allocation(instance_id=inst.id, host_id=inst.host_id, vm_name=vm_name, vm_uuid=vm_uuid,
                           tenant=tenant, persistent=persistent, consumer=consumer)
        self.session.add(alloc)
        try:
            with self.session.begin_nested():
                self.session.flush()
        except IntegrityError as exc:
            raise ConflictError(f"instance {inst.id} was allocated by someone else at the same time") from exc
        return alloc

    def allocations(self, *, host_id: str | None = None, vm_name: str | None = None,
                    tenant: str | None = None) -> list[Allocation]:
        q = select(Allocation).options(selectinload(Allocation.instance).selectinload(Instance.gpu))
        if host_id is not None:
            q = q.where(Allocation.host_id == host_id)
        if vm_name is not None:
            q = q.where(Allocation.vm_name == vm_name)
        if tenant is not None:
            q = q.where(Allocation.tenant == tenant)
        return list(self.session.scalars(q.order_by(Allocation.id)))

    def container_allocations(self, host_id: str) -> list[Allocation]:
        """This host's allocations held by containers (their devices reach them through CDI specs), with
        their instances and GPUs loaded."""
        q = (select(Allocation).options(selectinload(Allocation.instance).selectinload(Instance.gpu))
             .where(Allocation.host_id == host_id, Allocation.consumer == "container").order_by(Allocation.id))
        return list(self.session.scalars(q))

    def gpu_allocations(self, gpu_id: int) -> list[Allocation]:
        """Every allocation of an instance on one GPU (VMs' and containers')."""
        q = (select(Allocation).join(Instance, Instance.id == Allocation.instance_id)
             .where(Instance.gpu_id == gpu_id).order_by(Allocation.id))
        return list(self.session.scalars(q))

    def release(self, alloc: Allocation) -> None:
        self.session.delete(alloc)
        self.session.flush()

    # --- profiles ------------------------------------------------------------------------------------------------
    def profiles(self) -> list[Profile]:
        return list(self.session.scalars(select(Profile).order_by(Profile.name)))

    def profile(self, name: str) -> Profile | None:
        return self.session.get(Profile, name)

    def save_profile(self, name: str, *, kind: str, model: str | None, description: str | None,
                     spec: dict[str, Any], source: str, replace: bool = False) -> Profile:
        p = self.session.get(Profile, name)
        if p is not None and not replace:
            raise ConflictError(f"profile '{name}' already exists (delete it first, or use --replace)")
        if p is None:
            p = Profile(name=name)
            self.session.add(p)
        p.kind, p.model, p.description, p.spec, p.source = kind, model, description, spec, source
        p.updated_at = utcnow()
        self.session.flush()
        return p

    def delete_profile(self, name: str) -> None:
        p = self.session.get(Profile, name)
        if p is None:
            raise NotFoundError(f"no profile named '{name}'")
        self.session.delete(p)
        self.session.flush()

    def gpus_with_profile(self, name: str) -> list[Gpu]:
        return list(self.session.scalars(select(Gpu).where(Gpu.desired_profile == name)))

    # --- tenants ---------------------------------------------------------------------------------------------------
    def tenant(self, name: str) -> Tenant | None:
        return self.session.get(Tenant, name)

    def tenants(self) -> list[Tenant]:
        return list(self.session.scalars(select(Tenant).order_by(Tenant.name)))

    def set_tenant(self, name: str, **quota: Any) -> Tenant:
        t = self.session.get(Tenant, name)
        if t is None:
            t = Tenant(name=name)
            self.session.add(t)
        for k, v in quota.items():
            setattr(t, k, v)
        self.session.flush()
        return t

    def lock_tenant(self, name: str) -> None:
        """Serialise quota checks of one tenant across hosts (PostgreSQL row lock)."""
        if self.backend == "postgresql":
            self.session.execute(select(Tenant.name).where(Tenant.name == name).with_for_update())

    def tenant_usage(self, tenant: str) -> dict[str, int]:
        """Instances, GPU memory and compute slices held by a tenant across all hosts."""
        row = self.session.execute(
            select(func.count(Allocation.id), func.coalesce(func.sum(Instance.memory_mib), 0),
                   func.coalesce(func.sum(Instance.compute_slices), 0))
            .join(Instance, Instance.id == Allocation.instance_id).where(Allocation.tenant == tenant)
            .where(_not_a_backing())).one()
        return {"instances": int(row[0]), "memory_mib": int(row[1]), "compute_slices": int(row[2])}

    # --- intents (the journal of multi-step host changes) --------------------------------------------------------
    def add_intent(self, **fields: Any) -> Intent:
        it = Intent(**fields)
        self.session.add(it)
        self.session.flush()
        return it

    def intent(self, intent_id: int) -> Intent | None:
        return self.session.get(Intent, intent_id)

    def intents(self, host_id: str) -> list[Intent]:
        """Open intents of a host, oldest first (a host has a handful at most: they are deleted when done)."""
        return list(self.session.scalars(select(Intent).where(Intent.host_id == host_id).order_by(Intent.id)))

    def touch_intent(self, intent_id: int) -> None:
        """Renew an intent's lease (its owner's heartbeat during a long host operation)."""
        self.session.execute(update(Intent).where(Intent.id == intent_id).values(updated_at=utcnow()))

    def delete_intent(self, intent_id: int) -> None:
        self.session.execute(delete(Intent).where(Intent.id == intent_id))

    # --- events ------------------------------------------------------------------------------------------------------
    def event(self, action: str, *, target: str | None = None, result: str = "ok",
              detail: dict[str, Any] | None = None, host_id: str | None = None, actor: str | None = None) -> Event:
        ev = Event(at=utcnow(), host_id=host_id if host_id is not None else self.inventory.host_id,
                   actor=actor or default_actor(), action=action, target=target, result=result, detail=detail)
        self.session.add(ev)
        self.recorded_events.append(ev)
        return ev

    def prune_events(self, host_id: str, *, max_age_days: int = 0, max_rows: int = 0) -> int:
        """Delete ``host_id``'s events older than ``max_age_days`` and all but its newest ``max_rows`` (0: no
        limit); returns how many went."""
        gone = 0
        if max_age_days > 0:
            cutoff = utcnow() - dt.timedelta(days=max_age_days)
            # coalesce() keeps both databases off the host_id index, so the range on the (at) index is used: the
            # cost is the rows deleted, not the host's whole history
            gone += self.session.execute(delete(Event).where(Event.at < cutoff,
                                                             func.coalesce(Event.host_id, "") == host_id)
                                         .execution_options(synchronize_session=False)).rowcount or 0
        if max_rows > 0:
            cut = self.session.scalar(select(Event.id).where(Event.host_id == host_id)
                                      .order_by(Event.id.desc()).offset(max_rows).limit(1))
            if cut is not None:
                gone += self.session.execute(delete(Event).where(Event.host_id == host_id, Event.id <= cut)
                                             .execution_options(synchronize_session=False)).rowcount or 0
        return gone

    def events(self, *, host_id: str | None = None, limit: int = 50, since: dt.datetime | None = None) -> list[Event]:
        q = select(Event)
        if host_id is not None:
            q = q.where(Event.host_id == host_id)
        if since is not None:
            q = q.where(Event.at >= since)
        return list(self.session.scalars(q.order_by(Event.id.desc()).limit(limit)))

    # --- bulk reads (reports) -----------------------------------------------------------------------------------------
    def all_gpus(self, host_ids: Iterable[str] | None = None) -> list[Gpu]:
        q = select(Gpu)
        if host_ids is not None:
            q = q.where(Gpu.host_id.in_(list(host_ids)))
        return list(self.session.scalars(q.order_by(Gpu.host_id, Gpu.address)))

    def all_instances(self, host_ids: Iterable[str] | None = None) -> list[Instance]:
        q = select(Instance).options(selectinload(Instance.allocation))
        if host_ids is not None:
            q = q.where(Instance.host_id.in_(list(host_ids)))
        return list(self.session.scalars(q.order_by(Instance.host_id, Instance.gpu_id, Instance.id)))

    # --- host stacks (revision 0006) ---------------------------------------------------------------------------
    def record_host_stack(self, host_id: str, stack: Any) -> None:
        """Replace the host's stack (a :class:`gpuvirt.model.preflight.HostStack`) and stamp it now.  The host row
        must exist (``touch_host`` first); text longer than a column is cut, never refused."""
        row = self.session.get(HostStackRow, host_id)
        if row is None:
            row = HostStackRow(host_id=host_id)
            self.session.add(row)

        def cut(value: str | None, n: int) -> str | None:
            return None if value is None else str(value)[:n]

        row.driver, row.os, row.kernel = cut(stack.driver, 64), cut(stack.os, 64), cut(stack.kernel, 128)
        row.qemu, row.libvirt = cut(stack.qemu, 32), cut(stack.libvirt, 32)
        row.vgpu_min, row.vgpu_max = (int(stack.vgpu_range[0]), int(stack.vgpu_range[1])) if stack.vgpu_range \
            else (None, None)
        row.recorded_at = utcnow()

    def host_stacks(self, host_ids: Iterable[str] | None = None) -> dict[str, Any]:
        """{host id: HostStack} for every host with a recorded stack (or those of ``host_ids``)."""
        from gpuvirt.model.preflight import HostStack

        q = select(HostStackRow)
        if host_ids is not None:
            q = q.where(HostStackRow.host_id.in_(list(host_ids)))
        out = {}
        for r in self.session.scalars(q.order_by(HostStackRow.host_id)):
            rng = (int(r.vgpu_min), int(r.vgpu_max)) if r.vgpu_min is not None and r.vgpu_max is not None else None
            out[r.host_id] = HostStack(driver=r.driver, os=r.os, kernel=r.kernel, qemu=r.qemu, libvirt=r.libvirt,
                                       vgpu_range=rng)
        return out

    def host_stack_recorded_at(self, host_id: str) -> dt.datetime | None:
        row = self.session.get(HostStackRow, host_id)
        return None if row is None else row.recorded_at

    def purge_host(self, host_id: str) -> None:
        self.session.execute(delete(Host).where(Host.id == host_id))

    # --- capacity reports: column-only bulk reads ----------------------------------------------------------------
    # A cluster report reads every host's rows at once (1,000 hosts x 8 GPUs x 7 instances is an ordinary
    # size), so these return plain row tuples of exactly the columns the report uses, in one query each,
    # instead of ORM objects loaded and related row by row.  Column order is part of each method's contract.
    def report_hosts(self, host_ids: Iterable[str] | None = None) -> list[Any]:
        """(id, hostname, last_seen_at, simulated) per host, by id."""
        q = select(Host.id, Host.hostname, Host.last_seen_at, Host.simulated)
        if host_ids is not None:
            q = q.where(Host.id.in_(list(host_ids)))
        # a value that does not read as a timestamp ('garbage' in a hand-edited SQLite inventory) is named by
        # the unit's error translation (store.unreadable_value), as anywhere else
        return list(self.session.execute(q.order_by(Host.id)))

    def _fetch_plain(self, stmt: Any) -> list[tuple]:
        """Run a core SELECT on this unit's connection and return the DBAPI's own tuples.

        Result rows are built by the driver in C; SQLAlchemy's Row objects and result processing would
        double the cost of reading ~50,000 rows.  Only columns the drivers return as plain Python values
        (integers, strings, None; SQLite booleans come back as 0/1) may be selected this way.  The bound
        values (host ids) are rendered as SQL literals by SQLAlchemy's own quoting.
        """
        conn = self.session.connection()
        sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        cur = conn.connection.dbapi_connection.cursor()
        try:
            cur.execute(sql)
            return cur.fetchall()
        finally:
            cur.close()

    def report_gpus(self, host_ids: Iterable[str] | None = None) -> list[tuple]:
        """(id, host_id, address, nvml_index, model, name, vendor, memory_mib, mig_capable, mig_current,
        mig_pending, vgpu_interface, sriov_total_vfs, sriov_num_vfs) of every present GPU, by host and
        NVML index.  Booleans may come back as 0/1."""
        q = select(Gpu.id, Gpu.host_id, Gpu.address, Gpu.nvml_index, Gpu.model, Gpu.name, Gpu.vendor,
                   Gpu.memory_mib, Gpu.mig_capable, Gpu.mig_current, Gpu.mig_pending, Gpu.vgpu_interface,
                   Gpu.sriov_total_vfs, Gpu.sriov_num_vfs).where(Gpu.present.is_(True))
        if host_ids is not None:
            q = q.where(Gpu.host_id.in_(list(host_ids)))
        return self._fetch_plain(q.order_by(Gpu.host_id, Gpu.nvml_index, Gpu.address))

    def report_instances(self, host_ids: Iterable[str] | None = None, *, keys: bool = False) -> list[tuple]:
        """(id, gpu_id, kind, state, profile_id, placement_start, type_id, memory_mib, compute_slices,
        backing_instance_id, vm_name, tenant, vm_state) of every instance with its allocation (the last three
        None when free); with ``keys`` also (parent, mdev_uuid, type_name), which match rows with what a
        host shows; last of all the allocation's consumer (vm | container).  By id (SQLite reads them in rowid
        order anyway)."""
        cols = [Instance.id, Instance.gpu_id, Instance.kind, Instance.state, Instance.profile_id,
                Instance.placement_start, Instance.type_id, Instance.memory_mib, Instance.compute_slices,
                Instance.backing_instance_id, Allocation.vm_name, Allocation.tenant, Allocation.vm_state]
        if keys:
            cols += [Instance.parent, Instance.mdev_uuid, Instance.type_name]
        cols.append(Allocation.consumer)        # always last: vm | container, None when free (revision 0005)
        q = select(*cols).outerjoin(Allocation, Allocation.instance_id == Instance.id)
        if host_ids is not None:
            q = q.where(Instance.host_id.in_(list(host_ids)))
        return self._fetch_plain(q.order_by(Instance.id))

    def tenant_usages(self) -> dict[str | None, dict[str, int]]:
        """What every tenant holds across all hosts (the figures quotas are checked against), by tenant;
        allocations without a tenant are listed under None."""
        rows = self.session.execute(
            select(Allocation.tenant, func.count(Allocation.id), func.coalesce(func.sum(Instance.memory_mib), 0),
                   func.coalesce(func.sum(Instance.compute_slices), 0))
            .join(Instance, Instance.id == Allocation.instance_id).where(_not_a_backing())
            .group_by(Allocation.tenant))
        return {t: {"instances": int(n), "memory_mib": int(m), "compute_slices": int(c)} for t, n, m, c in rows}

    def tenant_allocations(self, tenant: str) -> list[Any]:
        """(host_id, gpu address, instance id, kind, profile_name, type_name, memory_mib, compute_slices,
        vm_name, vm_state, created_at) of one tenant's allocations on every host."""
        q = (select(Allocation.host_id, Gpu.address, Instance.id, Instance.kind, Instance.profile_name,
                    Instance.type_name, Instance.memory_mib, Instance.compute_slices, Allocation.vm_name,
                    Allocation.vm_state, Allocation.created_at)
             .join(Instance, Instance.id == Allocation.instance_id).join(Gpu, Gpu.id == Instance.gpu_id)
             .where(Allocation.tenant == tenant)
             .order_by(Allocation.host_id, Gpu.address, Instance.id))
        return list(self.session.execute(q))

    # --- health (revision 0004; service.health decides, these only read and write rows) -----------------------
    def mig_instances_by_gi(self, gpu_id: int, gi_id: int) -> list[Instance]:
        """This GPU's MIG rows that name GPU instance ``gi_id`` (normally one; a row half-way through a
        re-create may share the id with the one it replaces), allocation loaded."""
        return list(self.session.scalars(
            select(Instance).options(selectinload(Instance.allocation))
            .where(Instance.gpu_id == gpu_id, Instance.kind == MIG, Instance.gi_id == gi_id)
            .order_by(Instance.id)))

    def vgpus_backed_by(self, instance_id: int) -> list[Instance]:
        """vGPU rows whose GPU instance is ``instance_id`` (a MIG-backed vGPU), allocation loaded."""
        return list(self.session.scalars(
            select(Instance).options(selectinload(Instance.allocation))
            .where(Instance.backing_instance_id == instance_id).order_by(Instance.id)))

    def unhealthy(self, host_id: str) -> tuple[list[Gpu], list[Instance]]:
        """GPUs and instances of a host whose stored health is unhealthy (whether still in force is the
        health service's business: a quiet period may have passed since)."""
        gpus = list(self.session.scalars(select(Gpu).where(Gpu.host_id == host_id, Gpu.health == UNHEALTHY)
                                         .order_by(Gpu.address)))
        insts = list(self.session.scalars(
            select(Instance).options(selectinload(Instance.allocation))
            .where(Instance.host_id == host_id, Instance.health == UNHEALTHY).order_by(Instance.id)))
        return gpus, insts

    def report_health(self, host_ids: Iterable[str] | None = None) -> list[tuple]:
        """("gpu" | "instance", id, health_needs_reset, health_since, health_last_at, health_reason) of every
        unhealthy GPU and instance: a handful of rows on a healthy cluster, so reports read them apart from the
        bulk queries."""
        out: list[tuple] = []
        for kind, table in (("gpu", Gpu), ("instance", Instance)):
            q = select(table.id, table.health_needs_reset, table.health_since, table.health_last_at,
                       table.health_reason).where(table.health == UNHEALTHY)
            if host_ids is not None:
                q = q.where(table.host_id.in_(list(host_ids)))
            out.extend((kind, i, bool(r), since, at, why) for i, r, since, at, why in self.session.execute(q))
        return out

    def add_health_event(self, **fields: Any) -> HealthEvent:
        ev = HealthEvent(**fields)
        if ev.at is None:
            ev.at = utcnow()
        self.session.add(ev)
        return ev

    def health_events(self, *, host_id: str | None = None, limit: int = 50, since: dt.datetime | None = None,
                      gpu_address: str | None = None) -> list[HealthEvent]:
        """Newest first."""
        q = select(HealthEvent)
        if host_id is not None:
            q = q.where(HealthEvent.host_id == host_id)
        if since is not None:
            q = q.where(HealthEvent.at >= since)
        if gpu_address is not None:
            q = q.where(HealthEvent.gpu_address == gpu_address)
        return list(self.session.scalars(q.order_by(HealthEvent.id.desc()).limit(limit)))

    def prune_health_events(self, host_id: str, *, before: dt.datetime, keep: int) -> int:
        """Delete a host's health events older than ``before`` and all but its newest ``keep``; returns the
        number deleted."""
        n = self.session.execute(delete(HealthEvent).where(HealthEvent.host_id == host_id,
                                                           HealthEvent.at < before)).rowcount or 0
        cutoff = self.session.execute(
            select(HealthEvent.id).where(HealthEvent.host_id == host_id).order_by(HealthEvent.id.desc())
            .offset(keep).limit(1)).scalar()
        if cutoff is not None:
            n += self.session.execute(delete(HealthEvent).where(HealthEvent.host_id == host_id,
                                                                HealthEvent.id <= cutoff)).rowcount or 0
        return n


def _not_a_backing() -> Any:
    """The GPU instance under an allocated MIG-backed vGPU is allocated to the same VM (so that apply and
    reconcile treat it as held), but the VM holds one device: the vGPU row already carries the instance's
    compute slices, so quota and tenant figures count the vGPU only.  An uncorrelated IN list: SQLite
    would run a correlated EXISTS once per row, without an index on backing_instance_id."""
    vgpu = aliased(Instance)
    return Instance.id.not_in(
        select(vgpu.backing_instance_id).join(Allocation, Allocation.instance_id == vgpu.id)
        .where(vgpu.backing_instance_id.is_not(None)))


__all__ = ["Unit", "default_actor", "and_", "or_"]
