"""Bulk TCP transfer with sha256 on both ends.

    bulk.py listen  HOST PORT send|recv SIZE
    bulk.py connect HOST PORT send|recv SIZE

The sender streams SIZE bytes of a deterministic pseudo-random pattern (a 1 MiB + 7 byte block,
so repeats never line up with power-of-two buffers, rotated by a per-block offset); the receiver
reads until EOF. Both print "DONE <sha256> <bytes>". A listener prints "READY" once listening
and handles one connection."""

import hashlib
import random
import socket
import sys

BLOCK = (1 << 20) + 7


def pattern() -> bytes:
    return random.Random(20240601).randbytes(BLOCK)


def send(sock: socket.socket, size: int) -> tuple[str, int]:
    base = pattern()
    doubled = memoryview(base + base)
    h = hashlib.sha256()
    sent, k = 0, 0
    while sent < size:
        off = (k * 4099) % BLOCK
        chunk = doubled[off : off + min(BLOCK, size - sent)]
        sock.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
        k += 1
    sock.shutdown(socket.SHUT_WR)
    # Wait for the receiver to close, so that nothing is cut short.
    sock.settimeout(120)
    while sock.recv(65536):
        pass
    return h.hexdigest(), sent


def recv(sock: socket.socket) -> tuple[str, int]:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    total = 0
    while True:
        n = sock.recv_into(buf)
        if n == 0:
            break
        h.update(mv[:n])
        total += n
    return h.hexdigest(), total


def main() -> int:
    mode, host, direction = sys.argv[1], sys.argv[2], sys.argv[4]
    port, size = int(sys.argv[3]), int(sys.argv[5])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if mode == "listen":
        lsock = socket.socket(family, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((host, port))
        lsock.listen(1)
        print("READY", flush=True)
        lsock.settimeout(120)
        sock, _ = lsock.accept()
        sock.settimeout(None)
        lsock.close()
    else:
        sock = socket.create_connection((host, port), timeout=30)
        sock.settimeout(None)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    digest, n = send(sock, size) if direction == "send" else recv(sock)
    sock.close()
    print(f"DONE {digest} {n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
