"""A sink for floods: accepts on ADDRESS:PORT and reads all its connections at once to their
end, discarding what arrives; prints READY once it listens.

Run as ``python3 -c SOURCE ADDRESS PORT``."""

import selectors
import socket
import sys

sel = selectors.DefaultSelector()
ls = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=512)
sel.register(ls, selectors.EVENT_READ)
print("READY", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is ls:
            c, _ = ls.accept()
            # The socket rides along as the key's data: key.fileobj is typed as any file.
            sel.register(c, selectors.EVENT_READ, c)
        else:
            conn: socket.socket = key.data
            try:
                data = conn.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                conn.close()
