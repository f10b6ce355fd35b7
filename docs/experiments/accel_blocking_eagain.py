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
