//! Pipes for splice(2), pooled. A connection borrows a pipe only while bytes are in flight and
//! returns it empty, so idle connections hold no pipe (the open-file limit here is 20000 and a
//! pipe costs two descriptors).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    sync::Mutex,
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

/// A bounded stack of idle, empty pipes.
pub struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    max_idle: usize,
}

impl PipePool {
    pub fn new(max_idle: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
        }
    }

    /// An empty pipe: a pooled one, or a new one.
    pub fn take(&self) -> io::Result<Pipe> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match pooled {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Returns an empty pipe to the pool. A pipe that may still hold bytes must be dropped
    /// instead, never returned.
    pub fn put(&self, pipe: Pipe) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max_idle
        {
            idle.push(pipe);
        }
    }

    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
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
