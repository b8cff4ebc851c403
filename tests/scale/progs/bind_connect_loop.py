"""The pattern of issue 16 item 6, looped: a client binds an explicit source port, connects to
a listener, the listener accepts, a message goes each way, both close; beside it, threads
open and close other sockets all the time. Any connection the listener does not accept
within 10 s is the lost connection.

usage: bind_connect_loop.py LISTEN_HOST CONNECT_HOST ROUNDS
Prints "rounds=N lost=M churn=K" and exits 0 when none was lost.
"""

import os
import socket
import sys
import threading
import zlib

BASE_PORT = 10000  # source ports cycle through BASE_PORT .. BASE_PORT + PORTS - 1, below the
# ephemeral range (32768-60999) that the churn and the listeners take ports from
PORTS = 20000


def churn(host: str, stop: threading.Event, count: list[int]) -> None:
    """Sockets opened and closed beside the loop: connects that are never accepted by the
    loop (they go to their own listener), UDP sockets, sockets closed unused."""
    ls = socket.create_server((host, 0))
    target = ls.getsockname()[:2]
    while not stop.is_set():
        c = socket.socket(ls.family)
        c.connect(target)
        a, _ = ls.accept()
        u = socket.socket(ls.family, socket.SOCK_DGRAM)
        u.sendto(b"x", target)
        socket.socket(ls.family).close()
        for s in (c, a, u):
            s.close()
        count[0] += 1
    ls.close()


def main() -> int:
    listen_host, connect_host, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in connect_host else socket.AF_INET
    ls = socket.socket(family)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((listen_host, 0))
    ls.listen(128)
    ls.settimeout(10)
    port = ls.getsockname()[1]
    stop, count = threading.Event(), [0]
    churners = [threading.Thread(target=churn, args=(connect_host, stop, count)) for _ in range(2)]
    for t in churners:
        t.start()
    lost = 0
    try:
        for i in range(rounds):
            c = socket.socket(family)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            c.bind((connect_host, BASE_PORT + i % PORTS))
            c.settimeout(10)
            c.connect((connect_host, port))
            try:
                a, peer = ls.accept()
            except TimeoutError:
                print(f"round {i}: connection from port {c.getsockname()[1]} never accepted", flush=True)
                lost += 1
                c.close()
                continue
            msg = os.urandom(64)
            c.sendall(msg)
            got = a.recv(64, socket.MSG_WAITALL)
            a.sendall(zlib.crc32(got).to_bytes(4, "big"))
            answer = c.recv(4, socket.MSG_WAITALL)
            if peer[1] != c.getsockname()[1] or got != msg or answer != zlib.crc32(msg).to_bytes(4, "big"):
                print(f"round {i}: wrong peer or bytes ({peer}, {len(got)} B)", flush=True)
                lost += 1
            a.close()  # the server closes first: TIME_WAIT stays on its side, as a web server's
            c.close()
    finally:
        stop.set()
        for t in churners:
            t.join()
    print(f"rounds={rounds} lost={lost} churn={count[0]}", flush=True)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
