"""A server at its descriptor limit: accepts until accept() fails, then closes the ten
oldest connections it holds and goes on, until TOTAL connections were accepted.

usage: accept_limit.py PORT TOTAL [NOFILE]
NOFILE sets the process's own descriptor limit (the native run); in a tenant, max_sockets is
the limit. Prints READY, then "accepted=N refused=ERRNO,..." and exits.
"""

import errno
import resource
import socket
import sys


def main() -> int:
    port, total = int(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:
        n = int(sys.argv[3])
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(256)
    ls.settimeout(60)
    print("READY", flush=True)
    held: list[socket.socket] = []
    accepted, refused = 0, []
    while accepted < total:
        try:
            c, _ = ls.accept()
        except OSError as e:
            refused.append(errno.errorcode.get(e.errno or 0, str(e)))
            if not held:
                break
            for c in held[:10]:
                c.close()
            del held[:10]
            continue
        accepted += 1
        held.append(c)
    print(f"accepted={accepted} refused={','.join(sorted(set(refused))) or '-'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
