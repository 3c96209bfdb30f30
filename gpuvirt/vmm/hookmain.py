"""Entry point of ``gpuvirt hook libvirt-qemu``, kept light on purpose.

libvirtd runs the hook synchronously for every domain operation.  Most domains have no gpuvirt device, so
the common case - read the XML, see no ``<hostdev``, exit 0 - must not import the CLI, SQLAlchemy or NVML.
Only ``prepare`` (make devices exist) and ``release`` (free transient ones) do real work; the other
documented operations are accepted and ignored.  stdin is bounded: a domain XML larger than the limit is
refused at ``prepare`` and ignored elsewhere.
"""

from __future__ import annotations

import os
import sys

MAX_XML = 4 * 1024 * 1024
# operations libvirt documents for the qemu hook (libvirt-vmm.md section 3)
KNOWN_OPS = {"prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect", "attach"}
ABORTING_OPS = {"prepare", "start", "migrate", "restore", "reconnect"}


def _err(msg: str) -> None:
    sys.stderr.write("gpuvirt: " + " ".join(msg.split()) + "\n")


def run_hook(args: list[str], *, root: str | None = None, sim: str | None = None, db: str | None = None,
             host_id: str | None = None, config: str | None = None, debug: bool = False,
             stdin: object = None) -> int:
    if not args or len(args) > 4:
        _err("error: usage: gpuvirt hook libvirt-qemu <domain> <operation> <sub-operation> <extra> (XML on stdin)")
        return 2
    domain = args[0]
    op = args[1] if len(args) > 1 else "-"
    if op not in KNOWN_OPS:
        _err(f"error: unknown libvirt hook operation {op[:40]!r}; nothing done")
        return 2
    stream = stdin if stdin is not None else sys.stdin.buffer
    try:
        data = stream.read(MAX_XML + 1) if stream is not None else b""  # type: ignore[attr-defined]
    except OSError:
        data = b""
    if len(data) > MAX_XML:
        if op in ABORTING_OPS:
            _err(f"error: domain XML for {domain[:80]!r} is larger than {MAX_XML} bytes; refusing {op}")
            return 1
        return 0
    if op not in ("prepare", "release"):
        return 0
    if b"<hostdev" not in data:
        return 0  # no host devices at all: nothing of ours, before any heavy import
    try:
        return _slow_path(domain, op, data, root=root, sim=sim, db=db, host_id=host_id, config=config)
    except Exception as exc:  # noqa: BLE001 - the hook's error boundary: one line for libvirt's log
        if debug or os.environ.get("GPUVIRT_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        from gpuvirt.errors import GpuvirtError

        what = str(exc) if isinstance(exc, GpuvirtError) else f"internal error: {type(exc).__name__}: {exc}"
        if op == "prepare":
            _err(f"error: refusing to start {domain[:80]}: {what}")
            return 1
        # release cannot abort anything; report and let libvirt carry on
        _err(f"warning: release of {domain[:80]}: {what}")
        return 0


def _slow_path(domain: str, op: str, data: bytes, **opts: str | None) -> int:
    from gpuvirt.context import Context, resolve_settings
    from gpuvirt.service import hook
    from gpuvirt.vmm.libvirt import parse_domain

    dom = None
    try:
        dom = parse_domain(data)
    except Exception:
        if op == "prepare":
            raise
    if dom is not None and dom.name != domain:
        from gpuvirt.errors import UsageError

        raise UsageError(f"argv names domain {domain!r} but the XML defines {dom.name!r}")
    if dom is not None and not dom.hostdevs:
        return 0
    settings = resolve_settings(root=opts.get("root"), sim=opts.get("sim"), db=opts.get("db"),
                                host_id=opts.get("host_id"), config=opts.get("config"))
    with Context(settings) as ctx:
        if op == "prepare":
            for note in hook.prepare(ctx, domain, dom):
                _err(f"{domain[:80]}: {note}")
        else:
            hook.release(ctx, domain, dom)
    return 0
