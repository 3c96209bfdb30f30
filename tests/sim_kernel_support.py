"""Helpers shared by the simulator kernel tests (tests/test_sim_kernel*.py): addresses, sysfs paths, the host
layer over the simulated kernel, NVML sessions on the fake library."""

from __future__ import annotations

import contextlib
import os
import uuid as uuidlib
from pathlib import Path
from typing import Any, Iterator

import pynvml
import pytest

from gpuvirt.host.machine import Host
from gpuvirt.model.catalog import load_catalog
from gpuvirt.sim.kernel import SimKernel
from gpuvirt.sim.state import SimHost

CATALOG = load_catalog()
PF = "0000:41:00.0"          # the first PCI GPU of a simulated host (bus 0x41)
U = "0e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b"



# --- helpers ---------------------------------------------------------------------------------------------------
def vf(i: int, bus: int = 0x41, offset: int = 4) -> str:
    """PCI address of VF ``i`` of the PF on ``bus`` (NVIDIA VFs start at function .4)."""
    devfn = offset + i
    return f"0000:{bus:02x}:{devfn // 8:02x}.{devfn % 8}"


def new_uuid(n: int | None = None) -> str:
    return str(uuidlib.uuid4()) if n is None else f"00000000-0000-4000-8000-{n:012x}"


def type_dir(sim: SimHost, parent: str, type_id: str) -> Path:
    return sim.root / "sys/class/mdev_bus" / parent / "mdev_supported_types" / type_id


def avail(sim: SimHost, parent: str, type_id: str) -> int:
    return int((type_dir(sim, parent, type_id) / "available_instances").read_text())


def avail_map(sim: SimHost, parent: str) -> dict[str, int]:
    base = sim.root / "sys/class/mdev_bus" / parent / "mdev_supported_types"
    return {t: int((base / t / "available_instances").read_text()) for t in sorted(os.listdir(base))}


def create(sim: SimHost, parent: str, type_id: str, uid: str | None = None) -> str:
    uid = uid or new_uuid()
    SimKernel(sim).write(type_dir(sim, parent, type_id) / "create", uid + "\n")
    return uid


def errno_of(fn: Any, *args: Any) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def host(sim: SimHost) -> Host:
    return Host(sim.root, kernel=SimKernel(sim), use_udev=False)


def mdev_uuids(sim: SimHost) -> set[str]:
    d = sim.root / "sys/bus/mdev/devices"
    return set(os.listdir(d)) if d.is_dir() else set()


def nvidia_types(model_id: str, *, mig_backed: bool | None = None) -> list[str]:
    model = CATALOG.get(model_id)
    return [t.sysfs_id for t in model.vgpu.types if mig_backed is None or t.mig_backed == mig_backed]


def type_id_by_name(model_id: str, name: str) -> int:
    return next(t.id for t in CATALOG.get(model_id).vgpu.types if t.name == name)


def creatable_ids(sim: SimHost, address: str) -> list[int]:
    text = (sim.root / "sys/bus/pci/devices" / address / "nvidia/creatable_vgpu_types").read_text()
    lines = text.splitlines()
    assert lines[0] == "ID    : vGPU Name"
    return [int(line.split(":")[0]) for line in lines[1:]]


@pytest.fixture(autouse=True)
def _reset_pynvml() -> Iterator[None]:
    yield
    pynvml.nvmlLib = None
    pynvml._nvmlGetFunctionPointer_cache.clear()


@contextlib.contextmanager
def nvml(sim: SimHost):
    from gpuvirt.host.nvml import NvmlSession
    from gpuvirt.sim.nvml import FakeNvmlLib

    with NvmlSession(FakeNvmlLib(sim)) as session:
        assert session.available, session.unavailable_reason
        yield session
