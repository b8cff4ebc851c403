"""asyncio TCP echo server: echo_server.py HOST PORT. Prints "READY <port>" once listening;
serves until SIGTERM/SIGINT, then prints "STATS connections=N bytes=M" and exits 0."""

import asyncio
import signal
import sys

stats = {"connections": 0, "bytes": 0}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    stats["connections"] += 1
    try:
        while data := await reader.read(65536):
            stats["bytes"] += len(data)
            writer.write(data)
            await writer.drain()
        writer.write_eof() if writer.can_write_eof() else None
        await writer.drain()
    except ConnectionError as e:
        print(f"connection error: {e!r}", file=sys.stderr, flush=True)
    finally:
        writer.close()


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ports = sorted({s.getsockname()[1] for s in server.sockets})
    print(f"READY {ports[0]}", flush=True)
    async with server:
        await stop.wait()
    print(f"STATS connections={stats['connections']} bytes={stats['bytes']}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
