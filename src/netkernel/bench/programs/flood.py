"""The noisy neighbour: 200 connections to ADDRESS:PORT, 16-byte writes as fast as it can for
SECONDS; TCP_NODELAY, so that every write is a send of its own for the stack.

Run as ``python3 -c SOURCE ADDRESS PORT SECONDS``."""

import socket
import sys
import time

socks = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(200)]
for s in socks:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    for s in socks:
        try:
            s.send(b"x" * 16)
        except BlockingIOError:
            pass
