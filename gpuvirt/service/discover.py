"""Service: discover the host."""

from __future__ import annotations

from typing import Any

from gpuvirt.context import Context
from gpuvirt.host.discover import discover as host_discover


def discover(ctx: Context) -> dict[str, Any]:
    """The host as sysfs and NVML show it now (schema: docs/discover-schema.md)."""
    return host_discover(ctx.host)
