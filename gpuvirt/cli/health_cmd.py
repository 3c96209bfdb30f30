"""health commands (state, history, reset, clear) and the simulator's health and vGPU controls
(``sim xid``, ``sim vgpu``)."""

from __future__ import annotations

from typing import Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.commands import sim_app
from gpuvirt.cli.render import console, emit_json, table
from gpuvirt.cli.state import state
from gpuvirt.errors import UsageError

health_app = typer.Typer(help="GPU health: state per GPU and MIG instance, XID history, reset and clear.",
                         invoke_without_command=True)
app.add_typer(health_app, name="health")


@health_app.callback()
def health(ctx: typer.Context,
           gpu: Optional[str] = typer.Option(None, "--gpu", help="Only these GPUs (selector)."),
           limit: int = typer.Option(20, "--limit", help="Newest health events to list (1-1000)."),
           json_out: bool = typer.Option(False, "--json")) -> None:
    """List the health of this host's GPUs and instances and the newest health events."""
    if ctx.invoked_subcommand is not None:
        return
    from gpuvirt.service.health import listing

    doc = listing(state(ctx).context(), limit=limit, gpu=gpu)
    if json_out:
        emit_json(doc)
        return
    out = console()
    out.print(table(f"GPU health on {doc['host']}", ["GPU", "#", "model", "health", "since", "reason",
                                                      "recovers"],
                    [[g["gpu"], g["index"], g["model"], g["health"], g.get("since"), g.get("reason"),
                      "after a reset" if g.get("needs_reset") else g.get("recovers_at")]
                     for g in doc["gpus"]]))
    if doc["instances"]:
        out.print(table("unhealthy instances", ["instance", "GPU", "device", "VM", "tenant", "since", "reason",
                                                "recovers"],
                        [[i["instance"], i["gpu"], i["device"], i["vm"], i["tenant"], i["since"], i["reason"],
                          "after a reset" if i["needs_reset"] else i["recovers_at"]] for i in doc["instances"]]))
    for r in doc["recovered_now"]:
        out.print(f"recovered now: {r['gpu']}" + (f" instance {r['instance']}" if r["instance"] else "")
                  + " (quiet period over)")
    if doc["events"]:
        out.print(table("health events (newest first)", ["at", "kind", "GPU", "XID", "GI/CI", "severity",
                                                         "scope", "device", "VM", "tenant"],
                        [[e["at"], e["kind"], e["gpu"], e["xid"],
                          "" if e["gi"] is None else f"{e['gi']}/{'' if e['ci'] is None else e['ci']}",
                          e["severity"], e["scope"], e["device"], e["vm"], e["tenant"]] for e in doc["events"]]))
    else:
        out.print("no health events recorded")


@health_app.command("reset")
def health_reset(ctx: typer.Context,
                 gpu: str = typer.Argument(..., help="GPU selector (index, PCI address, UUID)."),
                 restore: bool = typer.Option(True, "--restore/--no-restore",
                                              help="Re-create the instances the reset took (reconcile)."),
                 yes: bool = typer.Option(False, "--yes", help="Do it (a reset destroys the GPU's MIG instances)."),
                 json_out: bool = typer.Option(False, "--json")) -> None:
    """Reset a GPU (PCI function reset): it and its instances are healthy again; then restore its instances."""
    from gpuvirt.service.health import reset

    if not yes:
        raise UsageError("a GPU reset destroys its MIG instances and vGPUs on them; add --yes to go ahead")
    doc = reset(state(ctx).context(), gpu, restore=restore)
    if json_out:
        emit_json(doc)
        return
    for r in doc["reset"]:
        print(f"reset {r['gpu']}: {len(r['recovered'])} device(s) healthy again")
    if doc["restored"] is not None:
        print(f"restored: {doc['restored']['changed']} change(s), {len(doc['restored']['failed'])} failed")


@health_app.command("clear")
def health_clear(ctx: typer.Context,
                 gpu: Optional[str] = typer.Argument(None, help="GPU selector."),
                 instance: Optional[int] = typer.Option(None, "--instance", help="An instance id instead."),
                 json_out: bool = typer.Option(False, "--json")) -> None:
    """Declare a GPU or instance healthy (after a repair, or a reset done outside gpuvirt)."""
    from gpuvirt.service.health import clear

    doc = clear(state(ctx).context(), gpu=gpu, instance=instance)
    if json_out:
        emit_json(doc)
        return
    print(f"cleared {len(doc['cleared'])} device(s)" + "".join(
        f"\n  {c['gpu']}" + (f" instance {c['instance']}" if c["instance"] else "") + f": was {c['reason']}"
        for c in doc["cleared"]))


# --- simulator controls ------------------------------------------------------------------------------------------
@sim_app.command("xid")
def sim_xid(directory: str = typer.Argument(..., metavar="DIR"),
            gpu: str = typer.Option(..., "--gpu", help="GPU NVML index, PCI address or UUID."),
            xid: int = typer.Option(..., "--xid", help="XID code, e.g. 79."),
            gi: Optional[int] = typer.Option(None, "--gi", help="GPU instance id the XID is attributed to."),
            ci: Optional[int] = typer.Option(None, "--ci", help="Compute instance id within --gi."),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """Make a simulated GPU report an XID critical error through NVML's event API."""
    from gpuvirt.service import simulator

    doc = simulator.xid(directory, gpu, xid, gi=gi, ci=ci)
    if json_out:
        emit_json(doc)
        return
    print(f"XID {xid} on GPU {doc['gpu']} ({doc['address']})" + (f" GI {gi}" if gi is not None else "")
          + (f" CI {ci}" if ci is not None else "") + f": delivered to {doc['delivered_to']} event set(s)")


@sim_app.command("vgpu")
def sim_vgpu(directory: str = typer.Argument(..., metavar="DIR"),
             device: str = typer.Argument(..., help="vGPU: mdev UUID or VF PCI address"),
             vm_uuid: Optional[str] = typer.Option(None, "--vm-uuid", help="VM UUID the host driver reports."),
             fb_used_mib: Optional[int] = typer.Option(None, "--fb-used-mib", help="Framebuffer in use (MiB)."),
             sm: Optional[int] = typer.Option(None, "--sm", help="SM utilization %."),
             memory: Optional[int] = typer.Option(None, "--memory", help="Memory utilization %."),
             encoder: Optional[int] = typer.Option(None, "--encoder", help="Encoder utilization %."),
             decoder: Optional[int] = typer.Option(None, "--decoder", help="Decoder utilization %."),
             license_state: Optional[str] = typer.Option(None, "--license",
                                                         help="licensed | unlicensed | unlicensed-restricted | "
                                                         "unlicensed-unrestricted | uninitialized | unknown"),
             license_expiry: Optional[str] = typer.Option(None, "--license-expiry",
                                                          help="YYYY-MM-DDTHH:MM:SSZ | permanent | "
                                                          "not-applicable | invalid | none"),
             guest_driver: Optional[str] = typer.Option(None, "--guest-driver",
                                                        help="Guest driver version the guest reported (its "
                                                        "guest info state becomes initialized), or none."),
             guest_vgpu_version: Optional[str] = typer.Option(None, "--guest-vgpu-version",
                                                              help="Guest vGPU version, e.g. 0x120000."),
             json_out: bool = typer.Option(False, "--json")) -> None:
    """Set what the simulated host driver reports about a running vGPU (NVML vGPU-instance queries)."""
    from gpuvirt.errors import UsageError
    from gpuvirt.service import simulator

    util = {k: v for k, v in (("sm", sm), ("memory", memory), ("encoder", encoder), ("decoder", decoder))
            if v is not None}
    gver = None
    if guest_vgpu_version is not None:
        try:
            gver = int(guest_vgpu_version, 0)
        except ValueError:
            raise UsageError(f"--guest-vgpu-version '{guest_vgpu_version}' is not a number (e.g. 0x120000)") from None
    doc = simulator.vgpu(directory, device, vm_uuid=vm_uuid, fb_used_mib=fb_used_mib, util=util,
                         license_state=license_state, license_expiry=license_expiry, guest_driver=guest_driver,
                         guest_vgpu_version=gver)
    if json_out:
        emit_json(doc)
        return
    print(f"vGPU instance {doc['vgpu_id']} ({device}): " + ", ".join(f"{k}={v}" for k, v in doc["guest"].items()))
