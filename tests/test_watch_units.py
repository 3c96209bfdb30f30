"""Boot restore: the systemd units and ``gpuvirt watch`` (issue 4).

The units are checked for the ordering that replaces the ``sleep 30`` of public deployment notes
(pain-points.md A2) and parsed by ``systemd-analyze verify`` when it is installed.  ``watch`` is fed udev-like
events from a file (its injectable source) after ``gpuvirt sim reboot``: a burst must give exactly one restore
run (pain-points.md A3: retry storms), and devices that are not GPU parents must give none.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

PF = "0000:41:00.0"


def ok(res):
    assert res.exit_code == 0, res
    return res


def unit_lines(path):
    """{key: [values]} of the non-comment lines of a unit file (keys may repeat, like After=)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def mdevs(sim):
    return {m["uuid"]: (m["parent"], m["type"]) for m in sim.load()["mdevs"]}


# --- units ---------------------------------------------------------------------------------------------------------
def test_install_units_orders_boot_restore_without_sleeps(cli, make_sim):
    sim = make_sim(["a2"])
    root = sim.root
    res = ok(cli("--sim", root, "install-units"))
    unit_dir = root / "etc/systemd/system"
    rec, wat = unit_dir / "gpuvirt-reconcile.service", unit_dir / "gpuvirt-watch.service"
    assert f"wrote {rec}" in res.stdout and f"wrote {wat}" in res.stdout
    r = unit_lines(rec)
    after = " ".join(r["After"]).split()
    before = " ".join(r["Before"]).split()
    for svc in ("nvidia-vgpud.service", "nvidia-vgpu-mgr.service", "nvidia-persistenced.service"):
        assert svc in after
    for svc in ("libvirtd.service", "virtqemud.service"):
        assert svc in before
    [exec_start] = r["ExecStart"]
    assert f"--sim {root}" in exec_start and " reconcile --yes --wait " in exec_start
    assert r["Type"] == ["oneshot"] and r["RemainAfterExit"] == ["yes"]
    assert "ExecStartPre" not in r
    for path in (rec, wat):
        assert "sleep" not in path.read_text().lower(), path
    w = unit_lines(wat)
    [watch_exec] = w["ExecStart"]
    assert watch_exec.endswith(" watch") and "gpuvirt-reconcile.service" in " ".join(w["After"])
    # a failed boot restore (late driver) is exactly when the watcher must still run
    assert "Requires" not in w and "gpuvirt-reconcile.service" in w["Wants"]
    again = ok(cli("--sim", root, "install-units"))  # idempotent
    assert again.exit_code == 0 and unit_lines(rec) == r and "already installed" in again.stdout
    rec.write_text("[Unit]\nDescription=someone else's unit\n")
    refused = cli("--sim", root, "install-units")
    assert refused.exit_code == 2 and "not written by gpuvirt" in refused.stderr
    assert "someone else" in rec.read_text()


def test_units_use_the_same_inventory_as_the_hook(cli, make_sim, tmp_path):
    # the boot restore must read the database and host id attach and the hook use, also when those came
    # from options rather than the config file
    sim = make_sim(["a2"])
    root = sim.root
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    ok(cli("--sim", root, "--db", db, "--host-id", "hostA", "install-units"))
    ok(cli("--sim", root, "--db", db, "--host-id", "hostA", "hook", "install"))
    hook_line = next(ln for ln in (root / "etc/libvirt/hooks/qemu.d/50-gpuvirt").read_text().splitlines()
                     if ln.startswith("exec "))
    for unit in ("gpuvirt-reconcile.service", "gpuvirt-watch.service"):
        [exec_start] = unit_lines(root / "etc/systemd/system" / unit)["ExecStart"]
        assert f"--db {db}" in exec_start and "--host-id hostA" in exec_start
        assert exec_start.split(" --host-id hostA ")[0] == hook_line[5:].split(" --host-id hostA ")[0]
    # a password never goes on a command line (ps shows the long-running watcher's to every user): it goes
    # to a root-only EnvironmentFile; a '%' is doubled for systemd's specifier expansion
    pw = "postgresql+psycopg://gv:s3cret%40x@127.0.0.1:5432/test"
    ok(cli("--sim", root, "--db", pw, "install-units", "--force"))
    env = root / "etc/gpuvirt/units.env"
    assert env.stat().st_mode & 0o777 == 0o600 and f'GPUVIRT_DB="{pw}"' in env.read_text()
    for unit in ("gpuvirt-reconcile.service", "gpuvirt-watch.service"):
        text = (root / "etc/systemd/system" / unit).read_text()
        assert "s3cret" not in text and f"EnvironmentFile={env}" in text
    rec = unit_lines(root / "etc/systemd/system/gpuvirt-reconcile.service")
    assert "--db" not in rec["ExecStart"][0]
    ok(cli("--sim", root, "--db", "sqlite:////tmp/odd%name.db", "install-units", "--force"))
    assert "odd%%name.db" in unit_lines(root / "etc/systemd/system/gpuvirt-watch.service")["ExecStart"][0]
    assert not env.exists()                     # no password any more: the file that held one is gone


def test_install_units_refuses_a_missing_simulated_host(cli, gpuvirt_proc, tmp_path):
    # units for a simulator that is not there would fail at every boot: refuse, and create nothing under it
    (tmp_path / "empty").mkdir()
    for sim in (tmp_path / "nothing", tmp_path / "empty"):
        for run in (cli, gpuvirt_proc):
            res = run("--sim", sim, "install-units")
            assert res.exit_code == 3 and "gpuvirt sim init" in res.stderr, res
            assert res.stdout == "" and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res
    assert not (tmp_path / "nothing").exists()
    assert list((tmp_path / "empty").iterdir()) == []


def test_units_pass_systemd_analyze_verify(cli, make_sim):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    sim = make_sim(["a2"])
    ok(cli("--sim", sim.root, "install-units"))
    unit_dir = sim.root / "etc/systemd/system"
    p = subprocess.run([tool, "verify", "--man=no", "./gpuvirt-reconcile.service", "./gpuvirt-watch.service"],
                       cwd=unit_dir, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "gpuvirt-" not in p.stderr, p.stderr  # no warning about our own files


# --- watch -----------------------------------------------------------------------------------------------------------
def _burst(n):
    # what one driver load and VF enable look like: the PF bound to nvidia, added, registered with mdev
    kinds = [{"action": "bind", "subsystem": "pci", "properties": {"DRIVER": "nvidia"}},
             {"action": "add", "subsystem": "pci"},
             {"action": "change", "subsystem": "pci", "properties": {"MDEV_STATE": "registered"}}]
    return [dict(kinds[i % 3], sys_name=PF) for i in range(n)]


def _write_events(path, events):
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_a_burst_of_events_gives_one_restore_run(cli, make_sim, tmp_path):
    sim = make_sim(["a2"])
    root = sim.root
    ok(cli("--sim", root, "create-profile", "q", "--vgpu", "A2-2Q=4", "--model", "a2"))
    ok(cli("--sim", root, "apply", "q", "--gpu", "a2", "--yes"))
    before = mdevs(sim)
    ok(cli("sim", "reboot", root))
    assert mdevs(sim) == {}
    events = _write_events(tmp_path / "events.jsonl", _burst(50))
    res = ok(cli("--sim", root, "watch", "--events", events, "--json"))
    runs = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert len(runs) == 1, runs
    assert runs[0]["parents"] == [PF] and runs[0]["events"] == 50 and runs[0]["failed"] == 0
    assert runs[0]["changed"] >= 1 + len(before)  # the VFs, then every vGPU
    assert mdevs(sim) == before  # same UUIDs on the same VFs
    # two bursts separated by a quiet period are two runs; the second has nothing left to do
    ok(cli("sim", "reboot", root))
    events = _write_events(tmp_path / "two.jsonl", _burst(10) + [{"quiet": True}] + _burst(10))
    res = ok(cli("--sim", root, "watch", "--events", events, "--json"))
    runs = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert [r["events"] for r in runs] == [10, 10] and runs[1]["changed"] == 0
    assert mdevs(sim) == before


def test_events_of_unrelated_devices_trigger_nothing(cli, make_sim, tmp_path):
    sim = make_sim(["a2"])
    root = sim.root
    ok(cli("--sim", root, "attach", "vm1", "--vgpu", "A2-2Q"))
    ok(cli("sim", "reboot", root))
    unrelated = [
        {"action": "add", "subsystem": "pci", "sys_name": "0000:05:00.0"},             # a NIC hot-plugged
        {"action": "bind", "subsystem": "pci", "sys_name": "0000:06:00.0", "properties": {"DRIVER": "nvme"}},
        {"action": "add", "subsystem": "mdev", "sys_name": "3f0c3a2e-6c1d-4f43-9a53-1e6b1c1c5a10"},
        {"action": "remove", "subsystem": "pci", "sys_name": PF},                        # going away: nothing
        {"action": "change", "subsystem": "pci", "sys_name": "0000:07:00.0",
         "properties": {"MDEV_STATE": "registered"}},                                    # not on this host
    ] * 10
    events = _write_events(tmp_path / "unrelated.jsonl", unrelated)
    res = ok(cli("--sim", root, "watch", "--events", events, "--json"))
    assert res.stdout.strip() == ""
    assert mdevs(sim) == {}  # no restore happened
    assert len(ok(cli("--sim", root, "allocations", "--json")).json()) == 1  # and nothing else changed


@pytest.mark.parametrize("content,expect", [
    ('{"action": "add", "subsystem": "pci", "sys_name": "0000:41:00.0"}\nnot json\n', ":2: not a JSON event"),
    ('["add", "pci", "0000:41:00.0"]\n', ":1: an event must be a JSON object"),
    ('{"action": "add", "subsystem": "pci"}\n', ":1: event needs a sys_name"),
    ('{"action": "add", "sys_name": "0000:41:00.0", "properties": ["DRIVER"]}\n', "properties must be a JSON object"),
])
def test_malformed_event_file_is_a_clear_error(cli, make_sim, tmp_path, content, expect):
    sim = make_sim(["a2"])
    root = sim.root
    ok(cli("--sim", root, "attach", "vm1", "--vgpu", "A2-2Q"))
    ok(cli("sim", "reboot", root))
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    res = cli("--sim", root, "watch", "--events", path)
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith("gpuvirt: error:") and str(path) in line and expect in line
    assert mdevs(sim) == {}  # the valid event before the bad line did not start a run either


def test_missing_event_file(cli, make_sim, tmp_path):
    sim = make_sim(["a2"])
    res = cli("--sim", sim.root, "watch", "--events", tmp_path / "nope.jsonl")
    assert res.exit_code == 2 and "cannot read events" in res.stderr
