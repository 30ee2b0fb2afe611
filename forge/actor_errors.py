"""What a Ray actor's failed creation said. Ray keeps only the text of the error its
`__init__` raised (the traceback, the exception's own lines last), so the driver reads the
cause back from that text: a Forge error of a known type by its qualified name, or whatever
error it was."""

from __future__ import annotations


def raised_at_creation(exc: BaseException, error_type: type[BaseException]) -> str | None:
    """The message of an `error_type` the actor's creation raised, or None (another error, or
    `exc` is not an actor whose creation failed)."""
    if not getattr(exc, "actor_init_failed", False):
        return None
    marker = f"{error_type.__module__}.{error_type.__qualname__}: "
    text = str(exc)
    at = text.rfind(marker)
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
