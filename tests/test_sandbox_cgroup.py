"""A cgroup per sandbox call (forge.sandbox.cgroup): where it goes on cgroup v1 and v2, the
limits it writes, and that no group outlives its call or its harness. The caps' effect on
hostile code is in test_sandbox_hostile.py (memory of a call's processes together)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from forge import sandbox
from forge.sandbox import cgroup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cgroups = pytest.mark.skipif(
    not cgroup.enabled(), reason=f"no cgroup per call here: {cgroup.why_not()}"
)


def fake_v2(tmp_path, own: str, parent_controllers: str):
    """A cgroup2 mount at tmp_path/cg with this process in `own`; its parent enables
    `parent_controllers` for its children."""
    mount = tmp_path / "cg"
    directory = mount / own.lstrip("/")
    directory.mkdir(parents=True)
    (directory.parent / "cgroup.subtree_control").write_text(parent_controllers + "\n")
    mounts = [("cgroup2", "/", str(mount), {"rw"})]
    return mounts, {"": own}, directory


def test_on_cgroup_v2_the_calls_go_in_a_process_free_group_beside_the_harness_with_their_limits(tmp_path):
    mounts, own, directory = fake_v2(tmp_path, "/user.slice/session-3.scope", "cpu memory pids")
    layout = cgroup._v2_layout(mounts, own)
    ours = directory.parent / f"forge-sandbox-{os.getpid()}"
    assert layout == cgroup.Layout(2, {"": str(ours)})
    cgroup._make(layout)
    assert (ours / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    group = cgroup._create(layout, 300 << 20, 16, None)
    call = ours / os.path.basename(group.dirs[""])
    assert group.procs_files == [str(call / "cgroup.procs")]
    assert (call / "memory.max").read_text() == str(300 << 20)
    assert (call / "pids.max").read_text() == str(16 + cgroup.HARNESS_PROCESSES)


def test_on_cgroup_v2_a_container_root_or_a_parent_without_memory_gives_no_cgroup(tmp_path):
    mounts, own, _ = fake_v2(tmp_path, "/", "")
    assert cgroup._v2_layout(mounts, own) is None  # nowhere to put a group holding no process
    mounts, own, _ = fake_v2(tmp_path / "b", "/a/b", "cpu pids")
    assert cgroup._v2_layout(mounts, own) is None


def test_a_hierarchy_mounted_below_its_root_maps_the_groups_path_onto_the_mount():
    assert cgroup._directory("/", "/sys/fs/cgroup/memory", "/x/y") == "/sys/fs/cgroup/memory/x/y"
    assert (
        cgroup._directory("/docker/abc", "/sys/fs/cgroup/memory", "/docker/abc/y")
        == "/sys/fs/cgroup/memory/y"
    )
    assert cgroup._directory("/docker/abc", "/sys/fs/cgroup/memory", "/other") is None


@needs_cgroups
def test_a_call_group_holds_the_limits_it_was_given_and_is_gone_once_removed():
    group = cgroup.create(100 << 20, 8, 0.5)
    try:
        values = {}
        for directory in group.dirs.values():
            for name in ("memory.limit_in_bytes", "memory.max", "pids.max", "cpu.cfs_quota_us", "cpu.max"):
                if os.path.exists(os.path.join(directory, name)):
                    values[name] = open(os.path.join(directory, name)).read().strip()
        assert values.get("memory.limit_in_bytes", values.get("memory.max")) == str(100 << 20)
        assert values["pids.max"] == "12"
        if "cpu.max" in values:
            assert values["cpu.max"] == "50000 100000"
        elif "cpu.cfs_quota_us" in values:
            assert values["cpu.cfs_quota_us"] == "50000"
    finally:
        group.remove()
    assert not any(os.path.exists(d) for d in group.dirs.values())


@needs_cgroups
def test_no_call_group_outlives_its_call_nor_the_harness_and_a_dead_harnesss_groups_are_swept():
    result = sandbox.run("import os\nos.fork()\nprint('ok')", "python", timeout_s=10.0)
    assert result.ok and result.stdout.count("ok") == 2
    assert sandbox.wait_for_cleanup(30.0)
    for parent in cgroup._found.parents.values():
        assert [name for name in os.listdir(parent) if name.startswith("call-")] == []
    # A harness that exits removes its own groups; one killed leaves them to the next probe.
    harness = "from forge import sandbox; from forge.sandbox import cgroup\n" + (
        "assert sandbox.run('print(1)', 'python').ok\nprint(sorted(cgroup._found.parents.values()))\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run(
        [sys.executable, "-c", harness], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not any(os.path.exists(p) for p in eval(done.stdout.strip().splitlines()[-1]))
    killed = harness + "import os; os._exit(0)\n"  # skips atexit, as a killed harness would
    left = subprocess.run(
        [sys.executable, "-c", killed], capture_output=True, text=True, env=env, timeout=120
    )
    stale = eval(left.stdout.strip().splitlines()[-1])
    assert any(os.path.exists(p) for p in stale)
    subprocess.run([sys.executable, "-c", harness], check=True, capture_output=True, env=env, timeout=120)
    assert not any(os.path.exists(p) for p in stale)


def test_sandbox_call_cgroup_false_gives_calls_none(monkeypatch):
    from forge.config import load_config

    assert load_config("smoke", ["sandbox.call_cgroup=false"]).sandbox.call_cgroup is False
    monkeypatch.setattr(cgroup, "_allowed", True)
    cgroup.set_allowed(False)
    assert not cgroup.enabled() and cgroup.create(1 << 30, 8, None) is None
    assert cgroup.why_not() == "sandbox.call_cgroup is false"
