"""plan / apply / status / reconcile / db commands."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.bounds import MAX_WAIT_SECONDS, seconds
from gpuvirt.cli.render import console, emit_json, table
from gpuvirt.cli.state import state
from gpuvirt.errors import UsageError


def confirm_or_refuse(what: str, yes: bool) -> None:
    """Changing a host needs consent: --yes, or an interactive 'y'."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"refusing to {what} without --yes (not running interactively)")
    if not typer.confirm(f"{what}?", default=False):
        raise UsageError("cancelled")


@app.command()
def plan(ctx: typer.Context,
         profile: Optional[str] = typer.Argument(None, help="Profile to plan for (omit with --pack)."),
         gpu: str = typer.Option("all", "--gpu", help="GPU selector: all, indices, PCI addresses, UUIDs or a model."),
         force: bool = typer.Option(False, "--force", help="Plan as if --force were given to apply."),
         pack: Optional[str] = typer.Option(None, "--pack", help="Pack a multiset of MIG profiles onto the fewest "
                                            "GPUs, e.g. '3g.20gb=4,1g.5gb=10' (needs --model, no host)."),
         model: Optional[str] = typer.Option(None, "--model", help="GPU model for --pack."),
         defrag: bool = typer.Option(False, "--defrag", help="Plan the fewest instance moves that make room."),
         for_profile: Optional[str] = typer.Option(None, "--for", help="Profile to make room for (--defrag)."),
         include_allocated: bool = typer.Option(False, "--include-allocated",
                                                help="--defrag may move allocated instances too."),
         policy: Optional[str] = typer.Option(None, "--policy", help="Placement policy for --defrag/--pack."),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """Show what apply would do (ordered operations, explicit placements, what is kept)."""
    # three modes with their own options: an option of another mode is a typo, not something to ignore
    mode = "--pack" if pack is not None else "--defrag" if defrag else "PROFILE"
    if pack is not None and defrag:
        raise UsageError("--pack and --defrag are separate plans; give one of them")
    if profile is not None and mode != "PROFILE":
        raise UsageError(f"{mode} plans without a profile; drop '{profile}' or drop {mode}")
    if profile is None and mode == "PROFILE":
        raise UsageError("give a PROFILE to plan for, or --pack SPEC / --defrag --for PROFILE")
    stray = [name for name, given, modes in (
        ("--model", model is not None, ("--pack",)),
        ("--for", for_profile is not None, ("--defrag",)),
        ("--include-allocated", include_allocated, ("--defrag",)),
        ("--force", force, ("PROFILE",)),
        ("--gpu", gpu != "all", ("PROFILE", "--defrag")),
        ("--policy", policy is not None, ("--pack", "--defrag")),
    ) if given and mode not in modes]
    if stray:
        raise UsageError(f"{', '.join(stray)} do(es) not apply to {'plan PROFILE' if mode == 'PROFILE' else mode}")
    if pack is not None:
        from gpuvirt.service.placement import pack_plan

        if not model:
            raise UsageError("--pack needs --model (e.g. --model a100-40gb)")
        doc = pack_plan(pack, model, policy=policy)
        if json_out:
            emit_json(doc)
            return
        out = console()
        out.print(f"{doc['gpu_count']} x {doc['model']} (lower bound {doc['lower_bound']})")
        for i, g in enumerate(doc["gpus"]):
            out.print(f"  GPU {i}: " + ", ".join(f"{x['profile']}@{x['start']}:{x['size']}" for x in g["instances"]))
        return
    if defrag:
        from gpuvirt.service.placement import defrag_plan

        if not for_profile:
            raise UsageError("--defrag needs --for PROFILE (the MIG profile to make room for)")
        doc = defrag_plan(state(ctx).context(), for_profile, gpu_selector=gpu, include_allocated=include_allocated,
                          policy=policy)
        if json_out:
            emit_json(doc)
            return
        out = console()
        if not doc["moves"] and doc.get("fits_now"):
            out.print(f"{for_profile} fits now on {doc['target']['gpu']} at start {doc['target']['start']}; "
                      "no move needed")
            return
        if doc.get("impossible"):
            out.print(f"no sequence of moves makes room for {for_profile}: {doc['reason']}")
            raise typer.Exit(4)
        out.print(f"{len(doc['moves'])} move(s) make room for {for_profile} on {doc['target']['gpu']} "
                  f"at {doc['target']['start']}:")
        for i, m in enumerate(doc["moves"], 1):
            out.print(f"  {i}. {m['description']}")
        return
    if not profile:
        raise UsageError("give a PROFILE (or --pack / --defrag)")
    from gpuvirt.service.apply import plan as svc

    doc = svc(state(ctx).context(), profile, gpu, force=force)
    if json_out:
        emit_json(doc)
        return
    render_plan(doc)


def render_plan(doc: dict) -> None:
    from rich.markup import escape

    out = console()
    for g in doc["gpus"]:
        gg = g["gpu"]
        mode = g.get("mode") or {}
        out.print(f"[bold]{gg['address']}[/bold] ({gg['model']}) -> {doc['profile']}: {g['layout']}"
                  + escape(f" [mode {mode.get('new') or 'vm'}]"))
        for k in g["keep"]:
            out.print(escape(f"  keep    {k}"))
        for i, o in enumerate(g["operations"], 1):
            out.print(escape(f"  {i:>2}.    {o['description']}"))
        if not g["operations"]:
            out.print("  nothing to do")
        for n in g["notes"]:
            out.print(escape(f"  note: {n}"))
        for b in g["blocked"]:
            out.print("  [red]blocked:[/red] " + escape(b))
    for label in doc.get("untouched", []):
        out.print(escape(f"{label}: no entry of {doc['profile']} selects it; left as it is"))


@app.command()
def apply(ctx: typer.Context,
          profile: str = typer.Argument(..., help="Profile name (see 'gpuvirt profile list')."),
          gpu: str = typer.Option(..., "--gpu", help="GPU selector: all, indices, PCI addresses, UUIDs or a model."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Only show the plan."),
          force: bool = typer.Option(False, "--force", help="Also destroy allocated or foreign instances in the way."),
          yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
          reset_gpu: Optional[bool] = typer.Option(None, "--reset-gpu/--no-reset-gpu",
                                                   help="Reset a GPU to activate a pending MIG mode change."),
          json_out: bool = typer.Option(False, "--json")) -> None:
    """Bring the selected GPUs to the profile's layout (explicit placements, rollback on failure)."""
    from gpuvirt.service import apply as svc

    c = state(ctx).context()
    if dry_run:
        doc = svc.apply(c, profile, gpu, force=force, dry_run=True)
        if json_out:
            emit_json(doc)
        else:
            render_plan(doc)
        return
    pre = svc.plan(c, profile, gpu, force=force)
    if pre["blocked"]:
        svc.apply(c, profile, gpu, force=force)  # raises the ConflictError with the reasons
    if pre["changes"]:
        if not json_out and not yes:
            render_plan(pre)
        confirm_or_refuse(f"apply {profile} to {gpu} ({pre['changes']} change(s))", yes)
    progress_cb = None
    prog = None
    if not json_out and sys.stderr.isatty():
        from rich.progress import Progress

        prog = Progress(console=console(stderr=True), transient=True)
        task = prog.add_task("applying", total=max(len(pre["gpus"]), 1))

        def progress_cb(label: str, i: int, total: int) -> None:
            prog.update(task, completed=i, description=f"applying: {label}")

        prog.start()
    try:
        result = svc.apply(c, profile, gpu, force=force, reset_gpu=reset_gpu, progress=progress_cb)
    finally:
        if prog is not None:
            prog.stop()
    doc = result.to_dict()
    if json_out:
        emit_json(doc)
        return
    out = console()
    for g in doc["gpus"]:
        out.print(f"{g['gpu']}: {len(g['operations'])} change(s), {g['state']}")
    for a in doc["unchanged"]:
        out.print(f"{a}: already matches {profile}")
    from rich.markup import escape

    for label in doc.get("untouched", []):
        out.print(escape(f"{label}: no entry of {profile} selects it; left as it is"))


@app.command()
def status(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Instances per GPU with their profile, allocation and drift between inventory and host."""
    from gpuvirt.service.reconcile import status as svc

    doc = svc(state(ctx).context())
    if json_out:
        emit_json(doc)
        return
    from rich.markup import escape

    out = console()
    for g in doc["gpus"]:
        mig = g["mig"]
        mig_s = "" if mig is None else f" MIG {'on' if mig['current'] else 'off'}" + (
            " (pending)" if mig["pending"] != mig["current"] else "")
        out.print(f"[bold]{g['address']}[/bold] {g['model'] or g['name']}{mig_s}  profile: "
                  f"{g['desired_profile'] or '-'} ({g['profile_state'] or 'none'})" + escape(_scheduler_text(g))
                  + (f"  mode: {g['mode']}" if g.get("mode") else ""))
        if g["instances"]:
            out.print(table(None, ["id", "kind", "instance", "state", "on host", "VM", "tenant"],
                            [[i["id"], i["kind"], i["label"], i["state"], "yes" if i["on_host"] else "NO",
                              (i.get("allocation") or {}).get("vm"), (i.get("allocation") or {}).get("tenant")]
                             for i in g["instances"]]))
        for d in g["drift"]:
            out.print("  [yellow]drift:[/yellow] " + escape(f"{d['kind']}: {d['target']}" +
                                                           (f" -> {d['action']}" if d["action"] else "")))
    for d in doc.get("cdi", []):
        out.print("  [yellow]CDI:[/yellow] " + escape(f"{d['kind']}: {d['target']}" +
                                                     (f" -> {d['action']}" if d["action"] else "")))
    out.print("in sync" if doc["in_sync"] else "drift found: run 'gpuvirt reconcile'")


def _scheduler_text(g: dict) -> str:
    s = g.get("vgpu_scheduler")
    if not s:
        return ""
    def text(policy: str | None, ts: int | None) -> str:
        return (policy or "unknown") + (f" {ts} us" if ts is not None else "")
    out = f"  vGPU scheduler: {text(s['policy'], s['timeslice_us'])}"
    if not s["in_sync"]:
        d = s["desired"]
        out += f" (profile: {text(d['policy'], d['timeslice_us'])})"
    return out


@app.command()
def reconcile(ctx: typer.Context,
              dry_run: bool = typer.Option(False, "--dry-run", help="Only report what would change."),
              adopt: bool = typer.Option(False, "--adopt", help="Record instances created outside gpuvirt."),
              yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
              wait: float = typer.Option(0, "--wait", help="Wait up to SECONDS for the NVIDIA driver first "
                                                             "(boot ordering without fixed sleeps)."),
              boot: bool = typer.Option(False, "--boot", help="Run as the boot unit does, before libvirt: "
                                                                "unfinished VM moves are left for a later reconcile."),
              json_out: bool = typer.Option(False, "--json")) -> None:
    """Converge host and inventory: restore after reboot, finish crashed operations, report foreign instances.
    An unfinished move between hosts is settled on both, the other host reached through policies.peer_command."""
    from gpuvirt.service.reconcile import reconcile as svc
    from gpuvirt.service.reconcile import wait_for_driver

    wait = seconds("--wait", wait, low=0, high=MAX_WAIT_SECONDS)
    c = state(ctx).context()
    if wait > 0 and not wait_for_driver(c, wait):
        print(f"gpuvirt: warning: the NVIDIA driver did not answer within {wait:g}s; reconciling what is visible",
              file=sys.stderr)
    if not dry_run:
        pre = svc(c, dry_run=True, adopt=adopt)
        if any(f["action"] for f in pre["findings"] if f["kind"] != "foreign" or adopt):
            confirm_or_refuse("reconcile this host", yes)
    from gpuvirt.service import peers as peer_sessions

    # an unfinished move between hosts is settled on both: each other host through a peer session
    # (policies.peer_command); one that cannot be reached leaves its move open for a later reconcile
    others = set() if dry_run or boot else peer_sessions.hosts_of_open_moves(c)
    with peer_sessions.reachable(c, others) as (sessions, missed):
        for why in missed:
            print(f"gpuvirt: warning: {why}; its unfinished moves stay open", file=sys.stderr)
        doc = svc(c, dry_run=dry_run, adopt=adopt, boot=boot, peers=sessions)
    from rich.markup import escape

    if json_out:
        emit_json(doc)
    else:
        out = console()
        for f in doc["findings"]:
            res = f" [{f['result']}]" if f.get("result") else ""
            out.print(escape(f"{f['gpu']}: {f['kind']}: {f['target']}" + (f" -> {f['action']}" if f["action"] else "") + res))
        if not doc["findings"]:
            out.print("host and inventory agree")
    if doc.get("failed"):
        raise typer.Exit(1)


db_app = typer.Typer(help="Inventory database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("init")
def db_init(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Create the inventory named by --db (SQLite: file 0600 in a 0700 directory) at the newest schema."""
    from gpuvirt.service import db

    doc = db.init(state(ctx).context())
    if json_out:
        emit_json(doc)
        return
    print(f"{doc['url']}: {'created' if doc['created'] else 'already exists'}, revision {doc['revision']}")


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, revision: str = typer.Argument("head")) -> None:
    """Upgrade the inventory schema (also done automatically before use)."""
    from gpuvirt.service import db

    print(db.upgrade(state(ctx).context(), revision))


@db_app.command("current")
def db_current(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Show the database URL and its schema revision."""
    from gpuvirt.service import db

    doc = db.current(state(ctx).context())
    if json_out:
        emit_json(doc)
        return
    print(f"{doc['url']}: revision {doc['revision'] or '(empty)'} (newest {doc['head']})")
    for w in doc["warnings"]:
        print(f"gpuvirt: warning: {w}", file=sys.stderr)


@db_app.command("check")
def db_check(ctx: typer.Context) -> None:
    """Fail when the ORM models and the migrations disagree (or the database is not at the newest revision)."""
    from gpuvirt.service import db

    problems = db.check(state(ctx).context())
    if problems:
        from gpuvirt.errors import InventoryError

        raise InventoryError("inventory schema drift: " + "; ".join(problems))
    print("models and migrations agree")
