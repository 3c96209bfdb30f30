"""The one place gpuvirt starts a *peer session*: a long-lived ``gpuvirt peer-session`` on another host of a
shared inventory, reached through the command of ``policies.peer_command`` (ssh by default), spoken to in
JSON lines over its standard input and output (:mod:`gpuvirt.service.peers` says what the lines mean).

Every read is bounded (one line at most ``MAX_LINE_BYTES``, one answer within a timeout), and every failure
is a :class:`~gpuvirt.errors.ConflictError` of one line naming the host and the command: the far end is
another machine, so "it did not answer" is a conflict with the cluster, not a bug of this one.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import subprocess
import threading
import time
from typing import Any, Sequence

from gpuvirt.errors import ConflictError

MAX_LINE_BYTES = 8 * 1024 * 1024        # one message; a host view of a large host is well under 1 MiB
STDERR_KEEP = 40                        # lines of the peer's standard error kept for messages


class PeerLink:
    """One peer-session process and the pipe pair to it."""

    def __init__(self, host: str, argv: Sequence[str]) -> None:
        self.host = host
        self.argv = list(argv)
        self._buf = b""
        self._err: collections.deque[str] = collections.deque(maxlen=STDERR_KEEP)
        try:
            # stdin/stdout are the session; its own process group keeps a Ctrl-C of the coordinator's terminal
            # from killing it before the coordinator has settled (its end of the pipe closing ends it anyway)
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise ConflictError(f"cannot reach host {host}: cannot run {self.command()}: "
                                f"{exc.strerror or exc} (policies.peer_command)") from exc
        self._drain = threading.Thread(target=self._read_stderr, name=f"gpuvirt-peer-{host}-stderr", daemon=True)
        self._drain.start()

    def command(self) -> str:
        text = " ".join(self.argv)
        return f"'{text[:200]}'"

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(lambda: self.proc.stderr.readline(4096), b""):  # type: ignore[union-attr]
            line = raw.decode(errors="replace").strip()
            if line:
                self._err.append(line)

    def _why(self) -> str:
        """What the far end said last (its standard error), or how it ended."""
        self._drain.join(timeout=1.0)
        last = next((e for e in reversed(self._err) if e), None)
        code = self.proc.poll()
        if last:
            return shown(last, 300)
        return f"it exited with status {code}" if code is not None else "it stopped answering"

    def _fail(self, what: str) -> ConflictError:
        return ConflictError(f"host {self.host}: the peer session ({self.command()}) {what}: {self._why()}")

    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        if len(data) > MAX_LINE_BYTES:
            raise ConflictError(f"host {self.host}: a peer-session message of {len(data)} bytes is over the "
                                f"{MAX_LINE_BYTES}-byte limit")
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise self._fail("is gone") from exc

    def receive(self, timeout: float) -> dict[str, Any]:
        """The next line from the peer as a JSON object, within ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE_BYTES:
                self.kill()
                raise ConflictError(f"host {self.host}: the peer session sent a line over {MAX_LINE_BYTES} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ConflictError(f"host {self.host}: the peer session ({self.command()}) did not answer within "
                                    f"{timeout:g} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    # it closed its output but runs on: nothing more can come from it
                    self.kill()
                raise self._fail("ended")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg = parse_line(line)
        if not isinstance(msg, dict):
            self.kill()
            text = shown(line.decode(errors="replace"), 120)
            raise ConflictError(f"host {self.host}: the peer session ({self.command()}) answered something that is "
                                f"not a peer-session message: {text!r} (is policies.peer_command a gpuvirt?)")
        return msg

    def close(self, timeout: float = 10.0) -> None:
        """End the session: its standard input closes, so it releases what it holds and exits."""
        # a session that already died has a broken pipe: closing it is only a courtesy
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            # SIGKILL cannot be refused; a process stuck in the kernel (D state) is left to init
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)


def shown(text: str, limit: int) -> str:
    """Text from the far end as it may appear in this host's one error line: another machine's terminal escapes
    (ESC, BEL) must not reach the operator's terminal, so every non-printable character is '?'."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split())[:limit])


def parse_line(line: bytes) -> Any:
    """The JSON value of one line, None where it is none."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        # a line within the byte limit can still nest deeper than the parser's recursion ('[[[[...')
        return None


def read_request(stream: Any, limit: int | None = None) -> bytes | None:
    """One line from ``stream`` (a binary file) of at most ``limit`` bytes (``MAX_LINE_BYTES``); None at its
    end.  A longer line raises ValueError (the session's server answers it with an error and ends)."""
    limit = MAX_LINE_BYTES if limit is None else limit
    line = stream.readline(limit + 1)
    if not line:
        return None
    if len(line) > limit:
        raise ValueError(f"a request line over {limit} bytes")
    return line


__all__ = ["PeerLink", "MAX_LINE_BYTES", "read_request", "parse_line", "shown"]
