"""Pre-flight rules for moving a VM's GPU device to another GPU (pure data and functions).

Before a move is planned, gpuvirt asks what NVML's migration API would answer for it: the source vGPU's
metadata (``nvmlVgpuInstanceGetMetadata``), the target GPU's (``nvmlDeviceGetVgpuMetadata``), and
``nvmlGetVgpuCompatibility`` on the pair, which returns a bit set of the migrations the pair allows
(``nvmlVgpuVmCompatibility_t``) and what limits it (``nvmlVgpuPgpuCompatibilityLimitCode_t``).  NVML keeps its
reasoning inside opaque data; this module restates it as explicit, configurable rules over the facts gpuvirt
records per host, GPU and vGPU, so that

* the move planner (:mod:`gpuvirt.model.moves`) can judge thousands of candidate moves without a host,
* the simulator's NVML compatibility entry points can answer from the same rules, and
* the service layer can check one move again on the real hosts right before carrying it out.

Facts and their sources are in ``../shared/reference/live-migration.md``; docs/placement.md ("Rebalancing")
lists what can and cannot be checked before moving.  UNVERIFIED choices (each a field of
:class:`MigrationRules`, so an operator can change it):

* MIG-backed vGPU live migration: no public statement either way; refused by default
  (``mig_backed_live=False``) with ``NVML_VGPU_COMPATIBILITY_LIMIT_OTHER``.
* Board variants of one catalog model (e.g. H100 SXM5 vs PCIe, same vGPU type ids): NVIDIA names only some
  pairs that cannot live-migrate (80 GB PCIe vs 94 GB NVL, H100 / H800 / H200), so live moves are allowed
  only between GPUs with the same PCI device id (``same_device_id=True``); cold moves are allowed.
* Which GPU families support live migration (the AI Enterprise support matrix is not in the reference):
  every family by default (``live_families=None``).
* The VM compatibility bits of a live-capable pair: LIVE | SLEEP | HIBERNATE | COLD; of a cold-only pair:
  COLD alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

# --- NVML vocabulary (nvml.h; the values are those of nvidia-ml-py 13.615.71) ---------------------------------
VGPU_VM_COMPATIBILITY_NONE = 0x0
VGPU_VM_COMPATIBILITY_COLD = 0x1
VGPU_VM_COMPATIBILITY_HIBERNATE = 0x2
VGPU_VM_COMPATIBILITY_SLEEP = 0x4
VGPU_VM_COMPATIBILITY_LIVE = 0x8

VGPU_COMPATIBILITY_LIMIT_NONE = 0x0
VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER = 0x1
VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER = 0x2
VGPU_COMPATIBILITY_LIMIT_GPU = 0x4
VGPU_COMPATIBILITY_LIMIT_OTHER = 0x80000000

LIMIT_NAMES = {
    VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER: "NVML_VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER",
    VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER: "NVML_VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER",
    VGPU_COMPATIBILITY_LIMIT_GPU: "NVML_VGPU_COMPATIBILITY_LIMIT_GPU",
    VGPU_COMPATIBILITY_LIMIT_OTHER: "NVML_VGPU_COMPATIBILITY_LIMIT_OTHER",
}

# bit 0 of nvmlVgpuMetadata_t.vgpuVirtualizationCaps / nvmlVgpuPgpuMetadata_t.pgpuVirtualizationCaps
# (NVML_VGPU_VIRTUALIZATION_CAP_MIGRATION / NVML_VGPU_PGPU_VIRTUALIZATION_CAP_MIGRATION, "0:0" in nvml.h; no
# Python constant in nvidia-ml-py 13.615.71)
VIRTUALIZATION_CAP_MIGRATION = 0x1

# nvmlVgpuGuestInfoState_t
VGPU_INSTANCE_GUEST_INFO_STATE_UNINITIALIZED = 0
VGPU_INSTANCE_GUEST_INFO_STATE_INITIALIZED = 1

LIVE, COLD, NONE = "live", "cold", "none"

_LIVE_BITS = (VGPU_VM_COMPATIBILITY_LIVE | VGPU_VM_COMPATIBILITY_SLEEP | VGPU_VM_COMPATIBILITY_HIBERNATE
              | VGPU_VM_COMPATIBILITY_COLD)


def limit_names(code: int) -> str:
    """``NVML_VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER|...`` for a limit code (bits OR-ed), ``..._NONE`` for 0."""
    if not code:
        return "NVML_VGPU_COMPATIBILITY_LIMIT_NONE"
    return "|".join(name for bit, name in sorted(LIMIT_NAMES.items()) if code & bit)


def version_key(text: str | None) -> tuple[int, ...] | None:
    """``"550.127.05"`` -> (550, 127, 5); ``"rhel-9.4"`` -> (9, 4); None when no number is in it."""
    if not text:
        return None
    # ASCII digits, at most 9 each: the text may come from another host's inventory rows, and a number of
    # thousands of digits does not even convert (ValueError); such a version is unknown, which refuses live moves
    nums = re.findall(r"[0-9]+", text)
    if not nums or any(len(n) > 9 for n in nums):
        return None
    return tuple(int(n) for n in nums)


def _shown(text: str | None) -> str:
    """A recorded version for a message: another host wrote it, so at most 64 printable characters."""
    if not text:
        return "?"
    return text if len(text) <= 64 and text.isprintable() else repr(text[:64]) + ("..." if len(text) > 64 else "")


def _at_least(have: str | None, need: str | None) -> bool:
    if need is None:
        return True
    h, n = version_key(have), version_key(need)
    return h is not None and n is not None and h >= n


# --- facts --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostStack:
    """What a host runs, as far as migration cares.  None = not known (which refuses a live move).

    ``vgpu_range`` is ``hostSupportedVgpuRange`` of ``nvmlVgpuPgpuMetadata_t`` (from ``nvmlGetVgpuVersion``):
    the (min, max) vGPU versions the host driver accepts from a guest driver.
    """

    driver: str | None = None           # vGPU manager (host driver) version, e.g. "550.127.05"
    os: str | None = None               # hypervisor release as "<id>-<version>" from os-release, e.g. "rhel-9.4"
    kernel: str | None = None
    qemu: str | None = None
    libvirt: str | None = None
    vgpu_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class GuestFacts:
    """What the guest reports through the vGPU (``nvmlVgpuMetadata_t``'s guest fields)."""

    initialized: bool = False           # guestInfoState: the guest driver has loaded and reported
    driver: str | None = None           # guestDriverVersion
    vgpu_version: int | None = None     # guestVgpuVersion


@dataclass(frozen=True)
class VgpuMetadata:
    """The source side of a move: ``nvmlVgpuInstanceGetMetadata`` plus what gpuvirt knows of the instance.

    ``type_id`` is None for a bare GPU instance (no vGPU on it: a container's or a passthrough consumer's MIG
    device), which NVML's migration API does not cover.
    """

    type_id: int | None
    type_name: str | None
    model: str                          # catalog model id of the source GPU
    device_id: int | None               # its PCI device id (board variant)
    family: str | None                  # catalog architecture (ampere, hopper, ...)
    mig_backed: bool
    stack: HostStack = HostStack()
    guest: GuestFacts = GuestFacts()
    migration_cap: bool = True          # vgpuVirtualizationCaps & VIRTUALIZATION_CAP_MIGRATION


@dataclass(frozen=True)
class PgpuMetadata:
    """The target side: ``nvmlDeviceGetVgpuMetadata`` on the target GPU plus its catalog facts."""

    model: str
    device_id: int | None
    family: str | None
    supported_types: frozenset[int]     # nvmlDeviceGetSupportedVgpus
    stack: HostStack = HostStack()
    migration_cap: bool = True          # pgpuVirtualizationCaps & VIRTUALIZATION_CAP_MIGRATION


@dataclass(frozen=True)
class MigrationRules:
    """The rules gpuvirt applies for NVML's compatibility answer; every UNVERIFIED choice is a field.

    Defaults follow NVIDIA's AI Enterprise "Live Migration" page and the RHEL documentation quoted in
    live-migration.md: the host drivers must match exactly, live migration is supported on RHEL KVM 9.4 / 9.6
    / 10.0 and Ubuntu KVM 24.04 but not between RHEL 10 and RHEL 9.4, and mdev vGPU live migration needs
    kernel >= 5.18, QEMU >= 8.1 and libvirt >= 8.6 upstream (OpenStack Nova 2024.1).  The upstream minimums
    are applied only to hosts whose release is not in ``live_os``: vendor releases carry backports (RHEL 9.4
    ships kernel 5.14), so with the default ``live_os`` they matter only once it is widened or set to None.
    """

    mig_backed_live: bool = False                       # UNVERIFIED: MIG-backed vGPU live migration
    driver_match: str = "exact"                         # exact | branch (same major number) | any
    # host driver versions allowed for live migration, as inclusive (low, high) ranges; empty: any version
    driver_ranges: tuple[tuple[str, str], ...] = ()
    live_os: frozenset[str] | None = frozenset({"rhel-9.4", "rhel-9.6", "rhel-10.0", "ubuntu-24.04"})
    os_exclusions: frozenset[frozenset[str]] = frozenset({frozenset({"rhel-10.0", "rhel-9.4"})})
    min_kernel: str | None = "5.18"
    min_qemu: str | None = "8.1"
    min_libvirt: str | None = "8.6"
    live_families: frozenset[str] | None = None          # UNVERIFIED: None = every family
    same_device_id: bool = True                          # UNVERIFIED: live only within one board variant

    def __post_init__(self) -> None:
        if self.driver_match not in ("exact", "branch", "any"):
            raise ValueError(f"driver_match must be exact, branch or any, not {self.driver_match!r}")


DEFAULT_RULES = MigrationRules()


@dataclass(frozen=True)
class Reason:
    """One rule that limits a move: the verdict it allows at most, NVML's limit code, and why."""

    allows: str                  # cold | none
    limit: int
    text: str

    def message(self) -> str:
        return f"{self.text} ({limit_names(self.limit)})"


@dataclass(frozen=True)
class Compatibility:
    """gpuvirt's statement of ``nvmlVgpuPgpuCompatibility_t`` for one (source vGPU, target GPU) pair."""

    vm_compatibility: int        # nvmlVgpuVmCompatibility_t bits
    limit_code: int              # nvmlVgpuPgpuCompatibilityLimitCode_t bits of every limiting rule, OR-ed
    reasons: tuple[Reason, ...] = ()

    @property
    def verdict(self) -> str:
        if self.vm_compatibility & VGPU_VM_COMPATIBILITY_LIVE:
            return LIVE
        if self.vm_compatibility & VGPU_VM_COMPATIBILITY_COLD:
            return COLD
        return NONE

    def allows(self, kind: str) -> bool:
        """A live-capable pair can also be moved cold; a cold-only pair cannot be moved live."""
        if kind == LIVE:
            return self.verdict == LIVE
        if kind == COLD:
            return self.verdict in (LIVE, COLD)
        raise ValueError(f"unknown move kind {kind!r}")

    def message(self) -> str:
        head = {LIVE: "live migration allowed", COLD: "cold migration only", NONE: "cannot be migrated"}
        text = head[self.verdict]
        if self.reasons:
            text += ": " + "; ".join(r.message() for r in self.reasons)
        return text


def _combine(reasons: Sequence[Reason]) -> Compatibility:
    worst = LIVE
    code = 0
    for r in reasons:
        code |= r.limit
        if r.allows == NONE:
            worst = NONE
        elif worst == LIVE:
            worst = COLD
    bits = {LIVE: _LIVE_BITS, COLD: VGPU_VM_COMPATIBILITY_COLD, NONE: VGPU_VM_COMPATIBILITY_NONE}[worst]
    return Compatibility(bits, code, tuple(reasons))


def _driver_reasons(src: str | None, dst: str | None, rules: MigrationRules) -> list[Reason]:
    out: list[Reason] = []
    s, d = version_key(src), version_key(dst)
    if s is None or d is None:
        out.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER,
                          f"host driver version unknown (source {_shown(src)}, target {_shown(dst)})"))
        return out
    if rules.driver_match == "exact" and s != d:
        out.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER,
                          f"host drivers differ: {src} on the source, {dst} on the target (they must match)"))
    elif rules.driver_match == "branch" and s[0] != d[0]:
        out.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER,
                          f"host driver branches differ: {src} on the source, {dst} on the target"))
    if rules.driver_ranges:
        for name, v, text in (("source", s, src), ("target", d, dst)):
            if not any(version_key(lo) <= v <= version_key(hi) for lo, hi in rules.driver_ranges):  # type: ignore[operator]
                ranges = ", ".join(f"{lo}..{hi}" for lo, hi in rules.driver_ranges)
                out.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER,
                                  f"{name} host driver {text} is outside the live-migration ranges {ranges}"))
    return out


def _stack_reasons(src: HostStack, dst: HostStack, rules: MigrationRules) -> list[Reason]:
    out: list[Reason] = []
    if rules.live_os is not None:
        for name, st in (("source", src), ("target", dst)):
            if st.os not in rules.live_os:
                out.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_OTHER,
                                  f"{name} hypervisor {st.os or 'unknown'} is not one NVIDIA supports for vGPU live "
                                  f"migration ({', '.join(sorted(rules.live_os))})"))
    if src.os and dst.os and frozenset({src.os, dst.os}) in rules.os_exclusions:
        out.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_OTHER,
                          f"no live migration between {src.os} and {dst.os}"))
    for what, need in (("kernel", rules.min_kernel), ("qemu", rules.min_qemu), ("libvirt", rules.min_libvirt)):
        for name, st in (("source", src), ("target", dst)):
            if rules.live_os is not None and st.os in rules.live_os:
                continue        # a vendor-supported release carries backports (RHEL 9.4 ships kernel 5.14)
            have = getattr(st, what)
            if not _at_least(have, need):
                out.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_OTHER,
                                  f"{name} {what} {have or 'unknown'} is older than {need}, the first with vGPU "
                                  "live migration"))
    return out


def vgpu_compatibility(vm: VgpuMetadata, pgpu: PgpuMetadata, rules: MigrationRules = DEFAULT_RULES) -> Compatibility:
    """What ``nvmlGetVgpuCompatibility(vgpuMetadata, pgpuMetadata)`` answers, by gpuvirt's rules.

    A refusal of everything (NONE): the target GPU does not support the vGPU type (LIMIT_GPU), or the guest's
    vGPU version is outside the target host driver's supported range (LIMIT_GUEST_DRIVER).  Cold only: another
    board model or variant, a family without live migration, a migration capability bit off (LIMIT_GPU or
    LIMIT_OTHER); MIG-backed vGPU unless ``rules.mig_backed_live`` (LIMIT_OTHER); host drivers not matching
    or outside ``rules.driver_ranges`` (LIMIT_HOST_DRIVER); hypervisor, kernel, QEMU or libvirt not supported
    (LIMIT_OTHER).  Every limiting rule is listed; ``limit_code`` ORs their codes.
    """
    reasons: list[Reason] = []
    if vm.type_id is None:
        # a bare GPU instance: no vGPU, so no device state NVML could carry; checkpoint/restart only
        if pgpu.model != vm.model:
            reasons.append(Reason(NONE, VGPU_COMPATIBILITY_LIMIT_GPU,
                                  f"a GPU instance of {vm.model} cannot be recreated on {pgpu.model} (profile ids "
                                  "differ per model)"))
        reasons.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_OTHER,
                              "a GPU instance without a vGPU has no live migration (its consumer is restarted)"))
        return _combine(reasons)
    label = f"vGPU type {vm.type_id}" + (f" ({vm.type_name})" if vm.type_name else "")
    if vm.type_id not in pgpu.supported_types:
        reasons.append(Reason(NONE, VGPU_COMPATIBILITY_LIMIT_GPU, f"{label} is not supported on {pgpu.model}"))
    g = vm.guest
    if g.initialized and g.vgpu_version is not None and pgpu.stack.vgpu_range is not None:
        lo, hi = pgpu.stack.vgpu_range
        if not lo <= g.vgpu_version <= hi:
            reasons.append(Reason(NONE, VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER,
                                  f"guest vGPU version {g.vgpu_version:#x} (guest driver {g.driver or '?'}) is outside "
                                  f"the target host driver's range {lo:#x}..{hi:#x}"))
    if pgpu.model != vm.model:
        reasons.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_GPU,
                              f"source and target are different boards ({vm.model} vs {pgpu.model})"))
    elif rules.same_device_id and vm.device_id != pgpu.device_id:
        def hexid(v: int | None) -> str:
            return "?" if v is None else f"{v:#06x}"
        reasons.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_GPU,
                              f"source and target are different variants of {vm.model} (device "
                              f"{hexid(vm.device_id)} vs {hexid(pgpu.device_id)})"))
    if rules.live_families is not None and vm.family not in rules.live_families:
        reasons.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_GPU,
                              f"{vm.family or 'unknown'} GPUs are not in the live-migration families "
                              f"({', '.join(sorted(rules.live_families))})"))
    if not pgpu.migration_cap:
        reasons.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_GPU,
                              "the target GPU does not report the migration capability (pgpuVirtualizationCaps)"))
    if not vm.migration_cap:
        reasons.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_OTHER,
                              f"{label} does not report the migration capability (vgpuVirtualizationCaps)"))
    if vm.mig_backed and not rules.mig_backed_live:
        reasons.append(Reason(COLD, VGPU_COMPATIBILITY_LIMIT_OTHER,
                              f"{label} is MIG-backed, and live migration of MIG-backed vGPUs is not enabled "
                              "(no public statement either way; MigrationRules.mig_backed_live)"))
    reasons += _driver_reasons(vm.stack.driver, pgpu.stack.driver, rules)
    reasons += _stack_reasons(vm.stack, pgpu.stack, rules)
    return _combine(reasons)


# --- builders from catalog facts ----------------------------------------------------------------------------------
def vgpu_metadata(model, type_id: int | None, *, stack: HostStack = HostStack(), guest: GuestFacts = GuestFacts(),
                  device_id: int | None = None, migration_cap: bool = True) -> VgpuMetadata:
    """Source metadata for a vGPU of ``type_id`` (None: a bare GPU instance) on a GPU of catalog ``model``."""
    vtype = None
    if type_id is not None and model.vgpu is not None:
        vtype = next((t for t in model.vgpu.types if t.id == type_id), None)
    return VgpuMetadata(type_id=type_id, type_name=vtype.name if vtype else None, model=model.id,
                        device_id=model.device_id if device_id is None else device_id, family=model.architecture,
                        mig_backed=bool(vtype and vtype.mig_backed), stack=stack, guest=guest,
                        migration_cap=migration_cap)


def pgpu_metadata(model, *, stack: HostStack = HostStack(), device_id: int | None = None,
                  migration_cap: bool = True) -> PgpuMetadata:
    """Target metadata for a GPU of catalog ``model``."""
    types = frozenset(t.id for t in model.vgpu.types) if model.vgpu is not None else frozenset()
    return PgpuMetadata(model=model.id, device_id=model.device_id if device_id is None else device_id,
                        family=model.architecture, supported_types=types, stack=stack, migration_cap=migration_cap)


@dataclass(frozen=True)
class MoveCheck:
    """The pre-flight answer for one move: the best kind the policy may use, or None with the reasons."""

    kind: str | None                      # live | cold | None (refused)
    compatibility: Compatibility
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.kind is not None

    def message(self) -> str:
        parts = list(self.problems)
        if self.kind is None or self.compatibility.reasons:
            parts.append(self.compatibility.message())
        return "; ".join(parts) if parts else f"{self.kind} move allowed"


def check_move(vm: VgpuMetadata, pgpu: PgpuMetadata, allow: Iterable[str] = (LIVE,),
               rules: MigrationRules = DEFAULT_RULES, room: int | None = None) -> MoveCheck:
    """Pre-flight for moving one vGPU (or bare GPU instance) to a target GPU under a policy.

    ``allow`` is the set of move kinds the operator permits (live, cold); ``room`` how many more instances of
    the same type the target would accept now (``vgpu.available`` or sysfs ``available_instances``; None: not
    checked here, e.g. because the planner tracks capacity itself).  The move gets ``live`` when the pair is
    live-compatible and live moves are allowed, else ``cold`` when the pair allows cold and cold moves are
    allowed, else it is refused.
    """
    allow = frozenset(allow)
    for k in allow:
        if k not in (LIVE, COLD):
            raise ValueError(f"unknown move kind {k!r} (live, cold)")
    compat = vgpu_compatibility(vm, pgpu, rules)
    problems: list[str] = []
    if room is not None and room <= 0 and compat.verdict != NONE:
        what = f"vGPU type {vm.type_id}" if vm.type_id is not None else "the GPU instance"
        problems.append(f"{what} has no room on the target now (0 more can be created)")
    kind = None
    if not problems:
        if LIVE in allow and compat.allows(LIVE):
            kind = LIVE
        elif COLD in allow and compat.allows(COLD):
            kind = COLD
        elif compat.verdict != NONE:
            problems.append(f"a {compat.verdict} move is needed and the policy allows only "
                            f"{', '.join(sorted(allow)) or 'no moves'}")
    return MoveCheck(kind, compat, tuple(problems))


__all__ = [
    "VGPU_VM_COMPATIBILITY_NONE", "VGPU_VM_COMPATIBILITY_COLD", "VGPU_VM_COMPATIBILITY_HIBERNATE",
    "VGPU_VM_COMPATIBILITY_SLEEP", "VGPU_VM_COMPATIBILITY_LIVE", "VGPU_COMPATIBILITY_LIMIT_NONE",
    "VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER", "VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER", "VGPU_COMPATIBILITY_LIMIT_GPU",
    "VGPU_COMPATIBILITY_LIMIT_OTHER", "VIRTUALIZATION_CAP_MIGRATION", "LIVE", "COLD", "NONE", "HostStack",
    "GuestFacts", "VgpuMetadata", "PgpuMetadata", "MigrationRules", "DEFAULT_RULES", "Reason", "Compatibility",
    "MoveCheck", "vgpu_compatibility", "vgpu_metadata", "pgpu_metadata", "check_move", "limit_names",
    "version_key",
]
