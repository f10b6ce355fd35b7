//! The benchmark's world: origin servers (iperf3, redis, nginx, and small Rust servers), the
//! proxies under test (two sockmesh agents on cgroups of their own, HAProxy, nginx), and how a
//! client reaches a server through each. Everything is on loopback and is torn down on drop.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::probe;

/// The ways a client can reach a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Setup {
    Direct,
    Sockmesh,
    SockmeshSplice,
    SockmeshCopy,
    /// `--accelerate local` (experimental), every TCP backend an opaque port.
    SockmeshAccel,
    /// The server runs in an agent's meshed cgroup, the client outside: inbound capture.
    SockmeshInbound,
    Haproxy,
    NginxStream,
    NginxHttp,
}

impl Setup {
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Sockmesh => "sockmesh",
            Self::SockmeshSplice => "sockmesh-splice-only",
            Self::SockmeshCopy => "sockmesh-userspace-copy",
            Self::SockmeshAccel => "sockmesh-accelerate-local",
            Self::SockmeshInbound => "sockmesh-inbound",
            Self::Haproxy => "haproxy-tcp-splice",
            Self::NginxStream => "nginx-stream",
            Self::NginxHttp => "nginx-http-proxy",
        }
    }
}

/// The servers clients talk to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    Iperf,
    Redis,
    Pong,
    Greeter,
    OriginHttp1,
    OriginHttp2,
}

const TCP_BACKENDS: [Backend; 4] = [
    Backend::Iperf,
    Backend::Redis,
    Backend::Pong,
    Backend::Greeter,
];

pub struct Env {
    dir: PathBuf,
    children: Vec<Child>,
    /// The pid of each spawned process, by its name (`haproxy`, `nginx-proxy`, ...).
    pids: BTreeMap<String, u32>,
    backends: BTreeMap<Backend, SocketAddr>,
    haproxy: BTreeMap<Backend, SocketAddr>,
    nginx_stream: BTreeMap<Backend, SocketAddr>,
    nginx_http: BTreeMap<Backend, SocketAddr>,
    /// Servers inside the inbound agent's meshed cgroup (their clients stay outside).
    inbound_backends: BTreeMap<Backend, SocketAddr>,
    /// Agents whose clients run in their cgroup (outbound).
    pub agents: BTreeMap<Setup, Agent>,
    /// The agent whose servers run in its cgroup (inbound).
    pub inbound_agent: Option<Agent>,
    sockmesh: PathBuf,
}

pub struct Agent {
    cgroup: PathBuf,
    pub pid: u32,
    admin: SocketAddr,
    /// Where its maps are pinned (`bpftool map dump pinned <pin_dir>/<MAP>`).
    pub pin_dir: PathBuf,
}

impl Env {
    /// No servers and no agents yet; `dir` exists.
    fn empty(dir: &Path, sockmesh: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        remove_stale_cgroups();
        Ok(Self {
            dir: dir.to_path_buf(),
            children: Vec::new(),
            pids: BTreeMap::new(),
            backends: BTreeMap::new(),
            haproxy: BTreeMap::new(),
            nginx_stream: BTreeMap::new(),
            nginx_http: BTreeMap::new(),
            inbound_backends: BTreeMap::new(),
            agents: BTreeMap::new(),
            inbound_agent: None,
            sockmesh: sockmesh.to_path_buf(),
        })
    }

    pub fn start(dir: &Path, sockmesh: &Path) -> Result<Self> {
        let mut env = Self::empty(dir, sockmesh)?;
        env.start_backends()?;
        env.start_haproxy()?;
        env.start_nginx_proxy()?;
        for (setup, extra) in [
            (Setup::Sockmesh, None),
            (Setup::SockmeshSplice, Some("--copy-mode=splice")),
            (Setup::SockmeshCopy, Some("--copy-mode=userspace")),
        ] {
            let agent = env.start_agent(setup, extra)?;
            env.agents.insert(setup, agent);
        }
        // The fast path applies to opaque ports only: make every backend one.
        let ports: Vec<String> = env
            .backends
            .values()
            .map(|addr| addr.port().to_string())
            .collect();
        let accelerate = format!("--accelerate=local --opaque-ports={}", ports.join(","));
        let agent = env.start_agent(Setup::SockmeshAccel, Some(&accelerate))?;
        env.agents.insert(Setup::SockmeshAccel, agent);
        let inbound = env.start_agent(Setup::SockmeshInbound, None)?;
        env.start_inbound_backends(&inbound)?;
        env.inbound_agent = Some(inbound);
        Ok(env)
    }

    /// A smaller world for `cargo xtask soak`: the origin servers and one agent
    /// (`Setup::Sockmesh`), no other proxies.
    pub fn start_single(dir: &Path, sockmesh: &Path) -> Result<Self> {
        let mut env = Self::empty(dir, sockmesh)?;
        env.start_backends()?;
        let agent = env.start_agent(Setup::Sockmesh, None)?;
        env.agents.insert(Setup::Sockmesh, agent);
        Ok(env)
    }

    /// The directory of the servers' and agents' logs (`<setup name>.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a client of `setup` connects to reach `backend`; None if the setup cannot.
    pub fn target(&self, setup: Setup, backend: Backend) -> Option<SocketAddr> {
        match setup {
            Setup::Direct
            | Setup::Sockmesh
            | Setup::SockmeshSplice
            | Setup::SockmeshCopy
            | Setup::SockmeshAccel => self.backends.get(&backend).copied(),
            Setup::SockmeshInbound => self.inbound_backends.get(&backend).copied(),
            Setup::Haproxy => self.haproxy.get(&backend).copied(),
            Setup::NginxStream => self.nginx_stream.get(&backend).copied(),
            Setup::NginxHttp => self.nginx_http.get(&backend).copied(),
        }
    }

    /// A command for `program` as a client of `setup`: inside the agent's cgroup for sockmesh.
    pub fn client(&self, setup: Setup, program: &str) -> Command {
        match self.agents.get(&setup) {
            Some(agent) => self.in_cgroup(agent, program),
            None => Command::new(program),
        }
    }

    /// `program` run inside `agent`'s meshed cgroup, through `sockmesh exec`.
    fn in_cgroup(&self, agent: &Agent, program: &str) -> Command {
        let mut command = Command::new(&self.sockmesh);
        command
            .arg("exec")
            .arg("--cgroup")
            .arg(&agent.cgroup)
            .arg("--")
            .arg(program);
        command
    }

    /// CPU seconds (user + system) the proxy of `setup` has used so far, its worker
    /// processes included (nginx's workers are children of its master); None for direct.
    pub fn proxy_cpu_seconds(&self, setup: Setup) -> Option<f64> {
        let pid = match setup {
            Setup::Direct => return None,
            Setup::Haproxy => *self.pids.get("haproxy")?,
            Setup::NginxStream | Setup::NginxHttp => *self.pids.get("nginx-proxy")?,
            Setup::SockmeshInbound => self.inbound_agent.as_ref()?.pid,
            agent => self.agents.get(&agent)?.pid,
        };
        Some(process_tree_cpu_seconds(pid))
    }

    fn spawn(&mut self, name: &str, command: &mut Command) -> Result<()> {
        let log = fs::File::create(self.dir.join(format!("{name}.log")))?;
        // Killed (SIGTERM, SIGKILL), the bench never runs its Drop: the kernel then sends each
        // child SIGTERM as the bench's main thread ends, so no agent, nginx or HAProxy is left
        // running (agents detach and unpin on SIGTERM).
        // SAFETY: prctl(2) is async-signal-safe and changes only the child it runs in.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        self.pids.insert(name.to_string(), child.id());
        self.children.push(child);
        Ok(())
    }

    fn start_backends(&mut self) -> Result<()> {
        let iperf = free_addr()?;
        self.spawn(
            "iperf3",
            Command::new("iperf3").args(["-s", "-B", "127.0.0.1", "-p", &iperf.port().to_string()]),
        )?;
        let redis = free_addr()?;
        self.spawn(
            "redis",
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &redis.port().to_string()])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"]),
        )?;
        let (h1, h2) = (free_addr()?, free_addr()?);
        let www = self.dir.join("www");
        fs::create_dir_all(&www)?;
        fs::write(www.join("index.html"), vec![b'x'; 1024])?;
        let config = nginx_config(
            &self.dir.join("origin"),
            &format!(
                "http {{ access_log off; {temps} keepalive_requests 1000000;\n\
                 server {{ listen {h1}; root {www}; }}\n\
                 server {{ listen {h2} http2; root {www}; }} }}\n",
                temps = nginx_temps(&self.dir.join("origin")),
                www = www.display()
            ),
        )?;
        self.spawn(
            "nginx-origin",
            Command::new("nginx")
                .arg("-c")
                .arg(config)
                .arg("-p")
                .arg(&self.dir),
        )?;
        self.backends = BTreeMap::from([
            (Backend::Iperf, iperf),
            (Backend::Redis, redis),
            (Backend::Pong, probe::start_pong()?),
            (Backend::Greeter, probe::start_greeter()?),
            (Backend::OriginHttp1, h1),
            (Backend::OriginHttp2, h2),
        ]);
        for addr in self.backends.clone().values() {
            wait_listening(*addr)?;
        }
        Ok(())
    }

    /// redis and an HTTP/1 nginx origin inside the inbound agent's cgroup, started after it
    /// (either order works: the agent also finds listeners that were there first).
    fn start_inbound_backends(&mut self, agent: &Agent) -> Result<()> {
        let redis = free_addr()?;
        let mut redis_command = self.in_cgroup(agent, "redis-server");
        redis_command
            .args(["--bind", "127.0.0.1", "--port", &redis.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"]);
        self.spawn("redis-inbound", &mut redis_command)?;
        let h1 = free_addr()?;
        let www = self.dir.join("www");
        let dir = self.dir.join("origin-inbound");
        let config = nginx_config(
            &dir,
            &format!(
                "http {{ access_log off; {temps} keepalive_requests 1000000;\n\
                 server {{ listen {h1}; root {www}; }} }}\n",
                temps = nginx_temps(&dir),
                www = www.display()
            ),
        )?;
        let mut nginx = self.in_cgroup(agent, "nginx");
        nginx.arg("-c").arg(config).arg("-p").arg(&self.dir);
        self.spawn("nginx-origin-inbound", &mut nginx)?;
        self.inbound_backends =
            BTreeMap::from([(Backend::Redis, redis), (Backend::OriginHttp1, h1)]);
        for addr in self.inbound_backends.clone().values() {
            wait_listening(*addr)?;
        }
        Ok(())
    }

    fn start_haproxy(&mut self) -> Result<()> {
        let mut config = String::from(
            "global\n  maxconn 7000\ndefaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  \
             timeout client 120s\n  timeout server 120s\n",
        );
        // The HTTP/1 origin too, as a TCP proxy: the inbound HTTP row compares against it.
        for backend in TCP_BACKENDS.into_iter().chain([Backend::OriginHttp1]) {
            let listen = free_addr()?;
            let server = self.backends[&backend];
            config.push_str(&format!(
                "listen l{}\n  bind {listen}\n  server s {server}\n",
                listen.port()
            ));
            self.haproxy.insert(backend, listen);
        }
        let path = self.dir.join("haproxy.cfg");
        fs::write(&path, config)?;
        self.spawn(
            "haproxy",
            Command::new("haproxy").arg("-db").arg("-f").arg(&path),
        )?;
        for addr in self.haproxy.clone().values() {
            wait_listening(*addr)?;
        }
        Ok(())
    }

    fn start_nginx_proxy(&mut self) -> Result<()> {
        let mut stream = String::from("stream {\n");
        for backend in TCP_BACKENDS {
            let listen = free_addr()?;
            stream.push_str(&format!(
                "  server {{ listen {listen}; proxy_pass {}; }}\n",
                self.backends[&backend]
            ));
            self.nginx_stream.insert(backend, listen);
        }
        stream.push_str("}\n");
        let (http1, http2) = (free_addr()?, free_addr()?);
        let origin = self.backends[&Backend::OriginHttp1];
        let http = format!(
            "http {{ access_log off; {temps} keepalive_requests 1000000;\n\
             upstream origin {{ server {origin}; keepalive 128; }}\n\
             server {{ listen {http1}; listen {http2} http2; location / {{ proxy_pass http://origin; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n",
            temps = nginx_temps(&self.dir.join("proxy"))
        );
        self.nginx_http =
            BTreeMap::from([(Backend::OriginHttp1, http1), (Backend::OriginHttp2, http2)]);
        let config = nginx_config(&self.dir.join("proxy"), &format!("{stream}{http}"))?;
        let config_text = fs::read_to_string(&config)?;
        fs::write(
            &config,
            format!("load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n{config_text}"),
        )?;
        self.spawn(
            "nginx-proxy",
            Command::new("nginx")
                .arg("-c")
                .arg(config)
                .arg("-p")
                .arg(&self.dir),
        )?;
        for addr in self
            .nginx_stream
            .values()
            .chain(self.nginx_http.values())
            .copied()
            .collect::<Vec<_>>()
        {
            wait_listening(addr)?;
        }
        Ok(())
    }

    fn start_agent(&mut self, setup: Setup, extra: Option<&str>) -> Result<Agent> {
        let cgroup = cgroup2_mount()?.join(format!(
            "{CGROUP_PREFIX}{}-{}",
            std::process::id(),
            setup.name()
        ));
        fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        // Every agent has its own ports: they share the host's namespace.
        let (outbound, inbound, admin) = (free_addr()?, free_addr()?, free_addr()?);
        let pin_dir = format!(
            "/sys/fs/bpf/sockmesh-bench-{}-{}",
            std::process::id(),
            setup.name()
        );
        let mut command = Command::new(&self.sockmesh);
        command
            .arg("run")
            .arg("--cgroup")
            .arg(&cgroup)
            .args([
                "--outbound-port",
                &outbound.port().to_string(),
                "--inbound-port",
                &inbound.port().to_string(),
                "--admin-addr",
                &admin.to_string(),
            ])
            .args(["--pin-dir", &pin_dir, "--log-level", "warn"])
            .args(extra.into_iter().flat_map(str::split_whitespace));
        self.spawn(setup.name(), &mut command)?;
        let pid = self.children.last().map(Child::id).unwrap_or(0);
        let agent = Agent {
            cgroup,
            pid,
            admin,
            pin_dir: PathBuf::from(pin_dir),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_ok(admin, "/ready") {
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready (see {}/{}.log)",
                    setup.name(),
                    self.dir.display(),
                    setup.name()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for child in &mut self.children {
            // SIGTERM first, so agents detach and unpin; then make sure.
            // SAFETY: kill(2) on our own children.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for child in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for agent in self.agents.values().chain(&self.inbound_agent) {
            let _ = fs::write(agent.cgroup.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(10);
            while fs::remove_dir(&agent.cgroup).is_err() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Agent {
    /// The agent's /metrics page.
    pub fn metrics(&self) -> Result<String> {
        http_body(self.admin, "/metrics").context("scraping the agent")
    }

    /// The agent's heap in use (its sockmesh_heap_in_use_bytes gauge), in bytes. Unlike
    /// resident memory it does not keep what earlier connections freed.
    pub fn heap_bytes(&self) -> Result<u64> {
        let metrics = http_body(self.admin, "/metrics").context("scraping the agent")?;
        let value = metrics
            .lines()
            .find_map(|line| line.strip_prefix("sockmesh_heap_in_use_bytes "))
            .context("no sockmesh_heap_in_use_bytes in /metrics")?;
        Ok(value.trim().parse::<f64>()? as u64)
    }

    /// The agent's proxied connections open now (the sum of its tcp_open_connections gauges).
    pub fn open_connections(&self) -> Result<u64> {
        let metrics = http_body(self.admin, "/metrics").context("scraping the agent")?;
        let open: f64 = metrics
            .lines()
            .filter(|line| line.starts_with("tcp_open_connections{"))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        Ok(open as u64)
    }

    /// Waits (up to 30 s) until the agent's open connections stop changing (the same count
    /// five looks in a row, 50 ms apart); returns the count.
    pub fn settled_open_connections(&self) -> Result<u64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (mut last, mut same) = (self.open_connections()?, 0);
        while same < 5 {
            if std::time::Instant::now() > deadline {
                bail!("the agent's open connections did not settle (last {last})");
            }
            std::thread::sleep(Duration::from_millis(50));
            let open = self.open_connections()?;
            same = if open == last { same + 1 } else { 0 };
            last = open;
        }
        Ok(last)
    }

    /// CPU seconds (user + system) the agent has used.
    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.pid).unwrap_or(0.0)
    }
}

/// User + system CPU seconds of `pid` and every process below it.
fn process_tree_cpu_seconds(pid: u32) -> f64 {
    let mut total = 0.0;
    let mut parents = vec![pid];
    // Bounded: a process tree here is a master and its few workers.
    for _ in 0..4 {
        if parents.is_empty() {
            break;
        }
        total += parents
            .iter()
            .filter_map(|&pid| process_cpu_seconds(pid))
            .sum::<f64>();
        parents = children_of(&parents);
    }
    total
}

/// Processes whose parent is one of `parents`.
fn children_of(parents: &[u32]) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat_fields(pid)
                .and_then(|fields| fields.get(1)?.parse::<u32>().ok())
                .is_some_and(|ppid| parents.contains(&ppid))
        })
        .collect()
}

/// The fields of /proc/PID/stat after the command name (the state is field 0, the parent
/// pid 1, utime 11, stime 12).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((ticks(11) + ticks(12)) / per_second.max(1.0))
}

fn nginx_temps(dir: &Path) -> String {
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .map(|name| format!("{name}_temp_path {}/{name};", dir.display()))
        .join(" ")
}

/// Writes an nginx config for `body` with its own pid and error log under `dir`.
fn nginx_config(dir: &Path, body: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let config = format!(
        "worker_processes 2; daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log;\n\
         worker_rlimit_nofile 20000;\nevents {{ worker_connections 10000; }}\n{body}",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, config)?;
    Ok(path)
}

/// A free loopback port, never one handed out before in this process (the kernel may give the
/// same ephemeral port twice once the probe socket is closed).
fn free_addr() -> Result<SocketAddr> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .map_err(|_| anyhow::anyhow!("port list poisoned"))?;
    for _ in 0..100 {
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return Ok(addr);
        }
    }
    bail!("no fresh free port")
}

fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn http_ok(addr: SocketAddr, path: &str) -> bool {
    http_body(addr, path).is_ok()
}

/// The body of a 200 answer to GET `path` (HTTP/1.0, so the server closes after it).
fn http_body(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !(response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")) {
        bail!(
            "GET {path}: {}",
            response.lines().next().unwrap_or("no answer")
        );
    }
    let (_, body) = response.split_once("\r\n\r\n").unwrap_or(("", ""));
    Ok(body.to_string())
}

/// An agent's cgroup is this, the bench's pid, '-' and the setup's name.
const CGROUP_PREFIX: &str = "sockmesh-bench-";

/// Removes the (empty) cgroups of earlier benches that were killed before they could: each
/// is named after its bench's pid, and rmdir(2) refuses any cgroup that still has a process.
fn remove_stale_cgroups() {
    let Ok(mount) = cgroup2_mount() else { return };
    let Ok(entries) = fs::read_dir(&mount) else {
        return;
    };
    for entry in entries.filter_map(std::result::Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(CGROUP_PREFIX))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs_type) = line.split_once(" - ")?;
            let point = mount.split_whitespace().nth(4)?;
            (fs_type.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(point))
        })
        .context("no cgroup2 mount")
}
