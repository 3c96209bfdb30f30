"""Files gpuvirt reads from operators and files it keeps as root: bounded reads, trusted directories, no links.

gpuvirt runs as root (libvirt hooks, boot units) and keeps its state in ``<root>/var/lib/gpuvirt`` (the SQLite
inventory, per-GPU lock files, the mdevctl ledger).  Whoever can write a directory on that path, or plant a
symbolic link there, can make root write where they choose; so:

* a directory gpuvirt keeps files in (the state directory, the directory of a SQLite inventory) must be a real
  directory owned by root or the invoking user and not writable by group or others; every directory above it
  must be owned by root or the invoking user and not writable by group or others unless it has the sticky bit
  (``/tmp``: nobody can rename or remove what is not theirs);
* files gpuvirt opens there are opened with ``O_NOFOLLOW`` (SQLite opens its own files, so they are checked
  with ``lstat`` before it connects: the database, ``-wal``, ``-shm``, ``-journal``);
* input files named by an operator (config, domain XML, event files) are read with a size limit, and
  the config file must be a regular file: ``/dev/zero`` or a FIFO is refused before anything is read.

A directory found trusted is remembered with its identity, so the next use (a lock taken per GPU) costs one
``lstat`` instead of one per directory level.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from pathlib import Path

from gpuvirt.errors import UnsafePathError, UsageError

MiB = 1024 * 1024

# directory -> (device, inode, owner, mode) when it was found trusted; a hit is confirmed by one lstat, so a
# directory removed and made again (or changed) is checked again
_checked: dict[str, tuple[int, int, int, int]] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_uid, st.st_mode)


def _still_trusted(key: str) -> bool:
    known = _checked.get(key)
    if known is None:
        return False
    try:
        return _identity(os.lstat(key)) == known
    except OSError:
        return False


def _trusted_owners() -> set[int]:
    return {0, os.geteuid()}


def _owner_text(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _fix(path: Path) -> str:
    return f"fix it with 'chown root: {path} && chmod go-w {path}' (or choose another directory)"


def check_private_dir(path: str | os.PathLike[str], *, what: str = "state directory") -> None:
    """Refuse ``path`` (an existing directory) unless it and every directory above it can be trusted."""
    p = Path(os.path.abspath(path))
    key = str(p)
    if _still_trusted(key):
        return
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise UnsafePathError(f"the {what} {p} does not exist", path=str(p)) from None
    except OSError as exc:
        raise UnsafePathError(f"cannot inspect the {what} {p}: {exc.strerror}", path=str(p)) from exc
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"the {what} {p} is a symbolic link (to {os.readlink(p)}); gpuvirt does not follow "
                              f"links where it keeps files as root: use the real directory", path=str(p))
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"the {what} {p} is not a directory", path=str(p))
    owners = _trusted_owners()
    if st.st_uid not in owners:
        raise UnsafePathError(f"the {what} {p} is owned by {_owner_text(st.st_uid)}, not by root or the invoking "
                              f"user; {_fix(p)}", path=str(p))
    if st.st_mode & 0o022:
        who = "group and others" if st.st_mode & 0o022 == 0o022 else "its group" if st.st_mode & 0o020 else "others"
        raise UnsafePathError(f"the {what} {p} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}); "
                              f"{_fix(p)}", path=str(p))
    # the directories above: a link among them is fine when a trusted user made it, so they are checked on the
    # path the kernel resolves
    real = Path(os.path.realpath(p))
    for anc in [*reversed(real.parents)]:
        try:
            ast = os.stat(anc)
        except OSError as exc:
            raise UnsafePathError(f"cannot inspect {anc} (above the {what} {p}): {exc.strerror}",
                                  path=str(anc)) from exc
        if ast.st_uid not in owners:
            raise UnsafePathError(f"{anc} (above the {what} {p}) is owned by {_owner_text(ast.st_uid)}, not by root "
                                  f"or the invoking user; whoever owns it can replace the {what}", path=str(anc))
        if ast.st_mode & 0o022 and not ast.st_mode & stat.S_ISVTX:
            raise UnsafePathError(f"{anc} (above the {what} {p}) is writable by group or others without the sticky "
                                  f"bit (mode {stat.S_IMODE(ast.st_mode):04o}); anyone able to write it can replace "
                                  f"the {what}: run 'chmod go-w {anc}'", path=str(anc))
    _checked[key] = _identity(st)


def ensure_private_dir(path: str | os.PathLike[str], *, what: str = "state directory") -> Path:
    """``path`` as a trusted directory: created (mode 0700, parents as needed) when missing, else checked."""
    p = Path(os.path.abspath(path))
    if _still_trusted(str(p)):
        return p
    if not os.path.lexists(p):
        try:
            p.mkdir(parents=True, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UnsafePathError(f"cannot create the {what} {p}: {exc.strerror}", path=str(p)) from exc
    check_private_dir(p, what=what)
    return p


def forget_checks() -> None:
    """Tests change modes under a running process; a real command never needs this."""
    _checked.clear()


def open_lock_file(path: str | os.PathLike[str], *, state_dir: str | os.PathLike[str]) -> int:
    """Open (creating) a lock file below the state directory: both directories trusted, no link followed.

    ``OSError`` from creating a directory or the file propagates (a read-only state directory is the
    caller's business); an unsafe directory or a link is :class:`UnsafePathError`.
    """
    p = Path(os.path.abspath(path))
    state = Path(os.path.abspath(state_dir))
    if not (_still_trusted(str(p.parent)) and _still_trusted(str(state))):
        for d in (state, p.parent):
            if not os.path.lexists(d):
                if not os.path.lexists(d.parent):
                    d.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(d, 0o700)
        check_private_dir(state, what="state directory")
        if p.parent != state:
            check_private_dir(p.parent, what="lock directory")
    return open_nofollow(p, os.O_CREAT | os.O_RDWR, 0o600, what="lock file")


def check_file(path: str | os.PathLike[str], *, what: str) -> bool:
    """An existing ``path`` must be a regular file (not a link) owned by root or the invoking user.

    Returns whether it exists.  Used for files another program opens by name (SQLite's own files).
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UnsafePathError(f"cannot inspect the {what} {p}: {exc.strerror}", path=str(p)) from exc
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"the {what} {p} is a symbolic link (to {os.readlink(p)}); refusing to follow it: "
                              "remove the link and use the real file's path", path=str(p))
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"the {what} {p} is not a regular file", path=str(p))
    if st.st_uid not in _trusted_owners():
        raise UnsafePathError(f"the {what} {p} is owned by {_owner_text(st.st_uid)}, not by root or the invoking "
                              f"user; check who made it, then 'chown root: {p}' or move it aside", path=str(p))
    return True


def open_nofollow(path: str | os.PathLike[str], flags: int, mode: int = 0o600, *, what: str) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` with one clear line (instead of ``ELOOP``).

    Other ``OSError`` values propagate, so callers keep their own handling of read-only directories.
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"the {what} {path} is a symbolic link; refusing to follow it: remove the link",
                                  path=str(path)) from exc
        raise


def read_bounded(path: str | os.PathLike[str], limit: int, *, what: str, regular_only: bool = True) -> bytes:
    """The contents of an operator-named file, at most ``limit`` bytes (more is refused, not truncated).

    With ``regular_only`` a device, FIFO or socket is refused before a byte is read (``/dev/zero`` would never
    end, a FIFO would block until someone writes).  Without it, the read itself stops after ``limit + 1``
    bytes.  ``OSError`` from opening propagates (callers word "does not exist" themselves).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | (os.O_NONBLOCK if regular_only else 0))
    try:
        st = os.fstat(fd)
        if regular_only and not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                    "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
            raise UsageError(f"{what} {path} is {kind}; give a regular file", path=str(path))
        if stat.S_ISREG(st.st_mode) and st.st_size > limit:
            raise UsageError(f"{what} {path} is {st.st_size} bytes, more than the limit of {_size(limit)}",
                             path=str(path))
        if regular_only:
            os.set_blocking(fd, True)
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:
            raise UsageError(f"{what} {path} is larger than the limit of {_size(limit)}", path=str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


def check_toml_nesting(text: str, *, max_depth: int, what: str) -> None:
    """Refuse TOML nested deeper than ``max_depth`` before parsing it.

    Python's tomllib recurses per nested array or inline table (a few thousand levels end in RecursionError)
    and builds one table per dotted-key part (a long ``a.a.a...`` key exhausted memory when tried).  This
    scan counts brackets, and the dots of one key (up to the next ``=``, ``,`` or newline), outside strings and
    comments.
    """
    depth = 0
    line_dots = 0
    i, n = 0, len(text)
    while True:
        m = _TOML_TOKEN.search(text, i)
        if m is None:
            return
        i = m.start()
        c = text[i]
        if c in "\"'":
            if text.startswith(c * 3, i):
                end = text.find(c * 3, i + 3)
                i = n if end < 0 else end + 3
                continue
            stop = _BASIC_END if c == '"' else _LITERAL_END
            e = stop.search(text, i + 1)
            i = n if e is None else e.end()
            continue
        if c == "#":
            nl = text.find("\n", i)
            i = n if nl < 0 else nl
            continue
        if c in "[{":
            depth += 1
            if depth > max_depth:
                raise UsageError(f"{what} is nested more than {max_depth} levels deep")
        elif c in "]}":
            depth = max(0, depth - 1)
        elif c == ".":
            line_dots += 1
            if line_dots > max_depth:
                raise UsageError(f"{what} has a dotted key more than {max_depth} levels deep")
        else:
            line_dots = 0
        i += 1


_TOML_TOKEN = re.compile(r"[\[\]{}.#\"'\n=,]")
_BASIC_END = re.compile(r'(?:[^"\\\n]|\\.)*["\n]')
_LITERAL_END = re.compile(r"[^'\n]*['\n]")


def check_depth(doc: object, *, max_depth: int, what: str) -> None:
    """Refuse a parsed document (dicts and lists) nested deeper than ``max_depth``; iterative."""
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        obj, d = stack.pop()
        if d > max_depth:
            raise UsageError(f"{what} is nested more than {max_depth} levels deep")
        if isinstance(obj, dict):
            stack.extend((v, d + 1) for v in obj.values())
        elif isinstance(obj, list):
            stack.extend((v, d + 1) for v in obj)
