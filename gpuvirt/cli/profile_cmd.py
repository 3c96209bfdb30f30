"""Profile commands: ``create-profile`` and ``profile list|show|delete|export|import``.

Each command parses options, calls one function of :mod:`gpuvirt.service.profiles` and renders the result;
errors are gpuvirt errors and reach the error boundary in :mod:`gpuvirt.cli.app` unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.render import console, emit_json, table
from gpuvirt.cli.state import state
from gpuvirt.errors import UsageError

profile_app = typer.Typer(help="Partition profiles: list, show, delete, export and import (mig-parted, "
                               "vgpu-device-manager or gpuvirt YAML).", no_args_is_help=True)
app.add_typer(profile_app, name="profile")


def _warn(lines: List[str]) -> None:
    for w in lines:
        print(f"gpuvirt: warning: {w}", file=sys.stderr)


@app.command("create-profile")
def create_profile(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Profile name (letters, digits, '.', '_', '-')."),
    mig: Optional[List[str]] = typer.Option(None, "--mig", metavar="PROFILE=COUNT",
                                            help="MIG GPU instances, e.g. --mig 3g.20gb=1 --mig 1g.5gb=2 "
                                                 "(repeatable)."),
    vgpu: Optional[List[str]] = typer.Option(None, "--vgpu", metavar="TYPE=COUNT",
                                             help="NVIDIA vGPU type by name (A2-2Q) or id (nvidia-745) "
                                                  "(repeatable)."),
    mdev: Optional[List[str]] = typer.Option(None, "--mdev", metavar="TYPE=COUNT",
                                             help="Generic mdev type, e.g. i915-GVTg_V5_4=2 or mtty-2=4 "
                                                  "(repeatable)."),
    sriov_vfs: Optional[int] = typer.Option(None, "--sriov-vfs", metavar="N", help="Number of SR-IOV VFs."),
    vgpu_scheduler: Optional[str] = typer.Option(None, "--vgpu-scheduler", metavar="POLICY",
                                                 help="vGPU scheduler policy for time-sliced vGPUs: best-effort | "
                                                      "equal-share | fixed-share (set before the vGPUs are "
                                                      "created)."),
    timeslice_us: Optional[int] = typer.Option(None, "--timeslice-us", metavar="N",
                                               help="Time slice of equal-share / fixed-share, in microseconds "
                                                    "(100 to 1000000; the GPU's own range is checked by plan)."),
    model: Optional[str] = typer.Option(None, "--model", help="GPU model the profile is for (e.g. a100-40gb); "
                                        "without it, it must fit every model it is applied to."),
    description: Optional[str] = typer.Option(None, "--description", help="Free text."),
    from_file: Optional[str] = typer.Option(None, "--from-file", metavar="FILE",
                                            help="Read the profile from YAML (gpuvirt format, or a mig-parted / "
                                                 "vgpu-device-manager config holding a config named NAME)."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite an existing profile of that name."),
    mode: Optional[str] = typer.Option(None, "--mode", help="What the GPUs it is applied to serve: vm (default) or "
                                       "containers (MIG devices or the whole GPU through CDI)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Create a partition profile (validated against the GPU models it can apply to before it is stored)."""
    from gpuvirt.service import profiles as svc

    doc = svc.create_profile(state(ctx).context(), name, mig=mig or [], vgpu=vgpu or [], mdev=mdev or [],
                             sriov_vfs=sriov_vfs, model=model, description=description, from_file=from_file,
                             replace=replace, vgpu_scheduler=vgpu_scheduler, timeslice_us=timeslice_us,
                             mode=mode)
    if json_out:
        emit_json(doc)
        return
    verb = "replaced" if doc["replaced"] else "created"
    models = ", ".join(doc["validation"]["models"]) or "no known model"
    print(f"{verb} profile {doc['name']} ({doc['kind']}" + (f", mode {doc['mode']}" if doc["mode"] != "vm" else "")
          + (f", for {doc['model']}" if doc["model"] else "") + f"): {doc['summary']}")
    print(f"  validated on: {models}")
    _warn(doc["validation"]["warnings"])


@profile_app.command("list")
def profile_list(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")
                 ) -> None:
    """List stored and built-in profiles."""
    from gpuvirt.service import profiles as svc

    rows = svc.list_profiles(state(ctx).context())
    if json_out:
        emit_json(rows)
        return
    if not rows:
        print("no profiles")
        return
    console().print(table(None, ["name", "kind", "mode", "model", "source", "stored", "GPUs", "layout"],
                          [[r["name"], r["kind"], r.get("mode") or "vm", r["model"] or "any", r["source"],
                            "yes" if r["stored"] else "no", len(r["gpus"]), r["summary"]] for r in rows]))


@profile_app.command("show")
def profile_show(ctx: typer.Context, name: str = typer.Argument(...),
                 json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show a profile and what it resolves to on each GPU model it can apply to."""
    from gpuvirt.service import profiles as svc

    doc = svc.show_profile(state(ctx).context(), name)
    if json_out:
        emit_json(doc)
        return
    flags = [doc["kind"]]
    if doc["builtin"]:
        flags.append("built in")
    flags.append("stored" if doc["stored"] else "not stored")
    print(f"profile {doc['name']} ({', '.join(flags)})")
    print(f"  model: {doc['model'] or 'any it fits'}")
    print(f"  mode: {doc.get('mode') or 'vm'}")
    if doc["description"]:
        print(f"  description: {doc['description']}")
    print(f"  source: {doc['source']}")
    _print_entries(doc)
    for p in doc["problems"]:
        print(f"  problem: {p}")
    gpus = ", ".join(f"{g['host']}/{g['address']}" for g in doc["gpus"]) or "none"
    print(f"  desired on GPUs: {gpus}")


def _print_entries(doc: dict[str, Any]) -> None:
    from gpuvirt.model.profile import ProfileEntry

    layouts = (doc.get("validation") or {}).get("layouts", [])
    for i, e in enumerate(doc["entries"]):
        print(f"  entry {i + 1}: {ProfileEntry.from_dict(e).describe()}")
        for lay in layouts:
            if lay["entry"] == i:
                print(f"    on {lay['model']}: {lay['layout']['description']}")


@profile_app.command("delete")
def profile_delete(ctx: typer.Context, name: str = typer.Argument(...),
                   force: bool = typer.Option(False, "--force", help="Delete even while GPUs should carry it."),
                   json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Delete a stored profile."""
    from gpuvirt.service import profiles as svc

    doc = svc.delete_profile(state(ctx).context(), name, force=force)
    if json_out:
        emit_json(doc)
        return
    print(f"deleted profile {name}")
    if doc["cleared_gpus"]:
        print(f"  {len(doc['cleared_gpus'])} GPU(s) no longer have a desired profile")
    if doc["builtin_still_available"]:
        print(f"  the built-in profile {name} is visible again")


@profile_app.command("export")
def profile_export(ctx: typer.Context, names: Optional[List[str]] = typer.Argument(None, metavar="[NAME]...",
                                                                                  help="Default: all."),
                   fmt: str = typer.Option("gpuvirt", "--format", help="gpuvirt | mig-parted"),
                   output: Optional[str] = typer.Option(None, "--output", "-o", metavar="FILE",
                                                        help="Write to FILE instead of standard output.")) -> None:
    """Export profiles as YAML (gpuvirt format, or a mig-parted v1 config for MIG profiles)."""
    from gpuvirt.service import profiles as svc

    text = svc.export_profile(state(ctx).context(), names or [], fmt=fmt)
    if output is None:
        sys.stdout.write(text)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror}") from None


@profile_app.command("import")
def profile_import(ctx: typer.Context, file: str = typer.Argument(..., metavar="FILE"),
                   replace: bool = typer.Option(False, "--replace", help="Overwrite profiles that already exist."),
                   strict: bool = typer.Option(False, "--strict", help="Import nothing if any entry cannot be "
                                               "imported (default: import the rest, exit 7)."),
                   json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Import every config of a mig-parted / vgpu-device-manager v1 file (or gpuvirt YAML) as profiles.

    Entries the catalog cannot check (unknown boards, names no board has, rule violations) are listed one
    per line and left out; the exit status is then 7 (0 when everything was imported)."""
    from gpuvirt.service import profiles as svc

    try:
        doc = svc.import_profiles(state(ctx).context(), file, replace=replace, strict=strict)
    except svc.ImportRefused as exc:
        # every entry on standard output, the one-line error (with the first of them) on standard error
        for issue in exc.issues:
            print(f"  cannot import: {issue.line()}")
        raise
    if json_out:
        emit_json(doc)
    else:
        names = [r["name"] for r in doc["imported"]]
        print(f"imported {len(names)} profile(s) from {file} ({doc['format']})" + (": " + ", ".join(names) if names
                                                                                   else ""))
        if doc["unchanged"]:
            print(f"  unchanged (already stored as in the file): {', '.join(r['name'] for r in doc['unchanged'])}")
        ent = doc["entries"]
        if doc["skipped"]:
            print(f"  {ent['total'] - ent['imported']} of {ent['total']} entries not imported:")
        for s in doc["skipped"]:
            print(f"  skipped: {s['line']}")
        _warn([w["line"] for w in doc["warnings"]])
    if doc["skipped"]:
        raise typer.Exit(7)
