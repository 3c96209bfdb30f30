"""Prometheus text exposition of the capacity report (docs/capacity-report.md "Metrics"), written for
node_exporter's textfile collector or a scrape.  Split from :mod:`gpuvirt.service.report`."""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

def to_prometheus(doc: dict[str, Any]) -> bytes:
    """Prometheus text exposition of the report (gauges; docs/capacity-report.md "Metrics").

    Stale hosts contribute ``gpuvirt_host_stale 1`` and their age only: their last figures are not capacity.
    """
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()

    def g(name: str, doc_: str, labels: Sequence[str]) -> Gauge:
        return Gauge(name, doc_, list(labels), registry=reg)

    host_stale = g("gpuvirt_host_stale", "1 when the host has not reported within stale_after_seconds", ["host"])
    host_age = g("gpuvirt_host_last_seen_age_seconds", "Seconds since the host last recorded itself", ["host"])
    gpu_info = g("gpuvirt_gpu_info", "One per GPU counted as capacity, with its model and mode",
                 ["host", "gpu", "model", "mode"])
    insts = g("gpuvirt_instances", "Instances per GPU by kind and state (in_use, free, pending, foreign)",
              ["host", "gpu", "kind", "state"])
    placeable = g("gpuvirt_mig_placeable_now", "More instances of the MIG profile that fit the GPU now, given the "
                  "actual placements", ["host", "gpu", "model", "profile"])
    mig_free_inst = g("gpuvirt_mig_free_instances", "Existing unallocated MIG instances of the profile",
                      ["host", "gpu", "model", "profile"])
    free_mem = g("gpuvirt_mig_free_memory_slices", "Free MIG memory slices", ["host", "gpu", "model"])
    free_cs = g("gpuvirt_mig_free_compute_slices", "Free MIG compute slices", ["host", "gpu", "model"])
    stranded = g("gpuvirt_mig_stranded_slices", "Free memory slices no MIG profile of the model can use now",
                 ["host", "gpu", "model"])
    vavail = g("gpuvirt_vgpu_available", "More vGPUs of the type the board would accept now",
               ["host", "gpu", "type"])
    vfree = g("gpuvirt_vgpu_free_instances", "Existing unallocated vGPUs of the type", ["host", "gpu", "type"])
    mavail = g("gpuvirt_mdev_available", "More mdevs of the (non-NVIDIA) type the parent's pool allows",
               ["host", "gpu", "type"])
    vfs_free = g("gpuvirt_vfs_free", "Unallocated whole SR-IOV VFs recorded by gpuvirt", ["host", "gpu"])
    t_inst = g("gpuvirt_tenant_instances", "Instances held by the tenant in the report's scope", ["tenant"])
    t_mem = g("gpuvirt_tenant_memory_mib", "GPU memory held by the tenant in the report's scope", ["tenant"])
    t_cs = g("gpuvirt_tenant_compute_slices", "MIG compute slices held by the tenant in the report's scope",
             ["tenant"])
    q_inst = g("gpuvirt_tenant_quota_instances", "Instance quota of the tenant (absent: none)", ["tenant"])
    q_mem = g("gpuvirt_tenant_quota_memory_mib", "GPU memory quota of the tenant (absent: none)", ["tenant"])
    q_cs = g("gpuvirt_tenant_quota_compute_slices", "Compute slice quota of the tenant (absent: none)", ["tenant"])
    u_inst = g("gpuvirt_tenant_quota_used_instances", "Instances counted against the quota (all hosts)",
               ["tenant"])
    u_mem = g("gpuvirt_tenant_quota_used_memory_mib", "GPU memory counted against the quota (all hosts)",
              ["tenant"])
    u_cs = g("gpuvirt_tenant_quota_used_compute_slices", "Compute slices counted against the quota (all hosts)",
             ["tenant"])
    fit_req = g("gpuvirt_fit_requested", "Instances asked for with --fit", ["request"])
    fit_placed = g("gpuvirt_fit_placeable", "Of those, how many could be placed now", ["request"])
    generated = g("gpuvirt_report_generated_timestamp_seconds", "When the report was made (Unix time)", [])

    for h in doc["hosts"]:
        host_stale.labels(h["host"]).set(1 if h["stale"] else 0)
        if h["age_seconds"] is not None:
            host_age.labels(h["host"]).set(h["age_seconds"])
        if h["stale"]:
            continue
        for e in h["gpus"]:
            hid, gid, model = e["host"], e["gpu"], e["model"] or ""
            gpu_info.labels(hid, gid, model, e["mode"]).set(1)
            for kind, d in e["instances"]["by_kind"].items():
                for state, n in d.items():
                    insts.labels(hid, gid, kind, state).set(n)
            if "placeable_now" in e:
                for prof, n in e["placeable_now"].items():
                    placeable.labels(hid, gid, model, prof).set(n)
                    mig_free_inst.labels(hid, gid, model, prof).set(e["free_instances"].get(prof, 0))
                free_mem.labels(hid, gid, model).set(e["free_memory_slices"])
                free_cs.labels(hid, gid, model).set(e["free_compute_slices"])
                stranded.labels(hid, gid, model).set(e["stranded_slices"])
            for name, t in e.get("vgpu_types", {}).items():
                vavail.labels(hid, gid, name).set(t["available"])
                vfree.labels(hid, gid, name).set(t["free"])
            for name, t in e.get("mdev_types", {}).items():
                mavail.labels(hid, gid, name).set(t["available"])
            if "vfs" in e:
                vfs_free.labels(hid, gid).set(e["vfs"]["free"])
    for t in doc["tenants"]:
        name = t["tenant"] or ""
        t_inst.labels(name).set(t["instances"])
        t_mem.labels(name).set(t["memory_mib"])
        t_cs.labels(name).set(t["compute_slices"])
        q = t["quota"]
        if q is not None:
            for gauge, key in ((q_inst, "instances"), (q_mem, "memory_mib"), (q_cs, "compute_slices")):
                if q[key] is not None:
                    gauge.labels(name).set(q[key])
            u_inst.labels(name).set(t["usage"]["instances"])
            u_mem.labels(name).set(t["usage"]["memory_mib"])
            u_cs.labels(name).set(t["usage"]["compute_slices"])
    if doc.get("fit"):
        for r in doc["fit"]["requests"]:
            fit_req.labels(r["request"]).set(r["count"])
            fit_placed.labels(r["request"]).set(r["placed"])
    generated.set(dt.datetime.fromisoformat(doc["generated_at"].rstrip("Z")).replace(
        tzinfo=dt.timezone.utc).timestamp())
    return generate_latest(reg)


__all__ = ["to_prometheus"]
