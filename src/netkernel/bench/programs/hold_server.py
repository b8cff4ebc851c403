"""An epoll server that holds every connection it accepts: each client line "M <id> <round>"
is answered "A <id> <round> <crc>", and the connection stays open until the client closes it.

usage: hold_server.py PORT EXPECTED
Prints READY once listening, then, when EXPECTED connections have come and gone, one line
"accepted=N answered=M errors=E most_open=K" and exits 0 (1 if anything went wrong).
"""

import resource
import select
import socket
import sys
import zlib


def answer(line: bytes) -> bytes:
    kind, ident, rnd = line.split()
    if kind != b"M":
        raise ValueError(f"bad line {line!r}")
    crc = zlib.crc32(ident + b"/" + rnd)
    return b"A %s %s %d\n" % (ident, rnd, crc)


def main() -> int:
    port, expected = int(sys.argv[1]), int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port))
    ls.listen(4096)
    ls.setblocking(False)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    accepted = answered = errors = closed = most_open = 0
    print("READY", flush=True)
    while closed < expected:
        for fd, _ev in ep.poll(30):
            if fd == ls.fileno():
                while True:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        print(f"accept: {e}", file=sys.stderr, flush=True)
                        errors += 1
                        break
                    c.setblocking(False)
                    conns[c.fileno()] = (c, bytearray())
                    ep.register(c.fileno(), select.EPOLLIN)
                    accepted += 1
                    most_open = max(most_open, len(conns))
                continue
            c, buf = conns[fd]
            try:
                data = c.recv(4096)
            except BlockingIOError:
                continue
            except OSError as e:
                print(f"recv: {e}", file=sys.stderr, flush=True)
                data, errors = b"", errors + 1
            if not data:
                ep.unregister(fd)
                c.close()
                del conns[fd]
                closed += 1
                continue
            buf += data
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                try:
                    c.sendall(answer(line))  # a few bytes: the send buffer takes them
                    answered += 1
                except (OSError, ValueError) as e:
                    print(f"answer: {e}", file=sys.stderr, flush=True)
                    errors += 1
    print(f"accepted={accepted} answered={answered} errors={errors} most_open={most_open}", flush=True)
    return 0 if errors == 0 and accepted == expected else 1


if __name__ == "__main__":
    sys.exit(main())
