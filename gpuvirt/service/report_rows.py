"""Rows of the capacity report: one per (host, GPU, item) and the ``--by`` groupings, and the CSV of them
(docs/capacity-report.md "CSV").  Split from :mod:`gpuvirt.service.report`, which builds the document."""

from __future__ import annotations

import csv
import io
from collections import Counter
from typing import Any, Iterator

from gpuvirt.service.report import MDEV, MIG, STATES, VF, VFIO_VGPU

DETAIL_COLUMNS = ("host", "stale", "gpu", "index", "model", "mode", "kind", "item", "in_use", "free", "pending",
                  "foreign", "available", "free_memory_slices", "free_compute_slices", "stranded_slices", "tenants")
GROUP_COLUMNS = {
    "gpu": DETAIL_COLUMNS,
    "host": ("host", "stale", "kind", "item", "gpus", "in_use", "free", "pending", "foreign", "available",
             "free_memory_slices", "free_compute_slices", "stranded_slices", "tenants"),
    "type": ("kind", "item", "models", "hosts", "gpus", "in_use", "free", "pending", "foreign", "available",
             "tenants"),
    "profile": ("kind", "item", "models", "hosts", "gpus", "in_use", "free", "pending", "foreign", "available",
                "free_memory_slices", "free_compute_slices", "stranded_slices", "tenants"),
    "tenant": ("tenant", "instances", "memory_mib", "compute_slices", "hosts", "quota_instances",
               "quota_memory_mib", "quota_compute_slices", "used_instances", "used_memory_mib",
               "used_compute_slices", "over_quota"),
}


def _tenants_text(d: dict[str, int]) -> str:
    # "acme=2;beta=1": allocations of the row's item per tenant ("" = no tenant)
    return ";".join(f"{k}={v}" for k, v in sorted(d.items()))


def _parse_tenants_text(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, text.split(";")):
        k, _, v = part.rpartition("=")
        out[k] = out.get(k, 0) + int(v)
    return out


def detail_rows(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One row per (host, GPU, profile / type / VF / whole GPU), columns ``DETAIL_COLUMNS``."""
    for h in doc["hosts"]:
        for e in h["gpus"]:
            base = {"host": e["host"], "stale": e["stale"], "gpu": e["gpu"], "index": e["index"],
                    "model": e["model"], "mode": e["mode"]}
            per_item: dict[tuple[str, str], dict[str, Any]] = {}
            for a in e["allocations"]:
                kind = {MIG: "mig-profile", MDEV: "vgpu-type" if a["item"] in e.get("vgpu_types", {}) else
                        "mdev-type", VFIO_VGPU: "vgpu-type", VF: "vf"}.get(a["kind"], a["kind"])
                d = per_item.setdefault((kind, a["item"]), {})
                tk = a["tenant"] or ""
                d[tk] = d.get(tk, 0) + 1
            layout_counts: dict[str, dict[str, int]] = {}
            for r in e.get("layout", []):
                c = layout_counts.setdefault(r["profile"], dict.fromkeys(STATES, 0))
                c[r["state"]] += 1
            if "placeable_now" in e:
                for name, n in e["placeable_now"].items():
                    c = layout_counts.get(name) or dict.fromkeys(STATES, 0)
                    yield {**base, "kind": "mig-profile", "item": name, **c, "available": n,
                           "free_memory_slices": e["free_memory_slices"],
                           "free_compute_slices": e["free_compute_slices"], "stranded_slices": e["stranded_slices"],
                           "tenants": _tenants_text(per_item.get(("mig-profile", name), {}))}
            for src, kind in (("vgpu_types", "vgpu-type"), ("mdev_types", "mdev-type")):
                for name, t in e.get(src, {}).items():
                    yield {**base, "kind": kind, "item": name, "in_use": t["in_use"], "free": t["free"],
                           "pending": 0, "foreign": 0, "available": t["available"], "free_memory_slices": None,
                           "free_compute_slices": None, "stranded_slices": None,
                           "tenants": _tenants_text(per_item.get((kind, name), {}))}
            if "vfs" in e:
                v = e["vfs"]
                yield {**base, "kind": "vf", "item": "vf", "in_use": v["in_use"], "free": v["free"], "pending": 0,
                       "foreign": 0, "available": v["free"], "free_memory_slices": None,
                       "free_compute_slices": None, "stranded_slices": None,
                       "tenants": _tenants_text(per_item.get(("vf", "vf"), {}))}
            if "whole_available" in e:
                yield {**base, "kind": "whole", "item": "gpu", "in_use": 0, "free": 0, "pending": 0, "foreign": 0,
                       "available": e["whole_available"], "free_memory_slices": None, "free_compute_slices": None,
                       "stranded_slices": None, "tenants": ""}


_SUMMED = ("in_use", "free", "pending", "foreign", "available", "free_memory_slices", "free_compute_slices",
           "stranded_slices")


def group_rows(doc: dict[str, Any], by: str) -> list[dict[str, Any]]:
    """Rows of the ``--by`` view (columns ``GROUP_COLUMNS[by]``).

    ``host``: per (host, kind, item), stale hosts included and flagged.  ``type`` / ``profile``: per
    (kind, item) over the GPUs of hosts that are not stale.  ``tenant``: one row per tenant.
    """
    if by == "gpu":
        return list(detail_rows(doc))
    if by == "tenant":
        out = []
        for t in doc["tenants"]:
            q = t["quota"] or {}
            out.append({"tenant": t["tenant"], "instances": t["instances"], "memory_mib": t["memory_mib"],
                        "compute_slices": t["compute_slices"], "hosts": len(t["hosts"]),
                        "quota_instances": q.get("instances"), "quota_memory_mib": q.get("memory_mib"),
                        "quota_compute_slices": q.get("compute_slices"), "used_instances": t["usage"]["instances"],
                        "used_memory_mib": t["usage"]["memory_mib"],
                        "used_compute_slices": t["usage"]["compute_slices"], "over_quota": t["over_quota"]})
        return out
    kinds = {"type": ("vgpu-type", "mdev-type"), "profile": ("mig-profile",),
             "host": ("mig-profile", "vgpu-type", "mdev-type", "vf", "whole")}[by]
    groups: dict[tuple, dict[str, Any]] = {}
    for r in detail_rows(doc):
        if r["kind"] not in kinds or (by != "host" and r["stale"]):
            continue
        key = (r["host"], r["kind"], r["item"]) if by == "host" else (r["kind"], r["item"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"kind": r["kind"], "item": r["item"], "gpus": 0, "_hosts": set(), "_models": set(),
                               "_tenants": Counter(), **{k: None for k in _SUMMED}}
            if by == "host":
                g["host"], g["stale"] = r["host"], r["stale"]
        g["gpus"] += 1
        g["_hosts"].add(r["host"])
        if r["model"]:
            g["_models"].add(r["model"])
        g["_tenants"].update(_parse_tenants_text(r["tenants"]))
        for k in _SUMMED:
            if r[k] is not None:
                g[k] = (g[k] or 0) + r[k]
    out = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        g = groups[key]
        g["hosts"] = len(g.pop("_hosts"))
        g["models"] = ";".join(sorted(g.pop("_models")))
        g["tenants"] = _tenants_text(dict(g.pop("_tenants")))
        out.append({c: g.get(c) for c in GROUP_COLUMNS[by]})
    return out


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def to_csv(doc: dict[str, Any]) -> str:
    """CSV of the report's rows: ``--by gpu`` gives one row per (host, GPU, item), other groupings their rows.
    Empty cell = not applicable; booleans are ``true`` / ``false``."""
    by = doc["scope"]["by"]
    cols = GROUP_COLUMNS[by]
    rows = doc["groups"]["rows"] if doc.get("groups") else detail_rows(doc)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_csv_value(r.get(c)) for c in cols])
    return buf.getvalue()


__all__ = ["DETAIL_COLUMNS", "GROUP_COLUMNS", "detail_rows", "group_rows", "to_csv"]
