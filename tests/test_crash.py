"""Crash safety: a gpuvirt killed at any host operation ends, after ``reconcile``, in the old or the new layout.

For a re-partition apply (MIG + MIG-backed vGPU: a100-40gb-balanced -> a100-40gb-mig-vgpu-7x1-5c, 21 host
operations), for an apply that changes the vGPU scheduler policy of an A10 (3 vGPUs removed, the policy set, 4
created) and for ``attach --mig`` (GPU instance, compute instance, SR-IOV VFs, vGPU), every host operation is
killed before and after it takes effect (``sim fault --kill``); then ``reconcile --yes`` runs and the test checks:

* the GPU holds exactly the old or the new layout (MIG mode, GPU instances, vGPUs, VF count, scheduler policy);
* every GPU instance has its compute instance;
* the inventory agrees with the host (one row per host object and no more), and ``status`` says in sync only
  when that is true - also right after the kill, before reconcile;
* the next apply / attach succeeds.

The operations are counted by a run with counting faults (a fault that never fires counts the operations it
skips), and the counts are checked against the expected sequence, so a change in what apply or attach does to
the host shows up here instead of silently shrinking the coverage.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import GPUVIRT

pytestmark = pytest.mark.crash

OLD, NEW = "a100-40gb-balanced", "a100-40gb-mig-vgpu-7x1-5c"
APPLY_OPS = {"nvml.DestroyComputeInstance": 2, "nvml.DestroyGpuInstance": 2, "nvml.CreateGpuInstance": 5,
             "nvml.CreateComputeInstance": 5, "mdev.create": 7}
ATTACH_OPS = {"sriov.enable": 1, "nvml.CreateGpuInstance": 1, "nvml.CreateComputeInstance": 1, "mdev.create": 1}
NEVER = 10 ** 6


def _fast_base() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _cli(*args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from gpuvirt.cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _proc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([GPUVIRT, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _sig(root: Path) -> dict:
    """What the simulated host holds (its state document is the truth behind sysfs and NVML)."""
    from gpuvirt.sim.state import SimHost

    st = SimHost(root).load()
    dev = st["devices"][0]
    return {"mig": (dev["mig"]["current"], dev["mig"]["pending"]),
            "gis": sorted((g["profile_id"], g["start"], g["size"]) for g in dev["mig"]["gpu_instances"]),
            "ci_per_gi": sorted(len(g["compute_instances"]) for g in dev["mig"]["gpu_instances"]),
            "vgpus": sorted(m["type"] for m in st["mdevs"]),
            "vfs": dev["sriov"]["numvfs"] if dev.get("sriov") else None}


def _status(root: Path) -> dict:
    code, out, err = _cli("--sim", root, "status", "--json")
    assert code == 0, err
    return json.loads(out)


def _agrees(root: Path, st: dict) -> bool:
    """Does the inventory (as status shows it) agree with the host, one row per object?"""
    from gpuvirt.sim.state import SimHost

    host = SimHost(root).load()
    dev = host["devices"][0]
    rows = st["gpus"][0]["instances"]
    mig_rows = sorted((r["profile_id"], r["placement"]["start"]) for r in rows if r["kind"] == "mig")
    mig_host = sorted((g["profile_id"], g["start"]) for g in dev["mig"]["gpu_instances"] if g["compute_instances"])
    mdev_rows = sorted(r["uuid"] for r in rows if r["kind"] == "mdev")
    mdev_host = sorted(m["uuid"] for m in host["mdevs"])
    half = any(not g["compute_instances"] for g in dev["mig"]["gpu_instances"])
    return (mig_rows == mig_host and mdev_rows == mdev_host and not half
            and all(r["on_host"] and r["state"] == "active" for r in rows))


def _count_ops(root: Path, *cmd: str) -> dict[str, int]:
    from gpuvirt.sim.control import FAULT_OPS, add_fault, clear_faults, open_sim

    sim = open_sim(root)
    for op in FAULT_OPS:
        add_fault(sim, op, skip=NEVER)
    r = _proc("--sim", root, *cmd)
    assert r.returncode == 0, r.stderr
    counts = {f["op"]: NEVER - f["skip"] for f in sim.load()["faults"] if f["skip"] != NEVER}
    clear_faults(sim)
    return counts


class Template:
    """A simulated host prepared once per test module; every trial works on a fresh copy of it."""

    def __init__(self, tmp: Path, name: str, gpus: list[str], **init: object) -> None:
        from gpuvirt.sim.control import init_sim

        self.tmp = tmp
        self.root = tmp / name
        init_sim(self.root, gpus, seed="crash", **init)

    def copy(self, name: str) -> Path:
        dst = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp))
        shutil.rmtree(dst)
        shutil.copytree(self.root, dst, symlinks=True)
        return dst


@pytest.fixture(scope="module")
def module_tmp():
    d = Path(tempfile.mkdtemp(prefix="gpuvirt-crash-", dir=_fast_base()))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- re-partition apply --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def apply_case(module_tmp):
    t = Template(module_tmp, "apply-template", ["a100-40gb"])
    assert _cli("--sim", t.root, "apply", OLD, "--gpu", "0", "--yes")[0] == 0
    assert _cli("--sim", t.root, "profile", "show", NEW)[0] == 0
    old = _sig(t.root)
    probe = t.copy("probe")
    counts = _count_ops(probe, "apply", NEW, "--gpu", "0", "--yes")
    new = _sig(probe)
    assert old != new and all(n == 1 for n in new["ci_per_gi"])
    return t, old, new, counts


def test_apply_touches_the_host_as_expected(apply_case):
    _, _, _, counts = apply_case
    assert counts == APPLY_OPS


def _check_after(root: Path, old: dict, new: dict) -> dict:
    sig = _check_sane(root)
    assert sig in (old, new), f"neither the old nor the new layout: {sig}"
    return sig


def _check_sane(root: Path) -> dict:
    st = _status(root)
    sig = _sig(root)
    assert all(n == 1 for n in sig["ci_per_gi"]), "a GPU instance without its compute instance"
    assert st["in_sync"], st
    assert _agrees(root, st), st
    return sig


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("op", sorted(APPLY_OPS))
def test_apply_killed_at_every_host_operation(apply_case, op, when):
    from gpuvirt.sim.control import add_fault, open_sim

    t, old, new, counts = apply_case
    for k in range(counts.get(op, 0)):
        root = t.copy(f"apply-{op}-{k}-{when}")
        add_fault(open_sim(root), op, skip=k, kill=when)
        r = _proc("--sim", root, "apply", NEW, "--gpu", "0", "--yes")
        assert r.returncode == -signal.SIGKILL, (op, k, when, r.stderr)
        st = _status(root)
        if st["in_sync"]:       # status may only say so when it is true
            assert _sig(root) in (old, new) and _agrees(root, st), (op, k, when, st)
        code, out, err = _cli("--sim", root, "reconcile", "--yes", "--json")
        assert code == 0, (op, k, when, out, err)
        _check_after(root, old, new)
        # the interrupted apply simply runs again, and ends in the new layout
        code, _, err = _cli("--sim", root, "apply", NEW, "--gpu", "0", "--yes")
        assert code == 0, (op, k, when, err)
        assert _check_after(root, old, new) == new
        code, _, err = _cli("--sim", root, "attach", "vm-next", "--mig", "1g.5gb", "--format", "json")
        assert code == 0, (op, k, when, err)
        shutil.rmtree(root, ignore_errors=True)


# --- an apply that changes the vGPU scheduler policy (time-sliced vGPUs on an A10) -----------------------------------
SCHED_OLD = ("a10-3x8q", "--vgpu", "A10-8Q=3", "--model", "a10")
SCHED_NEW = ("a10-4x6q-eq", "--vgpu", "A10-6Q=4", "--vgpu-scheduler", "equal-share", "--timeslice-us", "3000",
             "--model", "a10")
SCHED_OPS = {"mdev.remove": 3, "nvml.SetVgpuSchedulerState": 1, "mdev.create": 4}


def _sig_vgpu(root: Path) -> dict:
    """vGPUs, VF count and the scheduler policy in effect, from the simulator's state."""
    from gpuvirt.sim.nvml_scheduler import scheduler_state
    from gpuvirt.sim.state import SimHost

    st = SimHost(root).load()
    dev = st["devices"][0]
    cur = scheduler_state(st, dev)
    return {"vgpus": sorted(m["type"] for m in st["mdevs"]), "vfs": dev["sriov"]["numvfs"],
            "scheduler": (cur["policy"], cur["timeslice_ns"])}


def _check_sane_vgpu(root: Path) -> dict:
    from gpuvirt.sim.state import SimHost

    st = _status(root)
    assert st["in_sync"], st
    rows = st["gpus"][0]["instances"]
    host = sorted(m["uuid"] for m in SimHost(root).load()["mdevs"])
    assert sorted(r["uuid"] for r in rows) == host, st
    assert all(r["on_host"] and r["state"] == "active" for r in rows), st
    sched = st["gpus"][0]["vgpu_scheduler"]
    assert sched["in_sync"], sched
    return _sig_vgpu(root)


@pytest.fixture(scope="module")
def sched_case(module_tmp):
    t = Template(module_tmp, "sched-template", ["a10"])
    for spec in (SCHED_OLD, SCHED_NEW):
        assert _cli("--sim", t.root, "create-profile", *spec)[0] == 0
    assert _cli("--sim", t.root, "apply", SCHED_OLD[0], "--gpu", "0", "--yes")[0] == 0
    old = _sig_vgpu(t.root)
    probe = t.copy("probe")
    counts = _count_ops(probe, "apply", SCHED_NEW[0], "--gpu", "0", "--yes")
    new = _sig_vgpu(probe)
    assert old["scheduler"] == (1, 0) and new["scheduler"] == (2, 3_000_000)
    assert old["vgpus"] == ["nvidia-595"] * 3 and new["vgpus"] == ["nvidia-594"] * 4
    return t, old, new, counts


def test_scheduler_apply_touches_the_host_as_expected(sched_case):
    assert sched_case[3] == SCHED_OPS


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("op", sorted(SCHED_OPS))
def test_scheduler_apply_killed_at_every_host_operation(sched_case, op, when):
    """The policy is part of the layout: after reconcile the GPU runs the old policy with the old vGPUs or the new
    policy with the new ones, never a mix, and status says in sync only then."""
    from gpuvirt.sim.control import add_fault, open_sim

    t, old, new, counts = sched_case
    for k in range(counts.get(op, 0)):
        root = t.copy(f"sched-{op}-{k}-{when}")
        add_fault(open_sim(root), op, skip=k, kill=when)
        r = _proc("--sim", root, "apply", SCHED_NEW[0], "--gpu", "0", "--yes")
        assert r.returncode == -signal.SIGKILL, (op, k, when, r.stderr)
        st = _status(root)
        if st["in_sync"]:
            assert _sig_vgpu(root) in (old, new), (op, k, when, st)
        code, out, err = _cli("--sim", root, "reconcile", "--yes", "--json")
        assert code == 0, (op, k, when, out, err)
        assert _check_sane_vgpu(root) in (old, new), (op, k, when)
        code, _, err = _cli("--sim", root, "apply", SCHED_NEW[0], "--gpu", "0", "--yes")
        assert code == 0, (op, k, when, err)
        assert _check_sane_vgpu(root) == new, (op, k, when)
        code, _, err = _cli("--sim", root, "attach", "vm-next", "--vgpu", "A10-6Q", "--format", "json")
        assert code == 0, (op, k, when, err)
        shutil.rmtree(root, ignore_errors=True)


# --- attach --mig ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attach_case(module_tmp):
    t = Template(module_tmp, "attach-template", ["a100-40gb"], mig_enabled=True, enable_vfs=False)
    old = _sig(t.root)
    probe = t.copy("probe")
    counts = _count_ops(probe, "attach", "vmX", "--mig", "1g.5gb", "--format", "json")
    new = _sig(probe)
    assert old != new
    return t, old, new, counts


def test_attach_touches_the_host_as_expected(attach_case):
    assert attach_case[3] == ATTACH_OPS


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("op", sorted(ATTACH_OPS))
def test_attach_killed_at_every_host_operation(attach_case, op, when):
    from gpuvirt.sim.control import add_fault, open_sim

    t, old, new, counts = attach_case
    for k in range(counts.get(op, 0)):
        root = t.copy(f"attach-{op}-{k}-{when}")
        add_fault(open_sim(root), op, skip=k, kill=when)
        r = _proc("--sim", root, "attach", "vmX", "--mig", "1g.5gb", "--format", "json")
        assert r.returncode == -signal.SIGKILL, (op, k, when, r.stderr)
        st = _status(root)
        if st["in_sync"]:
            assert _sig(root) in (old, new) and _agrees(root, st), (op, k, when, st)
        code, out, err = _cli("--sim", root, "reconcile", "--yes", "--json")
        assert code == 0, (op, k, when, out, err)
        sig = _check_after(root, old, new)
        allocs = _allocations(root)
        # the killed attach never answered its caller: it is undone, or (killed after its last step) complete
        assert allocs == ([] if sig == old else ["vmX", "vmX"]), (op, k, when, allocs)
        # capacity is intact: two more VMs get their instances, and vmX can simply be attached again
        for vm in ("vmY", "vmX"):
            code, _, err = _cli("--sim", root, "attach", vm, "--mig", "1g.5gb", "--format", "json")
            assert code == 0, (op, k, when, vm, err)
        assert len(_check_sane(root)["gis"]) == (3 if sig == new else 2)
        shutil.rmtree(root, ignore_errors=True)


def _allocations(root: Path) -> list[str]:
    code, out, err = _cli("--sim", root, "allocations", "--json")
    assert code == 0, err
    return sorted(a["vm"] for a in json.loads(out))


# --- SIGKILL at a random instant ----------------------------------------------------------------------------------------
RANDOM_TRIALS = 30


def test_random_time_kills_of_an_apply(apply_case):
    t, old, new, _ = apply_case
    # how long an undisturbed apply takes here, to spread the kills over it
    probe = t.copy("timing")
    t0 = time.monotonic()
    assert _proc("--sim", probe, "apply", NEW, "--gpu", "0", "--yes").returncode == 0
    span = time.monotonic() - t0
    rng = random.Random(20261206)
    killed_mid_way = 0
    for trial in range(RANDOM_TRIALS):
        root = t.copy(f"random-{trial}")
        p = subprocess.Popen([GPUVIRT, "--sim", str(root), "apply", NEW, "--gpu", "0", "--yes"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.0) * span)
        p.send_signal(signal.SIGKILL)
        rc = p.wait()
        st = _status(root)
        if rc == -signal.SIGKILL:
            killed_mid_way += 1
            if st["in_sync"]:
                assert _sig(root) in (old, new) and _agrees(root, st), (trial, st)
        code, out, err = _cli("--sim", root, "reconcile", "--yes", "--json")
        assert code == 0, (trial, str(root), json.dumps(json.loads(out)["findings"]), err)
        _check_after(root, old, new)
        code, _, err = _cli("--sim", root, "apply", NEW, "--gpu", "0", "--yes")
        assert code == 0, (trial, err)
        assert _check_after(root, old, new) == new
        shutil.rmtree(root, ignore_errors=True)
    assert killed_mid_way >= RANDOM_TRIALS // 2, killed_mid_way
