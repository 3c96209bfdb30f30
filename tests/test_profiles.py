"""Partition profiles (gpuvirt.model.profile): validation rules, alternatives, importers and exporters.

The mig-parted and vgpu-device-manager example configs are read from ``../shared/reference/data`` next to
the checkout; those tests skip when it is absent.  Nothing from that folder is copied into the repository.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from pathlib import Path

import pytest
import yaml

from gpuvirt.errors import ProfileError
from gpuvirt.model.catalog import load_catalog
from gpuvirt.model.mig import all_valid_multisets, layout_problems, maximal_multisets
from gpuvirt.model.profile import ProfileEntry, ProfileSpec, nearest_mig_layouts, resolve, validate
from gpuvirt.model.profile_formats import (
    dump_yaml,
    from_gpuvirt,
    from_mig_parted,
    from_vgpu_dm,
    model_filters,
    parse_profiles,
    to_gpuvirt,
    to_mig_parted,
)
from gpuvirt.model.profile_yaml import load_yaml
from gpuvirt.service.profiles import builtin_profiles

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "data"
MIG_PARTED_EXAMPLE = DATA / "mig-parted__examples_config.yaml"
VGPU_DM_T4_EXAMPLE = DATA / "vgpu-device-manager__examples_config-t4.yaml"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def mig_entry(geom, counts) -> ProfileEntry:
    return ProfileEntry(mig={geom.profile(pid).name: n for pid, n in counts.items()})


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and ". " not in msg.replace("e.g. ", "").rstrip(".")


def rejected(entry: ProfileEntry, model) -> str:
    with pytest.raises(ProfileError) as exc:
        resolve(entry, model)
    msg = str(exc.value)
    assert one_sentence(msg), msg
    return msg


# --- MIG -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_id", ["a100-40gb", "h100-80gb"])
def test_every_valid_mig_layout_is_accepted(catalog, model_id):
    model = catalog.get(model_id)
    geom = model.mig
    multisets = all_valid_multisets(geom)
    assert len(multisets) > 100
    for counts in multisets:
        layout = resolve(mig_entry(geom, counts), model)
        assert layout.mig_enabled is True
        assert Counter(layout.mig_counts) == counts
        placed = layout.mig_placements()
        assert len(placed) == sum(counts.values())
        assert layout_problems(geom, placed) == []


@pytest.mark.parametrize("model_id", ["a100-40gb", "h100-80gb"])
def test_one_instance_beyond_a_maximal_layout_is_rejected(catalog, model_id):
    model = catalog.get(model_id)
    geom = model.mig
    reasons = ("exceeds", "needs", "no placement")
    checked = 0
    for counts in maximal_multisets(geom):
        for prof in geom.gi_profiles:
            bigger = Counter(counts)
            bigger[prof.id] += 1
            msg = rejected(mig_entry(geom, bigger), model)
            assert any(r in msg for r in reasons), msg
            assert "; valid: " in msg, msg
            checked += 1
    assert checked > 200


def test_over_max_me_and_over_budget_reasons(catalog):
    a100 = catalog.get("a100-40gb")
    msg = rejected(ProfileEntry(mig={"1g.5gb+me": 2}), a100)
    assert msg.startswith("2x 1g.5gb+me exceeds the A100-PCIE-40GB's limit of 1 1g.5gb+me instance; valid: ")
    msg = rejected(ProfileEntry(mig={"1g.5gb": 8}), a100)
    assert "limit of 7 1g.5gb instances; valid: 7x 1g.5gb" in msg
    msg = rejected(ProfileEntry(mig={"3g.20gb": 2, "1g.5gb": 1}), a100)
    assert msg.startswith("2x 3g.20gb + 1g.5gb needs 9 memory slices, the A100-PCIE-40GB has 8; valid: 2x 3g.20gb")
    h100 = catalog.get("h100-80gb")
    msg = rejected(ProfileEntry(mig={"1g.10gb+me": 2}), h100)
    assert "limit of 1 1g.10gb+me instance" in msg


def test_nearest_alternatives_for_an_over_budget_request(catalog):
    a100 = catalog.get("a100-40gb")
    msg = rejected(ProfileEntry(mig={"4g.20gb": 1, "3g.20gb": 1, "1g.5gb": 1}), a100)
    assert msg.startswith("4g.20gb + 3g.20gb + 1g.5gb needs 8 compute slices, the A100-PCIE-40GB has 7; "
                          "valid: 4g.20gb + 3g.20gb, 4g.20gb + 2g.10gb + 1g.5gb, ")
    alternatives = msg.split("; valid: ")[1].split(", ")
    assert len(alternatives) == 3
    # every suggestion is itself accepted
    by_name = {p.name: p.id for p in a100.mig.gi_profiles}
    for alt in alternatives:
        counts = {}
        for part in alt.split(" + "):
            n, _, name = part.rpartition("x ")
            counts[name] = int(n) if n else 1
        assert all(name in by_name for name in counts)
        resolve(ProfileEntry(mig=counts), a100)


def test_nearest_alternatives_prefer_the_same_sized_swap(catalog):
    geom = catalog.get("a100-40gb").mig
    me = next(p.id for p in geom.gi_profiles if p.name == "1g.5gb+me")
    assert nearest_mig_layouts(geom, {me: 2})[0] == "1g.5gb + 1g.5gb+me"
    one_g = next(p.id for p in geom.gi_profiles if p.name == "1g.5gb")
    assert nearest_mig_layouts(geom, {one_g: 8})[0] == "7x 1g.5gb"


def test_balanced_layout_is_accepted_in_any_order(catalog):
    a100 = catalog.get("a100-40gb")
    items = [("1g.5gb", 2), ("2g.10gb", 1), ("3g.20gb", 1)]
    results = set()
    for perm in itertools.permutations(items):
        layout = resolve(ProfileEntry(mig=dict(perm)), a100)
        assert layout.mig_counts == {19: 2, 14: 1, 9: 1}
        results.add(tuple(layout.mig_placements()))
    assert len(results) == 1     # the placement never depends on the order the request listed them in


def test_rounding_aliases_resolve_per_model(catalog):
    a100_80 = catalog.get("a100-80gb")
    for name in ("7g.79gb", "7g.80gb"):
        assert resolve(ProfileEntry(mig={name: 1}), a100_80).mig_counts == {0: 1}
    msg = rejected(ProfileEntry(mig={"7g.79gb": 1, "7g.80gb": 1}), a100_80)
    assert "both name 7g.80gb" in msg
    h200 = catalog.get("h200")
    assert resolve(ProfileEntry(mig={"3g.71gb": 1}), h200).mig_counts == {9: 1}
    # a rounding neighbour is not an alias: only the names the model's file lists are accepted
    assert "unknown MIG profile '3g.70gb' for the H200-SXM5-141GB" in rejected(ProfileEntry(mig={"3g.70gb": 1}), h200)
    gb200 = catalog.get("gb200")
    assert resolve(ProfileEntry(mig={"1g.24gb": 2, "3g.95gb": 1}), gb200).mig_counts == {19: 2, 9: 1}
    # the alias picks the model's own profile id: 1g.10gb is the 2-slice profile on A100-40GB
    assert resolve(ProfileEntry(mig={"1g.10gb": 1}), catalog.get("a100-40gb")).mig_counts == {15: 1}
    assert resolve(ProfileEntry(mig={"1g.10gb": 1}), catalog.get("h100-80gb")).mig_counts == {19: 1}


def test_unknown_mig_names_list_the_valid_ones(catalog):
    msg = rejected(ProfileEntry(mig={"1g.5gb": 1}), catalog.get("h100-80gb"))
    assert msg == ("unknown MIG profile '1g.5gb' for the H100-SXM5-80GB; valid: 1g.10gb, 1g.10gb+me, 1g.20gb, "
                   "2g.20gb, 3g.40gb, 4g.40gb, 7g.80gb")
    assert "valid: " in rejected(ProfileEntry(mig={"banana": 1}), catalog.get("a100-40gb"))
    assert "does not support MIG" in rejected(ProfileEntry(mig={"1g.5gb": 1}), catalog.get("t4"))
    assert "does not support MIG" in rejected(ProfileEntry(mig_enabled=True), catalog.get("a2"))


def test_mig_mode_only_entries(catalog):
    assert resolve(ProfileEntry(mig_enabled=True), catalog.get("a100-40gb")).mig_enabled is True
    assert resolve(ProfileEntry(mig_enabled=False), catalog.get("h100-80gb")).mig_enabled is False
    # "MIG off" on a board without MIG is nothing to do, as in mig-parted
    assert resolve(ProfileEntry(mig_enabled=False), catalog.get("t4")).mig_enabled is None


@pytest.mark.parametrize("bad, words", [
    ({"mig": {"1g.5gb": 0}}, "at least 1"),
    ({"mig": {"1g.5gb": -2}}, "at least 1"),
    ({"mig": {"1g.5gb": "2"}}, "whole number"),
    ({"mig": {"1g.5gb": True}}, "whole number"),
    ({"mig_enabled": False, "mig": {"1g.5gb": 1}}, "mig_enabled is false"),
    ({}, "asks for nothing"),
    ({"devices": 3, "mig_enabled": False}, "bare number"),
    ({"devices": [], "mig_enabled": False}, "empty list"),
    ({"devices": [-1], "mig_enabled": False}, "not a GPU index"),
    ({"device_filter": "0x20B0", "mig_enabled": True}, "0xDDDDVVVV"),
    ({"sriov_vfs": -1}, ">= 0"),
])
def test_malformed_entries(bad, words):
    with pytest.raises(ProfileError, match=words):
        ProfileEntry(**bad)


# --- vGPU ------------------------------------------------------------------------------------------------------
def test_vgpu_same_size_policy_on_a2(catalog):
    a2 = catalog.get("a2")
    assert resolve(ProfileEntry(vgpu={"A2-2Q": 8}), a2).vgpu == {745: 8}
    assert resolve(ProfileEntry(vgpu={"nvidia-745": 8}), a2).vgpu == {745: 8}
    assert resolve(ProfileEntry(vgpu={"NVIDIA A2-4Q": 2, "A2-4C": 2}), a2).vgpu == {746: 2, 754: 2}
    assert "maximum of 8 A2-2Q" in rejected(ProfileEntry(vgpu={"A2-2Q": 9}), a2)
    msg = rejected(ProfileEntry(vgpu={"A2-2Q": 2, "A2-4Q": 1}), a2)
    assert "same-size policy" in msg and "valid: 2x A2-2Q, A2-4Q" in msg
    assert "holds at most 4" in rejected(ProfileEntry(vgpu={"A2-4Q": 3, "A2-4C": 2}), a2)
    assert "unknown vGPU type 'A2-3Q'" in rejected(ProfileEntry(vgpu={"A2-3Q": 1}), a2)
    assert "both name A2-2Q" in rejected(ProfileEntry(vgpu={"A2-2Q": 1, "745": 1}), a2)
    assert "8 VFs" in rejected(ProfileEntry(vgpu={"A2-2Q": 8}, sriov_vfs=4), a2)


def test_vgpu_same_type_policy_on_t4(catalog):
    t4 = catalog.get("t4")
    assert resolve(ProfileEntry(vgpu={"T4-1Q": 16}), t4).vgpu == {230: 16}
    assert "same-type policy" in rejected(ProfileEntry(vgpu={"T4-1Q": 2, "T4-1B": 2}), t4)
    assert "maximum of 16" in rejected(ProfileEntry(vgpu={"T4-1Q": 17}), t4)
    assert "no SR-IOV" in rejected(ProfileEntry(vgpu={"T4-1Q": 1}, sriov_vfs=1), t4)
    assert "no NVIDIA vGPU types" in rejected(ProfileEntry(vgpu={"A2-2Q": 1}), catalog.get("h100-80gb"))


def test_vgpu_time_sliced_and_mig_backed_on_a100(catalog):
    a100 = catalog.get("a100-40gb")
    layout = resolve(ProfileEntry(vgpu={"GRID A100-4C": 10}), a100)
    assert layout.vgpu == {468: 10} and layout.mig_enabled is False
    assert "MIG mode off" in rejected(ProfileEntry(vgpu={"A100-4C": 1}, mig={"1g.5gb": 1}), a100)
    assert "MIG mode off" in rejected(ProfileEntry(vgpu={"A100-4C": 1}, mig_enabled=True), a100)
    layout = resolve(ProfileEntry(mig={"1g.5gb": 3, "3g.20gb": 1}, vgpu={"A100-1-5C": 3, "A100-3-20C": 1}), a100)
    assert layout.mig_enabled is True and layout.vgpu == {474: 3, 476: 1}
    msg = rejected(ProfileEntry(mig={"1g.5gb": 2}, vgpu={"A100-1-5C": 3}), a100)
    assert "needs 3 GPU instances of 1g.5gb" in msg and "the entry creates 2" in msg
    assert "need MIG mode on" in rejected(ProfileEntry(mig_enabled=False, vgpu={"A100-1-5C": 1}), a100)
    assert "never share a GPU" in rejected(ProfileEntry(mig={"1g.5gb": 1}, vgpu={"A100-1-5C": 1, "A100-4C": 1}),
                                           a100)
    assert "exceeds the A100-PCIE-40GB's maximum of 10" in rejected(ProfileEntry(vgpu={"A100-4C": 11}), a100)


def test_vgpu_on_l40s_vfs(catalog):
    l40s = catalog.get("l40s")
    assert resolve(ProfileEntry(vgpu={"L40S-1Q": 32}), l40s).vgpu == {1147: 32}
    assert resolve(ProfileEntry(vgpu={"L40S-2Q": 12, "L40S-2B": 12}), l40s).vgpu == {1148: 12, 1146: 12}
    assert "holds at most 24" in rejected(ProfileEntry(vgpu={"L40S-2Q": 13, "L40S-2B": 12}), l40s)
    assert "same-size" in rejected(ProfileEntry(vgpu={"L40S-4Q": 1, "L40S-2Q": 1}), l40s)
    assert "the entry enables 4" in rejected(ProfileEntry(vgpu={"L40S-4Q": 5}, sriov_vfs=4), l40s)


def test_vgpu_mixed_size_policy_counts_framebuffer(catalog):
    l40s = catalog.get("l40s")
    mixed = dataclasses.replace(l40s, vgpu=dataclasses.replace(l40s.vgpu, policy="mixed-size"))
    assert resolve(ProfileEntry(vgpu={"L40S-24Q": 1, "L40S-12Q": 1, "L40S-4Q": 3}), mixed).vgpu == \
        {1155: 1, 1153: 1, 1150: 3}
    msg = rejected(ProfileEntry(vgpu={"L40S-24Q": 2, "L40S-4Q": 1}), mixed)
    assert "needs 53248 MiB of framebuffer" in msg


# --- generic mdev and SR-IOV -----------------------------------------------------------------------------------
def test_mdev_pools(catalog):
    gvt = catalog.get("gvt-g")
    assert resolve(ProfileEntry(mdev={"i915-GVTg_V5_4": 3}), gvt).mdev == {"i915-GVTg_V5_4": 3}
    assert resolve(ProfileEntry(mdev={"GVTg_V5_8": 7}), gvt).mdev == {"i915-GVTg_V5_8": 7}
    assert "valid: 3x i915-GVTg_V5_4" in rejected(ProfileEntry(mdev={"i915-GVTg_V5_4": 4}), gvt)
    assert "does not offer i915-GVTg_V5_1" in rejected(ProfileEntry(mdev={"i915-GVTg_V5_1": 1}), gvt)
    mtty = catalog.get("mtty")
    assert resolve(ProfileEntry(mdev={"mtty-2": 10, "mtty-1": 4}), mtty).mdev == {"mtty-2": 10, "mtty-1": 4}
    assert "needs 25 ports from a pool of 24" in rejected(ProfileEntry(mdev={"mtty-2": 12, "mtty-1": 1}), mtty)
    assert "unknown mdev type" in rejected(ProfileEntry(mdev={"mtty-3": 1}), mtty)
    assert "no generic mdev types" in rejected(ProfileEntry(mdev={"mtty-1": 1}), catalog.get("a2"))


def test_sriov_vfs(catalog):
    v620 = catalog.get("amd-v620")
    assert resolve(ProfileEntry(sriov_vfs=4), v620).sriov_vfs == 4
    assert "maximum of 4" in rejected(ProfileEntry(sriov_vfs=5), v620)
    assert "no SR-IOV" in rejected(ProfileEntry(sriov_vfs=1), catalog.get("h100-80gb"))


# --- specs, matching, validation -------------------------------------------------------------------------------
def test_device_filters_and_last_entry_wins(catalog):
    a100 = catalog.get("a100-40gb")
    h100 = catalog.get("h100-80gb")
    spec = ProfileSpec(name="x", entries=(
        ProfileEntry(mig_enabled=False),
        ProfileEntry(device_filter="0x20f110de", devices=[1, 2], mig={"1g.5gb": 7}),    # the A100 PCIe 40GB
        ProfileEntry(device_filter=["0x233010DE:0x16C110DE"], devices=[2], mig={"1g.10gb": 7}),
    ))
    assert spec.entries[1].device_filter == ("0x20F110DE",)
    assert spec.entry_for(a100, 0) is spec.entries[0]
    assert spec.entry_for(a100, 1) is spec.entries[1]
    assert spec.entry_for(a100, 2) is spec.entries[1]
    assert spec.entry_for(a100, None) is spec.entries[0]     # no index: only "devices: all" entries
    assert spec.entry_for(h100, 2) is spec.entries[2]
    assert spec.entry_for(h100, 2, subsystem="0x16C110DE") is spec.entries[2]
    assert spec.entry_for(h100, 2, subsystem="0x123410DE") is spec.entries[0]
    assert spec.entry_for(catalog.get("mtty"), 0) is spec.entries[0]
    assert not spec.entries[1].matches(catalog.get("mtty"), 1)
    report = validate(spec)
    assert {(c.entry, c.model) for c in report.checks} >= {(1, "a100-40gb"), (2, "h100-80gb"), (0, "h200")}
    assert spec.kind == "mig"


def test_validate_uses_the_spec_model_or_the_models_a_name_exists_on(catalog):
    spec = ProfileSpec(name="a", entries=(ProfileEntry(mig={"1g.10gb": 4}),))
    assert validate(spec).models == ["a100-40gb", "a100-80gb", "h100-80gb"]
    pinned = dataclasses.replace(spec, model="h100-80gb")
    assert validate(pinned).models == ["h100-80gb"]
    too_many = ProfileSpec(name="b", entries=(ProfileEntry(mig={"1g.10gb": 5}),))
    with pytest.raises(ProfileError, match=r"^profile 'b': 5x 1g.10gb exceeds the A100-PCIE-40GB's limit"):
        validate(too_many)
    assert validate(dataclasses.replace(too_many, model="h100-80gb")).models == ["h100-80gb"]
    with pytest.raises(ProfileError, match="no GPU model in the catalog has a MIG profile named '9g.1gb'"):
        validate(ProfileSpec(name="c", entries=(ProfileEntry(mig={"9g.1gb": 1}),)))
    with pytest.raises(ProfileError, match="does not match the H100-SXM5-80GB"):
        validate(ProfileSpec(name="d", model="h100-80gb",
                             entries=(ProfileEntry(device_filter="0x20B010DE", mig_enabled=True),)))
    unknown = validate(ProfileSpec(name="e", entries=(ProfileEntry(device_filter="0x2B8510DE", mig_enabled=True),)))
    assert unknown.checks == [] and unknown.unmatched_filters == [(0, "0x2B8510DE")]
    assert "matches no GPU model" in unknown.warnings()[0]


def test_spec_kinds_and_stored_form_round_trip():
    specs = [
        ProfileSpec(name="m", entries=(ProfileEntry(mig={"1g.5gb": 2}),)),
        ProfileSpec(name="v", model="a2", description="eight", entries=(ProfileEntry(vgpu={"A2-2Q": 8}),)),
        ProfileSpec(name="mv", entries=(ProfileEntry(mig={"1g.5gb": 1}, vgpu={"A100-1-5C": 1}),)),
        ProfileSpec(name="s", entries=(ProfileEntry(sriov_vfs=4),)),
        ProfileSpec(name="d", entries=(ProfileEntry(mdev={"mtty-2": 2}),)),
    ]
    assert [s.kind for s in specs] == ["mig", "vgpu", "mixed", "sriov", "mdev"]
    for s in specs:
        d = s.to_dict()
        assert d["format"] == 1 and d["kind"] == s.kind
        assert ProfileSpec.from_dict(yaml.safe_load(yaml.safe_dump(d))) == s
    with pytest.raises(ProfileError, match="spec format 99"):
        ProfileSpec.from_dict({**specs[0].to_dict(), "format": 99})


# --- importers -------------------------------------------------------------------------------------------------
def test_mig_parted_example_imports_and_validates(catalog):
    if not MIG_PARTED_EXAMPLE.is_file():
        pytest.skip(f"reference example not present: {MIG_PARTED_EXAMPLE}")
    fmt, specs = parse_profiles(MIG_PARTED_EXAMPLE.read_text(), MIG_PARTED_EXAMPLE.name)
    assert fmt == "mig-parted"
    by_name = {s.name: s for s in specs}
    assert list(by_name) == ["all-disabled", "all-enabled", "all-1g.5gb", "all-1g.5gb.me", "all-1g.10gb",
                             "all-2g.10gb", "all-3g.20gb", "all-balanced", "custom-config"]
    assert by_name["all-balanced"].entries == (ProfileEntry(mig_enabled=True,
                                                            mig={"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}),)
    custom = by_name["custom-config"]
    assert [e.devices for e in custom.entries] == [(0, 1, 2, 3), (4,), (5,), (6,), (7,)]
    a100 = catalog.get("a100-40gb")
    for spec in specs:
        filters = {f for e in spec.entries for f in e.device_filter}
        # configs without device filters target the A100-40GB, as the example does
        targets = [m for m in catalog.models.values() if any(e.matches_model(m) for e in spec.entries)] \
            if filters else [a100]
        report = validate(spec, targets)
        assert {c.model for c in report.checks} == {m.id for m in targets}
        assert len(report.checks) == len(spec.entries) * len(targets)
        validate(spec)        # and against every model it can meet in the catalog
    assert custom.entry_for(a100, 7).mig == {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}
    assert custom.entry_for(a100, 2).mig_enabled is False


def test_vgpu_dm_t4_example_imports_and_validates(catalog):
    if not VGPU_DM_T4_EXAMPLE.is_file():
        pytest.skip(f"reference example not present: {VGPU_DM_T4_EXAMPLE}")
    fmt, specs = parse_profiles(VGPU_DM_T4_EXAMPLE.read_text(), VGPU_DM_T4_EXAMPLE.name)
    assert fmt == "vgpu-device-manager"
    assert [s.name for s in specs] == ["T4-1Q", "T4-2Q", "T4-4Q", "T4-8Q", "T4-16Q", "T4-small", "T4-medium",
                                       "T4-large"]
    t4 = catalog.get("t4")
    for spec in specs:
        assert spec.kind == "vgpu"
        report = validate(spec, [t4])
        assert len(report.checks) == len(spec.entries)
        assert validate(spec).models == ["t4"]
    small = specs[5]
    assert resolve(small.entry_for(t4, 1), t4).vgpu == {231: 8}


MP_HEAD = "version: v1\nmig-configs:\n  c:\n"


@pytest.mark.parametrize("body, words", [
    ("    - devices: 3\n      mig-enabled: false\n", "bare number"),
    ("    - devices: all\n      mig-enabled: false\n      mig-devices: {1g.5gb: 1}\n", "must be empty"),
    ("    - devices: all\n      mig-enabled: true\n", "mig-devices is required"),
    ("    - devices: all\n      mig-enabled: true\n      mig-devices: {1g.5gb: 0}\n", "every count"),
    ("    - devices: all\n      mig-enabled: true\n      mig-devices: {1g.5gb: -1}\n", ">= 0"),
    ("    - devices: all\n      mig-enabled: true\n      mig-devices: {}\n      extra: 1\n", "unknown field"),
    ("    - mig-enabled: false\n", "devices is required"),
    ("    - devices: all\n", "mig-enabled is required"),
    ("    - devices: all\n      device-filter: 0x20B0\n      mig-enabled: false\n", "0xDDDDVVVV"),
    ("    []\n", "non-empty list"),
])
def test_mig_parted_field_rules(body, words):
    with pytest.raises(ProfileError, match=words) as exc:
        parse_profiles(MP_HEAD + body, "cfg.yaml")
    assert str(exc.value).startswith("cfg.yaml:")
    assert one_sentence(str(exc.value))


def test_mig_parted_accepts_zero_counts_and_filter_lists():
    text = MP_HEAD + ("    - device-filter: ['0x20B010DE', 0x20B110DE]\n      devices: [0, 1]\n"
                      "      mig-enabled: true\n      mig-devices: {1g.5gb: 2, 2g.10gb: 0}\n")
    _, [spec] = parse_profiles(text, "cfg.yaml")
    assert spec.entries[0] == ProfileEntry(device_filter=("0x20B010DE", "0x20B110DE"), devices=(0, 1),
                                           mig_enabled=True, mig={"1g.5gb": 2})


def test_document_errors_name_file_and_position():
    with pytest.raises(ProfileError, match=r"^bad\.yaml:3:1: not valid YAML"):
        load_yaml("a: [1,\nb: 2\n", "bad.yaml")
    with pytest.raises(ProfileError, match=r"^v\.yaml:1: unknown version 'v2'"):
        parse_profiles("version: v2\nmig-configs: {a: [{devices: all, mig-enabled: false}]}\n", "v.yaml")
    with pytest.raises(ProfileError, match=r"^d\.yaml:\d+:\d+: not valid YAML: duplicate key 'a'"):
        parse_profiles("version: v1\nmig-configs:\n  a: [{devices: all, mig-enabled: false}]\n"
                       "  a: [{devices: all, mig-enabled: true, mig-devices: {}}]\n", "d.yaml")
    with pytest.raises(ProfileError, match=r"^e\.yaml: the file is empty"):
        parse_profiles("", "e.yaml")
    with pytest.raises(ProfileError, match=r"^t\.yaml:5: vgpu-configs 'x' entry 1: vgpu-devices lists no"):
        parse_profiles("version: v1\nvgpu-configs:\n  x:\n    - devices: all\n      vgpu-devices: {}\n", "t.yaml")
    # parsed documents without text: errors name the source instead of a line
    with pytest.raises(ProfileError, match=r"^site\.yaml: mig-configs 'a' entry 1: unknown field\(s\) mig-device "):
        from_mig_parted({"version": "v1", "mig-configs": {"a": [{"devices": "all", "mig-enabled": True,
                                                                 "mig-device": {}}]}}, "site.yaml")
    with pytest.raises(ProfileError, match="missing 'version: v1'"):
        from_vgpu_dm({"vgpu-configs": {"x": [{"devices": "all", "vgpu-devices": {"T4-1Q": 1}}]}})


VD_HEAD = "version: v1\nvgpu-configs:\n  x:\n    - devices: all\n"


def test_vgpu_dm_empty_and_all_zero_counts_get_the_same_advice():
    # the all-zero error used to advise "use {} for none", which the parser then refused
    msgs = []
    for body in ("      vgpu-devices: {}\n", "      vgpu-devices: {T4-1Q: 0, T4-2Q: 0}\n"):
        with pytest.raises(ProfileError) as exc:
            parse_profiles(VD_HEAD + body, "t.yaml")
        msg = str(exc.value)
        assert msg.startswith("t.yaml:5: vgpu-configs 'x' entry 1: "), msg
        assert "use {}" not in msg and "at least one vGPU type with a count above 0" in msg, msg
        assert one_sentence(msg), msg
        msgs.append(msg)
    assert "vgpu-devices lists no vGPU type" in msgs[0] and "every count in vgpu-devices is 0" in msgs[1]
    with pytest.raises(ProfileError, match=r"^t\.yaml:6: vgpu-configs 'x' entry 1: vgpu-devices: the count of "):
        parse_profiles(VD_HEAD + "      vgpu-devices:\n        T4-1Q: -1\n", "t.yaml")
    # zeros next to a real count are dropped, as documented
    _, [spec] = parse_profiles(VD_HEAD + "      vgpu-devices: {T4-1Q: 16, T4-2Q: 0}\n", "t.yaml")
    assert spec.entries[0].vgpu == {"T4-1Q": 16}


def test_mig_parted_all_zero_advice_is_accepted():
    with pytest.raises(ProfileError, match=r"^cfg\.yaml:6: mig-configs 'c' entry 1: every count in mig-devices "
                                           r"is 0; use \{\}"):
        parse_profiles(MP_HEAD + "    - devices: all\n      mig-enabled: true\n      mig-devices: {1g.5gb: 0}\n",
                       "cfg.yaml")
    _, [spec] = parse_profiles(MP_HEAD + "    - devices: all\n      mig-enabled: true\n      mig-devices: {}\n",
                               "cfg.yaml")
    assert spec.entries[0] == ProfileEntry(mig_enabled=True)


HERE = "  # here"


@pytest.mark.parametrize("lines, words", [
    # gpuvirt format, short form
    (["name: x", "mig: {1g.5gb: 2}", "bogus: 1" + HERE], "unknown field(s) bogus"),
    (["name: x", "mig:", "  1g.5gb: 1", "  2g.10gb: 0" + HERE], "must be at least 1"),
    (["name: x", "mig:", "  '1g.5gb': 1", "  ' 1g.5gb': 1" + HERE], "listed twice"),
    (["name: x", "sriov_vfs: 1", "devices: 3" + HERE], "not a bare number"),
    (["name: x", "device_filter:", "  - '0x20B010DE'", "  - '0x20B0'" + HERE, "mig_enabled: true"], "0xDDDDVVVV"),
    (["name: x", "mig: {1g.5gb: 1}", "mig_enabled: false" + HERE], "mig_enabled is false"),
    (["name: x", "description: d", "model: [a2]" + HERE], "model must be a string"),
    (["name: x", "mig: {1g.5gb: 1}", "entries:" + HERE, "  - sriov_vfs: 1"], "not both"),
    # gpuvirt format, entries
    (["name: x", "entries:", "  - devices: [0]", "    mig: {1g.5gb: 2}", "  - devices: [1]", "    mig_enabled: false",
      "    extra: 3" + HERE], "entry 2: unknown field(s) extra"),
    (["name: x", "entries:", "  - devices: all", "    vgpu:", "      A2-1Q: 2", "      A2-2Q: two" + HERE],
     "whole number, not 'two'"),
    (["name: x", "entries:", "  - devices:", "      - 0", "      - -1" + HERE, "    sriov_vfs: 2"],
     "-1 is not a GPU index"),
    (["name: x", "entries:", "  - devices: [0]", "    sriov_vfs: 1", "  - devices: [1]",
      "    mig_enabled: 'yes'" + HERE], "mig_enabled must be true or false"),
    (["name: x", "entries:", "  - devices: [0]", "    mdev: {mtty-1: 1}", "    sriov_vfs: -1" + HERE],
     "sriov_vfs must be a whole number >= 0"),
    (["name: x", "entries:", "  - devices: [0]", "    mig:", "      1g.5gb: 1", "  - mdev: [mtty-1]" + HERE],
     "mdev must be a mapping"),
    # several profiles
    (["version: 1", "profiles:", "  - name: a", "    sriov_vfs: 1", "  - name: b", "    vgpu:",
      "      745: 1.5" + HERE], "profile 'b': vgpu: the count of '745'"),
    (["version: 1", "profiles:", "  - name: a", "    sriov_vfs: 1", "extra: 2" + HERE], "next to profiles"),
    # the tools' formats: the same rule
    (["version: v1", "mig-configs:", "  c:", "    - devices: all", "      mig-enabled: true",
      "      mig-devices: {}", "      extra: 1" + HERE], "unknown field(s) extra"),
    (["version: v1", "mig-configs:", "  c:", "    - device-filter:", "        - '0x20B010DE'",
      "        - 'nope'" + HERE, "      devices: all", "      mig-enabled: false"], "0xDDDDVVVV"),
    (["version: v1", "mig-configs:", "  c:", "    - devices: all", "      mig-enabled: 'on'" + HERE],
     "mig-enabled is required"),
    (["version: v1", "vgpu-configs:", "  t:", "    - vgpu-devices: {T4-1Q: 1}", "      devices:",
      "        - 0", "        - x" + HERE], "'x' is not a GPU index"),
])
def test_field_errors_point_at_the_offending_key(lines, words):
    where = next(i for i, line in enumerate(lines) if line.endswith(HERE)) + 1
    with pytest.raises(ProfileError) as exc:
        parse_profiles("\n".join(lines) + "\n", "f.yaml")
    msg = str(exc.value)
    assert msg.startswith(f"f.yaml:{where}: ") and words in msg, msg
    assert one_sentence(msg), msg


def test_gpuvirt_format_short_and_long_forms():
    text = ("version: 1\nprofiles:\n"
            "  - name: short\n    model: a2\n    vgpu: {745: 4}\n"
            "  - name: long\n    description: two parts\n    entries:\n"
            "      - {devices: [0], mig: {1g.5gb: 7}}\n      - {devices: [1], mig_enabled: false}\n")
    fmt, specs = parse_profiles(text, "p.yaml")
    assert fmt == "gpuvirt"
    assert specs[0].entries == (ProfileEntry(vgpu={"745": 4}),) and specs[0].model == "a2"
    assert specs[1].entries[1] == ProfileEntry(devices=[1], mig_enabled=False)
    assert specs[1].entries[0].mig_enabled is True      # instances imply MIG mode
    single = from_gpuvirt({"mig": {"3g.20gb": 2}}, default_name="from-cli")
    assert single[0].name == "from-cli"
    for doc, words in [({"name": "x", "mig": {"1g.5gb": 1}, "entries": [{"mig_enabled": True}]}, "not both"),
                       ({"name": "x", "migs": {"1g.5gb": 1}}, "unknown field"),
                       ({"mig": {"1g.5gb": 1}}, "without a name"),
                       ({"name": "bad name", "mig": {"1g.5gb": 1}}, "invalid profile name"),
                       ({"profiles": [{"name": "a", "sriov_vfs": 1}, {"name": "a", "sriov_vfs": 2}]}, "twice"),
                       ({"version": 2, "profiles": [{"name": "a", "sriov_vfs": 1}]}, "unknown version")]:
        with pytest.raises(ProfileError, match=words):
            from_gpuvirt(doc)


# --- exporters ---------------------------------------------------------------------------------------------------
def test_mig_parted_export_round_trips(catalog):
    specs = [
        ProfileSpec(name="all-balanced", entries=(ProfileEntry(mig_enabled=True,
                                                               mig={"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}),)),
        ProfileSpec(name="custom", entries=(ProfileEntry(devices=[0, 1], mig_enabled=False),
                                            ProfileEntry(devices=[2], device_filter=["0x20B010DE", "0x20B110DE"],
                                                         mig={"1g.5gb": 7}),
                                            ProfileEntry(mig_enabled=True))),
    ]
    text = dump_yaml(to_mig_parted(specs))
    fmt, back = parse_profiles(text, "out.yaml")
    assert fmt == "mig-parted"
    assert [(s.name, s.entries) for s in back] == [(s.name, s.entries) for s in specs]
    # a profile pinned to a model carries the model's PCI ids as device filter in mig-parted form
    pinned = ProfileSpec(name="h", model="h100-80gb", entries=(ProfileEntry(mig={"1g.10gb": 7}),))
    _, [h] = parse_profiles(dump_yaml(to_mig_parted([pinned])), "h.yaml")
    assert h.entries[0].device_filter == model_filters(catalog.get("h100-80gb"))
    assert validate(h).models == ["h100-80gb"]
    with pytest.raises(ProfileError, match="MIG layouts only"):
        to_mig_parted([ProfileSpec(name="v", entries=(ProfileEntry(vgpu={"A2-2Q": 1}),))])


def test_gpuvirt_export_round_trips():
    specs = list(builtin_profiles().values()) + [
        ProfileSpec(name="multi", description="d", entries=(ProfileEntry(device_filter="0x25B610DE", devices=[0],
                                                                         vgpu={"A2-2Q": 8}, sriov_vfs=8),
                                                            ProfileEntry(devices=[1], mdev={"mtty-1": 3})))]
    _, back = parse_profiles(dump_yaml(to_gpuvirt(specs)), "all.yaml")
    assert [(s.name, s.description, s.model, s.entries) for s in back] == \
        [(s.name, s.description, s.model, s.entries) for s in specs]


# --- built-ins ---------------------------------------------------------------------------------------------------
def test_builtin_profiles_are_valid_on_their_model(catalog):
    builtins = builtin_profiles()
    assert {"a100-40gb-balanced", "a100-40gb-7x1g", "h100-80gb-7x1g", "h100-80gb-balanced", "a2-2q-x8",
            "t4-1q-x16", "amd-v620-4vf"} <= set(builtins)
    kinds = set()
    for name, spec in builtins.items():
        assert spec.model and spec.source == "builtin" and spec.description
        assert validate(spec).models == [spec.model], name
        kinds.add(spec.kind)
    assert kinds == {"mig", "vgpu", "mdev", "sriov", "mixed"}
    balanced = resolve(builtins["a100-40gb-balanced"].entries[0], catalog.get("a100-40gb"))
    assert balanced.describe() == "MIG on: 3g.20gb + 2g.10gb + 2x 1g.5gb"


def test_a_file_of_another_kind_is_named_as_such():
    from gpuvirt.model.profile_formats import parse_profiles

    with pytest.raises(ProfileError) as e:
        parse_profiles("version: v1\nhooks:\n  pre-apply-mode: []\n", "hooks.yaml")
    assert "not a profile file (top-level keys: hooks, version)" in str(e.value) and "\n" not in str(e.value)
