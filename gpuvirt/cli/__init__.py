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
        fast = _discover_fast_path(args)
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


def _hook_fast_path(args: list[str]) -> int | None:
    """Run ``[global options] hook libvirt-qemu ...`` without the full CLI; None when not that command."""
    opts, i = _global_options(args)
    if args[i:i + 2] != ["hook", "libvirt-qemu"]:
        return None
    from gpuvirt.vmm.hookmain import run_hook

    return run_hook(args[i + 2:], root=opts.get("--root"), sim=opts.get("--sim"), db=opts.get("--db"),
                    host_id=opts.get("--host-id"), config=opts.get("--config"), debug="--debug" in opts)


def _discover_fast_path(args: list[str]) -> int | None:
    """``[global options] discover --json``, the scripted hot path, without importing typer and rich.

    Same service, same output and the same one-line error boundary as the typer command; on a host with
    hundreds of mdev parents the CLI framework's import time was most of the wall time.
    """
    opts, i = _global_options(args)
    if args[i:] != ["discover", "--json"]:
        return None
    from gpuvirt.cli.errors import report_error

    try:
        from gpuvirt.cli.render import emit_json
        from gpuvirt.context import Context, resolve_settings
        from gpuvirt.service.discover import discover

        settings = resolve_settings(root=opts.get("--root"), sim=opts.get("--sim"), db=opts.get("--db"),
                                    host_id=opts.get("--host-id"), config=opts.get("--config"),
                                    debug="--debug" in opts)
        with Context(settings) as ctx:
            emit_json(discover(ctx), compact=True)
        return 0
    except BaseException as exc:  # noqa: BLE001 - the CLI's error boundary, as in gpuvirt.cli.app
        return report_error(exc, "--debug" in opts)
