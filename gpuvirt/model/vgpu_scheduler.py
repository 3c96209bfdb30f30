"""The vGPU scheduler policy a profile asks for (pure): names, bounds, and which boards it means anything on.

NVIDIA's vGPU manager shares a GPU between time-sliced vGPUs with one of three policies - best effort (the
driver's default), equal share and fixed share - and, for the two share policies, a time slice.  NVML sets it
per GPU with ``nvmlDeviceSetVgpuSchedulerState`` (policy ``NVML_VGPU_SCHEDULER_POLICY_*`` 1/2/3, time slice in
nanoseconds), and NVML's reference says the call is accepted only while no VM runs on the GPU and that the
setting does not survive a reload of the kernel module.  NVIDIA's vGPU documentation adds that the policies
apply to time-sliced vGPUs only (MIG-backed vGPUs have their own engines).  gpuvirt therefore treats the
policy as part of a GPU's layout: planned before any vGPU is created, refused while one exists, restored by
``reconcile`` after a reboot (docs/operator-guide.md, "vGPU scheduler").

The time slice bounds here are only what a profile may hold; the board's own range comes from
``nvmlDeviceGetVgpuSchedulerCapabilities`` and is checked when a plan is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from gpuvirt.errors import ProfileError
from gpuvirt.model.catalog import GpuModel

POLICIES = ("best-effort", "equal-share", "fixed-share")
# NVML_VGPU_SCHEDULER_POLICY_* (nvidia-ml-py 13.615.71); 0 is UNKNOWN
NVML_POLICY = {"best-effort": 1, "equal-share": 2, "fixed-share": 3}
POLICY_NAME = {v: k for k, v in NVML_POLICY.items()}
TIMESLICED = ("equal-share", "fixed-share")     # the policies a time slice belongs to

# What a profile may ask for, in microseconds: wide enough for any driver's range, small enough that the
# nanosecond value fits NVML's 32-bit field (4.29 s).  The GPU's own range is checked at plan time.
TIMESLICE_US_MIN = 100
TIMESLICE_US_MAX = 1_000_000
_KEYS = ("policy", "timeslice_us")


def _bad(message: str, key: str | None = None) -> ProfileError:
    ctx: dict[str, Any] = {"field": "vgpu_scheduler"}
    if key is not None:
        ctx["key"] = key
    return ProfileError(message, **ctx)


def check_policy(value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in POLICIES:
        raise _bad(f"vgpu_scheduler: unknown policy {value!r}; valid: {', '.join(POLICIES)}", "policy")
    return value.strip().lower()


def check_timeslice(policy: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"vgpu_scheduler: timeslice_us must be a whole number of microseconds, not {value!r}",
                   "timeslice_us")
    if policy not in TIMESLICED:
        raise _bad(f"vgpu_scheduler: a time slice applies to {' and '.join(TIMESLICED)} only, not to {policy} "
                   "(drop timeslice_us)", "timeslice_us")
    if not TIMESLICE_US_MIN <= value <= TIMESLICE_US_MAX:
        raise _bad(f"vgpu_scheduler: timeslice_us {value} is out of range; valid: {TIMESLICE_US_MIN} to "
                   f"{TIMESLICE_US_MAX} microseconds", "timeslice_us")
    return value


@dataclass(frozen=True)
class SchedulerSpec:
    """``policy`` (one of :data:`POLICIES`) and ``timeslice_us`` (None: the driver's default)."""

    policy: str
    timeslice_us: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", check_policy(self.policy))
        object.__setattr__(self, "timeslice_us", check_timeslice(self.policy, self.timeslice_us))

    @classmethod
    def from_value(cls, value: Any) -> "SchedulerSpec | None":
        """``equal-share`` or ``{policy: equal-share, timeslice_us: 2000}`` (None: no scheduler asked for)."""
        if value is None or isinstance(value, SchedulerSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, Mapping):
            raise _bad(f"vgpu_scheduler must be a policy name or a mapping with policy (and timeslice_us), "
                       f"not {value!r}")
        unknown = [str(k) for k in value if k not in _KEYS]
        if unknown:
            raise _bad(f"vgpu_scheduler: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(_KEYS)})",
                       unknown[0])
        if "policy" not in value:
            raise _bad(f"vgpu_scheduler: policy is required ({', '.join(POLICIES)})")
        return cls(value["policy"], value.get("timeslice_us"))

    @property
    def nvml_policy(self) -> int:
        return NVML_POLICY[self.policy]

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "timeslice_us": self.timeslice_us}

    def to_yaml(self) -> Any:
        """The shortest spelling in a profile file: the bare policy name when there is no time slice."""
        return self.policy if self.timeslice_us is None else self.to_dict()

    def describe(self) -> str:
        return f"{self.policy} vGPU scheduler" + (f" ({self.timeslice_us} us time slice)"
                                                   if self.timeslice_us is not None else "")

    def satisfied_by(self, current: Mapping[str, Any] | None) -> bool:
        """Does the GPU's scheduler state (discover's ``vgpu_scheduler``) already match?  Without a time slice
        only the policy is compared: NVML reports the driver's default slice exactly like a configured one."""
        if not current or current.get("policy") != self.policy:
            return False
        return self.timeslice_us is None or current.get("timeslice_us") == self.timeslice_us

    def problem_on(self, state: Mapping[str, Any] | None) -> str | None:
        """Why a GPU whose scheduler state is ``state`` (discover's ``vgpu_scheduler``) cannot take this."""
        if not state:
            return "NVML reports no vGPU scheduler for it (no vGPU host driver, or a board without vGPU)"
        supported = state.get("supported_policies") or []
        if self.policy not in supported:
            return f"its driver offers the {', '.join(supported) or 'no'} polic{'y' if len(supported) == 1 else 'ies'}, " \
                   f"not {self.policy}"
        lo, hi = state.get("timeslice_min_us"), state.get("timeslice_max_us")
        if self.timeslice_us is not None and lo is not None and hi is not None and not lo <= self.timeslice_us <= hi:
            return f"its driver accepts time slices of {lo} to {hi} us, not {self.timeslice_us}"
        return None


def board_problem(model: GpuModel, spec: SchedulerSpec) -> str | None:
    """Why ``model`` cannot run the scheduler policy ``spec`` at all (no vGPU, or MIG-backed types only)."""
    disp = model.display_name
    if model.vgpu is None:
        return f"the {disp} has no NVIDIA vGPU, so no vGPU scheduler (asked for the {spec.describe()})"
    if not any(not t.mig_backed for t in model.vgpu.types):
        return (f"the {disp} offers MIG-backed vGPU types only, and scheduling policies apply to time-sliced "
                f"vGPUs only (asked for the {spec.describe()})")
    return None


__all__ = ["NVML_POLICY", "POLICIES", "POLICY_NAME", "SchedulerSpec", "TIMESLICED", "TIMESLICE_US_MAX",
           "TIMESLICE_US_MIN", "board_problem", "check_policy", "check_timeslice"]
