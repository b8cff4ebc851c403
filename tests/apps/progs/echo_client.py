"""asyncio TCP echo client: echo_client.py HOST PORT [CONNS] [MESSAGES] [SEED].

Opens CONNS connections concurrently; on each, a writer task sends MESSAGES messages of
pseudo-random sizes (1 byte .. 64 KiB) while a reader task reads the echo and compares it
with what was sent; then the client half-closes and expects EOF. Prints "SENT <sha256> <bytes>"
and "RECV <sha256> <bytes>" per connection and "OK" at the end; exits 1 on any mismatch."""

import asyncio
import hashlib
import random
import sys


async def one(host: str, port: int, idx: int, messages: int, seed: int) -> bool:
    rng = random.Random(seed * 1000 + idx)
    msgs = []
    for _ in range(messages):
        size = rng.choice([1, 7, 100, 1400, 1500, 4096, 9000, 65536, rng.randint(1, 65536)])
        msgs.append(rng.randbytes(size))
    expected = b"".join(msgs)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 20)

    async def write_all() -> str:
        h = hashlib.sha256()
        for m in msgs:
            writer.write(m)
            h.update(m)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        return h.hexdigest()

    async def read_all() -> tuple[str, int, int]:
        h = hashlib.sha256()
        got = 0
        first_bad = -1
        while True:
            data = await asyncio.wait_for(reader.read(65536), 60)
            if not data:
                break
            if first_bad < 0 and data != expected[got : got + len(data)]:
                first_bad = got + next(
                    i for i in range(len(data)) if got + i >= len(expected) or data[i] != expected[got + i]
                )
            h.update(data)
            got += len(data)
        return h.hexdigest(), got, first_bad

    sent_hex, (recv_hex, nrecv, first_bad) = await asyncio.gather(write_all(), read_all())
    writer.close()
    print(f"SENT {sent_hex} {len(expected)}", flush=True)
    print(f"RECV {recv_hex} {nrecv}", flush=True)
    if first_bad >= 0:
        print(f"conn {idx}: first differing byte at offset {first_bad}", flush=True)
    return first_bad < 0 and nrecv == len(expected) and sent_hex == recv_hex


async def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    conns = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    messages = int(sys.argv[4]) if len(sys.argv) > 4 else 500
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    results = await asyncio.gather(*(one(host, port, i, messages, seed) for i in range(conns)))
    if all(results):
        print("OK", flush=True)
        return 0
    print(f"MISMATCH {results}", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
