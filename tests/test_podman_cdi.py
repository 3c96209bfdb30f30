"""A real container runtime resolves a gpuvirt CDI device name: Debian 12's podman 4.3 (which reads CDI specs from
``/etc/cdi`` and ``/var/run/cdi`` only - it has no ``--cdi-spec-dir``) runs in a private mount namespace where the
simulated host's spec folder is bound over ``/run/cdi``, so nothing of this machine's own CDI setup is touched.

The simulated device nodes are plain files; for the run they are replaced by real character devices with the
numbers the simulator gives them (``c MAJOR:MINOR``), and the container lists what it got.  Skips cleanly where
podman, runc/crun, ``unshare``, root, or a first plain container run is not available.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

IMAGE = "localhost/gpuvirt-cdi-test:1"
PODMAN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]   # sandboxes forbid raising them


def _run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _image() -> None:
    """A tiny image built from this machine's /bin/sh and ls (no network)."""
    if _run(["podman", "image", "exists", IMAGE]).returncode == 0:
        return
    import tempfile

    files = {"/bin/sh": shutil.which("dash") or "/bin/sh", "/bin/ls": shutil.which("ls"),
             "/bin/cat": shutil.which("cat")}
    libs: set[str] = set()
    for src in files.values():
        out = _run(["ldd", str(src)]).stdout
        for line in out.splitlines():
            parts = line.split()
            for p in parts:
                if p.startswith("/") and os.path.exists(p):
                    libs.add(p)
    with tempfile.TemporaryDirectory() as d:
        tar = Path(d) / "img.tar"
        with tarfile.open(tar, "w") as t:
            for dst, src in files.items():
                t.add(os.path.realpath(str(src)), arcname=dst.lstrip("/"))
            for lib in libs:
                t.add(os.path.realpath(lib), arcname=lib.lstrip("/"))
            for empty in ("dev", "proc", "sys", "tmp"):
                info = tarfile.TarInfo(empty)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                t.addfile(info)
        r = _run(["podman", "import", str(tar), IMAGE])
        if r.returncode != 0:
            pytest.skip(f"podman import failed: {r.stderr.strip()[-300:]}")


def _podman_in_namespace(cdi_dir: Path, runtime: list[str], device: str | None, command: str
                         ) -> subprocess.CompletedProcess:
    dev = f"--device {device}" if device else ""
    script = (f"mkdir -p /run/cdi && mount --bind {cdi_dir} /run/cdi && "
              f"podman {' '.join(runtime)} run --rm --network none {' '.join(PODMAN_LIMITS)} {dev} {IMAGE} "
              f"/bin/sh -c '{command}'")
    return _run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])


@pytest.fixture(scope="module")
def podman():
    if os.geteuid() != 0:
        pytest.skip("needs root (mount namespace, device nodes)")
    for tool in ("podman", "unshare", "ldd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install podman runc)")
    runtimes = [["--runtime", "runc"]] if shutil.which("runc") else []
    runtimes.append([])
    made_run_cdi = not os.path.exists("/run/cdi")
    _image()
    empty = Path("/tmp") / f"gpuvirt-cdi-empty-{os.getpid()}"
    empty.mkdir(exist_ok=True)
    why = ""
    try:
        for rt in runtimes:
            r = _podman_in_namespace(empty, rt, None, "echo ok")
            if r.returncode == 0 and r.stdout.strip() == "ok":
                yield rt
                break
            why = r.stderr.strip()[-300:]
        else:
            pytest.skip(f"podman cannot run a container here: {why}")
    finally:
        shutil.rmtree(empty, ignore_errors=True)
        if made_run_cdi:
            try:
                os.rmdir("/run/cdi")
            except OSError:
                pass


def _real_nodes(spec_text: str) -> None:
    """Replace the simulated node files a spec names by character devices with the simulator's numbers."""
    doc = json.loads(spec_text.split("\n", 2)[2])
    nodes = list(doc.get("containerEdits", {}).get("deviceNodes", []))
    for d in doc["devices"]:
        nodes += d["containerEdits"].get("deviceNodes", [])
    for n in nodes:
        host = Path(n.get("hostPath") or n["path"])
        if not host.is_file():
            continue
        major, minor = host.read_text().split()[1].split(":")
        host.unlink()
        os.mknod(host, 0o666 | 0o020000, os.makedev(int(major), int(minor)))


def test_podman_resolves_a_gpuvirt_device_name(podman, make_sim, cli):
    sim = make_sim(["a100-40gb"], mig_enabled=True)
    root = sim.root
    # the chmod hook of NVIDIA's toolkit is not installed here: a hook that exists stands in for it
    cfg = root / "etc/gpuvirt/gpuvirt.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f'[cdi]\nhook_path = "{shutil.which("true")}"\n')
    r = cli("--sim", root, "attach", "c1", "--mig", "1g.5gb", "--format", "cdi")
    assert r.exit_code == 0, r
    name = r.stdout.strip()
    (spec,) = (root / "var/run/cdi").iterdir()
    text = spec.read_text()
    _real_nodes(text)
    doc = json.loads(text.split("\n", 2)[2])
    caps = [n["path"] for n in doc["devices"][0]["containerEdits"]["deviceNodes"] if "nvidia-caps" in n["path"]]
    r = _podman_in_namespace(root / "var/run/cdi", podman, name,
                             "ls -l /dev/nvidia0 /dev/nvidiactl " + " ".join(caps) + "; ls -ld /dev/nvidia-caps")
    assert r.returncode == 0, r.stderr
    got = {line.split()[-1]: tuple(int(x) for x in re.findall(r"(\d+),\s*(\d+)", line)[0])
           for line in r.stdout.splitlines() if line.startswith("c")}
    assert got == {"/dev/nvidia0": (195, 0), "/dev/nvidiactl": (195, 255),
                   **{p: (508, int(p.rsplit("cap", 1)[1])) for p in caps}}, r.stdout
    # a name no spec defines is refused by the runtime itself
    r = _podman_in_namespace(root / "var/run/cdi", podman, name.replace("MIG-", "MIG-0"), "true")
    assert r.returncode != 0 and "unresolvable CDI devices" in r.stderr, r.stderr
