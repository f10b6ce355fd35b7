//! Every raw system call of the agent, and the only module allowed `unsafe` (the crate denies
//! it everywhere else). Each wrapper is small, takes and returns safe types, and says why its
//! `unsafe` block is sound. What std, tokio or socket2 already offer is used from there
//! instead (socket cookie, SO_ORIGINAL_DST, SO_MARK).
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io, mem,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    ptr,
};

// === bpf(2) ===

/// bpf(2) with `attr`, the leading fields of `union bpf_attr` for `cmd` (the kernel reads only
/// the size passed and treats the rest as zero): its non-negative result, or the error.
///
/// # Safety
/// `attr` must be what `cmd` expects, and every pointer and descriptor in it valid for
/// what the kernel does with it during the call.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> io::Result<libc::c_long> {
    // SAFETY: the attr is a valid, initialised struct of its own size that outlives the call;
    // what it points at is the caller's promise.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const A,
            mem::size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

// === BPF links ===

/// `BPF_LINK_CREATE` and `BPF_SK_LOOKUP` (linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_SK_LOOKUP: u32 = 36;

/// The leading fields of `union bpf_attr` for `BPF_LINK_CREATE`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// Attaches the sk_lookup program `program` to the network namespace `netns` as a bpf_link.
/// Closing the returned fd (or the process ending) detaches it. aya attaches through
/// `&mut` on the program inside its loader; a pod's attach needs nothing but the two fds.
pub fn link_sk_lookup(program: BorrowedFd<'_>, netns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: netns.as_raw_fd() as u32,
        attach_type: BPF_SK_LOOKUP,
        flags: 0,
    };
    // SAFETY: a BPF_LINK_CREATE attr whose two fds are borrowed, so open.
    let fd = unsafe { bpf(BPF_LINK_CREATE, &attr) }?;
    // SAFETY: a link fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (linux/bpf.h): on hash maps since Linux 5.14.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The leading fields of `union bpf_attr` for the map element commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads and removes a connection's entry of ORIG_BY_TUPLE (`map`) in one call: Ok(None) when
/// there is none. An error of EINVAL or ENOTSUPP-like kinds means the kernel is older than
/// 5.14 (the caller then reads and removes in two calls, as aya does).
pub fn take_original_dst(
    map: BorrowedFd<'_>,
    key: &agent_common::ConnTuple,
) -> io::Result<Option<agent_common::OriginalDst>> {
    let mut value = mem::MaybeUninit::<agent_common::OriginalDst>::uninit();
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        pad: 0,
        key: key as *const agent_common::ConnTuple as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the kernel reads the key and writes the value through the two pointers: both
    // point at live objects of the map's key and value types (agent-common's ConnTuple and
    // OriginalDst, which the eBPF side declares ORIG_BY_TUPLE with), for the length of the
    // call; the fd is borrowed, so open.
    match unsafe { bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr) } {
        // SAFETY: the kernel filled the whole value (the map's value size is its size);
        // OriginalDst is plain integers, valid for any bytes.
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(error) => Err(error),
    }
}

// === Namespaces ===

/// setns(2) into the network namespace `netns` refers to, for the calling thread only. Fails
/// with EINVAL when `netns` is not a network namespace file.
pub fn enter_network_namespace(netns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns only reads the descriptor, which the BorrowedFd keeps open for the call.
    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// === Socket options ===

/// getsockopt for a plain-old-data option value.
///
/// # Safety
/// `T` must be the option's kernel type: plain integers, valid for any bit pattern.
unsafe fn get_option<T: Copy>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<T> {
    // SAFETY: upheld by the caller: all zeroes is a valid T.
    let mut value: T = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: value and len are valid out-pointers of the given size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn set_option<T: Copy>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: T,
) -> io::Result<()> {
    // SAFETY: value is valid for reads of its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SO_RCVLOWAT: how many bytes must be queued before the socket counts as readable. Setting
/// it also makes TCP signal "data ready" when that many bytes are already queued.
pub fn set_rcvlowat(socket: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    set_option(socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// IP_BIND_ADDRESS_NO_PORT: a bind to an address (without a port) leaves the port to
/// connect(2), which needs only the whole 4-tuple to be unique, not the port alone.
pub fn set_bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    set_option(
        socket,
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        1 as libc::c_int,
    )
}

/// TCP_INFO: one consistent snapshot of the connection's counters and state.
pub fn tcp_info(socket: &impl AsRawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers.
    unsafe { get_option(socket, libc::IPPROTO_TCP, libc::TCP_INFO) }
}

/// SO_NETNS_COOKIE: the cookie of the network namespace the socket lives in.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: the cookie is a u64.
    unsafe { get_option(socket, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE) }
}

// === Socket I/O ===

/// The socket's poll state right now (a zero-timeout poll asking for `events`; POLLERR and
/// POLLHUP are always reported).
pub fn poll_now(socket: &impl AsRawFd, events: libc::c_short) -> libc::c_short {
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    if ready > 0 { poll.revents } else { 0 }
}

/// One non-blocking recv(MSG_PEEK): copies queued bytes without consuming them.
pub fn peek(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// One non-blocking splice(2) of up to `len` bytes between a socket and a pipe. A descriptor
/// that is not open makes the call fail (EBADF); nothing is read from or written to memory.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: no memory is passed; null offsets are what sockets and pipes require.
    let moved = unsafe {
        libc::splice(
            from,
            ptr::null_mut(),
            to,
            ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(moved).map_err(|_| io::Error::last_os_error())
}

// === Pipes ===

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two descriptors for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asks for a pipe capacity of `bytes` (F_SETPIPE_SZ) and returns the capacity it has now.
pub fn resize_pipe(pipe: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<usize> {
    // SAFETY: F_SETPIPE_SZ takes the requested size in bytes; a refusal leaves the pipe as it was.
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) };
    // SAFETY: F_GETPIPE_SZ takes no argument and returns the capacity in bytes.
    let capacity = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ) };
    usize::try_from(capacity).map_err(|_| io::Error::last_os_error())
}

// === epoll ===

pub type EpollEvent = libc::epoll_event;

/// A new epoll instance, registered with the calling tokio runtime for readiness.
pub fn epoll_create() -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: epoll_create1 returned a new descriptor owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the AsyncFd owns the descriptor, so it stays open for as long as it is
    // registered (I/O safety is what `register` asks of its caller).
    unsafe { tokio::io::unix::AsyncFd::register(owned) }.map_err(io::Error::from)
}

/// Collects the events ready now (zero timeout) into `events`; returns how many.
pub fn epoll_wait_now(epoll: BorrowedFd<'_>, events: &mut [EpollEvent]) -> usize {
    let capacity = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: events has `capacity` writable slots; a zero timeout never blocks.
    let count = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), capacity, 0) };
    usize::try_from(count).unwrap_or(0)
}

/// Registers `fd` for `events`, reported with `token`.
pub fn epoll_add(epoll: BorrowedFd<'_>, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: event is a valid pointer for the call; an fd that is not open fails with EBADF.
    let rc = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn epoll_remove(epoll: BorrowedFd<'_>, fd: RawFd) {
    // SAFETY: no event pointer is needed for EPOLL_CTL_DEL.
    unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, ptr::null_mut()) };
}

// === Process ===

/// The open-file limit (soft, hard).
pub fn open_file_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: limit is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft open-file limit to the hard one.
pub fn raise_open_file_limit() -> io::Result<()> {
    let (soft, hard) = open_file_limit()?;
    if soft >= hard {
        return Ok(());
    }
    let limit = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: limit is a valid in-pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clock ticks per second and the page size, for /proc/self/stat.
pub fn clock_ticks_and_page_size() -> (i64, i64) {
    // SAFETY: sysconf has no preconditions.
    unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    }
}

/// Bytes handed out by malloc and not freed yet: small blocks plus mmapped ones.
#[cfg(target_env = "gnu")]
pub fn heap_in_use_bytes() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

/// CLOCK_MONOTONIC in nanoseconds: the clock bpf_ktime_get_ns reads.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: now is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

// === File systems ===

/// The file system type (statfs f_type) of `path`.
pub fn file_system_type(path: &Path) -> io::Result<i64> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: statfs is plain data; zero is a valid value.
    let mut stat: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and stat is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as i64)
}

/// mount -t bpf bpf PATH
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: all strings are NUL-terminated; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes the socket has ready to read, as FIONREAD reports them (what event loops such as
/// nginx's size their reads by).
pub fn bytes_readable(socket: &impl AsRawFd) -> io::Result<usize> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points at `bytes`.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &raw mut bytes) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(bytes).unwrap_or(0))
}

/// SIOCATMARK (linux/sockios.h; libc does not name it on Linux).
const SIOCATMARK: libc::Ioctl = 0x8905;

/// SIOCATMARK: whether the next byte to read is TCP urgent data (the urgent mark).
pub fn at_urgent_mark(socket: &impl AsRawFd) -> io::Result<bool> {
    let mut at_mark: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int through the pointer, which points at `at_mark`.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCATMARK, &raw mut at_mark) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(at_mark != 0)
}

/// One non-blocking recv(2) with `flags` added: the bytes read (0 at EOF).
pub fn recv_now(socket: &impl AsRawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// One non-blocking send(2) with `flags` added (never SIGPIPE): the bytes sent.
pub fn send_now(socket: &impl AsRawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of its length.
    let n = unsafe {
        libc::send(
            socket.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
