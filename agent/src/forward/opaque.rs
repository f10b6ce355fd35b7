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

use super::{
    ByteCounters,
    io::Counted,
    pipe::{Pipe, PipePool},
};

/// How a forwarded connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions reached EOF and were passed on.
    Closed,
    /// A socket error; both connections were reset.
    Reset(Failure),
}

/// Where a forwarded connection failed.
#[derive(Debug)]
pub struct Failure {
    /// "reading client", "writing server", ...
    pub step: &'static str,
    pub error: io::Error,
}

impl Failure {
    fn tag(step: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |error| Self { step, error }
    }
}

/// Forwards `client` <-> `server` until both directions are done or one fails.
pub async fn splice_bidirectional(
    client: TcpStream,
    server: TcpStream,
    pipes: &PipePool,
    on_bytes: &ByteCounters,
) -> Outcome {
    let upload = pump(Side::client(&client), Side::server(&server), pipes, |n| {
        on_bytes.client_to_server(n)
    });
    let download = pump(Side::server(&server), Side::client(&client), pipes, |n| {
        on_bytes.server_to_client(n)
    });
    tokio::pin!(upload, download);
    let (mut upload_done, mut download_done) = (false, false);
    while !(upload_done && download_done) {
        let result = tokio::select! {
            result = &mut upload, if !upload_done => {
                upload_done = true;
                result.and_then(|()| {
                    SockRef::from(&server).shutdown(Shutdown::Write).map_err(Failure::tag("shutting down server"))
                })
            }
            result = &mut download, if !download_done => {
                download_done = true;
                result.and_then(|()| {
                    SockRef::from(&client).shutdown(Shutdown::Write).map_err(Failure::tag("shutting down client"))
                })
            }
        };
        if let Err(failure) = result {
            reset(&client);
            reset(&server);
            return Outcome::Reset(failure);
        }
    }
    Outcome::Closed
}

/// The same forwarding through user-space buffers (`--copy-mode userspace`): what splice saves
/// is measured against this by `cargo xtask bench`.
pub async fn copy_bidirectional(
    client: TcpStream,
    server: TcpStream,
    counters: &ByteCounters,
) -> Outcome {
    let mut client = client;
    let mut server = Counted::new(server, counters.clone());
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok(_) => Outcome::Closed,
        Err(error) => {
            reset(&client);
            reset(server.get_ref());
            Outcome::Reset(Failure {
                step: "copying",
                error,
            })
        }
    }
}

/// Closing a socket with a zero linger sends RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// One end of a pump, named for error messages.
#[derive(Clone, Copy)]
struct Side<'a> {
    stream: &'a TcpStream,
    reading: &'static str,
    writing: &'static str,
}

impl<'a> Side<'a> {
    fn client(stream: &'a TcpStream) -> Self {
        Self {
            stream,
            reading: "reading client",
            writing: "writing client",
        }
    }

    fn server(stream: &'a TcpStream) -> Self {
        Self {
            stream,
            reading: "reading server",
            writing: "writing server",
        }
    }
}

/// Moves bytes from `src` to `dst` until EOF on `src`.
async fn pump(
    src: Side<'_>,
    dst: Side<'_>,
    pipes: &PipePool,
    on_bytes: impl Fn(u64),
) -> Result<(), Failure> {
    loop {
        src.stream
            .readable()
            .await
            .map_err(Failure::tag(src.reading))?;
        // Borrow a pipe only now that there is something to move.
        let pipe = pipes.take().map_err(Failure::tag("allocating a pipe"))?;
        let filled = src.stream.try_io(Interest::READABLE, || {
            splice(src.stream.as_raw_fd(), pipe.write_fd(), pipe.capacity())
        });
        match filled {
            Ok(0) => {
                pipes.put(pipe);
                return Ok(());
            }
            Ok(filled) => {
                drain(&pipe, filled, dst.stream, &on_bytes)
                    .await
                    .map_err(Failure::tag(dst.writing))?;
                pipes.put(pipe);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => pipes.put(pipe),
            // The pipe is empty: nothing was spliced into it.
            Err(error) => {
                pipes.put(pipe);
                return Err(Failure {
                    step: src.reading,
                    error,
                });
            }
        }
    }
}

/// Splices `len` bytes out of `pipe` into `dst`. On error the pipe is dropped by the caller
/// (it may still hold bytes, so it must not go back to the pool).
async fn drain(
    pipe: &Pipe,
    mut len: usize,
    dst: &TcpStream,
    on_bytes: &impl Fn(u64),
) -> io::Result<()> {
    while len > 0 {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || {
            splice(pipe.read_fd(), dst.as_raw_fd(), len)
        }) {
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
