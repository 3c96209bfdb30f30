"""The libvirt qemu hook, run the way libvirtd runs it (issue 4).

Every hook call here is a real process of the INSTALLED script ``<root>/etc/libvirt/hooks/qemu.d/50-gpuvirt``
with argv ``<domain> <operation> <sub-operation> <extra>``, the live domain XML on stdin (``<domain type='kvm'
id='N'>`` with aliases, guest addresses and defaults such as ``display='off'`` made explicit, as libvirtd
passes it at prepare) and an EMPTY environment.  The call order follows the observed transcript in
libvirt-vmm.md section 3: prepare, start, started; stopped, release (also after a failed prepare).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
import uuid as uuid_mod
from xml.sax.saxutils import escape

import pytest

VM_UUID = "0b5c3e7e-1f0d-4c84-8e41-5b7f2a9d6c10"


# --- helpers ----------------------------------------------------------------------------------------------------
def ok(res):
    assert res.exit_code == 0, res
    return res


def install_hook(cli, root):
    ok(cli("--sim", root, "hook", "install"))
    path = root / "etc/libvirt/hooks/qemu.d/50-gpuvirt"
    assert os.access(path, os.X_OK)
    return path


def hook(path, domain, op, sub="begin", extra="-", xml: bytes | str = b""):
    """One hook call exactly as libvirtd makes it."""
    data = xml.encode() if isinstance(xml, str) else xml
    return subprocess.run([str(path), domain, op, sub, extra], input=data, capture_output=True, env={},
                          timeout=120)


def stderr_line(p):
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def _pci(addr):
    dom, bus, rest = addr.split(":")
    slot, fn = rest.split(".")
    return f"domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'"


def live_xml(name, *, mdevs=(), pcis=(), usb=False, uuid=VM_UUID, dom_id=3):
    """The live XML libvirtd passes on stdin at prepare."""
    devs = []
    n = 0
    for u in mdevs:
        devs.append(f"""    <hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci' display='off'>
      <source>
        <address uuid='{u}'/>
      </source>
      <alias name='hostdev{n}'/>
      <address type='pci' domain='0x0000' bus='0x0{6 + n}' slot='0x00' function='0x0'/>
    </hostdev>""")
        n += 1
    for a in pcis:
        devs.append(f"""    <hostdev mode='subsystem' type='pci' managed='no'>
      <driver name='vfio'/>
      <source>
        <address {_pci(a)}/>
      </source>
      <alias name='hostdev{n}'/>
      <address type='pci' domain='0x0000' bus='0x0{6 + n}' slot='0x00' function='0x0'/>
    </hostdev>""")
        n += 1
    if usb:
        devs.append("""    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source>
        <vendor id='0x046d'/>
        <product id='0xc52b'/>
      </source>
      <alias name='hostdev9'/>
      <address type='usb' bus='0' port='1'/>
    </hostdev>""")
    return f"""<domain type='kvm' id='{dom_id}'>
  <name>{escape(name)}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' index='0' model='pcie-root'>
      <alias name='pcie.0'/>
    </controller>
    <graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
{chr(10).join(devs)}
    <memballoon model='virtio'>
      <alias name='balloon0'/>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </memballoon>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label>
    <imagelabel>+64055:+64055</imagelabel>
  </seclabel>
</domain>
"""


def attach(cli, root, vm, *args):
    return ok(cli("--sim", root, "attach", vm, *args, "--format", "json")).json()


def allocations(cli, root):
    return {a["instance"]: a for a in ok(cli("--sim", root, "allocations", "--json")).json()}


def instances(cli, root):
    return {i["id"]: i for g in ok(cli("--sim", root, "status", "--json")).json()["gpus"] for i in g["instances"]}


def mdevs(sim):
    return {m["uuid"]: (m["parent"], m["type"]) for m in sim.load()["mdevs"]}


def vf_types(sim):
    return {vf["address"]: vf.get("current_vgpu_type") for d in sim.load()["devices"] for vf in d.get("vfs", [])}


def num_vfs(sim, address):
    return next(d["sriov"]["numvfs"] for d in sim.load()["devices"] if d["address"] == address)


# --- restore at prepare ------------------------------------------------------------------------------------------
def test_prepare_after_reboot_recreates_the_mdev_with_the_same_uuid(cli, make_sim):
    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    doc = attach(cli, root, "vm1", "--vgpu", "A2-2Q")
    u = doc["uuid"]
    before = mdevs(sim)[u]
    xml = live_xml("vm1", mdevs=[u])
    ok(cli("sim", "reboot", root))
    assert mdevs(sim) == {} and num_vfs(sim, "0000:41:00.0") == 0  # the mdev and its VF parent are gone
    p = hook(h, "vm1", "prepare", xml=xml)
    assert p.returncode == 0, p.stderr
    assert mdevs(sim)[u] == before  # same UUID, same parent VF, same type
    assert num_vfs(sim, "0000:41:00.0") > 0
    [alloc] = allocations(cli, root).values()
    assert alloc["vm_state"] == "running" and alloc["vm_uuid"] == VM_UUID  # learned from the XML
    for op in ("start", "started"):
        assert hook(h, "vm1", op, xml=xml).returncode == 0
    # already there: a second prepare (libvirtd restarted, VM started again) has nothing to do
    p = hook(h, "vm1", "prepare", xml=xml)
    assert p.returncode == 0 and p.stderr == b""
    assert hook(h, "vm1", "stopped", "end", xml=xml).returncode == 0
    for extra in ("destroyed", "destroyed"):  # libvirt >= 10.5.0 passes the reason; release is idempotent
        p = hook(h, "vm1", "release", "end", extra, xml=xml)
        assert p.returncode == 0 and p.stderr == b"", p.stderr
    [alloc] = allocations(cli, root).values()  # persistent: kept, recorded as stopped
    assert alloc["vm_state"] == "stopped" and mdevs(sim)[u] == before
    ok(cli("--sim", root, "detach", "vm1"))  # no longer running: detach without --force


def test_prepare_after_reboot_restores_the_vendor_vfio_type_on_the_same_vf(cli, make_sim):
    sim = make_sim(["l40s"])
    root = sim.root
    h = install_hook(cli, root)
    doc = attach(cli, root, "vm1", "--vgpu", "L40S-4Q")
    vf = doc["pci_address"]
    ok(cli("sim", "reboot", root))
    assert vf not in vf_types(sim)
    p = hook(h, "vm1", "prepare", xml=live_xml("vm1", pcis=[vf]))
    assert p.returncode == 0, p.stderr
    types = vf_types(sim)
    assert types[vf] == 1150 and sum(1 for t in types.values() if t) == 1


def _occupy_board_with_another_type(root):
    # after the reboot someone else enabled the VFs and put an A2-8Q on the board: A2 vGPUs of one board
    # must all be of one type, so the A2-2Q cannot come back
    from gpuvirt.context import Context, resolve_settings

    with Context(resolve_settings(sim=str(root))) as ctx:
        ctx.host.enable_vfs("0000:41:00.0")
        ctx.host.create_mdev("0000:41:00.7", "nvidia-747", str(uuid_mod.uuid4()))


def _fail_vf_enable(root):
    from gpuvirt.sim.control import add_fault, open_sim

    add_fault(open_sim(root), "sriov.enable", errno="EIO", times=10)


@pytest.mark.parametrize("block,reason", [(_occupy_board_with_another_type, "no capacity"),
                                          (_fail_vf_enable, "enable VFs")])
def test_prepare_without_capacity_refuses_and_cleanup_hooks_change_only_transients(cli, make_sim, block, reason):
    sim = make_sim(["a2", "mtty"])
    root = sim.root
    h = install_hook(cli, root)
    keep = attach(cli, root, "vm1", "--vgpu", "A2-2Q", "--persistent")
    ok(cli("sim", "reboot", root))
    block(root)
    # attached after the restart, on a parent that does not need restoring: present when prepare fails
    temp = attach(cli, root, "vm1", "--mdev", "mtty-2", "--transient")
    xml = live_xml("vm1", mdevs=[keep["uuid"], temp["uuid"]])
    foreign = {u: v for u, v in mdevs(sim).items() if u != temp["uuid"]}
    p = hook(h, "vm1", "prepare", xml=xml)
    assert p.returncode != 0
    line = stderr_line(p)
    assert line.startswith("gpuvirt: error: refusing to start vm1: ") and reason in line, line
    assert keep["uuid"] not in mdevs(sim) and allocations(cli, root)[keep["instance"]]["vm_state"] is None
    # libvirt still calls stopped and release after a failed prepare (observed on 9.0.0)
    assert hook(h, "vm1", "stopped", "end", xml=xml).returncode == 0
    p = hook(h, "vm1", "release", "end", "failed", xml=xml)
    assert p.returncode == 0, p.stderr
    allocs = allocations(cli, root)
    assert list(allocs) == [keep["instance"]]  # the persistent allocation stays, the transient one is freed
    assert temp["instance"] not in instances(cli, root)
    assert mdevs(sim) == foreign  # the other owner's device was not touched
    assert hook(h, "vm1", "release", "end", "failed", xml=xml).returncode == 0  # idempotent
    assert list(allocations(cli, root)) == [keep["instance"]]


def test_release_when_prepare_never_ran_frees_transient_allocations(cli, make_sim):
    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    temp = attach(cli, root, "vm1", "--vgpu", "A2-2Q", "--transient")
    other = attach(cli, root, "vm2", "--vgpu", "A2-2Q", "--transient")
    xml = live_xml("vm1", mdevs=[temp["uuid"]])
    for extra in ("-", "-"):  # libvirt before 10.5.0 passes '-'; twice: idempotent
        p = hook(h, "vm1", "release", "end", extra, xml=xml)
        assert p.returncode == 0 and p.stderr == b"", p.stderr
    assert temp["uuid"] not in mdevs(sim)  # created by the transient attach: destroyed with it
    assert list(allocations(cli, root)) == [other["instance"]] and other["uuid"] in mdevs(sim)


# --- the fast path ----------------------------------------------------------------------------------------------
def _medians(cases, runs=7):
    """Median wall time of each (argv, stdin) case; runs interleaved so that load from other processes on a
    shared machine hits every case alike."""
    times = [[] for _ in cases]
    for n in range(runs + 1):
        for i, (argv, data) in enumerate(cases):
            t = time.perf_counter()
            subprocess.run(argv, input=data, capture_output=True, env={})
            if n:  # the first round warms the page cache and .pyc files
                times[i].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def test_domain_without_gpuvirt_devices_is_a_fast_no_op(cli, make_sim):
    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    plain = live_xml("plain-vm").encode()
    usb = live_xml("usb-vm", usb=True).encode()
    db = root / "var/lib/gpuvirt/inventory.db"
    assert not db.exists()
    for name, xml in (("plain-vm", plain), ("usb-vm", usb)):
        for op, sub, extra in (("prepare", "begin", "-"), ("start", "begin", "-"), ("started", "begin", "-"),
                               ("stopped", "end", "-"), ("release", "end", "shutdown")):
            p = hook(h, name, op, sub, extra, xml=xml)
            assert p.returncode == 0 and p.stdout == b"" and p.stderr == b"", (op, p.stderr)
    assert not db.exists()  # never even opened the inventory
    # neither SQLAlchemy nor NVML is imported: measured with the interpreter and options the hook execs
    exec_line = h.read_text().strip().splitlines()[-1].split()
    python, opts = exec_line[1], exec_line[2:exec_line.index("hook")]
    for name, xml in (("plain-vm", plain), ("usb-vm", usb)):
        p = subprocess.run([python, "-X", "importtime", *opts, "hook", "libvirt-qemu", name, "prepare", "begin",
                            "-"], input=xml, capture_output=True, env={}, timeout=60)
        assert p.returncode == 0, p.stderr
        imported = p.stderr.decode()
        assert "sqlalchemy" not in imported and "pynvml" not in imported and "typer" not in imported
    # and it costs about as much as starting that interpreter at all (generous bound: shared CI machines)
    floor, noop = _medians([([python, "-I", "-c", "pass"], None),
                            ([str(h), "plain-vm", "prepare", "begin", "-"], plain)])
    assert noop < 2.5 * floor + 0.05, (noop, floor)


# --- bad input ------------------------------------------------------------------------------------------------
def test_unknown_operation_and_bad_argv(cli, make_sim):
    sim = make_sim(["a2"])
    h = install_hook(cli, sim.root)
    p = hook(h, "vm1", "frobnicate", xml=live_xml("vm1"))
    assert p.returncode == 2
    line = stderr_line(p)
    assert "unknown libvirt hook operation 'frobnicate'" in line and "nothing done" in line
    for argv in ([], ["vm1"], ["vm1", "prepare", "begin", "-", "surplus"]):
        p = subprocess.run([str(h), *argv], input=b"", capture_output=True, env={}, timeout=60)
        assert p.returncode == 2 and "usage" in stderr_line(p)


def test_bad_domain_xml_is_refused_at_prepare_and_changes_nothing(cli, make_sim):
    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    doc = attach(cli, root, "vm1", "--vgpu", "A2-2Q", "--transient")
    other = attach(cli, root, "vm2", "--vgpu", "A2-2Q")
    good = live_xml("vm1", mdevs=[doc["uuid"]])
    huge = good.replace("</devices>", "<!--" + "x" * (4 * 1024 * 1024) + "--></devices>")
    bad = {
        "malformed": (good[: good.index("</hostdev>")], "malformed"),
        "huge": (huge, "larger than 4194304 bytes"),
        "other name": (good.replace("<name>vm1</name>", "<name>vm-other</name>"), "'vm-other'"),
        "doctype": ("<!DOCTYPE domain [<!ENTITY x 'y'>]>\n" + good, "DOCTYPE"),
        "bad uuid": (good.replace(doc["uuid"], "not-a-uuid"), "UUID"),
        "not utf-8": (good.replace("<name>vm1</name>", "<name>vm1</name><title>caf\xe9</title>").encode("latin-1"),
                      "UTF-8"),
        "another VM's device": (live_xml("vm1", mdevs=[other["uuid"]]), "allocated to VM vm2"),
    }
    state = (allocations(cli, root), mdevs(sim))
    for what, (xml, expect) in bad.items():
        p = hook(h, "vm1", "prepare", xml=xml)
        assert p.returncode == 1, (what, p.stderr)
        line = stderr_line(p)
        assert line.startswith("gpuvirt: error:") and expect in line, (what, line)
        assert (allocations(cli, root), mdevs(sim)) == state, what
    # at release nothing can be refused; a name that contradicts argv makes the hook do nothing at all
    p = hook(h, "vm1", "release", "end", "-", xml=bad["other name"][0])
    assert p.returncode == 0 and "nothing done" in stderr_line(p)
    assert (allocations(cli, root), mdevs(sim)) == state
    # an unreadable or oversized XML at release: the transient allocation is still freed, by the argv name
    p = hook(h, "vm1", "release", "end", "-", xml=huge)
    assert p.returncode == 0 and "releasing by name" in stderr_line(p)
    assert list(allocations(cli, root)) == [other["instance"]] and doc["uuid"] not in mdevs(sim)


@pytest.mark.parametrize("name", ["it's \"quoted\" & <odd>", "vm with  spaces", "vïrtuel-机器-🖥"])
def test_odd_vm_names_round_trip(cli, make_sim, name):
    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    doc = attach(cli, root, name, "--vgpu", "A2-2Q")
    xml = live_xml(name, mdevs=[doc["uuid"]], uuid=str(uuid_mod.uuid4()))
    ok(cli("sim", "reboot", root))
    p = hook(h, name, "prepare", xml=xml)
    assert p.returncode == 0, p.stderr
    assert doc["uuid"] in mdevs(sim)
    [alloc] = allocations(cli, root).values()
    assert alloc["vm"] == name and alloc["vm_state"] == "running"
    p = hook(h, name, "release", "end", "shutdown", xml=xml)
    assert p.returncode == 0, p.stderr
    assert [a["vm_state"] for a in allocations(cli, root).values()] == ["stopped"]
    ok(cli("--sim", root, "detach", name))
    assert allocations(cli, root) == {}


def test_transient_device_after_a_host_crash_is_refused_clearly(cli, make_sim):
    # the host went down without libvirt's release: the transient allocation is still recorded, its device
    # is gone, and transient devices are not restored
    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    doc = attach(cli, root, "vm1", "--vgpu", "A2-2Q", "--transient")
    xml = live_xml("vm1", mdevs=[doc["uuid"]])
    ok(cli("sim", "reboot", root))
    p = hook(h, "vm1", "prepare", xml=xml)
    assert p.returncode == 1
    line = stderr_line(p)
    assert "did not survive the host restart" in line and doc["uuid"] in line and "attach the VM again" in line
    assert mdevs(sim) == {} and list(allocations(cli, root)) == [doc["instance"]]
    assert hook(h, "vm1", "release", "end", "failed", xml=xml).returncode == 0
    assert allocations(cli, root) == {} and instances(cli, root) == {}


def test_names_libvirt_refuses_are_refused(cli, make_sim):
    sim = make_sim(["a2"])
    root = sim.root
    h = install_hook(cli, root)
    doc = attach(cli, root, "vm1", "--vgpu", "A2-2Q")
    state = (allocations(cli, root), mdevs(sim))
    for name in ("../../etc/passwd", "tab\there"):
        xml = live_xml("vm1", mdevs=[doc["uuid"]]).replace("<name>vm1</name>", f"<name>{escape(name)}</name>")
        p = hook(h, name, "prepare", xml=xml)
        assert p.returncode == 1 and "invalid VM name" in stderr_line(p), p.stderr
        assert (allocations(cli, root), mdevs(sim)) == state
    assert cli("--sim", root, "attach", "a/b", "--vgpu", "A2-2Q").exit_code == 2


# --- installation ------------------------------------------------------------------------------------------------
def test_hook_install_is_idempotent_and_refuses_a_foreign_script(cli, make_sim):
    sim = make_sim(["a2"])
    root = sim.root
    path = install_hook(cli, root)
    text = path.read_text()
    assert text.startswith("#!/bin/sh\n") and f"--sim {root}" in text and text.rstrip().endswith('"$@"')
    again = ok(cli("--sim", root, "hook", "install"))
    assert "already installed" in again.stdout and path.read_text() == text
    foreign = "#!/bin/sh\n# my own hook; it calls gpuvirt too\nexec /usr/local/bin/gpuvirt hook libvirt-qemu \"$@\"\n"
    path.write_text(foreign)
    res = cli("--sim", root, "hook", "install")
    assert res.exit_code == 2 and "not written by gpuvirt" in res.stderr and "--force" in res.stderr
    assert path.read_text() == foreign
    assert cli("--sim", root, "hook", "uninstall").exit_code == 2 and path.read_text() == foreign
    ok(cli("--sim", root, "hook", "install", "--force"))
    assert path.read_text() == text and os.access(path, os.X_OK)
    ok(cli("--sim", root, "hook", "uninstall"))
    assert not path.exists()


def test_hook_install_refuses_a_missing_simulated_host(cli, gpuvirt_proc, tmp_path):
    # a hook pointing at a simulator that is not there would refuse every VM start: refuse it now, write nothing
    for sim in (tmp_path / "nothing", tmp_path / "empty"):
        if sim.name == "empty":
            sim.mkdir()                                     # a directory, but not a simulated host
        for run in (cli, gpuvirt_proc):
            res = run("--sim", sim, "hook", "install")
            assert res.exit_code == 3, res
            assert res.stderr.startswith("gpuvirt: error: ") and res.stderr.count("\n") == 1, res
            assert "gpuvirt sim init" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "nothing").exists()
    assert list((tmp_path / "empty").iterdir()) == []


def test_installed_hook_carries_settings_the_empty_environment_lacks(cli, make_sim, monkeypatch):
    sim = make_sim(["a2"])
    root = sim.root
    monkeypatch.setenv("GPUVIRT_HOST_ID", "rack7-node3")
    path = install_hook(cli, root)
    assert "--host-id rack7-node3" in path.read_text()
    doc = attach(cli, root, "vm1", "--vgpu", "A2-2Q")
    ok(cli("sim", "reboot", root))
    p = hook(path, "vm1", "prepare", xml=live_xml("vm1", mdevs=[doc["uuid"]]))
    assert p.returncode == 0, p.stderr
    assert doc["uuid"] in mdevs(sim)  # the hook found this host's rows, not the hostname's
    # a database password is not left readable by every user
    monkeypatch.setenv("GPUVIRT_DB", "postgresql://gpuvirt:s3cret@db.example/gpuvirt")
    ok(cli("--sim", root, "hook", "install"))
    assert oct(path.stat().st_mode & 0o777) == "0o700"
