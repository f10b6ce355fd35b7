//! meshprobe: the test client that runs inside the meshed cgroup (through `sockmesh exec`).
//! It speaks the byte patterns of the test servers and prints what it saw.
//!
//!   meshprobe bulk ADDR SEND RECEIVE    send SEND bytes, half-close, expect RECEIVE bytes back
//!   meshprobe echo ADDR CONNS BYTES     CONNS concurrent connections, each echoes BYTES
//!   meshprobe chat ADDR CONNS ROUNDS BULK [hold|hold-chatting|expect-reset]
//!                                       CONNS concurrent connections to an echo server, each
//!                                       ROUNDS small round trips, then BULK bytes echoed while
//!                                       sending, half-close, EOF. `hold` (one connection) prints
//!                                       "chatted" after the round trips and waits for a line on
//!                                       stdin; `hold-chatting` does too, making a round trip
//!                                       every 20 ms while it waits (their count is reported as
//!                                       `extra_rounds=N`); `expect-reset` expects a reset after
//!                                       them
//!   meshprobe peer ADDR                 print getpeername() after connecting
//!   meshprobe expect-close ADDR         connect and wait for the connection to be closed
//!   meshprobe churn ADDR COUNT          COUNT connections (4 threads), each reset at once
//!   meshprobe hold ADDR COUNT [silent]  COUNT connections to an echo server, each echoes one
//!                                       message (`silent`: sends nothing), then all stay open
//!                                       and idle: prints "held", waits for a line on stdin,
//!                                       closes them
//!   meshprobe junk ADDR BYTES           start an HTTP/1.1 request whose head never ends: send
//!                                       up to BYTES of one header value until the connection
//!                                       closes; print how much went out and the status line
//!   meshprobe echo-server ADDR          listen on ADDR (port 0: any), print "READY <port>",
//!                                       echo every connection until its EOF (a server for
//!                                       inside the meshed cgroup)

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::ExitCode,
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use integration_tests::{
    pattern,
    servers::{CLIENT_SEED, SERVER_SEED},
};

const ECHO_SEED: u8 = 3;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    raise_fd_limit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["bulk", addr, send, receive] => bulk(parse(addr), num(send), num(receive)),
        ["echo", addr, conns, bytes] => echo(parse(addr), num(conns), num(bytes)),
        ["chat", addr, conns, rounds, bulk] => {
            chat(parse(addr), num(conns), num(rounds), num(bulk), Then::Bulk)
        }
        ["chat", addr, conns, rounds, bulk, "hold"] => chat(
            parse(addr),
            num(conns),
            num(rounds),
            num(bulk),
            Then::HoldThenBulk,
        ),
        ["chat", addr, conns, rounds, bulk, "hold-chatting"] => chat(
            parse(addr),
            num(conns),
            num(rounds),
            num(bulk),
            Then::HoldChattingThenBulk,
        ),
        ["chat", addr, conns, rounds, bulk, "expect-reset"] => chat(
            parse(addr),
            num(conns),
            num(rounds),
            num(bulk),
            Then::ExpectReset,
        ),
        ["peer", addr] => peer(parse(addr)),
        ["expect-close", addr] => expect_close(parse(addr)),
        ["churn", addr, count] => churn(parse(addr), num(count)),
        ["hold", addr, count] => hold(parse(addr), num(count), echo_once),
        ["hold", addr, count, "silent"] => hold(parse(addr), num(count), connect),
        ["junk", addr, bytes] => junk(parse(addr), num(bytes)),
        ["echo-server", addr] => echo_server(parse(addr)),
        _ => Err(
            "usage: meshprobe bulk|echo|chat|peer|expect-close|churn|hold|junk|echo-server ..."
                .to_string(),
        ),
    };
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("meshprobe: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse(addr: &str) -> SocketAddr {
    addr.parse().expect("an address like 127.0.0.1:80")
}

fn num(text: &str) -> u64 {
    text.parse().expect("a number")
}

/// Connect-and-reset clients: each connection is closed with a reset (SO_LINGER 0) right after
/// its connect, leaving no TIME_WAIT behind, before the agent may even have accepted it.
fn churn(addr: SocketAddr, count: u64) -> Result<String, String> {
    const THREADS: u64 = 4;
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            thread::spawn(move || -> Result<(), String> {
                for _ in 0..count / THREADS {
                    let stream = connect(addr)?;
                    reset_on_close(&stream)?;
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| "panicked".to_string())??;
    }
    Ok(format!("ok connections={}", count / THREADS * THREADS))
}

/// Idle connections: each opened and echoed once (so the proxy has its destination connection
/// and has forwarded both ways), then held until stdin has a line (or ends).
fn hold(
    addr: SocketAddr,
    count: u64,
    open: fn(SocketAddr) -> Result<TcpStream, String>,
) -> Result<String, String> {
    const THREADS: u64 = 4;
    let workers: Vec<_> = (0..THREADS)
        .map(|worker| {
            let share = count / THREADS + u64::from(worker < count % THREADS);
            thread::spawn(move || -> Result<Vec<TcpStream>, String> {
                (0..share).map(|_| open(addr)).collect()
            })
        })
        .collect();
    let mut held = Vec::new();
    for worker in workers {
        held.extend(worker.join().map_err(|_| "panicked".to_string())??);
    }
    println!("held {}", held.len());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    Ok(format!("ok held={}", held.len()))
}

/// A hostile HTTP/1 client: a request head that never ends. The proxy must answer (431) and
/// close long before BYTES; the answer is read once a write fails or everything went out.
fn junk(addr: SocketAddr, bytes: u64) -> Result<String, String> {
    let mut stream = connect(addr)?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: junk\r\nX-Junk: ")
        .map_err(|e| e.to_string())?;
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        match stream.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n as u64,
        }
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let status = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    Ok(format!("sent={sent} status={status}"))
}

fn echo_once(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut stream = connect(addr)?;
    let message = b"idle connection\n";
    stream.write_all(message).map_err(|e| e.to_string())?;
    let mut back = [0u8; 16];
    stream.read_exact(&mut back).map_err(|e| e.to_string())?;
    if &back != message {
        return Err("the echo differs".to_string());
    }
    Ok(stream)
}

/// SO_LINGER with a zero timeout: close(2) sends a reset.
fn reset_on_close(stream: &TcpStream) -> Result<(), String> {
    integration_tests::reset_on_close(stream).map_err(|e| format!("SO_LINGER: {e}"))
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Sends and receives at the same time (a writer thread), so large transfers cannot deadlock.
fn bulk(addr: SocketAddr, send: u64, receive: u64) -> Result<String, String> {
    let stream = connect(addr)?;
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sender = thread::spawn(move || {
        let sent = pattern::write_stream(&mut writer, send, CLIENT_SEED);
        let _ = writer.shutdown(Shutdown::Write);
        sent
    });
    let mut reader = stream;
    let received =
        pattern::read_stream(&mut reader, SERVER_SEED).map_err(|e| format!("receive: {e}"))?;
    sender
        .join()
        .map_err(|_| "sender panicked")?
        .map_err(|e| format!("send: {e}"))?;
    if received != receive {
        return Err(format!("received {received} bytes, expected {receive}"));
    }
    Ok(format!("ok sent={send} received={received} peer={peer}"))
}

fn echo(addr: SocketAddr, conns: u64, bytes: u64) -> Result<String, String> {
    concurrently(addr, conns, move |stream| {
        echo_one(stream, bytes).map(|()| String::new())
    })?;
    Ok(format!("ok connections={conns} bytes={bytes}"))
}

/// Serves until killed: one thread per connection copies what it reads back until EOF, then
/// half-closes.
fn echo_server(addr: SocketAddr) -> Result<String, String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    // std listens with a backlog of 128: a burst of clients would overflow it, and every
    // retransmitted SYN (or syncookie ACK) is one more lookup for sk_lookup to count.
    // SAFETY: listen(2) on a socket this function owns; calling it again only sets the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(format!("listen: {}", std::io::Error::last_os_error()));
    }
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    println!("READY {port}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || echo_until_eof(stream))
            .map_err(|e| format!("spawning an echo thread: {e}"))?;
    }
    Ok(String::new())
}

fn echo_until_eof(stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = stream;
    if std::io::copy(&mut reader, &mut writer).is_ok() {
        let _ = writer.shutdown(Shutdown::Write);
    }
}

/// Runs `work` on `conns` connections at once (every connection is open before any starts,
/// so they are concurrent, not sequential). Returns the first connection's report, or the
/// first failure and how many failed.
fn concurrently(
    addr: SocketAddr,
    conns: u64,
    work: impl Fn(TcpStream) -> Result<String, String> + Send + Sync + 'static,
) -> Result<String, String> {
    let barrier = Arc::new(Barrier::new(conns as usize));
    let work = Arc::new(work);
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let (barrier, work) = (Arc::clone(&barrier), Arc::clone(&work));
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let stream = connect(addr);
                    barrier.wait();
                    work(stream?)
                })
                .expect("spawning a worker")
        })
        .collect();
    let results: Vec<Result<String, String>> = workers
        .into_iter()
        .map(|worker| worker.join().unwrap_or_else(|_| Err("panicked".into())))
        .collect();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(first) = failures.first() {
        return Err(format!(
            "{} of {conns} connections failed; first: {first}",
            failures.len()
        ));
    }
    Ok(results
        .into_iter()
        .next()
        .and_then(Result::ok)
        .unwrap_or_default())
}

fn echo_one(stream: TcpStream, bytes: u64) -> Result<(), String> {
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sender = thread::spawn(move || {
        let sent = pattern::write_stream(&mut writer, bytes, ECHO_SEED);
        let _ = writer.shutdown(Shutdown::Write);
        sent
    });
    let mut reader = stream;
    let received = pattern::read_stream(&mut reader, ECHO_SEED).map_err(|e| e.to_string())?;
    sender
        .join()
        .map_err(|_| "sender panicked")?
        .map_err(|e| e.to_string())?;
    if received != bytes {
        return Err(format!("echoed {received} of {bytes} bytes"));
    }
    Ok(())
}

/// Bytes per chat message: small, as request/response protocols send.
const CHAT_MESSAGE: usize = 100;

/// While a `hold-chatting` connection waits: one round trip this often, at most this many.
const HOLD_CHAT_EVERY: Duration = Duration::from_millis(20);
const HOLD_CHAT_MAX_ROUNDS: u64 = 15_000;

/// What a chatting connection does after its round trips.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    Bulk,
    HoldThenBulk,
    HoldChattingThenBulk,
    ExpectReset,
}

fn chat(
    addr: SocketAddr,
    conns: u64,
    rounds: u64,
    bulk: u64,
    then: Then,
) -> Result<String, String> {
    if matches!(then, Then::HoldThenBulk | Then::HoldChattingThenBulk) && conns != 1 {
        return Err("hold needs exactly one connection".into());
    }
    let ending = concurrently(addr, conns, move |stream| {
        chat_one(stream, rounds, bulk, then)
    })?;
    Ok(format!(
        "ok connections={conns} rounds={rounds} bulk={bulk} {ending}"
    ))
}

/// Round trips of the echo stream, then the bulk phase (or a hold, or an expected reset).
fn chat_one(stream: TcpStream, rounds: u64, bulk: u64, then: Then) -> Result<String, String> {
    let mut stream = stream;
    let mut offset = 0u64;
    for round in 0..rounds {
        round_trip(&mut stream, &mut offset).map_err(|e| format!("round {round}: {e}"))?;
    }
    let mut ending = String::new();
    match then {
        Then::ExpectReset => return expect_reset(&mut stream),
        Then::HoldThenBulk => {
            say_chatted()?;
            std::io::stdin()
                .read_line(&mut String::new())
                .map_err(|e| e.to_string())?;
        }
        Then::HoldChattingThenBulk => {
            say_chatted()?;
            let extra = chat_until_released(&mut stream, &mut offset)?;
            ending = format!("extra_rounds={extra}");
        }
        Then::Bulk => {}
    }
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sender = thread::spawn(move || {
        let sent = pattern::write_stream_from(&mut writer, offset, bulk, ECHO_SEED);
        let _ = writer.shutdown(Shutdown::Write);
        sent
    });
    let received = pattern::read_stream_from(&mut stream, offset, ECHO_SEED)
        .map_err(|e| format!("bulk: receive: {e}"))?;
    sender
        .join()
        .map_err(|_| "sender panicked")?
        .map_err(|e| format!("bulk: send: {e}"))?;
    if received != bulk {
        return Err(format!("echoed {received} of {bulk} bulk bytes"));
    }
    Ok(ending)
}

/// One small message to the echo server and its echo, checked; `offset` moves past it.
fn round_trip(stream: &mut TcpStream, offset: &mut u64) -> Result<(), String> {
    let mut message = [0u8; CHAT_MESSAGE];
    let mut reply = [0u8; CHAT_MESSAGE];
    pattern::fill(&mut message, *offset, ECHO_SEED);
    stream
        .write_all(&message)
        .map_err(|e| format!("send: {e}"))?;
    stream
        .read_exact(&mut reply)
        .map_err(|e| format!("receive: {e}"))?;
    pattern::check(&reply, *offset, ECHO_SEED).map_err(|bad| format!("corrupt at byte {bad}"))?;
    *offset += CHAT_MESSAGE as u64;
    Ok(())
}

fn say_chatted() -> Result<(), String> {
    println!("chatted");
    std::io::stdout().flush().map_err(|e| e.to_string())
}

/// Round trips every HOLD_CHAT_EVERY until stdin has a line (or ends); returns how many.
fn chat_until_released(stream: &mut TcpStream, offset: &mut u64) -> Result<u64, String> {
    let released = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&released);
    thread::spawn(move || {
        let _ = std::io::stdin().read_line(&mut String::new());
        flag.store(true, Ordering::SeqCst);
    });
    let mut extra = 0;
    while !released.load(Ordering::SeqCst) {
        if extra == HOLD_CHAT_MAX_ROUNDS {
            return Err(format!("not released after {extra} held round trips"));
        }
        round_trip(stream, offset).map_err(|e| format!("held round {extra}: {e}"))?;
        extra += 1;
        thread::sleep(HOLD_CHAT_EVERY);
    }
    Ok(extra)
}

/// The next read must fail with a reset (not end cleanly, not time out).
fn expect_reset(stream: &mut TcpStream) -> Result<String, String> {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok("closed=reset".into()),
        Ok(0) => Err("closed cleanly, expected a reset".into()),
        Ok(n) => Err(format!("unexpected {n} bytes, expected a reset")),
        Err(e) => Err(format!("expected a reset: {e}")),
    }
}

fn peer(addr: SocketAddr) -> Result<String, String> {
    let stream = connect(addr)?;
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("getpeername: {e}"))?;
    Ok(format!("peer={peer}"))
}

/// Waits at most IO_TIMEOUT for the far end to close; prints how it closed.
fn expect_close(addr: SocketAddr) -> Result<String, String> {
    // The proxy accepts, then resets when its upstream connect fails; the reset can already be
    // there when connect() checks the socket's error.
    let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Ok("closed=reset".to_string());
        }
        Err(e) => return Err(format!("connect {addr}: {e}")),
    };
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let _ = stream.write_all(b"hello");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => Ok("closed=eof".to_string()),
        Ok(n) => Err(format!("unexpected {n} bytes")),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok("closed=reset".to_string()),
        Err(e) => Err(format!("not closed: {e}")),
    }
}

fn raise_fd_limit() {
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
