"""gpuvirt and the real mdevctl 1.2.0, both directions, on a simulated host (issue 4).

mdevctl 1.2.0 has no root prefix (``MDEVCTL_ENV_ROOT`` arrived in 1.3.0), so it runs in a private mount
namespace with the simulated host's ``sys`` and ``etc/mdevctl.d`` bound over ``/sys`` and ``/etc/mdevctl.d``
(running-mdevctl.md section 2).  That needs root and ``unshare``; without them the tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.root

NS = 'mount --bind "$G_ROOT/sys" /sys && mount --bind "$G_ROOT/etc/mdevctl.d" /etc/mdevctl.d && exec mdevctl "$@"'


def mdevctl(root, *args):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "G_ROOT": str(root)}
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", NS, "sh", *args],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def sim_for_mdevctl(make_sim):
    if os.geteuid() != 0:
        pytest.skip("running mdevctl 1.2.0 against a simulated tree needs root (private mount namespace)")
    for tool in ("unshare", "mdevctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    sim = make_sim(["a2", "mtty"])
    probe = mdevctl(sim.root, "--version")
    if probe.returncode != 0:
        pytest.skip(f"cannot run mdevctl in a mount namespace here: {probe.stderr.strip()[:200]}")
    if "1.2.0" not in probe.stdout:
        pytest.skip(f"these checks pin mdevctl 1.2.0, found {probe.stdout.strip()!r}")
    return sim


def ok(res):
    assert res.exit_code == 0, res
    return res


def defined(root):
    """{uuid: (parent, type, start)} from ``mdevctl list --defined --dumpjson``."""
    res = mdevctl(root, "list", "--defined", "--dumpjson")
    assert res.returncode == 0, res.stderr
    out = {}
    for per_parent in json.loads(res.stdout or "[]"):
        for parent, devices in per_parent.items():
            for dev in devices:
                for uuid, cfg in dev.items():
                    out[uuid] = (parent, cfg["mdev_type"], cfg["start"])
    return out


def status_rows(cli, root):
    return {i["uuid"]: i for g in ok(cli("--sim", root, "status", "--json")).json()["gpus"] for i in g["instances"]}


def test_mdevctl_lists_what_gpuvirt_exported(cli, sim_for_mdevctl):
    sim = sim_for_mdevctl
    root = sim.root
    ok(cli("--sim", root, "create-profile", "q", "--vgpu", "A2-4Q=3", "--model", "a2"))
    ok(cli("--sim", root, "apply", "q", "--gpu", "a2", "--yes"))
    ok(cli("--sim", root, "attach", "serial-vm", "--mdev", "mtty-2"))  # a virtual parent: not exported
    transient = ok(cli("--sim", root, "attach", "t-vm", "--mdev", "mtty-1", "--transient", "--format",
                       "json")).json()
    res = ok(cli("--sim", root, "mdevctl", "export", "--json")).json()
    assert len(res["written"]) == 3 and res["removed"] == []
    assert [s["parent"] for s in res["skipped"]] == ["mtty"]  # reported, and it did not stop the export
    want = {u: (r["parent"], r["type_id"], "auto") for u, r in status_rows(cli, root).items()
            if r["parent"].startswith("0000:")}
    assert len(want) == 3
    assert defined(root) == want  # same UUID, parent and type, as mdevctl itself reads them
    assert transient["uuid"] not in defined(root)
    # active devices: mdevctl sees the simulated sysfs and marks them defined
    active = mdevctl(root, "list")
    assert active.returncode == 0
    for u in want:
        assert f"{u} {want[u][0]} {want[u][1]} auto (defined)" in active.stdout
    again = ok(cli("--sim", root, "mdevctl", "export", "--json")).json()
    assert again["written"] == [] and sorted(again["unchanged"]) == sorted(want)


def test_export_removes_only_its_own_stale_definitions(cli, sim_for_mdevctl):
    sim = sim_for_mdevctl
    root = sim.root
    ok(cli("--sim", root, "create-profile", "two-q", "--vgpu", "A2-2Q=2", "--model", "a2"))
    ok(cli("--sim", root, "create-profile", "four-q", "--vgpu", "A2-4Q=2", "--model", "a2"))
    ok(cli("--sim", root, "apply", "two-q", "--gpu", "a2", "--yes"))
    old = {d["uuid"] for d in ok(cli("--sim", root, "mdevctl", "export", "--json")).json()["written"]}
    assert set(defined(root)) == old and len(old) == 2
    theirs = "11111111-2222-3333-4444-555555555555"
    r = mdevctl(root, "define", "-u", theirs, "-p", "0000:41:00.7", "-t", "nvidia-745")
    assert r.returncode == 0, r.stderr
    # a new layout destroys the A2-2Q vGPUs; left defined with start=auto they would come back at boot
    # (mdevctl / libvirt autostart) and occupy the board the A2-4Q layout needs
    ok(cli("--sim", root, "apply", "four-q", "--gpu", "a2", "--yes"))
    res = ok(cli("--sim", root, "mdevctl", "export", "--json")).json()
    assert {d["uuid"] for d in res["removed"]} == old and len(res["written"]) == 2
    left = defined(root)
    new = {d["uuid"] for d in res["written"]}
    assert set(left) == new | {theirs}  # gpuvirt never deletes a definition it did not write
    assert {left[u][1] for u in new} == {"nvidia-746"}


def test_definitions_written_by_mdevctl_are_imported_and_restored(cli, sim_for_mdevctl):
    sim = sim_for_mdevctl
    root = sim.root
    auto_uuid = "6c0f1f1e-3b7a-4e43-9d5c-2f1a8e7d0b11"
    manual_uuid = "9a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"
    for args in (["-u", auto_uuid, "-p", "0000:41:00.6", "-t", "nvidia-745", "--auto"],
                 ["-u", manual_uuid, "-p", "0000:41:00.5", "-t", "nvidia-745"]):
        r = mdevctl(root, "define", *args)
        assert r.returncode == 0, r.stderr
    res = ok(cli("--sim", root, "mdevctl", "import", "--json")).json()
    assert [(d["uuid"], d["parent"], d["type"], d["start"]) for d in res["adopted"]] == \
        [(auto_uuid, "0000:41:00.6", "nvidia-745", "auto")]
    # a manual definition that is not running is reported, not adopted (reconcile would only forget it)
    assert [w for w in res["warnings"] if manual_uuid in w["path"] and "manual" in w["message"]]
    row = status_rows(cli, root)[auto_uuid]
    assert row["origin"] == "adopted" and row["persistent"] and row["type_name"] == "A2-2Q"
    assert row["on_host"] is False  # defined, not started
    ok(cli("--sim", root, "reconcile", "--yes"))
    assert status_rows(cli, root)[auto_uuid]["on_host"] is True
    assert any(m["uuid"] == auto_uuid and m["parent"] == "0000:41:00.6" for m in sim.load()["mdevs"])
    again = ok(cli("--sim", root, "mdevctl", "import", "--json")).json()
    assert again["adopted"] == [] and again["already_known"] == [auto_uuid]
    # and it survives a reboot like any persistent instance
    ok(cli("sim", "reboot", root))
    ok(cli("--sim", root, "reconcile", "--yes"))
    assert any(m["uuid"] == auto_uuid for m in sim.load()["mdevs"])
    # adopted: gpuvirt's export now covers it too, unchanged
    exp = ok(cli("--sim", root, "mdevctl", "export", "--json")).json()
    assert exp["unchanged"] == [auto_uuid] and exp["written"] == []
