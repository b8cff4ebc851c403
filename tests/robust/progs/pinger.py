"""The stall oracle: a neighbour's view of the engine while another tenant attacks it.

pinger.py HOST PORT SECONDS: ping-pong one byte with an echo server at HOST:PORT over one
connection, and open a fresh connection (connect, one round, close) every 0.2 s, for SECONDS.
Prints "rounds=N max_ms=X connects=M connect_max_ms=Y errors=E": a stalled engine shows as a
round or a connect that took seconds (or never finished: each has a 10 s timeout)."""

import socket
import sys
import time

host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET


def connect() -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def round_trip(s: socket.socket) -> None:
    s.sendall(b"p")
    if s.recv(1) != b"p":
        raise ConnectionError("echo lost")


rounds = connects = errors = 0
max_rtt = 0.0
t0 = time.monotonic()
end = t0 + secs
conn = connect()  # a stalled engine shows here first: it counts as a fresh connection
round_trip(conn)
max_connect = time.monotonic() - t0
next_connect = time.monotonic()
while time.monotonic() < end:
    t0 = time.monotonic()
    try:
        round_trip(conn)
        rounds += 1
    except OSError:
        errors += 1
        conn.close()
        conn = connect()
    max_rtt = max(max_rtt, time.monotonic() - t0)
    if time.monotonic() >= next_connect:
        t0 = time.monotonic()
        try:
            with connect() as fresh:
                round_trip(fresh)
            connects += 1
        except OSError:
            errors += 1
        max_connect = max(max_connect, time.monotonic() - t0)
        next_connect = time.monotonic() + 0.2
    time.sleep(0.001)
print(
    f"rounds={rounds} max_ms={max_rtt * 1000:.1f} connects={connects} "
    f"connect_max_ms={max_connect * 1000:.1f} errors={errors}",
    flush=True,
)
