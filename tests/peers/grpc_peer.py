"""gRPC test peer (python3-grpcio), plaintext h2c, raw-bytes messages (no generated code).

  server --bind ADDR --port N      service mesh.Echo: Unary (reverses), Fail (PERMISSION_DENIED),
                                   Chat (bidi stream: "echo:" + each message)
  client --target HOST:PORT unary|fail|chat|many [--count K]
                                   many: K concurrent unary calls on one channel (one connection)
"""
import argparse
import sys
import time
from concurrent import futures

import grpc

SERVICE = "mesh.Echo"
DEADLINE = 20


def unary(request, context):
    return request[::-1]


def fail(request, context):
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied")


def chat(requests, context):
    for message in requests:
        yield b"echo:" + message


def serve(args):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(f"{args.bind}:{args.port}")
    server.start()
    print(f"READY {port}", flush=True)
    while True:
        time.sleep(3600)


def call(args):
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(args.target, options=options) as channel:
        method = lambda kind, name: getattr(channel, kind)(f"/{SERVICE}/{name}")
        if args.call == "unary":
            reply = method("unary_unary", "Unary")(b"hello-mesh", timeout=DEADLINE)
            assert reply == b"hsem-olleh", reply
            print("unary ok")
        elif args.call == "fail":
            try:
                method("unary_unary", "Fail")(b"x", timeout=DEADLINE)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.PERMISSION_DENIED:
                    sys.exit(f"fail: unexpected status {error.code()}")
                print(f"fail ok code={error.code().value[0]}")
                return
            sys.exit("fail: the call succeeded")
        elif args.call == "many":
            unary_call = method("unary_unary", "Unary")
            calls = [unary_call.future(f"call-{i}".encode(), timeout=DEADLINE) for i in range(args.count)]
            for i, call_future in enumerate(calls):
                assert call_future.result() == f"call-{i}".encode()[::-1]
            print(f"many ok count={args.count}")
        else:
            messages = [f"msg-{i}".encode() for i in range(args.count)]
            replies = list(method("stream_stream", "Chat")(iter(messages), timeout=DEADLINE))
            assert replies == [b"echo:" + m for m in messages], replies[:3]
            print(f"chat ok count={args.count}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--bind", default="127.0.0.1")
    server.add_argument("--port", type=int, default=0)
    client = sub.add_parser("client")
    client.add_argument("--target", required=True)
    client.add_argument("call", choices=["unary", "fail", "chat", "many"])
    client.add_argument("--count", type=int, default=50)
    args = parser.parse_args()
    serve(args) if args.role == "server" else call(args)


if __name__ == "__main__":
    main()
