#!/usr/bin/python3
"""gRPC test peer over plaintext HTTP/2 (h2c), raw-bytes messages, no generated code.

Run with Debian's /usr/bin/python3 (package python3-grpcio).

  server --bind ADDR [--port N]    service mesh.Echo; prints "READY <port>", runs until killed
      Unary  returns the request bytes reversed
      Fail   aborts with PERMISSION_DENIED (7), details "denied"
      Chat   bidi stream: answers each message with b"echo:" + message
      Hang   never answers (gives up after HANG seconds)
  client --target HOST:PORT unary|fail|chat|many|hang [--count K]
      unary  prints "unary ok"           fail  prints "fail ok code=7"
      chat   K messages on one bidi stream, prints "chat ok count=K"
      many   K concurrent unary calls on one channel (one connection), prints "many ok count=K"
      hang   calls Hang and expects UNAVAILABLE (the server is killed meanwhile), prints
             "hang ok code=14"
      Exits non-zero with a message on stderr on any mismatch or error.
"""
import argparse
import sys
import time
from concurrent import futures

import grpc

SERVICE = "mesh.Echo"
DEADLINE = 20  # seconds, per RPC
HANG = 3 * DEADLINE  # seconds Hang waits before it gives up


class Failure(Exception):
    pass


def unary(request, context):
    return request[::-1]


def fail(request, context):
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied")


def chat(requests, context):
    for message in requests:
        yield b"echo:" + message


def hang(request, context):
    time.sleep(HANG)
    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "never killed")


def serve(args):
    # Enough workers for concurrent calls and bidi streams (each holds a worker while open);
    # grpc.so_reuseport=0: a port already in use is an error, not silently shared.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=[("grpc.so_reuseport", 0)])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Hang": grpc.unary_unary_rpc_method_handler(hang),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(f"{args.bind}:{args.port}")  # raises if it cannot bind
    server.start()
    print(f"READY {port}", flush=True)
    while True:
        time.sleep(3600)


def expect_error(name, unary_call, code):
    """Calls `unary_call`, which must fail with `code`; prints "<name> ok code=N"."""
    try:
        reply = unary_call(b"x", timeout=DEADLINE)
    except grpc.RpcError as error:
        if error.code() != code:
            raise Failure(f"{name}: expected {code.name}, got {error.code()}: {error.details()}")
        print(f"{name} ok code={error.code().value[0]}")
        return
    raise Failure(f"{name}: the call succeeded with {reply!r}")


def call(args):
    options = [("grpc.enable_http_proxy", 0)]  # ignore http_proxy/https_proxy env vars
    with grpc.insecure_channel(args.target, options=options) as channel:
        method = lambda kind, name: getattr(channel, kind)(f"/{SERVICE}/{name}")
        if args.call == "unary":
            reply = method("unary_unary", "Unary")(b"hello-mesh", timeout=DEADLINE)
            if reply != b"hsem-olleh":
                raise Failure(f"unary: unexpected reply {reply!r}")
            print("unary ok")
        elif args.call == "fail":
            expect_error("fail", method("unary_unary", "Fail"), grpc.StatusCode.PERMISSION_DENIED)
        elif args.call == "hang":
            expect_error("hang", method("unary_unary", "Hang"), grpc.StatusCode.UNAVAILABLE)
        elif args.call == "many":
            unary_call = method("unary_unary", "Unary")
            calls = [unary_call.future(f"call-{i}".encode(), timeout=DEADLINE) for i in range(args.count)]
            for i, pending in enumerate(calls):
                reply = pending.result(timeout=DEADLINE + 5)
                if reply != f"call-{i}".encode()[::-1]:
                    raise Failure(f"many: call {i} got {reply!r}")
            print(f"many ok count={args.count}")
        else:
            messages = [f"msg-{i}".encode() for i in range(args.count)]
            replies = list(method("stream_stream", "Chat")(iter(messages), timeout=DEADLINE))
            expected = [b"echo:" + m for m in messages]
            if replies != expected:
                bad = next((i for i, (a, b) in enumerate(zip(replies, expected)) if a != b), None)
                raise Failure(f"chat: got {len(replies)} replies for {len(expected)} messages, "
                              f"first mismatch at index {bad}")
            print(f"chat ok count={args.count}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--bind", default="127.0.0.1")
    server.add_argument("--port", type=int, default=0)
    client = sub.add_parser("client")
    client.add_argument("--target", required=True)
    client.add_argument("call", choices=["unary", "fail", "chat", "many", "hang"])
    client.add_argument("--count", type=int, default=50)
    args = parser.parse_args()
    if args.role == "server" and args.bind in ("", "0.0.0.0", "::", "[::]"):
        parser.error("refusing to bind a wildcard address; give a loopback address")
    try:
        serve(args) if args.role == "server" else call(args)
    except Failure as error:
        sys.exit(f"grpc_peer: FAILED: {error}")
    except grpc.RpcError as error:
        sys.exit(f"grpc_peer: FAILED: {args.role} RPC error {error.code()}: {error.details()}")
    except Exception as error:
        sys.exit(f"grpc_peer: FAILED: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
