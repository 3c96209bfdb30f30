"""NVML event subscription (XID critical errors) for the health monitor: the machine-facing half.

One :class:`EventSubscription` is one NVML event set with every GPU of the session registered for the
event types asked for (XIDs by default) that the GPU supports.  Registration follows what the NVML reference
and NVIDIA's own consumers do (k8s-device-plugin ``internal/rm/health.go``): events are registered on the
**physical** GPU handle, never on MIG device handles (per-instance registration is not supported), with the
requested mask cut down to ``nvmlDeviceGetSupportedEventTypes``; an XID that concerns one MIG instance
arrives on the parent with its GPU-instance / compute-instance ids, 0xFFFFFFFF when it concerns the GPU.

NVML delivers only events that happen after registration: nothing that happened while no set was
registered can be read back later.  Errors are translated here like every other NVML call (gpuvirt.errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pynvml

from gpuvirt.errors import NvmlError

ID_ANY = 0xFFFFFFFF
XID = pynvml.nvmlEventTypeXidCriticalError
DOUBLE_BIT_ECC = pynvml.nvmlEventTypeDoubleBitEccError


@dataclass(frozen=True)
class NvmlEvent:
    event_type: int
    data: int                        # the XID for an XID event
    gpu_index: int | None            # None: a GPU this subscription did not know (its UUID is still given)
    gpu_uuid: str | None
    pci_address: str | None          # sysfs form
    gi: int | None                   # None: not attributable to a MIG GPU instance
    ci: int | None

    @property
    def is_xid(self) -> bool:
        return self.event_type == XID


@dataclass(frozen=True)
class Registration:
    gpu_index: int
    pci_address: str
    uuid: str
    mask: int                        # 0: not registered (see ``note``)
    note: str | None = None


class EventSubscription:
    """An NVML event set over every GPU of ``session`` (a :class:`gpuvirt.host.nvml.NvmlSession`)."""

    def __init__(self, session: Any, types: int = XID) -> None:
        self.session = session
        self.types = types
        self._set: Any = None
        self.registrations: list[Registration] = []
        self._by_uuid: dict[str, Registration] = {}

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def open(self) -> "EventSubscription":
        s = self.session
        s._require()
        gpus = s.gpus()
        try:
            self._set = s._call(pynvml.nvmlEventSetCreate)
        except pynvml.NVMLError as exc:
            raise s._error(exc, "create an NVML event set") from None
        try:
            for g in gpus:
                self.registrations.append(self._register(g))
        except NvmlError:
            self.close()
            raise
        self._by_uuid = {r.uuid: r for r in self.registrations}
        return self

    def _register(self, g: Any) -> Registration:
        s = self.session
        h = s._gpu(g.index).handle
        where = f"GPU {g.index} ({g.pci_address})"
        try:
            supported = int(s._call(pynvml.nvmlDeviceGetSupportedEventTypes, h))
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                return Registration(g.index, g.pci_address, g.uuid, 0, "events not supported")
            raise s._error(exc, f"read the event types {where} supports", gpu=g.index) from None
        mask = self.types & supported
        if not mask:
            return Registration(g.index, g.pci_address, g.uuid, 0, "XID events not supported")
        try:
            s._call(pynvml.nvmlDeviceRegisterEvents, h, mask, self._set)
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                return Registration(g.index, g.pci_address, g.uuid, 0, "event registration not supported")
            raise s._error(exc, f"register for NVML events on {where}", gpu=g.index) from None
        return Registration(g.index, g.pci_address, g.uuid, mask)

    def close(self) -> None:
        if self._set is None:
            return
        es, self._set = self._set, None
        try:
            self.session._call(pynvml.nvmlEventSetFree, es)
        except (pynvml.NVMLError, NvmlError):
            pass   # the session may be closing already; the driver frees a client's sets with it

    def __enter__(self) -> "EventSubscription":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def registered(self) -> list[Registration]:
        return [r for r in self.registrations if r.mask]

    # --- waiting ----------------------------------------------------------------------------------------------------
    def wait(self, timeout_ms: int = 0) -> NvmlEvent | None:
        """The next event, or None when none arrives within ``timeout_ms``."""
        if self._set is None:
            raise NvmlError("the NVML event set is closed")
        s = self.session
        try:
            data = s._call(pynvml.nvmlEventSetWait_v2, self._set, max(0, int(timeout_ms)))
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_TIMEOUT:
                return None
            raise s._error(exc, "wait for NVML events") from None
        uuid = None
        try:
            uuid = str(s._call(pynvml.nvmlDeviceGetUUID, data.device))
        except pynvml.NVMLError:
            pass     # a GPU that fell off the bus may no longer answer; the event is still worth keeping
        reg = self._by_uuid.get(uuid) if uuid else None
        gi, ci = int(data.gpuInstanceId), int(data.computeInstanceId)
        return NvmlEvent(event_type=int(data.eventType), data=int(data.eventData),
                         gpu_index=reg.gpu_index if reg else None, gpu_uuid=uuid,
                         pci_address=reg.pci_address if reg else None,
                         gi=None if gi == ID_ANY else gi, ci=None if ci == ID_ANY else ci)

    def drain(self, limit: int = 10_000, first_timeout_ms: int = 0) -> list[NvmlEvent]:
        """Every event queued now (at most ``limit``); waits up to ``first_timeout_ms`` for the first."""
        out: list[NvmlEvent] = []
        ev = self.wait(first_timeout_ms)
        while ev is not None:
            out.append(ev)
            if len(out) >= limit:
                break
            ev = self.wait(0)
        return out


__all__ = ["EventSubscription", "NvmlEvent", "Registration", "XID", "DOUBLE_BIT_ECC", "ID_ANY"]
