"""attach / detach / allocations / hook / mdevctl / install-units / watch commands."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.bounds import MAX_DEBOUNCE_SECONDS, MAX_INSTANCE_ID, MAX_RUNS, MIN_DEBOUNCE_SECONDS, seconds
from gpuvirt.cli.render import console, emit_json, table
from gpuvirt.cli.state import state
from gpuvirt.errors import UsageError

FORMATS = ("libvirt", "qemu", "cloud-hypervisor", "json", "cdi")


@app.command()
def attach(ctx: typer.Context,
           vm: str = typer.Argument(..., help="VM (libvirt domain) name, or the container's name with --format cdi."),
           vgpu: Optional[str] = typer.Option(None, "--vgpu", help="vGPU type, e.g. A2-2Q, A100-4C, nvidia-745."),
           mig: Optional[str] = typer.Option(None, "--mig", help="MIG profile, e.g. 1g.5gb."),
           vf: bool = typer.Option(False, "--vf", help="A whole SR-IOV VF."),
           mdev: Optional[str] = typer.Option(None, "--mdev", help="Generic mdev type, e.g. i915-GVTg_V5_4."),
           instance: Optional[int] = typer.Option(None, "--instance", min=1, max=MAX_INSTANCE_ID,
                                                  help="A specific instance id."),
           tenant: Optional[str] = typer.Option(None, "--tenant"),
           count: int = typer.Option(1, "--count", min=1, max=64),
           persistent: bool = typer.Option(True, "--persistent/--transient",
                                           help="Transient: freed (and destroyed if created now) when the VM stops."),
           vm_uuid: Optional[str] = typer.Option(None, "--vm-uuid", help="VM UUID (QEMU -uuid for NVIDIA vGPU)."),
           gpu: Optional[str] = typer.Option(None, "--gpu", help="Limit to these GPUs (selector); with --format cdi "
                                                           "and no --mig, the whole GPU."),
           display: bool = typer.Option(False, "--display", help="mdev: display='on' (needs VNC/SPICE graphics)."),
           ramfb: bool = typer.Option(False, "--ramfb", help="mdev: ramfb='on' boot display (implies --display)."),
           fmt: str = typer.Option("libvirt", "--format",
                                   help="libvirt | qemu | cloud-hypervisor | json | cdi (a container: prints the "
                                        "CDI device name)"),
           domain_xml: Optional[str] = typer.Option(None, "--domain-xml",
                                                    help="Insert the hostdev into this domain XML file in place."),
           allow_moves: Optional[str] = typer.Option(None, "--allow-moves",
                                                     help="When nothing fits, move other VMs' vGPUs first (live, "
                                                          "cold or live,cold; at most policies.rebalance_max_moves)."),
           ) -> None:
    """Give a VM a free instance (creating one where the layout allows) and print what the VMM needs; with
    --format cdi, give a container a MIG device or a whole GPU and print its CDI device name."""
    from gpuvirt.service.attach import attach as svc
    from gpuvirt.vmm.handoff import render, warnings_for

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}")
    if fmt == "cdi":
        if allow_moves is not None:
            raise UsageError("--allow-moves moves VMs' vGPUs; it does not apply to --format cdi")
        got = svc(state(ctx).context(), vm, vgpu=vgpu, mig=mig, vf=vf, instance=instance, mdev=mdev, tenant=tenant,
                  count=count, persistent=persistent, vm_uuid=vm_uuid, gpu=gpu, display=display, ramfb=ramfb,
                  domain_xml=domain_xml, fmt=fmt)
        sys.stdout.write("".join(d["name"] + "\n" for d in got))
        return
    if allow_moves is not None:
        from functools import partial

        from gpuvirt.service.rebalance_exec import attach_with_moves

        svc = partial(attach_with_moves, allow=allow_moves)
    else:
        # a refusal for lack of room says whether moves would have made it (docs/operator-guide.md)
        from gpuvirt.service.refusals import attach_explained as svc
    handoffs = svc(state(ctx).context(), vm, vgpu=vgpu, mig=mig, vf=vf, instance=instance, mdev=mdev,
                   tenant=tenant, count=count, persistent=persistent, vm_uuid=vm_uuid, gpu=gpu,
                   display=display or ramfb, ramfb=ramfb, domain_xml=domain_xml, fmt=fmt)
    sys.stdout.write(render(handoffs, fmt).rstrip("\n") + "\n")
    for w in warnings_for(handoffs, fmt):
        print(f"gpuvirt: warning: {w}", file=sys.stderr)


@app.command()
def detach(ctx: typer.Context,
           vm: str = typer.Argument(..., help="VM (libvirt domain) name."),
           instance: Optional[int] = typer.Option(None, "--instance", min=1, max=MAX_INSTANCE_ID,
                                                  help="Only this instance."),
           force: bool = typer.Option(False, "--force", help="Even while the VM is recorded as running."),
           domain_xml: Optional[str] = typer.Option(None, "--domain-xml",
                                                    help="Remove the hostdev from this domain XML file in place."),
           json_out: bool = typer.Option(False, "--json")) -> None:
    """Free a VM's allocations; transient ones are destroyed."""
    from gpuvirt.service.detach import detach as svc

    out = svc(state(ctx).context(), vm, instance=instance, force=force, domain_xml=domain_xml)
    if json_out:
        emit_json(out)
        return
    for r in out:
        print(f"freed {r['label']} (instance {r['instance']})" + (" and destroyed it" if r["destroyed"] else ""))


@app.command()
def allocations(ctx: typer.Context, vm: Optional[str] = typer.Option(None, "--vm"),
                tenant: Optional[str] = typer.Option(None, "--tenant"),
                json_out: bool = typer.Option(False, "--json")) -> None:
    """List this host's allocations (instance <-> VM <-> tenant)."""
    from gpuvirt.service.attach import allocations as svc

    rows = svc(state(ctx).context(), vm=vm, tenant=tenant)
    if json_out:
        emit_json(rows)
        return
    console().print(table(None, ["VM / container", "consumer", "tenant", "instance", "kind", "GPU", "persistent",
                                 "VM state"],
                          [[r["vm"], r["consumer"], r["tenant"], f"{r['instance']} {r['label']}", r["kind"], r["gpu"],
                            "yes" if r["persistent"] else "no", r["vm_state"]] for r in rows]))


hook_app = typer.Typer(help="The libvirt qemu hook.", no_args_is_help=True)
app.add_typer(hook_app, name="hook")


@hook_app.command("install")
def hook_install(ctx: typer.Context, force: bool = typer.Option(False, "--force")) -> None:
    """Write <root>/etc/libvirt/hooks/qemu.d/50-gpuvirt (embeds this root/simulator/config)."""
    from gpuvirt.service.hook import install

    r = install(state(ctx).context(), force=force)
    print(("installed " if r["changed"] else "already installed: ") + r["path"])
    if r.get("note"):
        print(r["note"])


@hook_app.command("uninstall")
def hook_uninstall(ctx: typer.Context) -> None:
    """Remove the hook script written by 'gpuvirt hook install'."""
    from gpuvirt.service.hook import uninstall

    r = uninstall(state(ctx).context())
    print(("removed " if r["removed"] else "not installed: ") + r["path"])


@hook_app.command("libvirt-qemu", context_settings={"ignore_unknown_options": True})
def hook_libvirt_qemu(ctx: typer.Context, args: List[str] = typer.Argument(None)) -> None:
    """Entry point libvirtd calls: <domain> <operation> <sub-operation> <extra>, domain XML on stdin."""
    from gpuvirt.cli.hook_main import run_hook

    st = state(ctx)
    code = run_hook(list(args or []), root=st.root, sim=st.sim, db=st.db, host_id=st.host_id, config=st.config,
                    debug=st.debug)
    if code:
        raise typer.Exit(code)


mdevctl_app = typer.Typer(help="Interoperate with mdevctl (and libvirt node devices).", no_args_is_help=True)
app.add_typer(mdevctl_app, name="mdevctl")


@mdevctl_app.command("export")
def mdevctl_export(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Write etc/mdevctl.d/<parent>/<uuid> definitions for gpuvirt's persistent mdevs."""
    from gpuvirt.service.mdevctl_sync import export

    r = export(state(ctx).context())
    if json_out:
        emit_json(r)
        return
    print(f"{len(r['written'])} definition(s) written, {len(r['unchanged'])} unchanged, "
          f"{len(r['removed'])} stale removed, in {r['directory']}")
    for sk in r["skipped"]:
        print(f"gpuvirt: warning: {sk['parent']}/{sk['uuid']}: skipped: {sk['reason']}", file=sys.stderr)


@mdevctl_app.command("import")
def mdevctl_import(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Adopt mdevctl definitions into the inventory."""
    from gpuvirt.service.mdevctl_sync import import_

    r = import_(state(ctx).context())
    if json_out:
        emit_json(r)
        return
    print(f"adopted {len(r['adopted'])} definition(s), {len(r['already_known'])} already known")
    for w in r["warnings"]:
        print(f"gpuvirt: warning: {w['path']}: {w['message']}", file=sys.stderr)


@app.command("install-units")
def install_units(ctx: typer.Context, force: bool = typer.Option(False, "--force")) -> None:
    """Install the boot-restore (reconcile) and udev-watch systemd units under <root>/etc/systemd/system."""
    from gpuvirt.service.units import install

    r = install(state(ctx).context(), force=force)
    if not r["changed"]:
        print("units already installed and up to date: " + ", ".join(r["units"]))
        return
    for u in r["units"]:
        print(f"wrote {u}")
    print(f"next: {r['next']}")


@app.command()
def watch(ctx: typer.Context,
          events: Optional[str] = typer.Option(None, "--events", help="Replay events from a JSON-lines FILE (- for "
                                               "stdin) instead of listening to udev."),
          debounce: float = typer.Option(2.0, "--debounce", help="Seconds of quiet before acting on a burst."),
          max_runs: Optional[int] = typer.Option(None, "--max-runs", min=1, max=MAX_RUNS,
                                                 help="Stop after this many restore runs."),
          once: bool = typer.Option(False, "--once", help="Handle the pending NVML (and --events) events, write "
                                    "down due health recoveries, and exit."),
          wait: float = typer.Option(0.0, "--wait", help="With --once: wait up to this many seconds for the first "
                                     "NVML event (NVML delivers only events that happen while subscribed)."),
          nvml: bool = typer.Option(True, "--nvml/--no-nvml", help="Follow GPU health through NVML XID events."),
          udev: bool = typer.Option(True, "--udev/--no-udev", help="Follow udev (device restore); --no-udev: "
                                    "health only."),
          json_out: bool = typer.Option(False, "--json")) -> None:
    """Restore a parent's devices when it (re)appears (udev: MDEV_STATE=registered, VF added) and record GPU
    health from NVML XID events."""
    from gpuvirt.service.health import Monitor
    from gpuvirt.service.watch import file_source, once as svc_once, ticker_source, udev_source, watch as svc

    debounce = seconds("--debounce", debounce, low=MIN_DEBOUNCE_SECONDS, high=MAX_DEBOUNCE_SECONDS)
    wait = seconds("--wait", wait, low=0, high=MAX_DEBOUNCE_SECONDS)
    if wait and not once:
        raise UsageError("--wait goes with --once")
    c = state(ctx).context()
    if once:
        doc = svc_once(c, wait=wait, source=file_source(events) if events else None, nvml=nvml)
        if json_out:
            emit_json(doc)
            return
        sub = doc["nvml"]
        if sub is not None and sub["unavailable"]:
            print(f"NVML: {sub['unavailable']}")
        for e in doc["events"]:
            print(_event_line(e))
        for r in doc["recovered"]:
            print(f"recovered: {r['gpu']}" + (f" instance {r['instance']}" if r["instance"] else "")
                  + f" (quiet for {r['quiet_seconds']:g}s after {r['reason']})")
        for err in doc["errors"]:
            print(f"gpuvirt: warning: {err}", file=sys.stderr)
        for run in doc["runs"]:
            print(f"restored {', '.join(run['parents'])}: {run.get('changed', 0)} change(s)")
        return

    def on_run(run: dict) -> None:
        print(json.dumps(run) if json_out else
              f"restored {', '.join(run['parents'])}: {run.get('changed', 0)} change(s)"
              + (f", error: {run['error']}" if run.get("error") else ""), flush=True)

    def on_health(item: dict) -> None:
        if json_out:
            print(json.dumps(item, default=str), flush=True)
        elif "event" in item:
            print(_event_line(item["event"]), flush=True)
        elif "recovered" in item:
            r = item["recovered"]
            print(f"recovered: {r['gpu']}" + (f" instance {r['instance']}" if r["instance"] else ""), flush=True)
        else:
            print(f"gpuvirt: warning: {item.get('error')}", file=sys.stderr, flush=True)

    if not udev and events:
        raise UsageError("--events replays udev events; it does not go with --no-udev")
    if not udev and not nvml:
        raise UsageError("--no-udev and --no-nvml leave nothing to watch")
    source = file_source(events) if events else (udev_source(debounce) if udev else ticker_source(debounce))
    monitor = None
    if nvml:
        monitor = Monitor(c, report=on_health)
        sub = monitor.start()
        if sub["unavailable"]:
            print(f"gpuvirt: warning: GPU health not followed: {sub['unavailable']}", file=sys.stderr, flush=True)
        elif not json_out:
            print(f"following XID events on {len(sub['gpus'])} GPU(s)", flush=True)
    try:
        svc(c, source, max_runs=max_runs, on_run=on_run, monitor=monitor)
    finally:
        if monitor is not None:
            monitor.close()


def _event_line(e: dict) -> str:
    where = e["gpu"] or e.get("uuid") or "?"
    inst = f" GI {e['gi']}" + (f" CI {e['ci']}" if e["ci"] is not None else "") if e["gi"] is not None else ""
    what = {"non-fatal": "recorded, still healthy", "fatal": "unhealthy", "reset": "unhealthy until reset"}
    target = (f"instance {e['instance']} ({e['device']})" if e["instance"] is not None else
              "an instance gpuvirt does not own" if e["scope"] == "foreign" else "GPU")
    vms = ", ".join(sorted({c["vm"] for c in e["consumers"]}))
    label = f"XID {e['xid']}" if e["xid"] is not None else "double-bit ECC error"
    return (f"{label} on {where}{inst}: {target} {what.get(e['severity'], e['severity'])}"
            + (f"; affects {vms}" if vms else ""))
