"""Top-level commands (each: parse, call one service function, render)."""

from __future__ import annotations

from typing import List, Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.discover_view import render_discovery
from gpuvirt.cli.render import console, emit_json, table
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
             device: str = typer.Argument(..., help="mdev UUID or VF PCI address")) -> None:
    """Mark a device as held open by a running VM (its VFIO file is open)."""
    from gpuvirt.service import simulator

    simulator.set_open(directory, device, True)


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


@sim_app.command("bind")
def sim_bind(directory: str = typer.Argument(..., metavar="DIR"),
             gpu: str = typer.Argument(..., help="GPU PCI address, UUID or NVML index"),
             driver: str = typer.Option(..., "--driver", help="nvidia | vfio-pci")) -> None:
    """Bind a GPU to vfio-pci (NVML loses it, /dev/vfio/<group> appears) or back to nvidia."""
    from gpuvirt.service import simulator

    r = simulator.bind(directory, gpu, driver)
    print(f"{r['gpu']} bound to {r['driver']}")


@sim_app.command("devnodes")
def sim_devnodes(directory: str = typer.Argument(..., metavar="DIR"),
                 mig_minors: Optional[str] = typer.Option(None, "--mig-minors", help="static | instances"),
                 caps_nodes: Optional[str] = typer.Option(None, "--caps-nodes", help="instances | none"),
                 caps_major: Optional[int] = typer.Option(None, "--caps-major"),
                 uvm_major: Optional[int] = typer.Option(None, "--uvm-major"),
                 drm: Optional[str] = typer.Option(None, "--drm", help="auto | true | false"),
                 minor: Optional[List[str]] = typer.Option(None, "--minor", metavar="GPU=MINOR",
                                                           help="Give a GPU another minor number (repeatable).")
                 ) -> None:
    """Device-node choices of the simulated driver (docs/simulator-fidelity.md)."""
    from gpuvirt.errors import UsageError
    from gpuvirt.service import simulator

    for item in minor or []:
        gpu, sep, num = item.rpartition("=")
        if not sep or not num.isdigit():
            raise UsageError(f"--minor {item!r}: expected GPU=MINOR")
        simulator.devnodes(directory, minor=(gpu, int(num)))
    doc = simulator.devnodes(directory, mig_minors=mig_minors, caps_nodes=caps_nodes, caps_major=caps_major,
                             uvm_major=uvm_major, drm=drm)
    print(" ".join(f"{k}={v}" for k, v in sorted(doc.items())))


@sim_app.command("repair")
def sim_repair(directory: str = typer.Argument(..., metavar="DIR")) -> None:
    """Rewrite the simulated sysfs tree from the simulator state (undoes deliberate damage)."""
    from gpuvirt.service import simulator

    simulator.repair(directory)


from gpuvirt.cli import ops_cmd  # noqa: E402,F401
from gpuvirt.cli import profile_cmd  # noqa: E402,F401
from gpuvirt.cli import vmm_cmd  # noqa: E402,F401
from gpuvirt.cli import demo_cmd  # noqa: E402,F401
from gpuvirt.cli import cdi_cmd  # noqa: E402,F401
from gpuvirt.cli import report_cmd  # noqa: E402,F401
