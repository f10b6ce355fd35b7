//! Pods without Kubernetes: a network namespace wired by the real CNI plugins from Debian's
//! containernetworking-plugins (`loopback`, then the chain `bridge` (host-local IPAM) ->
//! `sockmesh-cni`), invoked exactly as a container runtime invokes them (CNI_* variables, the
//! network configuration on stdin, each plugin's result threaded into the next as
//! `prevResult`), plus a cgroup under the meshed one. The pod network has no route off its
//! bridge and the host has no address on it: pods reach only each other.

use std::{
    ffi::OsStr,
    fs,
    io::Write,
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde_json::{Value, json};

use crate::{
    TestCgroup,
    process::{run, run_ok},
    servers::ServerProcess,
    sockmesh_bin, temp_dir,
};

/// Where Debian installs the CNI plugins.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";
const CNI_VERSION: &str = "1.0.0";
const LIMIT: Duration = Duration::from_secs(30);

/// A bridge, its subnet and IPAM state, and the conflist that chains `sockmesh-cni`.
pub struct PodNetwork {
    bridge: String,
    subnet: String,
    dir: PathBuf,
    agent_socket: PathBuf,
}

impl PodNetwork {
    /// A pod network whose `sockmesh-cni` talks to the agent at `agent_socket`.
    pub fn new(agent_socket: &Path) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = (std::process::id() % 200 + n * 7) % 250;
        Self {
            bridge: format!("smtb{}-{n}", std::process::id() % 10_000),
            subnet: format!("10.213.{id}.0/24"),
            dir: temp_dir("podnet"),
            agent_socket: agent_socket.to_path_buf(),
        }
    }

    /// The chained network list, as it would sit in /etc/cni/net.d.
    pub fn conflist(&self) -> Value {
        json!({
            "cniVersion": CNI_VERSION,
            "name": format!("{}-net", self.bridge),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": false,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": self.subnet }]],
                        "dataDir": self.dir.join("ipam"),
                    },
                },
                { "type": "sockmesh-cni", "agent_socket": self.agent_socket },
            ],
        })
    }

    /// Creates a pod: its namespace, its interfaces through the CNI chain, and a cgroup in
    /// `meshed`.
    pub fn add_pod(&self, name: &str, meshed: &TestCgroup) -> Pod {
        let netns = format!("{}-{name}", self.bridge);
        run_ok(Command::new("ip").args(["netns", "add", &netns]), LIMIT);
        let netns_path = PathBuf::from("/run/netns").join(&netns);
        let container_id = format!("cid{}{name}", self.bridge.replace('-', ""));
        let mut pod = Pod {
            name: name.to_string(),
            netns,
            netns_path,
            container_id,
            ip: "0.0.0.0".parse().expect("an address"),
            cgroup: TestCgroup::child_of(meshed, name),
            conflist: self.conflist(),
            result: Value::Null,
            attached: false,
        };
        pod.loopback("ADD");
        let result = pod.chain_add();
        let address = result["ips"][0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no address in the CNI result {result}"));
        pod.ip = address
            .split('/')
            .next()
            .and_then(|ip| ip.parse().ok())
            .unwrap_or_else(|| panic!("bad address {address}"));
        pod.result = result;
        pod.attached = true;
        pod
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A pod: network namespace, CNI attachment, cgroup. Removed (CNI DEL, namespace deleted,
/// cgroup removed) on drop.
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub netns_path: PathBuf,
    pub container_id: String,
    pub ip: IpAddr,
    pub cgroup: TestCgroup,
    conflist: Value,
    /// The chain's ADD result (what the runtime caches and hands DEL).
    pub result: Value,
    attached: bool,
}

impl Pod {
    /// The CNI_ARGS a kubelet passes.
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=test-ns;K8S_POD_NAME={};\
             K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=uid-{}",
            self.name, self.container_id, self.name
        )
    }

    /// Runs one plugin of the chain (`plugin` is its conflist entry) as a runtime does.
    pub fn plugin(&self, command: &str, plugin: &Value, prev_result: Option<&Value>) -> Output {
        let mut config = plugin.clone();
        config["cniVersion"] = json!(CNI_VERSION);
        config["name"] = self.conflist["name"].clone();
        if let Some(prev) = prev_result {
            config["prevResult"] = prev.clone();
        }
        let kind = plugin["type"].as_str().expect("plugin type");
        invoke_plugin(
            kind,
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", &self.container_id),
                ("CNI_NETNS", &self.netns_path.to_string_lossy()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", &self.cni_args()),
            ],
            config.to_string().as_bytes(),
        )
    }

    fn loopback(&self, command: &str) {
        let plugin = json!({ "type": "loopback" });
        let output = self.plugin(command, &plugin, None);
        assert_success(&output, "loopback");
    }

    /// ADD through the chain; returns the final result.
    fn chain_add(&self) -> Value {
        let mut prev: Option<Value> = None;
        for plugin in self.conflist["plugins"].as_array().expect("plugins") {
            let output = self.plugin("ADD", plugin, prev.as_ref());
            assert_success(&output, &plugin.to_string());
            prev = Some(
                serde_json::from_slice(&output.stdout)
                    .unwrap_or_else(|e| panic!("{plugin}: result is not JSON ({e})")),
            );
        }
        prev.expect("at least one plugin")
    }

    /// DEL through the chain, in reverse order, each plugin given the cached result.
    pub fn delete(&mut self) {
        for plugin in self.conflist["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .rev()
        {
            let output = self.plugin("DEL", plugin, Some(&self.result));
            assert_success(&output, &plugin.to_string());
        }
        self.attached = false;
    }

    /// Only `sockmesh-cni`'s part of a command (DEL twice, CHECK, ADD again).
    pub fn sockmesh_cni(&self, command: &str) -> Output {
        let plugin = self.conflist["plugins"][1].clone();
        self.plugin(command, &plugin, Some(&self.result))
    }

    /// A command that runs `program` in this pod: its cgroup and its network namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = self.cgroup.command("nsenter");
        command
            .arg(format!("--net={}", self.netns_path.display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Starts a server process in this pod (its cgroup and network namespace, as a container
    /// of a Kubernetes pod is: the agent captures its inbound connections) and waits until it
    /// accepts on `addr`.
    pub fn server(&self, command: Command, addr: SocketAddr, log: Option<&Path>) -> ServerProcess {
        let mut wrapped = self.command(command.get_program());
        wrapped.args(command.get_args()).stdout(Stdio::null());
        match log {
            Some(path) => wrapped.stderr(fs::File::create(path).expect("server log")),
            None => wrapped.stderr(Stdio::null()),
        };
        let netns = self.netns_path.clone();
        ServerProcess::start_checked(wrapped, addr, move |addr| connects_from(&netns, addr))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.attached {
            for plugin in self.conflist["plugins"]
                .as_array()
                .into_iter()
                .flatten()
                .rev()
            {
                let _ = self.plugin("DEL", plugin, Some(&self.result));
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs a CNI plugin by type, as a runtime does: found in CNI_PATH (Debian's plugins, and the
/// directory of the sockmesh binaries), CNI_* in the environment, config on stdin.
pub fn invoke_plugin(kind: &str, env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let sockmesh_dir = sockmesh_bin()
        .parent()
        .expect("the binaries' directory")
        .to_path_buf();
    let dir = if kind == "sockmesh-cni" {
        sockmesh_dir.clone()
    } else {
        PathBuf::from(CNI_PLUGIN_DIR)
    };
    let mut command = Command::new(dir.join(kind));
    command.env_clear().env(
        "CNI_PATH",
        format!("{CNI_PLUGIN_DIR}:{}", sockmesh_dir.display()),
    );
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting the {kind} plugin: {e}"));
    let mut stdin_pipe = child.stdin.take().expect("piped stdin");
    let _ = stdin_pipe.write_all(stdin);
    drop(stdin_pipe);
    // `run` needs a Command; wait here with the same bound instead.
    wait_bounded(child, LIMIT)
}

fn wait_bounded(child: std::process::Child, limit: Duration) -> Output {
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => output.expect("waiting for a plugin"),
        Err(_) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("a CNI plugin did not finish within {limit:?}");
        }
    }
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "CNI plugin {what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether a TCP connect to `addr` succeeds from inside the network namespace at `netns`
/// (a thread of the test enters it just to create the socket).
pub fn connects_from(netns: &Path, addr: SocketAddr) -> bool {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let Ok(file) = fs::File::open(&netns) else {
            return false;
        };
        // SAFETY: setns on this short-lived thread only; the descriptor is open.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return false;
        }
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
    })
    .join()
    .unwrap_or(false)
}

/// Runs `command` and returns its output whatever its status (for clients expected to fail).
pub fn run_any(command: &mut Command) -> Output {
    run(command, LIMIT)
}
