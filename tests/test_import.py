"""Importing the configs other tools publish, and applying them with mig-parted's semantics.

The files here are written for these tests in the published formats (mig-parted v1 ``mig-configs``,
vgpu-device-manager v1 ``vgpu-configs``), shaped like NVIDIA's own: per-board device filters, a ``default``
config keyed by device id, MIG-backed vGPU configs, boards the catalog does not know.  NVIDIA's files
themselves are never copied into the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpuvirt.cli.app import app
from gpuvirt.context import Context, resolve_settings
from gpuvirt.model.catalog import load_catalog
from gpuvirt.model.profile import ProfileSpec, validate
from gpuvirt.model.profile_formats import parse_profiles
from gpuvirt.model.profile_import import plan_import
from gpuvirt.sim.control import init_sim

runner = CliRunner()
GPUVIRT = Path(sys.executable).with_name("gpuvirt")

# mig-parted: per-board all-balanced entries (boards the catalog knows, one it does not), names only some
# boards have, a config whose second entry overrides the first on some GPUs
MIG_PARTED = """\
version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  all-balanced:
    - device-filter: ["0x294110DE"]
      devices: all
      mig-enabled: true
      mig-devices: {"1g.24gb": 2, "2g.47gb": 1, "3g.95gb": 1}
    - device-filter: ["0x2BB510DE"]
      devices: all
      mig-enabled: true
      mig-devices: {"1g.24gb": 2, "2g.48gb": 1}
    - device-filter: ["0x290110DE"]
      devices: all
      mig-enabled: true
      mig-devices: {"1g.23gb": 2, "2g.45gb": 1, "3g.90gb": 1}
    - device-filter: ["0x777710DE"]
      devices: all
      mig-enabled: true
      mig-devices: {"1g.99gb": 2}
    - device-filter: ["0x233510DE", "0x233B10DE"]
      devices: all
      mig-enabled: true
      mig-devices: {"1g.18gb": 2, "2g.35gb": 1, "3g.71gb": 1}
    - device-filter: ["0x233010DE", "0x233110DE", "0x20B210DE", "0x20B510DE"]
      devices: all
      mig-enabled: true
      mig-devices: {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}
  all-1g.24gb.gfx:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.24gb+gfx": 4}
  all-1g.36gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.36gb": 4}
  all-9g.1gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"9g.1gb": 1}
  overridden:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.10gb": 7}
    - device-filter: "0x233010DE"
      devices: [0]
      mig-enabled: true
      mig-devices: {"3g.40gb": 3}
"""

# vgpu-device-manager: a `default` config keyed by device id as NVIDIA's is (the A16 and the A2 share
# 0x25B6; boards without types in the catalog; boards the catalog does not know) and MIG-backed configs
VGPU_DM = """\
version: v1
vgpu-configs:
  A100-1-5C:
    - devices: all
      vgpu-devices: {"A100-1-5C": 7}
  A100X-mixed:
    - devices: all
      vgpu-devices: {"A100X-1-5C": 3, "A100X-1-5CME": 1, "A100X-3-20C": 1}
  A100D-1-10C:
    - devices: all
      vgpu-devices: {"A100D-1-10C": 7}
  V100-8Q:
    - devices: all
      vgpu-devices: {"V100-8Q": 4}
  default:
    - device-filter: "0x1DB410DE"
      devices: all
      vgpu-devices: {"V100-8Q": 2}
    - device-filter: "0x1EB810DE"
      devices: all
      vgpu-devices: {"T4-8Q": 2}
    - device-filter: "0x20B010DE"
      devices: all
      vgpu-devices: {"A100X-20C": 2}
    - device-filter: "0x20B510DE"
      devices: all
      vgpu-devices: {"A100D-40C": 2}
    - device-filter: "0x25B610DE"
      devices: all
      vgpu-devices: {"A16-8Q": 2}
    - device-filter: "0x25B610DE"
      devices: all
      vgpu-devices: {"A2-8Q": 2}
"""


def plan(text: str, name: str = "cfg.yaml"):
    fmt, specs = parse_profiles(text, name)
    return fmt, {s.name: s for s in specs}, plan_import(specs, load_catalog())


# --- the model: which entries import ---------------------------------------------------------------------------
def test_a_file_mixing_known_and_unknown_boards_imports_the_known_ones():
    fmt, specs, p = plan(MIG_PARTED)
    assert fmt == "mig-parted"
    imported = {s.name: s for s in p.specs}
    assert sorted(imported) == ["all-1g.24gb.gfx", "all-1g.36gb", "all-balanced", "all-disabled"]
    # the unknown board's entry is left out, the five others kept in their order
    assert [e.device_filter[0] for e in imported["all-balanced"].entries] == [
        "0x294110DE", "0x2BB510DE", "0x290110DE", "0x233510DE", "0x233010DE"]
    lines = [i.line() for i in p.skipped]
    assert lines == [
        "config 'all-balanced' entry 4 (0x777710DE): no GPU model in the catalog has PCI id 0x777710DE",
        "config 'all-9g.1gb' entry 1 (any device): no GPU model in the catalog has a MIG profile named '9g.1gb'",
        "config 'overridden' entry 2 (0x233010DE GPUs 0): 3x 3g.40gb exceeds the H100-SXM5-80GB's limit of 2 "
        "3g.40gb instances; valid: 2x 3g.40gb, 3g.40gb + 2x 2g.20gb, 4g.40gb + 3g.40gb",
        "config 'overridden' (whole config): not imported: entry 2 cannot be, and entry 1 also selects its GPUs "
        "- without entry 2 they would get entry 1's layout, which the config overrides for them",
    ]
    assert p.entries_total == 12 and p.entries_imported == 8
    # names are checked on the boards that have them, exactly: GB200's older names through its alias table
    rep = p.reports["all-balanced"]
    assert rep.models == ["a100-80gb", "b200", "gb200", "h100-80gb", "h200", "rtx-pro-6000"]
    assert p.reports["all-1g.36gb"].models == ["gh200-144gb"]        # never the H200 (1g.35gb)


def test_vgpu_device_manager_default_and_mig_backed_configs():
    fmt, specs, p = plan(VGPU_DM)
    assert fmt == "vgpu-device-manager"
    imported = {s.name: s for s in p.specs}
    # MIG-backed types bring their GPU instances, one per vGPU, as vgpu-device-manager lays them out
    assert imported["A100-1-5C"].entries[0].mig == {"1g.5gb": 7}
    assert imported["A100X-mixed"].entries[0].mig == {"1g.5gb": 3, "1g.5gb+me": 1, "3g.20gb": 1}
    assert p.reports["A100X-mixed"].models == ["a100-40gb-sxm4"]          # A100X-* is the SXM4 board's
    assert p.reports["A100-1-5C"].models == ["a100-40gb"]
    assert [i.line() for i in p.skipped] == [
        "config 'V100-8Q' entry 1 (any device): no GPU model in the catalog has a vGPU type 'V100-8Q'",
        "config 'default' entry 1 (0x1DB410DE): no GPU model in the catalog has PCI id 0x1DB410DE",
    ]
    # a known board whose vGPU types are not in the catalog: kept, with a warning for that entry
    warned = {(i.config, i.entry) for i in p.warnings}
    assert warned == {("A100D-1-10C", 1), ("default", 4)}
    assert "A100 80GB PCIe, whose vGPU types are not in the catalog" in p.warnings[0].reason
    default = imported["default"]
    assert len(default.entries) == 5 and p.reports["default"].models == ["a100-40gb-sxm4", "a16", "a2", "t4"]


def test_boards_sharing_a_device_id_take_their_own_entry():
    catalog = load_catalog()
    _, specs, p = plan(VGPU_DM)
    default = next(s for s in p.specs if s.name == "default")
    a2, a16 = catalog.get("a2"), catalog.get("a16")
    assert a2.device_id == a16.device_id == 0x25B6
    assert default.entry_for(a2, 0, "0x157E10DE").vgpu == {"A2-8Q": 2}
    assert default.entry_for(a16, 0, "0x14A910DE").vgpu == {"A16-8Q": 2}
    # the A100 PCIe 40GB (A100-*) is not the SXM4 board the A100X entry is for: untouched
    assert default.entry_for(catalog.get("a100-40gb"), 0) is None
    assert default.entry_for(catalog.get("a100-40gb-sxm4"), 0).vgpu == {"A100X-20C": 2}


def test_one_gb_36_is_refused_on_an_h200_and_seven_1g_23gb_fit_a_b200():
    catalog = load_catalog()
    from gpuvirt.errors import ProfileError
    from gpuvirt.model.profile import ProfileEntry, resolve

    with pytest.raises(ProfileError, match=r"^profile 'p': unknown MIG profile '1g.36gb' for the H200-SXM5-141GB"):
        validate(ProfileSpec(name="p", model="h200", entries=(ProfileEntry(mig={"1g.36gb": 4}),)))
    layout = resolve(ProfileEntry(mig={"1g.23gb": 7}), catalog.get("b200"))
    assert layout.mig_counts == {19: 7} and len(layout.mig_placements()) == 7
    # without a model the name finds its boards by exact name: the B200 and (current driver) the GB200
    assert validate(ProfileSpec(name="q", entries=(ProfileEntry(mig={"1g.23gb": 7}),))).models == ["b200", "gb200"]
    with pytest.raises(ProfileError, match="for the H100 NVL"):
        resolve(ProfileEntry(mig={"1g.23gb": 7}), catalog.get("h100-nvl"))


# --- the CLI: reporting, exit statuses, idempotence ----------------------------------------------------------------
def gv(sim: Path, *args: str):
    return runner.invoke(app, ["--sim", str(sim), *args])


def events(sim: Path) -> list:
    with Context(resolve_settings(sim=str(sim), env={})) as ctx:
        with ctx.inventory.unit() as uow:
            return [(e.action, e.target) for e in uow.events(limit=1000)]


def test_import_reports_every_skipped_entry_exits_7_and_is_idempotent(tmp_path):
    sim = tmp_path / "h"
    init_sim(sim, ["h100-80gb"])
    f = tmp_path / "config-default.yaml"
    f.write_text(MIG_PARTED)
    r = gv(sim, "profile", "import", str(f))
    assert r.exit_code == 7, r.output
    out = r.stdout.splitlines()
    assert out[0].startswith(f"imported 4 profile(s) from {f} (mig-parted): ")
    assert "  4 of 12 entries not imported:" in out
    skipped = [line for line in out if line.startswith("  skipped: ")]
    assert len(skipped) == 4 and "entry 4 (0x777710DE)" in skipped[0]
    after_first = events(sim)
    again = gv(sim, "profile", "import", str(f), "--json")
    assert again.exit_code == 7
    doc = json.loads(again.stdout)
    assert doc["imported"] == [] and len(doc["unchanged"]) == 4 and len(doc["skipped"]) == 4
    assert [e for e in events(sim) if e[0] == "profile.import"] == [e for e in after_first if e[0] == "profile.import"]
    # --strict: any entry that cannot be imported is an error, nothing is stored
    other = tmp_path / "o"
    init_sim(other, ["h100-80gb"])
    r = gv(other, "profile", "import", str(f), "--strict")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"gpuvirt: error: {f}: nothing imported (--strict): 4 entries cannot be imported")
    assert r.stdout.count("  cannot import: ") == 4
    assert not [e for e in events(other) if e[0] == "profile.import"]
    clean = tmp_path / "clean.yaml"
    clean.write_text("version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: false\n")
    assert gv(other, "profile", "import", str(clean), "--strict").exit_code == 0


# --- mig-parted semantics on a host ------------------------------------------------------------------------------
def test_device_filters_select_gpus_by_their_real_pci_ids(tmp_path):
    sim = tmp_path / "h"
    init_sim(sim, ["h100-80gb", "h100-80gb-pcie", "a100-80gb-pcie", "a30"])
    f = tmp_path / "cfg.yaml"
    f.write_text(MIG_PARTED)
    assert gv(sim, "profile", "import", str(f)).exit_code == 7
    r = gv(sim, "plan", "all-balanced", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    got = {g["gpu"]["model"]: g["layout"] for g in doc["gpus"]}
    assert set(got) == {"h100-80gb", "h100-80gb-pcie", "a100-80gb-pcie"}
    assert "2x 1g.10gb" in got["h100-80gb-pcie"] and "3g.40gb" in got["a100-80gb-pcie"]
    # the A30 is selected by no entry: left alone, as mig-parted does
    assert len(doc["untouched"]) == 1 and "a30" in doc["untouched"][0]
    # naming it explicitly is refused with the reason, never adapted
    r = gv(sim, "plan", "all-balanced", "--gpu", "a30")
    assert r.exit_code == 2
    assert r.stderr.startswith("gpuvirt: error: profile 'all-balanced' has no entry for GPU 3 (") and \
        "the GPU is 0x20B710DE; entry 1 selects 0x294110DE" in r.stderr


def test_the_worked_examples_of_profile_format_md(tmp_path):
    """docs/profile-format.md section 8: the three files as printed there, on the host described there."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "profile-format.md").read_text()
    section = text.split("## 8. Worked examples", 1)[1]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml\n")[1:]]
    assert len(blocks) == 3
    sim = tmp_path / "host"
    init_sim(sim, ["h100-80gb:2", "a2", "a16", "a100-40gb", "t4"])
    files = []
    for name, body in zip(("mig-parted.yaml", "vgpu-dm.yaml", "gpuvirt.yaml"), blocks):
        files.append(tmp_path / name)
        files[-1].write_text(body)
    r = gv(sim, "profile", "import", str(files[0]))
    assert r.exit_code == 7
    assert "skipped: config 'training-and-inference' entry 3 (0x999910DE): no GPU model" in r.stdout
    assert gv(sim, "profile", "import", str(files[0])).exit_code == 7
    doc = json.loads(gv(sim, "plan", "training-and-inference", "--json").stdout)
    assert [g["layout"] for g in doc["gpus"]] == ["MIG on: 2x 3g.40gb", "MIG on: 7x 1g.10gb"]
    assert len(doc["untouched"]) == 4
    r = gv(sim, "plan", "training-and-inference", "--gpu", "2")
    assert r.exit_code == 2 and "has no entry for GPU 2 (0000:43:00.0, a2): the GPU is 0x25B610DE" in r.stderr
    r = gv(sim, "profile", "import", str(files[1]))
    assert r.exit_code == 0, r.output
    doc = json.loads(gv(sim, "plan", "default", "--json").stdout)
    assert {g["gpu"]["model"]: g["layout"] for g in doc["gpus"]} == {
        "a2": "vGPU 4x A2-4Q (nvidia-746)", "a16": "vGPU 4x A16-4Q (nvidia-713)"}
    show = gv(sim, "profile", "show", "a100-small")
    assert "on a100-40gb: MIG on: 7x 1g.5gb; vGPU 7x A100-1-5C (nvidia-474)" in show.stdout
    assert gv(sim, "profile", "import", str(files[2])).exit_code == 0
    doc = json.loads(gv(sim, "plan", "mixed-host", "--json").stdout)
    assert [g["layout"] for g in doc["gpus"]] == ["MIG on: 3g.40gb + 2g.20gb + 2x 1g.10gb", "MIG off"]


def test_sim_models_lists_every_board(tmp_path):
    r = runner.invoke(app, ["sim", "models", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["id"]: row for row in json.loads(r.stdout)}
    assert set(rows) == set(load_catalog().ids())
    assert rows["a16"]["pci_id"] == rows["a2"]["pci_id"] == "10de:25b6"
    assert rows["rtx-pro-6000-maxq"]["pci_id"] == "10de:2bb4"


# --- bounded inputs (issue 11 item 3) ------------------------------------------------------------------------------
def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(GPUVIRT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bounded") / "h"
    init_sim(root, ["a100-40gb"])
    return root


def one_line_error(p: subprocess.CompletedProcess, code: int = 2) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.startswith("gpuvirt: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr
    return p.stderr


def test_dev_zero_and_devices_are_refused_at_once(bare):
    err = one_line_error(run_cli("--sim", str(bare), "profile", "import", "/dev/zero", timeout=20))
    assert "/dev/zero: is a character device, not a profile file" in err
    err = one_line_error(run_cli("--sim", str(bare), "create-profile", "x", "--from-file", "/dev/zero", timeout=20))
    assert "character device" in err


def test_a_fifo_is_refused_without_waiting_for_a_writer(bare, tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    err = one_line_error(run_cli("--sim", str(bare), "profile", "import", str(fifo), timeout=20))
    assert "is a FIFO, not a profile file" in err
    # and in-process: the service returns without blocking
    from gpuvirt.errors import UsageError
    from gpuvirt.service.profiles import _read_file

    box: list = []

    def read() -> None:
        try:
            _read_file(fifo)
        except UsageError as exc:
            box.append(str(exc))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    assert box and "FIFO" in box[0]


def test_files_over_16_mib_are_refused_without_reading_them(bare, tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(16 * 1024 * 1024 + 1)          # sparse: refused from its size, never read
    err = one_line_error(run_cli("--sim", str(bare), "profile", "import", str(big)))
    assert "16777217 bytes, more than the 16 MiB a profile file may have" in err
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: x\nmig_enabled: false\n" + "#" * (1024 * 1024) + "\n")
    assert run_cli("--sim", str(bare), "profile", "import", str(ok)).returncode == 0


@pytest.mark.parametrize("text", [
    "name: x\nmig: " + "[" * 5000 + "]" * 5000 + "\n",
    "version: v1\nmig-configs:\n  a:\n" + "".join("  " * (i + 2) + "- \n" for i in range(200)),
    "a: &x [1]\n" + "".join(f"b{i}: {{c: {'{d: ' * 40}1{'}' * 40}}}\n" for i in range(2)),
])
def test_deeply_nested_yaml_is_one_clear_line(bare, tmp_path, text):
    f = tmp_path / "deep.yaml"
    f.write_text(text)
    err = one_line_error(run_cli("--sim", str(bare), "profile", "import", str(f)))
    assert "nested deeper than 32 levels" in err and f"{f}:" in err
