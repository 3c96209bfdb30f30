"""The ``vm-handover`` step of the intent journal: a VM stops naming its source device and names its target
device instead (the middle of a rebalance move, :mod:`gpuvirt.service.rebalance_exec`).

Like every step kind it is an *ensure* in both directions, decided by asking libvirt where the domain is
and which device its XML names:

* live (two hosts): ``virsh -c SRC migrate --live --persistent --undefinesource --xml TARGET.xml VM DST``;
* cold (one host, or when the pre-flight allows only cold): shut the guest down (``virsh shutdown``, then
  ``domstate`` until it is shut off), then either ``virsh define TARGET.xml`` on the same host or
  ``virsh migrate --offline --persistent --undefinesource --xml TARGET.xml VM DST`` to another, then
  ``virsh start`` when it ran before.

Backward is the same with source and target swapped, so a kill at any point is settled by running the step
again in either direction: the VM's XML always names exactly one of the two devices, both of which exist
until the handover is settled.  Every VM name is passed after ``--``: libvirt allows a name such as
``--domain=other`` (only '/' is out), which virsh would otherwise read as an option and act on another domain.
Which libvirt calls are made goes through one *runner* (``argv -> stdout``):
:class:`gpuvirt.host.virsh.VirshRunner` on a real host, a recording one in tests.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable, Sequence

from gpuvirt.errors import ConflictError, GpuvirtError, NotFoundError
from gpuvirt.service.intent_steps import OPS, _Op, _step

Runner = Callable[[Sequence[str]], str]
_RUNNER: list[Runner | None] = [None]
SHUTDOWN_TIMEOUT_SECONDS = 300          # a cold move waits this long for the guest to shut down
_POLL_SECONDS = 1.0


def set_runner(runner: Runner | None) -> Runner | None:
    """Use ``runner`` for the libvirt calls of handover steps (None: the real virsh); returns the old one."""
    old = _RUNNER[0]
    _RUNNER[0] = runner
    return old


def runner() -> Runner:
    if _RUNNER[0] is not None:
        return _RUNNER[0]
    from gpuvirt.host.virsh import VirshRunner

    return VirshRunner()


def handover_step(gpu: str, *, vm: str, kind: str, src: dict[str, Any], dst: dict[str, Any],
                  intent: int | None = None, shutdown_timeout: float = SHUTDOWN_TIMEOUT_SECONDS) -> dict[str, Any]:
    """The VM ``vm`` hands over from device ``src`` to ``dst`` (each ``{"host", "uri", "uuid", "address"}``,
    one of uuid / address set) by a ``kind`` (live | cold) move.  ``intent``: the journal row whose
    direction of recovery follows this step (forward once the VM names the target)."""
    return _step("vm-handover", gpu, True, vm=vm, kind=kind, src=dict(src), dst=dict(dst), intent=intent,
                 was_running=None, shutdown_timeout=shutdown_timeout)


def _dev(d: dict[str, Any]) -> str:
    return f"mdev {d['uuid']}" if d.get("uuid") else f"VF {d.get('address') or '(chosen at creation)'}"


def _names(xml: str, d: dict[str, Any]) -> bool:
    from gpuvirt.vmm.libvirt import normalize_pci_address, normalize_uuid, parse_domain

    want = ("mdev", normalize_uuid(d["uuid"])) if d.get("uuid") else ("pci", normalize_pci_address(d["address"]))
    return any(h.key == want for h in parse_domain(xml).hostdevs)


class VmHandoverOp(_Op):
    def describe(self, forward: bool = True) -> str:
        p = self.p
        to, frm = (p["dst"], p["src"]) if forward else (p["src"], p["dst"])
        return (f"{p['kind']} handover of VM {p['vm']} from {_dev(frm)} on {frm['host']} to {_dev(to)} on "
                f"{to['host']}")

    # --- libvirt questions ---
    def _xml(self, uri: str, *, inactive: bool = False, migratable: bool = False) -> str | None:
        argv = ["-c", uri, "dumpxml"] + (["--migratable"] if migratable else []) + \
            (["--inactive"] if inactive else []) + ["--", self.p["vm"]]
        try:
            return runner()(argv)
        except GpuvirtError:
            return None             # no such domain there (or libvirt unreachable: the caller says which)

    def _state(self, uri: str) -> str | None:
        try:
            return runner()(["-c", uri, "domstate", "--", self.p["vm"]]).strip()
        except GpuvirtError:
            return None

    def resolve(self) -> bool:
        # whether the guest ran is read once, before anything changes, so that a resumed or undone cold move
        # starts it again exactly when it ran before
        if self.p.get("was_running") is not None:
            return False
        st = self._state(self.p["src"]["uri"])
        if st is None:
            raise NotFoundError(f"VM {self.p['vm']} is not defined on {self.p['src']['host']} "
                                f"({self.p['src']['uri']}); nothing to move")
        self.p["was_running"] = st == "running"
        return True

    def forward(self) -> dict[str, Any]:
        return self._ensure(self.p["src"], self.p["dst"])

    def backward(self) -> dict[str, Any]:
        if self.p.get("was_running") is None:
            # resolve never finished (it is saved before forward makes its first libvirt call): this step
            # changed nothing, and a VM libvirt does not know must not keep the intent open for ever
            return {}
        return self._ensure(self.p["dst"], self.p["src"])

    def ensure(self, present: bool) -> dict[str, Any]:   # pragma: no cover - forward/backward above
        return self.forward() if present else self.backward()

    def _ensure(self, frm: dict[str, Any], to: dict[str, Any]) -> dict[str, Any]:
        from gpuvirt.vmm.libvirt import retarget_hostdev

        p, run = self.p, runner()
        vm, cold = p["vm"], p["kind"] != "live"
        if not to.get("uuid") and not to.get("address"):
            raise ConflictError(f"the target device of VM {vm} is not known yet")
        there = self._xml(to["uri"], inactive=cold)
        if there is not None and _names(there, to):
            if cold and p.get("was_running") and self._state(to["uri"]) != "running":
                run(["-c", to["uri"], "start", "--", vm])
            return {}
        here = self._xml(frm["uri"], inactive=cold, migratable=True)
        if here is None or not _names(here, frm):
            raise ConflictError(f"VM {vm} names neither {_dev(frm)} on {frm['host']} nor {_dev(to)} on {to['host']} "
                                "in its libvirt definition; it is left as it is (see 'virsh dumpxml')")
        if cold and self._state(frm["uri"]) not in ("shut off", None):
            self._shutdown(frm["uri"])
            here = self._xml(frm["uri"], inactive=True, migratable=True) or here
        target = retarget_hostdev(here, old_uuid=frm.get("uuid"), old_address=frm.get("address"),
                                  new_uuid=to.get("uuid"), new_address=to.get("address"))
        fd, path = tempfile.mkstemp(prefix="gpuvirt-target-", suffix=".xml")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(target)
            if not cold:
                run(["-c", frm["uri"], "migrate", "--live", "--persistent", "--undefinesource", "--xml", path, "--",
                     vm, to["uri"]])
            elif frm["uri"] == to["uri"]:
                run(["-c", to["uri"], "define", path])
            else:
                run(["-c", frm["uri"], "migrate", "--offline", "--persistent", "--undefinesource", "--xml", path,
                     "--", vm, to["uri"]])
        finally:
            os.unlink(path)
        if cold and p.get("was_running"):
            run(["-c", to["uri"], "start", "--", vm])
        return {}

    def _shutdown(self, uri: str) -> None:
        vm = self.p["vm"]
        runner()(["-c", uri, "shutdown", "--", vm])
        deadline = time.monotonic() + float(self.p.get("shutdown_timeout") or SHUTDOWN_TIMEOUT_SECONDS)
        while self._state(uri) not in ("shut off", None):
            if time.monotonic() > deadline:
                raise ConflictError(f"VM {vm} did not shut down within {self.p.get('shutdown_timeout')} s; it keeps "
                                    "its device (shut it down, then run the rebalance again)")
            time.sleep(_POLL_SECONDS)

    def holds(self, view: Any, present: bool) -> bool:
        want = self.p["dst"] if present else self.p["src"]
        if not present and self.p.get("was_running") is None:
            return True             # never started (backward above): nothing of it to show
        if not want.get("uuid") and not want.get("address"):
            return not present
        xml = self._xml(want["uri"], inactive=self.p["kind"] != "live")
        return xml is not None and _names(xml, want)

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        # once the VM names its target, finishing the move (releasing the source) is the way out of a crash;
        # before that, undoing it (removing the target)
        if self.p.get("intent") is None:
            return
        row = uow.intent(self.p["intent"])
        if row is not None:
            row.recovery = "forward" if present else "back"


OPS["vm-handover"] = VmHandoverOp

__all__ = ["handover_step", "set_runner", "runner", "VmHandoverOp", "SHUTDOWN_TIMEOUT_SECONDS"]
