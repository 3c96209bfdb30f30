"""Profile documents (pure): gpuvirt's YAML format, mig-parted v1 ``mig-configs`` and vgpu-device-manager v1
``vgpu-configs``, read into :class:`~gpuvirt.model.profile.ProfileSpec` objects and written back.

Readers check the document against the format's own schema (what mig-parted and vgpu-device-manager
themselves accept, docs/profile-format.md) and fail the whole document, with file and line, when it is
malformed.  Whether each entry means anything on the GPUs in the catalog is a separate question, answered
per entry by :mod:`gpuvirt.model.profile_import`.  Nothing here opens files.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import yaml

from gpuvirt.errors import ProfileError
from gpuvirt.model.catalog import Catalog, GpuModel, load_catalog, parse_vgpu_name
from gpuvirt.model.profile import _ENTRY_KEYS, NAME_RE, ProfileEntry, ProfileSpec, check_name
from gpuvirt.model.profile_yaml import (
    MAX_CONFIGS,
    MAX_ENTRIES,
    MAX_NAMES,
    Bad,
    Locate,
    check_count,
    line_locator,
    load_yaml,
    run as run_doc,
    unknown_fields,
)


# --- mig-parted and vgpu-device-manager ------------------------------------------------------------------------
def _top(doc: Any, key: str, allowed: set[str], version_required: bool) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise Bad((), "expected a mapping at the top of the document")
    unknown = set(doc) - allowed
    if unknown:
        raise unknown_fields((), "", unknown, sorted(allowed))
    if version_required and "version" not in doc:
        raise Bad((), "missing 'version: v1'")
    if "version" in doc and doc["version"] != "v1":
        raise Bad(("version",), f"unknown version {doc['version']!r} (expected v1)")
    configs = doc.get(key)
    if not isinstance(configs, Mapping) or not configs:
        raise Bad((key,), f"'{key}' must be a non-empty mapping of config names to entry lists")
    check_count((key,), key, configs, MAX_CONFIGS)
    return configs


def _config_entries(configs: Mapping[str, Any], key: str, name: Any) -> list[Any]:
    if isinstance(name, bool) or not isinstance(name, (str, int)) or not NAME_RE.fullmatch(str(name)):
        raise Bad((key, name), f"{key} name {name!r} is not usable as a profile name (1-128 letters, digits, "
                                "'.', '_' or '-')")
    entries = configs[name]
    if not isinstance(entries, list) or not entries:
        raise Bad((key, name), f"{key} '{name}' must be a non-empty list of entries")
    check_count((key, name), f"{key} '{name}'", entries, MAX_ENTRIES)
    return entries


def _tool_counts(path: Sequence[Any], label: str, what: str, value: Any) -> dict[str, int]:
    """mig-devices / vgpu-devices: counts >= 0 are allowed and zeros mean 'none of these' (dropped).

    What an empty result means differs (MIG on without instances; a vGPU entry with nothing to store), so
    the callers judge it.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Bad(path, f"{label}: {what} must be a mapping of NAME: COUNT")
    check_count(path, f"{label}: {what}", value, MAX_NAMES)
    out: dict[str, int] = {}
    for k, n in value.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise Bad(list(path) + [k], f"{label}: {what}: the count of '{k}' must be a whole number >= 0, "
                       f"not {n!r}")
        if n:
            out[str(k)] = n
    return out


def _entry_path(path: Sequence[Any], exc: ProfileError, keys: Mapping[str, str] | None = None) -> list[Any]:
    """Where a ProfileEntry error points: the field it names (spelled as in the document: ``keys`` maps
    gpuvirt's field names to the tool's) and the name or index inside it, else the entry itself."""
    field_name = exc.context.get("field")
    if field_name is None:
        return list(path)
    out = list(path) + [(keys or {}).get(field_name, field_name)]
    if "key" in exc.context:
        out.append(exc.context["key"])
    return out


_MP_KEYS = {"device_filter": "device-filter", "mig_enabled": "mig-enabled", "mig": "mig-devices"}
_VDM_KEYS = {"device_filter": "device-filter", "vgpu": "vgpu-devices"}


def from_mig_parted(doc: Any, source: str = "mig-parted", *, locate: Locate | None = None) -> list[ProfileSpec]:
    """mig-parted v1 ``mig-configs``: every named config becomes one profile; entries keep their device
    filters and GPU indices.  Field rules follow mig-parted's own checks (formats.md section 1.1)."""
    def run() -> list[ProfileSpec]:
        configs = _top(doc, "mig-configs", {"version", "mig-configs"}, True)
        specs = []
        for name in configs:
            entries = []
            for i, e in enumerate(_config_entries(configs, "mig-configs", name)):
                path = ("mig-configs", name, i)
                label = f"mig-configs '{name}' entry {i + 1}"
                if not isinstance(e, Mapping):
                    raise Bad(path, f"{label} must be a mapping")
                unknown = set(e) - {"device-filter", "devices", "mig-enabled", "mig-devices"}
                if unknown:
                    raise unknown_fields(path, f"{label}: ", unknown, ("device-filter", "devices", "mig-enabled",
                                                                 "mig-devices"))
                if "devices" not in e:
                    raise Bad(path, f"{label}: devices is required ('all' or a list of GPU indices)")
                if not isinstance(e.get("mig-enabled"), bool):
                    raise Bad(path + (("mig-enabled",) if "mig-enabled" in e else ()),
                               f"{label}: mig-enabled is required (true or false)")
                enabled = e["mig-enabled"]
                if enabled and "mig-devices" not in e:
                    raise Bad(path, f"{label}: mig-devices is required when mig-enabled is true (use {{}} for "
                               "no instances)")
                if not enabled and e.get("mig-devices"):
                    raise Bad(path + ("mig-devices",), f"{label}: mig-devices must be empty when mig-enabled is "
                               "false")
                counts = _tool_counts(path + ("mig-devices",), label, "mig-devices", e.get("mig-devices"))
                if e.get("mig-devices") and not counts:
                    raise Bad(path + ("mig-devices",), f"{label}: every count in mig-devices is 0; use {{}} for "
                               "MIG mode on without instances")
                try:
                    entries.append(ProfileEntry(device_filter=e.get("device-filter"), devices=e["devices"],
                                                mig_enabled=enabled, mig=counts))
                except ProfileError as exc:
                    raise Bad(_entry_path(path, exc, _MP_KEYS), f"{label}: {exc.message}") from None
            specs.append(ProfileSpec(name=str(name), entries=tuple(entries), source=source))
        return specs
    return run_doc(run, source, locate)


def from_vgpu_dm(doc: Any, source: str = "vgpu-device-manager", *, locate: Locate | None = None) -> list[ProfileSpec]:
    """vgpu-device-manager v1 ``vgpu-configs``: every named config becomes one profile."""
    def run() -> list[ProfileSpec]:
        configs = _top(doc, "vgpu-configs", {"version", "vgpu-configs"}, True)
        specs = []
        for name in configs:
            entries = []
            for i, e in enumerate(_config_entries(configs, "vgpu-configs", name)):
                path = ("vgpu-configs", name, i)
                label = f"vgpu-configs '{name}' entry {i + 1}"
                if not isinstance(e, Mapping):
                    raise Bad(path, f"{label} must be a mapping with devices and vgpu-devices")
                unknown = set(e) - {"device-filter", "devices", "vgpu-devices"}
                if unknown:
                    raise unknown_fields(path, f"{label}: ", unknown, ("device-filter", "devices", "vgpu-devices"))
                if "devices" not in e:
                    raise Bad(path, f"{label}: devices is required ('all' or a list of GPU indices)")
                if "vgpu-devices" not in e:
                    raise Bad(path, f"{label}: vgpu-devices is required (a mapping of vGPU type: count)")
                counts = _tool_counts(path + ("vgpu-devices",), label, "vgpu-devices", e["vgpu-devices"])
                if not counts:
                    # vgpu-device-manager reads {} as "remove the vGPUs"; a gpuvirt entry states what a GPU
                    # carries and one with nothing has no intent to store, so both spellings are refused
                    # with the same advice
                    what = "every count in vgpu-devices is 0" if e["vgpu-devices"] else \
                        "vgpu-devices lists no vGPU type"
                    raise Bad(path + ("vgpu-devices",), f"{label}: {what}; an entry needs at least one vGPU type "
                               "with a count above 0 (to remove vGPUs, give the GPUs another profile)")
                try:
                    entries.append(ProfileEntry(device_filter=e.get("device-filter"), devices=e["devices"],
                                                vgpu=counts, mig=mig_backed_layout(counts) or None))
                except ProfileError as exc:
                    raise Bad(_entry_path(path, exc, _VDM_KEYS), f"{label}: {exc.message}") from None
            specs.append(ProfileSpec(name=str(name), entries=tuple(entries), source=source))
        return specs
    return run_doc(run, source, locate)



def mig_backed_layout(vgpu: Mapping[str, int]) -> dict[str, int]:
    """The GPU instances the MIG-backed types of a vgpu-device-manager entry need: one per vGPU.

    This is how vgpu-device-manager itself chooses the MIG layout for MIG-backed configs (it turns each
    ``<board>-<G>-<GB>C[ME]`` type into ``<G>g.<GB>gb`` GPU instances, as many as vGPUs, and hands that
    layout to mig-parted before it creates the vGPUs); gpuvirt stores the layout in the entry so that it is
    validated, planned and applied with the vGPUs.  Time-sliced types need none."""
    out: dict[str, int] = {}
    for ref, n in vgpu.items():
        parsed = parse_vgpu_name(ref)
        prof = parsed.mig_profile if parsed else None
        if prof:
            out[prof] = out.get(prof, 0) + n
    return out


_PROFILE_KEYS = ("name", "description", "model", "mode", "entries")


def _gv_counts(value: Any) -> Any:
    # YAML reads an unquoted numeric vGPU type id (745: 2) as an integer key; it is meant as a name
    if isinstance(value, Mapping):
        return {(str(k) if isinstance(k, int) and not isinstance(k, bool) else k): n for k, n in value.items()}
    return value


def _gv_entry(path: Sequence[Any], label: str, d: Mapping[str, Any]) -> ProfileEntry:
    unknown = set(d) - set(_ENTRY_KEYS)
    if unknown:
        raise unknown_fields(path, f"{label}: ", unknown, _ENTRY_KEYS)
    try:
        return ProfileEntry(device_filter=d.get("device_filter"), devices=d.get("devices", "all"),
                            mig_enabled=d.get("mig_enabled"), mig=_gv_counts(d.get("mig")),
                            vgpu=_gv_counts(d.get("vgpu")), mdev=_gv_counts(d.get("mdev")),
                            sriov_vfs=d.get("sriov_vfs"), vgpu_scheduler=d.get("vgpu_scheduler"))
    except ProfileError as exc:
        raise Bad(_entry_path(path, exc), f"{label}: {exc.message}") from None


def _gv_profile(path: Sequence[Any], d: Any, source: str, default_name: str | None) -> ProfileSpec:
    if not isinstance(d, Mapping):
        raise Bad(path, "a profile must be a mapping")
    name = d.get("name", default_name)
    label = f"profile '{name}'" if name else "profile"
    unknown = set(d) - set(_PROFILE_KEYS) - set(_ENTRY_KEYS)
    if unknown:
        raise unknown_fields(path, f"{label}: ", unknown, _PROFILE_KEYS + _ENTRY_KEYS)
    if name is None:
        raise Bad(path, "profile without a name")
    try:
        check_name(name)
    except ProfileError as exc:
        raise Bad(list(path) + ["name"], exc.message) from None
    for k in ("description", "model", "mode"):
        if d.get(k) is not None and not isinstance(d[k], str):
            raise Bad(list(path) + [k], f"{label}: {k} must be a string")
    short = {k: d[k] for k in _ENTRY_KEYS if k in d}
    if "entries" in d:
        if short:
            raise Bad(list(path) + ["entries"], f"{label}: give either entries or the short form "
                       f"({', '.join(sorted(short))}), not both")
        raw = d["entries"]
        if not isinstance(raw, list) or not raw:
            raise Bad(list(path) + ["entries"], f"{label}: entries must be a non-empty list")
        check_count(list(path) + ["entries"], f"{label}: entries", raw, MAX_ENTRIES)
        entries = []
        for i, e in enumerate(raw):
            if not isinstance(e, Mapping):
                raise Bad(list(path) + ["entries", i], f"{label} entry {i + 1} must be a mapping")
            entries.append(_gv_entry(list(path) + ["entries", i], f"{label} entry {i + 1}", e))
    else:
        entries = [_gv_entry(path, label, short)]
    try:
        return ProfileSpec(name=name, description=d.get("description"), model=d.get("model"), entries=tuple(entries),
                           source=source, mode=d.get("mode") or "vm")
    except ProfileError as exc:
        if exc.context.get("field") == "mode":
            raise Bad(list(path) + ["mode"], exc.message) from None
        raise


def from_gpuvirt(doc: Any, source: str = "file", *, default_name: str | None = None,
                 locate: Locate | None = None) -> list[ProfileSpec]:
    """gpuvirt's format: one profile mapping, or ``{version: 1, profiles: [...]}``."""
    def run() -> list[ProfileSpec]:
        if not isinstance(doc, Mapping):
            raise Bad((), "expected a mapping at the top of the document")
        if "profiles" in doc:
            unknown = set(doc) - {"version", "profiles"}
            if unknown:
                raise unknown_fields((), "", unknown, ("version", "profiles"), " next to profiles")
            if "version" in doc and doc["version"] != 1:
                raise Bad(("version",), f"unknown version {doc['version']!r} (expected 1)")
            raw = doc["profiles"]
            if not isinstance(raw, list) or not raw:
                raise Bad(("profiles",), "profiles must be a non-empty list")
            check_count(("profiles",), "profiles", raw, MAX_CONFIGS)
            specs = [_gv_profile(("profiles", i), p, source, None) for i, p in enumerate(raw)]
            seen: set[str] = set()
            for i, s in enumerate(specs):
                if s.name in seen:
                    raise Bad(("profiles", i), f"profile '{s.name}' is defined twice")
                seen.add(s.name)
            return specs
        body = {k: v for k, v in doc.items() if k != "version"}
        if not set(body) & (set(_PROFILE_KEYS) | set(_ENTRY_KEYS)):
            # e.g. a mig-parted hooks file: say what the file is not, rather than quibble over its version
            keys = ", ".join(sorted(str(k) for k in doc)) or "none"
            raise Bad((), f"not a profile file (top-level keys: {keys}); expected a gpuvirt profile (name: with "
                           "mig:/vgpu:/mdev:/sriov_vfs:/vgpu_scheduler:), profiles: (gpuvirt), mig-configs: (mig-parted) or "
                           "vgpu-configs: (vgpu-device-manager)")
        if "version" in doc and doc["version"] != 1:
            raise Bad(("version",), f"unknown version {doc['version']!r} (expected 1)")
        return [_gv_profile((), body, source, default_name)]
    return run_doc(run, source, locate)


def detect_format(doc: Any) -> str:
    """``mig-parted`` | ``vgpu-device-manager`` | ``gpuvirt``."""
    if isinstance(doc, Mapping):
        if "mig-configs" in doc:
            return "mig-parted"
        if "vgpu-configs" in doc:
            return "vgpu-device-manager"
    return "gpuvirt"


def parse_profiles(text: str, filename: str, *, source: str | None = None,
                   default_name: str | None = None) -> tuple[str, list[ProfileSpec]]:
    """Parse a profile document of any supported format: (format, specs).  Errors carry file and line."""
    doc = load_yaml(text, filename)
    if doc is None:
        raise ProfileError(f"{filename}: the file is empty", file=filename)
    fmt = detect_format(doc)
    locate = line_locator(text, filename)
    src = source or f"{fmt}:{filename}"
    if fmt == "mig-parted":
        return fmt, from_mig_parted(doc, src, locate=locate)
    if fmt == "vgpu-device-manager":
        return fmt, from_vgpu_dm(doc, src, locate=locate)
    return fmt, from_gpuvirt(doc, src, default_name=default_name, locate=locate)



# --- writing ----------------------------------------------------------------------------------------
def _entry_yaml(e: ProfileEntry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if e.device_filter:
        out["device_filter"] = e.device_filter[0] if len(e.device_filter) == 1 else list(e.device_filter)
    if e.devices != "all":
        out["devices"] = list(e.devices)
    if e.mig_enabled is not None and not e.mig:     # instances imply MIG mode on
        out["mig_enabled"] = e.mig_enabled
    for k in ("mig", "vgpu", "mdev"):
        if getattr(e, k):
            out[k] = dict(getattr(e, k))
    if e.sriov_vfs is not None:
        out["sriov_vfs"] = e.sriov_vfs
    if e.vgpu_scheduler is not None:
        out["vgpu_scheduler"] = e.vgpu_scheduler.to_yaml()
    return out


def to_gpuvirt(specs: Iterable[ProfileSpec]) -> dict[str, Any]:
    """gpuvirt format document; one-entry profiles for every GPU use the short form."""
    out = []
    for s in specs:
        d: dict[str, Any] = {"name": s.name}
        if s.description:
            d["description"] = s.description
        if s.model:
            d["model"] = s.model
        if s.mode != "vm":
            d["mode"] = s.mode
        if len(s.entries) == 1 and not s.entries[0].device_filter and s.entries[0].devices == "all":
            d.update(_entry_yaml(s.entries[0]))
        else:
            d["entries"] = [_entry_yaml(e) for e in s.entries]
        out.append(d)
    return {"version": 1, "profiles": out}


def model_filters(model: GpuModel, catalog: Catalog | None = None) -> tuple[str, ...]:
    """The ``0xDDDDVVVV`` device filters of a model: of every board of its file (main board first) for a
    model file's own id, of that board alone for a variant id (a100-80gb-pcie)."""
    boards = [model] if model.is_variant else (catalog or load_catalog()).family(model.id)
    out: list[str] = []
    for m in boards:
        if m.pci_device_filter and m.pci_device_filter not in out:
            out.append(m.pci_device_filter)
    return tuple(out)


def to_mig_parted(specs: Iterable[ProfileSpec], catalog: Catalog | None = None) -> dict[str, Any]:
    """mig-parted v1 document holding the MIG profiles; other kinds have no mig-parted form.

    mig-parted has no notion of a profile's model: a profile pinned to a model gets that model's PCI ids
    as ``device-filter`` on entries without one, which is how mig-parted configs target a board.
    """
    configs: dict[str, Any] = {}
    for s in specs:
        if s.kind != "mig":
            raise ProfileError(f"profile '{s.name}' is a {s.kind} profile; mig-parted configs hold MIG layouts only")
        cat = catalog or load_catalog()
        pinned = model_filters(cat.get(s.model), cat) if s.model else ()
        entries = []
        for e in s.entries:
            d: dict[str, Any] = {}
            filters = e.device_filter or pinned
            if filters:
                d["device-filter"] = filters[0] if len(filters) == 1 else list(filters)
            d["devices"] = "all" if e.devices == "all" else list(e.devices)
            enabled = bool(e.mig) or bool(e.mig_enabled)
            d["mig-enabled"] = enabled
            if enabled:
                d["mig-devices"] = dict(e.mig)
            entries.append(d)
        configs[s.name] = entries
    return {"version": "v1", "mig-configs": configs}


def dump_yaml(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)


