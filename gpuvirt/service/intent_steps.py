"""The step kinds of the intent journal (:mod:`gpuvirt.service.intent`): what one step does on the host in
each direction, how it is described, and what it records in the inventory.

A step is a plain dict (``op``, ``gpu``, ``present``, ``params``, ``state``) so that it can be stored in the
intent row as JSON and read back by another process after a crash; the builders below are the only places
that shape them.  Every kind is an *ensure*: it looks at the host first and does nothing when the object is
already in the wanted state, which is what makes re-running a step after a kill safe.
"""

from __future__ import annotations

import abc
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import ConflictError, ResetRequiredError
from gpuvirt.inventory.kinds import ACTIVE, MDEV, MIG, VF, VFIO_VGPU

PENDING, DONE, UNDONE, SKIPPED = "pending", "done", "undone", "skipped"


# === steps =======================================================================================================
def mig_step(gpu: str, gpu_id: int | None, index: int, profile_id: int, start: int, size: int | None, *,
             present: bool, fields: dict[str, Any] | None, alloc: dict[str, Any] | None = None,
             label: str | None = None, needs_mig: bool = False) -> dict[str, Any]:
    """A MIG GPU instance at an explicit placement together with its full-size compute instance."""
    return _step("mig", gpu, present, gpu_id=gpu_id, index=index, profile_id=profile_id, start=start, size=size,
                 fields=fields, alloc=alloc, label=label, needs_mig=needs_mig or present)


def mdev_step(gpu: str, gpu_id: int | None, parent: str | None, type_id: str, uuid: str, *, present: bool,
              fields: dict[str, Any] | None, alloc: dict[str, Any] | None = None,
              backing: tuple[int, int] | None = None, label: str | None = None,
              needs_mig: bool = False) -> dict[str, Any]:
    """A mediated device.  ``parent`` None: the next free VF of the GPU, chosen right before it is created."""
    return _step("mdev", gpu, present, gpu_id=gpu_id, parent=parent, type_id=type_id, uuid=uuid, fields=fields,
                 alloc=alloc, backing=list(backing) if backing else None, label=label, needs_mig=needs_mig)


def vgpu_step(gpu: str, gpu_id: int | None, vf: str | None, type_id: int, *, present: bool,
              fields: dict[str, Any] | None, alloc: dict[str, Any] | None = None,
              backing: tuple[int, int] | None = None, label: str | None = None,
              needs_mig: bool = False) -> dict[str, Any]:
    """A vGPU type on a VF (vendor-specific VFIO).  ``vf`` None: the next free VF, chosen right before."""
    return _step("vgpu", gpu, present, gpu_id=gpu_id, vf=vf, type_id=int(type_id), fields=fields, alloc=alloc,
                 backing=list(backing) if backing else None, label=label, needs_mig=needs_mig)


def vfs_step(gpu: str, gpu_id: int | None, count: int, *, present: bool, whole: bool = False,
             snaps: list[dict[str, Any]] | None = None, memory_mib: int | None = None) -> dict[str, Any]:
    """``count`` SR-IOV VFs enabled (present) or none (absent).  ``whole``: the VFs themselves are the
    allocatable instances (one inventory row each; ``snaps`` brings back rows and allocations on undo)."""
    return _step("vfs", gpu, present, gpu_id=gpu_id, count=count, whole=whole, snaps=snaps or [],
                 memory_mib=memory_mib)


def mig_mode_step(gpu: str, index: int, enable: bool, *, was_current: bool, was_pending: bool,
                  allow_reset: bool) -> dict[str, Any]:
    return _step("mig-mode", gpu, True, index=index, enable=enable, was_current=was_current,
                 was_pending=was_pending, allow_reset=allow_reset)


def vgpu_scheduler_step(gpu: str, index: int, policy: str, timeslice_us: int | None, *, was_policy: str | None,
                        was_timeslice_us: int | None, needs_mig: bool = False) -> dict[str, Any]:
    """The GPU's vGPU scheduler policy (and time slice) set; back: the policy it had.  NVML refuses either
    while a vGPU exists on the GPU, so apply orders it before its vGPUs are created (and a rollback after
    they are removed)."""
    return _step("vgpu-scheduler", gpu, True, index=index, policy=policy, timeslice_us=timeslice_us,
                 was_policy=was_policy, was_timeslice_us=was_timeslice_us, needs_mig=needs_mig)


def record_vfs_step(gpu: str, gpu_id: int, memory_mib: int | None, existing: list[str]) -> dict[str, Any]:
    """Inventory only: every enabled VF of the GPU becomes an allocatable whole-VF instance."""
    return _step("record-vfs", gpu, True, gpu_id=gpu_id, memory_mib=memory_mib, existing=existing)


def allocate_step(gpu: str, instance_id: int, alloc: dict[str, Any]) -> dict[str, Any]:
    """Inventory only: an existing instance allocated to a VM (undone by releasing it)."""
    return _step("allocate", gpu, True, instance_id=instance_id, alloc=alloc)


def release_step(gpu: str, instance_id: int, alloc: dict[str, Any],
                 key: dict[str, Any] | None = None) -> dict[str, Any]:
    """Inventory only: a VM's allocation released (undone by allocating it again).  ``key``: what the instance
    is (:func:`instance_key`; read before the release when not given), to find it again under a new row id."""
    return _step("release", gpu, True, instance_id=instance_id, alloc=alloc, key=key)


def domain_xml_step(gpu: str, path: str, hostdev_xml: str, *, uuid: str | None, address: str | None,
                    present: bool) -> dict[str, Any]:
    """A ``<hostdev>`` in a domain XML file (attach --domain-xml / detach --domain-xml)."""
    return _step("domain-xml", gpu, present, path=path, xml=hostdev_xml, uuid=uuid, address=address)


def whole_gpu_step(gpu: str, gpu_id: int, fields: dict[str, Any], alloc: dict[str, Any] | None, *,
                   present: bool) -> dict[str, Any]:
    """Inventory only: the row that stands for a whole GPU handed to a container, with its allocation."""
    return _step("whole-gpu", gpu, present, gpu_id=gpu_id, fields=fields, alloc=alloc)


def cdi_step(gpu: str, path: str, text: str, *, name: str, present: bool) -> dict[str, Any]:
    """A CDI spec file gpuvirt owns: present with exactly ``text``, or absent (docs/containers.md)."""
    return _step("cdi", gpu, present, path=path, text=text, name=name)


def _step(op: str, gpu: str, present: bool, **params: Any) -> dict[str, Any]:
    return {"op": op, "gpu": gpu, "present": present, "params": params, "state": PENDING}


# --- what each step does ------------------------------------------------------------------------------------------
class _Op(abc.ABC):
    """One step kind: host effect in both directions (idempotent), and its inventory records."""

    def __init__(self, ctx: Context, step: dict[str, Any]) -> None:
        self.ctx = ctx
        self.step = step
        self.p = step["params"]

    # deferred choices: fill params right before the forward host operation (persisted by the caller)
    def resolve(self) -> bool:
        return False

    @abc.abstractmethod
    def describe(self, forward: bool = True) -> str:
        """What the step does in that direction, for messages and events."""

    @abc.abstractmethod
    def ensure(self, present: bool) -> dict[str, Any]:
        """Make the object present/absent on the host; returns host facts for the record."""

    @abc.abstractmethod
    def holds(self, view: Any, present: bool) -> bool:
        """Is the object present/absent in ``view`` (a HostView)?"""

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        """Inventory after the object became present/absent."""

    # forward = the wanted state, backward = the state before
    def forward(self) -> dict[str, Any]:
        return self.ensure(self.step["present"])

    def backward(self) -> dict[str, Any]:
        return self.ensure(not self.step["present"])


def _gpu_view(view: Any, address: str) -> Any:
    return view.by_address(address) if view is not None else None


def _find_row(uow: Any, host_id: str, *, gpu_id: int | None, kind: str, **key: Any) -> Any:
    for r in uow.instances(host_id, gpu_id=gpu_id, kinds=[kind]):
        if all(getattr(r, k) == v for k, v in key.items()):
            return r
    return None


def _allocate(uow: Any, row: Any, alloc: dict[str, Any] | None) -> None:
    """Give ``row`` to the VM of ``alloc`` (quota checked when asked), unless it already holds it."""
    if not alloc:
        return
    a = row.allocation
    if a is not None:
        if a.vm_name == alloc["vm_name"]:
            return
        raise ConflictError(f"{row.label} is allocated to VM {a.vm_name}, not {alloc['vm_name']}")
    if alloc.get("check_quota") and alloc.get("tenant"):
        from gpuvirt.service.attach import _quota_check

        _quota_check(uow, alloc["tenant"], [row])
    uow.allocate(row, vm_name=alloc["vm_name"], vm_uuid=alloc.get("vm_uuid"), tenant=alloc.get("tenant"),
                 persistent=bool(alloc.get("persistent", True)), consumer=alloc.get("consumer") or "vm")
    if alloc.get("event"):
        uow.event("attach", target=alloc["vm_name"], detail={"instance": row.id, "label": row.label,
                                                               "tenant": alloc.get("tenant"), "created": True})


def _upsert_row(uow: Any, ctx: Context, existing: Any, gpu_id: int, fields: dict[str, Any],
                facts: dict[str, Any]) -> Any:
    row = existing
    if row is None:
        row = uow.add_instance(host_id=ctx.settings.host_id, gpu_id=gpu_id, state=ACTIVE,
                               **{k: v for k, v in fields.items() if k not in ("gpu_id", "allocation")})
    for k, v in facts.items():
        setattr(row, k, v)
    row.state = ACTIVE
    row.error = None
    return row


class MigOp(_Op):
    def _label(self) -> str:
        return self.p.get("label") or f"GPU instance {self._name()} at {self.p['start']}"

    def _name(self) -> str:
        f = self.p.get("fields") or {}
        return f.get("profile_name") or str(self.p["profile_id"])

    def describe(self, forward: bool = True) -> str:
        make = self.step["present"] == forward
        where = f"{self.p['start']}" + (f":{self.p['size']}" if self.p.get("size") else "")
        return (f"create GPU instance {self._name()} at {where} (+ full compute instance)" if make else
                f"destroy GPU instance {self._name()} at {where}")

    def ensure(self, present: bool) -> dict[str, Any]:
        from gpuvirt.service.instances import ensure_mig, remove_mig

        if present:
            return ensure_mig(self.ctx, self.p["index"], self.p["profile_id"], self.p["start"])
        remove_mig(self.ctx, self.p["index"], self.p["profile_id"], self.p["start"])
        return {}

    def holds(self, view: Any, present: bool) -> bool:
        g = _gpu_view(view, self.step["gpu"])
        gi = None
        if g is not None and g.mig_current:
            gi = next((x for x in g.gpu_instances if x["profile_id"] == self.p["profile_id"]
                       and x["placement"]["start"] == self.p["start"]), None)
        if present:
            return gi is not None and bool(gi["compute_instances"])
        return gi is None

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        gpu_id = self.p.get("gpu_id")
        if gpu_id is None:
            return
        row = _find_row(uow, self.ctx.settings.host_id, gpu_id=gpu_id, kind=MIG, profile_id=self.p["profile_id"],
                        placement_start=self.p["start"])
        fields = self.p.get("fields")
        if present:
            if fields is None and row is None:
                return              # a foreign instance brought back: it had no row before either
            if not facts:
                facts = _mig_facts(self.ctx, self.p["index"], self.p["profile_id"], self.p["start"])
            row = _upsert_row(uow, self.ctx, row, gpu_id, fields or {}, facts)
            _allocate(uow, row, self.p.get("alloc"))
        elif row is not None:
            uow.delete_instance(row)


def _mig_facts(ctx: Context, index: int, profile_id: int, start: int) -> dict[str, Any]:
    from gpuvirt.service.instances import find_gi

    gi = find_gi(ctx, index, profile_id, start)
    if gi is None:
        return {}
    ci = gi.compute_instances[0] if gi.compute_instances else None
    return {"gi_id": gi.id, "ci_id": ci.id if ci else None, "mig_uuid": ci.uuid if ci else None,
            "placement_size": gi.size}


class _VgpuLike(_Op):
    def _link_backing(self, uow: Any, row: Any) -> None:
        """Tie a MIG-backed vGPU to its GPU instance.  attach holds that instance for the VM without a tenant
        until now (the vGPU carries the tenant's charge; quota is checked on it alone), then names the tenant
        on both, as tenant reports expect."""
        b = self.p.get("backing")
        if not b:
            return
        gi = _find_row(uow, self.ctx.settings.host_id, gpu_id=row.gpu_id, kind=MIG, profile_id=b[0],
                       placement_start=b[1])
        if gi is not None:
            row.backing_instance_id = gi.id
            a, mine = gi.allocation, self.p.get("alloc")
            if a is not None and mine and a.vm_name == mine["vm_name"] and a.tenant != mine.get("tenant"):
                a.tenant = mine.get("tenant")


class MdevOp(_VgpuLike):
    def describe(self, forward: bool = True) -> str:
        name = (self.p.get("fields") or {}).get("type_name") or self.p["type_id"]
        where = self.p.get("parent") or "the next free VF"
        if self.step["present"] == forward:
            return f"create mdev {name} {self.p['uuid']} on {where}"
        return f"remove mdev {name} {self.p['uuid']} on {where}"

    def resolve(self) -> bool:
        if self.p.get("parent") or not self.step["present"]:
            return False
        self.p["parent"] = _next_free_vf(self.ctx, self.step["gpu"], "mdev")
        if self.p.get("fields") is not None:
            self.p["fields"]["parent"] = self.p["parent"]
        return True

    def ensure(self, present: bool) -> dict[str, Any]:
        host = self.ctx.host
        exists = host.mdev_exists(self.p["uuid"])
        if present and not exists:
            if not self.p.get("parent"):
                raise ConflictError(f"no parent chosen for mdev {self.p['uuid']}")
            host.create_mdev(self.p["parent"], self.p["type_id"], self.p["uuid"])
        elif not present and exists:
            host.remove_mdev(self.p["uuid"])
        return {}

    def holds(self, view: Any, present: bool) -> bool:
        there = any(d["uuid"] == self.p["uuid"] for g in view.gpus for d in g.mdev_devices)
        return there == present

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        gpu_id = self.p.get("gpu_id")
        row = uow.instance_by_mdev(self.ctx.settings.host_id, self.p["uuid"])
        fields = self.p.get("fields")
        if present:
            if gpu_id is None or (fields is None and row is None):
                return
            f = dict(fields or {})
            f.setdefault("mdev_uuid", self.p["uuid"])
            f["parent"] = self.p.get("parent") or f.get("parent")
            row = _upsert_row(uow, self.ctx, row, gpu_id, f, {})
            _allocate(uow, row, self.p.get("alloc"))
            uow.session.flush()
            self._link_backing(uow, row)
        elif row is not None:
            uow.delete_instance(row)


class VgpuOp(_VgpuLike):
    def describe(self, forward: bool = True) -> str:
        name = (self.p.get("fields") or {}).get("type_name") or self.p["type_id"]
        where = self.p.get("vf") or "the next free VF"
        if self.step["present"] == forward:
            return f"set vGPU type {name} on {where}"
        return f"clear vGPU type {name} on VF {where}"

    def resolve(self) -> bool:
        if self.p.get("vf") or not self.step["present"]:
            return False
        self.p["vf"] = _next_free_vf(self.ctx, self.step["gpu"], "vendor-vfio", self.p["type_id"])
        if self.p.get("fields") is not None:
            self.p["fields"]["parent"] = self.p["vf"]
        return True

    def ensure(self, present: bool) -> dict[str, Any]:
        host, vf, tid = self.ctx.host, self.p.get("vf"), self.p["type_id"]
        if not vf:
            if present:
                raise ConflictError("no VF chosen for the vGPU")
            return {}
        from gpuvirt.errors import DeviceGoneError

        try:
            current = host.current_vgpu_type(vf)
        except DeviceGoneError:
            if present:
                raise
            return {}               # the VF is gone (VFs disabled): so is its vGPU
        if present and current != tid:
            if current:
                raise ConflictError(f"VF {vf} carries vGPU type {current}, not {tid}")
            host.set_vgpu_type(vf, tid, (self.p.get("fields") or {}).get("type_name"))
        elif not present and current == tid:
            host.clear_vgpu_type(vf)
        return {}

    def holds(self, view: Any, present: bool) -> bool:
        vf = self.p.get("vf")
        there = any(v["address"] == vf and v["current_type"] == self.p["type_id"]
                    for g in view.gpus for v in g.vfio_vfs)
        return there == present

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        gpu_id, vf = self.p.get("gpu_id"), self.p.get("vf")
        if gpu_id is None or not vf:
            return
        row = _find_row(uow, self.ctx.settings.host_id, gpu_id=gpu_id, kind=VFIO_VGPU, parent=vf)
        fields = self.p.get("fields")
        if present:
            if fields is None and row is None:
                return
            f = dict(fields or {})
            f["parent"] = vf
            row = _upsert_row(uow, self.ctx, row, gpu_id, f, {})
            _allocate(uow, row, self.p.get("alloc"))
            uow.session.flush()
            self._link_backing(uow, row)
        elif row is not None:
            uow.delete_instance(row)


class VfsOp(_Op):
    def describe(self, forward: bool = True) -> str:
        if self.step["present"] == forward:
            return f"enable {self.p['count']} SR-IOV VFs"
        return "disable SR-IOV VFs"

    def ensure(self, present: bool) -> dict[str, Any]:
        host, pf = self.ctx.host, self.step["gpu"]
        _, num = host.sriov_state(pf)
        if present:
            if num != self.p["count"]:
                if num:
                    host.disable_vfs(pf)
                host.enable_vfs(pf, self.p["count"])
        elif num:
            host.disable_vfs(pf)
        return {}

    def holds(self, view: Any, present: bool) -> bool:
        g = _gpu_view(view, self.step["gpu"])
        num = (g.sriov_num or 0) if g is not None else 0
        return num == self.p["count"] if present else num == 0

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        if not self.p.get("whole") or self.p.get("gpu_id") is None:
            return
        host_id, gpu_id = self.ctx.settings.host_id, self.p["gpu_id"]
        rows = uow.instances(host_id, gpu_id=gpu_id, kinds=[VF])
        if not present:
            for r in rows:
                uow.delete_instance(r)
            return
        have = {r.parent for r in rows}
        snaps = {s["parent"]: s for s in self.p.get("snaps") or []}
        from gpuvirt.service.instances import vf_fields

        for vf in _vfs_now(self.ctx, self.step["gpu"]):
            if vf in have:
                continue
            s = snaps.get(vf)
            row = uow.add_instance(host_id=host_id, gpu_id=gpu_id, state=ACTIVE,
                                   **vf_fields(vf, (s or {}).get("origin", "profile"), self.p.get("memory_mib")))
            if s and s.get("allocation"):
                _allocate(uow, row, s["allocation"])


def _vfs_now(ctx: Context, pf: str) -> list[str]:
    from gpuvirt.service import hostview

    g = hostview.snapshot(ctx, nvml=False).by_address(pf)
    return list(g.vfs) if g is not None else []


class RecordVfsOp(_Op):
    def describe(self, forward: bool = True) -> str:
        return "record the whole VFs as allocatable instances" if forward else "forget the recorded whole VFs"

    def ensure(self, present: bool) -> dict[str, Any]:
        return {}

    def holds(self, view: Any, present: bool) -> bool:
        return True

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        from gpuvirt.service.instances import vf_fields

        host_id, gpu_id = self.ctx.settings.host_id, self.p["gpu_id"]
        rows = {r.parent: r for r in uow.instances(host_id, gpu_id=gpu_id, kinds=[VF])}
        if present:
            for vf in _vfs_now(self.ctx, self.step["gpu"]):
                if vf not in rows:
                    uow.add_instance(host_id=host_id, gpu_id=gpu_id, state=ACTIVE,
                                     **vf_fields(vf, "profile", self.p.get("memory_mib")))
        else:
            keep = set(self.p.get("existing") or [])
            for vf, r in rows.items():
                if vf not in keep and r.allocation is None:
                    uow.delete_instance(r)


class MigModeOp(_Op):
    def describe(self, forward: bool = True) -> str:
        want = self.p["enable"] if forward else self.p["was_current"]
        return f"{'enable' if want else 'disable'} MIG mode"

    def _state(self) -> tuple[bool, bool]:
        for g in self.ctx.host.nvml().gpus():
            if g.index == self.p["index"]:
                return bool(g.mig_current), bool(g.mig_pending)
        return False, False

    def _reset(self) -> None:
        from gpuvirt.service import health

        self.ctx.host.reset_gpu(self.step["gpu"])
        # a successful reset also ends what an XID left unhealthy on the GPU (service.health)
        health.after_reset(self.ctx, self.step["gpu"], how="GPU reset by apply (MIG mode)")

    def forward(self) -> dict[str, Any]:
        want = bool(self.p["enable"])
        current, pending = self._state()
        if current == want and pending == want:
            return {}
        current, pending, status = self.ctx.host.nvml().set_mig_mode(self.p["index"], want)
        if current != want and self.p.get("allow_reset"):
            self._reset()
            current, pending = self._state()
        if current != want:
            return {"pending": True, "activation_status": status}
        return {}

    def backward(self) -> dict[str, Any]:
        # setting the mode the GPU runs in again withdraws a pending change (a rollback must do that, or the next
        # reboot switches the mode of a GPU whose apply was reported rolled back)
        was = bool(self.p["was_current"])
        current, pending = self._state()
        if current == was and pending == was:
            return {}
        current, pending, _ = self.ctx.host.nvml().set_mig_mode(self.p["index"], was)
        if current != was and self.p.get("allow_reset"):
            self._reset()
            current, pending = self._state()
        if current != was:
            raise ResetRequiredError(f"restoring MIG mode on {self.step['gpu']} is pending a GPU reset")
        return {}

    def ensure(self, present: bool) -> dict[str, Any]:   # pragma: no cover - forward/backward above
        return self.forward() if present else self.backward()

    def holds(self, view: Any, present: bool) -> bool:
        g = _gpu_view(view, self.step["gpu"])
        if g is None:
            return False
        if present:
            return bool(g.mig_current) == bool(self.p["enable"]) or bool(g.mig_pending) == bool(self.p["enable"])
        was = bool(self.p["was_current"])
        return bool(g.mig_current) == was and bool(g.mig_pending) == was

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        enabled = self.p["enable"] if present else self.p["was_current"]
        detail = {"enabled": bool(enabled)}
        if facts.get("pending"):
            detail["activation_status"] = facts.get("activation_status")
        uow.event("mig-mode", target=self.step["gpu"], result="pending" if facts.get("pending") else "ok",
                  detail=detail)


class VgpuSchedulerOp(_Op):
    def _want(self, forward: bool) -> Any:
        from gpuvirt.model.vgpu_scheduler import SchedulerSpec

        policy, ts = (self.p["policy"], self.p.get("timeslice_us")) if forward else \
            (self.p.get("was_policy"), self.p.get("was_timeslice_us"))
        # a policy NVML reported in a form gpuvirt cannot name is not restored (nothing to set it back to)
        return SchedulerSpec(policy, ts) if policy else None

    def describe(self, forward: bool = True) -> str:
        want = self._want(forward)
        if want is None:
            return "leave the vGPU scheduler as it was"
        return f"set the vGPU scheduler to {want.policy}" + \
            (f" ({want.timeslice_us} us time slice)" if want.timeslice_us is not None else "")

    def _ensure(self, forward: bool) -> dict[str, Any]:
        want = self._want(forward)
        if want is None:
            return {}
        nv = self.ctx.host.nvml()
        cur = nv.vgpu_scheduler(self.p["index"])
        if cur is not None and want.satisfied_by(cur.to_dict()):
            return {}
        nv.set_vgpu_scheduler(self.p["index"], want.policy, want.timeslice_us)
        return {}

    def forward(self) -> dict[str, Any]:
        return self._ensure(True)

    def backward(self) -> dict[str, Any]:
        return self._ensure(False)

    def ensure(self, present: bool) -> dict[str, Any]:   # pragma: no cover - forward/backward above
        return self._ensure(present)

    def holds(self, view: Any, present: bool) -> bool:
        want = self._want(present)
        if want is None:
            return True
        g = _gpu_view(view, self.step["gpu"])
        return g is not None and want.satisfied_by(g.vgpu_scheduler)


class AllocateOp(_Op):
    def describe(self, forward: bool = True) -> str:
        vm = self.p["alloc"]["vm_name"]
        return f"allocate instance {self.p['instance_id']} to VM {vm}" if forward else \
            f"release instance {self.p['instance_id']} from VM {vm}"

    def resolve(self) -> bool:
        # what the instance *is* (its UUID, VF, or GPU instance), read before the release: a rollback that
        # re-creates the device after it was destroyed records it under a new row id, and must find it by this
        if self.step["op"] != "release" or self.p.get("key") is not None:
            return False
        with self.ctx.inventory.unit() as uow:
            row = _row_or_none(uow, self.p["instance_id"])
            self.p["key"] = instance_key(row) if row is not None else None
        return self.p["key"] is not None

    def ensure(self, present: bool) -> dict[str, Any]:
        return {}

    def holds(self, view: Any, present: bool) -> bool:
        return True

    def _row(self, uow: Any) -> Any:
        row, key = _row_or_none(uow, self.p["instance_id"]), self.p.get("key")
        if key is None or (row is not None and instance_key(row) == key):
            return row
        return next((r for r in uow.instances(self.ctx.settings.host_id, gpu_id=key.get("gpu_id"),
                                              kinds=[key["kind"]]) if instance_key(r) == key), None)

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        row = self._row(uow)
        if row is None:
            return
        want = present == (self.step["op"] == "allocate")
        a = row.allocation
        if want:
            _allocate(uow, row, self.p["alloc"])
        elif a is not None and a.vm_name == self.p["alloc"]["vm_name"]:
            uow.release(a)


def _row_or_none(uow: Any, instance_id: int) -> Any:
    from gpuvirt.errors import NotFoundError

    try:
        return uow.instance(instance_id)
    except NotFoundError:
        return None


def instance_key(row: Any) -> dict[str, Any]:
    """What identifies an instance on its host whatever its row id: the mdev UUID, the VF (or whole GPU)
    address, or the GPU instance's profile and start on its GPU."""
    if row.kind == MDEV:
        return {"kind": MDEV, "mdev_uuid": row.mdev_uuid}
    if row.kind == MIG:
        return {"kind": MIG, "gpu_id": row.gpu_id, "profile_id": row.profile_id,
                "placement_start": row.placement_start}
    return {"kind": row.kind, "gpu_id": row.gpu_id, "parent": row.parent}


class WholeGpuOp(_Op):
    def describe(self, forward: bool = True) -> str:
        vm = (self.p.get("alloc") or {}).get("vm_name")
        add = self.step["present"] == forward
        return f"{'hand' if add else 'take back'} the whole GPU {self.step['gpu']}" + (
            f" {'to' if add else 'from'} {vm}" if vm else "")

    def ensure(self, present: bool) -> dict[str, Any]:
        return {}

    def holds(self, view: Any, present: bool) -> bool:
        return True

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        from gpuvirt.inventory.models import GPU

        row = uow.instance_by_parent(self.ctx.settings.host_id, self.step["gpu"], [GPU])
        if present:
            if row is None:
                row = uow.add_instance(host_id=self.ctx.settings.host_id, gpu_id=self.p["gpu_id"], state=ACTIVE,
                                       **{k: v for k, v in self.p["fields"].items() if k != "gpu_id"})
            _allocate(uow, row, self.p.get("alloc"))
        elif row is not None:
            uow.delete_instance(row)


INVENTORY_ONLY = ("allocate", "release", "record-vfs", "whole-gpu")

OPS: dict[str, type[_Op]] = {"mig": MigOp, "mdev": MdevOp, "vgpu": VgpuOp, "vfs": VfsOp, "mig-mode": MigModeOp,
                             "vgpu-scheduler": VgpuSchedulerOp, "record-vfs": RecordVfsOp, "allocate": AllocateOp,
                             "release": AllocateOp, "whole-gpu": WholeGpuOp}


# Contexts (or peer sessions, gpuvirt.service.peers) of the hosts of a shared inventory that this process may
# change (the rebalance executor registers
# them, its own host's too: a move another host opened may name this one; a step naming a host missing here
# cannot run from this process), and the host this process runs as while they are registered (None: the host
# of whichever context a function is given).
PEERS: dict[str, Context] = {}
HOME: list[str] = []


def is_home(host_id: str) -> bool:
    """Does this process run as ``host_id`` (rather than reach it as a peer of the host it runs as)?"""
    return not HOME or HOME[-1] == host_id


def op_of(ctx: Context, step: dict[str, Any]) -> _Op:
    host = step.get("host")
    if host is not None and ctx is not None and host != ctx.settings.host_id:
        peer = PEERS.get(host)
        if peer is None:
            raise ConflictError(f"{describe(step)} is a step on host {host}, which this process cannot reach; "
                                f"settle it where both hosts are reachable ('gpuvirt reconcile' there)")
        ctx = peer
    # a host reached through a peer session (gpuvirt.service.peers) carries out the host part of its steps there;
    # inventory-only steps touch nothing but the shared inventory, which this process records
    remote = getattr(ctx, "remote_op", None)
    if remote is not None and step["op"] not in INVENTORY_ONLY:
        return remote(step)
    return OPS[step["op"]](ctx, step)


def on_host(step: dict[str, Any], host: str) -> dict[str, Any]:
    """``step`` marked as one on ``host`` (a step of a change that spans hosts of a shared inventory)."""
    step["host"] = host
    return step


def describe(step: dict[str, Any]) -> str:
    return OPS[step["op"]](None, step).describe()  # type: ignore[arg-type]


def row_id(ctx: Context, step: dict[str, Any]) -> int:
    """The inventory id of the instance a done create step recorded."""
    p, host_id = step["params"], ctx.settings.host_id
    with ctx.inventory.unit() as uow:
        if step["op"] == "mig":
            row = _find_row(uow, host_id, gpu_id=p["gpu_id"], kind=MIG, profile_id=p["profile_id"],
                            placement_start=p["start"])
        elif step["op"] == "mdev":
            row = uow.instance_by_mdev(host_id, p["uuid"])
        elif step["op"] == "vgpu":
            row = _find_row(uow, host_id, gpu_id=p["gpu_id"], kind=VFIO_VGPU, parent=p["vf"])
        elif step["op"] == "whole-gpu":
            from gpuvirt.inventory.models import GPU

            row = uow.instance_by_parent(host_id, step["gpu"], [GPU])
        else:
            row = None
        if row is None:
            raise ConflictError(f"{describe(step)}: no inventory record after the step")
        return row.id


def _next_free_vf(ctx: Context, gpu: str, interface: str, type_id: int | None = None) -> str:
    from gpuvirt.service import hostview

    fresh = hostview.snapshot(ctx).by_address(gpu)
    if fresh is None:
        raise ConflictError(f"GPU {gpu} disappeared")
    if interface == "vendor-vfio":
        for vf in fresh.vfio_vfs:
            if not vf["current_type"] and (type_id is None or not vf["creatable_types"] or
                                           any(t["id"] == type_id for t in vf["creatable_types"])):
                return vf["address"]
    else:
        busy = {d["parent"] for d in fresh.mdev_devices}
        for vf in fresh.vfs:
            if vf not in busy and vf in fresh.mdev_parents:
                return vf
    raise ConflictError(f"no free VF left on GPU {gpu}")


# the step kinds on files (domain XML, CDI specs) and of the rebalance executor register themselves in OPS
from gpuvirt.service import intent_file_steps, rebalance_steps  # noqa: E402,F401
