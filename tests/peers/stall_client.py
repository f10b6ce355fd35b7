#!/usr/bin/python3
"""Stalling TCP client, for use against an echo server behind the proxy.

Sends b"Z", goes silent for --first-byte-delay seconds, sends b"ZZtail-of-stalled-client\\n",
shuts down its write side, reads until EOF and prints what came back (decoded, stripped).
Checks that bytes still arrive intact and in order after the proxy's detection timeout.

  --host H --port P --first-byte-delay S [--timeout T]
"""
import argparse
import socket
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first-byte-delay", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="connect timeout, and deadline for the reply")
    args = parser.parse_args()
    try:
        with socket.create_connection((args.host, args.port), timeout=args.timeout) as s:
            s.sendall(b"Z")
            time.sleep(args.first_byte_delay)
            s.sendall(b"ZZtail-of-stalled-client\n")
            s.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + args.timeout
            received = bytearray()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no EOF within {args.timeout} s (got {bytes(received)!r})")
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
    except OSError as error:
        sys.exit(f"stall_client: FAILED: {type(error).__name__}: {error}")
    print(received.decode(errors="replace").strip(), flush=True)


if __name__ == "__main__":
    main()
