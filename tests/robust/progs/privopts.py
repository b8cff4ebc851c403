"""Socket options whose answer depends on privilege: prints "NAME=OK" or "NAME=ERRNO" for
each, on a socket of HOST's family. Run as an unprivileged user natively, it pins what Linux
answers a process without capabilities; run in a tenant, NetKernel must answer the same."""

import errno
import socket
import sys

host = sys.argv[1]
v6 = ":" in host
fam = socket.AF_INET6 if v6 else socket.AF_INET
IPV6_HOPOPTS, IPV6_DSTOPTS, SO_BUSY_POLL_BUDGET = 54, 59, 70
PADN6 = bytes([0, 0, 1, 4, 0, 0, 0, 0])  # an empty extension header: PadN of 4 bytes

cases = [
    ("TCP_NODELAY", socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    ("SO_KEEPALIVE", socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ("SO_PRIORITY_6", socket.SOL_SOCKET, socket.SO_PRIORITY, 6),
    ("SO_PRIORITY_7", socket.SOL_SOCKET, socket.SO_PRIORITY, 7),
    ("SO_MARK", socket.SOL_SOCKET, socket.SO_MARK, 42),
    ("SO_DEBUG", socket.SOL_SOCKET, socket.SO_DEBUG, 1),
    ("SO_SNDBUFFORCE", socket.SOL_SOCKET, 32, 1 << 20),
    ("SO_BUSY_POLL_BUDGET", socket.SOL_SOCKET, SO_BUSY_POLL_BUDGET, 200),
    ("TCP_REPAIR", socket.IPPROTO_TCP, 19, 1),
]
if v6:
    cases += [
        ("IPV6_TCLASS", socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0x10),
        ("IPV6_HOPOPTS", socket.IPPROTO_IPV6, IPV6_HOPOPTS, PADN6),
        ("IPV6_DSTOPTS", socket.IPPROTO_IPV6, IPV6_DSTOPTS, PADN6),
        ("IPV6_TRANSPARENT", socket.IPPROTO_IPV6, 75, 1),
    ]
else:
    cases += [
        ("IP_TOS", socket.IPPROTO_IP, socket.IP_TOS, 0x10),
        ("IP_OPTIONS_UNKNOWN", socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([0x99, 4, 0, 0])),
        ("IP_TRANSPARENT", socket.IPPROTO_IP, 19, 1),
    ]
for name, level, opt, value in cases:
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(level, opt, value)
        result = "OK"
    except OSError as e:
        result = errno.errorcode.get(e.errno, str(e.errno))
    s.close()
    print(f"{name}={result}", flush=True)
