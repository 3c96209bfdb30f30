"""``gpuvirt discover`` without ``--json``: the host as plain-text tables.

Plain columns, no typer and no rich: the command is run by people and by scripts alike (``| grep``,
``watch``), on hosts with hundreds of mdev parents, where the table form has to stay within 1.5x of
``mdevctl types`` (docs/benchmarks.md).  The typer command and the CLI's fast path both print through
``render_discovery``, so the two cannot drift apart.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from gpuvirt.cli.render import slice_picture

# control characters (a name read from sysfs may hold anything) are shown as "?": a table cell never
# breaks a line or sends an escape sequence to the terminal
_CONTROL = {c: "?" for c in (*range(32), 127)}


def _cell(value: Any) -> str:
    return "" if value is None else str(value).translate(_CONTROL)


def plain_table(title: str, columns: list[str], rows: list[list[Any]]) -> list[str]:
    """A title, a header, a rule and one line per row, columns padded to their widest cell."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    last = len(columns) - 1

    def line(values: list[str]) -> str:
        return "  ".join(v if i == last else v.ljust(widths[i]) for i, v in enumerate(values)).rstrip()

    return [title, line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells), ""]


def discovery_lines(doc: dict) -> list[str]:
    nv = doc["nvml"]
    lines = [f"Host {doc['host']['hostname']}  root={doc['host']['root']}  NVML: "
             + (f"driver {nv['driver_version']}" if nv["available"] else f"unavailable ({nv['reason']})"), ""]
    if doc["gpus"]:
        rows = []
        for g in doc["gpus"]:
            mig = g["mig"]
            mode = "n/a" if not mig["supported"] else (
                ("on" if mig["current"] else "off") + (" (pending " + ("on" if mig["pending"] else "off") + ")"
                                                       if mig["pending"] != mig["current"] else ""))
            sched = g.get("vgpu_scheduler")
            sched_text = "n/a" if not sched else (sched["policy"] or "unknown") + (
                f" {sched['timeslice_us']}us" if sched["timeslice_us"] is not None else "")
            rows.append([g["index"], g["pci_address"], g["name"], f"{g['memory_mib']} MiB", mode,
                         len(mig["gpu_instances"]), sched_text, g["uuid"]])
        lines += plain_table("NVIDIA GPUs (NVML)", ["#", "PCI", "name", "memory", "MIG", "GIs", "vGPU scheduler",
                                                    "UUID"], rows)
        pictures = []
        for g in doc["gpus"]:
            mig = g["mig"]
            if mig["supported"] and mig["current"]:
                size = max([p["placements"][0]["start"] + p["placements"][0]["size"]
                            for p in mig["gpu_instance_profiles"] if p["placements"]] or [8])
                pictures.append(_cell(f"  GPU {g['index']} memory slices: "
                                       f"{slice_picture(size, mig['gpu_instances'])}"))
        if pictures:
            lines += [*pictures, ""]
    if doc["pci_gpus"]:
        # with SR-IOV enabled a board is one PF and dozens of VFs: the VFs are listed when there are few
        lines += plain_table("PCI display devices", ["PCI", "vendor", "device", "role", "model", "driver", "IOMMU"],
                             [[d["address"], d["vendor"], d["device_id"], d["role"], d["model"] or d["name"] or "?",
                               d["driver"], d["iommu_group"]] for d in doc["pci_gpus"]
                              if d["role"] == "pf" or len(doc["pci_gpus"]) <= 16])
    if doc["sriov_pfs"]:
        lines += plain_table("SR-IOV physical functions", ["PF", "vendor", "model", "VFs enabled", "VFs total"],
                             [[p["address"], p["vendor"], p["model"], p["num_vfs"], p["total_vfs"]]
                              for p in doc["sriov_pfs"]])
    if doc["mdev_parents"]:
        # VFs of one board are listed as one row: 20 near-identical rows per GPU help nobody
        physfn = {d["address"]: d["physfn"] for d in doc["pci_gpus"] if d.get("physfn")}
        groups: dict[str, list] = {}
        for p in doc["mdev_parents"]:
            groups.setdefault(physfn.get(p["address"]) or p["address"], []).append(p)
        rows = []
        for owner, parents in groups.items():
            avail: dict[str, int] = {}
            for p in parents:
                for t in p["types"]:
                    if t["available_instances"] > 0:
                        label = t["name"] or t["id"]
                        avail[label] = avail.get(label, 0) + t["available_instances"]
            where = owner if len(parents) == 1 and parents[0]["address"] == owner else f"{owner} ({len(parents)} VFs)"
            text = ", ".join(f"{k} x{v}" for k, v in list(avail.items())[:8]) + (" …" if len(avail) > 8 else "")
            rows.append([where, len(parents[0]["types"]), sum(len(p["devices"]) for p in parents), text or "none"])
        lines += plain_table("mdev parents", ["parent", "types", "devices", "creatable now (free parents)"], rows)
    if doc["mdev_devices"]:
        lines += plain_table("mdev devices", ["UUID", "parent", "type", "IOMMU"],
                             [[d["uuid"], d["parent"], d["type"], d["iommu_group"]] for d in doc["mdev_devices"]])
    if doc["vfio_vfs"]:
        groups2: dict[str, list] = {}
        for v in doc["vfio_vfs"]:
            groups2.setdefault(v["physfn"] or "?", []).append(v)
        lines += plain_table("vendor-specific VFIO VFs", ["PF", "VFs", "with a vGPU", "creatable types (free VF)"],
                             [[pf, len(vs), sum(1 for v in vs if v["current_type"]),
                               max((len(v["creatable_types"]) for v in vs if not v["current_type"]), default=0)]
                              for pf, vs in groups2.items()])
    while len(lines) > 1 and lines[-1] == "":
        lines.pop()
    return lines


def render_discovery(doc: dict, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """The tables on stdout, the scan's warnings (one line each) on stderr."""
    out = out or sys.stdout
    out.write("\n".join(discovery_lines(doc)) + "\n")
    out.flush()
    if doc["warnings"]:
        err = err or sys.stderr
        err.write("".join(f"warning: {_cell(w['path'])}: {_cell(w['message'])}\n" for w in doc["warnings"]))
        err.flush()
