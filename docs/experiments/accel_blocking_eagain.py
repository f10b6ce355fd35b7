"""docs/design-sk-msg.md, "Kernel facts found while building it", fact 3: a blocking recv()
in one thread while another thread sends on the same socket. Run inside the meshed cgroup,
against ADDR (host:port), an opaque port whose server reads and never answers, through an
agent with `--accelerate local` and directly.
Prints what the reader's recv() returned and how many 64 KiB sends went out first:
['eof'] when it waited for its data as it should (the server closes after our half-close),
['eagain'] when the blocking recv gave up (BlockingIOError).
"""
import socket, sys, threading, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
result = []
def reader():
    try:
        data = s.recv(100)
        result.append("data" if data else "eof")
    except BlockingIOError:
        result.append("eagain")
    except Exception as e:
        result.append(repr(e))
t = threading.Thread(target=reader); t.start()
time.sleep(0.2)
for i in range(200):
    s.sendall(b"y" * 65536)
    if result: break
s.shutdown(socket.SHUT_WR)
t.join(20)
print(result, i)
