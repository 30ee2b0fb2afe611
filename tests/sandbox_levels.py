"""The sandbox levels a test runs at: each level this host offers, and each it does not as a
skip that says why (`bwrap not found`, `unshare: Operation not permitted`), so a host without
bubblewrap or user namespaces shows what went untested rather than running fewer cases."""

from __future__ import annotations

import pytest

from forge import sandbox
from forge.sandbox import levels

BEST = sandbox.available_level()


def level_params(lowest: int = 0, slow_between: bool = True) -> list:
    """Levels `lowest`..2; with `slow_between`, those between the weakest fallback and the
    strongest level this host offers run with the slow tests."""
    params = []
    for level in range(lowest, 3):
        if level > BEST:
            reason = f"sandbox level {level} is unavailable on this host: {levels.why_unavailable(level)}"
            params.append(pytest.param(level, marks=pytest.mark.skip(reason=reason)))
        elif slow_between and 0 < level < BEST:
            params.append(pytest.param(level, marks=pytest.mark.slow))
        else:
            params.append(level)
    return params


LEVELS = level_params()
NAMESPACED = level_params(1)
