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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from .errors import EngineError, NetKernelError

T = TypeVar("T")


@dataclass(frozen=True)
class Reply:
    lines: tuple[str, ...]
    value: str


@dataclass(frozen=True)
class TenantStats:
    """One ``tenant NAME k=v ...`` line of ``stats``."""

    name: str
    id: int
    nsm: str
    sockets: int
    tx_bytes: int
    rx_bytes: int
    memory: int
    rate_tx: int
    rate_rx: int
    weight: int
    max_sockets: int
    max_memory: int
    refused_sockets: int
    refused_memory: int
    engine_ns: int  # engine time spent serving the tenant's sockets
    engine_skips: int  # rounds it sat out, over its share of engine time
    fds: int  # engine descriptors held for it (sockets' shares, control conns)
    fd_limit: int  # its share of the engine's descriptors (EMFILE beyond)
    ctls: int  # control connections of its processes
    dns_relayed: int  # queries its DNS stub relayed
    dns_dropped: int  # queries over its DNS rate, dropped
    region_bytes: int  # memory its shared region holds
    region_trimmed: int  # bytes of free slots' rings taken back (max_memory)
    rings_shrunk: int  # open sockets whose rings gave their pages back once quiet
    throttle_wakes: int  # its sockets woken after waiting for rate/link tokens
    throttle_late_ns: int  # how late past their due time, in total
    rate_late_credit: int  # rate tokens kept for it over late wakes (bytes)
    tenant_cc: int  # tenant-level congestion control on (1) or off (0)
    cc_rate: int  # the rate it may send now (bits/s), 0: not limited (no congestion seen)
    cc_sent: int  # what it sends (bits/s, smoothed)
    cc_qdelay_us: int  # queueing delay its sending connections saw at the last sample
    cc_flows: int  # connections sampled then
    cc_retrans: int  # segments its connections retransmitted, in all
    cc_cuts: int  # times congestion cut its rate


@dataclass(frozen=True)
class NSMStats:
    """One ``nsm NAME k=v ...`` line of ``stats``."""

    name: str
    tenants: int
    sockets: int
    tx_bytes: int
    rx_bytes: int
    bandwidth: int
    up: int  # an external NSM's process is connected
    connects: int  # processes of an external NSM that connected so far


@dataclass(frozen=True)
class EngineStats:
    tenants: tuple[TenantStats, ...]
    nsms: tuple[NSMStats, ...]

    def tenant(self, name: str) -> TenantStats | None:
        return next((t for t in self.tenants if t.name == name), None)

    def nsm(self, name: str) -> NSMStats | None:
        return next((n for n in self.nsms if n.name == name), None)


@dataclass(frozen=True)
class Conn:
    """One ``conn k=v ...`` line of ``conns``. TCP_INFO fields (rtt_us ... ca) are None for
    UDP and for connections that never reach the NSM's kernel stack."""

    tenant: str
    slot: int | None = None
    kind: str | None = None
    state: str | None = None
    nsm: str | None = None  # "shm" for the shared-memory path
    path: str | None = None  # nsm, shm (between colocated tenants) or loopback
    peer_tenant: str | None = None  # the other end's tenant, on the shm path
    # guest: GuestLib moves the bytes in the program; direct: the engine moves them to and from
    # the program's kernel socket itself (a static or Go program's connection, by the relay)
    carrier: str | None = None
    proto: str | None = None
    local: str | None = None
    peer: str | None = None
    tx_bytes: int | None = None
    rx_bytes: int | None = None
    tx_queued: int | None = None
    rx_queued: int | None = None
    tcp_state: str | None = None
    rtt_us: int | None = None
    rttvar_us: int | None = None
    cwnd: int | None = None
    retrans: int | None = None
    total_retrans: int | None = None
    delivery_rate: int | None = None  # bytes/s, as TCP_INFO reports it
    pacing_rate: int | None = None
    ca: str | None = None


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


def _typed(cls: type[T], kv: dict[str, str], **given: Any) -> T:
    """``cls`` from the keys it knows, converted to each field's type; unknown keys are
    ignored, and a key the line lacks (TCP_INFO's, for UDP) or a value that does not parse is
    None."""
    values: dict[str, Any] = dict(given)
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in values or f.name not in kv:
            continue
        raw = kv[f.name]
        if str(f.type).startswith("int"):
            try:
                values[f.name] = int(raw)
            except ValueError:
                continue
        else:
            values[f.name] = raw
    return cls(**values)


def _complete(cls: type[T], line: str, kv: dict[str, str], **given: Any) -> T:
    """``cls`` from a stats line. The engine ships with this package and writes every key of
    it: one missing or not a number means an engine of another build, an error that says so
    rather than a number quietly absent. Keys ``cls`` does not know are ignored (the engine
    reports some that the daemon does not show)."""
    values: dict[str, Any] = dict(given)
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in values:
            continue
        raw = kv.get(f.name, "")
        try:
            values[f.name] = int(raw) if str(f.type) == "int" else raw
        except ValueError:
            raw = ""
        if not raw:
            raise NetKernelError(
                f"engine stats: no valid {f.name}= in {line!r}; the engine is not "
                "from this package's build (reinstall with `pip install .`)"
            )
    return cls(**values)


def parse_stats(lines: tuple[str, ...] | list[str]) -> EngineStats:
    tenants: list[TenantStats] = []
    nsms: list[NSMStats] = []
    for line in lines:
        # Other lines are tolerated: a newer engine may add kinds.
        if line.startswith("tenant "):
            pos, kv = _fields(line, "tenant")
            if pos:
                tenants.append(_complete(TenantStats, line, kv, name=pos[0]))
        elif line.startswith("nsm "):
            pos, kv = _fields(line, "nsm")
            if pos:
                nsms.append(_complete(NSMStats, line, kv, name=pos[0]))
    return EngineStats(tuple(tenants), tuple(nsms))


def parse_conns(lines: tuple[str, ...] | list[str]) -> list[Conn]:
    out = []
    for line in lines:
        if not line.startswith("conn "):
            continue
        _, kv = _fields(line, "conn")
        out.append(_typed(Conn, kv, tenant=kv.get("tenant", "")))
    return out


def tenant_add_line(
    name: str, netns_path: str, nsm: str, ipv4: str, ipv6: str, region: tuple[int, int] | None = None
) -> str:
    """region: (slots, ring bytes) of the tenant's region, or None for the engine's default."""
    extra = f" {region[0]} {region[1]}" if region else ""
    return f"tenant-add {name} {netns_path} {nsm} {ipv4} {ipv6}{extra}"


def tenant_set_line(name: str, settings: str) -> str:
    """``settings``: ``key=value ...`` (see config.Policy.engine_args)."""
    return f"tenant-set {name} {settings}"


def tenant_id(reply: Reply) -> int:
    """The engine's id for a tenant it added (-1 if it did not say)."""
    try:
        return int(reply.value.split()[0])
    except (ValueError, IndexError):
        return -1


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
        return self.pipeline([line])[0]

    def pipeline(self, lines: list[str]) -> list[Reply]:
        """Send every request at once and read the replies in order: the engine answers each
        complete line it has, so N requests cost one wait instead of N (a restart or an upgrade
        re-adds every tenant while the data path is paused). The first request the engine
        refused raises its EngineError once every reply is read."""
        if any("\n" in line for line in lines):
            raise ValueError("request must be one line")
        with self._lock:
            # One reconnect: the engine may have dropped an idle connection.
            for attempt in (0, 1):
                try:
                    s = self._connect()
                    s.sendall(b"".join(line.encode() + b"\n" for line in lines))
                    replies: list[Reply] = []
                    refused: EngineError | None = None
                    for line in lines:
                        data: list[str] = []
                        while True:
                            reply = self._readline(s)
                            if reply == "ok" or reply.startswith("ok "):
                                replies.append(Reply(tuple(data), reply[3:]))
                                break
                            if reply.startswith("err"):
                                parts = reply.split(" ", 2)
                                name = parts[1] if len(parts) > 1 else "EIO"
                                msg = parts[2] if len(parts) > 2 else ""
                                refused = refused or EngineError(line, name, msg)
                                replies.append(Reply(tuple(data), ""))
                                break
                            data.append(reply)
                    if refused is not None:
                        raise refused
                    return replies
                except (OSError, ConnectionError) as e:
                    self._close()
                    # ConnectionError covers a reset (the engine died and a new one runs).
                    if attempt == 1 or not isinstance(e, ConnectionError):
                        raise NetKernelError(f"engine admin socket {self.path}: {e}") from None
        raise AssertionError("unreachable")

    # -- typed requests --------------------------------------------------------------------
    def nsm_add(self, name: str, netns_path: str, socket: str | None = None) -> None:
        """socket: an external NSM (a stack in its own process) connects to the engine there."""
        self.request(f"nsm-add {name} {netns_path}" + (f" external:{socket}" if socket else ""))

    def tenant_add(
        self,
        name: str,
        netns_path: str,
        nsm: str,
        ipv4: str,
        ipv6: str,
        region: tuple[int, int] | None = None,
    ) -> int:
        return tenant_id(self.request(tenant_add_line(name, netns_path, nsm, ipv4, ipv6, region)))

    def tenant_del(self, name: str) -> None:
        self.request(f"tenant-del {name}")

    def dns_upstream(self, ip: str, port: int) -> None:
        self.request(f"dns-upstream {ip} {port}")

    def serve(self) -> None:
        """Tenants' processes may connect from now on (every tenant is known)."""
        self.request("serve")

    def nsm_del(self, name: str) -> None:
        self.request(f"nsm-del {name}")

    def nsm_set(self, name: str, bandwidth: int) -> None:
        self.request(f"nsm-set {name} bandwidth={bandwidth}")

    def tenant_set(self, name: str, settings: str) -> None:
        """``settings``: ``key=value ...`` (see config.Policy.engine_args)."""
        self.request(tenant_set_line(name, settings))

    def tenant_move(self, name: str, nsm: str) -> None:
        self.request(f"tenant-move {name} {nsm}")

    def tenant_move_done(self, name: str) -> None:
        self.request(f"tenant-move-done {name}")

    def stats(self) -> EngineStats:
        return parse_stats(self.request("stats").lines)

    def conns(self, tenant: str | None = None) -> list[Conn]:
        return parse_conns(self.request(f"conns {tenant}" if tenant else "conns").lines)


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
        time.sleep(0.002)  # a restart or an upgrade waits on this: the data path is paused
