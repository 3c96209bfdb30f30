"""Kernel semantics of the simulator over time: injected faults, kills, reboots, concurrent writers, corrupt
state and the one-vGPU-interface rule (split from tests/test_sim_kernel.py, which keeps the per-operation write
semantics; same facts and sources as there)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from gpuvirt.errors import (
    DeviceBusyError,
    NoCapacityError,
    NotFoundError,
    SimulatorError,
    SysfsError,
)
from gpuvirt.sim.control import add_fault, open_sim, reboot, set_client
from gpuvirt.sim.kernel import SimKernel
from gpuvirt.sim.state import SimHost

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
    type_id_by_name,
    nvml,
)


# === injected faults ==============================================================================================
def test_injected_faults(make_sim) -> None:
    sim = make_sim(["mtty", "l40s"])
    k = SimKernel(sim)
    h = host(sim)
    add_fault(sim, "mdev.create", errno="EBUSY", times=1, skip=1)
    create(sim, "mtty", "mtty-1", new_uuid(1))                   # skipped
    with pytest.raises(DeviceBusyError) as info:
        h.create_mdev("mtty", "mtty-1", new_uuid(2))              # fails with the injected errno
    assert info.value.errno == errno.EBUSY
    assert mdev_uuids(sim) == {new_uuid(1)}
    create(sim, "mtty", "mtty-1", new_uuid(2))                   # the fault is used up
    assert sim.load()["faults"][0]["times"] == 0
    # default errno EIO, a 'match' restricts the target, several failures in a row
    add_fault(sim, "mdev.remove", times=2, match=new_uuid(2))
    create(sim, "mtty", "mtty-2", new_uuid(3))
    host(sim).remove_mdev(new_uuid(3))                           # does not match: passes
    remove = sim.root / "sys/bus/mdev/devices" / new_uuid(2) / "remove"
    assert errno_of(k.write, remove, "1\n") == errno.EIO
    with pytest.raises(SysfsError) as info:
        h.remove_mdev(new_uuid(2))
    assert info.value.errno == errno.EIO and "EIO" in str(info.value)
    h.remove_mdev(new_uuid(2))
    # vendor-VFIO and SR-IOV writes
    add_fault(sim, "vgpu.set", errno="EAGAIN")
    attr = sim.root / "sys/bus/pci/devices" / vf(0) / "nvidia/current_vgpu_type"
    assert errno_of(k.write, attr, "1152\n") == errno.EAGAIN
    assert attr.read_text() == "0\n"
    k.write(attr, "1152\n")
    add_fault(sim, "vgpu.clear", errno="EIO")
    assert errno_of(k.write, attr, "0\n") == errno.EIO
    k.write(attr, "0\n")
    add_fault(sim, "sriov.disable", errno="EIO")
    with pytest.raises(SysfsError) as info:
        h.disable_vfs(PF)
    assert info.value.errno == errno.EIO
    assert h.sriov_state(PF) == (32, 32)
    h.disable_vfs(PF)
    add_fault(sim, "sriov.enable", errno="ENOMEM")
    with pytest.raises(NoCapacityError):
        h.enable_vfs(PF, 2)
    assert h.enable_vfs(PF, 2) == 2
    add_fault(sim, "pci.reset", errno="ENOTTY")
    with pytest.raises(SysfsError) as info:
        h.reset_gpu(PF)
    assert info.value.errno == errno.ENOTTY
    h.reset_gpu(PF)
    assert all(f["times"] == 0 for f in sim.load()["faults"])


def test_fault_fires_before_any_change(make_sim) -> None:
    sim = make_sim(["t4"])
    add_fault(sim, "mdev.create", errno="ENOSPC", times=3)
    for n in range(3):
        with pytest.raises(NoCapacityError):
            host(sim).create_mdev(PF, "nvidia-230", new_uuid(n))
    assert sim.load()["mdevs"] == [] and avail(sim, PF, "nvidia-230") == 16
    host(sim).create_mdev(PF, "nvidia-230", new_uuid(9))
    assert avail(sim, PF, "nvidia-230") == 15


def _create_then_exit(root: str, parent: str, type_id: str, uid: str) -> None:
    sim = open_sim(root)
    SimKernel(sim).write(Path(root) / "sys/class/mdev_bus" / parent / "mdev_supported_types" / type_id / "create",
                         uid + "\n")
    os._exit(0)


@pytest.mark.parametrize("kill", ["before", "after"])
def test_crash_fault_kills_the_writer_at_the_chosen_step(make_sim, kill: str) -> None:
    sim = make_sim(["mtty"])
    add_fault(sim, "mdev.create", kill=kill)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_create_then_exit, args=(str(sim.root), "mtty", "mtty-1", U))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    state = open_sim(sim.root).load()
    assert state["faults"][0]["times"] == 0                      # consumed, and that was saved
    if kill == "before":
        assert state["mdevs"] == [] and mdev_uuids(sim) == set()
        assert avail(sim, "mtty", "mtty-1") == 24
    else:
        assert [m["uuid"] for m in state["mdevs"]] == [U] and mdev_uuids(sim) == {U}
        assert avail(sim, "mtty", "mtty-1") == 23
    create(sim, "mtty", "mtty-2")                                # the dead writer's lock went with it


# === reboot =======================================================================================================
def test_reboot_wipes_volatile_state(make_sim, cli) -> None:
    sim = make_sim(["a100-40gb", "h100-80gb", "a2", "t4", "mtty"], mig_enabled=True)
    # a100 0000:41, h100 0000:42, a2 0000:43, t4 0000:44 (a classic mdev host); the vendor-VFIO L40S VF is
    # checked on a host of its own, since one host never runs both interfaces
    a2_vf, t4 = vf(0, 0x43), "0000:44:00.0"
    vfio = make_sim(["l40s"], name="vfio")
    l40s_vf = vf(0, 0x41)
    host(vfio).set_vgpu_type(l40s_vf, type_id_by_name("l40s", "L40S-8Q"))
    reboot(vfio)
    assert vfio.load()["devices"][0]["vfs"] == []
    assert not (vfio.root / "sys/bus/pci/devices" / l40s_vf).exists()
    create(sim, a2_vf, "nvidia-746")
    create(sim, t4, "nvidia-230")
    create(sim, "mtty", "mtty-1")
    with nvml(sim) as s:
        s.create_gpu_instance(0, 19)
        s.create_gpu_instance(1, 19)
    assert len(mdev_uuids(sim)) == 3
    boot_id = (sim.root / "proc/sys/kernel/random/boot_id").read_text()
    res = cli("sim", "reboot", str(sim.root))
    assert res.exit_code == 0, res
    state = sim.load()
    assert state["boot"] == 2 and state["mdevs"] == [] and mdev_uuids(sim) == set()
    assert (sim.root / "proc/sys/kernel/random/boot_id").read_text() != boot_id
    for dev in state["devices"]:
        assert dev["vfs"] == []
        if dev.get("sriov") is not None:
            assert dev["sriov"]["numvfs"] == 0
            assert (sim.root / "sys/bus/pci/devices" / dev["address"] / "sriov_numvfs").read_text() == "0\n"
    # only parents that need no VFs remain: the T4 PF and the mtty sample
    assert sorted(os.listdir(sim.root / "sys/class/mdev_bus")) == [t4, "mtty"]
    assert avail(sim, t4, "nvidia-230") == 16 and avail(sim, "mtty", "mtty-1") == 24
    by_model = {d["model"]: d for d in state["devices"]}
    # MIG mode persists on Ampere, is lost on Hopper; GPU instances never survive
    assert by_model["a100-40gb"]["mig"] == {"current": 1, "pending": 1, "gpu_instances": []}
    assert by_model["h100-80gb"]["mig"] == {"current": 0, "pending": 0, "gpu_instances": []}
    with nvml(sim) as s:
        assert s.gpu_instances(0) == []
        assert [g.mig_current for g in s.gpus()][:2] == [True, False]


@pytest.mark.parametrize("model_id", ["a100-40gb", "a100-80gb", "a30", "h100-80gb", "h100-nvl", "h200"])
def test_reboot_mig_mode_per_architecture(make_sim, model_id: str) -> None:
    sim = make_sim([model_id], mig_enabled=True, enable_vfs=False)
    reboot(sim)
    mig = sim.load()["devices"][0]["mig"]
    survives = CATALOG.get(model_id).mig.mode_survives_reboot
    assert survives == (CATALOG.get(model_id).architecture == "ampere")
    assert (mig["current"], mig["pending"]) == ((1, 1) if survives else (0, 0))


def test_reboot_applies_pending_mig_mode_on_ampere(make_sim) -> None:
    sim = make_sim(["a100-40gb"], enable_vfs=False)
    set_client(sim, PF, "dcgm", True)
    with nvml(sim) as s:
        assert s.set_mig_mode(0, True)[:2] == (False, True)
    reboot(sim)
    assert sim.load()["devices"][0]["mig"]["current"] == 1


# === concurrency ==================================================================================================
def _creator(root: str, parent: str, type_id: str, uuids: list[str], out: Any) -> None:
    sim = open_sim(root)
    k = SimKernel(sim)
    results = []
    for u in uuids:
        try:
            k.write(Path(root) / "sys/class/mdev_bus" / parent / "mdev_supported_types" / type_id / "create",
                    u + "\n")
            results.append((u, 0))
        except OSError as exc:
            results.append((u, exc.errno))
    out.put(results)


def _run_parallel(jobs: list[tuple]) -> list[tuple[str, int]]:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_creator, args=(*job, q)) for job in jobs]
    for p in procs:
        p.start()
    results = []
    for _ in procs:
        results.extend(q.get(timeout=60))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _check_consistent(sim: SimHost) -> dict[str, Any]:
    doc = json.loads(sim.state_path.read_text())                 # still valid JSON
    on_disk = mdev_uuids(sim)
    assert on_disk == {m["uuid"] for m in doc["mdevs"]}
    assert len(doc["mdevs"]) == len({m["uuid"] for m in doc["mdevs"]})
    assert not list(sim.state_dir.glob(".*.tmp"))                # no torn temporary files left
    return doc


def test_concurrent_creates_never_exceed_a_shared_pool(make_sim) -> None:
    sim = make_sim(["mtty"])
    jobs = [(str(sim.root), "mtty", "mtty-2", [new_uuid(100 * p + i) for i in range(6)]) for p in range(4)]
    results = _run_parallel(jobs)
    ok = [u for u, e in results if e == 0]
    assert len(ok) == 12                                        # 24 ports / 2
    assert {e for _, e in results if e} == {errno.ENOSPC}
    doc = _check_consistent(sim)
    assert {m["uuid"] for m in doc["mdevs"]} == set(ok)
    assert avail_map(sim, "mtty") == {"mtty-1": 0, "mtty-2": 0}


def test_concurrent_creates_on_sibling_vfs_respect_the_board(make_sim) -> None:
    sim = make_sim(["a2"])
    # four processes race for A2-8Q (2 fit the board) on every VF, each in its own order
    jobs = []
    for p in range(4):
        order = list(range(16))[p * 4:] + list(range(16))[:p * 4]
        jobs.extend([(str(sim.root), vf(i), "nvidia-747", [new_uuid(1000 * p + i)]) for i in order[:3]])
    results = _run_parallel(jobs)
    assert sum(1 for _, e in results if e == 0) == 2
    assert {e for _, e in results if e} == {errno.EINVAL}
    doc = _check_consistent(sim)
    assert len({m["parent"] for m in doc["mdevs"]}) == 2         # never two on one VF
    assert all(v == 0 for i in range(16) for v in avail_map(sim, vf(i)).values())


def test_concurrent_creates_of_the_same_uuids(make_sim) -> None:
    sim = make_sim(["mtty", "mdpy"])
    uuids = [new_uuid(i) for i in range(4)]
    jobs = [(str(sim.root), "mtty" if p % 2 else "mdpy", "mtty-1" if p % 2 else "mdpy-vga",
             uuids[p:] + uuids[:p]) for p in range(4)]
    results = _run_parallel(jobs)
    assert sorted(u for u, e in results if e == 0) == uuids     # each UUID exactly once, on some parent
    assert {e for _, e in results if e} == {errno.EEXIST}
    _check_consistent(sim)


# === corrupt state ================================================================================================
@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "gpuvirt-sim", "version": 99}', "\x00\x01",
                                     '{"format": "gpuvirt-sim", "version": 1, "devices": {}, "mdevs": [], '
                                     '"faults": [], "seed": "s", "boot": 1}'],
                         ids=["syntax", "list", "version", "binary", "devices-not-list"])
def test_corrupt_state_is_one_line_simulator_error(make_sim, content: str) -> None:
    sim = make_sim(["mtty"])
    sim.state_path.write_text(content)
    # opening the host already validates the state: nothing reads a tree whose truth is unusable
    with pytest.raises(SimulatorError) as info:
        open_sim(sim.root)
    msg = str(info.value)
    assert "\n" not in msg and "corrupt" in msg and str(sim.state_path) in msg
    # writes through a kernel opened earlier report the same error instead of an OSError or a traceback
    with pytest.raises(SimulatorError):
        SimKernel(sim).write(type_dir(sim, "mtty", "mtty-1") / "create", U)


def test_missing_simulator_is_reported(tmp_path: Path) -> None:
    with pytest.raises(SimulatorError) as info:
        open_sim(tmp_path / "nothing")
    assert "gpuvirt sim init" in str(info.value)
    # "not found" in the CLI's exit table (3), unlike a corrupt state (1)
    assert isinstance(info.value, NotFoundError) and info.value.exit_code == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(SimulatorError) as info:
        open_sim(tmp_path / "empty")
    assert "is missing" in str(info.value) and info.value.exit_code == 3


def test_repair_rewrites_a_damaged_tree(make_sim, cli) -> None:
    sim = make_sim(["mtty"])
    create(sim, "mtty", "mtty-2")
    shutil.rmtree(sim.root / "sys/class")
    assert cli("sim", "repair", str(sim.root)).exit_code == 0
    assert avail_map(sim, "mtty") == {"mtty-1": 22, "mtty-2": 11}
    assert len(mdev_uuids(sim)) == 1


# === one vGPU interface per host ====================================================================================
@pytest.mark.parametrize("gpus,forced,expected", [
    (["a2", "t4"], None, "mdev"),
    (["l40s"], None, "vendor-vfio"),
    (["a100-40gb", "a2", "l40s"], None, "vendor-vfio"),      # boards disagree: the newer driver's interface
    (["a100-40gb", "l40s"], "mdev", "mdev"),
    (["h100-80gb", "mtty"], None, None),                     # no NVIDIA vGPU board at all
])
def test_host_runs_one_vgpu_interface(make_sim, cli, gpus, forced, expected) -> None:
    sim = make_sim(gpus, vgpu_interface=forced)
    state = sim.load()
    assert state["vgpu_interface"] == expected
    assert {d["interface"] for d in state["devices"] if d["interface"]} == ({expected} if expected else set())
    res = cli("--sim", str(sim.root), "discover", "--json")
    assert res.exit_code == 0, res
    doc = res.json()
    nvidia_parents = [p for p in doc["mdev_parents"] if p["address"] not in ("mtty",)]
    if expected == "vendor-vfio":
        assert nvidia_parents == [] and doc["vfio_vfs"]
    elif expected == "mdev":
        assert nvidia_parents and doc["vfio_vfs"] == []
