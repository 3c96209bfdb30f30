"""What a simulated host runs, as far as moving VMs cares: host driver, hypervisor release, kernel, QEMU,
libvirt, the vGPU version range, and the migration rules its simulated NVML answers with.

The settings live in the state document (``driver_version``, ``host_stack``, ``migration_rules``; layout in
:mod:`gpuvirt.sim.nvml_migration`) and are changed with ``gpuvirt sim migration DIR ...``
(:func:`configure`).  Two consumers read them, each through its own channel as on a real host:

* the simulated NVML (:mod:`gpuvirt.sim.nvml_migration`): host driver version, vGPU version range,
  migration capability bits, and the opaque data of the metadata structures;
* the rendered tree (:func:`render`): ``etc/os-release``, ``proc/sys/kernel/osrelease`` and libvirt's QEMU
  capabilities cache ``var/cache/libvirt/qemu/capabilities/<sha256 of the emulator path>.xml``, the files
  :func:`gpuvirt.host.stack.host_stack` reads (docs/simulator-fidelity.md, "Host stack").
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from gpuvirt.errors import UsageError
from gpuvirt.model import preflight
from gpuvirt.sim.nvml_base import DEFAULT_DRIVER_VERSION

DEFAULT_HOST_STACK: dict[str, Any] = {
    # a host NVIDIA lists for vGPU live migration (RHEL KVM 9.4), with the versions that release ships
    "os": "rhel-9.4",
    "kernel": "5.14.0-427.13.1.el9_4.x86_64",
    "qemu": "8.2.0",
    "libvirt": "10.0.0",
    "vgpu_supported": [0x100000, 0x120000],       # UNVERIFIED encoding and range: vGPU 16.0 .. 18.0
    "vgpu_current": None,                        # None: the supported range
    "pgpu_migration_cap": True,
    "vgpu_migration_cap": True,
}
MAX_VGPU_VERSION = 0xFFFFFFFF
_SET_FIELDS = ("live_os", "live_families")
_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~:-]{0,63}")
_OS = re.compile(r"[a-z0-9][a-z0-9._-]{0,23}-[0-9][0-9.]{0,15}")
_VERSION = re.compile(r"\d{1,3}(\.\d{1,3}){1,2}", re.ASCII)
# emulator binaries by distribution family: RHEL ships QEMU as /usr/libexec/qemu-kvm only
_RHEL_LIKE = ("rhel", "centos", "rocky", "almalinux", "ol", "fedora")
_OS_NAMES = {"rhel": "Red Hat Enterprise Linux", "ubuntu": "Ubuntu", "rocky": "Rocky Linux", "debian": "Debian GNU/Linux"}
CAPS_DIR = "var/cache/libvirt/qemu/capabilities"


def host_stack_doc(state: dict[str, Any]) -> dict[str, Any]:
    """The simulated host's stack settings with defaults filled in, plus ``driver``."""
    doc = {**DEFAULT_HOST_STACK, **(state.get("host_stack") or {})}
    doc["driver"] = str(state.get("driver_version") or DEFAULT_DRIVER_VERSION)
    return doc


def current_range(doc: dict[str, Any]) -> tuple[int, int]:
    lo, hi = doc.get("vgpu_current") or doc["vgpu_supported"]
    return int(lo), int(hi)


# --- the rules as JSON ------------------------------------------------------------------------------------------
def rules_to_doc(rules: preflight.MigrationRules) -> dict[str, Any]:
    return {"mig_backed_live": rules.mig_backed_live, "driver_match": rules.driver_match,
            "driver_ranges": [list(r) for r in rules.driver_ranges],
            "live_os": None if rules.live_os is None else sorted(rules.live_os),
            "os_exclusions": sorted(sorted(p) for p in rules.os_exclusions),
            "min_kernel": rules.min_kernel, "min_qemu": rules.min_qemu, "min_libvirt": rules.min_libvirt,
            "live_families": None if rules.live_families is None else sorted(rules.live_families),
            "same_device_id": rules.same_device_id}


_RULE_VERSION = re.compile(r"\d{1,6}(\.\d{1,6}){0,3}", re.ASCII)
MAX_RULE_ITEMS = 64


def _items(key: str, value: Any, exactly: int | None = None) -> list[Any]:
    # a list, not a string (whose characters would silently become the set) nor anything unbounded
    if not isinstance(value, (list, tuple)) or len(value) > MAX_RULE_ITEMS or \
            (exactly is not None and len(value) != exactly):
        size = f"{exactly} items" if exactly is not None else f"at most {MAX_RULE_ITEMS} items"
        raise ValueError(f"{key} must be a list of {size}, not {str(value)[:60]!r}")
    return list(value)


def _word(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _TEXT.fullmatch(value):
        raise ValueError(f"{key}: {str(value)[:60]!r} is not a release or family name")
    return value


def _rule_version(key: str, value: Any) -> str:
    # versions are compared number by number (preflight.version_key); anything else would never match, or
    # (thousands of digits) not even convert
    text = str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    if not _RULE_VERSION.fullmatch(text):
        raise ValueError(f"{key} must be a version such as 8.1 or 550.127.05, not {str(value)[:60]!r}")
    return text


def rules_from_doc(doc: dict[str, Any] | None) -> preflight.MigrationRules:
    """MigrationRules from the state's ``migration_rules`` (missing keys: the defaults); ValueError for a key
    or value of the wrong kind."""
    if not doc:
        return preflight.DEFAULT_RULES
    known = set(rules_to_doc(preflight.DEFAULT_RULES))
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"unknown migration rule(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    try:
        for key, value in doc.items():
            if key in _SET_FIELDS:
                kw[key] = None if value is None else frozenset(_word(key, v) for v in _items(key, value))
            elif key == "os_exclusions":
                kw[key] = frozenset(frozenset(_word(key, v) for v in _items(key, pair, 2)) for pair in
                                    _items(key, value))
            elif key == "driver_ranges":
                kw[key] = tuple((_rule_version(key, lo), _rule_version(key, hi)) for lo, hi in
                                (_items(key, r, 2) for r in _items(key, value)))
            elif key in ("mig_backed_live", "same_device_id"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false, not {value!r}")
                kw[key] = value
            elif key == "driver_match":
                kw[key] = str(value)
            else:
                kw[key] = None if value is None else _rule_version(key, value)
    except TypeError as exc:
        raise ValueError(f"migration rule of the wrong shape: {exc}") from None
    return preflight.MigrationRules(**kw)


def migration_rules(state: dict[str, Any]) -> preflight.MigrationRules:
    return rules_from_doc(state.get("migration_rules"))


# --- the rendered files ------------------------------------------------------------------------------------------
def version_number(text: str) -> int:
    """libvirt's encoding of a version: ``"8.2.0"`` -> 8002000 (major * 10^6 + minor * 10^3 + micro)."""
    parts = [int(p) for p in text.split(".")][:3] + [0, 0]
    return parts[0] * 1_000_000 + parts[1] * 1_000 + parts[2]


def emulator_path(os_release: str) -> str:
    os_id = os_release.rpartition("-")[0]
    return "/usr/libexec/qemu-kvm" if os_id in _RHEL_LIKE else "/usr/bin/qemu-system-x86_64"


def render(state: dict[str, Any]) -> dict[str, tuple]:
    """Tree entries (``gpuvirt.sim.tree`` kinds) for the host stack: os-release, the kernel release, and one
    libvirt QEMU capabilities cache file with libvirt's own version (``selfvers``) and QEMU's (``version``)."""
    doc = host_stack_doc(state)
    tree: dict[str, tuple] = {}
    os_id, _, os_version = str(doc["os"]).rpartition("-")
    name = _OS_NAMES.get(os_id, os_id)
    tree["etc/os-release"] = ("file", f'NAME="{name}"\nVERSION="{os_version}"\nID="{os_id}"\n'
                              f'VERSION_ID="{os_version}"\nPRETTY_NAME="{name} {os_version}"\n', 0o644)
    for d in ("proc", "proc/sys", "proc/sys/kernel"):
        tree[d] = ("dir",)
    tree["proc/sys/kernel/osrelease"] = ("file", f"{doc['kernel']}\n", 0o444)
    for d in ("var", "var/cache", "var/cache/libvirt", "var/cache/libvirt/qemu", CAPS_DIR):
        tree[d] = ("dir",)
    emulator = emulator_path(str(doc["os"]))
    name_hash = hashlib.sha256(emulator.encode()).hexdigest()
    tree[f"{CAPS_DIR}/{name_hash}.xml"] = ("file", (
        "<qemuCaps>\n"
        f"  <emulator>{emulator}</emulator>\n"
        "  <qemuctime>0</qemuctime>\n"
        "  <selfctime>0</selfctime>\n"
        f"  <selfvers>{version_number(str(doc['libvirt']))}</selfvers>\n"
        "  <flag name='kvm'/>\n"
        "  <flag name='vfio-pci'/>\n"
        f"  <version>{version_number(str(doc['qemu']))}</version>\n"
        "  <kvmVersion>0</kvmVersion>\n"
        f"  <package>gpuvirt-sim-{doc['qemu']}</package>\n"
        "  <arch>x86_64</arch>\n"
        "</qemuCaps>\n"), 0o600)
    return tree


# --- the world control -------------------------------------------------------------------------------------------
def _vgpu_range(text: str, what: str) -> list[int]:
    lo, sep, hi = text.partition("-")
    try:
        pair = [int(lo.strip(), 0), int(hi.strip(), 0)] if sep else []
    except ValueError:
        pair = []
    if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= MAX_VGPU_VERSION:
        raise UsageError(f"{what} '{text}': expected MIN-MAX vGPU versions, e.g. 0x100000-0x120000")
    return pair


def check(*, driver: str | None = None, os: str | None = None, kernel: str | None = None,
          qemu: str | None = None, libvirt: str | None = None, vgpu_supported: str | None = None,
          vgpu_current: str | None = None, pgpu_migration_cap: bool | None = None,
          vgpu_migration_cap: bool | None = None, rules: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validated changes as {"driver_version": ..., "host_stack": {...}, "migration_rules": {...}}; UsageError
    (one line) for anything malformed, before anything changes."""
    out: dict[str, Any] = {"host_stack": {}, "migration_rules": {}}
    if driver is not None:
        if not re.fullmatch(r"\d{1,4}(\.\d{1,4}){1,3}", driver, re.ASCII):
            raise UsageError(f"--driver '{driver}': expected a driver version such as 550.127.05")
        out["driver_version"] = driver
    if os is not None:
        if not _OS.fullmatch(os):
            raise UsageError(f"--os '{os}': expected <os-release ID>-<VERSION_ID>, e.g. rhel-9.4 or ubuntu-24.04")
        out["host_stack"]["os"] = os
    if kernel is not None:
        if not _TEXT.fullmatch(kernel):
            raise UsageError(f"--kernel '{kernel}': expected a kernel release such as 5.14.0-427.13.1.el9_4.x86_64")
        out["host_stack"]["kernel"] = kernel
    for key, value in (("qemu", qemu), ("libvirt", libvirt)):
        if value is not None:
            if not _VERSION.fullmatch(value):
                raise UsageError(f"--{key} '{value}': expected MAJOR.MINOR[.MICRO], each at most 999")
            out["host_stack"][key] = value
    if vgpu_supported is not None:
        out["host_stack"]["vgpu_supported"] = _vgpu_range(vgpu_supported, "--vgpu-supported")
    if vgpu_current is not None:
        out["host_stack"]["vgpu_current"] = None if vgpu_current == "supported" else \
            _vgpu_range(vgpu_current, "--vgpu-current")
    for key, value in (("pgpu_migration_cap", pgpu_migration_cap), ("vgpu_migration_cap", vgpu_migration_cap)):
        if value is not None:
            out["host_stack"][key] = bool(value)
    if rules:
        try:
            rules_from_doc(rules)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        out["migration_rules"] = dict(rules)
    return out


def configure(sim: Any, **changes: Any) -> dict[str, Any]:
    """Change the simulated host's stack and migration rules (``gpuvirt sim migration``); returns the result:
    {"driver", "host_stack", "rules"}."""
    valid = check(**changes)
    with sim.transaction() as state:
        if "driver_version" in valid:
            state["driver_version"] = valid["driver_version"]
        stack = {**(state.get("host_stack") or {}), **valid["host_stack"]}
        lo_hi = stack.get("vgpu_current")
        sup = stack.get("vgpu_supported") or DEFAULT_HOST_STACK["vgpu_supported"]
        if lo_hi is not None and not (sup[0] <= lo_hi[0] and lo_hi[1] <= sup[1]):
            raise UsageError(f"--vgpu-current {lo_hi[0]:#x}-{lo_hi[1]:#x} is outside the supported range "
                             f"{sup[0]:#x}-{sup[1]:#x}")
        if stack:
            state["host_stack"] = stack
        if valid["migration_rules"]:
            state["migration_rules"] = {**(state.get("migration_rules") or {}), **valid["migration_rules"]}
        return describe(state)


def describe(state: dict[str, Any]) -> dict[str, Any]:
    doc = host_stack_doc(state)
    lo, hi = current_range(doc)
    return {"driver": doc["driver"], "os": doc["os"], "kernel": doc["kernel"], "qemu": doc["qemu"],
            "libvirt": doc["libvirt"], "vgpu_supported": [int(x) for x in doc["vgpu_supported"]],
            "vgpu_current": [lo, hi], "pgpu_migration_cap": doc["pgpu_migration_cap"],
            "vgpu_migration_cap": doc["vgpu_migration_cap"], "rules": rules_to_doc(migration_rules(state))}


__all__ = ["DEFAULT_HOST_STACK", "host_stack_doc", "current_range", "rules_to_doc", "rules_from_doc",
           "migration_rules", "render", "check", "configure", "describe", "version_number", "CAPS_DIR"]
