"""Level 1, done by the launcher itself: new user, mount, pid, net, ipc and uts namespaces;
a fresh root holding only read-only system paths, the interpreter and the run's writable
directories; the code runs as an unprivileged uid of a nested user namespace, so it holds
no capability over any of those mounts. Standard library only (the launcher imports it).

Mounts made in the outer namespace are locked for the nested one: the code cannot unmount
them to uncover what they hide, and the host's root is detached entirely anyway.

A root harness on a host that refuses user namespaces (user.max_user_namespaces=0, Ubuntu's
AppArmor restriction of unprivileged ones, a seccomp profile) builds the same mount, pid,
net, ipc and uts namespaces with root's own capabilities instead (`ns["as_root"]`), and the
code runs as the sandbox uid itself: a non-root uid of the host's user namespace, which holds
no capability anywhere, so it can neither unmount nor remount what hides the host.
"""

import os
import re
import select
import signal

import _syscalls as sc

# The code's uid inside the nested user namespace; it maps to the sandbox uid on the host.
INNER_UID = 1000
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
NAMESPACES = (
    sc.CLONE_NEWUSER | sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWNET | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS
)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _map_self(inside, outside_uid, outside_gid):
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inside} {outside_uid} 1")
    _write("/proc/self/gid_map", f"{inside} {outside_gid} 1")


def _makedirs(path):
    os.makedirs(path, mode=0o755, exist_ok=True)


def _mount_points_under(path):
    """Mount points at or below `path`, from /proc/self/mountinfo (octal escapes undone)."""
    prefix = path.rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), line.split()[4])
            point = os.fsdecode(raw)
            if point == path or point.startswith(prefix):
                points.append(point)
    return points


def _bind(source, target, writable, device=False):
    """Bind `source` at `target`, with the mounts below it: a host path with mounts inside it
    (a container runtime's files bound into /usr) cannot be bound alone from a user namespace,
    since that would uncover what they hide. A read-only bind makes each of them read-only."""
    if os.path.isdir(source):
        _makedirs(target)
    else:
        _makedirs(os.path.dirname(target))
        open(target, "a").close()
    sc.mount(source, target, None, sc.MS_BIND | sc.MS_REC)
    for point in _mount_points_under(target):
        try:
            flags = sc.mount_flags(point) | sc.MS_NOSUID | (0 if device else sc.MS_NODEV)
            if not writable:
                flags |= sc.MS_RDONLY
            sc.mount(None, point, None, sc.MS_REMOUNT | sc.MS_BIND | flags)
        except (PermissionError, FileNotFoundError):
            if point == target:
                raise
            # Hidden, or below a directory this uid cannot search: the code, with no more rights,
            # cannot reach it either.


def _tmpfs(target, size, inodes, mode="0755"):
    _makedirs(target)
    options = f"mode={mode}" + (f",size={size}" if size else "") + (f",nr_inodes={inodes}" if inodes else "")
    sc.mount("tmpfs", target, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, options)


def _build_root(ns):
    """Assemble the new root under ns['new_root'] and pivot into it."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)  # nothing we mount propagates to the host
    root = ns["new_root"]
    _tmpfs(root, 1 << 20, 4096)
    inside = lambda path: root + path  # noqa: E731
    for path in ns["system"]:
        if os.path.islink(path):
            _makedirs(os.path.dirname(inside(path)))
            os.symlink(os.readlink(path), inside(path))
        elif os.path.exists(path):
            _bind(path, inside(path), writable=False)
    for source, dest in ns["ro_binds"]:  # the interpreter
        _bind(source, inside(dest), writable=False)
    _tmpfs(inside("/dev"), 1 << 16, 64)
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            _bind("/dev/" + name, inside("/dev/" + name), writable=True, device=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, inside("/dev/" + name))
    for source, dest in ns["binds"]:
        _bind(source, inside(dest), writable=True)
    for dest, size, inodes in ns["tmpfs"]:
        _tmpfs(inside(dest), size, inodes, mode="1777")
    _makedirs(inside("/proc"))
    try:
        sc.mount("proc", inside("/proc"), "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    except OSError:
        pass  # a host with a masked /proc (a container) refuses a new one: run without /proc
    sc.mount(None, inside("/dev"), None, sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV)
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount(".", sc.MNT_DETACH)  # the host's root, stacked on ours by pivot_root
    os.chdir("/")
    sc.mount(None, "/", None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV)


def _exec_code(spec):
    if spec["ns"].get("as_root"):
        uid = spec["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # root -> a non-zero uid: every capability is gone
    else:
        sc.unshare(sc.CLONE_NEWUSER)
        _map_self(INNER_UID, 0, 0)
        os.setresgid(INNER_UID, INNER_UID, INNER_UID)
        os.setresuid(INNER_UID, INNER_UID, INNER_UID)  # a non-zero uid: every capability is gone
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    os.umask(0o022)
    os.chdir(spec["cwd"])
    argv = spec["argv"]
    os.execvpe(argv[0], argv, spec["env"])


def _init(spec, alive):
    """pid 1 of the new pid namespace: build the root, run the code as pid 2, reap orphans.
    The code is not pid 1, where the kernel drops signals it has no handler for."""
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    # Our parent is outside the pid namespace (getppid() is 0 here): the launcher holds the
    # pipe's write end, so end-of-file means it died before the signal was armed.
    if select.select([alive], [], [], 0)[0]:
        os._exit(137)
    try:
        _build_root(spec["ns"])
    except OSError as error:
        os.write(2, f"forge sandbox level 1 setup failed: {error}\n".encode())
        os._exit(126)
    child = os.fork()
    if child == 0:
        try:
            _exec_code(spec)
        except OSError as error:
            os.write(2, f"forge sandbox: cannot run {spec['argv'][0]}: {error}\n".encode())
        os._exit(127)
    while True:
        pid, status = os.wait()
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def run(spec, parent):
    """Called by the launcher after rlimits, and after the uid drop unless `ns["as_root"]`:
    never returns."""
    if spec["ns"].get("as_root"):
        # Still root: the namespaces come from root's capabilities, no user namespace, and
        # the code drops to the sandbox uid in _exec_code. No credential change here, so the
        # parent-death signal the launcher armed still holds.
        sc.unshare(NAMESPACES & ~sc.CLONE_NEWUSER)
    else:
        uid, gid = os.getuid(), os.getgid()
        sc.prctl(sc.PR_SET_DUMPABLE, 1)  # the uid drop made /proc/self root's: we must write our maps
        sc.unshare(NAMESPACES)
        _map_self(0, uid, gid)
        # Entering a user namespace is a credential change, which disarms the parent-death signal.
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(137)
    alive, keep = os.pipe()
    init = os.fork()  # the first child is pid 1 of the new pid namespace
    if init == 0:
        os.close(keep)
        _init(spec, alive)
    os.close(alive)
    _, status = os.waitpid(init, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)
