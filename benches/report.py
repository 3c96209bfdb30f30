#!/usr/bin/env python3
"""Benchmark: ``gpuvirt report --cluster --format json`` over a 1,000-host inventory.

The inventory: 1,000 hosts x 8 GPUs (6 A100-40GB in MIG mode, 2 A2 with SR-IOV vGPUs), about 55,000
instances and 51,000 allocations spread over 40 tenants with quotas; 1 % of the hosts have not reported
for two hours (stale).  A100 layouts: most carry seven 1g.5gb instances, every sixth 2g + 2x 1g + 3g; A2s
carry eight A2-2Q vGPUs.  Every host but the even ones keeps one instance per GPU free.  Rows are written
with SQLAlchemy core in bulk (benches may use SQLAlchemy directly), after gpuvirt itself created the schema
through its Alembic revisions.

Timed, wall clock, median of ``--runs`` after one untimed warm-up:

* service: ``gpuvirt.service.report.report(ctx, cluster=True)`` plus serialising the document as the CLI
  does (compact JSON), in-process;
* cli: the installed console script as a real process, ``gpuvirt --db URL report --cluster --format json``
  with stdout to /dev/null (includes interpreter start-up and imports).

Each is printed as wall time (what the targets are about) and CPU time, with the machine's load average:
on a shared machine the difference is time spent waiting for a core.

Backends: SQLite (a file in a temporary directory) and PostgreSQL when reachable (``--pg-url`` or
``GPUVIRT_TEST_PG_URL``; the data go into a throw-away schema that is dropped afterwards), else reported as
skipped.  Targets: <= 1 s on SQLite and <= 1.5 s on PostgreSQL, on a 2-core machine.

Run: ``.venv/bin/python benches/report.py [--hosts 1000] [--runs 5] [--pg-url URL] [--profile]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPUVIRT = str(Path(sys.executable).with_name("gpuvirt"))
TARGETS = {"sqlite": 1.0, "postgresql": 1.5}
A100_PCI = "0000:{:02x}:00.0"


def build_rows(n_hosts: int, seed: int = 7) -> dict[str, list[dict]]:
    """Rows for every table, with explicit ids (allocations refer to instance ids)."""
    from gpuvirt.model.catalog import load_catalog

    rnd = random.Random(seed)
    cat = load_catalog()
    a100 = cat.get("a100-40gb")
    a2 = cat.get("a2")
    geom = a100.mig
    prof = {p.name: p for p in geom.gi_profiles}
    a2q = next(t for t in a2.vgpu.types if t.name == "A2-2Q")
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    tenants = [f"tenant-{i:02d}" for i in range(40)]
    hosts, gpus, insts, allocs = [], [], [], []
    gid = iid = aid = 0
    for h in range(n_hosts):
        host_id = f"node-{h:04d}"
        stale = h % 100 == 99
        hosts.append({"id": host_id, "hostname": host_id, "root": "/", "simulated": False, "created_at": now,
                      "last_seen_at": now - dt.timedelta(hours=2) if stale else now, "boot_marker": None})
        for g in range(8):
            gid += 1
            is_a100 = g < 6
            addr = A100_PCI.format(0x41 + g)
            gpus.append({"id": gid, "host_id": host_id, "address": addr, "uuid": f"GPU-{uuid.UUID(int=gid)}",
                         "nvml_index": g, "model": "a100-40gb" if is_a100 else "a2",
                         "name": a100.display_name if is_a100 else a2.display_name, "vendor": "nvidia",
                         "memory_mib": a100.memory_mib if is_a100 else a2.memory_mib, "mig_capable": is_a100,
                         "mig_current": True if is_a100 else None, "mig_pending": True if is_a100 else None,
                         "vgpu_interface": "mdev", "sriov_total_vfs": 20 if is_a100 else 16,
                         "sriov_num_vfs": 20 if is_a100 else 16, "present": True, "desired_profile": None,
                         "profile_state": None, "last_seen_at": now})
            if is_a100:
                if (h * 8 + g) % 6 == 5:
                    layout = [("2g.10gb", 0), ("1g.5gb", 2), ("1g.5gb", 3), ("3g.20gb", 4)]
                else:
                    layout = [("1g.5gb", s) for s in range(7)]
                items = []
                for name, start in layout:
                    p = prof[name]
                    items.append({"kind": "mig", "profile_id": p.id, "profile_name": p.name,
                                  "placement_start": start, "placement_size": p.memory_slices,
                                  "gi_id": None, "ci_id": None, "mig_uuid": None, "compute_slices": p.compute_slices,
                                  "mdev_uuid": None, "parent": None, "type_id": None, "type_name": None,
                                  "memory_mib": p.memory_mib})
            else:
                items = [{"kind": "mdev", "profile_id": None, "profile_name": None, "placement_start": None,
                          "placement_size": None, "gi_id": None, "ci_id": None, "mig_uuid": None,
                          "compute_slices": None, "mdev_uuid": str(uuid.UUID(int=(gid << 8) + k)),
                          "parent": f"0000:{0x41 + g:02x}:00.{4 + k}" if k < 4 else f"0000:{0x41 + g:02x}:01.{k - 4}",
                          "type_id": f"nvidia-{a2q.id}", "type_name": a2q.name, "memory_mib": a2q.framebuffer_mib}
                         for k in range(8)]
            for k, it in enumerate(items):
                iid += 1
                insts.append({"id": iid, "host_id": host_id, "gpu_id": gid, "state": "active", "origin": "profile",
                              "persistent": True, "backing_instance_id": None, "error": None, "created_at": now,
                              "updated_at": now, **it})
                if h % 2 == 1 and k == len(items) - 1:
                    continue    # odd hosts keep one free instance per GPU
                aid += 1
                allocs.append({"id": aid, "instance_id": iid, "host_id": host_id,
                               "vm_name": f"vm-{h:04d}-{g}-{k}", "vm_uuid": None,
                               "tenant": tenants[rnd.randrange(len(tenants))], "persistent": True,
                               "created_at": now, "vm_state": "running" if k % 3 else None, "vm_state_at": None})
    tenant_rows = [{"name": t, "max_instances": 2000, "max_memory_mib": 20_000_000, "max_compute_slices": 4000,
                    "created_at": now} for t in tenants]
    return {"hosts": hosts, "gpus": gpus, "instances": insts, "allocations": allocs, "tenants": tenant_rows}


def load(url: str, rows: dict[str, list[dict]]) -> None:
    from sqlalchemy import insert

    from gpuvirt.inventory.models import Base
    from gpuvirt.inventory.store import Inventory

    inv = Inventory.connect(url, "bench")
    try:
        inv.ensure_schema()          # gpuvirt's own Alembic revisions create the tables
        md = Base.metadata
        with inv.engine.begin() as conn:
            for table in ("hosts", "gpus", "instances", "allocations", "tenants"):
                data = rows[table]
                for i in range(0, len(data), 10_000):
                    conn.execute(insert(md.tables[table]), data[i:i + 10_000])
            if inv.backend == "postgresql":
                # explicit ids were inserted: move the sequences past them, as an operator's restore would
                for table in ("gpus", "instances", "allocations"):
                    conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                         f"(SELECT max(id) FROM {table}))")
                conn.exec_driver_sql("ANALYZE")
    finally:
        inv.close()


def time_service(url: str, runs: int) -> tuple[list[float], list[float], dict]:
    """Wall and CPU seconds of report() + compact JSON encoding, in this process."""
    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.service.report import render_machine, report

    times, cpu = [], []
    doc = {}
    for i in range(runs + 1):
        settings = resolve_settings(db=url, host_id="bench", env={})
        t, c = time.perf_counter(), time.process_time()
        with Context(settings) as ctx:
            doc = report(ctx, cluster=True)
            render_machine(doc, "json")     # exactly as the CLI serialises it
        if i:       # the first run warms the catalog and the database's caches
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return times, cpu, doc


def time_cli(url: str, runs: int) -> tuple[list[float], list[float]]:
    """Wall seconds of the console script as a process, and its CPU seconds (user + system, from
    getrusage of the children): on a shared machine the CPU figure shows how much of the wall time was
    waiting for a core."""
    import resource

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUVIRT_")}
    cmd = [GPUVIRT, "--db", url, "--host-id", "bench", "report", "--cluster", "--format", "json"]
    times, cpu = [], []
    for i in range(runs + 1):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        el = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode:
            sys.exit(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.decode()[-500:]}")
        if i:
            times.append(el)
            cpu.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    return times, cpu


def profile_service(url: str) -> None:
    import cProfile
    import pstats

    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.service.report import render_machine, report

    settings = resolve_settings(db=url, host_id="bench", env={})
    with Context(settings) as ctx:
        report(ctx, cluster=True)
    pr = cProfile.Profile()
    with Context(resolve_settings(db=url, host_id="bench", env={})) as ctx:
        pr.enable()
        doc = report(ctx, cluster=True)
        render_machine(doc, "json")
        pr.disable()
    pstats.Stats(pr).sort_stats("cumulative").print_stats(25)


def pg_schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


def run_backend(name: str, url: str, rows: dict, runs: int, profile: bool) -> dict:
    t = time.perf_counter()
    load(url, rows)
    load_s = time.perf_counter() - t
    svc, svc_cpu, doc = time_service(url, runs)
    cli, cli_cpu = time_cli(url, runs)
    if profile:
        profile_service(url)
    target = TARGETS[name]
    gpus = sum(len(h["gpus"]) for h in doc["hosts"])
    return {"backend": name, "load_s": load_s, "service_s": statistics.median(svc), "cli_s": statistics.median(cli),
            "service_cpu_s": statistics.median(svc_cpu), "cli_cpu_s": statistics.median(cli_cpu),
            "service_all": svc, "cli_all": cli, "target_s": target, "hosts": len(doc["hosts"]),
            "stale_hosts": doc["totals"]["stale_hosts"], "gpus": gpus,
            "json_mb": len(json.dumps(doc, separators=(",", ":"))) / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pg-url", default=os.environ.get("GPUVIRT_TEST_PG_URL"))
    ap.add_argument("--profile", action="store_true", help="cProfile one in-process run per backend")
    args = ap.parse_args()

    rows = build_rows(args.hosts)
    print(f"inventory: {len(rows['hosts'])} hosts, {len(rows['gpus'])} GPUs, {len(rows['instances'])} instances, "
          f"{len(rows['allocations'])} allocations, {len(rows['tenants'])} tenants; {os.cpu_count()} CPU(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    results = []
    with tempfile.TemporaryDirectory(prefix="gpuvirt-bench-report-") as d:
        results.append(run_backend("sqlite", f"sqlite:///{d}/inventory.db", rows, args.runs, args.profile))
    if args.pg_url:
        from sqlalchemy import create_engine, text

        schema = f"gpuvirt_bench_{os.getpid()}"
        admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as c:
                c.execute(text(f'CREATE SCHEMA "{schema}"'))
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server means "skipped"
            print(f"postgresql: skipped ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        else:
            try:
                results.append(run_backend("postgresql", pg_schema_url(args.pg_url, schema), rows, args.runs,
                                           args.profile))
            finally:
                with admin.connect() as c:
                    c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                admin.dispose()
    else:
        print("postgresql: skipped (no --pg-url and GPUVIRT_TEST_PG_URL is not set)")
    ok = True
    for r in results:
        met_s = r["service_s"] <= r["target_s"]
        met_c = r["cli_s"] <= r["target_s"]
        ok = ok and met_s and met_c
        print(f"{r['backend']:>10}: report --cluster --format json over {r['hosts']} hosts ({r['stale_hosts']} stale), "
              f"{r['gpus']} GPUs, {r['json_mb']:.1f} MB of JSON; load {r['load_s']:.1f} s")
        print(f"{'':>10}  service {r['service_s']:.3f} s wall, {r['service_cpu_s']:.3f} s CPU "
              f"(runs {', '.join(f'{x:.3f}' for x in r['service_all'])}) "
              f"target <= {r['target_s']} s: {'met' if met_s else 'NOT met'}")
        print(f"{'':>10}  cli     {r['cli_s']:.3f} s wall, {r['cli_cpu_s']:.3f} s CPU "
              f"(runs {', '.join(f'{x:.3f}' for x in r['cli_all'])}) "
              f"target <= {r['target_s']} s: {'met' if met_c else 'NOT met'}")
    print(f"load average after the runs: {os.getloadavg()[0]:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
