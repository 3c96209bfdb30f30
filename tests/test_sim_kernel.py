"""Kernel semantics of the simulator, seen from both sides of the I/O seam.

Every behaviour is checked twice where it matters: once on the raw ``SimKernel`` (the errno a real
``write(2)`` on sysfs would give) and once through gpuvirt's own host layer (``gpuvirt.host.machine.Host``
with the simulated kernel underneath), which must translate the errno into the right class of the gpuvirt
error tree with a message naming the device.  Capacity rules are read back from the rendered sysfs files,
exactly where gpuvirt's discovery and mdevctl read them.

Facts: ../shared/reference/mdev-sysfs.md (create/remove order and errno table, sample-driver pools,
GVT-g), nvidia-vgpu.md (availability policies, SR-IOV VFs, current_vgpu_type EPERM cases, reboot).
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from gpuvirt.errors import (
    CapacityError,
    ConflictError,
    DeviceBusyError,
    DeviceExistsError,
    DeviceGoneError,
    HostPermissionError,
    InvalidArgumentError,
    NoCapacityError,
    SysfsError,
    UsageError,
)
from gpuvirt.sim.control import set_client, set_open
from gpuvirt.sim.kernel import SimKernel

from sim_kernel_support import _reset_pynvml  # noqa: F401  (an autouse fixture: it acts by being imported)
from sim_kernel_support import (
    U,
    CATALOG,
    PF,
    vf,
    new_uuid,
    type_dir,
    avail,
    avail_map,
    create,
    errno_of,
    host,
    mdev_uuids,
    nvidia_types,
    type_id_by_name,
    creatable_ids,
    nvml,
)


# === mdev create =================================================================================================


@pytest.mark.parametrize("data", [
    "", "\n", U[:-1], U[:-1] + "\n", U + "\n\n", U + "x", U + " ", " " + U, U + U,
], ids=["empty", "newline", "35", "35+nl", "38", "37-not-nl", "trailing-space", "leading-space", "72"])
def test_create_wrong_length_is_einval(make_sim, data: str) -> None:
    sim = make_sim(["mtty"])
    assert errno_of(SimKernel(sim).write, type_dir(sim, "mtty", "mtty-1") / "create", data) == errno.EINVAL
    assert sim.load()["mdevs"] == [] and mdev_uuids(sim) == set()


@pytest.mark.parametrize("data", [
    "zzzzzzzz-0000-0000-0000-000000000000", "0e1f2a3b_4c5d_4e6f_8a9b_0c1d2e3f4a5b",
    "0e1f2a3b-4c5d-4e6f-8a9b0-c1d2e3f4a5b", "{e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5}",
])
def test_create_unparseable_uuid_is_einval(make_sim, data: str) -> None:
    assert len(data) == 36
    sim = make_sim(["mtty"])
    k = SimKernel(sim)
    assert errno_of(k.write, type_dir(sim, "mtty", "mtty-1") / "create", data) == errno.EINVAL
    assert errno_of(k.write, type_dir(sim, "mtty", "mtty-1") / "create", data + "\n") == errno.EINVAL


def test_create_accepts_36_and_37_bytes_and_names_the_device_in_lowercase(make_sim) -> None:
    sim = make_sim(["mtty"])
    k = SimKernel(sim)
    upper = U.upper()
    assert k.write(type_dir(sim, "mtty", "mtty-1") / "create", upper) == 36          # byte count returned
    other = new_uuid(7)
    assert k.write(type_dir(sim, "mtty", "mtty-2") / "create", other + "\n") == 37
    assert mdev_uuids(sim) == {U, other}
    dev = sim.root / "sys/bus/mdev/devices" / U
    assert dev.is_symlink() and dev.resolve().parent == (sim.root / "sys/devices/virtual/mtty/mtty").resolve()
    assert os.path.basename(os.readlink(dev.resolve() / "mdev_type")) == "mtty-1"
    assert (type_dir(sim, "mtty", "mtty-1") / "devices" / U).is_symlink()
    assert (dev.resolve() / "iommu_group").is_symlink()
    assert (dev.resolve() / "remove").is_file()


def test_duplicate_uuid_across_parents_is_eexist(make_sim) -> None:
    sim = make_sim(["mtty", "mdpy", "t4"])
    create(sim, "mtty", "mtty-1", U)
    k = SimKernel(sim)
    for parent, t in (("mdpy", "mdpy-vga"), ("mtty", "mtty-2"), (PF, "nvidia-230")):
        assert errno_of(k.write, type_dir(sim, parent, t) / "create", U + "\n") == errno.EEXIST
    # the gpuvirt side: a ConflictError naming the UUID and the reason
    with pytest.raises(DeviceExistsError) as info:
        host(sim).create_mdev("mdpy", "mdpy-vga", U)
    e = info.value
    assert isinstance(e, ConflictError) and e.exit_code == 5 and e.errno == errno.EEXIST
    assert U in str(e) and "already used" in str(e) and "EEXIST" in str(e) and "\n" not in str(e)
    assert len(sim.load()["mdevs"]) == 1
    assert avail(sim, "mdpy", "mdpy-vga") == 4


# --- no capacity: the driver's own errno --------------------------------------------------------------------------
@pytest.mark.parametrize("model_id,type_id,capacity,expected", [
    ("mtty", "mtty-1", 24, errno.ENOSPC),
    ("mtty", "mtty-2", 12, errno.ENOSPC),
    ("mdpy", "mdpy-hd", 4, errno.ENOMEM),
    ("mbochs", "mbochs-large", 4, errno.ENOMEM),
])
def test_sample_driver_pool_exhausted_gives_driver_errno(make_sim, model_id, type_id, capacity, expected) -> None:
    sim = make_sim([model_id])
    parent = model_id
    for i in range(capacity):
        assert avail(sim, parent, type_id) == capacity - i
        create(sim, parent, type_id, new_uuid(i))
    assert avail(sim, parent, type_id) == 0
    assert errno_of(create, sim, parent, type_id, new_uuid(999)) == expected
    with pytest.raises(NoCapacityError) as info:
        host(sim).create_mdev(parent, type_id, new_uuid(998))
    e = info.value
    assert isinstance(e, CapacityError) and e.exit_code == 4 and e.errno == expected
    assert "no capacity" in str(e) and f"x{capacity}" in str(e)       # what is already there is named
    assert len(sim.load()["mdevs"]) == capacity


@pytest.mark.parametrize("model_id", ["a2", "t4", "a100-40gb"])
def test_nvidia_create_without_room_gives_catalog_errno(make_sim, model_id: str) -> None:
    model = CATALOG.get(model_id)
    expected = getattr(errno, model.vgpu.create_errno)
    sim = make_sim([model_id])
    parent = vf(0) if model.vgpu.parent == "vf" else PF
    full = max((t for t in model.vgpu.types if not t.mig_backed), key=lambda t: t.framebuffer_mib)
    create(sim, parent, full.sysfs_id)                          # the whole board in one vGPU
    other = vf(1) if model.vgpu.parent == "vf" else PF
    assert avail(sim, other, full.sysfs_id) == 0
    assert errno_of(create, sim, other, full.sysfs_id) == expected
    with pytest.raises(NoCapacityError) as info:
        host(sim).create_mdev(other, full.sysfs_id, new_uuid(5))
    assert info.value.errno == expected and info.value.exit_code == 4
    assert f"{model.vgpu.name_prefix}{full.name} x1" in str(info.value)


def test_create_on_unknown_type_or_parent(make_sim) -> None:
    sim = make_sim(["mtty"])
    k = SimKernel(sim)
    missing = sim.root / "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-9/create"
    assert errno_of(k.write, missing, U) == errno.ENOENT
    # read-only attributes refuse writes
    assert errno_of(k.write, type_dir(sim, "mtty", "mtty-1") / "available_instances", "5\n") == errno.EACCES
    # nothing outside the simulated root is ever written
    assert errno_of(k.write, "/etc/hostname", "x") == errno.EACCES
    h = host(sim)
    with pytest.raises(InvalidArgumentError):
        h.create_mdev("mtty", "mtty-9", U)
    with pytest.raises(DeviceGoneError) as info:
        h.create_mdev("0000:99:00.4", "nvidia-746", U)
    assert info.value.exit_code == 3
    # tokens are validated before any path is built
    with pytest.raises(UsageError):
        h.create_mdev("../../etc", "mtty-1", U)
    with pytest.raises(UsageError):
        h.create_mdev("mtty", "../x", U)
    with pytest.raises(UsageError):
        h.create_mdev("mtty", "mtty-1", "not-a-uuid")


def test_host_create_goes_through_the_kernel(make_sim) -> None:
    sim = make_sim(["mtty"])
    h = host(sim)
    h.create_mdev("mtty", "mtty-2", U.upper())
    assert h.mdev_exists(U) and mdev_uuids(sim) == {U}
    assert h.mdev_available("mtty", "mtty-1") == 22 and h.mdev_available("mtty", "mtty-2") == 11


# === mdev remove ==================================================================================================
def test_remove_semantics(make_sim) -> None:
    sim = make_sim(["mtty"])
    k = SimKernel(sim)
    create(sim, "mtty", "mtty-1", U)
    remove = sim.root / "sys/bus/mdev/devices" / U / "remove"
    for junk in ("abc", "", "-1", "1x", "one\n"):
        assert errno_of(k.write, remove, junk) == errno.EINVAL, junk
    assert k.write(remove, "0\n") == 2                     # kstrtoul accepts 0: success, nothing happens
    assert mdev_uuids(sim) == {U}
    k.write(remove, "1\n")
    assert mdev_uuids(sim) == set() and sim.load()["mdevs"] == []
    assert not (sim.root / "sys/devices/virtual/mtty/mtty" / U).exists()
    assert not (type_dir(sim, "mtty", "mtty-1") / "devices" / U).exists()
    assert avail(sim, "mtty", "mtty-1") == 24
    # the attribute went away with the device
    assert errno_of(k.write, remove, "1\n") == errno.ENOENT
    with pytest.raises(DeviceGoneError):
        host(sim).remove_mdev(U)
    # junk through the host layer: InvalidArgumentError with the errno
    create(sim, "mtty", "mtty-1", U)
    h = host(sim)
    with pytest.raises(InvalidArgumentError) as info:
        h.sysfs.write(h.mdev_dir(U) / "remove", "yes\n", f"remove mdev {U}")
    assert info.value.errno == errno.EINVAL and "EINVAL" in str(info.value)
    h.remove_mdev(U)
    assert not h.mdev_exists(U)


def test_remove_open_device_is_ebusy(make_sim) -> None:
    sim = make_sim(["t4"])
    uid = create(sim, PF, "nvidia-230", U)
    set_open(sim, uid, True)
    remove = sim.root / "sys/bus/mdev/devices" / uid / "remove"
    assert errno_of(SimKernel(sim).write, remove, "1\n") == errno.EBUSY
    with pytest.raises(DeviceBusyError) as info:
        host(sim).remove_mdev(uid)
    assert info.value.exit_code == 5 and info.value.errno == errno.EBUSY and uid in str(info.value)
    assert mdev_uuids(sim) == {uid}
    set_open(sim, uid, False)
    host(sim).remove_mdev(uid)
    assert mdev_uuids(sim) == set()
    assert avail(sim, PF, "nvidia-230") == 16


# === vendor-specific VFIO: current_vgpu_type ======================================================================
def test_current_vgpu_type_semantics(make_sim) -> None:
    sim = make_sim(["l40s"])
    k = SimKernel(sim)
    attr = sim.root / "sys/bus/pci/devices" / vf(0) / "nvidia/current_vgpu_type"
    t8q = type_id_by_name("l40s", "L40S-8Q")
    assert attr.read_text() == "0\n"
    # clear when nothing is set: EPERM
    assert errno_of(k.write, attr, "0\n") == errno.EPERM
    # kstrtol: junk is EINVAL; an id the driver does not know is EINVAL
    assert errno_of(k.write, attr, "abc\n") == errno.EINVAL
    assert errno_of(k.write, attr, "99999\n") == errno.EINVAL
    assert k.write(attr, f"{t8q}\n") == len(f"{t8q}\n")
    assert attr.read_text() == f"{t8q}\n"
    # set when set: EPERM, whatever the id
    assert errno_of(k.write, attr, f"{t8q}\n") == errno.EPERM
    assert errno_of(k.write, attr, f"{type_id_by_name('l40s', 'L40S-8A')}\n") == errno.EPERM
    # the VF now has a vfio-dev node like a configured VF
    assert (sim.root / "sys/bus/pci/devices" / vf(0) / "vfio-dev").is_dir()
    # clear while a VM holds the VFIO device: refused (EBUSY, UNVERIFIED errno)
    set_open(sim, vf(0), True)
    assert errno_of(k.write, attr, "0\n") == errno.EBUSY
    assert attr.read_text() == f"{t8q}\n"
    set_open(sim, vf(0), False)
    k.write(attr, "0\n")
    assert attr.read_text() == "0\n"
    assert not (sim.root / "sys/bus/pci/devices" / vf(0) / "vfio-dev").exists()
    # only VFs carry the attribute; the PF has no nvidia/ group
    assert not (sim.root / "sys/bus/pci/devices" / PF / "nvidia").exists()


def test_current_vgpu_type_through_host(make_sim) -> None:
    sim = make_sim(["l40s"])
    h = host(sim)
    t8q, t8a = type_id_by_name("l40s", "L40S-8Q"), type_id_by_name("l40s", "L40S-8A")
    with pytest.raises(HostPermissionError) as info:
        h.clear_vgpu_type(vf(0))
    assert info.value.errno == errno.EPERM and vf(0) in str(info.value)
    h.set_vgpu_type(vf(0), t8q, "NVIDIA L40S-8Q")
    assert h.current_vgpu_type(vf(0)) == t8q
    with pytest.raises(HostPermissionError) as info:
        h.set_vgpu_type(vf(0), t8a)
    assert info.value.errno == errno.EPERM and f"already carries vGPU type {t8q}" in str(info.value)
    # an id that is not creatable (unknown to the driver) is refused with EINVAL and the creatable list
    with pytest.raises(SysfsError) as info:
        h.set_vgpu_type(vf(1), 99999)
    assert info.value.errno == errno.EINVAL and "not creatable" in str(info.value)
    assert "NVIDIA L40S-8Q" in str(info.value)
    set_open(sim, vf(0), True)
    with pytest.raises(DeviceBusyError) as info:
        h.clear_vgpu_type(vf(0))
    assert info.value.errno == errno.EBUSY and "closed first" in str(info.value)
    set_open(sim, vf(0), False)
    h.clear_vgpu_type(vf(0))
    assert h.current_vgpu_type(vf(0)) == 0
    with pytest.raises(UsageError):
        h.set_vgpu_type(vf(0), 0)
    with pytest.raises(DeviceGoneError):
        h.current_vgpu_type(PF)


def test_vendor_vfio_creatable_list_shrinks(make_sim) -> None:
    """l40s (same-size): after one 8 GB vGPU only the 8 GB types stay creatable, until 48 GB are used."""
    sim = make_sim(["l40s"])
    model = CATALOG.get("l40s")
    all_ids = [t.id for t in model.vgpu.types]
    assert len(all_ids) == 23
    for i in (0, 13, 31):
        assert creatable_ids(sim, vf(i)) == all_ids
    h = host(sim)
    t8q, t8a = type_id_by_name("l40s", "L40S-8Q"), type_id_by_name("l40s", "L40S-8A")
    h.set_vgpu_type(vf(0), t8q)
    for i in (0, 1, 31):
        assert creatable_ids(sim, vf(i)) == [t8q, t8a]
    assert h.creatable_vgpu_types(vf(5)) == {t8q: "NVIDIA L40S-8Q", t8a: "NVIDIA L40S-8A"}
    with pytest.raises(NoCapacityError) as info:
        h.set_vgpu_type(vf(1), type_id_by_name("l40s", "L40S-4Q"))
    assert info.value.errno == getattr(errno, model.vgpu.create_errno)
    for i in range(1, 6):                                       # 6 x 8 GB = the 48 GB board
        h.set_vgpu_type(vf(i), t8a if i % 2 else t8q)
    assert creatable_ids(sim, vf(10)) == []                    # header line only
    assert (sim.root / "sys/bus/pci/devices" / vf(10) / "nvidia/creatable_vgpu_types").read_text() == \
        "ID    : vGPU Name\n"
    with pytest.raises(NoCapacityError) as info:
        h.set_vgpu_type(vf(6), t8q)
    assert "the GPU is full" in str(info.value)
    h.clear_vgpu_type(vf(3))
    assert creatable_ids(sim, vf(6)) == [t8q, t8a]
    for i in range(0, 6):
        if i != 3:
            h.clear_vgpu_type(vf(i))
    assert creatable_ids(sim, vf(6)) == all_ids


# === SR-IOV =======================================================================================================
def test_sriov_numvfs_semantics(make_sim) -> None:
    sim = make_sim(["a2"], enable_vfs=False)
    k = SimKernel(sim)
    numvfs = sim.root / "sys/bus/pci/devices" / PF / "sriov_numvfs"
    assert numvfs.read_text() == "0\n"
    assert (sim.root / "sys/bus/pci/devices" / PF / "sriov_totalvfs").read_text() == "16\n"
    assert not (sim.root / "sys/class/mdev_bus").exists() or os.listdir(sim.root / "sys/class/mdev_bus") == []
    assert errno_of(k.write, numvfs, "17\n") == errno.ERANGE
    assert errno_of(k.write, numvfs, "70000\n") == errno.ERANGE     # kstrtou16 overflow
    assert errno_of(k.write, numvfs, "many\n") == errno.EINVAL
    assert errno_of(k.write, numvfs, "-1\n") == errno.EINVAL
    k.write(numvfs, "4\n")
    assert numvfs.read_text() == "4\n"
    pf_dir = sim.root / "sys/bus/pci/devices" / PF
    assert sorted(os.listdir(sim.root / "sys/class/mdev_bus")) == [vf(i) for i in range(4)]
    for i in range(4):
        link = pf_dir / f"virtfn{i}"
        assert link.is_symlink() and link.resolve().name == vf(i)
        assert (link.resolve() / "physfn").resolve() == pf_dir.resolve()
    assert k.write(numvfs, "4\n") == 2                          # same count: nothing to do
    assert errno_of(k.write, numvfs, "8\n") == errno.EBUSY     # changing a non-zero count needs 0 first
    uid = create(sim, vf(2), "nvidia-746")
    # 0 disables: the VFs and every mdev living on them go away
    k.write(numvfs, "0\n")
    assert numvfs.read_text() == "0\n"
    assert sim.load()["mdevs"] == [] and mdev_uuids(sim) == set()
    assert os.listdir(sim.root / "sys/class/mdev_bus") == []
    assert not any(n.startswith("virtfn") for n in os.listdir(pf_dir))
    assert not (sim.root / "sys/bus/pci/devices" / vf(0)).exists()
    assert uid not in json.dumps(sim.load())


def test_sriov_through_host(make_sim) -> None:
    sim = make_sim(["a2"], enable_vfs=False)
    h = host(sim)
    assert h.sriov_state(PF) == (16, 0)
    with pytest.raises(UsageError):
        h.enable_vfs(PF, 17)                                  # refused before any write
    with pytest.raises(InvalidArgumentError) as info:          # the kernel's answer, translated
        h.sysfs.write(h.pci_dir(PF) / "sriov_numvfs", "17\n", f"enable 17 SR-IOV VFs on {PF}")
    assert info.value.errno == errno.ERANGE
    assert h.enable_vfs(PF, 4) == 4
    assert h.enable_vfs(PF, 4) == 4                            # idempotent
    with pytest.raises(DeviceBusyError) as info:
        h.enable_vfs(PF)
    assert info.value.errno == errno.EBUSY and "disable them first" in str(info.value)
    uid = create(sim, vf(0), "nvidia-747")
    set_open(sim, uid, True)
    with pytest.raises(DeviceBusyError):
        h.disable_vfs(PF)                                      # a VM holds an mdev on a VF
    assert h.sriov_state(PF) == (16, 4)
    set_open(sim, uid, False)
    h.disable_vfs(PF)
    assert h.sriov_state(PF) == (16, 0) and mdev_uuids(sim) == set()
    assert h.enable_vfs(PF) == 16
    assert len(os.listdir(sim.root / "sys/class/mdev_bus")) == 16
    with pytest.raises(DeviceGoneError):
        h.sriov_state(vf(0))                                   # a VF is no SR-IOV PF


def test_amd_vfs_are_whole_pci_functions(make_sim) -> None:
    sim = make_sim(["amd-v620"], enable_vfs=False)
    h = host(sim)
    assert h.enable_vfs(PF) == 4
    base = sim.root / "sys/bus/pci/devices"
    vfs = [vf(i, offset=1) for i in range(4)]
    for a in vfs:
        assert (base / a / "device").read_text() == "0x73ae\n"
        assert not (base / a / "mdev_supported_types").exists() and not (base / a / "nvidia").exists()
    assert not (sim.root / "sys/class/mdev_bus").exists() or os.listdir(sim.root / "sys/class/mdev_bus") == []


# === GPU reset ====================================================================================================
@pytest.mark.parametrize("mode", ["function", "gpu-reset"])
def test_gpu_reset_and_pending_mig_mode(make_sim, mode) -> None:
    from gpuvirt.sim.control import configure

    sim = make_sim(["a100-40gb"], enable_vfs=False)
    if mode != "function":
        configure(sim, reset=mode)      # the default is "function": not established that it applies the mode
    k = SimKernel(sim)
    reset = sim.root / "sys/bus/pci/devices" / PF / "reset"
    set_client(sim, PF, "nvidia-persistenced", True)
    with nvml(sim) as s:
        current, pending, status = s.set_mig_mode(0, True)
    assert (current, pending, status) == (False, True, "IN_USE")
    # a held GPU cannot be reset
    assert errno_of(k.write, reset, "1\n") == errno.EBUSY
    with pytest.raises(DeviceBusyError) as info:
        host(sim).reset_gpu(PF)
    assert "stop every process" in str(info.value)
    for junk in ("x\n", "0\n", "2\n", ""):                     # pci reset_store accepts only 1
        assert errno_of(k.write, reset, junk) == errno.EINVAL
    set_client(sim, PF, "nvidia-persistenced", False)
    host(sim).reset_gpu(PF)
    dev = sim.load()["devices"][0]
    if mode == "function":
        # a PCI function reset through sysfs leaves the mode pending (conservative default, simulator-fidelity.md)
        assert dev["mig"]["current"] == 0 and dev["mig"]["pending"] == 1
        return
    assert dev["mig"]["current"] == 1 and dev["mig"]["pending"] == 1
    # a reset destroys GPU instances (and MIG-backed vGPUs on them)
    with nvml(sim) as s:
        s.create_gpu_instance(0, 19)
        assert len(s.gpu_instances(0)) == 1
    host(sim).reset_gpu(PF)
    assert sim.load()["devices"][0]["mig"]["gpu_instances"] == []


# === available_instances rules per board ==========================================================================
def test_a100_same_type_policy_across_sibling_vfs(make_sim) -> None:
    """A100 (same-type): one A100-4C anywhere on the board zeroes every other time-sliced type on every VF;
    A100-4C itself shows 1 on each free VF until its maximum of 10 exists."""
    sim = make_sim(["a100-40gb"])
    timesliced = nvidia_types("a100-40gb", mig_backed=False)
    mig_backed = nvidia_types("a100-40gb", mig_backed=True)
    vfs = [vf(i) for i in range(20)]
    assert avail_map(sim, vfs[7]) == {t: (1 if t in timesliced else 0) for t in timesliced + mig_backed}
    create(sim, vfs[0], "nvidia-468")
    for i, a in enumerate(vfs):
        got = avail_map(sim, a)
        for t in timesliced + mig_backed:
            want = 1 if (t == "nvidia-468" and i != 0) else 0
            assert got[t] == want, (a, t)
    for i in range(1, 10):
        create(sim, vfs[i], "nvidia-468")
    assert all(v == 0 for a in vfs for v in avail_map(sim, a).values())
    assert errno_of(create, sim, vfs[10], "nvidia-468") == getattr(errno, CATALOG.get("a100-40gb").vgpu.create_errno)
    with pytest.raises(NoCapacityError) as info:
        host(sim).create_mdev(vfs[11], "nvidia-468", new_uuid(11))
    assert "GRID A100-4C x10" in str(info.value)
    # removing one frees exactly one slot, on every free VF
    host(sim).remove_mdev(sim.load()["mdevs"][0]["uuid"])
    assert [avail(sim, a, "nvidia-468") for a in vfs] == [1] + [0] * 9 + [1] * 10
    assert avail(sim, vfs[12], "nvidia-469") == 0


def test_a2_same_size_policy(make_sim) -> None:
    """A2 (same-size): after one A2-4Q only the 4096M types (4Q/4A/4C) stay creatable on the other VFs."""
    sim = make_sim(["a2"])
    four = {"nvidia-746", "nvidia-751", "nvidia-754"}
    create(sim, vf(0), "nvidia-746")
    assert all(v == 0 for v in avail_map(sim, vf(0)).values())      # a VF hosts one vGPU
    for i in range(1, 16):
        assert avail_map(sim, vf(i)) == {t: (1 if t in four else 0) for t in nvidia_types("a2")}, vf(i)
    create(sim, vf(1), "nvidia-751")                              # another type of the same size: allowed
    create(sim, vf(2), "nvidia-754")
    assert errno_of(create, sim, vf(3), "nvidia-747") == errno.EINVAL   # a different size: refused
    create(sim, vf(3), "nvidia-746")                              # 4 x 4 GB = the 16 GB board
    assert all(v == 0 for i in range(16) for v in avail_map(sim, vf(i)).values())
    assert errno_of(create, sim, vf(4), "nvidia-746") == errno.EINVAL


def test_sriov_vf_availability_is_zero_or_one(make_sim) -> None:
    sim = make_sim(["a2"])
    for i in range(16):
        assert set(avail_map(sim, vf(i)).values()) == {1}
    create(sim, vf(0), "nvidia-744")                              # A2-1Q: 16 fit the board
    for i in range(16):
        got = avail_map(sim, vf(i))
        assert set(got.values()) <= {0, 1}
        assert got["nvidia-744"] == (0 if i == 0 else 1)
    # a second mdev on the same VF is refused although the board has room
    assert errno_of(create, sim, vf(0), "nvidia-744") == errno.EINVAL


def test_t4_pf_parent_counts(make_sim) -> None:
    """T4 (classic mdev on the PF, same-type): 16 x 1Q, then 15, ... and every other type 0."""
    sim = make_sim(["t4"])
    assert avail(sim, PF, "nvidia-230") == 16 and avail(sim, PF, "nvidia-234") == 1
    for n in range(16):
        assert avail(sim, PF, "nvidia-230") == 16 - n
        create(sim, PF, "nvidia-230", new_uuid(n))
        others = {t: v for t, v in avail_map(sim, PF).items() if t != "nvidia-230"}
        assert set(others.values()) == {0}
    assert avail(sim, PF, "nvidia-230") == 0
    assert errno_of(create, sim, PF, "nvidia-230") == errno.EINVAL
    assert len(os.listdir(type_dir(sim, PF, "nvidia-230") / "devices")) == 16
    for n in range(16):
        host(sim).remove_mdev(new_uuid(n))
    assert avail(sim, PF, "nvidia-234") == 1 and avail(sim, PF, "nvidia-230") == 16


def test_gvtg_shared_pool(make_sim) -> None:
    sim = make_sim(["gvt-g"])
    parent = "0000:00:02.0"
    spec = CATALOG.get("gvt-g").mdev
    # types whose aperture need exceeds the pool are not registered at all
    assert sorted(avail_map(sim, parent)) == ["i915-GVTg_V5_2", "i915-GVTg_V5_4", "i915-GVTg_V5_8"]
    assert avail_map(sim, parent) == {"i915-GVTg_V5_2": 1, "i915-GVTg_V5_4": 3, "i915-GVTg_V5_8": 7}

    def expected(used: list[str]) -> dict[str, int]:
        out = {}
        for t in spec.types:
            if spec.type_dir(t) not in avail_map(sim, parent):
                continue
            free = {r: spec.pool[r] - sum(next(x for x in spec.types if spec.type_dir(x) == u).cost[r]
                                          for u in used) for r in spec.pool}
            out[spec.type_dir(t)] = min(free[r] // c for r, c in t.cost.items())
        return out

    used: list[str] = []
    create(sim, parent, "i915-GVTg_V5_4")
    used.append("i915-GVTg_V5_4")
    assert avail_map(sim, parent) == expected(used) == {"i915-GVTg_V5_2": 1, "i915-GVTg_V5_4": 2,
                                                        "i915-GVTg_V5_8": 5}
    # different GVT-g types coexist on one iGPU
    create(sim, parent, "i915-GVTg_V5_2")
    used.append("i915-GVTg_V5_2")
    assert avail_map(sim, parent) == expected(used)
    while avail(sim, parent, "i915-GVTg_V5_8") > 0:
        create(sim, parent, "i915-GVTg_V5_8")
        used.append("i915-GVTg_V5_8")
        assert avail_map(sim, parent) == expected(used)
    assert errno_of(create, sim, parent, "i915-GVTg_V5_8") == getattr(errno, spec.create_errno)
    desc = (type_dir(sim, parent, "i915-GVTg_V5_4") / "description").read_text()
    assert desc.splitlines() == ["low_gm_size: 128MB", "high_gm_size: 512MB", "fence: 4",
                                 "resolution: 1920x1200", "weight: 4"]


def test_mtty_shared_pool(make_sim) -> None:
    sim = make_sim(["mtty"])
    assert avail_map(sim, "mtty") == {"mtty-1": 24, "mtty-2": 12}
    create(sim, "mtty", "mtty-2")
    assert avail_map(sim, "mtty") == {"mtty-1": 22, "mtty-2": 11}
    create(sim, "mtty", "mtty-1")
    assert avail_map(sim, "mtty") == {"mtty-1": 21, "mtty-2": 10}
    assert (type_dir(sim, "mtty", "mtty-1") / "name").read_text() == "Single port serial\n"
    assert not (type_dir(sim, "mtty", "mtty-1") / "description").exists()


def test_mdpy_and_mbochs_shared_pools(make_sim) -> None:
    sim = make_sim(["mdpy", "mbochs"])
    assert avail_map(sim, "mdpy") == {"mdpy-hd": 4, "mdpy-vga": 4, "mdpy-xga": 4}
    create(sim, "mdpy", "mdpy-vga")
    assert avail_map(sim, "mdpy") == {"mdpy-hd": 3, "mdpy-vga": 3, "mdpy-xga": 3}
    assert avail_map(sim, "mbochs") == {"mbochs-large": 4, "mbochs-medium": 16, "mbochs-small": 64}
    create(sim, "mbochs", "mbochs-medium")
    assert avail_map(sim, "mbochs") == {"mbochs-large": 3, "mbochs-medium": 15, "mbochs-small": 60}


# === MIG-backed vGPU types ========================================================================================
def test_mig_backed_types_need_mig_and_a_free_gpu_instance(make_sim) -> None:
    sim = make_sim(["a100-40gb"])                               # MIG off
    vfs = [vf(i) for i in range(20)]
    assert avail(sim, vfs[0], "nvidia-474") == 0
    assert errno_of(create, sim, vfs[0], "nvidia-474") == errno.EINVAL
    sim = make_sim(["a100-40gb"], name="mig", mig_enabled=True)
    # MIG on: no time-sliced type, and no MIG-backed type until a GPU instance exists
    assert all(v == 0 for v in avail_map(sim, vfs[0]).values())
    assert errno_of(create, sim, vfs[0], "nvidia-468") == errno.EINVAL
    with nvml(sim) as s:
        gi = s.create_gpu_instance(0, 19)                         # 1g.5gb
    assert [avail(sim, a, "nvidia-474") for a in vfs] == [1] * 20
    assert avail(sim, vfs[0], "nvidia-706") == 0                   # 1g.5gb+me needs its own profile (20)
    assert avail(sim, vfs[0], "nvidia-475") == 0
    uid = create(sim, vfs[0], "nvidia-474")
    assert sim.load()["mdevs"][0]["gpu_instance_id"] == gi.id
    assert [avail(sim, a, "nvidia-474") for a in vfs] == [0] * 20  # the only GI hosts it now
    assert errno_of(create, sim, vfs[1], "nvidia-474") == errno.EINVAL
    with nvml(sim) as s:
        s.create_gpu_instance(0, 19)
        from gpuvirt.errors import NvmlInUseError

        with pytest.raises(NvmlInUseError):
            s.destroy_gpu_instance(0, gi.id)                      # a vGPU lives on it
    assert [avail(sim, a, "nvidia-474") for a in vfs] == [0] + [1] * 19
    host(sim).remove_mdev(uid)
    assert [avail(sim, a, "nvidia-474") for a in vfs] == [1] * 20
