"""Rendering helpers: JSON to stdout, rich tables and MIG slice pictures for people."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable


def emit_json(doc: Any, compact: bool = False) -> None:
    # compact output goes through the C encoder: discover on a large host is megabytes of JSON. The documents
    # are trees built fresh for the output (no object appears twice on one path), so the encoder's cycle
    # check - a dict insert and delete per container, a tenth of the encoding - is left out; a cycle
    # would still end in an error (RecursionError), only with a different message
    text = (json.dumps(doc, separators=(",", ":"), default=str, check_circular=False) if compact
            else json.dumps(doc, indent=2, default=str))
    sys.stdout.write(text + "\n")


def console(stderr: bool = False):
    from rich.console import Console

    # soft wrap: lines of text are not broken at the terminal width (or at 80 columns when piped, which split
    # sysfs paths in two); tables still fit themselves to the width
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def table(title: str | None, columns: Iterable[str], rows: Iterable[Iterable[Any]]):
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


def slice_picture(memory_slices: int, instances: list[dict[str, Any]]) -> str:
    """``[0 1g.5gb][1 ·][2 2g.10gb ──][...]``: which memory slices each GPU instance occupies."""
    cells = ["·"] * memory_slices
    owner = [None] * memory_slices
    for gi in instances:
        start, size = gi["placement"]["start"], gi["placement"]["size"]
        label = f"GI{gi['id']}:{gi.get('profile_name') or gi['profile_id']}"
        for i in range(start, min(start + size, memory_slices)):
            owner[i] = label
    out = []
    i = 0
    while i < memory_slices:
        j = i
        while j + 1 < memory_slices and owner[j + 1] == owner[i] and owner[i] is not None:
            j += 1
        width = j - i + 1
        label = owner[i] or "free"
        text = label if len(label) <= 11 * width else label[: 11 * width - 1] + "…"
        out.append(f"[{i}{'-' + str(j) if j > i else ''} {text}]")
        i = j + 1
    _ = cells
    return " ".join(out)
