//! Raw socket calls several stages share (std, tokio and socket2 have no wrapper for them):
//! typed getsockopt/setsockopt, and a non-blocking look at a socket's poll state.

use std::{io, mem, os::fd::AsRawFd};

/// getsockopt for a plain-old-data option value.
///
/// # Safety
/// `T` must be the option's kernel type: plain integers, valid for any bit pattern.
pub unsafe fn get_option<T: Copy>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<T> {
    // SAFETY: upheld by the caller: all zeroes is a valid T.
    let mut value: T = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: value and len are valid out-pointers of the given size; the descriptor is open.
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
    // SAFETY: value is valid for reads of its size; the descriptor is open.
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

/// TCP_INFO: one consistent snapshot of the connection's counters and state.
pub fn tcp_info(socket: &impl AsRawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers.
    unsafe { get_option(socket, libc::IPPROTO_TCP, libc::TCP_INFO) }
}

/// SO_COOKIE: the kernel's unique id of the socket (what BPF programs key sockets by).
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: the cookie is a u64.
    unsafe { get_option(socket, libc::SOL_SOCKET, libc::SO_COOKIE) }
}

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

/// SO_NETNS_COOKIE: the cookie of the network namespace the socket lives in.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: the cookie is a u64.
    unsafe { get_option(socket, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE) }
}
