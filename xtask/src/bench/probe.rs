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
pub fn hold(addr: SocketAddr, count: usize, http: bool) -> Result<()> {
    raise_fd_limit();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = TcpStream::connect(addr).with_context(|| format!("connection {i}"))?;
        if http {
            one_request(&mut stream).with_context(|| format!("request on connection {i}"))?;
        }
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
