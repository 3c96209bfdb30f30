"""The cluster as the move planner sees it (pure): hosts, GPUs and the devices on them, and the rules a
GPU's contents must keep at every step of a plan.

:class:`Cluster` is plain data a caller builds from the inventory (or a benchmark from its own state);
:class:`ClusterIndex` is its index form with memoised answers from :mod:`gpuvirt.model.mig` and
:mod:`gpuvirt.model.vgpu` (the rules the simulator enforces) and from :mod:`gpuvirt.model.preflight`.  The
search itself is in :mod:`gpuvirt.model.moves`.

Contents of a GPU are sorted tuples of ``(start, unit index)``; ``start`` is -1 on a time-sliced board.  A
unit may appear twice on one GPU while it moves there (make-before-break), and :meth:`content_problems`
judges such mid-move contents like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gpuvirt.errors import UsageError
from gpuvirt.model import mig
from gpuvirt.model import vgpu as vgpu_rules
from gpuvirt.model.catalog import GpuInstanceProfile, GpuModel, VgpuType
from gpuvirt.model.mig import Placed
from gpuvirt.model.planner import _tables
from gpuvirt.model.preflight import (
    COLD,
    LIVE,
    NONE,
    Compatibility,
    GuestFacts,
    HostStack,
    check_move,
    pgpu_metadata,
    vgpu_metadata,
)

RECREATE = "recreate"
# bounds on inputs (an inventory of 1,000 hosts x 8 GPUs is the largest exercised; beyond these the caller
# must split the problem, e.g. by host group)
MAX_GPUS = 16_384
MAX_UNITS = 262_144
INF = math.inf


# --- inputs ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Host:
    key: str
    stack: HostStack = HostStack()


@dataclass(frozen=True)
class Gpu:
    """A physical GPU.  ``mig_enabled`` GPUs hold GPU instances; the others hold time-sliced vGPUs."""

    key: str
    host: str
    model: GpuModel
    mig_enabled: bool = False
    enabled_vfs: int | None = None      # SR-IOV vGPU boards: VFs enabled now (None: the catalog's total)
    device_id: int | None = None        # PCI device id of this board variant (None: the catalog's)
    migration_cap: bool = True          # pgpuVirtualizationCaps migration bit


@dataclass(frozen=True)
class Unit:
    """One device that may move: a GPU instance (``placed``, MIG mode; ``vgpu_type`` set when a MIG-backed vGPU
    sits on it) or a time-sliced vGPU (``vgpu_type`` only).  ``vm`` None: nothing uses it (kind recreate).
    ``fb_mib`` None: the vGPU type's framebuffer, or the GPU instance's memory."""

    key: str
    gpu: str
    placed: Placed | None = None
    vgpu_type: int | None = None
    vm: str | None = None
    tenant: str | None = None
    ram_mib: int = 0
    fb_mib: int | None = None
    movable: bool = True                # False: never moves (not created by gpuvirt, or the operator says so)
    guest: GuestFacts = GuestFacts()
    migration_cap: bool = True          # vgpuVirtualizationCaps migration bit


@dataclass(frozen=True)
class Cluster:
    hosts: tuple[Host, ...]
    gpus: tuple[Gpu, ...]
    units: tuple[Unit, ...]


@dataclass(frozen=True)
class Request:
    """What must fit: a GPU instance of ``profile_id`` (with a MIG-backed vGPU on it when ``vgpu_type`` is a
    MIG-backed type), or a time-sliced vGPU of ``vgpu_type``.  Profile and type ids are per model: ``model``
    (a catalog id) restricts the GPUs considered, and should be given when the cluster mixes models.
    ``hosts`` / ``gpus`` restrict where the request itself may go (moves may use any GPU)."""

    profile_id: int | None = None
    vgpu_type: int | None = None
    model: str | None = None
    hosts: frozenset[str] | None = None
    gpus: frozenset[str] | None = None


# --- the index -------------------------------------------------------------------------------------
class ClusterIndex:
    """The cluster in index form, with memoised rule answers.  Contents of a GPU are sorted tuples of
    (start, unit index); start is -1 on time-sliced boards."""

    def __init__(self, cluster: Cluster, policy: Any) -> None:
        # ``policy``: a moves.MovePolicy (pins, allowed kinds, migration rules)
        if len(cluster.gpus) > MAX_GPUS or len(cluster.units) > MAX_UNITS:
            raise UsageError(f"cluster too large to plan at once ({len(cluster.gpus)} GPUs, {len(cluster.units)} "
                             f"instances; limits {MAX_GPUS} and {MAX_UNITS})")
        self.cluster = cluster
        self.policy = policy
        hosts = {h.key: h for h in cluster.hosts}
        self.gidx: dict[str, int] = {}
        for i, g in enumerate(cluster.gpus):
            if g.key in self.gidx:
                raise UsageError(f"GPU {g.key!r} is listed twice")
            if g.host not in hosts:
                raise UsageError(f"GPU {g.key!r} is on unknown host {g.host!r}")
            self.gidx[g.key] = i
        self.hosts = hosts
        n = len(cluster.gpus)
        self.g_tables = []
        self.g_vf: list[int | None] = []
        self.g_types: list[dict[int, VgpuType]] = []
        self.g_host = [g.host for g in cluster.gpus]
        self.g_class: list[int] = []
        classes: dict[tuple, int] = {}
        for g in cluster.gpus:
            m = g.model
            self.g_tables.append(_tables(m.mig) if g.mig_enabled and m.mig is not None else None)
            self.g_types.append({t.id: t for t in m.vgpu.types} if m.vgpu is not None else {})
            vf = None
            if m.vgpu is not None and m.vgpu.parent == "vf":
                vf = g.enabled_vfs if g.enabled_vfs is not None else (m.sriov.total_vfs if m.sriov else 0)
            self.g_vf.append(vf)
            key = (m.id, g.device_id, hosts[g.host].stack, g.migration_cap)
            self.g_class.append(classes.setdefault(key, len(classes)))
        self._layout: dict[tuple, tuple[Placed, ...]] = {}
        self._lb: dict[tuple, float] = {}
        self._starts: dict[tuple, tuple[int, ...]] = {}
        self._avail: dict[tuple, int] = {}
        self._kind: dict[tuple, tuple[str, Compatibility | None] | None] = {}
        self._bad: dict[tuple, float] = {}
        self._sole: dict[tuple, tuple[int, ...]] = {}
        self._dests: dict[tuple, list] = {}
        self.u_gpu: list[int] = []
        self.u_start: list[int] = []
        self.u_prof: list[GpuInstanceProfile | None] = []
        self.u_type: list[int | None] = []
        self.u_movable: list[bool] = []
        self.u_data: list[int] = []
        self.u_demand: list[int] = []
        self.u_class: list[int] = []
        self.u_placed: list[Placed | None] = []
        self.demands: list[tuple] = []          # (tables or None, profile id or None, vgpu type or None)
        self.d_index: dict[tuple, int] = {}
        self.d_compat: list[list[int]] = []
        self.d_rep: dict[int, int] = {}         # a unit of each demand (destinations' badness is per demand)
        seen: set[str] = set()
        uclasses: dict[tuple, int] = {}
        contents: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for ui, u in enumerate(cluster.units):
            if u.key in seen:
                raise UsageError(f"instance {u.key!r} is listed twice")
            seen.add(u.key)
            gi = self.gidx.get(u.gpu)
            if gi is None:
                raise UsageError(f"instance {u.key!r} is on unknown GPU {u.gpu!r}")
            g = cluster.gpus[gi]
            t = self.g_tables[gi]
            prof = None
            if u.placed is not None:
                if t is None:
                    raise UsageError(f"instance {u.key!r} is a GPU instance on {g.key}, which is not in MIG mode")
                prof = t.by_id.get(u.placed.profile_id)
                if prof is None or prof.memory_slices != u.placed.size:
                    raise UsageError(f"instance {u.key!r}: no profile {u.placed.profile_id} of size "
                                     f"{u.placed.size} on {g.model.id}")
                start = u.placed.start
            else:
                if u.vgpu_type is None:
                    raise UsageError(f"instance {u.key!r} has neither a GPU instance nor a vGPU type")
                if t is not None:
                    raise UsageError(f"instance {u.key!r}: time-sliced vGPU on {g.key}, which is in MIG mode")
                start = -1
            vt = None
            if u.vgpu_type is not None:
                vt = self.g_types[gi].get(u.vgpu_type)
                if vt is None:
                    raise UsageError(f"instance {u.key!r}: vGPU type {u.vgpu_type} does not exist on {g.model.id}")
                if vt.mig_backed and (prof is None or vt.gpu_instance_profile_id != prof.id):
                    raise UsageError(f"instance {u.key!r}: MIG-backed type {vt.name} needs a GPU instance of "
                                     f"profile {vt.gpu_instance_profile_id}")
            fb = u.fb_mib
            if fb is None:
                fb = vt.framebuffer_mib if vt is not None else (prof.memory_mib if prof is not None else 0)
            pinned = (not u.movable or (u.vm is not None and u.vm in policy.pinned_vms)
                      or (u.tenant is not None and u.tenant in policy.pinned_tenants)
                      or (u.vm is None and not policy.move_unallocated))
            self.u_gpu.append(gi)
            self.u_start.append(start)
            self.u_prof.append(prof)
            self.u_type.append(u.vgpu_type)
            self.u_movable.append(not pinned)
            self.u_data.append(0 if u.vm is None else max(0, u.ram_mib) + max(0, fb))
            self.u_placed.append(u.placed)
            self.u_demand.append(self._demand(t if prof is not None else None,
                                              prof.id if prof is not None else None, u.vgpu_type))
            self.d_rep.setdefault(self.u_demand[-1], ui)
            ukey = (u.vgpu_type, u.guest, u.migration_cap, u.vm is None, g.model.id)
            self.u_class.append(uclasses.setdefault(ukey, len(uclasses)))
            contents[gi].append((start, ui))
        self.start = tuple(tuple(sorted(c)) for c in contents)
        for gi, c in enumerate(self.start):
            why = self.content_problems(gi, c)
            if why:
                raise UsageError(f"GPU {cluster.gpus[gi].key} breaks the rules already: {why[0]}")

    # -- demands: what needs room (the request, or a unit looking for a destination) --
    def _demand(self, tables, pid: int | None, type_id: int | None) -> int:
        key = (id(tables) if tables is not None else None, pid, type_id)
        got = self.d_index.get(key)
        if got is not None:
            return got
        idx = len(self.demands)
        self.d_index[key] = idx
        self.demands.append((tables, pid, type_id))
        compat = []
        for gi, g in enumerate(self.cluster.gpus):
            t = self.g_tables[gi]
            if pid is not None:
                if t is not tables or (type_id is not None and type_id not in self.g_types[gi]):
                    continue
            else:
                if t is not None or type_id not in self.g_types[gi] or self.g_types[gi][type_id].mig_backed:
                    continue
            compat.append(gi)
        self.d_compat.append(compat)
        return idx

    def layout(self, content: tuple) -> tuple[Placed, ...]:
        got = self._layout.get(content)
        if got is None:
            got = tuple(sorted(Placed(s, self.u_placed[u].size, self.u_placed[u].profile_id)  # type: ignore[union-attr]
                               for s, u in content))
            if len(self._layout) > 500_000:
                self._layout.clear()
            self._layout[content] = got
        return got

    def _vgpus(self, content: tuple) -> int:
        return sum(1 for _, u in content if self.u_type[u] is not None)

    def _board_available(self, gi: int, type_id: int, content: tuple) -> int:
        existing = tuple(sorted(self.u_type[u] for _, u in content))  # type: ignore[type-var]
        vf = self.g_vf[gi]
        key = (self.cluster.gpus[gi].model.id, type_id, existing, None if vf is None else vf - len(existing))
        got = self._avail.get(key)
        if got is None:
            model = self.cluster.gpus[gi].model
            got = vgpu_rules.available(model, self.g_types[gi][type_id], list(existing), mig_enabled=False,
                                       free_parents=None if vf is None else vf - len(existing))
            self._avail[key] = got
        return got

    def starts(self, d: int, gi: int, content: tuple) -> tuple[int, ...]:
        """Legal places for demand ``d`` on GPU ``gi`` next to ``content`` (-1 = "on the board")."""
        key = (d, gi, content)
        got = self._starts.get(key)
        if got is None:
            tables, pid, type_id = self.demands[d]
            if pid is not None:
                got = tables.starts(self.layout(content), pid)
                if got and type_id is not None:
                    vf = self.g_vf[gi]
                    if vf is not None and self._vgpus(content) >= vf:
                        got = ()
            else:
                got = (-1,) if self._board_available(gi, type_id, content) > 0 else ()
            if len(self._starts) > 500_000:
                self._starts.clear()
            self._starts[key] = got
        return got

    def content_problems(self, gi: int, content: tuple) -> list[str]:
        """Why the GPU's contents (possibly with a unit present twice, mid-move) break the rules."""
        g = self.cluster.gpus[gi]
        out: list[str] = []
        t = self.g_tables[gi]
        if t is not None:
            out += mig.layout_problems(g.model.mig, self.layout(content))  # type: ignore[arg-type]
            vf = self.g_vf[gi]
            n = self._vgpus(content)
            if vf is not None and n > vf:
                out.append(f"{n} vGPUs need {n} VFs, {vf} are enabled")
            return out
        # time-sliced board: the contents must be creatable one after another; ordering the types by their
        # per-board maximum, smallest first, is the order in which that is possible if any is
        types = sorted((self.g_types[gi][self.u_type[u]] for _, u in content),  # type: ignore[index]
                       key=lambda vt: (vt.max_instances, vt.id))
        existing: list[int] = []
        vf = self.g_vf[gi]
        for vt in types:
            free = None if vf is None else vf - len(existing)
            if vgpu_rules.available(g.model, vt, existing, mig_enabled=False, free_parents=free) <= 0:
                out.append(f"{vt.name} does not fit next to {len(existing)} other vGPU(s)")
                break
            existing.append(vt.id)
        return out

    def lb(self, d: int, gi: int, content: tuple) -> float:
        """Fewest units that must leave GPU ``gi`` before demand ``d`` fits there (a lower bound; inf when
        units that never move are in the way).  0 exactly when it fits now."""
        key = (d, gi, content)
        got = self._lb.get(key)
        if got is not None:
            return got
        if self.starts(d, gi, content):
            got = 0
        else:
            tables, pid, type_id = self.demands[d]
            got = self._lb_mig(gi, content, tables, pid, type_id) if pid is not None else \
                self._lb_board(gi, content, type_id)  # type: ignore[arg-type]
            got = max(got, 1)
        if len(self._lb) > 500_000:
            self._lb.clear()
        self._lb[key] = got
        return got

    def _lb_mig(self, gi: int, content: tuple, tables, pid: int, type_id: int | None) -> float:
        geom = self.cluster.gpus[gi].model.mig
        prof = tables.by_id[pid]
        mov = self.u_movable
        best = INF
        for s in prof.starts:
            mask = ((1 << prof.memory_slices) - 1) << s
            blockers = [(st, u) for st, u in content
                        if (((1 << self.u_placed[u].size) - 1) << st) & mask]  # type: ignore[union-attr]
            if any(not mov[u] for _, u in blockers):
                continue
            rest = [(st, u) for st, u in content if (st, u) not in blockers]
            used = sum(self.u_prof[u].compute_slices for _, u in rest)  # type: ignore[union-attr]
            deficit = used + prof.compute_slices - geom.compute_slices
            extra = 0
            if deficit > 0:
                for c in sorted((self.u_prof[u].compute_slices for _, u in rest if mov[u]), reverse=True):  # type: ignore[union-attr]
                    if deficit <= 0:
                        break
                    deficit -= c
                    extra += 1
                if deficit > 0:
                    continue
            same = [u for _, u in rest if self.u_placed[u].profile_id == pid]  # type: ignore[union-attr]
            excess = len(same) - (prof.max_instances - 1)
            if excess > 0 and sum(1 for u in same if mov[u]) < excess:
                continue
            need = len(blockers) + max(extra, excess, 0)
            vf = self.g_vf[gi]
            if type_id is not None and vf is not None:
                over = self._vgpus(content) - vf + 1
                if over > 0:
                    movable_vgpus = sum(1 for _, u in content if self.u_type[u] is not None and mov[u])
                    if movable_vgpus < over:
                        continue
                    need = max(need, over)
            best = min(best, need)
        return best

    def _lb_board(self, gi: int, content: tuple, type_id: int) -> float:
        g = self.cluster.gpus[gi]
        spec = g.model.vgpu
        want = self.g_types[gi][type_id]
        mov = self.u_movable
        units = [u for _, u in content]
        types = self.g_types[gi]
        if spec.policy in ("same-type", "same-size"):
            def clash(u: int) -> bool:
                t = types[self.u_type[u]]  # type: ignore[index]
                return t.id != want.id if spec.policy == "same-type" else t.framebuffer_mib != want.framebuffer_mib
            others = [u for u in units if clash(u)]
            if any(not mov[u] for u in others):
                return INF
            same = [u for u in units if not clash(u)]
            excess = len(same) - want.max_instances + 1
            if excess > 0 and sum(1 for u in same if mov[u]) < excess:
                return INF
            need = len(others) + max(0, excess)
        else:
            fb = [types[self.u_type[u]].framebuffer_mib for u in units]  # type: ignore[index]
            deficit = sum(fb) + want.framebuffer_mib - g.model.memory_mib
            need = 0
            if deficit > 0:
                for u in sorted((u for u in units if mov[u]), key=lambda u: -types[self.u_type[u]].framebuffer_mib):  # type: ignore[index]
                    if deficit <= 0:
                        break
                    deficit -= types[self.u_type[u]].framebuffer_mib  # type: ignore[index]
                    need += 1
                if deficit > 0:
                    return INF
            cap = want.mixed_size_max if want.mixed_size_max is not None else want.max_instances
            same = [u for u in units if self.u_type[u] == want.id]
            excess = len(same) - cap + 1
            if excess > 0:
                if sum(1 for u in same if mov[u]) < excess:
                    return INF
                need = max(need, excess)
        vf = self.g_vf[gi]
        if vf is not None and len(units) >= vf:
            if not any(mov[u] for u in units):
                return INF
            need = max(need, len(units) - vf + 1)
        return need

    def sole(self, d: int, gi: int, content: tuple) -> tuple[int, ...]:
        """Units whose removal alone lets demand ``d`` fit on GPU ``gi``."""
        key = (d, gi, content)
        got = self._sole.get(key)
        if got is None:
            got = tuple(u for st, u in content if self.u_movable[u]
                        and self.starts(d, gi, tuple(x for x in content if x[1] != u)))
            if len(self._sole) > 200_000:
                self._sole.clear()
            self._sole[key] = got
        return got

    def kind(self, u: int, a: int, b: int) -> tuple[str, Compatibility | None] | None:
        """The kind a move of unit ``u`` from GPU ``a`` to ``b`` gets under the policy, with its verdict."""
        key = (self.u_class[u], self.g_class[a], self.g_class[b])
        if key in self._kind:
            return self._kind[key]
        unit = self.cluster.units[u]
        ga, gb = self.cluster.gpus[a], self.cluster.gpus[b]
        vm = vgpu_metadata(ga.model, unit.vgpu_type, stack=self.hosts[ga.host].stack, guest=unit.guest,
                           device_id=ga.device_id, migration_cap=unit.migration_cap)
        pg = pgpu_metadata(gb.model, stack=self.hosts[gb.host].stack, device_id=gb.device_id,
                           migration_cap=gb.migration_cap)
        res: tuple[str, Compatibility | None] | None
        if unit.vm is None:
            compat = check_move(vm, pg, (LIVE, COLD), self.policy.rules).compatibility
            res = None if compat.verdict == NONE else (RECREATE, None)
        else:
            chk = check_move(vm, pg, self.policy.allow, self.policy.rules)
            res = (chk.kind, chk.compatibility) if chk.kind is not None else None
        self._kind[key] = res
        return res

    def badness(self, gi: int, content: tuple, start: int, u: int) -> float:
        """How much a unit landing here hurts later placements: the compute slices it strands (plus half a
        slice for opening an empty GPU), as in the planner's frag-aware policy; opening a board on vGPU."""
        key = (gi, content, start, u if self.u_placed[u] is None else self.u_placed[u].profile_id)  # type: ignore[union-attr]
        got = self._bad.get(key)
        if got is None:
            t = self.g_tables[gi]
            if t is None:
                got = 1.0 if not content else 0.0
            else:
                pids = tuple(sorted(t.by_id))
                lay = self.layout(content)
                p = self.u_placed[u]
                after = tuple(sorted(lay + (Placed(start, p.size, p.profile_id),)))  # type: ignore[union-attr]
                got = float(t.stranded(after, pids) - t.stranded(lay, pids)) + (0.5 if not content else 0.0)
            if len(self._bad) > 200_000:
                self._bad.clear()
            self._bad[key] = got
        return got


__all__ = ["Host", "Gpu", "Unit", "Cluster", "Request", "ClusterIndex", "RECREATE", "MAX_GPUS", "MAX_UNITS"]
