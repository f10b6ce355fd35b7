"""Another tool's socket map, as Beyla or Cilium would load one: a sockhash named NAME with an
sk_msg program attached (it passes every message). Prints "ready id=ID" once both exist and
holds them until its stdin closes (or LIMIT seconds pass); the kernel frees them when it exits.

Usage: foreign_sockmap.py NAME [LIMIT]
Raw bpf(2) through ctypes: the test machine has no BPF library for Python.
"""

import ctypes
import os
import select
import struct
import sys

NR_BPF = 321  # x86_64
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_OBJ_GET_INFO_BY_FD = 0, 5, 8, 15
SOCKHASH, SK_MSG, SK_MSG_VERDICT = 18, 16, 7

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    result = libc.syscall(NR_BPF, cmd, buf, 128)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"bpf command {cmd}: {os.strerror(errno)}")
    return result


def map_id(fd):
    info = ctypes.create_string_buffer(80)
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, 80, ctypes.addressof(info)))
    return struct.unpack_from("II", info.raw)[1]


def main():
    name = sys.argv[1].encode()
    limit = float(sys.argv[2]) if len(sys.argv) > 2 else 300.0
    map_fd = bpf(BPF_MAP_CREATE, struct.pack("IIIIIII16s", SOCKHASH, 4, 4, 16, 0, 0, 0, name))
    # r0 = SK_PASS; exit
    insns = ctypes.create_string_buffer(bytes.fromhex("b700000001000000" "9500000000000000"))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = struct.pack(
        "IIQQIIQII16sII",
        SK_MSG, 2, ctypes.addressof(insns), ctypes.addressof(license),
        1, len(log), ctypes.addressof(log), 0, 0, b"foreign_msg", 0, SK_MSG_VERDICT,
    )
    try:
        prog_fd = bpf(BPF_PROG_LOAD, attr)
    except OSError as error:
        sys.exit(f"loading the sk_msg program: {error}: {log.value.decode()}")
    bpf(BPF_PROG_ATTACH, struct.pack("IIII", map_fd, prog_fd, SK_MSG_VERDICT, 0))
    print(f"ready id={map_id(map_fd)}", flush=True)
    # Held until the test closes stdin, bounded so that a test that dies cannot leak it long.
    readable, _, _ = select.select([sys.stdin], [], [], limit)
    if readable:
        sys.stdin.read()


if __name__ == "__main__":
    main()
