"""The NVML simulator underneath the real pynvml wrappers, and gpuvirt's NvmlSession on top of it.

Facts checked here come from ../shared/reference/mig-nvml.md (profile tables, placements, driver-chosen
placement captures, error codes) and, where present, the machine-readable mig_profiles.yaml next to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
from pathlib import Path
from typing import Any, Iterator

import pynvml
import pytest
import yaml

from gpuvirt.errors import (
    CapacityError,
    ConflictError,
    NotFoundError,
    NvmlError,
    NvmlInsufficientResourcesError,
    NvmlInUseError,
    NvmlNotFoundError,
    NvmlNotSupportedError,
    NvmlUnavailableError,
)
from gpuvirt.host.nvml import NvmlSession, normalize_bus_id
from gpuvirt.model import mig as migrules
from gpuvirt.model.catalog import MIB, load_catalog
from gpuvirt.sim.build import mig_uuid
from gpuvirt.sim.control import add_fault, init_sim, open_sim, reboot, set_client, set_driver_loaded
from gpuvirt.sim.nvml import FakeNvmlLib, ci_starts

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "mig_profiles.yaml"

CATALOG = load_catalog()
MIG_MODELS = sorted(m.id for m in CATALOG.models.values() if m.mig is not None)
NON_MIG_NVIDIA = sorted(m.id for m in CATALOG.models.values() if m.vendor == "nvidia" and m.mig is None)
AMPERE_MIG = [m for m in MIG_MODELS if CATALOG.get(m).mig.enable_requires_reset]
HOPPER_MIG = [m for m in MIG_MODELS if not CATALOG.get(m).mig.enable_requires_reset]


def _need(model_id: str) -> None:
    if model_id not in CATALOG.models:
        pytest.skip(f"model {model_id} is not in the catalog")


@pytest.fixture(autouse=True)
def _reset_pynvml() -> Iterator[None]:
    yield
    pynvml.nvmlLib = None
    pynvml._nvmlGetFunctionPointer_cache.clear()


def make_sim(tmp_path: Path, *specs: str, mig: bool = True, driver_loaded: bool = True, name: str = "host",
             vfs: bool = False):
    # SR-IOV VFs only matter to the vGPU test; leaving them out keeps the rendered sysfs tree small
    return init_sim(tmp_path / name, list(specs), seed="test", mig_enabled=mig, driver_loaded=driver_loaded,
                    enable_vfs=vfs)


@contextlib.contextmanager
def raw_nvml(sim) -> Iterator[FakeNvmlLib]:
    """pynvml's own wrappers over the fake, without gpuvirt's session."""
    lib = FakeNvmlLib(sim)
    pynvml.nvmlLib = lib
    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml.nvmlInit()
    try:
        yield lib
    finally:
        pynvml.nvmlShutdown()


@contextlib.contextmanager
def session_for(sim) -> Iterator[NvmlSession]:
    with NvmlSession(FakeNvmlLib(sim)) as s:
        assert s.available, s.unavailable_reason
        yield s


def state_layout(sim, index: int = 0) -> list[dict[str, Any]]:
    dev = next(d for d in sim.peek()["devices"] if d["nvml_index"] == index)
    return dev["mig"]["gpu_instances"]


# --- profile tables ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_id", MIG_MODELS)
def test_gi_profiles_equal_catalog(tmp_path: Path, model_id: str) -> None:
    model = CATALOG.get(model_id)
    sim = make_sim(tmp_path, model_id)
    with session_for(sim) as s:
        got = {p.id: p for p in s.gi_profiles(0)}
        gpu = s.gpus()[0]
    assert gpu.memory_mib == model.memory_mib
    assert gpu.pci_device_id == (model.device_id << 16) | model.vendor_id
    assert set(got) == {p.id for p in model.mig.gi_profiles}
    for p in model.mig.gi_profiles:
        g = got[p.id]
        assert (g.nvml_constant, g.name, g.compute_slices, g.memory_slices, g.max_instances, g.memory_mib, g.sm,
                g.engines) == (p.nvml_constant, p.name, p.compute_slices, p.memory_slices, p.max_instances,
                               p.memory_mib, p.sm, p.engines), p.name
        assert g.placements == list(p.placements), p.name
        assert g.remaining == migrules.remaining_capacity(model.mig, [], p)


def _reference_entry(model_id: str) -> dict[str, Any] | None:
    doc = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))
    for entry in doc["models"]:
        names = [entry["model"]] + [str(a).split(" (")[0] for a in entry.get("aliases") or []]
        for n in names:
            with contextlib.suppress(Exception):
                if CATALOG.get(n).id == model_id:
                    return entry
    return None


@pytest.mark.parametrize("model_id", MIG_MODELS)
def test_gi_and_ci_profiles_equal_reference(tmp_path: Path, model_id: str) -> None:
    if not REFERENCE.is_file():
        pytest.skip(f"reference data {REFERENCE} is not available")
    ref = _reference_entry(model_id)
    if ref is None:
        pytest.skip(f"no entry for {model_id} in {REFERENCE.name}")
    sim = make_sim(tmp_path, model_id)
    with session_for(sim) as s:
        got = {p.id: p for p in s.gi_profiles(0)}
        if ref.get("total_memory_mib") is not None:      # not captured for GH200 144G and B200
            assert s.gpus()[0].memory_mib == ref["total_memory_mib"]
        assert set(got) == {rp["id"] for rp in ref["gi_profiles"]}
        for rp in ref["gi_profiles"]:
            g = got[rp["id"]]
            assert g.name == rp["name"]
            assert g.nvml_constant == rp["nvml_constant_value"]
            assert g.compute_slices == rp["compute_slices"] and g.memory_slices == rp["memory_slices"]
            assert g.max_instances == rp["max_instances"]
            for key in ("memory_mib", "sm"):
                if rp.get(key) is not None:
                    assert getattr(g, key) == rp[key], (rp["name"], key)
            for key, value in rp["engines"].items():
                if value is not None:
                    assert getattr(g.engines, key) == value, (rp["name"], key)
            assert g.placements == [(st, rp["placements"]["size"]) for st in rp["placements"]["starts"]]

    # compute-instance profiles per GI size, read through pynvml on a freshly created GI of that size
    ci_ref = ref.get("ci_profiles_by_gi_size") or {}
    with raw_nvml(sim):
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        for key, rows in ci_ref.items():
            g = int(str(key).rstrip("g"))
            prof = next((p for p in CATALOG.get(model_id).mig.gi_profiles
                         if p.compute_slices == g and not p.attributes and p.memory_slices * 7 >= g), None)
            if prof is None:
                continue
            gi = pynvml.nvmlDeviceCreateGpuInstance(h, prof.id)
            seen = {}
            for c in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
                with contextlib.suppress(pynvml.NVMLError_NotSupported):
                    info = pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, c, 0)
                    seen[info.id] = (info.sliceCount, info.instanceCount)
            assert seen == {r["id"]: (r["compute_slices"], r["max_instances"]) for r in rows}, key
            pynvml.nvmlGpuInstanceDestroy(gi)


def test_profile_info_takes_nvml_constants_not_profile_ids(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb")
    with raw_nvml(sim):
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(h, pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE)
        assert (info.id, info.sliceCount, info.instanceCount, info.memorySizeMB) == (9, 3, 2, 19968)
        assert (info.multiprocessorCount, info.copyEngineCount, info.decoderCount, info.isP2pSupported) == (42, 3, 2, 0)
        assert info.name == "MIG 3g.20gb"          # pynvml decodes char fields
        # the same info by profile id (the other ID space)
        assert pynvml.nvmlDeviceGetGpuInstanceProfileInfoById(h, 9).sliceCount == 3
        # 0x5 (8_SLICE) and the GFX / NO_ME / ALL_ME constants do not exist on A100
        for constant in (pynvml.NVML_GPU_INSTANCE_PROFILE_8_SLICE, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX,
                         pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME, pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1):
            with pytest.raises(pynvml.NVMLError_NotSupported):
                pynvml.nvmlDeviceGetGpuInstanceProfileInfo(h, constant)
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceGetGpuInstanceProfileInfo(h, pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT)
        # a profile *id* used where a constant is expected is simply another (absent) constant
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceGetGpuInstanceProfileInfo(h, 19)
        # the versioned struct is checked
        bad = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
        bad.version = 1
        fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetGpuInstanceProfileInfoV")
        assert fn(h, 0, ctypes.byref(bad)) == pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        # v1 struct (no name field) works too
        v1 = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(h, 0, version=1)
        assert (v1.id, v1.memorySizeMB) == (19, 4864)


def test_possible_placements_two_call_pattern(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb")
    with raw_nvml(sim):
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        count = ctypes.c_uint(0)
        pynvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, 15, None, ctypes.byref(count))
        assert count.value == 4
        small = (pynvml.c_nvmlGpuInstancePlacement_t * 2)()
        with pytest.raises(pynvml.NVMLError_InsufficientSize):
            pynvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, 15, small, ctypes.byref(count))
        arr = (pynvml.c_nvmlGpuInstancePlacement_t * count.value)()
        pynvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, 15, arr, ctypes.byref(count))
        assert [(p.start, p.size) for p in arr] == [(0, 2), (2, 2), (4, 2), (6, 2)]
        # all documented placements are listed even when some are occupied (NVML reference)
        pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(h, 15, ctypes.byref(pynvml.c_nvmlGpuInstancePlacement_t(0, 2)))
        pynvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, 15, arr, ctypes.byref(count))
        assert count.value == 4
        assert pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(h, 15) == 3


# --- errors -------------------------------------------------------------------------------------------------------
def test_overlap_is_insufficient_resources(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb")
    with raw_nvml(sim):
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(h, 9, ctypes.byref(pynvml.c_nvmlGpuInstancePlacement_t(0, 4)))
        with pytest.raises(pynvml.NVMLError_InsufficientResources) as exc:
            pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(
                h, 14, ctypes.byref(pynvml.c_nvmlGpuInstancePlacement_t(2, 2)))
        assert str(exc.value) == "Insufficient Resources"
        # compute budget: 3g@0 + 4g would need 7 slices but 4g can only start at 0 -> overlap as well;
        # 3g@0 + 3g@4 uses 6 of 7, then a 2g has no memory left
        pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(h, 9, ctypes.byref(pynvml.c_nvmlGpuInstancePlacement_t(4, 4)))
        with pytest.raises(pynvml.NVMLError_InsufficientResources):
            pynvml.nvmlDeviceCreateGpuInstance(h, 19)
        # a start that is not a documented placement is an invalid argument, not a capacity problem
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(
                h, 14, ctypes.byref(pynvml.c_nvmlGpuInstancePlacement_t(1, 2)))
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(
                h, 9, ctypes.byref(pynvml.c_nvmlGpuInstancePlacement_t(4, 2)))


def test_full_gpu_and_per_profile_max(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb")
    with session_for(sim) as s:
        # 4g@0 + 2g@4 + the 2-slice 1g@6 use all 7 compute and 8 memory slices
        s.create_gpu_instance(0, 5, start=0)
        s.create_gpu_instance(0, 14, start=4)
        s.create_gpu_instance(0, 15, start=6)
        assert all(p.remaining == 0 for p in s.gi_profiles(0))
        for p in s.gi_profiles(0):
            with pytest.raises(NvmlInsufficientResourcesError):
                s.create_gpu_instance(0, p.id)
    sim2 = make_sim(tmp_path, "a100-40gb", name="other")
    with session_for(sim2) as s:
        s.create_gpu_instance(0, 20, start=0)        # one +me per GPU
        with pytest.raises(NvmlInsufficientResourcesError):
            s.create_gpu_instance(0, 20, start=1)
        with pytest.raises(NvmlInsufficientResourcesError):
            s.create_gpu_instance(0, 20)


def test_destroy_gi_with_ci_is_in_use_and_unknown_gi_not_found(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb")
    with raw_nvml(sim):
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        gi = pynvml.nvmlDeviceCreateGpuInstance(h, 9)
        ci = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE)
        with pytest.raises(pynvml.NVMLError_InUse) as exc:
            pynvml.nvmlGpuInstanceDestroy(gi)
        assert str(exc.value) == "In use by another client"
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlDeviceGetGpuInstanceById(h, 5)
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlGpuInstanceGetComputeInstanceById(gi, 3)
        pynvml.nvmlComputeInstanceDestroy(ci)
        pynvml.nvmlGpuInstanceDestroy(gi)
        # the handle of a destroyed instance is no longer valid
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlGpuInstanceGetInfo(gi)
    assert state_layout(sim) == []


def test_mig_calls_not_supported_without_mig(tmp_path: Path) -> None:
    mig_model = MIG_MODELS[0]
    specs = [mig_model] + [f"{m}:1" for m in NON_MIG_NVIDIA[:1]]
    sim = make_sim(tmp_path, *specs, mig=False)
    with raw_nvml(sim):
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        assert pynvml.nvmlDeviceGetMigMode(h) == [0, 0]
        for call in (lambda: pynvml.nvmlDeviceGetGpuInstanceProfileInfo(h, 0),
                     lambda: pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(h, 0),
                     lambda: pynvml.nvmlDeviceCreateGpuInstance(h, 0),
                     lambda: pynvml.nvmlDeviceGetGpuInstanceById(h, 1),
                     lambda: pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, 0)):
            with pytest.raises(pynvml.NVMLError_NotSupported):
                call()
        assert pynvml.nvmlDeviceGetMaxMigDeviceCount(h) == 0
        for i in range(1, pynvml.nvmlDeviceGetCount()):
            other = pynvml.nvmlDeviceGetHandleByIndex(i)
            with pytest.raises(pynvml.NVMLError_NotSupported):
                pynvml.nvmlDeviceGetMigMode(other)
            with pytest.raises(pynvml.NVMLError_NotSupported):
                pynvml.nvmlDeviceSetMigMode(other, 1)
            with pytest.raises(pynvml.NVMLError_NotSupported):
                pynvml.nvmlDeviceGetGpuInstanceProfileInfo(other, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE)
            assert pynvml.nvmlDeviceGetMaxMigDeviceCount(other) == 0
    with session_for(sim) as s:
        assert s.gi_profiles(0) == [] and s.gpu_instances(0) == []
        with pytest.raises(NvmlNotSupportedError):
            s.create_gpu_instance(0, 0)
        gpus = s.gpus()
        assert gpus[0].mig_capable and gpus[0].mig_current is False
        for g in gpus[1:]:
            assert (g.mig_capable, g.mig_current, g.mig_pending) == (False, None, None)
            with pytest.raises(NvmlNotSupportedError):
                s.set_mig_mode(g.index, True)


def test_driver_not_loaded(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb", driver_loaded=False)
    with NvmlSession(FakeNvmlLib(sim)) as s:
        assert s.available is False
        assert "libnvidia-ml.so.1" in (s.unavailable_reason or "")
        with pytest.raises(NvmlUnavailableError):
            s.gpus()
    pynvml.nvmlLib = FakeNvmlLib(sim)
    pynvml._nvmlGetFunctionPointer_cache.clear()
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        pynvml.nvmlInit()
    # calls before a successful init are refused like the real library does
    assert FakeNvmlLib(sim).nvmlDeviceGetCount_v2(ctypes.byref(ctypes.c_uint())) == pynvml.NVML_ERROR_UNINITIALIZED
    set_driver_loaded(sim, True)
    with session_for(sim) as s:
        assert len(s.gpus()) == 1


def test_real_library_path_after_fake(tmp_path: Path) -> None:
    """lib=None must drop an earlier session's fake and let pynvml dlopen the real library."""
    sim = make_sim(tmp_path, MIG_MODELS[0])
    with session_for(sim):
        pass
    assert isinstance(pynvml.nvmlLib, FakeNvmlLib)
    with NvmlSession() as real:
        if real.available:          # a host with an NVIDIA driver
            assert not isinstance(pynvml.nvmlLib, FakeNvmlLib)
        else:
            assert real.unavailable_reason and "NVML not available" in real.unavailable_reason
            assert pynvml.nvmlLib is None


# --- driver-chosen placement (mig-nvml.md section 4) ---------------------------------------------------------------
@pytest.mark.parametrize("model_id", ["a100-40gb", "h100-80gb"])
def test_seven_1g_driver_sequence(tmp_path: Path, model_id: str) -> None:
    _need(model_id)
    sim = make_sim(tmp_path, model_id)
    with session_for(sim) as s:
        made = [s.create_gpu_instance(0, 19) for _ in range(7)]
        assert [g.start for g in made] == [6, 4, 5, 0, 1, 2, 3]
        assert [g.id for g in made] == [13, 11, 12, 7, 8, 9, 10]
        with pytest.raises(NvmlInsufficientResourcesError):
            s.create_gpu_instance(0, 19)
        assert [g.id for g in s.gpu_instances(0)] == sorted(g.id for g in made)


def test_cgi_19_19_14_9_fails_at_3g(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb")
    with session_for(sim) as s:
        made = [s.create_gpu_instance(0, pid) for pid in (19, 19, 14)]
        assert [(g.start, g.size) for g in made] == [(6, 1), (4, 1), (0, 2)]
        with pytest.raises(NvmlInsufficientResourcesError) as exc:
            s.create_gpu_instance(0, 9)
        assert str(exc.value) == "create GPU instance 3g.20gb on GPU 0 (00000000:41:00.0): Insufficient Resources"
        assert exc.value.code == 23 and exc.value.context["profile"] == "3g.20gb"
    # with the 3g first the create succeeds: [CAP-A100-80] -cgi 9,14,19 put the first 3g at start 0
    sim2 = make_sim(tmp_path, "a100-40gb", name="again")
    with session_for(sim2) as s:
        made = [s.create_gpu_instance(0, pid) for pid in (9, 14, 19)]
    assert [(g.id, g.start, g.size) for g in made] == [(1, 0, 4), (5, 4, 2), (13, 6, 1)]


def test_cgi_19_14_5(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb")
    with session_for(sim) as s:
        made = [s.create_gpu_instance(0, pid) for pid in (19, 14, 5)]
    assert [(g.profile_id, g.start, g.size, g.id) for g in made] == [(19, 6, 1, 13), (14, 4, 2, 5), (5, 0, 4, 1)]


def test_a30_driver_sequence(tmp_path: Path) -> None:
    _need("a30")
    sim = make_sim(tmp_path, "a30")
    with session_for(sim) as s:
        made = [s.create_gpu_instance(0, pid) for pid in (14, 14, 5)]
    # [CAP-A30]: GI 3 at 0:1, GI 4 at 1:1, GI 2 at 2:2
    assert [(g.id, g.start, g.size) for g in made] == [(3, 0, 1), (4, 1, 1), (2, 2, 2)]


# --- explicit placements and capacity ----------------------------------------------------------------------------
def test_explicit_placements_and_remaining_capacity(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb")
    with session_for(sim) as s:
        a = s.create_gpu_instance(0, 19, start=0)
        b = s.create_gpu_instance(0, 19, start=5)
        assert (a.id, a.start, b.id, b.start) == (7, 0, 12, 5)
        remaining = {p.name: p.remaining for p in s.gi_profiles(0)}
        assert remaining["3g.20gb"] == 0 and remaining["4g.20gb"] == 0
        assert remaining["7g.40gb"] == 0 and remaining["2g.10gb"] == 1 and remaining["1g.5gb"] == 5
        with pytest.raises(NvmlInsufficientResourcesError) as exc:
            s.create_gpu_instance(0, 9, start=4)
        assert str(exc.value).startswith("create GPU instance 3g.20gb at 4:4 on GPU 0 (00000000:41:00.0): ")
        g = s.create_gpu_instance(0, 14, start=2)
        assert (g.id, g.start, g.size) == (4, 2, 2)
        assert [(x.id, x.start) for x in s.gpu_instances(0)] == [(4, 2), (7, 0), (12, 5)]
    with raw_nvml(sim):
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        info = pynvml.nvmlGpuInstanceGetInfo(pynvml.nvmlDeviceGetGpuInstanceById(h, 4))
        assert (info.id, info.profileId, info.placement.start, info.placement.size) == (4, 14, 2, 2)
        assert ctypes.cast(info.device, ctypes.c_void_p).value == ctypes.cast(h, ctypes.c_void_p).value
        arr = (pynvml.c_nvmlGpuInstance_t * 7)()
        count = ctypes.c_uint(0)
        pynvml.nvmlDeviceGetGpuInstances(h, 19, arr, ctypes.byref(count))
        assert sorted(pynvml.nvmlGpuInstanceGetInfo(arr[i]).id for i in range(count.value)) == [7, 12]


# --- compute instances and MIG devices ----------------------------------------------------------------------------
def test_compute_instances_and_mig_devices(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb")
    with session_for(sim) as s:
        big = s.create_gpu_instance(0, 9, start=0)          # GI 1
        small = s.create_gpu_instance(0, 19, start=4)       # GI 11
        full = s.create_compute_instance(0, small.id)
        assert (full.id, full.profile_id, full.start, full.size) == (0, 0, 0, 1)
        cis = [s.create_compute_instance(0, big.id, pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE) for _ in range(3)]
        assert [(c.id, c.start) for c in cis] == [(0, 0), (1, 1), (2, 2)]
        with pytest.raises(NvmlInsufficientResourcesError) as exc:
            s.create_compute_instance(0, big.id)
        assert "create compute instance 3g.20gb in GPU instance 1 on GPU 0" in str(exc.value)
        s.destroy_compute_instance(0, big.id, 1)
        again = s.create_compute_instance(0, big.id, 0)
        assert (again.id, again.start) == (1, 1)          # lowest free id, lowest free start
        with pytest.raises(NvmlNotFoundError):
            s.destroy_compute_instance(0, big.id, 5)
        with pytest.raises(NvmlNotSupportedError):        # 4c does not exist inside a 3g GI
            s.create_compute_instance(0, big.id, pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE)
        listed = s.gpu_instances(0)
        assert [(g.id, [c.id for c in g.compute_instances]) for g in listed] == [(1, [0, 1, 2]), (11, [0])]
        state = sim.peek()
        gpu_uuid = state["devices"][0]["uuid"]
        for g in listed:
            for c in g.compute_instances:
                assert c.uuid == mig_uuid("test", gpu_uuid, g.id, c.id, state["boot"])
        with pytest.raises(NvmlInUseError):
            s.destroy_gpu_instance(0, big.id)

    with raw_nvml(sim):
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        assert pynvml.nvmlDeviceGetMaxMigDeviceCount(h) == CATALOG.get("a100-40gb").mig.max_mig_devices
        migs = [pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, i) for i in range(4)]
        assert [(pynvml.nvmlDeviceGetGpuInstanceId(m), pynvml.nvmlDeviceGetComputeInstanceId(m)) for m in migs] == \
            [(1, 0), (1, 1), (1, 2), (11, 0)]
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, 4)
        m = migs[0]
        assert pynvml.nvmlDeviceIsMigDeviceHandle(m).value == 1
        assert pynvml.nvmlDeviceIsMigDeviceHandle(h).value == 0
        assert pynvml.nvmlDeviceGetName(m) == "NVIDIA A100-PCIE-40GB MIG 1c.3g.20gb"
        uuid = pynvml.nvmlDeviceGetUUID(m)
        assert uuid.startswith("MIG-")
        by_uuid = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        assert pynvml.nvmlDeviceGetComputeInstanceId(by_uuid) == 0
        parent = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m)
        assert pynvml.nvmlDeviceGetUUID(parent) == pynvml.nvmlDeviceGetUUID(h)
        attrs = pynvml.nvmlDeviceGetAttributes(m)
        assert (attrs.multiprocessorCount, attrs.gpuInstanceSliceCount, attrs.computeInstanceSliceCount,
                attrs.memorySizeMB, attrs.sharedCopyEngineCount) == (14, 3, 1, 19968, 3)
        assert pynvml.nvmlDeviceGetMemoryInfo(m).total == 19968 * MIB
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetGpuInstanceId(h)
        gi = pynvml.nvmlDeviceGetGpuInstanceById(h, 1)
        ci = pynvml.nvmlGpuInstanceGetComputeInstanceById(gi, 2)
        info = pynvml.nvmlComputeInstanceGetInfo(ci)
        assert (info.id, info.profileId, info.placement.start, info.placement.size) == (2, 0, 2, 1)
        assert pynvml.nvmlGpuInstanceGetComputeInstanceRemainingCapacity(gi, 0) == 0
        count = ctypes.c_uint(0)
        pynvml.nvmlGpuInstanceGetComputeInstancePossiblePlacements(gi, 1, None, ctypes.byref(count))
        assert count.value == len(ci_starts(3, 2)) == 1


def test_ci_placements_rule() -> None:
    assert ci_starts(7, 1) == list(range(7))
    assert ci_starts(7, 2) == [0, 2, 4]
    assert ci_starts(7, 3) == [0, 4]
    assert ci_starts(7, 4) == [0]
    assert ci_starts(7, 7) == [0]
    assert ci_starts(4, 2) == [0, 2]
    assert ci_starts(3, 3) == [0]


# --- MIG mode -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_id", AMPERE_MIG)
def test_ampere_mode_change_pending_while_clients_hold_gpu(tmp_path: Path, model_id: str) -> None:
    sim = make_sim(tmp_path, model_id, mig=False)
    set_client(sim, "0", "nvidia-persistenced", True)
    with session_for(sim) as s:
        assert s.set_mig_mode(0, True) == (False, True, "IN_USE")
        g = s.gpus()[0]
        assert (g.mig_current, g.mig_pending) == (False, True)
        with pytest.raises(NvmlNotSupportedError):        # pending is not enough to create instances
            s.create_gpu_instance(0, CATALOG.get(model_id).mig.gi_profiles[0].id)
        set_client(sim, "0", "nvidia-persistenced", False)
        assert s.set_mig_mode(0, True) == (True, True, "SUCCESS")
    # a pending change also becomes current at the next boot (Ampere keeps the mode in the InfoROM)
    sim2 = make_sim(tmp_path, model_id, mig=False, name="reboot")
    set_client(sim2, "0", "dcgm", True)
    with session_for(sim2) as s:
        s.set_mig_mode(0, True)
    reboot(sim2)
    with session_for(sim2) as s:
        g = s.gpus()[0]
        assert (g.mig_current, g.mig_pending) == (True, True)


@pytest.mark.parametrize("model_id", HOPPER_MIG)
def test_hopper_mode_change_immediate(tmp_path: Path, model_id: str) -> None:
    sim = make_sim(tmp_path, model_id, mig=False)
    set_client(sim, "0", "nvidia-persistenced", True)
    with session_for(sim) as s:
        assert s.set_mig_mode(0, True) == (True, True, "SUCCESS")
        assert s.gi_profiles(0)
        assert s.set_mig_mode(0, False) == (False, False, "SUCCESS")


def test_disable_mig_with_gpu_instances_is_in_use(tmp_path: Path) -> None:
    sim = make_sim(tmp_path, MIG_MODELS[0])
    with session_for(sim) as s:
        gi = s.create_gpu_instance(0, CATALOG.get(MIG_MODELS[0]).mig.gi_profiles[0].id)
        with pytest.raises(NvmlInUseError):
            s.set_mig_mode(0, False)
        s.destroy_gpu_instance(0, gi.id)
        assert s.set_mig_mode(0, False) == (False, False, "SUCCESS")


# --- faults ---------------------------------------------------------------------------------------------------------
def test_injected_faults(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb:2")
    add_fault(sim, "nvml.CreateGpuInstance")                       # default code 23
    add_fault(sim, "nvml.SetMigMode", nvml=pynvml.NVML_ERROR_NO_PERMISSION, match="0000:42:00.0")
    with session_for(sim) as s:
        with pytest.raises(NvmlInsufficientResourcesError):
            s.create_gpu_instance(0, 9)
        assert state_layout(sim) == []
        gi = s.create_gpu_instance(0, 9)                            # the fault fired once
        with pytest.raises(NvmlError) as exc:
            s.set_mig_mode(1, False)
        assert exc.value.code == pynvml.NVML_ERROR_NO_PERMISSION
        assert s.set_mig_mode(1, False)[0] is False                 # only once
        assert s.set_mig_mode(0, True) == (True, True, "SUCCESS")   # other GPU: no match

        add_fault(sim, "nvml.CreateComputeInstance", skip=1)
        s.create_compute_instance(0, gi.id, 0)
        with pytest.raises(NvmlInsufficientResourcesError):
            s.create_compute_instance(0, gi.id, 0)
        add_fault(sim, "nvml.DestroyComputeInstance")
        with pytest.raises(NvmlInUseError):
            s.destroy_compute_instance(0, gi.id, 0)
        s.destroy_compute_instance(0, gi.id, 0)
        add_fault(sim, "nvml.DestroyGpuInstance", match=f"gi={gi.id}")
        with pytest.raises(NvmlInUseError):
            s.destroy_gpu_instance(0, gi.id)
        assert [g.id for g in s.gpu_instances(0)] == [gi.id]
        s.destroy_gpu_instance(0, gi.id)
        assert s.gpu_instances(0) == []


# --- concurrency ------------------------------------------------------------------------------------------------------
def _race(root: str, barrier: Any, results: Any, explicit: bool) -> None:
    sim = open_sim(root)
    made = []
    with NvmlSession(FakeNvmlLib(sim)) as s:
        barrier.wait()
        if explicit:
            for start in range(7):
                try:
                    made.append(s.create_gpu_instance(0, 19, start=start).id)
                except NvmlInsufficientResourcesError:
                    pass
        else:
            for pid in (14, 19, 9, 19, 14, 19, 15, 19):
                try:
                    made.append(s.create_gpu_instance(1, pid).id)
                except NvmlInsufficientResourcesError:
                    pass
    results.put(made)


def test_concurrent_creates_never_overlap(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb:2")
    ctx = multiprocessing.get_context("fork")
    geom = CATALOG.get("a100-40gb").mig
    for explicit in (True, False):
        barrier = ctx.Barrier(2)
        results = ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(sim.root), barrier, results, explicit)) for _ in range(2)]
        for p in procs:
            p.start()
        made = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        index = 0 if explicit else 1
        layout = state_layout(sim, index)
        ids = made[0] + made[1]
        assert sorted(ids) == sorted(g["id"] for g in layout)        # every success is in the state, once
        placed = [migrules.Placed(g["start"], g["size"], g["profile_id"]) for g in layout]
        assert migrules.layout_problems(geom, placed) == []
        if explicit:
            assert sorted(ids) == [7, 8, 9, 10, 11, 12, 13]          # each slot won by exactly one process


# --- vGPU -------------------------------------------------------------------------------------------------------------
def test_vgpu_queries_and_gi_hosting_vgpu(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb", vfs=True)
    with session_for(sim) as s:
        gi = s.create_gpu_instance(0, 19)
        types = {t.id: t for t in s.vgpu_types(0)}
        assert types[474].name == "GRID A100-1-5C" and types[474].gpu_instance_profile_id == 19
        assert types[474].creatable and types[474].framebuffer_mib == 5120
        assert types[468].gpu_instance_profile_id is None and not types[468].creatable
        assert [t for t in types.values() if t.creatable] == [types[474]]
        # a MIG-backed vGPU on the GI holds it
        with sim.transaction() as state:
            vf = state["devices"][0]["vfs"][0]["address"]
            state["mdevs"].append({"uuid": "0b3a6f0e-5a0e-4c1e-9d3e-0a1b2c3d4e5f", "parent": vf,
                                   "type": "nvidia-474", "iommu_group": 90, "gpu_instance_id": gi.id,
                                   "open": False})
        with pytest.raises(NvmlInUseError):
            s.destroy_gpu_instance(0, gi.id)
        assert not any(t.creatable for t in s.vgpu_types(0))
    with raw_nvml(sim):
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        assert pynvml.nvmlDeviceGetVirtualizationMode(h) == pynvml.NVML_GPU_VIRTUALIZATION_MODE_HOST_VGPU
        assert pynvml.nvmlDeviceGetHostVgpuMode(h) == pynvml.NVML_HOST_VGPU_MODE_SRIOV
        assert pynvml.nvmlVgpuTypeGetClass(468) == "Compute"
        assert pynvml.nvmlVgpuTypeGetFramebufferSize(470) == 8192 * MIB
        assert pynvml.nvmlVgpuTypeGetGpuInstanceProfileId(470) == 0xFFFFFFFF
        assert pynvml.nvmlVgpuTypeGetResolution(470) == (4096, 2400)
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlVgpuTypeGetName(9999)


NVIDIA_MODELS = sorted(m.id for m in CATALOG.models.values() if m.vendor == "nvidia")


@pytest.mark.parametrize("model_id", NVIDIA_MODELS)
def test_every_nvidia_model_identity_and_vgpu_types(tmp_path: Path, model_id: str) -> None:
    model = CATALOG.get(model_id)
    sim = make_sim(tmp_path, model_id, mig=False)
    with session_for(sim) as s:
        (gpu,) = s.gpus()
        assert gpu.name == (model.nvml_name or model.display_name)
        assert gpu.memory_mib == model.memory_mib and gpu.pci_address == "0000:41:00.0"
        assert gpu.pci_device_id == (model.device_id << 16) | model.vendor_id
        assert gpu.mig_capable == (model.mig is not None)
        types = s.vgpu_types(0)
        if model.vgpu is None:
            assert types == []
        else:
            assert [t.id for t in types] == [t.id for t in model.vgpu.types]
            for got, want in zip(types, model.vgpu.types):
                assert got.name == model.vgpu.name_prefix + want.name
                assert got.framebuffer_mib == want.framebuffer_mib and got.max_instances == want.max_instances
                assert got.gpu_instance_profile_id == want.gpu_instance_profile_id
            # with MIG off and nothing created, exactly the time-sliced types have room
            assert {t.id for t in types if t.creatable} == {t.id for t in model.vgpu.types if not t.mig_backed}
    with raw_nvml(sim):
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        mode = pynvml.nvmlDeviceGetVirtualizationMode(h)
        assert mode == (pynvml.NVML_GPU_VIRTUALIZATION_MODE_HOST_VGPU if model.vgpu
                        else pynvml.NVML_GPU_VIRTUALIZATION_MODE_NONE)


# --- identity, sessions, error translation --------------------------------------------------------------------------
def test_identity_calls(tmp_path: Path) -> None:
    _need("a100-40gb")
    sim = make_sim(tmp_path, "a100-40gb:2")
    with raw_nvml(sim):
        assert pynvml.nvmlDeviceGetCount() == 2
        assert pynvml.nvmlSystemGetDriverVersion() == "570.86.15"
        assert pynvml.nvmlSystemGetNVMLVersion().endswith("570.86.15")
        h = pynvml.nvmlDeviceGetHandleByIndex(1)
        pci = pynvml.nvmlDeviceGetPciInfo(h)
        assert pci.busId == "00000000:42:00.0" and pci.busIdLegacy == "0000:42:00.0"
        assert (pci.domain, pci.bus, pci.device, pci.pciDeviceId) == (0, 0x42, 0, 0x20F110DE)
        uuid = pynvml.nvmlDeviceGetUUID(h)
        for key in ("0000:42:00.0", "00000000:42:00.0", "42:00.0"):
            assert pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByPciBusId(key)) == uuid
        assert pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByUUID(uuid)) == "NVIDIA A100-PCIE-40GB"
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceGetHandleByIndex(2)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
        assert mem.total == 40960 * MIB
    with session_for(sim) as s:
        assert [g.pci_address for g in s.gpus()] == ["0000:41:00.0", "0000:42:00.0"]
        with pytest.raises(NvmlNotFoundError):
            s.gi_profiles(7)
    assert normalize_bus_id("00000000:3B:00.0") == "0000:3b:00.0"


def test_sessions_on_different_hosts_in_one_process(tmp_path: Path) -> None:
    first = make_sim(tmp_path, f"{MIG_MODELS[0]}:1", name="one")
    second = make_sim(tmp_path, f"{MIG_MODELS[-1]}:3", name="two")
    with session_for(first) as a:
        assert len(a.gpus()) == 1
    with session_for(second) as b:
        assert len(b.gpus()) == 3
    a = NvmlSession(FakeNvmlLib(first)).open()
    b = NvmlSession(FakeNvmlLib(second)).open()
    try:
        assert len(a.gpus()) == 1 and len(b.gpus()) == 3 and len(a.gpus()) == 1   # interleaved
        real = NvmlSession().open()
        real.close()
        a.create_gpu_instance(0, CATALOG.get(MIG_MODELS[0]).mig.gi_profiles[0].id)
        assert len(a.gpu_instances(0)) == 1 and b.gpu_instances(0) == []
        before = a.call_count
        a.driver_version()
        assert a.call_count == before + 1
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("code, cls, base", [
    (pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES, NvmlInsufficientResourcesError, CapacityError),
    (pynvml.NVML_ERROR_IN_USE, NvmlInUseError, ConflictError),
    (pynvml.NVML_ERROR_NOT_FOUND, NvmlNotFoundError, NotFoundError),
    (pynvml.NVML_ERROR_NOT_SUPPORTED, NvmlNotSupportedError, NvmlError),
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, NvmlUnavailableError, NvmlError),
    (pynvml.NVML_ERROR_RESET_REQUIRED, NvmlError, NvmlError),
    (pynvml.NVML_ERROR_UNKNOWN, NvmlError, NvmlError),
])
def test_error_translation(tmp_path: Path, code: int, cls: type, base: type) -> None:
    sim = make_sim(tmp_path, MIG_MODELS[0])
    with session_for(sim) as s:
        err = s._error(pynvml.NVMLError(code), "do something", gpu=0)
    assert type(err) is cls and isinstance(err, base)
    assert err.code == code and err.context["gpu"] == 0
    assert str(err).startswith("do something: ")
    assert err.code_name == {23: "INSUFFICIENT_RESOURCES", 19: "IN_USE", 6: "NOT_FOUND", 3: "NOT_SUPPORTED",
                             12: "LIBRARY_NOT_FOUND", 16: "RESET_REQUIRED", 999: "UNKNOWN"}[code]
