"""The idle tenant: a listener that holds every connection it accepts, blocked in accept().

Run as ``python3 -c SOURCE ADDRESS PORT``."""

import socket
import sys

fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
held: list[socket.socket] = []
while True:
    c, _ = s.accept()
    held.append(c)
