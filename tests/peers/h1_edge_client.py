"""HTTP/1.1 client for the framing cases a byte-forwarding proxy must get right. Each case
prints one line "<case> <result>"; the test compares them with what the server must have sent.

  pipelined     two requests in one write, both responses in order
  head          HEAD (Content-Length but no body), then GET on the same connection
  continue      Expect: 100-continue: 100 first, then the body, then the final response
  reconnect     the server closes an idle keep-alive connection; the next request still works
  unframed      a response without length, delimited by the server closing
  smuggle       Content-Length and Transfer-Encoding together: 400, and the connection closes
  badchunk      a chunked body that is not chunked coding: 400, and the connection closes
  hugehead      a head over 64 KiB: 431, and the connection closes
  nohost        an HTTP/1.0 request without Host (allowed): answered as any other
"""
import argparse
import socket
import sys


def read_head(f):
    status = f.readline()
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status.split()[1]), headers


def read_response(f, head_request=False):
    status, headers = read_head(f)
    if head_request or status in (204, 304) or 100 <= status < 200:
        return status, b""
    if "content-length" in headers:
        return status, f.read(int(headers["content-length"]))
    return status, f.read()


def connect(addr):
    s = socket.create_connection(addr, timeout=20)
    return s, s.makefile("rb")


def request(path, method="GET", extra=""):
    return f"{method} {path} HTTP/1.1\r\nHost: edge.test\r\n{extra}\r\n".encode()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("addr")
    host, port = parser.parse_args().addr.rsplit(":", 1)
    addr = (host, int(port))

    s, f = connect(addr)
    s.sendall(request("/bytes/5") + request("/status/204"))
    first, second = read_response(f), read_response(f)
    print("pipelined", first[0], first[1].hex(), second[0])

    s.sendall(request("/bytes/100", method="HEAD"))
    head = read_response(f, head_request=True)
    s.sendall(request("/bytes/3"))
    after = read_response(f)
    print("head", head[0], len(head[1]), after[0], after[1].hex())

    body = b"x" * 1000
    s.sendall(request("/upload", "POST", "Content-Length: 1000\r\nExpect: 100-continue\r\n"))
    interim = read_response(f)
    s.sendall(body)
    final = read_response(f)
    print("continue", interim[0], final[0], final[1].decode().split()[0])

    s.sendall(request("/close-after"))
    closing = read_response(f)
    s.sendall(request("/bytes/4"))
    reopened = read_response(f)
    print("reconnect", closing[0], closing[1].decode(), reopened[0], reopened[1].hex())
    s.close()

    s, f = connect(addr)
    s.sendall(request("/unframed/70000"))
    status, data = read_response(f)
    print("unframed", status, len(data), data[:4].hex())
    s.close()

    s, f = connect(addr)
    s.sendall(
        b"POST /upload HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /bytes/1 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    status, _ = read_response(f)
    print("smuggle", status, "closed" if f.read() == b"" else "open")
    s.close()

    s, f = connect(addr)
    s.sendall(request("/upload", "POST", "Transfer-Encoding: chunked\r\n") + b"zz\r\nhello\r\n")
    status, _ = read_response(f)
    print("badchunk", status, "closed" if f.read() == b"" else "open")
    s.close()

    s, f = connect(addr)
    s.sendall(request("/bytes/1", extra="X-Big: " + "a" * 70000 + "\r\n"))
    status, _ = read_response(f)
    print("hugehead", status, "closed" if f.read() == b"" else "open")
    s.close()

    s, f = connect(addr)
    s.sendall(b"GET /bytes/3 HTTP/1.0\r\n\r\n")
    status, data = read_response(f)
    print("nohost", status, data.hex())
    s.close()


if __name__ == "__main__":
    sys.exit(main())
