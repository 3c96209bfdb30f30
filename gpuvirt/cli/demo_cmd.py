"""``gpuvirt demo``: the whole main job on a fresh simulated host."""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.render import console


def _render(step: str, data: Any) -> None:
    from rich.markup import escape
    from rich.rule import Rule

    out = console()
    out.print(Rule(f"[bold]{escape(step)}[/bold]", align="left"))
    if step in ("sim init", "sim reboot"):
        out.print(escape(f"simulated host {data['dir']} (boot {data['boot']}): " + ", ".join(
            f"{d['model']}@{d['address']} ({d['vfs']} VFs)" for d in data["devices"])))
    elif step.startswith("apply"):
        for g in data["gpus"]:
            out.print(escape(f"{g['gpu']}: {len(g['operations'])} operation(s), {g['state']}"))
            for o in g["operations"]:
                out.print(escape(f"   {o['description']}"))
        for a in data["unchanged"]:
            out.print(escape(f"{a}: already matches {data['profile']} - nothing to do"))
    elif step == "create-profile":
        out.print(escape(f"{data.get('name')}: {data.get('summary') or data.get('layout') or data}"))
    elif step == "reconcile":
        for f in data["findings"]:
            out.print(escape(f"{f['gpu']}: {f['kind']}: {f['target']} -> {f['action']} [{f.get('result')}]"))
        if not data["findings"]:
            out.print("host and inventory agree")
    elif step == "discover":
        from gpuvirt.cli.commands import render_discovery

        render_discovery(data)
    elif step in ("plan",):
        from gpuvirt.cli.ops_cmd import render_plan

        render_plan(data)
    elif step == "status":
        for g in data["gpus"]:
            out.print(escape(f"{g['address']} {g['model']}: profile {g['desired_profile'] or '-'} "
                             f"({g['profile_state'] or 'none'}), {len(g['instances'])} instance(s)"))
            for i in g["instances"]:
                vm = (i.get("allocation") or {}).get("vm")
                out.print(escape(f"   #{i['id']} {i['label']} {i['state']}" + (f" -> {vm}" if vm else "")))
    elif step == "libvirt domain XML":
        out.print(escape(data), highlight=False)
    elif step == "report":
        from gpuvirt.cli.report_cmd import render_report

        render_report(data, out)
    elif isinstance(data, (dict, list)):
        out.print(escape(json.dumps(data, indent=2, default=str)[:3000]))
    else:
        out.print(escape(str(data)))


@app.command()
def demo(directory: Optional[str] = typer.Option(None, "--dir", help="Keep the simulated host in DIR "
                                                 "(default: a temporary directory, removed afterwards). DIR must "
                                                 "be new, empty or a previous demo's, which is started afresh."),
         keep: bool = typer.Option(False, "--keep", help="Keep the temporary directory.")) -> None:
    """Run the main job end to end on a built-in simulated host (no GPU needed)."""
    from gpuvirt.service.demo import run

    summary = run(directory, _render, keep=keep or directory is not None)
    console().print(f"[bold green]demo finished[/bold green] ({summary['dir']}"
                    + (", removed" if summary.get("removed") else "") + ")")
