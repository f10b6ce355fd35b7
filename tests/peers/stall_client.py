"""A client that sends one byte, goes silent, then sends the rest; prints what comes back.

  --host H --port P --first-byte-delay S
"""
import argparse
import socket
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first-byte-delay", type=float, default=2.0)
    args = parser.parse_args()
    with socket.create_connection((args.host, args.port), timeout=30) as s:
        s.sendall(b"Z")
        time.sleep(args.first_byte_delay)
        s.sendall(b"ZZtail-of-stalled-client\n")
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    print(received.decode().strip())


if __name__ == "__main__":
    main()
