"""A run's sandbox policy: untrusted code never runs silently at level 0, and the level in
use is said on the console at start with what it does not contain, with a warning at level 0
(and naming the nodes whose rollout workers run below the driver's level)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forge.env.output import console
from forge.sandbox import cgroup, isolation, levels, uids
from forge.sandbox.core import SandboxUnavailable

LEVEL_0_RISK = (
    "level 0 is rlimits and a uid of its own: the code can read files any user may read (checkpoints "
    "and the repository included), reach the network (the internet, and services on this host, Ray's "
    "included), list the host's processes, and write to the host's /tmp and /dev/shm (what its uid "
    "keeps there is measured against Limits.disk_bytes every 0.25 s, and removed after the call)"
)
# Without root there is no uid to give the code: it runs as the harness's own user.
LEVEL_0_RISK_NOT_ROOT = (
    "level 0 without root is rlimits only, and the code runs as this harness's own user: it can do "
    "whatever that user can, including read and write that user's files (its home, ~/.ssh, the "
    "repository, checkpoints), read the harness's environment variables with their secrets "
    "(/proc/PID/environ), signal, kill or ptrace the harness, Ray and that user's other processes, leave "
    "processes running after the call, write to the host's /tmp and /dev/shm and reach the network (the "
    "internet, and services on this host, Ray's included)"
)
# What rlimits and namespaces leave to a cgroup (where the harness cannot make one) or the host's kernel.
NOT_CONTAINED_AT_ANY_LEVEL = (
    "memory and CPU are capped per process, not per call: a call may run Limits.processes processes "
    "(64 by default), each with Limits.memory_bytes of address space (1 GiB by default: 64 GiB together) "
    "and a core kept busy until its timeout; and the kernel is the host's, so a kernel exploit escapes "
    "any level"
)
# The same where each call has a cgroup (forge.sandbox.cgroup).
NOT_CONTAINED_WITH_CALL_CGROUP = (
    "cores are not capped per call unless Limits.call_cpus is set (a call may keep Limits.processes "
    "cores busy until its timeout); and the kernel is the host's, so a kernel exploit escapes any level"
)
CALL_CGROUP = (
    "each call runs in a cgroup of its own: its processes together hold at most Limits.call_memory_bytes "
    "of memory (2 GiB by default; the call ends with memory_exceeded) and Limits.processes processes"
)
LEVEL_1_AS_2 = (
    "level 1 keeps in what level 2 does (forge's hostile-code tests run the same cases at both), "
    "with forge's own launcher instead of bubblewrap"
)


class WorkerSandboxRefused(SandboxUnavailable):
    """A run's Ray actor whose node cannot give the sandbox level the run needs; the message
    names the actor and its node."""


@dataclass(frozen=True)
class SandboxReport:
    """The sandbox level one process (a rollout worker) uses, on which node, and why each
    stronger level failed there."""

    node: str
    level: int
    unavailable: dict[int, str] = field(default_factory=dict)
    root: bool = True  # a harness without root gives level-0 code its own user (level_0_risk)


def report(node: str) -> SandboxReport:
    """This process's level, after `configure`, as the driver is told it."""
    level = levels.available_level()
    unavailable = {n: levels.why_unavailable(n) for n in range(level + 1, 3)}
    return SandboxReport(node, level, unavailable, uids.is_root())


def level_0_risk(root: bool | None = None) -> str:
    """What level-0 code can do, for a harness with root or without (None: this process)."""
    return LEVEL_0_RISK if (uids.is_root() if root is None else root) else LEVEL_0_RISK_NOT_ROOT


def untrusted_at_level_0(env_name: str, where: str = "", root: bool | None = None) -> str:
    """The warning for an env's untrusted code let run at level 0 (`where`: on which node)."""
    return (
        f"forge: WARNING: env {env_name!r} runs untrusted code at level 0{where} because "
        f"sandbox.allow_level_0 is true; {level_0_risk(root)}"
    )


def configure(
    min_level: int = 0,
    *,
    untrusted: bool = False,
    allow_level_0: bool = False,
    python: str | None = None,
    env_name: str = "",
    call_cgroup: bool = True,
) -> int:
    """Apply `sandbox.*` to this process and return the level its sandboxes use. An env that
    runs untrusted code needs level 1 or more unless `allow_level_0`; sandboxed Python is
    checked now (`python`, else the harness's own interpreter), so a bad one fails at start."""
    levels.set_python(python)
    cgroup.set_allowed(call_cgroup)
    level = levels.available_level()
    floor, reason = min_level, f"sandbox.min_level={min_level}"
    if untrusted and not allow_level_0 and floor < 1:
        floor = 1
        reason = (
            f"env {env_name!r} runs untrusted code, which needs sandbox level 1 or more "
            "(or sandbox.allow_level_0: true to accept level 0)"
        )
    if level < floor:
        raise SandboxUnavailable(
            f"{reason}, but this host offers only level {level} ({level_name(level)}): "
            f"{levels.how_to_enable(floor)}"
        )
    levels.set_min_level(floor, reason)
    if untrusted:
        levels.check_python(level, levels.interpreter())
    return level


def configure_for_env(settings: Any, env_class: type, env_name: str) -> int:
    """`configure` from a `sandbox` config section for the run's env class."""
    return configure(
        settings.min_level,
        untrusted=bool(getattr(env_class, "runs_untrusted_code", False)),
        allow_level_0=settings.allow_level_0,
        python=settings.python,
        env_name=env_name,
        call_cgroup=settings.call_cgroup,
    )


def not_contained() -> str:
    """What no level contains in this process: with or without a cgroup per call."""
    if cgroup.enabled():
        return NOT_CONTAINED_WITH_CALL_CGROUP
    why = cgroup.why_not()
    return f"{NOT_CONTAINED_AT_ANY_LEVEL} (no cgroup per call here: {why})"


def level_name(level: int, root: bool | None = None) -> str:
    """The level's name as this process (None) or a node (`root`) gives it: level 0 without root
    has no uid of its own."""
    if level == 0 and not (uids.is_root() if root is None else root):
        return "rlimits only, as the harness's own user"
    if level == 1 and root is None and isolation.level1_as_root():
        return isolation.LEVEL_1_AS_ROOT_NAME
    return isolation.LEVEL_NAMES[level]


def announce(level: int, *, untrusted: bool, env_name: str = "") -> list[str]:
    """Print (stderr) the run's sandbox level, what it does not contain and, below level 2, how
    to get a stronger one."""
    lines = [f"forge: sandbox level {level} ({level_name(level)})"]
    if level == 0:
        lines.append(untrusted_at_level_0(env_name) if untrusted else f"forge: WARNING: {level_0_risk()}")
    if cgroup.enabled():
        lines.append(f"forge: {CALL_CGROUP}")
    lines.append(f"forge: no sandbox level contains this: {not_contained()}")
    if level == 1:
        lines.append(f"forge: {LEVEL_1_AS_2}; for bubblewrap itself: {levels.how_to_enable(2)}")
    if level == 0:
        lines.append(f"forge: WARNING: sandbox level 0 is below bubblewrap's (2): {levels.how_to_enable(2)}")
        lines.append(f"forge: WARNING: sandbox level 1 is unavailable too: {levels.how_to_enable(1)}")
    for line in lines:
        print(line, file=console(), flush=True)
    return lines


def announce_workers(
    driver_level: int, reports: list[SandboxReport], *, untrusted: bool, env_name: str = ""
) -> list[str]:
    """Warn (stderr) about the rollout workers whose node gives a lower level than the driver's,
    naming each such node; the run's level is the lowest, and says so."""
    below = [r for r in reports if r.level < driver_level]
    if not below:
        return []
    weakest = min(below, key=lambda r: r.level)
    lowest = weakest.level
    nodes = {r.node: r for r in below}  # a node's workers share its level
    lines = [
        f"forge: WARNING: rollout workers on {', '.join(f'node {n} (level {r.level})' for n, r in nodes.items())} "
        f"run sandboxed code below this machine's level {driver_level}; this run's sandbox level is "
        f"{lowest} ({level_name(lowest, weakest.root)}), and it is recorded as such"
    ]
    for node, node_report in nodes.items():
        for level in range(node_report.level + 1, driver_level + 1):
            why = node_report.unavailable.get(level, "")
            lines.append(
                f"forge: WARNING: on node {node}: {levels.HOW_TO_ENABLE[level]}"
                + (f" (there: {why})" if why else "")
            )
    for node, node_report in nodes.items():
        if node_report.level == 0 and untrusted:
            lines.append(untrusted_at_level_0(env_name, f" on node {node}", node_report.root))
    for line in lines:
        print(line, file=console(), flush=True)
    return lines
