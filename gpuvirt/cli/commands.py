"""Top-level commands (each: parse, call one service function, render)."""

from __future__ import annotations

from typing import List, Optional

import typer

from gpuvirt.cli.app import app
from gpuvirt.cli.bounds import MAX_FAULT_COUNT
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
             vf_delay: Optional[float] = typer.Option(None, "--vf-delay", metavar="SECONDS",
                                                      help="VFs appear this long after sriov_numvfs is written."),
             registration_delay: Optional[float] = typer.Option(
                 None, "--registration-delay", metavar="SECONDS",
                 help="vGPU types appear this long after their VF (or, for a PF parent, after boot)."),
             reset: Optional[str] = typer.Option(None, "--reset", help="What <PF>/reset does: function (default: a "
                                                 "pending MIG mode stays pending) | gpu-reset (applies it)."),
             json_out: bool = typer.Option(False, "--json")) -> None:
    """Create a simulated host in DIR."""
    from gpuvirt.service import simulator

    doc = simulator.init(directory, gpu, seed=seed, vgpu_interface=vgpu_interface, enable_vfs=not no_vfs,
                         mig_enabled=mig, no_driver=no_driver, force=force,
                         behaviour={"vf_delay": vf_delay, "registration_delay": registration_delay, "reset": reset})
    if json_out:
        emit_json(doc)
        return
    print(f"simulated host {doc['dir']}: " + ", ".join(
        f"{d['model']}@{d['address']}" for d in doc["devices"]))


@sim_app.command("set")
def sim_set(directory: str = typer.Argument(..., metavar="DIR"),
            vf_delay: Optional[float] = typer.Option(None, "--vf-delay", metavar="SECONDS",
                                                     help="VFs appear this long after sriov_numvfs is written."),
            registration_delay: Optional[float] = typer.Option(
                None, "--registration-delay", metavar="SECONDS",
                help="vGPU types appear this long after their VF (or, for a PF parent, after boot)."),
            reset: Optional[str] = typer.Option(None, "--reset", help="function | gpu-reset"),
            unregistered_vfio: Optional[str] = typer.Option(
                None, "--unregistered-vfio", help="A vendor-VFIO VF before registration: empty (creatable list "
                                                  "with the header only) | absent (no nvidia/ directory)."),
            errno: Optional[List[str]] = typer.Option(None, "--errno", metavar="KEY=ERRNO",
                                                      help="An UNVERIFIED errno choice, e.g. mdev_remove_open=EAGAIN; "
                                                           "repeatable (keys: docs/simulator-fidelity.md)."),
            nvml_code: Optional[List[str]] = typer.Option(None, "--nvml-code", metavar="KEY=CODE",
                                                          help="An UNVERIFIED NVML return code choice."),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """Change how a simulated host behaves where the sources are silent (delays, reset, errno choices)."""
    from gpuvirt.service import simulator

    doc = simulator.configure(directory, vf_delay=vf_delay, registration_delay=registration_delay, reset=reset,
                              unregistered_vfio=unregistered_vfio, errnos=errno or [], nvml_codes=nvml_code or [])
    if json_out:
        emit_json(doc)
        return
    for k, v in doc.items():
        print(f"{k}: {', '.join(f'{a}={b}' for a, b in v.items()) if isinstance(v, dict) else v}")


@sim_app.command("trace")
def sim_trace(directory: str = typer.Argument(..., metavar="DIR"),
              action: str = typer.Argument(..., metavar="on|off|show|clear"),
              json_out: bool = typer.Option(False, "--json")) -> None:
    """Record every fault point the host passes (op, target, k-th occurrence), for kill-at-every-step tests."""
    from gpuvirt.service import simulator

    doc = simulator.trace(directory, action)
    if action != "show":
        return
    if json_out:
        emit_json(doc)
        return
    for t in doc["ops"]:
        print(f"{t['op']} {t['k']} {t['target']}")


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
    b = doc["behaviour"]
    print(f"vf delay: {b['vf_delay_s']:g}s  registration delay: {b['registration_delay_s']:g}s  reset: {b['reset']}  "
          f"tracing: {'on' if doc['trace_on'] else 'off'}")


@sim_app.command("reboot")
def sim_reboot(directory: str = typer.Argument(..., metavar="DIR")) -> None:
    """Reboot a simulated host: VFs, mdevs, vGPU types and MIG instances vanish (MIG mode per architecture)."""
    from gpuvirt.service import simulator

    doc = simulator.reboot(directory)
    print(f"rebooted {doc['dir']} (boot {doc['boot']})")


@sim_app.command("fault")
def sim_fault(directory: str = typer.Argument(..., metavar="DIR"),
              op: Optional[str] = typer.Option(None, "--op", help="mdev.create, mdev.remove, vgpu.set, vgpu.clear, "
                                               "sriov.enable, sriov.disable, pci.reset, vgpu.register, "
                                               "nvml.CreateGpuInstance, nvml.DestroyGpuInstance, "
                                               "nvml.CreateComputeInstance, nvml.DestroyComputeInstance, "
                                               "nvml.SetMigMode, nvml.SetVgpuSchedulerState; read calls "
                                               "(fail only): nvml.VgpuInstanceGetMetadata, "
                                               "nvml.DeviceGetVgpuMetadata, nvml.GetVgpuCompatibility"),
              skip: int = typer.Option(0, "--skip", min=0, max=MAX_FAULT_COUNT,
                                       help="Let this many matching operations succeed first."),
              times: int = typer.Option(1, "--times", min=1, max=MAX_FAULT_COUNT, help="Fail this many operations."),
              errno: Optional[str] = typer.Option(None, "--errno", help="errno name for sysfs faults (default EIO)."),
              nvml: Optional[int] = typer.Option(None, "--nvml", min=1, max=999,
                                                 help="NVML return code for NVML faults."),
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


@sim_app.command("migration")
def sim_migration(directory: str = typer.Argument(..., metavar="DIR"),
                  driver: Optional[str] = typer.Option(None, "--driver", help="Host (vGPU manager) driver version, "
                                                       "e.g. 550.127.05."),
                  os_release: Optional[str] = typer.Option(None, "--os", help="Hypervisor release as <os-release "
                                                           "ID>-<VERSION_ID>, e.g. rhel-9.4, ubuntu-24.04."),
                  kernel: Optional[str] = typer.Option(None, "--kernel", help="Kernel release (uname -r)."),
                  qemu: Optional[str] = typer.Option(None, "--qemu", help="QEMU version, e.g. 8.2.0."),
                  libvirt: Optional[str] = typer.Option(None, "--libvirt", help="libvirt version, e.g. 10.0.0."),
                  vgpu_supported: Optional[str] = typer.Option(None, "--vgpu-supported", metavar="MIN-MAX",
                                                               help="vGPU versions the host driver supports."),
                  vgpu_current: Optional[str] = typer.Option(None, "--vgpu-current", metavar="MIN-MAX",
                                                             help="vGPU versions it accepts now ('supported': all)."),
                  pgpu_cap: Optional[bool] = typer.Option(None, "--pgpu-migration-cap/--no-pgpu-migration-cap",
                                                          help="The GPUs report the migration capability."),
                  vgpu_cap: Optional[bool] = typer.Option(None, "--vgpu-migration-cap/--no-vgpu-migration-cap",
                                                          help="The vGPU types report the migration capability."),
                  mig_backed_live: Optional[bool] = typer.Option(None, "--mig-backed-live/--no-mig-backed-live",
                                                                 help="Rule: MIG-backed vGPUs may move live "
                                                                 "(UNVERIFIED; default no)."),
                  driver_match: Optional[str] = typer.Option(None, "--driver-match",
                                                             help="Rule: exact | branch | any."),
                  same_device_id: Optional[bool] = typer.Option(None, "--same-device-id/--any-device-id",
                                                                help="Rule: live only between GPUs of one PCI "
                                                                "device id."),
                  live_os: Optional[str] = typer.Option(None, "--live-os", help="Rule: comma-separated releases "
                                                        "with live migration, or 'any'."),
                  live_families: Optional[str] = typer.Option(None, "--live-families",
                                                              help="Rule: comma-separated GPU architectures with "
                                                              "live migration, or 'any'."),
                  rule: Optional[List[str]] = typer.Option(None, "--rule", metavar="KEY=VALUE",
                                                           help="Any other MigrationRules field, VALUE as JSON "
                                                           "(else text), e.g. min_qemu=8.1 or "
                                                           "'driver_ranges=[[\"550.0\",\"550.999\"]]'; "
                                                           "repeatable."),
                  json_out: bool = typer.Option(False, "--json")) -> None:
    """Set (or show) what a simulated host runs for VM moves and the rules its NVML answers compatibility with."""
    import json

    from gpuvirt.errors import UsageError
    from gpuvirt.service import simulator

    rules = {}
    for item in rule or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--rule '{item}': expected KEY=VALUE")
        if len(value) > 4096:
            raise UsageError(f"--rule {key.strip()[:40]!r}: the value is longer than 4096 characters")
        try:
            rules[key.strip()] = json.loads(value)
        except RecursionError:
            # nested deeper than the JSON decoder goes: no rule has more than two levels
            raise UsageError(f"--rule {key.strip()[:40]!r}: the value is nested too deeply") from None
        except ValueError:
            rules[key.strip()] = value
    for key, value in (("mig_backed_live", mig_backed_live), ("driver_match", driver_match),
                       ("same_device_id", same_device_id)):
        if value is not None:
            rules[key] = value
    for key, value in (("live_os", live_os), ("live_families", live_families)):
        if value is not None:
            rules[key] = None if value.strip() == "any" else [v.strip() for v in value.split(",") if v.strip()]
    doc = simulator.migration(directory, driver=driver, os=os_release, kernel=kernel, qemu=qemu, libvirt=libvirt,
                              vgpu_supported=vgpu_supported, vgpu_current=vgpu_current, pgpu_migration_cap=pgpu_cap,
                              vgpu_migration_cap=vgpu_cap, rules=rules or None)
    if json_out:
        emit_json(doc)
        return
    print(f"driver {doc['driver']}, {doc['os']}, kernel {doc['kernel']}, QEMU {doc['qemu']}, libvirt "
          f"{doc['libvirt']}, vGPU versions {doc['vgpu_current'][0]:#x}-{doc['vgpu_current'][1]:#x}")
    print("rules: " + ", ".join(f"{k}={v}" for k, v in doc["rules"].items()))


@sim_app.command("repair")
def sim_repair(directory: str = typer.Argument(..., metavar="DIR")) -> None:
    """Rewrite the simulated sysfs tree from the simulator state (undoes deliberate damage)."""
    from gpuvirt.service import simulator

    simulator.repair(directory)


from gpuvirt.cli import ops_cmd  # noqa: E402,F401
from gpuvirt.cli import peer_cmd  # noqa: E402,F401
from gpuvirt.cli import profile_cmd  # noqa: E402,F401
from gpuvirt.cli import vmm_cmd  # noqa: E402,F401
from gpuvirt.cli import demo_cmd  # noqa: E402,F401
from gpuvirt.cli import cdi_cmd  # noqa: E402,F401
from gpuvirt.cli import report_cmd  # noqa: E402,F401
from gpuvirt.cli import health_cmd  # noqa: E402,F401
from gpuvirt.cli import rebalance_cmd  # noqa: E402,F401
