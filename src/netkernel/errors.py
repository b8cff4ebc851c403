"""Errors a person can act on.

Every error the control plane raises on purpose derives from NetKernelError; the CLI prints
its message as one line (no traceback) and exits with its ``exit_code``.
"""

from __future__ import annotations


class NetKernelError(Exception):
    """Base of our own errors. ``str(err)`` is the whole user-facing message."""

    exit_code = 1


class NotRootError(NetKernelError):
    def __init__(self) -> None:
        super().__init__("must run as root (try sudo)")


class DaemonNotRunningError(NetKernelError):
    def __init__(self) -> None:
        super().__init__("the daemon is not running (start it with: netkernel up)")


class DaemonAlreadyRunningError(NetKernelError):
    def __init__(self, pid: int | None) -> None:
        where = f" (pid {pid})" if pid else ""
        super().__init__(f"the daemon is already running{where}; stop it with: netkernel down")


class DaemonError(NetKernelError):
    """The daemon refused a request; the message comes from the daemon."""


class ConfigError(NetKernelError):
    pass


class KernelFeatureError(NetKernelError):
    pass


class UnknownNSMError(NetKernelError):
    pass


class TenantError(NetKernelError):
    pass


class NSMError(NetKernelError):
    pass


class CommandNotFoundError(NetKernelError):
    # 127 is what shells return for "command not found"; scripts rely on it.
    exit_code = 127

    def __init__(self, cmd: str) -> None:
        super().__init__(f"{cmd}: command not found")


class InstallError(NetKernelError):
    """A part of the installation (engine binary, GuestLib) is missing."""


class NetlinkError(NetKernelError):
    """An `ip` command failed while building or removing the fabric."""


class EngineError(NetKernelError):
    """The C engine answered ``err ERRNO_NAME message``."""

    def __init__(self, request: str, errno_name: str, message: str) -> None:
        self.request = request
        self.errno_name = errno_name
        self.engine_message = message
        verb = request.split(" ", 1)[0]
        super().__init__(f"engine refused {verb}: {errno_name} {message}".rstrip())
