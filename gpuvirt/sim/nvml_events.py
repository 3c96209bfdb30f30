"""Event entry points of the fake libnvidia-ml: event sets, registration and waiting (XID critical errors).

NVML's event API as nvidia-ml-py 13.615.71 calls it: ``nvmlEventSetCreate(byref(set))``,
``nvmlDeviceGetSupportedEventTypes(h, byref(mask))``, ``nvmlDeviceRegisterEvents(h, c_ulonglong(mask), set)``,
``nvmlEventSetWait_v2(set, byref(c_nvmlEventData_t), c_uint(timeout_ms))`` and ``nvmlEventSetFree(set)``.

An event set must be visible to other processes: the waiting process is gpuvirt (``gpuvirt watch``), the
one that makes an XID happen is ``gpuvirt sim xid`` - the simulated GPU.  So sets live in the simulator's
state document (key ``event_sets``, see :mod:`gpuvirt.sim.state`) and ``queue_event`` appends to the
queue of every set registered for the GPU, under the host lock.  ``nvmlEventSetWait_v2`` polls its queue
(the state file is re-read only when it changed) until an event is there or the timeout passes.

Behaviour as the NVML reference describes it, and the choices where it is silent:

* Only events that happen after ``nvmlDeviceRegisterEvents`` reach a set; nothing is replayed.
* A waiting call returns at once when an event is queued, else sleeps up to ``timeoutms`` and returns
  ``NVML_ERROR_TIMEOUT`` (10).  Events come out in the order they happened, one per call.
* XIDs are reported on the **parent** GPU: ``data.device`` is the physical GPU's handle and
  ``gpuInstanceId`` / ``computeInstanceId`` name the MIG instance, or are 0xFFFFFFFF
  (``NVML_GPU_INSTANCE_ID_ANY``) when the error is not attributable to one (NVML reference, nvmlEventData_t;
  dra-driver-nvidia-gpu #904).  Both fields are 0xFFFFFFFF for event types other than XIDs.
* Registering a MIG device handle: the reference says per-instance reporting through MIG device handles is
  not supported; the return code is not documented.  Default ``NOT_SUPPORTED``; ``nvml_events.mig_handles
  = "parent"`` in the state makes the call register the parent GPU instead.  UNVERIFIED.
* Without the privileges to see per-instance events, only whole-GPU events are reported (reference text on
  nvmlEventSetWait_v2).  ``nvml_events.privileged = false`` drops events that carry a GI id.
* Requesting a type the GPU does not support fails the registration with ``NOT_SUPPORTED``.
* A set's queue is bounded (``nvml_events.queue_limit``, default 1024): the oldest events are dropped and
  counted in the set's ``dropped``.  The real driver's behaviour on overflow is UNVERIFIED.
* Sets belong to a process; a set whose process is gone is removed the next time an event is queued (the
  driver frees a dead client's resources), and a reboot removes every set.
"""

from __future__ import annotations

import os
import time
from typing import Any

from gpuvirt.sim.nvml_base import (
    _DEVICE,
    _MIG_DEVICE,
    INVALID_ARGUMENT,
    NOT_SUPPORTED,
    NvmlBase,
    _decode,
    _encode,
    _entry,
    _Fail,
    _int_arg,
    _set,
    _set_fields,
    _set_handle,
    _set_handle_field,
    _target,
)

TIMEOUT = 10

# nvmlEventType* bits (pynvml 13.615.71)
EVENT_SINGLE_BIT_ECC = 0x1
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_PSTATE = 0x4
EVENT_XID = 0x8
EVENT_CLOCK = 0x10
EVENT_MIG_CONFIG_CHANGE = 0x100
ID_ANY = 0xFFFFFFFF

# handle kind of an event set (device handles use 1-4, see nvml_base)
_EVENT_SET = 5

DEFAULT_QUEUE_LIMIT = 1024
POLL_SECONDS = 0.02          # how often a waiting call looks at the state file


def default_supported(dev: dict[str, Any], has_mig: bool) -> int:
    """Event types a simulated GPU supports unless the state says otherwise (``nvml_events.supported``):
    XIDs, ECC, P-state and clock changes, and MIG configuration changes on MIG-capable boards."""
    mask = EVENT_XID | EVENT_SINGLE_BIT_ECC | EVENT_DOUBLE_BIT_ECC | EVENT_PSTATE | EVENT_CLOCK
    return mask | (EVENT_MIG_CONFIG_CHANGE if has_mig else 0)


def _config(state: dict[str, Any]) -> dict[str, Any]:
    cfg = state.get("nvml_events")
    return cfg if isinstance(cfg, dict) else {}


def _set_handle_value(set_id: int) -> int:
    return _encode(_EVENT_SET, set_id & 0xFFFF, (set_id >> 16) & 0xFFFF)


def _set_id(handle: Any) -> int:
    kind, low, high, _ = _decode(handle)
    if kind != _EVENT_SET:
        raise _Fail(INVALID_ARGUMENT)
    return (high << 16) | low


def _find_set(state: dict[str, Any], set_id: int) -> dict[str, Any]:
    for s in state.get("event_sets", []):
        if s.get("id") == set_id:
            return s
    raise _Fail(INVALID_ARGUMENT)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def queue_event(state: dict[str, Any], nvml_index: int, event_type: int, data: int, gi: int = ID_ANY,
                ci: int = ID_ANY) -> int:
    """Deliver one event of GPU ``nvml_index`` to every set registered for it; returns how many sets got
    it.  Must run inside a transaction.  Sets of processes that are gone are dropped first."""
    sets = [s for s in state.get("event_sets", []) if _alive(s.get("pid"))]
    state["event_sets"] = sets
    cfg = _config(state)
    if (gi != ID_ANY or ci != ID_ANY) and cfg.get("privileged", True) is False:
        return 0
    limit = int(cfg.get("queue_limit", DEFAULT_QUEUE_LIMIT))
    delivered = 0
    for s in sets:
        mask = int(s.get("registered", {}).get(str(nvml_index), 0))
        if not mask & event_type:
            continue
        q = s.setdefault("queue", [])
        q.append({"gpu": nvml_index, "type": event_type, "data": data, "gi": gi, "ci": ci})
        if len(q) > limit:
            s["dropped"] = int(s.get("dropped", 0)) + len(q) - limit
            del q[: len(q) - limit]
        delivered += 1
    return delivered


class EventsApi(NvmlBase):
    # === event sets ========================================================================================
    @_entry()
    def nvmlEventSetCreate(self, ref: Any) -> None:
        created: dict[str, int] = {}

        def body(state: dict[str, Any]) -> None:
            set_id = int(state.get("next_event_set_id", 1))
            state["next_event_set_id"] = set_id + 1
            state.setdefault("event_sets", []).append(
                {"id": set_id, "pid": os.getpid(), "registered": {}, "queue": [], "dropped": 0})
            created["id"] = set_id

        self._transact(body)
        _set_handle(ref, _set_handle_value(created["id"]))

    def _event_gpu(self, state: dict[str, Any], handle: Any) -> dict[str, Any]:
        kind, index, _, _ = _decode(handle)
        if kind == _MIG_DEVICE:
            if _config(state).get("mig_handles", "not-supported") != "parent":
                raise _Fail(NOT_SUPPORTED)
            return self._device_at(state, index)
        dev, _ = self._gpu(state, handle)
        return dev

    def _supported(self, state: dict[str, Any], dev: dict[str, Any]) -> int:
        cfg = _config(state).get("supported")
        if isinstance(cfg, int):
            return cfg
        return default_supported(dev, self._model(dev).mig is not None)

    @_entry()
    def nvmlDeviceGetSupportedEventTypes(self, handle: Any, ref: Any) -> None:
        state = self.sim.peek()
        dev = self._event_gpu(state, handle)
        _set(ref, self._supported(state, dev))

    @_entry()
    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: Any, event_set: Any) -> None:
        mask = _int_arg(event_types)
        set_id = _set_id(event_set)

        def body(state: dict[str, Any]) -> None:
            dev = self._event_gpu(state, handle)
            s = _find_set(state, set_id)
            if mask & ~self._supported(state, dev):
                raise _Fail(NOT_SUPPORTED)
            key = str(dev["nvml_index"])
            reg = s.setdefault("registered", {})
            reg[key] = int(reg.get(key, 0)) | mask

        self._transact(body)

    @_entry()
    def nvmlEventSetWait_v2(self, event_set: Any, data_ref: Any, timeout_ms: Any) -> None:
        set_id = _set_id(event_set)
        data = _target(data_ref)
        deadline = time.monotonic() + max(_int_arg(timeout_ms), 0) / 1000.0
        while True:
            s = _find_set(self.sim.peek(), set_id)
            if s.get("queue"):
                got: dict[str, Any] = {}

                def body(state: dict[str, Any]) -> None:
                    q = _find_set(state, set_id).get("queue") or []
                    if q:
                        got["event"] = q.pop(0)

                self._transact(body)
                ev = got.get("event")
                if ev is not None:
                    _set_handle_field(data, "device", _encode(_DEVICE, int(ev["gpu"])))
                    is_xid = int(ev["type"]) == EVENT_XID
                    _set_fields(data, eventType=int(ev["type"]), eventData=int(ev["data"]),
                                gpuInstanceId=int(ev["gi"]) if is_xid else ID_ANY,
                                computeInstanceId=int(ev["ci"]) if is_xid else ID_ANY)
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Fail(TIMEOUT)
            time.sleep(min(POLL_SECONDS, left))

    @_entry()
    def nvmlEventSetFree(self, event_set: Any) -> None:
        set_id = _set_id(event_set)

        def body(state: dict[str, Any]) -> None:
            _find_set(state, set_id)
            state["event_sets"] = [s for s in state.get("event_sets", []) if s.get("id") != set_id]

        self._transact(body)


__all__ = ["EventsApi", "queue_event", "default_supported", "EVENT_XID", "EVENT_DOUBLE_BIT_ECC", "ID_ANY",
           "TIMEOUT"]
