//! The helper servers, and the traffic kinds that run through the agent.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    net::{Shutdown, SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{atomic::Ordering, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    SYSTEM_PYTHON, Tally,
    probe::{connect, echo_half_close},
    stopped,
};
use crate::bench::env::{Env, Setup};

/// A server process of our own, killed on drop.
pub(super) struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a server that prints "READY <port>" once it listens on 127.0.0.1.
pub(super) fn start_announced(
    mut command: Command,
    log: &Path,
) -> Result<(ChildGuard, SocketAddr)> {
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
pub(super) fn start_echo() -> Result<SocketAddr> {
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
pub(super) struct Ctx<'a> {
    pub(super) env: &'a Env,
    pub(super) deadline: Instant,
    pub(super) xtask: String,
    pub(super) dir: PathBuf,
    pub(super) grpc_script: PathBuf,
    pub(super) http1: SocketAddr,
    pub(super) http2: SocketAddr,
    pub(super) redis: SocketAddr,
    pub(super) pong: SocketAddr,
    pub(super) echo: SocketAddr,
    pub(super) grpc: SocketAddr,
    pub(super) inbound_echo: SocketAddr,
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

    pub(super) fn run_kind(&self, name: &str, tally: &Tally) {
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
            wrk.args(["-t1", "-c8", &format!("-d{seconds}s"), "--timeout", "5s"])
                .arg("-s")
                .arg(&script)
                .arg(&url);
            let clock = WallClock::now();
            let ran = run_watched(&mut wrk, Duration::from_secs(seconds + 30), |_| {});
            let stepped = clock.stepped();
            let out = match ran {
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
            let socket_errors: u64 = ["connect", "read", "write", "timeout"]
                .iter()
                .map(|kind| socket_error_count(&out, kind))
                .sum();
            tally.ok(requests.saturating_sub(non_2xx));
            let timeouts = socket_error_count(&out, "timeout");
            let socket_errors = if stepped.abs() >= WallClock::STEP && timeouts > 0 {
                tally.excuse(format!(
                    "{timeouts} wrk timeouts in a round during which the wall clock stepped by \
                     {stepped:+.1} s against the monotonic clock (wrk times each request with \
                     gettimeofday, so a step makes requests in flight look that slow)"
                ));
                socket_errors - timeouts
            } else {
                socket_errors
            };
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
pub(super) fn drive(
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

/// One count from wrk's "  Socket errors: connect 0, read 0, write 0, timeout 0" line.
fn socket_error_count(wrk_output: &str, kind: &str) -> u64 {
    wrk_output
        .lines()
        .find_map(|line| line.trim().strip_prefix("Socket errors:"))
        .and_then(|counts| {
            counts.split(',').find_map(|part| {
                let (name, n) = part.trim().split_once(' ')?;
                (name == kind).then(|| n.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

/// Notices the wall clock being set while a tool runs. wrk measures latency with gettimeofday:
/// when the machine's clock is stepped (a paused and resumed VM has its clock corrected), every
/// request in flight at that moment looks as slow as the step, although nothing waited.
struct WallClock {
    wall: std::time::SystemTime,
    monotonic: Instant,
}

impl WallClock {
    /// A step this large is not drift.
    const STEP: f64 = 1.0;

    fn now() -> Self {
        Self {
            wall: std::time::SystemTime::now(),
            monotonic: Instant::now(),
        }
    }

    /// Seconds the wall clock moved more (or less, negative) than the monotonic clock since
    /// `now()`.
    fn stepped(&self) -> f64 {
        let monotonic = self.monotonic.elapsed().as_secs_f64();
        let wall = match std::time::SystemTime::now().duration_since(self.wall) {
            Ok(ahead) => ahead.as_secs_f64(),
            Err(behind) => -behind.duration().as_secs_f64(),
        };
        wall - monotonic
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_progress_lines_parse() {
        assert_eq!(parse_counts("ok=12 failed=3"), (12, 3));
        assert_eq!(parse_counts("failed=1"), (0, 1));
    }

    #[test]
    fn wrk_socket_errors_are_read_by_kind() {
        let out = "  136530 requests in 10.00s, 14.50MB read\n  \
                   Socket errors: connect 0, read 3, write 0, timeout 2\nRequests/sec: 1\n";
        assert_eq!(socket_error_count(out, "read"), 3);
        assert_eq!(socket_error_count(out, "timeout"), 2);
        assert_eq!(socket_error_count(out, "connect"), 0);
        assert_eq!(socket_error_count("no such line", "timeout"), 0);
    }

    #[test]
    fn an_unchanged_wall_clock_has_not_stepped() {
        let clock = WallClock::now();
        assert!(clock.stepped().abs() < WallClock::STEP);
    }
}
