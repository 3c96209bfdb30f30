"""MIG entry points of the fake libnvidia-ml: MIG mode, GPU-instance and compute-instance profiles, placements,
instances and MIG device handles (mig-nvml.md)."""

from __future__ import annotations

from typing import Any

from gpuvirt.model import mig as migrules
from gpuvirt.model.catalog import GpuInstanceProfile, GpuModel, MigGeometry
from gpuvirt.sim import rules
from gpuvirt.sim.build import mig_uuid
from gpuvirt.sim.state import behaviour
from gpuvirt.sim.nvml_base import (
    _COMPUTE_INSTANCE,
    _DEVICE,
    _GPU_INSTANCE,
    _MIG_DEVICE,
    CI_PROFILE_INFO_V2,
    COMPUTE_INSTANCE_ENGINE_PROFILE_COUNT,
    COMPUTE_INSTANCE_PROFILE_COUNT,
    GI_PROFILE_INFO_V2,
    GPU_INSTANCE_PROFILE_COUNT,
    IN_USE,
    INSUFFICIENT_RESOURCES,
    INSUFFICIENT_SIZE,
    INVALID_ARGUMENT,
    NOT_FOUND,
    NOT_SUPPORTED,
    SUCCESS,
    NvmlBase,
    _array_capacity,
    _check_version,
    _ci_mask,
    _decode,
    _encode,
    _entry,
    _Fail,
    _int_arg,
    _layout,
    _placement_arg,
    _put_handles,
    _set,
    _set_fields,
    _set_handle,
    _set_handle_field,
    _target,
    ci_starts,
)


class MigApi(NvmlBase):
    # === MIG mode ============================================================================================
    @_entry()
    def nvmlDeviceGetMigMode(self, handle: Any, current: Any, pending: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        # mig-parted treats NOT_SUPPORTED from this call as "GPU is not MIG capable" (pkg/mig/mode/nvml.go)
        if model.mig is None or dev.get("mig") is None:
            raise _Fail(NOT_SUPPORTED)
        _set(current, int(dev["mig"]["current"]))
        _set(pending, int(dev["mig"]["pending"]))

    @_entry()
    def nvmlDeviceSetMigMode(self, handle: Any, mode: Any, status_ref: Any) -> None:
        wanted = _int_arg(mode)
        result: dict[str, int] = {}

        def body(state: dict[str, Any]) -> None:
            dev, model = self._gpu(state, handle)
            if model.mig is None or dev.get("mig") is None:
                raise _Fail(NOT_SUPPORTED)
            if wanted not in (0, 1):
                raise _Fail(INVALID_ARGUMENT)
            self._fault(state, "SetMigMode", dev["address"])
            mig = dev["mig"]
            if wanted == 0 and mig["current"] == 1 and mig["gpu_instances"]:
                # UNVERIFIED choice: the driver refuses to leave MIG mode while GPU instances exist; we
                # report it as the call's own IN_USE (nvidia-smi prints "In use by another client") unless the
                # host's nvml_codes.leave_mig_with_instances says otherwise.
                raise _Fail(int(behaviour(state)["nvml_codes"]["leave_mig_with_instances"]))
            mig["pending"] = wanted
            if wanted == mig["current"]:
                result["status"] = SUCCESS
            elif not model.mig.enable_requires_reset or not dev.get("clients"):
                # Hopper and later switch without a GPU reset; Ampere resets the GPU, which only succeeds
                # when no process holds it (MIG User Guide "Getting Started", mig-nvml.md section 1.4).
                mig["current"] = wanted
                mig["gpu_instances"] = []
                result["status"] = SUCCESS
            else:
                # NVML reference: the call succeeds, the mode stays pending and activationStatus carries
                # the reason (IN_USE when clients hold the GPU); a reset or reboot applies it later.
                result["status"] = IN_USE

        self._transact(body)
        _set(status_ref, result["status"])

    @_entry()
    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any, ref: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        # NVML reference: zero when MIG is unsupported or not enabled
        enabled = model.mig is not None and dev.get("mig") and dev["mig"].get("current") == 1
        _set(ref, model.mig.max_mig_devices if enabled and model.mig else 0)

    # === GPU-instance profiles =================================================================================
    def _fill_gi_profile(self, info: Any, profile: GpuInstanceProfile) -> None:
        e = profile.engines
        _set_fields(info, id=profile.id, isP2pSupported=0, sliceCount=profile.compute_slices,
                    instanceCount=profile.max_instances, multiprocessorCount=profile.sm,
                    copyEngineCount=e.ce, decoderCount=e.dec, encoderCount=e.enc, jpegCount=e.jpeg,
                    ofaCount=e.ofa, memorySizeMB=profile.memory_mib,
                    # UNVERIFIED: the name field's exact text was never captured; gpuvirt computes
                    # profile names itself from memorySizeMB (mig-nvml.md section 1.2)
                    name=f"MIG {profile.name}".encode())

    def _gi_profile_by_constant(self, handle: Any, constant: int) -> GpuInstanceProfile:
        dev, model = self._gpu(self.sim.peek(), handle)
        geom = self._geometry(dev, model)
        if not 0 <= constant < GPU_INSTANCE_PROFILE_COUNT:
            raise _Fail(INVALID_ARGUMENT)
        profile = geom.by_constant(constant)
        if profile is None:
            raise _Fail(NOT_SUPPORTED)
        return profile

    @_entry()
    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: Any, constant: Any, ref: Any) -> None:
        # The argument is an NVML_GPU_INSTANCE_PROFILE_* constant; the id returned in the struct is the
        # profile id every later call takes (two ID spaces, mig-nvml.md section 1.1).
        self._fill_gi_profile(_target(ref), self._gi_profile_by_constant(handle, _int_arg(constant)))

    @_entry()
    def nvmlDeviceGetGpuInstanceProfileInfoV(self, handle: Any, constant: Any, ref: Any) -> None:
        info = _target(ref)
        _check_version(info, GI_PROFILE_INFO_V2)
        self._fill_gi_profile(info, self._gi_profile_by_constant(handle, _int_arg(constant)))

    @_entry()
    def nvmlDeviceGetGpuInstanceProfileInfoByIdV(self, handle: Any, profile_id: Any, ref: Any) -> None:
        info = _target(ref)
        _check_version(info, GI_PROFILE_INFO_V2)
        dev, model = self._gpu(self.sim.peek(), handle)
        self._fill_gi_profile(info, self._gi_profile(self._geometry(dev, model), _int_arg(profile_id)))

    @_entry()
    def nvmlDeviceGetGpuInstanceRemainingCapacity(self, handle: Any, profile_id: Any, ref: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        geom = self._geometry(dev, model)
        profile = self._gi_profile(geom, _int_arg(profile_id))
        _set(ref, migrules.remaining_capacity(geom, _layout(dev), profile))

    def _possible_placements(self, handle: Any, profile_id: Any, array: Any, count: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        profile = self._gi_profile(self._geometry(dev, model), _int_arg(profile_id))
        # NVML reference: every placement the profile allows, whether or not it is occupied now
        placements = profile.placements
        if array is None:
            _set(count, len(placements))
            return
        if _array_capacity(array) < len(placements):
            _set(count, len(placements))
            raise _Fail(INSUFFICIENT_SIZE)
        for i, (start, size) in enumerate(placements):
            array[i].start = start
            array[i].size = size
        _set(count, len(placements))

    @_entry()
    def nvmlDeviceGetGpuInstancePossiblePlacements_v2(self, handle: Any, profile_id: Any, array: Any,
                                                      count: Any) -> None:
        self._possible_placements(handle, profile_id, array, count)

    @_entry()
    def nvmlDeviceGetGpuInstancePossiblePlacements(self, handle: Any, profile_id: Any, array: Any,
                                                   count: Any) -> None:
        self._possible_placements(handle, profile_id, array, count)

    # === GPU instances ===========================================================================================
    def _create_gi(self, handle: Any, profile_id: int, placement: tuple[int, int] | None, ref: Any) -> None:
        created: dict[str, int] = {}

        def body(state: dict[str, Any]) -> None:
            dev, model = self._gpu(state, handle)
            geom = self._geometry(dev, model)
            profile = self._gi_profile(geom, profile_id)
            if placement is not None:
                start, size = placement
                # only the documented {starts}:size of the profile are valid placements (-lgipp)
                if size != profile.memory_slices or start not in profile.starts:
                    raise _Fail(INVALID_ARGUMENT)
            extra = f" profile={profile.id}"
            self._fault(state, "CreateGpuInstance", dev["address"] + extra)
            layout = _layout(dev)
            if placement is None:
                # Order-dependent driver choice (UNVERIFIED rule fitted to captures; gpuvirt.model.mig)
                start = migrules.driver_choice(geom, layout, profile)
                if start is None:
                    raise _Fail(INSUFFICIENT_RESOURCES)
            elif not migrules.can_place(geom, layout, profile, start):
                # overlap, compute budget or per-profile maximum: NVML_ERROR_INSUFFICIENT_RESOURCES
                raise _Fail(INSUFFICIENT_RESOURCES)
            gi_id = migrules.gi_id_for(geom, start, profile.memory_slices)
            if any(g["id"] == gi_id for g in dev["mig"]["gpu_instances"]):
                raise _Fail(INSUFFICIENT_RESOURCES)
            dev["mig"]["gpu_instances"].append({"id": gi_id, "profile_id": profile.id, "start": start,
                                                "size": profile.memory_slices, "compute_instances": []})
            created["index"], created["gi"] = dev["nvml_index"], gi_id

        self._transact(body)
        _set_handle(ref, _encode(_GPU_INSTANCE, created["index"], created["gi"]))

    @_entry()
    def nvmlDeviceCreateGpuInstance(self, handle: Any, profile_id: Any, ref: Any) -> None:
        self._create_gi(handle, _int_arg(profile_id), None, ref)

    @_entry()
    def nvmlDeviceCreateGpuInstanceWithPlacement(self, handle: Any, profile_id: Any, placement: Any,
                                                 ref: Any) -> None:
        self._create_gi(handle, _int_arg(profile_id), _placement_arg(placement), ref)

    @_entry()
    def nvmlGpuInstanceDestroy(self, gi_handle: Any) -> None:
        def body(state: dict[str, Any]) -> None:
            dev, _, gi = self._gi(state, gi_handle)
            self._fault(state, "DestroyGpuInstance", f"{dev['address']} gi={gi['id']}")
            # NVML reference: IN_USE while compute instances (or processes) are active on the GI; a
            # MIG-backed vGPU living on it holds it the same way.
            hosted = {g for _, g in rules.board_vgpus(state, dev) if g is not None}
            if gi["compute_instances"] or gi["id"] in hosted:
                raise _Fail(IN_USE)
            dev["mig"]["gpu_instances"] = [g for g in dev["mig"]["gpu_instances"] if g["id"] != gi["id"]]

        self._transact(body)

    @_entry()
    def nvmlDeviceGetGpuInstances(self, handle: Any, profile_id: Any, array: Any, count: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        profile = self._gi_profile(self._geometry(dev, model), _int_arg(profile_id))
        gis = sorted((g for g in dev["mig"]["gpu_instances"] if g["profile_id"] == profile.id),
                     key=lambda g: g["id"])
        # NVML reference: the caller sizes the buffer from instanceCount; a NULL buffer is invalid
        if array is None:
            raise _Fail(INVALID_ARGUMENT)
        if _array_capacity(array) < len(gis):
            _set(count, len(gis))
            raise _Fail(INSUFFICIENT_SIZE)
        _put_handles(array, [_encode(_GPU_INSTANCE, dev["nvml_index"], g["id"]) for g in gis])
        _set(count, len(gis))

    @_entry()
    def nvmlDeviceGetGpuInstanceById(self, handle: Any, gi_id: Any, ref: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        self._geometry(dev, model)
        wanted = _int_arg(gi_id)
        if not any(g["id"] == wanted for g in dev["mig"]["gpu_instances"]):
            raise _Fail(NOT_FOUND)
        _set_handle(ref, _encode(_GPU_INSTANCE, dev["nvml_index"], wanted))

    @_entry()
    def nvmlGpuInstanceGetInfo(self, gi_handle: Any, ref: Any) -> None:
        dev, _, gi = self._gi(self.sim.peek(), gi_handle)
        info = _target(ref)
        _set_handle_field(info, "device", _encode(_DEVICE, dev["nvml_index"]))
        info.id = gi["id"]
        info.profileId = gi["profile_id"]
        info.placement.start = gi["start"]
        info.placement.size = gi["size"]

    # === compute-instance profiles and compute instances =====================================================
    def _ci_sm(self, geom: MigGeometry, gi: dict[str, Any], ci_slices: int) -> int:
        gp = geom.profile(gi["profile_id"])
        # Ampere: 14 SMs per compute slice, which the proportional share reproduces; Hopper per-CI SM
        # counts were never captured (UNVERIFIED) - a full-GI CI has the GI's SM count.
        return gp.sm if ci_slices >= gp.compute_slices else gp.sm * ci_slices // gp.compute_slices

    def _ci_name(self, dev: dict[str, Any], model: GpuModel, gi: dict[str, Any], ci: dict[str, Any]) -> str:
        assert model.mig is not None
        gp = model.mig.profile(gi["profile_id"])
        return gp.name if ci["size"] >= gp.compute_slices else f"{ci['size']}c.{gp.name}"

    def _fill_ci_profile(self, gi_handle: Any, constant: Any, eng_profile: Any, ref: Any, v2: bool) -> None:
        info = _target(ref)
        if v2:
            _check_version(info, CI_PROFILE_INFO_V2)
        dev, geom, gi = self._gi(self.sim.peek(), gi_handle)
        c = _int_arg(constant)
        if not 0 <= c < COMPUTE_INSTANCE_PROFILE_COUNT or \
                not 0 <= _int_arg(eng_profile) < COMPUTE_INSTANCE_ENGINE_PROFILE_COUNT:
            raise _Fail(INVALID_ARGUMENT)
        g, profile = self._ci_profile(geom, gi, c)
        gp = geom.profile(gi["profile_id"])
        e = gp.engines
        name = gp.name if profile.compute_slices >= g else f"{profile.compute_slices}c.{gp.name}"
        # compute-instance profile ids equal the NVML_COMPUTE_INSTANCE_PROFILE_* constants (MIG guide
        # -lcip output); the engines are shared with the whole GI
        _set_fields(info, id=profile.id, sliceCount=profile.compute_slices, instanceCount=profile.max_instances,
                    multiprocessorCount=self._ci_sm(geom, gi, profile.compute_slices),
                    sharedCopyEngineCount=e.ce, sharedDecoderCount=e.dec, sharedEncoderCount=e.enc,
                    sharedJpegCount=e.jpeg, sharedOfaCount=e.ofa,
                    name=f"MIG {name}".encode())   # UNVERIFIED text, like the GI profile name

    @_entry()
    def nvmlGpuInstanceGetComputeInstanceProfileInfo(self, gi_handle: Any, constant: Any, eng_profile: Any,
                                                     ref: Any) -> None:
        self._fill_ci_profile(gi_handle, constant, eng_profile, ref, v2=False)

    @_entry()
    def nvmlGpuInstanceGetComputeInstanceProfileInfoV(self, gi_handle: Any, constant: Any, eng_profile: Any,
                                                      ref: Any) -> None:
        self._fill_ci_profile(gi_handle, constant, eng_profile, ref, v2=True)

    @staticmethod
    def _ci_used_mask(gi: dict[str, Any]) -> int:
        mask = 0
        for ci in gi["compute_instances"]:
            mask |= _ci_mask(ci["start"], ci["size"])
        return mask

    def _ci_free_starts(self, gi: dict[str, Any], g: int, profile: Any) -> list[int]:
        used = self._ci_used_mask(gi)
        existing = sum(1 for ci in gi["compute_instances"] if ci["profile_id"] == profile.id)
        if existing >= profile.max_instances:
            return []
        return [s for s in ci_starts(g, profile.compute_slices)
                if not _ci_mask(s, profile.compute_slices) & used]

    @_entry()
    def nvmlGpuInstanceGetComputeInstanceRemainingCapacity(self, gi_handle: Any, profile_id: Any,
                                                           ref: Any) -> None:
        _, geom, gi = self._gi(self.sim.peek(), gi_handle)
        g, profile = self._ci_profile(geom, gi, _int_arg(profile_id))
        existing = sum(1 for ci in gi["compute_instances"] if ci["profile_id"] == profile.id)
        free = len(self._ci_free_starts(gi, g, profile))
        _set(ref, max(0, min(free, profile.max_instances - existing)))

    @_entry()
    def nvmlGpuInstanceGetComputeInstancePossiblePlacements(self, gi_handle: Any, profile_id: Any, array: Any,
                                                            count: Any) -> None:
        _, geom, gi = self._gi(self.sim.peek(), gi_handle)
        g, profile = self._ci_profile(geom, gi, _int_arg(profile_id))
        starts = ci_starts(g, profile.compute_slices)
        if array is None:
            _set(count, len(starts))
            return
        if _array_capacity(array) < len(starts):
            _set(count, len(starts))
            raise _Fail(INSUFFICIENT_SIZE)
        for i, s in enumerate(starts):
            array[i].start = s
            array[i].size = profile.compute_slices
        _set(count, len(starts))

    def _create_ci(self, gi_handle: Any, profile_id: int, placement: tuple[int, int] | None, ref: Any) -> None:
        created: dict[str, int] = {}

        def body(state: dict[str, Any]) -> None:
            dev, geom, gi = self._gi(state, gi_handle)
            g, profile = self._ci_profile(geom, gi, profile_id)
            if placement is not None:
                start, size = placement
                if size != profile.compute_slices or start not in ci_starts(g, profile.compute_slices):
                    raise _Fail(INVALID_ARGUMENT)
            self._fault(state, "CreateComputeInstance", f"{dev['address']} gi={gi['id']} profile={profile.id}")
            free = self._ci_free_starts(gi, g, profile)
            if placement is None:
                # UNVERIFIED: lowest free start first (no capture of the driver's choice for CIs)
                if not free:
                    raise _Fail(INSUFFICIENT_RESOURCES)
                start = free[0]
            elif start not in free:
                raise _Fail(INSUFFICIENT_RESOURCES)
            taken = {ci["id"] for ci in gi["compute_instances"]}
            ci_id = next(i for i in range(len(taken) + 1) if i not in taken)   # ids restart at 0 per GI
            gi["compute_instances"].append({
                "id": ci_id, "profile_id": profile.id, "start": start, "size": profile.compute_slices,
                "uuid": mig_uuid(state["seed"], dev["uuid"], gi["id"], ci_id, state["boot"]),
            })
            created.update(index=dev["nvml_index"], gi=gi["id"], ci=ci_id)

        self._transact(body)
        _set_handle(ref, _encode(_COMPUTE_INSTANCE, created["index"], created["gi"], created["ci"]))

    @_entry()
    def nvmlGpuInstanceCreateComputeInstance(self, gi_handle: Any, profile_id: Any, ref: Any) -> None:
        self._create_ci(gi_handle, _int_arg(profile_id), None, ref)

    @_entry()
    def nvmlGpuInstanceCreateComputeInstanceWithPlacement(self, gi_handle: Any, profile_id: Any, placement: Any,
                                                          ref: Any) -> None:
        self._create_ci(gi_handle, _int_arg(profile_id), _placement_arg(placement), ref)

    @_entry()
    def nvmlComputeInstanceDestroy(self, ci_handle: Any) -> None:
        def body(state: dict[str, Any]) -> None:
            dev, _, gi, ci = self._ci(state, ci_handle)
            self._fault(state, "DestroyComputeInstance", f"{dev['address']} gi={gi['id']} ci={ci['id']}")
            gi["compute_instances"] = [c for c in gi["compute_instances"] if c["id"] != ci["id"]]

        self._transact(body)

    @_entry()
    def nvmlGpuInstanceGetComputeInstances(self, gi_handle: Any, profile_id: Any, array: Any, count: Any) -> None:
        dev, geom, gi = self._gi(self.sim.peek(), gi_handle)
        _, profile = self._ci_profile(geom, gi, _int_arg(profile_id))
        cis = sorted((c for c in gi["compute_instances"] if c["profile_id"] == profile.id), key=lambda c: c["id"])
        if array is None:
            raise _Fail(INVALID_ARGUMENT)
        if _array_capacity(array) < len(cis):
            _set(count, len(cis))
            raise _Fail(INSUFFICIENT_SIZE)
        _put_handles(array, [_encode(_COMPUTE_INSTANCE, dev["nvml_index"], gi["id"], c["id"]) for c in cis])
        _set(count, len(cis))

    @_entry()
    def nvmlGpuInstanceGetComputeInstanceById(self, gi_handle: Any, ci_id: Any, ref: Any) -> None:
        dev, _, gi = self._gi(self.sim.peek(), gi_handle)
        wanted = _int_arg(ci_id)
        if not any(c["id"] == wanted for c in gi["compute_instances"]):
            raise _Fail(NOT_FOUND)
        _set_handle(ref, _encode(_COMPUTE_INSTANCE, dev["nvml_index"], gi["id"], wanted))

    @_entry()
    def nvmlComputeInstanceGetInfo_v2(self, ci_handle: Any, ref: Any) -> None:
        dev, _, gi, ci = self._ci(self.sim.peek(), ci_handle)
        info = _target(ref)
        _set_handle_field(info, "device", _encode(_DEVICE, dev["nvml_index"]))
        _set_handle_field(info, "gpuInstance", _encode(_GPU_INSTANCE, dev["nvml_index"], gi["id"]))
        info.id = ci["id"]
        info.profileId = ci["profile_id"]
        info.placement.start = ci["start"]
        info.placement.size = ci["size"]

    # === MIG devices ================================================================================================
    @_entry()
    def nvmlDeviceIsMigDeviceHandle(self, handle: Any, ref: Any) -> None:
        kind, _, _, _ = _decode(handle)
        if kind not in (_DEVICE, _MIG_DEVICE):
            raise _Fail(INVALID_ARGUMENT)
        _set(ref, 1 if kind == _MIG_DEVICE else 0)

    def _mig_handle(self, handle: Any) -> tuple[dict[str, Any], GpuModel, dict[str, Any], dict[str, Any]]:
        dev, model, gi, ci = self._any_device(self.sim.peek(), handle)
        if gi is None or ci is None:
            raise _Fail(NOT_SUPPORTED)
        return dev, model, gi, ci

    @_entry()
    def nvmlDeviceGetGpuInstanceId(self, handle: Any, ref: Any) -> None:
        _, _, gi, _ = self._mig_handle(handle)
        _set(ref, gi["id"])

    @_entry()
    def nvmlDeviceGetComputeInstanceId(self, handle: Any, ref: Any) -> None:
        _, _, _, ci = self._mig_handle(handle)
        _set(ref, ci["id"])

    @_entry()
    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: Any, ref: Any) -> None:
        dev, model = self._gpu(self.sim.peek(), handle)
        self._geometry(dev, model)
        devices = self._mig_devices(dev)
        i = _int_arg(index)
        if not 0 <= i < len(devices):
            raise _Fail(NOT_FOUND)
        gi, ci = devices[i]
        _set_handle(ref, _encode(_MIG_DEVICE, dev["nvml_index"], gi["id"], ci["id"]))

    @_entry()
    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any, ref: Any) -> None:
        kind, _, _, _ = _decode(handle)
        if kind != _MIG_DEVICE:
            raise _Fail(INVALID_ARGUMENT)
        dev, _, _, _ = self._mig_handle(handle)
        _set_handle(ref, _encode(_DEVICE, dev["nvml_index"]))

    @_entry()
    def nvmlDeviceGetAttributes_v2(self, handle: Any, ref: Any) -> None:
        # Only MIG devices: the catalog has no SM counts for whole GPUs outside MIG mode.
        dev, model, gi, ci = self._mig_handle(handle)
        assert model.mig is not None
        gp = model.mig.profile(gi["profile_id"])
        e = gp.engines
        _set_fields(_target(ref), multiprocessorCount=self._ci_sm(model.mig, gi, ci["size"]),
                    sharedCopyEngineCount=e.ce, sharedDecoderCount=e.dec, sharedEncoderCount=e.enc,
                    sharedJpegCount=e.jpeg, sharedOfaCount=e.ofa, gpuInstanceSliceCount=gp.compute_slices,
                    computeInstanceSliceCount=ci["size"], memorySizeMB=gp.memory_mib)
