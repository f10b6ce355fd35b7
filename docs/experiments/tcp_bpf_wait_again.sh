#!/usr/bin/env bash
# Builds a small 6.12 kernel from Debian's linux-source-6.12 twice, as it is and with
# tcp_bpf_wait_again.patch, boots each under qemu with an initramfs that runs
# tcp_bpf_spurious_eagain.c, and prints what each kernel answered. About 6 minutes on 2 cores
# (the first build 4 of them). Needs root for apt-get; nothing runs on the host's network:
# the guest has no network device, its test traffic stays on its own loopback.
#
#   bash docs/experiments/tcp_bpf_wait_again.sh [WORK_DIR]   # default /tmp/tcp_bpf_wait_again
#
# Exit status 0 when the unpatched kernel shows the spurious EAGAIN and the patched one does
# not; 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/tcp_bpf_wait_again}
mkdir -p "$work"
cd "$work"

if ! [ -f /usr/src/linux-source-6.12.tar.xz ] || ! command -v qemu-system-x86_64 >/dev/null ||
    ! [ -x /bin/busybox ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-source-6.12 qemu-system-x86 \
        busybox-static flex bison bc libelf-dev libssl-dev cpio gcc make >/dev/null
fi

src=$work/linux-source-6.12
if ! [ -d "$src" ]; then
    tar xf /usr/src/linux-source-6.12.tar.xz
fi
cp -n "$src/net/ipv4/tcp_bpf.c" "$work/tcp_bpf.c.orig"

# tinyconfig plus what the test needs: a serial console, an initramfs, BPF with sockmap
# (NET_SOCK_MSG, BPF_STREAM_PARSER), IPv4 loopback, threads and timers.
(
    cd "$src"
    make -s tinyconfig
    ./scripts/config -e 64BIT -e PRINTK -e TTY -e SERIAL_8250 -e SERIAL_8250_CONSOLE \
        -e BLK_DEV_INITRD -e RD_GZIP -e BINFMT_ELF -e BINFMT_SCRIPT -e NET -e INET -e UNIX \
        -e BPF_SYSCALL -e BPF_JIT -e PROC_FS -e SYSFS -e DEVTMPFS -e FUTEX -e MULTIUSER \
        -e EPOLL -e EVENTFD -e SHMEM -e TMPFS -e POSIX_TIMERS -e SMP -e CGROUPS -e CGROUP_BPF \
        -e BPF_STREAM_PARSER -e NET_SOCK_MSG -e HIGH_RES_TIMERS -e FILE_LOCKING \
        -e ADVISE_SYSCALLS -d DEBUG_INFO -d MODULES
    make -s olddefconfig
)

build() { # $1: orig | patched
    cp "$work/tcp_bpf.c.orig" "$src/net/ipv4/tcp_bpf.c"
    if [ "$1" = patched ]; then
        (cd "$src" && patch -s -p1 <"$here/tcp_bpf_wait_again.patch")
    fi
    make -C "$src" -s -j"$(nproc)" bzImage >/dev/null
    cp "$src/arch/x86/boot/bzImage" "$work/bzImage.$1"
}
build orig
build patched

cc -O2 -static -pthread -o "$work/spurious" "$here/tcp_bpf_spurious_eagain.c"
rm -rf "$work/rootfs"
mkdir -p "$work/rootfs/bin" "$work/rootfs/proc" "$work/rootfs/sys" "$work/rootfs/dev"
cp /bin/busybox "$work/spurious" "$work/rootfs/bin/"
for applet in sh mount ip uname reboot; do ln -s busybox "$work/rootfs/bin/$applet"; done
cat >"$work/rootfs/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
ip link set lo up
echo "kernel: $(uname -r)"
/bin/spurious
echo "spurious-exit=$?"
reboot -f
INIT
chmod +x "$work/rootfs/init"
(cd "$work/rootfs" && find . | cpio -o -H newc 2>/dev/null | gzip >"$work/initramfs.gz")

# Software emulation: nested KVM is not always usable, and the test is short.
boot() { # $1: orig | patched
    timeout 300 qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 512 -nographic -no-reboot \
        -net none -kernel "$work/bzImage.$1" -initrd "$work/initramfs.gz" \
        -append "console=ttyS0 panic=-1 quiet" 2>&1 | tr -d '\r' |
        sed -n '/kernel: /,/spurious-exit=/p' | sed 's/.*\(kernel: \)/\1/' | tee "$work/run.$1.log"
}
echo "=== unpatched"
boot orig
echo "=== patched"
boot patched

if grep -q 'spurious-exit=1' "$work/run.orig.log" && grep -q 'spurious-exit=0' "$work/run.patched.log"; then
    echo "result: the unpatched kernel answers EAGAIN to blocking readers, the patched one does not"
else
    echo "result: not as expected (see $work/run.*.log)"
    exit 1
fi
