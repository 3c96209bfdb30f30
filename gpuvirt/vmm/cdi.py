"""CDI (Container Device Interface) specs for devices gpuvirt hands to containers - rendering and parsing only.

One spec file per allocated device, in a kind gpuvirt owns (``<vendor>/mig``, ``<vendor>/gpu``,
``<vendor>/vfio``; vendor ``gpuvirt.io`` unless configured), never NVIDIA's ``nvidia.com/gpu`` or another
tool's.  Facts (``../shared/reference/containers-cdi.md``; CDI spec 1.1.0 and its parser; nvidia-container-
toolkit's generator):

* a fully qualified device name is ``VENDOR/CLASS=NAME``; the vendor is a DNS-like name (starts with a letter,
  ends alphanumeric, ``. - _`` inside), the class alphanumerics plus ``_ -``, a device name starts and ends
  with an alphanumeric and holds only alphanumerics and ``_ - . :``;
* the device name is the MIG device UUID (``MIG-...``) or the GPU UUID (``GPU-...``): the stable key, unlike
  NVIDIA's ``<gpu>:<mig>`` index, which changes when instances are re-created; a GPU bound to vfio-pci (NVML
  cannot see it) is named by its PCI address;
* a MIG device's nodes, in NVIDIA's order: the parent ``/dev/nvidia<minor>``, the GPU-instance access
  capability ``/dev/nvidia-caps/nvidia-cap<m>``, the compute-instance one; the parent's DRM nodes only for
  ``+gfx`` profiles; a whole GPU: ``/dev/nvidia<minor>`` and its DRM nodes; the VFIO form
  ``/dev/vfio/<group>`` with ``/dev/vfio/vfio`` in the common edits;
* nested nodes under ``/dev/nvidia-caps`` or ``/dev/dri`` get NVIDIA's ``createContainer`` hook
  ``nvidia-cdi-hook chmod --mode 755 --path <dir>`` (rootless podman + crun, containers/crun#1047);
* the common edits (``/dev/nvidiactl``, uvm, driver libraries, NVIDIA's own hooks) are taken from the
  top-level ``containerEdits`` of an ``nvidia-ctk cdi generate`` output when the host has one.

``cdiVersion`` is 0.5.0 (``hostPath`` needs it; nothing newer is used - podman 4.3, Debian 12's, reads at most
0.5.0).  Version 0.5.0 has no annotations, so a file is marked as gpuvirt's by its name prefix
(:data:`FILE_PREFIX`), its kind's vendor and a first-line YAML comment (:data:`MARK`) followed by a line of
JSON metadata; the body is JSON, which YAML readers (the runtimes) accept.  A file without the mark is
foreign: gpuvirt never rewrites or removes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from gpuvirt.errors import UsageError

CDI_VERSION = "0.5.0"
DEFAULT_VENDOR = "gpuvirt.io"
CLASS_MIG, CLASS_GPU, CLASS_VFIO = "mig", "gpu", "vfio"
FILE_PREFIX = "gpuvirt_"
FILE_SUFFIX = ".yaml"
MARK = "# gpuvirt-managed CDI spec"
DEFAULT_HOOK_PATH = "/usr/bin/nvidia-cdi-hook"
NESTED_DIRS = ("/dev/dri", "/dev/nvidia-caps")     # the folders NVIDIA's chmod work-around is for
MAX_SPEC_BYTES = 4 * 1024 * 1024                   # an nvidia-ctk spec lists every driver library: ~100 KB

_ALNUM = re.compile(r"[A-Za-z0-9]")


def _alnum(c: str) -> bool:
    return bool(_ALNUM.fullmatch(c))


def vendor_problem(vendor: str) -> str | None:
    if not vendor:
        return "empty vendor name"
    if not vendor[0].isascii() or not vendor[0].isalpha():
        return f"vendor {vendor!r} should start with a letter"
    if any(not (_alnum(c) or c in "_-.") for c in vendor[1:-1]):
        return f"vendor {vendor!r} has characters other than letters, digits and '_-.'"
    if not _alnum(vendor[-1]):
        return f"vendor {vendor!r} should end with a letter or digit"
    return None


def class_problem(klass: str) -> str | None:
    if not klass:
        return "empty class name"
    if not klass[0].isascii() or not klass[0].isalpha():
        return f"class {klass!r} should start with a letter"
    if any(not (_alnum(c) or c in "_-") for c in klass[1:-1]):
        return f"class {klass!r} has characters other than letters, digits and '_-'"
    if not _alnum(klass[-1]):
        return f"class {klass!r} should end with a letter or digit"
    return None


def name_problem(name: str) -> str | None:
    if not name:
        return "empty device name"
    if not _alnum(name[0]):
        return f"device name {name!r} should start with a letter or digit"
    if any(not (_alnum(c) or c in "_-.:") for c in name[1:-1]):
        return f"device name {name!r} has characters other than letters, digits and '_-.:'"
    if not _alnum(name[-1]):
        return f"device name {name!r} should end with a letter or digit"
    return None


def kind_of(vendor: str, klass: str) -> str:
    why = vendor_problem(vendor) or class_problem(klass)
    if why:
        raise UsageError(f"invalid CDI kind {vendor}/{klass}: {why}")
    return f"{vendor}/{klass}"


def qualified(kind: str, name: str) -> str:
    why = name_problem(name)
    if why:
        raise UsageError(f"invalid CDI device name: {why}")
    return f"{kind}={name}"


def parse_qualified(text: str) -> tuple[str, str, str]:
    """``vendor/class=name`` -> (vendor, class, name); UsageError when it breaks the parser's rules."""
    kind, sep, name = text.partition("=")
    vendor, slash, klass = kind.partition("/")
    if not sep or not slash:
        raise UsageError(f"{text!r} is not a qualified CDI device name (VENDOR/CLASS=NAME)")
    why = vendor_problem(vendor) or class_problem(klass) or name_problem(name)
    if why:
        raise UsageError(f"{text!r}: {why}")
    return vendor, klass, name


def file_name(klass: str, name: str) -> str:
    """``gpuvirt_<class>_<name>.yaml`` (the name's ``:`` kept: file names allow it, and it keeps names unique)."""
    return f"{FILE_PREFIX}{klass}_{name}{FILE_SUFFIX}"


# --- device nodes and edits ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """A device node: ``path`` in the container; ``host_path`` where it differs (a host root other than /);
    ``type``/``major``/``minor``/``mode`` only when the host has no node to read them from (the runtime then
    creates the node from them instead of copying the host's)."""

    path: str
    host_path: str | None = None
    type: str | None = None
    major: int | None = None
    minor: int | None = None
    mode: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path}
        if self.host_path and self.host_path != self.path:
            d["hostPath"] = self.host_path
        if self.type is not None:
            d["type"] = self.type
            d["major"] = self.major
            d["minor"] = self.minor
            if self.mode is not None:
                d["fileMode"] = self.mode
        return d


def chmod_hook(hook_path: str, folders: Iterable[str]) -> dict[str, Any] | None:
    """NVIDIA's work-around for nested device folders (one hook naming every folder, as its generator does)."""
    folders = [f for f in NESTED_DIRS if f in set(folders)]
    if not folders:
        return None
    args = ["nvidia-cdi-hook", "chmod", "--mode", "755"]
    for f in folders:
        args += ["--path", f]
    return {"hookName": "createContainer", "path": hook_path, "args": args}


def nested_folders(nodes: Iterable[Node]) -> list[str]:
    out: list[str] = []
    for n in nodes:
        folder = n.path.rsplit("/", 1)[0]
        if folder in NESTED_DIRS and folder not in out:
            out.append(folder)
    return out


def device_edits(nodes: list[Node], *, hook_path: str | None = None, env: Iterable[str] = ()) -> dict[str, Any]:
    """``containerEdits`` of one device: its nodes (and the chmod hook when they are nested and a hook path is
    given; None: no hook)."""
    edits: dict[str, Any] = {"deviceNodes": [n.to_dict() for n in nodes]}
    env = list(env)
    if env:
        edits["env"] = env
    if hook_path:
        hook = chmod_hook(hook_path, nested_folders(nodes))
        if hook is not None:
            edits["hooks"] = [hook]
    return edits


def minimal_common(nodes: list[Node]) -> dict[str, Any]:
    """The common edits gpuvirt writes when the host has no ``nvidia-ctk cdi generate`` output: the control
    and UVM nodes given, and NVIDIA_VISIBLE_DEVICES=void (the toolkit's runtime hook then leaves the container
    alone).  No driver libraries: a container needs an image that brings the user-space driver matching the
    host's, or the toolkit's spec (docs/containers.md)."""
    out: dict[str, Any] = {"env": ["NVIDIA_VISIBLE_DEVICES=void"]}
    if nodes:
        out["deviceNodes"] = [n.to_dict() for n in nodes]
    return out


COMMON_KEYS = ("env", "deviceNodes", "hooks", "mounts", "additionalGids")


def common_from_nvidia(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """The top-level ``containerEdits`` of an nvidia-ctk spec, limited to what a 0.5.0 spec can carry."""
    edits = doc.get("containerEdits") if isinstance(doc, Mapping) else None
    if not isinstance(edits, Mapping):
        return None
    out = {k: edits[k] for k in ("env", "deviceNodes", "hooks", "mounts") if isinstance(edits.get(k), list)}
    return out or None


def hook_path_from_nvidia(doc: Mapping[str, Any]) -> str | None:
    """Where the host's nvidia-cdi-hook lives, as its nvidia-ctk spec names it (any hook of the toolkit)."""
    def hooks(edits: Any) -> list[Any]:
        return list(edits.get("hooks") or []) if isinstance(edits, Mapping) else []

    found = hooks(doc.get("containerEdits"))
    for d in doc.get("devices") or []:
        if isinstance(d, Mapping):
            found += hooks(d.get("containerEdits"))
    for h in found:
        if isinstance(h, Mapping) and isinstance(h.get("path"), str) and h["path"].endswith(
                ("/nvidia-cdi-hook", "/nvidia-ctk")):
            return h["path"]
    return None


def spec(kind: str, name: str, edits: dict[str, Any], common: dict[str, Any] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"cdiVersion": CDI_VERSION, "kind": kind,
                           "devices": [{"name": name, "containerEdits": edits}]}
    if common:
        doc["containerEdits"] = common
    return doc


def render(doc: dict[str, Any], meta: dict[str, Any]) -> str:
    """The file text: the mark, one line of metadata (what allocation the spec is for), the JSON body."""
    return (f"{MARK} - written by gpuvirt, do not edit (gpuvirt reconcile rewrites it)\n"
            f"# gpuvirt: {json.dumps(meta, sort_keys=True, separators=(',', ':'))}\n"
            + json.dumps(doc, indent=2) + "\n")


def owned(text: str) -> dict[str, Any] | None:
    """The metadata of a gpuvirt-written spec; None for anything else (a foreign file)."""
    lines = text.split("\n", 2)
    if len(lines) < 3 or not lines[0].startswith(MARK) or not lines[1].startswith("# gpuvirt: "):
        return None
    try:
        meta = json.loads(lines[1][len("# gpuvirt: "):])
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def parse(text: str, origin: str = "spec") -> dict[str, Any]:
    """A CDI spec (YAML or JSON) as a mapping; UsageError naming ``origin`` when it is not one."""
    from gpuvirt.model.profile_yaml import load_yaml

    if len(text.encode()) > MAX_SPEC_BYTES:
        raise UsageError(f"{origin}: more than {MAX_SPEC_BYTES // (1024 * 1024)} MiB, not a CDI spec")
    try:
        doc = load_yaml(text, origin)
    except Exception as exc:  # noqa: BLE001 - every parse failure is the same finding: not a spec
        raise UsageError(f"{origin}: not a CDI spec ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str) or not isinstance(doc.get("devices"), list):
        raise UsageError(f"{origin}: not a CDI spec (no kind or devices)")
    return doc


def device_names(doc: Mapping[str, Any]) -> list[str]:
    return [str(d.get("name")) for d in doc.get("devices") or [] if isinstance(d, Mapping)]


def problems(doc: Mapping[str, Any]) -> list[str]:
    """What the CDI parser would refuse in a spec gpuvirt renders (kind and device names)."""
    out = []
    kind = str(doc.get("kind", ""))
    vendor, slash, klass = kind.partition("/")
    if not slash:
        out.append(f"kind {kind!r} is not VENDOR/CLASS")
    else:
        out += [p for p in (vendor_problem(vendor), class_problem(klass)) if p]
    for name in device_names(doc):
        why = name_problem(name)
        if why:
            out.append(why)
    return out


__all__ = ["CDI_VERSION", "DEFAULT_VENDOR", "CLASS_MIG", "CLASS_GPU", "CLASS_VFIO", "FILE_PREFIX", "MARK", "Node",
           "chmod_hook", "common_from_nvidia", "device_edits", "device_names", "file_name", "hook_path_from_nvidia",
           "kind_of", "minimal_common", "name_problem", "owned", "parse", "parse_qualified", "problems",
           "qualified", "render", "spec"]
