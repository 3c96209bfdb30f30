"""Hostile input to what landed with rebalance, sim migration / sim vgpu and the host stack: each row is an
input through the real CLI, the exit status docs/operator-guide.md documents for it, and a fragment of the
one error line; the host and inventory are left as they were (issue: "a bad input gets one clear line, a
documented non-zero exit, and changes nothing; every input is bounded")."""

from __future__ import annotations

import json

import pytest

from rebalance_support import _attach, ok

BIG = "9" * 100_000
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def boards(cli, make_sim):
    sim = make_sim(["a10:2"])
    _attach(cli, sim.root, "vm-a", "A10-12Q", "0")
    _attach(cli, sim.root, "vm-b", "A10-12Q", "1")
    return sim.root


def _one_line(res, code, fragment):
    assert res.exit_code == code, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], res
    assert len(lines[0]) < 4300, len(lines[0])      # bounded, whatever was typed
    assert "internal error" not in lines[0] and "Traceback" not in res.stderr


@pytest.mark.parametrize("args,code,fragment", [
    (["rebalance", "--for", "A10-24Q", "--allow", BIG], 2, "unknown move kind"),
    (["rebalance", "--for", "A10-24Q", "--allow", "cold,\x1b[31mred"], 2, "unknown move kind '\\x1b[31mred'"),
    (["rebalance", "--for", "A10-24Q", "--execute", "--yes", "--vm", BIG], 2, "invalid VM name"),
    (["rebalance", "--for", "A10-24Q", "--execute", "--yes", "--vm", "vm-c", "--tenant", BIG], 2, "invalid tenant"),
    (["attach", "vm-c", "--vgpu", "A10-24Q", "--allow-moves", BIG], 2, "unknown move kind"),
])
def test_rebalance_bad_input(cli, boards, args, code, fragment):
    before = json.loads(ok(cli("--sim", boards, "status", "--json")).stdout)
    _one_line(cli("--sim", boards, *args), code, fragment)
    assert json.loads(ok(cli("--sim", boards, "status", "--json")).stdout)["gpus"] == before["gpus"]


@pytest.mark.parametrize("args,code,fragment", [
    (["--driver", BIG], 2, "--driver"),
    (["--os", BIG], 2, "--os"),
    (["--vgpu-supported", "1-" + BIG], 2, "--vgpu-supported"),
])
def test_sim_migration_bad_input(cli, make_sim, args, code, fragment):
    sim = make_sim(["a10"])
    before = ok(cli("sim", "migration", sim.root, "--json")).stdout
    _one_line(cli("sim", "migration", sim.root, *args), code, fragment)
    assert ok(cli("sim", "migration", sim.root, "--json")).stdout == before
