"""Client for the C engine's admin socket.

Protocol: one request line; the reply is zero or more data lines, then a final line
``ok`` / ``ok VALUE`` or ``err ERRNO_NAME message``. Requests on one connection are
sequential, so the client holds a lock around each request/reply.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError, NetKernelError


@dataclass(frozen=True)
class Reply:
    lines: tuple[str, ...]
    value: str


@dataclass(frozen=True)
class TenantStats:
    name: str
    id: int
    nsm: str
    sockets: int
    tx_bytes: int
    rx_bytes: int


@dataclass(frozen=True)
class Conn:
    tenant: str
    slot: int
    kind: str
    state: str
    local: str
    peer: str
    tx_bytes: int
    rx_bytes: int


def _fields(line: str, tag: str) -> tuple[list[str], dict[str, str]]:
    """Split ``tag pos1 k=v k=v`` into positional words and a key/value dict."""
    words = line.split()
    if not words or words[0] != tag:
        raise ValueError(f"expected {tag!r} line, got {line!r}")
    pos: list[str] = []
    kv: dict[str, str] = {}
    for w in words[1:]:
        key, sep, value = w.partition("=")
        if sep:
            kv[key] = value
        else:
            pos.append(w)
    return pos, kv


def parse_stats(lines: tuple[str, ...] | list[str]) -> list[TenantStats]:
    out = []
    for line in lines:
        if not line.startswith("tenant "):
            continue  # tolerate lines added by newer engines
        pos, kv = _fields(line, "tenant")
        out.append(TenantStats(
            name=pos[0], id=int(kv.get("id", -1)), nsm=kv.get("nsm", ""),
            sockets=int(kv.get("sockets", 0)), tx_bytes=int(kv.get("tx_bytes", 0)),
            rx_bytes=int(kv.get("rx_bytes", 0)),
        ))
    return out


def parse_conns(lines: tuple[str, ...] | list[str]) -> list[Conn]:
    out = []
    for line in lines:
        if not line.startswith("conn "):
            continue
        _, kv = _fields(line, "conn")
        out.append(Conn(
            tenant=kv.get("tenant", ""), slot=int(kv.get("slot", -1)), kind=kv.get("kind", ""),
            state=kv.get("state", ""), local=kv.get("local", ""), peer=kv.get("peer", ""),
            tx_bytes=int(kv.get("tx_bytes", 0)), rx_bytes=int(kv.get("rx_bytes", 0)),
        ))
    return out


class EngineClient:
    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._buf = b""

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except OSError:
                s.close()
                raise
            self._sock = s
        return self._sock

    def _readline(self, s: socket.socket) -> str:
        while b"\n" not in self._buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("engine closed the admin connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def request(self, line: str) -> Reply:
        if "\n" in line:
            raise ValueError("request must be one line")
        with self._lock:
            # One reconnect: the engine may have dropped an idle connection.
            for attempt in (0, 1):
                try:
                    s = self._connect()
                    s.sendall(line.encode() + b"\n")
                    data: list[str] = []
                    while True:
                        reply = self._readline(s)
                        if reply == "ok" or reply.startswith("ok "):
                            return Reply(tuple(data), reply[3:])
                        if reply.startswith("err"):
                            parts = reply.split(" ", 2)
                            name = parts[1] if len(parts) > 1 else "EIO"
                            msg = parts[2] if len(parts) > 2 else ""
                            raise EngineError(line, name, msg)
                        data.append(reply)
                except (OSError, ConnectionError) as e:
                    self._close()
                    if attempt == 1 or not isinstance(e, (BrokenPipeError, ConnectionError)):
                        raise NetKernelError(f"engine admin socket {self.path}: {e}") from None
        raise AssertionError("unreachable")

    # -- typed requests --------------------------------------------------------------------
    def nsm_add(self, name: str, netns_path: str) -> None:
        self.request(f"nsm-add {name} {netns_path}")

    def tenant_add(self, name: str, netns_path: str, nsm: str, ipv4: str, ipv6: str) -> int:
        value = self.request(f"tenant-add {name} {netns_path} {nsm} {ipv4} {ipv6}").value
        try:
            return int(value.split()[0])
        except (ValueError, IndexError):
            return -1

    def tenant_del(self, name: str) -> None:
        self.request(f"tenant-del {name}")

    def dns_upstream(self, ip: str, port: int) -> None:
        self.request(f"dns-upstream {ip} {port}")

    def stats(self) -> list[TenantStats]:
        return parse_stats(self.request("stats").lines)

    def conns(self) -> list[Conn]:
        return parse_conns(self.request("conns").lines)


def wait_ready(path: Path, alive: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until the admin socket accepts connections, or fail if the engine died."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(str(path))
            return
        except OSError:
            pass
        finally:
            s.close()
        if not alive():
            raise NetKernelError("the engine exited during start-up (see the log)")
        if time.monotonic() > deadline:
            raise NetKernelError(f"the engine did not open {path} within {timeout:.0f}s")
        time.sleep(0.05)
