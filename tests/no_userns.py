"""Run a command on a host that refuses user namespaces, as Docker's default seccomp profile,
`user.max_user_namespaces=0` and Ubuntu's AppArmor restriction do, without touching the
machine: a seccomp filter makes unshare/clone with CLONE_NEWUSER fail with EPERM (clone3,
whose flags a filter cannot read, fails with ENOSYS so libc falls back to clone). Root keeps
its other namespaces. x86_64 only: `python tests/no_userns.py ARGV...` execs ARGV under it."""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

SUPPORTED = platform.machine() == "x86_64"
_CLONE_NEWUSER = 0x10000000
_AUDIT_ARCH_X86_64 = 0xC000003E
_NR_CLONE, _NR_UNSHARE, _NR_CLONE3 = 56, 272, 435
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_ALLOW, _ERRNO, _KILL = 0x7FFF0000, 0x00050000, 0
_EPERM, _ENOSYS = 1, 38
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


def _op(code: int, jump_true: int, jump_false: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jump_true, jump_false, k)


_PROGRAM = [
    _op(_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
    _op(_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
    _op(_RET_K, 0, 0, _KILL),
    _op(_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
    _op(_JEQ_K, 0, 1, _NR_CLONE3),
    _op(_RET_K, 0, 0, _ERRNO | _ENOSYS),
    _op(_JEQ_K, 1, 0, _NR_UNSHARE),
    _op(_JEQ_K, 0, 3, _NR_CLONE),
    _op(_LD_W_ABS, 0, 0, 16),  # seccomp_data.args[0], its low 32 bits: the flags
    _op(_JSET_K, 0, 1, _CLONE_NEWUSER),
    _op(_RET_K, 0, 0, _ERRNO | _EPERM),
    _op(_RET_K, 0, 0, _ALLOW),
]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def refuse_user_namespaces() -> None:
    """Install the filter on this process; its children inherit it."""
    code = ctypes.create_string_buffer(b"".join(_PROGRAM))
    program = _Program(len(_PROGRAM), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    refuse_user_namespaces()
    os.execvp(sys.argv[1], sys.argv[1:])
