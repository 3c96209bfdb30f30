"""Validating a profile against the GPU models it can meet (pure): one :class:`Check` per entry and model,
rejections naming the model the rule comes from (see :mod:`gpuvirt.model.profile`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from gpuvirt.errors import ProfileError
from gpuvirt.model.catalog import (
    Catalog,
    GpuModel,
    load_catalog,
    mig_name_known,
    resolve_vgpu_type,
)
from gpuvirt.model.vgpu_scheduler import board_problem

from gpuvirt.model.profile import ProfileEntry, ProfileSpec
from gpuvirt.model.profile_resolve import Layout, find_mdev_type, resolve


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


__all__ = ["Check", "ValidationReport", "candidate_models", "untyped_boards", "validate"]
