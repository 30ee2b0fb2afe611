"""Writes that fail (a full disk, a quota, a read-only mount): naming the file in the error,
and the one line a stopped run prints about it."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Errors of writing, not of a missing or unreadable input (those are the user's paths, said apart).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError writing `path` names it: a full disk otherwise says only 'No space left on device'."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except Exception as exc:
        # safetensors (Rust) reports a full disk as SafetensorError('... (os error 28)').
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def write_error(exc: BaseException) -> OSError | None:
    """The OSError of a failed write behind `exc`: itself, the cause of a Ray task's error
    (the trainer's checkpoint save), or what it was raised from; None when there is none."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            return current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None


def write_failure_message(exc: BaseException, output_dir: str | Path) -> str | None:
    """Why a run stopped when a write failed (which file, the system's reason, the fix), or
    None for other errors."""
    found = write_error(exc)
    if found is None:
        return None
    where = found.filename or f"a file under {output_dir}"
    return (
        f"writing {where} failed ({found.strerror or errno.errorcode.get(found.errno, found.errno)}), "
        f"so the run stopped; free space under {output_dir} or choose another --output-dir."
    )
