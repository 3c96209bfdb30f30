"""Shared test fixtures: simulated hosts, CLI runners and the optional reference pack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"
GPUVIRT = str(Path(sys.executable).with_name("gpuvirt"))


def reference(*parts: str) -> Path:
    """A file of the reference pack next to the checkout; skips the test when the pack is absent."""
    p = SHARED_REFERENCE.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data not available: {p} (the ../shared folder is not present)")
    return p


def _fast_tmp() -> str | None:
    # a simulated host is thousands of tiny sysfs files; on tmpfs they cost microseconds instead of the
    # ~0.5 ms per file creation seen on the ext4 disks here
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return str(shm)
    return None


@pytest.fixture
def make_sim(tmp_path):
    """make_sim(["a100-40gb:2"], name="h", **init_kwargs) -> SimHost in a fresh directory (tmpfs if any)."""
    import shutil
    import tempfile

    from gpuvirt.sim.control import init_sim

    made = []
    base = _fast_tmp()

    def _make(gpus, name="host", **kw):
        kw.setdefault("seed", "test")
        parent = Path(tempfile.mkdtemp(prefix="gpuvirt-test-", dir=base)) if base else tmp_path
        made.append(parent)
        return init_sim(parent / name, gpus, **kw)

    yield _make
    for p in made:
        if p != tmp_path:
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # never let a developer's environment leak into tests
    for var in ("GPUVIRT_ROOT", "GPUVIRT_SIM", "GPUVIRT_DB", "GPUVIRT_HOST_ID", "GPUVIRT_CONFIG", "GPUVIRT_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPUVIRT_DB_BUSY_TIMEOUT_MS", os.environ.get("GPUVIRT_DB_BUSY_TIMEOUT_MS", "30000"))


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.exit_code, self.stdout, self.stderr = code, stdout, stderr

    def json(self):
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"CliResult(exit={self.exit_code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-2000:]!r})"


@pytest.fixture
def cli():
    """In-process CLI run through typer's CliRunner (the same error boundary as the console script)."""
    from typer.testing import CliRunner

    from gpuvirt.cli.app import app

    def _run(*args: str, input: str | None = None) -> CliResult:
        runner = CliRunner()
        res = runner.invoke(app, [str(a) for a in args], input=input)
        return CliResult(res.exit_code, res.stdout, res.stderr)

    return _run


@pytest.fixture
def gpuvirt_proc():
    """Run the installed console script as a real process."""

    def _run(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 120) -> CliResult:
        e = dict(os.environ) if env is None else env
        p = subprocess.run([GPUVIRT, *map(str, args)], input=input, capture_output=True, text=True, env=e,
                           timeout=timeout)
        return CliResult(p.returncode, p.stdout, p.stderr)

    return _run


@pytest.fixture
def pg_schema():
    """(url, admin engine, schema) on the PostgreSQL of GPUVIRT_TEST_PG_URL: a fresh schema that the URL makes the
    default for every connection, dropped afterwards.  Skips when the variable is not set or the server is not
    usable, so every PostgreSQL test states its need the same way."""
    import uuid

    pg = os.environ.get("GPUVIRT_TEST_PG_URL")
    if not pg:
        pytest.skip("GPUVIRT_TEST_PG_URL is not set: no PostgreSQL server to test against "
                    "(CI sets it to postgresql+psycopg://postgres@127.0.0.1:5432/test)")
    from sqlalchemy import create_engine, text

    schema = f"gpuvirt_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - the variable is set but the server is not usable
        admin.dispose()
        pytest.skip(f"PostgreSQL at GPUVIRT_TEST_PG_URL is not reachable: {str(exc).splitlines()[0]}")
    url = f"{pg}{'&' if '?' in pg else '?'}options=-csearch_path%3D{schema}"
    try:
        yield url, admin, schema
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def boards(cli, make_sim):
    """The rebalance tests' host: two A10 boards (24 GiB each), one A10-12Q VM on each - an A10-24Q fits only
    after a (cold) move."""
    sim = make_sim(["a10:2"])
    for vm, gpu in (("vm-a", "0"), ("vm-b", "1")):
        r = cli("--sim", sim.root, "attach", vm, "--vgpu", "A10-12Q", "--gpu", gpu, "--format", "json")
        assert r.exit_code == 0, r
    return sim.root


@pytest.fixture(scope="module")
def two_host_template():
    """Two simulated hosts sharing one SQLite inventory, one 12Q VM on each host's A10 board (the rebalance
    tests' cross-host moves, the journal's owners on another machine)."""
    from typer.testing import CliRunner

    from gpuvirt.cli.app import app
    from gpuvirt.sim.control import init_sim

    root = Path(tempfile.mkdtemp(prefix="rebalance-2h-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    url = f"sqlite:///{root / 'shared.db'}"
    for h, vm in (("ha", "vm-a"), ("hb", "vm-b")):
        init_sim(root / h, ["a10"], seed="crash")
        if h == "ha":
            r = CliRunner().invoke(app, ["--sim", str(root / h), "--db", url, "--host-id", h, "db", "init"])
            assert r.exit_code == 0, r.stderr
        r = CliRunner().invoke(app, ["--sim", str(root / h), "--db", url, "--host-id", h, "attach", vm, "--vgpu",
                                     "A10-12Q"])
        assert r.exit_code == 0, r.stderr
    yield root
    shutil.rmtree(root, ignore_errors=True)
