"""Queries and changes of the inventory, as a unit of work over one database transaction.

Services never write SQL: they call these methods inside ``with inventory.unit(write=True) as uow:``; the
transaction commits when the block ends and rolls back when it raises.  Returned ORM objects stay usable
after the block (``expire_on_commit=False``) as plain records.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
from typing import Any, Iterable, Sequence

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from gpuvirt.errors import ConflictError, NotFoundError
from gpuvirt.inventory.models import (
    ACTIVE,
    Allocation,
    Event,
    Gpu,
    Host,
    Instance,
    Profile,
    Tenant,
    utcnow,
)


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - hooks may run without a passwd entry
        user = str(os.getuid())
    return os.environ.get("GPUVIRT_ACTOR") or f"{user}@{socket.gethostname()}"


class Unit:
    def __init__(self, inventory: Any, session: Session) -> None:
        self.inventory = inventory
        self.session = session
        self.backend = inventory.backend

    # --- hosts ----------------------------------------------------------------------------------------------
    def host(self, host_id: str) -> Host | None:
        return self.session.get(Host, host_id)

    def touch_host(self, host_id: str, *, hostname: str | None = None, root: str = "/",
                   simulated: bool = False, boot_marker: str | None = None) -> Host:
        h = self.session.get(Host, host_id)
        now = utcnow()
        if h is None:
            h = Host(id=host_id, hostname=hostname or socket.gethostname(), root=root, simulated=simulated,
                     created_at=now, last_seen_at=now, boot_marker=boot_marker)
            self.session.add(h)
            try:
                with self.session.begin_nested():
                    self.session.flush()
            except IntegrityError:
                # another process registered the host at the same moment
                h = self.session.get(Host, host_id, populate_existing=True)
                assert h is not None
        h.last_seen_at = now
        if hostname:
            h.hostname = hostname
        h.root = root
        h.simulated = simulated
        if boot_marker is not None:
            h.boot_marker = boot_marker
        return h

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
            g = Gpu(host_id=host_id, address=address)
            self.session.add(g)
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
        """Active instances with no allocation; with ``lock`` the rows are locked (PostgreSQL: SKIP LOCKED, so
        concurrent allocators take different rows instead of queueing on the same one)."""
        q = (select(Instance).outerjoin(Allocation, Allocation.instance_id == Instance.id)
             .where(Instance.host_id == host_id, Instance.kind.in_(list(kinds)), Instance.state == ACTIVE,
                    Allocation.id.is_(None)))
        if extra is not None:
            q = q.where(extra)
        q = q.order_by(Instance.gpu_id, Instance.id)
        if lock and self.backend == "postgresql":
            q = q.with_for_update(skip_locked=True, of=Instance)
        return list(self.session.scalars(q))

    # --- allocations -------------------------------------------------------------------------------------------
    def allocate(self, inst: Instance, *, vm_name: str, vm_uuid: str | None, tenant: str | None,
                 persistent: bool) -> Allocation:
        alloc = Allocation(instance_id=inst.id, host_id=inst.host_id, vm_name=vm_name, vm_uuid=vm_uuid,
                           tenant=tenant, persistent=persistent)
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
            .join(Instance, Instance.id == Allocation.instance_id).where(Allocation.tenant == tenant)).one()
        return {"instances": int(row[0]), "memory_mib": int(row[1]), "compute_slices": int(row[2])}

    # --- events ------------------------------------------------------------------------------------------------------
    def event(self, action: str, *, target: str | None = None, result: str = "ok",
              detail: dict[str, Any] | None = None, host_id: str | None = None, actor: str | None = None) -> Event:
        ev = Event(at=utcnow(), host_id=host_id if host_id is not None else self.inventory.host_id,
                   actor=actor or default_actor(), action=action, target=target, result=result, detail=detail)
        self.session.add(ev)
        return ev

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

    def purge_host(self, host_id: str) -> None:
        self.session.execute(delete(Host).where(Host.id == host_id))


__all__ = ["Unit", "default_actor", "and_", "or_"]
