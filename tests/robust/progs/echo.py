"""TCP echo on 0.0.0.0:PORT, a thread per connection, until killed."""

import socket
import sys
import threading

srv = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=256)


def serve(c: socket.socket) -> None:
    with c:
        try:
            while d := c.recv(65536):
                c.sendall(d)
        except OSError:
            pass


while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
