"""Level 1 for most users: a harness that is not root, on a host without bubblewrap. The
harness runs as `nobody` with no bwrap on its PATH, holds what a run holds (a secret in its
environment, files in its home, a loopback port, an abstract socket), and hostile code tries to
reach each of them. Needs root to start the harness as another user (CI runs as root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import no_userns
import pytest

from forge.sandbox import isolation, uids

NOBODY = 65534
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HARNESS = textwrap.dedent(
    """
    import json, os, socket, sys
    from forge import sandbox
    from forge.sandbox import levels, policy

    home = os.environ["HOME"]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\\0forge-test-harness-" + str(os.getpid()))
    abstract.listen(4)
    log = open(os.path.join(home, "metrics.jsonl"), "w")
    pid, port, fd = os.getpid(), listener.getsockname()[1], log.fileno()
    attacks = {
        "home": f"print(open({home!r} + '/notes.txt').read())",
        "environ": "import os\\nfor p in os.listdir('/proc'):\\n"
                   "    try: print(open(f'/proc/{p}/environ', 'rb').read())\\n    except OSError: pass",
        "write_home": f"open({home!r} + '/pwned', 'w').write('x')",
        "loopback": f"import socket\\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\\nprint('CONNECTED')",
        "abstract": f"import socket\\ns = socket.socket(socket.AF_UNIX)\\n"
                    f"s.connect('\\\\0forge-test-harness-{pid}')\\nprint('CONNECTED')",
        "kill": f"import os\\nos.kill({pid}, 9)\\nprint('KILLED')",
        "ptrace": f"import ctypes\\nlibc = ctypes.CDLL(None, use_errno=True)\\n"
                  f"print('ATTACHED' if libc.ptrace(16, {pid}, 0, 0) == 0 else 'denied')",
        "proc_fd": f"open('/proc/{pid}/fd/{fd}', 'w').write('PWNED')\\nprint('WROTE')",
        "daemon": "import os\\nif os.fork() == 0:\\n    os.setsid()\\n"
                  "    os.execv('/bin/sleep', ['sleep', '" + sys.argv[1] + "'])",
        "uid": "import os\\nprint('ROOT' if 0 in os.getresuid() else 'not root')",
        "mount": "import ctypes\\nlibc = ctypes.CDLL(None, use_errno=True)\\n"
                 "tries = [libc.umount2(b'/usr', 2), libc.mount(None, b'/', None, 32 | 4096, None),\\n"
                 "         libc.mount(b'none', b'/work', b'tmpfs', 0, None)]\\n"
                 "print('MOUNTED' if 0 in tries else 'denied')",
    }
    level = sandbox.available_level()
    lines = policy.announce(level, untrusted=True, env_name="python_coding")
    if level < 1:  # the test skips: at level 0 the code would end this harness
        attacks = {}
    results = {name: sandbox.run(code, timeout_s=5.0).stdout for name, code in attacks.items()}
    sandbox.wait_for_cleanup()
    log.close()
    print(json.dumps({"level": level, "why_not_2": levels.why_unavailable(2), "announce": lines,
                      "results": results, "log": open(os.path.join(home, "metrics.jsonl")).read()}))
    """
)


def nobody_python() -> tuple[str, dict[str, str]] | None:
    """An interpreter `nobody` can run, with what it needs to find its libpython."""
    try:
        python = isolation.level0_python(sys.executable)
    except OSError:  # a closed prefix, and no right to bind it where nobody can reach it
        return None
    if python is None:
        return None
    env = {}
    if python != sys.executable:
        env["LD_LIBRARY_PATH"] = os.path.join(os.path.dirname(os.path.dirname(python)), "lib")
    return python, env


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and marker.encode() in open(f"/proc/{entry}/cmdline", "rb").read():
                found.append(int(entry))
        except OSError:
            continue
    return found


LEAK_MARKS = ("secret", "CONNECTED", "KILLED", "ATTACHED", "WROTE", "ROOT", "MOUNTED")


def run_harness(
    home_owner: int, command: list[str], env: dict[str, str], skip_at_level_0: bool = True, **user
) -> dict:
    """Run HARNESS in a home holding a readable secret; return its report (or skip the test
    when the sandbox falls to level 0 there and `skip_at_level_0`), and check that nothing of
    the run leaked or outlived it."""
    marker = f"4242.{os.getpid()}"
    home = tempfile.mkdtemp(prefix="forge-harness-home-")
    try:
        os.chmod(home, 0o755)  # a Debian home: other users may list it
        with open(os.path.join(home, "notes.txt"), "w") as f:
            f.write("home-secret-1618")
        os.chmod(os.path.join(home, "notes.txt"), 0o644)
        os.chown(home, home_owner, home_owner)
        proc = subprocess.run(
            [*command, "-c", HARNESS, marker],
            env={"HOME": home, "PYTHONPATH": REPO, "FORGE_TEST_TOKEN": "token-secret-2236", **env},
            cwd=home,
            capture_output=True,
            text=True,
            timeout=120,
            **user,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report["level"] < 1 and skip_at_level_0:
            pytest.skip(f"level 1 is unavailable here: {report['announce'][-1]}")
        leaked = {name: out for name, out in report["results"].items() if any(s in out for s in LEAK_MARKS)}
        assert leaked == {}
        assert set(report["results"]) >= {"home", "kill", "mount", "uid"}
        assert not os.path.exists(os.path.join(home, "pwned")) and report["log"] == ""
        assert processes_with(marker) == []
        return report
    finally:
        for pid in processes_with(marker):
            os.kill(pid, 9)
        subprocess.run(["rm", "-rf", home], check=False)


@pytest.mark.skipif(not uids.is_root(), reason="needs root to start a harness as nobody")
def test_an_unprivileged_harness_without_bubblewrap_gets_level_1_and_it_contains_hostile_code():
    found = nobody_python()
    if found is None or not isolation.world_searchable(REPO):
        pytest.skip("nobody cannot run this interpreter or reach this checkout")
    python, python_env = found
    # No bwrap on PATH: level 2 is out, as on a host without bubblewrap.
    env = {"PATH": "/nonexistent", **python_env}
    report = run_harness(NOBODY, [python], env, user=NOBODY, group=NOBODY, extra_groups=[])
    assert report["level"] == 1 and report["why_not_2"] == "bwrap not found"
    assert report["announce"][0] == "forge: sandbox level 1 (namespaces (user, mount, pid, net))"
    assert report["announce"][2].endswith("(here: bwrap not found)")


@pytest.mark.skipif(not (uids.is_root() and no_userns.SUPPORTED), reason="needs root, on x86_64")
def test_a_root_harness_on_a_host_refusing_user_namespaces_builds_level_1_as_root_and_it_contains_hostile_code():
    """User namespaces refused (seccomp, as Docker's profile or max_user_namespaces=0 do):
    bubblewrap and the unprivileged level 1 fail, and a root harness builds level 1's mount,
    pid and net namespaces with its own capabilities; the code runs as a plain sandbox uid."""
    wrapper = os.path.join(REPO, "tests", "no_userns.py")
    namespaces = ["unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "true"]
    if shutil.which("unshare") is None or subprocess.run([sys.executable, wrapper, *namespaces]).returncode:
        pytest.skip("root cannot make mount, pid and net namespaces here (no CAP_SYS_ADMIN)")
    command = [sys.executable, wrapper, sys.executable]
    report = run_harness(0, command, {"PATH": os.environ["PATH"]}, skip_at_level_0=False)
    assert report["level"] == 1, report["announce"]
    assert report["announce"][0] == f"forge: sandbox level 1 ({isolation.LEVEL_1_AS_ROOT_NAME})"
