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
    if fast is not None:
        sys.exit(fast)
    from gpuvirt.cli.app import run

    sys.exit(run(args))


def _hook_fast_path(args: list[str]) -> int | None:
    """Run ``[global options] hook libvirt-qemu ...`` without the full CLI; None when not that command."""
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
    if args[i:i + 2] != ["hook", "libvirt-qemu"]:
        return None
    from gpuvirt.vmm.hookmain import run_hook

    return run_hook(args[i + 2:], root=opts.get("--root"), sim=opts.get("--sim"), db=opts.get("--db"),
                    host_id=opts.get("--host-id"), config=opts.get("--config"), debug="--debug" in opts)
