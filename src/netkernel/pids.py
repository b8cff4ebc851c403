"""Signalling a process found by number without hitting a stranger that took its number.

A PID read from ``/proc`` or ``cgroup.procs`` may name another process by the time it is
signalled: numbers are reused as soon as a process is reaped, and with ``pid_max`` 32768 (the
default on small hosts) a busy host wraps within a minute. ``kill(pid)`` after such a lookup
can SIGKILL an unrelated program while a tenant is being deleted (the likely cause of one a
soak saw). A pidfd pins the process
it was opened on: checking that the number still belongs where we found it *after* opening the
pidfd proves the pidfd is the process we meant (if the number moved on meanwhile, the pidfd's
process is gone and the signal fails with ESRCH, harmlessly).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


def signal_if(pid: int, sig: int, still_ours: Callable[[int], bool]) -> bool:
    """Send ``sig`` to ``pid`` if, once pinned, ``still_ours(pid)`` holds; True if sent."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not still_ours(pid):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie child of ours counts as gone)."""
    if pid <= 0:  # kill() would signal a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
