"""gpuvirt's discovery against mdevctl 1.2.0 on the same sysfs tree.

mdevctl 1.2.0 has no root prefix, so it runs in a private mount namespace with the simulated tree bound over
``/sys`` and ``/etc/mdevctl.d``, exactly as ../shared/reference/running-mdevctl.md (section 2) describes.
That needs root, ``unshare`` and ``mdevctl``; each test is skipped with the reason when one is missing.

Comparison rules (formats.md section 3.3): mdevctl prints a type's ``description`` with its line breaks
replaced by ", " (GVT-g descriptions are multi-line), and leaves ``name``/``description`` out when the file
is absent.  gpuvirt keeps the text as the file has it (without the final newline) and reports an absent
file as ``null``.  The comparison normalises gpuvirt's side the way mdevctl does: newlines -> ", ", null ->
key absent.  Nothing else is normalised.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pynvml
import pytest

from gpuvirt.sim.kernel import SimKernel

from conftest import reference

pytestmark = pytest.mark.root

NS_SCRIPT = 'mount --bind "$ROOT/sys" /sys && mount --bind "$ROOT/etc/mdevctl.d" /etc/mdevctl.d && mdevctl {args}'
A2_PF, T4_PF, IGPU = "0000:41:00.0", "0000:42:00.0", "0000:00:02.0"


def vf(i: int, bus: int = 0x41) -> str:
    devfn = 4 + i
    return f"0000:{bus:02x}:{devfn // 8:02x}.{devfn % 8}"


@pytest.fixture(scope="session")
def mdevctl_ns(tmp_path_factory) -> None:
    """Skip unless mdevctl can be run in a private mount namespace here (tried once per session)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mdevctl 1.2.0 only reads /sys, so the tree is bind-mounted in a mount namespace")
    for tool in ("mdevctl", "unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not Path("/etc/mdevctl.d").is_dir():
        pytest.skip("/etc/mdevctl.d does not exist (mdevctl package not installed?)")
    probe = tmp_path_factory.mktemp("nsprobe")
    (probe / "sys").mkdir()
    (probe / "etc/mdevctl.d/scripts.d/callouts").mkdir(parents=True)
    (probe / "etc/mdevctl.d/scripts.d/notifiers").mkdir(parents=True)
    try:
        p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            NS_SCRIPT.format(args="--version")], env=dict(os.environ, ROOT=str(probe)),
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run unshare: {exc}")
    if p.returncode != 0:
        pytest.skip(f"cannot create a mount namespace with the tree bound over /sys: {p.stderr.strip()[:200]}")
    if "1.2.0" not in p.stdout:
        pytest.skip(f"these comparisons were written for mdevctl 1.2.0, found {p.stdout.strip()!r}")


def mdevctl(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           NS_SCRIPT.format(args=" ".join(args))], env=dict(os.environ, ROOT=str(root)),
                          capture_output=True, text=True, timeout=60)


def mdevctl_json(root: Path, *args: str) -> Any:
    p = mdevctl(root, *args)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout) if p.stdout.strip() else []


@pytest.fixture(autouse=True)
def _reset_pynvml() -> Iterator[None]:
    yield
    pynvml.nvmlLib = None
    pynvml._nvmlGetFunctionPointer_cache.clear()


# --- the two views, in one shape ----------------------------------------------------------------------------------
def types_from_mdevctl(doc: list) -> dict[str, dict[str, dict[str, Any]]]:
    """``[{parent: [{type: {...}}, ...]}]`` -> {parent: {type: {...}}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for entry in doc:
        for parent, types in entry.items():
            bucket = out.setdefault(parent, {})
            for t in types:
                for type_id, attrs in t.items():
                    bucket[type_id] = attrs
    return out


def types_from_gpuvirt(doc: dict) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for p in doc["mdev_parents"]:
        bucket = out.setdefault(p["address"], {})
        for t in p["types"]:
            attrs: dict[str, Any] = {"available_instances": t["available_instances"], "device_api": t["device_api"]}
            if t["name"] is not None:
                attrs["name"] = t["name"]
            if t["description"] is not None:
                attrs["description"] = ", ".join(t["description"].split("\n"))   # mdevctl's rendering
            bucket[t["id"]] = attrs
    return out


def devices_from_mdevctl(doc: list) -> set[tuple[str, str, str]]:
    out = set()
    for entry in doc:
        for parent, devs in entry.items():
            for d in devs:
                for uuid, cfg in d.items():
                    out.add((uuid, parent, cfg["mdev_type"]))
    return out


def devices_from_gpuvirt(doc: dict) -> set[tuple[str, str, str]]:
    listed = {(d["uuid"], p["address"], d["type"]) for p in doc["mdev_parents"] for d in p["devices"]}
    flat = {(d["uuid"], d["parent"], d["type"]) for d in doc["mdev_devices"]}
    assert listed == flat
    return flat


def gpuvirt_discover(cli, *opts: str) -> dict:
    res = cli(*opts, "discover", "--json")
    assert res.exit_code == 0, res
    return res.json()


@pytest.fixture
def mixed_host(make_sim):
    """a2 (mdev on VFs) + t4 (mdev on the PF) + GVT-g + mtty, with a few devices so the counts differ."""
    sim = make_sim(["a2", "t4", "gvt-g", "mtty"])
    k = SimKernel(sim)

    def create(parent: str, type_id: str, n: int) -> str:
        uid = f"5e0c1d2a-0000-4000-8000-{n:012x}"
        k.write(sim.root / "sys/class/mdev_bus" / parent / "mdev_supported_types" / type_id / "create", uid + "\n")
        return uid

    create(vf(0), "nvidia-746", 1)            # A2-4Q: only the 4096M types stay available on the other VFs
    create(vf(1), "nvidia-751", 2)
    create(T4_PF, "nvidia-232", 3)            # T4-4Q: 3 more of it, every other T4 type 0
    create(IGPU, "i915-GVTg_V5_4", 4)
    create("mtty", "mtty-2", 5)
    create("mtty", "mtty-1", 6)
    return sim


# --- tests --------------------------------------------------------------------------------------------------------
def test_types_match_mdevctl(mdevctl_ns, mixed_host, cli) -> None:
    sim = mixed_host
    theirs = types_from_mdevctl(mdevctl_json(sim.root, "types", "--dumpjson"))
    ours = types_from_gpuvirt(gpuvirt_discover(cli, "--sim", str(sim.root)))
    assert sorted(ours) == sorted(theirs)
    assert sorted(theirs) == sorted([IGPU, T4_PF, "mtty"] + [vf(i) for i in range(16)])
    for parent in theirs:
        assert ours[parent] == theirs[parent], parent
    # the counts really differ between parents and types (the comparison is not of a uniform tree)
    assert theirs["mtty"]["mtty-1"]["available_instances"] == 21
    assert theirs[T4_PF]["nvidia-232"]["available_instances"] == 3
    assert theirs[vf(0)]["nvidia-746"]["available_instances"] == 0
    assert theirs[vf(2)]["nvidia-754"]["available_instances"] == 1
    assert theirs[IGPU]["i915-GVTg_V5_8"]["available_instances"] == 5
    assert "\n" not in theirs[IGPU]["i915-GVTg_V5_4"]["description"]
    assert "name" in theirs["mtty"]["mtty-1"] and "description" not in theirs["mtty"]["mtty-1"]


def test_same_tree_through_root(mdevctl_ns, mixed_host, gpuvirt_proc) -> None:
    """The console script with ``--root`` (no simulator at all) agrees with mdevctl too."""
    res = gpuvirt_proc("--root", mixed_host.root, "discover", "--json")
    assert res.exit_code == 0, res
    theirs = types_from_mdevctl(mdevctl_json(mixed_host.root, "types", "--dumpjson"))
    assert types_from_gpuvirt(res.json()) == theirs


def test_active_devices_match_mdevctl_list(mdevctl_ns, mixed_host, cli) -> None:
    sim = mixed_host
    theirs = devices_from_mdevctl(mdevctl_json(sim.root, "list", "--dumpjson"))
    ours = devices_from_gpuvirt(gpuvirt_discover(cli, "--sim", str(sim.root)))
    assert ours == theirs
    assert len(theirs) == 6
    # after a removal through gpuvirt's host layer both see the same, smaller set
    from gpuvirt.host.machine import Host

    Host(sim.root, kernel=SimKernel(sim), use_udev=False).remove_mdev("5e0c1d2a-0000-4000-8000-000000000005")
    theirs = devices_from_mdevctl(mdevctl_json(sim.root, "list", "--dumpjson"))
    assert devices_from_gpuvirt(gpuvirt_discover(cli, "--sim", str(sim.root))) == theirs
    assert len(theirs) == 5
    assert types_from_gpuvirt(gpuvirt_discover(cli, "--sim", str(sim.root))) == \
        types_from_mdevctl(mdevctl_json(sim.root, "types", "--dumpjson"))


def test_non_numeric_available_instances_fails_mdevctl_not_gpuvirt(mdevctl_ns, mixed_host, cli) -> None:
    sim = mixed_host
    before = types_from_mdevctl(mdevctl_json(sim.root, "types", "--dumpjson"))
    broken = sim.root / "sys/class/mdev_bus" / T4_PF / "mdev_supported_types/nvidia-230/available_instances"
    broken.write_text("lots\n")
    p = mdevctl(sim.root, "types", "--dumpjson")
    assert p.returncode != 0 and "invalid digit" in p.stderr
    doc = gpuvirt_discover(cli, "--sim", str(sim.root))
    assert doc["warnings"] == [{"path": f"/sys/class/mdev_bus/{T4_PF}/mdev_supported_types/nvidia-230/"
                                        "available_instances",
                                "message": "available_instances is not a number: 'lots'"}]
    del before[T4_PF]["nvidia-230"]
    assert types_from_gpuvirt(doc) == before                 # everything else exactly as mdevctl saw it


def test_parent_without_types_fails_mdevctl_not_gpuvirt(mdevctl_ns, mixed_host, cli) -> None:
    sim = mixed_host
    before = types_from_mdevctl(mdevctl_json(sim.root, "types", "--dumpjson"))
    shutil.rmtree(sim.root / "sys/class/mdev_bus" / vf(5) / "mdev_supported_types")
    p = mdevctl(sim.root, "types", "--dumpjson")
    assert p.returncode != 0 and "No such file or directory" in p.stderr
    doc = gpuvirt_discover(cli, "--sim", str(sim.root))
    assert [w["path"] for w in doc["warnings"]] == [f"/sys/class/mdev_bus/{vf(5)}/mdev_supported_types"]
    before[vf(5)] = {}
    assert types_from_gpuvirt(doc) == before


def test_captured_a2_fixture_matches_mdevctl(mdevctl_ns, tmp_path: Path, cli) -> None:
    """The verbatim A2 VF fixture (a real driver's output) reads the same through both tools."""
    src = reference("vgpu-sysfs-samples", "harvester-pcidevices")
    root = tmp_path / "fixture"
    shutil.copytree(src, root, symlinks=True)
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o755)
    for sub in ("callouts", "notifiers"):
        (root / "etc/mdevctl.d/scripts.d" / sub).mkdir(parents=True)
    theirs = types_from_mdevctl(mdevctl_json(root, "types", "--dumpjson"))
    doc = gpuvirt_discover(cli, "--root", str(root))
    assert list(theirs) == ["0000:08:01.7"] and len(theirs["0000:08:01.7"]) == 15
    assert types_from_gpuvirt(doc) == theirs
