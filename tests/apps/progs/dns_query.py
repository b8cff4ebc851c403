"""dns_query.py SERVER NAME [A|AAAA] [udp|tcp]: one DNS query, answers printed one per line
("A 1.2.3.4"), then "RCODE n". Exit 0 when a response came, 1 on timeout."""

import ipaddress
import random
import socket
import struct
import sys


def query(name: str, qtype: int) -> tuple[int, bytes]:
    qid = random.randrange(65536)
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return qid, header + qname + struct.pack("!HH", qtype, 1)


def skip_name(msg: bytes, off: int) -> int:
    while True:
        n = msg[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1 + n


def main() -> int:
    server, name = sys.argv[1], sys.argv[2]
    qtype_name = sys.argv[3] if len(sys.argv) > 3 else "A"
    transport = sys.argv[4] if len(sys.argv) > 4 else "udp"
    qtype = {"A": 1, "AAAA": 28}[qtype_name]
    qid, pkt = query(name, qtype)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    try:
        if transport == "udp":
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(3)
            s.connect((server, 53))
            s.send(pkt)
            msg = s.recv(4096)
        else:
            s = socket.create_connection((server, 53), timeout=5)
            s.sendall(struct.pack("!H", len(pkt)) + pkt)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            msg = buf[2:]
    except TimeoutError:
        print("TIMEOUT")
        return 1
    rid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", msg[:12])
    assert rid == qid, "id mismatch"
    off = 12
    for _ in range(qd):
        off = skip_name(msg, off) + 4
    for _ in range(an):
        off = skip_name(msg, off)
        rtype, _, _, rdlen = struct.unpack("!HHIH", msg[off : off + 10])
        off += 10
        rdata = msg[off : off + rdlen]
        off += rdlen
        if rtype == 1:
            print("A", ipaddress.IPv4Address(rdata))
        elif rtype == 28:
            print("AAAA", ipaddress.IPv6Address(rdata))
    print("RCODE", flags & 0xF)
    return 0


if __name__ == "__main__":
    sys.exit(main())
