"""``gpuvirt rebalance``: plan (and with --execute carry out) the fewest VM device moves that make room."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.render import console, emit_json
from gpuvirt.cli.state import state
from gpuvirt.model.moves import MAX_MOVES_LIMIT


@app.command()
def rebalance(ctx: typer.Context,
              for_: str = typer.Option(..., "--for", help="MIG profile or vGPU type to make room for, e.g. "
                                       "3g.20gb or A100-7-40C."),
              cluster: bool = typer.Option(False, "--cluster", help="Plan over every host of the shared "
                                           "inventory (moves may cross hosts; with --execute each other host "
                                           "a move touches is reached through policies.peer_command, ssh by "
                                           "default, and the request is placed only on this host)."),
              max_moves: int = typer.Option(3, "--max-moves", min=0, max=MAX_MOVES_LIMIT,
                                            help="Most moves a plan may use."),
              allow: str = typer.Option("live", "--allow", help="Move kinds allowed: live, cold or live,cold."),
              prefer: Optional[str] = typer.Option(None, "--prefer", help="Among plans with as many (cold) moves: "
                                                   "data (least data moved) or fragmentation (free space easiest "
                                                   "to fill). Default: policies.rebalance_prefer (data)."),
              execute: bool = typer.Option(False, "--execute", help="Carry the plan out (journalled)."),
              yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before --execute."),
              vm: Optional[str] = typer.Option(None, "--vm", help="With --execute: attach the request to this VM "
                                               "once there is room (as 'attach VM --vgpu/--mig' would)."),
              tenant: Optional[str] = typer.Option(None, "--tenant", help="With --vm: the VM's tenant."),
              vm_uuid: Optional[str] = typer.Option(None, "--vm-uuid", help="With --vm: the VM's UUID (QEMU "
                                                    "needs it for an NVIDIA vGPU), as for attach."),
              fmt: Optional[str] = typer.Option(None, "--format", help="With --vm: print the hand-off for this "
                                                "VMM (libvirt, qemu, cloud-hypervisor, json), as attach does."),
              json_out: bool = typer.Option(False, "--json")) -> None:
    """Plan the fewest moves of VMs' vGPUs that make room for a request (exit 4 when none within the budget);
    with --execute carry them out and place the request (at --vm, else as a free instance)."""
    from gpuvirt.errors import UsageError
    from gpuvirt.service import rebalance as svc

    if vm is None and (tenant is not None or fmt is not None or vm_uuid is not None):
        raise UsageError("--tenant, --vm-uuid and --format go with --vm")
    if vm is not None and not execute:
        raise UsageError("--vm places the request once the moves are done: it needs --execute")
    if fmt is not None and fmt not in ("libvirt", "qemu", "cloud-hypervisor", "json"):
        raise UsageError("--format must be one of libvirt, qemu, cloud-hypervisor, json")
    c = state(ctx).context()
    prefer = prefer if prefer is not None else svc.default_prefer(c)
    handoffs = None
    if execute:
        from gpuvirt.cli.ops_cmd import confirm_or_refuse
        from gpuvirt.service import rebalance_exec
        from gpuvirt.service.attach import check_tenant, check_vm_name

        policy = svc.make_policy(max_moves=max_moves, allow=allow, prefer=prefer)     # bad options refused before asking
        if vm is not None:
            check_vm_name(vm)
            check_tenant(tenant)
        confirm_or_refuse(f"move VMs' devices to make room for {for_}" + (f" and attach it to {vm}" if vm else ""),
                          yes)
        doc, handoffs = rebalance_exec.execute_for(c, for_, policy=policy, cluster=cluster, vm=vm, tenant=tenant,
                                                   vm_uuid=vm_uuid, fmt=fmt, remote=True)
    else:
        doc = svc.rebalance(c, for_, cluster=cluster, max_moves=max_moves, allow=allow, prefer=prefer)
    for w in doc.get("warnings", ()):
        print(f"gpuvirt: warning: {w}", file=sys.stderr)
    if handoffs and fmt is not None:
        from gpuvirt.vmm.handoff import render as render_handoff

        # attach rendered it once already, inside its all-or-nothing block: what it could not render was undone
        doc["placed"]["handoff"] = render_handoff(handoffs, fmt)
    if json_out:
        emit_json(doc)
    else:
        render(doc)
    if not doc["feasible"]:
        raise typer.Exit(4)


def render(doc: dict) -> None:
    from rich.markup import escape

    out = console()
    out.print(escape(f"{doc['request']}: {doc['reason']}"))
    for i, m in enumerate(doc["moves"], 1):
        f, t = m["from"], m["to"]
        where = (lambda s: f"{s['host']}/{s['gpu']}" + ("" if s.get("placement") is None else f"@{s['placement']}"))
        done = f" [{m['result']}]" if m.get("result") else ""
        out.print(escape(f"  {i}. {m['kind']} move of {m['vm'] or 'instance ' + str(f['instance'])}: {where(f)} -> "
                         f"{where(t)} ({m['data_mib']} MiB){done}"))
        if m.get("target_xml_error"):
            out.print(escape(f"     target XML: {m['target_xml_error']}"))
    if doc.get("unlocks"):
        u = doc["unlocks"]
        out.print(escape(f"  then {doc['request']} fits on {u['host']}/{u['gpu']}"
                         + ("" if u.get("placement") is None else f" at {u['placement']}")))
    p = doc.get("placed")
    if p is not None:
        where = f"{p['host']}/{p['gpu']}" + ("" if p.get("placement") is None else f" at {p['placement']}")
        if p.get("vm"):
            out.print(escape(f"  placed: {doc['request']} attached to VM {p['vm']} (instance {p['instance']}, "
                             f"device {p['device']}) on {where}"))
        else:
            what = "created as a free instance" if p.get("created") else "is the free instance"
            out.print(escape(f"  placed: {doc['request']} {what} {p['instance']} on {where}; the next attach gets it"))
    if doc.get("ram_known") is False and doc["moves"]:
        out.print("  data moved counts vGPU framebuffer only where libvirt could not say a VM's guest RAM")
    for g in doc.get("gpus", []):
        out.print(escape(f"  {g['host']}/{g['gpu']} ({g['model']}): {g['before']}  ->  {g['after']}"))
        for letter, who in sorted(g["legend"].items()):
            out.print(escape(f"      {letter} = {who}"))
    if p is not None and p.get("handoff"):
        import sys

        sys.stdout.write(p["handoff"].rstrip("\n") + "\n")
