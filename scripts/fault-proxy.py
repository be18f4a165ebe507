#!/usr/bin/env python3
"""A fault-injecting HTTP proxy for the tests: forwards every request to an object store on
127.0.0.1, and gives every EVERY-th request the next fault of FAULTS in turn:

    503       answers `503 Service Unavailable` without forwarding
    reset     closes the connection (RST) without an answer
    slow      forwards, then waits SLOW seconds before answering
    truncate  forwards, then sends the answer's head and half its body, and closes

    scripts/fault-proxy.py UPSTREAM_PORT EVERY FAULTS [SLOW]
    scripts/fault-proxy.py 3900 5 503,reset,slow,truncate 2

It prints the port it listens on (on 127.0.0.1), then serves until killed; at each fault it
prints `fault N KIND METHOD PATH` on stderr. One request per connection: the request's
`Connection` header is replaced by `close`, so requests are counted exactly. The Host header is
forwarded as sent, so signed requests (S3 SigV4, Azure SharedKey) stay valid.
"""

import asyncio
import socket
import struct
import sys

UPSTREAM, EVERY, FAULTS = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
SLOW = float(sys.argv[4]) if len(sys.argv) > 4 else 2.0
count = 0


def reset(writer):
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


def head_and_length(head):
    lines = head.split(b"\r\n")
    length = 0
    kept = [lines[0]]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        if name.strip().lower() in (b"connection", b"keep-alive"):
            continue
        kept.append(line)
    return kept, length


async def handle(reader, writer):
    global count
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        return
    lines, length = head_and_length(head[:-4])
    body = await reader.readexactly(length) if length else b""
    count += 1
    fault = FAULTS[(count // EVERY - 1) % len(FAULTS)] if count % EVERY == 0 else None
    if fault:
        print(f"fault {count} {fault} {lines[0].decode(errors='replace')}", file=sys.stderr, flush=True)
    if fault == "503":
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()
        return
    if fault == "reset":
        reset(writer)
        return
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", UPSTREAM)
    up_writer.write(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body)
    await up_writer.drain()
    answer = await up_reader.read()
    up_writer.close()
    if fault == "slow":
        await asyncio.sleep(SLOW)
    if fault == "truncate":
        split = answer.find(b"\r\n\r\n") + 4
        rest = answer[split:]
        if len(rest) > 1:
            writer.write(answer[:split] + rest[: len(rest) // 2])
            await writer.drain()
            reset(writer)
            return
    writer.write(answer)
    await writer.drain()
    writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
