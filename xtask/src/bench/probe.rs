//! `cargo xtask bench-probe`: the small clients the benchmark runs (inside the meshed cgroup
//! for the sockmesh setups), and the small servers they talk to.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub const GREETING: &[u8] = b"220 bench.sockmesh.test ESMTP ready\r\n";

/// Connect, wait for the server's greeting; prints the median connect-to-greeting time in µs.
pub fn greeting(addr: SocketAddr, count: usize) -> Result<()> {
    let mut samples = Vec::with_capacity(count);
    let mut buf = [0u8; 64];
    for _ in 0..count {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).context("connecting")?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        let n = stream.read(&mut buf).context("reading the greeting")?;
        if !buf[..n].starts_with(b"220 ") {
            bail!(
                "unexpected greeting {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    println!("{:.1}", samples[samples.len() / 2]);
    Ok(())
}

/// New connection per request for `seconds`: connect, send "ping", read "pong", close.
/// Prints connections per second.
pub fn connection_rate(addr: SocketAddr, seconds: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut done = 0u64;
    let mut buf = [0u8; 4];
    while Instant::now() < deadline {
        let mut stream = TcpStream::connect(addr).context("connecting")?;
        stream.set_nodelay(true)?;
        stream.write_all(b"ping")?;
        stream.read_exact(&mut buf).context("reading pong")?;
        done += 1;
    }
    println!("{:.1}", done as f64 / started.elapsed().as_secs_f64());
    Ok(())
}

/// Opens `count` connections, prints "ready", and holds them idle until stdin closes. With
/// `http`, each first makes one keep-alive HTTP/1.1 request, as an idle pooled client
/// connection has.
pub fn hold(addr: SocketAddr, count: usize, carry: Carry) -> Result<()> {
    raise_fd_limit();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = TcpStream::connect(addr).with_context(|| format!("connection {i}"))?;
        let request = match carry {
            Carry::Nothing => Ok(()),
            Carry::Http1 => one_request(&mut stream),
            Carry::Http2 => one_h2c_request(&mut stream, addr),
        };
        request.with_context(|| format!("request on connection {i}"))?;
        held.push(stream);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
    Ok(())
}

/// Sends header-less junk (no line end, so never a complete request head) to `addr` as fast
/// as it goes, reconnecting whenever the server closes, until `megabytes` are sent or stdin
/// closes (the bench kills it).
pub fn junk(addr: SocketAddr, megabytes: u64) -> Result<()> {
    let chunk = [b'x'; 64 * 1024];
    let limit = megabytes * 1024 * 1024;
    let mut sent = 0u64;
    while sent < limit {
        let Ok(mut stream) = TcpStream::connect(addr) else {
            // Refused or out of ports for a moment: the attack goes on.
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        };
        while sent < limit {
            match stream.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => sent += n as u64,
            }
        }
    }
    Ok(())
}

/// What each held connection carries before it goes idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carry {
    Nothing,
    /// One HTTP/1.1 keep-alive request.
    Http1,
    /// One h2c (prior knowledge) request; the connection stays open.
    Http2,
}

/// An h2c GET /index.html in raw frames (the preface, an empty SETTINGS, one HEADERS of
/// static-table fields and the authority); acknowledges the server's SETTINGS and reads until
/// the response's stream ends.
fn one_h2c_request(stream: &mut TcpStream, addr: SocketAddr) -> Result<()> {
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    let authority = addr.to_string();
    // :method GET, :scheme http, :path /index.html (static 2, 6, 5), :authority (literal).
    let mut block = vec![0x82, 0x86, 0x85, 0x41, u8::try_from(authority.len())?];
    block.extend_from_slice(authority.as_bytes());
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend_from_slice(&h2_frame_head(0, 0x4, 0, 0));
    bytes.extend_from_slice(&h2_frame_head(
        block.len(),
        0x1,
        END_STREAM | END_HEADERS,
        1,
    ));
    bytes.extend_from_slice(&block);
    stream.write_all(&bytes)?;
    let mut received = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut at = 0;
    loop {
        while received.len() >= at + 9 {
            let length = usize::from(received[at]) << 16
                | usize::from(received[at + 1]) << 8
                | usize::from(received[at + 2]);
            let (kind, flags) = (received[at + 3], received[at + 4]);
            let id = u32::from_be_bytes(received[at + 5..at + 9].try_into()?) & 0x7fff_ffff;
            if received.len() < at + 9 + length {
                break;
            }
            at += 9 + length;
            if kind == 0x4 && flags & 0x1 == 0 {
                stream.write_all(&h2_frame_head(0, 0x4, 0x1, 0))?;
            }
            anyhow::ensure!(kind != 0x7, "GOAWAY from the server");
            if id == 1 && matches!(kind, 0x0 | 0x1) && flags & END_STREAM != 0 {
                return Ok(());
            }
        }
        let read = stream.read(&mut buf)?;
        anyhow::ensure!(read > 0, "closed before the response ended");
        received.extend_from_slice(&buf[..read]);
    }
}

fn h2_frame_head(length: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
    let [_, l0, l1, l2] = u32::try_from(length).unwrap_or(0).to_be_bytes();
    let [s0, s1, s2, s3] = stream.to_be_bytes();
    [l0, l1, l2, kind, flags, s0, s1, s2, s3]
}

/// GET /index.html, keeping the connection alive; reads the whole response (a Content-Length
/// one).
fn one_request(stream: &mut TcpStream) -> Result<()> {
    stream.write_all(b"GET /index.html HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = stream.read(&mut buf)?;
        anyhow::ensure!(read > 0, "closed before the response ended");
        response.extend_from_slice(&buf[..read]);
        let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&response[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .context("no content-length")?
            .trim()
            .parse()?;
        if response.len() >= head_end + 4 + length {
            return Ok(());
        }
    }
}

/// A server that greets every connection first (a server-speaks-first protocol).
pub fn start_greeter() -> Result<SocketAddr> {
    serve_each(|mut stream| {
        let _ = stream.write_all(GREETING);
        let mut buf = [0u8; 64];
        let _ = stream.read(&mut buf);
    })
}

/// A server answering "pong" to "ping", then closing; also holds idle connections open.
pub fn start_pong() -> Result<SocketAddr> {
    serve_each(|mut stream| {
        let _ = stream.set_nodelay(true);
        let mut buf = [0u8; 4];
        if stream.read_exact(&mut buf).is_ok() {
            let _ = stream.write_all(b"pong");
        }
        let _ = stream.read(&mut buf);
    })
}

fn serve_each(handle: fn(TcpStream)) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    // SAFETY: raising the backlog of our own listening socket.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || handle(stream));
        }
    });
    Ok(addr)
}

pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
