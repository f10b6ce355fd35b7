//! Pipes for splice(2), pooled per proxy thread. A connection borrows a pipe only while bytes
//! are in flight and returns it empty, so idle connections hold no pipe (the open-file limit
//! here is 20000 and a pipe costs two descriptors).

use std::{
    cell::RefCell,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
};

use crate::sys;

/// Capacity asked for each pipe.
const PIPE_CAPACITY: libc::c_int = 256 * 1024;

/// One kernel pipe: splice into `write`, splice out of `read`.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = sys::pipe()?;
        // Larger than the default 64 KiB: each splice moves up to a pipe's capacity, and on this
        // project's machines 256 KiB gave bulk streams about a fifth more throughput (fewer
        // syscalls and wake-ups per byte). An empty pipe holds no pages, so pooled ones cost
        // little. If the kernel refuses (pipe-max-size, or the user's pipe page budget for a
        // process without CAP_SYS_RESOURCE), the default stays.
        let capacity = sys::resize_pipe(write.as_fd(), PIPE_CAPACITY)
            .unwrap_or(65_536)
            .max(4096);
        Ok(Self {
            read,
            write,
            capacity,
        })
    }

    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// The most bytes one splice into this pipe can move.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Bounded stacks of idle, empty pipes, one per thread.
pub struct PipePool {
    max_idle: usize,
}

thread_local! {
    /// This thread's idle pipes: a connection lives on one proxy thread, so its pumps take and
    /// return pipes without a lock.
    static IDLE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl PipePool {
    /// A pool keeping at most `max_idle` idle pipes per thread.
    pub fn new(max_idle: usize) -> Self {
        Self { max_idle }
    }

    /// An empty pipe: a pooled one, or a new one.
    pub fn take(&self) -> io::Result<Pipe> {
        match IDLE.with_borrow_mut(Vec::pop) {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Returns an empty pipe to the pool. A pipe that may still hold bytes must be dropped
    /// instead, never returned.
    pub fn put(&self, pipe: Pipe) {
        IDLE.with_borrow_mut(|idle| {
            if idle.len() < self.max_idle {
                idle.push(pipe);
            }
        });
    }

    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        IDLE.with_borrow(Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_and_bounds_pipes() {
        let pool = PipePool::new(1);
        let first = pool.take().unwrap();
        let first_fd = first.read_fd();
        let second = pool.take().unwrap();
        assert!(first.capacity() >= 4096);
        pool.put(first);
        pool.put(second);
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(pool.take().unwrap().read_fd(), first_fd);
    }
}
