"""``gpuvirt cdi check|list``: the CDI specs gpuvirt keeps for containers (docs/containers.md)."""

from __future__ import annotations

from typing import Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.render import console, emit_json, table
from gpuvirt.cli.state import state

EXIT_DRIFT = 9

cdi_app = typer.Typer(help="CDI specs of devices handed to containers: check them, list them.", no_args_is_help=True)
app.add_typer(cdi_app, name="cdi")


@cdi_app.command("check")
def cdi_check(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """List gpuvirt's specs that are stale, missing or outdated, and foreign specs; exit 9 unless in sync."""
    from gpuvirt.service import containers

    doc = containers.check(state(ctx).context())
    if json_out:
        emit_json(doc)
    else:
        print(f"spec folder {doc['spec_dir']} (kinds {doc['vendor']}/mig, /gpu, /vfio)")
        for key, what in (("missing", "missing"), ("outdated", "outdated"), ("stale", "stale")):
            for i in doc[key]:
                print(f"{what}: {i['name']} ({i['path']}, instance {i.get('instance')})")
        for i in doc["unresolved"]:
            print(f"cannot render: instance {i['instance']} of {i['consumer']} on {i['gpu']}: {i['error']}")
        for i in doc["conflicts"]:
            print(f"conflict: {i['path']}: {i['why']}")
        for i in doc["foreign"]:
            print(f"foreign (left alone): {i['path']} ({i.get('kind') or 'unreadable'}"
                  + (f", {len(i['devices'])} device(s)" if i.get("devices") else "") + ")")
        print(f"{len(doc['ok'])} spec(s) in sync" if doc["in_sync"] else
              "specs out of sync: run 'gpuvirt reconcile'")
    if not doc["in_sync"]:
        raise typer.Exit(EXIT_DRIFT)


@cdi_app.command("list")
def cdi_list(ctx: typer.Context, name: Optional[str] = typer.Argument(None, help="Only this container."),
             json_out: bool = typer.Option(False, "--json")) -> None:
    """Container allocations of this host and the CDI device name each one uses now."""
    from gpuvirt.service import containers

    rows = containers.listing(state(ctx).context(), name)
    if json_out:
        emit_json(rows)
        return
    console().print(table(None, ["container", "tenant", "instance", "GPU", "CDI device"],
                          [[r["consumer"], r["tenant"], f"{r['instance']} {r['label']}", r["gpu"],
                            r["name"] or "(no spec: run 'gpuvirt reconcile')"] for r in rows]))
