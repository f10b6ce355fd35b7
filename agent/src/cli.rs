//! Command-line interface. Every flag of `run` has an environment-variable twin so the same
//! binary is configured by flags on a VM and by env in a DaemonSet.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{
    Accelerate, Config, CopyMode, DEFAULT_CNI_SOCKET, DEFAULT_OPAQUE_PORTS,
    DEFAULT_SOCKMAP_CONNECTIONS, NetworkList, PortRange, PortSet, parse_cgroup_dir, parse_duration,
    parse_listen_port, parse_liveness_timeout,
};

#[derive(Debug, Parser)]
#[command(
    name = "sockmesh",
    version,
    about = "eBPF-accelerated node-level proxy agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to a cgroup and proxy every outbound TCP connection of its processes.
    Run(Box<RunArgs>),
    /// Run a command inside the meshed cgroup, so its connections go through the agent.
    Exec(ExecArgs),
    /// Show traffic per destination port from a running agent (like `linkerd viz stat`).
    Status(StatusArgs),
    /// Follow a running agent's live events (connections, HTTP requests).
    Tap(TapArgs),
    /// Check that this node can run the agent (kernel, cgroup v2, bpffs, BTF, privileges).
    Check(CheckArgs),
    /// Check a policy file (`run --policy`) and print what it selects, without an agent.
    CheckPolicy(CheckPolicyArgs),
    /// Install sockmesh-cni on the node and chain it into the node's CNI network config; keep
    /// it chained, and undo both on SIGTERM/SIGINT (the DaemonSet's install-cni container).
    InstallCni(InstallCniArgs),
}

#[derive(Debug, Args)]
pub struct InstallCniArgs {
    /// Directory the container runtime runs CNI plugins from (the host's /opt/cni/bin).
    #[arg(
        long,
        env = "SOCKMESH_CNI_BIN_DIR",
        default_value = "/host/opt/cni/bin"
    )]
    pub cni_bin_dir: PathBuf,
    /// Directory holding the node's CNI network configs (the host's /etc/cni/net.d).
    #[arg(
        long,
        env = "SOCKMESH_CNI_CONF_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    pub cni_conf_dir: PathBuf,
    /// The agent's CNI socket, as seen from the host; written into the plugin's config entry.
    #[arg(long, env = "SOCKMESH_AGENT_SOCKET", default_value = DEFAULT_CNI_SOCKET)]
    pub agent_socket: PathBuf,
    /// The sockmesh-cni binary to install [default: `sockmesh-cni` beside this executable]
    #[arg(long, env = "SOCKMESH_CNI_PLUGIN")]
    pub plugin: Option<PathBuf>,
    /// Install and chain once, then exit (leaving both in place).
    #[arg(long, env = "SOCKMESH_CNI_INSTALL_ONCE")]
    pub once: bool,
    /// How often to re-check that the plugin is still installed and chained.
    #[arg(long, env = "SOCKMESH_CNI_INTERVAL", default_value = "5s",
          value_parser = parse_duration)]
    pub interval: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args)]
pub struct AdminArg {
    /// The agent's admin address.
    #[arg(long, env = "SOCKMESH_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub admin: AdminArg,
    /// Time between the two scrapes the rates come from (0s: one scrape, no rates).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
}

#[derive(Debug, Args)]
pub struct TapArgs {
    #[command(flatten)]
    pub admin: AdminArg,
    /// Only events for this destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only HTTP requests for this authority (Host / :authority).
    #[arg(long)]
    pub authority: Option<String>,
    /// Only HTTP requests whose path starts with this.
    #[arg(long)]
    pub path_prefix: Option<String>,
    /// Only HTTP requests with this method.
    #[arg(long)]
    pub method: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub output: TapOutput,
    /// Stop after this many events (default: follow until interrupted).
    #[arg(long, default_value_t = 0)]
    pub max_events: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TapOutput {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also check the cgroup the agent would mesh.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckPolicyArgs {
    /// The policy file.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG is used when this is not given.
    #[arg(long, env = "SOCKMESH_LOG_LEVEL")]
    pub log_level: Option<String>,
    #[arg(long, env = "SOCKMESH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct CgroupArg {
    /// cgroup v2 directory to mesh [default: a `sockmesh` cgroup under the cgroup2 mount,
    /// created if missing]
    #[arg(long, env = "SOCKMESH_CGROUP", value_parser = parse_cgroup_dir)]
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub cgroup: CgroupArg,
    /// Port of the outbound proxy listener (on 127.0.0.1 and ::1).
    #[arg(long, env = "SOCKMESH_OUTBOUND_PORT", default_value = "4140",
          value_parser = parse_listen_port)]
    pub outbound_port: u16,
    /// Destination ports that bypass the proxy, e.g. `80,4000-4100`. Added to the agent's own
    /// ports (admin), which are always skipped.
    #[arg(long, env = "SOCKMESH_SKIP_OUTBOUND_PORTS", default_value = "")]
    pub skip_outbound_ports: PortSet,
    /// Port of the inbound proxy listener (Linkerd's 4143), where the kernel's sk_lookup
    /// program steers connections to meshed processes' listening ports.
    #[arg(long, env = "SOCKMESH_INBOUND_PORT", default_value = "4143",
          value_parser = parse_listen_port)]
    pub inbound_port: u16,
    /// Listening ports of meshed processes that inbound connections reach directly, e.g.
    /// `9000,9100-9110`. Added to the agent's own ports (admin, outbound, inbound), which are
    /// always skipped.
    #[arg(long, env = "SOCKMESH_SKIP_INBOUND_PORTS", default_value = "")]
    pub skip_inbound_ports: PortSet,
    /// Destination networks that bypass the proxy, e.g. `10.0.0.0/8,fd00::/8`.
    #[arg(long, env = "SOCKMESH_SKIP_OUTBOUND_NETWORKS", default_value = "")]
    pub skip_outbound_networks: NetworkList,
    /// Destination ports forwarded as opaque TCP without protocol detection, e.g. `4406,7000-7010`.
    /// Added to the defaults (25,587,3306,4444,5432,6379,9300,11211) unless
    /// --no-default-opaque-ports.
    #[arg(long, env = "SOCKMESH_OPAQUE_PORTS", default_value = "")]
    pub opaque_ports: PortSet,
    /// Drop the default opaque ports; only --opaque-ports remain.
    #[arg(long, env = "SOCKMESH_NO_DEFAULT_OPAQUE_PORTS")]
    pub no_default_opaque_ports: bool,
    /// How long to wait for a client's first bytes before forwarding the connection opaquely;
    /// also how long an HTTP/1 request head may take to arrive whole (then 408).
    #[arg(long, env = "SOCKMESH_DETECT_TIMEOUT", default_value = "10s",
          value_parser = parse_duration)]
    pub detect_timeout: Duration,
    /// How long an HTTP request may wait for the upstream's response headers before the client
    /// gets 504, counted from the last request byte that moved.
    #[arg(long, env = "SOCKMESH_UPSTREAM_TIMEOUT", default_value = "30s",
          value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// Address of the admin server (/metrics, /ready, /live).
    #[arg(long, env = "SOCKMESH_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,
    /// How long open connections may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "SOCKMESH_SHUTDOWN_GRACE", default_value = "30s",
          value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How long to wait for an upstream TCP connect.
    #[arg(long, env = "SOCKMESH_CONNECT_TIMEOUT", default_value = "10s",
          value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// TCP keepalive on both of the agent's sockets of every connection: a probe after this
    /// long idle, then one every as long, so a peer gone without a word (a crashed node, a
    /// dropped route) is found and its connection closed; 0s turns it off.
    #[arg(long, env = "SOCKMESH_TCP_KEEPALIVE", default_value = "10s",
          value_parser = parse_duration)]
    pub tcp_keepalive: Duration,
    /// How opaque connections move bytes: sockmap (in the kernel, no wake-ups per message),
    /// splice (zero-copy through pipes) or userspace (read/write, for comparison).
    #[arg(
        long,
        env = "SOCKMESH_COPY_MODE",
        value_enum,
        default_value = "sockmap"
    )]
    pub copy_mode: CopyMode,
    /// Experimental: `local` moves the bytes of connections to opaque ports between the
    /// application's socket and the agent's with sk_msg redirects instead of TCP (copied in
    /// user space between the agent's two sockets). Needs BTF and fexit; `sockmesh check`
    /// says whether this kernel can.
    #[arg(long, env = "SOCKMESH_ACCELERATE", value_enum, default_value = "off")]
    pub accelerate: Accelerate,
    /// With `--copy-mode sockmap`: chatty connections are handed to the kernel only while at
    /// most this many opaque connections are busy (moved a byte within about the last
    /// second); with more they are copied in user space, whose wake-ups serve many busy
    /// connections at once where each kernel redirect wakes a kworker.
    #[arg(
        long,
        env = "SOCKMESH_SOCKMAP_CONNECTIONS",
        default_value_t = DEFAULT_SOCKMAP_CONNECTIONS,
        value_parser = clap::value_parser!(u32).range(0..=1_000_000)
    )]
    pub sockmap_connections: u32,
    /// Let POST /shutdown on the admin server (from loopback only) stop the agent.
    #[arg(long, env = "SOCKMESH_ENABLE_SHUTDOWN_ENDPOINT")]
    pub enable_shutdown_endpoint: bool,
    /// bpffs directory the agent pins its maps in (inspect them with bpftool).
    #[arg(long, env = "SOCKMESH_PIN_DIR", default_value = agent_common::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// SO_MARK put on the agent's own upstream sockets so they are never redirected.
    #[arg(long, env = "SOCKMESH_BYPASS_MARK", default_value_t = agent_common::DEFAULT_BYPASS_MARK)]
    pub bypass_mark: u32,
    /// Proxy connects made in the agent's own network namespace (the host's). A DaemonSet
    /// that meshes only pods sets this to false.
    #[arg(long, env = "SOCKMESH_SERVE_HOST_NETNS", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub serve_host_netns: bool,
    /// How old the agent's heartbeat may get before the kernel sends connects direct (the
    /// agent is stopped, hung or too busy to run its threads).
    #[arg(long, env = "SOCKMESH_LIVENESS_TIMEOUT", default_value = "1s",
          value_parser = parse_liveness_timeout)]
    pub liveness_timeout: Duration,
    /// Redirected connections the agent takes at once; beyond, connects go direct
    /// [default: (open-file limit - 256) / 4, printed at start].
    #[arg(long, env = "SOCKMESH_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    /// Per-workload policy file (YAML, Linkerd's annotation names; see README), reloaded when
    /// its contents change; a bad file keeps the last good policy.
    #[arg(long, env = "SOCKMESH_POLICY")]
    pub policy: Option<PathBuf>,
    /// Unix socket where `sockmesh-cni` registers pods (pod mode); the pod registry is kept
    /// beside it, in `pods/`. An empty value turns pod mode off.
    #[arg(long, env = "SOCKMESH_CNI_SOCKET", default_value = DEFAULT_CNI_SOCKET,
          value_parser = parse_path_or_empty)]
    pub cni_socket: PathBuf,
    /// How long a removed pod's metric series stay on /metrics after its connections ended
    /// (so that the next scrapes see their last values); then they are removed.
    #[arg(long, env = "SOCKMESH_POD_METRICS_RETENTION", default_value = "5m",
          value_parser = parse_duration)]
    pub pod_metrics_retention: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub cgroup: CgroupArg,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

impl RunArgs {
    /// The agent's three ports must differ: its listeners on one port would share the
    /// kernel's SO_REUSEPORT group (outbound and inbound connections mixed), and the admin
    /// server could not bind beside them. Returns the message for the command-line error.
    pub fn check_ports(&self) -> Result<(), String> {
        let ports = [
            ("--outbound-port", self.outbound_port),
            ("--inbound-port", self.inbound_port),
            ("--admin-addr", self.admin_addr.port()),
        ];
        for (i, (flag, port)) in ports.iter().enumerate() {
            if let Some((other, _)) = ports[i + 1..].iter().find(|(_, p)| p == port) {
                return Err(format!(
                    "{flag} and {other} both use port {port}: the agent needs three different ports"
                ));
            }
        }
        Ok(())
    }

    /// The one typed configuration, given the cgroup the caller resolved.
    pub fn into_config(self, cgroup: PathBuf) -> Config {
        let skip_outbound_ports =
            Config::builtin_skip_ports(self.admin_addr).with(&self.skip_outbound_ports);
        let skip_inbound_ports = Config::builtin_skip_ports(self.admin_addr)
            .with(&PortSet::from(vec![
                PortRange::single(self.outbound_port),
                PortRange::single(self.inbound_port),
            ]))
            .with(&self.skip_inbound_ports);
        let default_opaque_ports = if self.no_default_opaque_ports {
            PortSet::default()
        } else {
            DEFAULT_OPAQUE_PORTS
                .parse()
                .expect("the default opaque ports parse")
        };
        Config {
            cgroup,
            outbound_port: self.outbound_port,
            skip_outbound_ports,
            skip_outbound_networks: self.skip_outbound_networks,
            inbound_port: self.inbound_port,
            skip_inbound_ports,
            admin_addr: self.admin_addr,
            opaque_ports: default_opaque_ports.with(&self.opaque_ports),
            detect_timeout: self.detect_timeout,
            upstream_timeout: self.upstream_timeout,
            shutdown_grace: self.shutdown_grace,
            connect_timeout: self.connect_timeout,
            tcp_keepalive: self.tcp_keepalive,
            enable_shutdown_endpoint: self.enable_shutdown_endpoint,
            copy_mode: self.copy_mode,
            accelerate: self.accelerate,
            sockmap_connections: self.sockmap_connections as usize,
            pin_dir: self.pin_dir,
            bypass_mark: self.bypass_mark,
            serve_host_netns: self.serve_host_netns,
            liveness_timeout: self.liveness_timeout,
            max_connections: self.max_connections,
            policy: self.policy,
            cni_socket: (!self.cni_socket.as_os_str().is_empty()).then_some(self.cni_socket),
            pod_metrics_retention: self.pod_metrics_retention,
        }
    }
}

/// A path, the empty one included (clap's own PathBuf parser refuses it).
fn parse_path_or_empty(value: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let cli = Cli::try_parse_from([&["sockmesh", "run"], args].concat()).expect("valid flags");
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        run.into_config(PathBuf::from("/sys/fs/cgroup/test"))
    }

    #[test]
    fn opaque_ports_add_to_the_defaults() {
        let config = config(&["--opaque-ports", "4406"]);
        assert!(config.opaque_ports.contains(4406));
        assert!(
            config.opaque_ports.contains(3306),
            "a custom port must not drop the defaults"
        );
    }

    #[test]
    fn no_default_opaque_ports_keeps_only_the_given_ones() {
        let config = config(&["--no-default-opaque-ports", "--opaque-ports", "4406"]);
        assert!(config.opaque_ports.contains(4406));
        assert!(!config.opaque_ports.contains(3306));
    }

    #[test]
    fn config_json_shows_the_defaults() {
        let json: serde_json::Value = serde_json::from_str(&config(&[]).to_json()).unwrap();
        assert_eq!(json["outbound_port"], 4140);
        assert_eq!(
            json["opaque_ports"],
            "25,587,3306,4444,5432,6379,9300,11211"
        );
        assert_eq!(json["skip_outbound_ports"], "4191");
        assert_eq!(json["detect_timeout_ms"], 10_000);
        assert_eq!(json["tcp_keepalive_ms"], 10_000);
        assert_eq!(json["enable_shutdown_endpoint"], false);
    }

    #[test]
    fn an_empty_cni_socket_turns_pod_mode_off() {
        assert_eq!(config(&["--cni-socket", ""]).cni_socket, None);
        assert_eq!(config(&["--cni-socket="]).cni_socket, None);
        assert_eq!(
            config(&[]).cni_socket,
            Some(PathBuf::from(DEFAULT_CNI_SOCKET))
        );
    }

    #[test]
    fn admin_port_is_always_skipped() {
        let config = config(&[
            "--admin-addr",
            "127.0.0.1:9999",
            "--skip-outbound-ports",
            "22",
        ]);
        assert!(config.skip_outbound_ports.contains(9999));
        assert!(config.skip_outbound_ports.contains(22));
    }
}
