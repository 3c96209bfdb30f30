"""``virsh`` for tests that run the real CLI as a subprocess: :class:`rebalance_support.FakeVirsh` with its
domains kept in a JSON file between calls (``FAKE_VIRSH_STATE``), serialised by a lock on that file.

``FAKE_VIRSH_KILL=before:VERB`` / ``after:VERB`` SIGKILLs the process that ran virsh (the gpuvirt coordinator)
right before / after the first call of VERB - a kill in the middle of a move, at a known step."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rebalance_support import FakeVirsh  # noqa: E402

FIELDS = ("domains", "calls", "xml_files", "persistent_xml_files")


def load(path: Path) -> FakeVirsh:
    fake = FakeVirsh()
    doc = json.loads(path.read_text())
    for k in FIELDS:
        setattr(fake, k, doc.get(k, getattr(fake, k)))
    fake.sims = {u: Path(p) for u, p in doc.get("sims", {}).items()}
    fake.killed = doc.get("killed", False)
    return fake


def save(fake: FakeVirsh, path: Path) -> None:
    doc = {k: getattr(fake, k) for k in FIELDS}
    doc["sims"] = {u: str(p) for u, p in fake.sims.items()}
    doc["killed"] = getattr(fake, "killed", False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    from gpuvirt.errors import HostError

    path = Path(os.environ["FAKE_VIRSH_STATE"])
    kill = os.environ.get("FAKE_VIRSH_KILL", "")
    when, _, verb = kill.partition(":")
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fake = load(path)
        hit = bool(kill) and not fake.killed and len(argv) > 2 and argv[2] == verb
        if hit and when == "before":
            fake.killed = True
            save(fake, path)
            os.kill(os.getppid(), signal.SIGKILL)
            return 1
        try:
            out = fake(argv)
        except HostError as exc:
            save(fake, path)
            print(str(exc), file=sys.stderr)
            return 1
        if hit:
            fake.killed = True
        save(fake, path)
    sys.stdout.write(out)
    sys.stdout.flush()
    if hit:
        os.kill(os.getppid(), signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
