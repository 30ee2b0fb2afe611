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


class WholeWrites:
    """An unbuffered file for torch.save whose failed write is raised when it closes. torch
    ignores a short write's count and swallows what its file's `write` raises, so a disk that
    filled mid-checkpoint showed only as torch's 'enforce fail ... unexpected pos'."""

    def __init__(self, path: str | Path) -> None:
        self.file = open(path, "wb", buffering=0)  # noqa: SIM115 (closed by __exit__)
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:  # a full disk's short write is followed by one that raises ENOSPC
                view = view[self.file.write(view) :]
        except OSError as exc:
            self.error = self.error or exc
            raise
        return len(data)

    def flush(self) -> None:
        self.file.flush()

    def __enter__(self) -> WholeWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        if self.error is not None:
            raise self.error


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
