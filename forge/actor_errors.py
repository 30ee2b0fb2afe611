"""What a Ray actor's failed creation said. Ray keeps only the text of the error its
`__init__` raised (the traceback, the exception's own lines last), so the driver reads the
cause back from that text: a Forge error of a known type by its qualified name, or whatever
error it was; and keeps Ray from printing, above the driver's one line, the traceback of a
Forge refusal the driver tells."""

from __future__ import annotations

import logging


def raised_at_creation(exc: BaseException, error_type: type[BaseException]) -> str | None:
    """The message of an `error_type` the actor's creation raised, or None (another error, or
    `exc` is not an actor whose creation failed)."""
    return _raised_one_of(exc, {_qualified(error_type)})


def _qualified(error_type: type[BaseException]) -> str:
    return f"{error_type.__module__}.{error_type.__qualname__}"


def _raised_one_of(exc: BaseException, names: set[str]) -> str | None:
    """The message after the last of the error types `names` (qualified) in the text Ray kept
    of the actor's failed creation, or None."""
    if not getattr(exc, "actor_init_failed", False):
        return None
    text = str(exc)
    at, marker = max((text.rfind(f"{name}: "), f"{name}: ") for name in names)
    return text[at + len(marker) :].strip() if at >= 0 else None


def creation_error(exc: BaseException) -> str | None:
    """The error the actor's creation raised (`ValueError: ...`), or None when `exc` is not an
    actor whose creation failed."""
    if not getattr(exc, "actor_init_failed", False):
        return None
    lines = str(exc).splitlines()
    frames = [index for index, line in enumerate(lines) if line.startswith("  File ")]
    if not frames:
        return None
    rest = lines[frames[-1] + 1 :]
    while rest and (not rest[0].strip() or rest[0].startswith(" ")):  # the frame's code and its ^^^ marks
        rest = rest[1:]
    return "\n".join(rest).strip() or None


def actor_hub_message(exc: BaseException) -> str | None:
    """The NodeHubError message of a Ray actor whose creation failed on it, or None."""
    from forge.models.hub import NodeHubError

    return raised_at_creation(exc, NodeHubError)


# Where Ray's actor process logs its failed creation, the whole traceback, which Ray's
# log_to_driver then prints on the driver's console (Ray 2.60: `ray._raylet`, level ERROR,
# "Exception raised in creation task: ..."; checked by tests/test_actor_errors.py).
CREATION_LOGGER = "ray._raylet"
CREATION_PREFIX = "Exception raised in creation task"


class _QuietKnownErrors(logging.Filter):
    """Drops Ray's creation-failure record when what the actor raised is a Forge error meant
    for the user (a ConfigError, a sandbox refusal): the driver says its message in one
    `forge:` line, and its traceback points only at the check that refused. Anything else
    keeps its traceback, needed to debug it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(CREATION_PREFIX):
            return True
        return not any(f"{name}: " in message for name in _known_error_names())


def known_refusal(exc: BaseException) -> str | None:
    """The message of a Forge refusal (a ConfigError, a sandbox refusal) that the actor's
    creation raised, whose traceback `quiet_known_creation_errors` kept off the console: the
    driver must say it. None for anything else."""
    return _raised_one_of(exc, _known_error_names())


def _known_error_names() -> set[str]:
    import forge.models.hub  # noqa: F401  (NodeHubError: subclasses are found once imported)
    import forge.sandbox.policy  # noqa: F401  (WorkerSandboxRefused)
    from forge.config import ConfigError
    from forge.sandbox.core import SandboxUnavailable

    names, todo = set(), [ConfigError, SandboxUnavailable]
    while todo:
        error_type = todo.pop()
        names.add(_qualified(error_type))
        todo.extend(error_type.__subclasses__())
    return names


def quiet_known_creation_errors() -> None:
    """In an actor's process, at the start of its `__init__` (whose refusals the driver tells):
    keep Ray from printing the traceback of a known Forge refusal above the driver's line."""
    logger = logging.getLogger(CREATION_LOGGER)
    if not any(isinstance(f, _QuietKnownErrors) for f in logger.filters):
        logger.addFilter(_QuietKnownErrors())
