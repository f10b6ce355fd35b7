"""HTTP/1.1 test server with keep-alive: deterministic downloads and checksummed uploads.

  GET  /bytes/N     N bytes of a deterministic pattern (Content-Length)
  POST /upload      reads the body (Content-Length or chunked), answers "<length> <sha256>"
  GET  /status/N    an empty response with status N
  GET  /unframed/N  N pattern bytes without Content-Length; the body ends when the server closes
  GET  /close-after a short response, then the server closes the keep-alive connection without
                    saying so (as an idle timeout does)
  HEAD              what GET would answer, without the body
  CONNECT host:port 200, then the tunnel echoes every byte back (a stand-in HTTP proxy)

Prints "READY <port>" once listening; runs until killed.
"""
import argparse
import hashlib
import http.server
import socketserver
import sys


def pattern(n):
    block = bytes((i * 7 + 3) % 256 for i in range(65536))
    full, rest = divmod(n, len(block))
    return block * full + block[:rest]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 30

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET()

    def write_body(self, body):
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "bytes" and parts[1].isdigit():
            body = pattern(int(parts[1]))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.write_body(body)
        elif len(parts) == 2 and parts[0] == "unframed" and parts[1].isdigit():
            self.send_response(200)
            self.end_headers()
            self.write_body(pattern(int(parts[1])))
            self.close_connection = True
        elif parts == ["close-after"]:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.write_body(b"ok")
            self.close_connection = True
        elif len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
            self.send_response(int(parts[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def do_POST(self):
        digest, length = hashlib.sha256(), 0
        for chunk in self.body_chunks():
            digest.update(chunk)
            length += len(chunk)
        reply = f"{length} {digest.hexdigest()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_CONNECT(self):
        self.send_response(200, "Connection Established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while chunk := self.connection.recv(65536):
            self.connection.sendall(chunk)

    def body_chunks(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["server"])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = Server((args.bind, args.port), Handler)
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
