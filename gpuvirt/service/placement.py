"""Placement services behind ``gpuvirt plan --pack SPEC --model M`` (no host needed) and
``gpuvirt plan --defrag --for PROFILE`` (reads the host, changes nothing).

The --pack answer is a plain dict so the CLI can print it as JSON unchanged; its shape is part of the CLI
contract (docs/placement.md):

    {"model": "a100-40gb",
     "gpus": [{"instances": [{"profile": "3g.20gb", "profile_id": 9, "start": 0, "size": 4}, ...]}, ...],
     "gpu_count": 2,
     "lower_bound": 2}

``gpus`` has one entry per GPU used (fullest first), instances ordered by start.  ``lower_bound`` is
ceil(total compute slices / compute slices per GPU), so a reader can see at a glance how close the plan is
to the trivial bound; the plan itself is optimal (see gpuvirt.model.planner.pack).
"""

from __future__ import annotations

import re
from typing import Any

from gpuvirt.errors import CapacityError, ProfileError, UsageError
from gpuvirt.model.catalog import load_catalog, resolve_gi_profile
from gpuvirt.model.mig import Placed
from gpuvirt.model.planner import POLICIES, compute_lower_bound, pack

_ITEM_RE = re.compile(r"^\s*(?P<name>[^=\s]+)\s*=\s*(?P<count>[^=]*?)\s*$")
# One --pack plan places at most this many instances (about 14,300 fully packed GPUs; the search then takes a
# few seconds and a few hundred MB).  More is not a capacity question anyone asks of one plan, and an
# unbounded count ran until it was killed.
MAX_PACK_INSTANCES = 100_000
MAX_SPEC_CHARS = 4096


def parse_pack_spec(spec: str, model_id: str) -> dict[int, int]:
    """``"3g.20gb=4,1g.5gb=10"`` -> {profile id: count} for ``model_id``; repeated names add up."""
    model = load_catalog().get(model_id)
    if model.mig is None:
        raise ProfileError(f"{model.display_name} does not support MIG; --pack needs a MIG-capable model",
                           model=model.id)
    if not spec or not spec.strip():
        raise UsageError("empty pack spec; expected PROFILE=COUNT[,PROFILE=COUNT...], e.g. 3g.20gb=4,1g.5gb=10")
    if len(spec) > MAX_SPEC_CHARS:
        raise UsageError(f"pack spec is {len(spec)} characters long; at most {MAX_SPEC_CHARS}")
    counts: dict[int, int] = {}
    for item in spec.split(","):
        if not item.strip():
            raise UsageError(f"empty item in pack spec '{spec}'; expected PROFILE=COUNT[,PROFILE=COUNT...]")
        m = _ITEM_RE.match(item)
        if not m:
            raise UsageError(f"pack spec item '{item.strip()}' is not PROFILE=COUNT (e.g. 3g.20gb=4)")
        count_text = m.group("count")
        if not re.fullmatch(r"\d+", count_text):
            raise UsageError(f"count '{count_text}' for {m.group('name')} must be a non-negative integer")
        if len(count_text) > 9 or int(count_text) > MAX_PACK_INSTANCES:
            raise UsageError(f"count {count_text} for {m.group('name')} is too large: one --pack plan places at "
                             f"most {MAX_PACK_INSTANCES} instances")
        prof = resolve_gi_profile(model, m.group("name"))
        counts[prof.id] = counts.get(prof.id, 0) + int(count_text)
    total = sum(counts.values())
    if total > MAX_PACK_INSTANCES:
        raise UsageError(f"--pack asks for {total} instances in total; one plan places at most "
                         f"{MAX_PACK_INSTANCES}")
    return counts


def check_policy(policy: str | None) -> None:
    """Refuse an unknown ``--policy`` up front, before any work (None: the configured one is used)."""
    if policy is not None and policy not in POLICIES:
        raise UsageError(f"unknown placement policy '{policy}'; choose one of {', '.join(POLICIES)}")


def pack_plan(spec: str, model_id: str, policy: str | None = None) -> dict[str, Any]:
    """The fewest GPUs of ``model_id`` holding the instances in ``spec``, with explicit placements.

    The pack is optimal whatever the policy (it is an offline search, not one decision at a time), so
    ``policy`` changes nothing; it is still checked, because a mistyped one must not look accepted.
    """
    check_policy(policy)
    model = load_catalog().get(model_id)
    counts = parse_pack_spec(spec, model_id)
    assert model.mig is not None    # parse_pack_spec refuses non-MIG models
    geom = model.mig
    gpus = pack(geom, counts)
    return {
        "model": model.id,
        "gpus": [
            {"instances": [{"profile": geom.profile(p.profile_id).name, "profile_id": p.profile_id,
                            "start": p.start, "size": p.size} for p in sorted(layout)]}
            for layout in gpus
        ],
        "gpu_count": len(gpus),
        "lower_bound": compute_lower_bound(geom, counts),
    }


def defrag_plan(ctx: Any, profile_name: str, *, gpu_selector: str = "all",
                include_allocated: bool = False, policy: str | None = None) -> dict[str, Any]:
    """``gpuvirt plan --defrag --for PROFILE``: the fewest instance moves on this host that make room for
    one more GPU instance of ``profile_name`` on the selected GPUs.  Reads the host, changes nothing.

    Instances gpuvirt did not create never move (they are not ours to destroy).  Instances allocated to a
    VM, or carrying a MIG-backed vGPU, move only with ``include_allocated``.  Returns::

        {"profile", "include_allocated", "fits_now", "impossible", "reason",
         "target": {"gpu", "start", "profile", "profile_id"} | None,
         "moves": [{"from": {"gpu", "start"}, "to": {"gpu", "start"}, "profile", "profile_id", "size",
                    "instance_id", "allocated_to", "description"}, ...]}

    ``moves`` is in execution order; every intermediate layout is legal.
    """
    from gpuvirt.inventory.models import ACTIVE, MIG
    from gpuvirt.model.planner import GpuState, apply_moves, choose_placement, defrag_detailed
    from gpuvirt.service import hostview

    from gpuvirt.service import health

    check_policy(policy)
    view = hostview.snapshot(ctx)
    selected = [g for g in view.select(gpu_selector)
                if g.mig_capable and g.mig_current and g.model is not None and g.model.mig is not None]
    if not selected:
        raise UsageError("no MIG-enabled GPU among the selected GPUs (apply a MIG profile first)")
    # an unhealthy GPU is neither a target nor a place to move instances to; unhealthy instances stay put
    sick = health.current(ctx)
    healthy = [g for g in selected if sick.gpu_ok(g.address)]
    if not healthy:
        raise CapacityError("every selected MIG GPU is unhealthy (see 'gpuvirt health'); nothing can be placed "
                            "there until it recovers")
    selected = healthy
    resolved: dict[str, Any] = {}
    first_error: ProfileError | None = None
    for g in selected:
        try:
            resolved[g.address] = resolve_gi_profile(g.model, profile_name)
        except ProfileError as exc:
            first_error = first_error or exc
    if not resolved:
        assert first_error is not None
        raise first_error

    with ctx.inventory.unit(write=True, action="plan") as uow:
        rows = hostview.record(ctx, view, uow)
        host_rows = uow.instances(ctx.settings.host_id)
        backing = {r.backing_instance_id for r in host_rows if r.backing_instance_id is not None}
        info: dict[tuple[str, Placed], dict[str, Any]] = {}
        pinned: dict[str, set[Placed]] = {}
        for g in selected:
            ours: dict[tuple, Any] = {}
            for r in host_rows:
                if r.gpu_id == rows[g.address].id and r.kind == MIG:
                    key = (r.profile_id, r.placement_start)
                    if key not in ours or r.state == ACTIVE:
                        ours[key] = r
            pinned[g.address] = set()
            for p in g.layout():
                row = ours.get((p.profile_id, p.start))
                in_use = row is not None and (row.allocation is not None or row.id in backing)
                info[(g.address, p)] = {
                    "instance_id": row.id if row else None,
                    "allocated_to": row.allocation.vm_name if row is not None and row.allocation else None,
                    "backs_vgpu": row is not None and row.id in backing,
                }
                # foreign instances, ours half-way through a create/destroy, and unhealthy ones never move
                if row is None or row.state != ACTIVE or (in_use and not include_allocated) or \
                        not sick.instance_ok(row.id):
                    pinned[g.address].add(p)

    policy = policy or ctx.settings.policies.get("mig_placement", "frag-aware")
    labels = {g.address: g.label for g in selected}
    best: tuple[list[Any], list[GpuState], int] | None = None
    complete = True
    # one search per profile id: on a mixed host the same name can map to different ids per model
    for pid in sorted({p.id for p in resolved.values()}):
        gpus = [GpuState(g.address, g.model.mig, tuple(sorted(g.layout())), frozenset(pinned[g.address]))
                for g in selected if g.address in resolved and resolved[g.address].id == pid]
        res = defrag_detailed(gpus, pid)
        complete &= res.complete
        if res.moves is not None and (best is None or len(res.moves) < len(best[0])):
            best = (res.moves, gpus, pid)

    doc: dict[str, Any] = {"profile": profile_name, "include_allocated": include_allocated, "fits_now": False,
                           "impossible": False, "reason": None, "target": None, "moves": []}
    if best is None:
        doc["impossible"] = True
        doc["reason"] = (_why_no_room(selected, resolved, pinned, include_allocated) if complete else
                         "the search gave up after its node limit (too many instances to search exhaustively); "
                         "select fewer GPUs with --gpu")
        return doc
    moves, gpus, pid = best
    after = apply_moves(gpus, moves)
    d = choose_placement(after, pid, policy)
    assert d is not None    # defrag only answers with a sequence after which the profile fits
    prof = next(g for g in selected if g.address == d.gpu_key).model.mig.profile(pid)
    doc["fits_now"] = not moves
    doc["target"] = {"gpu": d.gpu_key, "start": d.start, "profile": prof.name, "profile_id": pid}
    for mv in moves:
        geom = next(g for g in gpus if g.key == mv.src_gpu).geometry
        name = geom.profile(mv.instance.profile_id).name
        meta = info.get((mv.src_gpu, mv.instance), {})
        owner = f" (allocated to VM {meta['allocated_to']})" if meta.get("allocated_to") else ""
        doc["moves"].append({
            "from": {"gpu": mv.src_gpu, "start": mv.instance.start},
            "to": {"gpu": mv.dst_gpu, "start": mv.dst_start},
            "profile": name, "profile_id": mv.instance.profile_id, "size": mv.instance.size,
            "instance_id": meta.get("instance_id"), "allocated_to": meta.get("allocated_to"),
            "description": (f"move {name} on {labels[mv.src_gpu]} from start {mv.instance.start} to start "
                            f"{mv.dst_start}{owner}" if mv.src_gpu == mv.dst_gpu else
                            f"move {name} from {labels[mv.src_gpu]} start {mv.instance.start} to "
                            f"{labels[mv.dst_gpu]} start {mv.dst_start}{owner}"),
        })
        # a later move of the same instance must find its metadata under its new place
        info[(mv.dst_gpu, mv.dst)] = meta
    return doc


def _why_no_room(selected: list[Any], resolved: dict[str, Any], pinned: dict[str, set[Placed]],
                 include_allocated: bool) -> str:
    from gpuvirt.model.mig import compute_used

    need = min(p.compute_slices for p in resolved.values())
    free = sum(g.model.mig.compute_slices - compute_used(g.model.mig, g.layout())
               for g in selected if g.address in resolved)
    if free < need:
        return f"only {free} free compute slice(s) on the selected GPUs; the profile needs {need}"
    if any(pinned.values()) and not include_allocated:
        return ("instances allocated to VMs (or not created by gpuvirt) are in the way; "
                "--include-allocated lets allocated ones move")
    return ("no sequence of single-instance moves reaches a layout with room (no free slot to move the first "
            "instance to); rebuilding a GPU would be needed")
