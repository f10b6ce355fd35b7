//! Typed configuration: the pure parsers behind the command-line flags, and the one `Config`
//! value the rest of the agent reads. Everything is validated here, before anything touches
//! the kernel, so a bad value exits with clap's status 2 and names the flag and the value.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use ipnetwork::IpNetwork;

/// An inclusive range of TCP ports, `80` or `4000-4100`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("empty port")]
    Empty,
    #[error("'{0}' is not a port number (0-65535)")]
    NotAPort(String),
    #[error("range {first}-{last} ends before it starts")]
    Backwards { first: u16, last: u16 },
}

fn parse_port(text: &str) -> Result<u16, PortError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(PortError::Empty);
    }
    text.parse()
        .map_err(|_| PortError::NotAPort(text.to_string()))
}

impl FromStr for PortRange {
    type Err = PortError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('-') {
            None => parse_port(text).map(Self::single),
            Some((first, last)) => {
                let (first, last) = (parse_port(first)?, parse_port(last)?);
                if last < first {
                    return Err(PortError::Backwards { first, last });
                }
                Ok(Self { first, last })
            }
        }
    }
}

/// A set of ports given as a comma-separated list of ports and ranges: `80,443,4000-4100`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<PortRange>);

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|range| range.contains(port))
    }

    #[cfg(test)]
    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    /// Every port in the set (ranges expanded; duplicates possible).
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().flat_map(PortRange::ports)
    }

    /// The union of this set and `other`: user-given lists are added to built-in ones.
    pub fn with(mut self, other: &PortSet) -> Self {
        self.0.extend_from_slice(&other.0);
        self
    }
}

impl FromStr for PortSet {
    type Err = PortError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        text.split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl From<Vec<PortRange>> for PortSet {
    fn from(ranges: Vec<PortRange>) -> Self {
        Self(ranges)
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

/// A comma-separated list of networks in CIDR notation: `10.0.0.0/8,fd00::/8`.
/// A bare address is a host network (/32 or /128).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkList(pub Vec<IpNetwork>);

impl FromStr for NetworkList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        text.split(',')
            .map(|part| {
                let part = part.trim();
                part.parse::<IpNetwork>()
                    .map_err(|err| format!("'{part}' is not a network in CIDR notation: {err}"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl fmt::Display for NetworkList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

/// A duration such as `30s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (examples: 30s, 500ms, 2m)"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(number)),
        "ms" => Ok(Duration::from_millis(number)),
        "m" => Ok(Duration::from_secs(number.saturating_mul(60))),
        _ => Err(format!(
            "'{text}' has an unknown unit '{unit}' (use ms, s or m)"
        )),
    }
}

/// The liveness timeout: longer than a few heartbeats (100 ms each), or a busy moment would
/// send connects direct.
pub fn parse_liveness_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout < Duration::from_millis(300) {
        return Err(format!(
            "'{text}' is too short: the agent's heartbeat ticks every 100 ms (use 300ms or more)"
        ));
    }
    Ok(timeout)
}

/// A TCP port for a listener: 1-65535.
pub fn parse_listen_port(text: &str) -> Result<u16, String> {
    match parse_port(text) {
        Ok(0) => Err("port 0 cannot be redirected to".to_string()),
        Ok(port) => Ok(port),
        Err(err) => Err(err.to_string()),
    }
}

/// An existing cgroup v2 directory (it must have a `cgroup.procs` file).
pub fn parse_cgroup_dir(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    if !path.is_dir() {
        return Err(format!("no such cgroup directory: {text}"));
    }
    if !path.join("cgroup.procs").exists() {
        return Err(format!(
            "{text} is not a cgroup v2 directory (no cgroup.procs)"
        ));
    }
    Ok(path)
}

/// Server-speaks-first and other non-HTTP protocols that skip detection (Linkerd's defaults):
/// SMTP 25/587, MySQL 3306, Galera 4444, PostgreSQL 5432, Redis 6379, Elasticsearch 9300,
/// Memcached 11211.
pub const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4444,5432,6379,9300,11211";

/// Where `sockmesh-cni` finds the agent (its `agent_socket` default is the same).
pub const DEFAULT_CNI_SOCKET: &str = sockmesh_cni::DEFAULT_AGENT_SOCKET;

/// Busy opaque connections up to which chatty ones are forwarded in the kernel, by default
/// (`--sockmap-connections`); measured on 2 cores: see docs/performance.md.
pub const DEFAULT_SOCKMAP_CONNECTIONS: u32 = 4;

/// How opaque connections move their bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMode {
    /// In the kernel (sockmap stream verdict): the agent is not woken per message. Falls
    /// back to splice for a connection the socket maps cannot take.
    Sockmap,
    /// splice(2) through pooled pipes: bytes never enter user space.
    Splice,
    /// read/write through user-space buffers (for comparison).
    Userspace,
}

/// Whether the bytes between applications and the agent skip TCP (`--accelerate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerate {
    /// Plain TCP between applications and the agent.
    Off,
    /// Experimental: connections to opaque ports move their bytes between the application's
    /// socket and the agent's by sk_msg ingress redirects (docs/design-sk-msg.md).
    Local,
}

/// The effective configuration of `sockmesh run`, built once from the flags. Serialised as
/// is for /config.json (durations in milliseconds, port and network lists as their flag text).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// The cgroup whose processes are meshed.
    pub cgroup: PathBuf,
    /// Proxy listener port on 127.0.0.1 and ::1.
    pub outbound_port: u16,
    /// Ports connect4/6 never redirect: the user's plus the agent's own (admin).
    #[serde(serialize_with = "as_text")]
    pub skip_outbound_ports: PortSet,
    #[serde(serialize_with = "as_text")]
    pub skip_outbound_networks: NetworkList,
    /// Inbound proxy listener port on 127.0.0.1 and ::1 (sk_lookup steers connections there).
    pub inbound_port: u16,
    /// Listening ports sk_lookup never captures: the user's plus the agent's own (admin,
    /// outbound, inbound).
    #[serde(serialize_with = "as_text")]
    pub skip_inbound_ports: PortSet,
    pub admin_addr: SocketAddr,
    /// Destination ports forwarded as opaque TCP without detection.
    #[serde(serialize_with = "as_text")]
    pub opaque_ports: PortSet,
    /// How long to wait for a client's first bytes before forwarding opaquely.
    #[serde(rename = "detect_timeout_ms", serialize_with = "as_millis")]
    pub detect_timeout: Duration,
    /// How long an HTTP request may wait for the upstream's response headers (then 504).
    #[serde(rename = "upstream_timeout_ms", serialize_with = "as_millis")]
    pub upstream_timeout: Duration,
    #[serde(rename = "shutdown_grace_ms", serialize_with = "as_millis")]
    pub shutdown_grace: Duration,
    #[serde(rename = "connect_timeout_ms", serialize_with = "as_millis")]
    pub connect_timeout: Duration,
    /// TCP keepalive idle time and interval on the agent's sockets; zero: off.
    #[serde(rename = "tcp_keepalive_ms", serialize_with = "as_millis")]
    pub tcp_keepalive: Duration,
    /// Whether POST /shutdown (from loopback) stops the agent.
    pub enable_shutdown_endpoint: bool,
    pub copy_mode: CopyMode,
    pub accelerate: Accelerate,
    /// With sockmap: chatty connections go to the kernel only while at most this many opaque
    /// connections are open; otherwise they are copied in user space.
    pub sockmap_connections: usize,
    /// bpffs directory for the pinned maps.
    pub pin_dir: PathBuf,
    /// SO_MARK of the agent's own sockets, which the kernel programs never redirect.
    pub bypass_mark: u32,
    /// Whether connects in the agent's own network namespace (the host's) are proxied.
    pub serve_host_netns: bool,
    /// A heartbeat older than this sends connects direct (a stopped or hung agent).
    #[serde(rename = "liveness_timeout_ms", serialize_with = "as_millis")]
    pub liveness_timeout: Duration,
    /// The connection budget; None: derived from the open-file limit.
    pub max_connections: Option<u64>,
    /// The per-workload policy file, if any.
    pub policy: Option<PathBuf>,
    /// The unix socket `sockmesh-cni` registers pods on (pod mode); None: no pod mode.
    pub cni_socket: Option<PathBuf>,
    /// How long a removed pod's metric series stay after its connections ended.
    #[serde(rename = "pod_metrics_retention_ms", serialize_with = "as_millis")]
    pub pod_metrics_retention: Duration,
}

impl Config {
    /// The effective configuration as served on /config.json, defaults included: this very
    /// struct, serialised, so the dump cannot drift from the flags.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Ports the agent itself serves on: always skipped, whatever the user passes.
    pub fn builtin_skip_ports(admin_addr: SocketAddr) -> PortSet {
        PortSet(vec![PortRange::single(admin_addr.port())])
    }
}

fn as_text<S: serde::Serializer>(
    value: &impl fmt::Display,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn as_millis<S: serde::Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_and_ranges() {
        let set: PortSet = "80, 4000-4100,443".parse().unwrap();
        assert_eq!(
            set.ranges(),
            &[
                PortRange::single(80),
                PortRange {
                    first: 4000,
                    last: 4100
                },
                PortRange::single(443)
            ]
        );
        assert!(set.contains(4000) && set.contains(4100) && set.contains(443));
        assert!(!set.contains(3999) && !set.contains(4101) && !set.contains(81));
        assert_eq!(set.to_string(), "80,4000-4100,443");
    }

    #[test]
    fn empty_list_is_an_empty_set() {
        assert_eq!("".parse::<PortSet>().unwrap(), PortSet::default());
    }

    #[test]
    fn rejects_bad_ports() {
        assert_eq!(
            "70000".parse::<PortSet>(),
            Err(PortError::NotAPort("70000".into()))
        );
        assert_eq!(
            "9-3".parse::<PortSet>(),
            Err(PortError::Backwards { first: 9, last: 3 })
        );
        assert_eq!("80,,81".parse::<PortSet>(), Err(PortError::Empty));
        assert_eq!(
            "http".parse::<PortSet>(),
            Err(PortError::NotAPort("http".into()))
        );
        assert_eq!("-5".parse::<PortSet>(), Err(PortError::Empty));
        assert_eq!(
            "1-2-3".parse::<PortSet>(),
            Err(PortError::NotAPort("2-3".into()))
        );
    }

    #[test]
    fn full_range_is_allowed() {
        let set: PortSet = "0-65535".parse().unwrap();
        assert_eq!(set.ports().count(), 65_536);
    }

    #[test]
    fn user_ports_are_added_to_builtin_ones() {
        let admin: SocketAddr = "127.0.0.1:4191".parse().unwrap();
        let user: PortSet = "80".parse().unwrap();
        let merged = Config::builtin_skip_ports(admin).with(&user);
        assert!(merged.contains(4191) && merged.contains(80));
    }

    #[test]
    fn default_opaque_ports_parse() {
        let ports: PortSet = DEFAULT_OPAQUE_PORTS.parse().unwrap();
        for port in [25, 587, 3306, 4444, 5432, 6379, 9300, 11211] {
            assert!(ports.contains(port), "{port}");
        }
        assert!(!ports.contains(80));
    }

    #[test]
    fn parses_networks() {
        let nets: NetworkList = "10.0.0.0/8, fd00::/8,127.0.0.2".parse().unwrap();
        assert_eq!(nets.0.len(), 3);
        assert_eq!(nets.0[2].prefix(), 32);
        assert!("10.0.0.0/33".parse::<NetworkList>().is_err());
        assert!("banana".parse::<NetworkList>().is_err());
        assert!("10.0.0.0/8,".parse::<NetworkList>().is_err());
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn listen_port_must_be_nonzero() {
        assert_eq!(parse_listen_port("4140"), Ok(4140));
        assert!(parse_listen_port("0").is_err());
        assert!(parse_listen_port("70000").is_err());
    }
}
