"""udp_zero.py serve HOST PORT | client HOST PORT: an empty datagram, then a 3-byte one.

serve: print READY, echo two datagrams back to their senders, exit. client: send b"" and
b"abc", print "got=N" for each echo (in order), exit; 5 s timeout each."""

import socket
import sys

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(5)
if mode == "serve":
    s.bind((host, port))
    print("READY", flush=True)
    for _ in range(2):
        data, addr = s.recvfrom(100)
        s.sendto(data, addr)
else:
    s.sendto(b"", (host, port))
    s.sendto(b"abc", (host, port))
    for _ in range(2):
        print(f"got={len(s.recv(100))}", flush=True)
