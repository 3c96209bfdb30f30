"""Bounds of numeric command-line options, checked before a command does any work.

Integer options use typer's ``min``/``max`` (click reports a violation as one line, exit 2); a float option
also needs a check for ``nan`` and ``inf``, which click's range test lets through, so durations go through
:func:`seconds`.  The limits are listed in docs/operator-guide.md ("Limits").
"""

from __future__ import annotations

import math

from gpuvirt.context import MAX_WAIT_SECONDS as _MAX_WAIT
from gpuvirt.errors import UsageError

MAX_WAIT_SECONDS = float(_MAX_WAIT)  # reconcile --wait: a boot unit waits minutes, never hours
MAX_DEBOUNCE_SECONDS = 600.0      # watch --debounce
MIN_DEBOUNCE_SECONDS = 0.01       # 0 would poll udev in a busy loop
MAX_RUNS = 1_000_000              # watch --max-runs
MAX_INSTANCE_ID = 2**31 - 1       # inventory ids are 32-bit integers
MAX_FAULT_COUNT = 1_000_000       # sim fault --skip / --times


def seconds(option: str, value: float, *, low: float, high: float) -> float:
    """``value`` when it is a finite number of seconds in [low, high]; else one clear UsageError."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low <= value <= high:
        raise UsageError(f"{option} {value!r}: expected a number of seconds from {low:g} to {high:g}")
    return float(value)
