"""A cgroup per sandbox call, for a root harness: the call's processes together get
`Limits.call_memory_bytes` of memory (page cache and tmpfs pages included, no swap beyond
it), `Limits.processes` processes, and `Limits.call_cpus` cores when set, whatever they do
with fork, setsid or the uid they run as. Rlimits alone cap each process, not the call.

Where the host gives cgroup v1 controllers (each its own hierarchy), a call's group sits in
each controller below the harness's own group. On cgroup v2 a group holding processes may not
hand controllers to children, so the harness makes one group beside its own, holding no
process, with the controllers enabled, and the calls' groups below that. The launcher joins
the call's groups first thing (still root), so everything the call forks is in them.

Without root, on a read-only cgroupfs, or in a container whose cgroup namespace root is the
harness's own group (v2), `enabled()` is False and calls run with rlimits alone, as the run's
start message says.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("forge.sandbox")

V1_CONTROLLERS = ("memory", "pids", "cpu")
V2_CONTROLLERS = ("memory", "pids", "cpu")
PREFIX = "forge-sandbox-"  # one group per harness process: forge-sandbox-<pid>
CPU_PERIOD_US = 100_000
# The launcher, and level 1's init or level 0's supervisor, run beside the call's own
# processes: the pids cap leaves them room.
HARNESS_PROCESSES = 4

_lock = threading.Lock()
_found: Layout | None = None
_probed = False
_allowed = True
_why_not = ""
_counter = itertools.count()


@dataclass(frozen=True)
class Layout:
    """Where this harness's call groups go: per controller (v1) or one directory (v2)."""

    version: int
    parents: dict[str, str]  # controller -> this harness's directory (v2: one, under "")


@dataclass
class CallGroup:
    """One call's groups: the launcher writes its pid to each of `procs_files`."""

    layout: Layout
    dirs: dict[str, str]  # controller -> directory (v2: "" -> the one directory)

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def memory_exceeded(self) -> bool:
        """Whether the kernel killed a process of the call for the call's memory cap."""
        memory = self.dirs.get("memory") or self.dirs.get("")
        name = "memory.oom_control" if self.layout.version == 1 else "memory.events"
        try:
            with open(os.path.join(memory, name)) as f:
                counts = dict(line.split() for line in f if len(line.split()) == 2)
        except OSError:
            return False
        return int(counts.get("oom_kill", 0)) > 0

    def remove(self, timeout_s: float = 10.0) -> None:
        """Kill whatever is left in the groups and remove them."""
        deadline = time.monotonic() + timeout_s
        for directory in self.dirs.values():
            _remove(directory, deadline)


def _remove(directory: str, deadline: float) -> None:
    while True:
        for pid in _pids_in(directory):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # killed, not yet gone


def _pids_in(directory: str) -> list[int]:
    try:
        with open(os.path.join(directory, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except OSError:
        return []


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, root within its hierarchy, mount point, options) of the cgroup mounts."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            dash = fields.index("-")
            fstype = fields[dash + 1]
            if fstype in ("cgroup", "cgroup2"):
                options = set(fields[dash + 3].split(",")) | set(fields[5].split(","))
                found.append((fstype, fields[3], fields[4], options))
    return found


def _own_paths() -> dict[str, str]:
    """Controller (v1) or "" (v2) -> this process's group path in that hierarchy."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if number == "0" and controllers == "":
                paths[""] = path
            for controller in controllers.split(","):
                if controller:
                    paths[controller] = path
    return paths


def _directory(mount_root: str, mount_point: str, own: str) -> str | None:
    """The directory of group `own` under a mount of its hierarchy rooted at `mount_root`."""
    if mount_root != "/" and not (own == mount_root or own.startswith(mount_root.rstrip("/") + "/")):
        return None
    relative = own[len(mount_root) :] if mount_root != "/" else own
    return os.path.join(mount_point, relative.lstrip("/"))


def _v1_layout(mounts, own) -> Layout | None:
    parents = {}
    for controller in V1_CONTROLLERS:
        for fstype, root, point, options in mounts:
            if fstype == "cgroup" and controller in options and controller in own:
                directory = _directory(root, point, own[controller])
                if directory is not None and os.path.isdir(directory):
                    parents[controller] = os.path.join(directory, f"{PREFIX}{os.getpid()}")
                    break
    if "memory" not in parents or "pids" not in parents:
        return None
    return Layout(1, parents)


def _v2_layout(mounts, own) -> Layout | None:
    if "" not in own or own[""] == "/":
        return None  # no parent to put a process-free group in (a container's cgroup root)
    for fstype, root, point, _ in mounts:
        if fstype == "cgroup2":
            directory = _directory(root, point, own[""])
            if directory is None or not os.path.isdir(directory):
                continue
            parent = os.path.dirname(directory)
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                enabled = set(f.read().split())
            if {"memory", "pids"} <= enabled:
                return Layout(2, {"": os.path.join(parent, f"{PREFIX}{os.getpid()}")})
    return None


def _sweep(parent_of_ours: str) -> None:
    """Remove groups left by harnesses that died (their pid is gone)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(parent_of_ours):
            if not name.startswith(PREFIX) or not name[len(PREFIX) :].isdigit():
                continue
            if name[len(PREFIX) :] == str(os.getpid()) or os.path.exists(f"/proc/{name[len(PREFIX) :]}"):
                continue
            stale = os.path.join(parent_of_ours, name)
            for child in os.listdir(stale):
                if os.path.isdir(os.path.join(stale, child)):
                    with contextlib.suppress(OSError):
                        _remove(os.path.join(stale, child), time.monotonic() + 2.0)
            with contextlib.suppress(OSError):
                os.rmdir(stale)


def _make(layout: Layout) -> None:
    for parent in layout.parents.values():
        _sweep(os.path.dirname(parent))
        os.makedirs(parent, exist_ok=True)
        if layout.version == 2:
            with open(os.path.join(os.path.dirname(parent), "cgroup.subtree_control")) as f:
                available = set(f.read().split())
            wanted = [c for c in V2_CONTROLLERS if c in available]
            _write(os.path.join(parent, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))


def _probe_join(group: CallGroup) -> None:
    """A child process joins the group and exits: what the launcher will do for each call."""
    code = "import sys\nfor p in sys.argv[1:]:\n    open(p, 'w').write(str(__import__('os').getpid()))"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, *group.procs_files],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise OSError(lines[-1] if lines else f"exit code {result.returncode}")


def set_allowed(allowed: bool) -> None:
    """`sandbox.call_cgroup`: False gives calls no cgroup even where the host could."""
    global _allowed
    _allowed = allowed


def enabled() -> bool:
    """Whether calls get a cgroup here (probed once per process: a root harness that can make
    groups, set their limits and move a process into them), and `sandbox.call_cgroup` allows it."""
    global _found, _probed, _why_not
    if not _allowed:
        return False
    with _lock:
        if not _probed:
            _probed = True
            _found, _why_not = _probe()
            if _found is None:
                log.info("sandbox calls get no cgroup: %s", _why_not)
            else:
                log.info("sandbox calls get a cgroup v%d each: %s", _found.version, _found.parents)
                atexit.register(_remove_own, _found)
        return _found is not None


def _remove_own(layout: Layout) -> None:
    """At exit: this harness's groups, with any call group a cleanup thread has not removed yet."""
    deadline = time.monotonic() + 5.0
    for parent in layout.parents.values():
        with contextlib.suppress(OSError):
            for name in os.listdir(parent):
                if os.path.isdir(os.path.join(parent, name)):
                    _remove(os.path.join(parent, name), deadline)
            os.rmdir(parent)


def why_not() -> str:
    """Why calls get no cgroup here ("" when they do)."""
    if not _allowed:
        return "sandbox.call_cgroup is false"
    enabled()
    return _why_not


def _probe() -> tuple[Layout | None, str]:
    if os.geteuid() != 0:
        return None, "the harness is not root"
    try:
        mounts, own = _mounts(), _own_paths()
        layout = _v1_layout(mounts, own) or _v2_layout(mounts, own)
        if layout is None:
            return None, "no cgroup v1 memory and pids hierarchy, nor a cgroup v2 parent with them enabled"
        _make(layout)
        group = _create(layout, 64 << 20, 4, 1.0)
        try:
            _probe_join(group)
        finally:
            group.remove()
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return layout, ""


def _create(layout: Layout, memory_bytes: int | None, processes: int, cpus: float | None) -> CallGroup:
    name = f"call-{next(_counter)}"
    # v1: a call joins the cpu hierarchy only to be capped there. A group of its own would
    # also change its share: under load, the whole call would weigh as one of the host's tasks.
    dirs = {
        controller: os.path.join(parent, name)
        for controller, parent in layout.parents.items()
        if controller != "cpu" or cpus is not None
    }
    group = CallGroup(layout, {})
    try:
        for controller, directory in dirs.items():
            os.mkdir(directory)
            group.dirs[controller] = directory
        _set_limits(layout, dirs, memory_bytes, processes + HARNESS_PROCESSES, cpus)
    except BaseException:
        with contextlib.suppress(OSError):
            group.remove(2.0)
        raise
    return group


def _set_limits(
    layout: Layout, dirs: dict[str, str], memory_bytes: int | None, processes: int, cpus: float | None
) -> None:
    if layout.version == 1:
        memory = dirs["memory"]
        if memory_bytes is not None:
            _write(os.path.join(memory, "memory.limit_in_bytes"), str(memory_bytes))
            swap = os.path.join(memory, "memory.memsw.limit_in_bytes")
            if os.path.exists(swap):  # memory plus swap: none of it may spill to swap
                _write(swap, str(memory_bytes))
        _write(os.path.join(dirs["pids"], "pids.max"), str(processes))
        if cpus is not None and "cpu" in dirs:
            _write(os.path.join(dirs["cpu"], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(dirs["cpu"], "cpu.cfs_quota_us"), str(int(cpus * CPU_PERIOD_US)))
        return
    directory = dirs[""]
    if memory_bytes is not None:
        _write(os.path.join(directory, "memory.max"), str(memory_bytes))
        if os.path.exists(os.path.join(directory, "memory.swap.max")):
            _write(os.path.join(directory, "memory.swap.max"), "0")
    _write(os.path.join(directory, "pids.max"), str(processes))
    if cpus is not None and os.path.exists(os.path.join(directory, "cpu.max")):
        _write(os.path.join(directory, "cpu.max"), f"{int(cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")


def create(memory_bytes: int | None, processes: int, cpus: float | None) -> CallGroup | None:
    """A new call's group: `memory_bytes` of memory (None: no cap), `processes` for the code
    (the launcher's own come on top), `cpus` cores (None: no cap); or None where calls get no
    group (see `enabled`)."""
    if not enabled():
        return None
    return _create(_found, memory_bytes, processes, cpus)
