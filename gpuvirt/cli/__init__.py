"""gpuvirt command line.  ``main`` is the console-script entry point.

The libvirt hook path (``gpuvirt hook libvirt-qemu ...``) is dispatched before typer, rich and the
inventory are imported: libvirt runs the hook synchronously for every domain start and stop, so a domain
without gpuvirt devices must cost little more than starting Python.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    fast = _hook_fast_path(args)
    if fast is None:
        args = hoist_debug(args)
        fast = _discover_fast_path(args)
    if fast is None:
        fast = _report_fast_path(args)
    if fast is not None:
        sys.exit(fast)
    from gpuvirt.cli.app import run

    sys.exit(run(args))


def _global_options(args: list[str]) -> tuple[dict[str, str], int]:
    """Leading global options (the typer callback's) and the index of the command word."""
    i = 0
    opts: dict[str, str] = {}
    flags = {"--debug"}
    valued = {"--root", "--sim", "--db", "--host-id", "--config"}
    while i < len(args):
        a = args[i]
        if a in flags:
            opts[a] = "1"
            i += 1
        elif a in valued and i + 1 < len(args):
            opts[a] = args[i + 1]
            i += 2
        elif "=" in a and a.split("=", 1)[0] in valued:
            k, v = a.split("=", 1)
            opts[k] = v
            i += 1
        else:
            break
    return opts, i


def hoist_debug(args: list[str]) -> list[str]:
    """``--debug`` written after the command word (``report -f json --debug``) moved in front of it.

    It is a global option, so only the root group knows it; a subcommand would refuse it as unknown.  The
    hook's argv belongs to libvirt and is left as it is, as is everything after ``--``.
    """
    _opts, i = _global_options(args)
    rest = args[i:]
    if rest[:2] == ["hook", "libvirt-qemu"]:
        return args
    end = rest.index("--") if "--" in rest else len(rest)
    if "--debug" not in rest[:end]:
        return args
    return ["--debug", *args[:i], *(a for a in rest[:end] if a != "--debug"), *rest[end:]]


def _settings(opts: dict[str, str]):
    """Settings from the global options a fast path parsed (the same precedence as the typer callback)."""
    from gpuvirt.context import resolve_settings

    return resolve_settings(root=opts.get("--root"), sim=opts.get("--sim"), db=opts.get("--db"),
                            host_id=opts.get("--host-id"), config=opts.get("--config"), debug="--debug" in opts)


def _hook_fast_path(args: list[str]) -> int | None:
    """Run ``[global options] hook libvirt-qemu ...`` without the full CLI; None when not that command."""
    opts, i = _global_options(args)
    if args[i:i + 2] != ["hook", "libvirt-qemu"]:
        return None
    from gpuvirt.cli.hook_main import run_hook

    return run_hook(args[i + 2:], root=opts.get("--root"), sim=opts.get("--sim"), db=opts.get("--db"),
                    host_id=opts.get("--host-id"), config=opts.get("--config"), debug="--debug" in opts)


def _discover_fast_path(args: list[str]) -> int | None:
    """``[global options] discover [--json]``, the scripted hot path, without importing typer and rich.

    Same service, same output and the same one-line error boundary as the typer command; on a host with
    hundreds of mdev parents the CLI framework's import time was most of the wall time.
    """
    opts, i = _global_options(args)
    if args[i:] not in (["discover", "--json"], ["discover"]):
        return None
    import gc

    from gpuvirt.cli.errors import report_error

    # this process ends after printing: the cyclic collector would only walk the tens of thousands of
    # acyclic records and dicts of a vGPU host's document (reference counting frees them all)
    gc.disable()
    try:
        from gpuvirt.context import Context
        from gpuvirt.service.discover import discover

        with Context(_settings(opts)) as ctx:
            doc = discover(ctx)
        if args[i + 1:]:
            from gpuvirt.cli.render import emit_json

            emit_json(doc, compact=True)
        else:
            from gpuvirt.cli.discover_view import render_discovery

            render_discovery(doc)
        return 0
    except BaseException as exc:  # noqa: BLE001 - the CLI's error boundary, as in gpuvirt.cli.app
        return report_error(exc, "--debug" in opts)


_REPORT_VALUED = {"--by": "by", "--format": "fmt", "-f": "fmt", "--host": "host", "--fit": "fit", "--output": "output",
                  "-o": "output"}


def _report_fast_path(args: list[str]) -> int | None:
    """``report`` in a machine format (json / csv / prometheus) without the CLI framework.

    Cluster reports are polled by monitoring (node_exporter's textfile collector, dashboards); their wall
    time is mostly start-up, so they take the same short road as ``discover --json``.  Anything this
    parser does not recognise - the table view, --help, a typo - goes to the full CLI.
    """
    opts, i = _global_options(args)
    if args[i:i + 1] != ["report"]:
        return None
    rest = args[i + 1:]
    got: dict[str, object] = {"by": "gpu", "fmt": "table", "host": None, "output": None, "cluster": False,
                              "fit": []}
    k = 0
    while k < len(rest):
        a = rest[k]
        key, val = (a.split("=", 1) + [None])[:2] if a.startswith("--") and "=" in a else (a, None)
        if key == "--cluster" and val is None:
            got["cluster"] = True
            k += 1
            continue
        if key not in _REPORT_VALUED:
            return None
        if val is None:
            if k + 1 >= len(rest):
                return None
            val = rest[k + 1]
            k += 2
        else:
            k += 1
        name = _REPORT_VALUED[key]
        if name == "fit":
            got["fit"].append(val)  # type: ignore[union-attr]
        else:
            got[name] = val
    if got["fmt"] not in ("json", "csv", "prometheus"):
        return None
    from gpuvirt.cli.errors import report_error

    try:
        from gpuvirt.context import Context
        from gpuvirt.service import report as svc

        with Context(_settings(opts)) as ctx:
            doc = svc.report(ctx, by=str(got["by"]), cluster=bool(got["cluster"]),
                             host=got["host"], fit=list(got["fit"]))  # type: ignore[arg-type]
            pretty = got["fmt"] == "json" and got["output"] is None and sys.stdout.isatty()
            data = svc.render_machine(doc, str(got["fmt"]), pretty=pretty)
            if got["output"] is None:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            else:
                svc.write_atomic(str(got["output"]), data)
        if doc.get("fit") is not None and not doc["fit"]["fits"]:
            return 4
        return 0
    except BaseException as exc:  # noqa: BLE001 - the CLI's error boundary, as in gpuvirt.cli.app
        return report_error(exc, "--debug" in opts)
