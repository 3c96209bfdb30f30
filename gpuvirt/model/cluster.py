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
from typing import Any, Iterable

from gpuvirt.errors import NotFoundError, UsageError
from gpuvirt.model import mig
from gpuvirt.model import vgpu as vgpu_rules
from gpuvirt.model.catalog import GpuInstanceProfile, GpuModel, VgpuType
from gpuvirt.model.cluster_places import PlaceMeasures
from gpuvirt.model.mig import Placed
from gpuvirt.model.planner import _tables, pack_detailed
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
_LAYOUT_PROBLEMS: dict[tuple, tuple[str, ...]] = {}
_MIG_PARTS: dict[tuple, tuple] = {}


def _mig_parts(tables, pid: int, vgpu: bool, vf: int | None, lay: tuple[Placed, ...],
               flags: tuple[tuple[bool, bool], ...]) -> tuple:
    """For each start of ``pid``: (fewest removals that open it, positions in ``lay`` of the instances
    overlapping it, its memory mask); starts that instances which may not move block are left out.
    ``flags`` gives, per instance of ``lay``, (may move, carries a vGPU)."""
    geom = tables.geom
    prof = tables.by_id[pid]
    out = []
    for s in prof.starts:
        mask = ((1 << prof.memory_slices) - 1) << s
        blockers = [i for i, p in enumerate(lay) if p.mask & mask]
        if any(not flags[i][0] for i in blockers):
            continue
        rest = [i for i in range(len(lay)) if i not in blockers]
        used = sum(tables.by_id[lay[i].profile_id].compute_slices for i in rest)
        deficit = used + prof.compute_slices - geom.compute_slices
        extra = 0
        if deficit > 0:
            for c in sorted((tables.by_id[lay[i].profile_id].compute_slices for i in rest if flags[i][0]),
                            reverse=True):
                if deficit <= 0:
                    break
                deficit -= c
                extra += 1
            if deficit > 0:
                continue
        same = [i for i in rest if lay[i].profile_id == pid]
        excess = len(same) - (prof.max_instances - 1)
        if excess > 0 and sum(1 for i in same if flags[i][0]) < excess:
            continue
        need = len(blockers) + max(extra, excess, 0)
        if vgpu and vf is not None:
            over = sum(1 for f in flags if f[1]) - vf + 1
            if over > 0:
                if sum(1 for f in flags if f[1] and f[0]) < over:
                    continue
                need = max(need, over)
        out.append((need, tuple(blockers), mask))
    return tuple(out)


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
class ClusterIndex(PlaceMeasures):
    """The cluster in index form, with memoised rule answers.  Contents of a GPU are sorted tuples of
    (start, unit index); start is -1 on time-sliced boards.  Where a unit may land, best first, is
    :class:`gpuvirt.model.cluster_places.PlaceMeasures`."""

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
        self._cid: dict[tuple, int] = {}
        self.cont: list[tuple] = []                 # contents by id
        self._lay: list[tuple[Placed, ...] | None] = []
        self._lb: dict[tuple, float] = {}
        self._parts: dict[tuple, tuple] = {}
        self._near: dict[tuple, list] = {}
        self._host: dict[tuple, tuple] = {}
        self._land: dict[tuple, bool] = {}
        self._starts: dict[tuple, tuple[int, ...]] = {}
        self._avail: dict[tuple, int] = {}
        self._kind: dict[tuple, tuple[str, Compatibility | None] | None] = {}
        self._places: dict[tuple, tuple] = {}
        self._everywhere: dict[int, list] = {}
        self._wkey: dict[int, tuple] = {}
        self._sole: dict[tuple, tuple[int, ...]] = {}
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
        self.d_compat_set: list[frozenset[int]] = []
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
            ukey = (u.vgpu_type, u.guest, u.migration_cap, u.vm is None, g.model.id)
            self.u_class.append(uclasses.setdefault(ukey, len(uclasses)))
            contents[gi].append((start, ui))
        self.start = tuple(self.intern(tuple(sorted(c))) for c in contents)
        for gi, c in enumerate(self.start):
            why = self.content_problems(gi, self.cont[c])
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
        self.d_compat_set.append(frozenset(compat))
        return idx

    def intern(self, content: tuple) -> int:
        """The id of a GPU's contents (a sorted tuple of (start, unit)); states are tuples of these ids, so
        that every memo below is keyed by small integers."""
        got = self._cid.get(content)
        if got is None:
            got = self._cid[content] = len(self.cont)
            self.cont.append(content)
            self._lay.append(None)
        return got

    def layout(self, c: int) -> tuple[Placed, ...]:
        """The MIG layout of contents ``c``."""
        got = self._lay[c]
        if got is None:
            got = self._lay[c] = tuple(sorted(Placed(s, self.u_placed[u].size, self.u_placed[u].profile_id)  # type: ignore[union-attr]
                                              for s, u in self.cont[c]))
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

    def starts(self, d: int, gi: int, c: int) -> tuple[int, ...]:
        """Legal places for demand ``d`` on GPU ``gi`` next to contents ``c`` (-1 = "on the board")."""
        key = (d, gi, c)
        got = self._starts.get(key)
        if got is None:
            content = self.cont[c]
            tables, pid, type_id = self.demands[d]
            if pid is not None:
                got = tables.starts(self.layout(c), pid)
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
            lay = self.layout(self.intern(content))
            key = (id(t), lay)
            got = _LAYOUT_PROBLEMS.get(key)
            if got is None:
                if len(_LAYOUT_PROBLEMS) > 200_000:
                    _LAYOUT_PROBLEMS.clear()
                got = _LAYOUT_PROBLEMS[key] = tuple(mig.layout_problems(g.model.mig, lay))  # type: ignore[arg-type]
            out += got
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

    def lb(self, d: int, gi: int, c: int) -> float:
        """Fewest units that must leave GPU ``gi`` before demand ``d`` fits there (a lower bound; inf when
        units that never move are in the way).  0 exactly when it fits now."""
        key = (d, gi, c)
        got = self._lb.get(key)
        if got is None:
            got = min((part[0] for part in self.lb_parts(d, gi, c)), default=INF)
            if len(self._lb) > 500_000:
                self._lb.clear()
            self._lb[key] = got
        return got

    def lb_parts(self, d: int, gi: int, c: int) -> tuple[tuple[float, tuple[int, ...], int], ...]:
        """The ways demand ``d`` could get a place on GPU ``gi``: for each, the fewest units that must leave,
        the units that must leave in any case (those overlapping the place; on a board, those of another type
        or size) and the place's memory-slice mask (0 on a board).  ``((0, (), 0),)`` when it fits now; empty
        when units that never move are in the way."""
        key = (d, gi, c)
        got = self._parts.get(key)
        if got is None:
            if self.starts(d, gi, c):
                got = ((0, (), 0),)
            else:
                tables, pid, type_id = self.demands[d]
                raw = self._lb_mig(gi, c, tables, pid, type_id) if pid is not None else \
                    self._lb_board(gi, self.cont[c], type_id)  # type: ignore[arg-type]
                got = tuple((max(1, need), blockers, mask) for need, blockers, mask in raw)
            if len(self._parts) > 500_000:
                self._parts.clear()
            self._parts[key] = got
        return got

    def _lb_mig(self, gi: int, c: int, tables, pid: int, type_id: int | None) -> list:
        # the answer depends only on the layout, which of its instances may move and carry vGPUs, and the VF
        # limit, so it is shared between calls (the planner is called once per refused request)
        mov = self.u_movable
        content = self.cont[c]
        flags = tuple((mov[u], self.u_type[u] is not None) for _, u in content)
        lay = self.layout(c)
        key = (id(tables), pid, type_id is not None, self.g_vf[gi], lay, flags)
        got = _MIG_PARTS.get(key)
        if got is None:
            got = _mig_parts(tables, pid, type_id is not None, self.g_vf[gi], lay, flags)
            if len(_MIG_PARTS) > 200_000:
                _MIG_PARTS.clear()
            _MIG_PARTS[key] = got
        return [(need, tuple(content[i][1] for i in blockers), mask) for need, blockers, mask in got]

    def _lb_board(self, gi: int, content: tuple, type_id: int) -> list:
        g = self.cluster.gpus[gi]
        spec = g.model.vgpu
        want = self.g_types[gi][type_id]
        mov = self.u_movable
        units = [u for _, u in content]
        types = self.g_types[gi]
        others: list[int] = []
        if spec.policy in ("same-type", "same-size"):
            def clash(u: int) -> bool:
                t = types[self.u_type[u]]  # type: ignore[index]
                return t.id != want.id if spec.policy == "same-type" else t.framebuffer_mib != want.framebuffer_mib
            others = [u for u in units if clash(u)]
            if any(not mov[u] for u in others):
                return []
            same = [u for u in units if not clash(u)]
            excess = len(same) - want.max_instances + 1
            if excess > 0 and sum(1 for u in same if mov[u]) < excess:
                return []
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
                    return []
            cap = want.mixed_size_max if want.mixed_size_max is not None else want.max_instances
            same = [u for u in units if self.u_type[u] == want.id]
            excess = len(same) - cap + 1
            if excess > 0:
                if sum(1 for u in same if mov[u]) < excess:
                    return []
                need = max(need, excess)
        vf = self.g_vf[gi]
        if vf is not None and len(units) >= vf:
            if not any(mov[u] for u in units):
                return []
            need = max(need, len(units) - vf + 1)
        return [(need, tuple(others), 0)]

    def ranked(self, d: int, state: tuple) -> list[tuple[float, int]]:
        """(fewest removals that give demand ``d`` a place there, GPU) for every compatible GPU, cheapest
        first: what a destination costs a unit of ``d``."""
        key = (d, state)
        got = self._near.get(key)
        if got is None:
            got = sorted((self.lb(d, a, state[a]), a) for a in self.d_compat[d])
            if len(self._near) > 50_000:
                self._near.clear()
            self._near[key] = got
        return got

    def nearest(self, d: int, state: tuple, avoid: Iterable[int] = ()) -> float:
        """The cheapest destination for a unit of demand ``d`` on a GPU not in ``avoid``."""
        avoid = set(avoid)
        return next((v for v, a in self.ranked(d, state) if a not in avoid), INF)

    def can_land(self, gi: int, c: int, mask: int, blockers: tuple[int, ...], need_pid: int | None,
                 u: int) -> bool:
        """Could unit ``u`` find room on MIG GPU ``gi`` (contents ``c``) once ``blockers`` left and an instance of
        ``need_pid`` took ``mask``?  Used to rule a unit's own GPU in as a free destination; True when unsure."""
        key = (gi, c, mask, blockers, need_pid, u)
        got = self._land.get(key)
        if got is None:
            got = self._land[key] = self._can_land(gi, c, mask, blockers, need_pid, u)
            if len(self._land) > 200_000:
                self._land.clear()
        return got

    def _can_land(self, gi: int, c: int, mask: int, blockers: tuple[int, ...], need_pid: int | None,
                  u: int) -> bool:
        t = self.g_tables[gi]
        if t is None:
            return False
        prof = self.u_prof[u]
        if prof is None or prof.id not in t.by_id:
            return True
        stay = [(st, w) for st, w in self.cont[c] if w not in blockers and w != u]
        taken = mask
        used = 0
        for st, w in stay:
            p = self.u_placed[w]
            taken |= ((1 << p.size) - 1) << st  # type: ignore[union-attr]
            used += self.u_prof[w].compute_slices  # type: ignore[union-attr]
        if need_pid is not None:
            used += t.by_id[need_pid].compute_slices
        if used + prof.compute_slices > t.geom.compute_slices:
            return False
        size = ((1 << prof.memory_slices) - 1)
        return any(not ((size << s) & taken) for s in prof.starts)

    def dominates(self, du: int, d: int) -> bool:
        """Does every place that fits a unit of demand ``du`` also fit demand ``d`` (same GPU)?  True for the
        same demand, and for a whole-GPU instance over any GPU instance of that model (a VF-backed request
        needs the unit to hold a VF too).  A plan never needs to move such a unit onto a GPU where ``d`` may
        go: the place it moves to was free, so ``d`` could have gone there instead, with fewer moves."""
        if du == d:
            return True
        tu, pu, yu = self.demands[du]
        t, p, y = self.demands[d]
        if tu is None or tu is not t or p is None:
            return False
        return tu.by_id[pu].memory_slices == tu.geom.memory_slices and (y is None or yu is not None)

    def lb_with_destinations(self, d: int, gi: int, state: tuple, targets: frozenset[int] = frozenset(),
                             cap: float = INF) -> float:
        """A stronger lower bound on the moves that free a place for demand ``d`` on GPU ``gi`` (values of
        ``cap`` and above all come back as ``cap``, which saves work).

        The units in the way must leave (``lb``), and each needs a destination; the dearest one adds what
        its destination costs, because those are moves of other units.  Staying on ``gi`` beside the place
        costs nothing if there is room, else at least one more unit of ``gi`` must move (none more is
        counted when ``lb`` already moves units of ``gi`` for compute).  Another GPU ``a`` costs the units
        that must leave it, plus (MIG) the dearest destination on a third GPU of one of those that cannot
        shift within ``a`` or onto ``gi``.  Each count is of distinct units, so no move is counted twice.  A
        blocker that dominates ``d`` (:meth:`dominates`) may not go to a GPU in ``targets``."""
        best = cap
        t = self.g_tables[gi]
        pid = self.demands[d][1]
        for need, blockers, mask in self.lb_parts(d, gi, state[gi]):
            if need >= best:
                continue
            extra = 0.0
            for u in blockers:
                c = INF
                if t is not None and self._shifts(u, mask):
                    if self.can_land(gi, state[gi], mask, blockers, pid, u) or need > len(blockers):
                        continue
                    c = 1
                c = min(c, self._dest_cost(u, gi, state, targets, d, mask, min(c, best - need)))
                if c > extra:
                    extra = c
                    if need + extra >= best:
                        break
            best = min(best, need + extra)
        return best

    def _shifts(self, u: int, mask: int) -> bool:
        """Has unit ``u``'s profile a start that does not touch ``mask`` (on a GPU of its model)?"""
        prof = self.u_prof[u]
        if prof is None:
            return False
        size = (1 << prof.memory_slices) - 1
        return any(not ((size << s) & mask) for s in prof.starts)

    def _dest_cost(self, u: int, gi: int, state: tuple, targets: frozenset[int], d: int, mask: int,
                   cap: float) -> float:
        """What a destination on a GPU other than ``gi`` costs unit ``u`` (at most ``cap``)."""
        du = self.u_demand[u]
        dominant = bool(targets) and self.dominates(du, d)
        mig_target = self.g_tables[gi] is not None
        best = cap
        for v, a in self.ranked(du, state):
            if v >= best:
                break
            if a == gi or (dominant and a in targets):
                continue
            if v == 0 or self.g_tables[a] is None:
                best = min(best, v)
                continue
            for need_a, others in self._host_cost(du, a, state[a]):
                cost = need_a
                for w, dw in others:
                    if cost >= best:
                        break
                    if mig_target and self._shifts(w, mask):
                        continue
                    cost = max(cost, need_a + self.nearest(dw, state, (a, gi)))
                best = min(best, cost)
        return best

    def _host_cost(self, du: int, a: int, c: int) -> tuple:
        """For demand ``du`` on MIG GPU ``a`` (contents ``c``): each way to make room, as (units that must
        leave, those of them that cannot shift aside within ``a``, with their demands)."""
        key = (du, a, c)
        got = self._host.get(key)
        if got is None:
            got = tuple((need, tuple((w, self.u_demand[w]) for w in blockers if not self._shifts(w, mask)))
                        for need, blockers, mask in self.lb_parts(du, a, c))
            if len(self._host) > 200_000:
                self._host.clear()
            self._host[key] = got
        return got

    def sole(self, d: int, gi: int, c: int) -> tuple[int, ...]:
        """Units whose removal alone lets demand ``d`` fit on GPU ``gi``."""
        key = (d, gi, c)
        got = self._sole.get(key)
        if got is None:
            content = self.cont[c]
            got = tuple(u for st, u in content if self.u_movable[u]
                        and self.starts(d, gi, self.intern(tuple(x for x in content if x[1] != u))))
            if len(self._sole) > 200_000:
                self._sole.clear()
            self._sole[key] = got
        return got

    def kind(self, u: int, a: int, b: int) -> tuple[str, Compatibility | None] | None:
        """The kind a move of unit ``u`` from GPU ``a`` to ``b`` gets under the policy, with its verdict."""
        # libvirt refuses to migrate a domain to the host it runs on, so a policy may rule live moves
        # between two GPUs of one host out (the service does; the benchmarks keep them)
        same = self.g_host[a] == self.g_host[b] and not getattr(self.policy, "live_same_host", True)
        key = (self.u_class[u], self.g_class[a], self.g_class[b], same)
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
            allow = self.policy.allow - {LIVE} if same else self.policy.allow
            chk = check_move(vm, pg, allow, self.policy.rules)
            res = (chk.kind, chk.compatibility) if chk.kind is not None else None
        self._kind[key] = res
        return res

    def repack_fits(self, d: int, state: tuple) -> bool | None:
        """Would the instances on the GPUs that could take demand ``d``, plus one of ``d``, fit those GPUs if
        everything could be placed afresh (pins, VFs and move order ignored)?  False proves that no sequence
        of moves makes room.  MIG: the exact packing of :func:`gpuvirt.model.planner.pack`; boards with one
        type or one size each: count per type / size; None where no exact answer is cheap (mixed-size)."""
        tables, pid, type_id = self.demands[d]
        pool = self.d_compat[d]
        if not pool:
            return False
        if pid is not None:
            counts: dict[int, int] = {pid: 1}
            for gi in pool:
                for _, u in self.cont[state[gi]]:
                    q = self.u_placed[u].profile_id  # type: ignore[union-attr]
                    counts[q] = counts.get(q, 0) + 1
            return len(pack_detailed(tables.geom, counts).gpus) <= len(pool)
        model = self.cluster.gpus[pool[0]].model
        spec = model.vgpu
        if spec is None or spec.policy not in ("same-type", "same-size") or \
                any(self.cluster.gpus[gi].model.id != model.id for gi in pool):
            return None
        types = {t.id: t for t in spec.types}
        need: dict[int, int] = {}
        cap: dict[int, int] = {}
        # boards may differ in enabled VFs: the most generous one keeps this a lower bound on boards needed
        vfs = None if any(self.g_vf[gi] is None for gi in pool) else max(self.g_vf[gi] for gi in pool)  # type: ignore[type-var]
        for tid in [type_id] + [self.u_type[u] for gi in pool for _, u in self.cont[state[gi]]]:
            t = types[tid]  # type: ignore[index]
            cls = t.id if spec.policy == "same-type" else t.framebuffer_mib
            need[cls] = need.get(cls, 0) + 1
            c = t.max_instances if vfs is None else min(t.max_instances, vfs)
            cap[cls] = min(cap.get(cls, c), c)
        return sum(-(-n // max(1, cap[c])) for c, n in need.items()) <= len(pool)

    def request_demand(self, request: Request) -> tuple[int, list[int], str]:
        """The request as a demand, the GPUs it may go to, and how to name it; raises for a request no GPU model
        of the cluster knows, or one that means different sizes on different models."""
        if request.profile_id is None and request.vgpu_type is None:
            raise UsageError("a request names a GPU-instance profile or a vGPU type")
        cluster = self.cluster
        what = (f"vGPU type {request.vgpu_type}" if request.vgpu_type is not None
                else f"GPU-instance profile {request.profile_id}")
        groups: dict[tuple, tuple[tuple, list[int]]] = {}
        known = False
        for gi, g in enumerate(cluster.gpus):
            if request.model is not None and g.model.id != request.model:
                continue
            t = self.g_tables[gi]
            if request.vgpu_type is not None:
                vt = self.g_types[gi].get(request.vgpu_type)
                if vt is None:
                    continue
                known = True
                what = f"vGPU type {vt.name}"
                if vt.mig_backed:
                    if request.profile_id is not None and request.profile_id != vt.gpu_instance_profile_id:
                        raise UsageError(f"vGPU type {vt.name} sits on profile {vt.gpu_instance_profile_id}, "
                                         f"not {request.profile_id}")
                    if t is None:
                        continue
                    dem: tuple = (t, vt.gpu_instance_profile_id, vt.id)
                elif t is not None:
                    continue
                else:
                    dem = (None, None, vt.id)
            else:
                prof = g.model.mig.profile(request.profile_id) if g.model.mig is not None and any(
                    p.id == request.profile_id for p in g.model.mig.gi_profiles) else None
                if prof is None:
                    continue
                known = True
                what = f"GPU instance {prof.name}"
                if t is None:
                    continue
                dem = (t, request.profile_id, None)
            key = (id(dem[0]), dem[1], dem[2])
            groups.setdefault(key, (dem, []))[1].append(gi)
        if not known:
            raise NotFoundError(f"no GPU{' of model ' + request.model if request.model else ''} in the cluster "
                                f"knows {what}")
        if len(groups) > 1:
            raise UsageError(f"{what} means different things on different GPU models here; name the model")
        if not groups:
            return -1, [], f"no GPU that could hold {what} is in the mode it needs (MIG mode for GPU instances)"
        (dem, gpus), = groups.values()
        d = self._demand(*dem)
        targets = [gi for gi in gpus
                   if (request.hosts is None or cluster.gpus[gi].host in request.hosts)
                   and (request.gpus is None or cluster.gpus[gi].key in request.gpus)]
        if not targets:
            return d, [], f"no GPU on the allowed hosts / GPUs can hold {what}"
        return d, targets, what


    def need_and_free(self, d: int, state: tuple) -> tuple[int, int, str]:
        """The request's size and the free capacity of all GPUs that could take it (compute slices, or MiB)."""
        tables, pid, type_id = self.demands[d]
        if pid is not None:
            need = tables.by_id[pid].compute_slices
            free = sum(self.g_tables[gi].compute_free(self.layout(state[gi])) for gi in self.d_compat[d])  # type: ignore[union-attr]
            return need, free, "compute slices"
        gi0 = self.d_compat[d][0] if self.d_compat[d] else None
        need = self.g_types[gi0][type_id].framebuffer_mib if gi0 is not None else 0
        free = 0
        for gi in self.d_compat[d]:
            used = sum(self.g_types[gi][self.u_type[u]].framebuffer_mib for _, u in self.cont[state[gi]])  # type: ignore[index]
            free += max(0, self.cluster.gpus[gi].model.memory_mib - used)
        return need, free, "MiB of framebuffer"


__all__ = ["Host", "Gpu", "Unit", "Cluster", "Request", "ClusterIndex", "RECREATE", "MAX_GPUS", "MAX_UNITS"]
