"""abort_client.py HOST PORT PATH: request PATH over HTTP/1.1, read the first 64 KiB of the
answer, then close with unread data pending (the kernel answers with a reset). Prints
"ABORTED <bytes read>"."""

import socket
import sys

host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=20)
hosthdr = f"[{host}]" if ":" in host else host
s.sendall(f"GET {path} HTTP/1.1\r\nHost: {hosthdr}\r\n\r\n".encode())
got = 0
while got < 65536:
    chunk = s.recv(65536 - got)
    if not chunk:
        break
    got += len(chunk)
s.close()
print(f"ABORTED {got}", flush=True)
