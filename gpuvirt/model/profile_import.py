"""Which entries of an imported file can become profiles (pure).

NVIDIA's published configs name every board NVIDIA ships, and a file is written for many hosts: an entry
for a board the catalog does not know, or that breaks a rule of the board it names, must not stop the other
entries of the file.  :func:`plan_import` checks every entry of every config on its own and sorts it:

* **imported** - validated on the boards it can meet;
* **imported with a warning** - its vGPU types belong to a board the catalog knows but holds no vGPU types
  for (A100D-40C on the A100 80GB PCIe), or some of its device filters name no known board: it is stored as
  written and checked again when it is applied;
* **skipped** - every device filter names an unknown board, or a name exists on no board, or it breaks a
  rule of the board it is for.  The reason is kept, one line per entry.

Dropping an entry must not hand its GPUs to another entry: entries are applied in order and the last one
selecting a GPU wins, so if an *earlier* kept entry also selects the GPUs of a skipped one, those GPUs would
get a layout the config overrides.  Such a config is skipped whole.  A later entry overriding a skipped one
is harmless (it wins anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from gpuvirt.errors import ProfileError
from gpuvirt.model.catalog import Catalog, GpuModel
from gpuvirt.model.profile import ProfileEntry, ProfileSpec
from gpuvirt.model.profile_resolve import resolve
from gpuvirt.model.profile_validate import Check, ValidationReport, _model_pool, candidate_models


@dataclass(frozen=True)
class EntryIssue:
    """One entry (or, with ``entry`` 0, one whole config) that was skipped or imported with a warning."""

    config: str
    entry: int               # 1-based position in the file's config; 0 = the config as a whole
    devices: str             # the entry's device filters ("0x233510DE,0x233B10DE"), or "any device"
    reason: str

    def line(self) -> str:
        where = f"config '{self.config}'" + (f" entry {self.entry}" if self.entry else "")
        return f"{where} ({self.devices}): {self.reason}"

    def to_dict(self) -> dict[str, object]:
        return {"config": self.config, "entry": self.entry, "devices": self.devices, "reason": self.reason}


@dataclass
class ImportPlan:
    specs: list[ProfileSpec] = field(default_factory=list)          # what to store (skipped entries removed)
    reports: dict[str, ValidationReport] = field(default_factory=dict)
    skipped: list[EntryIssue] = field(default_factory=list)
    warnings: list[EntryIssue] = field(default_factory=list)
    entries_total: int = 0
    entries_imported: int = 0


def _devices(e: ProfileEntry) -> str:
    where = ",".join(e.device_filter) if e.device_filter else "any device"
    if e.devices != "all":
        where += " GPUs " + ",".join(str(i) for i in e.devices)
    return where


def _strip_label(message: str, spec: ProfileSpec) -> str:
    label = f"profile '{spec.name}': "
    return message[len(label):] if message.startswith(label) else message


def _check_entry(spec: ProfileSpec, index: int, pool: Sequence[GpuModel]
                 ) -> tuple[str | None, list[str]]:
    """(reason to skip or None, warnings) for entry ``index`` of ``spec``, checked on its own.

    An entry with device filters (or a profile pinned to a model) says which boards it is written for: it
    must be valid on each of them.  An entry without, applied to every GPU that has its names, is kept when
    it is valid on at least one board that has them; where it does not fit, applying it will be refused, and
    the import says so (NVIDIA's ``all-1g.24gb.gfx`` is written for the RTX PRO 6000, yet the RTX PRO 5000
    has that name too, with room for fewer)."""
    entry = spec.entries[index]
    one = replace(spec, entries=(entry,))
    try:
        models, unknown, unchecked = candidate_models(one, 0, pool)
    except ProfileError as exc:
        return _strip_label(exc.message, one), []
    if entry.device_filter and len(unknown) == len(entry.device_filter) and not models:
        ids = ", ".join(unknown)
        return (f"no GPU model in the catalog has PCI id {ids}" if len(unknown) == 1 else
                f"no GPU model in the catalog has any of the PCI ids {ids}"), []
    warnings = [f"device filter {f} names no GPU model in the catalog (kept for the others)" for f in unknown]
    warnings += unchecked
    failures: list[tuple[GpuModel, str]] = []
    for m in models:
        try:
            resolve(entry, m)
        except ProfileError as exc:
            failures.append((m, exc.message))
    lenient = not entry.device_filter and not spec.model
    if failures and (not lenient or len(failures) == len(models)):
        return failures[0][1], []
    warnings += [f"does not fit the {m.display_name} ({why}); applying it there will be refused"
                 for m, why in failures]
    return None, warnings


def _report(spec: ProfileSpec, pool: Sequence[GpuModel]) -> ValidationReport:
    """validate()'s report for entries already checked one by one: the boards each entry resolves on."""
    report = ValidationReport()
    for i, entry in enumerate(spec.entries):
        models, unknown, unchecked = candidate_models(spec, i, pool)
        report.unmatched_filters.extend((i, f) for f in unknown)
        report.unchecked.extend((i, why) for why in unchecked)
        for m in models:
            try:
                report.checks.append(Check(i, m.id, resolve(entry, m)))
            except ProfileError:
                pass           # reported when the entry was checked
    return report


def plan_import(specs: Iterable[ProfileSpec], models: Catalog | Iterable[GpuModel] | None = None) -> ImportPlan:
    """Sort every entry of every spec into imported / imported with a warning / skipped (module docstring)."""
    pool = _model_pool(models)
    plan = ImportPlan()
    for spec in specs:
        kept: list[int] = []
        skipped: list[int] = []
        for i, entry in enumerate(spec.entries):
            plan.entries_total += 1
            reason, warnings = _check_entry(spec, i, pool)
            if reason is not None:
                skipped.append(i)
                plan.skipped.append(EntryIssue(spec.name, i + 1, _devices(entry), reason))
                continue
            kept.append(i)
            plan.warnings.extend(EntryIssue(spec.name, i + 1, _devices(entry), w) for w in warnings)
        shadow = next(((j, i) for j in skipped for i in kept if i < j
                       and spec.entries[i].overlaps(spec.entries[j])), None)
        if shadow is not None:
            j, i = shadow
            plan.skipped.append(EntryIssue(
                spec.name, 0, "whole config",
                f"not imported: entry {j + 1} cannot be, and entry {i + 1} also selects its GPUs - without entry "
                f"{j + 1} they would get entry {i + 1}'s layout, which the config overrides for them"))
            continue
        if not kept:
            continue
        final = replace(spec, entries=tuple(spec.entries[i] for i in kept))
        plan.reports[final.name] = _report(final, pool)
        plan.specs.append(final)
        plan.entries_imported += len(kept)
    return plan


__all__ = ["EntryIssue", "ImportPlan", "plan_import"]
