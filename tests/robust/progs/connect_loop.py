"""Connect to HOST:PORT, send 4 KiB, read them back, close; again for DURATION seconds.
Prints a JSON summary: how many round trips succeeded (and in the last 2 s), and the errors
the others ended with. Every attempt is bounded, so a hang shows as a timeout error."""

import errno
import json
import socket
import sys
import time

host, port, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out: dict = {"ok": 0, "errors": {}, "ok_last_2s": 0}
payload = bytes(range(256)) * 16
end = time.monotonic() + duration
while time.monotonic() < end:
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                d = s.recv(65536)
                if not d:
                    raise ConnectionError(errno.ECONNRESET, "early EOF")
                got += d
            assert got == payload
        out["ok"] += 1
        if end - time.monotonic() < 2:
            out["ok_last_2s"] += 1
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__
        out["errors"][name] = out["errors"].get(name, 0) + 1
print(json.dumps(out), flush=True)
