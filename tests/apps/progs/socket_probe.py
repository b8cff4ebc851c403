"""Socket behaviour against a peer, printed one fact per line, for comparing a program's view
natively and in a tenant without GuestLib (as a static program runs: through the relay).

    socket_probe.py HOST ECHO_PORT CLOSED_PORT UDP_ECHO_PORT

ECHO_PORT: a TCP echo server that half-closes after the client does; UDP_ECHO_PORT: a UDP
echo. Lines that name this side's own address start with "own ".
"""

import errno
import select
import socket
import struct
import sys
import time

host, echo, closed, udp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET


def err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


# Blocking connect; the addresses each side shows.
s = socket.socket(fam, socket.SOCK_STREAM)
s.connect((host, echo))
print("peer", s.getpeername()[:2])
print("own", s.getsockname()[0])
# Half-close: what was sent comes back, then the end of the stream.
s.sendall(b"ping")
s.shutdown(socket.SHUT_WR)
got = b""
while data := s.recv(100):
    got += data
print("echo after half-close", got)
s.close()

# Non-blocking connect: in progress (or done), then writable with SO_ERROR 0.
s = socket.socket(fam, socket.SOCK_STREAM)
s.setblocking(False)
r = s.connect_ex((host, echo))
print("nonblocking connect", errno.errorcode.get(r, r) if r in (errno.EINPROGRESS, 0) else f"error {r}")
ep = select.epoll()
ep.register(s.fileno(), select.EPOLLOUT)
print("epoll writable", bool(ep.poll(10)))
print("SO_ERROR", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
# Readable only once the peer has sent.
ep.modify(s.fileno(), select.EPOLLIN)
print("readable before", bool(ep.poll(0.2)))
s.send(b"x")
print("readable after", bool(ep.poll(10)), s.recv(10))
ep.close()
s.close()

# A TCP option reads back.
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.connect((host, echo))
print("TCP_NODELAY", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0)
s.close()

# UDP: sendto, recvfrom with the peer's address; connected UDP.
u = socket.socket(fam, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"dgram", (host, udp))
data, frm = u.recvfrom(100)
print("udp", data, frm[:2])
u.connect((host, udp))
print("own udp", u.getsockname()[0])
u.send(b"again")
print("udp connected", u.recv(100))
u.close()

# Resets, both ways: the peer's reaches us; ours reaches the peer (asked on a new connection).
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(10)
s.connect((host, echo))
s.sendall(b"RESET\n")
try:
    print("reset by the peer: recv", s.recv(10))
except OSError as e:
    print("reset by the peer:", err(e))
s.close()
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(10)
s.connect((host, echo))
s.sendall(b"TAG probe-reset\n")
print("tagged", s.recv(100))
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
for _ in range(100):
    a = socket.create_connection((host, echo), timeout=10)
    a.sendall(b"ASK probe-reset\n")
    answer = a.recv(100)
    a.close()
    if answer != b"open":
        break
    time.sleep(0.05)
print("our reset, as the peer saw it:", answer)

# A closed port.
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect((host, closed))
    try:
        print("closed port: connected, then", "recv", s.recv(10))
    except OSError as e:
        print("closed port: connected, then", err(e))
except OSError as e:
    print("closed port:", err(e))
