"""``report --fit``: where requested instances could be placed now, handed out the way successive attaches
would.  Split from :mod:`gpuvirt.service.report`, whose per-GPU facts it reads."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable

from gpuvirt.errors import GpuvirtError, UsageError
from gpuvirt.model import vgpu as vgpu_rules
from gpuvirt.model.catalog import load_catalog, resolve_gi_profile, resolve_vgpu_type
from gpuvirt.model.mig import Placed, compute_used, mask_of
from gpuvirt.service.report import (
    I_BACK,
    I_ID,
    I_KIND,
    I_PID,
    I_START,
    I_TYPE,
    I_VM,
    MDEV,
    MIG,
    VF,
    VFIO_VGPU,
    GpuFacts,
    _info,
    _state,
    vgpu_availability,
)

_FIT_ITEM = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9 ._+:-]*?)\s*=\s*(?P<count>[^=]*?)\s*$")
# as plan --pack (service/placement.py): the fit simulation hands out instances one at a time
MAX_FIT_COUNT = 100_000
MAX_FIT_CHARS = 4096


def parse_fit(specs: Iterable[str]) -> list[tuple[str, int]]:
    """``["3g.40gb=20,A2-2Q=8", ...]`` -> [(name, count)] in order of first mention; repeated names add up."""
    out: dict[str, int] = {}
    specs = list(specs)
    if sum(len(str(s)) for s in specs) > MAX_FIT_CHARS:
        raise UsageError(f"--fit is longer than {MAX_FIT_CHARS} characters")
    for spec in specs:
        if spec is None or not str(spec).strip():
            raise UsageError("empty --fit; expected NAME=COUNT[,NAME=COUNT...], e.g. 3g.40gb=20,A2-2Q=8")
        for item in str(spec).split(","):
            m = _FIT_ITEM.match(item)
            if not m:
                raise UsageError(f"malformed --fit item '{item.strip()}': expected NAME=COUNT (a MIG profile, "
                                 "vGPU type, mdev type or 'vf'), e.g. 3g.40gb=20,A2-2Q=8")
            count = m.group("count")
            if not re.fullmatch(r"\d{1,9}", count) or not 1 <= int(count) <= MAX_FIT_COUNT:
                raise UsageError(f"--fit count '{count[:20]}' for {m.group('name')} must be an integer from 1 to "
                                 f"{MAX_FIT_COUNT}")
            out[m.group("name")] = out.get(m.group("name"), 0) + int(count)
    total = sum(out.values())
    if total > MAX_FIT_COUNT:
        raise UsageError(f"--fit asks for {total} instances in total; at most {MAX_FIT_COUNT}")
    return list(out.items())


def _classify(name: str) -> str:
    """mig | vgpu | mdev | vf: what the name means for at least one catalog model; UsageError when nothing."""
    if name.lower() == "vf":
        return "vf"
    cat = load_catalog()
    for m in cat.models.values():
        if m.mig is not None:
            try:
                resolve_gi_profile(m, name)
                return "mig"
            except GpuvirtError:
                pass
    for m in cat.models.values():
        if m.vgpu is not None:
            try:
                resolve_vgpu_type(m, name)
                return "vgpu"
            except GpuvirtError:
                pass
    for m in cat.models.values():
        if m.mdev is not None and any(m.mdev.type_dir(t) == name for t in m.mdev.types):
            return "mdev"
    raise UsageError(f"--fit: '{name}' is no MIG profile, vGPU type or mdev type of any known GPU model")


class _FitGpu:
    """One GPU's capacity while --fit hands out instances in simulation."""

    def __init__(self, host: str, e: dict[str, Any], f: GpuFacts) -> None:
        self.host, self.address, self.model = host, e["gpu"], f.model
        self.key = f"{host}/{e['gpu']}"
        self.mig_on = e["mode"] == "MIG"
        info = _info(f.model)
        backing = {r[I_BACK] for r in f.insts if r[I_BACK] is not None}
        self.layout: list[Placed] = []
        self.free_mig: Counter = Counter()          # profile id -> free existing MIG instances
        self.hostable: list[int] = []                # GI profile ids able to host / hosting a MIG-backed vGPU
        self.vgpus: list[int] = []
        self.free_vgpu: Counter = Counter()         # type id -> free existing vGPUs
        self.mdevs: list[str] = []
        self.free_mdev: Counter = Counter()
        self.free_vf = 0
        for r in f.insts:
            st = _state(r, backing)
            if st == "free" and r[I_ID] in f.sick:
                st = "unhealthy"            # exists, takes its slices, but is not handed out
            kind = r[I_KIND]
            if kind == MIG and self.mig_on:
                p = info.gi.get(r[I_PID])
                if p is None or r[I_START] is None:
                    continue
                self.layout.append(Placed(r[I_START], p.memory_slices, p.id))
                if st == "free":
                    self.free_mig[p.id] += 1
                if (r[I_VM] is None and st != "unhealthy") or r[I_ID] in backing:
                    self.hostable.append(p.id)
            elif kind in (MDEV, VFIO_VGPU):
                tid = info.tid(r[I_TYPE])
                if tid is not None:
                    self.vgpus.append(tid)
                    if st == "free":
                        self.free_vgpu[tid] += 1
                elif r[I_TYPE]:
                    self.mdevs.append(r[I_TYPE])
                    if st == "free":
                        self.free_mdev[r[I_TYPE]] += 1
            elif kind == VF and st == "free":
                self.free_vf += 1
        self.vfs_enabled = f.vfs_enabled

    def free_parents(self) -> int | None:
        if self.model is None or self.model.vgpu is None or self.model.vgpu.parent != "vf":
            return None
        return vgpu_rules.free_vfs(self.vfs_enabled, len(self.vgpus))

    def room(self, vtype: Any) -> int:
        assert self.model is not None
        return vgpu_availability(self.model, self.vgpus, self.mig_on, self.hostable,
                                 self.free_parents()).get(vtype.id, 0)


def fit_requests(items: list[tuple[Any, dict[str, Any], GpuFacts]], requests: list[tuple[str, int]], *,
                 mig_policy: str, vgpu_policy: str) -> dict[str, Any]:
    """Where ``requests`` could be placed now, handed out one instance at a time the way successive attaches
    would (free existing instances first, then new ones at the planner's choice), or what is missing.

    Larger MIG profiles go first (they need aligned blocks that small ones would break up), then MIG-backed
    vGPUs, then time-sliced vGPUs by framebuffer size, then generic mdevs and whole VFs.
    """
    from gpuvirt.model.planner import GpuState, VgpuBoard, choose_placement, choose_vgpu_gpu

    gpus = [_FitGpu(h.id, e, f) for h, e, f in items]
    kinds = {name: _classify(name) for name, _ in requests}

    def mig_weight(name: str) -> tuple:
        best = (0, 0)
        for gg in gpus:
            if gg.model is not None and gg.model.mig is not None:
                try:
                    p = resolve_gi_profile(gg.model, name)
                    best = max(best, (p.compute_slices, p.memory_slices))
                except GpuvirtError:
                    pass
        return best

    def vgpu_weight(name: str) -> tuple:
        for gg in gpus:
            if gg.model is not None and gg.model.vgpu is not None:
                try:
                    t = resolve_vgpu_type(gg.model, name)
                    return (0 if t.mig_backed else 1, -t.framebuffer_mib)
                except GpuvirtError:
                    pass
        return (2, 0)

    order_kind = {"mig": 0, "vgpu": 1, "mdev": 2, "vf": 3}
    ordered = sorted(range(len(requests)), key=lambda k: (
        order_kind[kinds[requests[k][0]]],
        tuple(-x for x in mig_weight(requests[k][0])) if kinds[requests[k][0]] == "mig" else
        vgpu_weight(requests[k][0]) if kinds[requests[k][0]] == "vgpu" else (), k))
    results: dict[int, dict[str, Any]] = {}
    for k in ordered:
        name, count = requests[k]
        kind = kinds[name]
        where: dict[str, dict[str, Any]] = {}

        def note(gg: _FitGpu, existing: bool, start: int | None = None) -> None:
            w = where.setdefault(gg.key, {"host": gg.host, "gpu": gg.address, "count": 0, "existing": 0,
                                          "new": 0, "starts": []})
            w["count"] += 1
            w["existing" if existing else "new"] += 1
            if start is not None:
                w["starts"].append(start)

        placed = 0
        offered = False
        for _ in range(count):
            if kind == "mig":
                ok, off = _fit_one_mig(gpus, name, mig_policy, note, GpuState, choose_placement)
            elif kind == "vgpu":
                ok, off = _fit_one_vgpu(gpus, name, vgpu_policy, mig_policy, note, GpuState, VgpuBoard,
                                        choose_placement, choose_vgpu_gpu)
            elif kind == "mdev":
                ok, off = _fit_one_mdev(gpus, name, note)
            else:
                ok, off = _fit_one_vf(gpus, note)
            offered = offered or off
            if not ok:
                break
            placed += 1
        missing = count - placed
        reason = None
        if missing:
            reason = _missing_reason(gpus, name, kind, offered, missing)
        results[k] = {"request": name, "kind": kind, "count": count, "placed": placed, "missing": missing,
                      "placements": sorted(where.values(), key=lambda w: (w["host"], w["gpu"])), "reason": reason,
                      "rejections": None}   # filled in by service.refusals.analyse_fit when refused
    reqs = [results[k] for k in range(len(requests))]
    return {"fits": all(r["missing"] == 0 for r in reqs), "requests": reqs,
            "policies": {"mig": mig_policy, "vgpu": vgpu_policy}}


def _resolve(gg: _FitGpu, kind: str, name: str, cache: dict) -> Any:
    """A MIG profile ("mig") or vGPU type ("vgpu") of this GPU's model by name; None when the model has none.

    Memoised per (model, kind, name): a fit over thousands of GPUs of a few models resolves each name once.
    """
    key = (gg.model.id if gg.model else None, kind, name)
    if key not in cache:
        found = None
        m = gg.model
        if m is not None and (m.mig if kind == "mig" else m.vgpu) is not None:
            try:
                found = resolve_gi_profile(m, name) if kind == "mig" else resolve_vgpu_type(m, name)
            except GpuvirtError:
                found = None
        cache[key] = found
    return cache[key]


_RESOLVED: dict = {}


def _place_new_gi(cands: list[tuple[_FitGpu, Any]], policy: str, GpuState: Any, choose_placement: Any):
    """Planner choice among ``cands`` [(gpu, GI profile)]: (gpu, profile, start) or None."""
    best = None
    for pid in sorted({p.id for _, p in cands}):
        group = [(gg, p) for gg, p in cands if p.id == pid]
        states = [GpuState(gg.key, gg.model.mig, tuple(sorted(gg.layout))) for gg, _ in group]
        d = choose_placement(states, pid, policy)
        if d is not None and (best is None or d.score < best[0].score):
            best = (d, group)
    if best is None:
        return None
    d, group = best
    gg, p = next((gg, p) for gg, p in group if gg.key == d.gpu_key)
    return gg, p, d.start


def _fit_one_mig(gpus, name, policy, note, GpuState, choose_placement) -> tuple[bool, bool]:
    cands = []
    for gg in gpus:
        if not gg.mig_on:
            continue
        p = _resolve(gg, "mig", name, _RESOLVED)
        if p is not None:
            cands.append((gg, p))
    if not cands:
        return False, False
    for gg, p in cands:
        if gg.free_mig[p.id] > 0:
            gg.free_mig[p.id] -= 1
            # an existing free instance handed to a VM can no longer host a vGPU
            if p.id in gg.hostable:
                gg.hostable.remove(p.id)
            note(gg, True)
            return True, True
    got = _place_new_gi(cands, policy, GpuState, choose_placement)
    if got is None:
        return False, True
    gg, p, start = got
    gg.layout.append(Placed(start, p.memory_slices, p.id))
    note(gg, False, start)
    return True, True


def _fit_one_vgpu(gpus, name, policy, mig_policy, note, GpuState, VgpuBoard, choose_placement,
                  choose_vgpu_gpu) -> tuple[bool, bool]:
    cands = []
    for gg in gpus:
        t = _resolve(gg, "vgpu", name, _RESOLVED)
        if t is not None:
            cands.append((gg, t))
    if not cands:
        return False, False
    for gg, t in cands:
        if gg.free_vgpu[t.id] > 0:
            gg.free_vgpu[t.id] -= 1
            note(gg, True)
            return True, True
    boards = []
    by_key = {}
    for gg, t in cands:
        room = gg.room(t)
        if room > 0:
            fb = {x.id: x.framebuffer_mib for x in gg.model.vgpu.types}
            # type ids are per board model: mark "the requested type" as -1 so that boards of different
            # models compare alike in the planner's "already hosts this type" preference
            boards.append(VgpuBoard(gg.key, tuple((-1 if tid == t.id else tid, fb.get(tid, 0)) for tid in gg.vgpus),
                                    room))
            by_key[gg.key] = (gg, t)
    if boards:
        key = choose_vgpu_gpu(boards, -1, policy)
        if key is not None:
            gg, t = by_key[key]
            gg.vgpus.append(t.id)
            note(gg, False)
            return True, True
    # MIG-backed types: a new GPU instance of the type's profile can host one, where the board allows
    gi_cands = []
    for gg, t in cands:
        if not (t.mig_backed and gg.mig_on and gg.model is not None and gg.model.mig is not None):
            continue
        fp = gg.free_parents()
        if fp is not None and fp <= 0:
            continue
        trial = vgpu_rules.board_room(gg.model, t, gg.vgpus, mig_enabled=True,
                                      gpu_instances=gg.hostable + [t.gpu_instance_profile_id])
        if trial <= 0:
            continue
        gi_cands.append((gg, gg.model.mig.profile(t.gpu_instance_profile_id)))
    got = _place_new_gi(gi_cands, mig_policy, GpuState, choose_placement) if gi_cands else None
    if got is None:
        return False, True
    gg, p, start = got
    gg.layout.append(Placed(start, p.memory_slices, p.id))
    gg.hostable.append(p.id)
    t = next(t for g2, t in cands if g2 is gg)
    gg.vgpus.append(t.id)
    note(gg, False, start)
    return True, True


def _fit_one_mdev(gpus, name, note) -> tuple[bool, bool]:
    offered = False
    for gg in gpus:
        spec = gg.model.mdev if gg.model is not None else None
        if spec is None:
            continue
        t = next((t for t in vgpu_rules.registered_pool_types(spec) if spec.type_dir(t) == name), None)
        if t is None:
            continue
        offered = True
        if gg.free_mdev[name] > 0:
            gg.free_mdev[name] -= 1
            note(gg, True)
            return True, True
        if vgpu_rules.pool_available(spec, t, vgpu_rules.pool_used(spec, gg.mdevs)) > 0:
            gg.mdevs.append(name)
            note(gg, False)
            return True, True
    return False, offered


def _fit_one_vf(gpus, note) -> tuple[bool, bool]:
    for gg in gpus:
        if gg.free_vf > 0:
            gg.free_vf -= 1
            note(gg, True)
            return True, True
    return False, any(gg.vfs_enabled for gg in gpus)


def _missing_reason(gpus: list[_FitGpu], name: str, kind: str, offered: bool, missing: int) -> str:
    if not offered:
        return f"no GPU in scope offers {name}" + (" with MIG mode on" if kind == "mig" else "")
    if kind == "mig":
        fragmented = []
        for gg in gpus:
            p = _resolve(gg, "mig", name, _RESOLVED) if gg.mig_on else None
            if p is None:
                continue
            geom = gg.model.mig
            layout = tuple(sorted(gg.layout))
            free_mem = geom.memory_slices - bin(mask_of(layout)).count("1")
            free_cs = geom.compute_slices - compute_used(geom, layout)
            if free_mem >= p.memory_slices and free_cs >= p.compute_slices:
                fragmented.append(gg.key)
        text = f"{missing} more {name} do not fit"
        if fragmented:
            shown = ", ".join(fragmented[:5]) + (" ..." if len(fragmented) > 5 else "")
            text += (f"; {len(fragmented)} GPU(s) have enough free slices but no aligned placement "
                     f"(fragmentation: {shown}; see 'gpuvirt plan --defrag --for {name}')")
        return text
    if kind == "vgpu":
        return (f"{missing} more {name} do not fit: the boards offering it are full, hold another type or size, "
                "or have no free VF")
    if kind == "mdev":
        return f"{missing} more {name} do not fit: the parents' resource pools are used up"
    return f"{missing} whole VF{'s' if missing != 1 else ''} more than are free would be needed"


__all__ = ["parse_fit", "fit_requests", "MAX_FIT_COUNT"]
