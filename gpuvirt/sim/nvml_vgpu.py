"""vGPU entry points of the fake libnvidia-ml: virtualization mode, supported/creatable types and type
properties (nvidia-vgpu.md)."""

from __future__ import annotations

from typing import Any, Iterable

from gpuvirt.model.catalog import MIB, GpuModel, VgpuType
from gpuvirt.sim import rules
from gpuvirt.sim.nvml_base import (
    HOST_VGPU_MODE_NON_SRIOV,
    HOST_VGPU_MODE_SRIOV,
    INSUFFICIENT_SIZE,
    INVALID_ARGUMENT,
    NO_GPU_INSTANCE_PROFILE,
    NOT_SUPPORTED,
    VIRTUALIZATION_MODE_HOST_VGPU,
    VIRTUALIZATION_MODE_NONE,
    NvmlBase,
    _entry,
    _Fail,
    _int_arg,
    _put_string,
    _set,
)


class VgpuApi(NvmlBase):
    # === vGPU =======================================================================================================
    @_entry()
    def nvmlDeviceGetVirtualizationMode(self, handle: Any, ref: Any) -> None:
        _, model = self._gpu(self.sim.peek(), handle)
        _set(ref, VIRTUALIZATION_MODE_HOST_VGPU if model.vgpu else VIRTUALIZATION_MODE_NONE)

    @_entry()
    def nvmlDeviceGetHostVgpuMode(self, handle: Any, ref: Any) -> None:
        _, model = self._gpu(self.sim.peek(), handle)
        if model.vgpu is None:
            raise _Fail(NOT_SUPPORTED)
        _set(ref, HOST_VGPU_MODE_SRIOV if model.vgpu.parent == "vf" else HOST_VGPU_MODE_NON_SRIOV)

    @staticmethod
    def _type_list(ids: Iterable[int], count: Any, array: Any) -> None:
        ids = list(ids)
        # pynvml asks with count 0 and a NULL array first: SUCCESS means "none", INSUFFICIENT_SIZE returns
        # the count for the second call
        if array is None or _int_arg(count) < len(ids):
            _set(count, len(ids))
            if ids:
                raise _Fail(INSUFFICIENT_SIZE)
            return
        for i, tid in enumerate(ids):
            array[i] = tid
        _set(count, len(ids))

    @_entry()
    def nvmlDeviceGetSupportedVgpus(self, handle: Any, count: Any, array: Any) -> None:
        _, model = self._gpu(self.sim.peek(), handle)
        if model.vgpu is None:
            raise _Fail(NOT_SUPPORTED)
        self._type_list((t.id for t in model.vgpu.types), count, array)

    @_entry()
    def nvmlDeviceGetCreatableVgpus(self, handle: Any, count: Any, array: Any) -> None:
        state = self.sim.peek()
        dev, model = self._gpu(state, handle)
        if model.vgpu is None:
            raise _Fail(NOT_SUPPORTED)
        self._type_list((t.id for t in rules.creatable_types(state, dev)), count, array)

    def _vgpu_type(self, type_id: Any) -> tuple[GpuModel, VgpuType]:
        wanted = _int_arg(type_id)
        for dev in self._nvml_devices(self.sim.peek()):
            model = self._model(dev)
            if model.vgpu is None:
                continue
            for t in model.vgpu.types:
                if t.id == wanted:
                    return model, t
        raise _Fail(INVALID_ARGUMENT)

    @_entry()
    def nvmlVgpuTypeGetName(self, type_id: Any, buf: Any, length: Any) -> None:
        model, t = self._vgpu_type(type_id)
        assert model.vgpu is not None
        _put_string(buf, length, f"{model.vgpu.name_prefix}{t.name}")

    @_entry()
    def nvmlVgpuTypeGetClass(self, type_id: Any, buf: Any, length: Any) -> None:
        _, t = self._vgpu_type(type_id)
        # UNVERIFIED mapping of the series letter to NVML's class string
        classes = {"Q": "Quadro", "C": "Compute", "B": "NVS", "A": "GRID"}
        _put_string(buf, length, classes.get(t.series, "Compute"))

    @_entry()
    def nvmlVgpuTypeGetFramebufferSize(self, type_id: Any, ref: Any) -> None:
        _, t = self._vgpu_type(type_id)
        _set(ref, t.framebuffer_mib * MIB)

    @_entry()
    def nvmlVgpuTypeGetNumDisplayHeads(self, type_id: Any, ref: Any) -> None:
        _, t = self._vgpu_type(type_id)
        _set(ref, t.num_heads)

    @_entry()
    def nvmlVgpuTypeGetFrameRateLimit(self, type_id: Any, ref: Any) -> None:
        _, t = self._vgpu_type(type_id)
        _set(ref, t.frl_config)

    @_entry()
    def nvmlVgpuTypeGetResolution(self, type_id: Any, head: Any, xref: Any, yref: Any) -> None:
        _, t = self._vgpu_type(type_id)
        if _int_arg(head) >= max(t.num_heads, 1):
            raise _Fail(INVALID_ARGUMENT)
        x, _, y = t.max_resolution.partition("x")
        _set(xref, int(x))
        _set(yref, int(y))

    @_entry()
    def nvmlVgpuTypeGetMaxInstances(self, handle: Any, type_id: Any, ref: Any) -> None:
        _, model = self._gpu(self.sim.peek(), handle)
        wanted = _int_arg(type_id)
        t = next((t for t in (model.vgpu.types if model.vgpu else ()) if t.id == wanted), None)
        if t is None:
            raise _Fail(INVALID_ARGUMENT)
        _set(ref, t.max_instances)

    @_entry()
    def nvmlVgpuTypeGetGpuInstanceProfileId(self, type_id: Any, ref: Any) -> None:
        _, t = self._vgpu_type(type_id)
        _set(ref, t.gpu_instance_profile_id if t.gpu_instance_profile_id is not None else NO_GPU_INSTANCE_PROFILE)
