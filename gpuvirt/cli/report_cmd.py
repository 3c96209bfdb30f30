"""``gpuvirt report`` (capacity on this host or across the shared inventory) and ``gpuvirt tenant ...``."""

from __future__ import annotations

import io
import sys
from typing import Any, List, Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.render import console, emit_json, table
from gpuvirt.cli.state import state
from gpuvirt.errors import UsageError


@app.command()
def report(ctx: typer.Context,
           by: str = typer.Option("gpu", "--by", help="Group rows by host | gpu | type | profile | tenant."),
           fmt: str = typer.Option("table", "--format", "-f", help="table | json | csv | prometheus "
                                   "(docs/capacity-report.md)."),
           cluster: bool = typer.Option(False, "--cluster", help="Every host in the shared inventory (stale hosts "
                                        "are flagged and not counted)."),
           host: Optional[str] = typer.Option(None, "--host", help="One host of the inventory, by host id."),
           fit: List[str] = typer.Option([], "--fit", help="NAME=COUNT[,NAME=COUNT...]: could these be placed "
                                         "now? Repeatable. Exit 0 when all fit, 4 when not."),
           output: Optional[str] = typer.Option(None, "--output", "-o", help="Write to FILE atomically (temp + "
                                                "rename), e.g. for node_exporter's textfile collector.")) -> None:
    """Capacity: what each GPU can still take (MIG placeable now, vGPU types available), who holds the rest."""
    from gpuvirt.service import report as svc

    if fmt not in svc.FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; choose one of {', '.join(svc.FORMATS)}")
    doc = svc.report(state(ctx).context(), by=by, cluster=cluster, host=host, fit=fit)
    for w in doc["warnings"]:
        print(f"gpuvirt: warning: {w}", file=sys.stderr)
    if fmt in ("json", "csv", "prometheus"):
        # JSON is compact unless a person is reading: a cluster document has thousands of GPUs
        _emit(svc.render_machine(doc, fmt, pretty=fmt == "json" and output is None and sys.stdout.isatty()),
              output)
    else:
        if output is None:
            render_report(doc, console())
        else:
            from rich.console import Console

            buf = io.StringIO()
            render_report(doc, Console(file=buf, width=140, highlight=False, soft_wrap=False))
            _emit(buf.getvalue().encode(), output)
    if doc.get("fit") is not None and not doc["fit"]["fits"]:
        raise typer.Exit(4)


def _emit(data: bytes, output: str | None) -> None:
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    from gpuvirt.service.report import write_atomic

    write_atomic(output, data)


# --- table view -----------------------------------------------------------------------------------------------------
def slice_picture(e: dict[str, Any], width: int = 9) -> list[str]:
    """Three lines for a MIG GPU: slice numbers, one box per instance spanning its memory slices with its
    profile, and who holds it (VM/tenant, or its state); ``·`` marks a free slice."""
    who_of = {a["instance"]: a["vm"] + (f"/{a['tenant']}" if a["tenant"] else "") for a in e["allocations"]}
    by_start = {r["start"]: r for r in e["layout"]}
    ruler, boxes, owners = [], [], []
    s = 0
    n = e["memory_slices"]
    while s < n:
        r = by_start.get(s)
        size = r["size"] if r is not None else 1
        span = width * size
        ruler.append(str(s).ljust(span))
        if r is None:
            boxes.append("[" + "·".center(span - 2) + "]")
            owners.append(" " * span)
        else:
            who = who_of.get(r["instance"]) or r["state"]
            boxes.append("[" + _fit_text(r["profile"], span - 2).center(span - 2) + "]")
            owners.append(" " + _fit_text(who, span - 2).center(span - 2) + " ")
        s += size
    return ["".join(ruler), "".join(boxes), "".join(owners)]


def _fit_text(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _capacity_text(e: dict[str, Any]) -> str:
    parts = []
    if "placeable_now" in e:
        parts.append(f"{e['free_memory_slices']}/{e['memory_slices']} mem, {e['free_compute_slices']}/"
                     f"{e['compute_slices']} compute slices free"
                     + (f", {e['stranded_slices']} stranded" if e["stranded_slices"] else ""))
    for key in ("vgpu_types", "mdev_types"):
        avail = [f"{n}×{name}" for name, t in e.get(key, {}).items() if (n := t["available"])]
        if avail:
            parts.append(", ".join(avail[:6]) + (" …" if len(avail) > 6 else ""))
    if "vfs" in e:
        parts.append(f"{e['vfs']['free']} VF(s) free")
    if e.get("whole_available"):
        parts.append("whole GPU free")
    return "; ".join(parts) or "-"


def _tenants_text(e: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for a in e["allocations"]:
        k = a["tenant"] or "(none)"
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())) or "-"


def render_report(doc: dict[str, Any], out: Any) -> None:
    tot = doc["totals"]
    scope = ("this host (live)" if doc["source"] == "live" else
             f"inventory, host {doc['scope']['host']}" if doc["scope"]["host"] else "inventory, all hosts")
    out.print(f"[bold]Capacity report[/bold] ({scope}) at {doc['generated_at']}: {tot['hosts']} host(s) counted"
              + (f", [yellow]{tot['stale_hosts']} stale[/yellow]" if tot["stale_hosts"] else "")
              + f", {tot['gpus']} GPU(s); instances {tot['instances']['in_use']} in use, "
                f"{tot['instances']['free']} free")
    by = doc["scope"]["by"]
    if by == "gpu":
        for h in doc["hosts"]:
            age = f", last seen {h['age_seconds']:.0f}s ago" if h["age_seconds"] is not None else ""
            stale = f" [red]STALE ({h['stale_reason']}) - not counted[/red]" if h["stale"] else ""
            out.print(f"\n[bold]{h['host']}[/bold] ({h['hostname']}{age}){stale}")
            if not h["gpus"]:
                out.print("  no GPUs recorded")
                continue
            out.print(table(None, ["GPU", "model", "mode", "in use", "free", "other", "capacity now", "tenants"],
                            [[(f"{e['index']}:" if e["index"] is not None else "") + e["gpu"], e["model"] or e["name"],
                              e["mode"], e["instances"]["in_use"], e["instances"]["free"],
                              _other(e), _health_text(e) or _capacity_text(e), _tenants_text(e)]
                             for e in h["gpus"]]))
            for e in h["gpus"]:
                if "placeable_now" not in e:
                    continue
                out.print(f"  {e['gpu']} ({e['model']}) memory slices:", highlight=False)
                for line in slice_picture(e):
                    out.print("    " + line, markup=False, highlight=False)
                placeable = ", ".join(f"{k} {v}" for k, v in e["placeable_now"].items())
                out.print(f"    placeable now: {placeable}", markup=False, highlight=False)
    else:
        g = doc["groups"]
        # columns empty in every row (e.g. MIG figures in a vGPU-only view) only take width
        keep = {"host", "item", "tenant", "in_use", "free", "available", "instances"}
        cols = [c for c in g["columns"]
                if c in keep or any(r[c] not in (None, "", 0, False) for r in g["rows"])]
        if len({r.get("kind") for r in g["rows"]}) == 1 and "kind" in cols:
            cols.remove("kind")
        out.print(_group_table(f"by {by}", cols, [[_cell(r[c]) for c in cols] for r in g["rows"]]))
    if doc["tenants"] and by != "tenant":
        rows = []
        for t in doc["tenants"]:
            q = t["quota"] or {}
            rows.append([t["tenant"] or "(none)", t["instances"], t["memory_mib"], t["compute_slices"],
                         _quota_cell(q.get("instances"), t["usage"]["instances"]),
                         _quota_cell(q.get("memory_mib"), t["usage"]["memory_mib"]),
                         _quota_cell(q.get("compute_slices"), t["usage"]["compute_slices"]),
                         "[red]OVER[/red]" if t["over_quota"] else ""])
        out.print(table("tenants", ["tenant", "instances", "memory MiB", "compute slices", "quota: instances",
                                    "memory MiB", "compute slices", ""], rows))
    if doc.get("fit"):
        render_fit(doc["fit"], out)


_SHORT = {"free_memory_slices": "free mem sl", "free_compute_slices": "free comp sl", "stranded_slices": "stranded",
          "quota_instances": "quota inst", "quota_memory_mib": "quota MiB", "quota_compute_slices": "quota sl",
          "used_instances": "used inst", "used_memory_mib": "used MiB", "used_compute_slices": "used sl",
          "compute_slices": "slices", "memory_mib": "MiB", "available": "avail"}


def _group_table(title: str, cols: list[str], rows: list[list[str]]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in cols:
        # names must stay whole; long numbers columns may wrap
        t.add_column(_SHORT.get(c, c).replace("_", " "), overflow="fold",
                     no_wrap=c in ("item", "host", "tenant", "kind"))
    for r in rows:
        t.add_row(*r)
    return t


def _health_text(e: dict) -> str:
    """An unhealthy GPU has no capacity now; say why instead (gpuvirt health has the details)."""
    h = e.get("health") or {}
    if h.get("state") != "unhealthy":
        bad = len(e["instances"].get("unhealthy") or [])
        return f"{_capacity_text(e)} ({bad} unhealthy instance{'s' if bad != 1 else ''})" if bad else ""
    return f"UNHEALTHY: {h.get('reason')}" + (", until a reset" if h.get("needs_reset") else "")


def _other(e: dict[str, Any]) -> str:
    i = e["instances"]
    bits = [f"{i[k]} {k}" for k in ("pending", "foreign", "missing") if i.get(k)]
    return ", ".join(bits) or ""


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    return str(v)


def _quota_cell(limit: Any, used: int) -> str:
    return "-" if limit is None else f"{used}/{limit}"


def render_fit(fit: dict[str, Any], out: Any) -> None:
    out.print("\n[bold]fit[/bold]: " + ("[green]everything fits[/green]" if fit["fits"] else "[red]does not fit[/red]"))
    for r in fit["requests"]:
        where = ", ".join(f"{p['host']}/{p['gpu']}×{p['count']}" for p in r["placements"][:8])
        if len(r["placements"]) > 8:
            where += f" … ({len(r['placements'])} GPUs)"
        line = f"  {r['request']}: {r['placed']}/{r['count']} placeable" + (f" on {where}" if where else "")
        out.print(line, markup=False, highlight=False)
        if r["missing"]:
            out.print(f"    missing {r['missing']}: {r['reason']}", markup=False, highlight=False)
        if r.get("rejections"):
            out.print(f"    {fit_line(r['rejections'])}", markup=False, highlight=False)


def fit_line(rej: dict[str, Any]) -> str:
    """One line per refused name of ``report --fit`` from its ``rejections`` (service.refusals.analyse_fit):
    ``3 refused: 1 shortage, 2 avoidable (1 by live moves, 1 needing a cold move), ... - see gpuvirt rebalance ...``"""
    total = rej["analysed"] + rej["not_analysed"]
    parts = []
    if rej["shortage"]["count"]:
        parts.append(f"{rej['shortage']['count']} shortage")
    av = rej["avoidable"]["count"]
    if av:
        how = {"stranded": "by moves within one GPU", "live": "by live moves", "cold": "needing a cold move",
               "stop": "only by stopping something"}
        bits = [f"{rej[c]['count']} {how[c]}" for c in ("stranded", "live", "cold", "stop") if rej[c]["count"]]
        share = rej["avoidable"]["share_of_capacity"]
        parts.append(f"{av} avoidable ({', '.join(bits)})"
                     + (f", {100 * share:.1f}% of capacity" if share is not None else ""))
    if rej["fits"]["count"]:
        parts.append(f"{rej['fits']['count']} placeable by the planner without moves")
    if rej["not_analysed"]:
        parts.append(f"{rej['not_analysed']} not analysed")
    line = f"{total} refused: " + ", ".join(parts)
    if av and rej.get("rebalance"):
        line += f" - see {rej['rebalance']}"
    return line




# --- tenants ----------------------------------------------------------------------------------------------------------
tenant_app = typer.Typer(help="Tenants and their quotas (checked by attach across all hosts).", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")


@tenant_app.command("set-quota")
def tenant_set_quota(ctx: typer.Context, name: str = typer.Argument(..., metavar="TENANT"),
                     instances: Optional[str] = typer.Option(None, "--instances", help="Most instances (or 'none')."),
                     memory_mib: Optional[str] = typer.Option(None, "--memory-mib",
                                                              help="Most GPU memory in MiB (or 'none')."),
                     compute_slices: Optional[str] = typer.Option(None, "--compute-slices",
                                                                  help="Most MIG compute slices (or 'none')."),
                     force: bool = typer.Option(False, "--force", help="Allow a limit below current usage."),
                     json_out: bool = typer.Option(False, "--json")) -> None:
    """Set or remove a tenant's limits (limits not given stay as they are)."""
    from gpuvirt.service import tenants as svc

    doc = svc.set_quota(state(ctx).context(), name, instances=instances, memory_mib=memory_mib,
                        compute_slices=compute_slices, force=force)
    if json_out:
        emit_json(doc)
        return
    q = doc["quota"]
    print(f"tenant {name}: " + ", ".join(f"{k.replace('_', ' ')} {_limit_text(q[k], doc['usage'][k])}"
                                           for k in svc.LIMITS)
          + ("" if doc["changed"] else " (unchanged)"))


def _limit_text(limit: Any, used: int) -> str:
    return f"{used}/unlimited" if limit is None else f"{used}/{limit}"


@tenant_app.command("list")
def tenant_list(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Tenants with quotas or allocations, usage across all hosts against the quota."""
    from gpuvirt.service import tenants as svc

    rows = svc.list_tenants(state(ctx).context())
    if json_out:
        emit_json(rows)
        return
    if not rows:
        print("no tenants (set a quota with 'gpuvirt tenant set-quota', or attach with --tenant)")
        return
    console().print(table(None, ["tenant", "instances", "memory MiB", "compute slices", "over quota"],
                          [[r["tenant"]] + [_limit_text((r["quota"] or {}).get(k), r["usage"][k])
                                            for k in svc.LIMITS] + ["yes" if r["over_quota"] else ""]
                           for r in rows]))


@tenant_app.command("show")
def tenant_show(ctx: typer.Context, name: str = typer.Argument(..., metavar="TENANT"),
                json_out: bool = typer.Option(False, "--json")) -> None:
    """One tenant: quota, usage and its allocations on every host."""
    from gpuvirt.service import tenants as svc

    doc = svc.show(state(ctx).context(), name)
    if json_out:
        emit_json(doc)
        return
    out = console()
    out.print(f"[bold]{name}[/bold]: " + ", ".join(
        f"{k.replace('_', ' ')} {_limit_text((doc['quota'] or {}).get(k), doc['usage'][k])}" for k in svc.LIMITS)
        + (" [red]over quota[/red]" if doc["over_quota"] else ""))
    if doc["allocations"]:
        out.print(table(None, ["host", "GPU", "instance", "kind", "profile/type", "memory MiB", "VM", "state"],
                        [[a["host"], a["gpu"], a["instance"], a["kind"], a["item"], a["memory_mib"], a["vm"],
                          a["vm_state"] or ""] for a in doc["allocations"]]))
