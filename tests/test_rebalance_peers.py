"""Cross-host moves carried out by the real CLI through peer sessions (gpuvirt.service.peers): two simulated
hosts on one shared inventory, ``policies.peer_command`` a local command that runs ``python -m gpuvirt`` as
the other host, and ``virsh`` a recording stand-in on PATH (tests/fake_virsh.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rebalance_support import LOCAL, FakeVirsh, _copy, _ctx, _domains, _one_device_each

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_virsh import load, save  # noqa: E402


def _uri(host: str, coordinator: str) -> str:
    return LOCAL if host == coordinator else f"qemu+ssh://{host}/system"


class Cluster:
    """A copy of the two-host template, with the fake libvirt and the coordinator's config set up."""

    def __init__(self, root: Path, url: str, tmp: Path, want: str = "A10-24Q", other: bool = False) -> None:
        self.root, self.url = root, url
        plan = self.gpuvirt("ha", "rebalance", "--for", want, "--cluster", "--allow", "cold", "--json")
        assert plan.returncode == 0, plan.stderr
        self.plan = json.loads(plan.stdout)
        assert self.plan["feasible"] and len(self.plan["moves"]) == 1
        # the request is placed by the host that runs the rebalance: the one the plan makes room on (``other``:
        # the host it does not make room on, which then plans room for itself)
        self.me = self.plan["unlocks"]["host"]
        self.peer = ({"ha", "hb"} - {self.me}).pop()
        if other:
            self.me, self.peer = self.peer, self.me
        m = self.plan["moves"][0]
        assert {m["from"]["host"], m["to"]["host"]} == {"ha", "hb"}
        self.bin = tmp / "bin"
        self.bin.mkdir()
        virsh = self.bin / "virsh"
        virsh.write_text(f"#!/bin/sh\nexec {sys.executable} {REPO / 'tests' / 'fake_virsh.py'} \"$@\"\n")
        virsh.chmod(0o755)
        self.state = tmp / "virsh.json"
        fake = FakeVirsh()
        for h in ("ha", "hb"):
            with self.ctx(h) as c:
                _domains(c, fake, _uri(h, self.me))
        save(fake, self.state)
        self.config = tmp / "coordinator.toml"
        cmd = [sys.executable, "-m", "gpuvirt", "--sim", f"{self.root}/{{host}}", "--db", self.url,
                               "--host-id", "{host}"]
        self.config.write_text("[policies]\npeer_command = " + json.dumps(cmd) + "\n")

    def ctx(self, host: str):
        return _ctx(self.root / host, db=self.url, host_id=host)

    def gpuvirt(self, host: str, *args: str, kill: str | None = None, config: bool = True,
                timeout: float = 180) -> subprocess.CompletedProcess:
        env = {"PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}" if hasattr(self, "bin") else
               os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "HOME": str(self.root),
               "FAKE_VIRSH_STATE": str(getattr(self, "state", ""))}
        if kill:
            env["FAKE_VIRSH_KILL"] = kill
        cfg = ["--config", str(self.config)] if config and hasattr(self, "config") else []
        return subprocess.run([sys.executable, "-m", "gpuvirt", "--sim", str(self.root / host), "--db", self.url,
                               "--host-id", host, *cfg, *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=str(self.root))

    def fake(self) -> FakeVirsh:
        return load(self.state)

    def consistent(self) -> dict[str, str]:
        """Every VM names one device that exists, on the host the inventory gives it, no intent open; returns
        {vm: host}."""
        fake = self.fake()
        where: dict[str, str] = {}
        for h in ("ha", "hb"):
            with self.ctx(h) as c:
                held = _one_device_each(c, fake, uris=(_uri(h, self.me),))
            for vm in held:
                where[vm] = h
        for h in ("ha", "hb"):
            for vm in fake.domains.get(_uri(h, self.me), {}):
                assert where.get(vm) == h, (vm, h, where)
        assert sorted(where) == ["vm-a", "vm-b"]
        return where

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster(two_host_template, tmp_path):
    made = []

    def make(**kw):
        tmp = tmp_path / f"cluster-{len(made)}"
        tmp.mkdir()
        root = kw.pop("root", None) or _copy(two_host_template)
        c = Cluster(root, kw.pop("url", None) or f"sqlite:///{root / 'shared.db'}", tmp, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _sessions_gone(c: Cluster) -> None:
    """No peer-session process of this test is left (each ends with its coordinator's pipe; one whose
    coordinator was killed notices within moments)."""
    import time

    for _ in range(50):
        out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        left = [line for line in out.splitlines() if "peer-session" in line and str(c.root) in line]
        if not left:
            return
        time.sleep(0.2)
    raise AssertionError(f"peer sessions left running: {left}")


def _hosts(url: str, gpu: str = "a10", vgpu: str = "A10-12Q") -> Path:
    """The two-host template's layout (one ``gpu`` per host, one ``vgpu`` VM on each) on inventory ``url``
    (None: a SQLite file beside the hosts)."""
    import tempfile

    from typer.testing import CliRunner

    from gpuvirt.cli.app import app
    from gpuvirt.sim.control import init_sim

    root = Path(tempfile.mkdtemp(prefix="rebalance-peers-"))
    url = url or f"sqlite:///{root / 'shared.db'}"
    for h, vm in (("ha", "vm-a"), ("hb", "vm-b")):
        init_sim(root / h, [gpu], seed="crash", mig_enabled=gpu.startswith("a100"))
        if h == "ha":
            r = CliRunner().invoke(app, ["--sim", str(root / h), "--db", url, "--host-id", h, "db", "init"])
            assert r.exit_code == 0, r.stderr
        r = CliRunner().invoke(app, ["--sim", str(root / h), "--db", url, "--host-id", h, "attach", vm, "--vgpu",
                                     vgpu])
        assert r.exit_code == 0, r.stderr
    return root


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_cluster_rebalance_moves_a_vm_to_another_host_through_a_peer_session(cluster, db, request):
    if db == "postgresql":
        url = request.getfixturevalue("pg_schema")[0]
        c = cluster(root=_hosts(url), url=url)
    else:
        c = cluster()
    m = c.plan["moves"][0]
    res = c.gpuvirt(c.me, "rebalance", "--for", "A10-24Q", "--cluster", "--allow", "cold", "--execute", "--yes",
                    "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    [done] = doc["moves"]
    assert done["result"] == "done" and done["vm"] == m["vm"]
    assert doc["placed"]["host"] == c.me and doc["placed"]["created"]
    where = c.consistent()
    assert where[m["vm"]] == m["to"]["host"] != m["from"]["host"]
    fake = c.fake()
    [mig] = [a for a in fake.calls if a[2] == "migrate"]
    assert mig[:2] == ["-c", _uri(m["from"]["host"], c.me)] and mig[-1] == _uri(m["to"]["host"], c.me)
    # the target vGPU exists on the target host (made by the session there), the source's is gone
    with c.ctx(m["to"]["host"]) as t, c.ctx(m["from"]["host"]) as s:
        assert done["to"]["uuid"] in {d["uuid"] for d in t.sim.load()["mdevs"]}
        assert done["to"]["uuid"] not in {d["uuid"] for d in s.sim.load()["mdevs"]}
        assert not [d for d in s.sim.load()["mdevs"] if d.get("vm") == m["vm"]]
    # and a fresh plan from the other side sees the free 24Q the rebalance made: nothing to move
    again = json.loads(c.gpuvirt(c.peer, "rebalance", "--for", "A10-24Q", "--cluster", "--json").stdout)
    assert again["feasible"] and not again["moves"]
    _sessions_gone(c)


def test_a_cluster_rebalance_makes_room_on_the_host_that_runs_it(cluster):
    # the cluster-wide dry run makes room on the other host; run here, --execute plans room *here* (the request
    # is placed by this host) and sends this host's VM to the other one instead of refusing
    c = cluster(other=True)
    assert c.plan["unlocks"]["host"] == c.peer
    res = c.gpuvirt(c.me, "rebalance", "--for", "A10-24Q", "--cluster", "--allow", "cold", "--execute", "--yes",
                    "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    [done] = doc["moves"]
    assert done["result"] == "done" and (done["from"]["host"], done["to"]["host"]) == (c.me, c.peer)
    assert doc["unlocks"]["host"] == doc["placed"]["host"] == c.me and doc["placed"]["created"]
    where = c.consistent()
    assert where[done["vm"]] == c.peer
    _sessions_gone(c)


@pytest.mark.parametrize("how", ["no-program", "refused", "wrong-host", "not-gpuvirt"])
def test_a_peer_that_cannot_be_reached_is_one_line_exit_5_and_nothing_changes(cluster, how):
    c = cluster()
    other = c.peer
    cmd = {"no-program": ["/nonexistent/gpuvirt-peer", "{host}"],
           "refused": ["sh", "-c", "echo \"ssh: connect to host $0 port 22: Connection refused\" >&2; exit 255",
                       "{host}"],
           # a peer command that reaches the wrong machine: the session says which host it runs as
           # a login banner or another program on the far side: its first line is not a session message
           "not-gpuvirt": ["sh", "-c", "echo Welcome to $0; cat >/dev/null", "{host}"],
           "wrong-host": [sys.executable, "-m", "gpuvirt", "--sim", f"{c.root}/{c.me}", "--db", c.url,
                          "--host-id", c.me]}[how]
    c.config.write_text("[policies]\npeer_command = " + json.dumps(cmd) + "\n")
    before = {h: json.loads(c.gpuvirt(h, "status", "--json").stdout)["gpus"] for h in ("ha", "hb")}
    res = c.gpuvirt(c.me, "rebalance", "--for", "A10-24Q", "--cluster", "--allow", "cold", "--execute", "--yes")
    assert res.returncode == 5, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"host {other}" in lines[0], res.stderr
    assert {"no-program": "/nonexistent/gpuvirt-peer", "refused": "Connection refused",
            "wrong-host": f"runs as host {c.me}", "not-gpuvirt": f"not a peer-session message: 'Welcome to {other}'"
            }[how] in lines[0]
    assert {h: json.loads(c.gpuvirt(h, "status", "--json").stdout)["gpus"] for h in ("ha", "hb")} == before
    assert not [a for a in c.fake().calls if a[2] in ("shutdown", "migrate", "define", "start")]
    c.consistent()


def test_a_peer_command_that_is_not_an_argv_list_is_refused_by_every_command(cluster, tmp_path):
    c = cluster()
    bad = tmp_path / "bad.toml"
    bad.write_text('[policies]\npeer_command = "ssh {host} gpuvirt"\n')
    res = c.gpuvirt(c.me, "--config", str(bad), "status", config=False)
    assert res.returncode == 2 and "policies.peer_command" in res.stderr and "list" in res.stderr, res.stderr
    bad.write_text('[policies]\npeer_command = ["{host}", "gpuvirt"]\n')
    res = c.gpuvirt(c.me, "--config", str(bad), "status", config=False)
    assert res.returncode == 2 and "program" in res.stderr, res.stderr


# where a process dies (all in a move from this host to the peer, the only kind whose request lands here):
# the coordinator before the VM's handover (its libvirt call), the coordinator after the handover while it
# removes the source vGPU (the simulated kernel kills it once the removal took effect), and the peer session
# right after it made the target vGPU (before the coordinator recorded it)
KILLS = {"coordinator-before-handover": ("me", None, "before:migrate", "rolled back"),
         "coordinator-during-source-cleanup": ("me", "mdev.remove", None, "finished"),
         "peer-after-making-the-target": ("peer", "mdev.create", None, "rolled back")}


@pytest.mark.parametrize("case", sorted(KILLS))
def test_a_kill_mid_move_is_settled_by_a_reconcile_through_a_peer_session(cluster, case):
    c = cluster()
    m = c.plan["moves"][0]
    assert (m["from"]["host"], m["to"]["host"]) == (c.me, c.peer)
    who, sim_op, virsh_kill, want = KILLS[case]
    if sim_op is not None:
        host = c.me if who == "me" else c.peer
        r = c.gpuvirt(host, "sim", "fault", str(c.root / host), "--op", sim_op, "--kill", "after")
        assert r.returncode == 0, r.stderr
    res = c.gpuvirt(c.me, "rebalance", "--for", "A10-24Q", "--cluster", "--allow", "cold", "--execute", "--yes",
                    kill=virsh_kill)
    if who == "me":
        assert res.returncode == -9, (res.returncode, res.stderr)
    else:
        # the coordinator survives a dead peer: one line, the move left open for reconcile
        assert res.returncode == 5, (res.returncode, res.stderr)
        [line] = res.stderr.strip().splitlines()
        assert f"host {c.peer}" in line and "gpuvirt reconcile" in line, line
    from gpuvirt.service import intent

    with c.ctx(c.me) as me:
        [row] = intent.open_intents(me)
        assert row.kind == "rebalance" and any(k.startswith(f"{c.peer}/") for k in row.gpus)
    _sessions_gone(c)
    if case != "coordinator-before-handover":
        # a reconcile without the peer leaves the move open, saying why.  (Before the handover it would go on
        # to finish the move forward as far as this host's steps go, as it does without a peer session - the
        # target exists - which is left out here so that each case checks one settling.)
        c.config.write_text('[policies]\npeer_command = ["/nonexistent/gpuvirt-peer"]\n')
        res = c.gpuvirt(c.me, "reconcile", "--yes", "--json")
        assert res.returncode == 1 and f"host {c.peer}" in res.stderr, res.stderr
        with c.ctx(c.me) as me:
            assert len(intent.open_intents(me)) == 1
    # one on the coordinator's host that reaches the peer settles the move on both hosts
    c.config.write_text("[policies]\npeer_command = " + json.dumps(
        [sys.executable, "-m", "gpuvirt", "--sim", f"{c.root}/{{host}}", "--db", c.url, "--host-id", "{host}"]) + "\n")
    res = c.gpuvirt(c.me, "reconcile", "--yes", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    acts = {f["action"] for f in doc["findings"] if f["kind"] == "unfinished-rebalance"}
    assert acts == {want}, json.dumps(doc, indent=1)
    where = c.consistent()
    assert where[m["vm"]] == (m["to"]["host"] if want == "finished" else m["from"]["host"])
    _sessions_gone(c)


# --- the session's own bounds (its server side, in-process) ----------------------------------------------------------
def _serve(ctx, *lines: bytes, **kw):
    import io

    from gpuvirt.service import peers

    out = io.BytesIO()
    code = peers.serve(ctx, io.BytesIO(b"".join(lines)), out, **kw)
    return code, [json.loads(x) for x in out.getvalue().splitlines()]


def _req(**msg) -> bytes:
    return json.dumps(msg).encode() + b"\n"


def test_the_peer_session_bounds_and_checks_every_request(cluster, monkeypatch):
    from gpuvirt.host import peer_link
    from gpuvirt.service import intent_steps

    c = cluster()
    hello = _req(op="hello", host=c.peer, protocol=1)
    with c.ctx(c.peer) as p:
        # the first request names the host the coordinator means; another host id ends the session
        code, [r] = _serve(p, _req(op="hello", host=c.me, protocol=1), hello)
        assert code == 2 and not r["ok"] and f"runs as host {c.peer}" in r["message"]
        code, [r] = _serve(p, _req(op="view"))
        assert code == 2 and "first request must be 'hello'" in r["message"]
        # a step of another host, a kind the session does not run, a GPU address that is a path: refused, the
        # session goes on (and ends cleanly at the end of its input)
        step = intent_steps.on_host(intent_steps.mdev_step("0000:41:00.0", 1, None, "nvidia-1", "u", present=True,
                                                           fields=None), c.me)
        vfs = intent_steps.on_host(intent_steps.vfs_step("0000:41:00.0", 1, 4, present=True), c.peer)
        code, rs = _serve(p, hello, _req(op="step", action="forward", step=step),
                          _req(op="step", action="forward", step=vfs), _req(op="lock", gpu="../../etc/passwd"),
                          _req(op="lock", gpu="0000:41:00.0"), _req(op="nope"), _req(op="view", nvml=True))
        assert code == 0 and rs[0]["ok"] and [r["ok"] for r in rs[1:]] == [False, False, False, True, False, True]
        assert f"step of host '{c.me}'" in rs[1]["message"] and "must be one of mig, mdev, vgpu" in rs[2]["message"]
        assert "not a GPU address" in rs[3]["message"] and "unknown request" in rs[5]["message"]
        assert "0000:41:00.0" in {g["pci_address"] for g in rs[6]["doc"]["gpus"]}
        # bounded: a line over the limit, or more requests than allowed, ends the session
        monkeypatch.setattr(peer_link, "MAX_LINE_BYTES", 64)
        code, rs = _serve(p, hello, _req(op="view", pad="x" * 100))
        assert code == 2 and "over 64 bytes" in rs[-1]["message"]
        monkeypatch.undo()
        code, rs = _serve(p, hello, *[_req(op="unlock", gpu="0000:41:00.0")] * 5, max_messages=3)
        assert code == 2 and len(rs) == 4 and "more than 3 requests" in rs[-1]["message"]
        code, rs = _serve(p, hello, b"not json\n", _req(op="view"))
        assert code == 2 and len(rs) == 2 and "not a JSON object" in rs[-1]["message"]


def _live_stacks(c: Cluster) -> None:
    """Both hosts run a stack that allows live moves, recorded in the inventory as each host sees itself."""
    for h in ("ha", "hb"):
        r = c.gpuvirt(h, "sim", "migration", str(c.root / h), "--driver", "550.127.05", "--os", "rhel-9.4",
                      "--kernel", "5.14.0", "--qemu", "8.2.0", "--libvirt", "10.0.0")
        assert r.returncode == 0, r.stderr
        assert c.gpuvirt(h, "status").returncode == 0


def test_a_live_move_to_a_peer_asks_the_targets_nvml_through_the_session(cluster):
    c = cluster()
    _live_stacks(c)
    res = c.gpuvirt(c.me, "rebalance", "--for", "A10-24Q", "--cluster", "--allow", "live", "--execute", "--yes",
                    "--json")
    assert res.returncode == 0, res.stderr
    [m] = json.loads(res.stdout)["moves"]
    assert m["kind"] == "live" and m["result"] == "done" and m["to"]["host"] == c.peer
    [mig] = [a for a in c.fake().calls if a[2] == "migrate"]
    assert mig[:4] == ["-c", LOCAL, "migrate", "--live"] and mig[-1] == _uri(c.peer, c.me)
    assert c.consistent()[m["vm"]] == c.peer


def test_a_live_pre_flight_the_peer_cannot_answer_changes_nothing(cluster):
    c = cluster()
    _live_stacks(c)
    # NVML on the target host fails the compatibility call: its error comes back through the session
    r = c.gpuvirt(c.peer, "sim", "fault", str(c.root / c.peer), "--op", "nvml.GetVgpuCompatibility", "--nvml", "999")
    assert r.returncode == 0, r.stderr
    before = {h: json.loads(c.gpuvirt(h, "status", "--json").stdout)["gpus"] for h in ("ha", "hb")}
    res = c.gpuvirt(c.me, "rebalance", "--for", "A10-24Q", "--cluster", "--allow", "live", "--execute", "--yes")
    assert res.returncode != 0, res.stdout
    [line] = res.stderr.strip().splitlines()
    assert f"host {c.peer}: check whether vGPU instance" in line and "can move to GPU" in line, line
    assert {h: json.loads(c.gpuvirt(h, "status", "--json").stdout)["gpus"] for h in ("ha", "hb")} == before
    assert not [a for a in c.fake().calls if a[2] in ("shutdown", "migrate", "define", "start")]
    c.consistent()
    _sessions_gone(c)


def test_a_plan_that_makes_room_on_another_host_is_refused_before_anything_changes(cli, make_sim, tmp_path):
    # this host has no A10: the room for an A10-24Q can only be made on hb (a cold move within hb)
    a = make_sim(["a100-40gb"], name="ha")
    b = make_sim(["a10:2"], name="hb")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    assert cli("--sim", a.root, "--db", url, "--host-id", "ha", "db", "init").exit_code == 0
    for vm, gpu in (("vm-b", "0"), ("vm-c", "1")):
        r = cli("--sim", b.root, "--db", url, "--host-id", "hb", "attach", vm, "--vgpu", "A10-12Q", "--gpu", gpu)
        assert r.exit_code == 0, r.stderr
    args = ("--sim", a.root, "--db", url, "--host-id", "ha")
    plan = json.loads(cli(*args, "rebalance", "--for", "A10-24Q", "--cluster", "--allow", "cold", "--json").stdout)
    assert plan["feasible"] and plan["unlocks"]["host"] == "hb" and plan["moves"]
    before = json.loads(cli("--sim", b.root, "--db", url, "--host-id", "hb", "status", "--json").stdout)
    res = cli(*args, "rebalance", "--for", "A10-24Q", "--cluster", "--allow", "cold", "--execute", "--yes")
    assert res.exit_code == 5, res
    [line] = res.stderr.strip().splitlines()
    assert "makes room for A10-24Q on host hb" in line and "run it on hb" in line and "nothing was changed" in line
    assert json.loads(cli("--sim", b.root, "--db", url, "--host-id", "hb", "status", "--json").stdout) == before


def test_a_peer_lock_is_held_until_the_outermost_release_and_ends_with_the_session(cluster):
    from gpuvirt.service import peers
    from gpuvirt.errors import ConflictError
    from gpuvirt.service.instances import gpu_lock, lock_busy

    c = cluster()
    gpu = "0000:41:00.0"
    with c.ctx(c.me) as me, c.ctx(c.peer) as p:
        me.settings.policies["peer_command"] = [sys.executable, "-m", "gpuvirt", "--sim", f"{c.root}/{{host}}", "--db",
                                                c.url, "--host-id", "{host}"]
        with peers.sessions(me, {c.peer}) as ss:
            s = ss[c.peer]
            assert s.settings.host_id == c.peer and s.inventory is me.inventory
            with gpu_lock(s, gpu):
                assert lock_busy(p, gpu)        # held by the peer process, on the peer's host
                with gpu_lock(s, gpu):
                    pass
                assert lock_busy(p, gpu)        # a nested release keeps it
            assert not lock_busy(p, gpu)
            with gpu_lock(s, gpu):
                s.link.kill()                   # the session dies: its lock goes with it
                assert not lock_busy(p, gpu)
            with pytest.raises(ConflictError, match=f"host {c.peer}: the peer session"):
                s.remote_view()


def test_a_mig_backed_vgpu_moves_to_a_peer_with_its_gpu_instance(cluster):
    root = _hosts(None, "a100-40gb", "A100-3-20C")
    c = cluster(root=root, url=f"sqlite:///{root / 'shared.db'}", want="7g.40gb")
    [m] = c.plan["moves"]
    res = c.gpuvirt(c.me, "rebalance", "--for", "7g.40gb", "--cluster", "--allow", "cold", "--execute", "--yes",
                    "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["moves"][0]["result"] == "done" and doc["placed"]["host"] == c.me
    assert c.consistent()[m["vm"]] == m["to"]["host"]
    # the GPU instance under the moved vGPU was made on the peer by its session and recorded here, allocated
    # to the VM; the source's went, and the 7g the rebalance made room for is the only one left on this host
    for h in ("ha", "hb"):
        with c.ctx(h) as hc:
            on_host = sorted((gi.profile_id, gi.start) for gi in hc.host.nvml().gpu_instances(0))
            with hc.inventory.unit() as uow:
                rows = uow.instances(h, kinds=["mig"])
                recorded = sorted((r.profile_id, r.placement_start) for r in rows)
                held = {r.allocation.vm_name for r in rows if r.allocation is not None}
            assert on_host == recorded, (h, on_host, recorded)
            if h == m["to"]["host"]:
                assert (m["to"]["placement"] in {s for _, s in recorded}) and m["vm"] in held
            else:
                assert m["vm"] not in held and len(recorded) == 1
    _sessions_gone(c)
