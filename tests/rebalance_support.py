"""Support for the rebalance tests: a recording stand-in for ``virsh`` (the executor's runner), which keeps
domains per connection URI as libvirt would for the calls the executor makes and records every argument
list, and helpers that read what a simulated host and its inventory hold."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from gpuvirt.errors import HostError

LOCAL = "qemu:///system"

DOMAIN = """<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>4194304</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
</domain>
"""


# the options of each verb the executor uses, as ``virsh help VERB`` lists them (libvirt 9.0): flags, options
# taking a value, and the positional order of the latter (what a bare argument fills)
_VERBS = {
    "dumpxml": ({"--inactive", "--security-info", "--update-cpu", "--migratable", "--wrap"},
                {"--domain", "--xpath"}, ["--domain"]),
    "domstate": ({"--reason"}, {"--domain"}, ["--domain"]),
    "shutdown": (set(), {"--domain", "--mode"}, ["--domain"]),
    "start": ({"--console", "--paused", "--autodestroy", "--bypass-cache", "--force-boot", "--reset-nvram"},
              {"--domain", "--pass-fds"}, ["--domain"]),
    "define": ({"--validate"}, {"--file"}, ["--file"]),
    "list": ({"--all", "--name", "--inactive", "--persistent", "--transient"}, set(), []),
    "migrate": ({"--live", "--offline", "--persistent", "--undefinesource", "--suspend", "--p2p", "--tunnelled"},
                {"--domain", "--desturi", "--xml", "--persistent-xml", "--dname", "--migrateuri"},
                ["--domain", "--desturi"]),
}


def _virsh_args(verb: str, rest: list[str]) -> dict[str, object] | None:
    """The options of ``virsh VERB REST...`` the way virsh reads them: an option that takes a value takes the
    next argument whatever it is (so ``--domain --help`` names a domain), a bare argument fills the next
    positional option, ``--help`` anywhere else prints the help (None here).  An unknown ``--option`` fails."""
    flags, valued, positional = _VERBS[verb]
    out: dict[str, object] = {}
    todo = list(positional)
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in valued:
            out[a] = rest[i + 1]
            if a in todo:
                todo.remove(a)
            i += 2
            continue
        if a == "--help":
            return None
        if a in flags:
            out[a] = True
        elif a.startswith("--"):
            raise HostError(f"virsh {verb}: error: command '{verb}' doesn't support option {a}")
        else:
            if not todo:
                raise HostError(f"virsh {verb}: error: unexpected data '{a}'")
            out[todo.pop(0)] = a
        i += 1
    return out


class FakeVirsh:
    """Domains per connection URI, each with its running XML (``xml``: what ``dumpxml`` shows; for a shut off
    domain its definition), its persistent definition (``inactive``: ``dumpxml --inactive``) and its state,
    changed as libvirt changes them for the calls the executor makes."""

    def __init__(self) -> None:
        self.domains: dict[str, dict[str, dict]] = {}      # uri -> name -> {"xml", "inactive", "state"}
        self.calls: list[list[str]] = []
        self.xml_files: list[str] = []                     # the --xml / define files, as read when called
        self.persistent_xml_files: list[str] = []          # the --persistent-xml files, as read when called
        self.fail_on: str | None = None                    # a verb that fails (exit 1) once
        self.down = False                                  # libvirt unreachable: every call fails
        self.sims: dict[str, Path] = {}                    # uri -> simulated host whose devices QEMU holds

    def add(self, uri: str, name: str, xml: str, state: str = "running", sim: Path | None = None) -> None:
        if sim is not None:
            self.sims[uri] = Path(sim)
        self.domains.setdefault(uri, {})[name] = {"xml": xml, "inactive": xml, "state": state}
        if state == "running":
            self._hold(uri, xml, True)

    def _hold(self, uri: str, xml: str, running: bool) -> None:
        """A running QEMU holds its VFIO devices open, and only then does NVML list a vGPU as active (the live
        pre-flight needs that; removing an mdev that is held fails with EBUSY)."""
        sim = self.sims.get(uri)
        if sim is None:
            return
        from gpuvirt.errors import NotFoundError
        from gpuvirt.sim.control import set_open
        from gpuvirt.sim.state import SimHost
        from gpuvirt.vmm.libvirt import parse_domain

        dom = parse_domain(xml)
        for h in dom.hostdevs:
            try:
                set_open(SimHost(sim), h.uuid or h.address, running, vm_uuid=dom.uuid if running else None)
            except NotFoundError:
                assert not running, f"a domain started on {uri} names a device the host lacks: {h}"

    def where(self, name: str) -> list[tuple[str, dict]]:
        return [(u, d[name]) for u, d in self.domains.items() if name in d]

    def _get(self, doms: dict, verb: str, name: object) -> dict:
        if name not in doms:
            raise HostError(f"virsh {verb}: error: failed to get domain '{name}'")
        return doms[name]

    def __call__(self, argv: Sequence[str]) -> str:
        argv = list(argv)
        self.calls.append(argv)
        assert argv[0] == "-c"
        uri, verb, rest = argv[1], argv[2], argv[3:]
        if self.down:
            raise HostError(f"virsh {verb}: error: failed to connect to the hypervisor")
        doms = self.domains.setdefault(uri, {})
        if self.fail_on == verb:
            self.fail_on = None
            raise HostError(f"virsh {verb}: injected failure")
        if verb not in _VERBS:
            raise AssertionError(f"unexpected virsh call {argv}")
        opt = _virsh_args(verb, rest)
        if opt is None:
            return f"  NAME\n    {verb} - (virsh prints its help)\n"
        name = opt.get("--domain")
        if verb == "list":
            return "".join(f"{n}\n" for n in doms) + "\n"
        if verb == "dumpxml":
            d = self._get(doms, verb, name)
            return d["inactive"] if opt.get("--inactive") else d["xml"]
        if verb == "domstate":
            return self._get(doms, verb, name)["state"] + "\n"
        if verb == "shutdown":
            d = self._get(doms, verb, name)
            if d["state"] != "running":
                raise HostError("virsh shutdown: error: Requested operation is not valid: domain is not running")
            d["state"], d["xml"] = "shut off", d["inactive"]
            self._hold(uri, d["xml"], False)
            return ""
        if verb == "start":
            d = self._get(doms, verb, name)
            if d["state"] != "shut off":
                raise HostError("virsh start: error: Requested operation is not valid: domain is already active")
            d["state"], d["xml"] = "running", d["inactive"]
            self._hold(uri, d["xml"], True)
            return ""
        if verb == "define":
            text = Path(str(opt["--file"])).read_text()
            self.xml_files.append(text)
            from gpuvirt.vmm.libvirt import parse_domain

            n = parse_domain(text).name
            d = doms.setdefault(n, {"xml": text, "inactive": text, "state": "shut off"})
            # a running domain keeps running as it is; the new definition counts from its next boot
            d["inactive"] = text
            if d["state"] == "shut off":
                d["xml"] = text
            return ""
        if verb == "migrate":
            text = Path(str(opt["--xml"])).read_text()
            self.xml_files.append(text)
            dom, dest = name, str(opt["--desturi"])
            cur = self._get(doms, verb, dom)
            assert opt.get("--persistent") and opt.get("--undefinesource"), argv
            if opt.get("--live"):
                if cur["state"] != "running":
                    raise HostError("virsh migrate: error: Requested operation is not valid: domain is not running")
                # --persistent without --persistent-xml: the destination keeps the source's inactive
                # definition (libvirt's VIR_MIGRATE_PARAM_PERSIST_XML documentation)
                kept = cur["inactive"]
                if "--persistent-xml" in opt:
                    kept = Path(str(opt["--persistent-xml"])).read_text()
                    self.persistent_xml_files.append(kept)
                new = {"xml": text, "inactive": kept, "state": "running"}
            else:
                assert opt.get("--offline") and "--persistent-xml" not in opt, argv
                assert cur["state"] == "shut off", "an offline migration of a running domain"
                new = {"xml": text, "inactive": text, "state": "shut off"}
            del doms[dom]
            self.domains.setdefault(dest, {})[dom] = new
            if new["state"] == "running":
                # the target QEMU opens the new device before the source QEMU exits and lets go of the old one
                self._hold(dest, text, True)
                self._hold(uri, cur["xml"], False)
            return ""
        raise AssertionError(f"unexpected virsh call {argv}")


def ok(res):
    assert res.exit_code == 0, res
    return res


def _ctx(root, **kw):
    from gpuvirt.context import Context, resolve_settings

    return Context(resolve_settings(sim=str(root), **kw))


def _attach(cli, root, vm, vgpu, gpu, *extra):
    ok(cli("--sim", root, *extra, "attach", vm, "--vgpu", vgpu, "--gpu", gpu, "--format", "json"))


def _domains(ctx, fake, uri=LOCAL, state="running", memory=None):
    """Define every VM of the inventory in the fake libvirt with the device it holds (``memory``: {vm: the
    text of its ``<memory>`` element} in place of 4 GiB)."""
    from gpuvirt.vmm.libvirt import insert_hostdev, mdev_hostdev, pci_hostdev

    with ctx.inventory.unit() as uow:
        for n, a in enumerate(uow.allocations(host_id=ctx.settings.host_id)):
            i = a.instance
            if i.kind not in ("mdev", "vfio-vgpu"):
                continue
            dev = mdev_hostdev(i.mdev_uuid) if i.kind == "mdev" else pci_hostdev(i.parent)
            vm_uuid = f"6f1b3a52-3c1e-4b8e-9a55-0c8f2d7a1e{n:02d}"
            xml = DOMAIN.format(name=a.vm_name, uuid=vm_uuid)
            if memory and a.vm_name in memory:
                xml = xml.replace("<memory unit='KiB'>4194304</memory>", memory[a.vm_name])
            fake.add(uri, a.vm_name, insert_hostdev(xml, dev), state, sim=ctx.settings.sim_dir)


def _placements(ctx, cluster=False):
    """{vm: (gpu key, start, vGPU type)} as the host (and inventory) show it now."""
    from gpuvirt.service.rebalance import load_scope

    scope = load_scope(ctx, cluster=cluster)
    return {u.vm: (u.gpu, u.placed.start if u.placed else None, u.vgpu_type) for u in scope.cluster.units if u.vm}


def _replayed(scope, doc):
    """What the plan says the cluster holds after its moves (the planner's replay, step by step checked)."""
    from gpuvirt.model.moves import PlannedMove, Slot, replay

    moves = [PlannedMove(m["unit"], m["vm"], m["kind"], Slot(f"{m['from']['host']}/{m['from']['gpu']}",
                                                              m["from"]["host"], m["from"]["placement"]),
                         Slot(f"{m['to']['host']}/{m['to']['gpu']}", m["to"]["host"], m["to"]["placement"]),
                         None, None, m["data_mib"], None) for m in doc["moves"]]
    after = replay(scope.cluster, moves)
    return {u.vm: (u.gpu, u.placed.start if u.placed else None, u.vgpu_type) for u in after.units if u.vm}


def _one_device_each(ctx, fake, uris=(LOCAL,)):
    """Every VM's XML names exactly one hostdev, that device exists on the host, and the inventory gives the
    VM exactly that vGPU (rows = host objects, no intent left open)."""
    from gpuvirt.service import intent
    from gpuvirt.vmm.libvirt import parse_domain

    sim = ctx.sim.load()
    on_host = {m["uuid"] for m in sim["mdevs"]}
    with ctx.inventory.unit() as uow:
        rows = uow.instances(ctx.settings.host_id, kinds=["mdev"])
        held = {}
        for r in rows:
            if r.allocation is not None:
                held.setdefault(r.allocation.vm_name, []).append(r.mdev_uuid)
        assert sorted(r.mdev_uuid for r in rows) == sorted(on_host)
        assert all(r.state == "active" for r in rows)
    assert not intent.open_intents(ctx)
    for uri in uris:
        for name, d in fake.domains.get(uri, {}).items():
            devs = parse_domain(d["xml"]).hostdevs
            assert len(devs) == 1, (name, devs)
            # the persistent definition names the same device (the guest's next cold boot uses it)
            assert parse_domain(d["inactive"]).hostdevs == devs, (name, "persistent definition differs")
            assert devs[0].uuid in on_host
            assert held.get(name) == [devs[0].uuid], (name, held)
    return held


def _allocs(ctx):
    with ctx.inventory.unit() as uow:
        return [(a.vm_name, a.instance.host_id) for a in uow.allocations()]


def _copy(root):
    dst = Path(tempfile.mkdtemp(prefix="rebalance-crash-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    shutil.rmtree(dst)
    shutil.copytree(root, dst, symlinks=True)
    return dst
