"""Opens COUNT TCP connections to HOST:PORT from the given source addresses and holds them:
each says "M <id> 1" as it opens, and once all are open and answered the client prints
"OPEN <count> <seconds>" and waits for a line on stdin; then every connection says
"M <id> 2", checks its answer, and all close ("DONE <count>").

usage: hold_client.py HOST PORT COUNT SRC[,SRC...] [FIRST_ID]
Any failure prints "ERROR ..." and exits 1. At most INFLIGHT connects are under way at once,
as a load generator paces itself.
"""

import errno
import resource
import select
import socket
import sys
import time
import zlib

INFLIGHT = 256
IP_BIND_ADDRESS_NO_PORT = 24


def expect(ident: int, rnd: int) -> bytes:
    crc = zlib.crc32(b"%d/%d" % (ident, rnd))
    return b"A %d %d %d\n" % (ident, rnd, crc)


def fail(msg: str) -> None:
    print(f"ERROR {msg}", flush=True)
    sys.exit(1)


def say(s: socket.socket, ident: int, rnd: int) -> None:
    s.send(b"M %d %d\n" % (ident, rnd))


def collect(socks: dict[int, tuple[socket.socket, int]], ep: select.epoll, rnd: int) -> None:
    """Wait for the answer of round rnd on every socket in socks."""
    want = {fd: expect(ident, rnd) for fd, (_, ident) in socks.items()}
    got = {fd: b"" for fd in socks}
    for fd in socks:
        ep.modify(fd, select.EPOLLIN)
    pending = set(socks)
    deadline = time.monotonic() + 120
    while pending:
        if time.monotonic() > deadline:
            fail(f"round {rnd}: {len(pending)} answers missing")
        for fd, _ in ep.poll(1):
            if fd not in pending:
                continue
            data = socks[fd][0].recv(256)
            if not data:
                fail(f"round {rnd}: connection {socks[fd][1]} closed by the server")
            got[fd] += data
            if len(got[fd]) >= len(want[fd]):
                if got[fd] != want[fd]:
                    fail(f"round {rnd}: connection {socks[fd][1]} got {got[fd]!r}")
                pending.discard(fd)


def main() -> int:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sources = sys.argv[4].split(",")
    first = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ep = select.epoll()
    connecting: dict[int, tuple[socket.socket, int]] = {}
    opened: dict[int, tuple[socket.socket, int]] = {}
    t0 = time.monotonic()
    nxt = 0
    while len(opened) < count:
        while nxt < count and len(connecting) < INFLIGHT:
            s = socket.socket(family, socket.SOCK_STREAM)
            if family == socket.AF_INET:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((sources[nxt % len(sources)], 0))
            s.setblocking(False)
            err = s.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                fail(f"connect {nxt}: {errno.errorcode.get(err, err)}")
            connecting[s.fileno()] = (s, first + nxt)
            ep.register(s.fileno(), select.EPOLLOUT)
            nxt += 1
        if time.monotonic() - t0 > 300:
            fail(f"only {len(opened)} of {count} connections after 300 s")
        for fd, _ in ep.poll(1):
            s, ident = connecting.pop(fd)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                fail(f"connect {ident}: {errno.errorcode.get(err, err)}")
            ep.modify(fd, 0)
            say(s, ident, 1)  # while the others are still opening
            opened[fd] = (s, ident)
    collect(opened, ep, 1)
    print(f"OPEN {len(opened)} {time.monotonic() - t0:.2f}", flush=True)
    if not sys.stdin.readline():
        fail("no go")
    for s, ident in opened.values():
        say(s, ident, 2)
    collect(opened, ep, 2)
    for s, _ in opened.values():
        s.close()
    print(f"DONE {len(opened)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
