"""Peer sessions: the steps of a move between hosts of a shared inventory carried out on the other host by a
gpuvirt running there (``gpuvirt rebalance --cluster --execute``, ``gpuvirt reconcile``; docs/placement.md
"Rebalancing: cross-host execution").

The host that runs the command (the *coordinator*) starts, per other host the plan touches, one
``gpuvirt peer-session`` there through ``policies.peer_command`` (default ``ssh -o BatchMode=yes HOST
gpuvirt``) and keeps it for the whole command.  The session answers JSON lines, one request at a time:

* ``hello``: the host id the far end runs as, which must be the host the coordinator meant;
* ``lock`` / ``unlock``: a GPU's lock (:func:`gpuvirt.service.instances.gpu_lock`) taken and held *by the peer
  process*, so it ends with that process whichever side dies;
* ``view``: the host's discovery document (:func:`gpuvirt.service.hostview.snapshot`);
* ``step``: ``resolve`` / ``forward`` / ``backward`` / ``holds`` of one journal step of that host, run by
  the step kind's own code with the peer's own :class:`~gpuvirt.context.Context` (only the kinds a move
  makes or removes there: GPU instance, mdev, vendor vGPU);
* ``vgpu-metadata`` / ``compatibility``: the two halves of NVML's live-migration pre-flight.

Everything the journal records stays with the coordinator: the intent row, every step's state and every
inventory record (the inventory is shared), so a move through a session is journalled exactly as one with
an in-process peer, and a kill of either side leaves an intent that ``gpuvirt reconcile`` (with the peers
reachable) settles.  :class:`PeerSession` is what the executor and recovery see in place of a peer's Context:
its settings and inventory are the coordinator's (for the peer's host id), and the three places that reach
a host through a Context - the GPU lock, the host view and a step's operation - go through the session.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any, Iterator

from gpuvirt.context import DEFAULT_POLICIES, Context, Settings
from gpuvirt.errors import ConflictError, GpuvirtError, UsageError
from gpuvirt.service import intent_steps

PROTOCOL = 1
MAX_MESSAGES = 100_000              # requests one session answers; a plan of 8 moves needs a few hundred
HELLO_TIMEOUT_SECONDS = 60.0        # ssh's connection and the far gpuvirt's start
REPLY_TIMEOUT_SECONDS = 600.0       # one request: a GPU lock another command holds, an NVML call
SERVER_OPS = ("mig", "mdev", "vgpu")  # the step kinds a move makes or removes on a peer host
_GPU = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,63}")


def command(ctx: Context, host: str) -> list[str]:
    """The argv that starts a peer session on ``host``: ``policies.peer_command`` with ``{host}`` filled in,
    then the session's verb."""
    from gpuvirt.service.rebalance import libvirt_uri

    # a host id is any hostname the shared inventory names: one like '-oProxyCommand=...' must not become an
    # ssh option, which libvirt_uri's check (a plain hostname) rules out for the qemu+ssh URIs too
    libvirt_uri(host, ctx.settings.host_id)
    template = ctx.settings.policies.get("peer_command") or DEFAULT_POLICIES["peer_command"]
    return [a.replace("{host}", host) for a in template] + ["peer-session"]


def _reply_timeout(ctx: Context) -> float:
    # the far end may wait for vGPU types to register after it enabled VFs (policies.registration_wait_seconds)
    return max(REPLY_TIMEOUT_SECONDS, float(ctx.settings.policies.get("registration_wait_seconds", 0)) + 120.0)


# === the coordinator's side ==========================================================================================
class PeerSession:
    """Another host of a shared inventory, reached through a peer session: what the executor and recovery use
    in place of that host's :class:`~gpuvirt.context.Context`."""

    def __init__(self, ctx: Context, host: str) -> None:
        from gpuvirt.host.peer_link import PeerLink

        s = ctx.settings
        self.settings = Settings(s.root, s.sim_dir, s.db_url, host, s.config_path, s.config_found, s.debug,
                                 s.policies, s.events, s.cdi)
        self._ctx = ctx
        self._timeout = _reply_timeout(ctx)
        self._held: dict[str, int] = {}
        self.link = PeerLink(host, command(ctx, host))
        try:
            hello = self.call({"op": "hello", "host": host, "protocol": PROTOCOL}, timeout=HELLO_TIMEOUT_SECONDS)
        except GpuvirtError:
            self.link.kill()
            raise
        if hello.get("host") != host or hello.get("protocol") != PROTOCOL:
            self.link.kill()
            raise ConflictError(f"host {host}: the peer session ({self.link.command()}) runs as host "
                                f"{str(hello.get('host'))[:80]!r}, protocol {hello.get('protocol')!r}; check "
                                "policies.peer_command and the host ids")

    @property
    def inventory(self) -> Any:
        return self._ctx.inventory          # shared: the coordinator records every step of every host

    @property
    def host(self) -> Any:
        raise ConflictError(f"host {self.settings.host_id} is reached through its peer session, which offers its "
                            "GPU locks, host view and move steps only")

    def call(self, req: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        self.link.send(req)
        msg = self.link.receive(self._timeout if timeout is None else timeout)
        if msg.get("ok") is True:
            return msg
        from gpuvirt.host.peer_link import shown

        raise _error(str(msg.get("error")), f"host {self.settings.host_id}: {shown(str(msg.get('message')), 1000)}")

    @contextlib.contextmanager
    def reading(self, what: str) -> Iterator[None]:
        """Where a reply's fields are read: one that lacks them or has the wrong types is the far end's fault
        (another gpuvirt version, or no gpuvirt), a conflict naming the host, not a traceback here."""
        try:
            yield
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ConflictError(f"host {self.settings.host_id}: the peer session ({self.link.command()}) answered a "
                                f"malformed {what} reply ({type(exc).__name__}: {str(exc)[:120]})") from None

    # --- what gpuvirt.service.instances, hostview and intent_steps ask of a peer ---------------------------
    @contextlib.contextmanager
    def remote_lock(self, address: str) -> Iterator[None]:
        # re-entrant like gpu_lock within a thread: a nested take (recovery inside the executor) must not
        # release the lock the outer one still counts on
        if not self._held.get(address):
            self.call({"op": "lock", "gpu": address})
        self._held[address] = self._held.get(address, 0) + 1
        try:
            yield
        finally:
            self._held[address] -= 1
            if not self._held[address]:
                del self._held[address]
                # a session that died took the lock with it
                with contextlib.suppress(GpuvirtError):
                    self.call({"op": "unlock", "gpu": address})

    def remote_view(self, nvml: bool = True) -> Any:
        from gpuvirt.service.hostview import build_view

        r = self.call({"op": "view", "nvml": bool(nvml)})
        with self.reading("view"):
            return build_view(r["doc"])

    def remote_op(self, step: dict[str, Any]) -> "RemoteOp":
        return RemoteOp(self, step)

    # --- the live-migration pre-flight ---------------------------------------------------------------------
    def vgpu_metadata(self, index: int, instance: int | str) -> tuple[int, bytes]:
        r = self.call({"op": "vgpu-metadata", "index": index, "instance": instance})
        with self.reading("vgpu-metadata"):
            return int(r["vid"]), bytes.fromhex(r["data"])

    def compatibility(self, index: int, data: bytes, src_index: int, vid: int) -> Any:
        from gpuvirt.model.preflight import Compatibility, Reason

        r = self.call({"op": "compatibility", "index": index, "data": data.hex(), "src_index": src_index,
                       "vid": vid})
        with self.reading("compatibility"):
            return Compatibility(int(r["bits"]), int(r["code"]),
                                 tuple(Reason(str(a), int(b), str(c)) for a, b, c in r["reasons"]))

    def close(self) -> None:
        with contextlib.suppress(GpuvirtError):
            self.call({"op": "bye"}, timeout=10.0)
        self.link.close()


class RemoteOp(intent_steps._Op):
    """A step of a peer host: its host effect and check run by the peer session, its description and its
    inventory record here (the coordinator keeps the journal)."""

    def __init__(self, session: PeerSession, step: dict[str, Any]) -> None:
        super().__init__(session, step)  # type: ignore[arg-type]
        self.session = session
        self.local = intent_steps.OPS[step["op"]](session, step)  # type: ignore[arg-type]

    def _ask(self, action: str, key: str, kind: type, **kw: Any) -> Any:
        r = self.session.call({"op": "step", "action": action, "step": self.step, **kw})
        with self.session.reading(f"step {action}"):
            if not isinstance(r[key], kind):
                raise TypeError(f"{key!r} is not a {kind.__name__}")
            return r[key]

    def resolve(self) -> bool:
        r = self.session.call({"op": "step", "action": "resolve", "step": self.step})
        with self.session.reading("step resolve"):
            if not isinstance(r["changed"], bool) or (r["changed"] and not isinstance(r["params"], dict)):
                raise TypeError("'changed' is not a bool with 'params' a dict")
        if not r["changed"]:
            return False
        # in place: the caller saves the step it holds, and the executor reads the choice from it
        self.p.clear()
        self.p.update(r["params"])
        return True

    def describe(self, forward: bool = True) -> str:
        return self.local.describe(forward)

    def ensure(self, present: bool) -> dict[str, Any]:
        return self._ask("forward" if present == self.step["present"] else "backward", "facts", dict)

    def forward(self) -> dict[str, Any]:
        return self._ask("forward", "facts", dict)

    def backward(self) -> dict[str, Any]:
        return self._ask("backward", "facts", dict)

    def holds(self, view: Any, present: bool) -> bool:
        # the peer checks against its own view, taken now (``view`` is the coordinator's copy of an earlier one)
        return self._ask("holds", "holds", bool, present=bool(present))

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        self.local.record(uow, present, facts)


def _error(name: str, message: str) -> GpuvirtError:
    """The gpuvirt error a peer reported, as the same class here (its exit code follows)."""
    from gpuvirt import errors

    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, GpuvirtError)):
        cls = GpuvirtError
    try:
        return cls(message)
    except TypeError:
        return GpuvirtError(message)


@contextlib.contextmanager
def sessions(ctx: Context, hosts: Any) -> Iterator[dict[str, PeerSession]]:
    """A peer session per host of ``hosts`` (not this one), all ended on the way out."""
    out: dict[str, PeerSession] = {}
    try:
        for h in sorted(set(hosts) - {ctx.settings.host_id}):
            out[h] = PeerSession(ctx, h)
        yield out
    finally:
        for s in out.values():
            s.close()


def hosts_of_open_moves(ctx: Context) -> set[str]:
    """The other hosts that this host's unfinished moves (open intents of kind rebalance) have steps on."""
    from gpuvirt.service import intent

    out: set[str] = set()
    for row in intent.open_intents(ctx):
        if row.kind != "rebalance":
            continue
        out |= {k.rpartition("/")[0] for k in row.gpus or [] if "/" in k}
        out |= {s.get("host") for s in row.steps or [] if isinstance(s, dict) and s.get("host")}
    return out - {ctx.settings.host_id, None, ""}


@contextlib.contextmanager
def reachable(ctx: Context, hosts: Any) -> Iterator[tuple[dict[str, PeerSession], list[str]]]:
    """A session per host of ``hosts`` that can be reached, and one line per host that cannot (what is left
    on it stays open, for a later reconcile)."""
    out: dict[str, PeerSession] = {}
    missed: list[str] = []
    try:
        for h in sorted(set(hosts) - {ctx.settings.host_id}):
            try:
                out[h] = PeerSession(ctx, h)
            except GpuvirtError as exc:
                missed.append(str(exc))
        yield out, missed
    finally:
        for s in out.values():
            s.close()


def move_compatibility(src: Any, src_index: int, instance: int | str, dst: Any, dst_index: int) -> Any:
    """NVML's verdict on moving a running vGPU from ``src`` to ``dst`` (a Context or a PeerSession each):
    the source's library gives the vGPU's metadata, the target's judges it (:mod:`gpuvirt.host.nvml_migration`)."""
    from gpuvirt.host import nvml_migration as nm

    src_remote, dst_remote = isinstance(src, PeerSession), isinstance(dst, PeerSession)
    if not src_remote and not dst_remote:
        return nm.move_compatibility(src.host.nvml(), src_index, instance, dst.host.nvml(), dst_index)
    vid, data = src.vgpu_metadata(src_index, instance) if src_remote else \
        nm.vgpu_metadata_bytes(src.host.nvml(), src_index, instance)
    if dst_remote:
        return dst.compatibility(dst_index, data, src_index, vid)
    return nm.compatibility_of(dst.host.nvml(), dst_index, data, src_index, vid)


# === the peer's side: ``gpuvirt peer-session`` =======================================================================
def serve(ctx: Context, inp: Any, out: Any, *, max_messages: int = MAX_MESSAGES) -> int:
    """Answer a coordinator's requests on ``inp`` / ``out`` (binary streams) until it ends the session or its
    end of the pipe closes; the GPU locks taken for it are released on the way out.  Returns the exit status:
    0 after ``bye`` or the end of input (or a coordinator gone), 2 after a request that ends the session (bad
    line, wrong host)."""
    locks: dict[str, contextlib.ExitStack] = {}

    def reply(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        out.flush()

    try:
        return _serve(ctx, inp, reply, locks, max_messages)
    except (BrokenPipeError, ConnectionResetError):
        # the coordinator is gone (killed, or its ssh ended): what it asked for is journalled on its side, and the
        # locks taken for it go below
        return 0
    finally:
        for stack in locks.values():
            stack.close()


def _serve(ctx: Context, inp: Any, reply: Any, locks: dict[str, contextlib.ExitStack], max_messages: int) -> int:
    from gpuvirt.host.peer_link import parse_line, read_request

    greeted = False
    for n in range(max_messages + 1):
        try:
            raw = read_request(inp)
        except ValueError as exc:
            reply(_failure(UsageError(f"peer session: {exc}")))
            return 2
        if raw is None:
            return 0
        if n == max_messages:
            reply(_failure(UsageError(f"peer session: more than {max_messages} requests")))
            return 2
        req = parse_line(raw)
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            reply(_failure(UsageError("peer session: a request is not a JSON object with an 'op'")))
            return 2
        op = req["op"]
        if op == "bye":
            reply({"ok": True})
            return 0
        if not greeted and op != "hello":
            reply(_failure(UsageError("peer session: the first request must be 'hello'")))
            return 2
        try:
            result = _handle(ctx, req, locks)
        except GpuvirtError as exc:
            reply(_failure(exc))
            if op == "hello":
                return 2
            continue
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # a request whose fields are not what the protocol says: refused, the session goes on
            reply(_failure(UsageError(f"peer session: malformed {op[:40]!r} request ({type(exc).__name__}: "
                                      f"{str(exc)[:200]})")))
            continue
        greeted = True
        reply({"ok": True, **result})
    return 2


def _failure(exc: GpuvirtError) -> dict[str, Any]:
    return {"ok": False, "error": type(exc).__name__, "message": " ".join(str(exc).split())}


def _handle(ctx: Context, req: dict[str, Any], locks: dict[str, contextlib.ExitStack]) -> dict[str, Any]:
    op = req["op"]
    me = ctx.settings.host_id
    if op == "hello":
        if req.get("host") != me:
            raise ConflictError(f"this peer session runs as host {me}, not {str(req.get('host'))[:80]!r}")
        if req.get("protocol") != PROTOCOL:
            raise ConflictError(f"peer-session protocol {req.get('protocol')!r} is not {PROTOCOL} (gpuvirt versions "
                                "differ)")
        return {"host": me, "protocol": PROTOCOL}
    if op in ("lock", "unlock"):
        gpu = req["gpu"]
        if not isinstance(gpu, str) or not _GPU.fullmatch(gpu):
            raise UsageError(f"peer session: {str(gpu)[:80]!r} is not a GPU address")
        # keyed by the lock file gpu_lock uses, which spells ':' as '_': two spellings of one GPU are one lock, so
        # releasing one cannot drop the flock under the other (a nested gpu_lock released out of order)
        key = gpu.replace(":", "_")
        if op == "lock":
            if key not in locks:
                from gpuvirt.service.instances import gpu_lock

                stack = contextlib.ExitStack()
                stack.enter_context(gpu_lock(ctx, gpu))
                locks[key] = stack
        elif key in locks:
            locks.pop(key).close()
        return {}
    if op == "view":
        from gpuvirt.host.discover import discover

        return {"doc": discover(ctx.host, with_nvml=bool(req.get("nvml", True)))}
    if op == "step":
        return _step(ctx, req)
    if op == "vgpu-metadata":
        from gpuvirt.host.nvml_migration import vgpu_metadata_bytes

        instance = req["instance"]
        if not isinstance(instance, (int, str)) or isinstance(instance, bool):
            raise UsageError("peer session: a vGPU instance is an id or a UUID")
        vid, data = vgpu_metadata_bytes(ctx.host.nvml(), _int(req["index"]), instance)
        return {"vid": vid, "data": data.hex()}
    if op == "compatibility":
        from gpuvirt.host.nvml_migration import compatibility_of

        data = req["data"]
        if not isinstance(data, str) or len(data) > 65536:
            raise UsageError("peer session: vGPU metadata must be hex of at most 32 KiB")
        c = compatibility_of(ctx.host.nvml(), _int(req["index"]), bytes.fromhex(data), _int(req["src_index"]),
                             _int(req["vid"]))
        return {"bits": c.vm_compatibility, "code": c.limit_code,
                "reasons": [[r.allows, r.limit, r.text] for r in c.reasons]}
    raise UsageError(f"peer session: unknown request {op[:40]!r}")


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2 ** 32:
        raise UsageError(f"peer session: {str(v)[:40]!r} is not an index")
    return v


def _step(ctx: Context, req: dict[str, Any]) -> dict[str, Any]:
    step, action = req["step"], req["action"]
    if not isinstance(step, dict) or step.get("op") not in SERVER_OPS or not isinstance(step.get("params"), dict) \
            or not isinstance(step.get("gpu"), str) or not isinstance(step.get("present"), bool):
        raise UsageError(f"peer session: a step must be one of {', '.join(SERVER_OPS)} with gpu, present and params")
    if step.get("host") != ctx.settings.host_id:
        raise ConflictError(f"{intent_steps.describe(step)} is a step of host {str(step.get('host'))[:80]!r}; this "
                            f"peer session runs as {ctx.settings.host_id}")
    op = intent_steps.OPS[step["op"]](ctx, step)
    if action == "resolve":
        changed = op.resolve()
        return {"changed": changed, "params": step["params"] if changed else None}
    if action == "forward":
        return {"facts": op.forward()}
    if action == "backward":
        return {"facts": op.backward()}
    if action == "holds":
        from gpuvirt.service import hostview

        return {"holds": bool(op.holds(hostview.snapshot(ctx), bool(req["present"])))}
    raise UsageError(f"peer session: unknown step action {str(action)[:40]!r}")


__all__ = ["PeerSession", "RemoteOp", "serve", "sessions", "reachable", "hosts_of_open_moves", "command",
           "move_compatibility"]
