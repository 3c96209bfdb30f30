"""Rendering the simulated sysfs tree from the state document.

The tree is a pure function of the state (:func:`render`), laid out as a real kernel does and as
mdevctl 1.2.0 accepts it (``../shared/reference/running-mdevctl.md`` section 3): devices under
``sys/devices/pci0000:00/<bdf>``, relative links from ``sys/bus/pci/devices``, ``sys/class/mdev_bus`` and
``sys/bus/mdev/devices``, ``mdev_type`` and ``iommu_group`` links.  After a transaction the simulator
renders the state before and after and applies only the difference (:func:`apply_diff`), per device, so a
write to one VF rewrites a handful of files, not the whole host.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

from gpuvirt.model.catalog import GpuModel, load_catalog
from gpuvirt.sim import devnodes, hoststack, rules
from gpuvirt.sim.state import atomic_write, behaviour

# the same default the simulated NVML reports (gpuvirt.sim.nvml.DEFAULT_DRIVER_VERSION)
DEFAULT_DRIVER_VERSION = "570.86.15"

PCI_ROOT = "sys/devices/pci0000:00"

# entry kinds: ("dir",) | ("file", text, mode) | ("link", target)
Entry = tuple
Tree = dict[str, Entry]

DRIVER_BY_VENDOR = {"nvidia": "nvidia", "amd": "amdgpu", "intel": "i915"}


def _rel(src: str, target: str) -> str:
    return os.path.relpath(target, os.path.dirname(src))


def _file(tree: Tree, path: str, text: str, mode: int = 0o444) -> None:
    tree[path] = ("file", text, mode)


def _dir(tree: Tree, path: str) -> None:
    tree[path] = ("dir",)


def _link(tree: Tree, path: str, target: str) -> None:
    tree[path] = ("link", _rel(path, target))


def _iommu(tree: Tree, dev_dir: str, name: str, group: int | None) -> None:
    if group is None:
        return
    gdir = f"sys/kernel/iommu_groups/{group}"
    _dir(tree, gdir)
    _dir(tree, f"{gdir}/devices")
    _link(tree, f"{gdir}/devices/{name}", dev_dir)
    _link(tree, f"{dev_dir}/iommu_group", gdir)


def _pci_device(tree: Tree, model: GpuModel, address: str, group: int | None, *, device_id: int | None = None,
                pci_class: int | None = None, vf: bool = False, driver: str | None = None) -> str:
    d = f"{PCI_ROOT}/{address}"
    _dir(tree, d)
    vendor_id = model.vendor_id or 0
    dev_id = device_id if device_id is not None else (model.device_id or 0)
    klass = pci_class if pci_class is not None else (model.pci_class or 0x030000)
    sub_v = model.subsystem_vendor_id or vendor_id
    sub_d = 0 if vf else (model.subsystem_device_id or 0)
    driver = driver or DRIVER_BY_VENDOR.get(model.vendor, "")
    _file(tree, f"{d}/vendor", f"0x{vendor_id:04x}\n")
    _file(tree, f"{d}/device", f"0x{dev_id:04x}\n")
    _file(tree, f"{d}/subsystem_vendor", f"0x{sub_v:04x}\n")
    _file(tree, f"{d}/subsystem_device", f"0x{sub_d:04x}\n")
    _file(tree, f"{d}/class", f"0x{klass:06x}\n")
    _file(tree, f"{d}/numa_node", "0\n")
    _file(tree, f"{d}/reset_method", "flr\n")
    _file(tree, f"{d}/reset", "", 0o200)
    _file(tree, f"{d}/uevent",
          f"DRIVER={driver}\nPCI_CLASS={klass:X}\nPCI_ID={vendor_id:04X}:{dev_id:04X}\n"
          f"PCI_SUBSYS_ID={sub_v:04X}:{sub_d:04X}\nPCI_SLOT_NAME={address}\n"
          f"MODALIAS=pci:v{vendor_id:08X}d{dev_id:08X}sv{sub_v:08X}sd{sub_d:08X}"
          f"bc{klass >> 16:02X}sc{(klass >> 8) & 0xFF:02X}i{klass & 0xFF:02X}\n")
    if driver:
        _dir(tree, f"sys/bus/pci/drivers/{driver}")
        _link(tree, f"{d}/driver", f"sys/bus/pci/drivers/{driver}")
        _link(tree, f"sys/bus/pci/drivers/{driver}/{address}", d)
    _dir(tree, "sys/bus/pci/devices")
    _link(tree, f"sys/bus/pci/devices/{address}", d)
    _iommu(tree, d, address, group)
    return d


def _mdev_class_link(tree: Tree, name: str, dev_dir: str) -> None:
    _dir(tree, "sys/class/mdev_bus")
    _link(tree, f"sys/class/mdev_bus/{name}", dev_dir)


def _mdev_type(tree: Tree, parent_dir: str, type_dir: str, name: str | None, description: str | None,
               available: int, device_api: str) -> str:
    t = f"{parent_dir}/mdev_supported_types/{type_dir}"
    _dir(tree, f"{parent_dir}/mdev_supported_types")
    _dir(tree, t)
    _dir(tree, f"{t}/devices")
    _file(tree, f"{t}/name", f"{name if name is not None else type_dir}\n")
    if description is not None:
        _file(tree, f"{t}/description", description if description.endswith("\n") else description + "\n")
    _file(tree, f"{t}/available_instances", f"{available}\n")
    _file(tree, f"{t}/device_api", f"{device_api}\n")
    _file(tree, f"{t}/create", "", 0o200)
    return t


def _mdev_devices(tree: Tree, state: dict[str, Any], parent_name: str, parent_dir: str) -> None:
    for m in state["mdevs"]:
        if m["parent"] != parent_name:
            continue
        u = m["uuid"]
        ddir = f"{parent_dir}/{u}"
        tdir = f"{parent_dir}/mdev_supported_types/{m['type']}"
        _dir(tree, ddir)
        _file(tree, f"{ddir}/remove", "", 0o200)
        _file(tree, f"{ddir}/uevent", f"MDEV_TYPE={m['type']}\n")
        _link(tree, f"{ddir}/mdev_type", tdir)
        if tdir in tree:
            _link(tree, f"{tdir}/devices/{u}", ddir)
        _dir(tree, "sys/bus/mdev/devices")
        _link(tree, f"sys/bus/mdev/devices/{u}", ddir)
        _iommu(tree, ddir, u, m.get("iommu_group"))
        if m["type"].startswith("mtty-"):
            _dir(tree, f"{ddir}/vendor")
            _file(tree, f"{ddir}/vendor/sample_mdev_dev", f"This is MDEV {u}\n")


def render_device(state: dict[str, Any], dev: dict[str, Any]) -> Tree:
    tree: Tree = {}
    model = load_catalog().get(dev["model"])
    # a host with any mdev-capable driver has the mdev bus and class directories
    if model.mdev or model.vgpu:
        _dir(tree, "sys/bus/mdev/devices")
        _dir(tree, "sys/class/mdev_bus")

    if model.vendor == "virtual":
        spec = model.mdev
        assert spec is not None
        pdir = f"sys/devices/{spec.virtual_path}"
        _dir(tree, pdir)
        _file(tree, f"{pdir}/uevent", "MDEV_STATE=registered\n")
        _mdev_class_link(tree, dev["name"], pdir)
        for t in rules.registered_pool_types(spec):
            _mdev_type(tree, pdir, spec.type_dir(t), t.name, t.description,
                       rules.pool_available(spec, state["mdevs"], dev["name"], t), t.device_api)
        _mdev_devices(tree, state, dev["name"], pdir)
        return tree

    pf_dir = _pci_device(tree, model, dev["address"], dev.get("iommu_group"), driver=dev.get("driver"))
    if model.mdev:  # GVT-g: the iGPU itself is the parent
        spec = model.mdev
        _mdev_class_link(tree, dev["address"], pf_dir)
        for t in rules.registered_pool_types(spec):
            _mdev_type(tree, pf_dir, spec.type_dir(t), t.name, t.description,
                       rules.pool_available(spec, state["mdevs"], dev["address"], t), t.device_api)
        _mdev_devices(tree, state, dev["address"], pf_dir)

    interface = rules.device_interface(state, dev)
    if model.sriov:
        _file(tree, f"{pf_dir}/sriov_totalvfs", f"{model.sriov.total_vfs}\n")
        # the count written shows at once; the functions themselves may still be on their way (vf_delay_s)
        _file(tree, f"{pf_dir}/sriov_numvfs", f"{dev['sriov']['numvfs']}\n", 0o644)
        _file(tree, f"{pf_dir}/sriov_offset", f"{model.sriov.first_vf_offset}\n")
        _file(tree, f"{pf_dir}/sriov_vf_device", f"{model.sriov.vf_device_id:04x}\n")
        for vf in dev["vfs"]:
            if not rules.vf_present(vf):
                continue
            vdir = _pci_device(tree, model, vf["address"], vf.get("iommu_group"),
                               device_id=model.sriov.vf_device_id, pci_class=model.sriov.vf_class, vf=True)
            for name in ("sriov_totalvfs", "sriov_numvfs", "sriov_offset", "sriov_vf_device"):
                tree.pop(f"{vdir}/{name}", None)
            _link(tree, f"{vdir}/physfn", pf_dir)
            _link(tree, f"{pf_dir}/virtfn{vf['index']}", vdir)
            if model.vgpu and model.vgpu.parent == "vf":
                if interface == "mdev":
                    # before nvidia-vgpud registered its types a VF is no mdev parent at all: `mdevctl types`
                    # stays empty (nvidia-vgpu.md section 5, mdevctl issue #82)
                    if rules.registered(vf):
                        _nvidia_mdev_parent(tree, state, dev, model, vf["address"], vdir)
                elif rules.registered(vf) or behaviour(state)["unregistered_vfio"] == "empty":
                    _nvidia_vfio(tree, state, dev, model, vf, vdir)
    if model.vgpu and model.vgpu.parent == "pf" and interface == "mdev" and rules.registered(dev):
        _nvidia_mdev_parent(tree, state, dev, model, dev["address"], pf_dir)
    return tree


def _nvidia_mdev_parent(tree: Tree, state: dict[str, Any], dev: dict[str, Any], model: GpuModel,
                        parent: str, pdir: str) -> None:
    assert model.vgpu is not None
    _mdev_class_link(tree, parent, pdir)
    for t in model.vgpu.types:
        _mdev_type(tree, pdir, t.sysfs_id, model.vgpu.name_prefix + t.name, t.description(),
                   rules.vgpu_available(state, dev, parent, t), "vfio-pci")
    _mdev_devices(tree, state, parent, pdir)


def _nvidia_vfio(tree: Tree, state: dict[str, Any], dev: dict[str, Any], model: GpuModel, vf: dict[str, Any],
                 vdir: str) -> None:
    assert model.vgpu is not None
    ndir = f"{vdir}/nvidia"
    _dir(tree, ndir)
    lines = ["ID    : vGPU Name\n"]
    # the driver prints "%-5d : %s" per creatable type (nvidia-vgpu.md section 4.1); nothing is creatable on a
    # VF whose types nvidia-vgpud has not registered yet
    for t in rules.creatable_types(state, dev) if rules.registered(vf) else ():
        lines.append(f"{t.id:<5d} : {model.vgpu.name_prefix}{t.name}\n")
    _file(tree, f"{ndir}/creatable_vgpu_types", "".join(lines))
    _file(tree, f"{ndir}/current_vgpu_type", f"{vf.get('current_vgpu_type') or 0}\n", 0o644)
    if vf.get("current_vgpu_type"):
        _dir(tree, f"{vdir}/vfio-dev")


def host_tree(state: dict[str, Any]) -> Tree:
    """Entries that belong to the host rather than to one device."""
    tree: Tree = {}
    for d in ("sys", "sys/devices", PCI_ROOT, "sys/bus", "sys/bus/pci", "sys/bus/pci/devices", "sys/class",
              "sys/kernel", "sys/kernel/iommu_groups", "etc", "etc/mdevctl.d", "etc/mdevctl.d/scripts.d",
              "etc/mdevctl.d/scripts.d/callouts", "etc/mdevctl.d/scripts.d/notifiers", "usr", "usr/lib",
              "usr/lib/mdevctl", "usr/lib/mdevctl/scripts.d", "usr/lib/mdevctl/scripts.d/callouts",
              "usr/lib/mdevctl/scripts.d/notifiers"):
        _dir(tree, d)
    # a new boot id per simulated boot, like the kernel's /proc/sys/kernel/random/boot_id
    for d in ("proc", "proc/sys", "proc/sys/kernel", "proc/sys/kernel/random"):
        _dir(tree, d)
    _file(tree, "proc/sys/kernel/random/boot_id",
          str(uuid.uuid5(uuid.NAMESPACE_OID, f"{state['seed']}/boot/{state['boot']}")) + "\n")
    if state.get("driver_loaded") and any(d.get("uuid") for d in state["devices"]):
        _dir(tree, "sys/module")
        _dir(tree, "sys/module/nvidia")
        _file(tree, "sys/module/nvidia/version", f"{state.get('driver_version') or DEFAULT_DRIVER_VERSION}\n")
    tree.update(devnodes.render(state))   # /dev nodes and the driver's /proc files (gpuvirt.sim.devnodes)
    tree.update(hoststack.render(state))  # os-release, kernel release, libvirt's QEMU capabilities cache
    return tree


def device_signature(state: dict[str, Any], dev: dict[str, Any]) -> str:
    parents = rules.board_parents(dev)
    mdevs = [m for m in state["mdevs"] if m["parent"] in parents]
    return json.dumps([dev, mdevs, state.get("vgpu_interface"), behaviour(state)["unregistered_vfio"]],
                      sort_keys=True)


def render(state: dict[str, Any]) -> Tree:
    tree = host_tree(state)
    for dev in state["devices"]:
        tree.update(render_device(state, dev))
    return tree


def sync(root: Path, before: dict[str, Any] | None, after: dict[str, Any]) -> None:
    """Bring the on-disk tree from ``render(before)`` to ``render(after)``, touching only what changed."""
    if before is None:
        apply_diff(root, {}, render(after))
        return
    old: Tree = host_tree(before)
    new: Tree = host_tree(after)
    b_devs = {d.get("address") or d.get("name"): d for d in before["devices"]}
    a_devs = {d.get("address") or d.get("name"): d for d in after["devices"]}
    for key in set(b_devs) | set(a_devs):
        bd, ad = b_devs.get(key), a_devs.get(key)
        if bd is not None and ad is not None and device_signature(before, bd) == device_signature(after, ad):
            continue
        if bd is not None:
            old.update(render_device(before, bd))
        if ad is not None:
            new.update(render_device(after, ad))
    # shared directories (class/bus dirs) appear in several device renders; only real differences count
    apply_diff(root, old, new)


def apply_diff(root: Path, old: Tree, new: Tree) -> None:
    removed = [p for p in old if p not in new]
    # files and links first, then directories deepest first
    for p in sorted(removed, key=lambda s: -s.count("/")):
        full = root / p
        kind = old[p][0]
        try:
            if kind == "dir":
                if full.is_dir() and not full.is_symlink():
                    shutil.rmtree(full, ignore_errors=True)
            else:
                full.unlink()
        except FileNotFoundError:
            pass
    for p in sorted(new, key=lambda s: s.count("/")):
        e = new[p]
        if old.get(p) == e:
            continue  # the disk already holds render(before); unchanged entries need no write
        full = root / p
        if e[0] == "dir":
            full.mkdir(parents=True, exist_ok=True)
        elif e[0] == "file":
            _write_attr(full, e[1], e[2], p in old)
        else:
            if p not in old:
                try:
                    os.symlink(e[1], full)
                    continue
                except FileNotFoundError:
                    full.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(e[1], full)
                    continue
                except FileExistsError:
                    pass
            if full.is_symlink() or full.exists():
                if full.is_symlink() and os.readlink(full) == e[1]:
                    continue
                _remove(full)
            tmp = full.with_name(f".{full.name}.{os.getpid()}.lnk")
            if tmp.is_symlink():
                tmp.unlink()
            os.symlink(e[1], tmp)
            os.replace(tmp, full)


def _write_attr(full: Path, text: str, mode: int, existed: bool) -> None:
    """Write one attribute file so that a concurrent reader sees the old or the new value, never a mix.

    Same-length updates (most counts: 0 <-> 1) are one in-place write(2); other changes go through a
    rename, which costs far more on ext4 than the write itself; new files are written directly (nobody can
    have opened a file that did not exist yet).
    """
    data = text.encode()
    if existed and not full.is_symlink():
        try:
            if full.stat().st_size == len(data):
                fd = os.open(full, os.O_WRONLY)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                if (full.stat().st_mode & 0o777) != mode:
                    os.chmod(full, mode)
                return
        except FileNotFoundError:
            pass
        atomic_write(full, text, mode)
        return
    if full.is_symlink() or full.is_dir():
        _remove(full)
    try:
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    except FileNotFoundError:
        full.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(full, mode)  # the umask may have masked bits off


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def iter_paths(tree: Tree) -> Iterable[str]:
    return tree.keys()


# --- writable attributes (writes other programs make) ---------------------------------------------------------------
def writable_attrs(state: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(path, text, mode) of every attribute file a program may write - ``reset``, ``sriov_numvfs``,
    ``mdev_supported_types/*/create``, ``<mdev>/remove``, ``nvidia/current_vgpu_type`` - as :func:`render`
    draws them.  Listed straight from the state (drawing every device costs ~20 ms per board, and this runs
    before every transaction to find what mdevctl or udev wrote into the tree); a test keeps it equal to the
    writable files of :func:`render`."""
    out: list[tuple[str, str, int]] = []
    by_parent: dict[str, list[str]] = {}
    for m in state["mdevs"]:
        by_parent.setdefault(m["parent"], []).append(m["uuid"])

    def parent(pdir: str, name: str, type_dirs: Iterable[str]) -> None:
        out.extend((f"{pdir}/mdev_supported_types/{t}/create", "", 0o200) for t in type_dirs)
        out.extend((f"{pdir}/{u}/remove", "", 0o200) for u in by_parent.get(name, ()))

    unregistered_vfio = behaviour(state)["unregistered_vfio"]
    for dev in state["devices"]:
        model = load_catalog().get(dev["model"])
        if model.vendor == "virtual":
            spec = model.mdev
            assert spec is not None
            parent(f"sys/devices/{spec.virtual_path}", dev["name"],
                   [spec.type_dir(t) for t in rules.registered_pool_types(spec)])
            continue
        pf_dir = f"{PCI_ROOT}/{dev['address']}"
        out.append((f"{pf_dir}/reset", "", 0o200))
        if model.mdev:
            parent(pf_dir, dev["address"], [model.mdev.type_dir(t) for t in rules.registered_pool_types(model.mdev)])
        interface = rules.device_interface(state, dev)
        vgpu_dirs = [t.sysfs_id for t in model.vgpu.types] if model.vgpu else []
        if model.sriov:
            out.append((f"{pf_dir}/sriov_numvfs", f"{dev['sriov']['numvfs']}\n", 0o644))
            for vf in dev["vfs"]:
                if not rules.vf_present(vf):
                    continue
                vdir = f"{PCI_ROOT}/{vf['address']}"
                out.append((f"{vdir}/reset", "", 0o200))
                if model.vgpu and model.vgpu.parent == "vf":
                    if interface == "mdev":
                        if rules.registered(vf):
                            parent(vdir, vf["address"], vgpu_dirs)
                    elif rules.registered(vf) or unregistered_vfio == "empty":
                        out.append((f"{vdir}/nvidia/current_vgpu_type", f"{vf.get('current_vgpu_type') or 0}\n",
                                    0o644))
        if model.vgpu and model.vgpu.parent == "pf" and interface == "mdev" and rules.registered(dev):
            parent(pf_dir, dev["address"], vgpu_dirs)
    return out


def writable_attrs_drawn(state: dict[str, Any]) -> list[tuple[str, str, int]]:
    """The same list taken from a full :func:`render` (slow; the reference for :func:`writable_attrs`)."""
    # sysfs attributes only: the device nodes under dev/ stand in for character devices, not for attributes
    return [(p, e[1], e[2]) for p, e in render(state).items()
            if e[0] == "file" and e[2] & 0o222 and p.startswith("sys/")]


# --- checking and repairing the tree on disk --------------------------------------------------------------------------
def _disk_entry(full: Path) -> Entry | None:
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return None
    import stat as st_mod

    if st_mod.S_ISLNK(st.st_mode):
        return ("link", os.readlink(full))
    if st_mod.S_ISDIR(st.st_mode):
        return ("dir",)
    try:
        with open(full, "rb") as fh:
            data = fh.read()
    except OSError:
        data = b""
    return ("file", data.decode("utf-8", "replace"), st_mod.S_IMODE(st.st_mode))


def disk_tree(root: Path, expected: Tree) -> Tree:
    """What is on disk: everything under ``sys/`` (the simulator owns it), plus the paths of ``expected``
    outside it (``proc/``, the ``etc/`` and ``usr/`` directories mdevctl needs, which others write into)."""
    out: Tree = {}
    base = root / "sys"
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        out[rel_dir] = ("dir",)
        for name in dirnames + filenames:
            rel = f"{rel_dir}/{name}"
            e = _disk_entry(root / rel)
            if e is not None:
                out[rel] = e
    for p in expected:
        if not p.startswith("sys/") and p != "sys":
            e = _disk_entry(root / p)
            if e is not None:
                out[p] = e
    return out


def full_render(state: dict[str, Any]) -> Tree:
    """:func:`render` plus the directories it leaves implicit (parents made by ``mkdir -p``)."""
    expected = render(state)
    for p in list(expected):
        parts = p.split("/")
        for i in range(1, len(parts)):
            expected.setdefault("/".join(parts[:i]), ("dir",))
    return expected


def differences(root: Path, state: dict[str, Any]) -> list[str]:
    """How the tree on disk differs from a fresh render of ``state`` (empty: consistent)."""
    expected = full_render(state)
    actual = disk_tree(root, expected)
    out = [f"missing {p}" for p in expected if p not in actual]
    out += [f"differs {p}: {actual[p]!r} != {expected[p]!r}" for p in expected
            if p in actual and actual[p] != expected[p]]
    out += [f"extra {p}" for p in actual if p not in expected]
    return sorted(out)


def repair(root: Path, state: dict[str, Any]) -> int:
    """Bring the tree on disk to ``render(state)`` whatever it holds now (after a process died mid-redraw);
    returns the number of entries changed."""
    expected = full_render(state)
    actual = disk_tree(root, expected)
    # an entry of the wrong kind goes first, so the diff below only adds or rewrites
    for p in sorted((p for p in actual if p in expected and actual[p][0] != expected[p][0]),
                    key=lambda s: -s.count("/")):
        full = root / p
        if full.exists() or full.is_symlink():
            _remove(full)
        actual.pop(p)
        for q in [q for q in actual if q.startswith(p + "/")]:
            actual.pop(q)
    changed = sum(1 for p in expected if actual.get(p) != expected[p]) + sum(1 for p in actual if p not in expected)
    if changed:
        apply_diff(root, actual, expected)
    return changed
