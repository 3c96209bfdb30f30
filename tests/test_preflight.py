"""Pre-flight rules for moving a vGPU: NVML's compatibility vocabulary and each refusal with its limit code."""

from __future__ import annotations

import pynvml
import pytest

from gpuvirt.model import preflight as pf
from gpuvirt.model.catalog import load_catalog
from gpuvirt.model.preflight import (
    COLD,
    LIVE,
    NONE,
    GuestFacts,
    HostStack,
    MigrationRules,
    check_move,
    pgpu_metadata,
    vgpu_compatibility,
    vgpu_metadata,
)

CAT = load_catalog()
A100, H100, L40S, A10 = CAT.get("a100-40gb"), CAT.get("h100-80gb"), CAT.get("l40s"), CAT.get("a10")
RHEL = HostStack(driver="550.127.05", os="rhel-9.4", vgpu_range=(0x110000, 0x110004))
L40S_24Q = next(t for t in L40S.vgpu.types if t.name == "L40S-24Q")
A100_3C = next(t for t in A100.vgpu.types if t.name == "A100-3-20C")


def pair(vm_model=L40S, pgpu_model=L40S, type_id=None, src=RHEL, dst=RHEL, guest=GuestFacts(), **kw):
    tid = L40S_24Q.id if type_id is None else type_id
    vm = vgpu_metadata(vm_model, tid, stack=src, guest=guest, device_id=kw.get("src_device"))
    pg = pgpu_metadata(pgpu_model, stack=dst, device_id=kw.get("dst_device"), migration_cap=kw.get("pgpu_cap", True))
    return vm, pg


def test_vocabulary_matches_nvidia_ml_py():
    assert pf.VGPU_VM_COMPATIBILITY_NONE == pynvml.NVML_VGPU_VM_COMPATIBILITY_NONE
    assert pf.VGPU_VM_COMPATIBILITY_COLD == pynvml.NVML_VGPU_VM_COMPATIBILITY_COLD
    assert pf.VGPU_VM_COMPATIBILITY_HIBERNATE == pynvml.NVML_VGPU_VM_COMPATIBILITY_HIBERNATE
    assert pf.VGPU_VM_COMPATIBILITY_SLEEP == pynvml.NVML_VGPU_VM_COMPATIBILITY_SLEEP
    assert pf.VGPU_VM_COMPATIBILITY_LIVE == pynvml.NVML_VGPU_VM_COMPATIBILITY_LIVE
    assert pf.VGPU_COMPATIBILITY_LIMIT_NONE == pynvml.NVML_VGPU_COMPATIBILITY_LIMIT_NONE
    assert pf.VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER == pynvml.NVML_VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER
    assert pf.VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER == pynvml.NVML_VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER
    assert pf.VGPU_COMPATIBILITY_LIMIT_GPU == pynvml.NVML_VGPU_COMPATIBILITY_LIMIT_GPU
    assert pf.VGPU_COMPATIBILITY_LIMIT_OTHER == pynvml.NVML_VGPU_COMPATIBILITY_LIMIT_OTHER
    assert pf.VGPU_INSTANCE_GUEST_INFO_STATE_INITIALIZED == pynvml.NVML_VGPU_INSTANCE_GUEST_INFO_STATE_INITIALIZED


def test_matching_hosts_allow_live():
    c = vgpu_compatibility(*pair())
    assert c.verdict == LIVE and c.limit_code == pf.VGPU_COMPATIBILITY_LIMIT_NONE and not c.reasons
    assert c.vm_compatibility == 0xF          # LIVE | SLEEP | HIBERNATE | COLD
    assert c.allows(LIVE) and c.allows(COLD)
    assert check_move(*pair(), allow=(LIVE,)).kind == LIVE


@pytest.mark.parametrize("rules,dst_driver,verdict", [
    (MigrationRules(), "550.144.03", COLD),                              # RHEL docs: drivers must match
    (MigrationRules(driver_match="branch"), "550.144.03", LIVE),
    (MigrationRules(driver_match="branch"), "570.86.10", COLD),
    (MigrationRules(driver_match="any"), "570.86.10", LIVE),
    (MigrationRules(driver_match="any", driver_ranges=(("550.54.14", "550.144.03"),)), "550.144.03", LIVE),
    (MigrationRules(driver_match="any", driver_ranges=(("550.54.14", "550.127.05"),)), "550.144.03", COLD),
])
def test_host_driver_rule(rules, dst_driver, verdict):
    dst = HostStack(driver=dst_driver, os="rhel-9.4")
    c = vgpu_compatibility(*pair(dst=dst), rules)
    assert c.verdict == verdict
    if verdict == COLD:
        assert c.limit_code == pf.VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER
        assert "NVML_VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER" in c.message()


def test_refusal_of_a_live_move_names_the_limit_code():
    chk = check_move(*pair(dst=HostStack(driver="550.144.03", os="rhel-9.4")), allow=(LIVE,))
    assert chk.kind is None and not chk.ok
    msg = chk.message()
    assert "a cold move is needed and the policy allows only live" in msg
    assert "NVML_VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER" in msg and "550.144.03" in msg
    assert check_move(*pair(dst=HostStack(driver="550.144.03", os="rhel-9.4")), allow=(LIVE, COLD)).kind == COLD


def test_type_not_supported_on_the_target_is_refused_outright():
    a10_type = next(t for t in A10.vgpu.types if t.name == "A10-24Q")
    c = vgpu_compatibility(*pair(vm_model=A10, pgpu_model=L40S, type_id=a10_type.id))
    assert c.verdict == NONE and c.vm_compatibility == pf.VGPU_VM_COMPATIBILITY_NONE
    assert c.limit_code & pf.VGPU_COMPATIBILITY_LIMIT_GPU
    assert "is not supported on l40s" in c.message() and "NVML_VGPU_COMPATIBILITY_LIMIT_GPU" in c.message()
    chk = check_move(*pair(vm_model=A10, pgpu_model=L40S, type_id=a10_type.id), allow=(LIVE, COLD))
    assert chk.kind is None and "NVML_VGPU_COMPATIBILITY_LIMIT_GPU" in chk.message()


def test_board_variant_and_family_rules():
    # the same catalog model with another PCI device id (SXM vs PCIe): cold only unless configured
    vm, pg = pair(src_device=0x26B9, dst_device=0x26BA)
    c = vgpu_compatibility(vm, pg)
    assert c.verdict == COLD and c.limit_code == pf.VGPU_COMPATIBILITY_LIMIT_GPU
    assert "different variants of l40s" in c.message()
    assert vgpu_compatibility(vm, pg, MigrationRules(same_device_id=False)).verdict == LIVE
    fam = vgpu_compatibility(*pair(), MigrationRules(live_families=frozenset({"hopper"})))
    assert fam.verdict == COLD and fam.limit_code == pf.VGPU_COMPATIBILITY_LIMIT_GPU
    assert "ada GPUs are not in the live-migration families" in fam.message()
    cap = vgpu_compatibility(*pair(pgpu_cap=False))
    assert cap.verdict == COLD and "pgpuVirtualizationCaps" in cap.message()


def test_mig_backed_vgpu_is_not_live_migratable_by_default():
    vm = vgpu_metadata(A100, A100_3C.id, stack=RHEL)
    pg = pgpu_metadata(A100, stack=RHEL)
    c = vgpu_compatibility(vm, pg)
    assert vm.mig_backed and c.verdict == COLD
    assert c.limit_code == pf.VGPU_COMPATIBILITY_LIMIT_OTHER
    assert "MIG-backed" in c.message() and "NVML_VGPU_COMPATIBILITY_LIMIT_OTHER" in c.message()
    assert vgpu_compatibility(vm, pg, MigrationRules(mig_backed_live=True)).verdict == LIVE
    # a bare GPU instance has no vGPU at all: cold (checkpoint / restart) on the same model, nothing elsewhere
    bare = vgpu_metadata(A100, None, stack=RHEL)
    assert vgpu_compatibility(bare, pg).verdict == COLD
    other = vgpu_compatibility(bare, pgpu_metadata(H100, stack=RHEL))
    assert other.verdict == NONE and other.limit_code & pf.VGPU_COMPATIBILITY_LIMIT_GPU


def test_guest_vgpu_version_outside_the_target_range():
    guest = GuestFacts(initialized=True, driver="535.161.08", vgpu_version=0x100005)
    c = vgpu_compatibility(*pair(guest=guest))
    assert c.verdict == NONE and c.limit_code == pf.VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER
    assert "NVML_VGPU_COMPATIBILITY_LIMIT_GUEST_DRIVER" in c.message() and "0x100005" in c.message()
    # no guest driver reported yet: nothing to compare
    assert vgpu_compatibility(*pair(guest=GuestFacts(vgpu_version=0x100005))).verdict == LIVE
    inside = GuestFacts(initialized=True, vgpu_version=0x110002)
    assert vgpu_compatibility(*pair(guest=inside)).verdict == LIVE


@pytest.mark.parametrize("src_os,dst_os,verdict", [
    ("rhel-9.4", "rhel-9.6", LIVE),
    ("ubuntu-24.04", "ubuntu-24.04", LIVE),
    ("rhel-10.0", "rhel-9.4", COLD),          # NVIDIA: not between RHEL 10 and RHEL 9.4
    ("rhel-9.2", "rhel-9.4", COLD),           # not a supported release
    (None, "rhel-9.4", COLD),                 # unknown: no live move on a guess
])
def test_hypervisor_releases(src_os, dst_os, verdict):
    c = vgpu_compatibility(*pair(src=HostStack(driver="550.127.05", os=src_os),
                                 dst=HostStack(driver="550.127.05", os=dst_os)))
    assert c.verdict == verdict
    if verdict == COLD:
        assert c.limit_code == pf.VGPU_COMPATIBILITY_LIMIT_OTHER


def test_upstream_stack_minimums_apply_outside_vendor_releases():
    rules = MigrationRules(live_os=None)
    old = HostStack(driver="550.127.05", os="debian-12", kernel="6.1.0", qemu="7.2.11", libvirt="9.0.0")
    new = HostStack(driver="550.127.05", os="debian-13", kernel="6.12.0", qemu="9.2.0", libvirt="11.3.0")
    c = vgpu_compatibility(*pair(src=old, dst=new), rules)
    assert c.verdict == COLD and "source qemu 7.2.11 is older than 8.1" in c.message()
    assert vgpu_compatibility(*pair(src=new, dst=new), rules).verdict == LIVE
    # RHEL 9.4 ships kernel 5.14 with the VFIO migration uAPI backported: the default rules do not refuse it
    rhel = HostStack(driver="550.127.05", os="rhel-9.4", kernel="5.14.0-427.13.1.el9_4")
    assert vgpu_compatibility(*pair(src=rhel, dst=rhel)).verdict == LIVE


def test_check_move_room_and_bad_kinds():
    chk = check_move(*pair(), allow=(LIVE, COLD), room=0)
    assert chk.kind is None and "no room" in chk.message()
    with pytest.raises(ValueError):
        check_move(*pair(), allow=("warm",))
    with pytest.raises(ValueError):
        MigrationRules(driver_match="nearly")
    assert pf.limit_names(0) == "NVML_VGPU_COMPATIBILITY_LIMIT_NONE"
    assert pf.limit_names(0x5) == "NVML_VGPU_COMPATIBILITY_LIMIT_HOST_DRIVER|NVML_VGPU_COMPATIBILITY_LIMIT_GPU"
    assert pf.version_key("550.127.05") == (550, 127, 5) and pf.version_key("none") is None
