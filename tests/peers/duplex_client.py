"""Full-duplex echo client, non-blocking and edge-triggered (epoll EPOLLET), the way event-loop
servers and proxies drive their sockets.

    duplex_client.py ADDR CONNS ROUNDS BULK [send-only]

CONNS connections to an echo server at ADDR, all at once: each makes ROUNDS round trips of
100 bytes, then sends BULK bytes of a pattern while reading the echo, half-closes, and reads to
EOF. Every byte is checked against the pattern. Prints "ok connections=N bytes=B" or exits 1.
`send-only` (ROUNDS 0): the server is the tests' PatternServer with nothing to reply: the
client pattern goes out, and only the end of stream comes back.
"""

import resource
import select
import socket
import sys
import time

LIMIT_SECONDS = 120
CHUNK = 64 * 1024
# The tests' pattern streams (tests/src/pattern.rs): byte i is (i mod 251) xor seed.
ECHO_SEED, CLIENT_SEED = 3, 1
SEED = ECHO_SEED


def chunk_at(offset, size):
    start = offset % 251
    return PATTERNS[SEED][start:start + size]


PATTERNS = {seed: bytes((i % 251) ^ seed for i in range(251)) * 1024 for seed in (1, 3)}


class Conn:
    def __init__(self, addr, rounds, bulk):
        host, port = addr.rsplit(":", 1)
        family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.connect((host.strip("[]"), int(port)))
        self.sock.setblocking(False)
        self.rounds, self.bulk = rounds, bulk
        self.total = rounds * 100 + bulk
        self.sent = self.received = 0
        self.round_done = 0
        self.closed_write = False
        self.eof = False

    def send_limit(self):
        """How far the stream may be sent now: one round trip at a time, then all of it."""
        if self.round_done < self.rounds:
            return (self.round_done + 1) * 100
        return self.total

    def on_writable(self):
        while self.sent < self.send_limit():
            size = min(CHUNK, self.send_limit() - self.sent)
            try:
                n = self.sock.send(chunk_at(self.sent, size))
            except BlockingIOError:
                return
            self.sent += n
        if self.sent == self.total and not self.closed_write:
            self.sock.shutdown(socket.SHUT_WR)
            self.closed_write = True

    def on_readable(self):
        while True:
            try:
                data = self.sock.recv(CHUNK)
            except BlockingIOError:
                return
            if not data:
                self.eof = True
                return
            if data != chunk_at(self.received, len(data)):
                raise SystemExit(f"corrupt echo at {self.received}")
            self.received += len(data)
            if self.round_done < self.rounds and self.received == (self.round_done + 1) * 100:
                self.round_done += 1
            self.on_writable()


def main():
    global SEED
    # One socket per connection: a thousand of them need more than the usual 1,024 files.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    addr, conns, rounds, bulk = sys.argv[1], *map(int, sys.argv[2:5])
    send_only = sys.argv[5:] == ["send-only"]
    if send_only:
        SEED = CLIENT_SEED
    poll = select.epoll()
    by_fd = {}
    for _ in range(conns):
        conn = Conn(addr, rounds, bulk)
        by_fd[conn.sock.fileno()] = conn
        poll.register(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
    deadline = time.monotonic() + LIMIT_SECONDS
    for conn in by_fd.values():
        conn.on_writable()
    def finished(conn):
        return conn.eof and conn.closed_write

    while not all(finished(conn) for conn in by_fd.values()):
        if time.monotonic() > deadline:
            stuck = [(c.sent, c.received) for c in by_fd.values() if not finished(c)][:3]
            raise SystemExit(f"stalled: (sent, received) of the first unfinished: {stuck}")
        for fd, events in poll.poll(1.0):
            conn = by_fd[fd]
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                conn.on_readable()
            if events & select.EPOLLOUT:
                conn.on_writable()
    for conn in by_fd.values():
        if conn.sent != conn.total:
            raise SystemExit(f"sent {conn.sent} of {conn.total}")
        if conn.received != (0 if send_only else conn.total):
            raise SystemExit(f"received {conn.received} of {conn.total}")
        conn.sock.close()
    print(f"ok connections={conns} bytes={conns * (rounds * 100 + bulk)}")


main()
