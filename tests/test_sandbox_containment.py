"""What each isolation level keeps in: host files written or read, loopback services and Ray,
other processes, floods of inodes, bytes and threads, late writes, and escapes through mount
or unshare. Each case runs at every level this host offers and asserts that level's
containment: levels 1 and 2 contain everything; level 0 (an opt-in for untrusted code)
contains what a uid of its own and rlimits can, and the cases it cannot are asserted as such."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest
from sandbox_levels import LEVELS, NAMESPACED

from forge import sandbox
from forge.sandbox import uids

ROOT = uids.is_root()


def run(code: str, level: int, **kwargs) -> sandbox.SandboxResult:
    kwargs.setdefault("timeout_s", 5.0)
    return sandbox.run(textwrap.dedent(code), level=level, **kwargs)


def assert_still_works(level: int) -> None:
    result = run("print(6 * 7)", level)
    assert result.ok and result.stdout.strip() == "42", result


def needs_own_uid(level: int) -> None:
    if level == 0 and not ROOT:
        pytest.skip("level 0 without root runs as the harness's own user")


@pytest.fixture
def host_files():
    """World-readable host files the sandbox could name: a directory in /tmp standing for Ray's
    session files, and a file in /dev/shm."""
    session = tempfile.mkdtemp(prefix="forge-host-session-", dir="/tmp")
    os.chmod(session, 0o755)
    secret = os.path.join(session, "secret.txt")
    with open(secret, "w") as f:
        f.write("host-secret-2718")
    os.chmod(secret, 0o644)
    shm = f"/dev/shm/forge-host-{uuid.uuid4().hex}"
    with open(shm, "w") as f:
        f.write("host-secret-2718")
    os.chmod(shm, 0o644)
    yield {"session": session, "secret": secret, "shm": shm}
    shutil.rmtree(session, ignore_errors=True)
    os.remove(shm)


@pytest.mark.parametrize("level", LEVELS)
def test_writes_to_tmp_shm_and_home_stay_inside(level):
    needs_own_uid(level)
    name = f"forge-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"/dev/shm/{name}", os.path.join(os.getcwd(), name)]
    result = run(
        f"""
        import os
        for path in {targets!r} + [os.path.expanduser("~/{name}")]:
            try:
                open(path, "w").write("escaped")
                print("wrote", path)
            except OSError as error:
                print("denied", path, error.errno)
    """,
        level,
    )
    assert result.exit_code == 0, result.stderr
    assert sandbox.wait_for_cleanup()
    leaked = [path for path in targets if os.path.exists(path)]
    for path in leaked:
        os.remove(path)
    # Level 0 writes to the host's world-writable /tmp and /dev/shm; under a root harness what
    # its uid left there is removed after the call, and the harness's tree is root's.
    expected = [] if level >= 1 or ROOT else targets
    assert leaked == expected, result.stdout
    if level == 0:
        assert f"wrote /tmp/{name}" in result.stdout
    assert_still_works(level)


@pytest.mark.skipif(not ROOT, reason="without root level 0 has no uid of its own to tell its files by")
def test_what_level_0_leaves_in_the_hosts_shared_dirs_is_removed_and_nothing_else(host_files):
    name = f"forge-left-{uuid.uuid4().hex}"
    left = [f"/tmp/{name}", f"/dev/shm/{name}", f"/var/tmp/{name}", f"/tmp/{name}-dir"]
    result = run(
        f"""
        import os
        for path in {left[:3]!r}:
            open(path, "w").write("x" * 4096)
        os.makedirs({left[3]!r} + "/deep/er")
        open({left[3]!r} + "/deep/er/file", "w").write("x")
        os.symlink({host_files["session"]!r}, {left[3]!r} + "/deep/host")
        os.symlink({host_files["secret"]!r}, "/tmp/{name}-link")
        print("left", len(os.listdir({left[3]!r})))
    """,
        0,
    )
    assert result.stdout.strip() == "left 1", result.stderr
    assert sandbox.wait_for_cleanup()
    assert [path for path in [*left, f"/tmp/{name}-link"] if os.path.lexists(path)] == []
    # Symlinks were removed, never followed: the host files they named are intact.
    assert open(host_files["secret"]).read() == "host-secret-2718"


@pytest.mark.skipif(not ROOT, reason="without root level 0 has no uid of its own to tell its files by")
def test_level_0_bytes_kept_in_the_hosts_tmp_end_the_call_at_the_disk_cap():
    name = f"forge-fill-{uuid.uuid4().hex}"
    result = run(
        f"""
        import time
        for i in range(12):
            with open(f"/tmp/{name}-{{i}}", "wb") as f:
                f.write(b"x" * (8 << 20))
        time.sleep(10)
        print("kept 96 MiB")
    """,
        0,
        limits=sandbox.Limits(disk_bytes=32 << 20),
        timeout_s=15.0,
    )
    assert result.disk_exceeded and not result.timed_out and "kept" not in result.stdout, result
    assert sandbox.wait_for_cleanup()
    assert not [entry for entry in os.listdir("/tmp") if entry.startswith(name)]


@pytest.mark.parametrize("level", LEVELS)
def test_host_files_readable_by_anyone_are_out_of_reach(level, host_files):
    needs_own_uid(level)
    readme = os.path.join(os.getcwd(), "README.md")
    result = run(
        f"""
        for path in [{host_files["secret"]!r}, {host_files["shm"]!r}, {readme!r}]:
            try:
                print("READ:", path, open(path).read()[:40])
            except OSError as error:
                print("denied", path, error.errno)
    """,
        level,
    )
    assert result.exit_code == 0, result.stderr
    if level >= 1:
        assert "READ:" not in result.stdout and result.stdout.count("denied") == 3
    else:  # rlimits and a uid cannot hide what every user may read
        assert "host-secret-2718" in result.stdout


@pytest.mark.parametrize("level", LEVELS)
def test_the_filesystem_outside_the_work_dir_is_read_only(level):
    needs_own_uid(level)
    result = run(
        """
        import os, sys
        for path in ["/", "/usr", "/etc", sys.prefix, os.path.dirname(os.__file__), "/proc"]:
            try:
                open(os.path.join(path, "forge-probe"), "w").write("x")
                print("WROTE", path)
            except OSError as error:
                print("denied", path, error.errno)
    """,
        level,
    )
    assert result.exit_code == 0, result.stderr
    assert "WROTE" not in result.stdout, result.stdout


@pytest.mark.parametrize("level", LEVELS)
def test_host_processes_are_invisible(level):
    needs_own_uid(level)
    host = subprocess.Popen(["sleep", "30"])
    try:
        result = run(
            """
            import json, os
            print(json.dumps(sorted(int(e) for e in os.listdir("/proc") if e.isdigit())))
        """,
            level,
        )
    finally:
        host.kill()
        host.wait()
    assert result.exit_code == 0, result.stderr
    pids = json.loads(result.stdout)
    if level >= 1:  # its own pid namespace: the code's processes only, numbered from 1
        assert max(pids) < 10 and host.pid not in pids, pids
    else:
        assert host.pid in pids


@pytest.mark.parametrize("level", LEVELS)
def test_loopback_services_are_reachable_only_at_level_0(level):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        result = run(
            f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=1.0)
                print("CONNECTED")
            except OSError as error:
                print("failed", type(error).__name__)
        """,
            level,
        )
    finally:
        listener.close()
    assert ("CONNECTED" in result.stdout) == (level == 0), result.stdout


@pytest.mark.parametrize("level", NAMESPACED)
def test_ray_is_out_of_reach(level, ray_session):
    node = ray_session._private.worker.global_worker.node
    info = node.address_info
    host = info["node_ip_address"]
    gcs_port = int(info["gcs_address"].rsplit(":", 1)[1])
    candidates = (node.node_manager_port, info["metrics_export_port"], info.get("dashboard_agent_listen_port"),
                  node.runtime_env_agent_port)  # fmt: skip
    ports = {gcs_port} | {int(p) for p in candidates if p and int(p) > 0}  # -1: not started
    session = node.get_session_dir_path()
    token = os.path.expanduser("~/.ray/auth_token")
    # Ray is reachable from the host: these are live.
    socket.create_connection((host, gcs_port), timeout=2.0).close()
    assert os.listdir(session)
    result = run(
        f"""
        import os, socket
        for address in [(h, p) for h in ({host!r}, "127.0.0.1") for p in {sorted(ports)!r}]:
            try:
                socket.create_connection(address, timeout=0.5)
                print("CONNECTED", address)
            except OSError:
                print("refused", address)
        for path in ({info["raylet_socket_name"]!r}, {info["object_store_address"]!r}):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                print("CONNECTED", path)
            except OSError:
                print("refused", path)
        for path in ({session!r}, os.path.dirname({session!r}), {token!r}):
            try:
                print("READ:", path, os.listdir(path) if os.path.isdir(path) else open(path).read())
            except OSError:
                print("refused", path)
            if os.path.exists(path):
                print("EXISTS", path)
    """,
        level,
    )
    assert result.exit_code == 0, result.stderr
    assert "CONNECTED" not in result.stdout and "READ:" not in result.stdout, result.stdout
    assert "EXISTS" not in result.stdout, result.stdout


@pytest.mark.parametrize("level", LEVELS)
def test_an_inode_flood_stops_at_the_file_cap_and_the_call_keeps_its_timeout(level):
    needs_own_uid(level)
    if not ROOT:
        pytest.skip("the file cap is a tmpfs the harness mounts as root")
    result = run(
        """
        import os
        made = 0
        try:
            while True:
                open(f"f{made}", "w").close()
                made += 1
        except OSError as error:
            print("stopped", made, error.errno, flush=True)
        import time
        time.sleep(60)
    """,
        level,
        timeout_s=1.5,  # 2,000 files take milliseconds; the call then sleeps to the timeout
        limits=sandbox.Limits(max_files=2000),
    )
    stopped, made, errno_ = result.stdout.split()
    assert stopped == "stopped" and int(made) <= 2000 and int(errno_) == 28  # ENOSPC
    assert result.timed_out and result.wall_seconds < 1.5 + 1.0
    assert_still_works(level)


@pytest.mark.parametrize("level", LEVELS)
def test_bytes_written_anywhere_writable_share_one_cap(level):
    needs_own_uid(level)
    if not ROOT:
        pytest.skip("the byte cap is a tmpfs the harness mounts as root")
    places = ["work.bin", "/tmp/tmp.bin", "/dev/shm/shm.bin"] if level >= 1 else ["work.bin"]
    result = run(
        f"""
        import os, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        total = 0
        for path in {places!r}:
            try:
                with open(path, "wb", buffering=0) as f:
                    while True:
                        total += f.write(b"0" * (1 << 20))
            except OSError as error:
                print(path, error.errno)
        print("total", total)
    """,
        level,
        limits=sandbox.Limits(disk_bytes=8 << 20, file_bytes=64 << 20),
    )
    assert result.exit_code == 0, result.stderr
    total = int(result.stdout.split()[-1])
    assert total <= 8 << 20 and result.stdout.count(" 28\n") == len(places), result.stdout  # ENOSPC


@pytest.mark.parametrize("level", LEVELS)
def test_a_thread_flood_is_capped_and_the_call_returns(level):
    needs_own_uid(level)
    result = run(
        """
        import threading, time
        started = 0
        try:
            while True:
                threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
                started += 1
        except RuntimeError as error:
            print("capped after", started, flush=True)
        time.sleep(60)
    """,
        level,
        timeout_s=2.0,  # the cap is hit in milliseconds; the call then sleeps to the timeout
        limits=sandbox.Limits(processes=32),
    )
    assert result.stdout.startswith("capped after"), (result.stdout, result.stderr[-300:])
    assert int(result.stdout.split()[2]) < 32
    assert result.timed_out and result.wall_seconds < 2.0 + 1.0
    assert_still_works(level)


@pytest.mark.parametrize("level", LEVELS)
def test_a_detached_child_cannot_write_after_the_call(level):
    needs_own_uid(level)
    name = f"forge-late-{uuid.uuid4().hex}"
    result = run(
        f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(0.5)
                for path in ("/tmp/{name}", "late.txt"):
                    open(path, "w").write("late")
            os._exit(0)
        os.wait()
        print("parent done")
    """,
        level,
        collect=["late.txt"],
    )
    assert result.ok and result.files == {}
    time.sleep(1.0)
    assert not os.path.exists(f"/tmp/{name}")


@pytest.mark.parametrize("level", LEVELS)
def test_mount_and_unshare_do_not_uncover_the_host(level, host_files):
    needs_own_uid(level)
    result = run(
        f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)

        def attempt(what, ok):
            print(what, "ok" if ok == 0 else "failed", ctypes.get_errno())

        attempt("umount-tmp", libc.umount2(b"/tmp", 2))
        attempt("mount-tmpfs", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
        attempt("remount-usr-rw", libc.mount(None, b"/usr", None, 32 | 4096, None))
        # A user namespace of its own makes the code root there: its copy of the mounts is locked.
        attempt("unshare", libc.unshare(0x10000000 | 0x00020000))
        for target in (b"/tmp", b"/work", b"/usr", b"/"):
            attempt("umount " + target.decode(), libc.umount2(target, 2))
        attempt("remount-usr-rw", libc.mount(None, b"/usr", None, 32 | 4096, None))
        for path in ({host_files["secret"]!r}, {host_files["shm"]!r}, {os.getcwd()!r}, "/home"):
            print("EXISTS" if os.path.exists(path) else "absent", path)
        try:
            open("/usr/forge-probe", "w")
            print("WROTE /usr")
        except OSError:
            print("denied /usr")
    """,
        level,
    )
    assert result.exit_code == 0, result.stderr
    assert "WROTE" not in result.stdout and not os.path.exists("/usr/forge-probe"), result.stdout
    if level >= 1:
        assert result.stdout.count("absent") == 4, result.stdout
    else:  # a mount namespace of its own changes nothing on the host, which it sees as before
        assert "EXISTS " + host_files["secret"] in result.stdout, result.stdout
    assert_still_works(level)


def test_stale_work_dirs_are_swept_and_live_ones_kept(tmp_path):
    from forge.sandbox import workdir

    def make(name: str, age_s: float, lock: bool) -> str:
        path = tmp_path / f"{workdir.PREFIX}{name}"
        (path / "fs" / "work").mkdir(parents=True)
        (path / "fs" / "work" / "left.txt").write_text("x")
        if lock:
            (path / "lock").write_text("")
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return str(path)

    stale = make("stale", 3600, lock=True)
    young = make("young", 0, lock=True)
    held = make("held", 3600, lock=True)
    import fcntl

    holder = os.open(os.path.join(held, "lock"), os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert workdir.sweep(str(tmp_path)) == 1
    finally:
        os.close(holder)
    assert not os.path.exists(stale) and os.path.exists(young) and os.path.exists(held)


def test_a_call_leaves_no_work_dir_behind(monkeypatch):
    from forge.sandbox import workdir

    made = []
    create = workdir.create
    monkeypatch.setattr(workdir, "create", lambda *args: made.append(create(*args)) or made[-1])
    # 20k files at a generous cap: removing them is the cleanup's job, after the call returned.
    result = sandbox.run(
        "import os\nfor i in range(20000):\n    open(f'f{i}', 'w').close()\nprint('done')",
        timeout_s=30.0,
        limits=sandbox.Limits(max_files=30000),
    )
    assert result.ok, result.stderr
    assert sandbox.wait_for_cleanup(30.0)
    assert made and not [run_dir.root for run_dir in made if os.path.exists(run_dir.root)]


@pytest.mark.parametrize("level", LEVELS)
def test_no_process_the_code_can_trace_holds_a_capability(level):
    needs_own_uid(level)
    result = run(
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        PTRACE_ATTACH, PTRACE_DETACH = 16, 17
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
                continue
            os.waitpid(pid, 0)
            caps = [line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith(("CapEff", "CapPrm"))]
            libc.ptrace(PTRACE_DETACH, pid, None, None)
            print("traced", pid, *caps)
        print("done")
    """,
        level,
    )
    assert result.exit_code == 0 and result.stdout.endswith("done\n"), result.stderr
    for line in result.stdout.splitlines()[:-1]:
        _, pid, effective, permitted = line.split()
        assert int(effective, 16) == 0 and int(permitted, 16) == 0, line
    assert_still_works(level)


@pytest.fixture
def no_tmpfs(monkeypatch):
    """A harness that cannot mount (not root, or a container without CAP_SYS_ADMIN)."""
    from forge.sandbox import workdir

    def refuse(*args, **kwargs):
        raise PermissionError(1, "mount: Operation not permitted")

    monkeypatch.setattr(workdir._syscalls, "mount", refuse)


@pytest.mark.parametrize("level", LEVELS)
def test_without_a_tmpfs_a_work_dir_over_its_file_cap_ends_the_call(level, no_tmpfs):
    result = run(
        """
        import time
        for i in range(100000):
            open(f"f{i}", "w").close()
        time.sleep(60)
    """,
        level,
        timeout_s=20.0,
        limits=sandbox.Limits(max_files=500),
    )
    assert result.disk_exceeded and not result.ok and not result.timed_out, result
    assert result.wall_seconds < 5.0


@pytest.mark.parametrize("level", LEVELS)
def test_without_a_tmpfs_a_work_dir_over_its_byte_cap_ends_the_call(level, no_tmpfs):
    result = run(
        """
        import time
        with open("big", "wb") as f:
            for _ in range(64):
                f.write(b"x" * (1 << 20))
                f.flush()
        time.sleep(60)
    """,
        level,
        timeout_s=20.0,
        limits=sandbox.Limits(disk_bytes=8 << 20, file_bytes=128 << 20),
    )
    assert result.disk_exceeded and not result.timed_out, result


@pytest.mark.parametrize("level", NAMESPACED)
def test_system_paths_holding_mounts_are_bound_whole_and_read_only(level):
    """A container runtime binds files into /usr (the NVIDIA toolkit's libraries and tools); a
    user namespace may bind such a path only with the mounts inside it, each made read-only."""
    if not ROOT:
        pytest.skip("making a mount namespace with a mount inside /usr needs root")
    inner = os.path.realpath("/bin/sh")  # a file under /usr on merged-/usr systems, else /bin
    child = textwrap.dedent(
        f"""
        import json, os
        from forge import sandbox
        from forge.sandbox import _syscalls as sc
        sc.unshare(sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        sc.mount({inner!r}, {inner!r}, None, sc.MS_BIND)  # the same file, now a mount of its own
        result = sandbox.run(
            "import os\\nprint(os.statvfs({inner!r}).f_flag & os.ST_RDONLY, os.statvfs('/usr').f_flag & os.ST_RDONLY)",
            level={level},
        )
        print(json.dumps([result.exit_code, result.stdout, result.stderr]))
        """
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    exit_code, stdout, stderr = json.loads(out.stdout.splitlines()[-1])
    assert exit_code == 0, stderr
    assert stdout.split() == [str(os.ST_RDONLY)] * 2
