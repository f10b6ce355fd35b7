# sk_msg BPF_F_INGRESS redirect on 6.18: FIONREAD, MSG_PEEK, poll, order with plain TCP after.
import ctypes, os, socket, struct, fcntl, termios, time, array, select
libc = ctypes.CDLL(None, use_errno=True)
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(321, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno(); raise OSError(e, f"bpf cmd {cmd}: {os.strerror(e)}")
    return r
def ins(op, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", op, (src << 4) | dst, off, imm)
mapfd = bpf(0, struct.pack("IIIII", 18, 4, 4, 16, 0))
prog = b"".join([
    ins(0x62, 10, 0, -4, 2),            # *(u32 *)(r10 - 4) = 2
    ins(0x18, 2, 1, 0, mapfd), ins(0),  # r2 = map (pseudo map fd)
    ins(0xbf, 3, 10),                   # r3 = r10
    ins(0x07, 3, 0, 0, -4),             # r3 += -4
    ins(0xb7, 4, 0, 0, 1),              # r4 = BPF_F_INGRESS
    ins(0x85, 0, 0, 0, 71),             # call bpf_msg_redirect_hash
    ins(0x95),                          # exit
])
ib = ctypes.create_string_buffer(prog); lic = ctypes.create_string_buffer(b"GPL"); log = ctypes.create_string_buffer(8192)
attr = struct.pack("IIQQIIQII16sII", 16, len(prog) // 8, ctypes.addressof(ib), ctypes.addressof(lic), 1, 8192, ctypes.addressof(log), 0, 0, b"ingprobe", 0, 7)
try:
    progfd = bpf(5, attr)
except OSError as e:
    print("load failed", e, log.value.decode()); raise
bpf(8, struct.pack("IIII", mapfd, progfd, 7, 0))
def pair():
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
    a = socket.create_connection(l.getsockname()); b, _ = l.accept(); l.close(); return a, b
def fionread(s):
    buf = array.array("i", [0]); fcntl.ioctl(s.fileno(), termios.FIONREAD, buf); return buf[0]
def put(key, s):
    k = ctypes.c_uint32(key); v = ctypes.c_uint32(s.fileno())
    bpf(2, struct.pack("IIQQQ", mapfd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
a, b = pair()
b.setblocking(False)
ep = select.epoll(); ep.register(b.fileno(), select.EPOLLIN | select.EPOLLET)
put(2, b); put(1, a)
a.sendall(b"A" * 1000)
print("after 1000 redirected: epoll", ep.poll(0.5), "FIONREAD", fionread(b))
print("MSG_PEEK", len(b.recv(4096, socket.MSG_PEEK)), "FIONREAD after peek", fionread(b))
got = b.recv(300); print("recv 300:", len(got), "FIONREAD now", fionread(b))
# Delete the receiver from the map: its psock goes, and the program now misses (SK_DROP).
k = ctypes.c_uint32(2); bpf(3, struct.pack("IIQ", mapfd, 0, ctypes.addressof(k)))
try:
    a.send(b"B" * 10); print("send after miss: ok")
except OSError as e:
    print("send after miss:", e)
time.sleep(0.2)
rest = b""
try:
    while True:
        chunk = b.recv(4096)
        if not chunk: break
        rest += chunk
except BlockingIOError:
    pass
print("bytes still readable on the receiver after leaving the map:", len(rest), "(700 were unread)")
