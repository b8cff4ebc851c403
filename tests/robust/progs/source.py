"""Send SIZE_MB of deterministic pseudo-random bytes to HOST:PORT; print their sha256."""

import hashlib
import socket
import sys

host, port, size_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = hashlib.sha256(b"netkernel").digest() * 32768  # 1 MiB, cheap to make
h = hashlib.sha256()
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.connect((host, port))
    for i in range(size_mb):
        chunk = i.to_bytes(8, "little") + block[8:]  # every MiB differs
        s.sendall(chunk)
        h.update(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # wait for the sink to close: every byte was read
print(h.hexdigest())
