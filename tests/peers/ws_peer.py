#!/usr/bin/python3
"""WebSocket test peer (Debian python3-websockets 10.x, asyncio API).

Run with Debian's /usr/bin/python3.

  server --bind ADDR [--port N]    echoes every message; prints "READY <port>", runs until killed
  client --url ws://HOST:PORT/ [--count K]
      sends K text and K binary (~100 KB, deterministic pattern) messages, checks each echo,
      prints "ws ok count=K"; exits non-zero with a message on stderr on any mismatch or error
"""
import argparse
import asyncio
import sys

import websockets

TIMEOUT = 20  # seconds, per send/receive/handshake
MAX_SIZE = 16 * 1024 * 1024
PATTERN = bytes(range(256)) * 400  # 102,400 bytes


async def echo(websocket, path=None):
    try:
        async for message in websocket:
            await websocket.send(message)
    except websockets.ConnectionClosed:
        pass


async def serve(args):
    # No permessage-deflate, so the bytes on the wire are the bytes sent.
    async with websockets.serve(echo, args.bind, args.port, max_size=MAX_SIZE, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"READY {port}", flush=True)
        await asyncio.Future()  # forever


def blob(i):
    start = i % 256
    return PATTERN[start:start + 100_000]


async def client(args):
    async with websockets.connect(args.url, max_size=MAX_SIZE, compression=None,
                                  open_timeout=TIMEOUT, close_timeout=5) as ws:
        for i in range(args.count):
            for kind, message in (("text", f"text-{i}"), ("binary", blob(i))):
                await asyncio.wait_for(ws.send(message), TIMEOUT)
                reply = await asyncio.wait_for(ws.recv(), TIMEOUT)
                if reply != message:
                    raise AssertionError(f"{kind} message {i} came back different "
                                         f"({type(reply).__name__}, {len(reply)} long)")
    print(f"ws ok count={args.count}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--bind", default="127.0.0.1")
    server.add_argument("--port", type=int, default=0)
    cli = sub.add_parser("client")
    cli.add_argument("--url", required=True)
    cli.add_argument("--count", type=int, default=10)
    args = parser.parse_args()
    if args.role == "server" and args.bind in ("", "0.0.0.0", "::", "[::]"):
        parser.error("refusing to bind a wildcard address; give a loopback address")
    try:
        asyncio.run(serve(args) if args.role == "server" else client(args))
    except asyncio.TimeoutError:
        sys.exit(f"ws_peer: FAILED: timed out (limit {TIMEOUT} s per handshake, send or receive)")
    except Exception as error:
        sys.exit(f"ws_peer: FAILED: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
