"""GPU model catalog: pure data loaded from ``profiles/models/*.yaml`` (shipped as ``gpuvirt._profiles``).

The catalog describes what a board *is*: PCI ids, memory, MIG geometry (GPU-instance and compute-instance
profiles with their placements), SR-IOV shape, the vGPU types the NVIDIA driver registers for it and the
rule that decides how many of each can exist, and for non-NVIDIA mdev drivers (Intel GVT-g, the kernel's
mtty/mdpy/mbochs samples) the shared resource pool their types draw from.

The simulator builds hosts from it; the planner and profile validation reason with it.  Nothing here does
I/O except :func:`load_catalog`, which reads the packaged YAML once (through a cache of the parsed
documents, see :func:`load_catalog_files`).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from gpuvirt.errors import ConfigError, NotFoundError, ProfileError
from gpuvirt.model.catalog_cache import (
    cache_dir,
    digest,
    models_dir_files,
    pci_lookup,
    read_cache,
    write_cache,
)

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
    # Names other drivers print for the same profiles (7g.79gb for 7g.80gb): {alias: profile name}.  Exact,
    # per model: a name is never matched to a profile by closeness, so another board's name cannot slip in.
    name_aliases: Mapping[str, str] = field(default_factory=dict)

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
    family: str = ""              # id of the model file this board comes from ("" = its own id)
    vgpu_prefix: str | None = None   # the board as NVIDIA's vGPU type names spell it (A100X in A100X-1-5C)

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", self.id)

    @property
    def is_variant(self) -> bool:
        """A board variant (PCIe / SXM / NVL / export part) expanded from another model's file."""
        return self.family != self.id

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
    """The GPU-instance profile ``name`` means on *this* model: its exact name, or a name in the model's
    alias table (driver naming drift such as 7g.79gb for 7g.80gb, listed per model in its catalog file).

    Nothing is matched by closeness: a name from another board (GH200's 1g.36gb on an H200, B200's 1g.23gb
    on an H100) is refused, with the model's valid names.
    """
    if model.mig is None:
        raise ProfileError(f"the {model.display_name} does not support MIG (profile '{name}')", model=model.id)
    want = name.strip().lower()
    canonical = model.mig.name_aliases.get(want, want)
    for p in model.mig.gi_profiles:
        if p.name == canonical:
            return p
    parsed = parse_mig_name(name)
    if parsed.ci_slices is not None:
        raise ProfileError(f"'{name}' names a compute instance, not a GPU instance", model=model.id)
    raise ProfileError(f"unknown MIG profile '{name}' for the {model.display_name}; valid: "
                       + ", ".join(p.name for p in model.mig.gi_profiles), model=model.id, profile=name)


def mig_name_known(model: GpuModel, name: str) -> bool:
    """Whether ``name`` is one of the model's GPU-instance profile names or aliases (no error, no parsing)."""
    if model.mig is None:
        return False
    want = name.strip().lower()
    want = model.mig.name_aliases.get(want, want)
    return any(p.name == want for p in model.mig.gi_profiles)


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


# The vGPU type name grammar vgpu-device-manager parses (its pkg/types/vgpu_type.go, read not copied):
# time-sliced "<board>-<GB><series>" (A100X-20C), MIG-backed "<board>-<G>-<GB><series>[ME|NOME|MEALL|GFX]"
# (A100-1-5CME). The board part may itself hold hyphens (RTX6000-Ada-24Q), so it is matched lazily.
_VGPU_NAME_RE = re.compile(r"^(?P<board>.+?)-(?:(?P<g>\d+)-)?(?P<gb>\d+)(?P<series>[ABCQ])"
                           r"(?P<attr>ME|NOME|MEALL|GFX)?$", re.IGNORECASE)
# the GPU-instance attribute each MIG-backed type suffix asks for (names as mig-parted writes profiles)
_VGPU_ATTR_TO_MIG = {"ME": "+me", "NOME": "-me", "MEALL": "+me.all", "GFX": "+gfx"}


@dataclass(frozen=True)
class ParsedVgpuName:
    board: str                   # "A100X"
    gpu_slices: int | None       # G of a MIG-backed type, None for time-sliced
    gb: int
    series: str                  # A | B | C | Q
    attribute: str | None        # ME | NOME | MEALL | GFX

    @property
    def mig_profile(self) -> str | None:
        """The GPU-instance profile a MIG-backed type runs on, named as mig-parted names it (1g.5gb+me).

        vgpu-device-manager derives its MIG layout the same way (<G>g.<GB>gb per MIG-backed type, one GPU
        instance per vGPU); it writes the ME suffix as ".me", which is not a name mig-parted or the driver
        use - gpuvirt writes the driver's "+me" (UNVERIFIED which one the tool's own apply accepts)."""
        if self.gpu_slices is None:
            return None
        return f"{self.gpu_slices}g.{self.gb}gb" + (_VGPU_ATTR_TO_MIG.get(self.attribute or "", "")
                                                    if self.attribute else "")


def parse_vgpu_name(name: str) -> ParsedVgpuName | None:
    """Split an NVIDIA vGPU type name (with or without the "GRID "/"NVIDIA " prefix); None if it is not one."""
    text = name.strip().split()[-1] if name.strip() else ""
    m = _VGPU_NAME_RE.match(text)
    if not m:
        return None
    return ParsedVgpuName(board=m.group("board"), gpu_slices=int(m.group("g")) if m.group("g") else None,
                          gb=int(m.group("gb")), series=m.group("series").upper(),
                          attribute=m.group("attr").upper() if m.group("attr") else None)


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
              "mdev", "aliases", "notes", "vgpu_prefix", "variants", "sources"},
    "variant": {"id", "display_name", "nvml_name", "device_id", "subsystem_vendor_id", "subsystem_device_id",
                "memory_mib", "vgpu_prefix", "aliases", "notes", "pci_class"},
    "mig": {"memory_slices", "compute_slices", "sm_in_mig", "mode_survives_reboot", "enable_requires_reset",
            "max_mig_devices", "gpu_instance_profiles", "compute_instance_profiles", "driver_placement_order",
            "name_aliases"},
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
    for v in d.get("variants") or []:
        _check_keys(v, "variant", origin)
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
            names = {p.name for p in gis}
            aliases: dict[str, str] = {}
            for alias, target in (m.get("name_aliases") or {}).items():
                alias, target = str(alias).strip().lower(), str(target).strip().lower()
                if target not in names:
                    raise ConfigError(f"catalog {origin}: name alias {alias} -> {target}: no such profile")
                if alias in names:
                    raise ConfigError(f"catalog {origin}: name alias {alias} is already a profile name")
                aliases[alias] = target
            mig = MigGeometry(
                memory_slices=_int(m["memory_slices"], "memory_slices"),
                compute_slices=_int(m["compute_slices"], "compute_slices"),
                sm_in_mig=_int(m.get("sm_in_mig", 0), "sm_in_mig"),
                mode_survives_reboot=bool(m["mode_survives_reboot"]),
                enable_requires_reset=bool(m["enable_requires_reset"]),
                gi_profiles=tuple(gis), ci_profiles=cis, driver_placement_order=order,
                max_mig_devices=_int(m.get("max_mig_devices", m["compute_slices"]), "max_mig_devices"),
                name_aliases=aliases,
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
            vgpu_prefix=str(d["vgpu_prefix"]) if d.get("vgpu_prefix") else None,
        )
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"catalog {origin}: invalid model definition ({type(exc).__name__}: {exc})") from exc


def _rename_types(spec: VgpuSpec, old: str, new: str) -> VgpuSpec:
    """The board's vGPU types as another board variant names them (A100-1-5C -> A100X-1-5C).

    Type ids are kept: they are per board in NVIDIA's driver and were captured for one variant only
    (UNVERIFIED for the others, listed in docs/catalog.md)."""
    def rename(t: VgpuType) -> VgpuType:
        if not t.name.upper().startswith(old.upper() + "-"):
            raise ConfigError(f"catalog: vGPU type {t.name} does not start with the board name {old}")
        return replace(t, name=new + t.name[len(old):])
    return replace(spec, types=tuple(rename(t) for t in spec.types))


def _variants(base: GpuModel, raw: Iterable[Any], origin: str) -> list[GpuModel]:
    """Board variants (PCIe / SXM / NVL / export parts) of ``base``: the same MIG geometry, SR-IOV shape
    and vGPU type table under their own PCI identity, NVML name and (where the driver names them so) vGPU
    type prefix.  A variant with other profile names or memory slices is a model of its own, not a variant."""
    out = []
    for v in raw:
        try:
            vid = str(v["id"])
            prefix = v.get("vgpu_prefix", base.vgpu_prefix)
            vgpu = base.vgpu
            if vgpu is not None:
                if not prefix:
                    vgpu = None       # the board's vGPU type names are not known
                elif base.vgpu_prefix and prefix != base.vgpu_prefix:
                    vgpu = _rename_types(vgpu, base.vgpu_prefix, str(prefix))
            out.append(replace(
                base, id=vid, family=base.id, display_name=str(v.get("display_name", vid)),
                nvml_name=v.get("nvml_name"), device_id=_int(v["device_id"], "variant device_id"),
                subsystem_vendor_id=_opt_int(v.get("subsystem_vendor_id", base.subsystem_vendor_id),
                                             "subsystem_vendor_id"),
                subsystem_device_id=_opt_int(v.get("subsystem_device_id"), "subsystem_device_id"),
                pci_class=_opt_int(v.get("pci_class", base.pci_class), "pci_class"),
                memory_mib=_int(v.get("memory_mib", base.memory_mib), "memory_mib"),
                vgpu=vgpu, vgpu_prefix=str(prefix) if prefix else None,
                aliases=tuple(str(a) for a in v.get("aliases") or ()),
                notes=tuple(str(n) for n in v.get("notes") or ())))
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"catalog {origin}: invalid variant ({type(exc).__name__}: {exc})") from exc
    return out


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

    def family(self, model_id: str) -> list[GpuModel]:
        """Every board of one model file: the model itself first, then its variants."""
        fam = self.get(model_id).family
        return sorted((m for m in self.models.values() if m.family == fam), key=lambda m: (m.is_variant, m.id))

    def families(self) -> list[GpuModel]:
        """One model per model file (the file's own board), sorted by id."""
        return [self.models[k] for k in self.ids() if not self.models[k].is_variant]

    def by_pci(self, vendor_id: int, device_id: int, subsystem_vendor_id: int | None = None,
               subsystem_device_id: int | None = None) -> GpuModel | None:
        """The board with this PCI identity (rules: :func:`gpuvirt.model.catalog_cache.pci_lookup`)."""
        row = pci_lookup(self._pci_rows, vendor_id, device_id, subsystem_vendor_id, subsystem_device_id)
        return self.models[row[0]] if row else None

    @functools.cached_property
    def _pci_rows(self) -> list[list[Any]]:
        return pci_rows(self.models.values())

    def by_nvml_name(self, name: str) -> GpuModel | None:
        for m in self.models.values():
            if m.nvml_name and m.nvml_name.lower() == name.lower():
                return m
        for m in self.models.values():
            if name.lower() in (a.lower() for a in m.aliases):
                return m
        return None

    def by_device_filter(self, device_filter: str) -> list[GpuModel]:
        """Every board a mig-parted / vgpu-device-manager ``device-filter`` (0xDDDDVVVV[:0xSSSSVVVV]) admits."""
        dev, _, sub = device_filter.strip().upper().partition(":")
        dev = dev[2:] if dev.startswith("0X") else dev
        sub = sub[2:] if sub.startswith("0X") else sub
        out = []
        for m in self.models.values():
            if m.pci_device_filter is None or m.pci_device_filter[2:] != dev:
                continue
            if sub and m.subsystem_device_id is not None and \
                    f"{m.subsystem_device_id:04X}{m.subsystem_vendor_id or 0:04X}" != sub:
                continue
            out.append(m)
        return sorted(out, key=lambda m: m.id)

    def by_vgpu_prefix(self, prefix: str) -> list[GpuModel]:
        """Boards whose vGPU type names start with ``prefix`` (A100X, H100L, A16), whether or not the
        catalog holds their types."""
        return sorted((m for m in self.models.values() if m.vgpu_prefix and m.vgpu_prefix.upper() == prefix.upper()),
                      key=lambda m: m.id)


def _build(docs: Iterable[tuple[str, Any]]) -> Catalog:
    models: dict[str, GpuModel] = {}
    for name, doc in docs:
        if not isinstance(doc, dict) or "id" not in doc:
            raise ConfigError(f"catalog {name}: expected a mapping with an 'id'")
        model = _model_from_dict(doc, name)
        for m in [model, *_variants(model, doc.get("variants") or (), name)]:
            if m.id in models:
                raise ConfigError(f"catalog {name}: duplicate model id '{m.id}'")
            models[m.id] = m
    return Catalog(models)


def _parse_yaml(files: Iterable[tuple[str, str]]) -> list[tuple[str, Any]]:
    import yaml  # only here: a cached catalog and hosts without PCI GPUs never need the YAML parser

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    docs = []
    for name, text in files:
        try:
            docs.append((name, yaml.load(text, Loader=loader)))  # noqa: S506 - a safe loader
        except yaml.YAMLError as exc:
            raise ConfigError(f"catalog {name}: not valid YAML ({exc})") from exc
    return docs


def parse_catalog(files: Iterable[tuple[str, str]]) -> Catalog:
    return _build(_parse_yaml(files))


def load_catalog_files(files: Sequence[tuple[str, str]], directory: str | None) -> Catalog:
    """The catalog from these YAML files, through the parsed-document cache in ``directory`` (None: none)."""
    if directory is None:
        return parse_catalog(files)
    key = digest(files)
    docs = read_cache(directory, key, "docs")
    if docs is not None and [n for n, _ in docs] == [n for n, _ in files]:
        try:
            return _build(docs)
        except ConfigError:
            pass           # a cache from another loader version: parse the YAML below
    docs = _parse_yaml(files)
    catalog = _build(docs)
    write_cache(directory, key, docs, pci_rows(catalog.models.values()))
    return catalog


def pci_rows(models: Iterable[GpuModel]) -> list[list[Any]]:
    """The PCI identity of every board, as :func:`gpuvirt.model.catalog_cache.pci_lookup` reads it."""
    return [[m.id, m.display_name, m.vendor_id, m.device_id, m.subsystem_vendor_id, m.subsystem_device_id,
             m.sriov.vf_device_id if m.sriov else None, m.vgpu_prefix] for m in models if m.vendor_id is not None]


@functools.lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    return load_catalog_files(models_dir_files(), cache_dir())
