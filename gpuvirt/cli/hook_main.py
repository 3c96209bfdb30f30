"""Entry point of ``gpuvirt hook libvirt-qemu``, kept light on purpose.

libvirtd runs the hook synchronously for every domain operation.  Most domains have no gpuvirt device, so
the common case - read the XML, see no ``<hostdev``, exit 0 - must not import the CLI, SQLAlchemy or NVML.
Only ``prepare`` (make devices exist) and ``release`` (free transient ones) do real work; the other
documented operations are accepted and ignored.  Those two first try ``service.hook_fast`` (plain sqlite3 and
single sysfs lookups, no SQLAlchemy: a VM start waits for this) and take the full path of ``service.hook`` for
whatever it leaves to it (docs/hook-guide.md "Hook latency").  stdin is bounded: a domain XML larger than the limit is
refused at ``prepare``, ``release`` then works from the domain name alone, and other operations ignore it.
"""

from __future__ import annotations

import os
import sys

MAX_XML = 4 * 1024 * 1024
# operations libvirt documents for the qemu hook (libvirt-vmm.md section 3)
KNOWN_OPS = {"prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect", "attach"}


def _err(msg: str) -> None:
    sys.stderr.write("gpuvirt: " + " ".join(msg.split()) + "\n")


def _show(domain: str) -> str:
    """The domain name for a message: as is when plain, quoted when the one-line folding in _err would
    change it (tabs, newlines, leading/trailing spaces); at most 80 characters either way."""
    d = domain[:80]
    return d if d == " ".join(d.split()) and d.isprintable() else repr(d)


def run_hook(args: list[str], *, root: str | None = None, sim: str | None = None, db: str | None = None,
             host_id: str | None = None, config: str | None = None, debug: bool = False,
             stdin: object = None, fast: bool = True) -> int:
    """The hook's work for libvirt's argv; ``fast`` False skips the fast path (tests compare the two)."""
    if len(args) < 2 or len(args) > 4:
        _err("error: usage: gpuvirt hook libvirt-qemu <domain> <operation> <sub-operation> <extra> (XML on stdin)")
        return 2
    domain, op = args[0], args[1]
    if op not in KNOWN_OPS:
        _err(f"error: unknown libvirt hook operation {op[:40]!r}; nothing done")
        return 2
    stream = stdin if stdin is not None else sys.stdin.buffer
    try:
        data = stream.read(MAX_XML + 1) if stream is not None else b""  # type: ignore[attr-defined]
    except OSError:
        data = b""
    too_big = len(data) > MAX_XML
    # only prepare needs the XML; refusing anywhere else would do harm without protecting anything (a
    # non-zero exit at 'reconnect' makes libvirtd kill the running QEMU)
    if too_big and op == "prepare":
        _err(f"error: domain XML for {_show(domain)} is larger than {MAX_XML} bytes; refusing {op}")
        return 1
    if op not in ("prepare", "release"):
        return 0
    if too_big:
        # release cannot be refused, and its transient allocations must not leak: free them by the domain
        # name libvirtd passed in argv, without the (unread) XML
        _err(f"warning: domain XML for {_show(domain)} is larger than {MAX_XML} bytes; releasing by name only")
        data = b""
    elif b"<hostdev" not in data:
        return 0  # no host devices at all: nothing of ours, before any heavy import
    try:
        return _with_devices(domain, op, data, fast, root=root, sim=sim, db=db, host_id=host_id, config=config)
    except Exception as exc:  # noqa: BLE001 - the hook's error boundary: one line for libvirt's log
        if debug or os.environ.get("GPUVIRT_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        from gpuvirt.errors import GpuvirtError

        what = str(exc) if isinstance(exc, GpuvirtError) else f"internal error: {type(exc).__name__}: {exc}"
        if op == "prepare":
            _err(f"error: refusing to start {_show(domain)}: {what}")
            return 1
        # release cannot abort anything; report and let libvirt carry on
        _err(f"warning: release of {_show(domain)}: {what}")
        return 0


def _with_devices(domain: str, op: str, data: bytes, fast: bool, **opts: str | None) -> int:
    # parse before importing the service layer: a domain whose only hostdevs are USB/SCSI (or none, the
    # string merely appearing in a comment) is answered without loading SQLAlchemy and the inventory
    from gpuvirt.vmm.libvirt import parse_domain

    dom = None
    if data:
        try:
            dom = parse_domain(data)
        except Exception:
            if op == "prepare":
                raise
            # release goes on by the argv name: freeing transient allocations must not depend on the XML
    if dom is not None and dom.name != domain:
        from gpuvirt.errors import UsageError

        raise UsageError(f"argv names domain {domain!r} but the XML defines {dom.name!r}; nothing done")
    if dom is not None and not dom.hostdevs:
        return 0
    from gpuvirt.context import Context, resolve_settings

    settings = resolve_settings(root=opts.get("root"), sim=opts.get("sim"), db=opts.get("db"),
                                host_id=opts.get("host_id"), config=opts.get("config"))
    with Context(settings) as ctx:
        notes = None
        if fast:
            from gpuvirt.service import hook_fast

            notes = hook_fast.prepare(ctx, domain, dom) if op == "prepare" else hook_fast.release(ctx, domain, dom)
        if notes is None:
            # not the fast path's case (a PostgreSQL inventory, another schema revision, a restore that needs
            # NVML...): the full path, with SQLAlchemy
            from gpuvirt.service import hook

            notes = hook.prepare(ctx, domain, dom) if op == "prepare" else hook.release(ctx, domain, dom)
        if op == "prepare":
            for note in notes:
                _err(f"{_show(domain)}: {note}")
    return 0
