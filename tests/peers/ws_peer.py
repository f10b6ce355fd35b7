"""WebSocket test peer (python3-websockets, asyncio API).

  server --bind ADDR --port N      echoes every message
  client --url ws://HOST:PORT/ --count K
                                   K text and K ~100 KB binary messages, each echo checked
"""
import argparse
import asyncio

import websockets

TIMEOUT = 20


async def echo(websocket, path=None):
    async for message in websocket:
        await websocket.send(message)


async def serve(args):
    # No permessage-deflate: the test counts the bytes that cross the proxy.
    async with websockets.serve(echo, args.bind, args.port, max_size=None, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"READY {port}", flush=True)
        await asyncio.Future()


def blob(i):
    return bytes((i + j * 7) % 256 for j in range(100_000))


async def client(args):
    async with websockets.connect(args.url, max_size=None, open_timeout=TIMEOUT, compression=None) as ws:
        for i in range(args.count):
            for message in (f"text-{i}", blob(i)):
                await ws.send(message)
                reply = await asyncio.wait_for(ws.recv(), TIMEOUT)
                assert reply == message, f"message {i} came back different"
    print(f"ws ok count={args.count}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--bind", default="127.0.0.1")
    server.add_argument("--port", type=int, default=0)
    cli = sub.add_parser("client")
    cli.add_argument("--url", required=True)
    cli.add_argument("--count", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(serve(args) if args.role == "server" else client(args))


if __name__ == "__main__":
    main()
