"""Opens COUNT connections to HOST:PORT, then waits until the server has closed each one.

usage: connect_many.py HOST PORT COUNT
Prints "connected=N closed=M".
"""

import socket
import sys
import time


def main() -> int:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    socks = [socket.create_connection((host, port), timeout=10) for _ in range(count)]
    closed, deadline = 0, time.monotonic() + 60
    for s in socks:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            if s.recv(1) == b"":
                closed += 1
        except OSError:
            pass
        s.close()
    print(f"connected={len(socks)} closed={closed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
