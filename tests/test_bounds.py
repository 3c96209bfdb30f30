"""Bounded inputs (issue 11 item 3): every number and file an operator hands gpuvirt has a limit, checked
before any work, refused with one line and exit 2."""

from __future__ import annotations

import os
import time

import pytest


def _one_line(res, code=2):
    assert res.exit_code == code, res
    assert res.stderr.startswith("gpuvirt: error: ") and res.stderr.count("\n") == 1, res
    return res.stderr


# --- config file -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
def test_config_that_never_ends_or_blocks_is_refused_at_once(gpuvirt_proc, tmp_path, kind):
    if kind == "dev-zero":
        path = "/dev/zero"
    elif kind == "fifo":
        path = str(tmp_path / "cfg.fifo")
        os.mkfifo(path)             # nobody writes it: opening it for reading would block forever
    else:
        path = str(tmp_path)
    started = time.monotonic()
    res = gpuvirt_proc("--config", path, "sim", "models", timeout=30)
    assert time.monotonic() - started < 20
    err = _one_line(res)
    assert path in err and "regular file" in err


def test_config_larger_than_16_mib_is_refused_without_reading_it(cli, tmp_path):
    cfg = tmp_path / "big.toml"
    with open(cfg, "wb") as fh:
        fh.truncate(16 * 1024 * 1024 + 1)   # sparse: refused by size before a byte is read
    err = _one_line(cli("--config", cfg, "sim", "models"))
    assert "more than the limit of 16 MiB" in err


@pytest.mark.parametrize("text", ["x = " + "[" * 5000 + "]" * 5000, "a" + ".a" * 100000 + " = 1",
                                  "[" + "t." * 40 + "t]\n"])
def test_deeply_nested_config_is_one_line_not_a_crash(gpuvirt_proc, tmp_path, text):
    cfg = tmp_path / "deep.toml"
    cfg.write_text(text)
    err = _one_line(gpuvirt_proc("--config", cfg, "sim", "models", timeout=60))
    assert "levels deep" in err and "internal error" not in err


def test_config_events_section_is_checked(cli, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[events]\nmax_rows = -1\n")
    assert "events.max_rows" in _one_line(cli("--config", cfg, "sim", "models"))
    cfg.write_text("[events]\nkeep = 3\n")
    assert "unknown [events] key" in _one_line(cli("--config", cfg, "sim", "models"))
    cfg.write_text("[policies]\nregistration_wait_seconds = 1e9\n")
    assert "registration_wait_seconds" in _one_line(cli("--config", cfg, "sim", "models"))
    cfg.write_text("[events]\nmax_age_days = 30\nmax_rows = 500\n[policies]\nregistration_wait_seconds = 5\n")
    assert cli("--config", cfg, "sim", "models").exit_code == 0


# --- counts -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, words", [
    ("1g.5gb=100000000", "at most 100000"),
    ("1g.5gb=60000,2g.10gb=60000", "120000 instances in total"),
    ("1g.5gb=" + "9" * 3000, "too large"),
    (",".join(["1g.5gb=1"] * 2000), "characters long"),
])
def test_huge_pack_is_refused_before_any_work(gpuvirt_proc, spec, words):
    started = time.monotonic()
    res = gpuvirt_proc("plan", "--pack", spec, "--model", "a100-40gb", timeout=60)
    assert time.monotonic() - started < 20      # before: 1g.5gb=100000000 ran until it was killed
    assert words in _one_line(res)


def test_the_pack_limit_itself_is_placeable():
    from gpuvirt.service.placement import MAX_PACK_INSTANCES, parse_pack_spec

    assert parse_pack_spec(f"1g.5gb={MAX_PACK_INSTANCES}", "a100-40gb") == {19: MAX_PACK_INSTANCES}


def test_huge_fit_is_refused_before_any_work(cli, make_sim):
    sim = make_sim(["a100-40gb"])
    for fit, words in (("1g.5gb=60000,1g.5gb=60000", "120000 instances in total"),
                       ("1g.5gb=1000000", "from 1 to 100000"), ("1g.5gb=" + "9" * 3000, "from 1 to 100000")):
        # both the typer command and the machine-format fast path
        assert words in _one_line(cli("--sim", sim.root, "report", "--fit", fit))
        from gpuvirt.cli import main

        with pytest.raises(SystemExit) as info:
            main(["--sim", str(sim.root), "report", "--fit", fit, "-f", "json"])
        assert info.value.code == 2


# --- durations and other numbers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["reconcile", "--wait", "-5"], ["reconcile", "--wait", "nan"], ["reconcile", "--wait", "inf"],
    ["reconcile", "--wait", "100000"],
    ["watch", "--debounce", "-1"], ["watch", "--debounce", "0"], ["watch", "--debounce", "nan"],
    ["watch", "--debounce", "1e6"], ["watch", "--max-runs", "0"],
    ["attach", "vm", "--instance", "0"], ["attach", "vm", "--vgpu", "A2-2Q", "--count", "65"],
    ["detach", "vm", "--instance", "-3"],
])
def test_negative_or_absurd_numbers_are_refused(cli, make_sim, args):
    sim = make_sim(["a2"])
    before = sorted(p.name for p in (sim.root / "var").rglob("*")) if (sim.root / "var").exists() else []
    _one_line(cli("--sim", sim.root, *args))
    after = sorted(p.name for p in (sim.root / "var").rglob("*")) if (sim.root / "var").exists() else []
    assert after == before                  # refused before anything was opened or created


@pytest.mark.parametrize("args", [["--skip", "-1"], ["--times", "0"], ["--times", "2000000"], ["--nvml", "0"]])
def test_sim_fault_counts_are_bounded(cli, make_sim, args):
    sim = make_sim(["a100-40gb"])
    _one_line(cli("sim", "fault", sim.root, "--op", "mdev.create", *args))
    assert sim.load()["faults"] == []


def test_event_file_without_newlines_is_refused(gpuvirt_proc, make_sim):
    sim = make_sim(["a2"])
    res = gpuvirt_proc("--sim", sim.root, "watch", "--events", "/dev/zero", timeout=60)
    assert "longer than" in _one_line(res)


def test_domain_xml_device_is_refused(cli, make_sim):
    sim = make_sim(["mtty"])
    err = _one_line(cli("--sim", sim.root, "attach", "vm", "--mdev", "mtty-1", "--domain-xml", "/dev/zero"))
    assert "regular file" in err
