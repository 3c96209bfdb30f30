"""GPU model catalog: pure data loaded from ``profiles/models/*.yaml`` (shipped as ``gpuvirt._profiles``).

The catalog describes what a board *is*: PCI ids, memory, MIG geometry (GPU-instance and compute-instance
profiles with their placements), SR-IOV shape, the vGPU types the NVIDIA driver registers for it and the
rule that decides how many of each can exist, and for non-NVIDIA mdev drivers (Intel GVT-g, the kernel's
mtty/mdpy/mbochs samples) the shared resource pool their types draw from.

The simulator builds hosts from it; the planner and profile validation reason with it.  Nothing here does
I/O except :func:`load_catalog`, which reads the packaged YAML once.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from gpuvirt.errors import ConfigError, NotFoundError, ProfileError

GIB = 1 << 30
MIB = 1 << 20

VGPU_POLICIES = ("same-type", "same-size", "mixed-size")
VGPU_INTERFACES = ("mdev", "vendor-vfio")


@dataclass(frozen=True)
class Engines:
    ce: int = 0
    dec: int = 0
    enc: int = 0
    jpeg: int = 0
    ofa: int = 0


@dataclass(frozen=True)
class GpuInstanceProfile:
    """One GPU-instance profile as ``nvidia-smi mig -lgip`` / ``-lgipp`` show it."""

    id: int                     # info.id: what every NVML call after GetGpuInstanceProfileInfo takes
    nvml_constant: int          # the NVML_GPU_INSTANCE_PROFILE_* value passed to GetGpuInstanceProfileInfo
    name: str                   # e.g. "1g.5gb", "1g.5gb+me" as computed by the driver for this model
    compute_slices: int
    memory_slices: int
    max_instances: int
    memory_mib: int
    sm: int
    engines: Engines
    starts: tuple[int, ...]
    attributes: tuple[str, ...] = ()   # "me", "me.all", "gfx", "-me"

    @property
    def size(self) -> int:
        return self.memory_slices

    @property
    def placements(self) -> tuple[tuple[int, int], ...]:
        return tuple((s, self.memory_slices) for s in self.starts)

    @property
    def short(self) -> str:
        """``<g>g`` plus attributes: identifies the profile independently of the memory rounding."""
        return f"{self.compute_slices}g" + "".join("+" + a if not a.startswith("-") else a for a in self.attributes)


@dataclass(frozen=True)
class ComputeInstanceProfile:
    id: int                     # NVML_COMPUTE_INSTANCE_PROFILE_* value == id shown by nvidia-smi -lcip
    compute_slices: int
    max_instances: int


@dataclass(frozen=True)
class MigGeometry:
    memory_slices: int
    compute_slices: int
    sm_in_mig: int
    mode_survives_reboot: bool            # Ampere: InfoROM; Hopper+: lost on reboot / driver reload
    enable_requires_reset: bool           # Ampere: enabling MIG mode needs a GPU reset
    gi_profiles: tuple[GpuInstanceProfile, ...]
    ci_profiles: Mapping[int, tuple[ComputeInstanceProfile, ...]]   # by GI compute-slice count
    driver_placement_order: Mapping[int, tuple[int, ...]]           # by memory-slice size (UNVERIFIED rule)
    max_mig_devices: int

    def profile(self, profile_id: int) -> GpuInstanceProfile:
        for p in self.gi_profiles:
            if p.id == profile_id:
                return p
        raise NotFoundError(f"no GPU-instance profile with id {profile_id}")

    def by_constant(self, constant: int) -> GpuInstanceProfile | None:
        for p in self.gi_profiles:
            if p.nvml_constant == constant:
                return p
        return None


@dataclass(frozen=True)
class VgpuType:
    id: int                      # numeric type id: mdev dir nvidia-<id>, creatable_vgpu_types / current_vgpu_type
    name: str                    # board-profile, e.g. "A2-4Q" (sysfs `name` adds the board's prefix)
    framebuffer_mib: int
    max_instances: int
    num_heads: int
    frl_config: int
    max_resolution: str
    gpu_instance_profile_id: int | None = None   # MIG-backed types: the GI profile that must host it
    mixed_size_max: int | None = None            # vGPU 17+ mixed-size mode maximum (None: not in that mode)

    @property
    def series(self) -> str:
        m = re.search(r"([ABCQ])\d*(ME|NOME|MEALL|GFX)?$", self.name)
        return m.group(1) if m else "?"

    @property
    def mig_backed(self) -> bool:
        return self.gpu_instance_profile_id is not None

    @property
    def sysfs_id(self) -> str:
        return f"nvidia-{self.id}"

    def description(self) -> str:
        return (f"num_heads={self.num_heads}, frl_config={self.frl_config}, "
                f"framebuffer={self.framebuffer_mib}M, max_resolution={self.max_resolution}, "
                f"max_instance={self.max_instances}")


@dataclass(frozen=True)
class VgpuSpec:
    interface: str          # default host interface for the board: mdev | vendor-vfio
    parent: str             # pf (one mdev parent = the board) | vf (every SR-IOV VF hosts at most one vGPU)
    policy: str             # same-type | same-size | mixed-size
    name_prefix: str        # "GRID " on older boards, "NVIDIA " on newer
    create_errno: str       # errno the driver returns when a create finds no room (UNVERIFIED for NVIDIA)
    types: tuple[VgpuType, ...]

    def type_by_id(self, type_id: int) -> VgpuType:
        for t in self.types:
            if t.id == type_id:
                return t
        raise NotFoundError(f"no vGPU type with id {type_id}")


@dataclass(frozen=True)
class SriovSpec:
    total_vfs: int
    vf_device_id: int
    first_vf_offset: int = 4     # VF n sits at devfn PF+offset+n (NVIDIA: function .4 onwards)
    vf_class: int | None = None


@dataclass(frozen=True)
class MdevPoolType:
    """A type of a generic (non-NVIDIA) mdev driver drawing from the parent's shared pool."""

    sysfs_name: str               # the part after "<driver>-" in the type dir name
    name: str | None              # contents of the `name` file (None: core shows the sysfs name)
    description: str | None       # None: the driver has no show_description (file absent)
    device_api: str
    cost: Mapping[str, int]


@dataclass(frozen=True)
class MdevDriverSpec:
    driver: str                   # dev_driver_string(parent): type dirs are "<driver>-<sysfs_name>"
    parent_kind: str              # pci | virtual
    virtual_path: str | None      # for virtual parents: path under sys/devices (e.g. virtual/mtty/mtty)
    pool: Mapping[str, int]
    types: tuple[MdevPoolType, ...]
    create_errno: str             # errno when the pool is exhausted (mtty ENOSPC, mdpy/mbochs ENOMEM)

    def type_dir(self, t: MdevPoolType) -> str:
        return f"{self.driver}-{t.sysfs_name}"


@dataclass(frozen=True)
class GpuModel:
    id: str
    display_name: str
    nvml_name: str | None
    vendor: str                   # nvidia | amd | intel | virtual
    architecture: str | None
    vendor_id: int | None
    device_id: int | None
    subsystem_vendor_id: int | None
    subsystem_device_id: int | None
    pci_class: int | None
    memory_mib: int
    mig: MigGeometry | None = None
    sriov: SriovSpec | None = None
    vgpu: VgpuSpec | None = None
    mdev: MdevDriverSpec | None = None
    aliases: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def is_pci(self) -> bool:
        return self.vendor_id is not None

    @property
    def pci_device_filter(self) -> str | None:
        """mig-parted / vgpu-device-manager ``device-filter`` form: 0xDDDDVVVV."""
        if self.vendor_id is None or self.device_id is None:
            return None
        return f"0x{self.device_id:04X}{self.vendor_id:04X}"

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    def capabilities(self) -> list[str]:
        caps = []
        if self.mig:
            caps.append("mig")
        if self.vgpu:
            caps.append(f"vgpu-{self.vgpu.interface}")
        if self.sriov and not self.vgpu:
            caps.append("sriov-vf")
        if self.mdev:
            caps.append("mdev")
        return caps


# --- MIG profile names -----------------------------------------------------------------------------------
def mig_memory_gb(memory_mib: int, total_bytes: int) -> int:
    """The driver's memory figure in a MIG profile name.

    go-nvlib ``getMigMemorySizeGB``, which an NVIDIA maintainer described as the driver's own calculation
    (NVIDIA/gpu-operator#351): the fraction of memory rounded up to eighths, times the total in whole GiB.
    """
    fraction = math.ceil(memory_mib * MIB / total_bytes * 8) / 8
    # Go's math.Round rounds halves away from zero (H200 3g: 70.5 -> 71); Python's round() would give 70
    return int(math.floor(fraction * math.ceil(total_bytes / GIB) + 0.5))


def mig_profile_name(compute_slices: int, memory_mib: int, total_bytes: int, attributes: Iterable[str] = (),
                     ci_slices: int | None = None) -> str:
    gb = mig_memory_gb(memory_mib, total_bytes)
    attrs = "".join(("+" + a) if not a.startswith("-") else a for a in attributes)
    base = f"{compute_slices}g.{gb}gb{attrs}"
    if ci_slices is not None and ci_slices < compute_slices:
        return f"{ci_slices}c.{base}"
    return base


_PROFILE_RE = re.compile(r"^(?:(?P<c>\d+)c\.)?(?P<g>\d+)g\.(?P<gb>\d+)gb(?P<attrs>(?:[+-][a-z.]+)*)$")


@dataclass(frozen=True)
class ParsedMigName:
    compute_slices: int
    gb: int
    attributes: tuple[str, ...]
    ci_slices: int | None


def parse_mig_name(name: str) -> ParsedMigName:
    m = _PROFILE_RE.match(name.strip().lower())
    if not m:
        raise ProfileError(f"'{name}' is not a MIG profile name (expected <g>g.<N>gb[+me], e.g. 3g.20gb)")
    attrs = tuple(a if a.startswith("-") else a[1:] for a in re.findall(r"[+-][a-z.]+", m.group("attrs")))
    return ParsedMigName(int(m.group("g")), int(m.group("gb")), attrs,
                         int(m.group("c")) if m.group("c") else None)


def resolve_gi_profile(model: GpuModel, name: str) -> GpuInstanceProfile:
    """Resolve a profile name for *this* model, tolerating driver memory rounding (7g.79gb == 7g.80gb).

    Exact names win.  Otherwise the compute slices and attributes must match and the memory figure must be
    within 1 GB (3% on large profiles) of exactly one profile; anything else is refused with the model's valid
    names.
    """
    if model.mig is None:
        raise ProfileError(f"{model.display_name} does not support MIG (profile '{name}')", model=model.id)
    for p in model.mig.gi_profiles:
        if p.name == name.strip().lower():
            return p
    parsed = parse_mig_name(name)
    if parsed.ci_slices is not None:
        raise ProfileError(f"'{name}' names a compute instance, not a GPU instance")
    candidates = []
    for p in model.mig.gi_profiles:
        pp = parse_mig_name(p.name)
        if pp.compute_slices != parsed.compute_slices or pp.attributes != parsed.attributes:
            continue
        diff = abs(pp.gb - parsed.gb)
        # observed drift is 1 GB (7g.79gb/7g.80gb, 3g.39gb/3g.40gb, 1g.23gb/1g.24gb); allow a little more on
        # very large profiles, but never enough to turn 1g.7gb into 1g.5gb
        if diff <= max(1, round(0.03 * pp.gb)):
            candidates.append((diff, p))
    candidates.sort(key=lambda c: c[0])
    if candidates and (len(candidates) == 1 or candidates[0][0] < candidates[1][0]):
        return candidates[0][1]
    valid = ", ".join(p.name for p in model.mig.gi_profiles)
    raise ProfileError(f"unknown MIG profile '{name}' for {model.display_name}; valid: {valid}",
                       model=model.id, profile=name)


def resolve_vgpu_type(model: GpuModel, ref: str) -> VgpuType:
    """Resolve a vGPU type by board name (``A2-2Q``, ``GRID A100-4C``) or id (``nvidia-468``, ``468``)."""
    if model.vgpu is None:
        raise ProfileError(f"{model.display_name} has no NVIDIA vGPU types (type '{ref}')", model=model.id)
    text = ref.strip()
    m = re.fullmatch(r"(?:nvidia-)?(\d+)", text, re.IGNORECASE)
    if m:
        tid = int(m.group(1))
        for t in model.vgpu.types:
            if t.id == tid:
                return t
    else:
        last = text.split()[-1].upper() if text.split() else ""
        for t in model.vgpu.types:
            if t.name.upper() == last:
                return t
    raise ProfileError(f"unknown vGPU type '{ref}' for {model.display_name}", model=model.id, vgpu_type=ref)


# --- loading -----------------------------------------------------------------------------------------------
def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or v is None:
        raise ConfigError(f"catalog: {what} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            pass
    raise ConfigError(f"catalog: {what} must be an integer, got {v!r}")


def _opt_int(v: Any, what: str) -> int | None:
    return None if v is None else _int(v, what)


_KEYS = {
    "model": {"id", "display_name", "nvml_name", "vendor", "architecture", "vendor_id", "device_id",
              "subsystem_vendor_id", "subsystem_device_id", "pci_class", "memory_mib", "mig", "sriov", "vgpu",
              "mdev", "aliases", "notes"},
    "mig": {"memory_slices", "compute_slices", "sm_in_mig", "mode_survives_reboot", "enable_requires_reset",
            "max_mig_devices", "gpu_instance_profiles", "compute_instance_profiles", "driver_placement_order"},
    "gi": {"id", "nvml_constant", "name", "attributes", "compute_slices", "memory_slices", "max_instances",
           "memory_mib", "sm", "engines", "starts"},
    "sriov": {"total_vfs", "vf_device_id", "first_vf_offset", "vf_class"},
    "vgpu": {"interface", "parent", "policy", "name_prefix", "create_errno", "types"},
    "vtype": {"id", "name", "framebuffer_mib", "max_instances", "num_heads", "frl_config", "max_resolution",
              "gpu_instance_profile_id", "mixed_size_max"},
    "mdev": {"driver", "parent_kind", "virtual_path", "pool", "types", "create_errno"},
    "mtype": {"sysfs_name", "name", "description", "device_api", "cost"},
}


def _check_keys(d: Any, kind: str, origin: str) -> None:
    if not isinstance(d, Mapping):
        raise ConfigError(f"catalog {origin}: {kind} entry must be a mapping")
    unknown = set(d) - _KEYS[kind]
    if unknown:
        raise ConfigError(f"catalog {origin}: unknown {kind} key(s): {', '.join(sorted(map(str, unknown)))}")


def _model_from_dict(d: Mapping[str, Any], origin: str) -> GpuModel:
    _check_keys(d, "model", origin)
    for sub, kind in (("mig", "mig"), ("sriov", "sriov"), ("vgpu", "vgpu"), ("mdev", "mdev")):
        if d.get(sub):
            _check_keys(d[sub], kind, origin)
    for p in (d.get("mig") or {}).get("gpu_instance_profiles") or []:
        _check_keys(p, "gi", origin)
    for t in (d.get("vgpu") or {}).get("types") or []:
        _check_keys(t, "vtype", origin)
    for t in (d.get("mdev") or {}).get("types") or []:
        _check_keys(t, "mtype", origin)
    try:
        mid = str(d["id"])
        mig = None
        if d.get("mig"):
            m = d["mig"]
            gis = []
            for p in m["gpu_instance_profiles"]:
                e = p.get("engines") or {}
                gis.append(GpuInstanceProfile(
                    id=_int(p["id"], "gi id"), nvml_constant=_int(p["nvml_constant"], "nvml_constant"),
                    name=str(p["name"]), compute_slices=_int(p["compute_slices"], "compute_slices"),
                    memory_slices=_int(p["memory_slices"], "memory_slices"),
                    max_instances=_int(p["max_instances"], "max_instances"),
                    memory_mib=_int(p["memory_mib"], "memory_mib"), sm=_int(p.get("sm", 0), "sm"),
                    engines=Engines(**{k: int(v or 0) for k, v in e.items()}),
                    starts=tuple(_int(s, "start") for s in p["starts"]),
                    attributes=tuple(p.get("attributes") or ()),
                ))
            cis: dict[int, tuple[ComputeInstanceProfile, ...]] = {}
            for g, lst in (m.get("compute_instance_profiles") or {}).items():
                cis[_int(g, "gi size")] = tuple(
                    ComputeInstanceProfile(_int(c["id"], "ci id"), _int(c["compute_slices"], "ci slices"),
                                           _int(c["max_instances"], "ci max")) for c in lst)
            order = {_int(k, "size"): tuple(_int(s, "start") for s in v)
                     for k, v in (m.get("driver_placement_order") or {}).items()}
            mig = MigGeometry(
                memory_slices=_int(m["memory_slices"], "memory_slices"),
                compute_slices=_int(m["compute_slices"], "compute_slices"),
                sm_in_mig=_int(m.get("sm_in_mig", 0), "sm_in_mig"),
                mode_survives_reboot=bool(m["mode_survives_reboot"]),
                enable_requires_reset=bool(m["enable_requires_reset"]),
                gi_profiles=tuple(gis), ci_profiles=cis, driver_placement_order=order,
                max_mig_devices=_int(m.get("max_mig_devices", m["compute_slices"]), "max_mig_devices"),
            )
        sriov = None
        if d.get("sriov"):
            s = d["sriov"]
            sriov = SriovSpec(total_vfs=_int(s["total_vfs"], "total_vfs"),
                              vf_device_id=_int(s["vf_device_id"], "vf_device_id"),
                              first_vf_offset=_int(s.get("first_vf_offset", 4), "first_vf_offset"),
                              vf_class=_opt_int(s.get("vf_class"), "vf_class"))
        vgpu = None
        if d.get("vgpu"):
            v = d["vgpu"]
            if v["interface"] not in VGPU_INTERFACES:
                raise ConfigError(f"catalog {origin}: vgpu.interface must be one of {VGPU_INTERFACES}")
            if v["policy"] not in VGPU_POLICIES:
                raise ConfigError(f"catalog {origin}: vgpu.policy must be one of {VGPU_POLICIES}")
            types = tuple(VgpuType(
                id=_int(t["id"], "type id"), name=str(t["name"]),
                framebuffer_mib=_int(t["framebuffer_mib"], "framebuffer_mib"),
                max_instances=_int(t["max_instances"], "max_instances"),
                num_heads=_int(t.get("num_heads", 1), "num_heads"),
                frl_config=_int(t.get("frl_config", 60), "frl_config"),
                max_resolution=str(t.get("max_resolution", "4096x2400")),
                gpu_instance_profile_id=_opt_int(t.get("gpu_instance_profile_id"), "gpu_instance_profile_id"),
                mixed_size_max=_opt_int(t.get("mixed_size_max"), "mixed_size_max"),
            ) for t in v["types"])
            vgpu = VgpuSpec(interface=v["interface"], parent=v["parent"], policy=v["policy"],
                            name_prefix=str(v.get("name_prefix", "NVIDIA ")),
                            create_errno=str(v.get("create_errno", "EINVAL")), types=types)
        mdev = None
        if d.get("mdev"):
            md = d["mdev"]
            mdev = MdevDriverSpec(
                driver=str(md["driver"]), parent_kind=str(md.get("parent_kind", "pci")),
                virtual_path=md.get("virtual_path"),
                pool={str(k): _int(v, "pool") for k, v in md["pool"].items()},
                types=tuple(MdevPoolType(sysfs_name=str(t["sysfs_name"]), name=t.get("name"),
                                         description=t.get("description"),
                                         device_api=str(t.get("device_api", "vfio-pci")),
                                         cost={str(k): _int(v, "cost") for k, v in t["cost"].items()})
                            for t in md["types"]),
                create_errno=str(md.get("create_errno", "ENOSPC")))
        return GpuModel(
            id=mid, display_name=str(d.get("display_name", mid)), nvml_name=d.get("nvml_name"),
            vendor=str(d["vendor"]), architecture=d.get("architecture"),
            vendor_id=_opt_int(d.get("vendor_id"), "vendor_id"), device_id=_opt_int(d.get("device_id"), "device_id"),
            subsystem_vendor_id=_opt_int(d.get("subsystem_vendor_id"), "subsystem_vendor_id"),
            subsystem_device_id=_opt_int(d.get("subsystem_device_id"), "subsystem_device_id"),
            pci_class=_opt_int(d.get("pci_class"), "pci_class"), memory_mib=_int(d.get("memory_mib", 0), "memory_mib"),
            mig=mig, sriov=sriov, vgpu=vgpu, mdev=mdev,
            aliases=tuple(str(a) for a in d.get("aliases") or ()), notes=tuple(str(n) for n in d.get("notes") or ()),
        )
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"catalog {origin}: invalid model definition ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, GpuModel] = field(default_factory=dict)

    def get(self, model_id: str) -> GpuModel:
        key = model_id.strip().lower()
        if key in self.models:
            return self.models[key]
        for m in self.models.values():
            if key in (a.lower() for a in m.aliases) or key == m.display_name.lower():
                return m
        raise NotFoundError(f"unknown GPU model '{model_id}'; known: {', '.join(sorted(self.models))}")

    def ids(self) -> list[str]:
        return sorted(self.models)

    def by_pci(self, vendor_id: int, device_id: int) -> GpuModel | None:
        for m in self.models.values():
            if m.vendor_id == vendor_id and m.device_id == device_id:
                return m
        return None

    def by_nvml_name(self, name: str) -> GpuModel | None:
        for m in self.models.values():
            if m.nvml_name and m.nvml_name.lower() == name.lower():
                return m
            if name.lower() in (a.lower() for a in m.aliases):
                return m
        return None

    def by_device_filter(self, device_filter: str) -> GpuModel | None:
        f = device_filter.strip().upper()
        f = f.split(":")[0]
        if f.startswith("0X"):
            f = f[2:]
        for m in self.models.values():
            if m.pci_device_filter and m.pci_device_filter[2:] == f:
                return m
            for alias_id in m_extra_device_ids(m):
                if f"{alias_id:04X}{m.vendor_id or 0:04X}" == f:
                    return m
        return None


def m_extra_device_ids(model: GpuModel) -> list[int]:
    """Other PCI device ids of the same board family (e.g. SXM vs PCIe), from the model's aliases."""
    out = []
    for a in model.aliases:
        mm = re.fullmatch(r"0x([0-9a-fA-F]{4})", a)
        if mm:
            out.append(int(mm.group(1), 16))
    return out


def models_dir_files() -> list[tuple[str, str]]:
    root = importlib.resources.files("gpuvirt._profiles").joinpath("models")
    out = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            out.append((entry.name, entry.read_text(encoding="utf-8")))
    return out


def parse_catalog(files: Iterable[tuple[str, str]]) -> Catalog:
    import yaml  # only here: discovery of hosts without PCI GPUs never needs the catalog

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    models: dict[str, GpuModel] = {}
    for name, text in files:
        try:
            doc = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader, C-accelerated when present
        except yaml.YAMLError as exc:
            raise ConfigError(f"catalog {name}: not valid YAML ({exc})") from exc
        if not isinstance(doc, dict) or "id" not in doc:
            raise ConfigError(f"catalog {name}: expected a mapping with an 'id'")
        model = _model_from_dict(doc, name)
        if model.id in models:
            raise ConfigError(f"catalog {name}: duplicate model id '{model.id}'")
        models[model.id] = model
    return Catalog(models)


@functools.lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    return parse_catalog(models_dir_files())
