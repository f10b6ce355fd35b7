"""Many keep-alive HTTP/1.1 connections at once, each making a series of requests of different
sizes (downloads and uploads), checking every byte. Prints "h1 load ok requests=N" or exits 1
with what went wrong.
"""
import argparse
import hashlib
import http.client
import sys
import threading


BLOCK = bytes((i * 7 + 3) % 256 for i in range(65536))


def pattern(n):
    """http_peer.py's /bytes/N."""
    full, rest = divmod(n, len(BLOCK))
    return BLOCK * full + BLOCK[:rest]


def worker(host, port, index, rounds, errors, done):
    try:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        for round_ in range(rounds):
            size = (index * 7919 + round_ * 104729) % 200_000
            if round_ % 3 == 2:
                body = pattern(size)[::-1]
                conn.request("POST", "/upload", body=body, headers={"Host": "load.test"})
                reply = conn.getresponse().read().decode().split()
                expected = [str(size), hashlib.sha256(body).hexdigest()]
                if reply != expected:
                    raise AssertionError(f"upload {size}: {reply}")
            else:
                conn.request("GET", f"/bytes/{size}", headers={"Host": "load.test"})
                response = conn.getresponse()
                data = response.read()
                if response.status != 200 or data != pattern(size):
                    raise AssertionError(f"download {size}: status {response.status}, {len(data)} bytes")
            done.append(1)
        conn.close()
    except Exception as error:  # reported, the test fails on it
        errors.append(f"connection {index}: {error!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("addr")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)
    errors, done = [], []
    threads = [
        threading.Thread(target=worker, args=(host, int(port), i, args.rounds, errors, done))
        for i in range(args.connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        print("\n".join(errors[:10]))
        return 1
    print(f"h1 load ok requests={len(done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
