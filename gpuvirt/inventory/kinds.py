"""The inventory's vocabulary - instance kinds, lifecycle and health states, consumers, GPU modes - without the
ORM.

These are the values stored in the rows of :mod:`gpuvirt.inventory.models`, which re-exports them.  They live
apart so that code on the VM-start path (the libvirt hook's fast path, the intent step kinds it reuses) can
name them without importing SQLAlchemy, which costs more than the whole hook may (docs/hook-guide.md).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

# instance kinds
MIG = "mig"                 # a MIG GPU instance (+ its default compute instance)
MDEV = "mdev"               # a mediated device (NVIDIA classic vGPU, GVT-g, samples)
VFIO_VGPU = "vfio-vgpu"     # NVIDIA vendor-specific VFIO: a vGPU type set on a VF
VF = "vf"                   # a whole SR-IOV VF handed to a VM (AMD MxGPU etc.)
GPU = "gpu"                 # a whole GPU handed to a container (revision 0005)
KINDS = (MIG, MDEV, VFIO_VGPU, VF, GPU)

# consumers of an allocation, and the per-GPU modes (revision 0005)
CONSUMER_VM, CONSUMER_CONTAINER = "vm", "container"
CONSUMERS = (CONSUMER_VM, CONSUMER_CONTAINER)
MODE_VM, MODE_CONTAINERS = "vm", "containers"
MODES = (MODE_VM, MODE_CONTAINERS)

# health states (revision 0004)
HEALTHY, UNHEALTHY = "healthy", "unhealthy"

# lifecycle states
CREATING, ACTIVE, DESTROYING, FAILED = "creating", "active", "destroying", "failed"
STATES = (CREATING, ACTIVE, DESTROYING, FAILED)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def instance_label(kind: str, *, profile_name: Any = None, placement_start: Any = None, placement_size: Any = None,
                   type_name: Any = None, type_id: Any = None, mdev_uuid: Any = None, parent: Any = None) -> str:
    """How messages name an instance (``models.Instance.label`` and the hook's fast path share it)."""
    if kind == MIG:
        return f"{profile_name}@{placement_start}:{placement_size}"
    if kind == MDEV:
        return f"{type_name or type_id} {mdev_uuid}"
    if kind == VFIO_VGPU:
        return f"{type_name or type_id} on VF {parent}"
    if kind == GPU:
        return f"whole GPU {parent}"
    return f"VF {parent}"
