//! The contract between sockmesh's kernel programs and its user-space agent.
//!
//! Everything both sides must agree on lives here and nowhere else: map names (which are also
//! the pin file names under the bpffs directory), map sizes, and the `#[repr(C)]` layouts of
//! keys and values. Addresses are kept the way the kernel hands them to programs: IPv4 and IPv6
//! addresses as network-order `u32` words (an IPv4 address in word 0, the rest zero), ports in
//! host order.
#![no_std]

/// Default bpffs directory the agent pins its maps under.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sockmesh";

/// Map names. The kernel keeps at most 15 characters of a map name, so every name fits.
pub mod map_names {
    pub const CONFIG: &str = "CONFIG";
    pub const SKIP_PORTS: &str = "SKIP_PORTS";
    pub const SKIP_NETS_V4: &str = "SKIP_NETS_V4";
    pub const SKIP_NETS_V6: &str = "SKIP_NETS_V6";
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    pub const COUNTERS: &str = "COUNTERS";
    /// In-kernel forwarding: each proxy socket's peer, keyed by the socket's own cookie.
    pub const FWD_PEERS: &str = "FWD_PEERS";
    /// In-kernel forwarding: proxy sockets whose received bytes the verdict program moves.
    pub const FWD_ACTIVE: &str = "FWD_ACTIVE";
    /// `sockmesh check`'s sk_msg probe; never pinned, not used by a running agent.
    pub const PROBE_SOCKS: &str = "PROBE_SOCKS";
    /// Network namespaces the agent serves (netns cookie -> settings): connect4/6 redirect
    /// only connects made in one of them.
    pub const SERVED_NETNS: &str = "SERVED_NETNS";
    /// The agent's heartbeat and connection budget: connect4/6 redirect only while it is fresh
    /// and the budget has room.
    pub const LIVENESS: &str = "LIVENESS";
    /// Redirected client sockets still open (slot `OPEN_REDIRECTS_SLOT`, kept by connect4/6
    /// and sockops) and inbound connections steered to the agent (`INBOUND_STEERED_SLOT`).
    pub const OPEN_REDIRECTS: &str = "OPEN_REDIRECTS";
    /// Inbound: the TCP ports meshed processes listen on, per network namespace (kept by
    /// sockops at listen(2) and close).
    pub const INBOUND_PORTS: &str = "INBOUND_PORTS";
    /// Inbound: the agent's inbound listener in each served namespace, per address family,
    /// where sk_lookup steers connections to meshed ports.
    pub const INBOUND_SOCKS: &str = "INBOUND_SOCKS";
    /// Inbound: each served pod's addresses -> its netns cookie (sk_lookup has no netns
    /// helper, so a pod's namespace is found by the address a connection arrives at).
    pub const INBOUND_ADDRS: &str = "INBOUND_ADDRS";
    /// Inbound: one bit per destination port that sk_lookup leaves alone.
    pub const SKIP_IN_PORTS: &str = "SKIP_IN_PORTS";
    /// Per-workload policies (the policy file), by policy id.
    pub const POLICIES: &str = "POLICIES";
    /// Host mode: the policy id of each cgroup a policy entry selects, by cgroup id.
    pub const CGROUP_POLICY: &str = "CGROUP_POLICY";
    /// `--accelerate local`: application sockets and the agent's accepted sockets, paired.
    pub const ACCEL_SOCKS: &str = "ACCEL_SOCKS";
    /// `--accelerate local`: the kernel's byte counts per accelerated connection.
    pub const ACCEL_PAIRS: &str = "ACCEL_PAIRS";
    /// `--accelerate local`: the agent's read counts per paired connection.
    pub const ACCEL_READS: &str = "ACCEL_READS";
    /// `--accelerate local`: per-socket side and decision (socket storage).
    pub const ACCEL_STATE: &str = "ACCEL_STATE";

    /// sockmesh's socket maps (sockmap/sockhash): `--accelerate local` pauses while any other
    /// is loaded on the node (a socket in two tools' socket maps breaks both).
    pub const SOCKET_MAPS: [&str; 5] = [
        FWD_PEERS,
        FWD_ACTIVE,
        PROBE_SOCKS,
        INBOUND_SOCKS,
        ACCEL_SOCKS,
    ];

    /// Every map the agent pins, in a stable order.
    pub const ALL: [&str; 22] = [
        CONFIG,
        SERVED_NETNS,
        LIVENESS,
        OPEN_REDIRECTS,
        SKIP_PORTS,
        SKIP_NETS_V4,
        SKIP_NETS_V6,
        ORIG_BY_COOKIE,
        ORIG_BY_TUPLE,
        COUNTERS,
        FWD_PEERS,
        FWD_ACTIVE,
        INBOUND_PORTS,
        INBOUND_SOCKS,
        INBOUND_ADDRS,
        SKIP_IN_PORTS,
        POLICIES,
        CGROUP_POLICY,
        ACCEL_SOCKS,
        ACCEL_PAIRS,
        ACCEL_READS,
        ACCEL_STATE,
    ];
}

/// Program names (the Rust function names in agent-ebpf), as `bpftool prog show` lists them.
/// Like map names, the kernel keeps 15 characters, so each fits.
pub mod program_names {
    pub const CONNECT4: &str = "sockmesh_conn4";
    pub const CONNECT6: &str = "sockmesh_conn6";
    pub const GETPEERNAME4: &str = "sockmesh_peer4";
    pub const GETPEERNAME6: &str = "sockmesh_peer6";
    pub const GETSOCKOPT: &str = "sockmesh_getopt";
    pub const SOCKOPS: &str = "sockmesh_ops";
    /// Stream verdict on `FWD_ACTIVE`: sends each socket's received bytes out of its peer.
    pub const FORWARD: &str = "sockmesh_fwd";
    /// sk_lookup in the agent's own (host) network namespace.
    pub const INBOUND_HOST: &str = "sockmesh_inhost";
    /// sk_lookup in each served pod's network namespace.
    pub const INBOUND_POD: &str = "sockmesh_in_pod";
    /// sk_msg on `PROBE_SOCKS`, loaded by `sockmesh check` only (so not in `ALL`, the
    /// programs a running agent loads).
    pub const SK_MSG_PROBE: &str = "sockmesh_probe";
    /// `--accelerate local`: sk_msg on `ACCEL_SOCKS`.
    pub const ACCEL: &str = "sockmesh_accel";

    pub const ALL: [&str; 10] = [
        CONNECT4,
        CONNECT6,
        GETPEERNAME4,
        GETPEERNAME6,
        GETSOCKOPT,
        SOCKOPS,
        FORWARD,
        INBOUND_HOST,
        INBOUND_POD,
        ACCEL,
    ];
}

/// Entries of the two original-destination maps. Both are LRU maps, so a leak (a socket whose
/// close the kernel never reported to us) can only ever evict the oldest entries.
pub const MAX_TRACKED_CONNECTIONS: u32 = 65_536;
/// Connections the kernel can forward at once (each has two sockets in each socket map).
/// Beyond this the agent forwards with splice(2) instead.
pub const MAX_KERNEL_FORWARDED: u32 = 32_768;
/// Entries of each in-kernel forwarding socket map: two sockets per connection.
pub const FWD_MAP_ENTRIES: u32 = 2 * MAX_KERNEL_FORWARDED;

/// `sockmesh check`'s sk_msg probe (`PROBE_SOCKS`, `sockmesh_probe`): a socket in the map
/// sending a message has it redirected into the receive side (BPF_F_INGRESS) of the socket
/// under this key; under any other key a socket only carries the program.
pub const PROBE_TARGET_KEY: u32 = 2;
pub const PROBE_SOCKS_ENTRIES: u32 = 4;
/// Network namespaces the agent can serve at once (the host's plus one per pod).
pub const MAX_SERVED_NETNS: u32 = 4_096;
/// Entries of each skip-network LPM trie.
pub const MAX_SKIP_NETWORKS: u32 = 1_024;
/// Listening ports of meshed processes the kernel tracks at once (all namespaces together).
pub const MAX_INBOUND_PORTS: u32 = 16_384;
/// Pod addresses sk_lookup can resolve to a namespace (a few per pod).
pub const MAX_INBOUND_ADDRS: u32 = 4 * MAX_SERVED_NETNS;
/// Inbound listeners: one per address family in each served namespace.
pub const MAX_INBOUND_SOCKS: u32 = 2 * MAX_SERVED_NETNS;
/// The skip-port bitmap: one bit per TCP port, 64 ports per word.
pub const SKIP_PORT_WORDS: u32 = 65_536 / 64;

/// Distinct per-workload policies the kernel holds at once (workloads with the same effective
/// settings share one).
pub const MAX_POLICIES: u32 = 256;
/// Host-mode cgroups a policy can select at once.
pub const MAX_POLICY_CGROUPS: u32 = 4_096;
/// `KernelPolicy::flags`: `linkerd.io/inject: disabled`, nothing is redirected or captured.
pub const POLICY_INJECT_DISABLED: u32 = 1;

/// Socket mark the agent sets on its own upstream sockets. connect4/6 never redirect a socket
/// carrying it, so the agent can run inside the cgroup it meshes without proxying to itself.
pub const DEFAULT_BYPASS_MARK: u32 = 0x534d_0001;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`, both 80.
pub const SO_ORIGINAL_DST: i32 = 80;

/// Source address of the agent's connections to inbound workloads (Istio's inbound
/// passthrough address): sk_lookup lets connections from it through, and the workload sees it
/// as the peer of every proxied IPv4 connection.
pub const INBOUND_PASSTHROUGH_IP4: [u8; 4] = [127, 0, 0, 6];

/// `ServedNetns::flags`: sk_lookup captures connections to meshed listening ports here.
pub const SERVED_INBOUND: u16 = 1;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Where connect4/connect6 send intercepted connections, written once by the agent at start-up.
/// The listener port is per network namespace (`ServedNetns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// IPv4 listener address, network order.
    pub proxy_ip4: u32,
    /// IPv6 listener address, network-order words.
    pub proxy_ip6: [u32; 4],
    /// 1 once the agent has filled this in; connect hooks do nothing before that.
    pub enabled: u16,
    /// 1 with `--accelerate local`: sockops puts each redirected client socket in
    /// `ACCEL_SOCKS` when it connects (see `AccelSocket`).
    pub accelerate: u16,
    /// Socket mark of the agent's own sockets, which are never redirected.
    pub bypass_mark: u32,
    /// `INBOUND_PASSTHROUGH_IP4`, network order: sk_lookup never captures from it.
    pub passthrough_ip4: u32,
    /// Cookie of the agent's own network namespace (sk_lookup cannot ask for it), 0 when the
    /// agent does not serve it.
    pub host_netns: u64,
}

/// A network namespace the agent serves, under its netns cookie in `SERVED_NETNS`. The agent
/// inserts it only once its listeners exist inside that namespace, so a connect is never
/// redirected to a port where nothing listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServedNetns {
    /// The outbound listener's port in this namespace (on 127.0.0.1 and ::1), host order.
    pub proxy_port: u16,
    /// `SERVED_*` bits.
    pub flags: u16,
    /// The namespace's policy id in `POLICIES` (0: the node-wide lists only).
    pub policy: u32,
}

/// Whether the agent can take a connection now. The agent rewrites it every 100 ms; connect4/6
/// read it on every connect and send the connect direct when the heartbeat is stale (a stopped,
/// hung or dead agent) or the budget is used up (an agent out of file descriptors).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentLiveness {
    /// CLOCK_MONOTONIC nanoseconds (what bpf_ktime_get_ns reads) of the agent's heartbeat: the
    /// oldest of its proxy threads' latest ticks. 0: never written.
    pub heartbeat_ns: u64,
    /// A heartbeat older than this means the agent cannot serve.
    pub timeout_ns: u64,
    /// Connections the agent takes at most at once: redirected connects (`OPEN_REDIRECTS`
    /// counts them) and inbound connections together.
    pub max_connections: u64,
    /// Inbound connections the agent holds now, as it counted them at its latest publication
    /// (sk_lookup sees a connection's SYN, never its close, so the kernel cannot count them).
    pub open_inbound: u64,
    /// `INBOUND_STEERED_SLOT` as the agent read it just before counting `open_inbound`: the
    /// connections steered since then count against the budget too, so a burst between two
    /// publications cannot overrun it.
    pub inbound_steered: u64,
}

/// OPEN_REDIRECTS slot 0: redirected client sockets still open.
pub const OPEN_REDIRECTS_SLOT: u32 = 0;
/// OPEN_REDIRECTS slot 1: inbound connections sk_lookup has steered to the agent since the
/// programs loaded (it only grows).
pub const INBOUND_STEERED_SLOT: u32 = 1;

/// The destination an application asked for before connect4/6 rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    /// Network-order words; IPv4 in word 0.
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub pad: u32,
    /// cgroup v2 id of the process that connected: in host mode its cgroup's policy decides
    /// the connection's opaque ports in the agent.
    pub cgroup: u64,
}

/// A redirected connection as the client socket sees it: client address -> proxy listener, in
/// the client's network namespace (two pods can both use 127.0.0.1:ephemeral -> 127.0.0.1:4140).
/// The proxy looks up its accepted socket with (peer, local, its netns), the same tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnTuple {
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    /// Host order.
    pub src_port: u16,
    /// Host order.
    pub dst_port: u16,
    pub family: u16,
    pub pad: u16,
    /// Cookie of the network namespace both sockets live in.
    pub netns: u64,
}

/// `POLICIES` value: one workload's settings the kernel applies, added to the node-wide ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPolicy {
    /// `POLICY_*` bits.
    pub flags: u32,
    pub pad: u32,
    /// Destination ports connect4/6 leave alone, one bit per port (as `SKIP_PORTS`).
    pub skip_outbound: [u64; SKIP_PORT_WORDS as usize],
    /// Listening ports sk_lookup leaves alone.
    pub skip_inbound: [u64; SKIP_PORT_WORDS as usize],
}

/// `INBOUND_PORTS` key: a TCP port a meshed process listens on, in its namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundPort {
    pub netns: u64,
    /// Host order.
    pub port: u16,
    pub pad: [u16; 3],
}

/// `INBOUND_PORTS` value: the listening socket, and the address it is bound to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshedListener {
    /// Socket cookie: only this socket's close removes the entry.
    pub cookie: u64,
    /// Network-order words; IPv4 in word 0; all zero for a wildcard bind.
    pub addr: [u32; 4],
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    pub pad: u32,
    /// cgroup v2 id of the process that listened: in host mode its cgroup's policy applies to
    /// the connections it gets (skip-inbound-ports in sk_lookup, opaque-ports in the agent).
    pub cgroup: u64,
}

/// `INBOUND_SOCKS` key: the agent's inbound listener of one family in one namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundSock {
    pub netns: u64,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    pub pad: u32,
}

/// `INBOUND_ADDRS` key: an address of a served pod (value: its netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundAddr {
    /// Network-order words; IPv4 in word 0.
    pub addr: [u32; 4],
    pub family: u32,
}

/// Kernel-side counters, one slot per CPU; user space sums the slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// TCP connects sent to the proxy.
    pub redirected: u64,
    /// TCP connects left alone because the destination port is skipped.
    pub bypassed_port: u64,
    /// TCP connects left alone because the destination network is skipped.
    pub bypassed_network: u64,
    /// The agent's own connects (bypass mark) and connects to the proxy itself.
    pub bypassed_self: u64,
    /// Map updates that failed; the connect went direct (fail-open).
    pub errors: u64,
    /// TCP connects left alone because their network namespace is not one the agent serves.
    pub bypassed_unserved_netns: u64,
    /// TCP connects sent direct because the agent's heartbeat was stale.
    pub bypassed_agent_unresponsive: u64,
    /// TCP connects sent direct because the agent was at its connection budget.
    pub bypassed_over_capacity: u64,
    /// Inbound connections (to a meshed listening port) sk_lookup sent to the agent.
    pub inbound_redirected: u64,
    /// Inbound connections left alone because the port is skipped.
    pub inbound_bypassed_port: u64,
    /// Inbound connections left alone because the agent's heartbeat was stale.
    pub inbound_bypassed_agent_unresponsive: u64,
    /// Inbound connections left alone because the agent was at its budget.
    pub inbound_bypassed_over_capacity: u64,
    /// TCP connects left alone because the workload's policy says `linkerd.io/inject: disabled`.
    pub bypassed_unmeshed_workload: u64,
    /// `--accelerate local`: socket directions that started moving their bytes by ingress
    /// redirect (an application's or the agent's side of a connection).
    pub accel_redirected: u64,
    /// `--accelerate local`: application sockets whose bytes went on by plain TCP for good
    /// because the agent had not read `ACCEL_BOUND` of them yet.
    pub accel_fell_back: u64,
}

/// Word index and bit mask of `port` in the skip-port bitmap.
#[inline(always)]
pub const fn skip_port_slot(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1u64 << (port % 64))
}

/// `--accelerate local`: entries of `ACCEL_SOCKS` (two sockets per connection), `ACCEL_PAIRS`
/// and `ACCEL_READS`.
pub const ACCEL_CONNECTIONS: u32 = 16_384;

/// `--accelerate local`: bytes one side may have redirected into the other's receive queue and
/// not yet had read. The kernel does not bound that queue (`bpf_tcp_ingress` ignores
/// `sk_rcvbuf`), so this does: into the agent, the application's socket goes on by plain TCP
/// (flow control again); into the application, the agent stops reading from the server until
/// the application has read. What one queue can hold is this plus one message (at most
/// 64 KiB), plus, into the agent, what it read and has not published yet
/// (`ACCEL_PUBLISH_EVERY`).
pub const ACCEL_BOUND: u64 = 1 << 20;

/// `--accelerate local`: the agent publishes its read count at least this often (and after
/// each of a connection's first reads, which lets the application's first bytes, sent by TCP
/// before pairing, be followed by redirects).
pub const ACCEL_PUBLISH_EVERY: u64 = 256 * 1024;

/// `AccelSocket::side`.
pub const ACCEL_SIDE_APP: u32 = 1;
pub const ACCEL_SIDE_AGENT: u32 = 2;

/// `AccelSocket::decision`: nothing sent yet (or, on the application's side, nothing could be
/// redirected yet and everything went by TCP).
pub const ACCEL_UNDECIDED: u32 = 0;
/// Bytes go into the peer's receive queue (`BPF_F_INGRESS`).
pub const ACCEL_REDIRECTING: u32 = 1;
/// Bytes go by plain TCP, for good.
pub const ACCEL_PLAIN: u32 = 2;

/// `--accelerate local`: per socket (socket storage), which connection it belongs to and how
/// its bytes go. The application's socket gets it from sockops when it connects; the agent's
/// accepted socket from the agent, before it reads or writes anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccelSocket {
    /// The connection as the application's socket sees it: its key in `ACCEL_SOCKS` and
    /// `ACCEL_PAIRS`; the agent's socket is in `ACCEL_SOCKS` under `pair.reversed()`.
    pub pair: ConnTuple,
    /// `ACCEL_SIDE_*`.
    pub side: u32,
    /// `ACCEL_*` decision, only ever UNDECIDED -> REDIRECTING -> PLAIN or UNDECIDED -> PLAIN.
    pub decision: u32,
}

/// `--accelerate local`: what the kernel counts of one connection, under the application
/// socket's tuple (sockops creates it, the sk_msg program adds to it). Redirected bytes minus
/// read bytes (`AccelReads`) is what waits in a receive queue; `app_plain` is what the
/// application sent by TCP before the agent's socket was paired, which the agent must have
/// read before any later byte may overtake it by redirect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccelPair {
    pub app_plain: u64,
    pub app_redirected: u64,
    pub agent_redirected: u64,
}

/// `--accelerate local`: what the agent has read of a connection, written by the agent only
/// (whole values, so it never overwrites a kernel count). Absent until the agent pairs the
/// connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccelReads {
    pub agent_read: u64,
}

impl ConnTuple {
    /// The same connection as the other socket sees it.
    pub const fn reversed(&self) -> ConnTuple {
        ConnTuple {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            family: self.family,
            pad: 0,
            netns: self.netns,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain integers and arrays without implicit padding.
    unsafe impl aya::Pod for super::ProxyConfig {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::ConnTuple {}
    unsafe impl aya::Pod for super::KernelCounters {}
    unsafe impl aya::Pod for super::ServedNetns {}
    unsafe impl aya::Pod for super::AgentLiveness {}
    unsafe impl aya::Pod for super::InboundPort {}
    unsafe impl aya::Pod for super::MeshedListener {}
    unsafe impl aya::Pod for super::KernelPolicy {}
    unsafe impl aya::Pod for super::InboundSock {}
    unsafe impl aya::Pod for super::InboundAddr {}
    unsafe impl aya::Pod for super::AccelSocket {}
    unsafe impl aya::Pod for super::AccelPair {}
    unsafe impl aya::Pod for super::AccelReads {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reversed_tuple_is_the_other_socket_s_view() {
        let app = ConnTuple {
            src_addr: [1, 0, 0, 0],
            dst_addr: [2, 0, 0, 0],
            src_port: 40_000,
            dst_port: 4140,
            family: AF_INET,
            pad: 0,
            netns: 7,
        };
        let agent = app.reversed();
        assert_eq!((agent.src_addr, agent.src_port), ([2, 0, 0, 0], 4140));
        assert_eq!((agent.dst_addr, agent.dst_port), ([1, 0, 0, 0], 40_000));
        assert_eq!(agent.netns, 7);
        assert_eq!(agent.reversed(), app);
    }

    #[test]
    fn skip_port_slots_cover_every_port_once() {
        assert_eq!(skip_port_slot(0), (0, 1));
        assert_eq!(skip_port_slot(63), (0, 1 << 63));
        assert_eq!(skip_port_slot(64), (1, 1));
        assert_eq!(skip_port_slot(65_535), (SKIP_PORT_WORDS - 1, 1 << 63));
    }

    #[test]
    fn shared_types_have_no_padding() {
        assert_eq!(
            core::mem::size_of::<ProxyConfig>(),
            4 + 16 + 2 + 2 + 4 + 4 + 8
        );
        assert_eq!(core::mem::size_of::<InboundPort>(), 16);
        assert_eq!(core::mem::size_of::<InboundSock>(), 16);
        assert_eq!(core::mem::size_of::<MeshedListener>(), 40);
        assert_eq!(core::mem::size_of::<InboundAddr>(), 20);
        assert_eq!(core::mem::size_of::<OriginalDst>(), 16 + 2 + 2 + 4 + 8);
        assert_eq!(core::mem::size_of::<ConnTuple>(), 32 + 8 + 8);
        assert_eq!(core::mem::size_of::<KernelCounters>(), 15 * 8);
        assert_eq!(core::mem::size_of::<AccelSocket>(), 48 + 8);
        assert_eq!(core::mem::size_of::<AccelPair>(), 3 * 8);
        assert_eq!(core::mem::size_of::<AccelReads>(), 8);
        assert_eq!(core::mem::size_of::<KernelPolicy>(), 8 + 2 * 8 * 1024);
        assert_eq!(core::mem::size_of::<AgentLiveness>(), 5 * 8);
        assert_eq!(core::mem::size_of::<ServedNetns>(), 8);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in map_names::ALL.iter().chain(program_names::ALL.iter()) {
            assert!(name.len() <= 15, "{name}");
        }
    }
}
