"""Partition profiles (pure): what a GPU should look like, by name.

A :class:`ProfileSpec` is a named list of :class:`ProfileEntry` items.  Each entry says which GPUs it is
for (PCI device filters and GPU indices, as in mig-parted and vgpu-device-manager) and what they should
carry: MIG mode and GPU-instance counts, NVIDIA vGPU types, generic mdev types (GVT-g, kernel samples) or
a number of SR-IOV VFs.  Entries are applied in order and the *last* entry matching a GPU decides its
layout, which is what mig-parted does when it walks a config's entries in order over the same GPU; a GPU
no entry matches is left alone.

:func:`resolve` turns one entry into a :class:`Layout` for one GPU model (profile ids, type ids), checking
every rule of the catalog before anything touches hardware; :func:`validate` runs it for every model an
entry can meet.  Names are exact per model (the model's own names and its alias table; no closeness), and
rejections are :class:`~gpuvirt.errors.ProfileError` with one sentence naming the model: the reason and
the nearest valid alternatives.

Documents (gpuvirt YAML, mig-parted, vgpu-device-manager) are read and written by
:mod:`gpuvirt.model.profile_formats`; per-entry import decisions are :mod:`gpuvirt.model.profile_import`.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from gpuvirt.errors import ProfileError
from gpuvirt.model.catalog import (
    Catalog,
    GpuModel,
    MdevDriverSpec,
    MdevPoolType,
    MigGeometry,
    VgpuType,
    load_catalog,
    mig_name_known,
    parse_vgpu_name,
    resolve_gi_profile,
    resolve_vgpu_type,
)
from gpuvirt.model.mig import Placed, all_valid_multisets, describe_counts, fits, pack_counts
from gpuvirt.model.vgpu_scheduler import SchedulerSpec, board_problem

SPEC_FORMAT = 1                      # version of the stored JSON (ProfileSpec.to_dict); bump on changes
KINDS = ("mig", "vgpu", "mdev", "sriov", "mixed")
MODES = ("vm", "containers")        # what the GPUs a profile is applied to serve (docs/containers.md)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_ALTERNATIVES = 3
MAX_COUNT_NAMES = 256                # names in one count mapping of an entry

_FILTER_RE = re.compile(r"(?:0x)?([0-9a-f]{8})(?::(?:0x)?([0-9a-f]{8}))?", re.IGNORECASE)
_ENTRY_KEYS = ("device_filter", "devices", "mig_enabled", "mig", "vgpu", "mdev", "sriov_vfs", "vgpu_scheduler")


def check_name(name: Any, what: str = "profile name") -> str:
    """A profile name is also a database key, a CLI argument and a mig-parted config name: keep it plain."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ProfileError(f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


# --- entries -------------------------------------------------------------------------------------------------
def normalise_filter(value: Any) -> str:
    """``0x20b010de`` / ``20B010DE`` / ``0x20B010DE:0x134F10DE`` -> ``0x20B010DE[:0x134F10DE]``."""
    if isinstance(value, int) and not isinstance(value, bool):
        # an unquoted 0x20B010DE in YAML arrives as an integer; with a vendor half the intent is obvious
        if not 0x10000 <= value <= 0xFFFFFFFF:
            raise ProfileError(f"device filter {value:#x} is not of the form 0xDDDDVVVV (device id + vendor id); "
                               "quote it in YAML, e.g. '0x20B010DE'")
        value = f"0x{value:08X}"
    if not isinstance(value, str):
        raise ProfileError(f"device filter {value!r} is not a string like 0x20B010DE")
    m = _FILTER_RE.fullmatch(value.strip())
    if not m:
        raise ProfileError(f"device filter '{value}' is not of the form 0xDDDDVVVV[:0xSSSSVVVV] "
                           "(device id + vendor id, optional subsystem), e.g. 0x20B010DE")
    out = "0x" + m.group(1).upper()
    if m.group(2):
        out += ":0x" + m.group(2).upper()
    return out


# Errors about one field of an entry carry ``field`` (and ``key``: the name in a count mapping, the index in
# a list) in their context, so that a document parser can point at the offending key's line.
def _filters(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return (normalise_filter(value),)
        except ProfileError as exc:
            raise ProfileError(exc.message, field="device_filter") from None
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for i, v in enumerate(value):
            try:
                f = normalise_filter(v)
            except ProfileError as exc:
                raise ProfileError(exc.message, field="device_filter", key=i) from None
            if f not in out:
                out.append(f)
        return tuple(out)
    raise ProfileError(f"device filter must be a string or a list of strings, not {value!r}", field="device_filter")


def _devices(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    if isinstance(value, (list, tuple)):
        if not value:
            raise ProfileError("devices is an empty list; write 'all' or list GPU indices", field="devices")
        out: list[int] = []
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ProfileError(f"devices: {v!r} is not a GPU index (a whole number >= 0)", field="devices",
                                   key=i)
            if v not in out:
                out.append(v)
        return tuple(out)
    if isinstance(value, int) and not isinstance(value, bool):
        # mig-parted refuses a bare index too (its issue #44): a list makes the intent unambiguous
        raise ProfileError(f"devices must be 'all' or a list of GPU indices, not a bare number (write [{value}])",
                           field="devices")
    raise ProfileError(f"devices must be 'all' or a list of GPU indices, not {value!r}", field="devices")


def _counts(what: str, value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ProfileError(f"{what} must be a mapping of NAME: COUNT, not {value!r}", field=what)
    if len(value) > MAX_COUNT_NAMES:
        raise ProfileError(f"{what}: {len(value)} names, more than the {MAX_COUNT_NAMES} an entry may list",
                           field=what)
    out: dict[str, int] = {}
    for k, n in value.items():
        if isinstance(k, bool) or not isinstance(k, (str, int)) or not str(k).strip():
            raise ProfileError(f"{what}: {k!r} is not a name", field=what, key=k)
        key = str(k).strip()
        if isinstance(n, bool) or not isinstance(n, int):
            raise ProfileError(f"{what}: the count of '{key}' must be a whole number, not {n!r}", field=what, key=k)
        if n <= 0:
            raise ProfileError(f"{what}: the count of '{key}' must be at least 1 (got {n})", field=what, key=k)
        if key in out:
            raise ProfileError(f"{what}: '{key}' is listed twice", field=what, key=k)
        out[key] = n
    return out


@dataclass(frozen=True)
class ProfileEntry:
    """Which GPUs (device filter + indices) get what (MIG, vGPU, generic mdev, SR-IOV VFs).

    Names and type references are kept as written ("1g.5gb", "A2-2Q", "nvidia-745", "mtty-2"): they are
    resolved per GPU model by :func:`resolve`, because the same name means different profile ids (or
    nothing) on different boards.
    """

    device_filter: tuple[str, ...] = ()
    devices: str | tuple[int, ...] = "all"
    mig_enabled: bool | None = None
    mig: dict[str, int] = field(default_factory=dict)
    vgpu: dict[str, int] = field(default_factory=dict)
    mdev: dict[str, int] = field(default_factory=dict)
    sriov_vfs: int | None = None
    vgpu_scheduler: SchedulerSpec | None = None    # policy for the GPU's time-sliced vGPUs (model/vgpu_scheduler)

    def __post_init__(self) -> None:
        put = object.__setattr__           # frozen: normalise once, here, so every entry is canonical
        put(self, "device_filter", _filters(self.device_filter))
        put(self, "devices", _devices(self.devices))
        if self.mig_enabled is not None and not isinstance(self.mig_enabled, bool):
            raise ProfileError(f"mig_enabled must be true or false, not {self.mig_enabled!r}", field="mig_enabled")
        put(self, "mig", _counts("mig", self.mig))
        put(self, "vgpu", _counts("vgpu", self.vgpu))
        put(self, "mdev", _counts("mdev", self.mdev))
        if self.sriov_vfs is not None and (isinstance(self.sriov_vfs, bool) or not isinstance(self.sriov_vfs, int)
                                           or self.sriov_vfs < 0):
            raise ProfileError(f"sriov_vfs must be a whole number >= 0, not {self.sriov_vfs!r}", field="sriov_vfs")
        put(self, "vgpu_scheduler", SchedulerSpec.from_value(self.vgpu_scheduler))
        if self.mig_enabled is False and self.mig:
            raise ProfileError("MIG instances are listed while mig_enabled is false; drop them or enable MIG",
                               field="mig_enabled")
        if self.mig and self.mig_enabled is None:
            put(self, "mig_enabled", True)      # instances imply MIG mode; one spelling per meaning
        if not self.kinds:
            raise ProfileError("the entry asks for nothing: give mig_enabled, mig, vgpu, mdev, sriov_vfs or "
                               "vgpu_scheduler")

    def __hash__(self) -> int:
        return hash((self.device_filter, self.devices, self.mig_enabled, tuple(self.mig.items()),
                     tuple(self.vgpu.items()), tuple(self.mdev.items()), self.sriov_vfs, self.vgpu_scheduler))

    @property
    def kinds(self) -> set[str]:
        out = set()
        if self.mig or self.mig_enabled is not None:
            out.add("mig")
        if self.vgpu or self.vgpu_scheduler is not None:
            out.add("vgpu")
        if self.mdev:
            out.add("mdev")
        if self.sriov_vfs is not None:
            out.add("sriov")
        return out

    def matches_model(self, model: GpuModel, subsystem: str | None = None) -> bool:
        """Whether the device filter admits this board (its own PCI id, as mig-parted compares it).

        The subsystem half of a filter is compared only with ``subsystem``, the id a real GPU reports
        (``0xSSSSVVVV``); without one (a catalog board, not a GPU) that half is not checked."""
        if not self.device_filter:
            return True
        ids = model.pci_device_filter
        if ids is None:
            return False
        sub = normalise_filter(subsystem).split(":")[0] if subsystem else None
        for f in self.device_filter:
            dev, _, want_sub = f.partition(":")
            if dev == ids and (not want_sub or sub is None or sub == want_sub):
                return True
        return False

    def vgpu_boards(self) -> set[str]:
        """The boards this entry's vGPU types name (``A100X`` for A100X-1-5C), upper-case; ids name none."""
        out = set()
        for ref in self.vgpu:
            parsed = parse_vgpu_name(ref)
            if parsed is not None:
                out.add(parsed.board.upper())
        return out

    def for_board(self, model: GpuModel) -> bool:
        """False when the entry's vGPU types are another board's (their names carry the board).

        This tells apart boards that share a PCI device id - the A2 and the A16 both report 10de:25b6, and
        NVIDIA's vgpu-device-manager ``default`` config has an A16-8Q and an A2-8Q entry for 0x25B610DE:
        each GPU takes the entry written for its board.  (vgpu-device-manager itself applies both entries
        to both boards and fails on the second.)"""
        boards = self.vgpu_boards()
        return not boards or model.vgpu_prefix is None or model.vgpu_prefix.upper() in boards

    def matches(self, model: GpuModel, index: int | None, subsystem: str | None = None) -> bool:
        """Whether this entry applies to GPU ``index`` of ``model``; index None matches only ``devices: all``."""
        if not self.matches_model(model, subsystem) or not self.for_board(model):
            return False
        if self.devices == "all":
            return True
        return index is not None and index in self.devices

    def overlaps(self, other: "ProfileEntry") -> bool:
        """Whether some GPU could be selected by both entries (filters and indices intersect)."""
        if self.device_filter and other.device_filter:
            mine = {f.split(":")[0] for f in self.device_filter}
            if not mine & {f.split(":")[0] for f in other.device_filter}:
                return False
        if self.devices != "all" and other.devices != "all" and not set(self.devices) & set(other.devices):
            return False
        mine_b, other_b = self.vgpu_boards(), other.vgpu_boards()
        return not (mine_b and other_b and not mine_b & other_b)

    def describe(self) -> str:
        parts = []
        if self.mig_enabled is False:
            parts.append("MIG off")
        elif self.mig:
            parts.append("MIG " + _join_named(self.mig))
        elif self.mig_enabled:
            parts.append("MIG on, no instances")
        if self.vgpu:
            parts.append("vGPU " + _join_named(self.vgpu))
        if self.mdev:
            parts.append("mdev " + _join_named(self.mdev))
        if self.sriov_vfs is not None:
            parts.append(f"{self.sriov_vfs} VFs")
        if self.vgpu_scheduler is not None:
            parts.append(self.vgpu_scheduler.describe())
        text = ", ".join(parts)
        where = []
        if self.devices != "all":
            where.append("GPUs " + ",".join(str(i) for i in self.devices))
        if self.device_filter:
            where.append("filter " + ",".join(self.device_filter))
        return (" ".join(where) + ": " + text) if where else text

    def to_dict(self) -> dict[str, Any]:
        d = {"device_filter": list(self.device_filter),
             "devices": self.devices if self.devices == "all" else list(self.devices),
             "mig_enabled": self.mig_enabled, "mig": dict(self.mig), "vgpu": dict(self.vgpu),
             "mdev": dict(self.mdev), "sriov_vfs": self.sriov_vfs}
        if self.vgpu_scheduler is not None:
            # only when set: a gpuvirt that predates the key still reads every other stored profile
            d["vgpu_scheduler"] = self.vgpu_scheduler.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProfileEntry":
        if not isinstance(d, Mapping):
            raise ProfileError(f"an entry must be a mapping, not {d!r}")
        unknown = set(d) - set(_ENTRY_KEYS)
        if unknown:
            raise ProfileError(f"unknown entry field(s) {', '.join(sorted(map(str, unknown)))} "
                               f"(known: {', '.join(_ENTRY_KEYS)})")
        return cls(device_filter=d.get("device_filter"), devices=d.get("devices", "all"),  # type: ignore[arg-type]
                   mig_enabled=d.get("mig_enabled"), mig=d.get("mig"), vgpu=d.get("vgpu"),  # type: ignore[arg-type]
                   mdev=d.get("mdev"), sriov_vfs=d.get("sriov_vfs"),  # type: ignore[arg-type]
                   vgpu_scheduler=d.get("vgpu_scheduler"))  # type: ignore[arg-type]


def _join_named(counts: Mapping[str, int]) -> str:
    return " + ".join(name if n == 1 else f"{n}x {name}" for name, n in counts.items())


# --- specs ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileSpec:
    """A named partition profile.  ``model`` (a catalog id) pins it to one board; without it, it must fit
    every model it is applied to.  ``source`` says where it came from (user, builtin, mig-parted:FILE...)."""

    name: str
    description: str | None = None
    model: str | None = None
    entries: tuple[ProfileEntry, ...] = ()
    source: str = "user"
    mode: str = "vm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        if not self.entries:
            raise ProfileError(f"profile '{self.name}' has no entries")
        if self.mode is None:
            object.__setattr__(self, "mode", "vm")
        if self.mode not in MODES:
            raise ProfileError(f"profile '{self.name}': mode must be one of {', '.join(MODES)}, not {self.mode!r}",
                               field="mode")
        if self.mode == "containers":
            for i, e in enumerate(self.entries):
                vm_only = [k for k, there in (("vGPU types", e.vgpu), ("mdev types", e.mdev),
                                              ("SR-IOV VFs", e.sriov_vfs is not None)) if there]
                if vm_only:
                    where = f" entry {i + 1}" if len(self.entries) > 1 else ""
                    raise ProfileError(f"profile '{self.name}'{where}: {' and '.join(vm_only)} serve VMs, not "
                                       "containers; a containers profile holds MIG instances (GPU instance + compute "
                                       "instance) or MIG off for the whole GPU", field="mode")

    @property
    def kind(self) -> str:
        kinds: set[str] = set()
        for e in self.entries:
            kinds |= e.kinds
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def entry_for(self, model: GpuModel, index: int | None, subsystem: str | None = None) -> ProfileEntry | None:
        """The entry that decides GPU ``index`` of ``model``: the LAST matching one; None leaves it alone.

        mig-parted walks a config's entries in order and applies each to every GPU it selects, so when
        two entries select the same GPU the later one is what the GPU ends up with, and a GPU no entry
        selects is not touched.
        """
        found = None
        for e in self.entries:
            if e.matches(model, index, subsystem):
                found = e
        return found

    def summary(self) -> str:
        return " | ".join(e.describe() for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (``profiles.spec`` JSON column); docs/profile-format.md describes it."""
        return {"format": SPEC_FORMAT, "name": self.name, "description": self.description, "model": self.model,
                "source": self.source, "kind": self.kind, "mode": self.mode,
                "entries": [e.to_dict() for e in self.entries]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProfileSpec":
        if not isinstance(d, Mapping):
            raise ProfileError("stored profile spec is not a mapping")
        fmt = d.get("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise ProfileError(f"profile '{d.get('name')}' is stored in spec format {fmt!r}; this gpuvirt "
                               f"reads format {SPEC_FORMAT}")
        entries = d.get("entries")
        if not isinstance(entries, list):
            raise ProfileError(f"profile '{d.get('name')}': stored spec has no entries list")
        return cls(name=str(d.get("name") or ""), description=d.get("description"), model=d.get("model"),
                   entries=tuple(ProfileEntry.from_dict(e) for e in entries), source=str(d.get("source") or "user"),
                   mode=d.get("mode") or "vm")


# --- layouts -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """What one GPU of one model should carry, in the ids the host layer uses.

    ``mig_enabled`` None means the profile does not care about MIG mode (no MIG on the board, or an entry
    that only asks for generic mdevs or SR-IOV VFs); otherwise the GPU must be in that mode.  The GPU carries exactly the MIG
    GPU instances in ``mig_counts`` ({GI profile id: n}), the vGPUs in ``vgpu`` ({type id: n}) and the
    generic mdevs in ``mdev`` ({type dir: n}); ``sriov_vfs`` None leaves the VF count alone;
    ``vgpu_scheduler`` None leaves the GPU's vGPU scheduler policy alone.
    """

    model: str
    mig_enabled: bool | None = None
    mig_counts: dict[int, int] = field(default_factory=dict)
    vgpu: dict[int, int] = field(default_factory=dict)
    mdev: dict[str, int] = field(default_factory=dict)
    sriov_vfs: int | None = None
    vgpu_scheduler: SchedulerSpec | None = None
    gpu_model: GpuModel | None = field(default=None, compare=False, repr=False)

    def _model(self) -> GpuModel:
        return self.gpu_model if self.gpu_model is not None else load_catalog().get(self.model)

    def mig_placements(self) -> list[Placed]:
        """Explicit placements of ``mig_counts`` on an empty GPU (larger instances first, lowest starts)."""
        m = self._model()
        if not self.mig_counts or m.mig is None:
            return []
        placed = pack_counts(m.mig, self.mig_counts)
        if placed is None:  # resolve() only builds layouts that fit
            raise ProfileError(f"MIG layout {describe_counts(m.mig, self.mig_counts)} does not fit the "
                               f"{m.display_name}")
        return placed

    def describe(self) -> str:
        m = self._model()
        parts = []
        if self.mig_enabled is False:
            parts.append("MIG off")
        elif self.mig_enabled:
            parts.append("MIG on: " + (describe_counts(m.mig, self.mig_counts) if m.mig and self.mig_counts
                                        else "no instances"))
        if self.vgpu and m.vgpu:
            parts.append("vGPU " + " + ".join(
                (f"{n}x " if n > 1 else "") + f"{m.vgpu.type_by_id(t).name} ({m.vgpu.type_by_id(t).sysfs_id})"
                for t, n in self.vgpu.items()))
        if self.mdev:
            parts.append("mdev " + _join_named(self.mdev))
        if self.sriov_vfs is not None:
            parts.append(f"{self.sriov_vfs} SR-IOV VFs")
        if self.vgpu_scheduler is not None:
            parts.append(self.vgpu_scheduler.describe())
        return "; ".join(parts) if parts else "nothing"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "mig_enabled": self.mig_enabled,
                "mig_counts": {str(k): v for k, v in self.mig_counts.items()},
                "vgpu": {str(k): v for k, v in self.vgpu.items()}, "mdev": dict(self.mdev),
                "sriov_vfs": self.sriov_vfs,
                "vgpu_scheduler": self.vgpu_scheduler.to_dict() if self.vgpu_scheduler else None,
                "description": self.describe()}


def resolve(entry: ProfileEntry, model: GpuModel) -> Layout:
    """The layout ``entry`` asks for on one GPU of ``model``; ProfileError (one sentence) when it can't be.

    MIG mode follows from the entry when it does not say: MIG instances or MIG-backed vGPU types need it
    on, time-sliced vGPU types need it off (the driver offers them only with MIG disabled).
    """
    disp = model.display_name
    mig_enabled = entry.mig_enabled
    if (entry.mig or entry.mig_enabled) and model.mig is None:
        what = _join_named(entry.mig) if entry.mig else "MIG mode"
        raise ProfileError(f"the {disp} does not support MIG (asked for {what})", model=model.id)
    if model.mig is None:
        mig_enabled = None          # "mig-enabled: false" on a board without MIG: nothing to do, like mig-parted
    mig_counts: dict[int, int] = {}
    if entry.mig:
        mig_counts = _resolve_mig(entry.mig, model)
        mig_enabled = True
    vgpu: dict[int, int] = {}
    if entry.vgpu:
        vgpu, mig_backed = _resolve_vgpu(entry, model, mig_counts)
        if mig_backed:
            mig_enabled = True
        else:
            if mig_counts or entry.mig_enabled:
                raise ProfileError(f"time-sliced vGPU types ({_join_named(entry.vgpu)}) run only with MIG mode "
                                   f"off on the {disp}; drop the MIG part or use MIG-backed types",
                                   model=model.id)
            if model.mig is not None:
                mig_enabled = False
    if entry.vgpu_scheduler is not None:
        mig_enabled = _resolve_scheduler(entry, model, mig_enabled, vgpu)
    mdev = _resolve_mdev(entry.mdev, model) if entry.mdev else {}
    if entry.sriov_vfs is not None:
        if model.sriov is None:
            raise ProfileError(f"the {disp} has no SR-IOV virtual functions (asked for {entry.sriov_vfs} VFs)",
                               model=model.id)
        if entry.sriov_vfs > model.sriov.total_vfs:
            raise ProfileError(f"{entry.sriov_vfs} VFs exceed the {disp}'s maximum of {model.sriov.total_vfs}; "
                               f"valid: 0 to {model.sriov.total_vfs}", model=model.id)
    return Layout(model=model.id, mig_enabled=mig_enabled, mig_counts=mig_counts, vgpu=vgpu, mdev=mdev,
                  sriov_vfs=entry.sriov_vfs, vgpu_scheduler=entry.vgpu_scheduler, gpu_model=model)


def _resolve_scheduler(entry: ProfileEntry, model: GpuModel, mig_enabled: bool | None,
                       vgpu: Mapping[int, int]) -> bool | None:
    """The MIG mode a scheduler policy needs: off.  Policies apply to time-sliced vGPUs only (NVIDIA's vGPU
    documentation), so an entry with MIG instances, MIG mode or MIG-backed types cannot have one."""
    spec = entry.vgpu_scheduler
    assert spec is not None
    why = board_problem(model, spec)
    if why:
        raise ProfileError(why, model=model.id, field="vgpu_scheduler")
    assert model.vgpu is not None
    backed = [model.vgpu.type_by_id(t).name for t in vgpu if model.vgpu.type_by_id(t).mig_backed]
    if backed or mig_enabled:
        what = f"MIG-backed vGPU types ({', '.join(backed)})" if backed else "MIG mode"
        raise ProfileError(f"the {spec.describe()} applies to time-sliced vGPUs only, the entry asks for {what} on "
                           f"the {model.display_name}; drop vgpu_scheduler or use time-sliced types with MIG off",
                           model=model.id, field="vgpu_scheduler")
    return False if model.mig is not None else mig_enabled


# --- MIG -----------------------------------------------------------------------------------------------------
def _resolve_mig(names: Mapping[str, int], model: GpuModel) -> dict[int, int]:
    geom = model.mig
    assert geom is not None
    disp = model.display_name
    counts: dict[int, int] = {}
    written: dict[int, str] = {}
    for name, n in names.items():
        try:
            prof = resolve_gi_profile(model, name)
        except ProfileError:
            raise ProfileError(f"unknown MIG profile '{name}' for the {disp}; valid: "
                               + ", ".join(p.name for p in geom.gi_profiles), model=model.id, profile=name) from None
        if prof.id in counts:
            raise ProfileError(f"'{written[prof.id]}' and '{name}' both name {prof.name} on the {disp}; list it "
                               "once with the total count", model=model.id)
        if n <= 0:
            raise ProfileError(f"the count of {prof.name} must be at least 1 (got {n})", model=model.id)
        counts[prof.id] = n
        written[prof.id] = name
    reason = mig_problem(geom, counts, disp)
    if reason:
        alts = nearest_mig_layouts(geom, counts)
        raise ProfileError(reason + ("; valid: " + ", ".join(alts) if alts else ""), model=model.id)
    return counts


def mig_problem(geom: MigGeometry, counts: Mapping[int, int], gpu_name: str = "GPU") -> str | None:
    """Why ``counts`` ({GI profile id: n}) does not fit one empty GPU, or None when it does."""
    desc = describe_counts(geom, counts)
    for pid, n in counts.items():
        prof = geom.profile(pid)
        if n > prof.max_instances:
            return (f"{desc} exceeds the {gpu_name}'s limit of {prof.max_instances} {prof.name} "
                    f"instance{'s' if prof.max_instances != 1 else ''}")
    compute = sum(geom.profile(p).compute_slices * n for p, n in counts.items())
    if compute > geom.compute_slices:
        return f"{desc} needs {compute} compute slices, the {gpu_name} has {geom.compute_slices}"
    memory = sum(geom.profile(p).memory_slices * n for p, n in counts.items())
    if memory > geom.memory_slices:
        return f"{desc} needs {memory} memory slices, the {gpu_name} has {geom.memory_slices}"
    if not fits(geom, counts):
        return (f"{desc} has no placement without overlapping memory slices on the {gpu_name} "
                "(each profile may start only at its documented slices)")
    return None


_MULTISETS: dict[Any, list[Counter]] = {}


def _valid_multisets(geom: MigGeometry) -> list[Counter]:
    # catalogs are immutable; the profile table identifies the geometry (MigGeometry itself holds dicts)
    key = (geom.memory_slices, geom.compute_slices, geom.gi_profiles)
    if key not in _MULTISETS:
        _MULTISETS[key] = all_valid_multisets(geom)
    return _MULTISETS[key]


def nearest_mig_layouts(geom: MigGeometry, counts: Mapping[int, int], limit: int = MAX_ALTERNATIVES) -> list[str]:
    """Valid layouts closest to ``counts``, best first, as ``describe_counts`` strings.

    Distance is the number of single-instance edits (remove, add, or swap one for another) turning the
    request into the layout.  Among equally distant layouts the one whose compute and memory slices are
    closest to the request's wins (a swap for a same-sized profile beats a swap for a bigger one), then a
    sub-multiset of the request (it only drops instances), then the one using more compute.
    """
    req = Counter({p: n for p, n in counts.items() if n > 0})

    def size(c: Counter) -> tuple[int, int]:
        return (sum(geom.profile(p).compute_slices * n for p, n in c.items()),
                sum(geom.profile(p).memory_slices * n for p, n in c.items()))

    req_compute, req_memory = size(req)

    def key(c: Counter) -> tuple:
        removed = sum((req - c).values())
        added = sum((c - req).values())
        compute, memory = size(c)
        return (max(removed, added), abs(compute - req_compute) + abs(memory - req_memory), added > 0,
                -compute, describe_counts(geom, c))

    ranked = sorted((c for c in _valid_multisets(geom) if c != req), key=key)
    return [describe_counts(geom, c) for c in ranked[:limit]]


# --- vGPU ----------------------------------------------------------------------------------------------------
def _resolve_vgpu(entry: ProfileEntry, model: GpuModel,
                  mig_counts: Mapping[int, int]) -> tuple[dict[int, int], bool]:
    disp = model.display_name
    spec = model.vgpu
    if spec is None:
        raise ProfileError(f"the {disp} has no NVIDIA vGPU types (asked for {_join_named(entry.vgpu)})",
                           model=model.id)
    chosen: list[tuple[VgpuType, int]] = []
    written: dict[int, str] = {}
    for ref, n in entry.vgpu.items():
        try:
            t = resolve_vgpu_type(model, ref)
        except ProfileError:
            parsed = parse_vgpu_name(ref)
            if parsed is not None and model.vgpu_prefix and parsed.board.upper() != model.vgpu_prefix.upper():
                raise ProfileError(f"vGPU type '{ref}' is a type of the {parsed.board} board, not of the {disp} "
                                   f"(whose types are {model.vgpu_prefix}-*)", model=model.id,
                                   vgpu_type=ref) from None
            raise ProfileError(f"unknown vGPU type '{ref}' for the {disp}; valid: "
                               + ", ".join(t.name for t in spec.types), model=model.id, vgpu_type=ref) from None
        if t.id in written:
            raise ProfileError(f"'{written[t.id]}' and '{ref}' both name {t.name} ({t.sysfs_id}) on the {disp}; "
                               "list it once with the total count", model=model.id)
        if n <= 0:
            raise ProfileError(f"the count of {t.name} must be at least 1 (got {n})", model=model.id)
        written[t.id] = ref
        chosen.append((t, n))
    desc = " + ".join(f"{n}x {t.name}" if n > 1 else t.name for t, n in chosen)
    backed = [(t, n) for t, n in chosen if t.mig_backed]
    sliced = [(t, n) for t, n in chosen if not t.mig_backed]
    if backed and sliced:
        raise ProfileError(f"{desc} mixes time-sliced and MIG-backed vGPU types, which never share a GPU; "
                           f"valid: {_vdesc(sliced)}, or {_vdesc(backed)}", model=model.id)
    mixed_mode = spec.policy == "mixed-size"
    for t, n in chosen:
        cap = t.mixed_size_max if mixed_mode and t.mixed_size_max is not None else t.max_instances
        if n > cap:
            raise ProfileError(f"{n}x {t.name} exceeds the {disp}'s maximum of {cap} {t.name} vGPUs; "
                               f"valid: {cap}x {t.name}", model=model.id)
    total = sum(n for _, n in chosen)
    if backed and entry.mig_enabled is False:
        raise ProfileError(f"MIG-backed vGPU types ({_vdesc(backed)}) need MIG mode on, the entry sets "
                           "mig_enabled: false", model=model.id)
    if backed:
        need: Counter = Counter()
        for t, n in backed:
            need[t.gpu_instance_profile_id] += n
        assert model.mig is not None
        for gi_pid, n in need.items():
            have = mig_counts.get(gi_pid, 0)   # type: ignore[arg-type]
            if n > have:
                prof = model.mig.profile(gi_pid)  # type: ignore[arg-type]
                alt = f"add {prof.name}={n} to its MIG part" + (f", or ask for at most {have}" if have else "")
                raise ProfileError(f"{desc} needs {n} GPU instance{'s' if n != 1 else ''} of {prof.name} (one vGPU "
                                   f"per GPU instance), the entry creates {have}; valid: {alt}", model=model.id)
    elif spec.policy == "same-type" and len(sliced) > 1:
        raise ProfileError(f"the {disp} runs one vGPU type at a time (same-type policy), the entry asks for "
                           f"{desc}; valid: " + ", ".join(_vdesc([c]) for c in sliced), model=model.id)
    elif spec.policy == "same-size":
        sizes = sorted({t.framebuffer_mib for t, _ in sliced})
        if len(sizes) > 1:
            groups = [[(t, n) for t, n in sliced if t.framebuffer_mib == s] for s in sizes]
            raise ProfileError(f"the {disp} runs vGPU types of one framebuffer size at a time (same-size policy), "
                               f"{desc} mixes " + " and ".join(f"{s} MiB" for s in sizes)
                               + "; valid: " + ", ".join(_vdesc(g) for g in groups), model=model.id)
        cap = min(t.max_instances for t, _ in sliced)
        if total > cap:
            alt = f"{cap}x {sliced[0][0].name}" if len(sliced) == 1 else f"at most {cap} of them in total"
            raise ProfileError(f"{desc} is {total} vGPUs of {sizes[0]} MiB, the {disp} holds at most {cap}; "
                               f"valid: {alt}", model=model.id)
    elif mixed_mode:
        fb = sum(t.framebuffer_mib * n for t, n in sliced)
        if fb > model.memory_mib:
            raise ProfileError(f"{desc} needs {fb} MiB of framebuffer, the {disp} has {model.memory_mib} MiB; "
                               "valid: " + ", ".join(_vdesc([(t, min(n, model.memory_mib // t.framebuffer_mib))])
                                                      for t, n in sliced), model=model.id)
    if spec.parent == "vf":
        if model.sriov is None:
            raise ProfileError(f"the {disp} hosts vGPUs on SR-IOV VFs but the catalog gives it none",
                               model=model.id)
        vfs = entry.sriov_vfs if entry.sriov_vfs is not None else model.sriov.total_vfs
        if total > vfs:
            where = "the entry enables" if entry.sriov_vfs is not None else f"the {disp} has"
            raise ProfileError(f"{desc} needs {total} VFs (each VF hosts one vGPU), {where} {vfs}; "
                               f"valid: at most {vfs} vGPUs", model=model.id)
    return {t.id: n for t, n in chosen}, bool(backed)


def _vdesc(items: Sequence[tuple[VgpuType, int]]) -> str:
    return " + ".join(f"{n}x {t.name}" if n > 1 else t.name for t, n in items)


# --- generic mdev ----------------------------------------------------------------------------------------------
def _registered(spec: MdevDriverSpec) -> list[MdevPoolType]:
    # a driver does not offer a type one instance of which exceeds the whole pool (GVT-g)
    return [t for t in spec.types if all(spec.pool.get(r, 0) >= c for r, c in t.cost.items())]


def find_mdev_type(spec: MdevDriverSpec, ref: str) -> MdevPoolType | None:
    want = ref.strip().lower()
    for t in spec.types:
        if want in (spec.type_dir(t).lower(), t.sysfs_name.lower(), (t.name or "").lower()):
            return t
    return None


def _resolve_mdev(refs: Mapping[str, int], model: GpuModel) -> dict[str, int]:
    disp = model.display_name
    spec = model.mdev
    if spec is None:
        raise ProfileError(f"the {disp} has no generic mdev types (asked for {_join_named(refs)})", model=model.id)
    offered = _registered(spec)
    valid = ", ".join(spec.type_dir(t) for t in offered)
    chosen: list[tuple[MdevPoolType, int]] = []
    for ref, n in refs.items():
        t = find_mdev_type(spec, ref)
        if t is None:
            raise ProfileError(f"unknown mdev type '{ref}' for the {disp}; valid: {valid}", model=model.id)
        if t not in offered:
            raise ProfileError(f"the {disp} does not offer {spec.type_dir(t)} (one instance needs more than its "
                               f"whole pool); valid: {valid}", model=model.id)
        if any(c is t for c, _ in chosen):
            raise ProfileError(f"mdev type {spec.type_dir(t)} is listed twice", model=model.id)
        if n <= 0:
            raise ProfileError(f"the count of {spec.type_dir(t)} must be at least 1 (got {n})", model=model.id)
        chosen.append((t, n))
    for res, size in spec.pool.items():
        used = sum(t.cost.get(res, 0) * n for t, n in chosen)
        if used > size:
            desc = " + ".join(f"{n}x {spec.type_dir(t)}" if n > 1 else spec.type_dir(t) for t, n in chosen)
            alts = ", ".join(f"{_pool_max(spec, t)}x {spec.type_dir(t)}" for t, _ in chosen)
            raise ProfileError(f"{desc} needs {used} {res} from a pool of {size} on the {disp}; valid: {alts}",
                               model=model.id)
    return {spec.type_dir(t): n for t, n in chosen}


def _pool_max(spec: MdevDriverSpec, t: MdevPoolType) -> int:
    return min(spec.pool.get(r, 0) // c for r, c in t.cost.items() if c > 0)


# --- validation ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    entry: int          # index into spec.entries
    model: str          # catalog id
    layout: Layout


@dataclass
class ValidationReport:
    checks: list[Check] = field(default_factory=list)
    unmatched_filters: list[tuple[int, str]] = field(default_factory=list)   # (entry, filter) naming no model
    unchecked: list[tuple[int, str]] = field(default_factory=list)           # (entry, why it was not checked)

    @property
    def models(self) -> list[str]:
        return sorted({c.model for c in self.checks})

    def warnings(self) -> list[str]:
        return ([f"entry {i + 1}: device filter {f} matches no GPU model in the catalog; it was not validated"
                 for i, f in self.unmatched_filters]
                + [f"entry {i + 1}: {why}" for i, why in self.unchecked])


def _model_pool(models: Catalog | Iterable[GpuModel] | None) -> list[GpuModel]:
    if models is None:
        models = load_catalog()
    if isinstance(models, Catalog):
        return [models.models[k] for k in models.ids()]
    return list(models)


def _could_meet(entry: ProfileEntry, model: GpuModel) -> bool:
    """Whether ``entry`` means anything on ``model`` (every name it uses exists there, exactly)."""
    if entry.mig or entry.mig_enabled is not None:
        if model.mig is None:
            return False
        if not all(mig_name_known(model, name) for name in entry.mig):
            return False
    if entry.vgpu:
        if model.vgpu is None or not entry.for_board(model):
            return False
        for ref in entry.vgpu:
            try:
                resolve_vgpu_type(model, ref)
            except ProfileError:
                return False
    if entry.mdev:
        if model.mdev is None or any(find_mdev_type(model.mdev, r) is None for r in entry.mdev):
            return False
    if entry.sriov_vfs is not None and model.sriov is None:
        return False
    if entry.vgpu_scheduler is not None and board_problem(model, entry.vgpu_scheduler):
        return False
    return True


def _nobody_has(entry: ProfileEntry, pool: Sequence[GpuModel]) -> str:
    """The first name of ``entry`` that no model knows (for the error when an entry can meet no model)."""
    for name in entry.mig:
        if not any(mig_name_known(m, name) for m in pool):
            return f"no GPU model in the catalog has a MIG profile named '{name}'"
    for ref in entry.vgpu:
        if not any(_could_meet(ProfileEntry(vgpu={ref: 1}), m) for m in pool):
            return f"no GPU model in the catalog has a vGPU type '{ref}'"
    for ref in entry.mdev:
        if not any(_could_meet(ProfileEntry(mdev={ref: 1}), m) for m in pool):
            return f"no GPU model in the catalog has an mdev type '{ref}'"
    return f"no GPU model in the catalog supports all of it ({entry.describe()})"


def untyped_boards(entry: ProfileEntry, pool: Sequence[GpuModel]) -> list[GpuModel]:
    """Boards of the catalog that the entry's vGPU type names point at but whose vGPU types the catalog
    does not hold (A100D-40C names the A100 80GB PCIe): the entry can be kept, unvalidated, with a warning."""
    boards = entry.vgpu_boards()
    if not boards or len(boards) != len(entry.vgpu):
        return []
    named = [m for m in pool if m.vgpu_prefix and m.vgpu_prefix.upper() in boards]
    if not named or any(m.vgpu is not None for m in named):
        return []
    if entry.device_filter:
        named = [m for m in named if entry.matches_model(m)]
    return named


def _one_per_family(models: Sequence[GpuModel], entry: ProfileEntry) -> list[GpuModel]:
    """One board per model file: boards of one file share every rule, so checking one is checking all.
    The file's own board is preferred, then the first board on which every name of the entry exists."""
    by_family: dict[str, list[GpuModel]] = {}
    for m in models:
        by_family.setdefault(m.family, []).append(m)
    out = []
    for fam in sorted(by_family):
        members = sorted(by_family[fam], key=lambda m: (m.is_variant, m.id))
        out.append(next((m for m in members if _could_meet(entry, m)), members[0]))
    return out


def candidate_models(spec: ProfileSpec, index: int, pool: Sequence[GpuModel]
                     ) -> tuple[list[GpuModel], list[str], list[str]]:
    """Models entry ``index`` must be valid on, its device filters that name no known model, and why it is
    not checked at all (vGPU types of a known board the catalog holds no types for).

    The spec's model (all boards of its file when it is a file's id) if it has one; else the boards its
    device filters name; else every board on which every name of the entry exists exactly (a MIG entry
    naming ``1g.5gb`` can meet an A100-40GB, not an H100, whose 1-slice profile is ``1g.10gb``).  Boards of
    one model file are checked once.
    """
    entry = spec.entries[index]
    label = _entry_label(spec, index)
    if spec.model:
        want = spec.model.strip().lower()
        m = next((m for m in pool if m.id == want), None) or next(
            (m for m in pool if want == m.display_name.lower() or want in (a.lower() for a in m.aliases)), None)
        if m is None:
            raise ProfileError(f"profile '{spec.name}' is for model '{spec.model}', which the catalog does not know")
        boards = [m] if m.is_variant else [b for b in pool if b.family == m.family]
        hit = [b for b in boards if entry.matches_model(b)]
        if not hit:
            raise ProfileError(f"{label}: device filter {','.join(entry.device_filter)} does not match the "
                               f"{m.display_name}, the model the profile is for")
        return [next((b for b in hit if _could_meet(entry, b)), hit[0])], [], []
    if entry.device_filter:
        selected = [m for m in pool if entry.matches_model(m)]
        unknown = [f for f in entry.device_filter
                   if not any(ProfileEntry(device_filter=(f,), mig_enabled=False).matches_model(m) for m in pool)]
        ms = [m for m in selected if entry.for_board(m)]
        if entry.vgpu and ms and not any(_could_meet(entry, m) for m in ms):
            untyped = untyped_boards(entry, ms)
            if untyped:
                return [], unknown, [_untyped_reason(entry, untyped)]
        if selected and not ms:
            boards = ", ".join(sorted({m.display_name for m in selected}))
            raise ProfileError(f"{label}: device filter {','.join(entry.device_filter)} selects the {boards}, "
                               f"but the vGPU types {', '.join(entry.vgpu)} are another board's")
        return _one_per_family(ms, entry), unknown, []
    ms = [m for m in pool if _could_meet(entry, m)]
    if not ms:
        untyped = untyped_boards(entry, pool)
        if untyped:
            return [], [], [_untyped_reason(entry, untyped)]
        raise ProfileError(f"{label}: {_nobody_has(entry, pool)}")
    return _one_per_family(ms, entry), [], []


def _untyped_reason(entry: ProfileEntry, boards: Sequence[GpuModel]) -> str:
    names = ", ".join(sorted({m.display_name for m in boards}))
    return (f"vGPU types {', '.join(entry.vgpu)} belong to the {names}, whose vGPU types are not in the catalog; "
            "the entry was not validated")


def _entry_label(spec: ProfileSpec, index: int) -> str:
    return f"profile '{spec.name}'" + (f" entry {index + 1}" if len(spec.entries) > 1 else "")


def validate(spec: ProfileSpec, models: Catalog | Iterable[GpuModel] | None = None) -> ValidationReport:
    """Resolve every entry on every model it can apply to (see :func:`candidate_models`).

    ``models`` is the universe to pick from (default: the packaged catalog); passing a list restricts the
    check to those models.  Raises ProfileError naming the profile (and entry) on the first problem.
    """
    pool = _model_pool(models)
    report = ValidationReport()
    for i, entry in enumerate(spec.entries):
        ms, unknown, unchecked = candidate_models(spec, i, pool)
        report.unmatched_filters.extend((i, f) for f in unknown)
        report.unchecked.extend((i, why) for why in unchecked)
        for m in ms:
            try:
                layout = resolve(entry, m)
            except ProfileError as exc:
                raise ProfileError(f"{_entry_label(spec, i)}: {exc.message}",
                                   **{**exc.context, "profile": spec.name}) from None
            report.checks.append(Check(i, m.id, layout))
    return report


__all__ = [
    "Check", "KINDS", "MODES", "Layout", "NAME_RE", "ProfileEntry", "ProfileSpec", "SPEC_FORMAT", "ValidationReport",
    "candidate_models", "check_name", "find_mdev_type", "mig_problem", "nearest_mig_layouts", "normalise_filter",
    "resolve", "untyped_boards", "validate",
]
