"""Tenants and their quotas (``gpuvirt tenant set-quota | list | show``).

A tenant is a name on allocations (``attach --tenant``).  A quota is optional and cluster-wide: attach checks
what the tenant already holds on every host sharing the inventory (``Unit.tenant_usage``) plus what it is
about to take, under a row lock on PostgreSQL so that attaches on different hosts cannot both slip under
the limit.  Every limit may be absent (no limit); lowering one below what the tenant holds now is refused
unless forced, because it would silently turn every later attach of that tenant into a refusal.
"""

from __future__ import annotations

import re
from typing import Any

from gpuvirt.context import Context
from gpuvirt.errors import ConflictError, NotFoundError, UsageError
from gpuvirt.service.attach import check_tenant

LIMITS = ("instances", "memory_mib", "compute_slices")
_COLUMN = {"instances": "max_instances", "memory_mib": "max_memory_mib", "compute_slices": "max_compute_slices"}
# the columns' integer ranges (Integer, BigInteger, Integer)
_MAX = {"instances": 2**31 - 1, "memory_mib": 2**63 - 1, "compute_slices": 2**31 - 1}
_CLEAR = ("none", "unlimited", "-")


def parse_limit(value: Any, what: str) -> int | None:
    """A limit from the command line: a non-negative integer, or ``none`` to remove the limit."""
    if isinstance(value, bool):
        raise UsageError(f"--{what.replace('_', '-')}: expected a non-negative integer or 'none', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().lower()
        if text in _CLEAR:
            return None
        if not re.fullmatch(r"\d+", text):
            raise UsageError(f"--{what.replace('_', '-')}: expected a non-negative integer or 'none', "
                             f"got {value!r}")
        n = int(text)
    if n < 0 or n > _MAX[what]:
        raise UsageError(f"--{what.replace('_', '-')}: {n} is out of range (0 to {_MAX[what]})")
    return n


def _quota_of(row: Any) -> dict[str, int | None] | None:
    if row is None:
        return None
    return {k: getattr(row, _COLUMN[k]) for k in LIMITS}


def _summary(name: str | None, row: Any, used: dict[str, int]) -> dict[str, Any]:
    quota = _quota_of(row)
    remaining = None if quota is None else {k: (None if v is None else v - used[k]) for k, v in quota.items()}
    return {"tenant": name, "quota": quota, "usage": dict(used), "remaining": remaining,
            "over_quota": bool(remaining) and any(v is not None and v < 0 for v in remaining.values())}


def set_quota(ctx: Context, name: str, *, instances: Any = None, memory_mib: Any = None,
              compute_slices: Any = None, force: bool = False) -> dict[str, Any]:
    """Set (or with ``none`` remove) limits of a tenant; limits not given stay as they are.

    Refuses (ConflictError) a limit below what the tenant holds now across all hosts unless ``force``.
    """
    check_tenant(name)
    given = {k: v for k, v in (("instances", instances), ("memory_mib", memory_mib),
                               ("compute_slices", compute_slices)) if v is not None}
    if not given:
        raise UsageError("give at least one of --instances, --memory-mib, --compute-slices (a number, or 'none' "
                         "to remove that limit)")
    new = {k: parse_limit(v, k) for k, v in given.items()}
    with ctx.inventory.unit(write=True, action=f"set the quota of tenant {name}") as uow:
        row = uow.tenant(name)
        if row is not None:
            # serialise with attaches of this tenant on other hosts: they check usage under the same lock
            uow.lock_tenant(name)
        before = _quota_of(row)
        used = uow.tenant_usage(name)
        below = [f"{k.replace('_', ' ')} {v} < {used[k]} in use" for k, v in new.items()
                 if v is not None and v < used[k]]
        if below and not force:
            raise ConflictError(f"tenant {name}: quota below current usage ({'; '.join(below)}); free some "
                                "allocations first, or use --force (its next attaches will then be refused)")
        row = uow.set_tenant(name, **{_COLUMN[k]: v for k, v in new.items()})
        after = _quota_of(row)
        uow.event("tenant.set-quota", target=name,
                  detail={"before": before, "after": after, "force": force, "below_usage": below or None})
        return {**_summary(name, row, used), "changed": before != after, "before": before}


def list_tenants(ctx: Context) -> list[dict[str, Any]]:
    """Every tenant with a quota row or an allocation, with cluster-wide usage against its quota."""
    with ctx.inventory.unit(action="list tenants") as uow:
        rows = {t.name: t for t in uow.tenants()}
        usage = uow.tenant_usages()
    zero = {"instances": 0, "memory_mib": 0, "compute_slices": 0}
    names = sorted(set(rows) | {n for n in usage if n is not None})
    return [_summary(n, rows.get(n), usage.get(n, zero)) for n in names]


def show(ctx: Context, name: str) -> dict[str, Any]:
    """One tenant: quota, usage and every allocation on every host."""
    check_tenant(name)
    with ctx.inventory.unit(action=f"show tenant {name}") as uow:
        row = uow.tenant(name)
        used = uow.tenant_usage(name)
        allocs = uow.tenant_allocations(name)
    if row is None and not allocs:
        raise NotFoundError(f"unknown tenant '{name}': it has no quota and no allocations "
                            "(see 'gpuvirt tenant list')")
    out = _summary(name, row, used)
    out["allocations"] = [
        {"host": h, "gpu": gpu, "instance": iid, "kind": kind, "item": profile or type_name, "memory_mib": mem,
         "compute_slices": cs, "vm": vm, "vm_state": vm_state,
         "since": created.isoformat(timespec="seconds") + "Z" if created else None}
        for h, gpu, iid, kind, profile, type_name, mem, cs, vm, vm_state, created in allocs]
    out["hosts"] = sorted({a["host"] for a in out["allocations"]})
    return out


__all__ = ["set_quota", "list_tenants", "show", "parse_limit", "LIMITS"]
