//! Opaque TCP forwarding with splice(2): bytes go socket -> pipe -> socket without being copied
//! into user space. Each direction is a pump; one side's EOF becomes shutdown(SHUT_WR) on the
//! other (half-close), and an error on either side resets both connections. A connection that
//! turns out chatty stops between messages, to be handed to the kernel (`forward::kernel`).

use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, RawFd},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    ByteCounters,
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

/// How splicing ended.
pub enum Spliced {
    /// Both directions reached EOF, or one failed.
    Done(Outcome),
    /// The connection turned out chatty (see [`ChattyGate`]) and both pumps stopped between
    /// messages: no pipe holds bytes and everything not yet moved is still queued on the
    /// sockets, in order. It can be handed to the kernel.
    Chatty(TcpStream, TcpStream),
}

/// Watches a spliced connection's messages for the sign that in-kernel forwarding pays off:
/// a run of small messages (request/response traffic), where a proxy's cost is the wake-ups
/// per message rather than the bytes. Bulk streams, whose chunks fill a pipe, stay spliced
/// (splice moves them best), and so do short connections (the hand-off costs a few syscalls).
pub struct ChattyGate {
    small_in_a_row: AtomicU32,
    tripped: CancellationToken,
    /// Fired when a hand-off is off for good: a direction closed, or stayed too busy to stop.
    disabled: CancellationToken,
}

/// A message below this many bytes counts as small.
const SMALL_MESSAGE: usize = 16 * 1024;
/// Small messages in a row (both directions together) that make a connection chatty.
const CHATTY_AFTER: u32 = 8;
/// Splices a stopping pump may make to empty its socket; a direction still busy after these
/// calls the hand-off off.
const MAX_EMPTYING_SPLICES: usize = 32;

impl Default for ChattyGate {
    fn default() -> Self {
        Self::new()
    }
}

impl ChattyGate {
    pub fn new() -> Self {
        Self {
            small_in_a_row: AtomicU32::new(0),
            tripped: CancellationToken::new(),
            disabled: CancellationToken::new(),
        }
    }

    /// A pump moved one chunk of `bytes`.
    fn observe(&self, bytes: usize) {
        if bytes >= SMALL_MESSAGE {
            self.small_in_a_row.store(0, Ordering::Relaxed);
            return;
        }
        let small = self.small_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if small >= CHATTY_AFTER && !self.disabled.is_cancelled() {
            self.tripped.cancel();
        }
    }

    /// From now on the connection is never handed off.
    fn disable(&self) {
        self.disabled.cancel();
    }
}

/// Forwards `client` <-> `server` until both directions are done or one fails.
pub async fn splice_to_end(
    client: TcpStream,
    server: TcpStream,
    pipes: &PipePool,
    on_bytes: &ByteCounters,
) -> Outcome {
    match splice_bidirectional(client, server, pipes, on_bytes, None).await {
        Spliced::Done(outcome) => outcome,
        // Pumps stop early only for a gate; there is none.
        Spliced::Chatty(client, server) => {
            reset(&client);
            reset(&server);
            Outcome::Reset(Failure {
                step: "splicing",
                error: io::Error::other("splicing stopped without a gate"),
            })
        }
    }
}

/// Forwards `client` <-> `server` until both directions are done or one fails, or, with a
/// `chatty` gate, until the connection turns out chatty.
pub async fn splice_bidirectional(
    client: TcpStream,
    server: TcpStream,
    pipes: &PipePool,
    on_bytes: &ByteCounters,
    chatty: Option<&ChattyGate>,
) -> Spliced {
    let pump_up = |gate| {
        pump(
            Side::client(&client),
            Side::server(&server),
            pipes,
            gate,
            |n| on_bytes.client_to_server(n),
        )
    };
    let pump_down = |gate| {
        pump(
            Side::server(&server),
            Side::client(&client),
            pipes,
            gate,
            |n| on_bytes.server_to_client(n),
        )
    };
    let mut upload = Box::pin(pump_up(chatty));
    let mut download = Box::pin(pump_down(chatty));
    let (mut up, mut down) = (PumpState::Running, PumpState::Running);
    let handoff_off = async {
        match chatty {
            Some(gate) => gate.disabled.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(handoff_off);
    let mut watching_handoff = chatty.is_some();
    loop {
        let result = tokio::select! {
            result = &mut upload, if up == PumpState::Running => {
                step(result, &mut up, chatty, || {
                    SockRef::from(&server).shutdown(Shutdown::Write).map_err(Failure::tag("shutting down server"))
                })
            }
            result = &mut download, if down == PumpState::Running => {
                step(result, &mut down, chatty, || {
                    SockRef::from(&client).shutdown(Shutdown::Write).map_err(Failure::tag("shutting down client"))
                })
            }
            () = &mut handoff_off, if watching_handoff => {
                watching_handoff = false;
                Ok(())
            }
        };
        if let Err(failure) = result {
            reset(&client);
            reset(&server);
            return Spliced::Done(Outcome::Reset(failure));
        }
        match (up, down) {
            (PumpState::Stopped, PumpState::Stopped) => {
                drop((upload, download));
                return Spliced::Chatty(client, server);
            }
            (PumpState::Done, PumpState::Done) => return Spliced::Done(Outcome::Closed),
            _ => {}
        }
        // No hand-off after all (a direction closed, or stayed busy): a pump that stopped for
        // it goes back to work.
        if chatty.is_some_and(|gate| gate.disabled.is_cancelled()) {
            if up == PumpState::Stopped {
                upload = Box::pin(pump_up(None));
                up = PumpState::Running;
            }
            if down == PumpState::Stopped {
                download = Box::pin(pump_down(None));
                down = PumpState::Running;
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PumpState {
    Running,
    /// Stopped between messages for a hand-off.
    Stopped,
    /// EOF passed on.
    Done,
}

/// Applies one pump's result: EOF is passed on with `close` (and rules out a hand-off).
fn step(
    result: Result<PumpEnd, Failure>,
    state: &mut PumpState,
    chatty: Option<&ChattyGate>,
    close: impl FnOnce() -> Result<(), Failure>,
) -> Result<(), Failure> {
    match result? {
        PumpEnd::Eof => {
            *state = PumpState::Done;
            if let Some(gate) = chatty {
                gate.disable();
            }
            close()
        }
        PumpEnd::Stopped => {
            *state = PumpState::Stopped;
            Ok(())
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

enum PumpEnd {
    Eof,
    /// The chatty gate tripped; stopped with the source socket emptied and no pipe holding
    /// bytes, so the kernel can take over from the next whole socket buffer.
    Stopped,
}

/// Moves bytes from `src` to `dst` until EOF on `src`, or until `chatty` trips (checked only
/// while waiting for bytes, so a pump never stops with bytes in a pipe).
async fn pump(
    src: Side<'_>,
    dst: Side<'_>,
    pipes: &PipePool,
    chatty: Option<&ChattyGate>,
    on_bytes: impl Fn(u64),
) -> Result<PumpEnd, Failure> {
    let tripped = async {
        match chatty {
            Some(gate) => gate.tripped.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(tripped);
    let mut watching_gate = chatty.is_some();
    // A destination that cannot take more while the gate has tripped calls the hand-off off:
    // the other direction may have stopped for it, and this one's destination may be waiting
    // on exactly that direction (a server blocked writing what nobody reads any more). The
    // other pump then starts again (`splice_bidirectional` watches `disabled`).
    let blocked = || {
        if let Some(gate) = chatty
            && gate.tripped.is_cancelled()
        {
            gate.disable();
        }
    };
    // Set when urgent data was passed on: bytes may wait behind it with no wake-up to come.
    let mut splice_again = false;
    loop {
        tokio::select! {
            biased;
            () = &mut tripped, if watching_gate => {
                match empty_source(src, dst, pipes, &on_bytes, &blocked).await? {
                    Emptied::Empty => return Ok(PumpEnd::Stopped),
                    Emptied::Eof => return Ok(PumpEnd::Eof),
                    Emptied::StillBusy => {
                        if let Some(gate) = chatty {
                            gate.disable();
                        }
                        watching_gate = false;
                        continue;
                    }
                }
            }
            () = std::future::ready(()), if splice_again => {}
            readable = src.stream.readable() => readable.map_err(Failure::tag(src.reading))?,
        }
        splice_again = false;
        // Through tokio, so that "nothing queued" clears the readiness that woke us.
        let splice_in = |pipe: &Pipe| {
            src.stream.try_io(Interest::READABLE, || {
                splice(src.stream.as_raw_fd(), pipe.write_fd(), pipe.capacity())
            })
        };
        match move_chunk(src, dst, pipes, &on_bytes, &blocked, splice_in).await? {
            Chunk::Eof => return Ok(PumpEnd::Eof),
            Chunk::Moved(bytes) => {
                if let Some(gate) = chatty {
                    gate.observe(bytes);
                }
            }
            Chunk::Nothing => match pass_urgent_data(src, dst, &on_bytes).await? {
                Urgent::None => {}
                Urgent::Passed => splice_again = true,
                Urgent::Eof => return Ok(PumpEnd::Eof),
            },
        }
    }
}

/// What `pass_urgent_data` found at the source.
enum Urgent {
    /// No urgent mark: the source has nothing queued.
    None,
    /// The urgent byte went on (still urgent), and the stream is past it.
    Passed,
    /// The stream ended right behind the urgent byte.
    Eof,
}

/// splice(2) stops at TCP urgent data (`tcp_read_sock` stops at the urgent mark) and then
/// reports nothing queued while bytes wait behind it, and no wake-up comes for them: a
/// telnet interrupt or an FTP ABOR froze the direction for ever. At the mark the urgent byte
/// is read out of band and sent on out of band (the other side sees it urgent, as sent), and
/// one plain read steps the stream over it, the byte it reads (if any) passed on in order.
async fn pass_urgent_data(
    src: Side<'_>,
    dst: Side<'_>,
    on_bytes: &impl Fn(u64),
) -> Result<Urgent, Failure> {
    let reading = Failure::tag(src.reading);
    if !crate::sys::at_urgent_mark(src.stream).map_err(reading)? {
        return Ok(Urgent::None);
    }
    let mut byte = [0u8; 1];
    match crate::sys::recv_now(src.stream, &mut byte, libc::MSG_OOB) {
        Ok(1) => send_all(dst, &byte, libc::MSG_OOB, on_bytes).await?,
        // The urgent pointer came ahead of its byte: the byte's arrival wakes the pump, and
        // stepping over a place not yet filled would only spin.
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Urgent::None),
        // Already read: the stream still steps over its place.
        Ok(_) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {}
        Err(error) => return Err(Failure::tag(src.reading)(error)),
    }
    match crate::sys::recv_now(src.stream, &mut byte, 0) {
        Ok(0) => Ok(Urgent::Eof),
        Ok(_) => {
            send_all(dst, &byte, 0, on_bytes).await?;
            Ok(Urgent::Passed)
        }
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(Urgent::Passed),
        Err(error) => Err(Failure::tag(src.reading)(error)),
    }
}

/// Sends `bytes` to `dst` with `flags` (MSG_OOB for urgent data), waiting while it is full.
async fn send_all(
    dst: Side<'_>,
    bytes: &[u8],
    flags: libc::c_int,
    on_bytes: &impl Fn(u64),
) -> Result<(), Failure> {
    let send = |sent: usize| crate::sys::send_now(dst.stream, &bytes[sent..], flags);
    write_out(dst.stream, bytes.len(), on_bytes, &|| {}, send)
        .await
        .map_err(Failure::tag(dst.writing))
}

/// What one splice from the source found.
enum Chunk {
    Eof,
    /// This many bytes went through a pipe to the destination.
    Moved(usize),
    /// Nothing was queued.
    Nothing,
}

/// Moves one chunk: `splice_in` fills a pipe from `src`, then all of it goes to `dst`. A pipe
/// is borrowed only for the chunk and goes back to the pool empty.
async fn move_chunk(
    src: Side<'_>,
    dst: Side<'_>,
    pipes: &PipePool,
    on_bytes: &impl Fn(u64),
    blocked: &impl Fn(),
    splice_in: impl FnOnce(&Pipe) -> io::Result<usize>,
) -> Result<Chunk, Failure> {
    let pipe = pipes.take().map_err(Failure::tag("allocating a pipe"))?;
    let chunk = match splice_in(&pipe) {
        // At an urgent mark splice(2) answers 0 once the peer's FIN is in, bytes still queued
        // behind the mark: not the end (`pass_urgent_data` takes it from there).
        Ok(0) if crate::sys::at_urgent_mark(src.stream).unwrap_or(false) => Chunk::Nothing,
        Ok(0) => Chunk::Eof,
        Ok(filled) => {
            // On error the pipe may still hold bytes: it is dropped, not pooled.
            drain(&pipe, filled, dst.stream, on_bytes, blocked)
                .await
                .map_err(Failure::tag(dst.writing))?;
            Chunk::Moved(filled)
        }
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Chunk::Nothing,
        // The pipe is empty: nothing was spliced into it.
        Err(error) => {
            pipes.put(pipe);
            return Err(Failure {
                step: src.reading,
                error,
            });
        }
    };
    pipes.put(pipe);
    Ok(chunk)
}

enum Emptied {
    /// The source socket's receive queue was empty (EAGAIN).
    Empty,
    Eof,
    StillBusy,
}

/// Splices until the source socket has nothing queued. The kernel forwards whole socket
/// buffers, even ones a splice had already taken part of; with the queue empty, every byte that
/// arrives from here on lands in a fresh one. The syscalls go straight to the socket: tokio's
/// cached readiness could claim "empty" without asking the kernel.
async fn empty_source(
    src: Side<'_>,
    dst: Side<'_>,
    pipes: &PipePool,
    on_bytes: &impl Fn(u64),
    blocked: &impl Fn(),
) -> Result<Emptied, Failure> {
    let splice_in = |pipe: &Pipe| splice(src.stream.as_raw_fd(), pipe.write_fd(), pipe.capacity());
    for _ in 0..MAX_EMPTYING_SPLICES {
        match move_chunk(src, dst, pipes, on_bytes, blocked, splice_in).await? {
            Chunk::Eof => return Ok(Emptied::Eof),
            Chunk::Moved(_) => {}
            // Bytes behind an urgent mark are still queued: not empty yet.
            Chunk::Nothing => match pass_urgent_data(src, dst, on_bytes).await? {
                Urgent::None => return Ok(Emptied::Empty),
                Urgent::Passed => {}
                Urgent::Eof => return Ok(Emptied::Eof),
            },
        }
    }
    Ok(Emptied::StillBusy)
}

/// Splices `len` bytes out of `pipe` into `dst`, calling `blocked` each time `dst` cannot take
/// more. On error the pipe is dropped by the caller (it may still hold bytes, so it must not
/// go back to the pool).
async fn drain(
    pipe: &Pipe,
    len: usize,
    dst: &TcpStream,
    on_bytes: &impl Fn(u64),
    blocked: &impl Fn(),
) -> io::Result<()> {
    let splice_out = |moved: usize| splice(pipe.read_fd(), dst.as_raw_fd(), len - moved);
    write_out(dst, len, on_bytes, blocked, splice_out).await
}

/// Writes `len` bytes to `dst` with `write` (given how many went out so far, it writes some
/// of the rest without blocking), waiting while `dst` is full and calling `blocked` each time
/// it is.
async fn write_out(
    dst: &TcpStream,
    len: usize,
    on_bytes: &impl Fn(u64),
    blocked: &impl Fn(),
    mut write: impl FnMut(usize) -> io::Result<usize>,
) -> io::Result<()> {
    let mut moved = 0;
    while moved < len {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || write(moved)) {
            Ok(now) => {
                moved += now;
                on_bytes(now as u64);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => blocked(),
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// One non-blocking splice(2) of up to `len` bytes.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    crate::sys::splice(from, to, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_small_messages_trips_the_gate() {
        let gate = ChattyGate::new();
        for _ in 1..CHATTY_AFTER {
            gate.observe(100);
        }
        assert!(!gate.tripped.is_cancelled());
        gate.observe(100);
        assert!(gate.tripped.is_cancelled());
    }

    #[test]
    fn a_large_message_starts_the_run_again() {
        let gate = ChattyGate::new();
        for _ in 1..CHATTY_AFTER {
            gate.observe(100);
        }
        gate.observe(SMALL_MESSAGE);
        for _ in 1..CHATTY_AFTER {
            gate.observe(100);
        }
        assert!(!gate.tripped.is_cancelled());
    }

    /// The gate trips while both directions are busy and the server's socket happens to be
    /// empty: the download stops for the hand-off while the upload still moves a chunk. The
    /// server (an echo writing each chunk back before it reads on) fills its send buffer with
    /// nobody reading, stops reading, and the upload's chunk can no longer go out: the
    /// hand-off must be called off and the download started again, or the connection hangs
    /// for ever. The server's side holds a few KiB, the chunk queued at the agent 64 KiB.
    #[tokio::test]
    async fn a_hand_off_that_would_block_a_busy_direction_is_called_off() {
        use std::io::{Read, Write};

        use crate::forward::http::test_support;

        const TOTAL: usize = 192 << 10;
        let (app_client, proxy_client) = test_support::loopback_pair().await;
        let (proxy_server, app_server) = test_support::loopback_pair().await;
        for socket in [&proxy_server, &app_server] {
            let socket = SockRef::from(socket);
            socket.set_send_buffer_size(4096).unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
        }
        // The applications on threads of their own, with blocking sockets: the client writes
        // and reads at once, the echo writes each chunk back before it reads on.
        let blocking = |stream: tokio::net::TcpStream| {
            let stream = stream.into_std().unwrap();
            stream.set_nonblocking(false).unwrap();
            stream
        };
        let app_server = blocking(app_server);
        let echo = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(len @ 1..) = (&app_server).read(&mut buf) {
                (&app_server).write_all(&buf[..len]).unwrap();
            }
            let _ = app_server.shutdown(std::net::Shutdown::Write);
        });
        let app_client = blocking(app_client);
        let writer = app_client.try_clone().unwrap();
        let upload = std::thread::spawn(move || {
            let block = vec![7u8; 64 * 1024];
            for _ in 0..TOTAL / block.len() {
                (&writer).write_all(&block).unwrap();
            }
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let (done, finished) = tokio::sync::oneshot::channel();
        let download = std::thread::spawn(move || {
            let mut echoed = Vec::new();
            let _ = (&app_client).read_to_end(&mut echoed);
            let _ = done.send(());
            echoed
        });
        let queued = async {
            while crate::sys::bytes_readable(&proxy_client).unwrap() < 64 * 1024 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), queued)
            .await
            .expect("the upload did not start");

        let dst = proxy_server.peer_addr().unwrap();
        let proxy = test_support::proxy(Duration::from_secs(10));
        let counters = test_support::counters(&proxy, dst);
        let pipes = PipePool::new(4);
        let gate = ChattyGate::new();
        gate.tripped.cancel();
        // A hand-off (both directions stopped between messages) goes on spliced here, standing
        // in for the kernel's forwarding.
        let spliced = async {
            match splice_bidirectional(proxy_client, proxy_server, &pipes, &counters, Some(&gate))
                .await
            {
                Spliced::Chatty(client, server) => {
                    splice_to_end(client, server, &pipes, &counters).await
                }
                Spliced::Done(outcome) => outcome,
            }
        };
        let spliced = tokio::time::timeout(Duration::from_secs(30), async {
            let (spliced, _) = tokio::join!(spliced, finished);
            spliced
        })
        .await
        .expect("the connection hung");
        let echoed = download.join().unwrap();
        upload.join().unwrap();
        echo.join().unwrap();
        assert!(matches!(spliced, Outcome::Closed));
        assert_eq!(echoed.len(), TOTAL);
        assert!(echoed.iter().all(|&byte| byte == 7));
    }

    #[test]
    fn a_disabled_gate_never_trips() {
        let gate = ChattyGate::new();
        gate.disable();
        for _ in 0..2 * CHATTY_AFTER {
            gate.observe(1);
        }
        assert!(!gate.tripped.is_cancelled());
        assert!(gate.disabled.is_cancelled());
    }
}
