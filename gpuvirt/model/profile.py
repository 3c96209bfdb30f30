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
from dataclasses import dataclass, field
from typing import Any, Mapping

from gpuvirt.errors import ProfileError
from gpuvirt.model.catalog import (
    GpuModel,
    parse_vgpu_name,
)
from gpuvirt.model.vgpu_scheduler import SchedulerSpec

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


# resolution and validation live in their own modules; their public names stay importable from here
from gpuvirt.model.profile_resolve import (  # noqa: E402, F401
    Layout,
    find_mdev_type,
    mig_problem,
    nearest_mig_layouts,
    resolve,
)
from gpuvirt.model.profile_validate import (  # noqa: E402, F401
    Check,
    ValidationReport,
    candidate_models,
    untyped_boards,
    validate,
)

__all__ = [
    "Check", "KINDS", "MODES", "Layout", "NAME_RE", "ProfileEntry", "ProfileSpec", "SPEC_FORMAT", "ValidationReport",
    "candidate_models", "check_name", "find_mdev_type", "mig_problem", "nearest_mig_layouts", "normalise_filter",
    "resolve", "untyped_boards", "validate",
]
