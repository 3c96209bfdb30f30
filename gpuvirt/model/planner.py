"""Placement planner (pure): where new MIG instances and vGPUs go, how few GPUs a set of instances needs,
and the fewest instance moves that make room for a refused request.

Every legality question is answered by :mod:`gpuvirt.model.mig` (``can_place``, ``free_starts``,
``pack_counts``, ``maximal_multisets``), the same functions the simulator enforces, so a plan produced here
is accepted by the simulator by construction.  This module only adds search and scoring on top.

Four entry points:

* :func:`choose_placement` - one new instance on one of several GPUs (``attach``, ``report --fit``).
* :func:`pack` - the fewest GPUs holding a multiset of profiles, with explicit starts (``plan --pack``).
* :func:`defrag` - the shortest sequence of instance moves after which a profile fits (``plan --defrag``).
* :func:`choose_vgpu_gpu` - which board gets a time-sliced vGPU (consolidate / spread).

Results are deterministic: every choice is the minimum of a fully specified sort key that ends with the
GPU's position in the input and the start, so equal inputs give equal plans on every run and platform.

The module is split by subject: this one holds the placement policies (:func:`choose_placement`,
:func:`choose_vgpu_gpu`); :mod:`gpuvirt.model.planner_state` the data types and the memoised scores
(stranding, fragmentation), :mod:`gpuvirt.model.planner_pack` packing, :mod:`gpuvirt.model.planner_defrag`
defragmentation.  Every public name still imports from here.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from gpuvirt.errors import UsageError
from gpuvirt.model.mig import Placed
from gpuvirt.model.planner_defrag import DefragResult, apply_moves, defrag, defrag_detailed
from gpuvirt.model.planner_pack import (
    PackResult,
    compute_lower_bound,
    first_fit_decreasing,
    pack,
    pack_detailed,
)
from gpuvirt.model.planner_state import (
    Decision,
    GpuState,
    Move,
    VgpuBoard,
    _tables,
    _weights_key,
    clear_caches,
    default_weights,
    fragmentation,
)

POLICIES = ("first-fit", "best-fit", "spread", "pack", "frag-aware")
DEFAULT_POLICY = "frag-aware"
VGPU_POLICIES = ("consolidate", "spread")

# While more than this share of the candidate GPUs (and more than one) is empty, opening an empty GPU is
# cheaper than stranding a compute slice on a used one; below it, empty GPUs are kept for whole-GPU requests
# and one stranded slice is the lesser evil.  Chosen on benches/placement.py (docs/placement.md, "stranding guard"): 0.05 was the one
# value that beat the best baseline on all four B2 runs (trace/uniform mix, with/without departures).
EMPTY_GPU_RESERVE = 0.05



# --- single placement ---------------------------------------------------------------------------------------------
def choose_placement(gpus: Sequence[GpuState], profile_id: int, policy: str = DEFAULT_POLICY,
                     weights: Mapping[int, float] | None = None) -> Decision | None:
    """Choose the GPU and start for one new instance of ``profile_id``; None when no GPU has a legal start.

    Candidates are every legal free ``(gpu, start)`` (``mig.free_starts``).  GPUs whose model lacks the
    profile are skipped.  The candidate with the smallest key wins; ``i`` is the GPU's position in ``gpus``:

    ============  =====================================================================  =================
    policy        key                                                                    ``score``
    ============  =====================================================================  =================
    first-fit     (i, start)                                                             GPU position
    best-fit      (free compute after, i, start)                                         free compute after
    spread        (-free compute after, i, start)                                        -free compute after
    pack          (free compute after, -placements still possible on the GPU, i, start)  free compute after
    frag-aware    (ΔS + e, free compute after, ΔF, -placements still possible, i, start)  ΔS + e
    ============  =====================================================================  =================

    ΔS is the growth of the GPU's *stranded* compute slices (free slices that no combination of further
    instances of the mix's profiles can use while the present ones stay, e.g. 3g@0 + 2g@4 on an A100), and
    ``e`` the price of opening an empty GPU: 0.5 while more than :data:`EMPTY_GPU_RESERVE` of the candidate
    GPUs (those whose model has the profile), and more than one, are empty (a fresh GPU beats a stranded
    slice), 1.5 otherwise (keep the last empty GPUs for whole-GPU requests unless two or more slices would
    be stranded).  ΔF is the growth of :func:`fragmentation` on the
    chosen GPU, with ``weights`` ({profile id: p}) the expected request mix (default: uniform over the
    model's profiles).  "Placements still possible" counts, over all profiles of the model, the legal free
    starts left after the placement, so that among equally good GPUs the start that keeps large aligned
    blocks open wins (the HAMi PR #2855 tie-break).
    """
    if policy not in POLICIES:
        raise UsageError(f"unknown placement policy '{policy}'; choose one of {', '.join(POLICIES)}")
    best: tuple | None = None
    best_decision: Decision | None = None
    wkeys: dict[int, tuple] = {}
    open_price = 0.0
    if policy == "frag-aware":
        able = [g for g in gpus if profile_id in _tables(g.geometry).by_id]
        empty = sum(1 for g in able if not g.layout)
        open_price = 0.5 if empty > max(1.0, EMPTY_GPU_RESERVE * len(able)) else 1.5
    for i, gpu in enumerate(gpus):
        t = _tables(gpu.geometry)
        prof = t.by_id.get(profile_id)
        if prof is None:
            continue
        layout = tuple(sorted(gpu.layout))
        starts = t.starts(layout, profile_id)
        if not starts:
            continue
        free_after = t.compute_free(layout) - prof.compute_slices
        if policy == "first-fit":
            key: tuple = (i, starts[0])
            cand = (key, float(i), starts[0])
        elif policy == "best-fit":
            cand = ((free_after, i, starts[0]), float(free_after), starts[0])
        elif policy == "spread":
            cand = ((-free_after, i, starts[0]), float(-free_after), starts[0])
        else:
            wkey = ()
            if policy == "frag-aware":
                wkey = wkeys.get(id(t))
                if wkey is None:
                    wkey = wkeys[id(t)] = _weights_key(gpu.geometry, weights)
            f_before = t.frag(layout, wkey) if wkey else 0.0
            pids = tuple(p for p, _ in wkey)
            s_before = t.stranded(layout, pids)
            cand = None
            for s in starts:
                after = tuple(sorted(layout + (Placed(s, prof.memory_slices, profile_id),)))
                survive = t.survivors(after)
                if policy == "pack":
                    key = (free_after, -survive, i, s)
                    score = float(free_after)
                else:
                    strand = t.stranded(after, pids) - s_before + (open_price if not layout else 0.0)
                    delta = round(t.frag(after, wkey) - f_before, 9)   # rounding: stable ties across sums
                    key = (strand, free_after, delta, -survive, i, s)
                    score = strand
                if cand is None or key < cand[0]:
                    cand = (key, score, s)
        assert cand is not None
        if best is None or cand[0] < best:
            best = cand[0]
            best_decision = Decision(gpu.key, cand[2], profile_id, cand[1])
    return best_decision


# --- vGPU -------------------------------------------------------------------------------------------------------------
def choose_vgpu_gpu(boards: Sequence[VgpuBoard], type_id: int, policy: str = "consolidate") -> str | None:
    """The key of the board that gets one more vGPU of ``type_id``; None when no board has room.

    ``consolidate`` (oVirt "consolidated", vSphere "consolidation"): fill boards already in use before
    opening empty ones, so whole boards stay free for large types - boards already hosting this type first,
    then the one with the least room left, then the most framebuffer in use.  ``spread`` (oVirt
    "separated", vSphere "performance"): the board with the fewest vGPUs, then the most room, then the
    least framebuffer in use.  Remaining ties go to the earlier board in ``boards``.
    """
    if policy not in VGPU_POLICIES:
        raise UsageError(f"unknown vGPU placement policy '{policy}'; choose one of {', '.join(VGPU_POLICIES)}")
    best: tuple | None = None
    chosen: str | None = None
    for i, b in enumerate(boards):
        if b.room <= 0:
            continue
        same = any(t == type_id for t, _ in b.vgpus)
        if policy == "consolidate":
            key = (not same, not b.vgpus, b.room, -b.framebuffer_used_mib, i)
        else:
            key = (len(b.vgpus), -b.room, b.framebuffer_used_mib, i)
        if best is None or key < best:
            best, chosen = key, b.key
    return chosen


__all__ = ["POLICIES", "DEFAULT_POLICY", "VGPU_POLICIES", "EMPTY_GPU_RESERVE", "GpuState", "Decision", "Move",
           "VgpuBoard", "choose_placement", "choose_vgpu_gpu", "pack", "pack_detailed", "PackResult",
           "first_fit_decreasing", "compute_lower_bound", "defrag", "defrag_detailed", "DefragResult",
           "apply_moves", "fragmentation", "default_weights", "clear_caches"]
