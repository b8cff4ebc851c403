"""Launch a program inside a tenant (`netkernel run`).

The program runs in the tenant's sandbox (sandbox.py): its network namespace, which has only
`lo`, the namespaces and cgroups all processes of the tenant share, as an unprivileged host
user, on a read-only view of the host's files, with GuestLib preloaded. The launcher stays
outside, forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT and returns the exit status.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import sandbox
from .errors import CommandNotFoundError, NetKernelError


def resolve_command(cmd: str) -> str:
    """Full path of ``cmd`` as execvp would find it, or CommandNotFoundError (exit 127)."""
    if "/" in cmd:
        if os.path.isfile(cmd) and os.access(cmd, os.X_OK):
            return os.path.abspath(cmd)
        raise CommandNotFoundError(cmd)
    found = shutil.which(cmd)
    if found is None:
        raise CommandNotFoundError(cmd)
    return found


def _check_runnable(path: str, rec: dict[str, Any], granted: Sequence[Path]) -> None:
    """A program the tenant cannot reach (under a directory only root may enter, or not
    executable by others) fails here with the reason, not inside the sandbox."""
    if any(Path(path).is_relative_to(g) for g in granted):
        return
    base = int(rec["uid_base"])
    why = sandbox.tenant_can_reach(Path(path), base)
    if why is None and not sandbox.allows(os.stat(path), base, 0o1):
        why = f"{path} (mode {stat.S_IMODE(os.stat(path).st_mode):04o}) is not executable by others"
    if why:
        raise _LaunchError(
            f"{path}: the tenant's users cannot run it: {why}. Tenants see the "
            "host's files as an unprivileged user does; install the program "
            "where others may run it",
            126,
        )


def run(rec: dict[str, Any], argv: list[str], rw: Sequence[Path] = (), ro: Sequence[Path] = ()) -> int:
    """Run ``argv`` in the tenant described by ``rec`` (the daemon's record of it); return its
    exit status (128+N if killed by signal N)."""
    path = resolve_command(argv[0])
    _check_runnable(path, rec, [*rw, *ro])
    try:
        return sandbox.run(rec, [path, *argv[1:]], rw=rw, ro=ro)
    except sandbox.SandboxError as e:
        raise _LaunchError(str(e), 126) from None


class _LaunchError(NetKernelError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code if code > 0 else 126
