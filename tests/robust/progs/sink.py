"""Accept on HOST:PORT, read one connection to EOF, print the sha256 of what arrived and the
byte count (or the error that ended it). With --forever: keep accepting and discarding."""

import hashlib
import socket
import sys
import threading

host, port = sys.argv[1], int(sys.argv[2])
forever = "--forever" in sys.argv
family = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = socket.socket(family, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(64)


def drain(c: socket.socket) -> None:
    try:
        while c.recv(1 << 20):
            pass
    except OSError:
        pass
    c.close()


if forever:
    srv.settimeout(120)
    while True:
        try:
            c, _ = srv.accept()
        except OSError:
            break
        threading.Thread(target=drain, args=(c,), daemon=True).start()
    sys.exit(0)

srv.settimeout(60)
c, _ = srv.accept()
c.settimeout(60)
h = hashlib.sha256()
n = 0
end = "eof"
try:
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        h.update(d)
        n += len(d)
except OSError as e:
    end = type(e).__name__
c.close()
print(h.hexdigest(), n, end)
