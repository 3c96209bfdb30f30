"""``gpuvirt rebalance``: plan (and with --execute carry out) the fewest VM device moves that make room."""

from __future__ import annotations


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
                                           "inventory (moves may cross hosts)."),
              max_moves: int = typer.Option(3, "--max-moves", min=0, max=MAX_MOVES_LIMIT,
                                            help="Most moves a plan may use."),
              allow: str = typer.Option("live", "--allow", help="Move kinds allowed: live, cold or live,cold."),
              execute: bool = typer.Option(False, "--execute", help="Carry the plan out (journalled)."),
              yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before --execute."),
              json_out: bool = typer.Option(False, "--json")) -> None:
    """Plan the fewest moves of VMs' vGPUs that make room for a request (exit 4 when none within the budget)."""
    from gpuvirt.service import rebalance as svc

    c = state(ctx).context()
    if execute:
        from gpuvirt.cli.ops_cmd import confirm_or_refuse
        from gpuvirt.service import rebalance_exec

        policy = svc.make_policy(max_moves=max_moves, allow=allow)     # bad options refused before asking
        confirm_or_refuse(f"move VMs' devices to make room for {for_}", yes)
        doc = rebalance_exec.rebalance_and_execute(c, for_, cluster=cluster, policy=policy)
    else:
        doc = svc.rebalance(c, for_, cluster=cluster, max_moves=max_moves, allow=allow)
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
    for g in doc.get("gpus", []):
        out.print(escape(f"  {g['host']}/{g['gpu']} ({g['model']}): {g['before']}  ->  {g['after']}"))
        for letter, who in sorted(g["legend"].items()):
            out.print(escape(f"      {letter} = {who}"))
