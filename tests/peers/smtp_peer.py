"""SMTP test peer: a server that speaks first (220 greeting), and a client that completes a
mail transaction.

  server --bind ADDR --port N
  client --host HOST --port N
"""
import argparse
import smtplib
import socket
import time

from aiosmtpd.controller import Controller


class Sink:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


def serve(args):
    if args.port == 0:
        probe = socket.socket()
        probe.bind((args.bind, 0))
        args.port = probe.getsockname()[1]
        probe.close()
    controller = Controller(Sink(), hostname=args.bind, port=args.port, ready_timeout=20)
    controller.start()
    print(f"READY {args.port}", flush=True)
    while True:
        time.sleep(3600)


def client(args):
    with smtplib.SMTP(timeout=20) as smtp:
        code, greeting = smtp.connect(args.host, args.port)
        assert code == 220, (code, greeting)
        smtp.ehlo("client.mesh.test")
        smtp.sendmail("a@mesh.test", ["b@mesh.test"], "Subject: hi\r\n\r\nthrough the mesh\r\n")
    print(f"smtp ok greeting={greeting.decode()[:20]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--bind", default="127.0.0.1")
    server.add_argument("--port", type=int, default=0)
    cli = sub.add_parser("client")
    cli.add_argument("--host", required=True)
    cli.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    main()
