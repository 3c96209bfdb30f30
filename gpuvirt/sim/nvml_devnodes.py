"""Device-node entry points of the fake libnvidia-ml: the GPU's minor number (``/dev/nvidia<minor>``), which
nvidia-container-toolkit also uses as the ``gpu<N>`` key of ``/proc/driver/nvidia-caps/mig-minors``."""

from __future__ import annotations

from typing import Any

from gpuvirt.sim import devnodes
from gpuvirt.sim.nvml_base import NvmlBase, _entry, _set


class DevnodeApi(NvmlBase):
    @_entry()
    def nvmlDeviceGetMinorNumber(self, handle: Any, ref: Any) -> None:
        # a MIG device handle answers with its parent's minor (the node a MIG device is reached through)
        dev, _, _, _ = self._any_device(self.sim.peek(), handle)
        _set(ref, devnodes.gpu_minor(dev))
