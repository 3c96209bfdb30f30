"""Settings and the composition root.

This is the one place that decides whether gpuvirt talks to a real machine or to a simulated one: with a
simulator directory the root becomes that directory, sysfs writes go to ``SimKernel`` and pynvml gets
``FakeNvmlLib``.  Everything else receives a ready ``Host`` and never asks which kind it has.

Settings come, in order of precedence, from command-line options, environment variables
(``GPUVIRT_ROOT``, ``GPUVIRT_SIM``, ``GPUVIRT_DB``, ``GPUVIRT_HOST_ID``, ``GPUVIRT_CONFIG``) and the config file
``<root>/etc/gpuvirt/gpuvirt.toml`` - the file matters because libvirt runs hooks with an empty environment.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from gpuvirt.errors import ConfigError, ConfigNotFoundError, UsageError

CONFIG_REL = "etc/gpuvirt/gpuvirt.toml"
DB_REL = "var/lib/gpuvirt/inventory.db"
STATE_REL = "var/lib/gpuvirt"
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_CONFIG_DEPTH = 16

DEFAULT_POLICIES: dict[str, Any] = {
    "mig_placement": "frag-aware",      # first-fit | best-fit | spread | pack | frag-aware
    "vgpu_placement": "consolidate",    # consolidate | spread
    "stale_after_seconds": 900,         # hosts silent for longer are shown stale in cluster reports
    "reset_gpu": False,                 # apply may reset a GPU to activate a pending MIG mode
    # how long, at most, one command waits for SR-IOV VFs to appear and for nvidia-vgpud to register their
    # vGPU types after it enabled them (or while they are still registering after boot)
    "registration_wait_seconds": 60,
    # GPU health (service.health; defaults and their sources in docs/operator-guide.md "Health")
    "health_nonfatal_xids": [13, 31, 43, 45, 68, 109],   # recorded, the device stays healthy
    "health_reset_xids": [48, 74, 79, 95, 119, 120],     # the whole GPU, healthy again only after a reset
    "health_quiet_seconds": 3600,       # other XIDs: healthy again after this long without one (0: never)
    "health_history_days": 30,          # health events older than this are pruned
    "health_history_max": 10000,        # and at most this many are kept per host
    # attach --allow-moves: the most VM device moves one attach may make to find room (0 to 8)
    "rebalance_max_moves": 2,
    # among move plans with as many (cold) moves: "data" takes the least data moved (guest RAM + framebuffer:
    # the shortest migrations), "fragmentation" the one leaving the free space easiest to fill
    # (docs/placement.md, "Rebalancing")
    "rebalance_prefer": "data",
    # an intent whose owner runs on another machine (a shared inventory) and has not renewed it for this long
    # is taken for abandoned (service.intent.owner_state; docs/operator-guide.md "After a crash")
    "intent_lease_seconds": 300,
    # rebalance --cluster --execute / reconcile: how another host of the shared inventory is reached for the
    # steps of a move there (argv; {host} is the host id; "peer-session" is appended: gpuvirt.service.peers)
    "peer_command": ["ssh", "-o", "BatchMode=yes", "{host}", "gpuvirt"],
}
# the events table (audit log) is pruned per host: rows older than max_age_days, and all but the newest
# max_rows; 0 switches a limit off (docs/operator-guide.md "Event pruning")
DEFAULT_EVENTS: dict[str, Any] = {"max_age_days": 90, "max_rows": 100_000}
MAX_WAIT_SECONDS = 3600
CONFIG_KEYS = {"db_url", "sim_dir", "host_id", "root", "policies", "events", "cdi"}
MAX_XID_LIST = 1000
MAX_PEER_COMMAND_ARGS = 64
# [cdi]: CDI specs for containers (docs/containers.md); paths are absolute, defaults under the root
CDI_KEYS = {"spec_dir": str, "vendor": str, "nvidia_spec": (str, list), "hook_path": str, "chmod_hook": bool}


class Settings:
    # a plain class, not a dataclass: every command builds one, and the dataclasses module's import (inspect,
    # ast, dis) is a sizeable part of a fast ``discover --json`` (docs/benchmarks.md)
    _FIELDS = ("root", "sim_dir", "db_url", "host_id", "config_path", "config_found", "debug", "policies", "events",
               "cdi")

    def __init__(self, root: Path, sim_dir: Path | None, db_url: str | None, host_id: str, config_path: Path,
                 config_found: bool, debug: bool = False, policies: dict[str, Any] | None = None,
                 events: dict[str, Any] | None = None, cdi: dict[str, Any] | None = None) -> None:
        self.root = root
        self.sim_dir = sim_dir
        self.db_url = db_url
        self.host_id = host_id
        self.config_path = config_path
        self.config_found = config_found
        self.debug = debug
        self.policies: dict[str, Any] = dict(DEFAULT_POLICIES) if policies is None else policies
        self.events: dict[str, Any] = dict(DEFAULT_EVENTS) if events is None else events
        self.cdi: dict[str, Any] = dict(cdi or {})

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self._FIELDS) + ")"

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_REL

    @property
    def default_db_path(self) -> Path:
        return self.root / DB_REL

    def effective_db_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{self.default_db_path}"

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "sim_dir": str(self.sim_dir) if self.sim_dir else None,
                "db_url": redact_url(self.effective_db_url()), "host_id": self.host_id,
                "config_path": str(self.config_path), "config_found": self.config_found,
                "policies": self.policies, "events": self.events}


def redact_url(url: str) -> str:
    # never print database passwords
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def read_config(path: Path, *, required: bool = False) -> dict[str, Any]:
    """The config document; ``required`` when the operator named the file (a missing default is normal).

    Bounded: a regular file of at most ``MAX_CONFIG_BYTES``, nested at most ``MAX_CONFIG_DEPTH`` levels;
    ``/dev/zero`` or a FIFO is refused before anything is read."""
    from gpuvirt.safefs import check_toml_nesting, read_bounded

    try:
        data = read_bounded(path, MAX_CONFIG_BYTES, what="config file")
    except FileNotFoundError as exc:
        if required:
            raise ConfigNotFoundError(f"config file {path} does not exist", path=str(path)) from exc
        return {}
    except UsageError as exc:
        raise ConfigError(str(exc), path=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    import tomllib  # most commands on most hosts have no config file

    try:
        text = data.decode("utf-8")
        check_toml_nesting(text, max_depth=MAX_CONFIG_DEPTH, what=f"config file {path}")
        doc = tomllib.loads(text)
    except UsageError as exc:
        raise ConfigError(str(exc), path=str(path)) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"config file {path} is nested too deeply", path=str(path)) from exc
    unknown = set(doc) - CONFIG_KEYS
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    pol = doc.get("policies", {})
    if not isinstance(pol, dict):
        raise ConfigError(f"config file {path}: [policies] must be a table")
    bad = set(pol) - set(DEFAULT_POLICIES)
    if bad:
        raise ConfigError(f"config file {path}: unknown policy key(s) {', '.join(sorted(bad))}")
    for key, value in pol.items():
        _check_policy(path, key, value)
    ev = doc.get("events", {})
    if not isinstance(ev, dict):
        raise ConfigError(f"config file {path}: [events] must be a table")
    bad = set(ev) - set(DEFAULT_EVENTS)
    if bad:
        raise ConfigError(f"config file {path}: unknown [events] key(s) {', '.join(sorted(bad))} "
                          f"(known: {', '.join(sorted(DEFAULT_EVENTS))})")
    for key, value in ev.items():
        top = 36500 if key == "max_age_days" else 100_000_000
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            raise ConfigError(f"config file {path}: events.{key} = {value!r} is not valid; expected a whole number "
                              f"from 0 (no limit) to {top}", path=str(path))
    _check_cdi(path, doc.get("cdi", {}))
    return doc


def _check_cdi(path: Path, cdi: Any) -> None:
    if not isinstance(cdi, dict):
        raise ConfigError(f"config file {path}: [cdi] must be a table")
    for key, value in cdi.items():
        want = CDI_KEYS.get(key)
        if want is None:
            raise ConfigError(f"config file {path}: unknown cdi key {key} (known: {', '.join(sorted(CDI_KEYS))})")
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if key == "nvidia_spec" and isinstance(value, list):
            ok = len(value) <= 16 and all(isinstance(v, str) for v in value)
        if ok and key in ("spec_dir", "hook_path", "nvidia_spec"):
            ok = all(str(v).startswith("/") for v in (value if isinstance(value, list) else [value]))
        if ok and key == "vendor":
            from gpuvirt.vmm.cdi import vendor_problem

            ok = vendor_problem(value) is None
        if not ok:
            raise ConfigError(f"config file {path}: cdi.{key} = {value!r} is not valid (expected "
                              f"{'true or false' if want is bool else 'an absolute path' if key != 'vendor' else 'a DNS-like vendor name'})",
                              path=str(path))


def _check_policy(path: Path, key: str, value: Any) -> None:
    # checked when the file is read, so every command refuses the same bad value instead of only those
    # that happen to place something (a report --fit must not answer under a policy that does not exist)
    if key in ("mig_placement", "vgpu_placement"):
        from gpuvirt.model.planner import POLICIES, VGPU_POLICIES  # only when the file names a policy

        choices = POLICIES if key == "mig_placement" else VGPU_POLICIES
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"config file {path}: policies.{key} = {value!r} is not a valid policy; "
                              f"choose one of {', '.join(choices)}", path=str(path))
    elif key in ("stale_after_seconds", "registration_wait_seconds"):
        top = 10 * 365 * 86400 if key == "stale_after_seconds" else MAX_WAIT_SECONDS
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
            raise ConfigError(f"config file {path}: policies.{key} = {value!r} is not valid; expected a "
                              f"non-negative number of seconds, at most {top}", path=str(path))
    elif key in ("health_nonfatal_xids", "health_reset_xids"):
        if not isinstance(value, list) or len(value) > MAX_XID_LIST or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 0xFFFFFFFF for x in value):
            raise ConfigError(f"config file {path}: policies.{key} must be a list of at most {MAX_XID_LIST} XID "
                              f"codes (integers from 1 to 4294967295), got {value!r}"[:400], path=str(path))
    elif key in ("health_quiet_seconds", "health_history_days"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10 * 365 * 86400:
            raise ConfigError(f"config file {path}: policies.{key} = {value!r} is not valid; expected a "
                              "non-negative number" + (" of seconds" if key.endswith("seconds") else " of days"),
                              path=str(path))
    elif key == "health_history_max":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000_000:
            raise ConfigError(f"config file {path}: policies.{key} = {value!r} is not valid; expected an integer "
                              "from 1 to 10000000", path=str(path))
    elif key == "intent_lease_seconds":
        # the owner renews the lease every HEARTBEAT_SECONDS (30): a lease of fewer than 4 beats would expire
        # over one slow database write
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 120 <= value <= 7 * 86400:
            raise ConfigError(f"config file {path}: policies.{key} = {value!r} is not valid; expected a number of "
                              "seconds from 120 to 604800", path=str(path))
    elif key == "rebalance_max_moves":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 8:
            raise ConfigError(f"config file {path}: policies.{key} = {value!r} is not valid; expected an integer "
                              "from 0 to 8", path=str(path))
    elif key == "rebalance_prefer":
        if value not in ("data", "fragmentation"):
            raise ConfigError(f"config file {path}: policies.{key} = {value!r}"[:300] + " is not valid; expected "
                              "\"data\" or \"fragmentation\"", path=str(path))
    elif key == "peer_command":
        why = check_peer_command(value)
        if why is not None:
            raise ConfigError(f"config file {path}: policies.{key} = {value!r}"[:300] + f" is not valid; {why}",
                              path=str(path))
    elif key == "reset_gpu":
        if not isinstance(value, bool):
            raise ConfigError(f"config file {path}: policies.{key} = {value!r} is not valid; expected true or "
                              "false", path=str(path))


def check_peer_command(value: Any) -> str | None:
    """Why ``value`` is no valid ``policies.peer_command`` (None: it is): a non-empty list of strings, the
    first a program, ``{host}`` where the host id goes."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PEER_COMMAND_ARGS \
            or not all(isinstance(a, str) and 0 < len(a) <= 4096 and "\0" not in a for a in value):
        return f"expected a list of 1 to {MAX_PEER_COMMAND_ARGS} non-empty strings (argv, {{host}} for the host id)"
    if value[0].startswith("-") or "{host}" in value[0]:
        return "its first item must name the program to run"
    return None


def resolve_settings(*, root: str | None = None, sim: str | None = None, db: str | None = None,
                     host_id: str | None = None, config: str | None = None, debug: bool = False,
                     env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    sim = sim or env.get("GPUVIRT_SIM") or None
    root_opt = root or env.get("GPUVIRT_ROOT") or None
    if sim and root_opt and Path(root_opt).absolute() != Path(sim).absolute():
        raise UsageError("--sim DIR already sets the root to DIR; do not combine it with a different --root")
    root_path = Path(sim or root_opt or "/").absolute()
    if root_opt and not sim and not root_path.is_dir():
        raise UsageError(f"--root {root_opt}: no such directory")
    named = config or env.get("GPUVIRT_CONFIG") or None
    config_path = Path(named or (root_path / CONFIG_REL))
    doc = read_config(config_path, required=named is not None)
    if not sim and doc.get("sim_dir") and not root_opt:
        sim = str(doc["sim_dir"])
        root_path = Path(sim).absolute()
    if not sim and not root_opt and doc.get("root"):
        root_path = Path(str(doc["root"])).absolute()
    policies = dict(DEFAULT_POLICIES)
    policies.update(doc.get("policies", {}))
    events = dict(DEFAULT_EVENTS)
    events.update(doc.get("events", {}))
    hid = host_id or env.get("GPUVIRT_HOST_ID") or doc.get("host_id") or os.uname().nodename
    if not isinstance(hid, str) or not hid.strip() or len(hid) > 253 or any(c.isspace() for c in hid):
        raise UsageError(f"invalid host id {hid!r}")
    return Settings(root=root_path, sim_dir=Path(sim).absolute() if sim else None,
                    db_url=db or env.get("GPUVIRT_DB") or doc.get("db_url") or None,
                    host_id=hid, config_path=config_path, config_found=config_path.is_file(), debug=debug,
                    policies=policies, events=events, cdi=doc.get("cdi"))


class Context:
    """What a command needs: settings, the host (real or simulated) and, lazily, the inventory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._closers: list[Any] = []

    @cached_property
    def sim(self):
        if self.settings.sim_dir is None:
            return None
        from gpuvirt.sim.control import open_sim

        return open_sim(self.settings.sim_dir)

    def check_sim(self) -> None:
        """Fail when ``--sim`` names no simulated host (exit 3) or a corrupt one; for commands that write
        under the root without touching the host first, so that nothing is created in a directory that is not
        one."""
        if self.settings.sim_dir is not None:
            self.sim  # noqa: B018

    @cached_property
    def host(self):
        from gpuvirt.host.machine import Host

        wait = float(self.settings.policies.get("registration_wait_seconds", 0))
        if self.settings.sim_dir is not None:
            from gpuvirt.sim.kernel import SimKernel
            from gpuvirt.sim.nvml import FakeNvmlLib

            sim = self.sim
            host = Host(self.settings.root, kernel=SimKernel(sim), nvml_lib=FakeNvmlLib(sim), use_udev=False,
                        registration_wait=wait)
        else:
            host = Host(self.settings.root, registration_wait=wait)
        self._closers.append(host.close)
        return host

    @cached_property
    def inventory(self):
        from gpuvirt.inventory.store import Inventory

        if not self.settings.db_url:
            self.check_sim()  # a missing simulated host must fail before a database is created inside it

        inv = Inventory.open(self.settings)
        self._closers.append(inv.close)
        return inv

    def close(self) -> None:
        while self._closers:
            fn = self._closers.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001 - closing must not mask the command's own outcome
                pass

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
