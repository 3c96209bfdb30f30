"""Placement services that need no host: ``gpuvirt plan --pack SPEC --model M``.

The answer is a plain dict so the CLI can print it as JSON unchanged; its shape is part of the CLI
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

from gpuvirt.errors import ProfileError, UsageError
from gpuvirt.model.catalog import load_catalog, resolve_gi_profile
from gpuvirt.model.planner import compute_lower_bound, pack

_ITEM_RE = re.compile(r"^\s*(?P<name>[^=\s]+)\s*=\s*(?P<count>[^=]*?)\s*$")


def parse_pack_spec(spec: str, model_id: str) -> dict[int, int]:
    """``"3g.20gb=4,1g.5gb=10"`` -> {profile id: count} for ``model_id``; repeated names add up."""
    model = load_catalog().get(model_id)
    if model.mig is None:
        raise ProfileError(f"{model.display_name} does not support MIG; --pack needs a MIG-capable model",
                           model=model.id)
    if not spec or not spec.strip():
        raise UsageError("empty pack spec; expected PROFILE=COUNT[,PROFILE=COUNT...], e.g. 3g.20gb=4,1g.5gb=10")
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
        prof = resolve_gi_profile(model, m.group("name"))
        counts[prof.id] = counts.get(prof.id, 0) + int(count_text)
    return counts


def pack_plan(spec: str, model_id: str) -> dict[str, Any]:
    """The fewest GPUs of ``model_id`` holding the instances in ``spec``, with explicit placements."""
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
