"""A tiny authoritative DNS responder for tenants.

Answers A and AAAA for ``<tenant>.tenant.netkernel``, names in the host's /etc/hosts and
names from the config's ``[dns] hosts``; NXDOMAIN for anything else (nothing is forwarded
off the machine). Tenants reach it through the engine's stub resolver on 127.0.0.53, which
relays to this server on the bridge address.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QTYPE_A = 1
QTYPE_AAAA = 28
QCLASS_IN = 1
RCODE_OK = 0
RCODE_FORMERR = 1
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
TTL = 5  # tenants come and go; keep caches short
MAX_FORWARDS = 64  # queries for other hosts' zones waiting for an answer, at most
FORWARD_WORKERS = 4
TENANT_SUFFIX = ".tenant.netkernel"

Addrs = list[ipaddress.IPv4Address | ipaddress.IPv6Address]
# Returns the addresses of a lower-case name without trailing dot, or None if unknown.
Resolver = Callable[[str], Addrs | None]


class FormatError(ValueError):
    pass


def parse_query(packet: bytes) -> tuple[int, int, str, int, int, int]:
    """(id, flags, qname, qtype, qclass, end of question) of a query with one question."""
    if len(packet) < 12:
        raise FormatError("short header")
    qid, flags, qdcount = struct.unpack_from("!HHH", packet, 0)
    if qdcount != 1:
        raise FormatError("need exactly one question")
    labels = []
    pos = 12
    while True:
        if pos >= len(packet):
            raise FormatError("truncated name")
        length = packet[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0:
            raise FormatError("compression in question")  # never legitimate in a query
        if pos + length > len(packet):
            raise FormatError("truncated label")
        labels.append(packet[pos : pos + length].decode("ascii", "replace"))
        pos += length
    if pos + 4 > len(packet):
        raise FormatError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", packet, pos)
    return qid, flags, ".".join(labels).lower(), qtype, qclass, pos + 4


def build_response(query: bytes, resolve: Resolver) -> bytes | None:
    """The response to ``query``, or None when it is too broken to answer at all."""
    if len(query) < 12:
        return None
    qid, flags = struct.unpack_from("!HH", query, 0)
    if flags & 0x8000:
        return None  # a response, not a query: never answer those (no loops)
    opcode = (flags >> 11) & 0xF
    rd = flags & 0x0100

    def header(rcode: int, qd: int, an: int) -> bytes:
        # QR=1, AA=1, opcode echoed, RD echoed, RA=0.
        out_flags = 0x8000 | (opcode << 11) | 0x0400 | rd | rcode
        return struct.pack("!HHHHHH", qid, out_flags, qd, an, 0, 0)

    if opcode != 0:
        return header(RCODE_NOTIMP, 0, 0)
    try:
        _, _, name, qtype, qclass, end = parse_query(query)
    except FormatError:
        return header(RCODE_FORMERR, 0, 0)
    question = query[12:end]
    addrs = resolve(name.rstrip("."))
    if addrs is None:
        return header(RCODE_NXDOMAIN, 1, 0) + question
    answers = b""
    count = 0
    if qclass == QCLASS_IN:
        for a in addrs:
            if (qtype == QTYPE_A and a.version == 4) or (qtype == QTYPE_AAAA and a.version == 6):
                rtype = QTYPE_A if a.version == 4 else QTYPE_AAAA
                # 0xC00C: pointer to the name in the question.
                answers += struct.pack("!HHHIH", 0xC00C, rtype, QCLASS_IN, TTL, len(a.packed))
                answers += a.packed
                count += 1
    # A known name without records of that type is NOERROR with no answers ("NODATA").
    return header(RCODE_OK, 1, count) + question + answers


class HostsFile:
    """/etc/hosts, re-read when it changes."""

    def __init__(self, path: Path = Path("/etc/hosts")) -> None:
        self.path = path
        self._mtime: float | None = None
        self._names: dict[str, Addrs] = {}

    def lookup(self, name: str) -> Addrs | None:
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return None
        if mtime != self._mtime:
            self._names = self._parse()
            self._mtime = mtime
        return self._names.get(name)

    def _parse(self) -> dict[str, Addrs]:
        names: dict[str, Addrs] = {}
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            return names
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 2:
                continue
            try:
                addr = ipaddress.ip_address(words[0].split("%", 1)[0])
            except ValueError:
                continue
            for n in words[1:]:
                names.setdefault(n.lower().rstrip("."), []).append(addr)
        return names


class DNSServer:
    """UDP responder on one address, served by a daemon thread."""

    def __init__(
        self, host: str, port: int, resolve: Resolver, slow: Callable[[str], bool] | None = None
    ) -> None:
        """``slow(name)``: the name is answered by asking another host ([dns] forward); such
        queries are answered by a few worker threads, at most MAX_FORWARDS waiting, so that a
        slow or unreachable host never holds up the names this host answers itself."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind((host, port))
        self.address = self.sock.getsockname()
        self.resolve = resolve
        self.slow = slow
        self.forwards_dropped = 0
        self._forwarding = threading.BoundedSemaphore(MAX_FORWARDS)
        self._pool = ThreadPoolExecutor(max_workers=FORWARD_WORKERS, thread_name_prefix="dns-forward")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        # Wake recvfrom: shutdown() on a UDP socket makes a blocked recv return.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=2)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except OSError:
                if self._stop.is_set():
                    return
                continue
            if not query and self._stop.is_set():
                return
            if self.slow is not None and self._is_slow(query):
                if not self._forwarding.acquire(blocking=False):
                    self.forwards_dropped += 1  # the client asks again, as of a busy resolver
                    continue
                try:
                    self._pool.submit(self._answer_forwarded, query, peer)
                except RuntimeError:  # shut down meanwhile
                    self._forwarding.release()
                continue
            self._answer(query, peer)

    def _is_slow(self, query: bytes) -> bool:
        try:
            name = parse_query(query)[2]
        except FormatError:
            return False
        return self.slow is not None and self.slow(name.rstrip("."))

    def _answer_forwarded(self, query: bytes, peer: Any) -> None:
        try:
            self._answer(query, peer)
        finally:
            self._forwarding.release()

    def _answer(self, query: bytes, peer: Any) -> None:
        try:
            reply = build_response(query, self.resolve)
        except Exception:  # a bad packet must never kill the responder
            log.exception("dns: failed to answer a query from %s", peer)
            return
        if reply is not None:
            try:
                self.sock.sendto(reply, peer)
            except OSError as e:
                log.debug("dns: reply to %s failed: %s", peer, os.strerror(e.errno or 0))


def make_query(name: str, qtype: int, qid: int = 0x1234) -> bytes:
    """A standard recursive query (used by tests and `netkernel` diagnostics)."""
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        raw = label.encode("utf-8", "replace")[:63]
        q += bytes([len(raw)]) + raw
    return q + b"\x00" + struct.pack("!HH", qtype, QCLASS_IN)


def parse_answers(reply: bytes) -> tuple[int, list[str]]:
    """(rcode, addresses) of a response built by ``build_response``."""
    _, flags, qd, an = struct.unpack_from("!HHHH", reply, 0)
    pos = 12
    for _ in range(qd):
        while reply[pos] != 0:
            pos += reply[pos] + 1
        pos += 5
    out = []
    for _ in range(an):
        pos += 2  # compressed name pointer
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", reply, pos)
        pos += 10
        data = reply[pos : pos + rdlen]
        pos += rdlen
        if rtype == QTYPE_A:
            out.append(str(ipaddress.IPv4Address(data)))
        elif rtype == QTYPE_AAAA:
            out.append(str(ipaddress.IPv6Address(data)))
    return flags & 0xF, out


def ask(server: str, name: str, timeout: float = 0.5) -> Addrs | None:
    """A and AAAA of ``name`` from another host's responder (a zone in ``[dns] forward``),
    each waited for at most ``timeout``; None when it says NXDOMAIN or does not answer
    (logged: the zone's host may be down)."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    out: Addrs = []
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        for qtype in (QTYPE_A, QTYPE_AAAA):
            qid = int.from_bytes(os.urandom(2), "big")
            try:
                s.connect((server, 53))
                s.send(make_query(name, qtype, qid))
                while True:  # skip stray datagrams: only the answer to this query counts
                    reply = s.recv(4096)
                    if len(reply) >= 12 and struct.unpack_from("!H", reply)[0] == qid:
                        break
                rcode, addrs = parse_answers(reply)
            except (OSError, struct.error, IndexError, ValueError) as e:
                log.warning("dns: %s did not answer for %s: %s", server, name, e)
                return None
            if rcode == RCODE_NXDOMAIN:
                return None
            out += [ipaddress.ip_address(a) for a in addrs]
    return out
