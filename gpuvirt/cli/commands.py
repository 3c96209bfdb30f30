"""Top-level commands (each: parse, call one service function, render)."""

from __future__ import annotations

from typing import List, Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.render import console, emit_json, slice_picture, table
from gpuvirt.cli.state import state

# --- discover ---------------------------------------------------------------------------------------------


@app.command()
def discover(ctx: typer.Context,
             json_out: bool = typer.Option(False, "--json", help="Machine-readable output (docs/discover-schema.md).")
             ) -> None:
    """Show GPUs, MIG state, mdev parents/types/devices, vendor-VFIO VFs and SR-IOV functions."""
    from gpuvirt.service.discover import discover as svc

    doc = svc(state(ctx).context())
    if json_out:
        emit_json(doc, compact=True)
        return
    render_discovery(doc)


def render_discovery(doc: dict) -> None:
    out = console()
    nv = doc["nvml"]
    out.print(f"[bold]Host[/bold] {doc['host']['hostname']}  root={doc['host']['root']}  NVML: "
              + (f"driver {nv['driver_version']}" if nv["available"] else f"unavailable ({nv['reason']})"))
    if doc["gpus"]:
        rows = []
        for g in doc["gpus"]:
            mig = g["mig"]
            mode = "n/a" if not mig["supported"] else (
                ("on" if mig["current"] else "off") + (" (pending " + ("on" if mig["pending"] else "off") + ")"
                                                       if mig["pending"] != mig["current"] else ""))
            rows.append([g["index"], g["pci_address"], g["name"], f"{g['memory_mib']} MiB", mode,
                         len(mig["gpu_instances"]), g["uuid"]])
        out.print(table("NVIDIA GPUs (NVML)", ["#", "PCI", "name", "memory", "MIG", "GIs", "UUID"], rows))
        for g in doc["gpus"]:
            mig = g["mig"]
            if mig["supported"] and mig["current"]:
                size = max([p["placements"][0]["start"] + p["placements"][0]["size"]
                            for p in mig["gpu_instance_profiles"] if p["placements"]] or [8])
                out.print(f"  GPU {g['index']} memory slices: {slice_picture(size, mig['gpu_instances'])}")
    if doc["pci_gpus"]:
        out.print(table("PCI display devices", ["PCI", "vendor", "device", "role", "model", "driver", "IOMMU"],
                        [[d["address"], d["vendor"], d["device_id"], d["role"], d["model"] or d["name"] or "?",
                          d["driver"], d["iommu_group"]] for d in doc["pci_gpus"]
                         if d["role"] == "pf" or len(doc["pci_gpus"]) <= 16]))
    if doc["sriov_pfs"]:
        out.print(table("SR-IOV physical functions", ["PF", "vendor", "model", "VFs enabled", "VFs total"],
                        [[p["address"], p["vendor"], p["model"], p["num_vfs"], p["total_vfs"]]
                         for p in doc["sriov_pfs"]]))
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
        out.print(table("mdev parents", ["parent", "types", "devices", "creatable now (free parents)"], rows))
    if doc["mdev_devices"]:
        out.print(table("mdev devices", ["UUID", "parent", "type", "IOMMU"],
                        [[d["uuid"], d["parent"], d["type"], d["iommu_group"]] for d in doc["mdev_devices"]]))
    if doc["vfio_vfs"]:
        groups2: dict[str, list] = {}
        for v in doc["vfio_vfs"]:
            groups2.setdefault(v["physfn"] or "?", []).append(v)
        out.print(table("vendor-specific VFIO VFs", ["PF", "VFs", "with a vGPU", "creatable types (free VF)"],
                        [[pf, len(vs), sum(1 for v in vs if v["current_type"]),
                          max((len(v["creatable_types"]) for v in vs if not v["current_type"]), default=0)]
                         for pf, vs in groups2.items()]))
    if doc["warnings"]:
        err = console(stderr=True)
        for w in doc["warnings"]:
            err.print(f"[yellow]warning:[/yellow] {w['path']}: {w['message']}")


# --- sim ----------------------------------------------------------------------------------------------------
sim_app = typer.Typer(help="Simulated hosts (sysfs tree + NVML) for trying gpuvirt without a GPU.",
                      no_args_is_help=True)
app.add_typer(sim_app, name="sim")


@sim_app.command("models")
def sim_models(json_out: bool = typer.Option(False, "--json")) -> None:
    """List the GPU models the simulator (and the catalog) knows."""
    from gpuvirt.service import simulator

    rows = simulator.models()
    if json_out:
        emit_json(rows)
        return
    for r in rows:
        print(r["id"])


@sim_app.command("init")
def sim_init(directory: str = typer.Argument(..., metavar="DIR"),
             gpu: List[str] = typer.Option(..., "--gpu", help="MODEL[:COUNT]; repeatable."),
             seed: Optional[str] = typer.Option(None, "--seed", help="Seed for UUIDs (reproducible hosts)."),
             vgpu_interface: Optional[str] = typer.Option(None, "--vgpu-interface",
                                                          help="The host-wide vGPU interface: mdev | "
                                                               "vendor-vfio (default: the boards' usual one; "
                                                               "vendor-vfio when they differ)."),
             no_vfs: bool = typer.Option(False, "--no-vfs", help="Leave SR-IOV VFs disabled."),
             mig: bool = typer.Option(False, "--mig", help="Start with MIG mode enabled on MIG-capable GPUs."),
             no_driver: bool = typer.Option(False, "--no-driver", help="Simulate a host without libnvidia-ml."),
             force: bool = typer.Option(False, "--force", help="Replace an existing simulated host in DIR."),
             json_out: bool = typer.Option(False, "--json")) -> None:
    """Create a simulated host in DIR."""
    from gpuvirt.service import simulator

    doc = simulator.init(directory, gpu, seed=seed, vgpu_interface=vgpu_interface, enable_vfs=not no_vfs,
                         mig_enabled=mig, no_driver=no_driver, force=force)
    if json_out:
        emit_json(doc)
        return
    print(f"simulated host {doc['dir']}: " + ", ".join(
        f"{d['model']}@{d['address']}" for d in doc["devices"]))


@sim_app.command("show")
def sim_show(directory: str = typer.Argument(..., metavar="DIR"), json_out: bool = typer.Option(False, "--json")) -> None:
    """Show the simulator's own view of a simulated host."""
    from gpuvirt.service import simulator

    doc = simulator.show(directory)
    if json_out:
        emit_json(doc)
        return
    console().print(table(f"simulated host {doc['dir']} (boot {doc['boot']})",
                          ["model", "address", "NVML", "VFs", "MIG cur/pend", "GIs", "clients"],
                          [[d["model"], d["address"], d["nvml_index"], d["vfs"], d["mig"], d["gpu_instances"],
                            ",".join(d["clients"])] for d in doc["devices"]]))
    # a fault with no firings left stays in the state (it documents the run) but is no longer pending
    pending = sum(1 for f in doc["faults"] if f.get("times", 1) > 0)
    print(f"mdevs: {doc['mdevs']}  pending faults: {pending}")


@sim_app.command("reboot")
def sim_reboot(directory: str = typer.Argument(..., metavar="DIR")) -> None:
    """Reboot a simulated host: VFs, mdevs, vGPU types and MIG instances vanish (MIG mode per architecture)."""
    from gpuvirt.service import simulator

    doc = simulator.reboot(directory)
    print(f"rebooted {doc['dir']} (boot {doc['boot']})")


@sim_app.command("fault")
def sim_fault(directory: str = typer.Argument(..., metavar="DIR"),
              op: Optional[str] = typer.Option(None, "--op", help="mdev.create, mdev.remove, vgpu.set, vgpu.clear, "
                                               "sriov.enable, sriov.disable, pci.reset, nvml.CreateGpuInstance, "
                                               "nvml.DestroyGpuInstance, nvml.CreateComputeInstance, "
                                               "nvml.DestroyComputeInstance, nvml.SetMigMode"),
              skip: int = typer.Option(0, "--skip", help="Let this many matching operations succeed first."),
              times: int = typer.Option(1, "--times", help="Fail this many operations."),
              errno: Optional[str] = typer.Option(None, "--errno", help="errno name for sysfs faults (default EIO)."),
              nvml: Optional[int] = typer.Option(None, "--nvml", help="NVML return code for NVML faults."),
              match: Optional[str] = typer.Option(None, "--match", help="Only operations whose target contains this."),
              kill: Optional[str] = typer.Option(None, "--kill", help="Instead of failing, SIGKILL the calling process "
                                                 "'before' or 'after' the operation takes effect."),
              clear: bool = typer.Option(False, "--clear", help="Remove all pending faults.")) -> None:
    """Inject a fault into the simulated kernel or NVML."""
    from gpuvirt.errors import UsageError
    from gpuvirt.service import simulator

    if clear:
        simulator.clear_faults(directory)
        return
    if not op:
        raise UsageError("give --op (or --clear)")
    simulator.fault(directory, op, skip=skip, times=times, errno=errno, nvml=nvml, match=match, kill=kill)


@sim_app.command("open")
def sim_open(directory: str = typer.Argument(..., metavar="DIR"),
             device: str = typer.Argument(..., help="mdev UUID or VF PCI address"),
             vm_uuid: Optional[str] = typer.Option(None, "--vm-uuid", help="UUID the VM was started with (QEMU "
                                                   "-uuid), reported by the host driver for a vGPU.")) -> None:
    """Mark a device as held open by a running VM (its VFIO file is open)."""
    from gpuvirt.service import simulator

    simulator.set_open(directory, device, True, vm_uuid=vm_uuid)


@sim_app.command("close")
def sim_close(directory: str = typer.Argument(..., metavar="DIR"),
              device: str = typer.Argument(..., help="mdev UUID or VF PCI address")) -> None:
    """Mark a device as no longer open."""
    from gpuvirt.service import simulator

    simulator.set_open(directory, device, False)


@sim_app.command("client")
def sim_client(directory: str = typer.Argument(..., metavar="DIR"),
               gpu: str = typer.Argument(..., help="GPU PCI address, UUID or NVML index"),
               name: str = typer.Argument(..., help="process name, e.g. nvidia-persistenced"),
               remove: bool = typer.Option(False, "--remove")) -> None:
    """Add (or --remove) a process holding a GPU: it blocks MIG mode changes and GPU resets."""
    from gpuvirt.service import simulator

    simulator.client(directory, gpu, name, not remove)


@sim_app.command("driver")
def sim_driver(directory: str = typer.Argument(..., metavar="DIR"),
               loaded: bool = typer.Option(True, "--loaded/--unloaded")) -> None:
    """Load or unload the simulated NVIDIA driver (NVML availability)."""
    from gpuvirt.service import simulator

    simulator.driver(directory, loaded)


@sim_app.command("repair")
def sim_repair(directory: str = typer.Argument(..., metavar="DIR")) -> None:
    """Rewrite the simulated sysfs tree from the simulator state (undoes deliberate damage)."""
    from gpuvirt.service import simulator

    simulator.repair(directory)


from gpuvirt.cli import ops_cmd  # noqa: E402,F401
from gpuvirt.cli import profile_cmd  # noqa: E402,F401
from gpuvirt.cli import vmm_cmd  # noqa: E402,F401
from gpuvirt.cli import demo_cmd  # noqa: E402,F401
from gpuvirt.cli import report_cmd  # noqa: E402,F401
from gpuvirt.cli import health_cmd  # noqa: E402,F401
