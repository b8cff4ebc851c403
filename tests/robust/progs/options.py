"""Socket options in a tenant: the ordinary ones work; the ones that need privileges the
tenant does not have, or that would reach into the engine (filters, devices, marks,
transparent binds, congestion control), are refused. Prints OK or what differed."""

import errno
import socket
import struct
import sys

host = sys.argv[1]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
bad = []


def expect_ok(level: int, name: int, value: object) -> None:
    try:
        s.setsockopt(level, name, value)
    except OSError as e:
        bad.append(f"setsockopt({level},{name}) failed: {e}")


def expect_err(level: int, name: int, value: object, errs: tuple[int, ...]) -> None:
    try:
        s.setsockopt(level, name, value)
        bad.append(f"setsockopt({level},{name}) was accepted")
    except OSError as e:
        if e.errno not in errs:
            bad.append(f"setsockopt({level},{name}): {errno.errorcode.get(e.errno)}")


expect_ok(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 1:
    bad.append("TCP_NODELAY did not read back")
expect_ok(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
expect_ok(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
expect_ok(socket.SOL_SOCKET, socket.SO_PRIORITY, 3)
expect_err(socket.SOL_SOCKET, socket.SO_PRIORITY, 7, (errno.EPERM,))
expect_err(socket.SOL_SOCKET, socket.SO_MARK, 42, (errno.EPERM,))
expect_err(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0", (errno.EPERM,))
expect_err(socket.SOL_IP, 19, 1, (errno.EPERM,))  # IP_TRANSPARENT
# SO_ATTACH_FILTER (26): its value holds a pointer, which would point into the engine
expect_err(
    socket.SOL_SOCKET,
    26,
    struct.pack("HL", 1, 0xDEADBEEF),
    (errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EPERM, errno.EFAULT),
)
expect_err(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno", (errno.EPERM,))
print("OK" if not bad else "\n".join(bad))
