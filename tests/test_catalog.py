"""The GPU model catalog (profiles/models/*.yaml) against the loader and the reference captures.

Tests that compare with the reference pack read it from ``../shared/reference`` next to the checkout and
skip when it is not there; nothing from that folder is copied into the repository.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from gpuvirt.errors import ConfigError, ProfileError
from gpuvirt.model.catalog import (
    GIB,
    MIB,
    load_catalog,
    mig_profile_name,
    models_dir_files,
    parse_catalog,
    parse_vgpu_name,
    resolve_gi_profile,
    resolve_vgpu_type,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
MIG_PROFILES = REFERENCE / "mig_profiles.yaml"
HARVESTER = REFERENCE / "vgpu-sysfs-samples" / "harvester-pcidevices" / "sys"
A2_VF = HARVESTER / "class" / "mdev_bus" / "0000:08:01.7"
L40S_VF = HARVESTER / "bus" / "pci" / "devices" / "0000:26:00.4"

MIG_MODELS = ["a100-40gb", "a100-80gb", "a30", "h100-80gb", "h100-nvl", "h200", "h100-96gb", "gh200-144gb", "b200",
              "gb200", "b300", "gb300", "rtx-pro-6000", "rtx-pro-5000", "rtx-pro-4500"]
VGPU_MODELS = ["a2", "a16", "a10", "l40s", "t4"]
MDEV_MODELS = ["gvt-g", "mtty", "mdpy", "mbochs"]
ALL_MODELS = MIG_MODELS + VGPU_MODELS + MDEV_MODELS + ["amd-v620"]

# catalog id -> `model:` key in the reference mig_profiles.yaml
REFERENCE_MIG_NAMES = {
    "a100-40gb": "A100-SXM4-40GB",
    "a100-80gb": "A100-80GB",
    "a30": "A30-24GB",
    "h100-80gb": "H100-80GB",
    "h100-nvl": "H100-NVL-94GB",
    "h200": "H200-141GB",
    "gh200-144gb": "GH200-144GB",
    "b200": "B200-180GB",
}

# H200 3g/4g: 71168 MiB of 143771 MiB rounds up to 4/8 of the GPU; 4/8 x 141 GiB = 70.5 exactly, and the
# captured name is "3g.71gb": the naming rounds halves away from zero (Go's math.Round in go-nvlib), which
# is why mig_memory_gb must not use Python's round() (half to even -> 70).
HALF_ROUNDING_CASES = [("h200", "3g.71gb"), ("h200", "4g.71gb")]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def _reference_or_skip(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not available: {path} (expected next to the checkout in ../shared)")
    return path


@pytest.fixture(scope="module")
def reference_mig() -> dict[str, dict]:
    doc = yaml.safe_load(_reference_or_skip(MIG_PROFILES).read_text())
    return {m["model"]: m for m in doc["models"]}


# --- loading -------------------------------------------------------------------------------------------
def test_every_yaml_file_loads():
    files = models_dir_files()
    assert files, "no catalog files found"
    for name, text in files:
        models = parse_catalog([(name, text)]).models
        bases = [m for m in models.values() if not m.is_variant]
        assert len(bases) == 1, name
        mid = bases[0].id
        assert name == f"{mid}.yaml", f"{name} defines id {mid!r}; file name and id should match"
        for m in models.values():
            assert m.family == mid, (name, m.id)


def test_variants_share_the_model_and_keep_their_identity(catalog):
    fam = catalog.family("a100-80gb")
    assert [m.id for m in fam] == ["a100-80gb", "a100-80gb-pcie", "a800-80gb-pcie", "a800-80gb-sxm4"]
    pcie = catalog.get("a100-80gb-pcie")
    assert pcie.mig is catalog.get("a100-80gb").mig and pcie.is_variant and not fam[0].is_variant
    assert (pcie.device_id, pcie.nvml_name, pcie.vgpu_prefix) == (0x20B5, "NVIDIA A100 80GB PCIe", "A100D")
    # vGPU types are renamed to the variant's board name, ids kept
    sxm = catalog.get("a100-40gb-sxm4")
    assert [t.name for t in sxm.vgpu.types][:2] == ["A100X-4C", "A100X-5C"]
    assert [t.id for t in sxm.vgpu.types] == [t.id for t in catalog.get("a100-40gb").vgpu.types]
    assert catalog.get("a800-40gb-sxm4").vgpu is None          # its type names are not known
    assert {m.id for m in catalog.families()} >= set(ALL_MODELS)
    with pytest.raises(ConfigError, match="duplicate model id"):
        parse_catalog([("x.yaml", "id: x\nvendor: virtual\nvariants: [{id: x, device_id: 1}]\n")])


def test_the_worked_example_of_catalog_md():
    """docs/catalog.md's made-up file loads and means what the page says."""
    doc = (REPO / "docs" / "catalog.md").read_text()
    text = doc.split("### Worked example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    cat = parse_catalog([("example-24gb.yaml", text)])
    assert sorted(cat.models) == ["example-24gb", "example-24gb-se"]
    se = cat.get("example-24gb-se")
    assert se.family == "example-24gb" and se.mig is cat.get("example-24gb").mig
    assert cat.by_pci(0x10DE, 0xFFF1, 0x10DE, 0x1235) is se and se.pci_device_filter == "0xFFF110DE"
    assert resolve_gi_profile(se, "1g.11gb").name == "1g.12gb"
    with pytest.raises(ProfileError, match="1g.12gb"):
        resolve_gi_profile(se, "1g.13gb")
    total = se.memory_mib * MIB
    assert [mig_profile_name(p.compute_slices, p.memory_mib, total) for p in se.mig.gi_profiles] == \
        ["1g.12gb", "2g.24gb"]


def test_all_expected_models_exist(catalog):
    assert set(ALL_MODELS) <= set(catalog.ids())
    for mid in ALL_MODELS:
        assert catalog.get(mid).id == mid


def test_capabilities(catalog):
    for mid in MIG_MODELS:
        assert "mig" in catalog.get(mid).capabilities()
    assert catalog.get("a2").capabilities() == ["vgpu-mdev"]
    assert catalog.get("a10").capabilities() == ["vgpu-mdev"]
    assert catalog.get("t4").capabilities() == ["vgpu-mdev"]
    assert catalog.get("l40s").capabilities() == ["vgpu-vendor-vfio"]
    assert catalog.get("amd-v620").capabilities() == ["sriov-vf"]
    for mid in MDEV_MODELS:
        assert catalog.get(mid).capabilities() == ["mdev"]


def test_aliases_and_pci_ids_are_unambiguous(catalog):
    seen_alias: dict[str, str] = {}
    seen_pci: dict[tuple, str] = {}
    for mid in catalog.ids():
        m = catalog.get(mid)
        for a in m.aliases:
            key = a.lower()
            assert key not in catalog.models or key == mid, f"alias {a} of {mid} is another model's id"
            assert seen_alias.setdefault(key, mid) == mid, f"alias {a} on {mid} and {seen_alias[key]}"
        if m.vendor_id is not None and m.device_id is not None:
            k = (m.vendor_id, m.device_id, m.subsystem_device_id)
            assert seen_pci.setdefault(k, mid) == mid, f"{mid} and {seen_pci[k]} have the same PCI identity"
            assert catalog.by_pci(m.vendor_id, m.device_id, m.subsystem_vendor_id, m.subsystem_device_id) is m
            assert m in catalog.by_device_filter(m.pci_device_filter)
    # device ids shared by two boards are told apart by subsystem id, never guessed
    shared = {}
    for m in catalog.models.values():
        if m.device_id is not None:
            shared.setdefault((m.vendor_id, m.device_id), []).append(m)
    for (ven, dev), ms in shared.items():
        if len(ms) > 1:
            assert all(x.subsystem_device_id is not None for x in ms), [x.id for x in ms]
            assert catalog.by_pci(ven, dev, 0x10DE, 0x0000) is None


def test_lookups(catalog):
    assert [m.id for m in catalog.by_device_filter("0x20B510DE")] == ["a100-80gb-pcie"]
    assert [m.id for m in catalog.by_device_filter("0x233B10DE")] == ["h200-nvl"]
    assert [m.id for m in catalog.by_device_filter("0x25B610DE")] == ["a16", "a2"]
    assert [m.id for m in catalog.by_device_filter("0x25B610DE:0x14A910DE")] == ["a16"]
    assert catalog.by_device_filter("0x123410DE") == []
    assert catalog.by_nvml_name("NVIDIA H100 NVL").id == "h100-nvl"
    assert catalog.by_nvml_name("NVIDIA A100 80GB PCIe").id == "a100-80gb-pcie"
    assert catalog.by_nvml_name("Tesla T4").id == "t4"
    assert catalog.by_pci(0x10DE, 0x25B6, 0x10DE, 0x14A9).id == "a16"
    assert catalog.by_pci(0x10DE, 0x25B6, 0x10DE, 0x157E).id == "a2"
    assert catalog.by_pci(0x10DE, 0x2330, 0x10DE, 0x16C1).id == "h100-80gb"     # unique id: subsystem ignored
    assert [m.id for m in catalog.by_vgpu_prefix("a100x")] == ["a100-40gb-sxm4"]


def test_hopper_and_ampere_persistence(catalog):
    for mid in ("a100-40gb", "a100-80gb", "a30"):
        g = catalog.get(mid).mig
        assert g.mode_survives_reboot and g.enable_requires_reset, mid
    for mid in set(MIG_MODELS) - {"a100-40gb", "a100-80gb", "a30"}:
        g = catalog.get(mid).mig
        assert not g.mode_survives_reboot and not g.enable_requires_reset, mid


# --- MIG geometry --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mid", MIG_MODELS)
def test_mig_profile_names_follow_formula(catalog, mid):
    # on every board of the file: a variant with another NVML total memory must still print these names
    for m in catalog.family(mid):
        for p in m.mig.gi_profiles:
            computed = mig_profile_name(p.compute_slices, p.memory_mib, m.memory_bytes, p.attributes)
            assert computed == p.name, f"{m.id}: {p.name} computes as {computed}"


def test_half_rounding_cases_are_real_halves(catalog):
    for mid, name in HALF_ROUNDING_CASES:
        m = catalog.get(mid)
        p = next(p for p in m.mig.gi_profiles if p.name == name)
        frac = math.ceil(p.memory_mib * MIB / m.memory_bytes * 8) / 8
        exact = frac * math.ceil(m.memory_bytes / GIB)
        assert exact - math.floor(exact) == 0.5
        assert mig_profile_name(p.compute_slices, p.memory_mib, m.memory_bytes, p.attributes) == name


@pytest.mark.parametrize("mid", MIG_MODELS)
def test_mig_geometry_is_self_consistent(catalog, mid):
    g = catalog.get(mid).mig
    ids = [p.id for p in g.gi_profiles]
    assert len(ids) == len(set(ids))
    assert len({p.nvml_constant for p in g.gi_profiles}) == len(ids)
    for p in g.gi_profiles:
        assert p.compute_slices <= g.compute_slices
        assert p.max_instances <= len(p.starts)
        for s in p.starts:
            assert 0 <= s and s + p.memory_slices <= g.memory_slices, (mid, p.name, s)
        assert p.compute_slices in g.ci_profiles, (mid, p.name)
        full = [c for c in g.ci_profiles[p.compute_slices] if c.compute_slices == p.compute_slices]
        assert len(full) == 1 and full[0].max_instances == 1
    for size, order in g.driver_placement_order.items():
        legal = {s for p in g.gi_profiles if p.memory_slices == size for s in p.starts}
        assert set(order) == legal, (mid, size)
    assert g.profile(0).memory_slices == g.memory_slices          # id 0 is the whole GPU everywhere
    assert g.sm_in_mig == g.profile(0).sm


def test_a30_and_eight_slot_placement_orders(catalog):
    for mid in ("a30", "rtx-pro-6000"):
        assert dict(catalog.get(mid).mig.driver_placement_order) == {1: (0, 1, 2, 3), 2: (0, 2), 4: (0,)}
    ref = dict(catalog.get("a100-40gb").mig.driver_placement_order)
    for mid in MIG_MODELS:
        if catalog.get(mid).mig.memory_slices == 8:
            assert dict(catalog.get(mid).mig.driver_placement_order) == ref, mid


@pytest.mark.parametrize("mid", sorted(REFERENCE_MIG_NAMES))
def test_mig_profiles_match_reference(catalog, reference_mig, mid):
    ref = reference_mig[REFERENCE_MIG_NAMES[mid]]
    g = catalog.get(mid).mig
    assert g.memory_slices == ref["memory_slices"]
    assert g.compute_slices == ref["compute_slices"]
    if ref.get("sm_total_in_mig") is not None:
        assert g.sm_in_mig == ref["sm_total_in_mig"]
    if ref.get("total_memory_mib") is not None:
        assert catalog.get(mid).memory_mib == ref["total_memory_mib"]
    ours = {p.id: p for p in g.gi_profiles}
    assert set(ours) == {r["id"] for r in ref["gi_profiles"]}
    for r in ref["gi_profiles"]:
        p = ours[r["id"]]
        where = f"{mid} profile {r['id']}"
        assert p.nvml_constant == r["nvml_constant_value"], where
        assert p.name == r["name"], where
        assert p.compute_slices == r["compute_slices"], where
        assert p.memory_slices == r["memory_slices"], where
        assert p.max_instances == r["max_instances"], where
        assert list(p.starts) == r["placements"]["starts"], where
        assert p.memory_slices == r["placements"]["size"], where
        if r.get("memory_mib") is not None:
            assert p.memory_mib == r["memory_mib"], where
        if r.get("sm") is not None:
            assert p.sm == r["sm"], where
        for k, v in (r.get("engines") or {}).items():
            if v is not None:
                assert getattr(p.engines, k) == v, f"{where} engine {k}"
        assert ("me" in p.attributes) == r["name"].endswith("+me"), where
    ref_ci = {int(k.rstrip("g")): v for k, v in ref["ci_profiles_by_gi_size"].items()}
    assert set(g.ci_profiles) == set(ref_ci)
    for size, lst in ref_ci.items():
        got = [(c.id, c.compute_slices, c.max_instances) for c in g.ci_profiles[size]]
        assert got == [(c["id"], c["compute_slices"], c["max_instances"]) for c in lst], (mid, size)


# The MIG User Guide's "Supported MIG Profiles" tables (docs/catalog.md cites the edition), transcribed here
# independently of the catalog files: profile name, fraction of memory (in memory slices of the board),
# compute slices (the SM fraction's numerator) and "Number of Instances Available".
GUIDE_TABLES: dict[str, list[tuple[str, int, int, int]]] = {
    "a100-40gb": [("1g.5gb", 1, 1, 7), ("1g.5gb+me", 1, 1, 1), ("1g.10gb", 2, 1, 4), ("2g.10gb", 2, 2, 3),
                  ("3g.20gb", 4, 3, 2), ("4g.20gb", 4, 4, 1), ("7g.40gb", 8, 7, 1)],
    "a100-80gb": [("1g.10gb", 1, 1, 7), ("1g.10gb+me", 1, 1, 1), ("1g.20gb", 2, 1, 4), ("2g.20gb", 2, 2, 3),
                  ("3g.40gb", 4, 3, 2), ("4g.40gb", 4, 4, 1), ("7g.80gb", 8, 7, 1)],
    "a30": [("1g.6gb", 1, 1, 4), ("1g.6gb+me", 1, 1, 1), ("2g.12gb", 2, 2, 2), ("2g.12gb+me", 2, 2, 1),
            ("4g.24gb", 4, 4, 1)],
    "h100-80gb": [("1g.10gb", 1, 1, 7), ("1g.10gb+me", 1, 1, 1), ("1g.20gb", 2, 1, 4), ("2g.20gb", 2, 2, 3),
                  ("3g.40gb", 4, 3, 2), ("4g.40gb", 4, 4, 1), ("7g.80gb", 8, 7, 1)],
    "h100-nvl": [("1g.12gb", 1, 1, 7), ("1g.12gb+me", 1, 1, 1), ("1g.24gb", 2, 1, 4), ("2g.24gb", 2, 2, 3),
                 ("3g.47gb", 4, 3, 2), ("4g.47gb", 4, 4, 1), ("7g.94gb", 8, 7, 1)],
    "h100-96gb": [("1g.12gb", 1, 1, 7), ("1g.12gb+me", 1, 1, 1), ("1g.24gb", 2, 1, 4), ("2g.24gb", 2, 2, 3),
                  ("3g.48gb", 4, 3, 2), ("4g.48gb", 4, 4, 1), ("7g.96gb", 8, 7, 1)],
    "h200": [("1g.18gb", 1, 1, 7), ("1g.18gb+me", 1, 1, 1), ("1g.35gb", 2, 1, 4), ("2g.35gb", 2, 2, 3),
             ("3g.71gb", 4, 3, 2), ("4g.71gb", 4, 4, 1), ("7g.141gb", 8, 7, 1)],
    "b200": [("1g.23gb", 1, 1, 7), ("1g.23gb+me", 1, 1, 1), ("1g.45gb", 2, 1, 4), ("2g.45gb", 2, 2, 3),
             ("3g.90gb", 4, 3, 2), ("4g.90gb", 4, 4, 1), ("7g.180gb", 8, 7, 1)],
    "rtx-pro-6000": [("1g.24gb", 1, 1, 4), ("1g.24gb+me", 1, 1, 1), ("1g.24gb+gfx", 1, 1, 4),
                     ("1g.24gb+me.all", 1, 1, 1), ("1g.24gb-me", 1, 1, 4), ("2g.48gb", 2, 2, 2),
                     ("2g.48gb+gfx", 2, 2, 2), ("2g.48gb+me.all", 2, 2, 1), ("2g.48gb-me", 2, 2, 2),
                     ("4g.96gb", 4, 4, 1), ("4g.96gb+gfx", 4, 4, 1)],
    "rtx-pro-5000": [("1g.24gb", 1, 1, 2), ("1g.24gb+me", 1, 1, 1), ("1g.24gb+gfx", 1, 1, 2),
                     ("1g.24gb+me.all", 1, 1, 1), ("1g.24gb-me", 1, 1, 2), ("2g.48gb", 2, 2, 1),
                     ("2g.48gb+gfx", 2, 2, 1)],
    "rtx-pro-4500": [("1g.16gb", 1, 1, 2), ("1g.16gb+gfx", 1, 1, 2), ("1g.16gb+me.all", 1, 1, 1),
                     ("1g.16gb-me", 1, 1, 2), ("2g.32gb", 2, 2, 1), ("2g.32gb+gfx", 2, 2, 1)],
}

# GPU-instance profile ids as captured by `nvidia-smi mig -lgip` (sources in docs/catalog.md)
LGIP_IDS: dict[str, dict[str, int]] = {
    "h200": {"1g.18gb": 19, "1g.18gb+me": 20, "1g.35gb": 15, "2g.35gb": 14, "3g.71gb": 9, "4g.71gb": 5,
             "7g.141gb": 0},
    "gh200-144gb": {"1g.18gb": 19, "1g.18gb+me": 20, "1g.36gb": 15, "2g.36gb": 14},
    "b200": {"1g.23gb": 19, "1g.23gb+me": 20, "1g.45gb": 15, "2g.45gb": 14},
    "gb200": {"1g.23gb": 19, "1g.23gb+me": 20, "1g.47gb": 15, "2g.47gb": 14},
    "gb300": {"1g.35gb": 19, "1g.35gb+me": 20, "1g.70gb": 15, "2g.70gb": 14, "3g.139gb": 9, "4g.139gb": 5,
              "7g.278gb": 0},
    "rtx-pro-6000": {"1g.24gb": 14, "1g.24gb+me": 21, "1g.24gb+gfx": 47, "1g.24gb+me.all": 65, "1g.24gb-me": 67,
                     "2g.48gb": 5, "2g.48gb+gfx": 35, "2g.48gb+me.all": 64, "2g.48gb-me": 66, "4g.96gb": 0,
                     "4g.96gb+gfx": 32},
}

# Profile names NVIDIA's mig-parted config-default.yaml and GPU Operator default-mig-parted-config give each
# board (by the device filters or comments they sit under), both driver generations of the GB200
NVIDIA_CONFIG_NAMES: dict[str, list[str]] = {
    "gb200": ["1g.24gb", "1g.23gb", "1g.23gb+me", "1g.24gb+me", "1g.47gb", "2g.47gb", "3g.95gb", "3g.93gb",
              "4g.95gb", "4g.93gb", "7g.189gb", "7g.186gb"],
    "gh200-144gb": ["1g.18gb", "1g.18gb+me", "1g.36gb", "2g.36gb", "3g.72gb", "4g.72gb", "7g.144gb"],
    "b300": ["1g.34gb", "1g.34gb+me", "1g.67gb", "2g.67gb", "3g.135gb", "4g.135gb", "7g.269gb"],
    "gb300": ["1g.35gb", "1g.35gb+me", "1g.70gb", "2g.70gb", "3g.139gb", "4g.139gb", "7g.278gb"],
    "rtx-pro-6000": ["1g.24gb", "1g.24gb+gfx", "1g.24gb+me.all", "1g.24gb-me", "2g.48gb", "2g.48gb+gfx",
                     "2g.48gb+me.all", "2g.48gb-me", "4g.96gb", "4g.96gb+gfx"],
    "h100-96gb": ["1g.12gb", "2g.24gb", "3g.48gb", "4g.48gb", "7g.96gb"],
}

# Every PCI device id in NVIDIA's configs (mig-parted device filters, vgpu-device-manager `default` config)
# of a MIG board, with the board it must resolve to
NVIDIA_DEVICE_IDS = {
    0x20B0: "a100-40gb-sxm4", 0x20B1: "a100-40gb-pcie-20b1", 0x20F1: "a100-40gb", 0x20F6: "a800-40gb",
    0x20B2: "a100-80gb", 0x20B5: "a100-80gb-pcie", 0x20F3: "a800-80gb-sxm4", 0x20F5: "a800-80gb-pcie",
    0x20B7: "a30", 0x2330: "h100-80gb", 0x2331: "h100-80gb-pcie", 0x2322: "h800-80gb-pcie", 0x2324: "h800-80gb",
    0x2321: "h100-nvl", 0x233A: "h800-nvl", 0x2339: "h100-sxm5-94gb", 0x2335: "h200", 0x233B: "h200-nvl",
    0x2342: "h100-96gb", 0x233D: "h100-96gb-233d", 0x20B6: "pg506-96gb", 0x2329: "h20", 0x2348: "gh200-144gb",
    0x2901: "b200", 0x2941: "gb200", 0x3182: "b300", 0x31C2: "gb300", 0x2BB5: "rtx-pro-6000",
    0x2BB1: "rtx-pro-6000-ws", 0x2BB4: "rtx-pro-6000-maxq", 0x2BB3: "rtx-pro-5000", 0x2C31: "rtx-pro-4500",
    0x2C3A: "rtx-pro-4500-se",
}


@pytest.mark.parametrize("mid", sorted(GUIDE_TABLES))
def test_mig_profiles_match_the_guide_table(catalog, mid):
    g = catalog.get(mid).mig
    got = [(p.name, p.memory_slices, p.compute_slices, p.max_instances) for p in g.gi_profiles]
    assert sorted(got) == sorted(GUIDE_TABLES[mid])


@pytest.mark.parametrize("mid", sorted(LGIP_IDS))
def test_mig_profile_ids_match_the_captures(catalog, mid):
    m = catalog.get(mid)
    for name, pid in LGIP_IDS[mid].items():
        assert resolve_gi_profile(m, name).id == pid, (mid, name)


@pytest.mark.parametrize("mid", sorted(NVIDIA_CONFIG_NAMES))
def test_nvidia_config_names_resolve_on_their_board(catalog, mid):
    m = catalog.get(mid)
    for name in NVIDIA_CONFIG_NAMES[mid]:
        resolve_gi_profile(m, name)


def test_every_device_id_of_nvidia_configs_is_a_board(catalog):
    for dev, mid in NVIDIA_DEVICE_IDS.items():
        assert [m.id for m in catalog.by_device_filter(f"0x{dev:04X}10DE")] == [mid], hex(dev)
        assert catalog.get(mid).mig is not None


@pytest.mark.parametrize("mid", MIG_MODELS)
def test_placements_are_legal_and_layouts_of_the_guide_fit(catalog, mid):
    from gpuvirt.model.mig import fits

    g = catalog.get(mid).mig
    for p in g.gi_profiles:
        # a profile of n memory slices starts on a multiple of n (7g: only 0); 1g never at the last slice
        assert all(s % p.memory_slices == 0 for s in p.starts), (mid, p.name)
        assert fits(g, {p.id: p.max_instances}), (mid, p.name)       # "Number of Instances Available"
    whole = next(p for p in g.gi_profiles if p.memory_slices == g.memory_slices and not p.attributes)
    assert whole.id == 0 and whole.compute_slices == g.compute_slices


def test_b200_seven_1g_23gb_fit_the_b200(catalog):
    from gpuvirt.model.mig import fits

    b200 = catalog.get("b200")
    assert fits(b200.mig, {resolve_gi_profile(b200, "1g.23gb").id: 7})


def test_reference_pci_ids_are_in_catalog(catalog, reference_mig):
    for mid, key in REFERENCE_MIG_NAMES.items():
        ids = {m.device_id for m in catalog.family(mid)}
        for entry in reference_mig[key].get("pci_device_ids") or []:
            assert int(str(entry).split()[0][:6], 16) in ids, (mid, entry)


def test_names_are_exact_per_model_with_alias_tables(catalog):
    a100 = catalog.get("a100-80gb")
    assert resolve_gi_profile(a100, "7g.80gb").id == 0
    assert resolve_gi_profile(a100, "7g.79gb").id == 0                  # the model's alias table
    assert resolve_gi_profile(a100, "1g.10gb+me").id == 20
    h200 = catalog.get("h200")
    assert resolve_gi_profile(h200, "3g.71gb").id == 9
    gb200 = catalog.get("gb200")
    assert resolve_gi_profile(gb200, "1g.24gb").id == resolve_gi_profile(gb200, "1g.23gb").id == 19
    assert resolve_gi_profile(gb200, "7g.189gb").id == 0
    # no closeness: another board's name, or a rounding neighbour, is refused and the model named
    with pytest.raises(ProfileError, match=r"unknown MIG profile '1g.36gb' for the H200-SXM5-141GB; valid: 1g.18gb"):
        resolve_gi_profile(h200, "1g.36gb")
    with pytest.raises(ProfileError, match="unknown MIG profile '3g.70gb' for the H200"):
        resolve_gi_profile(h200, "3g.70gb")
    with pytest.raises(ProfileError, match="for the H100 NVL"):
        resolve_gi_profile(catalog.get("h100-nvl"), "1g.23gb")
    assert resolve_gi_profile(catalog.get("gh200-144gb"), "1g.36gb").id == 15
    assert resolve_gi_profile(catalog.get("b200"), "1g.23gb").id == 19
    for m in catalog.models.values():
        if m.mig is not None:
            for alias, target in m.mig.name_aliases.items():
                assert alias not in {p.name for p in m.mig.gi_profiles}, (m.id, alias)
                assert resolve_gi_profile(m, alias).name == target


@pytest.mark.parametrize("name", ["", "nonsense", "7g", "9g.80gb", "7g.20gb", "1g.10gb+xx", "3c.7g.80gb",
                                  "7g.80gb.extra", "gpu-7g.80gb", "7g.81gb"])
def test_resolve_gi_profile_rejects_nonsense(catalog, name):
    with pytest.raises(ProfileError):
        resolve_gi_profile(catalog.get("a100-80gb"), name)


def test_resolve_gi_profile_on_non_mig_board(catalog):
    with pytest.raises(ProfileError):
        resolve_gi_profile(catalog.get("a2"), "1g.5gb")


# --- NVIDIA vGPU ------------------------------------------------------------------------------------------
SERIES_RULES = {"B": (4, 45), "Q": (4, 60), "A": (1, 60), "C": (1, 60)}


@pytest.mark.parametrize("mid", sorted({m.id for m in load_catalog().models.values() if m.vgpu is not None}))
def test_vgpu_types_are_consistent(catalog, mid):
    m = catalog.get(mid)
    v = m.vgpu
    ids = [t.id for t in v.types]
    assert len(ids) == len(set(ids))
    assert len({t.name for t in v.types}) == len(ids)
    if v.parent == "vf":
        assert m.sriov is not None
    else:
        assert m.sriov is None
    for t in v.types:
        assert t.name.startswith(m.vgpu_prefix + "-"), (mid, t.name)
        assert parse_vgpu_name(t.name) is None or parse_vgpu_name(t.name).board == m.vgpu_prefix
        assert t.framebuffer_mib * t.max_instances <= m.memory_mib, (mid, t.name)
        if v.parent == "vf":
            assert t.max_instances <= m.sriov.total_vfs, (mid, t.name)
        series = re.search(r"([ABCQ])4?(ME)?$", t.name).group(1)
        assert (t.num_heads, t.frl_config) == SERIES_RULES[series], (mid, t.name)
        if series == "A":
            assert t.max_resolution == "1280x1024"
        assert resolve_vgpu_type(m, t.sysfs_id) is t
        assert resolve_vgpu_type(m, v.name_prefix + t.name) is t


def test_vgpu_board_settings(catalog):
    expect = {
        "a2": ("mdev", "vf", "same-size", "NVIDIA "),
        "a16": ("mdev", "vf", "same-size", "NVIDIA "),
        "a10": ("mdev", "vf", "same-size", "NVIDIA "),
        "l40s": ("vendor-vfio", "vf", "same-size", "NVIDIA "),
        "t4": ("mdev", "pf", "same-type", "GRID "),
    }
    for mid, (iface, parent, policy, prefix) in expect.items():
        v = catalog.get(mid).vgpu
        assert (v.interface, v.parent, v.policy, v.name_prefix) == (iface, parent, policy, prefix), mid
    assert catalog.get("a10").sriov.total_vfs == 32


def test_l40s_framebuffer_from_name(catalog):
    m = catalog.get("l40s")
    for t in m.vgpu.types:
        gb = int(re.search(r"-(\d+)[ABQ]$", t.name).group(1))
        assert t.framebuffer_mib == gb * 1024
        assert t.max_instances == min(48 // gb, m.sriov.total_vfs)
    assert resolve_vgpu_type(m, "L40S-8Q").framebuffer_mib == 8192


def _read(path: Path) -> str:
    return path.read_text()


def test_a2_types_match_fixture(catalog):
    types_dir = _reference_or_skip(A2_VF) / "mdev_supported_types"
    m = catalog.get("a2")
    fixture = {}
    for d in sorted(types_dir.iterdir()):
        fixture[int(d.name.split("-", 1)[1])] = d
    ours = {t.id: t for t in m.vgpu.types}
    assert set(ours) == set(fixture)
    for tid, d in fixture.items():
        t = ours[tid]
        assert d.name == t.sysfs_id
        assert _read(d / "name") == m.vgpu.name_prefix + t.name + "\n", tid
        assert _read(d / "description") == t.description() + "\n", tid
        assert _read(d / "device_api") == "vfio-pci\n"
    # The fixture's VF is the mdev parent: its PCI identity is the catalog's VF identity.
    assert int(_read(A2_VF / "vendor"), 16) == m.vendor_id
    assert int(_read(A2_VF / "device"), 16) == m.sriov.vf_device_id
    assert int(_read(A2_VF / "class"), 16) == m.sriov.vf_class


def test_a2_fixture_availability_matches_same_size_policy(catalog):
    types_dir = _reference_or_skip(A2_VF) / "mdev_supported_types"
    m = catalog.get("a2")
    # In the fixture exactly the types of one framebuffer size (4096M) are available on the VF.
    avail = {int(d.name.split("-")[1]): int(_read(d / "available_instances")) for d in types_dir.iterdir()}
    sizes = {m.vgpu.type_by_id(tid).framebuffer_mib for tid, n in avail.items() if n}
    assert sizes == {4096}
    assert {tid for tid, n in avail.items() if n} == {t.id for t in m.vgpu.types if t.framebuffer_mib == 4096}


def test_l40s_types_match_fixture(catalog):
    text = _read(_reference_or_skip(L40S_VF) / "nvidia" / "creatable_vgpu_types")
    lines = text.splitlines()
    assert lines[0] == "ID    : vGPU Name"
    m = catalog.get("l40s")
    fixture = []
    for line in lines[1:]:
        tid, name = (s.strip() for s in line.split(":", 1))
        fixture.append((int(tid), name))
    ours = [(t.id, m.vgpu.name_prefix + t.name) for t in m.vgpu.types]
    assert ours == fixture
    # and the driver's "%-5d : %s" line format reproduces the file byte for byte
    rendered = "ID    : vGPU Name\n" + "".join(f"{t.id:<5d} : {m.vgpu.name_prefix}{t.name}\n" for t in m.vgpu.types)
    assert rendered == text
    assert _read(L40S_VF / "nvidia" / "current_vgpu_type") == "0\n"


# --- generic mdev drivers ----------------------------------------------------------------------------------
def test_mdev_type_dirs(catalog):
    dirs = {mid: [catalog.get(mid).mdev.type_dir(t) for t in catalog.get(mid).mdev.types] for mid in MDEV_MODELS}
    assert dirs["mtty"] == ["mtty-1", "mtty-2"]
    assert dirs["mdpy"] == ["mdpy-vga", "mdpy-xga", "mdpy-hd"]
    assert dirs["mbochs"] == ["mbochs-small", "mbochs-medium", "mbochs-large"]
    assert dirs["gvt-g"] == ["i915-GVTg_V5_8", "i915-GVTg_V5_4", "i915-GVTg_V5_2", "i915-GVTg_V5_1"]


def test_mdev_sample_drivers(catalog):
    mtty = catalog.get("mtty").mdev
    assert (mtty.parent_kind, mtty.virtual_path, mtty.create_errno) == ("virtual", "virtual/mtty/mtty", "ENOSPC")
    assert [t.name for t in mtty.types] == ["Single port serial", "Dual port serial"]
    assert all(t.description is None for t in mtty.types)
    mdpy = catalog.get("mdpy").mdev
    assert mdpy.create_errno == "ENOMEM" and mdpy.virtual_path == "virtual/mdpy/mdpy"
    assert [t.description for t in mdpy.types] == [
        "virtual display, 640x480 framebuffer",
        "virtual display, 1024x768 framebuffer",
        "virtual display, 1920x1080 framebuffer",
    ]
    mbochs = catalog.get("mbochs").mdev
    assert mbochs.create_errno == "ENOMEM"
    assert [t.description for t in mbochs.types] == [f"virtual display, {n} MB video memory" for n in (4, 16, 64)]
    for mid in ("mtty", "mdpy", "mbochs"):
        m = catalog.get(mid)
        assert m.vendor == "virtual" and not m.is_pci and m.pci_device_filter is None
        assert m.vgpu is None and m.mig is None and m.sriov is None


def test_mdev_shared_pool_initial_availability(catalog):
    from gpuvirt.sim.rules import pool_available, registered_pool_types

    def initial(mid):
        spec = catalog.get(mid).mdev
        return [pool_available(spec, [], "p", t) for t in registered_pool_types(spec)]

    assert initial("mtty") == [24, 12]
    assert initial("mdpy") == [4, 4, 4]
    assert initial("mbochs") == [64, 16, 4]
    # After one mtty-2, 22 ports are left: 22 and 11.
    spec = catalog.get("mtty").mdev
    used = [{"parent": "p", "type": "mtty-2"}]
    assert [pool_available(spec, used, "p", t) for t in spec.types] == [22, 11]


def test_gvtg(catalog):
    m = catalog.get("gvt-g")
    assert (m.vendor, m.vendor_id, m.device_id, m.pci_class) == ("intel", 0x8086, 0x3E92, 0x030000)
    assert m.vgpu is None and m.mig is None and m.sriov is None
    spec = m.mdev
    assert (spec.driver, spec.parent_kind) == ("i915", "pci")
    table = {"8": (64, 384, 2, "1024x768"), "4": (128, 512, 4, "1920x1200"),
             "2": (256, 1024, 8, "1920x1200"), "1": (512, 2048, 16, "1920x1200")}
    for t in spec.types:
        low, high, weight, res = table[t.sysfs_name.rsplit("_", 1)[1]]
        assert t.name == t.sysfs_name
        assert dict(t.cost) == {"low_gm": low, "high_gm": high, "fence": 4}
        assert t.description == (f"low_gm_size: {low}MB\nhigh_gm_size: {high}MB\nfence: 4\n"
                                 f"resolution: {res}\nweight: {weight}")
    from gpuvirt.sim.rules import registered_pool_types

    # The chosen pool leaves the biggest type out, as the driver does when the aperture is too small.
    assert [t.sysfs_name for t in registered_pool_types(spec)] == ["GVTg_V5_8", "GVTg_V5_4", "GVTg_V5_2"]


def test_amd_v620(catalog):
    m = catalog.get("amd-v620")
    assert (m.vendor, m.vendor_id, m.device_id, m.pci_class, m.memory_mib) == ("amd", 0x1002, 0x73A1, 0x038000, 32768)
    assert m.sriov.total_vfs == 4 and m.sriov.vf_device_id == 0x73AE
    assert m.vgpu is None and m.mdev is None and m.mig is None


# --- docs -----------------------------------------------------------------------------------------------
def test_catalog_doc_lists_every_model(catalog):
    doc = (REPO / "docs" / "catalog.md").read_text()
    for mid in catalog.ids():
        assert f"`{mid}`" in doc, f"docs/catalog.md does not mention {mid}"


# --- the parsed-catalog cache (gpuvirt/model/catalog_cache.py) ----------------------------------------------------
def test_the_cache_gives_the_catalog_the_yaml_gives_and_follows_edits(tmp_path):
    from gpuvirt.model.catalog import load_catalog_files, pci_rows
    from gpuvirt.model.catalog_cache import digest, read_cache

    files = models_dir_files()
    cache = tmp_path / "cache"
    parsed = parse_catalog(files)
    first = load_catalog_files(files, str(cache))                 # parses, writes the cache
    [written] = list(cache.iterdir())
    assert oct(cache.stat().st_mode & 0o777) == "0o700" and oct(written.stat().st_mode & 0o777) == "0o600"
    cached = load_catalog_files(files, str(cache))                # reads it
    assert cached.models == first.models == parsed.models
    assert read_cache(str(cache), digest(files), "pci") == pci_rows(parsed.models.values())
    # an edited catalog file is another key: parsed again, the edit is seen
    edited = [(n, t.replace("display_name: NVIDIA A2", "display_name: Edited A2", 1) if n == "a2.yaml" else t)
              for n, t in files]
    assert digest(edited) != digest(files)
    assert load_catalog_files(edited, str(cache)).get("a2").display_name == "Edited A2"
    assert len(list(cache.iterdir())) == 2


def test_a_cache_others_could_write_or_a_broken_one_is_ignored(tmp_path):
    from gpuvirt.model.catalog import load_catalog_files
    from gpuvirt.model.catalog_cache import digest, read_cache

    files = models_dir_files()
    cache = tmp_path / "cache"
    load_catalog_files(files, str(cache))
    key = digest(files)
    [written] = list(cache.iterdir())
    assert read_cache(str(cache), key, "docs") is not None
    # a planted cache is not trusted where someone else may have written it
    doc = json.loads(written.read_text())
    doc["docs"] = [[n, d] for n, d in doc["docs"] if n != "a2.yaml"]
    written.write_text(json.dumps(doc))
    written.chmod(0o666)
    assert read_cache(str(cache), key, "docs") is None
    assert "a2" in load_catalog_files(files, str(cache)).models     # parsed from the YAML instead
    written.chmod(0o600)
    cache.chmod(0o777)
    assert read_cache(str(cache), key, "docs") is None
    cache.chmod(0o700)
    # garbage, a wrong format number, a symlink: parsed from the YAML as if there were no cache
    for bad in ("{not json", json.dumps({"format": 1, "key": key, "docs": [], "pci": []}), "[]"):
        written.write_text(bad)
        assert read_cache(str(cache), key, "docs") is None
        assert "a2" in load_catalog_files(files, str(cache)).models
    written.unlink()
    (tmp_path / "elsewhere.json").write_text(json.dumps(doc))
    written.symlink_to(tmp_path / "elsewhere.json")
    assert read_cache(str(cache), key, "docs") is None


def test_discovery_names_boards_from_the_pci_index(tmp_path):
    from gpuvirt.model.catalog_cache import by_vgpu_types, pci_lookup, vf_lookup
    from gpuvirt.model.catalog import pci_rows

    rows = pci_rows(load_catalog().models.values())
    assert pci_lookup(rows, 0x10DE, 0x25B6, 0x10DE, 0x157E)[0] == "a2"
    assert pci_lookup(rows, 0x10DE, 0x25B6, 0x10DE, 0x14A9)[0] == "a16"
    assert pci_lookup(rows, 0x10DE, 0x25B6, 0x10DE, 0x0000) is None          # shared id, no telling subsystem
    assert pci_lookup(rows, 0x10DE, 0x2236, 0x10DE, 0x9999)[0] == "a10"      # unambiguous id: OEM subsystem ok
    assert vf_lookup(rows, 0x10DE, 0x25B6) is None                           # A2 and A16 VFs look alike
    assert by_vgpu_types(rows, 0x10DE, 0x25B6, ["NVIDIA A16-4Q", "NVIDIA A16-8Q"])[0] == "a16"
    assert by_vgpu_types(rows, 0x10DE, 0x25B6, ["NVIDIA A2-4Q"])[0] == "a2"
    assert by_vgpu_types(rows, 0x10DE, 0x25B6, []) is None
