"""Prometheus text exposition of the capacity report (docs/capacity-report.md "Metrics"), written for
node_exporter's textfile collector or a scrape.  Split from :mod:`gpuvirt.service.report`."""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable, Sequence

# labels of every per-VM-device series: a device is named by its GPU and either its mdev UUID or its VF
VM_LABELS = ("host", "gpu", "kind", "type", "mdev_uuid", "vf", "vm", "vm_uuid", "tenant")
ENGINES = ("sm", "memory", "encoder", "decoder")


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
    fit_refused = g("gpuvirt_fit_refused", "Of those refused, how many by why (shortage, stranded, live, cold, stop, "
                    "fits, not_analysed; the categories add up to the refused count)", ["request", "category"])
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
            rej = r.get("rejections")
            if rej:
                for c in ("shortage", "stranded", "live", "cold", "stop", "fits"):
                    fit_refused.labels(r["request"], c).set(rej[c]["count"])
                fit_refused.labels(r["request"], "not_analysed").set(rej["not_analysed"])
    _health_series(g, doc)
    _vm_device_series(g, doc)
    generated.set(_ts(doc["generated_at"]))
    return generate_latest(reg)


def _ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.rstrip("Z")).replace(tzinfo=dt.timezone.utc).timestamp()


def _health_series(g: Callable[..., Any], doc: dict[str, Any]) -> None:
    """GPU health and, per MIG GPU instance, who holds it and its health (hosts that are not stale)."""
    healthy = g("gpuvirt_gpu_healthy", "1 when the GPU is healthy, 0 while an XID keeps it out of placement",
                ["host", "gpu", "model"])
    since = g("gpuvirt_gpu_unhealthy_since_timestamp_seconds", "When the GPU's current unhealthy spell began "
              "(Unix time; unhealthy GPUs only)", ["host", "gpu"])
    needs_reset = g("gpuvirt_gpu_health_needs_reset", "1 when only a GPU reset ends the GPU's unhealthy spell "
                    "(unhealthy GPUs only)", ["host", "gpu"])
    sick = g("gpuvirt_instances_unhealthy", "Instances of the GPU that are unhealthy themselves (an XID named "
             "their MIG GPU instance)", ["host", "gpu"])
    mig_info = g("gpuvirt_mig_instance_info", "One per MIG GPU instance: its state and the consumer holding it "
                 "(empty: none)", ["host", "gpu", "instance", "profile", "start", "state", "consumer", "tenant"])
    mig_healthy = g("gpuvirt_mig_instance_healthy", "1 when the MIG GPU instance (and its GPU) is healthy",
                    ["host", "gpu", "instance", "profile", "start"])
    for h in doc["hosts"]:
        if h["stale"]:
            continue
        for e in h["gpus"]:
            hid, gid, hl = e["host"], e["gpu"], e["health"]
            healthy.labels(hid, gid, e["model"] or "").set(1 if hl["state"] == "healthy" else 0)
            if hl["state"] != "healthy":
                if hl.get("since"):
                    since.labels(hid, gid).set(_ts(hl["since"]))
                needs_reset.labels(hid, gid).set(1 if hl.get("needs_reset") else 0)
            bad = e["instances"]["unhealthy"]
            sick.labels(hid, gid).set(len(bad))
            layout = e.get("layout", [])
            holder = {a["instance"]: a for a in e["allocations"] if a["kind"] == "mig"} if layout else {}
            for r in layout:
                if r["instance"] is None:
                    continue            # not gpuvirt's: counted as foreign, no identity to label it with
                inst, start = str(r["instance"]), str(r["start"])
                a = holder.get(r["instance"]) or {}
                mig_info.labels(hid, gid, inst, r["profile"], start, r["state"], a.get("vm") or "",
                                a.get("tenant") or "").set(1)
                ok = hl["state"] == "healthy" and r["instance"] not in bad
                mig_healthy.labels(hid, gid, inst, r["profile"], start).set(1 if ok else 0)


def _vm_device_series(g: Callable[..., Any], doc: dict[str, Any]) -> None:
    """Per VM device (live reports): what the host's vGPU driver reports, or that it cannot see the device."""
    devices = doc.get("vm_devices") or []
    lab = list(VM_LABELS)
    observable = g("gpuvirt_vm_device_observable", "1 when the host driver can report figures for the VM's "
                   "device, 0 when it cannot see it; why: passthrough, generic-mdev, nvml-unavailable, nvml-error "
                   "(0), not-running, unallocated (1), empty when figures follow", lab + ["why"])
    active = g("gpuvirt_vgpu_active", "1 when the host driver lists the vGPU as running", lab)
    fb_used = g("gpuvirt_vgpu_fb_used_bytes", "Framebuffer the running vGPU uses", lab)
    fb_total = g("gpuvirt_vgpu_fb_total_bytes", "Framebuffer of the vGPU's type", lab)
    util = g("gpuvirt_vgpu_utilization_ratio", "Latest utilization sample of the running vGPU per engine (0-1)",
             lab + ["engine"])
    licensed = g("gpuvirt_vgpu_licensed", "1 when the guest holds a vGPU license", lab)
    lic_info = g("gpuvirt_vgpu_license_info", "The guest's license state and the status of its expiry date",
                 lab + ["state", "expiry_status"])
    expiry = g("gpuvirt_vgpu_license_expiry_timestamp_seconds", "When the guest's license expires (Unix time; "
               "only when the driver reports a valid expiry)", lab)
    for d in devices:
        values = [str(d.get(k) or "") for k in VM_LABELS]
        observable.labels(*values, d.get("why") or "").set(1 if d["observable"] else 0)
        if not d["observable"]:
            continue
        if d.get("fb_total_bytes") is not None:
            fb_total.labels(*values).set(d["fb_total_bytes"])
        active.labels(*values).set(1 if d["active"] else 0)
        if not d["active"]:
            continue
        if d.get("fb_used_bytes") is not None:
            fb_used.labels(*values).set(d["fb_used_bytes"])
        for eng in ENGINES:
            if d.get("utilization") and d["utilization"].get(eng) is not None:
                util.labels(*values, eng).set(d["utilization"][eng] / 100.0)
        lic = d.get("license")
        if lic is not None:
            licensed.labels(*values).set(1 if lic["licensed"] else 0)
            lic_info.labels(*values, lic["state"], lic["expiry_status"] or "").set(1)
            if lic.get("expiry"):
                expiry.labels(*values).set(_ts(lic["expiry"]))


__all__ = ["to_prometheus", "VM_LABELS"]
