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

mod probe;
mod report;
mod sample;
mod traffic;
mod verdict;

use std::{
    fs,
    path::Path,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub(crate) use self::probe::{Probe, probe};
use self::{
    report::{Summary, csv},
    sample::Sample,
    traffic::{Ctx, start_announced, start_echo},
    verdict::{alive, drain_problems, rss_growth, scan_log},
};
use crate::bench::{
    self,
    env::{Backend, Env, Setup},
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

/// A traffic kind: what it does, for the summary.
struct Kind {
    name: &'static str,
    what: &'static str,
}

const KINDS: [Kind; 10] = [
    Kind {
        name: "http1",
        what: "wrk -t1 -c8, HTTP/1.1 keep-alive to nginx, 2 ms pause between requests per connection, 10 s rounds, 5 s request timeout",
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
    /// Errors a tool reported that the soak could show were not the agent's (shown, not counted).
    excused: Mutex<Vec<String>>,
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

    /// Records errors that are shown in the summary but do not fail the soak, with the reason.
    fn excuse(&self, why: String) {
        println!("soak: not counted as failures: {why}");
        let mut excused = self.excused.lock().unwrap_or_else(|e| e.into_inner());
        if excused.len() < 5 {
            excused.push(why);
        }
    }

    fn excused(&self) -> Vec<String> {
        self.excused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

/// `cargo xtask soak`.
pub(crate) fn run(root: &Path, sockmesh: &Path, minutes: u64, interval: u64) -> Result<()> {
    if minutes == 0 || interval == 0 {
        bail!("--minutes and --interval must be at least 1");
    }
    let packages: Vec<&str> = bench::PACKAGES
        .iter()
        .copied()
        .chain(["python3-grpcio"])
        .collect();
    crate::toolchain::ensure_packages(&packages)?;
    bench::probe::raise_fd_limit();
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
