"""Why refused requests were refused (issue 13 item 1): ``report --fit`` classifies every refusal of the fit
(shortage / stranded / live / cold / stop) on the cluster as the fit left it, with avoidable counts and their
share of capacity; ``attach`` says in its one error line whether moves would have made room."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rebalance_support import _attach, _ctx, ok

CATS = ("fits", "shortage", "stranded", "live", "cold", "stop")


def _fit(cli, root, *args):
    res = cli("--sim", root, "report", *args, "--format", "json")
    assert res.exit_code in (0, 4), res
    return res.exit_code, {r["request"]: r for r in res.json()["fit"]["requests"]}


def _adds_up(r):
    rej = r["rejections"]
    assert sum(rej[c]["count"] for c in CATS) + rej["not_analysed"] == r["missing"]
    assert rej["avoidable"]["count"] == sum(rej[c]["count"] for c in ("stranded", "live", "cold", "stop"))
    return rej


def test_one_refusal_is_avoidable_by_a_cold_move_the_next_is_a_real_shortage(cli, boards):
    code, fit = _fit(cli, boards, "--fit", "A10-24Q=2")
    assert code == 4
    rej = _adds_up(fit["A10-24Q"])
    # the first is made by moving one 12Q next to the other (within one host: cold); after that move and the
    # first 24Q placed, the boards are full and the second is a shortage, answered without another search
    assert rej["cold"]["count"] == 1 and rej["shortage"]["count"] == 1 and rej["avoidable"]["count"] == 1
    assert rej["searches"] == 2 and rej["not_analysed"] == 0 and rej["why_not_analysed"] is None
    assert rej["unit"] == "MiB of framebuffer" and rej["capacity"] == 2 * 24576 and rej["need"] == 24576
    assert rej["avoidable"]["need"] == 24576 and rej["avoidable"]["share_of_capacity"] == pytest.approx(0.5)
    assert rej["rebalance"] == "gpuvirt rebalance --for A10-24Q --allow live,cold"
    assert "cold" in rej["reasons"]["cold"] and "placed afresh" in rej["reasons"]["shortage"]
    text = cli("--sim", boards, "report", "--fit", "A10-24Q=2")
    assert text.exit_code == 4
    assert ("2 refused: 1 shortage, 1 avoidable (1 needing a cold move), 50.0% of capacity - see gpuvirt "
            "rebalance --for A10-24Q --allow live,cold") in text.stdout


def test_the_analysis_runs_on_the_cluster_as_the_fit_left_it(cli, boards):
    # alone, an A10-24Q is avoidable (above); after the fit hands a 12Q out first, only 12 GiB are left
    _, fit = _fit(cli, boards, "--fit", "A10-24Q=1,A10-12Q=1")
    assert fit["A10-12Q"]["missing"] == 0 and fit["A10-12Q"]["rejections"] is None
    rej = _adds_up(fit["A10-24Q"])
    assert rej["shortage"]["count"] == 1 and rej["avoidable"]["count"] == 0


def test_a_real_shortage_has_no_avoidable_refusal_and_no_rebalance_hint(cli, make_sim):
    sim = make_sim(["a10:2"])
    _attach(cli, sim.root, "vm-a", "A10-24Q", "0")
    _attach(cli, sim.root, "vm-b", "A10-24Q", "1")
    _, fit = _fit(cli, sim.root, "--fit", "A10-12Q=3")
    rej = _adds_up(fit["A10-12Q"])
    assert rej["shortage"]["count"] == 3 and rej["searches"] == 1
    assert rej["avoidable"] == {"count": 0, "need": 0, "share_of_capacity": 0.0}
    out = cli("--sim", sim.root, "report", "--fit", "A10-12Q=3").stdout
    assert "3 refused: 3 shortage" in out and "rebalance --for" not in out


def test_stranded_on_one_gpu_and_the_attach_line_says_which_move(cli, make_sim):
    """One A100 with 1g.5gb VMs at slices 0 and 4: both 3g.20gb starts are blocked although 5 compute slices
    are free; one move within the GPU opens one, not two (the second is a shortage of compute slices)."""
    sim = make_sim(["a100-40gb:1"], mig_enabled=True)
    cfg = sim.root / "etc" / "gpuvirt"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "gpuvirt.toml").write_text('[policies]\nmig_placement = "first-fit"\n')
    for i in range(5):
        ok(cli("--sim", sim.root, "attach", f"v{i}", "--mig", "1g.5gb", "--format", "json",
               *(["--transient"] if i in (1, 2, 3) else [])))
    for i in (1, 2, 3):
        ok(cli("--sim", sim.root, "detach", f"v{i}"))
    _, fit = _fit(cli, sim.root, "--fit", "3g.20gb=2")
    rej = _adds_up(fit["3g.20gb"])
    assert rej["stranded"]["count"] == 1 and rej["shortage"]["count"] == 1
    assert rej["unit"] == "compute slices" and rej["capacity"] == 7 and rej["need"] == 3
    assert rej["avoidable"]["share_of_capacity"] == pytest.approx(3 / 7)
    assert "(1 by moves within one GPU), 42.9% of capacity" in cli("--sim", sim.root, "report", "--fit",
                                                                   "3g.20gb=2").stdout
    res = cli("--sim", sim.root, "attach", "v9", "--mig", "3g.20gb")
    assert res.exit_code == 4 and len(res.stderr.strip().splitlines()) == 1, res
    assert ("avoidable by 1 cold move within GPU 0000:41:00.0 (gpuvirt attach v9 --mig 3g.20gb --allow-moves "
            "cold, or gpuvirt rebalance --for A100-3-20C --allow cold)") in res.stderr


def test_the_analysis_is_capped_per_name_and_says_so(cli, boards, monkeypatch):
    from gpuvirt.service import refusals

    monkeypatch.setattr(refusals, "MAX_ANALYSED_PER_NAME", 1)
    _, fit = _fit(cli, boards, "--fit", "A10-24Q=2,A10-4Q=30")
    rej = _adds_up(fit["A10-24Q"])
    assert rej["searches"] == 1 and rej["cold"]["count"] == 1 and rej["not_analysed"] == 1
    assert "capped at 1" in rej["why_not_analysed"]
    out = cli("--sim", boards, "report", "--fit", "A10-24Q=2").stdout
    assert "2 refused: 1 avoidable (1 needing a cold move), 50.0% of capacity, 1 not analysed" in out


def test_requests_the_planner_does_not_move_are_not_analysed(cli, boards):
    _, fit = _fit(cli, boards, "--fit", "vf=1")
    rej = _adds_up(fit["vf"])
    assert rej["not_analysed"] == 1 and "not moved" in rej["why_not_analysed"] and rej["rebalance"] is None


def test_prometheus_counts_refusals_by_category(cli, boards):
    res = cli("--sim", boards, "report", "--fit", "A10-24Q=2", "--format", "prometheus")
    lines = {ln for ln in res.stdout.splitlines() if ln.startswith("gpuvirt_fit_refused{")}
    assert 'gpuvirt_fit_refused{category="cold",request="A10-24Q"} 1.0' in lines
    assert 'gpuvirt_fit_refused{category="shortage",request="A10-24Q"} 1.0' in lines
    assert 'gpuvirt_fit_refused{category="not_analysed",request="A10-24Q"} 0.0' in lines
    assert len(lines) == 7
    # everything fits: no refusal series at all
    res = cli("--sim", boards, "report", "--fit", "A10-12Q=2", "--format", "prometheus")
    assert res.exit_code == 0 and "gpuvirt_fit_refused{" not in res.stdout


# --- two hosts, live moves allowed by the pre-flight ----------------------------------------------------------
def _unknown_stack(db, host):
    from gpuvirt.model.preflight import HostStack

    return HostStack()


def _text(doc):
    import io

    from rich.console import Console

    from gpuvirt.cli.report_cmd import render_fit

    buf = io.StringIO()
    render_fit(doc["fit"], Console(file=buf, width=200))
    return buf.getvalue()


def test_across_two_hosts_with_known_stacks_the_refusal_is_avoidable_by_a_live_move(cli, make_sim, tmp_path,
                                                                                    monkeypatch):
    from gpuvirt.service import rebalance
    from gpuvirt.service.report import report

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a = make_sim(["a10"], name="ha")
    b = make_sim(["a10"], name="hb")
    ok(cli("--sim", a.root, "--db", url, "--host-id", "ha", "db", "init"))
    _attach(cli, a.root, "vm-a", "A10-12Q", "0", "--db", url, "--host-id", "ha")
    _attach(cli, b.root, "vm-b", "A10-12Q", "0", "--db", url, "--host-id", "hb")
    ctx = _ctx(a.root, db=url, host_id="ha")
    try:
        # both simulated hosts recorded their stacks (same driver, OS, QEMU, libvirt): the pre-flight allows live
        doc = report(ctx, cluster=True, fit=["A10-24Q=1"])
        rej = _adds_up(doc["fit"]["requests"][0])
        assert rej["live"]["count"] == 1 and rej["avoidable"]["count"] == 1
        assert rej["rebalance"] == "gpuvirt rebalance --for A10-24Q --allow live,cold --cluster"
        assert "1 avoidable (1 by live moves), 50.0% of capacity" in _text(doc)
        # hosts whose stack nobody recorded: the pre-flight refuses live, the same move is cold
        monkeypatch.setattr(rebalance, "_host_stack", _unknown_stack)
        fit = report(ctx, cluster=True, fit=["A10-24Q=1"])["fit"]["requests"][0]
        assert _adds_up(fit)["cold"]["count"] == 1 and fit["rejections"]["live"]["count"] == 0
        monkeypatch.undo()
        # this host alone: nothing can move live within one host
        alone = report(ctx, fit=["A10-24Q=1"])["fit"]["requests"][0]["rejections"]
        assert alone["live"]["count"] == 0 and alone["shortage"]["count"] == 1
    finally:
        ctx.close()


# --- attach --------------------------------------------------------------------------------------------------------
def test_attach_refusal_names_the_move_and_changes_nothing(cli, boards):
    before = json.loads(ok(cli("--sim", boards, "status", "--json")).stdout)
    res = cli("--sim", boards, "attach", "vm-c", "--vgpu", "A10-24Q")
    assert res.exit_code == 4 and len(res.stderr.strip().splitlines()) == 1, res
    assert res.stderr.strip() == (
        "gpuvirt: error: no capacity: no GPU on this host can take another A10-24Q vGPU now; avoidable by 1 cold "
        "move (gpuvirt attach vm-c --vgpu A10-24Q --allow-moves cold, or gpuvirt rebalance --for A10-24Q --allow "
        "cold)")
    assert json.loads(ok(cli("--sim", boards, "status", "--json")).stdout)["gpus"] == before["gpus"]


def test_attach_refusal_with_gpu_plans_for_that_gpu(cli, make_sim):
    # board 0 holds a 24Q: room there takes two moves (a 12Q joins the other, then the 24Q moves), anywhere one
    sim = make_sim(["a10:3"])
    _attach(cli, sim.root, "vm-a", "A10-24Q", "0")
    _attach(cli, sim.root, "vm-b", "A10-12Q", "1")
    _attach(cli, sim.root, "vm-c", "A10-12Q", "2")
    res = cli("--sim", sim.root, "attach", "vm-d", "--vgpu", "A10-24Q", "--gpu", "0")
    assert res.exit_code == 4 and ("avoidable by 2 cold moves (gpuvirt attach vm-d --vgpu A10-24Q --gpu 0 "
                                   "--allow-moves cold") in res.stderr, res
    res = cli("--sim", sim.root, "attach", "vm-d", "--vgpu", "A10-24Q")
    assert res.exit_code == 4 and "avoidable by 1 cold move (" in res.stderr, res


def test_attach_refusal_says_real_shortage(cli, make_sim):
    sim = make_sim(["a10:1"])
    _attach(cli, sim.root, "vm-a", "A10-24Q", "0")
    res = cli("--sim", sim.root, "attach", "vm-b", "--vgpu", "A10-12Q")
    assert res.exit_code == 4 and "; real shortage (0 of 12288 MiB of framebuffer free" in res.stderr, res


def test_attach_refusal_stands_as_it_was_when_the_analysis_fails(cli, boards, monkeypatch):
    from gpuvirt.service import rebalance

    def boom(*a, **k):
        raise RuntimeError("planner exploded")

    monkeypatch.setattr(rebalance, "load_scope", boom)
    res = cli("--sim", boards, "attach", "vm-c", "--vgpu", "A10-24Q")
    assert res.exit_code == 4 and res.stderr.strip().endswith("can take another A10-24Q vGPU now"), res
    # a quota refusal is no lack of room: nothing is appended (and no planner runs)
    ok(cli("--sim", boards, "tenant", "set-quota", "t1", "--instances", "0"))
    res = cli("--sim", boards, "attach", "vm-d", "--vgpu", "A10-12Q", "--tenant", "t1")
    assert res.exit_code == 4 and "quota" in res.stderr and "avoidable" not in res.stderr, res


# --- report without --fit ---------------------------------------------------------------------------------------------
def test_report_without_fit_is_unchanged_and_never_imports_the_planner(boards):
    code = (
        "import sys, json\n"
        "from gpuvirt.context import Context, resolve_settings\n"
        "from gpuvirt.service.report import report\n"
        f"ctx = Context(resolve_settings(sim={str(boards)!r}))\n"
        "doc = report(ctx)\n"
        "heavy = [m for m in ('gpuvirt.service.refusals', 'gpuvirt.model.rejection', 'gpuvirt.model.moves',\n"
        "                     'gpuvirt.service.rebalance') if m in sys.modules]\n"
        "print(json.dumps({'keys': sorted(doc), 'fit': doc['fit'], 'heavy': heavy}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["heavy"] == [] and out["fit"] is None
    assert out["keys"] == ["fit", "generated_at", "groups", "hosts", "models", "schema_version", "scope", "source",
                           "stale_after_seconds", "tenants", "totals", "vm_devices", "warnings"]


def test_requests_that_fit_carry_no_rejections(cli, boards):
    code, fit = _fit(cli, boards, "--fit", "A10-12Q=2")
    assert code == 0 and fit["A10-12Q"]["rejections"] is None
