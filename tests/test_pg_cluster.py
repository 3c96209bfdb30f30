"""Many hosts sharing one PostgreSQL inventory (issue 5).

Needs a PostgreSQL server: ``GPUVIRT_TEST_PG_URL`` (CI: ``postgresql+psycopg://postgres@127.0.0.1:5432/test``,
trust auth).  Every test works in its own schema, selected with libpq's ``options=-csearch_path=...`` in
the URL and dropped afterwards, so tests run in parallel and leave nothing behind.  Hosts are simulated
(``gpuvirt sim``), each with its own directory and ``--host-id``; all gpuvirt commands that must overlap
run as real processes of the installed console script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PG_URL = os.environ.get("GPUVIRT_TEST_PG_URL")
GPUVIRT = str(Path(sys.executable).with_name("gpuvirt"))

pytestmark = [
    pytest.mark.pg,
    pytest.mark.skipif(not PG_URL, reason="GPUVIRT_TEST_PG_URL is not set: no PostgreSQL server to test against "
                                          "(CI sets it to postgresql+psycopg://postgres@127.0.0.1:5432/test)"),
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUVIRT_")}
    env["GPUVIRT_DB_BUSY_TIMEOUT_MS"] = "30000"
    return env


def run(*args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([GPUVIRT, *map(str, args)], capture_output=True, text=True, env=_env(), timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"gpuvirt {' '.join(map(str, args))} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def run_parallel(commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """Start every command at once (real processes), wait for all; [(rc, stdout, stderr)] in order."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for c in commands]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=180)
        out.append((p.returncode, so, se))
    return out


def scalar(admin, schema, sql):
    from sqlalchemy import text

    with admin.connect() as c:
        c.execute(text(f'SET search_path TO "{schema}"'))
        return c.execute(text(sql)).all()


# --- migrations ------------------------------------------------------------------------------------------------------
def test_alembic_migrations_on_postgresql(pg_schema, tmp_path):
    url, admin, schema = pg_schema
    from gpuvirt.inventory.migrate import head

    # from 0001 with data in it: the upgrade keeps every row
    assert "0001_initial" in run("--db", url, "db", "upgrade", "0001_initial").stdout
    from sqlalchemy import text

    with admin.connect() as c:
        c.execute(text(f'SET search_path TO "{schema}"'))
        c.execute(text("INSERT INTO hosts (id, hostname, root, simulated, created_at, last_seen_at) "
                       "VALUES ('old', 'old', '/', false, now(), now())"))
        c.execute(text("INSERT INTO gpus (host_id, address, vendor, memory_mib, mig_capable, present, last_seen_at) "
                       "VALUES ('old', '0000:41:00.0', 'nvidia', 40960, true, true, now())"))
        c.execute(text("INSERT INTO instances (host_id, gpu_id, kind, state, origin, persistent, profile_id, "
                       "placement_start, placement_size, created_at, updated_at) SELECT 'old', id, 'mig', "
                       "'active', 'profile', true, 19, 0, 1, now(), now() FROM gpus"))
        c.execute(text("INSERT INTO allocations (instance_id, host_id, vm_name, tenant, persistent, created_at) "
                       "SELECT id, 'old', 'vm-old', 'acme', true, now() FROM instances"))
    up = run("--db", url, "db", "upgrade")
    assert head() in up.stdout
    assert scalar(admin, schema, "SELECT a.vm_name, a.tenant, a.vm_state, i.profile_id, g.address FROM allocations a "
                                 "JOIN instances i ON i.id = a.instance_id JOIN gpus g ON g.id = i.gpu_id") == \
        [("vm-old", "acme", None, 19, "0000:41:00.0")]
    assert scalar(admin, schema, "SELECT count(*) FROM tenants") == [(0,)]
    check = run("--db", url, "db", "check")
    assert "models and migrations agree" in check.stdout
    cur = json.loads(run("--db", url, "db", "current", "--json").stdout)
    assert cur["backend"] == "postgresql" and cur["revision"] == head()
    # the data are usable through gpuvirt: a cluster report sees the old host and its tenant
    doc = json.loads(run("--db", url, "report", "--cluster", "--format", "json").stdout)
    assert [h["host"] for h in doc["hosts"]] == ["old"]
    assert [(t["tenant"], t["instances"]) for t in doc["tenants"]] == [("acme", 1)]


def test_first_use_by_several_processes_at_once(pg_schema, make_sim):
    url, admin, schema = pg_schema
    sim = make_sim(["a100-40gb", "a2"], mig_enabled=True)
    # four processes of one new host at once: one upgrades the empty schema (advisory lock), and all of them
    # register the host and its GPUs; inserting the same GPU row twice must not fail either of them
    res = run_parallel([[GPUVIRT, "--sim", str(sim.root), "--db", url, "--host-id", "h9", "report",
                         "--format", "json"] for _ in range(4)])
    assert all(rc == 0 for rc, _, _ in res), res
    assert "models and migrations agree" in run("--db", url, "db", "check").stdout
    tables = {r[0] for r in scalar(admin, schema, "SELECT table_name FROM information_schema.tables "
                                                  f"WHERE table_schema = '{schema}'")}
    assert {"hosts", "gpus", "instances", "allocations", "tenants", "events", "alembic_version"} <= tables
    assert scalar(admin, schema, "SELECT host_id, count(*) FROM gpus GROUP BY host_id") == [("h9", 2)]


# --- four hosts, one inventory ----------------------------------------------------------------------------------------
def _strip_ages(doc):
    for h in doc["hosts"]:
        h.pop("age_seconds", None)
        h.pop("last_seen_at", None)
    return doc


def _sum_totals(parts):
    out = None
    for t in parts:
        if out is None:
            out = json.loads(json.dumps(t))
            continue
        for k, v in t.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    out[k][kk] = out[k].get(kk, 0) + vv
            else:
                out[k] += v
    return out


def test_four_hosts_concurrently_share_one_inventory(pg_schema, make_sim):
    url, admin, schema = pg_schema
    hosts = {f"h{i}": make_sim(["a100-40gb", "a2"], name=f"h{i}", mig_enabled=True) for i in range(1, 5)}

    def g(hid, *args):
        return [GPUVIRT, "--sim", str(hosts[hid].root), "--db", url, "--host-id", hid, *map(str, args)]

    # profiles are shared by every host; created once
    run("--db", url, "create-profile", "mig-mixed", "--mig", "3g.20gb=1", "--mig", "1g.5gb=2", "--model", "a100-40gb")
    run("--db", url, "create-profile", "a2-six", "--vgpu", "A2-2Q=6", "--model", "a2")

    # 1. four hosts discover, apply and report at the same time (each host's steps in order)
    chains = [" && ".join(" ".join(f"'{a}'" for a in cmd) + " > /dev/null" for cmd in (
        g(hid, "status", "--json"), g(hid, "apply", "mig-mixed", "--gpu", "0", "--yes"),
        g(hid, "apply", "a2-six", "--gpu", "1", "--yes")))
        for hid in hosts]
    res = run_parallel([["bash", "-c", c] for c in chains])
    assert all(rc == 0 for rc, _, _ in res), res
    per_host_rows = scalar(admin, schema, "SELECT host_id, count(*) FROM instances GROUP BY host_id ORDER BY host_id")
    assert per_host_rows == [(h, 9) for h in hosts]           # 3 MIG + 6 vGPU each, nobody else's
    assert scalar(admin, schema, "SELECT count(*) FROM gpus") == [(8,)]
    assert scalar(admin, schema, "SELECT count(*) FROM instances i JOIN gpus g ON g.id = i.gpu_id "
                                 "WHERE g.host_id <> i.host_id") == [(0,)]

    # 2. 32 attaches at once across the hosts: 8 per host on 6 free vGPUs + room for 2 more; half of them
    #    for tenant "capped" whose quota (10) is checked across all hosts
    run("--db", url, "tenant", "set-quota", "capped", "--instances", "10")
    cmds = []
    for hid in hosts:
        for k in range(8):
            tenant = ["--tenant", "capped"] if k % 2 else []
            cmds.append(g(hid, "attach", f"{hid}-vm{k}", "--vgpu", "A2-2Q", *tenant))
    t0 = time.monotonic()
    res = run_parallel(cmds)
    elapsed = time.monotonic() - t0
    ok = [c for c, r in zip(cmds, res) if r[0] == 0]
    failed = [(c[-3:], r) for c, r in zip(cmds, res) if r[0] != 0]
    for _c, (rc, _so, se) in failed:
        # refusals are clean one-line errors: over quota (4), no capacity (4) or a lost race (5)
        assert rc in (4, 5) and se.startswith("gpuvirt: error:") and "Traceback" not in se, (rc, se)
    allocs = scalar(admin, schema, "SELECT a.instance_id, a.host_id, i.host_id, a.vm_name, a.tenant "
                                   "FROM allocations a JOIN instances i ON i.id = a.instance_id")
    inst_ids = [a[0] for a in allocs]
    assert len(inst_ids) == len(set(inst_ids)), "an instance was allocated twice"
    assert all(a[1] == a[2] for a in allocs), "an allocation points at another host's instance"
    assert len(allocs) == len(ok), (len(allocs), len(ok), failed)
    capped = [a for a in allocs if a[4] == "capped"]
    assert len(capped) <= 10, "the quota was exceeded by concurrent attaches"
    assert sorted(a[3] for a in allocs) == sorted(c[c.index("attach") + 1] for c in ok)
    # the untenanted half always has room (6 free + 2 creatable per host for 4 attaches)
    assert sum(1 for c in ok if "--tenant" not in c) == 16, failed
    assert len(capped) == 10 or any("quota" in r[2] for _c, r in failed), failed
    assert elapsed < 90

    # 3. the cluster report equals the sum of the per-host reports, and each host's inventory view equals
    #    what the host itself shows (in-process from here: nothing below needs to overlap)
    cluster = _strip_ages(report(url))
    assert cluster["totals"]["hosts"] == 4 and cluster["totals"]["stale_hosts"] == 0
    singles = {hid: _strip_ages(report(url, host=hid)) for hid in hosts}
    assert [h["host"] for h in cluster["hosts"]] == list(hosts)
    for h in cluster["hosts"]:
        assert singles[h["host"]]["hosts"] == [h]
    assert cluster["totals"] == _sum_totals(s["totals"] for s in singles.values())
    held = {}
    for s in singles.values():
        for t in s["tenants"]:
            held[t["tenant"]] = held.get(t["tenant"], 0) + t["instances"]
    assert {t["tenant"]: t["instances"] for t in cluster["tenants"] if t["instances"]} == \
        {k: v for k, v in held.items() if v}
    capped_t = next(t for t in cluster["tenants"] if t["tenant"] == "capped")
    assert capped_t["usage"]["instances"] == capped_t["instances"] == len(capped) and not capped_t["over_quota"]
    for hid, sim in hosts.items():
        live = _strip_ages(report(url, sim=sim, host_id=hid, cluster=False))
        assert live["source"] == "live"
        assert live["hosts"][0]["gpus"] == singles[hid]["hosts"][0]["gpus"], hid
    # and by the simulator: what the cluster says is placeable on h1's A100 is what NVML creates
    from gpuvirt.context import Context, resolve_settings

    a100 = next(e for e in cluster["hosts"][0]["gpus"] if e["model"] == "a100-40gb")
    with Context(resolve_settings(sim=str(hosts["h1"].root), db=url, host_id="h1", env={})) as ctx:
        nvml = ctx.host.nvml()
        for p in nvml.gi_profiles(0):
            made = []
            while True:
                try:
                    made.append(nvml.create_gpu_instance(0, p.id).id)
                except Exception:  # noqa: BLE001 - the simulated driver refused: that is the count
                    break
            for gi in made:
                nvml.destroy_gpu_instance(0, gi)
            assert a100["placeable_now"][p.name] == len(made), p.name

    # 4. a host that stops reporting is flagged and no longer counted
    from sqlalchemy import text

    from gpuvirt.service.report import to_prometheus

    with admin.connect() as c:
        c.execute(text(f'SET search_path TO "{schema}"'))
        c.execute(text("UPDATE hosts SET last_seen_at = last_seen_at - interval '2 hours' WHERE id = 'h4'"))
    doc = report(url)
    assert doc["totals"]["stale_hosts"] == 1 and doc["totals"]["gpus"] == 6
    assert [h["host"] for h in doc["hosts"] if h["stale"]] == ["h4"]
    assert b'gpuvirt_host_stale{host="h4"} 1.0' in to_prometheus(doc)


def report(url, *, host=None, sim=None, host_id="tester", cluster=True):
    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.service.report import report as svc

    settings = resolve_settings(db=url, sim=str(sim.root) if sim else None, host_id=host_id, env={})
    with Context(settings) as ctx:
        return json.loads(json.dumps(svc(ctx, cluster=cluster and host is None, host=host)))


def test_the_hook_on_a_postgresql_inventory_takes_the_full_path(pg_schema, make_sim):
    # the hook's fast path speaks SQLite only (inventory/sqlite_fast.py): on PostgreSQL every prepare and release
    # goes through the ORM and gives what it always gave, the restore after a reboot included (a reconcile
    # intent, recovery 'forward-only': it did not fit intents.recovery before revision 0007)
    url, admin, schema = pg_schema
    sim = make_sim(["a2"])
    root = sim.root
    dev = json.loads(run("--sim", root, "--db", url, "attach", "vm1", "--vgpu", "A2-2Q", "--format", "json").stdout)
    run("--sim", root, "--db", url, "hook", "install")
    h = root / "etc/libvirt/hooks/qemu.d/50-gpuvirt"
    import shlex

    exec_line = shlex.split(h.read_text().strip().splitlines()[-1])
    assert "--db" in exec_line
    python, opts = exec_line[1], exec_line[2:exec_line.index("hook")]
    xml = (f"<domain type='kvm' id='3'><name>vm1</name><uuid>0b5c3e7e-1f0d-4c84-8e41-5b7f2a9d6c10</uuid><devices>"
           f"<hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci' display='off'><source>"
           f"<address uuid='{dev['uuid']}'/></source></hostdev></devices></domain>").encode()
    for argv in (("vm1", "prepare", "begin", "-"), ("vm1", "release", "end", "destroyed")):
        p = subprocess.run([python, "-X", "importtime", *opts, "hook", "libvirt-qemu", *argv], input=xml,
                           capture_output=True, env={}, timeout=120)
        assert p.returncode == 0, [x for x in p.stderr.decode().splitlines() if not x.startswith("import time")]
        mods = {line.rsplit("|", 1)[1].strip() for line in p.stderr.decode().splitlines()
                if line.startswith("import time:")}
        assert "sqlalchemy" in mods and "gpuvirt.service.hook" in mods, argv
    from gpuvirt.sim.state import SimHost

    assert dev["uuid"] in {m["uuid"] for m in SimHost(root).load()["mdevs"]}
    assert scalar(admin, schema, "SELECT vm_state, vm_uuid FROM allocations") == \
        [("stopped", "0b5c3e7e-1f0d-4c84-8e41-5b7f2a9d6c10")]
    assert scalar(admin, schema, "SELECT count(*) FROM events WHERE action IN ('hook-prepare', 'hook-release')") \
        == [(2,)]
    run("sim", "reboot", root)
    assert dev["uuid"] not in {m["uuid"] for m in SimHost(root).load()["mdevs"]}
    p = subprocess.run([python, *opts, "hook", "libvirt-qemu", "vm1", "prepare", "begin", "-"], input=xml,
                       capture_output=True, env={}, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert dev["uuid"] in {m["uuid"] for m in SimHost(root).load()["mdevs"]}
    assert scalar(admin, schema, "SELECT count(*) FROM intents") == [(0,)]
