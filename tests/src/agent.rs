//! A real `sockmesh run`, attached to a test cgroup, on ports and a pin dir of its own so tests
//! can run side by side.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{Metrics, TestCgroup, free_port, process::eventually, sockmesh_bin, temp_dir};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const METRIC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct AgentOptions {
    /// Extra flags for `sockmesh run`.
    pub args: Vec<String>,
    /// Run the agent inside the meshed cgroup itself (as in a DaemonSet whose pod is meshed).
    pub inside_cgroup: bool,
    /// The directory of the CNI socket and the pod registry (default: a fresh temp dir); an
    /// agent restarted with the same one re-adopts its pods.
    pub cni_dir: Option<PathBuf>,
}

pub struct Agent {
    child: Child,
    pub outbound_port: u16,
    /// A port of its own: agents of tests running at once share the host's namespace, and
    /// two inbound listeners on one port would join one SO_REUSEPORT group.
    pub inbound_port: u16,
    pub admin: SocketAddr,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
    /// Where `sockmesh-cni` reaches this agent.
    pub cni_socket: PathBuf,
}

impl Agent {
    pub fn start(cgroup: &TestCgroup) -> Self {
        Self::start_with(cgroup, AgentOptions::default())
    }

    pub fn start_with(cgroup: &TestCgroup, options: AgentOptions) -> Self {
        let outbound_port = free_port();
        let inbound_port = free_port();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let name = cgroup
            .path()
            .file_name()
            .expect("cgroup name")
            .to_string_lossy()
            .into_owned();
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&name);
        let log = temp_dir("agent").join("agent.log");
        let cni_socket = options
            .cni_dir
            .clone()
            .unwrap_or_else(|| temp_dir("cni"))
            .join("cni.sock");
        let mut command = if options.inside_cgroup {
            cgroup.command(sockmesh_bin())
        } else {
            Command::new(sockmesh_bin())
        };
        command
            .arg("run")
            .arg("--cgroup")
            .arg(cgroup.path())
            .arg("--outbound-port")
            .arg(outbound_port.to_string())
            .arg("--inbound-port")
            .arg(inbound_port.to_string())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--cni-socket")
            .arg(&cni_socket)
            .args(&options.args)
            .env("RUST_LOG", "info,agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("agent log"));
        let child = command.spawn().expect("starting sockmesh run");
        let mut agent = Self {
            child,
            outbound_port,
            inbound_port,
            admin,
            pin_dir,
            log,
            cni_socket,
        };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sockmesh run exited early ({status}):\n{}", self.log_text());
            }
            if self.get("/ready").is_ok_and(|(status, _)| status == 200) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "sockmesh run not ready after {READY_TIMEOUT:?}:\n{}",
            self.log_text()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A plain HTTP/1.0 GET on the admin server: (status, body).
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.admin, path)
    }

    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "/metrics answered {status}");
        Metrics::parse(&body)
    }

    /// Waits (bounded) until `name{labels}` reaches `expected`, then asserts it. Counters are
    /// updated as the proxy finishes its side of a connection, which can be a moment after the
    /// client has already exited.
    pub fn assert_metric(&self, name: &str, labels: &[(&str, &str)], expected: u64) {
        let mut last = 0;
        let reached = eventually(METRIC_TIMEOUT, || {
            last = self.metrics().count(name, labels);
            last == expected
        });
        assert!(reached, "{name}{labels:?} is {last}, expected {expected}");
    }

    /// Entries in one of the agent's pinned maps, per `bpftool -j map dump` (the JSON array's
    /// length: the plain dump prints maps without BTF values, the sockhashes, differently, and
    /// the JSON one lists each BTF key twice, raw and formatted).
    pub fn map_entries(&self, map: &str) -> usize {
        let dump = crate::process::run_ok(
            Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(self.pin_dir.join(map)),
            std::time::Duration::from_secs(30),
        );
        let entries: serde_json::Value = serde_json::from_str(&dump)
            .unwrap_or_else(|error| panic!("bpftool dump of {map}: {error}: {dump}"));
        entries
            .as_array()
            .unwrap_or_else(|| panic!("bpftool dump of {map} is no array: {dump}"))
            .len()
    }

    /// Waits (bounded) until each of the agent's pinned `maps` is empty, then asserts it.
    pub fn assert_maps_empty(&self, maps: &[&str]) {
        for map in maps {
            let mut entries = usize::MAX;
            let empty = eventually(std::time::Duration::from_secs(10), || {
                entries = self.map_entries(map);
                entries == 0
            });
            assert!(empty, "{map} still holds {entries} entries");
        }
    }

    /// The agent's resident memory now (`VmRSS`) and at its peak (`VmHWM`), in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Runs `work`, sampling the agent's resident memory every 20 ms meanwhile; returns its
    /// result and the largest sample in KiB. (The kernel's own peak, VmHWM, is set at start,
    /// when the eBPF objects are parsed, and would hide what `work` costs.)
    pub fn peak_rss_during<T>(&self, work: impl FnOnce() -> T) -> (T, u64) {
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let sampler = scope.spawn(|| {
                let mut peak = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(self.rss_kib().0);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                peak
            });
            let result = work();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            (result, sampler.join().expect("the sampler"))
        })
    }

    /// Open descriptors of the agent process.
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|dir| dir.count())
            .unwrap_or(0)
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits (bounded) for the agent to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for sockmesh") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sockmesh did not exit:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Ok(entries) = fs::read_dir(&self.pin_dir) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        let _ = fs::remove_dir(&self.pin_dir);
    }
}

/// A plain HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
}

/// A plain HTTP/1.0 POST without a body: (status, body).
pub fn http_post(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(
        addr,
        &format!("POST {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n"),
    )
}

/// Sends `request` and reads the response to its end (HTTP/1.0: the server closes).
pub fn http_request(addr: SocketAddr, request: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
