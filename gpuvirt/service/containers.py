"""Containers: MIG instances and whole GPUs handed to container runtimes through CDI specs gpuvirt keeps true.

``gpuvirt attach NAME --mig PROFILE --format cdi`` allocates a MIG device (a GPU instance with its full compute
instance, no vGPU) on a GPU in ``containers`` mode, or on a MIG-enabled GPU no profile claims; ``--gpu SELECTOR
--format cdi`` allocates a whole GPU (MIG off), in its VFIO form when the GPU is bound to vfio-pci.  Each
allocated device gets one spec file under the CDI spec folder (``<root>/var/run/cdi`` unless configured),
published only after the instance exists and only with what the host shows now: the MIG device UUID, the
GPU's minor number, the capability minors of ``/proc/driver/nvidia-caps/mig-minors``.  Every step is part of
the attach's journalled intent (``intent.cdi_step``), so a crash leaves either the allocation and its spec or
neither.  ``detach`` removes the spec before it releases the device; ``reconcile`` (and the boot unit, which
runs it) rewrites specs whose instance came back with a new UUID and removes gpuvirt's specs that no
allocation wants; ``gpuvirt cdi check`` lists what is stale, missing, outdated or foreign.  Files gpuvirt
did not write are never changed (``gpuvirt.vmm.cdi``: the mark).

A GPU's mode (``vm`` | ``containers``) comes from the profile applied to it (``service.apply`` records it); a
GPU without a profile takes both kinds of attach.  VM attaches skip ``containers`` GPUs and container attaches
skip ``vm`` GPUs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import CapacityError, ConflictError, GpuvirtError, HostError, NotFoundError, UsageError
from gpuvirt.host import devnodes as hostdev
from gpuvirt.inventory.models import ACTIVE, CONSUMER_CONTAINER, CONSUMER_VM, GPU, MIG, MODE_CONTAINERS, MODE_VM
from gpuvirt.service import hostview, intent
from gpuvirt.service.hostview import GpuView, HostView
from gpuvirt.vmm import cdi

CDI_REL = "var/run/cdi"
NVIDIA_SPECS_REL = ("etc/cdi/nvidia.yaml", "etc/cdi/nvidia.json", "var/run/cdi/nvidia.yaml", "var/run/cdi/nvidia.json")


# --- settings ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CdiConfig:
    spec_dir: Path
    vendor: str
    nvidia_specs: tuple[Path, ...]
    hook_path: str | None          # None: from the nvidia-ctk spec, else NVIDIA's default path
    chmod_hook: bool

    def kind(self, klass: str) -> str:
        return cdi.kind_of(self.vendor, klass)

    def to_dict(self) -> dict[str, Any]:
        return {"spec_dir": str(self.spec_dir), "vendor": self.vendor,
                "nvidia_specs": [str(p) for p in self.nvidia_specs], "hook_path": self.hook_path,
                "chmod_hook": self.chmod_hook}


def config(ctx: Context) -> CdiConfig:
    """The ``[cdi]`` table of the config file (validated when it was read) over the defaults."""
    c = ctx.settings.cdi
    root = ctx.settings.root
    specs = c.get("nvidia_spec")
    if specs is None:
        paths = tuple(root / rel for rel in NVIDIA_SPECS_REL)
    else:
        paths = tuple(Path(p) for p in ([specs] if isinstance(specs, str) else specs))
    return CdiConfig(spec_dir=Path(c["spec_dir"]) if c.get("spec_dir") else root / CDI_REL,
                     vendor=c.get("vendor") or cdi.DEFAULT_VENDOR, nvidia_specs=paths,
                     hook_path=c.get("hook_path"), chmod_hook=bool(c.get("chmod_hook", True)))


def gpu_modes(uow: Any, host_id: str) -> dict[str, str | None]:
    return {g.address: g.mode for g in uow.gpus(host_id)}


def refuse_vm_name_clash(uow: Any, host_id: str, name: str, consumer: str) -> None:
    """VMs and containers share the allocation names of a host: ``detach NAME`` and the libvirt hook act on every
    allocation of a name, so one name never belongs to both kinds."""
    other = [a for a in uow.allocations(host_id=host_id, vm_name=name) if (a.consumer or CONSUMER_VM) != consumer]
    if other:
        what = "a VM" if consumer == CONSUMER_CONTAINER else "a container"
        raise ConflictError(f"'{name}' already names {what} on this host (allocation of instance "
                            f"{other[0].instance_id}); VMs and containers need different names")


# --- the host facts a spec is made of -------------------------------------------------------------------------
class _Host:
    """What the specs of one pass read from the host, read once."""

    def __init__(self, ctx: Context, cfg: CdiConfig, view: HostView) -> None:
        self.ctx, self.cfg, self.view = ctx, cfg, view
        self.nodes = hostdev.DevNodes(ctx.settings.root)
        self._minor: dict[int, int] = {}
        self._nvidia: tuple[dict[str, Any] | None, str | None] | None = None

    def minor(self, g: GpuView) -> int:
        if g.nvml_index is None:
            raise ConflictError(f"{g.label} is not visible through NVML (no minor number)")
        if g.nvml_index not in self._minor:
            self._minor[g.nvml_index] = self.ctx.host.nvml().minor_number(g.nvml_index)
        return self._minor[g.nvml_index]

    def nvidia_spec(self) -> tuple[dict[str, Any] | None, str | None]:
        """The first ``nvidia-ctk cdi generate`` output found (parsed), with its path."""
        if self._nvidia is None:
            self._nvidia = (None, None)
            for p in self.cfg.nvidia_specs:
                text = hostdev.read_spec(p, cdi.MAX_SPEC_BYTES)
                if text is None:
                    continue
                with contextlib.suppress(UsageError):
                    doc = cdi.parse(text, str(p))
                    if doc.get("kind") == "nvidia.com/gpu":
                        self._nvidia = (doc, str(p))
                        break
        return self._nvidia

    def hook_path(self) -> str | None:
        if not self.cfg.chmod_hook:
            return None
        if self.cfg.hook_path:
            return self.cfg.hook_path
        doc, _ = self.nvidia_spec()
        return (cdi.hook_path_from_nvidia(doc) if doc else None) or cdi.DEFAULT_HOOK_PATH

    def node(self, path: str, *, major_of: str | tuple[str, ...], minor: int, mode: int = 0o666) -> cdi.Node:
        """A node as NVIDIA's generator writes it when the host has it; with its numbers when the host has not
        created it (nvidia-modprobe makes capability nodes on first use), so the runtime can make it."""
        host_path = self.nodes.host_path(path)
        if self.nodes.exists(path):
            return cdi.Node(path, host_path)
        names = (major_of,) if isinstance(major_of, str) else major_of
        majors = self.nodes.char_majors()
        major = next((majors[n] for n in names if n in majors), None)
        if major is None:
            raise ConflictError(f"{host_path} does not exist and /proc/devices lists no {names[0]} driver; is the "
                                "NVIDIA driver loaded?")
        return cdi.Node(path, host_path, "c", major, minor, mode)

    def common(self) -> dict[str, Any]:
        doc, _ = self.nvidia_spec()
        common = cdi.common_from_nvidia(doc) if doc else None
        if common is not None:
            return common
        nodes = [self.node("/dev/nvidiactl", major_of=("nvidia-frontend", "nvidia"), minor=255)]
        for path, minor in (("/dev/nvidia-uvm", 0), ("/dev/nvidia-uvm-tools", 1)):
            with contextlib.suppress(ConflictError):     # no UVM module: CUDA will say so, the spec stays valid
                nodes.append(self.node(path, major_of="nvidia-uvm", minor=minor))
        return cdi.minimal_common(nodes)


@dataclass(frozen=True)
class SpecFile:
    path: str
    text: str
    name: str          # the fully qualified device name
    gpu: str           # GPU address (the lock and the intent step's GPU)
    instance: int


def _pci_entry(view: HostView, address: str) -> dict[str, Any] | None:
    return next((d for d in view.doc["pci_gpus"] if d["address"] == address), None)


def spec_for(h: _Host, inst: Any) -> SpecFile:
    """The spec the host needs now for an allocated instance (MIG device, whole GPU, or VFIO GPU)."""
    a = inst.allocation
    g = h.view.by_address(inst.gpu.address)
    if g is None:
        raise NotFoundError(f"GPU {inst.gpu.address} of instance {inst.id} is not on the host")
    meta = {"instance": inst.id, "consumer": a.vm_name if a is not None else None, "gpu": g.address}
    if inst.kind == MIG:
        gi = next((x for x in g.gpu_instances if x["profile_id"] == inst.profile_id
                   and x["placement"]["start"] == inst.placement_start), None)
        if gi is None or not gi["compute_instances"]:
            raise NotFoundError(f"MIG device {inst.label} on {g.label} is not on the host (run 'gpuvirt reconcile')")
        ci = gi["compute_instances"][0]
        if not ci.get("uuid"):
            raise ConflictError(f"MIG device {inst.label} on {g.label} has no MIG device UUID")
        gpu_minor = h.minor(g)
        minors = h.nodes.mig_minors()
        gi_cap, ci_cap = f"gpu{gpu_minor}/gi{gi['id']}/access", f"gpu{gpu_minor}/gi{gi['id']}/ci{ci['id']}/access"
        missing = [c for c in (gi_cap, ci_cap) if c not in minors]
        if missing:
            raise ConflictError(f"{hostdev.MIG_MINORS} has no {' or '.join(missing)}; is the NVIDIA driver loaded?")
        nodes = [h.node(f"/dev/nvidia{gpu_minor}", major_of=("nvidia-frontend", "nvidia"), minor=gpu_minor),
                 h.node(f"/dev/nvidia-caps/nvidia-cap{minors[gi_cap]}", major_of="nvidia-caps", minor=minors[gi_cap],
                        mode=0o444),
                 h.node(f"/dev/nvidia-caps/nvidia-cap{minors[ci_cap]}", major_of="nvidia-caps", minor=minors[ci_cap],
                        mode=0o444)]
        prof = g.model.mig.profile(inst.profile_id) if g.model and g.model.mig else None
        if prof is not None and "gfx" in prof.attributes:
            nodes += [cdi.Node(p, h.nodes.host_path(p)) for p in h.nodes.drm_nodes(g.address)]
        klass, name = cdi.CLASS_MIG, ci["uuid"]
        meta.update(kind="mig", gi=gi["id"], ci=ci["id"], profile=inst.profile_name)
        common = h.common()
    elif inst.kind == GPU:
        pci = _pci_entry(h.view, g.address) or {}
        if pci.get("driver") == "vfio-pci":
            group = pci.get("iommu_group")
            if group is None:
                raise ConflictError(f"{g.label} is bound to vfio-pci but has no IOMMU group")
            nodes = [h.node(f"/dev/vfio/{group}", major_of="vfio", minor=0, mode=0o600)]
            klass, name = cdi.CLASS_VFIO, g.address
            common = {"deviceNodes": [cdi.Node("/dev/vfio/vfio", h.nodes.host_path("/dev/vfio/vfio")).to_dict()]}
            meta.update(kind="vfio", iommu_group=group)
        else:
            if not g.uuid:
                raise ConflictError(f"{g.label} is not driven by the NVIDIA driver (driver "
                                    f"{pci.get('driver') or 'none'}); bind it to nvidia or vfio-pci")
            gpu_minor = h.minor(g)
            nodes = [h.node(f"/dev/nvidia{gpu_minor}", major_of=("nvidia-frontend", "nvidia"), minor=gpu_minor)]
            nodes += [cdi.Node(p, h.nodes.host_path(p)) for p in h.nodes.drm_nodes(g.address)]
            klass, name = cdi.CLASS_GPU, g.uuid
            meta.update(kind="gpu")
            common = h.common()
    else:
        raise UsageError(f"instance {inst.id} ({inst.label}) is not a container device")
    kind = h.cfg.kind(klass)
    qname = cdi.qualified(kind, name)
    doc = cdi.spec(kind, name, cdi.device_edits(nodes, hook_path=h.hook_path()), common)
    path = str(h.cfg.spec_dir / cdi.file_name(klass, name))
    return SpecFile(path, cdi.render(doc, meta), qname, g.address, inst.id)


# --- the spec folder as it is ------------------------------------------------------------------------------------
@dataclass
class Found:
    path: str
    text: str | None
    meta: dict[str, Any] | None        # gpuvirt's metadata; None: a foreign file
    kind: str | None = None
    names: tuple[str, ...] = ()
    error: str | None = None


def scan(cfg: CdiConfig) -> list[Found]:
    """Every spec file of the folder gpuvirt writes to: gpuvirt's own (marked) and the others."""
    out = []
    for fname in hostdev.list_specs(cfg.spec_dir):
        path = str(cfg.spec_dir / fname)
        try:
            text = hostdev.read_spec(path, cdi.MAX_SPEC_BYTES)
        except HostError as exc:
            out.append(Found(path, None, None, error=str(exc)))
            continue
        if text is None:
            continue
        meta = cdi.owned(text) if fname.startswith(cdi.FILE_PREFIX) else None
        f = Found(path, text, meta)
        try:
            doc = cdi.parse(text, path)
            f.kind, f.names = str(doc.get("kind")), tuple(cdi.device_names(doc))
        except UsageError as exc:
            f.error = str(exc)
        out.append(f)
    return out


# --- attach ------------------------------------------------------------------------------------------------------
def attach(ctx: Context, name: str, *, mig: str | None = None, gpu: str | None = None, tenant: str | None = None,
           count: int = 1, persistent: bool = True) -> list[dict[str, Any]]:
    """Allocate ``count`` MIG devices (``mig``) or whole GPUs (``gpu`` alone) to container ``name`` and publish
    a CDI spec for each; returns what each got, with its fully qualified CDI device name."""
    from gpuvirt.service.attach import _Call, check_tenant, check_vm_name

    name = check_vm_name(name)
    tenant = check_tenant(tenant)
    if count < 1 or count > 64:
        raise UsageError("--count must be between 1 and 64")
    if mig is None and gpu is None:
        raise UsageError("--format cdi hands a container a MIG device (--mig PROFILE) or a whole GPU (--gpu SELECTOR)")
    cfg = config(ctx)
    cfg.kind(cdi.CLASS_MIG)         # a bad configured vendor fails before anything changes
    with ctx.inventory.unit() as uow:
        refuse_vm_name_clash(uow, ctx.settings.host_id, name, CONSUMER_CONTAINER)
    what = f"MIG {mig}" if mig else f"whole GPU {gpu}"
    with contextlib.ExitStack() as locks:
        run = intent.Run.begin(ctx, "attach", gpus=(), recovery="back",
                               target={"vm": name, "consumer": CONSUMER_CONTAINER, "request": what, "count": count,
                                       "tenant": tenant})
        call = _Call(ctx, name, tenant, persistent, None, run, locks, consumer=CONSUMER_CONTAINER)
        try:
            ids = [(_attach_mig(call, mig, gpu) if mig else _attach_gpu(call, gpu or "")) for _ in range(count)]
            with ctx.inventory.unit() as uow:
                addresses = sorted({uow.instance(i).gpu.address for i in ids})
            call.lock(addresses)
            h = _Host(ctx, cfg, hostview.snapshot(ctx))       # read with the GPUs locked: nobody changes them now
            out = []
            for inst_id in ids:
                with ctx.inventory.unit() as uow:
                    inst = uow.instance(inst_id)
                    sf = spec_for(h, inst)
                    label = inst.label
                # published only now, after the instance exists; a step of this attach, undone with it
                run.run(run.add(intent.cdi_step(sf.gpu, sf.path, sf.text, name=sf.name, present=True)))
                out.append({"name": sf.name, "spec": sf.path, "instance": inst_id, "label": label, "gpu": sf.gpu,
                            "consumer": name, "tenant": tenant})
            run.finish()
        except GpuvirtError as exc:
            failures = run.abort(exc)
            if failures:
                raise type(exc)(f"{exc}; undoing this attach did not finish ({failures[0]}): run 'gpuvirt "
                                "reconcile'") from exc
            raise
    return out


def _mode_ok(mode: str | None) -> bool:
    return mode in (None, MODE_CONTAINERS)


def _explain_modes(gpus: list[GpuView], modes: dict[str, str | None], what: str) -> str:
    vm = [g.label for g in gpus if modes.get(g.address) == MODE_VM]
    if vm:
        return (f"{', '.join(vm)} serve{'s' if len(vm) == 1 else ''} VMs (mode vm); apply a profile with "
                f"'mode: containers' to hand {what} to containers")
    return ""


def _attach_mig(call: Any, profile: str, selector: str | None) -> int:
    from gpuvirt.model.catalog import resolve_gi_profile
    from gpuvirt.service.attach import _backs_a_vgpu, _create_mig_for, _quota_check

    ctx = call.ctx
    host_id = ctx.settings.host_id
    view = hostview.snapshot(ctx)
    selected = view.select(selector) if selector else view.gpus
    with ctx.inventory.unit(write=True, action=f"attach MIG {profile} to container {call.vm}") as uow:
        rows = hostview.record(ctx, view, uow)
        modes = gpu_modes(uow, host_id)
        usable = []
        for g in selected:
            if not (g.mig_capable and g.mig_current and g.model and g.model.mig) or not _mode_ok(modes.get(g.address)):
                continue
            try:
                pid = resolve_gi_profile(g.model, profile).id
            except GpuvirtError:
                continue
            usable.append((g, pid))
        if not usable:
            why = _explain_modes(selected, modes, f"MIG {profile}")
            raise CapacityError(f"no capacity: no MIG-enabled GPU{' of ' + selector if selector else ''} on this "
                                f"host offers {profile} to containers" + (f" ({why})" if why else ""))
        by_id = {rows[g.address].id: (g, pid) for g, pid in usable}
        # a free MIG device first (a profile's, or one an earlier attach left): never one under a vGPU
        for inst in uow.free_instances(host_id, [MIG]):
            hit = by_id.get(inst.gpu_id)
            if hit is None or inst.profile_id != hit[1] or _backs_a_vgpu(uow, inst):
                continue
            gi = next((x for x in hit[0].gpu_instances if x["profile_id"] == inst.profile_id
                       and x["placement"]["start"] == inst.placement_start), None)
            if gi is None or not gi["compute_instances"]:
                continue    # missing after a reboot, or without its compute instance: reconcile restores it
            if not uow.try_lock_instance(inst):
                continue
            _quota_check(uow, call.tenant, [inst])
            uow.allocate(inst, vm_name=call.vm, vm_uuid=None, tenant=call.tenant, persistent=call.persistent,
                         consumer=CONSUMER_CONTAINER)
            call.run.add_done(uow, intent.allocate_step(hit[0].address, inst.id, call.alloc(quota=False)))
            uow.event("attach", target=call.vm, detail={"instance": inst.id, "label": inst.label,
                                                         "tenant": call.tenant, "consumer": CONSUMER_CONTAINER})
            return inst.id
    policy = ctx.settings.policies.get("mig_placement", "frag-aware")
    return _create_mig_for(call, profile, [g for g, _ in usable], policy)


def _attach_gpu(call: Any, selector: str) -> int:
    from gpuvirt.service.attach import _quota_check

    ctx = call.ctx
    host_id = ctx.settings.host_id
    if not selector:
        raise UsageError("--gpu SELECTOR names the GPU to hand over whole")
    view = hostview.snapshot(ctx)
    selected = view.select(selector)
    call.lock([g.address for g in selected])
    view = hostview.snapshot(ctx)           # as it is now that nobody else changes these GPUs
    reasons: list[str] = []
    with ctx.inventory.unit(write=True, action=f"attach whole GPU to container {call.vm}") as uow:
        rows = hostview.record(ctx, view, uow)
        for g0 in selected:
            g = view.by_address(g0.address) or g0
            row = rows[g.address]
            why = _whole_gpu_problem(uow, view, g, row)
            if why:
                reasons.append(f"{g.label}: {why}")
                continue
            fields = {"kind": GPU, "origin": "attach", "persistent": call.persistent, "parent": g.address,
                      "memory_mib": g.memory_mib or (g.model.memory_mib if g.model else None),
                      "compute_slices": g.model.mig.compute_slices if g.model and g.model.mig else None,
                      "type_name": g.model.display_name if g.model else g.name}
            from types import SimpleNamespace

            _quota_check(uow, call.tenant, [SimpleNamespace(**fields)])
            step = intent.whole_gpu_step(g.address, row.id, fields, call.alloc(quota=False), present=True)
            call.run.add_done(uow, step)
            intent.op_of(ctx, step).record(uow, True, {})
            inst = uow.instance_by_parent(host_id, g.address, [GPU])
            uow.event("attach", target=call.vm, detail={"instance": inst.id, "label": inst.label,
                                                         "tenant": call.tenant, "consumer": CONSUMER_CONTAINER})
            return inst.id
    raise CapacityError("no capacity: no GPU of " + selector + " can be handed over whole: " + "; ".join(reasons))


def _whole_gpu_problem(uow: Any, view: HostView, g: GpuView, row: Any) -> str | None:
    pci = _pci_entry(view, g.address) or {}
    if g.vendor != "nvidia" or pci.get("role") != "pf":
        return "not an NVIDIA GPU"
    if row.mode == MODE_VM:
        return f"it serves VMs (mode vm, profile {row.desired_profile}); apply a profile with 'mode: containers'"
    if pci.get("driver") not in ("nvidia", "vfio-pci"):
        return f"bound to {pci.get('driver') or 'no driver'}, not nvidia or vfio-pci"
    if g.mig_current or g.mig_pending:
        return "MIG mode is on (hand out MIG devices with --mig PROFILE, or apply a profile with MIG disabled)"
    busy = [r for r in uow.instances(row.host_id, gpu_id=row.id) if r.state == ACTIVE]
    held = [r for r in busy if r.kind == GPU and r.allocation is not None]
    if held:
        return f"already handed to {held[0].allocation.vm_name}"
    others = [r for r in busy if r.kind != GPU]
    if others or g.mdev_devices or any(vf["current_type"] for vf in g.vfio_vfs) or g.gpu_instances:
        return "it carries instances (vGPUs, MIG or VFs); a whole GPU must be empty"
    return None


# --- detach ------------------------------------------------------------------------------------------------------
def release_steps(ctx: Context, inst_ids: list[int]) -> list[dict[str, Any]]:
    """Steps removing gpuvirt's specs of these instances (run before the allocations are released, so no
    container can start with a device that is being taken away)."""
    cfg = config(ctx)
    want = set(inst_ids)
    with ctx.inventory.unit() as uow:
        gpu_of = {i: uow.instance(i).gpu.address for i in inst_ids}
    steps = []
    for f in scan(cfg):
        if f.meta is not None and f.meta.get("instance") in want and f.text is not None:
            name = cdi.qualified(f.kind or "", f.names[0]) if f.kind and f.names else Path(f.path).name
            steps.append(intent.cdi_step(gpu_of[f.meta["instance"]], f.path, f.text, name=name, present=False))
    return steps


# --- keeping specs true ------------------------------------------------------------------------------------------
def plan_sync(ctx: Context, view: HostView | None = None) -> dict[str, Any]:
    """What the spec folder needs: specs to publish (missing), rewrite (outdated), remove (stale); specs that
    cannot be rendered now (their instance is missing) and foreign files, reported only."""
    cfg = config(ctx)
    wanted: dict[str, SpecFile] = {}
    unresolved: list[dict[str, Any]] = []
    keep_instances: set[int] = set()
    with ctx.inventory.unit() as uow:
        allocs = uow.container_allocations(ctx.settings.host_id)
        if allocs:
            # the host is read only when some spec has to be rendered (status and reconcile call this often)
            h = _Host(ctx, cfg, view or hostview.snapshot(ctx))
        for a in allocs:
            try:
                sf = spec_for(h, a.instance)
                wanted[sf.path] = sf
            except GpuvirtError as exc:
                if not isinstance(exc, NotFoundError):
                    # cannot tell now (NVML down, a table missing): its current spec stays as it is.  An instance
                    # that is gone, though, leaves its spec stale: its nodes may soon mean another instance
                    keep_instances.add(a.instance_id)
                unresolved.append({"instance": a.instance_id, "consumer": a.vm_name, "gpu": a.instance.gpu.address,
                                   "error": str(exc)})
    found = scan(cfg)
    by_path = {f.path: f for f in found}
    out: dict[str, Any] = {"spec_dir": str(cfg.spec_dir), "vendor": cfg.vendor, "missing": [], "outdated": [],
                           "stale": [], "ok": [], "foreign": [], "conflicts": [], "unresolved": unresolved}
    ours = {cfg.kind(k) for k in (cdi.CLASS_MIG, cdi.CLASS_GPU, cdi.CLASS_VFIO)}
    wanted_names = {sf.name for sf in wanted.values()}
    for path, sf in wanted.items():
        f = by_path.get(path)
        item = {"path": path, "name": sf.name, "instance": sf.instance, "gpu": sf.gpu, "text": sf.text}
        if f is None:
            out["missing"].append(item)
        elif f.meta is None:
            out["conflicts"].append({"path": path, "why": "a file gpuvirt did not write sits where its spec goes"})
        elif f.text != sf.text:
            out["outdated"].append(item)
        else:
            out["ok"].append(item)
    for f in found:
        if f.meta is not None:
            if f.path not in wanted and f.meta.get("instance") not in keep_instances:
                out["stale"].append({"path": f.path, "instance": f.meta.get("instance"),
                                     "consumer": f.meta.get("consumer"), "gpu": f.meta.get("gpu"), "text": f.text,
                                     "name": cdi.qualified(f.kind, f.names[0]) if f.kind and f.names else f.path})
            continue
        entry = {"path": f.path, "kind": f.kind, "devices": list(f.names)}
        if f.error:
            entry["error"] = f.error
        out["foreign"].append(entry)
        if f.kind in ours:
            clash = [n for n in f.names if f"{f.kind}={n}" in wanted_names]
            out["conflicts"].append({"path": f.path, "why": f"a file gpuvirt did not write uses gpuvirt's kind {f.kind}"
                                     + (f" and defines {', '.join(clash)} too" if clash else "")})
    out["in_sync"] = not (out["missing"] or out["outdated"] or out["stale"] or out["conflicts"] or unresolved)
    return out


def check(ctx: Context) -> dict[str, Any]:
    """``gpuvirt cdi check``: the plan without the file texts."""
    doc = plan_sync(ctx)
    for key in ("missing", "outdated", "stale", "ok"):
        for item in doc[key]:
            item.pop("text", None)
    return doc


def sync(ctx: Context, *, actor: str | None = None, view: HostView | None = None) -> dict[str, Any]:
    """Bring gpuvirt's specs in line (reconcile and the boot unit): one forward-only intent of CDI steps, run
    while the caller holds the GPU locks."""
    doc = plan_sync(ctx, view)
    hostdev.remove_leftovers(config(ctx).spec_dir, "." + cdi.FILE_PREFIX)
    steps = [intent.cdi_step(i["gpu"], i["path"], i["text"], name=i["name"], present=True)
             for i in doc["missing"] + doc["outdated"]]
    steps += [intent.cdi_step(i["gpu"] or "-", i["path"], i["text"], name=i["name"], present=False)
              for i in doc["stale"]]
    results = []
    if steps:
        run = intent.Run.begin(ctx, "reconcile", gpus=(), steps=steps, recovery="forward-only", actor=actor,
                               target={"cdi": True})
        for i, s in enumerate(steps):
            try:
                run.run(i)
                results.append({"action": intent.describe(s), "result": "done"})
            except GpuvirtError as exc:
                results.append({"action": intent.describe(s), "result": "failed", "error": str(exc)})
        if all(r["result"] == "done" for r in results):
            run.finish()
        else:
            run.leave("; ".join(r["error"] for r in results if r["result"] == "failed"))
    doc["changes"] = results
    return doc


def listing(ctx: Context, name: str | None = None) -> list[dict[str, Any]]:
    """Container allocations of this host with the CDI device each uses (as the spec folder has it now)."""
    cfg = config(ctx)
    files = {f.meta.get("instance"): f for f in scan(cfg) if f.meta is not None}
    out = []
    with ctx.inventory.unit() as uow:
        for a in uow.container_allocations(ctx.settings.host_id):
            if name is not None and a.vm_name != name:
                continue
            f = files.get(a.instance_id)
            out.append({"consumer": a.vm_name, "tenant": a.tenant, "instance": a.instance_id,
                        "label": a.instance.label, "gpu": a.instance.gpu.address, "persistent": a.persistent,
                        "name": cdi.qualified(f.kind, f.names[0]) if f and f.kind and f.names else None,
                        "spec": f.path if f else None})
    return out


__all__ = ["attach", "check", "config", "gpu_modes", "listing", "plan_sync", "release_steps", "spec_for", "sync",
           "CdiConfig", "SpecFile"]
