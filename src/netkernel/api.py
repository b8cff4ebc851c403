"""The daemon's control API: JSON lines over a Unix socket (docs/api.md has every op).

Request  ``{"v": 1, "op": "tenant-create", "name": "web"}``
Reply    ``{"ok": true, ...}`` or ``{"ok": false, "error": "reason a person can act on"}``

One connection may carry several requests in order. The socket is root-only (0600) unless
the config names an ``api_group``, whose members may then use it too (0660, group-owned). The
file mode is not all: each connection's peer is checked too (``peer_refusal``), by its
credentials and its network namespace, so a process that got hold of the socket some other
way (a tenant's root, which is not the host's root, or anything in another namespace) is
refused with a reason and nothing else.
Requests are checked here against ``OPS`` (version, op, field names and types) before the
daemon sees them, so every handler gets only fields it knows, of the right type.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import logging
import os
import signal
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config
from .errors import DaemonError, DaemonNotRunningError, NetKernelError

log = logging.getLogger(__name__)

VERSION = 1
Handler = Callable[[dict[str, Any]], dict[str, Any]]

# Set by the CLI's --api-socket; NETKERNEL_API_SOCKET is the environment's way to say it.
socket_override: Path | None = None

_NUMBER_OR_TEXT = (int, str)
_POLICY_FIELDS: dict[str, tuple[type, ...]] = {key: _NUMBER_OR_TEXT for key in config.POLICY_PARSERS}
_POLICY_FIELDS["shm"] = _POLICY_FIELDS["tenant_cc"] = (bool, int, str)


@dataclass(frozen=True)
class Op:
    """Fields one op takes: name -> accepted JSON types."""

    required: dict[str, tuple[type, ...]] = field(default_factory=dict)
    optional: dict[str, tuple[type, ...]] = field(default_factory=dict)


OPS: dict[str, Op] = {
    "status": Op(),
    "ps": Op(),
    "conns": Op(optional={"tenant": (str,)}),
    "tenant-create": Op(
        required={"name": (str,)}, optional={"nsm": (str,), "kind": (str,), **_POLICY_FIELDS}
    ),
    "tenant-delete": Op(required={"name": (str,)}),
    "tenant-set": Op(required={"name": (str,)}, optional=_POLICY_FIELDS),
    "tenant-move": Op(required={"name": (str,), "nsm": (str,)}),
    "nsm-list": Op(),
    "nsm-add": Op(
        required={"name": (str,)},
        optional={
            "kind": (str,),
            "congestion_control": (str,),
            "bandwidth": _NUMBER_OR_TEXT,
            "sysctl": (dict,),
        },
    ),
    "nsm-remove": Op(required={"name": (str,)}),
    "upgrade": Op(optional={"engine": (str,)}),
    "shutdown": Op(),
}
_TYPE_NAMES = {int: "a number", str: "a string", dict: "an object", bool: "true or false"}


def socket_path() -> Path:
    """Where the CLI looks for the daemon: --api-socket, NETKERNEL_API_SOCKET, the default."""
    if socket_override is not None:
        return socket_override
    env = os.environ.get("NETKERNEL_API_SOCKET")
    return Path(env) if env else config.DAEMON_SOCKET


def check_request(req: object) -> dict[str, Any]:
    """The request if it is well-formed, else DaemonError saying what is wrong with it."""
    if not isinstance(req, dict):
        raise DaemonError(f'bad request: expected a JSON object like {{"v": {VERSION}, "op": "status"}}')
    if "v" not in req:
        raise DaemonError(f'bad request: missing "v" (the protocol version; this daemon speaks {VERSION})')
    if req["v"] != VERSION:
        raise DaemonError(
            f"unsupported protocol version {req['v']!r}: this daemon speaks {VERSION} "
            "(is the netkernel command from another release than the daemon?)"
        )
    op = req.get("op")
    if not isinstance(op, str):
        raise DaemonError('bad request: missing "op" (a string, e.g. "status")')
    spec = OPS.get(op)
    if spec is None:
        raise DaemonError(f"unknown op {op!r} (known: {', '.join(OPS)})")
    for name, types in {**spec.required, **spec.optional}.items():
        if name not in req or (req[name] is None and name in spec.optional):
            if name in spec.required:
                raise DaemonError(f"op {op!r} needs field {name!r} ({_TYPE_NAMES[types[0]]})")
            continue
        value = req[name]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            wanted = " or ".join(_TYPE_NAMES[t] for t in types)
            raise DaemonError(f"op {op!r}: field {name!r} must be {wanted}, not {json.dumps(value)}")
    unknown = sorted(set(req) - {"v", "op"} - set(spec.required) - set(spec.optional))
    if unknown:
        known = ", ".join([*spec.required, *spec.optional]) or "none"
        raise DaemonError(f"op {op!r}: unknown field(s) {', '.join(map(repr, unknown))} (known: {known})")
    return {k: v for k, v in req.items() if v is not None}


def call(op: str, path: Path | None = None, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
    """Send one request; return the reply's fields or raise DaemonError with its message.

    Arguments that are None are left out (the daemon's defaults apply)."""
    path = path or socket_path()  # looked up at call time so tests can point elsewhere
    request = {"v": VERSION, "op": op, **{k: v for k, v in args.items() if v is not None}}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunningError() from None
        except PermissionError:
            raise NetKernelError(
                f"permission denied on {path}: the API is for root and the "
                "configured api_group only (try sudo)"
            ) from None
        s.sendall(json.dumps(request).encode() + b"\n")
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


SO_PEERPIDFD = 77  # Linux 6.5
SO_PEERGROUPS = 59  # Linux 4.13
PIDFD_GET_NET_NAMESPACE = 0xFF04  # _IO(0xFF, 4), Linux 6.11


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix connection, as the kernel
    recorded them at connect()."""
    pid, uid, gid = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> set[int]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
    except OSError:
        return set()
    return set(struct.unpack(f"{len(raw) // 4}I", raw))


def peer_netns(sock: socket.socket, pid: int) -> int | None:
    """The inode of the peer's network namespace, or None if it cannot be told. With a pidfd
    (SO_PEERPIDFD) it names the very process that connected even if its pid was reused since:
    asked from the pidfd itself where the kernel can (6.11), else read from /proc while the
    pidfd is held and believed only if that process is still alive afterwards."""
    pidfd = -1
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pass
    try:
        if pidfd >= 0:
            try:
                ns = fcntl.ioctl(pidfd, PIDFD_GET_NET_NAMESPACE)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    return None
            else:
                try:
                    return os.fstat(ns).st_ino
                finally:
                    os.close(ns)
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        if pidfd >= 0:
            try:
                signal.pidfd_send_signal(pidfd, 0)
            except OSError:
                return None  # gone: its pid may name another process by now
        return ino
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def peer_refusal(sock: socket.socket, group: str | None) -> str | None:
    """Why the peer may not use the API, or None: it must be root, or in ``group``, and in the
    daemon's own network namespace (a tenant never is)."""
    try:
        pid, uid, gid = peer_credentials(sock)
    except OSError as e:
        return f"cannot tell who you are ({e.strerror})"
    if uid != 0:
        gids = {gid} | peer_groups(sock)
        want = None
        if group is not None:
            try:
                want = grp.getgrnam(group).gr_gid
            except KeyError:
                want = None
        if want is None or want not in gids:
            return (
                f"permission denied: the API is for root"
                f"{f' and members of group {group!r}' if group else ''} (you are uid {uid})"
            )
    mine = os.stat("/proc/self/ns/net").st_ino
    theirs = peer_netns(sock, pid)
    if theirs != mine:
        return "permission denied: the API answers only processes in the host's network namespace"
    return None


def _parse_line(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        # Not JSON, or JSON past the parser's limits (nesting, digits of an integer);
        # JSONDecodeError and UnicodeDecodeError are ValueErrors.
        raise DaemonError("bad request: not JSON (send one JSON object per line)") from None


class _RequestHandler(socketserver.StreamRequestHandler):
    server: ApiServer

    def handle(self) -> None:
        refusal = peer_refusal(self.request, self.server.group)
        if refusal is not None:
            log.warning("api: refused a connection: %s", refusal)
            try:
                self.wfile.write(json.dumps({"ok": False, "error": refusal}).encode() + b"\n")
                self.wfile.flush()
                # Let the peer's request arrive before closing (were it to meet a closed
                # socket it would see a broken pipe, not the reason), but briefly: nothing
                # it sends is read.
                self.request.shutdown(socket.SHUT_WR)
                self.request.settimeout(1.0)
                while self.request.recv(65536):
                    pass
            except OSError:
                pass
            return
        for raw in self.rfile:
            try:
                req = check_request(_parse_line(raw))
                reply = {"ok": True, **self.server.handlers[req["op"]](req)}
            except NetKernelError as e:
                reply = {"ok": False, "error": str(e)}
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

    def __init__(self, path: Path, handlers: dict[str, Handler], group: str | None = None) -> None:
        missing = set(OPS) - set(handlers)
        if missing:
            raise AssertionError(f"no handler for op(s) {', '.join(sorted(missing))}")
        self.handlers = handlers
        self.group = group
        # A directory made here (a configured api_socket elsewhere) goes again at stop().
        self._made_dir = None if path.parent.exists() else path.parent
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        # Created 0600 from the start (umask), not chmod-ed afterwards: no window where
        # another user could connect. The group, if any, is let in only after chown.
        old = os.umask(0o177)
        try:
            super().__init__(str(path), _RequestHandler)
        finally:
            os.umask(old)
        if group is not None:
            try:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
            except KeyError:
                self.server_close()
                raise DaemonError(f"api_group {group!r} does not exist (groupadd {group})") from None
            os.chmod(path, 0o660)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() would wait forever for a loop never started
            self.shutdown()
            self._thread = None
        self.server_close()
        try:
            os.unlink(self.server_address)  # type: ignore[arg-type]
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        if self._made_dir is not None:
            try:
                self._made_dir.rmdir()
            except OSError:
                pass  # not empty: someone else put something there
