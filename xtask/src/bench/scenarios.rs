//! The measurements: each scenario runs a real client against one backend through one setup
//! and reports one or more numbers. Clients are the usual tools (iperf3, redis-benchmark, wrk,
//! h2load) plus the bench probes for connection rate, greeting time and idle memory.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{
    env::{Backend, Env, Setup},
    probe::Carry,
};

/// One number a scenario produces.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

const fn metric(name: &'static str, unit: &'static str, higher_is_better: bool) -> Metric {
    Metric {
        name,
        unit,
        higher_is_better,
    }
}

/// How long and how much: the quick smoke run shrinks every knob.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub seconds: u32,
    pub redis_requests: u32,
    pub samples: u32,
    pub idle_connections: u32,
    pub h2_requests: u32,
}

impl Scale {
    pub const FULL: Self = Self {
        seconds: 5,
        redis_requests: 100_000,
        samples: 300,
        idle_connections: 5000,
        h2_requests: 100_000,
    };
    pub const QUICK: Self = Self {
        seconds: 1,
        redis_requests: 5_000,
        samples: 30,
        idle_connections: 300,
        h2_requests: 5_000,
    };
}

#[derive(Clone, Copy, Debug)]
pub enum Scenario {
    Iperf {
        streams: u32,
        reverse: bool,
    },
    RedisGet {
        clients: u32,
    },
    ConnectionRate,
    Http1Wrk,
    Http2H2load,
    Greeting,
    /// redis GET -c 1 latency with and without an attack on the HTTP origin through the same
    /// setup: does a hostile client slow the others down?
    RedisUnderAttack {
        attack: Attack,
    },
    /// redis GET -c 50 to a server in the inbound agent's cgroup.
    InboundRedisGet,
    /// wrk to an HTTP/1 origin in the inbound agent's cgroup.
    InboundHttp1Wrk,
    IdleMemory,
    /// Idle keep-alive connections that have each carried one HTTP/1.1 request.
    IdleHttpMemory,
    /// Idle h2c connections that have each carried one request.
    IdleHttp2Memory,
}

pub const ALL: [Scenario; 15] = [
    Scenario::Iperf {
        streams: 1,
        reverse: false,
    },
    Scenario::Iperf {
        streams: 1,
        reverse: true,
    },
    Scenario::Iperf {
        streams: 4,
        reverse: false,
    },
    Scenario::Iperf {
        streams: 4,
        reverse: true,
    },
    Scenario::RedisGet { clients: 50 },
    Scenario::RedisGet { clients: 1 },
    Scenario::ConnectionRate,
    Scenario::Http1Wrk,
    Scenario::Http2H2load,
    Scenario::Greeting,
    Scenario::RedisUnderAttack {
        attack: Attack::SlowLoris,
    },
    Scenario::RedisUnderAttack {
        attack: Attack::SilentFlood,
    },
    Scenario::RedisUnderAttack {
        attack: Attack::Junk,
    },
    Scenario::InboundRedisGet,
    Scenario::InboundHttp1Wrk,
];

const TCP_SETUPS: [Setup; 7] = [
    Setup::Direct,
    Setup::Sockmesh,
    Setup::SockmeshSplice,
    Setup::SockmeshCopy,
    Setup::SockmeshAccel,
    Setup::Haproxy,
    Setup::NginxStream,
];
const HTTP_SETUPS: [Setup; 3] = [Setup::Direct, Setup::Sockmesh, Setup::NginxHttp];
/// Inbound rows: the same servers reached directly, through the agent's inbound capture, and
/// through the TCP proxies.
const INBOUND_TCP_SETUPS: [Setup; 4] = [
    Setup::Direct,
    Setup::SockmeshInbound,
    Setup::Haproxy,
    Setup::NginxStream,
];
const INBOUND_HTTP_SETUPS: [Setup; 4] = [
    Setup::Direct,
    Setup::SockmeshInbound,
    Setup::Haproxy,
    Setup::NginxHttp,
];

impl Scenario {
    pub fn setups(self) -> &'static [Setup] {
        match self {
            Self::Http1Wrk | Self::Http2H2load => &HTTP_SETUPS,
            Self::InboundRedisGet => &INBOUND_TCP_SETUPS,
            Self::InboundHttp1Wrk => &INBOUND_HTTP_SETUPS,
            Self::IdleMemory => &[Setup::Sockmesh, Setup::SockmeshSplice, Setup::SockmeshCopy],
            Self::IdleHttpMemory | Self::IdleHttp2Memory => &[Setup::Sockmesh],
            // The attack needs the HTTP origin, which only these reach.
            Self::RedisUnderAttack { .. } => &[Setup::Direct, Setup::Sockmesh],
            _ => &TCP_SETUPS,
        }
    }

    pub fn metrics(self) -> Vec<Metric> {
        match self {
            Self::Iperf {
                streams: 1,
                reverse: false,
            } => vec![
                metric("iperf3 1 stream, client to server", "Gbit/s", true),
                metric("agent CPU per GB (1 stream)", "s/GB", false),
            ],
            Self::Iperf {
                streams: 1,
                reverse: true,
            } => vec![metric("iperf3 1 stream, server to client", "Gbit/s", true)],
            Self::Iperf { reverse: false, .. } => {
                vec![metric("iperf3 4 streams, client to server", "Gbit/s", true)]
            }
            Self::Iperf { reverse: true, .. } => {
                vec![metric("iperf3 4 streams, server to client", "Gbit/s", true)]
            }
            Self::RedisGet { clients: 1 } => vec![
                metric("redis GET -c 1, p50 latency", "ms", false),
                metric("redis GET -c 1, p99 latency", "ms", false),
            ],
            Self::RedisGet { .. } => vec![
                metric("redis GET -c 50", "req/s", true),
                metric("proxy CPU per request, redis -c 50", "us", false),
            ],
            Self::ConnectionRate => vec![metric("new connection per request", "conn/s", true)],
            Self::Http1Wrk => vec![
                metric("HTTP/1.1 wrk -c 32", "req/s", true),
                metric("proxy CPU per request, wrk", "us", false),
            ],
            Self::Http2H2load => vec![
                metric("HTTP/2 h2load -c 8 -m 10", "req/s", true),
                metric("proxy CPU per request, h2load", "us", false),
            ],
            Self::Greeting => vec![metric("server-first greeting", "us", false)],
            Self::RedisUnderAttack { attack } => vec![
                metric(attack.p99_row(), "ms", false),
                metric(attack.ratio_row(), "x", false),
            ],
            Self::InboundRedisGet => vec![
                metric("inbound: redis GET -c 50", "req/s", true),
                metric("inbound: proxy CPU per request, redis -c 50", "us", false),
            ],
            Self::InboundHttp1Wrk => vec![
                metric("inbound: HTTP/1.1 wrk -c 32", "req/s", true),
                metric("inbound: proxy CPU per request, wrk", "us", false),
            ],
            Self::IdleMemory => vec![metric("agent memory per idle connection", "KiB", false)],
            Self::IdleHttpMemory => vec![metric(
                "agent memory per idle HTTP/1.1 keep-alive connection",
                "KiB",
                false,
            )],
            Self::IdleHttp2Memory => {
                vec![metric("agent memory per idle h2c connection", "KiB", false)]
            }
        }
    }

    /// Runs once; returns one value per metric (None where a metric does not apply).
    pub fn run(self, env: &Env, setup: Setup, scale: Scale) -> Result<Vec<Option<f64>>> {
        match self {
            Self::Iperf { streams, reverse } => iperf(env, setup, scale, streams, reverse),
            Self::RedisGet { clients } => redis(env, setup, scale, clients),
            Self::InboundRedisGet => redis(env, setup, scale, 50),
            Self::InboundHttp1Wrk => wrk(env, setup, scale),
            Self::ConnectionRate => {
                let target = target(env, setup, Backend::Pong)?;
                let out = output(env.client(setup, &xtask_exe()?).args([
                    "bench-probe",
                    "connrate",
                    &target.to_string(),
                    &(scale.seconds as f64 / 2.0).to_string(),
                ]))?;
                Ok(vec![Some(parse_number(&out)?)])
            }
            Self::Http1Wrk => wrk(env, setup, scale),
            Self::Http2H2load => {
                let url = format!(
                    "http://{}/index.html",
                    target(env, setup, Backend::OriginHttp2)?
                );
                let n = scale.h2_requests.to_string();
                let cpu = CpuMeter::start(env, setup);
                let out = output(
                    env.client(setup, "h2load")
                        .args(["-n", &n, "-c", "8", "-m", "10", &url]),
                )?;
                // "finished in 1.23s, 40000.00 req/s, 1.2MB/s"
                let rps = out
                    .lines()
                    .find(|line| line.starts_with("finished in"))
                    .and_then(|line| line.split(", ").nth(1))
                    .and_then(|part| part.strip_suffix(" req/s"))
                    .context("h2load output")?;
                if !out.contains(&format!("{n} succeeded")) {
                    bail!("h2load had failures:\n{out}");
                }
                Ok(vec![
                    Some(parse_number(rps)?),
                    cpu.per_request(f64::from(scale.h2_requests)),
                ])
            }
            Self::Greeting => {
                let target = target(env, setup, Backend::Greeter)?;
                let samples = scale.samples.to_string();
                let out = output(env.client(setup, &xtask_exe()?).args([
                    "bench-probe",
                    "greeting",
                    &target.to_string(),
                    &samples,
                ]))?;
                Ok(vec![Some(parse_number(&out)?)])
            }
            Self::RedisUnderAttack { attack } => redis_under_attack(env, setup, scale, attack),
            Self::IdleMemory => idle_memory(env, setup, scale, Carry::Nothing),
            Self::IdleHttpMemory => idle_memory(env, setup, scale, Carry::Http1),
            Self::IdleHttp2Memory => idle_memory(env, setup, scale, Carry::Http2),
        }
    }
}

fn iperf(
    env: &Env,
    setup: Setup,
    scale: Scale,
    streams: u32,
    reverse: bool,
) -> Result<Vec<Option<f64>>> {
    let target = target(env, setup, Backend::Iperf)?;
    let agent = env.agents.get(&setup);
    let cpu_before = agent.map(|agent| agent.cpu_seconds());
    let mut command = env.client(setup, "iperf3");
    command.args([
        "-c",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
        "-J",
    ]);
    command.args(["-t", &scale.seconds.to_string(), "-P", &streams.to_string()]);
    if reverse {
        command.arg("-R");
    }
    let out = output(&mut command)?;
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    let received = &json["end"]["sum_received"];
    let bits_per_second = received["bits_per_second"]
        .as_f64()
        .context("iperf3 result")?;
    let bytes = received["bytes"].as_f64().unwrap_or(0.0);
    let cpu_per_gb = match (agent, cpu_before) {
        (Some(agent), Some(before)) if bytes > 0.0 => {
            Some((agent.cpu_seconds() - before) / (bytes / 1e9))
        }
        _ => None,
    };
    Ok(if streams == 1 && !reverse {
        vec![Some(bits_per_second / 1e9), cpu_per_gb]
    } else {
        vec![Some(bits_per_second / 1e9)]
    })
}

fn wrk(env: &Env, setup: Setup, scale: Scale) -> Result<Vec<Option<f64>>> {
    let url = format!(
        "http://{}/index.html",
        target(env, setup, Backend::OriginHttp1)?
    );
    let cpu = CpuMeter::start(env, setup);
    let out = output(env.client(setup, "wrk").args([
        "-t2",
        "-c32",
        &format!("-d{}s", scale.seconds),
        &url,
    ]))?;
    let rps = out
        .lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .context("wrk output")?;
    // "  123456 requests in 5.00s, 1.2GB read"
    let requests = out
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .map(|(count, _)| parse_number(count))
        .transpose()?
        .context("wrk output: no request count")?;
    Ok(vec![Some(parse_number(rps)?), cpu.per_request(requests)])
}

/// The proxy's CPU time from `start` to the end of one client run.
struct CpuMeter<'a> {
    env: &'a Env,
    setup: Setup,
    start: Option<f64>,
}

impl<'a> CpuMeter<'a> {
    fn start(env: &'a Env, setup: Setup) -> Self {
        Self {
            env,
            setup,
            start: env.proxy_cpu_seconds(setup),
        }
    }

    /// Microseconds of proxy CPU per request since `start`. Called once the client has
    /// exited: the proxy is idle from then on, so parsing its output first costs nothing.
    fn per_request(self, requests: f64) -> Option<f64> {
        let (start, end) = (self.start?, self.env.proxy_cpu_seconds(self.setup)?);
        (requests > 0.0).then(|| (end - start) / requests * 1e6)
    }
}

fn redis(env: &Env, setup: Setup, scale: Scale, clients: u32) -> Result<Vec<Option<f64>>> {
    let target = target(env, setup, Backend::Redis)?;
    let requests = if clients == 1 {
        scale.redis_requests / 5
    } else {
        scale.redis_requests
    };
    let cpu = CpuMeter::start(env, setup);
    let out = output(env.client(setup, "redis-benchmark").args([
        "-h",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
        "-t",
        "get",
        "-n",
        &requests.to_string(),
        "-c",
        &clients.to_string(),
        "--csv",
    ]))?;
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",...
    let row = out
        .lines()
        .find(|line| line.starts_with("\"GET\""))
        .context("redis-benchmark CSV")?;
    let fields: Vec<f64> = row
        .split(',')
        .skip(1)
        .filter_map(|f| f.trim_matches('"').parse().ok())
        .collect();
    if fields.len() < 6 {
        bail!("redis-benchmark CSV: {row}");
    }
    Ok(if clients == 1 {
        vec![Some(fields[3]), Some(fields[5])]
    } else {
        vec![Some(fields[0]), cpu.per_request(f64::from(requests))]
    })
}

/// What attacks the HTTP/1 origin while redis's latency is measured beside it.
#[derive(Clone, Copy, Debug)]
pub enum Attack {
    /// slowhttptest: 200 connections each sending a header line a second.
    SlowLoris,
    /// 2,000 connections that never send a byte.
    SilentFlood,
    /// Header-less junk as fast as it goes, a new connection whenever one is closed (1 GB at
    /// most).
    Junk,
}

impl Attack {
    fn p99_row(self) -> &'static str {
        match self {
            Self::SlowLoris => "redis GET -c 1, p99 during a slow-loris attack",
            Self::SilentFlood => "redis GET -c 1, p99 during 2,000 silent connections",
            Self::Junk => "redis GET -c 1, p99 during a flood of header-less junk",
        }
    }

    fn ratio_row(self) -> &'static str {
        match self {
            Self::SlowLoris => "p99 during the slow-loris attack / p99 without it",
            Self::SilentFlood => "p99 during the silent connections / p99 without them",
            Self::Junk => "p99 during the junk / p99 without it",
        }
    }

    /// The attacking client, through `setup`, against the HTTP/1 origin at `origin`.
    fn command(self, env: &Env, setup: Setup, origin: std::net::SocketAddr) -> Result<Command> {
        let mut command = match self {
            Self::SlowLoris => {
                let mut command = env.client(setup, "slowhttptest");
                command
                    .args([
                        "-H", "-c", "200", "-r", "200", "-i", "1", "-l", "60", "-p", "3",
                    ])
                    .arg("-u")
                    .arg(format!("http://{origin}/"));
                command
            }
            Self::SilentFlood => {
                let mut command = env.client(setup, &xtask_exe()?);
                command.args(["bench-probe", "hold", &origin.to_string(), "2000"]);
                command
            }
            Self::Junk => {
                let mut command = env.client(setup, &xtask_exe()?);
                command.args(["bench-probe", "junk", &origin.to_string(), "1000"]);
                command
            }
        };
        // The holder holds until its stdin closes: kill() below closes it.
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(command)
    }
}

/// redis GET -c 1 p99 without, then during, `attack` on the HTTP/1 origin, both through
/// `setup`.
fn redis_under_attack(
    env: &Env,
    setup: Setup,
    scale: Scale,
    attack: Attack,
) -> Result<Vec<Option<f64>>> {
    let quiet_p99 = redis(env, setup, scale, 1)?[1].context("redis p99")?;
    let origin = target(env, setup, Backend::OriginHttp1)?;
    let mut attacker = attack
        .command(env, setup, origin)?
        .spawn()
        .with_context(|| format!("starting the {attack:?} attack"))?;
    // Let the attack open its connections before measuring.
    thread::sleep(Duration::from_secs(2));
    let attacked = redis(env, setup, scale, 1);
    let _ = attacker.kill();
    let _ = attacker.wait();
    let attacked_p99 = attacked?[1].context("redis p99")?;
    Ok(vec![Some(attacked_p99), Some(attacked_p99 / quiet_p99)])
}

/// Holds idle connections through the agent; reports the agent's memory growth per connection.
/// Agent heap growth per idle connection (socket buffers are the kernel's and not counted);
/// `http`: each has carried one HTTP/1.1 request.
fn idle_memory(env: &Env, setup: Setup, scale: Scale, carry: Carry) -> Result<Vec<Option<f64>>> {
    let agent = env
        .agents
        .get(&setup)
        .context("idle memory needs an agent")?;
    let (backend, flag) = match carry {
        Carry::Nothing => (Backend::Pong, None),
        Carry::Http1 => (Backend::OriginHttp1, Some("--http")),
        Carry::Http2 => (Backend::OriginHttp2, Some("--http2")),
    };
    let target = target(env, setup, backend)?;
    // Connections the last scenario closed must be gone from the agent, or their freeing
    // would be subtracted from this one's growth.
    let open_before = agent.settled_open_connections()?;
    let before = agent.heap_bytes()?;
    let mut holder = env
        .client(setup, &xtask_exe()?)
        .args([
            "bench-probe",
            "hold",
            &target.to_string(),
            &scale.idle_connections.to_string(),
        ])
        .args(flag)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the idle-connection holder")?;
    let mut ready = String::new();
    BufReader::new(holder.stdout.take().context("holder stdout")?).read_line(&mut ready)?;
    if ready.trim() != "ready" {
        let _ = holder.kill();
        bail!("the holder did not open its connections");
    }
    // Connections beyond the agent's budget went direct: only those it holds count.
    let held = agent
        .settled_open_connections()?
        .saturating_sub(open_before);
    let after = agent.heap_bytes()?;
    drop(holder.stdin.take().map(|mut stdin| stdin.flush()));
    let _ = holder.wait();
    anyhow::ensure!(held > 0, "the agent held none of the idle connections");
    let per_connection = after.saturating_sub(before) as f64 / held as f64 / 1024.0;
    Ok(vec![Some(per_connection)])
}

fn target(env: &Env, setup: Setup, backend: Backend) -> Result<std::net::SocketAddr> {
    env.target(setup, backend)
        .with_context(|| format!("{} cannot reach {backend:?}", setup.name()))
}

fn xtask_exe() -> Result<String> {
    Ok(std::env::current_exe()?.to_string_lossy().into_owned())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_number(text: &str) -> Result<f64> {
    let text = text.trim();
    let number: String = text
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number
        .parse()
        .with_context(|| format!("not a number: {text:?}"))
}
