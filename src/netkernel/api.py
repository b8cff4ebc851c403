"""The daemon's control protocol: JSON lines over a root-only Unix socket.

Request  ``{"v": 1, "op": "tenant-create", "name": "web"}``
Reply    ``{"ok": true, ...}`` or ``{"ok": false, "error": "reason a person can act on"}``

One connection may carry several requests in order.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import DAEMON_SOCKET
from .errors import DaemonError, DaemonNotRunningError, NetKernelError

log = logging.getLogger(__name__)

VERSION = 1
Handler = Callable[[dict[str, Any]], dict[str, Any]]


def call(op: str, path: Path | None = None, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
    """Send one request; return the reply's fields or raise DaemonError with its message."""
    path = path or DAEMON_SOCKET  # looked up at call time so tests can point elsewhere
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunningError() from None
        except PermissionError:
            raise NetKernelError(f"permission denied on {path} (must run as root; try sudo)") from None
        s.sendall(json.dumps({"v": VERSION, "op": op, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise DaemonError(f"the daemon closed the connection during {op!r} (see its log)")
            buf += chunk
    except TimeoutError:
        raise DaemonError(f"the daemon did not answer {op!r} within {timeout:.0f}s") from None
    finally:
        s.close()
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise DaemonError("malformed reply from the daemon")
    if not reply.get("ok"):
        raise DaemonError(str(reply.get("error", "unknown error")))
    return reply


def ping(path: Path | None = None) -> dict[str, Any] | None:
    """The daemon's status reply, or None if no daemon answers."""
    try:
        return call("status", path=path, timeout=5.0)
    except NetKernelError:
        return None


class _RequestHandler(socketserver.StreamRequestHandler):
    server: ApiServer

    def handle(self) -> None:
        for raw in self.rfile:
            try:
                req = json.loads(raw)
                if not isinstance(req, dict) or req.get("v") != VERSION or "op" not in req:
                    raise DaemonError(f"bad request: expected {{\"v\": {VERSION}, \"op\": ...}}")
                reply = {"ok": True, **self.server.handler(req)}
            except NetKernelError as e:
                reply = {"ok": False, "error": str(e)}
            except json.JSONDecodeError:
                reply = {"ok": False, "error": "bad request: not JSON"}
            except Exception as e:  # keep serving; the log has the traceback
                log.exception("api: request failed")
                reply = {"ok": False, "error": f"internal error: {e} (see the daemon log)"}
            try:
                self.wfile.write(json.dumps(reply).encode() + b"\n")
                self.wfile.flush()
            except OSError:
                return


class ApiServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, handler: Handler) -> None:
        self.handler = handler
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        # Created 0600 from the start (umask), not chmod-ed afterwards: no window where
        # another user could connect.
        old = os.umask(0o177)
        try:
            super().__init__(str(path), _RequestHandler)
        finally:
            os.umask(old)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        try:
            os.unlink(self.server_address)  # type: ignore[arg-type]
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
