"""Write the seed corpus of the engine's fuzz harnesses (tests/fuzz/corpus/<harness>/seed-*).

Each seed is a short program in its harness's input format (the action byte, then its
arguments; see the comments at the top of each fuzz_*.c): sessions a well-behaved tenant or
NSM would have (data both ways, datagrams, accept, shutdown, close) and a few of the hostile
moves the harnesses are about, so that the fuzzer starts from deep states. The files are
committed; run this again after changing an input format:

    python3 tests/fuzz/gen_seeds.py

Regression inputs (files not named seed-*) are left alone.
"""

from __future__ import annotations

import struct
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"


def u8(*v: int) -> bytes:
    return bytes(x & 0xFF for x in v)


def u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


# ---- fuzz_region.c ----
# Slots in the order the harness makes them (a selector below 0x80 picks the k-th socket):
# 0 TCP v4 over the NSM, 1 TCP v6 over the NSM, 2 listener, 3 UDP v4 bound, 4 UDP v6
# connected, 5 TCP v4 loopback, 6 TCP shared memory, 7 its accepted end, 8 TCP v6 new, 9 UDP
# v4 new, 10 UDP v6 bound to ::1, 11 the connection accepted from the harness's client.
(
    R_W32,
    R_WHDR,
    R_RING,
    R_TX_STREAM,
    R_TX_DGRAM,
    R_RX_READ,
    R_BELL,
    R_GUEST,
    R_PEER,
    R_PEER_DGRAM,
    R_CALL,
    R_POLICY,
    R_TICK,
    R_SLEEP,
    R_CONNECT_IN,
) = range(15)
W_TX_HEAD, W_TX_TAIL, W_RX_HEAD, W_RX_TAIL, W_RX_EOF = 0, 1, 2, 3, 4  # slot_words[] indices
W_READY_SENT, W_RX_ACK, W_KICK = 9, 10, 11


def r_tick(n: int = 1) -> bytes:
    return u8(R_TICK, n - 1)


def r_send(slot: int, n: int, honest: bool = True) -> bytes:
    return u8(R_TX_STREAM, slot) + u16(n) + u8(0 if honest else 1)


def r_read(slot: int, n: int = 0xFFFF, flags: int = 0) -> bytes:
    return u8(R_RX_READ, slot) + u16(n) + u8(flags)


def r_dgram(slot: int, length: int, dst: int, flags: int = 0, space: int | None = None) -> bytes:
    b = u8(R_TX_DGRAM, slot) + u16(length) + u8(dst, flags)
    return b + (u16(space) if flags & 1 and space is not None else b"")


def r_peer(peer: int, what: int, n: int = 0) -> bytes:
    return u8(R_PEER, peer, what) + u16(n)


def r_guest(slot: int, what: int, *extra: int) -> bytes:
    return u8(R_GUEST, slot, what, *extra)


def r_w32(slot: int, word: int, mode: int, value: bytes) -> bytes:
    return u8(R_W32, slot, word, mode) + value


REGION = {
    "stream-both-ways": r_peer(0, 0, 3000)
    + r_tick(2)
    + r_read(0, 1000)
    + r_read(0)
    + r_send(0, 2000)
    + r_tick(2)
    + r_peer(1, 0, 500)
    + r_send(1, 4096)
    + r_tick(3)
    + r_read(1),
    "stream-fin-and-close": r_peer(0, 0, 100)
    + r_peer(0, 2)
    + r_tick(2)
    + r_read(0)
    + r_send(0, 10)
    + r_tick()
    + r_guest(0, 3)
    + r_tick(2)
    + u8(R_SLEEP)
    + r_tick(),
    "stream-reset-zombie": r_peer(1, 3) + r_tick(2) + u8(R_SLEEP) + r_guest(1, 3) + u8(R_SLEEP) + r_tick(2),
    "stream-blocker": r_send(0, 4096)
    + r_guest(0, 0)
    + r_tick()
    + r_peer(0, 0, 10)
    + r_tick(2)
    + r_read(0)
    + r_tick(),
    "udp-out-and-in": r_dgram(3, 64, 0)
    + r_dgram(3, 0, 2)
    + r_tick()
    + u8(R_PEER_DGRAM, 0)
    + u16(32)
    + u8(R_PEER_DGRAM, 2)
    + u16(100)
    + r_tick(2)
    + r_read(3, 0, 2)
    + r_read(3, 0, 2)
    + r_dgram(4, 10, 0xF0)
    + r_tick(),
    "udp-lazy-bind": r_dgram(9, 100, 0)
    + r_dgram(9, 100, 3)
    + r_dgram(10, 20, 3)
    + r_tick(2)
    + u8(R_PEER_DGRAM, 3)
    + u16(50)
    + r_tick()
    + r_read(10, 0, 2),
    "shm-pair": r_send(6, 1000)
    + r_tick(2)
    + r_read(7, 500)
    + r_send(7, 4096)
    + r_tick(2)
    + r_read(6)
    + r_guest(6, 3)
    + r_tick(2)
    + r_read(7)
    + r_tick(),
    "listener-accept": r_tick()
    + r_guest(2, 4)
    + u8(R_CONNECT_IN, 0)
    + u8(R_CONNECT_IN, 1)
    + r_tick(2)
    + r_guest(2, 4)
    + r_send(11, 100)
    + r_tick(),
    "loopback-stream": r_send(5, 300) + r_peer(3, 0, 300) + r_tick(2) + r_read(5) + r_tick(),
    "bad-tx-head": r_w32(0, W_TX_HEAD, 2, u8(9)) + u8(R_BELL, 0) + r_tick() + r_read(0) + r_tick(),
    "bad-rx-tail": r_peer(0, 0, 100)
    + r_tick()
    + r_w32(0, W_RX_TAIL, 1, u16(0x8000))
    + u8(R_BELL, 0)
    + r_peer(0, 0, 100)
    + r_tick(2),
    "bad-dgram-record": r_dgram(3, 100, 0, 1, 8) + r_tick() + r_dgram(4, 70000, 0xF0, 4) + r_tick(),
    "dgram-misaligned": r_dgram(3, 30, 0, 2) + r_tick(),
    "doorbell-garbage": u8(R_WHDR, 16)
    + u64(-1)
    + u8(R_WHDR, 24)
    + u64(-1)
    + u8(R_WHDR, 25)
    + u64(-1)
    + r_tick()
    + u8(R_SLEEP),
    "ready-counters": r_peer(0, 0, 10)
    + r_tick()
    + r_w32(0, W_RX_ACK, 0, u32(12345))
    + r_w32(0, W_READY_SENT, 2, u8(14))
    + r_peer(0, 0, 10)
    + r_tick(2)
    + r_read(0, 0xFFFF, 4),
    "rate-limited": u8(R_POLICY, 0, 1)
    + u8(R_POLICY, 1, 1)
    + r_send(0, 4000)
    + r_peer(0, 0, 4000)
    + r_tick(4)
    + u8(R_SLEEP)
    + r_tick(2),
    "link-shared": u8(R_POLICY, 2, 2) + u8(R_POLICY, 5, 3) + r_send(0, 4000) + r_send(1, 4000) + r_tick(4),
    "limits-and-trim": u8(R_POLICY, 3, 1)
    + u8(R_POLICY, 4, 1)
    + u8(R_RING, 0x85, 0)
    + u16(0)
    + u8(8)
    + b"scribble"
    + u8(R_SLEEP)
    + u8(R_CONNECT_IN, 0)
    + r_tick(2),
    "calls": u8(R_CALL, 0, 0, 1)
    + u8(R_CALL, 8, 1, 0x81)
    + u8(R_CALL, 9, 2, 0x40)
    + u8(R_CALL, 8, 3, 5)
    + u8(R_CALL, 1, 4, 0)
    + r_tick(2)
    + r_guest(1, 3)
    + r_tick(),
    "guest-fds-and-garbage": r_guest(0, 2, 1)
    + r_guest(1, 1, 17)
    + r_guest(2, 2, 0)
    + r_tick(2)
    + r_guest(5, 5, 1)
    + r_tick(),
    "sleep-wakeup": u8(R_SLEEP) + u8(R_WHDR, 8) + u64(1) + r_send(0, 10) + r_tick(),
}


# ---- fuzz_control.c ----
C_REQ, C_TICK, C_RECONNECT, C_CLOSE_GUEST, C_HANGUP = range(5)
OPS = {
    "register": 0,
    "socket": 1,
    "bind": 2,
    "listen": 3,
    "connect": 4,
    "shutdown": 5,
    "setsockopt": 6,
    "getsockopt": 7,
    "linger_close": 8,
    "renew": 9,
    "attach": 10,
}
DOMAIN = {"inet": 0, "inet6": 1, "unix": 2}
TYPE = {"stream": 0, "dgram": 1, "raw": 2}
OPT = {
    "reuseaddr": 0,
    "sndbuf": 2,
    "linger": 4,
    "mark": 5,
    "bindtodevice": 7,
    "error": 10,
    "nodelay": 15,
    "congestion": 17,
    "zerocopy_receive": 21,
    "tcp_info": 22,
    "ip_tos": 24,
    "v6only": 30,
    "udp_segment": 34,
    "bogus": 38,
}
FD_NONE, FD_SEVERAL, FD_MANY = 0x10, 0x20, 0x30  # else a kind of make_fd (0: a proxy end)
ADDR = {"nsm4": 0, "nsm6": 1, "lo4": 2, "lo6": 3, "tenant4": 4, "tenant6": 5, "any4": 6, "any6": 7}


def c_req(
    op: str,
    target: int | None = 0,
    args: bytes = b"\x00",
    optlen: int = 0,
    optval: int = 0,
    addr: int = 0,
    fds: int = 0,
    shape: int = 0,
    extra_fds: bytes = b"",
    raw_optval: bytes = b"",
    slot_gen: bytes = b"",
) -> bytes:
    """target: k (< 0xc0) picks the k-th socket made so far (+0x40: its gen + 1), >= 0xc0 means
    slot_gen follows (slot u8 or, target odd, u32; then gen u32); None: slot 0 gen 0."""
    b = u8(C_REQ, OPS[op])
    b += u8(0xC0) + u8(0) + u32(0) if target is None else u8(target) + slot_gen
    b += args + u8(optlen)
    b += u8(0x80 | len(raw_optval)) + raw_optval if raw_optval else u8(optval)
    return b + u8(addr, 0, fds) + extra_fds + u8(shape)


def c_socket(domain: str, typ: str, fds: int = 0, extra_fds: bytes = b"") -> bytes:
    return c_req("socket", None, u8(DOMAIN[domain], TYPE[typ], 0), fds=fds, extra_fds=extra_fds)


def c_tick(n: int = 1) -> bytes:
    return u8(C_TICK, n - 1)


CONTROL = {
    "register": c_req("register", None, fds=FD_NONE) + c_tick(),
    "tcp-listener": c_req("register", None, fds=FD_NONE)
    + c_socket("inet", "stream")
    + c_tick()
    + c_req("bind", 0, addr=ADDR["any4"], fds=FD_NONE)
    + c_req("listen", 0, u8(6))
    + c_req("getsockopt", 0, u8(OPT["reuseaddr"]), optlen=0)
    + c_req("setsockopt", 0, u8(OPT["nodelay"]))
    + c_tick(2),
    "tcp-connect": c_socket("inet6", "stream")
    + c_tick()
    + c_req("connect", 0, addr=ADDR["nsm6"] | 0x10)
    + c_tick(2)
    + c_req("shutdown", 0, u8(2))
    + c_req("getsockopt", 0, u8(OPT["error"]))
    + c_tick(),
    "udp": c_socket("inet", "dgram")
    + c_tick()
    + c_req("bind", 0, addr=ADDR["lo4"])
    + c_req("connect", 0, addr=ADDR["lo4"] | 0x20)
    + c_req("connect", 0, addr=0x80 | 0x40)
    + c_tick(),
    "sockopts": c_socket("inet6", "stream")
    + c_tick()
    + c_req("setsockopt", 0, u8(OPT["v6only"]), optlen=0, optval=1)
    + c_req("setsockopt", 0, u8(OPT["linger"]), optlen=3, optval=0)
    + c_req("getsockopt", 0, u8(OPT["linger"]), optlen=3)
    + c_req("setsockopt", 0, u8(OPT["bindtodevice"]), optlen=5, raw_optval=b"eth0\x00")
    + c_req("setsockopt", 0, u8(OPT["congestion"]), optlen=5, raw_optval=b"reno\x00")
    + c_req("setsockopt", 0, u8(OPT["mark"]), optval=1)
    + c_req("getsockopt", 0, u8(OPT["zerocopy_receive"]))
    + c_req("getsockopt", 0, u8(OPT["tcp_info"]), optlen=9)
    + c_req("setsockopt", 0, u8(OPT["bogus"]))
    + c_req("bind", 0, addr=ADDR["tenant6"])
    + c_req("listen", 0, u8(1))
    + c_tick(2),
    # A connection on the tenant's loopback (listener on lo4:7000), attached to a TCP
    # connection the harness made (make_fd kind 15: bytes and a FIN waiting), then again.
    "attach": c_socket("inet", "stream")
    + c_tick()
    + c_req("bind", 0, addr=ADDR["lo4"] | 0x10)
    + c_req("listen", 0, u8(4))
    + c_socket("inet", "stream")
    + c_tick()
    + c_req("connect", 1, addr=ADDR["lo4"] | 0x10)
    + c_tick(2)
    + c_req("attach", 1, fds=15)
    + c_tick(2)
    + c_req("attach", 1, fds=15)
    + c_req("attach", 0, fds=2)
    + c_req("renew", 1, fds=0)
    + c_tick(4),
    "bad-targets": c_socket("inet", "stream")
    + c_tick()
    + c_req("bind", 0x40)
    + c_req("listen", 0xC1, u8(0), slot_gen=u32(70000) + u32(1))
    + c_req("connect", 0xC0, slot_gen=u8(5) + u32(0))
    + c_tick(),
    "bad-sockets": c_socket("unix", "stream")
    + c_socket("inet", "raw")
    + c_socket("inet", "stream", 2)
    + c_socket("inet", "stream", 3)
    + c_socket("inet", "stream", 6)
    + c_socket("inet", "stream", FD_NONE)
    + c_tick(2),
    "passed-fd-kinds": b"".join(c_socket("inet", "dgram", k) for k in range(1, 16)) + c_tick(3),
    "several-fds": c_socket("inet", "stream", FD_SEVERAL, u8(5, 0, 1, 2, 3, 4, 5, 6)) + c_tick(),
    "max-fds": c_socket("inet", "stream", FD_MANY, u8(1))
    + c_req("register", None, fds=FD_MANY, extra_fds=u8(0, 40))
    + c_tick(),
    "wrong-sizes": c_socket("inet", "stream")
    + c_tick()
    + c_req("bind", 0, shape=13)
    + u8(10)
    + c_tick()
    + u8(C_RECONNECT)
    + c_req("register", None, shape=14)
    + u8(1)
    + c_tick()
    + u8(C_RECONNECT)
    + c_req("register", None, shape=15)
    + c_tick(),
    "close-and-reconnect": c_socket("inet", "stream")
    + c_socket("inet6", "dgram")
    + c_tick()
    + u8(C_CLOSE_GUEST, 0)
    + c_tick()
    + u8(C_RECONNECT)
    + c_req("shutdown", 1, u8(1))
    + c_tick()
    + u8(C_HANGUP, 1)
    + c_tick(),
    "self-as-proxy": c_socket("inet", "stream", 8)
    + c_tick()
    + c_socket("inet", "stream")
    + c_tick()
    + c_socket("inet", "stream", 9)
    + c_tick(2),
    "credentials-cmsg": c_req("socket", None, u8(0, 0, 0), shape=0x10) + c_tick(),
}


# ---- fuzz_servicelib.c ----
# Socket ids in the order the harness makes them (a selector below 0xe0 picks the k-th):
# 0 TCP v4 connecting, 1 TCP v4 connected, 2 TCP v6 connected, 3 the listener, 4 UDP v4
# bound, 5 UDP v6 connected. Slots: the same, then 6 TCP new, 7 UDP new.
(S_EVENT, S_ACCEPT, S_DGRAM, S_ANSWER, S_INDEX, S_REPLY, S_TICK, S_BELL, S_TENANT, S_CALL, S_HANGUP) = range(
    11
)
EV = {
    "connected": 0,
    "accepted": 1,
    "sent": 2,
    "recvd": 3,
    "fin": 4,
    "error": 5,
    "freed": 6,
    "dgram": 7,
    "done": 8,
    "zero": 9,
    "send": 10,
    "bogus": 11,
}
ARG = {"0": 0, "econnreset": 1, "econnrefused": 2, "etimedout": 3, "-1": 4, "4096": 6}
LEN = {"credit": 0, "credit+1": 1, "half": 3}


def s_event(op: str, sock: int, arg: str | int = "0", length: str | int = "credit", addr: int = 0) -> bytes:
    a = ARG[arg] if isinstance(arg, str) else arg
    ln = u8(LEN[length]) if isinstance(length, str) else u8(4) + u32(length)
    return u8(S_EVENT, EV[op], sock, a) + ln + u8(0, addr, 0)


def s_tick(n: int = 1) -> bytes:
    return u8(S_TICK, n - 1)


def s_tenant(slot: int, what: int, n: int) -> bytes:
    return u8(S_TENANT, slot, what) + u16(n)


def s_answer(n: int = 16, how: int = 0) -> bytes:
    return u8(S_ANSWER, n - 1, how)


SERVICELIB = {
    "stream-data": s_tenant(1, 0, 1000)
    + s_tick()
    + s_answer()
    + s_tick()
    + s_event("recvd", 1)
    + s_tick()
    + s_tenant(1, 1, 500)
    + s_tick()
    + s_answer(16, 1)
    + s_tick(2)
    + s_tenant(1, 1, 0xFFFF)
    + s_tick(),
    "connect-outcomes": s_event("connected", 0)
    + s_tick()
    + s_event("error", 2, "econnreset")
    + s_tick()
    + s_event("error", 1, "-1")
    + s_tick(),
    "accept": s_event("accepted", 0xE4, 0xC3)
    + u8(S_ACCEPT, 3, 0, 0)
    + u8(S_ACCEPT, 3, 0, 0)
    + s_tick(2)
    + s_tenant(6, 0, 100)
    + s_tick()
    + s_answer()
    + s_tick(),
    "accept-bad": u8(S_ACCEPT, 1, 0, 0)
    + s_tick()
    + u8(S_ACCEPT, 3, 0xC0, 1, 0)
    + s_tick()
    + u8(S_ACCEPT, 3, 0, 2)
    + s_tick(),
    "dgram-in": u8(S_DGRAM, 4)
    + u16(100)
    + u8(0, 0)
    + s_tick()
    + u8(S_DGRAM, 5)
    + u16(10)
    + u8(0, 1)
    + u8(S_DGRAM, 4)
    + u16(10)
    + u8(2, 0)
    + s_tick(),
    "dgram-bad": u8(S_DGRAM, 4)
    + u16(100)
    + u8(1, 0)
    + s_tick()
    + u8(S_DGRAM, 0)
    + u16(5000)
    + u8(8, 0)
    + s_tick(),
    "dgram-out": s_tenant(4, 3, 100) + s_tenant(5, 7, 50) + s_tick(2) + s_answer() + s_tick(),
    "fin-then-close": s_event("fin", 2)
    + s_tick()
    + s_tenant(2, 1, 0xFFFF)
    + u8(S_CALL, 2, 2)
    + s_tick(2)
    + s_answer()
    + s_tick(2),
    "sent-too-much": s_tenant(1, 0, 100) + s_tick() + s_event("sent", 1, length="credit+1") + s_tick(),
    "recvd-too-much": s_event("recvd", 1, length=1 << 20) + s_tick(),
    "freed-unknown": s_event("freed", 3) + s_tick(),
    "bad-ids": s_event("connected", 0xE0) + s_event("sent", 0xE3) + s_tick(),
    "bad-opcode": s_event("bogus", 1) + s_tick() + s_event("zero", 0) + s_tick(),
    "queue-index-garbage": u8(S_INDEX, 0, 0) + u16(5000) + s_tick() + u8(S_INDEX, 4, 1) + s_tick(),
    "garbage-element": u8(S_INDEX, 0, 0x82) + bytes(range(64)) + s_tick(),
    "replies": u8(S_REPLY, 0x04)
    + u32(12345)
    + u8(S_REPLY, 0x30)
    + u32(0x80000000)
    + u16(99)
    + u8(S_CALL, 0, 5)
    + u8(S_CALL, 0, 5 | 16)
    + s_tick(2),
    "calls": u8(S_CALL, 1, 0)
    + u8(S_CALL, 1, 1 | 0x80)
    + u8(S_CALL, 6, 3)
    + u8(S_CALL, 6, 4)
    + s_tick()
    + s_answer()
    + s_tick(),
    "tx-head-back": s_tenant(1, 0, 100) + s_tick() + s_tenant(1, 2, 5) + s_tick(),
    "bell-and-sleep": s_event("fin", 1)
    + u8(S_BELL)
    + s_tick()
    + u8(S_INDEX, 7, 3)
    + u32(1)
    + u8(S_BELL)
    + s_tick(),
    "hangup-mid": s_tenant(1, 0, 100) + s_tick() + u8(S_HANGUP, 0) + s_tick() + s_event("sent", 1) + s_tick(),
    "tenant-first": u8(S_CALL, 1, 2) + s_tick() + u8(S_HANGUP, 1),
}


def write(name: str, seeds: dict[str, bytes]) -> None:
    d = CORPUS / name
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("seed-*"):
        old.unlink()
    for seed, data in seeds.items():
        (d / f"seed-{seed}").write_bytes(data)


def main() -> None:
    write("fuzz_region", REGION)
    write("fuzz_control", CONTROL)
    write("fuzz_servicelib", SERVICELIB)


if __name__ == "__main__":
    main()
