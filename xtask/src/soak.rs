//! `cargo xtask soak --minutes N`: mixed traffic through one release agent for N minutes, its
//! resources sampled every few seconds. They must stay flat under load, and be back at their
//! pre-traffic baseline once the traffic has stopped and the agent has drained.
//!
//! The traffic kinds run in parallel, each in a loop of bounded, paced rounds (these machines
//! have 2 cores: the point is flatness, not throughput); see `KINDS`. The meshed clients run in
//! the agent's cgroup (`sockmesh exec`); the small ones are `cargo xtask soak-probe` (this
//! binary), which reports its counts on stdout.
//!
//! Writes target/soak/summary.md (the tables, for docs) and target/soak/samples.csv.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::bench::{
    self,
    env::{Agent, Backend, Env, Setup},
    probe,
};

/// The agent's per-connection maps (and INBOUND_PORTS, per meshed listener): sampled, and
/// back at their baseline after the drain.
const MAPS: [&str; 5] = [
    "ORIG_BY_COOKIE",
    "ORIG_BY_TUPLE",
    "FWD_PEERS",
    "FWD_ACTIVE",
    "INBOUND_PORTS",
];
/// Open descriptors other than pipes may differ from the baseline by this much after the drain
/// (the admin server's scrape connection, a listener being re-armed).
const FD_TOLERANCE: i64 = 4;
/// Idle pipes a proxy thread keeps for reuse (agent/src/forward/mod.rs, MAX_IDLE_PIPES): pooled
/// pipes stay open after the traffic, so pipe descriptors are bounded, not back at zero.
const AGENT_MAX_IDLE_PIPES: usize = 256;
/// RSS may grow by this fraction between the sample after the warm-up and the last one under
/// load, or by RSS_GROWTH_MIB, whichever is larger.
const RSS_GROWTH_FRACTION: f64 = 0.20;
const RSS_GROWTH_MIB: f64 = 16.0;
/// How long the agent may take to close everything once the traffic has stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(15);
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Set by SIGINT/SIGTERM, or when the agent dies: every loop ends, every client is killed, the
/// world is torn down (Env's Drop) and the run fails.
static STOP: AtomicBool = AtomicBool::new(false);

/// Internal: the soak's clients and servers (`cargo xtask soak-probe ...`). Each client loops
/// until `--seconds` are up, printing "progress ok=N failed=M" every second, "error: ..." for
/// its first failures, and "done ok=N failed=M" at the end.
#[derive(Subcommand)]
pub enum Probe {
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

/// A traffic kind: what it does, for the summary.
struct Kind {
    name: &'static str,
    what: &'static str,
}

const KINDS: [Kind; 10] = [
    Kind {
        name: "http1",
        what: "wrk -t1 -c8, HTTP/1.1 keep-alive to nginx, 2 ms pause between requests per connection, 10 s rounds",
    },
    Kind {
        name: "h2c",
        what: "h2load -n 2000 -c 4 -m 4 to nginx (h2c), then 1 s pause",
    },
    Kind {
        name: "grpc",
        what: "Python grpcio client: 20 concurrent unary calls, a 20-message bidi stream, or an expected PERMISSION_DENIED (a new connection each), 0.3 s apart",
    },
    Kind {
        name: "chatty-redis",
        what: "redis-benchmark -t set,get -n 3000 -c 4 -d 100 (opaque, chatty: in the kernel), then 1 s pause",
    },
    Kind {
        name: "chatty-echo",
        what: "4 connections at a time: 40 round trips of 100 B, 5 ms apart (in the kernel), then 64 KiB, half-close, whole echo checked",
    },
    Kind {
        name: "bulk",
        what: "2 connections at a time: 16 MiB each way to an echo server (spliced), half-close, every byte checked",
    },
    Kind {
        name: "short",
        what: "a new connection per request, ~80/s: ping/pong (opaque) or HTTP/1.1 GET with Connection: close",
    },
    Kind {
        name: "reset",
        what: "~40 connections/s closed with RST: right after connect, after a ping/pong, or after 10 chatty round trips (intended resets are not failures)",
    },
    Kind {
        name: "half-close",
        what: "~25/s: 4 KiB to an echo server or an HTTP/1.1 keep-alive GET, then shutdown(SHUT_WR), whole answer read to EOF",
    },
    Kind {
        name: "inbound",
        what: "from outside the cgroup to an echo server inside it (~20/s, 1 KiB, half-close), while a meshed process opens and closes a listener every 0.25 s",
    },
];

/// Counts of one traffic kind.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// The first few failures, to show.
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn ok(&self, n: u64) {
        self.ok.fetch_add(n, Ordering::Relaxed);
    }

    fn fail(&self, n: u64, error: String) {
        self.failed.fetch_add(n, Ordering::Relaxed);
        self.note(error);
    }

    fn note(&self, error: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 5 {
            errors.push(error);
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One look at the agent.
#[derive(Clone)]
struct Sample {
    seconds: f64,
    rss_kib: u64,
    heap_bytes: Option<u64>,
    /// Open descriptors other than pipes (sockets, epoll, eventfds, BPF objects, ...).
    fds: usize,
    pipe_fds: usize,
    threads: u64,
    open_connections: f64,
    /// OPEN_REDIRECTS slot 0.
    redirects: u64,
    maps: [usize; MAPS.len()],
    /// Operations so far, over every traffic kind.
    ok: u64,
    failed: u64,
}

impl Sample {
    fn take(agent: &Agent, seconds: f64, tallies: &[Tally]) -> Result<Self> {
        let status = fs::read_to_string(format!("/proc/{}/status", agent.pid))
            .context("the agent is gone")?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        let (mut fds, mut pipe_fds) = (0, 0);
        for entry in fs::read_dir(format!("/proc/{}/fd", agent.pid))?.flatten() {
            match fs::read_link(entry.path()) {
                Ok(target) if target.to_string_lossy().starts_with("pipe:") => pipe_fds += 1,
                Ok(_) => fds += 1,
                // Closed between the listing and the look.
                Err(_) => {}
            }
        }
        let metrics = agent.metrics()?;
        let mut maps = [0; MAPS.len()];
        for (count, map) in maps.iter_mut().zip(MAPS) {
            *count = map_dump(&agent.pin_dir.join(map))?.len();
        }
        let (ok, failed) = tallies.iter().fold((0, 0), |(ok, failed), tally| {
            let (o, f) = tally.counts();
            (ok + o, failed + f)
        });
        Ok(Self {
            seconds,
            rss_kib: field("VmRSS:"),
            heap_bytes: metric_sum(&metrics, "sockmesh_heap_in_use_bytes").map(|v| v as u64),
            fds,
            pipe_fds,
            threads: field("Threads:"),
            open_connections: metric_sum(&metrics, "tcp_open_connections").unwrap_or(0.0),
            redirects: open_redirects(&agent.pin_dir)?,
            maps,
            ok,
            failed,
        })
    }

    fn header() -> String {
        let mut line = format!(
            "{:>7} {:>8} {:>8} {:>5} {:>5} {:>4} {:>5} {:>9}",
            "time", "rss_MiB", "heap_MiB", "fds", "pipes", "thr", "open", "redirects"
        );
        for map in MAPS {
            let _ = write!(line, " {map:>14}");
        }
        line.push_str(&format!(" {:>10} {:>6}", "ok", "failed"));
        line
    }

    fn line(&self, label: &str) -> String {
        let mut line = format!(
            "{:>7} {:>8.1} {:>8} {:>5} {:>5} {:>4} {:>5} {:>9}",
            label,
            mib(self.rss_kib * 1024),
            self.heap_bytes
                .map_or("-".to_string(), |heap| format!("{:.1}", mib(heap))),
            self.fds,
            self.pipe_fds,
            self.threads,
            self.open_connections,
            self.redirects,
        );
        for count in self.maps {
            let _ = write!(line, " {count:>14}");
        }
        line.push_str(&format!(" {:>10} {:>6}", self.ok, self.failed));
        line
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The entries of a pinned map, as `bpftool -j map dump` lists them. (JSON: without BTF
/// values, as a sockhash has, the plain dump prints `key:` lines, not `"key":`.)
fn map_dump(pinned: &Path) -> Result<Vec<serde_json::Value>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pinned)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map dump pinned {}: {}",
            pinned.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool map dump pinned {}: not JSON", pinned.display()))
}

/// OPEN_REDIRECTS slot 0 (agent-common's OPEN_REDIRECTS_SLOT): redirected client sockets still
/// open, as connect4/6 and sockops count them.
fn open_redirects(pin_dir: &Path) -> Result<u64> {
    map_dump(&pin_dir.join("OPEN_REDIRECTS"))?
        .iter()
        .find(|entry| entry["formatted"]["key"].as_u64() == Some(0))
        .and_then(|entry| entry["formatted"]["value"].as_u64())
        .context("OPEN_REDIRECTS has no slot 0")
}

/// The sum of every sample of metric `name` (any labels); None if there is none.
fn metric_sum(metrics: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(value) = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

/// Samples of metric `name` summed by the value of its label `label`.
fn metric_by_label(metrics: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut by = BTreeMap::new();
    let key = format!("{label}=\"");
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(labels) = rest.strip_prefix('{') else {
            continue;
        };
        let value = labels
            .split_once(&key)
            .and_then(|(_, after)| after.split_once('"'))
            .map_or("", |(value, _)| value);
        if let Some(number) = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            *by.entry(value.to_string()).or_insert(0.0) += number;
        }
    }
    by
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
}

fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// A server process of our own, killed on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a server that prints "READY <port>" once it listens on 127.0.0.1.
fn start_announced(mut command: Command, log: &Path) -> Result<(ChildGuard, SocketAddr)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let stdout = child.stdout.take().context("piped stdout")?;
    let guard = ChildGuard(child);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep reading so the server never writes into a closed pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let port: u16 = line
        .strip_prefix("READY ")
        .and_then(|port| port.trim().parse().ok())
        .with_context(|| {
            format!(
                "{command:?} did not print READY <port> (got {line:?}; see {})",
                log.display()
            )
        })?;
    Ok((guard, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// An echo server on a free loopback port: a thread per connection copies what it reads back
/// until EOF, then half-closes.
fn start_echo() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    // SAFETY: raising the backlog of our own listening socket.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                    let Ok(mut writer) = stream.try_clone() else {
                        return;
                    };
                    let mut reader = stream;
                    if std::io::copy(&mut reader, &mut writer).is_ok() {
                        let _ = writer.shutdown(Shutdown::Write);
                    }
                });
        }
    });
    Ok(addr)
}

/// What a client command printed, once it ended.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `command`, calling `on_line` for each line of its stdout as it comes; kills it when it
/// runs longer than `limit` or the soak stops.
fn run_watched(
    command: &mut Command,
    limit: Duration,
    on_line: impl Fn(&str) + Send + Sync,
) -> Result<Finished> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let (stdout, mut stderr) = (
        child.stdout.take().context("piped stdout")?,
        child.stderr.take().context("piped stderr")?,
    );
    let started = Instant::now();
    thread::scope(|scope| {
        let out = scope.spawn(|| {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                on_line(&line);
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let err = scope.spawn(move || {
            let mut all = String::new();
            let _ = stderr.read_to_string(&mut all);
            all
        });
        let mut killed = None;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if killed.is_none() && (stopped() || started.elapsed() > limit) {
                killed = Some(if stopped() { "stopped" } else { "timed out" });
                let _ = child.kill();
            }
            thread::sleep(Duration::from_millis(50));
        };
        let (stdout, stderr) = (
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        );
        if let Some(why) = killed {
            bail!("{command:?} {why} after {:.0?}", started.elapsed());
        }
        Ok(Finished {
            status,
            stdout,
            stderr,
        })
    })
}

/// The world one soak drives.
struct Ctx<'a> {
    env: &'a Env,
    deadline: Instant,
    xtask: String,
    dir: PathBuf,
    grpc_script: PathBuf,
    http1: SocketAddr,
    http2: SocketAddr,
    redis: SocketAddr,
    pong: SocketAddr,
    echo: SocketAddr,
    grpc: SocketAddr,
    inbound_echo: SocketAddr,
}

impl Ctx<'_> {
    fn running(&self) -> bool {
        !stopped() && Instant::now() < self.deadline
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn client(&self, program: &str) -> Command {
        self.env.client(Setup::Sockmesh, program)
    }

    /// Sleeps `pause`, or less when the run ends sooner.
    fn pause(&self, pause: Duration) {
        thread::sleep(pause.min(self.remaining()));
    }

    fn run_kind(&self, name: &str, tally: &Tally) {
        let result = match name {
            "http1" => self.http1(tally),
            "h2c" => self.h2c(tally),
            "grpc" => self.grpc(tally),
            "chatty-redis" => self.redis(tally),
            "chatty-echo" => self.probe(tally, &["chat", &self.echo.to_string()]),
            "bulk" => self.probe(tally, &["bulk", &self.echo.to_string()]),
            "short" => self.probe(
                tally,
                &["short", &self.pong.to_string(), &self.http1.to_string()],
            ),
            "reset" => self.probe(
                tally,
                &["churn", &self.pong.to_string(), &self.echo.to_string()],
            ),
            "half-close" => self.probe(
                tally,
                &[
                    "half-close",
                    &self.echo.to_string(),
                    &self.http1.to_string(),
                ],
            ),
            "inbound" => self.inbound(tally),
            _ => Err(anyhow::anyhow!("no traffic kind {name}")),
        };
        if let Err(error) = result {
            tally.fail(1, format!("{error:#}"));
        }
    }

    fn http1(&self, tally: &Tally) -> Result<()> {
        let script = self.dir.join("soak-pace.lua");
        fs::write(&script, "function delay()\n  return 2\nend\n")?;
        let url = format!("http://{}/index.html", self.http1);
        while self.running() && self.remaining() >= Duration::from_secs(1) {
            let seconds = self.remaining().as_secs().clamp(1, 10);
            let mut wrk = self.client("wrk");
            wrk.args(["-t1", "-c8", &format!("-d{seconds}s"), "--timeout", "10s"])
                .arg("-s")
                .arg(&script)
                .arg(&url);
            let out = match run_watched(&mut wrk, Duration::from_secs(seconds + 30), |_| {}) {
                Ok(out) if out.status.success() => out.stdout,
                Ok(out) => {
                    tally.fail(1, format!("wrk: {}: {}", out.status, out.stderr.trim()));
                    continue;
                }
                Err(error) => {
                    tally.fail(1, format!("{error:#}"));
                    continue;
                }
            };
            // "  12345 requests in 10.00s, 14.50MB read"
            let Some(requests) = out
                .lines()
                .find_map(|line| line.trim().split_once(" requests in "))
                .and_then(|(n, _)| n.trim().parse::<u64>().ok())
            else {
                tally.fail(1, format!("wrk printed no request count: {out}"));
                continue;
            };
            let non_2xx: u64 = out
                .lines()
                .find_map(|line| line.trim().strip_prefix("Non-2xx or 3xx responses:"))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            // "  Socket errors: connect 0, read 0, write 0, timeout 0"
            let socket_errors: u64 = out
                .lines()
                .find_map(|line| line.trim().strip_prefix("Socket errors:"))
                .map(|counts| {
                    counts
                        .split(',')
                        .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                        .sum()
                })
                .unwrap_or(0);
            tally.ok(requests.saturating_sub(non_2xx));
            if non_2xx + socket_errors > 0 {
                let summary: Vec<&str> = out
                    .lines()
                    .filter(|line| line.contains("Non-2xx") || line.contains("Socket errors"))
                    .map(str::trim)
                    .collect();
                tally.fail(
                    non_2xx + socket_errors,
                    format!("wrk: {}", summary.join("; ")),
                );
            }
        }
        Ok(())
    }

    fn h2c(&self, tally: &Tally) -> Result<()> {
        const REQUESTS: u64 = 2000;
        let url = format!("http://{}/index.html", self.http2);
        while self.running() {
            let mut h2load = self.client("h2load");
            h2load.args([
                "-n",
                &REQUESTS.to_string(),
                "-c",
                "4",
                "-m",
                "4",
                "-N",
                "10s",
                &url,
            ]);
            match run_watched(&mut h2load, Duration::from_secs(60), |_| {}) {
                Ok(out) => {
                    // "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, ..."
                    let succeeded = out
                        .stdout
                        .lines()
                        .find_map(|line| line.strip_prefix("requests: "))
                        .and_then(|counts| {
                            counts
                                .split(", ")
                                .find_map(|part| part.strip_suffix(" succeeded"))
                        })
                        .and_then(|n| n.trim().parse::<u64>().ok());
                    match succeeded {
                        Some(succeeded) => {
                            tally.ok(succeeded);
                            if succeeded < REQUESTS || !out.status.success() {
                                let detail: Vec<&str> = out
                                    .stdout
                                    .lines()
                                    .filter(|l| {
                                        l.starts_with("requests:") || l.starts_with("status codes:")
                                    })
                                    .collect();
                                tally.fail(
                                    REQUESTS.saturating_sub(succeeded).max(1),
                                    format!("h2load: {} {}", detail.join("; "), out.stderr.trim()),
                                );
                            }
                        }
                        None => tally.fail(
                            REQUESTS,
                            format!("h2load: {}: {}{}", out.status, out.stdout, out.stderr),
                        ),
                    }
                }
                Err(error) => tally.fail(REQUESTS, format!("{error:#}")),
            }
            self.pause(Duration::from_secs(1));
        }
        Ok(())
    }

    fn grpc(&self, tally: &Tally) -> Result<()> {
        const COUNT: u64 = 20;
        let count = COUNT.to_string();
        let target = self.grpc.to_string();
        let mut round = 0u64;
        while self.running() {
            let (call, expect, calls) = match round % 3 {
                0 => ("many", format!("many ok count={COUNT}"), COUNT),
                1 => ("chat", format!("chat ok count={COUNT}"), COUNT),
                _ => ("fail", "fail ok code=7".to_string(), 1),
            };
            round += 1;
            let mut client = self.client(SYSTEM_PYTHON);
            client
                .arg(&self.grpc_script)
                .args(["client", "--target", &target, call, "--count", &count]);
            match run_watched(&mut client, Duration::from_secs(60), |_| {}) {
                Ok(out) if out.status.success() && out.stdout.contains(&expect) => tally.ok(calls),
                Ok(out) => tally.fail(
                    calls,
                    format!(
                        "grpc {call}: {}: {}{}",
                        out.status,
                        out.stdout.trim(),
                        out.stderr.trim()
                    ),
                ),
                Err(error) => tally.fail(calls, format!("{error:#}")),
            }
            self.pause(Duration::from_millis(300));
        }
        Ok(())
    }

    fn redis(&self, tally: &Tally) -> Result<()> {
        const REQUESTS: u64 = 3000;
        while self.running() {
            let mut bench = self.client("redis-benchmark");
            bench
                .args(["-h", &self.redis.ip().to_string()])
                .args(["-p", &self.redis.port().to_string()])
                .args(["-t", "set,get", "-n", &REQUESTS.to_string()])
                .args(["-c", "4", "-d", "100", "--csv"]);
            match run_watched(&mut bench, Duration::from_secs(60), |_| {}) {
                Ok(out) => {
                    let rows = ["\"SET\"", "\"GET\""]
                        .iter()
                        .filter(|test| out.stdout.lines().any(|line| line.starts_with(*test)))
                        .count() as u64;
                    tally.ok(rows * REQUESTS);
                    if rows < 2 || !out.status.success() {
                        tally.fail(
                            (2 - rows).max(1) * REQUESTS,
                            format!(
                                "redis-benchmark: {}: {}{}",
                                out.status,
                                out.stdout.trim(),
                                out.stderr.trim()
                            ),
                        );
                    }
                }
                Err(error) => tally.fail(2 * REQUESTS, format!("{error:#}")),
            }
            self.pause(Duration::from_secs(1));
        }
        Ok(())
    }

    /// One `soak-probe` client for the whole run, in the meshed cgroup.
    fn probe(&self, tally: &Tally, args: &[&str]) -> Result<()> {
        let seconds = self.remaining().as_secs_f64();
        let mut command = self.client(&self.xtask);
        command
            .arg("soak-probe")
            .args(args)
            .args(["--seconds", &format!("{seconds:.1}")]);
        let on_line = |line: &str| {
            if let Some(counts) = line
                .strip_prefix("progress ")
                .or_else(|| line.strip_prefix("done "))
            {
                let (ok, failed) = parse_counts(counts);
                tally.ok.store(ok, Ordering::Relaxed);
                tally.failed.store(failed, Ordering::Relaxed);
            } else if let Some(error) = line.strip_prefix("error: ") {
                tally.note(error.to_string());
            }
        };
        let limit = Duration::from_secs_f64(seconds) + Duration::from_secs(60);
        let out = run_watched(&mut command, limit, on_line)?;
        if !out.status.success() {
            tally.fail(
                1,
                format!(
                    "soak-probe {}: {}: {}",
                    args[0],
                    out.status,
                    out.stderr.trim()
                ),
            );
        }
        Ok(())
    }

    /// Outside the cgroup, to the meshed echo server (inbound), while a meshed process churns
    /// listeners.
    fn inbound(&self, tally: &Tally) -> Result<()> {
        let listeners = Tally::default();
        let addr = self.inbound_echo;
        thread::scope(|scope| {
            scope.spawn(|| {
                if let Err(error) = self.probe(&listeners, &["listeners"]) {
                    listeners.fail(1, format!("{error:#}"));
                }
            });
            drive(
                &|| self.running(),
                1,
                Duration::from_millis(50),
                tally,
                |round| {
                    echo_half_close(connect(addr)?, round * 1024, 1024)?;
                    Ok(1)
                },
            );
        });
        // The listener churn's failures are the inbound kind's.
        let (_, failed) = listeners.counts();
        for error in listeners.errors() {
            tally.note(format!("listeners: {error}"));
        }
        tally.failed.fetch_add(failed, Ordering::Relaxed);
        Ok(())
    }
}

fn parse_counts(text: &str) -> (u64, u64) {
    let value = |key: &str| {
        text.split_whitespace()
            .find_map(|part| part.strip_prefix(key))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (value("ok="), value("failed="))
}

/// Runs `step(round)` in `workers` threads, `pause` apart, while `running()`; counts what each
/// step returns as done, and each error as one failure.
fn drive(
    running: &(dyn Fn() -> bool + Sync),
    workers: u64,
    pause: Duration,
    tally: &Tally,
    step: impl Fn(u64) -> Result<u64> + Sync,
) {
    thread::scope(|scope| {
        for worker in 0..workers {
            let step = &step;
            scope.spawn(move || {
                let mut round = worker;
                while running() {
                    match step(round) {
                        Ok(done) => tally.ok(done),
                        Err(error) => tally.fail(1, format!("{error:#}")),
                    }
                    round += workers;
                    thread::sleep(pause);
                }
            });
        }
    });
}

/// `cargo xtask soak-probe ...`.
pub fn probe(probe: Probe) -> Result<()> {
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

fn connect(addr: SocketAddr) -> Result<TcpStream> {
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
fn echo_half_close(stream: TcpStream, offset: u64, bytes: u64) -> Result<()> {
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

/// `cargo xtask soak`.
pub fn run(root: &Path, sockmesh: &Path, minutes: u64, interval: u64) -> Result<()> {
    if minutes == 0 || interval == 0 {
        bail!("--minutes and --interval must be at least 1");
    }
    let packages: Vec<&str> = bench::PACKAGES
        .iter()
        .copied()
        .chain(["python3-grpcio"])
        .collect();
    crate::toolchain::ensure_packages(&packages)?;
    probe::raise_fd_limit();
    install_signal_handlers();
    let out_dir = root.join("target/soak");
    let work = out_dir.join("work");
    let _ = fs::remove_dir_all(&work);
    let env = Env::start_single(&work, sockmesh).context("starting the agent and servers")?;
    let result = soak(root, &env, &out_dir, minutes, interval);
    drop(env);
    if stopped() && result.is_ok() {
        bail!("interrupted");
    }
    result
}

fn soak(root: &Path, env: &Env, out_dir: &Path, minutes: u64, interval: u64) -> Result<()> {
    let agent = env
        .agents
        .get(&Setup::Sockmesh)
        .context("no agent started")?;
    let work = env.dir().to_path_buf();
    let xtask = std::env::current_exe()?.to_string_lossy().into_owned();
    let echo = start_echo()?;
    let grpc_script = root.join("tests/peers/grpc_peer.py");
    let mut grpc_server = Command::new(SYSTEM_PYTHON);
    grpc_server
        .arg(&grpc_script)
        .args(["server", "--bind", "127.0.0.1", "--port", "0"]);
    let (_grpc_server, grpc) = start_announced(grpc_server, &work.join("grpc-server.log"))?;
    let mut inbound_server = env.client(Setup::Sockmesh, &xtask);
    inbound_server.args(["soak-probe", "echo-server"]);
    let (_inbound_server, inbound_echo) =
        start_announced(inbound_server, &work.join("inbound-echo-server.log"))?;
    let backend = |backend| {
        env.target(Setup::Sockmesh, backend)
            .with_context(|| format!("no {backend:?}"))
    };
    let duration = Duration::from_secs(minutes * 60);
    let interval = Duration::from_secs(interval);
    let tallies: Vec<Tally> = KINDS.iter().map(|_| Tally::default()).collect();

    // The baseline: the servers are up, nothing has gone through the agent yet.
    thread::sleep(Duration::from_secs(2));
    let baseline = Sample::take(agent, 0.0, &tallies).context("sampling the agent")?;
    eprintln!(
        "soak: {minutes} min of mixed traffic through the agent (pid {}), a sample every {}s; \
         logs in {}",
        agent.pid,
        interval.as_secs(),
        work.display()
    );
    println!("{}", Sample::header());
    println!("{}", baseline.line("base"));

    let started = Instant::now();
    let ctx = Ctx {
        env,
        deadline: started + duration,
        xtask,
        dir: work.clone(),
        grpc_script,
        http1: backend(Backend::OriginHttp1)?,
        http2: backend(Backend::OriginHttp2)?,
        redis: backend(Backend::Redis)?,
        pong: backend(Backend::Pong)?,
        echo,
        grpc,
        inbound_echo,
    };
    let mut samples = Vec::new();
    let mut sample_error = None;
    thread::scope(|scope| {
        for (kind, tally) in KINDS.iter().zip(&tallies) {
            let ctx = &ctx;
            scope.spawn(move || ctx.run_kind(kind.name, tally));
        }
        let mut next = started + interval;
        while next < ctx.deadline && !stopped() {
            while Instant::now() < next && !stopped() {
                thread::sleep(Duration::from_millis(100).min(next - Instant::now().min(next)));
            }
            if stopped() {
                break;
            }
            if !alive(agent.pid) {
                sample_error = Some(anyhow::anyhow!(
                    "the agent died during the soak (see {}/sockmesh.log)",
                    work.display()
                ));
                STOP.store(true, Ordering::SeqCst);
                break;
            }
            match Sample::take(agent, started.elapsed().as_secs_f64(), &tallies) {
                Ok(sample) => {
                    println!("{}", sample.line(&format!("{:.0}s", sample.seconds)));
                    samples.push(sample);
                }
                Err(error) => {
                    sample_error = Some(error.context("sampling the agent"));
                    STOP.store(true, Ordering::SeqCst);
                    break;
                }
            }
            next += interval;
        }
    });
    if let Some(error) = sample_error {
        return Err(error);
    }
    if stopped() {
        bail!("interrupted");
    }
    let traffic_seconds = started.elapsed().as_secs_f64();

    // Drain: everything back to its baseline, or the drain timeout.
    let drain_started = Instant::now();
    let drained = loop {
        let sample = Sample::take(agent, started.elapsed().as_secs_f64(), &tallies)
            .context("sampling the agent after the traffic")?;
        let settled = drain_problems(&baseline, &sample).is_empty();
        if settled || drain_started.elapsed() > DRAIN_TIMEOUT || stopped() {
            break sample;
        }
        thread::sleep(Duration::from_secs(1));
    };
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    println!("{}", drained.line("drained"));

    let metrics = agent.metrics().unwrap_or_default();
    let log = scan_log(&work.join(format!("{}.log", Setup::Sockmesh.name())));
    let mut problems = Vec::new();
    for (kind, tally) in KINDS.iter().zip(&tallies) {
        let (ok, failed) = tally.counts();
        if failed > 0 {
            problems.push(format!(
                "{}: {failed} failed (first: {})",
                kind.name,
                tally.errors().join(" | ")
            ));
        } else if ok == 0 {
            problems.push(format!("{}: nothing succeeded", kind.name));
        }
    }
    problems.extend(drain_problems(&baseline, &drained));
    let growth = rss_growth(&samples, duration, interval);
    if let Some(growth) = &growth
        && growth.grew_kib > growth.bound_kib
    {
        problems.push(format!(
            "RSS grew by {:.1} MiB ({:+.1} %) under load between {:.0}s and {:.0}s; the bound is {:.1} MiB",
            growth.grew_kib / 1024.0,
            growth.percent(),
            growth.from.seconds,
            growth.to.seconds,
            growth.bound_kib / 1024.0
        ));
    }
    let summary = Summary {
        minutes,
        interval,
        traffic_seconds,
        drain_seconds,
        baseline: &baseline,
        samples: &samples,
        drained: &drained,
        growth: growth.as_ref(),
        tallies: &tallies,
        metrics: &metrics,
        log: &log,
        problems: &problems,
    }
    .markdown(root);
    fs::create_dir_all(out_dir)?;
    fs::write(out_dir.join("summary.md"), &summary)?;
    fs::write(
        out_dir.join("samples.csv"),
        csv(&baseline, &samples, &drained),
    )?;
    println!("\n{summary}");
    println!(
        "soak: wrote {0}/summary.md and {0}/samples.csv",
        out_dir.display()
    );
    if !problems.is_empty() {
        bail!("the soak failed:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// What is not back at its baseline after the drain.
fn drain_problems(baseline: &Sample, now: &Sample) -> Vec<String> {
    let mut problems = Vec::new();
    let pool_bound = 2 * AGENT_MAX_IDLE_PIPES * proxy_threads();
    if (now.fds as i64 - baseline.fds as i64).abs() > FD_TOLERANCE {
        problems.push(format!(
            "open fds (not pipes): {} after the drain, {} before the traffic (tolerance ±{FD_TOLERANCE})",
            now.fds, baseline.fds
        ));
    }
    if now.pipe_fds > baseline.pipe_fds + pool_bound {
        problems.push(format!(
            "pipe fds: {} after the drain, more than the idle pipe pool can hold ({pool_bound})",
            now.pipe_fds
        ));
    }
    if now.threads != baseline.threads {
        problems.push(format!(
            "threads: {} after the drain, {} before the traffic",
            now.threads, baseline.threads
        ));
    }
    if now.open_connections != baseline.open_connections {
        problems.push(format!(
            "tcp_open_connections: {} after the drain, {} before the traffic",
            now.open_connections, baseline.open_connections
        ));
    }
    if now.redirects != baseline.redirects {
        problems.push(format!(
            "OPEN_REDIRECTS (redirected sockets open): {} after the drain, {} before the traffic",
            now.redirects, baseline.redirects
        ));
    }
    for ((map, after), before) in MAPS.iter().zip(now.maps).zip(baseline.maps) {
        if after != before {
            problems.push(format!(
                "{map}: {after} entries after the drain, {before} before the traffic"
            ));
        }
    }
    problems
}

/// The agent runs one proxy thread per CPU (agent/src/run.rs).
fn proxy_threads() -> usize {
    thread::available_parallelism().map_or(1, usize::from)
}

struct Growth<'a> {
    from: &'a Sample,
    to: &'a Sample,
    grew_kib: f64,
    bound_kib: f64,
}

impl Growth<'_> {
    fn percent(&self) -> f64 {
        self.grew_kib / self.from.rss_kib.max(1) as f64 * 100.0
    }
}

/// RSS growth from the first sample after the warm-up (3 intervals or 20 % of the run,
/// whichever is later) to the last one under load.
fn rss_growth(samples: &[Sample], duration: Duration, interval: Duration) -> Option<Growth<'_>> {
    let warm_up = (3 * interval).max(duration / 5).as_secs_f64();
    let from = samples
        .iter()
        .find(|sample| sample.seconds >= warm_up - 0.5)
        .or(samples.first())?;
    let to = samples.last()?;
    let bound_kib = (from.rss_kib as f64 * RSS_GROWTH_FRACTION).max(RSS_GROWTH_MIB * 1024.0);
    Some(Growth {
        from,
        to,
        grew_kib: to.rss_kib as f64 - from.rss_kib as f64,
        bound_kib,
    })
}

/// Warnings and errors in the agent's log: their count and the first few distinct messages.
struct LogScan {
    warnings: usize,
    errors: usize,
    first: Vec<String>,
}

fn scan_log(path: &Path) -> LogScan {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut scan = LogScan {
        warnings: 0,
        errors: 0,
        first: Vec::new(),
    };
    for line in text.lines() {
        let line = strip_ansi(line);
        let level = if line.contains(" WARN ") {
            &mut scan.warnings
        } else if line.contains(" ERROR ") {
            &mut scan.errors
        } else {
            continue;
        };
        *level += 1;
        // Without the timestamp, so that repeats look alike.
        let message = line
            .split_once(' ')
            .map_or(line.as_str(), |(_, rest)| rest)
            .trim()
            .to_string();
        if scan.first.len() < 5 && !scan.first.contains(&message) {
            scan.first.push(message);
        }
    }
    scan
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn csv(baseline: &Sample, samples: &[Sample], drained: &Sample) -> String {
    let mut csv = String::from(
        "phase,seconds,rss_kib,heap_bytes,fds,pipe_fds,threads,open_connections,open_redirects",
    );
    for map in MAPS {
        let _ = write!(csv, ",{map}");
    }
    csv.push_str(",ok,failed\n");
    let phases = std::iter::once(("baseline", baseline))
        .chain(samples.iter().map(|sample| ("load", sample)))
        .chain(std::iter::once(("drained", drained)));
    for (phase, s) in phases {
        let _ = write!(
            csv,
            "{phase},{:.1},{},{},{},{},{},{},{}",
            s.seconds,
            s.rss_kib,
            s.heap_bytes.map_or(String::new(), |h| h.to_string()),
            s.fds,
            s.pipe_fds,
            s.threads,
            s.open_connections,
            s.redirects
        );
        for count in s.maps {
            let _ = write!(csv, ",{count}");
        }
        let _ = writeln!(csv, ",{},{}", s.ok, s.failed);
    }
    csv
}

struct Summary<'a> {
    minutes: u64,
    interval: Duration,
    traffic_seconds: f64,
    drain_seconds: f64,
    baseline: &'a Sample,
    samples: &'a [Sample],
    drained: &'a Sample,
    growth: Option<&'a Growth<'a>>,
    tallies: &'a [Tally],
    metrics: &'a str,
    log: &'a LogScan,
    problems: &'a [String],
}

impl Summary<'_> {
    fn markdown(&self, root: &Path) -> String {
        let mut md = String::new();
        let commit = Command::new("git")
            .current_dir(root)
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .unwrap_or_default();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let _ = writeln!(
            md,
            "### Soak: {} min of mixed traffic, a sample every {} s\n\n\
             Release agent (`--copy-mode sockmap`, the default), commit {commit}, kernel {}, \
             {} CPUs. Traffic ran {:.0} s; the agent drained in {:.1} s.\n",
            self.minutes,
            self.interval.as_secs(),
            kernel.trim(),
            proxy_threads(),
            self.traffic_seconds,
            self.drain_seconds
        );
        let peak = |f: &dyn Fn(&Sample) -> f64| self.samples.iter().map(f).fold(f64::NAN, f64::max);
        let (from, to) = match self.growth {
            Some(growth) => (Some(growth.from), Some(growth.to)),
            None => (None, None),
        };
        let at = |sample: Option<&Sample>| {
            sample.map_or("-".to_string(), |s| format!("{:.0}s", s.seconds))
        };
        let _ = writeln!(
            md,
            "| agent | before traffic | after warm-up ({}) | last under load ({}) | peak under load | after drain |",
            at(from),
            at(to)
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: |");
        type Column<'a> = (&'a str, Box<dyn Fn(&Sample) -> f64 + 'a>, usize);
        let mut rows: Vec<Column> = vec![
            ("RSS (MiB)", Box::new(|s: &Sample| mib(s.rss_kib * 1024)), 1),
            (
                "heap in use (MiB)",
                Box::new(|s: &Sample| s.heap_bytes.map_or(f64::NAN, mib)),
                1,
            ),
            (
                "open fds, pipes excluded",
                Box::new(|s: &Sample| s.fds as f64),
                0,
            ),
            (
                "pipe fds (in use + pooled)",
                Box::new(|s: &Sample| s.pipe_fds as f64),
                0,
            ),
            ("threads", Box::new(|s: &Sample| s.threads as f64), 0),
            (
                "tcp_open_connections",
                Box::new(|s: &Sample| s.open_connections),
                0,
            ),
            (
                "OPEN_REDIRECTS (redirected sockets open)",
                Box::new(|s: &Sample| s.redirects as f64),
                0,
            ),
        ];
        for (i, map) in MAPS.iter().enumerate() {
            rows.push((map, Box::new(move |s: &Sample| s.maps[i] as f64), 0));
        }
        for (name, value, decimals) in &rows {
            let cell = |v: f64| {
                if v.is_nan() {
                    "-".to_string()
                } else {
                    format!("{v:.decimals$}")
                }
            };
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {} |",
                cell(value(self.baseline)),
                from.map_or("-".to_string(), |s| cell(value(s))),
                to.map_or("-".to_string(), |s| cell(value(s))),
                cell(peak(value.as_ref())),
                cell(value(self.drained))
            );
        }
        if let Some(growth) = self.growth {
            let _ = writeln!(
                md,
                "\nRSS under load: {:+.1} MiB ({:+.1} %) from {:.0}s to {:.0}s; the bound is {:.1} MiB \
                 (max of {:.0} % and {RSS_GROWTH_MIB:.0} MiB).",
                growth.grew_kib / 1024.0,
                growth.percent(),
                growth.from.seconds,
                growth.to.seconds,
                growth.bound_kib / 1024.0,
                RSS_GROWTH_FRACTION * 100.0
            );
        }
        let _ = writeln!(md, "\n| traffic | what | ok | failed |");
        let _ = writeln!(md, "| --- | --- | ---: | ---: |");
        for (kind, tally) in KINDS.iter().zip(self.tallies) {
            let (ok, failed) = tally.counts();
            let _ = writeln!(md, "| {} | {} | {ok} | {failed} |", kind.name, kind.what);
        }
        let sum = |name: &str| metric_sum(self.metrics, name).unwrap_or(0.0);
        let by = |name: &str, label: &str| {
            let by = metric_by_label(self.metrics, name, label);
            if by.is_empty() {
                return "none".to_string();
            }
            by.iter()
                .map(|(value, n)| {
                    let value = if value.is_empty() { "clean" } else { value };
                    format!("{value} {n}")
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let proxied = sum("tcp_open_total");
        let _ = writeln!(
            md,
            "\nThe agent proxied {proxied:.0} connections ({:.0} requests at the HTTP level). \
             Closes: {}. Opaque forwarding: {}. Detection: {}. Upstream connect errors: {:.0}; \
             accept errors: {:.0}; HTTP errors the agent answered itself: {}.",
            sum("request_total"),
            by("tcp_close_total", "errno"),
            by("sockmesh_opaque_connections_total", "mode"),
            by("tcp_detect_total", "result"),
            sum("tcp_connect_errors_total"),
            sum("sockmesh_accept_errors_total"),
            by("sockmesh_http_errors_total", "reason"),
        );
        if let Some(growth) = self.growth
            && proxied > 0.0
        {
            let _ = writeln!(
                md,
                "\nA leak of more than {:.0} bytes per proxied connection would have broken the RSS bound.",
                growth.bound_kib * 1024.0 / proxied
            );
        }
        let _ = writeln!(
            md,
            "\nAgent log (`--log-level warn`): {} warnings, {} errors.",
            self.log.warnings, self.log.errors
        );
        for message in &self.log.first {
            let _ = writeln!(md, "- `{message}`");
        }
        if self.problems.is_empty() {
            let _ = writeln!(
                md,
                "\n**Verdict: pass.** Every traffic kind succeeded; after the drain, fds (±{FD_TOLERANCE}), \
                 threads, open connections and map entries are back at their baseline; RSS stayed within its bound."
            );
        } else {
            let _ = writeln!(md, "\n**Verdict: FAIL.**");
            for problem in self.problems {
                let _ = writeln!(md, "- {problem}");
            }
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seconds: f64, rss_mib: u64) -> Sample {
        Sample {
            seconds,
            rss_kib: rss_mib * 1024,
            heap_bytes: None,
            fds: 80,
            pipe_fds: 1,
            threads: 8,
            open_connections: 0.0,
            redirects: 0,
            maps: [0, 0, 0, 0, 1],
            ok: 0,
            failed: 0,
        }
    }

    const METRICS: &str = "# TYPE tcp_open_connections gauge\n\
        tcp_open_connections{direction=\"outbound\",target_port=\"80\"} 3\n\
        tcp_open_connections{direction=\"inbound\",target_port=\"81\"} 2\n\
        tcp_open_connections_other 100\n\
        tcp_close_total{direction=\"outbound\",target_port=\"80\",errno=\"\"} 7\n\
        tcp_close_total{direction=\"outbound\",target_port=\"81\",errno=\"ECONNRESET\"} 2\n\
        tcp_close_total{direction=\"inbound\",target_port=\"81\",errno=\"\"} 1\n\
        sockmesh_heap_in_use_bytes 1048576\n";

    #[test]
    fn metrics_are_summed_over_labels_and_by_label() {
        assert_eq!(metric_sum(METRICS, "tcp_open_connections"), Some(5.0));
        assert_eq!(
            metric_sum(METRICS, "sockmesh_heap_in_use_bytes"),
            Some(1048576.0)
        );
        assert_eq!(metric_sum(METRICS, "tcp_open_total"), None);
        let closes = metric_by_label(METRICS, "tcp_close_total", "errno");
        assert_eq!(closes.get(""), Some(&8.0));
        assert_eq!(closes.get("ECONNRESET"), Some(&2.0));
    }

    #[test]
    fn probe_progress_lines_parse() {
        assert_eq!(parse_counts("ok=12 failed=3"), (12, 3));
        assert_eq!(parse_counts("failed=1"), (0, 1));
    }

    #[test]
    fn rss_growth_starts_after_the_warm_up() {
        let samples: Vec<Sample> = (1..=12).map(|i| sample(i as f64 * 5.0, 10 + i)).collect();
        let growth =
            rss_growth(&samples, Duration::from_secs(60), Duration::from_secs(5)).expect("samples");
        assert_eq!(growth.from.seconds, 15.0);
        assert_eq!(growth.to.seconds, 60.0);
        assert_eq!(growth.grew_kib, 9.0 * 1024.0);
        // 20 % of 13 MiB is less than the 16 MiB floor.
        assert_eq!(growth.bound_kib, 16.0 * 1024.0);
        // 10 minutes: 20 % of the run (120 s) is after 3 intervals.
        let long: Vec<Sample> = (1..=120).map(|i| sample(i as f64 * 5.0, 200)).collect();
        let growth =
            rss_growth(&long, Duration::from_secs(600), Duration::from_secs(5)).expect("samples");
        assert_eq!(growth.from.seconds, 120.0);
        assert_eq!(growth.bound_kib, 40.0 * 1024.0);
    }

    #[test]
    fn the_drain_check_names_what_grew() {
        let baseline = sample(0.0, 10);
        let mut after = sample(70.0, 12);
        after.fds += FD_TOLERANCE as usize;
        after.pipe_fds = 13;
        assert!(drain_problems(&baseline, &after).is_empty());
        after.fds += 1;
        after.threads += 1;
        after.open_connections = 1.0;
        after.redirects = 2;
        after.maps[2] = 4;
        after.pipe_fds = 2 + 2 * AGENT_MAX_IDLE_PIPES * proxy_threads();
        let problems = drain_problems(&baseline, &after).join("\n");
        for what in [
            "open fds",
            "pipe fds",
            "threads",
            "tcp_open_connections",
            "OPEN_REDIRECTS",
            "FWD_PEERS: 4 entries",
        ] {
            assert!(problems.contains(what), "{what} missing in {problems}");
        }
    }

    #[test]
    fn log_lines_lose_their_colours() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x"),
            "2026-01-01T00:00:00Z  WARN x"
        );
    }
}
