//! `cargo xtask soak-probe ...`: the soak's small clients and servers (this binary).

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use super::{
    IO_TIMEOUT, Tally,
    traffic::{drive, start_echo},
};
use crate::bench::probe;

/// Internal: the soak's clients and servers (`cargo xtask soak-probe ...`). Each client loops
/// until `--seconds` are up, printing "progress ok=N failed=M" every second, "error: ..." for
/// its first failures, and "done ok=N failed=M" at the end.
#[derive(Subcommand)]
pub(crate) enum Probe {
    /// An echo server (run in the meshed cgroup, for inbound traffic): prints "READY <port>",
    /// echoes each connection until its EOF, then half-closes.
    EchoServer,
    /// 2 connections at a time, each sends 16 MiB while reading the echo, half-closes, and
    /// expects exactly those bytes back, then EOF.
    Bulk {
        echo: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    /// 4 connections at a time, each 40 small round trips 5 ms apart (chatty: handed to the
    /// kernel), then 64 KiB more, a half-close, and the whole echo back.
    Chat {
        echo: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    /// A new connection per request, alternately ping/pong (opaque) and an HTTP/1.1 GET with
    /// `Connection: close`.
    Short {
        pong: SocketAddr,
        http: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    /// Connections closed with a reset (SO_LINGER 0): at once after the connect, after one
    /// ping/pong, or after 10 chatty round trips (in the kernel by then).
    Churn {
        pong: SocketAddr,
        echo: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    /// Half-closes: send, shut down the write side, read the whole answer: 4 KiB to the echo
    /// server (opaque), or an HTTP/1.1 keep-alive GET (the server closes after its response).
    HalfClose {
        echo: SocketAddr,
        http: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    /// Listeners in the meshed cgroup that open and close (INBOUND_PORTS entries come and go).
    Listeners {
        #[arg(long)]
        seconds: f64,
    },
}

/// `cargo xtask soak-probe ...`.
pub(crate) fn probe(probe: Probe) -> Result<()> {
    probe::raise_fd_limit();
    let (seconds, workers, pause): (f64, u64, Duration) = match &probe {
        Probe::EchoServer => {
            let addr = start_echo()?;
            println!("READY {}", addr.port());
            std::io::stdout().flush()?;
            loop {
                thread::park();
            }
        }
        Probe::Bulk { seconds, .. } => (*seconds, 2, Duration::from_millis(200)),
        Probe::Chat { seconds, .. } => (*seconds, 4, Duration::from_millis(50)),
        Probe::Short { seconds, .. } => (*seconds, 2, Duration::from_millis(25)),
        Probe::Churn { seconds, .. } => (*seconds, 2, Duration::from_millis(50)),
        Probe::HalfClose { seconds, .. } => (*seconds, 1, Duration::from_millis(40)),
        Probe::Listeners { seconds } => (*seconds, 1, Duration::from_millis(150)),
    };
    let step = |round: u64| -> Result<u64> {
        match &probe {
            Probe::EchoServer => Ok(0),
            Probe::Bulk { echo, .. } => {
                echo_half_close(connect(*echo)?, 0, 16 << 20)?;
                Ok(1)
            }
            Probe::Chat { echo, .. } => {
                let mut stream = connect(*echo)?;
                let offset = chat_rounds(&mut stream, 40, Duration::from_millis(5))?;
                echo_half_close(stream, offset, 64 << 10)?;
                Ok(1)
            }
            Probe::Short { pong, http, .. } => {
                if round.is_multiple_of(2) {
                    ping_pong(&mut connect(*pong)?)?;
                } else {
                    let mut stream = connect(*http)?;
                    stream.write_all(
                        b"GET /index.html HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n",
                    )?;
                    http_response_until_eof(&mut stream)?;
                }
                Ok(1)
            }
            Probe::Churn { pong, echo, .. } => {
                let mut stream = match round % 3 {
                    0 => connect(*pong)?,
                    1 => {
                        let mut stream = connect(*pong)?;
                        ping_pong(&mut stream)?;
                        stream
                    }
                    _ => {
                        let mut stream = connect(*echo)?;
                        chat_rounds(&mut stream, 10, Duration::ZERO)?;
                        stream
                    }
                };
                reset_on_close(&mut stream)?;
                Ok(1)
            }
            Probe::HalfClose { echo, http, .. } => {
                if round.is_multiple_of(2) {
                    echo_half_close(connect(*echo)?, round, 4096)?;
                } else {
                    let mut stream = connect(*http)?;
                    stream.write_all(b"GET /index.html HTTP/1.1\r\nHost: soak\r\n\r\n")?;
                    stream.shutdown(Shutdown::Write)?;
                    http_response_until_eof(&mut stream)?;
                }
                Ok(1)
            }
            Probe::Listeners { .. } => {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                thread::sleep(Duration::from_millis(100));
                drop(listener);
                Ok(1)
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let running = || Instant::now() < deadline;
    let tally = Tally::default();
    let printed = AtomicU64::new(0);
    let report = |prefix: &str| {
        let errors = tally.errors();
        let already = printed.swap(errors.len() as u64, Ordering::Relaxed) as usize;
        for error in errors.iter().skip(already) {
            println!("error: {}", error.replace('\n', " "));
        }
        let (ok, failed) = tally.counts();
        println!("{prefix} ok={ok} failed={failed}");
    };
    thread::scope(|scope| {
        scope.spawn(|| {
            while running() {
                thread::sleep(Duration::from_secs(1).min(deadline - Instant::now().min(deadline)));
                report("progress");
            }
        });
        drive(&running, workers, pause, &tally, step);
    });
    report("done");
    Ok(())
}

pub(super) fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

fn fill(buf: &mut [u8], offset: u64) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = pattern(offset + i as u64);
    }
}

fn check(buf: &[u8], offset: u64) -> Result<()> {
    if let Some(i) = buf
        .iter()
        .enumerate()
        .position(|(i, byte)| *byte != pattern(offset + i as u64))
    {
        bail!("corrupt echo at byte {}", offset + i as u64);
    }
    Ok(())
}

/// Sends `bytes` of the pattern (from `offset`) while reading the echo, half-closes, and reads
/// until EOF: exactly those bytes must come back.
pub(super) fn echo_half_close(stream: TcpStream, offset: u64, bytes: u64) -> Result<()> {
    let mut writer = stream.try_clone()?;
    let sender = thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || -> Result<()> {
            let mut chunk = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < bytes {
                let n = chunk.len().min((bytes - sent) as usize);
                fill(&mut chunk[..n], offset + sent);
                writer.write_all(&chunk[..n]).context("send")?;
                sent += n as u64;
            }
            writer
                .shutdown(Shutdown::Write)
                .context("shutdown(SHUT_WR)")?;
            Ok(())
        })?;
    let mut reader = stream;
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    let result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(error) = check(&buf[..n], offset + received) {
                    break Err(error);
                }
                received += n as u64;
            }
            Err(error) => break Err(error).context(format!("receive after {received} bytes")),
        }
    };
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender panicked"))?;
    result?;
    sent?;
    if received != bytes {
        bail!("echoed {received} of {bytes} bytes before EOF");
    }
    Ok(())
}

/// `rounds` round trips of 100 bytes, `pause` apart; returns the stream offset after them.
fn chat_rounds(stream: &mut TcpStream, rounds: u64, pause: Duration) -> Result<u64> {
    let (mut message, mut reply) = ([0u8; 100], [0u8; 100]);
    let mut offset = 0;
    for round in 0..rounds {
        fill(&mut message, offset);
        stream
            .write_all(&message)
            .with_context(|| format!("round {round}: send"))?;
        stream
            .read_exact(&mut reply)
            .with_context(|| format!("round {round}: receive"))?;
        check(&reply, offset).with_context(|| format!("round {round}"))?;
        offset += message.len() as u64;
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
    Ok(offset)
}

fn ping_pong(stream: &mut TcpStream) -> Result<()> {
    stream.write_all(b"ping")?;
    let mut pong = [0u8; 4];
    stream.read_exact(&mut pong).context("reading pong")?;
    if &pong != b"pong" {
        bail!("answer {:?}, expected pong", String::from_utf8_lossy(&pong));
    }
    Ok(())
}

/// Reads a response to GET /index.html (a 1 KiB file) until the server closes.
fn http_response_until_eof(stream: &mut TcpStream) -> Result<()> {
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the response after {} bytes", response.len()))?;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no complete response head in {} bytes", response.len());
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("status {:?}", head.lines().next().unwrap_or(""));
    }
    if body.len() != 1024 {
        bail!("a body of {} bytes, expected 1024", body.len());
    }
    Ok(())
}

/// SO_LINGER with a zero timeout, then close: the peer sees a reset.
fn reset_on_close(stream: &mut TcpStream) -> Result<()> {
    socket2::SockRef::from(&*stream)
        .set_linger(Some(Duration::ZERO))
        .context("SO_LINGER")
}
