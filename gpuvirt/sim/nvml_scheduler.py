"""vGPU scheduler entry points of the fake libnvidia-ml: capabilities, state, and setting the policy.

Facts (NVML API reference; nvidia-ml-py 13.615.71 structures; NVIDIA's vGPU documentation on scheduling):

* three policies, ``NVML_VGPU_SCHEDULER_POLICY_`` BEST_EFFORT 1 (the default), EQUAL_SHARE 2, FIXED_SHARE 3;
  time slices are nanoseconds; the capabilities give the supported policies and the time slice range;
* ``nvmlDeviceSetVgpuSchedulerState`` is accepted only while no VM runs on the GPU, and the setting does not
  survive a reload of the kernel module (a reboot): the driver then starts with the policy its module
  options give (``RmPVMRL``), best effort unless configured;
* scheduling policies apply to time-sliced vGPUs only; MIG-backed vGPUs are scheduled per GPU instance
  (``nvmlGpuInstance*VgpuSchedulerState``, Blackwell and later, not simulated).

Choices where the sources say less (docs/simulator-fidelity.md; each is a key of the state's
``vgpu_scheduler_rules``, so tests can take the other reading):

* ``blocked_by`` - what blocks a change: ``vgpu`` (any vGPU exists on the board; the default, the stricter
  reading and the issue's) or ``running-vm`` (a vGPU held open by a VM);
* ``blocked_code`` - the return code then: NOT_SUPPORTED (3, as the issue states; UNVERIFIED);
* ``mig`` - ``not-supported``: the GPU-wide set is refused while MIG mode is on (there are no time-sliced
  vGPUs then); reads still answer;
* ``min_timeslice_ns`` / ``max_timeslice_ns`` - 1 ms and 30 ms (UNVERIFIED: the range remembered from NVIDIA's
  ``RmPVMRL`` documentation, not confirmed from a source here);
* ``default_timeslice_ns`` - what a share policy reports without a configured slice: 2 ms (UNVERIFIED);
* ``arr_supported`` - false: adaptive round robin is not offered (its parameters are then refused;
  ``enableARRMode`` is read as a flag, UNVERIFIED against the ``NVML_VGPU_SCHEDULER_ARR_*`` values);
* ``boot_policy`` / ``boot_timeslice_ns`` - the state after a reboot (what ``RmPVMRL`` would set): best effort;
* ``supported`` - the policies offered: all three.

The setting lives in the device's ``vgpu_scheduler`` record together with the boot it was made in; a record
from an earlier boot is not in effect, which is how a reboot forgets it without the reboot knowing about it.
"""

from __future__ import annotations

from typing import Any

from gpuvirt.sim import rules as simrules
from gpuvirt.sim.nvml_base import (
    INVALID_ARGUMENT,
    NOT_SUPPORTED,
    NvmlBase,
    _entry,
    _Fail,
    _int_arg,
    _target,
)

BEST_EFFORT, EQUAL_SHARE, FIXED_SHARE = 1, 2, 3
ARR_DEFAULT, ARR_DISABLE, ARR_ENABLE = 0, 1, 2
ENGINE_GRAPHICS = 1
POLICY_COUNT = 3            # NVML_SUPPORTED_VGPU_SCHEDULER_POLICY_COUNT

DEFAULT_RULES: dict[str, Any] = {
    "blocked_by": "vgpu",
    "blocked_code": NOT_SUPPORTED,
    "mig": "not-supported",
    "min_timeslice_ns": 1_000_000,
    "max_timeslice_ns": 30_000_000,
    "default_timeslice_ns": 2_000_000,
    "arr_supported": False,
    # adaptive round robin ranges (shown only where ARR is supported; UNVERIFIED values)
    "min_frequency": 1, "max_frequency": 960, "min_avg_factor": 1, "max_avg_factor": 60,
    "boot_policy": BEST_EFFORT,
    "boot_timeslice_ns": 0,
    "supported": [BEST_EFFORT, EQUAL_SHARE, FIXED_SHARE],
}
RULE_CHOICES = {"blocked_by": ("vgpu", "running-vm"), "mig": ("not-supported", "allowed")}


def scheduler_rules(state: dict[str, Any]) -> dict[str, Any]:
    """The simulator's scheduler rules: the defaults above, overridden by the state's ``vgpu_scheduler_rules``."""
    return {**DEFAULT_RULES, **(state.get("vgpu_scheduler_rules") or {})}


def set_scheduler_rules(sim: Any, **rules: Any) -> dict[str, Any]:
    """Change simulator rules (tests, or an operator trying the other reading of an UNVERIFIED fact)."""
    for k, v in rules.items():
        if k not in DEFAULT_RULES:
            raise ValueError(f"unknown vGPU scheduler rule '{k}'; known: {', '.join(sorted(DEFAULT_RULES))}")
        if k in RULE_CHOICES and v not in RULE_CHOICES[k]:
            raise ValueError(f"vGPU scheduler rule {k} must be one of {', '.join(RULE_CHOICES[k])}, not {v!r}")
    with sim.transaction() as state:
        state["vgpu_scheduler_rules"] = {**(state.get("vgpu_scheduler_rules") or {}), **rules}
        return scheduler_rules(state)


def scheduler_state(state: dict[str, Any], dev: dict[str, Any]) -> dict[str, Any]:
    """The scheduler state in effect on ``dev``: its record when made in this boot, else the boot default."""
    rec = dev.get("vgpu_scheduler")
    if isinstance(rec, dict) and rec.get("boot") == state.get("boot"):
        return rec
    r = scheduler_rules(state)
    return {"policy": int(r["boot_policy"]), "arr": False, "timeslice_ns": int(r["boot_timeslice_ns"]),
            "avg_factor": 0, "frequency": 0, "boot": state.get("boot")}


class SchedulerApi(NvmlBase):
    # === vGPU scheduler ========================================================================================
    def _scheduler_gpu(self, state: dict[str, Any], handle: Any) -> dict[str, Any]:
        dev, model = self._gpu(state, handle)
        if model.vgpu is None:
            raise _Fail(NOT_SUPPORTED)
        return dev

    @staticmethod
    def _timeslice_out(rules: dict[str, Any], cur: dict[str, Any]) -> int:
        # best effort has no time slice ("not relevant" in NVML's words); a share policy without a configured
        # one runs with the driver's default
        if cur["policy"] == BEST_EFFORT:
            return 0
        return int(cur.get("timeslice_ns") or rules["default_timeslice_ns"])

    @_entry()
    def nvmlDeviceGetVgpuSchedulerCapabilities(self, handle: Any, ref: Any) -> None:
        state = self.sim.peek()
        self._scheduler_gpu(state, handle)
        r = scheduler_rules(state)
        caps = _target(ref)
        supported = [int(p) for p in r["supported"]][:POLICY_COUNT]
        for i in range(POLICY_COUNT):
            caps.supportedSchedulers[i] = supported[i] if i < len(supported) else 0
        caps.maxTimeslice = int(r["max_timeslice_ns"])
        caps.minTimeslice = int(r["min_timeslice_ns"])
        arr = bool(r["arr_supported"])
        caps.isArrModeSupported = int(arr)
        caps.maxFrequencyForARR = int(r["max_frequency"]) if arr else 0
        caps.minFrequencyForARR = int(r["min_frequency"]) if arr else 0
        caps.maxAvgFactorForARR = int(r["max_avg_factor"]) if arr else 0
        caps.minAvgFactorForARR = int(r["min_avg_factor"]) if arr else 0

    @_entry()
    def nvmlDeviceGetVgpuSchedulerState(self, handle: Any, ref: Any) -> None:
        state = self.sim.peek()
        dev = self._scheduler_gpu(state, handle)
        cur = scheduler_state(state, dev)
        out = _target(ref)
        out.schedulerPolicy = int(cur["policy"])
        out.arrMode = ARR_ENABLE if cur.get("arr") else ARR_DISABLE
        ts = self._timeslice_out(scheduler_rules(state), cur)
        if cur.get("arr"):
            out.schedulerParams.vgpuSchedDataWithARR.avgFactor = int(cur.get("avg_factor") or 0)
            out.schedulerParams.vgpuSchedDataWithARR.timeslice = ts
        else:
            out.schedulerParams.vgpuSchedData.timeslice = ts

    @_entry()
    def nvmlDeviceGetVgpuSchedulerState_v2(self, handle: Any, ref: Any) -> None:
        state = self.sim.peek()
        dev = self._scheduler_gpu(state, handle)
        out = _target(ref)
        if _int_arg(out.engineId) != ENGINE_GRAPHICS:
            # NVML: engines other than graphics are always scheduled best effort
            out.schedulerPolicy, out.avgFactor, out.timeslice = BEST_EFFORT, 0, 0
            return
        cur = scheduler_state(state, dev)
        out.schedulerPolicy = int(cur["policy"])
        out.avgFactor = int(cur.get("avg_factor") or 0) if cur.get("arr") else 0
        out.timeslice = self._timeslice_out(scheduler_rules(state), cur)

    @_entry()
    def nvmlDeviceSetVgpuSchedulerState(self, handle: Any, ref: Any) -> None:
        want = _target(ref)
        policy = int(want.schedulerPolicy)
        arr = bool(want.enableARRMode)
        if arr:
            params = want.schedulerParams.vgpuSchedDataWithARR
            avg, freq, ts = int(params.avgFactor), int(params.frequency), 0
        else:
            avg, freq, ts = 0, 0, int(want.schedulerParams.vgpuSchedData.timeslice)

        def body(state: dict[str, Any]) -> None:
            dev = self._scheduler_gpu(state, handle)
            r = scheduler_rules(state)
            if policy not in (BEST_EFFORT, EQUAL_SHARE, FIXED_SHARE):
                raise _Fail(INVALID_ARGUMENT)
            if policy not in [int(p) for p in r["supported"]]:
                raise _Fail(NOT_SUPPORTED)
            if arr and not r["arr_supported"]:
                raise _Fail(NOT_SUPPORTED)
            if arr and ((avg and not r["min_avg_factor"] <= avg <= r["max_avg_factor"])
                        or (freq and not r["min_frequency"] <= freq <= r["max_frequency"])):
                raise _Fail(INVALID_ARGUMENT)
            if not arr and policy != BEST_EFFORT and ts and \
                    not int(r["min_timeslice_ns"]) <= ts <= int(r["max_timeslice_ns"]):
                raise _Fail(INVALID_ARGUMENT)
            if r["mig"] == "not-supported" and simrules.mig_enabled(dev):
                raise _Fail(NOT_SUPPORTED)
            if self._scheduler_blocked(state, dev, r):
                raise _Fail(int(r["blocked_code"]))
            self._fault(state, "SetVgpuSchedulerState", f"{dev.get('address')} policy={policy}")
            dev["vgpu_scheduler"] = {"policy": policy, "arr": arr,
                                     "timeslice_ns": ts if policy != BEST_EFFORT else 0,
                                     "avg_factor": avg, "frequency": freq, "boot": state["boot"]}

        self._transact(body)

    @staticmethod
    def _scheduler_blocked(state: dict[str, Any], dev: dict[str, Any], r: dict[str, Any]) -> bool:
        if r["blocked_by"] == "running-vm":
            parents = simrules.board_parents(dev)
            return any(m.get("open") for m in state.get("mdevs", []) if m["parent"] in parents) or \
                any(vf.get("open") and vf.get("current_vgpu_type") for vf in dev.get("vfs", []))
        return bool(simrules.board_vgpus(state, dev))


__all__ = ["SchedulerApi", "DEFAULT_RULES", "scheduler_rules", "scheduler_state", "set_scheduler_rules"]
