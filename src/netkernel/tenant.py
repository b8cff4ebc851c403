"""Launch a program inside a tenant.

The child enters the tenant's network namespace, gets a private mount namespace with a
resolv.conf that points at the engine's stub resolver, loses the capabilities that would let
it leave the sandbox or reconfigure networking, and is exec'd with GuestLib preloaded. The
parent stays outside, forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT and returns the exit status.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
from pathlib import Path

from .config import ENGINE_SOCKET, guestlib
from .errors import CommandNotFoundError, NetKernelError
from .netns import CLONE_NEWNET, CLONE_NEWNS, setns

_libc = ctypes.CDLL(None, use_errno=True)

MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
PR_CAPBSET_DROP = 24

# Capabilities removed from the bounding set, so no exec can regain them. Kept: everything
# servers need to start as root and drop privileges (NET_BIND_SERVICE, SETUID/SETGID, CHOWN,
# DAC_OVERRIDE, NET_RAW...).
DROPPED_CAPS = {
    "CAP_MKNOD": 27,
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYSLOG": 34,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def resolve_command(cmd: str) -> str:
    """Full path of ``cmd`` as execvp would find it, or CommandNotFoundError (exit 127)."""
    if "/" in cmd:
        if os.path.isfile(cmd) and os.access(cmd, os.X_OK):
            return cmd
        raise CommandNotFoundError(cmd)
    found = shutil.which(cmd)
    if found is None:
        raise CommandNotFoundError(cmd)
    return found


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src: str | None, target: str, flags: int) -> None:
    _check(_libc.mount(src.encode() if src else None, target.encode(), None, flags, None),
           f"mount {target}")


def tenant_env(env: dict[str, str], name: str, lib: Path) -> dict[str, str]:
    env = dict(env)
    old = env.get("LD_PRELOAD", "").strip()
    # GuestLib first so its socket() wins over any other preloaded library.
    env["LD_PRELOAD"] = f"{lib}:{old}" if old else str(lib)
    env["NETKERNEL_SOCKET"] = str(ENGINE_SOCKET)
    env["NETKERNEL_TENANT"] = name
    return env


def _enter_sandbox(netns_path: str, resolv_conf: str) -> None:
    """Runs in the forked child, before exec."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    setns(fd, CLONE_NEWNET)
    os.close(fd)
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Slave, not private: host mounts still propagate in, ours never leak out.
    _mount(None, "/", MS_REC | MS_SLAVE)
    if os.path.exists("/etc/resolv.conf"):
        _mount(resolv_conf, "/etc/resolv.conf", MS_BIND)
    for cap in DROPPED_CAPS.values():
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            if e != errno.EINVAL:  # EINVAL: this kernel does not know the capability
                raise OSError(e, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(e)}")


def run(name: str, netns_path: str, resolv_conf: str, argv: list[str]) -> int:
    """Run ``argv`` in tenant ``name``; return its exit status (128+N if killed by signal N)."""
    path = resolve_command(argv[0])
    env = tenant_env(dict(os.environ), name, guestlib())
    # The child reports a failure before exec through this pipe; exec closes it (CLOEXEC).
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: no Python-level cleanup, only _exit
        try:
            os.close(rfd)
            for sig in FORWARDED_SIGNALS + (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)  # Python ignores SIGPIPE; programs must not
            _enter_sandbox(netns_path, resolv_conf)
            os.execve(path, argv, env)
        except OSError as e:
            msg = f"{argv[0]}: {e.strerror or e}" if e.errno in (errno.ENOENT, errno.EACCES) \
                else f"cannot enter tenant {name}: {e}"
            os.write(wfd, msg.encode())
            os._exit(127 if e.errno in (errno.ENOENT, errno.EACCES) else 126)
        except BaseException as e:
            os.write(wfd, f"cannot enter tenant {name}: {e}".encode())
            os._exit(126)
    os.close(wfd)
    previous = {sig: signal.signal(sig, lambda s, _f: _forward(pid, s)) for sig in FORWARDED_SIGNALS}
    try:
        with os.fdopen(rfd, "rb") as r:
            failure = r.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise _LaunchError(failure, os.waitstatus_to_exitcode(status))
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class _LaunchError(NetKernelError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code if code > 0 else 126
