"""Service: partition profiles (create, list, show, delete, export, import, built-ins).

Profiles live in the inventory (``profiles`` table; ``spec`` holds :meth:`ProfileSpec.to_dict`).  Built-in
profiles ship as YAML in the package (``gpuvirt._profiles/builtin``) and are visible without being stored;
:func:`ensure_stored` copies one into the inventory the first time something must reference it
(``gpus.desired_profile`` is a foreign key to ``profiles.name``).

Every profile is validated against the GPU models it can apply to before it is stored, and every change
is recorded as an inventory event.  Functions return plain dicts (or text) for the CLI to render.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterable, Sequence

from gpuvirt._data import data_dir
from gpuvirt.errors import ConflictError, NotFoundError, ProfileError, UsageError
from gpuvirt.model.catalog import load_catalog
from gpuvirt.model.profile import ProfileEntry, ProfileSpec, ValidationReport, check_name, validate
from gpuvirt.model.profile_formats import dump_yaml, parse_profiles, to_gpuvirt, to_mig_parted
from gpuvirt.model.profile_import import EntryIssue, plan_import
from gpuvirt.model.profile_yaml import MAX_TEXT_BYTES

BUILTIN = "builtin"
EXPORT_FORMATS = ("gpuvirt", "mig-parted")
_ITEM_RE = re.compile(r"^\s*(?P<name>\S(?:.*\S)?)\s*=\s*(?P<count>.*?)\s*$")


# --- built-ins ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def builtin_profiles() -> dict[str, ProfileSpec]:
    """The shipped profiles by name (read once; they are package data and never change at run time)."""
    root = os.path.join(data_dir("profiles"), "builtin")
    out: dict[str, ProfileSpec] = {}
    for name in sorted(os.listdir(root)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(root, name), encoding="utf-8") as fh:
            _, specs = parse_profiles(fh.read(), f"builtin/{name}", source=BUILTIN)
        for s in specs:
            if s.name in out:
                raise ProfileError(f"built-in profile '{s.name}' is defined twice (builtin/{name})")
            out[s.name] = s
    return out


# --- parsing CLI items ------------------------------------------------------------------------------------------
def parse_items(option: str, items: Iterable[str] | None) -> dict[str, int]:
    """``["1g.5gb=2", "3g.20gb=1"]`` from ``--mig`` (etc.) -> {"1g.5gb": 2, "3g.20gb": 1}."""
    out: dict[str, int] = {}
    for raw in items or ():
        m = _ITEM_RE.match(raw or "")
        if not m or not m.group("name") or "=" in m.group("name"):
            raise UsageError(f"{option} '{raw}': expected NAME=COUNT, e.g. {option} "
                             f"{'A2-2Q=8' if option == '--vgpu' else 'mtty-2=4' if option == '--mdev' else '1g.5gb=2'}")
        name, text = m.group("name"), m.group("count")
        if not re.fullmatch(r"[+-]?\d+", text):
            raise UsageError(f"{option} {name}={text}: COUNT must be a whole number")
        count = int(text)
        if count <= 0:
            raise UsageError(f"{option} {name}={text}: COUNT must be at least 1")
        if name in out:
            raise UsageError(f"{option} {name} is given twice; give it once with the total count")
        out[name] = count
    return out


# --- reading ------------------------------------------------------------------------------------------------------
def _row_spec(row: Any) -> ProfileSpec:
    """A stored row as a spec; the columns win over the copy inside the JSON (they are what gets edited)."""
    spec = ProfileSpec.from_dict(row.spec)
    return ProfileSpec(name=row.name, description=row.description, model=row.model, entries=spec.entries,
                       source=row.source, mode=spec.mode)


def _known_names(ctx: Any) -> list[str]:
    with ctx.inventory.unit() as uow:
        stored = [p.name for p in uow.profiles()]
    return sorted(set(stored) | set(builtin_profiles()))


def get_profile(ctx: Any, name: str) -> ProfileSpec:
    """The stored profile ``name``, else the built-in one; NotFoundError otherwise."""
    with ctx.inventory.unit() as uow:
        row = uow.profile(name)
        if row is not None:
            return _row_spec(row)
    if name in builtin_profiles():
        return builtin_profiles()[name]
    raise NotFoundError(f"no profile named '{name}'; known: {', '.join(_known_names(ctx)) or 'none'}",
                        profile=name)


def ensure_stored(ctx: Any, name: str, uow: Any = None) -> ProfileSpec:
    """The profile ``name``, stored in the inventory (a built-in is copied on first use).

    Pass the caller's write unit of work as ``uow`` so the copy and the caller's own change (e.g. setting
    ``gpus.desired_profile``) commit together.
    """
    if uow is None:
        with ctx.inventory.unit(write=True, action="store profile") as own:
            return ensure_stored(ctx, name, own)
    row = uow.profile(name)
    if row is not None:
        return _row_spec(row)
    spec = builtin_profiles().get(name)
    if spec is None:
        raise NotFoundError(f"no profile named '{name}'", profile=name)
    _store(uow, spec, replace=False)
    uow.event("profile.create", target=name, detail={"kind": spec.kind, "model": spec.model, "source": BUILTIN,
                                                      "reason": "built-in profile stored on first use"})
    return spec


def _store(uow: Any, spec: ProfileSpec, *, replace: bool) -> None:
    uow.save_profile(spec.name, kind=spec.kind, model=spec.model, description=spec.description,
                     spec=spec.to_dict(), source=spec.source[:255], replace=replace)


def _summary(spec: ProfileSpec) -> dict[str, Any]:
    return {"name": spec.name, "kind": spec.kind, "model": spec.model, "description": spec.description,
            "source": spec.source, "mode": spec.mode, "summary": spec.summary()}


def _gpu_refs(gpus: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"host": g.host_id, "address": g.address, "model": g.model} for g in gpus]


def list_profiles(ctx: Any) -> list[dict[str, Any]]:
    """Stored and built-in profiles by name; a stored profile hides a built-in of the same name."""
    out: dict[str, dict[str, Any]] = {}
    builtins = builtin_profiles()
    with ctx.inventory.unit() as uow:
        for row in uow.profiles():
            try:
                d = _summary(_row_spec(row))
            except ProfileError as exc:
                # one unreadable row (written by a newer gpuvirt, or edited by hand) must not hide the others
                d = {"name": row.name, "kind": row.kind, "model": row.model, "description": row.description,
                     "source": row.source, "summary": f"unreadable: {exc.message}"}
            d.update(stored=True, builtin=row.name in builtins, gpus=_gpu_refs(uow.gpus_with_profile(row.name)))
            out[row.name] = d
    for name, spec in builtins.items():
        if name not in out:
            d = _summary(spec)
            d.update(stored=False, builtin=True, gpus=[])
            out[name] = d
    return [out[k] for k in sorted(out)]


def _report_dict(report: ValidationReport) -> dict[str, Any]:
    return {"models": report.models, "warnings": report.warnings(),
            "layouts": [{"entry": c.entry, "model": c.model, "layout": c.layout.to_dict()} for c in report.checks]}


def show_profile(ctx: Any, name: str) -> dict[str, Any]:
    """The profile, the GPUs that should carry it and what it resolves to on each model it can meet."""
    spec = get_profile(ctx, name)
    d = spec.to_dict()
    d["summary"] = spec.summary()
    d["builtin"] = name in builtin_profiles()
    with ctx.inventory.unit() as uow:
        d["stored"] = uow.profile(name) is not None
        d["gpus"] = _gpu_refs(uow.gpus_with_profile(name)) if d["stored"] else []
    try:
        d["validation"] = _report_dict(validate(spec, load_catalog()))
        d["problems"] = []
    except ProfileError as exc:
        # a profile stored under an older catalog can stop fitting; show it rather than fail
        d["validation"] = None
        d["problems"] = [exc.message]
    return d


# --- changing -----------------------------------------------------------------------------------------------------
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _read_file(path: str | Path) -> str:
    """The text of a profile file: a regular file of at most MAX_TEXT_BYTES, read without ever holding more.

    Opened non-blocking so that a FIFO is refused at once instead of waiting for a writer; /dev/zero and
    other devices are refused by their type before a byte is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a regular file")
            raise UsageError(f"{path}: is {kind}, not a profile file")
        limit = MAX_TEXT_BYTES
        if st.st_size > limit:
            raise UsageError(f"{path}: {st.st_size} bytes, more than the {limit // (1024 * 1024)} MiB a profile "
                             "file may have")
        chunks: list[bytes] = []
        got = 0
        while got <= limit:       # a file that grows while it is read stops at limit + 1 bytes
            try:
                chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            except OSError as exc:
                raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:
            raise UsageError(f"{path}: more than the {limit // (1024 * 1024)} MiB a profile file may have")
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not a text (UTF-8) file") from None


def _canonical_model(model: str | None) -> str | None:
    if model is None:
        return None
    if not model.strip():
        raise UsageError("--model needs a GPU model id, e.g. a100-40gb")
    return load_catalog().get(model).id


def _validated(spec: ProfileSpec) -> ValidationReport:
    return validate(spec, load_catalog())


def create_profile(ctx: Any, name: str, *, mig: Sequence[str] = (), vgpu: Sequence[str] = (),
                   mdev: Sequence[str] = (), sriov_vfs: int | None = None, model: str | None = None,
                   description: str | None = None, from_file: str | None = None,
                   replace: bool = False, vgpu_scheduler: str | None = None,
                   timeslice_us: int | None = None, mode: str | None = None) -> dict[str, Any]:
    """Create (or with ``replace`` overwrite) profile ``name`` from options or a file; validated first,
    nothing stored on error."""
    try:
        check_name(name)
    except ProfileError as exc:
        raise UsageError(exc.message) from None
    model_id = _canonical_model(model)
    if timeslice_us is not None and vgpu_scheduler is None:
        raise UsageError("--timeslice-us needs --vgpu-scheduler equal-share or fixed-share")
    from gpuvirt.model.profile import MODES

    if mode is not None and mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    if from_file is not None:
        if mig or vgpu or mdev or sriov_vfs is not None or vgpu_scheduler is not None:
            raise UsageError("--from-file cannot be combined with --mig, --vgpu, --mdev, --sriov-vfs or "
                             "--vgpu-scheduler")
        spec = _spec_from_file(from_file, name)
        spec = ProfileSpec(name=name, description=description if description is not None else spec.description,
                           model=model_id if model_id is not None else _canonical_model(spec.model),
                           entries=spec.entries, source=f"file:{Path(from_file).name}", mode=mode or spec.mode)
    else:
        counts = {"mig": parse_items("--mig", mig), "vgpu": parse_items("--vgpu", vgpu),
                  "mdev": parse_items("--mdev", mdev)}
        if sriov_vfs is not None and sriov_vfs < 0:
            raise UsageError(f"--sriov-vfs {sriov_vfs}: the number of VFs must be 0 or more")
        whole = mode == "containers" and not any(counts.values()) and sriov_vfs is None and vgpu_scheduler is None
        if not any(counts.values()) and sriov_vfs is None and vgpu_scheduler is None and not whole:
            raise UsageError("give at least one of --mig, --vgpu, --mdev, --sriov-vfs, --vgpu-scheduler, or "
                             "--from-file")
        sched = _cli_scheduler(vgpu_scheduler, timeslice_us)
        # a containers profile without MIG instances hands out the whole GPU: MIG off
        entry = ProfileEntry(mig=counts["mig"], vgpu=counts["vgpu"], mdev=counts["mdev"], sriov_vfs=sriov_vfs,
                             vgpu_scheduler=sched, mig_enabled=False if whole else None)
        try:
            spec = ProfileSpec(name=name, description=description, model=model_id, entries=(entry,), source="user",
                               mode=mode or "vm")
        except ProfileError as exc:
            raise UsageError(exc.message) from None
    report = _validated(spec)
    is_builtin = name in builtin_profiles()
    with ctx.inventory.unit(write=True, action="create profile") as uow:
        existed = uow.profile(name) is not None
        if is_builtin and not existed and not replace:
            raise ConflictError(f"'{name}' is a built-in profile; use --replace to store your own under that name")
        _store(uow, spec, replace=replace)
        uow.event("profile.replace" if existed else "profile.create", target=name,
                  detail={"kind": spec.kind, "model": spec.model, "source": spec.source, "entries": len(spec.entries),
                          "validated_on": report.models})
    d = spec.to_dict()
    d.update(summary=spec.summary(), replaced=existed, validation=_report_dict(report))
    return d


def _cli_scheduler(policy: str | None, timeslice_us: int | None) -> Any:
    """``--vgpu-scheduler`` / ``--timeslice-us`` as a scheduler spec; the messages name the options."""
    if policy is None:
        return None
    from gpuvirt.model.vgpu_scheduler import POLICIES, TIMESLICE_US_MAX, TIMESLICE_US_MIN, SchedulerSpec

    if policy.strip().lower() not in POLICIES:
        raise UsageError(f"--vgpu-scheduler '{policy}': unknown policy; valid: {', '.join(POLICIES)}")
    try:
        return SchedulerSpec(policy, timeslice_us)
    except ProfileError:
        if policy.strip().lower() == "best-effort":
            raise UsageError("--timeslice-us applies to equal-share and fixed-share only, not to best-effort") \
                from None
        raise UsageError(f"--timeslice-us {timeslice_us}: out of range; valid: {TIMESLICE_US_MIN} to "
                         f"{TIMESLICE_US_MAX} microseconds") from None


def _spec_from_file(path: str, name: str) -> ProfileSpec:
    fmt, specs = parse_profiles(_read_file(path), str(path), default_name=name)
    if len(specs) == 1:
        return specs[0]
    for s in specs:
        if s.name == name:
            return s
    raise UsageError(f"{path} holds {len(specs)} profiles ({', '.join(s.name for s in specs)}); none is named "
                     f"'{name}'")


def delete_profile(ctx: Any, name: str, force: bool = False) -> dict[str, Any]:
    """Delete a stored profile; refused while GPUs should carry it, unless ``force`` (they then carry none)."""
    with ctx.inventory.unit(write=True, action="delete profile") as uow:
        row = uow.profile(name)
        if row is None:
            if name in builtin_profiles():
                raise UsageError(f"'{name}' is a built-in profile and is not stored; there is nothing to delete")
            raise NotFoundError(f"no stored profile named '{name}'", profile=name)
        gpus = uow.gpus_with_profile(name)
        if gpus and not force:
            where = ", ".join(f"{g.host_id}/{g.address}" for g in gpus[:5]) + (" ..." if len(gpus) > 5 else "")
            raise ConflictError(f"profile '{name}' is the desired profile of {len(gpus)} GPU(s) ({where}); "
                                "use --force to delete it anyway (those GPUs will have no desired profile)")
        cleared = _gpu_refs(gpus)
        for g in gpus:
            # explicit rather than relying on ON DELETE SET NULL, which needs foreign keys enabled
            g.desired_profile = None
            g.profile_state = None     # a state without its profile means nothing (and nothing to finish)
        uow.delete_profile(name)
        uow.event("profile.delete", target=name, detail={"force": force, "cleared_gpus": cleared})
    return {"name": name, "deleted": True, "cleared_gpus": cleared,
            "builtin_still_available": name in builtin_profiles()}


def export_profile(ctx: Any, names: Sequence[str] = (), fmt: str = "gpuvirt") -> str:
    """YAML for ``names`` (default: every profile; for mig-parted every MIG profile)."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format '{fmt}'; choose one of {', '.join(EXPORT_FORMATS)}")
    if names:
        specs = [get_profile(ctx, n) for n in dict.fromkeys(names)]
    else:
        specs = [get_profile(ctx, d["name"]) for d in list_profiles(ctx)]
        if fmt == "mig-parted":
            specs = [s for s in specs if s.kind == "mig"]
        if not specs:
            raise NotFoundError("there are no profiles to export" + (" in mig-parted form" if fmt != "gpuvirt" else ""))
    doc = to_mig_parted(specs) if fmt == "mig-parted" else to_gpuvirt(specs)
    return dump_yaml(doc)


class ImportRefused(ProfileError):
    """``profile import --strict`` found entries it cannot import; ``issues`` lists them, nothing was stored."""

    def __init__(self, message: str, issues: Sequence[EntryIssue]) -> None:
        super().__init__(message)
        self.issues = list(issues)


def import_profiles(ctx: Any, path: str, replace: bool = False, strict: bool = False) -> dict[str, Any]:
    """Import every config of a mig-parted, vgpu-device-manager or gpuvirt file that the catalog can check.

    A malformed file (not YAML, wrong version, a field the format does not have) imports nothing.  Otherwise
    every entry is checked on its own (gpuvirt.model.profile_import): entries that cannot be imported are
    reported one per line and left out, the rest are stored.  ``strict`` stores nothing when any entry
    would be left out.  Importing the same file again changes nothing: a profile whose stored form is
    identical is reported as unchanged, not as a clash.
    """
    fname = Path(path).name
    text = _read_file(path)
    fmt, specs = parse_profiles(text, str(path))
    specs = [ProfileSpec(name=s.name, description=s.description, model=_canonical_model(s.model),
                         entries=s.entries, source=f"{fmt}:{fname}") for s in specs]
    plan = plan_import(specs, load_catalog())
    if strict and plan.skipped:
        n = len(plan.skipped)
        raise ImportRefused(f"{path}: nothing imported (--strict): {n} entr{'y' if n == 1 else 'ies'} cannot be "
                            f"imported; the first: {plan.skipped[0].line()}", plan.skipped)
    builtins = builtin_profiles()
    imported, unchanged = [], []
    with ctx.inventory.unit(write=True, action="import profiles") as uow:
        rows = {s.name: uow.profile(s.name) for s in plan.specs}
        same = {n for n, row in rows.items() if row is not None and _row_spec(row) == next(
            s for s in plan.specs if s.name == n)}
        clashes = [s.name for s in plan.specs
                   if s.name not in same and (rows[s.name] is not None or s.name in builtins)]
        if clashes and not replace:
            raise ConflictError(f"{path}: nothing imported; profile(s) {', '.join(clashes)} already exist "
                                "(stored or built in) with another layout; use --replace to overwrite them")
        for s in plan.specs:
            rep = plan.reports[s.name]
            d = _summary(s)
            d.update(format=fmt, validated_on=rep.models, warnings=rep.warnings())
            if s.name in same:
                d.update(replaced=False, unchanged=True)
                unchanged.append(d)
                continue
            existed = rows[s.name] is not None
            _store(uow, s, replace=replace)
            uow.event("profile.import", target=s.name,
                      detail={"file": str(path), "format": fmt, "kind": s.kind, "replaced": existed,
                              "entries": len(s.entries), "validated_on": rep.models})
            d.update(replaced=existed, unchanged=False)
            imported.append(d)
        if plan.skipped:
            uow.event("profile.import.skipped", target=fname,
                      detail={"file": str(path), "format": fmt, "skipped": [i.to_dict() for i in plan.skipped]})
    return {"file": str(path), "format": fmt, "imported": imported, "unchanged": unchanged,
            "skipped": [i.to_dict() | {"line": i.line()} for i in plan.skipped],
            "warnings": [i.to_dict() | {"line": i.line()} for i in plan.warnings],
            "entries": {"total": plan.entries_total, "imported": plan.entries_imported}}
