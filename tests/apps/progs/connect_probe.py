"""connect_probe.py HOST PORT [tcp|udp|raw]: try to reach HOST and print one line:
"CONNECTED", "ERR <ERRNO NAME>" (socket or connect/sendto failed) or "TIMEOUT". Exit 0."""

import errno
import socket
import sys


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    kind = sys.argv[3] if len(sys.argv) > 3 else "tcp"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if kind == "tcp":
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect((host, port))
            s.sendall(b"ping\n")
            print("CONNECTED", flush=True)
        elif kind == "raw":
            proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
            s = socket.socket(family, socket.SOCK_RAW, proto)
            s.settimeout(2)
            # ICMP echo request (checksum left to the kernel for v6; computed for v4)
            body = bytes([8 if family == socket.AF_INET else 128, 0, 0, 0, 0x12, 0x34, 0, 1]) + b"nk"
            if family == socket.AF_INET:
                total = sum(int.from_bytes(body[i : i + 2], "big") for i in range(0, len(body), 2))
                while total >> 16:
                    total = (total & 0xFFFF) + (total >> 16)
                csum = ~total & 0xFFFF
                body = body[:2] + csum.to_bytes(2, "big") + body[4:]
            s.sendto(body, (host, 0))
            try:
                s.recv(1500)
                print("CONNECTED", flush=True)  # an answer came back
            except TimeoutError:
                print("TIMEOUT", flush=True)
        else:
            raise SystemExit(f"unknown kind {kind}")
    except TimeoutError:
        print("TIMEOUT", flush=True)
    except OSError as e:
        print(f"ERR {errno.errorcode.get(e.errno, e.errno)}", flush=True)


if __name__ == "__main__":
    main()
