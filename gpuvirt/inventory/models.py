"""Inventory schema (SQLAlchemy 2 ORM).  Alembic revisions in the top-level ``migrations/`` create it.

Every host-owned row carries ``host_id``: many hosts may share one PostgreSQL inventory, and a host only
ever changes its own rows.  Instances record what gpuvirt created (or adopted) with their lifecycle state so
that a crash half-way through an apply can be finished or undone by ``reconcile``; allocations tie an
instance to a VM and a tenant, with a unique constraint so an instance is never handed out twice.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# the stored values (kinds, states, consumers, modes) live in kinds.py, which the VM-start path imports without
# SQLAlchemy; re-exported here, where most code looks for them
from gpuvirt.inventory.kinds import (  # noqa: F401
    ACTIVE, CONSUMER_CONTAINER, CONSUMER_VM, CONSUMERS, CREATING, DESTROYING, FAILED, GPU, HEALTHY, KINDS, MDEV, MIG,
    MODE_CONTAINERS, MODE_VM, MODES, STATES, UNHEALTHY, VF, VFIO_VGPU, instance_label, utcnow)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UnreadableValue(ValueError):
    """A stored value that does not read back as what gpuvirt writes there (``store.unreadable_value`` names
    its table, column and row)."""


class JsonOf(TypeDecorator):
    """JSON that must read back as the shape gpuvirt writes: a list (of ``items``) or an object.  JSON of
    another shape (``null``, a number, ``[1]`` for a list of steps, written by hand) is valid to SQLite and
    PostgreSQL alike, and used to surface as a TypeError or AttributeError deep inside whichever command read
    the row; it is now an error of reading the row, like JSON that does not parse."""

    impl = JSON
    cache_ok = True

    def __init__(self, shape: type, items: type | None = None, optional: bool = False) -> None:
        super().__init__()
        self.shape, self.items, self.optional = shape, items, optional

    @property
    def describe(self) -> str:
        what = ("a JSON list" + (" of objects" if self.items is dict else " of strings" if self.items is str else "")
                if self.shape is list else "a JSON object")
        return what + (" or null" if self.optional else "")

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value is None and self.optional:
            return value
        if not isinstance(value, self.shape) or (self.items is not None
                                                 and not all(isinstance(v, self.items) for v in value)):
            raise UnreadableValue(f"not {self.describe}")
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[str] = mapped_column(String(253), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(253))
    root: Mapped[str] = mapped_column(Text, default="/")
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    boot_marker: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)

    gpus: Mapped[list["Gpu"]] = relationship(back_populates="host", cascade="all, delete-orphan")


class Gpu(Base):
    """A physical device gpuvirt can partition: an NVIDIA/AMD/Intel GPU or a virtual mdev parent."""

    __tablename__ = "gpus"
    __table_args__ = (UniqueConstraint("host_id", "address", name="uq_gpus_host_address"),
                      Index("ix_gpus_health", "health"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    address: Mapped[str] = mapped_column(String(64))           # PCI address, or the parent name ("mtty")
    uuid: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    nvml_index: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    model: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)   # catalog id
    name: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    vendor: Mapped[str] = mapped_column(String(16), default="nvidia")
    memory_mib: Mapped[int] = mapped_column(Integer, default=0)
    mig_capable: Mapped[bool] = mapped_column(Boolean, default=False)
    mig_current: Mapped[Optional[bool]] = mapped_column(Boolean, nullable=True)
    mig_pending: Mapped[Optional[bool]] = mapped_column(Boolean, nullable=True)
    vgpu_interface: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)
    sriov_total_vfs: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    sriov_num_vfs: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    present: Mapped[bool] = mapped_column(Boolean, default=True)
    desired_profile: Mapped[Optional[str]] = mapped_column(
        ForeignKey("profiles.name", ondelete="SET NULL", onupdate="CASCADE"), nullable=True)
    profile_state: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)  # applied|pending-reset|failed
    # what the GPU serves: vm | containers, recorded by apply from the profile's mode; None = no profile applied
    # (a GPU without one takes both kinds of attach).  Added in revision 0005.
    mode: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # health (revision 0004): see service.health; 'unhealthy' counts only while it is in force there
    health: Mapped[str] = mapped_column(String(16), default=HEALTHY, server_default=text("'healthy'"))
    health_since: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    health_last_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    health_reason: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    health_needs_reset: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))

    host: Mapped[Host] = relationship(back_populates="gpus")
    instances: Mapped[list["Instance"]] = relationship(back_populates="gpu", cascade="all, delete-orphan")


class Instance(Base):
    """Something gpuvirt created or adopted on a GPU and may hand to a VM."""

    __tablename__ = "instances"
    __table_args__ = (
        Index("ix_instances_host_kind_state", "host_id", "kind", "state"),
        UniqueConstraint("host_id", "mdev_uuid", name="uq_instances_host_mdev_uuid"),
        Index("ix_instances_health", "health"),      # reports read the few unhealthy rows of a cluster
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    gpu_id: Mapped[int] = mapped_column(ForeignKey("gpus.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=CREATING)
    origin: Mapped[str] = mapped_column(String(16), default="profile")   # profile | attach | adopted
    persistent: Mapped[bool] = mapped_column(Boolean, default=True)
    # MIG
    profile_id: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)      # GI profile info.id
    profile_name: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    placement_start: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    placement_size: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    gi_id: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    ci_id: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    mig_uuid: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    compute_slices: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    # mdev / vGPU
    mdev_uuid: Mapped[Optional[str]] = mapped_column(String(36), nullable=True)
    parent: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)        # mdev parent or VF address
    type_id: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)       # nvidia-468 | 1145 | i915-...
    type_name: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)    # A100-4C
    memory_mib: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    backing_instance_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("instances.id", ondelete="SET NULL"), nullable=True)            # GI under a MIG-backed vGPU
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    # health of this instance alone (a MIG GPU instance an XID named by its GI id); revision 0004
    health: Mapped[str] = mapped_column(String(16), default=HEALTHY, server_default=text("'healthy'"))
    health_since: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    health_last_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    health_reason: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    health_needs_reset: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))

    gpu: Mapped[Gpu] = relationship(back_populates="instances")
    allocation: Mapped[Optional["Allocation"]] = relationship(back_populates="instance", uselist=False,
                                                              cascade="all, delete-orphan")

    @property
    def label(self) -> str:
        return instance_label(self.kind, profile_name=self.profile_name, placement_start=self.placement_start,
                              placement_size=self.placement_size, type_name=self.type_name, type_id=self.type_id,
                              mdev_uuid=self.mdev_uuid, parent=self.parent)


class Profile(Base):
    __tablename__ = "profiles"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))                 # mig | vgpu | sriov | mixed
    model: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    description: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JsonOf(dict))
    source: Mapped[str] = mapped_column(String(255), default="user")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Allocation(Base):
    __tablename__ = "allocations"
    __table_args__ = (UniqueConstraint("instance_id", name="uq_allocations_instance_id"),
                      Index("ix_allocations_host_vm", "host_id", "vm_name"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))
    vm_name: Mapped[str] = mapped_column(String(255))
    vm_uuid: Mapped[Optional[str]] = mapped_column(String(36), nullable=True)
    tenant: Mapped[Optional[str]] = mapped_column(String(128), nullable=True, index=True)
    persistent: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # set by the libvirt hook: running between prepare and release (added in revision 0002)
    vm_state: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)
    vm_state_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    # who holds it: a VM (vm_name is the libvirt domain) or a container (vm_name is the consumer's name, the
    # device reaches it through a CDI spec).  Added in revision 0005.
    consumer: Mapped[str] = mapped_column(String(16), default=CONSUMER_VM, server_default=CONSUMER_VM)

    instance: Mapped[Instance] = relationship(back_populates="allocation")


class Tenant(Base):
    __tablename__ = "tenants"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    max_instances: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    max_memory_mib: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    max_compute_slices: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Intent(Base):
    """A multi-step change to a host, recorded before its first host operation (the intent journal).

    ``steps`` is the ordered list of host operations, each ``{"op", "gpu", "params", "state"}`` with state
    ``pending`` / ``done`` / ``undone`` / ``skipped``; a step is marked in the same transaction that records
    its effect on the inventory.  The row is deleted in the transaction that completes or rolls back the
    change, so a row that exists is a change still in progress or left unfinished by a crash
    (``gpuvirt.service.intent`` resolves those).  Added in revision 0003.
    """

    __tablename__ = "intents"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))                  # apply | attach | detach | reconcile | ...
    state: Mapped[str] = mapped_column(String(24), default="running")
    recovery: Mapped[str] = mapped_column(String(16), default="forward")   # direction tried first after a crash
    gpus: Mapped[list[Any]] = mapped_column(JsonOf(list, str), default=list)    # addresses of the GPUs it changes
    target: Mapped[dict[str, Any]] = mapped_column(JsonOf(dict), default=dict)
    before: Mapped[dict[str, Any]] = mapped_column(JsonOf(dict), default=dict)
    steps: Mapped[list[Any]] = mapped_column(JsonOf(list, dict), default=list)
    pid: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    # "<boot id>:<pid>:<process start time>": tells a live owner from a dead one whose pid was reused
    owner: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    actor: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    host_id: Mapped[Optional[str]] = mapped_column(String(253), nullable=True, index=True)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    result: Mapped[str] = mapped_column(String(16), default="ok")
    detail: Mapped[Optional[dict[str, Any]]] = mapped_column(JsonOf(dict, optional=True), nullable=True)


class HealthEvent(Base):
    """One GPU health event (an NVML XID, a reset, a recovery) with what it was attributed to.

    The rows are a bounded history (``service.health.prune``: by age and count per host), not an audit log:
    the labels (GPU address, VM, tenant) are copied so that a row still reads right after the instance or
    allocation it named is gone.
    """

    __tablename__ = "health_events"
    __table_args__ = (Index("ix_health_events_host_at", "host_id", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))                  # xid | reset | recovered | cleared | lost
    gpu_id: Mapped[Optional[int]] = mapped_column(ForeignKey("gpus.id", ondelete="SET NULL"), nullable=True)
    gpu_address: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    instance_id: Mapped[Optional[int]] = mapped_column(ForeignKey("instances.id", ondelete="SET NULL"),
                                                       nullable=True)
    xid: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    gi_id: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    ci_id: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    severity: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)   # non-fatal | fatal | reset
    scope: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)      # gpu | instance | foreign
    vm_name: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    vm_uuid: Mapped[Optional[str]] = mapped_column(String(36), nullable=True)
    tenant: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    detail: Mapped[Optional[dict[str, Any]]] = mapped_column(JsonOf(dict, optional=True), nullable=True)


class HostStackRow(Base):
    """What a host runs, as far as moving VMs cares (revision 0006; :class:`gpuvirt.model.preflight.HostStack`).

    One row per host, replaced each time the host is recorded with NVML available, so a shared inventory lets
    one host judge a move to another without asking it (the service layer checks again on both hosts right
    before a move)."""

    __tablename__ = "host_stack"
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True)
    driver: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    os: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    kernel: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    qemu: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)
    libvirt: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)
    vgpu_min: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    vgpu_max: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
