"""Running untrusted code: rlimits and a uid of its own, namespaces, bubblewrap; the
strongest level the host offers is probed once and logged."""

from forge.sandbox.api import arun, run
from forge.sandbox.core import Limits, SandboxResult, SandboxUnavailable, wait_for_cleanup
from forge.sandbox.isolation import LEVEL_NAMES
from forge.sandbox.levels import available_level, probe, require_level, set_min_level, set_python

__all__ = [
    "LEVEL_NAMES",
    "Limits",
    "SandboxResult",
    "SandboxUnavailable",
    "arun",
    "available_level",
    "probe",
    "require_level",
    "run",
    "set_min_level",
    "set_python",
    "wait_for_cleanup",
]
