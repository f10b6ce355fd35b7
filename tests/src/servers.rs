//! Destination servers on loopback: small Rust servers that check and produce byte patterns,
//! and real Debian servers (python3 http.server, redis-server) started on private ports.

use std::{
    fs,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use crate::{free_port, pattern, process::eventually};

/// Debian's interpreter: the `python3` on PATH may be another one that cannot see Debian's
/// python3-* packages.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Path of a test peer script in tests/peers.
pub fn peer_script(name: &str) -> String {
    format!("{}/peers/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Client streams use seed 1, server replies seed 2.
pub const CLIENT_SEED: u8 = 1;
pub const SERVER_SEED: u8 = 2;

/// What a server saw on one connection.
#[derive(Clone, Debug)]
pub struct Received {
    pub bytes: u64,
    pub error: Option<String>,
}

/// Accept loop on a thread; stops when dropped.
struct AcceptLoop {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl AcceptLoop {
    fn start(addr: SocketAddr, mut on_connection: impl FnMut(TcpStream) + Send + 'static) -> Self {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        // std listens with a backlog of 128; a burst of 1000 connects through the proxy would
        // overflow it, and the kernel's overflow handling then resets some of them. Real servers
        // (redis, nginx) ask for more; so do we (listen(2) again just raises the backlog).
        // SAFETY: a valid listening socket descriptor.
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).expect("blocking stream");
                        on_connection(stream);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self { addr, stop }
    }
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads the client's pattern to EOF while sending `reply_bytes` of its own, then closes.
/// With a gate, it pauses after the first `pause_after` bytes until the test opens the gate.
pub struct PatternServer {
    accept: AcceptLoop,
    received: Arc<Mutex<Vec<Received>>>,
}

pub struct Gate {
    pub pause_after: u64,
    pub reached: mpsc::Sender<()>,
    pub open: mpsc::Receiver<()>,
}

impl PatternServer {
    pub fn start(addr: &str, reply_bytes: u64) -> Self {
        Self::start_gated(addr, reply_bytes, None)
    }

    pub fn start_gated(addr: &str, reply_bytes: u64, gate: Option<Gate>) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let results = Arc::clone(&received);
        let gate = Arc::new(Mutex::new(gate));
        let addr: SocketAddr = addr.parse().expect("server address");
        let accept = AcceptLoop::start(addr, move |stream| {
            let results = Arc::clone(&results);
            let gate = gate.lock().expect("gate").take();
            thread::spawn(move || {
                let result = serve_pattern(stream, reply_bytes, gate);
                results.lock().expect("results").push(result);
            });
        });
        Self { accept, received }
    }

    pub fn addr(&self) -> SocketAddr {
        self.accept.addr
    }

    /// What the server saw, once `connections` connections have finished (waits up to 30 s:
    /// the server records a connection a moment after the client has already finished).
    pub fn received(&self, connections: usize) -> Vec<Received> {
        let finished = eventually(Duration::from_secs(30), || {
            self.received.lock().expect("results").len() >= connections
        });
        let received = self.received.lock().expect("results").clone();
        assert!(
            finished,
            "server saw {} of {connections} connections",
            received.len()
        );
        received
    }
}

fn serve_pattern(stream: TcpStream, reply_bytes: u64, gate: Option<Gate>) -> Received {
    let mut writer = stream.try_clone().expect("clone stream");
    let sender = thread::spawn(move || {
        let sent = pattern::write_stream(&mut writer, reply_bytes, SERVER_SEED);
        let _ = writer.shutdown(Shutdown::Write);
        sent
    });
    let mut reader = stream;
    let mut offset = 0;
    if let Some(gate) = gate {
        let mut head = vec![0u8; gate.pause_after as usize];
        if let Err(error) = reader.read_exact(&mut head) {
            return Received {
                bytes: 0,
                error: Some(error.to_string()),
            };
        }
        if let Err(bad) = pattern::check(&head, 0, CLIENT_SEED) {
            return Received {
                bytes: 0,
                error: Some(format!("corrupt at {bad}")),
            };
        }
        offset = gate.pause_after;
        let _ = gate.reached.send(());
        let _ = gate.open.recv_timeout(Duration::from_secs(60));
    }
    let rest = read_pattern_from(&mut reader, offset);
    let sent = sender.join().expect("sender thread");
    match (rest, sent) {
        (Ok(bytes), Ok(())) => Received {
            bytes: offset + bytes,
            error: None,
        },
        (Ok(bytes), Err(error)) => Received {
            bytes: offset + bytes,
            error: Some(format!("send: {error}")),
        },
        (Err(error), _) => Received {
            bytes: offset,
            error: Some(error.to_string()),
        },
    }
}

fn read_pattern_from(reader: &mut impl Read, start: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = start;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(offset - start);
        }
        pattern::check(&buf[..n], offset, CLIENT_SEED)
            .map_err(|bad| std::io::Error::other(format!("corrupt at byte {bad}")))?;
        offset += n as u64;
    }
}

/// Echoes every byte back; after the client's EOF, closes its side too.
pub struct EchoServer {
    accept: AcceptLoop,
}

impl EchoServer {
    pub fn start(addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().expect("server address");
        let accept = AcceptLoop::start(addr, |stream| {
            thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone stream");
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(Shutdown::Write);
            });
        });
        Self { accept }
    }

    pub fn addr(&self) -> SocketAddr {
        self.accept.addr
    }
}

/// A real server process, killed on drop.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts `command` and waits until it accepts on `addr`.
    pub fn command(mut command: Command, addr: SocketAddr) -> Self {
        command.stdout(Stdio::null()).stderr(Stdio::null());
        Self::start_checked(command, addr, |addr| {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }

    /// Starts `command` and waits until it listens on `addr`, seen in /proc/net/tcp without
    /// connecting: a test that counts its connections to a meshed server must not have a
    /// readiness probe among them (under load a probe can time out and be retried, and each
    /// attempt reaches the kernel's inbound program).
    pub fn command_quietly(mut command: Command, addr: SocketAddr) -> Self {
        command.stdout(Stdio::null()).stderr(Stdio::null());
        Self::start_checked(command, addr, listens_on)
    }

    /// Starts `command` (its stdout and stderr as the caller set them) and waits until
    /// `accepting(addr)` says it accepts (a server in a pod's network namespace is checked from
    /// inside it).
    pub fn start_checked(
        mut command: Command,
        addr: SocketAddr,
        accepting: impl Fn(SocketAddr) -> bool,
    ) -> Self {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let server = Self { child, addr };
        let up = eventually(Duration::from_secs(20), || accepting(addr));
        assert!(up, "{command:?} is not accepting on {addr}");
        server
    }

    /// A test peer from tests/peers, run with Debian's python3 (which sees python3-grpcio and
    /// friends), that prints "READY <port>" once it listens on 127.0.0.1.
    pub fn peer(script: &str, args: &[&str]) -> Self {
        Self::announced(Self::peer_command(script, args))
    }

    /// The command that runs test peer `script` as a server on a free loopback port.
    pub fn peer_command(script: &str, args: &[&str]) -> Command {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("peers")
            .join(script);
        let mut command = Command::new(SYSTEM_PYTHON);
        command
            .arg(&path)
            .args(["server", "--bind", "127.0.0.1", "--port", "0"])
            .args(args);
        command
    }

    /// Starts `command`, a server that prints "READY <port>" once it listens on 127.0.0.1
    /// (a test peer, or `meshprobe echo-server`).
    pub fn announced(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let port: u16 = line
            .strip_prefix("READY ")
            .and_then(|port| port.trim().parse().ok())
            .unwrap_or_else(|| panic!("{command:?} did not print READY <port>: {line:?}"));
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// nginx serving `root` over h2c (HTTP/2 prior knowledge) on 127.0.0.1.
    pub fn nginx_h2c(root: &Path) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::command(Self::nginx_h2c_command(root, addr), addr)
    }

    /// The nginx command line (and its config beside `root`) serving `root` over h2c on `addr`.
    pub fn nginx_h2c_command(root: &Path, addr: SocketAddr) -> Command {
        let dir = root.parent().expect("root has a parent");
        let temp = |name: &str| format!("{name} {}/{name};", dir.display());
        let config = format!(
            "worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; {body} {proxy} {fastcgi} {uwsgi} {scgi}\n\
               server {{ listen {addr} http2; root {root}; }} }}\n",
            dir = dir.display(),
            root = root.display(),
            body = temp("client_body_temp_path"),
            proxy = temp("proxy_temp_path"),
            fastcgi = temp("fastcgi_temp_path"),
            uwsgi = temp("uwsgi_temp_path"),
            scgi = temp("scgi_temp_path"),
        );
        let config_path = dir.join("nginx.conf");
        fs::write(&config_path, config).expect("writing nginx.conf");
        let mut command = Command::new("nginx");
        command.arg("-c").arg(&config_path).arg("-p").arg(dir);
        command
    }

    /// python3's http.server serving `dir` on 127.0.0.1.
    pub fn http(dir: &Path) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::command(Self::http_command(dir, addr), addr)
    }

    /// The http.server command line serving `dir` on `addr` (it logs each client to stderr).
    pub fn http_command(dir: &Path, addr: SocketAddr) -> Command {
        let mut command = Command::new("python3");
        command
            .args([
                "-m",
                "http.server",
                "--bind",
                &addr.ip().to_string(),
                "--directory",
            ])
            .arg(dir)
            .arg(addr.port().to_string());
        command
    }

    /// redis-server on 127.0.0.1, no persistence.
    pub fn redis() -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::command(Self::redis_command(addr), addr)
    }

    /// The redis-server command line on `addr`, no persistence.
    pub fn redis_command(addr: SocketAddr) -> Command {
        let mut command = Command::new("redis-server");
        command.args([
            "--bind",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ]);
        command.args(["--save", "", "--appendonly", "no", "--protected-mode", "no"]);
        command
    }
}

impl Drop for ServerProcess {
    /// SIGTERM first, so a server with worker processes (nginx) takes them down with it: a
    /// SIGKILLed nginx master leaves its workers running. SIGKILL if it has not gone in 5 s.
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = eventually(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `len` pseudo-random-looking bytes to `path` (for download checks).
pub fn write_file(path: &Path, len: usize) {
    let mut buf = vec![0u8; len];
    pattern::fill(&mut buf, 0, 7);
    fs::File::create(path)
        .and_then(|mut file| file.write_all(&buf))
        .expect("writing a file");
}

/// Whether a socket in this network namespace listens on IPv4 `addr` (per /proc/net/tcp:
/// each row's local address is the address's bytes as a native-endian hex word, then the
/// port in hex; state 0A is LISTEN).
pub fn listens_on(addr: SocketAddr) -> bool {
    let SocketAddr::V4(addr) = addr else {
        return false;
    };
    let wanted = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(addr.ip().octets()),
        addr.port()
    );
    let any = format!("00000000:{:04X}", addr.port());
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|row| {
        let fields: Vec<&str> = row.split_whitespace().collect();
        fields.len() > 3 && fields[3] == "0A" && (fields[1] == wanted || fields[1] == any)
    })
}
