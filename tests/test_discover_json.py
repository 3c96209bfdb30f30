"""``discover --json`` is encoded by orjson where that gives json.dumps' exact bytes, by json otherwise.

The promise (gpuvirt/cli/render.py ``compact_json``): the output is byte for byte
``json.dumps(doc, separators=(",", ":"), default=str)``, whichever encoder wrote it.
"""

from __future__ import annotations

import datetime
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpuvirt.cli.render import compact_json


def reference_bytes(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=str).encode("ascii")


@dataclass
class _Point:
    x: int


CASES = [
    {"schema_version": 1, "a": [None, True, False, 0, -1, 2**63 - 1, -(2**63)], "b": {}, "c": []},
    {"ctl": "".join(chr(i) for i in range(32)) + '"\\/'},      # every escape json writes, short and \u00XX
    {"del": "a\x7fb"},                                          # json escapes DEL, orjson does not
    {"latin": "Grafikkarte – é", "emoji": "\U0001f600"},        # json escapes, orjson writes UTF-8
    {"lone": "\udc80"},                                         # a surrogateescape'd byte: orjson refuses
    {1: "int key", None: "null key"},                           # json turns keys into strings, orjson refuses
    {"big": 2**70},                                             # beyond orjson's 64 bits
    {"path": Path("/sys/bus/pci"), "when": datetime.datetime(2026, 12, 6, 20, 0, 0),
     "day": datetime.date(2026, 12, 6), "id": uuid.UUID(int=5), "dc": _Point(3), "t": (1, "x")},
]


@pytest.mark.parametrize("doc", CASES, ids=range(len(CASES)))
def test_compact_json_is_json_dumps_byte_for_byte(doc: object) -> None:
    assert compact_json(doc) == reference_bytes(doc)


def _sim_with_odd_description(make_sim, text: str):
    sim = make_sim(["mtty"])
    types = sim.root / "sys/class/mdev_bus/mtty/mdev_supported_types"
    first = sorted(p for p in types.iterdir())[0]
    (first / "description").write_text(text + "\n", encoding="utf-8")
    return sim


@pytest.mark.parametrize("text", ["plain ascii", "Typ \u2013 \u00e9\x7f\tend"], ids=["ascii", "non-ascii"])
def test_discover_json_bytes_through_both_cli_paths(make_sim, cli, gpuvirt_proc, text: str) -> None:
    sim = _sim_with_odd_description(make_sim, text)
    fast = gpuvirt_proc("--sim", sim.root, "discover", "--json")        # the console script's fast path
    typer_run = cli("--sim", sim.root, "discover", "--json")              # the typer command
    assert fast.exit_code == typer_run.exit_code == 0, (fast, typer_run)
    for out in (fast.stdout, typer_run.stdout):
        doc = json.loads(out)
        assert out == json.dumps(doc, separators=(",", ":")) + "\n"
        assert out.isascii()
        descriptions = [t["description"] for p in doc["mdev_parents"] for t in p["types"]]
        assert text in descriptions
    # the same document both ways (the host name and NVML session are the same; nothing else differs)
    assert json.loads(fast.stdout)["mdev_parents"] == json.loads(typer_run.stdout)["mdev_parents"]
