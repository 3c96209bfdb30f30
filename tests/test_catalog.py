"""The GPU model catalog (profiles/models/*.yaml) against the loader and the reference captures.

Tests that compare with the reference pack read it from ``../shared/reference`` next to the checkout and
skip when it is not there; nothing from that folder is copied into the repository.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from gpuvirt.errors import ProfileError
from gpuvirt.model.catalog import (
    GIB,
    MIB,
    load_catalog,
    mig_memory_gb,
    mig_profile_name,
    parse_catalog,
    models_dir_files,
    resolve_gi_profile,
    resolve_vgpu_type,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
MIG_PROFILES = REFERENCE / "mig_profiles.yaml"
HARVESTER = REFERENCE / "vgpu-sysfs-samples" / "harvester-pcidevices" / "sys"
A2_VF = HARVESTER / "class" / "mdev_bus" / "0000:08:01.7"
L40S_VF = HARVESTER / "bus" / "pci" / "devices" / "0000:26:00.4"

MIG_MODELS = ["a100-40gb", "a100-80gb", "a30", "h100-80gb", "h100-nvl", "h200"]
VGPU_MODELS = ["a2", "a10", "l40s", "t4"]
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
        model = parse_catalog([(name, text)]).models
        assert len(model) == 1, name
        (mid,) = model
        assert name == f"{mid}.yaml", f"{name} defines id {mid!r}; file name and id should match"


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
    seen_pci: dict[tuple[int, int], str] = {}
    for mid in catalog.ids():
        m = catalog.get(mid)
        for a in m.aliases:
            key = a.lower()
            assert key not in catalog.models or key == mid, f"alias {a} of {mid} is another model's id"
            assert seen_alias.setdefault(key, mid) == mid, f"alias {a} on {mid} and {seen_alias[key]}"
        if m.vendor_id is not None and m.device_id is not None:
            k = (m.vendor_id, m.device_id)
            assert seen_pci.setdefault(k, mid) == mid
            assert catalog.by_pci(*k) is m
            assert catalog.by_device_filter(m.pci_device_filter) is m


def test_lookups(catalog):
    assert catalog.by_device_filter("0x20B510DE").id == "a100-80gb"     # 80GB PCIe via alias
    assert catalog.by_device_filter("0x233B10DE").id == "h200"          # H200 NVL via alias
    assert catalog.by_nvml_name("NVIDIA H100 NVL").id == "h100-nvl"
    assert catalog.by_nvml_name("NVIDIA A100 80GB PCIe").id == "a100-80gb"
    assert catalog.by_nvml_name("Tesla T4").id == "t4"


def test_hopper_and_ampere_persistence(catalog):
    for mid in ("a100-40gb", "a100-80gb", "a30"):
        g = catalog.get(mid).mig
        assert g.mode_survives_reboot and g.enable_requires_reset, mid
    for mid in ("h100-80gb", "h100-nvl", "h200"):
        g = catalog.get(mid).mig
        assert not g.mode_survives_reboot and not g.enable_requires_reset, mid


# --- MIG geometry --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mid", MIG_MODELS)
def test_mig_profile_names_follow_formula(catalog, mid):
    m = catalog.get(mid)
    for p in m.mig.gi_profiles:
        computed = mig_profile_name(p.compute_slices, p.memory_mib, m.memory_bytes, p.attributes)
        assert computed == p.name, f"{mid}: {p.name} computes as {computed}"


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
    assert dict(catalog.get("a30").mig.driver_placement_order) == {1: (0, 1, 2, 3), 2: (0, 2), 4: (0,)}
    ref = dict(catalog.get("a100-40gb").mig.driver_placement_order)
    for mid in ("a100-80gb", "h100-80gb", "h100-nvl", "h200"):
        assert dict(catalog.get(mid).mig.driver_placement_order) == ref, mid


@pytest.mark.parametrize("mid", MIG_MODELS)
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


def test_reference_pci_ids_are_in_catalog(catalog, reference_mig):
    for mid, key in REFERENCE_MIG_NAMES.items():
        m = catalog.get(mid)
        for entry in reference_mig[key].get("pci_device_ids") or []:
            dev = int(str(entry).split()[0][:6], 16)
            assert dev == m.device_id or f"0x{dev:04x}" in {a.lower() for a in m.aliases}, (mid, entry)


def test_resolve_gi_profile_tolerates_rounding(catalog):
    m = catalog.get("a100-80gb")
    assert resolve_gi_profile(m, "7g.80gb").id == 0
    assert resolve_gi_profile(m, "7g.79gb").id == 0
    assert resolve_gi_profile(m, "1g.10gb+me").id == 20
    assert resolve_gi_profile(catalog.get("h200"), "3g.71gb").id == 9
    assert resolve_gi_profile(catalog.get("h200"), "3g.70gb").id == 9


@pytest.mark.parametrize("name", ["", "nonsense", "7g", "9g.80gb", "7g.20gb", "1g.10gb+xx", "3c.7g.80gb",
                                  "7g.80gb.extra", "gpu-7g.80gb"])
def test_resolve_gi_profile_rejects_nonsense(catalog, name):
    with pytest.raises(ProfileError):
        resolve_gi_profile(catalog.get("a100-80gb"), name)


def test_resolve_gi_profile_on_non_mig_board(catalog):
    with pytest.raises(ProfileError):
        resolve_gi_profile(catalog.get("a2"), "1g.5gb")


# --- NVIDIA vGPU ------------------------------------------------------------------------------------------
SERIES_RULES = {"B": (4, 45), "Q": (4, 60), "A": (1, 60), "C": (1, 60)}


@pytest.mark.parametrize("mid", VGPU_MODELS + ["a100-40gb"])
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
        assert t.name.split("-")[0] in m.display_name, (mid, t.name)
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
