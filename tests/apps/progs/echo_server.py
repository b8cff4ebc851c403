"""asyncio TCP echo server: echo_server.py HOST PORT. Prints "READY <port>" once listening;
serves until SIGTERM/SIGINT, then prints "STATS connections=N bytes=M" and exits 0.

Three requests, each the first bytes of a connection, let a client see how its connections
end on this side: "TAG name\n" (echoed) names the connection; "ASK name\n" is answered with
how the one so named ended ("eof", "reset", or "open") and a close; "RESET\n" is answered
with a reset (SO_LINGER 0)."""

import asyncio
import signal
import socket
import struct
import sys

stats = {"connections": 0, "bytes": 0}
ended: dict[bytes, str] = {}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    stats["connections"] += 1
    tag = None
    first = True
    try:
        while data := await reader.read(65536):
            if first and data.startswith(b"ASK "):
                writer.write(ended.get(data[4:].strip(), "open").encode())
                break
            if first and data == b"RESET\n":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if first and data.startswith(b"TAG "):
                tag = data[4:].strip()
                ended[tag] = "open"
            first = False
            stats["bytes"] += len(data)
            writer.write(data)
            await writer.drain()
        writer.write_eof() if writer.can_write_eof() else None
        await writer.drain()
        if tag:
            ended[tag] = "eof"
    except ConnectionError as e:
        if tag:
            ended[tag] = "reset" if isinstance(e, ConnectionResetError) else repr(e)
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
