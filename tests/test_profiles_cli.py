"""Profile commands end to end: typer's CliRunner on the real app, a simulated host and its inventory.

With ``--sim DIR`` the inventory is ``DIR/var/lib/gpuvirt/inventory.db``.  A few cases also run the
installed ``gpuvirt`` console script in a subprocess to check exit statuses and the one-line errors as an
operator sees them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gpuvirt.cli.app import app
from gpuvirt.context import Context, resolve_settings
from gpuvirt.service import profiles as svc
from gpuvirt.sim.control import init_sim

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "data"
MIG_PARTED_EXAMPLE = DATA / "mig-parted__examples_config.yaml"
VGPU_DM_T4_EXAMPLE = DATA / "vgpu-device-manager__examples_config-t4.yaml"
GPUVIRT = Path(sys.executable).with_name("gpuvirt")

runner = CliRunner()


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"reference example not present: {path}")
    return path


def make_host(root: Path) -> Path:
    init_sim(root, ["a100-40gb"])
    return root


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    return make_host(tmp_path_factory.mktemp("profiles") / "h")


@pytest.fixture
def fresh(tmp_path) -> Path:
    return make_host(tmp_path / "h")


def gv(sim: Path, *args: str):
    return runner.invoke(app, ["--sim", str(sim), *args])


def ok(sim: Path, *args: str):
    r = gv(sim, *args)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r


def fails(sim: Path, code: int, *args: str) -> str:
    r = gv(sim, *args)
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    err = r.stderr
    assert err.startswith("gpuvirt: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "Traceback" not in r.stdout
    return err[len("gpuvirt: error: "):].strip()


def names(sim: Path) -> dict[str, dict]:
    return {p["name"]: p for p in json.loads(ok(sim, "profile", "list", "--json").stdout)}


def events(sim: Path) -> list:
    with Context(resolve_settings(sim=str(sim), env={})) as ctx:
        with ctx.inventory.unit() as uow:
            return [(e.action, e.target) for e in uow.events(limit=1000)]


# --- create-profile ---------------------------------------------------------------------------------------------
def test_contract_create_profile_and_list(host):
    r = ok(host, "create-profile", "small-mix", "--mig", "1g.5gb=2", "--mig", "3g.20gb=1", "--model", "a100-40gb")
    assert "created profile small-mix (mig, for a100-40gb)" in r.stdout
    assert (host / "var" / "lib" / "gpuvirt" / "inventory.db").is_file()
    listed = names(host)
    assert listed["small-mix"]["stored"] is True and listed["small-mix"]["source"] == "user"
    assert listed["small-mix"]["model"] == "a100-40gb" and listed["small-mix"]["kind"] == "mig"
    assert listed["a100-40gb-balanced"]["source"] == "builtin" and listed["a100-40gb-balanced"]["stored"] is False
    assert ("profile.create", "small-mix") in events(host)


def test_create_profile_json_and_kinds(host):
    doc = json.loads(ok(host, "create-profile", "a2-eight", "--vgpu", "A2-2Q=8", "--json",
                        "--description", "eight 2Q").stdout)
    assert doc["kind"] == "vgpu" and doc["description"] == "eight 2Q"
    assert doc["validation"]["models"] == ["a2"]
    assert doc["entries"][0]["vgpu"] == {"A2-2Q": 8}
    doc = json.loads(ok(host, "create-profile", "mtty-mix", "--mdev", "mtty-2=4", "--mdev", "mtty-1=2",
                        "--json").stdout)
    assert doc["kind"] == "mdev" and doc["validation"]["layouts"][0]["layout"]["mdev"] == {"mtty-2": 4, "mtty-1": 2}
    doc = json.loads(ok(host, "create-profile", "v620", "--sriov-vfs", "4", "--model", "V620", "--json").stdout)
    assert doc["kind"] == "sriov" and doc["model"] == "amd-v620"
    doc = json.loads(ok(host, "create-profile", "mig-vgpu", "--mig", "1g.5gb=2", "--vgpu", "nvidia-474=2",
                        "--json").stdout)
    assert doc["kind"] == "mixed" and doc["validation"]["models"] == ["a100-40gb"]


@pytest.mark.parametrize("args, code, words", [
    (["--mig", "4g.20gb=1", "--mig", "3g.20gb=1", "--mig", "1g.5gb=1"], 2,
     "needs 8 compute slices, the A100-PCIE-40GB has 7; valid: 4g.20gb + 3g.20gb, "),
    (["--mig", "1g.5gb=8", "--model", "a100-40gb"], 2, "limit of 7 1g.5gb instances"),
    (["--mig", "1g.5gb+me=2", "--model", "a100-40gb"], 2, "limit of 1 1g.5gb+me instance"),
    (["--mig", "2g.10gb=99999999999999999999", "--model", "a100-40gb"], 2, "limit of 3"),
    (["--mig", "1g.5gb=0"], 2, "COUNT must be at least 1"),
    (["--mig", "1g.5gb=-3"], 2, "COUNT must be at least 1"),
    (["--mig", "1g.5gb=two"], 2, "COUNT must be a whole number"),
    (["--mig", "1g.5gb"], 2, "expected NAME=COUNT"),
    (["--mig", "1g.5gb=1", "--mig", "1g.5gb=2"], 2, "given twice"),
    (["--mig", "5g.20gb=1", "--model", "a100-40gb"], 2,
     "unknown MIG profile '5g.20gb' for the A100-PCIE-40GB; valid: "),
    (["--mig", "9g.1gb=1"], 2, "no GPU model in the catalog has a MIG profile named '9g.1gb'"),
    (["--vgpu", "A2-3Q=1", "--model", "a2"], 2, "unknown vGPU type 'A2-3Q' for the NVIDIA A2; valid: A2-1B"),
    (["--vgpu", "T4-1Q=2", "--vgpu", "T4-2Q=2"], 2, "same-type policy"),
    (["--vgpu", "A2-2Q=9"], 2, "maximum of 8 A2-2Q"),
    (["--mdev", "mtty-2=13"], 2, "needs 26 ports from a pool of 24"),
    (["--sriov-vfs", "5", "--model", "amd-v620"], 2, "maximum of 4"),
    (["--sriov-vfs", "-1"], 2, "0 or more"),
    (["--mig", "1g.5gb=1", "--model", "a999"], 3, "unknown GPU model 'a999'"),
    ([], 2, "give at least one of"),
    (["--mig", "1g.5gb=1", "--from-file", "x.yaml"], 2, "cannot be combined"),
    (["--from-file", "/nonexistent/p.yaml"], 2, "no such file"),
])
def test_create_profile_rejections(host, args, code, words):
    before = events(host)
    msg = fails(host, code, "create-profile", "rejected", *args)
    assert words in msg
    assert "rejected" not in names(host) or not names(host)["rejected"]["stored"]
    assert events(host) == before          # nothing stored, nothing recorded


def test_create_profile_name_and_conflicts(host):
    assert "invalid profile name" in fails(host, 2, "create-profile", ".bad", "--mig", "1g.5gb=1")
    assert "invalid profile name" in fails(host, 2, "create-profile", "a/b", "--mig", "1g.5gb=1")
    ok(host, "create-profile", "twice", "--mig", "1g.5gb=1", "--model", "a100-40gb")
    assert "already exists" in fails(host, 5, "create-profile", "twice", "--mig", "1g.5gb=2")
    ok(host, "create-profile", "twice", "--mig", "1g.5gb=3", "--model", "a100-40gb", "--replace")
    assert names(host)["twice"]["summary"] == "MIG 3x 1g.5gb"
    assert ("profile.replace", "twice") in events(host)
    assert "built-in profile" in fails(host, 5, "create-profile", "a2-2q-x8", "--vgpu", "A2-2Q=4")


def test_create_profile_from_file(host, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("description: from a file\nentries:\n  - devices: [0]\n    mig: {3g.20gb: 2}\n"
                 "  - devices: [1]\n    mig_enabled: false\n")
    doc = json.loads(ok(host, "create-profile", "filed", "--from-file", str(f), "--model", "a100-40gb",
                        "--json").stdout)
    assert doc["description"] == "from a file" and doc["source"] == "file:p.yaml" and len(doc["entries"]) == 2
    if MIG_PARTED_EXAMPLE.is_file():
        doc = json.loads(ok(host, "create-profile", "all-balanced", "--from-file", str(MIG_PARTED_EXAMPLE),
                            "--json").stdout)
        assert doc["entries"][0]["mig"] == {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}
        assert "none is named" in fails(host, 2, "create-profile", "nope", "--from-file", str(MIG_PARTED_EXAMPLE))
    bad = tmp_path / "bad.yaml"
    bad.write_text("mig: {1g.5gb: 2\n")
    assert fails(host, 2, "create-profile", "bad", "--from-file", str(bad)).startswith(f"{bad}:2:1: not valid YAML")


# --- import / export ---------------------------------------------------------------------------------------------
def test_import_both_examples(fresh):
    mp, vd = need(MIG_PARTED_EXAMPLE), need(VGPU_DM_T4_EXAMPLE)
    doc = json.loads(ok(fresh, "profile", "import", str(mp), "--json").stdout)
    rows = doc["imported"]
    assert [r["name"] for r in rows] == ["all-disabled", "all-enabled", "all-1g.5gb", "all-1g.5gb.me",
                                         "all-1g.10gb", "all-2g.10gb", "all-3g.20gb", "all-balanced", "custom-config"]
    assert {r["format"] for r in rows} == {"mig-parted"} and doc["skipped"] == []
    r = ok(fresh, "profile", "import", str(vd))
    assert r.stdout.startswith(f"imported 8 profile(s) from {vd} (vgpu-device-manager): T4-1Q, ")
    listed = names(fresh)
    assert listed["custom-config"]["source"] == "mig-parted:mig-parted__examples_config.yaml"
    assert listed["T4-small"]["kind"] == "vgpu"
    assert sum(1 for a, _ in events(fresh) if a == "profile.import") == 17
    # importing the same file again changes nothing and is not a clash
    again = json.loads(ok(fresh, "profile", "import", str(vd), "--json").stdout)
    assert again["imported"] == [] and len(again["unchanged"]) == 8
    assert sum(1 for a, _ in events(fresh) if a == "profile.import") == 17
    # a stored profile of the same name with another layout is a clash; --replace overwrites
    ok(fresh, "create-profile", "T4-1Q", "--vgpu", "T4-1Q=8", "--replace")
    assert "already exist" in fails(fresh, 5, "profile", "import", str(vd))
    ok(fresh, "profile", "import", str(vd), "--replace")
    show = json.loads(ok(fresh, "profile", "show", "custom-config", "--json").stdout)
    assert [e["devices"] for e in show["entries"]] == [[0, 1, 2, 3], [4], [5], [6], [7]]
    assert show["problems"] == [] and "a100-40gb" in show["validation"]["models"]


def test_import_skips_what_it_cannot_and_strict_imports_nothing(host, tmp_path):
    f = tmp_path / "mixed.yaml"
    f.write_text("version: v1\nmig-configs:\n  good-one:\n    - devices: all\n      mig-enabled: true\n"
                 "      mig-devices: {3g.20gb: 2}\n  bad-one:\n    - devices: all\n      mig-enabled: true\n"
                 "      mig-devices: {3g.20gb: 3}\n")
    before = events(host)
    msg = fails(host, 2, "profile", "import", str(f), "--strict")
    assert msg.startswith(f"{f}: nothing imported (--strict): 1 entry cannot be imported; the first: config "
                          "'bad-one' entry 1 (any device): 3x 3g.20gb exceeds the A100-PCIE-40GB's limit")
    assert "good-one" not in names(host) and "bad-one" not in names(host)
    assert events(host) == before
    r = gv(host, "profile", "import", str(f))
    assert r.exit_code == 7, r.output
    assert "skipped: config 'bad-one' entry 1 (any device): 3x 3g.20gb exceeds the A100-PCIE-40GB's limit" in r.stdout
    assert "good-one" in names(host) and "bad-one" not in names(host)


@pytest.mark.parametrize("text, words", [
    ("version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: [\n", ":6:1: not valid YAML"),
    ("version: v2\nmig-configs: {a: [{devices: all, mig-enabled: false}]}\n", ":1: unknown version 'v2'"),
    ("version: v1\nmig-configs:\n  a:\n    - devices: 0\n      mig-enabled: false\n", ":4: mig-configs 'a' "
     "entry 1: devices must be 'all' or a list of GPU indices, not a bare number"),
    ("version: v1\nvgpu-configs:\n  t:\n    - devices: all\n      vgpu-devices: {T4-1Q: 0}\n", "every count"),
    ("- just\n- a list\n", "expected a mapping at the top"),
    ("version: v1\nmig-configs:\n  'bad name':\n    - {devices: all, mig-enabled: false}\n",
     "is not usable as a profile name"),
])
def test_import_rejects_bad_files(host, tmp_path, text, words):
    f = tmp_path / "in.yaml"
    f.write_text(text)
    msg = fails(host, 2, "profile", "import", str(f))
    assert msg.startswith(str(f)) and words in msg, msg


def test_export_round_trip(fresh, tmp_path):
    ok(fresh, "create-profile", "mine", "--mig", "1g.5gb=2", "--mig", "3g.20gb=1", "--model", "a100-40gb",
       "--description", "two small, one large")
    ok(fresh, "create-profile", "vgpus", "--vgpu", "A2-4Q=2", "--vgpu", "A2-4C=2")
    before = {n: json.loads(ok(fresh, "profile", "show", n, "--json").stdout) for n in ("mine", "vgpus")}
    out = tmp_path / "export.yaml"
    ok(fresh, "profile", "export", "mine", "vgpus", "--output", str(out))
    assert [p["name"] for p in yaml.safe_load(out.read_text())["profiles"]] == ["mine", "vgpus"]
    ok(fresh, "profile", "delete", "mine")
    ok(fresh, "profile", "delete", "vgpus")
    ok(fresh, "profile", "import", str(out))
    for n, old in before.items():
        new = json.loads(ok(fresh, "profile", "show", n, "--json").stdout)
        for key in ("entries", "model", "description", "kind"):
            assert new[key] == old[key], key
    # every profile, gpuvirt format, to stdout: built-ins included
    every = yaml.safe_load(ok(fresh, "profile", "export").stdout)
    assert {"mine", "vgpus", "a100-40gb-balanced", "t4-1q-x16"} <= {p["name"] for p in every["profiles"]}


def test_export_mig_parted_round_trip(fresh, tmp_path):
    src = need(MIG_PARTED_EXAMPLE)
    ok(fresh, "profile", "import", str(src))
    text = ok(fresh, "profile", "export", "all-balanced", "custom-config", "all-disabled",
              "--format", "mig-parted").stdout
    doc = yaml.safe_load(text)
    original = yaml.safe_load(src.read_text())
    for name in ("all-balanced", "custom-config", "all-disabled"):
        assert doc["mig-configs"][name] == original["mig-configs"][name]
    other = make_host(tmp_path / "other")
    f = tmp_path / "mp.yaml"
    f.write_text(text)
    ok(other, "profile", "import", str(f))
    for name in ("all-balanced", "custom-config"):
        a = json.loads(ok(fresh, "profile", "show", name, "--json").stdout)
        b = json.loads(ok(other, "profile", "show", name, "--json").stdout)
        assert a["entries"] == b["entries"]
    assert "MIG layouts only" in fails(fresh, 2, "profile", "export", "a2-2q-x8", "--format", "mig-parted")
    assert "unknown export format" in fails(fresh, 2, "profile", "export", "--format", "xml")
    assert "no profile named 'nope'" in fails(fresh, 3, "profile", "export", "nope")


# --- show / delete / ensure_stored ----------------------------------------------------------------------------------
def test_show_builtin_and_unknown(host):
    doc = json.loads(ok(host, "profile", "show", "a100-40gb-balanced", "--json").stdout)
    assert doc["builtin"] is True and doc["stored"] is False and doc["source"] == "builtin"
    lay = doc["validation"]["layouts"][0]["layout"]
    assert lay["mig_counts"] == {"19": 2, "14": 1, "9": 1} and lay["mig_enabled"] is True
    text = ok(host, "profile", "show", "a100-40gb-balanced").stdout
    assert "on a100-40gb: MIG on: 3g.20gb + 2g.10gb + 2x 1g.5gb" in text
    assert "no profile named 'nope'" in fails(host, 3, "profile", "show", "nope")


def test_delete_refuses_profiles_in_use(fresh):
    ok(fresh, "create-profile", "used", "--mig", "7g.40gb=1", "--model", "a100-40gb")
    with Context(resolve_settings(sim=str(fresh), env={})) as ctx:
        with ctx.inventory.unit(write=True) as uow:
            uow.touch_host("h1", simulated=True)
            uow.upsert_gpu("h1", "0000:3b:00.0", model="a100-40gb", desired_profile="used")
    msg = fails(fresh, 5, "profile", "delete", "used")
    assert "desired profile of 1 GPU(s) (h1/0000:3b:00.0)" in msg
    assert names(fresh)["used"]["gpus"] == [{"host": "h1", "address": "0000:3b:00.0", "model": "a100-40gb"}]
    doc = json.loads(ok(fresh, "profile", "delete", "used", "--force", "--json").stdout)
    assert doc["cleared_gpus"][0]["address"] == "0000:3b:00.0"
    with Context(resolve_settings(sim=str(fresh), env={})) as ctx:
        with ctx.inventory.unit() as uow:
            assert uow.gpus("h1")[0].desired_profile is None
    assert ("profile.delete", "used") in events(fresh)
    assert "no stored profile named 'used'" in fails(fresh, 3, "profile", "delete", "used")
    assert "built-in profile" in fails(fresh, 2, "profile", "delete", "a2-2q-x8")


def test_ensure_stored_copies_a_builtin_once(fresh):
    with Context(resolve_settings(sim=str(fresh), env={})) as ctx:
        spec = svc.ensure_stored(ctx, "h100-80gb-7x1g")
        assert spec.model == "h100-80gb"
        again = svc.ensure_stored(ctx, "h100-80gb-7x1g")
        assert again.entries == spec.entries and again.source == "builtin"
        with ctx.inventory.unit() as uow:
            row = uow.profile("h100-80gb-7x1g")
            assert row.kind == "mig" and row.spec["entries"][0]["mig"] == {"1g.10gb": 7}
            acts = [(e.action, e.target) for e in uow.events(limit=100)]
        assert acts.count(("profile.create", "h100-80gb-7x1g")) == 1
        assert svc.get_profile(ctx, "h100-80gb-7x1g").source == "builtin"
    listed = names(fresh)["h100-80gb-7x1g"]
    assert listed["stored"] is True and listed["builtin"] is True


# --- the real console script ----------------------------------------------------------------------------------------
def run_gpuvirt(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUVIRT_")}
    return subprocess.run([str(GPUVIRT), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.skipif(not GPUVIRT.exists(), reason="gpuvirt console script not installed next to the interpreter")
def test_console_script(fresh):
    sim = str(fresh)
    r = run_gpuvirt("--sim", sim, "create-profile", "contract", "--mig", "1g.5gb=2", "--mig", "3g.20gb=1",
                    "--model", "a100-40gb")
    assert r.returncode == 0, r.stderr
    r = run_gpuvirt("--sim", sim, "profile", "list", "--json")
    assert r.returncode == 0 and "contract" in {p["name"] for p in json.loads(r.stdout)}
    r = run_gpuvirt("--sim", sim, "create-profile", "too-big", "--mig", "3g.20gb=3", "--model", "a100-40gb")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("gpuvirt: error: profile 'too-big': 3x 3g.20gb exceeds the A100-PCIE-40GB's limit")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# --- file errors as an operator sees them -------------------------------------------------------------------------
def test_file_field_errors_name_the_offending_line(host, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: x\nmig: {1g.5gb: 2}\nbogus: 1\n")
    assert fails(host, 2, "create-profile", "x", "--from-file", str(f)).startswith(f"{f}:3: profile 'x': unknown "
                                                                                  "field(s) bogus")
    f.write_text("version: 1\nprofiles:\n  - name: a\n    entries:\n      - devices: [0]\n        vgpu:\n"
                 "          A2-2Q: two\n")
    assert fails(host, 2, "profile", "import", str(f)).startswith(f"{f}:7: profile 'a' entry 1: vgpu: the count")
    # vgpu-device-manager: no advice the parser then refuses, and the config and entry are named
    for counts in ("{}", "{A2-2Q: 0}"):
        f.write_text(f"version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices: {counts}\n")
        msg = fails(host, 2, "profile", "import", str(f))
        assert msg.startswith(f"{f}:5: vgpu-configs 'a' entry 1: ") and "use {}" not in msg, msg


# --- gpuvirt demo --dir -------------------------------------------------------------------------------------------
def test_demo_runs_again_in_the_same_directory(cli, tmp_path):
    d = tmp_path / "demo"
    for _ in range(2):
        r = cli("demo", "--dir", d)
        assert r.exit_code == 0, r
        assert "demo finished" in r.stdout
        (d / "notes.txt").write_text("mine\n")      # not the demo's: kept across re-runs
    # the second run started from a fresh inventory: the profiles' instances once, all active, one allocation
    status = cli("--sim", d, "status", "--json")
    assert status.exit_code == 0, status
    doc = status.json()
    assert doc["in_sync"] is True
    assert sorted(len(g["instances"]) for g in doc["gpus"]) == [4, 8]
    assert {i["state"] for g in doc["gpus"] for i in g["instances"]} == {"active"}
    assert [a["vm"] for a in cli("--sim", d, "allocations", "--json").json()] == ["demo-vm"]
    assert (d / "notes.txt").read_text() == "mine\n"


def test_demo_refuses_a_directory_it_did_not_create(cli, tmp_path):
    mine = tmp_path / "mine"
    (mine / "etc").mkdir(parents=True)
    (mine / "keep.txt").write_text("keep\n")
    (mine / "etc" / "app.conf").write_text("x = 1\n")
    plain = make_host(tmp_path / "plain")           # a simulated host, but not a demo's
    afile = tmp_path / "afile"
    afile.write_text("data\n")
    for target in (mine, plain, afile):
        before = sorted((str(p.relative_to(tmp_path)), p.is_file() and p.read_bytes())
                        for p in [target, *target.rglob("*")])
        r = cli("demo", "--dir", target)
        assert r.exit_code == 2, r
        assert r.stderr.startswith(f"gpuvirt: error: demo: {target} ") and r.stderr.count("\n") == 1, r
        assert "Traceback" not in r.stderr + r.stdout
        assert sorted((str(p.relative_to(tmp_path)), p.is_file() and p.read_bytes())
                      for p in [target, *target.rglob("*")]) == before
