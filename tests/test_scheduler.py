"""vGPU scheduler policy in profiles (issue 14, item 3): the simulated NVML calls, profile validation, plan/apply
ordering and refusal, discover/status, fault injection and reconcile after a reboot.

The crash-at-every-step coverage of an apply that sets the policy is in tests/test_crash.py.
"""

from __future__ import annotations

import pytest

from gpuvirt.errors import NvmlNotSupportedError

A10 = "0000:41:00.0"


def sched_of(sim, index: int = 0) -> tuple:
    """(policy, time slice ns) in effect on the simulated GPU, straight from the simulator's state."""
    from gpuvirt.sim.nvml_scheduler import scheduler_state

    st = sim.load()
    dev = next(d for d in st["devices"] if d.get("nvml_index") == index)
    cur = scheduler_state(st, dev)
    return cur["policy"], cur["timeslice_ns"]


def vgpu_types(sim) -> list[str]:
    return sorted(m["type"] for m in sim.load()["mdevs"])


def one_line_error(r, code: int) -> str:
    assert r.exit_code == code, r
    err = r.stderr.strip("\n")
    assert err.startswith("gpuvirt: error: ") and "\n" not in err and "Traceback" not in err, r
    return err


@pytest.fixture
def session(make_sim):
    from gpuvirt.host.nvml import NvmlSession
    from gpuvirt.sim.nvml import FakeNvmlLib

    opened = []

    def _open(sim):
        s = NvmlSession(FakeNvmlLib(sim)).open()
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()


# --- the simulated NVML -------------------------------------------------------------------------------------------
def test_nvml_set_on_an_empty_gpu_and_read_back(make_sim, session):
    sim = make_sim(["a10"])
    nv = session(sim)
    info = nv.vgpu_scheduler(0)
    assert info.policy == "best-effort" and info.timeslice_us is None and not info.arr
    assert info.supported_policies == ["best-effort", "equal-share", "fixed-share"]
    assert (info.timeslice_min_us, info.timeslice_max_us) == (1000, 30000)
    nv.set_vgpu_scheduler(0, "equal-share", 5000)
    assert sched_of(sim) == (2, 5_000_000)
    assert nv.vgpu_scheduler(0).to_dict()["timeslice_us"] == 5000
    nv.set_vgpu_scheduler(0, "fixed-share")          # no slice: the driver's default is reported
    info = nv.vgpu_scheduler(0)
    assert info.policy == "fixed-share" and info.timeslice_us == 2000


def test_nvml_refuses_a_change_while_a_vgpu_exists(make_sim, session):
    from gpuvirt.sim.nvml_scheduler import set_scheduler_rules

    sim = make_sim(["a10"])
    nv = session(sim)
    with sim.transaction() as st:
        vf = st["devices"][0]["vfs"][0]["address"]
        st["mdevs"].append({"uuid": "11111111-2222-3333-4444-555555555555", "parent": vf, "type": "nvidia-593",
                            "iommu_group": 99, "gpu_instance_id": None, "open": False})
    with pytest.raises(NvmlNotSupportedError, match="while vGPUs exist"):
        nv.set_vgpu_scheduler(0, "equal-share")
    assert sched_of(sim) == (1, 0)
    # the other reading of NVML's "no VM running": an idle vGPU does not block, an open one does
    set_scheduler_rules(sim, blocked_by="running-vm")
    nv.set_vgpu_scheduler(0, "equal-share")
    with sim.transaction() as st:
        st["mdevs"][0]["open"] = True
    with pytest.raises(NvmlNotSupportedError):
        nv.set_vgpu_scheduler(0, "fixed-share")
    assert sched_of(sim)[0] == 2


def test_nvml_vendor_vfio_vgpu_blocks_too(make_sim, session):
    sim = make_sim(["l40s"], vgpu_interface="vendor-vfio")
    nv = session(sim)
    with sim.transaction() as st:
        st["devices"][0]["vfs"][0]["current_vgpu_type"] = 1155
    with pytest.raises(NvmlNotSupportedError):
        nv.set_vgpu_scheduler(0, "equal-share")


def test_nvml_mig_mode_and_boards_without_vgpu(make_sim, session):
    import pynvml

    sim = make_sim(["a100-40gb", "h100-80gb"], mig_enabled=True)
    nv = session(sim)
    assert nv.vgpu_scheduler(0).policy == "best-effort"     # read while MIG is on: yes; set: no
    with pytest.raises(NvmlNotSupportedError, match="MIG mode is on"):
        nv.set_vgpu_scheduler(0, "equal-share")
    assert nv.vgpu_scheduler(1) is None                     # no vGPU on the board: NOT_SUPPORTED
    # bad arguments are INVALID_ARGUMENT, checked before anything else
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    st = pynvml.c_nvmlVgpuSchedulerSetState_t()
    st.schedulerPolicy = 7
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceSetVgpuSchedulerState(h, st)


def test_nvml_time_slice_outside_the_capabilities(make_sim, session):
    from gpuvirt.errors import NvmlError

    sim = make_sim(["a10"])
    nv = session(sim)
    with pytest.raises(NvmlError, match="Invalid Argument"):
        nv.set_vgpu_scheduler(0, "equal-share", 50_000)
    assert sched_of(sim) == (1, 0)


def test_nvml_setting_is_forgotten_by_a_reboot(make_sim, session):
    from gpuvirt.sim.control import reboot
    from gpuvirt.sim.nvml_scheduler import set_scheduler_rules

    sim = make_sim(["a10"])
    nv = session(sim)
    nv.set_vgpu_scheduler(0, "equal-share", 3000)
    reboot(sim)
    assert nv.vgpu_scheduler(0).policy == "best-effort"
    # what the module options (RmPVMRL) would give at boot is configurable
    set_scheduler_rules(sim, boot_policy=3)
    assert nv.vgpu_scheduler(0).policy == "fixed-share"
    with pytest.raises(ValueError, match="unknown vGPU scheduler rule"):
        set_scheduler_rules(sim, no_such_rule=1)


# --- profiles -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--vgpu", "A10-4Q=6", "--vgpu-scheduler", "round-robin"], "unknown policy; valid: best-effort, equal-share"),
    (["--vgpu", "A10-4Q=6", "--vgpu-scheduler", "best-effort", "--timeslice-us", "2000"],
     "applies to equal-share and fixed-share only"),
    (["--vgpu", "A10-4Q=6", "--vgpu-scheduler", "equal-share", "--timeslice-us", "0"], "out of range"),
    (["--vgpu", "A10-4Q=6", "--vgpu-scheduler", "equal-share", "--timeslice-us", "5000000"], "out of range"),
    (["--vgpu", "A10-4Q=6", "--timeslice-us", "2000"], "--timeslice-us needs --vgpu-scheduler"),
    (["--mig", "1g.5gb=7", "--vgpu-scheduler", "equal-share", "--model", "a100-40gb"],
     "applies to time-sliced vGPUs only"),
    (["--vgpu", "A100-1-5C=7", "--mig", "1g.5gb=7", "--vgpu-scheduler", "fixed-share", "--model", "a100-40gb"],
     "MIG-backed vGPU types (A100-1-5C)"),
    (["--vgpu-scheduler", "equal-share", "--model", "h100-80gb"], "has no NVIDIA vGPU, so no vGPU scheduler"),
])
def test_create_profile_rejects_with_one_line(cli, make_sim, args, needle):
    sim = make_sim(["a10"])
    err = one_line_error(cli("--sim", sim.root, "create-profile", "p", *args), 2)
    assert needle in err, err
    assert cli("--sim", sim.root, "profile", "show", "p").exit_code == 3      # nothing stored


def test_profile_yaml_key_round_trips(cli, make_sim, tmp_path):
    sim = make_sim(["a10"])
    root = sim.root
    (tmp_path / "p.yaml").write_text(
        "version: 1\nprofiles:\n"
        "  - name: vdi\n    model: a10\n    vgpu: {A10-2Q: 12}\n    vgpu_scheduler: equal-share\n"
        "  - name: hpc\n    vgpu: {A10-8C: 3}\n    vgpu_scheduler: {policy: fixed-share, timeslice_us: 4000}\n")
    r = cli("--sim", root, "profile", "import", tmp_path / "p.yaml", "--json")
    assert r.exit_code == 0, r
    show = cli("--sim", root, "profile", "show", "hpc", "--json").json()
    assert show["entries"][0]["vgpu_scheduler"] == {"policy": "fixed-share", "timeslice_us": 4000}
    assert show["validation"]["layouts"][0]["layout"]["vgpu_scheduler"]["policy"] == "fixed-share"
    out = tmp_path / "out.yaml"
    assert cli("--sim", root, "profile", "export", "vdi", "hpc", "-o", out).exit_code == 0
    text = out.read_text()
    assert "vgpu_scheduler: equal-share" in text and "timeslice_us: 4000" in text
    # importing the same file again changes nothing; the export imports on another host as the same entries
    again = cli("--sim", root, "profile", "import", tmp_path / "p.yaml", "--json").json()
    assert [u["name"] for u in again["unchanged"]] == ["vdi", "hpc"] and not again["imported"]
    other = make_sim(["a10"], name="other")
    assert cli("--sim", other.root, "profile", "import", out).exit_code == 0
    for name in ("vdi", "hpc"):
        a = cli("--sim", root, "profile", "show", name, "--json").json()["entries"]
        assert cli("--sim", other.root, "profile", "show", name, "--json").json()["entries"] == a


def test_profile_yaml_errors_point_at_the_line(cli, make_sim, tmp_path):
    sim = make_sim(["a10"])
    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\nvgpu: {A10-4Q: 6}\nvgpu_scheduler:\n  policy: equal-share\n  slice: 3\n")
    err = one_line_error(cli("--sim", sim.root, "create-profile", "bad", "--from-file", f), 2)
    assert "bad.yaml:5" in err and "unknown field(s) slice" in err, err
    f.write_text("name: bad\nvgpu: {A10-4Q: 6}\nvgpu_scheduler: {policy: equal-share, timeslice_us: 9999999}\n")
    err = one_line_error(cli("--sim", sim.root, "create-profile", "bad", "--from-file", f), 2)
    assert "out of range" in err, err


# --- plan / apply ---------------------------------------------------------------------------------------------------
def test_scheduler_set_on_an_empty_gpu_before_the_vgpus(cli, make_sim):
    sim = make_sim(["a10"])
    root = sim.root
    assert cli("--sim", root, "create-profile", "eq", "--vgpu", "A10-4Q=6", "--vgpu-scheduler", "equal-share",
               "--timeslice-us", "2000", "--model", "a10").exit_code == 0
    plan = cli("--sim", root, "plan", "eq", "--gpu", "0", "--json").json()["gpus"][0]
    ops = [o["op"] for o in plan["operations"]]
    assert ops == ["set-vgpu-scheduler"] + ["create-mdev"] * 6
    assert plan["operations"][0]["was_policy"] == "best-effort"
    r = cli("--sim", root, "apply", "eq", "--gpu", "0", "--yes", "--json")
    assert r.exit_code == 0, r
    assert sched_of(sim) == (2, 2_000_000) and vgpu_types(sim) == ["nvidia-593"] * 6
    # shown by discover (JSON and table) and by status
    g = cli("--sim", root, "discover", "--json").json()["gpus"][0]
    assert g["vgpu_scheduler"]["policy"] == "equal-share" and g["vgpu_scheduler"]["timeslice_us"] == 2000
    assert "equal-share 2000us" in cli("--sim", root, "discover").stdout
    st = cli("--sim", root, "status", "--json").json()
    assert st["in_sync"] and st["gpus"][0]["vgpu_scheduler"] == {
        "policy": "equal-share", "timeslice_us": 2000, "in_sync": True,
        "desired": {"policy": "equal-share", "timeslice_us": 2000}}
    assert "vGPU scheduler: equal-share 2000 us" in cli("--sim", root, "status").stdout
    # idempotent
    again = cli("--sim", root, "apply", "eq", "--gpu", "0", "--yes", "--json").json()
    assert again["unchanged"] == [A10]


def test_scheduler_change_refused_while_a_vm_holds_a_vgpu(cli, make_sim):
    sim = make_sim(["a10"])
    root = sim.root
    cli("--sim", root, "create-profile", "be", "--vgpu", "A10-4Q=6", "--model", "a10")
    cli("--sim", root, "create-profile", "fs", "--vgpu", "A10-4Q=6", "--vgpu-scheduler", "fixed-share")
    assert cli("--sim", root, "apply", "be", "--gpu", "0", "--yes").exit_code == 0
    for vm in ("web-1", "db-7"):
        assert cli("--sim", root, "attach", vm, "--vgpu", "A10-4Q", "--format", "json").exit_code == 0
    before = (sorted(m["uuid"] for m in sim.load()["mdevs"]), sched_of(sim))
    plan = cli("--sim", root, "plan", "fs", "--gpu", "0", "--json").json()
    assert len(plan["blocked"]) == 1 and "VM web-1" in plan["blocked"][0] and "VM db-7" in plan["blocked"][0]
    err = one_line_error(cli("--sim", root, "apply", "fs", "--gpu", "0", "--yes"), 5)
    assert "can be set only while no vGPU exists" in err and "VM web-1" in err and "VM db-7" in err, err
    assert (sorted(m["uuid"] for m in sim.load()["mdevs"]), sched_of(sim)) == before
    # with the VMs gone the unallocated vGPUs are removed, the policy set, and the vGPUs created again
    for vm in ("web-1", "db-7"):
        assert cli("--sim", root, "detach", vm).exit_code == 0
    plan = cli("--sim", root, "plan", "fs", "--gpu", "0", "--json").json()["gpus"][0]
    ops = [o["op"] for o in plan["operations"]]
    assert ops == ["remove-mdev"] * 6 + ["set-vgpu-scheduler"] + ["create-mdev"] * 6, ops
    assert any("created again" in n for n in plan["notes"])
    assert cli("--sim", root, "apply", "fs", "--gpu", "0", "--yes").exit_code == 0
    assert sched_of(sim)[0] == 3 and vgpu_types(sim) == ["nvidia-593"] * 6


def test_scheduler_only_entry_keeps_the_vgpus_it_does_not_name(cli, make_sim):
    sim = make_sim(["a10"])
    root = sim.root
    cli("--sim", root, "create-profile", "two", "--vgpu", "A10-2Q=4", "--model", "a10")
    cli("--sim", root, "create-profile", "eq-only", "--vgpu-scheduler", "equal-share", "--model", "a10")
    assert cli("--sim", root, "apply", "two", "--gpu", "0", "--yes").exit_code == 0
    assert cli("--sim", root, "apply", "eq-only", "--gpu", "0", "--yes").exit_code == 0
    assert sched_of(sim)[0] == 2 and vgpu_types(sim) == ["nvidia-591"] * 4


def test_plan_checks_the_boards_time_slice_range(cli, make_sim):
    sim = make_sim(["a10"])
    root = sim.root
    cli("--sim", root, "create-profile", "long", "--vgpu", "A10-4Q=6", "--vgpu-scheduler", "equal-share",
        "--timeslice-us", "50000")
    err = one_line_error(cli("--sim", root, "apply", "long", "--gpu", "0", "--yes"), 5)
    assert "accepts time slices of 1000 to 30000 us, not 50000" in err, err
    assert vgpu_types(sim) == [] and sched_of(sim) == (1, 0)


def test_fault_in_the_scheduler_call_rolls_back(cli, make_sim):
    from gpuvirt.sim.control import add_fault

    sim = make_sim(["a10"])
    root = sim.root
    cli("--sim", root, "create-profile", "old", "--vgpu", "A10-8Q=3", "--model", "a10")
    cli("--sim", root, "create-profile", "new", "--vgpu", "A10-6Q=4", "--vgpu-scheduler", "equal-share")
    assert cli("--sim", root, "apply", "old", "--gpu", "0", "--yes").exit_code == 0
    before = sorted(m["uuid"] for m in sim.load()["mdevs"])
    add_fault(sim, "nvml.SetVgpuSchedulerState", nvml=999)
    err = one_line_error(cli("--sim", root, "apply", "new", "--gpu", "0", "--yes"), 1)
    assert "set the vGPU scheduler" in err and "rolled back to the previous layout" in err, err
    # the three vGPUs removed before the failed call are back, with their UUIDs, and the policy is unchanged
    assert sorted(m["uuid"] for m in sim.load()["mdevs"]) == before and sched_of(sim) == (1, 0)
    st = cli("--sim", root, "status", "--json").json()
    assert st["in_sync"] and st["gpus"][0]["desired_profile"] == "old"


def test_fault_after_the_scheduler_call_restores_the_old_policy(cli, make_sim):
    from gpuvirt.sim.control import add_fault

    sim = make_sim(["a10"])
    root = sim.root
    cli("--sim", root, "create-profile", "eq", "--vgpu", "A10-4Q=6", "--vgpu-scheduler", "equal-share",
        "--timeslice-us", "4000", "--model", "a10")
    cli("--sim", root, "create-profile", "fs", "--vgpu", "A10-4Q=6", "--vgpu-scheduler", "fixed-share")
    assert cli("--sim", root, "apply", "eq", "--gpu", "0", "--yes").exit_code == 0
    add_fault(sim, "mdev.create", skip=2, errno="EIO")
    err = one_line_error(cli("--sim", root, "apply", "fs", "--gpu", "0", "--yes"), 1)
    assert "rolled back" in err, err
    assert sched_of(sim) == (2, 4_000_000) and vgpu_types(sim) == ["nvidia-593"] * 6
    assert cli("--sim", root, "status", "--json").json()["in_sync"]


# --- reconcile ------------------------------------------------------------------------------------------------------
def test_reconcile_restores_the_policy_after_a_reboot_before_the_vgpus(cli, make_sim):
    from gpuvirt.sim.control import reboot

    sim = make_sim(["a10"])
    root = sim.root
    cli("--sim", root, "create-profile", "eq", "--vgpu", "A10-4Q=6", "--vgpu-scheduler", "equal-share",
        "--timeslice-us", "2000", "--model", "a10")
    assert cli("--sim", root, "apply", "eq", "--gpu", "0", "--yes").exit_code == 0
    reboot(sim)
    st = cli("--sim", root, "status", "--json").json()
    assert not st["in_sync"] and st["gpus"][0]["vgpu_scheduler"]["policy"] == "best-effort"
    drift = [d for d in st["gpus"][0]["drift"] if d["kind"] == "vgpu-scheduler"]
    assert drift and drift[0]["action"] == "set the vGPU scheduler to equal-share"
    r = cli("--sim", root, "reconcile", "--yes", "--json")
    assert r.exit_code == 0, r
    kinds = [f["kind"] for f in r.json()["findings"]]
    assert kinds.index("vgpu-scheduler") < kinds.index("missing")
    assert sched_of(sim) == (2, 2_000_000) and vgpu_types(sim) == ["nvidia-593"] * 6
    assert cli("--sim", root, "status", "--json").json()["in_sync"]


def test_reconcile_reports_a_policy_it_cannot_set_while_vgpus_exist(cli, make_sim):
    from gpuvirt.sim.control import add_fault, reboot

    sim = make_sim(["a10"])
    root = sim.root
    cli("--sim", root, "create-profile", "eq", "--vgpu", "A10-4Q=6", "--vgpu-scheduler", "equal-share",
        "--model", "a10")
    assert cli("--sim", root, "apply", "eq", "--gpu", "0", "--yes").exit_code == 0
    assert cli("--sim", root, "attach", "vm-a", "--vgpu", "A10-4Q", "--format", "json").exit_code == 0
    reboot(sim)
    add_fault(sim, "nvml.SetVgpuSchedulerState")
    r = cli("--sim", root, "reconcile", "--yes", "--json")
    assert r.exit_code == 1 and r.json()["failed"][0]["kind"] == "vgpu-scheduler", r
    assert vgpu_types(sim) == ["nvidia-593"] * 6 and sched_of(sim)[0] == 1
    st = cli("--sim", root, "status", "--json").json()
    d = [d for d in st["gpus"][0]["drift"] if d["kind"] == "vgpu-scheduler"][0]
    assert not st["in_sync"] and d["action"] is None and "while vGPUs exist" in d["target"] and "VM vm-a" in d["target"]
