//! Raw system calls that no safe crate in the dependency tree wraps. Each wrapper is small and
//! says why its `unsafe` block is sound.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

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
