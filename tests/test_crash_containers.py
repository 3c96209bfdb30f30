"""Crash safety of container hand-offs: ``attach NAME --mig P --format cdi`` and ``detach NAME`` killed before and
after every host operation - the NVML calls (``sim fault --kill``) and the CDI spec file's write or removal (the
process kills itself right before or right after ``os.replace`` / ``unlink``) - then ``reconcile --yes``; the
allocation and its spec are both there or both gone, no stale spec is left, status and ``cdi check`` are honest,
and the next attach works.  Same style as tests/test_crash.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_crash import NEVER, Template, _cli, _fast_base, _proc

pytestmark = pytest.mark.crash

ATTACH = ("attach", "c1", "--mig", "1g.5gb", "--format", "cdi")
CREATE_OPS = {"nvml.CreateGpuInstance": 1, "nvml.CreateComputeInstance": 1}
DESTROY_OPS = {"nvml.DestroyComputeInstance": 1, "nvml.DestroyGpuInstance": 1}

# run gpuvirt with the spec folder's write or removal killing the process at that instant
_KILLER = r"""
import os, signal, sys
import gpuvirt.host.devnodes as d
what, when = sys.argv[1], sys.argv[2]
orig = getattr(d, what)
def wrapped(*a, **kw):
    if when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    orig(*a, **kw)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(d, what, wrapped)
sys.argv = ["gpuvirt"] + sys.argv[3:]
from gpuvirt.cli import main
main()
"""


def _proc_killed_at_spec(what: str, when: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILLER, what, when, *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def _spec_files(root: Path) -> list[str]:
    d = root / "var/run/cdi"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _check(root: Path) -> tuple[list[str], list[str]]:
    """After reconcile: allocation and spec together, the spec true, nothing stale; (allocations, spec files)."""
    code, out, err = _cli("--sim", root, "allocations", "--json")
    assert code == 0, err
    allocs = sorted(a["vm"] for a in json.loads(out))
    files = _spec_files(root)
    code, out, err = _cli("--sim", root, "cdi", "check", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["in_sync"], doc
    assert len(files) == len(allocs), (allocs, files)     # both or neither, and no stale file
    code, out, err = _cli("--sim", root, "status", "--json")
    st = json.loads(out)
    assert st["in_sync"], st
    from gpuvirt.sim.state import SimHost

    dev = SimHost(root).load()["devices"][0]
    assert all(g["compute_instances"] for g in dev["mig"]["gpu_instances"]), "a GPU instance without its CI"
    if files:
        uuids = {ci["uuid"] for g in dev["mig"]["gpu_instances"] for ci in g["compute_instances"]}
        assert files[0][len("gpuvirt_mig_"):-len(".yaml")] in uuids
    return allocs, files


def _after_kill(root: Path, label: object) -> tuple[list[str], list[str]]:
    code, out, err = _cli("--sim", root, "status", "--json")
    st = json.loads(out)
    if st["in_sync"]:
        # status may say so only when the allocation and its spec agree
        assert bool(_spec_files(root)) == bool(st["gpus"][0]["instances"] and any(
            i.get("allocation") for i in st["gpus"][0]["instances"])), (label, st)
    code, out, err = _cli("--sim", root, "reconcile", "--yes", "--json")
    assert code == 0, (label, out, err)
    return _check(root)


@pytest.fixture(scope="module")
def module_tmp():
    d = Path(tempfile.mkdtemp(prefix="gpuvirt-crash-ct-", dir=_fast_base()))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh(module_tmp):
    """A MIG-enabled A100 without instances: the attach creates its GPU and compute instance."""
    return Template(module_tmp, "fresh", ["a100-40gb"], mig_enabled=True, enable_vfs=False)


@pytest.fixture(scope="module")
def attached(module_tmp):
    """The same host after a transient attach: detach releases and destroys the instance."""
    t = Template(module_tmp, "attached", ["a100-40gb"], mig_enabled=True, enable_vfs=False)
    code, _, err = _cli("--sim", t.root, *ATTACH, "--transient")
    assert code == 0, err
    return t


def test_container_attach_and_detach_touch_the_host_as_expected(fresh, attached):
    from gpuvirt.sim.control import FAULT_OPS, add_fault, clear_faults, open_sim

    for t, cmd, expect in ((fresh, ATTACH, CREATE_OPS), (attached, ("detach", "c1"), DESTROY_OPS)):
        root = t.copy("count")
        sim = open_sim(root)
        for op in FAULT_OPS:
            add_fault(sim, op, skip=NEVER)
        r = _proc("--sim", root, *cmd)
        assert r.returncode == 0, r.stderr
        counts = {f["op"]: NEVER - f["skip"] for f in sim.load()["faults"] if f["skip"] != NEVER}
        clear_faults(sim)
        assert counts == expect, cmd


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("op", sorted(CREATE_OPS) + ["write_spec"])
def test_container_attach_killed_at_every_host_operation(fresh, op, when):
    from gpuvirt.sim.control import add_fault, open_sim

    root = fresh.copy(f"attach-{op}-{when}")
    if op == "write_spec":
        r = _proc_killed_at_spec("write_spec", when, "--sim", root, *ATTACH)
    else:
        add_fault(open_sim(root), op, kill=when)
        r = _proc("--sim", root, *ATTACH)
    assert r.returncode == -signal.SIGKILL, (op, when, r.stderr)
    allocs, files = _after_kill(root, (op, when))
    # the killed attach never answered its caller: reconcile rolls it back, spec and allocation together
    assert allocs == [] and files == [], (op, when, allocs, files)
    code, out, err = _cli("--sim", root, *ATTACH)
    assert code == 0, (op, when, err)
    allocs, files = _check(root)
    assert allocs == ["c1"] and files == [f"gpuvirt_mig_{out.strip().split('=')[1]}.yaml"]
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("when", ["before", "after"])
def test_container_attach_of_a_free_instance_killed_at_the_spec(module_tmp, when):
    """The other path: a free instance of a profile is allocated (inventory) and its spec published."""
    t = Template(module_tmp, f"profiled-{when}", ["a100-40gb"], mig_enabled=True, enable_vfs=False)
    assert _cli("--sim", t.root, "create-profile", "ct", "--mig", "1g.5gb=2", "--model", "a100-40gb", "--mode",
                "containers")[0] == 0
    assert _cli("--sim", t.root, "apply", "ct", "--gpu", "0", "--yes")[0] == 0
    r = _proc_killed_at_spec("write_spec", when, "--sim", t.root, *ATTACH)
    assert r.returncode == -signal.SIGKILL, r.stderr
    allocs, files = _after_kill(t.root, when)
    assert allocs == [] and files == []
    assert _cli("--sim", t.root, *ATTACH)[0] == 0
    assert _check(t.root)[0] == ["c1"]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("op", sorted(DESTROY_OPS) + ["remove_spec"])
def test_container_detach_killed_at_every_host_operation(attached, op, when):
    from gpuvirt.sim.control import add_fault, open_sim

    root = attached.copy(f"detach-{op}-{when}")
    assert len(_spec_files(root)) == 1
    if op == "remove_spec":
        r = _proc_killed_at_spec("remove_spec", when, "--sim", root, "detach", "c1")
    else:
        add_fault(open_sim(root), op, kill=when)
        r = _proc("--sim", root, "detach", "c1")
    assert r.returncode == -signal.SIGKILL, (op, when, r.stderr)
    allocs, files = _after_kill(root, (op, when))
    # a detach the operator asked for is finished: no allocation, no spec, no instance left
    assert allocs == [] and files == [], (op, when, allocs, files)
    from gpuvirt.sim.state import SimHost

    assert SimHost(root).load()["devices"][0]["mig"]["gpu_instances"] == []
    assert _cli("--sim", root, *ATTACH)[0] == 0
    shutil.rmtree(root, ignore_errors=True)
