"""The typer application and gpuvirt's single error boundary.

Commands are thin: parse options, call one service function, render.  Every failure ends here as one
line ``gpuvirt: error: <message>`` on stderr and the error's exit status; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import typer
from typer.core import TyperGroup


from gpuvirt.cli.errors import debug_requested as _debug_requested  # noqa: E402
from gpuvirt.cli.errors import report_error  # noqa: E402


class GpuvirtGroup(TyperGroup):
    """Root command group: runs the CLI in non-standalone mode and owns the error boundary."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,  # type: ignore[override]
             standalone_mode: bool = True, **extra: Any) -> Any:
        from gpuvirt.cli import hoist_debug

        arglist = hoist_debug(list(args) if args is not None else sys.argv[1:])
        debug = _debug_requested(arglist)
        try:
            rv = super().main(args=arglist, prog_name=prog_name or "gpuvirt", complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001 - this IS the error boundary
            if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None) is not None:
                print(exc.ctx.get_help())  # bare "gpuvirt" or "gpuvirt sim": show help, like --help
                code = 0
            else:
                code = report_error(exc, debug)
        if standalone_mode:
            sys.exit(code)
        return code

    def make_context(self, info_name: Any, args: Any, parent: Any = None, **extra: Any) -> Any:
        asked_help = any(a in ("-h", "--help") for a in args)
        ctx = super().make_context(info_name, list(args), parent=parent, **extra)
        # the callback runs before the subcommand parses its --help; help must not depend on valid settings
        ctx.meta["gpuvirt.help"] = asked_help
        return ctx


app = typer.Typer(cls=GpuvirtGroup, add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="gpuvirt - GPU virtualization manager for KVM hosts (mdev vGPU, vendor-VFIO vGPU, "
                       "SR-IOV VFs, MIG).", context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def _global(
    ctx: typer.Context,
    root: Optional[str] = typer.Option(None, "--root", help="Root the host is seen under (prefixes sys/, etc/, "
                                       "var/lib/gpuvirt). Env GPUVIRT_ROOT. Default /."),
    sim: Optional[str] = typer.Option(None, "--sim", help="Use the simulated host in DIR (root=DIR, simulated "
                                      "kernel and NVML). Env GPUVIRT_SIM."),
    db: Optional[str] = typer.Option(None, "--db", help="Inventory database URL (any SQLAlchemy URL). Env "
                                     "GPUVIRT_DB. Default sqlite under <root>/var/lib/gpuvirt."),
    host_id: Optional[str] = typer.Option(None, "--host-id", help="This host's id in a shared inventory. Env "
                                          "GPUVIRT_HOST_ID. Default: the hostname."),
    config: Optional[str] = typer.Option(None, "--config", help="Config file. Env GPUVIRT_CONFIG. Default "
                                         "<root>/etc/gpuvirt/gpuvirt.toml."),
    debug: bool = typer.Option(False, "--debug", help="Print tracebacks on errors."),
) -> None:
    from gpuvirt.cli.state import CliState

    ctx.obj = CliState(root=root, sim=sim, db=db, host_id=host_id, config=config, debug=debug)
    ctx.call_on_close(ctx.obj.close)
    # Settings (and the config file) are checked for every command, also for those that never use them
    # (plan --pack, sim models): a missing --config or a bad policy must not pass unnoticed just because the
    # command at hand ignores it.  The hook group resolves them itself, under its own error contract.
    if ctx.invoked_subcommand != "hook" and not ctx.meta.get("gpuvirt.help"):
        ctx.obj.settings()


def run(args: list[str]) -> int:
    return app(args=args, prog_name="gpuvirt", standalone_mode=False) or 0


# the command modules register themselves on `app`
from gpuvirt.cli import commands  # noqa: E402,F401
