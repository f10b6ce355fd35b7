//! Opaque TCP forwarding with splice(2): bytes go socket -> pipe -> socket without being copied
//! into user space. Each direction is a pump; one side's EOF becomes shutdown(SHUT_WR) on the
//! other (half-close), and an error on either side resets both connections.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, RawFd},
    ptr,
    time::Duration,
};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};

use super::pipe::{Pipe, PipePool};

/// How a forwarded connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions reached EOF and were passed on.
    Closed,
    /// A socket error; both connections were reset.
    Reset(io::Error),
}

/// Byte counters called as bytes are delivered, per direction.
pub trait OnBytes {
    fn client_to_server(&self, bytes: u64);
    fn server_to_client(&self, bytes: u64);
}

/// Forwards `client` <-> `server` until both directions are done or one fails.
pub async fn splice_bidirectional(
    client: TcpStream,
    server: TcpStream,
    pipes: &PipePool,
    on_bytes: &impl OnBytes,
) -> Outcome {
    let upload = pump(&client, &server, pipes, |n| on_bytes.client_to_server(n));
    let download = pump(&server, &client, pipes, |n| on_bytes.server_to_client(n));
    tokio::pin!(upload, download);
    let (mut upload_done, mut download_done) = (false, false);
    while !(upload_done && download_done) {
        let result = tokio::select! {
            result = &mut upload, if !upload_done => {
                upload_done = true;
                result.and_then(|()| SockRef::from(&server).shutdown(Shutdown::Write))
            }
            result = &mut download, if !download_done => {
                download_done = true;
                result.and_then(|()| SockRef::from(&client).shutdown(Shutdown::Write))
            }
        };
        if let Err(error) = result {
            reset(&client);
            reset(&server);
            return Outcome::Reset(error);
        }
    }
    Outcome::Closed
}

/// Closing a socket with a zero linger sends RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Moves bytes from `src` to `dst` until EOF on `src`.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    pipes: &PipePool,
    on_bytes: impl Fn(u64),
) -> io::Result<()> {
    loop {
        src.readable().await?;
        // Borrow a pipe only now that there is something to move.
        let pipe = pipes.take()?;
        let filled = src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), pipe.write_fd(), pipe.capacity())
        });
        match filled {
            Ok(0) => {
                pipes.put(pipe);
                return Ok(());
            }
            Ok(filled) => {
                drain(&pipe, filled, dst, &on_bytes).await?;
                pipes.put(pipe);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => pipes.put(pipe),
            // The pipe is empty: nothing was spliced into it.
            Err(error) => {
                pipes.put(pipe);
                return Err(error);
            }
        }
    }
}

/// Splices `len` bytes out of `pipe` into `dst`. On error the pipe is dropped by the caller's
/// `?` (it may still hold bytes, so it must not go back to the pool).
async fn drain(pipe: &Pipe, mut len: usize, dst: &TcpStream, on_bytes: &impl Fn(u64)) -> io::Result<()> {
    while len > 0 {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || splice(pipe.read_fd(), dst.as_raw_fd(), len)) {
            Ok(moved) => {
                len -= moved;
                on_bytes(moved as u64);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// One non-blocking splice(2) of up to `len` bytes.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets are
    // required for sockets and pipes.
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
    if moved < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(moved as usize)
}
