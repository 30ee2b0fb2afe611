"""forge.sandbox API: what goes in, what comes back, and failing closed on min_level."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
from sandbox_levels import BEST, level_params

from forge import sandbox
from forge.sandbox import levels as probe_module

ALL_LEVELS = level_params(slow_between=False)


def test_python_code_runs_and_reports_exit_code_and_level():
    result = sandbox.run("import sys\nprint('hi')\nprint('oops', file=sys.stderr)\nsys.exit(3)")
    assert (result.stdout, result.stderr, result.exit_code) == ("hi\n", "oops\n", 3)
    assert result.level == BEST and not result.timed_out and not result.ok


def test_shell_code_runs():
    result = sandbox.run("echo $((6 * 7))", "shell")
    assert result.ok and result.stdout == "42\n"


def test_files_go_in_and_collected_files_come_back():
    code = "data = open('data/in.txt').read()\nopen('out.txt', 'w').write(data.upper())"
    result = sandbox.run(code, files={"data/in.txt": "abc"}, collect=["out.txt", "missing.txt"])
    assert result.ok and result.files == {"out.txt": "ABC"}


@pytest.mark.parametrize("name", ["/etc/passwd", "../escape.txt", "a/../../b"])
def test_file_names_outside_the_work_dir_are_rejected(name):
    with pytest.raises(ValueError, match="relative path inside the work dir"):
        sandbox.run("pass", files={name: "x"})


def test_environment_is_scrubbed_and_home_is_the_work_dir(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    result = sandbox.run("import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())")
    names, home_is_cwd = result.stdout.splitlines()
    assert "AWS_SECRET_ACCESS_KEY" not in names and home_is_cwd == "True"


def test_extra_environment_variables_can_be_passed():
    result = sandbox.run("echo $GREETING", "shell", env={"GREETING": "hello"})
    assert result.stdout == "hello\n"


def test_stdin_is_empty():
    result = sandbox.run("import sys\nprint(repr(sys.stdin.read()))")
    assert result.stdout == "''\n"


def test_work_dir_is_fresh_each_run():
    sandbox.run("open('left.txt', 'w').write('x')")
    result = sandbox.run("import os\nprint(sorted(os.listdir('.')))")
    assert result.stdout == "['main.py']\n"


def test_unknown_language_is_a_clear_error():
    with pytest.raises(ValueError, match="'python' or 'shell'"):
        sandbox.run("1", "ruby")


def test_arun_runs_without_blocking_the_event_loop():
    async def both():
        return await asyncio.gather(sandbox.arun("print(1)"), sandbox.arun("echo 2", "shell"))

    first, second = asyncio.run(both())
    assert (first.stdout, second.stdout) == ("1\n", "2\n")


def test_a_level_above_what_the_host_offers_is_refused():
    with pytest.raises(sandbox.SandboxUnavailable, match=f"offers only level {BEST}"):
        sandbox.run("pass", level=BEST + 1)


def test_min_level_fails_closed_with_how_to_fix(monkeypatch):
    monkeypatch.setattr(probe_module, "_level", 0)
    with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
        sandbox.require_level(2)
    with pytest.raises(sandbox.SandboxUnavailable, match="min_level=1"):
        sandbox.run("pass", min_level=1)


def test_require_level_returns_the_level_in_use_when_satisfied():
    assert sandbox.require_level(0) == BEST


def test_require_level_rejects_unknown_levels():
    with pytest.raises(ValueError, match="0, 1 or 2"):
        sandbox.require_level(3)


def test_probe_logs_the_level_it_chose(monkeypatch, caplog):
    monkeypatch.setattr(probe_module, "_level", None)
    with caplog.at_level(logging.INFO, logger="forge.sandbox"):
        level = sandbox.probe()
    assert level == BEST
    assert f"sandbox: using level {BEST}" in caplog.text


def test_untrusted_code_runs_in_another_process():
    result = sandbox.run("import os\nprint(os.getpid())", level=0)
    assert int(result.stdout) != os.getpid()


def test_closing_the_output_pipes_does_not_end_the_run_early():
    code = "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(30)\n"
    result = sandbox.run(code, timeout_s=1.0)
    assert result.timed_out


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_a_signal_death_is_reported_as_128_plus_the_signal_at_every_level(level):
    result = sandbox.run("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)", level=level)
    assert result.exit_code == 128 + 15


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_a_timeout_reports_sigkill_as_137_at_every_level(level):
    result = sandbox.run("import time\ntime.sleep(30)", level=level, timeout_s=0.5)
    assert result.timed_out and result.exit_code == 128 + 9


def test_binary_files_go_in_unchanged():
    result = sandbox.run("print(open('blob', 'rb').read().hex())", files={"blob": bytes([0, 255, 10])})
    assert result.stdout == "00ff0a\n"


def test_set_min_level_refuses_later_runs_below_it(monkeypatch):
    monkeypatch.setattr(probe_module, "_floor", 0)
    assert sandbox.set_min_level(BEST) == BEST
    if BEST > 0:
        with pytest.raises(sandbox.SandboxUnavailable, match=f"min_level={BEST}"):
            sandbox.run("pass", level=0)
    assert sandbox.run("print(1)").ok


def test_set_min_level_fails_at_startup_when_the_host_cannot_give_it(monkeypatch):
    monkeypatch.setattr(probe_module, "_level", 0)
    monkeypatch.setattr(probe_module, "_floor", 0)
    with pytest.raises(sandbox.SandboxUnavailable, match="sandbox.min_level=1"):
        sandbox.set_min_level(1)
    assert probe_module.min_level_floor() == 0


def test_a_host_where_even_level_0_fails_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(probe_module, "_level", None)
    monkeypatch.setattr(probe_module, "_works", lambda level: (False, "setuid: Operation not permitted"))
    with pytest.raises(sandbox.SandboxUnavailable, match="even sandbox level 0.*Operation not permitted"):
        sandbox.probe()


def test_a_host_without_bubblewrap_falls_back_to_level_1(monkeypatch):
    if BEST < 1:
        pytest.skip("this host has no user namespaces")
    monkeypatch.setattr(probe_module, "_level", None)
    monkeypatch.setattr(
        probe_module.shutil, "which", lambda name: None if name == "bwrap" else "/usr/bin/" + name
    )
    assert sandbox.probe() == 1
    result = sandbox.run("import os\nprint(os.listdir('/tmp'), os.getcwd())")
    assert result.ok and result.level == 1 and result.stdout == "[] /work\n"


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_hidden_tests_can_import_the_harness_packages_read_only(level):
    # pydantic is a forge dependency, absent from a bare system python3.
    hidden = "import pydantic, sys\nprint(pydantic.VERSION, sys.executable)\n"
    code = "import os, pydantic\nimport test_hidden\ntry:\n    open(os.path.join(os.path.dirname(pydantic.__file__), 'x'), 'w')\n    print('WROTE')\nexcept OSError:\n    print('read-only')\n"
    result = sandbox.run(code, files={"test_hidden.py": hidden}, level=level)
    assert result.ok, result.stderr
    import pydantic

    assert result.stdout.split()[0] == pydantic.VERSION
    assert result.stdout.split()[-1] == "read-only"


def test_a_sandbox_python_that_cannot_run_is_one_clear_error():
    with pytest.raises(sandbox.SandboxUnavailable, match="sandbox.python='/nonexistent/python3'"):
        sandbox.run("print(1)", python="/nonexistent/python3")


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs a system python3")
def test_sandbox_python_chooses_the_interpreter(monkeypatch):
    monkeypatch.setattr(probe_module, "_python", None)
    sandbox.set_python("/usr/bin/python3")
    result = sandbox.run("import sys\nprint(sys.executable)")
    assert result.ok and result.stdout.strip() == "/usr/bin/python3"


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_a_command_that_cannot_start_reports_127(level):
    result = sandbox.run("exec /no/such/program", "shell", level=level)
    assert result.exit_code == 127 and not result.timed_out
