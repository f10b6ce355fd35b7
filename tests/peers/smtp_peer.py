#!/usr/bin/python3
"""SMTP test peer: a server-speaks-first protocol (220 greeting before the client says anything).

Run with Debian's /usr/bin/python3 (package python3-aiosmtpd).

  server --bind ADDR [--port N]    accepts and discards mail; prints "READY <port>", runs until killed
  client --host HOST --port N      EHLO, MAIL FROM, RCPT TO, DATA, QUIT with smtplib (20 s timeout);
                                   prints "smtp ok greeting=<first 20 chars of the greeting text>"
"""
import argparse
import asyncio
import smtplib
import sys

from aiosmtpd.smtp import SMTP

HOSTNAME = "mesh-smtp"  # fixed, so no DNS lookup (getfqdn) happens on either side
IDENT = "ESMTP ready"   # greeting text is "mesh-smtp ESMTP ready"


class Sink:
    async def handle_DATA(self, server, session, envelope):
        print(f"smtp_peer: got {len(envelope.content)} bytes from {envelope.mail_from}", file=sys.stderr)
        return "250 OK"


async def serve(args):
    # A plain asyncio server rather than aiosmtpd's Controller: it reports the real port for
    # --port 0 and makes no self-test connection at startup.
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Sink(), hostname=HOSTNAME, ident=IDENT, timeout=60, loop=loop), args.bind, args.port)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def expect(what, reply, code):
    if reply[0] != code:
        raise AssertionError(f"{what}: expected {code}, got {reply[0]} {reply[1]!r}")


def client(args):
    smtp = smtplib.SMTP(local_hostname="client.mesh.test", timeout=20)
    try:
        reply = smtp.connect(args.host, args.port)  # reads the 220 greeting
        expect("greeting", reply, 220)
        greeting = reply[1].decode(errors="replace")
        expect("EHLO", smtp.ehlo(), 250)
        expect("MAIL FROM", smtp.mail("alice@mesh.test"), 250)
        expect("RCPT TO", smtp.rcpt("bob@mesh.test"), 250)
        expect("DATA", smtp.data(b"Subject: hi\r\n\r\nthrough the mesh\r\n"), 250)
        expect("QUIT", smtp.quit(), 221)
    finally:
        smtp.close()
    print(f"smtp ok greeting={greeting[:20]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--bind", default="127.0.0.1")
    server.add_argument("--port", type=int, default=0)
    cli = sub.add_parser("client")
    cli.add_argument("--host", required=True)
    cli.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.role == "server" and args.bind in ("", "0.0.0.0", "::", "[::]"):
        parser.error("refusing to bind a wildcard address; give a loopback address")
    try:
        asyncio.run(serve(args)) if args.role == "server" else client(args)
    except Exception as error:
        sys.exit(f"smtp_peer: FAILED: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
