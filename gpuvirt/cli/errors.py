"""Turning any exception into gpuvirt's one-line error report (shared by the typer CLI and the fast paths)."""

from __future__ import annotations

import os
import sys

MAX_LINE = 4096         # characters of one error line (the longest real ones, rollback reports, are ~1 KiB)


def debug_requested(args: list[str] | None) -> bool:
    return "--debug" in (args or []) or os.environ.get("GPUVIRT_DEBUG") == "1"


def report_error(exc: BaseException, debug: bool) -> int:
    from gpuvirt.errors import GpuvirtError

    # a click/typer error (unknown option, bad value) is about the command line, not about gpuvirt's code:
    # its traceback tells nobody anything, so it stays one line even with --debug
    click_error = not isinstance(exc, GpuvirtError) and hasattr(exc, "format_message") and hasattr(exc, "exit_code")
    if debug and not click_error:
        import traceback  # only on request: it costs more to import than a fast command takes to run

        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, GpuvirtError):
        msg, code = str(exc), exc.exit_code
    elif click_error:
        msg, code = exc.format_message(), getattr(exc, "exit_code", 2)
    elif isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "Abort":
        msg, code = "aborted", 130 if isinstance(exc, KeyboardInterrupt) else 1
    else:
        msg = f"internal error: {type(exc).__name__}: {exc}"
        if not debug:
            msg += " (run with --debug for the traceback)"
        code = 1
    line = " ".join(str(msg).split())
    if len(line) > MAX_LINE:
        # messages quote what the caller passed; a megabyte option value must not come back as a megabyte line
        line = f"{line[:MAX_LINE]}... ({len(line) - MAX_LINE} more characters)"
    print(f"gpuvirt: error: {line}", file=sys.stderr)
    return code
