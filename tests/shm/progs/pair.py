"""One end of a TCP scenario: `pair.py server|client SCENARIO ADDR PORT`.

The tests run each scenario natively (both ends in one namespace, the kernel's TCP) and between
two tenants (the shared-memory path), and compare what each end printed: the output is what
Linux says a socket does. Lines starting with "R " are compared; "INFO" lines are not.
"""

from __future__ import annotations

import errno
import hashlib
import select
import socket
import struct
import sys
import time

SLOW_TOTAL = 64 << 20


def out(*words: object) -> None:
    print("R", *words, flush=True)


def err_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def attempt(fn) -> str:
    try:
        r = fn()
        return f"ok {len(r)}" if isinstance(r, bytes) else f"ok {r}"
    except OSError as e:
        return err_name(e)


def pattern(n: int, seed: int = 7) -> bytes:
    block = bytes((i * 31 + seed) % 251 for i in range(65536))
    return (block * (n // len(block) + 1))[:n]


def recv_all(s: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while b := s.recv(1 << 20):
        h.update(b)
        n += len(b)
    return n, h.hexdigest()


def listen(addr: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(16)
    print("READY", flush=True)
    return ls


def connect(addr: str, port: int) -> socket.socket:
    return socket.create_connection((addr, port), timeout=30)


# -- scenarios: (server, client) ----------------------------------------------------------------


def halfclose_server(ls: socket.socket) -> None:
    c, _ = ls.accept()
    n, digest = recv_all(c)  # until the client's FIN
    out("server eof after", n, digest == hashlib.sha256(pattern(n)).hexdigest())
    c.sendall(f"got {n}".encode())  # still allowed: only the client's direction is closed
    c.close()


def halfclose_client(addr: str, port: int) -> None:
    s = connect(addr, port)
    s.sendall(pattern(300000))
    s.shutdown(socket.SHUT_WR)
    out("client send after shutdown:", attempt(lambda: s.send(b"x")))
    reply = b""
    while b := s.recv(100):
        reply += b
    out("client reply", reply.decode(), "then eof")


def reset_server(ls: socket.socket) -> None:
    c, _ = ls.accept()
    time.sleep(0.5)  # the client's reset arrives meanwhile
    out("server recv:", attempt(lambda: c.recv(10)))
    out("server recv again:", attempt(lambda: c.recv(10)))
    out("server send:", attempt(lambda: c.send(b"x")))


def reset_client(addr: str, port: int) -> None:
    s = connect(addr, port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.1)
    s.close()
    out("client closed with linger 0")


def resetsend_server(ls: socket.socket) -> None:
    c, _ = ls.accept()
    time.sleep(0.5)  # the client's reset arrives meanwhile; this side sends first
    out("server send:", attempt(lambda: c.send(b"x")))
    out("server recv:", attempt(lambda: c.recv(10)))
    out("server send again:", attempt(lambda: c.send(b"x")))
    out("server SO_ERROR:", c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))


def resetsend_client(addr: str, port: int) -> None:
    reset_client(addr, port)


def unread_server(ls: socket.socket) -> None:
    c, _ = ls.accept()
    time.sleep(0.3)  # the client's bytes are in; close without reading them: a reset
    c.close()
    out("server closed with unread bytes")


def unread_client(addr: str, port: int) -> None:
    s = connect(addr, port)
    s.sendall(b"y" * 1000)
    time.sleep(0.8)
    out("client recv:", attempt(lambda: s.recv(10)))
    out("client send:", attempt(lambda: s.send(b"z")))


def peerclosed_server(ls: socket.socket) -> None:
    c, _ = ls.accept()
    c.close()
    out("server closed")


def peerclosed_client(addr: str, port: int) -> None:
    s = connect(addr, port)
    time.sleep(0.3)
    out("client recv:", attempt(lambda: s.recv(10)))
    out("client first send:", attempt(lambda: s.send(b"a")))  # goes out; a reset comes back
    time.sleep(0.3)
    out("client second send:", attempt(lambda: s.send(b"b")))


def names_server(ls: socket.socket) -> None:
    c, peer = ls.accept()
    info = c.recv(200).decode().split("|")
    out("accept peer matches client's sockname:", info[0] == repr(peer[:2]))
    out("client's peername matches server sockname:", info[1] == repr(c.getsockname()[:2]))
    out("getpeername matches accept:", c.getpeername()[:2] == peer[:2])
    c.close()


def names_client(addr: str, port: int) -> None:
    s = connect(addr, port)
    s.sendall(f"{s.getsockname()[:2]!r}|{s.getpeername()[:2]!r}".encode())
    out("client peer port", s.getpeername()[1], "family", s.family.name)
    out("client recv eof:", attempt(lambda: s.recv(10)))


def nonblock_server(ls: socket.socket) -> None:
    c, _ = ls.accept()
    time.sleep(0.3)
    c.sendall(b"hi")
    time.sleep(0.3)
    c.shutdown(socket.SHUT_WR)
    time.sleep(0.5)
    c.close()


def nonblock_client(addr: str, port: int) -> None:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setblocking(False)
    out("connect:", errno.errorcode.get(s.connect_ex((addr, port)), "0"))
    _, w, _ = select.select([], [s], [], 5)
    out("writable after connect:", bool(w), "SO_ERROR", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    out("recv before data:", attempt(lambda: s.recv(10)))
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
    ev = ep.poll(5)
    out(
        "epoll on data: IN",
        bool(ev and ev[0][1] & select.EPOLLIN),
        "RDHUP",
        bool(ev and ev[0][1] & select.EPOLLRDHUP),
    )
    out("recv:", attempt(lambda: s.recv(10)))
    ev = ep.poll(5)
    out(
        "epoll on fin: IN",
        bool(ev and ev[0][1] & select.EPOLLIN),
        "RDHUP",
        bool(ev and ev[0][1] & select.EPOLLRDHUP),
    )
    out("recv at eof:", attempt(lambda: s.recv(10)))


def slow_server(ls: socket.socket) -> None:
    c, _ = ls.accept()
    time.sleep(1.0)  # a slow receiver: the sender must stop, not lose or buffer without end
    n, digest = recv_all(c)
    out("server got", n, digest == hashlib.sha256(pattern(SLOW_TOTAL)).hexdigest())
    c.close()


def slow_client(addr: str, port: int) -> None:
    s = connect(addr, port)
    data = pattern(SLOW_TOTAL)
    s.setblocking(False)
    sent = 0
    t0 = time.monotonic()
    while True:
        try:
            sent += s.send(data[sent : sent + 65536])
        except BlockingIOError:
            break
    out("sender stopped with EAGAIN, receiver not reading:", time.monotonic() - t0 < 1.0)
    print("INFO buffered before EAGAIN", sent, flush=True)
    out("buffered less than 16 MiB:", sent < (16 << 20))
    s.setblocking(True)
    s.sendall(data[sent:])
    s.shutdown(socket.SHUT_WR)
    out("client eof:", attempt(lambda: s.recv(10)))


BACKLOG_CONNS = 24  # more than listen(16) queues: Linux makes the rest wait, never refuses


def backlog_server(ls: socket.socket) -> None:
    time.sleep(1.5)  # nobody accepts while the client connects
    conns = [ls.accept()[0] for _ in range(BACKLOG_CONNS)]
    for c in conns:
        c.sendall(c.recv(1))
    out("accepted", len(conns))
    for c in conns:
        c.close()


def backlog_client(addr: str, port: int) -> None:
    """Connections beyond the listener's backlog wait (Linux drops the SYN and the client
    retries) and complete once the server accepts; none is refused."""
    socks, errors = [], []
    for _ in range(BACKLOG_CONNS):
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect((addr, port))
            socks.append(s)
        except OSError as e:
            errors.append(err_name(e))
    out("connected", len(socks), "errors", errors)
    echoed = 0
    for i, s in enumerate(socks):
        s.sendall(bytes([i]))
        echoed += s.recv(1) == bytes([i])
    out("each echoed its own byte:", echoed == len(socks))


SCENARIOS = (
    "halfclose",
    "reset",
    "resetsend",
    "unread",
    "peerclosed",
    "names",
    "nonblock",
    "slow",
    "backlog",
)


def main() -> None:
    role, scenario, addr, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if scenario not in SCENARIOS:
        raise SystemExit(f"unknown scenario {scenario}")
    if role == "server":
        ls = listen(addr, port)
        globals()[f"{scenario}_server"](ls)
    else:
        globals()[f"{scenario}_client"](addr, port)


if __name__ == "__main__":
    main()
