# Does FIONREAD see plain TCP bytes on a socket that is in an sk_msg sockhash? (beyla#2941)
import ctypes, ctypes.util, os, socket, struct, fcntl, termios, time, array
libc = ctypes.CDLL(None, use_errno=True)
NR_BPF = 321
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(NR_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno(); raise OSError(e, f"bpf cmd {cmd}: {os.strerror(e)}")
    return r
SOCKHASH, SK_MSG, SK_MSG_VERDICT = 18, 16, 7
mapfd = bpf(0, struct.pack("IIIII", SOCKHASH, 4, 4, 16, 0))
insns = bytes.fromhex("b700000001000000") + bytes.fromhex("9500000000000000")  # r0 = SK_PASS; exit
ib = ctypes.create_string_buffer(insns); lic = ctypes.create_string_buffer(b"GPL")
log = ctypes.create_string_buffer(4096)
attr = struct.pack("IIQQIIQII16sII", SK_MSG, 2, ctypes.addressof(ib), ctypes.addressof(lic), 1, 4096, ctypes.addressof(log), 0, 0, b"fionprobe", 0, SK_MSG_VERDICT)
try:
    progfd = bpf(5, attr)
except OSError as e:
    print("load failed", e, log.value.decode()); raise
bpf(8, struct.pack("IIII", mapfd, progfd, SK_MSG_VERDICT, 0))
def pair():
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
    a = socket.create_connection(l.getsockname()); b, _ = l.accept(); l.close(); return a, b
def fionread(s):
    buf = array.array("i", [0]); fcntl.ioctl(s.fileno(), termios.FIONREAD, buf); return buf[0]
a, b = pair()
key = ctypes.c_uint32(1); val = ctypes.c_uint32(b.fileno())
bpf(2, struct.pack("IIQQQ", mapfd, 0, ctypes.addressof(key), ctypes.addressof(val), 0))
a.sendall(b"x" * 1000); time.sleep(0.2)
print("receiver in sk_msg sockhash, plain TCP 1000 bytes: FIONREAD =", fionread(b), "recv =", len(b.recv(4096)))
# control: a socket not in the map
c, d = pair(); c.sendall(b"y" * 1000); time.sleep(0.2)
print("control (no psock): FIONREAD =", fionread(d))
