"""NVML's vGPU migration pre-flight (issue 13 item 3): the simulated libnvidia-ml's metadata and compatibility calls
through nvidia-ml-py's own wrappers, the host wrappers' answers against gpuvirt.model.preflight for the same facts, the
host stack read from the (simulated) root, and the stack recorded in the inventory."""

from __future__ import annotations

import ctypes

import pynvml
import pytest

from gpuvirt.model import preflight as pf
from gpuvirt.sim.kernel import SimKernel

PF = "0000:41:00.0"
LIVE_BITS = (pf.VGPU_VM_COMPATIBILITY_LIVE | pf.VGPU_VM_COMPATIBILITY_SLEEP | pf.VGPU_VM_COMPATIBILITY_HIBERNATE
             | pf.VGPU_VM_COMPATIBILITY_COLD)
T4C, T1_5C = 468, 474          # A100-4C (time-sliced), A100-1-5C (MIG-backed, GI profile 19)


def vf(i: int, bus: int = 0x41) -> str:
    devfn = 4 + i
    return f"0000:{bus:02x}:{devfn // 8:02x}.{devfn % 8}"


def host(sim):
    from gpuvirt.host.machine import Host
    from gpuvirt.sim.nvml import FakeNvmlLib

    return Host(sim.root, kernel=SimKernel(sim), nvml_lib=FakeNvmlLib(sim), use_udev=False)


def running_vgpu(sim, h, type_id: int, i: int = 0) -> int:
    """Put vGPU ``type_id`` on VF ``i``, start a VM on it; its NVML vGPU instance id."""
    from gpuvirt.sim.control import set_open

    h.set_vgpu_type(vf(i), type_id)
    set_open(sim, vf(i), True)
    return int(next(v for d in sim.peek()["devices"] for v in d.get("vfs", []) if v["address"] == vf(i))["vgpu_id"])


@pytest.fixture
def pair(make_sim):
    """Two simulated A100 hosts (vendor-specific VFIO), a running A100-4C VM on the source."""
    src, dst = make_sim(["a100-40gb"], name="src", vgpu_interface="vendor-vfio"), make_sim(["a100-40gb"], name="dst", vgpu_interface="vendor-vfio")
    hs, hd = host(src), host(dst)
    vid = running_vgpu(src, hs, T4C)
    yield src, dst, hs, hd, vid
    hs.close()
    hd.close()


def configure(sim, **changes):
    from gpuvirt.sim import hoststack

    return hoststack.configure(sim, **changes)


def answer(hs, vid, hd):
    from gpuvirt.host.nvml_migration import move_compatibility

    return move_compatibility(hs.nvml(), 0, vid, hd.nvml(), 0)


# --- the fake library through nvidia-ml-py's wrappers ---------------------------------------------------------------
def test_pynvml_wrappers_read_metadata_and_compatibility(pair):
    src, dst, hs, hd, vid = pair
    s, d = hs.nvml(), hd.nvml()
    vm = s._call(pynvml.nvmlVgpuInstanceGetMetadata, vid)
    assert isinstance(vm, pynvml.c_nvmlVgpuMetadata_t)
    assert (vm.version, vm.revision) == (1, 1)
    assert vm.guestInfoState == pynvml.NVML_VGPU_INSTANCE_GUEST_INFO_STATE_UNINITIALIZED
    assert vm.guestDriverVersion == "" and vm.guestVgpuVersion == 0
    assert vm.hostDriverVersion == s.driver_version()
    assert vm.vgpuVirtualizationCaps & pf.VIRTUALIZATION_CAP_MIGRATION
    assert 0 < vm.opaqueDataSize <= pynvml.NVML_VGPU_METADATA_OPAQUE_DATA_SIZE
    pg = d._call(pynvml.nvmlDeviceGetVgpuMetadata, d._gpu(0).handle)
    assert isinstance(pg, pynvml.c_nvmlVgpuPgpuMetadata_t) and (pg.version, pg.revision) == (1, 1)
    assert pg.pgpuVirtualizationCaps & pf.VIRTUALIZATION_CAP_MIGRATION
    assert (pg.hostSupportedVgpuRange.minVersion, pg.hostSupportedVgpuRange.maxVersion) == (0x100000, 0x120000)
    assert 0 < pg.opaqueDataSize <= pynvml.NVML_VGPU_PGPU_METADATA_OPAQUE_DATA_SIZE
    c = d._call(pynvml.nvmlGetVgpuCompatibility, vm, pg)
    assert (c.vgpuVmCompatibility, c.compatibilityLimitCode) == (LIVE_BITS, pf.VGPU_COMPATIBILITY_LIMIT_NONE)
    assert d._call(pynvml.nvmlGetVgpuVersion) == [(0x100000, 0x120000), (0x100000, 0x120000)]
    configure(dst, vgpu_current="0x110000-0x120000")
    assert d._call(pynvml.nvmlGetVgpuVersion) == [(0x100000, 0x120000), (0x110000, 0x120000)]


def test_the_longest_settings_fit_the_opaque_data(pair):
    src, dst, hs, hd, vid = pair
    for sim in (src, dst):
        configure(sim, os="a" * 24 + "-" + "9" * 16, kernel="k" * 64, qemu="999.999.999", libvirt="999.999.999",
                  driver="9999.9999.9999.9999")
    c = answer(hs, vid, hd)
    assert c.limit_code == pf.VGPU_COMPATIBILITY_LIMIT_OTHER        # an OS outside live_os, nothing else


def test_buffer_sizes_and_bad_arguments_answer_like_the_library(pair):
    src, dst, hs, hd, vid = pair
    s = hs.nvml()
    s._reinstall()
    lib = pynvml.nvmlLib
    meta, size = pynvml.c_nvmlVgpuMetadata_t(), ctypes.c_uint(0)
    assert lib.nvmlVgpuInstanceGetMetadata(vid, ctypes.byref(meta), ctypes.byref(size)) == 7   # INSUFFICIENT_SIZE
    needed = size.value
    assert pynvml.c_nvmlVgpuMetadata_t.opaqueData.offset < needed <= ctypes.sizeof(meta)
    size.value = needed - 1
    assert lib.nvmlVgpuInstanceGetMetadata(vid, ctypes.byref(meta), ctypes.byref(size)) == 7 and size.value == needed
    assert lib.nvmlVgpuInstanceGetMetadata(vid, ctypes.byref(meta), ctypes.byref(size)) == 0
    assert lib.nvmlVgpuInstanceGetMetadata(vid, ctypes.byref(meta), None) == 2                 # no size: INVALID
    assert lib.nvmlVgpuInstanceGetMetadata(vid, None, ctypes.byref(ctypes.c_uint(8))) == 2    # NULL with a size
    assert lib.nvmlVgpuInstanceGetMetadata(0, ctypes.byref(meta), ctypes.byref(size)) == 2    # id 0
    assert lib.nvmlVgpuInstanceGetMetadata(vid + 99, ctypes.byref(meta), ctypes.byref(size)) == 6   # NOT_FOUND
    with pytest.raises(pynvml.NVMLError) as info:
        s._call(pynvml.nvmlVgpuInstanceGetMetadata, vid + 99)
    assert info.value.value == pynvml.NVML_ERROR_NOT_FOUND
    # a structure of another version, and opaque data the simulator did not write
    pg = s._call(pynvml.nvmlDeviceGetVgpuMetadata, s._gpu(0).handle)
    vm = s._call(pynvml.nvmlVgpuInstanceGetMetadata, vid)
    vm.version = 2
    with pytest.raises(pynvml.NVMLError) as info:
        s._call(pynvml.nvmlGetVgpuCompatibility, vm, pg)
    assert info.value.value == pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
    vm.version, vm.opaqueData = 1, b"from a real driver"
    with pytest.raises(pynvml.NVMLError) as info:
        s._call(pynvml.nvmlGetVgpuCompatibility, vm, pg)
    assert info.value.value == pynvml.NVML_ERROR_INVALID_ARGUMENT


def test_a_gpu_without_vgpu_answers_not_supported_and_errors_map_to_gpuvirt(make_sim):
    from gpuvirt.errors import NvmlNotFoundError, NvmlNotSupportedError
    from gpuvirt.host.nvml_migration import pgpu_metadata, vgpu_metadata

    sim = make_sim(["h100-80gb"])
    h = host(sim)
    try:
        if h.nvml()._call(pynvml.nvmlDeviceGetVirtualizationMode, h.nvml()._gpu(0).handle) != 0:
            pytest.skip("the catalog's H100 has vGPU types now")
        with pytest.raises(NvmlNotSupportedError, match=r"vGPU migration metadata of GPU 0 \(.*\): Not Supported"):
            pgpu_metadata(h.nvml(), 0)
        with pytest.raises(NvmlNotFoundError):
            vgpu_metadata(h.nvml(), 0, 42)
    finally:
        h.close()


def test_faults_fail_the_read_calls_with_the_injected_code(pair):
    from gpuvirt.errors import NvmlError, UsageError
    from gpuvirt.sim.control import add_fault

    src, dst, hs, hd, vid = pair
    add_fault(dst, "nvml.GetVgpuCompatibility", nvml=999)
    with pytest.raises(NvmlError, match="can move to GPU 0") as info:
        answer(hs, vid, hd)
    assert info.value.code == 999
    assert answer(hs, vid, hd).verdict == pf.LIVE          # the fault was used up
    add_fault(src, "nvml.VgpuInstanceGetMetadata", match=f"vgpu={vid}")
    with pytest.raises(NvmlError, match="migration metadata of vGPU instance") as info:
        answer(hs, vid, hd)
    assert info.value.code == pynvml.NVML_ERROR_NOT_SUPPORTED
    add_fault(dst, "nvml.DeviceGetVgpuMetadata", nvml=15)
    with pytest.raises(NvmlError, match="GPU is lost"):
        answer(hs, vid, hd)
    with pytest.raises(UsageError, match="cannot.*kill|not --kill"):
        add_fault(dst, "nvml.GetVgpuCompatibility", kill="before")


# --- verdicts ---------------------------------------------------------------------------------------------------------
def test_same_host_stack_is_live(pair):
    src, dst, hs, hd, vid = pair
    c = answer(hs, vid, hd)
    assert (c.verdict, c.vm_compatibility, c.limit_code) == (pf.LIVE, LIVE_BITS, 0) and c.reasons == ()
    # a move between GPUs of one host uses one session for both sides
    from gpuvirt.host.nvml_migration import move_compatibility

    assert move_compatibility(hs.nvml(), 0, vid, hs.nvml(), 0).verdict == pf.LIVE


def test_different_host_driver_is_cold_with_host_driver_limit(pair):
    src, dst, hs, hd, vid = pair
    configure(dst, driver="550.127.05")
    c = answer(hs, vid, hd)
    assert (c.verdict, c.vm_compatibility, c.limit_code) == (pf.COLD, pf.VGPU_VM_COMPATIBILITY_COLD,
                                                             pf.VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER)
    assert "NVML_VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER" in c.message() and "550.127.05 on the target" in c.message()
    configure(dst, rules={"driver_match": "branch"})      # the judging (target) host's rules
    assert answer(hs, vid, hd).limit_code == pf.VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER     # 570 vs 550
    configure(dst, rules={"driver_match": "any"})
    assert answer(hs, vid, hd).verdict == pf.LIVE


def test_another_board_variant_is_cold_with_gpu_limit(make_sim):
    src, dst = make_sim(["a100-40gb"], name="src", vgpu_interface="vendor-vfio"), make_sim(["a100-40gb-sxm4"], name="dst", vgpu_interface="vendor-vfio")
    hs, hd = host(src), host(dst)
    try:
        vid = running_vgpu(src, hs, T4C)
        c = answer(hs, vid, hd)
        assert (c.verdict, c.limit_code) == (pf.COLD, pf.VGPU_COMPATIBILITY_LIMIT_GPU)
        from gpuvirt.host.nvml_migration import pgpu_metadata, vgpu_metadata
        from gpuvirt.host.stack import host_stack

        vm = vgpu_metadata(hs.nvml(), 0, vid, stack=host_stack(src.root))
        pg = pgpu_metadata(hd.nvml(), 0, stack=host_stack(dst.root))
        assert (vm.device_id, pg.device_id) == (0x20F1, 0x20B0) and T4C in pg.supported_types
        assert "different boards" in pf.vgpu_compatibility(vm, pg).message()
        # the same model with another PCI device id: the same_device_id rule (UNVERIFIED), configurable
        twin = pf.PgpuMetadata(model=vm.model, device_id=0x20B1, family=pg.family, supported_types=pg.supported_types,
                               stack=pg.stack)
        assert pf.vgpu_compatibility(vm, twin).limit_code == pf.VGPU_COMPATIBILITY_LIMIT_GPU
        assert pf.vgpu_compatibility(vm, twin, pf.MigrationRules(same_device_id=False)).verdict == pf.LIVE
    finally:
        hs.close()
        hd.close()


def test_another_family_or_an_unsupported_type_is_none_with_gpu_limit(make_sim):
    src, dst = make_sim(["a100-40gb"], name="src", vgpu_interface="vendor-vfio"), make_sim(["l40s", "a10"], name="dst", vgpu_interface="vendor-vfio")
    hs, hd = host(src), host(dst)
    try:
        vid = running_vgpu(src, hs, T4C)
        from gpuvirt.host.nvml_migration import move_compatibility

        for index in (0, 1):
            c = move_compatibility(hs.nvml(), 0, vid, hd.nvml(), index)
            assert (c.verdict, c.vm_compatibility) == (pf.NONE, 0)
            assert c.limit_code & pf.VGPU_COMPATIBILITY_LIMIT_GPU, c
            assert "NVML_VGPU_COMPATIBILITY_LIMIT_GPU" in c.message()
    finally:
        hs.close()
        hd.close()


def test_mig_backed_vgpu_is_refused_live_by_default_and_configurable(make_sim):
    src, dst = (make_sim(["a100-40gb"], name=n, mig_enabled=True, vgpu_interface="vendor-vfio") for n in ("src", "dst"))
    hs, hd = host(src), host(dst)
    try:
        hs.nvml().create_gpu_instance(0, 19)
        vid = running_vgpu(src, hs, T1_5C)
        c = answer(hs, vid, hd)
        assert (c.verdict, c.limit_code) == (pf.COLD, pf.VGPU_COMPATIBILITY_LIMIT_OTHER)
        from gpuvirt.host.nvml_migration import vgpu_metadata

        assert vgpu_metadata(hs.nvml(), 0, vid).mig_backed
        configure(dst, rules={"mig_backed_live": True})
        assert answer(hs, vid, hd).verdict == pf.LIVE
        configure(src, rules={"mig_backed_live": True})       # the source host's rules do not judge
        configure(dst, rules={"mig_backed_live": False})
        assert answer(hs, vid, hd).limit_code == pf.VGPU_COMPATIBILITY_LIMIT_OTHER
    finally:
        hs.close()
        hd.close()


def test_guest_driver_state_and_vgpu_version_range(pair):
    from gpuvirt.host.nvml_migration import vgpu_metadata
    from gpuvirt.sim.control import set_guest

    src, dst, hs, hd, vid = pair
    vm = vgpu_metadata(hs.nvml(), 0, vid)
    assert vm.guest == pf.GuestFacts(initialized=False, driver=None, vgpu_version=None)
    set_guest(src, vf(0), guest_driver="570.86.10", guest_vgpu_version=0x0F0000)
    vm = vgpu_metadata(hs.nvml(), 0, vid)
    assert vm.guest == pf.GuestFacts(initialized=True, driver="570.86.10", vgpu_version=0x0F0000)
    c = answer(hs, vid, hd)             # 0xf0000 is below the target's 0x100000..0x120000
    assert (c.verdict, c.limit_code) == (pf.NONE, pf.VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER)
    assert "guest 570.86.10" in c.message()
    set_guest(src, vf(0), guest_vgpu_version=0x110000)
    assert answer(hs, vid, hd).verdict == pf.LIVE
    configure(dst, vgpu_current="0x118000-0x120000")
    assert answer(hs, vid, hd).limit_code == pf.VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER
    set_guest(src, vf(0), guest_driver="none")            # not initialized: no guest version to judge
    assert answer(hs, vid, hd).verdict == pf.LIVE


def test_instance_by_vm_uuid_and_unknown_instance(pair):
    from gpuvirt.errors import NvmlNotFoundError
    from gpuvirt.host.nvml_migration import resolve_instance
    from gpuvirt.sim.control import set_guest

    src, dst, hs, hd, vid = pair
    u = "6a1f0c2e-0000-4000-8000-0000000000aa"
    set_guest(src, vf(0), vm_uuid=u)
    assert resolve_instance(hs.nvml(), 0, u.upper()) == vid
    with pytest.raises(NvmlNotFoundError, match="no running vGPU"):
        resolve_instance(hs.nvml(), 0, "6a1f0c2e-0000-4000-8000-0000000000bb")


STACKS = {
    "same": {},
    "driver": {"driver": "550.127.05"},
    "os": {"os": "rhel-10.0"},                       # excluded pair with the source's rhel-9.4
    "debian": {"os": "debian-12", "kernel": "6.1.0-18-amd64", "qemu": "7.2.0", "libvirt": "9.0.0"},
    "range": {"vgpu_current": "0x120000-0x120000"},
    "caps": {"pgpu_migration_cap": False},
}


@pytest.mark.parametrize("target", ["a100-40gb", "a100-40gb-sxm4", "l40s"])
@pytest.mark.parametrize("change", sorted(STACKS))
def test_the_wrappers_answer_equals_the_rules_for_the_same_facts(make_sim, target, change):
    from gpuvirt.host.nvml_migration import move_compatibility, pgpu_metadata, vgpu_metadata
    from gpuvirt.host.stack import host_stack
    from gpuvirt.sim.control import set_guest

    src, dst = make_sim(["a100-40gb"], name="src", vgpu_interface="vendor-vfio"), make_sim([target], name="dst", vgpu_interface="vendor-vfio")
    hs, hd = host(src), host(dst)
    try:
        vid = running_vgpu(src, hs, T4C)
        set_guest(src, vf(0), guest_driver="570.86.10", guest_vgpu_version=0x110000)
        if STACKS[change]:
            configure(dst, **STACKS[change])
        rules = pf.MigrationRules(live_os=frozenset({"rhel-9.4", "rhel-10.0", "debian-12"}))
        configure(dst, rules={"live_os": sorted(rules.live_os)})
        got = move_compatibility(hs.nvml(), 0, vid, hd.nvml(), 0)
        vm = vgpu_metadata(hs.nvml(), 0, vid, stack=host_stack(src.root, hs.nvml()))
        pg = pgpu_metadata(hd.nvml(), 0, stack=host_stack(dst.root, hd.nvml()))
        want = pf.vgpu_compatibility(vm, pg, rules)
        assert (got.vm_compatibility, got.limit_code) == (want.vm_compatibility, want.limit_code), want.message()
        assert {r.limit for r in got.reasons} == {r.limit for r in want.reasons}
    finally:
        hs.close()
        hd.close()


# --- the host stack ----------------------------------------------------------------------------------------------------
def test_host_stack_reads_the_simulated_root_and_nvml(make_sim):
    from gpuvirt.host.stack import host_stack

    sim = make_sim(["a100-40gb"], vgpu_interface="vendor-vfio")
    h = host(sim)
    try:
        assert host_stack(sim.root, h.nvml()) == pf.HostStack(
            driver="570.86.15", os="rhel-9.4", kernel="5.14.0-427.13.1.el9_4.x86_64", qemu="8.2.0",
            libvirt="10.0.0", vgpu_range=(0x100000, 0x120000))
        configure(sim, driver="550.127.05", os="ubuntu-24.04", kernel="6.8.0-45-generic", qemu="8.2.2",
                  libvirt="10.0.0", vgpu_current="0x110000-0x120000")
        got = host_stack(sim.root, h.nvml())
        assert got == pf.HostStack(driver="550.127.05", os="ubuntu-24.04", kernel="6.8.0-45-generic", qemu="8.2.2",
                                   libvirt="10.0.0", vgpu_range=(0x110000, 0x120000))
        # without NVML: the module's version file, no vGPU range
        assert host_stack(sim.root) == pf.HostStack(driver="550.127.05", os="ubuntu-24.04", kernel="6.8.0-45-generic",
                                                    qemu="8.2.2", libvirt="10.0.0")
    finally:
        h.close()


def test_host_stack_of_a_bare_root_is_unknown_and_odd_files_are_ignored(tmp_path):
    from gpuvirt.host.stack import CAPS_DIR, host_stack

    assert host_stack(tmp_path) == pf.HostStack()
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text('ID=ubuntu\nVERSION_ID="24.04"\n')
    caps = tmp_path / CAPS_DIR
    caps.mkdir(parents=True)
    (caps / "a.xml").write_text("<qemuCaps>\n  <selfvers>8006000</selfvers>\n  <version>8001000</version>\n"
                                "</qemuCaps>\n")
    (caps / "b.xml").write_text("<qemuCaps>\n  <selfvers>9000000</selfvers>\n  <version>9002003</version>\n"
                                "</qemuCaps>\n")
    (caps / "c.xml").write_text("not libvirt's")
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text("bad release with spaces\n")
    assert host_stack(tmp_path) == pf.HostStack(os="ubuntu-24.04", qemu="9.2.3", libvirt="9.0.0")


def test_sim_migration_cli_sets_the_stack_and_refuses_bad_input(make_sim, cli):
    sim = make_sim(["a100-40gb"])
    r = cli("sim", "migration", sim.root, "--driver", "550.127.05", "--os", "rhel-9.6", "--mig-backed-live",
            "--live-families", "ampere,hopper", "--json")
    assert r.exit_code == 0, r
    doc = r.json()
    assert doc["driver"] == "550.127.05" and doc["os"] == "rhel-9.6"
    assert doc["rules"]["mig_backed_live"] is True and doc["rules"]["live_families"] == ["ampere", "hopper"]
    assert 'VERSION_ID="9.6"' in (sim.root / "etc/os-release").read_text()
    before = sim.load()
    for args, want in ((["--os", "RHEL 9"], "--os 'RHEL 9'"), (["--qemu", "eight"], "--qemu 'eight'"),
                       (["--driver-match", "loose"], "driver_match must be exact, branch or any"),
                       (["--vgpu-current", "0x200000-0x100000"], "--vgpu-current"),
                       (["--vgpu-current", "0x90000-0x120000"], "outside the supported range")):
        r = cli("sim", "migration", sim.root, *args)
        assert r.exit_code == 2 and want in r.stderr and r.stderr.count("\n") == 1, (args, r)
    assert sim.load() == before
    r = cli("sim", "migration", sim.root, "--rule", "min_qemu=9.0", "--rule", 'driver_ranges=[["550.0", "550.999"]]',
            "--json")
    assert r.exit_code == 0, r
    assert r.json()["rules"]["min_qemu"] == "9.0" and r.json()["rules"]["driver_ranges"] == [["550.0", "550.999"]]
    for bad in ("nonsense=1", "driver_ranges=5", "same_device_id=yes", "norule"):
        r = cli("sim", "migration", sim.root, "--rule", bad)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, (bad, r)
    r = cli("sim", "vgpu", sim.root, vf(0), "--guest-driver", "five")
    assert r.exit_code == 2 and "--guest-driver 'five'" in r.stderr, r


# --- the inventory -----------------------------------------------------------------------------------------------------
def test_host_stack_is_recorded_with_the_host_and_read_back(make_sim, cli):
    from gpuvirt.context import Context, resolve_settings

    sim = make_sim(["a100-40gb"], vgpu_interface="vendor-vfio")
    configure(sim, driver="550.127.05", os="ubuntu-24.04", kernel="6.8.0-45-generic")
    r = cli("--sim", sim.root, "--host-id", "h1", "reconcile", "--yes")
    assert r.exit_code == 0, r
    want = pf.HostStack(driver="550.127.05", os="ubuntu-24.04", kernel="6.8.0-45-generic", qemu="8.2.0",
                        libvirt="10.0.0", vgpu_range=(0x100000, 0x120000))
    with Context(resolve_settings(sim=str(sim.root), host_id="h1", env={})) as ctx:
        with ctx.inventory.unit() as uow:
            assert uow.host_stacks() == {"h1": want}
            first = uow.host_stack_recorded_at("h1")
    configure(sim, driver="570.86.15")
    assert cli("--sim", sim.root, "--host-id", "h1", "reconcile", "--yes").exit_code == 0
    with Context(resolve_settings(sim=str(sim.root), host_id="h1", env={})) as ctx:
        with ctx.inventory.unit() as uow:
            assert uow.host_stacks(["h1"])["h1"].driver == "570.86.15"
            assert uow.host_stacks(["elsewhere"]) == {}
            assert uow.host_stack_recorded_at("h1") >= first


def test_record_host_stack_replaces_cuts_and_follows_the_host(tmp_path):
    from gpuvirt.inventory.store import Inventory

    inv = Inventory.connect(f"sqlite:///{tmp_path / 'i.db'}", "h1")
    inv.ensure_schema()
    with inv.unit(write=True) as uow:
        uow.touch_host("h1", hostname="h1")
        uow.touch_host("h2", hostname="h2")
        uow.record_host_stack("h1", pf.HostStack(driver="550.127.05", kernel="k" * 300))
        uow.record_host_stack("h2", pf.HostStack(os="rhel-9.4", vgpu_range=(1, 2)))
        uow.record_host_stack("h1", pf.HostStack(driver="570.86.15", kernel="k" * 300))
    with inv.unit() as uow:
        got = uow.host_stacks()
    assert got == {"h1": pf.HostStack(driver="570.86.15", kernel="k" * 128),
                   "h2": pf.HostStack(os="rhel-9.4", vgpu_range=(1, 2))}
    with inv.unit(write=True) as uow:
        uow.purge_host("h2")
    with inv.unit() as uow:
        assert set(uow.host_stacks()) == {"h1"}
    inv.close()


def test_revision_0006_upgrades_a_0005_inventory_and_back(tmp_path):
    from sqlalchemy import text

    from gpuvirt.inventory.migrate import downgrade, upgrade
    from gpuvirt.inventory.store import HEAD_REVISION, Inventory

    assert HEAD_REVISION == "0007_intent_recovery"
    inv = Inventory.connect(f"sqlite:///{tmp_path / 'i.db'}", "h1")
    inv.upgrade("0005_containers")
    with inv.engine.begin() as c:
        c.execute(text("INSERT INTO hosts (id, hostname, root, simulated, created_at, last_seen_at) "
                       "VALUES ('h1', 'h1', '/', 0, '2026-01-01', '2026-01-01')"))
    inv.ensure_schema()
    assert inv.current_revision() == HEAD_REVISION and inv.check() == []
    with inv.unit(write=True) as uow:
        uow.record_host_stack("h1", pf.HostStack(driver="550.127.05"))
    with inv.engine.begin() as c:
        assert c.execute(text("SELECT host_id, driver FROM host_stack")).all() == [("h1", "550.127.05")]
    downgrade(inv.engine, "0005_containers")
    assert inv.current_revision() == "0005_containers"
    with inv.engine.begin() as c:
        assert c.execute(text("SELECT id FROM hosts")).all() == [("h1",)]
    upgrade(inv.engine)
    assert inv.check() == []
    inv.close()


@pytest.mark.pg
def test_revision_0006_on_postgresql(pg_schema):
    from sqlalchemy import text

    from gpuvirt.inventory.migrate import downgrade, upgrade
    from gpuvirt.inventory.store import HEAD_REVISION, Inventory

    url = pg_schema[0]
    inv = Inventory.connect(url, "h1")
    inv.upgrade("0005_containers")
    with inv.engine.begin() as c:
        c.execute(text("INSERT INTO hosts (id, hostname, root, simulated, created_at, last_seen_at) "
                       "VALUES ('h1', 'h1', '/', false, now(), now())"))
    inv.ensure_schema()
    assert inv.current_revision() == HEAD_REVISION and inv.check() == []
    with inv.unit(write=True) as uow:
        uow.record_host_stack("h1", pf.HostStack(driver="550.127.05", vgpu_range=(0x100000, 0xFFFFFFFF)))
    with inv.unit() as uow:
        assert uow.host_stacks()["h1"].vgpu_range == (0x100000, 0xFFFFFFFF)
    downgrade(inv.engine, "0005_containers")
    upgrade(inv.engine)
    assert inv.check() == []
    inv.close()


def _recovery_round_trip(inv, now: str) -> None:
    """At head a 'forward-only' intent is stored as written; going back to 0006 settles it as 'forward'."""
    from sqlalchemy import text

    from gpuvirt.inventory.migrate import downgrade, upgrade

    with inv.engine.begin() as c:
        c.execute(text("INSERT INTO intents (host_id, kind, state, recovery, gpus, target, before, steps, created_at, "
                       "updated_at) "
                       f"VALUES ('h1', 'reconcile', 'running', 'forward-only', '[]', '{{}}', '{{}}', '[]', {now}, {now})"))
        assert c.execute(text("SELECT recovery FROM intents")).all() == [("forward-only",)]
    downgrade(inv.engine, "0006_host_stack")
    with inv.engine.begin() as c:
        assert c.execute(text("SELECT recovery FROM intents")).all() == [("forward",)]
    upgrade(inv.engine)
    assert inv.check() == []


def test_revision_0007_stores_forward_only_intents_and_downgrades(tmp_path):
    from sqlalchemy import text

    from gpuvirt.inventory.store import Inventory

    inv = Inventory.connect(f"sqlite:///{tmp_path / 'i.db'}", "h1")
    inv.ensure_schema()
    with inv.engine.begin() as c:
        c.execute(text("INSERT INTO hosts (id, hostname, root, simulated, created_at, last_seen_at) "
                       "VALUES ('h1', 'h1', '/', 0, '2026-01-01', '2026-01-01')"))
    _recovery_round_trip(inv, "'2026-01-01'")
    inv.close()


@pytest.mark.pg
def test_revision_0007_on_postgresql(pg_schema):
    # the reason for 0007: PostgreSQL enforces the VARCHAR length that SQLite ignores
    from sqlalchemy import text

    from gpuvirt.inventory.store import Inventory

    url = pg_schema[0]
    inv = Inventory.connect(url, "h1")
    inv.ensure_schema()
    with inv.engine.begin() as c:
        c.execute(text("INSERT INTO hosts (id, hostname, root, simulated, created_at, last_seen_at) "
                       "VALUES ('h1', 'h1', '/', false, now(), now())"))
    _recovery_round_trip(inv, "now()")
    inv.close()
