//! Intercept: load the kernel programs, pin and fill their maps, attach them to the meshed
//! cgroup (and sk_lookup to each served network namespace), and detach them again. Links are
//! deliberately not pinned: when the agent dies, the kernel drops them and the cgroup's
//! traffic flows directly again (fail-open).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use agent_common::{
    AF_INET, AF_INET6, AgentLiveness, ConnTuple, INBOUND_PASSTHROUGH_IP4, InboundAddr, InboundPort,
    InboundSock, KernelCounters, KernelPolicy, MeshedListener, OriginalDst, ProxyConfig,
    SERVED_INBOUND, SKIP_PORT_WORDS, ServedNetns, map_names, program_names, skip_port_slot,
};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, SockHash, lpm_trie::Key},
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, ProgramFd, SkLookup, SkSkb,
        SockOps,
    },
};
use ipnetwork::IpNetwork;
use parking_lot::Mutex;

use crate::{
    accel::{AccelError, Accelerator},
    config::{Accelerate, Config, PortSet},
};

/// The compiled agent-ebpf object, embedded at build time (see build.rs).
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockmesh-ebpf.o"));

/// The kernel programs' object, for probes that load it on their own (`sockmesh check`);
/// empty in builds made without it.
pub fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

/// bpffs magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What failed while loading, pinning, filling or attaching the kernel programs, or while
/// using their maps.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(
        "this sockmesh binary was built without its eBPF object; build it with \
         `cargo xtask build` (or `cargo xtask run`)"
    )]
    NoObject,
    #[error("loading the eBPF object")]
    Load(#[source] EbpfError),
    #[error("{} is not on a bpf file system (mount -t bpf bpf DIR)", .0.display())]
    NotBpffs(PathBuf),
    #[error("mounting bpffs at {}", path.display())]
    Bpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {}", path.display())]
    CreatePinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another sockmesh agent is running with the pin dir {} (its heartbeat is fresh): stop \
         it, or give this agent another --pin-dir",
        path.display()
    )]
    PinDirInUse { path: PathBuf },
    #[error("removing stale pin {}", path.display())]
    RemoveStalePin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map {0} missing")]
    MapMissing(&'static str),
    #[error("pinning map {map} at {}", path.display())]
    Pin {
        map: &'static str,
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("opening {}", path.display())]
    OpenPin {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map} has an unexpected type")]
    MapType {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("writing {map}")]
    FillMap {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("adding skip network {network}")]
    SkipNetwork {
        network: IpNetwork,
        #[source]
        source: MapError,
    },
    #[error("adding a namespace to SERVED_NETNS")]
    Serve(#[source] MapError),
    #[error("reading COUNTERS")]
    ReadCounters(#[source] MapError),
    #[error("program {0} missing")]
    ProgramMissing(&'static str),
    /// A program of another type than expected, or a link that could not be taken.
    #[error(transparent)]
    Program(#[from] ProgramError),
    #[error("loading {program}")]
    LoadProgram {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("opening cgroup {}", path.display())]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching {program}")]
    Attach {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} to a network namespace")]
    AttachNetns {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("writing policy {id} to POLICIES")]
    Policy {
        id: u32,
        #[source]
        source: MapError,
    },
    #[error("setting the policy of cgroup {cgroup_id} in CGROUP_POLICY")]
    CgroupPolicy {
        cgroup_id: u64,
        #[source]
        source: MapError,
    },
    #[error("setting the policy of a namespace in SERVED_NETNS")]
    NetnsPolicy(#[source] MapError),
    #[error("listing the TCP listeners of namespace {netns} (sock_diag)")]
    Listeners {
        netns: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("reading an inbound listener's address")]
    ListenerAddr(#[source] std::io::Error),
    #[error("registering an inbound listener in INBOUND_SOCKS")]
    InboundListener(#[source] MapError),
    #[error("adding pod address {addr} to INBOUND_ADDRS")]
    InboundAddr {
        addr: IpAddr,
        #[source]
        source: MapError,
    },
    #[error("attaching {program} to {map}")]
    AttachToMap {
        program: &'static str,
        map: &'static str,
        #[source]
        source: ProgramError,
    },
}

type Result<T, E = InterceptError> = std::result::Result<T, E>;

/// The loaded programs and the maps user space keeps using while they run.
pub struct Intercept {
    ebpf: Ebpf,
    /// Attached links; dropping one detaches its program.
    links: Vec<Box<dyn Send + Sync>>,
    /// The forwarding verdict's attachment to FWD_ACTIVE. Kept until the agent exits, not
    /// dropped with the cgroup links: connections already handed to the kernel need it.
    forward_link: Option<Box<dyn Send + Sync>>,
    pin_dir: PathBuf,
}

/// The original-destination map, shared with every connection task, which reads its entry and
/// removes it (the kernel publishes, the proxy consumes). Each thread opens its own handle on
/// the pinned map the first time it needs one, so accepts on different proxy threads never
/// wait for each other.
pub struct OriginalDstMap {
    pin: PathBuf,
}

type TupleMap = HashMap<MapData, ConnTuple, OriginalDst>;

/// One thread's handle on an ORIG_BY_TUPLE map: aya's, and a descriptor of its own for the
/// one call aya does not offer (read and remove at once).
struct TupleHandle {
    map: TupleMap,
    fd: OwnedFd,
}

thread_local! {
    /// This thread's handle on an ORIG_BY_TUPLE map, with the pin it was opened from.
    static TUPLE_MAP: std::cell::RefCell<Option<(PathBuf, TupleHandle)>> =
        const { std::cell::RefCell::new(None) };
}

/// The namespaces connect4/6 redirect in (SERVED_NETNS): an entry is added only once the
/// agent listens in that namespace, and removed before its listeners close.
pub struct ServedNetnsMap(Mutex<HashMap<MapData, u64, ServedNetns>>);

/// Read access to the per-CPU kernel counters, for /metrics.
pub struct KernelCounterMap(PerCpuArray<MapData, KernelCounters>);

impl Intercept {
    /// Loads the programs and pins and fills the maps; nothing is attached yet. `host_netns`
    /// is the agent's own namespace when it serves it (host mode).
    pub fn load(config: &Config, host_netns: Option<u64>) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            return Err(InterceptError::NoObject);
        }
        // Before anything is made: a failed start removes the pins it finds (as its own).
        refuse_a_live_agents_pins(&config.pin_dir)?;
        let ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(InterceptError::Load)?;
        let mut intercept = Self {
            ebpf,
            links: Vec::new(),
            forward_link: None,
            pin_dir: config.pin_dir.clone(),
        };
        intercept.pin_maps()?;
        intercept.fill_maps(config, host_netns.unwrap_or(0))?;
        Ok(intercept)
    }

    /// Pins every map under the pin dir, replacing pins a previous agent left behind.
    fn pin_maps(&mut self) -> Result<()> {
        prepare_pin_dir(&self.pin_dir)?;
        for name in map_names::ALL {
            let path = self.pin_dir.join(name);
            if path.exists() {
                fs::remove_file(&path).map_err(|source| InterceptError::RemoveStalePin {
                    path: path.clone(),
                    source,
                })?;
            }
            let map = self
                .ebpf
                .map(name)
                .ok_or(InterceptError::MapMissing(name))?;
            map.pin(&path).map_err(|source| InterceptError::Pin {
                map: name,
                path,
                source,
            })?;
        }
        Ok(())
    }

    fn fill_maps(&mut self, config: &Config, host_netns: u64) -> Result<()> {
        let proxy = ProxyConfig {
            proxy_ip4: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            proxy_ip6: ipv6_words(Ipv6Addr::LOCALHOST),
            enabled: 1,
            accelerate: u16::from(config.accelerate == Accelerate::Local),
            bypass_mark: config.bypass_mark,
            passthrough_ip4: u32::from_ne_bytes(INBOUND_PASSTHROUGH_IP4),
            host_netns,
        };
        self.fill_port_bitmap(map_names::SKIP_PORTS, &config.skip_outbound_ports)?;
        self.fill_port_bitmap(map_names::SKIP_IN_PORTS, &config.skip_inbound_ports)?;
        self.fill_skip_networks(&config.skip_outbound_networks.0)?;
        // CONFIG last: the connect hooks do nothing until `enabled` is set.
        let mut config_map: Array<_, ProxyConfig> = self.typed_map(map_names::CONFIG)?;
        config_map
            .set(0, proxy, 0)
            .map_err(|source| InterceptError::FillMap {
                map: map_names::CONFIG,
                source,
            })?;
        Ok(())
    }

    /// Sets one bit per port of `ports` in a skip-port bitmap map.
    fn fill_port_bitmap(&mut self, name: &'static str, ports: &PortSet) -> Result<()> {
        let words = port_bitmap(ports);
        let mut bitmap: Array<_, u64> = self.typed_map(name)?;
        for (index, bits) in words.iter().enumerate() {
            if *bits != 0 {
                bitmap
                    .set(index as u32, bits, 0)
                    .map_err(|source| InterceptError::FillMap { map: name, source })?;
            }
        }
        Ok(())
    }

    fn fill_skip_networks(&mut self, networks: &[IpNetwork]) -> Result<()> {
        let mut v4: LpmTrie<_, [u8; 4], u8> = self.typed_map(map_names::SKIP_NETS_V4)?;
        for net in networks.iter().filter_map(|n| match n {
            IpNetwork::V4(net) => Some(net),
            IpNetwork::V6(_) => None,
        }) {
            let key = Key::new(u32::from(net.prefix()), net.network().octets());
            v4.insert(&key, 1, 0)
                .map_err(|source| InterceptError::SkipNetwork {
                    network: IpNetwork::V4(*net),
                    source,
                })?;
        }
        let mut v6: LpmTrie<_, [u8; 16], u8> = self.typed_map(map_names::SKIP_NETS_V6)?;
        for net in networks.iter().filter_map(|n| match n {
            IpNetwork::V6(net) => Some(net),
            IpNetwork::V4(_) => None,
        }) {
            let key = Key::new(u32::from(net.prefix()), net.network().octets());
            v6.insert(&key, 1, 0)
                .map_err(|source| InterceptError::SkipNetwork {
                    network: IpNetwork::V6(*net),
                    source,
                })?;
        }
        Ok(())
    }

    /// A typed handle on a map the agent keeps (the Ebpf keeps its own reference too).
    fn typed_map<T>(&mut self, name: &'static str) -> Result<T>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let path = self.pin_dir.join(name);
        let data =
            MapData::from_pin(&path).map_err(|source| InterceptError::OpenPin { path, source })?;
        let map = aya::maps::Map::from_map_data(data)
            .map_err(|source| InterceptError::Map { map: name, source })?;
        T::try_from(map).map_err(|source| InterceptError::MapType { map: name, source })
    }

    pub fn original_dst_map(&mut self) -> Result<OriginalDstMap> {
        let pin = self.pin_dir.join(map_names::ORIG_BY_TUPLE);
        // Opened once here, so a broken pin fails at start-up, not on the first accept.
        let _: TupleMap = self.typed_map(map_names::ORIG_BY_TUPLE)?;
        Ok(OriginalDstMap { pin })
    }

    pub fn served_netns_map(&mut self) -> Result<ServedNetnsMap> {
        self.typed_map(map_names::SERVED_NETNS)
            .map(|map| ServedNetnsMap(Mutex::new(map)))
    }

    /// `CONFIG`, for `--accelerate local`'s switch (`accel::foreign`).
    pub fn config_map(&mut self) -> Result<Array<MapData, ProxyConfig>> {
        self.typed_map(map_names::CONFIG)
    }

    pub fn liveness_map(&mut self) -> Result<Array<MapData, AgentLiveness>> {
        self.typed_map(map_names::LIVENESS)
    }

    /// Reads the kernel's count of redirected client sockets still open.
    pub fn open_redirects_map(&mut self) -> Result<Array<MapData, u64>> {
        self.typed_map(map_names::OPEN_REDIRECTS)
    }

    pub fn kernel_counter_map(&mut self) -> Result<KernelCounterMap> {
        self.typed_map(map_names::COUNTERS).map(KernelCounterMap)
    }

    pub fn policy_maps(&mut self) -> Result<PolicyMaps> {
        Ok(PolicyMaps {
            policies: self.typed_map(map_names::POLICIES)?,
            cgroups: self.typed_map(map_names::CGROUP_POLICY)?,
        })
    }

    /// Loads the two sk_lookup programs and opens the inbound maps. Nothing is attached:
    /// `Inbound::attach` does that per namespace, once its inbound listeners are registered.
    pub fn inbound(&mut self) -> Result<Inbound> {
        let mut program_fd = |name: &'static str| -> Result<ProgramFd> {
            let program: &mut SkLookup = program_named(&mut self.ebpf, name)?.try_into()?;
            program
                .load()
                .map_err(|source| InterceptError::LoadProgram {
                    program: name,
                    source,
                })?;
            program
                .fd()?
                .try_clone()
                .map_err(|source| InterceptError::AttachNetns {
                    program: name,
                    source,
                })
        };
        let host_program = program_fd(program_names::INBOUND_HOST)?;
        let pod_program = program_fd(program_names::INBOUND_POD)?;
        Ok(Inbound {
            host_program,
            pod_program,
            socks: Mutex::new(self.typed_map(map_names::INBOUND_SOCKS)?),
            addrs: Mutex::new(self.typed_map(map_names::INBOUND_ADDRS)?),
            ports: Mutex::new(self.typed_map(map_names::INBOUND_PORTS)?),
            links: Mutex::new(Vec::new()),
        })
    }

    /// Sets up in-kernel forwarding: attaches the `sockmesh_fwd` verdict to FWD_ACTIVE and
    /// hands out both socket maps (FWD_PEERS, FWD_ACTIVE). An error means this kernel cannot
    /// forward this way.
    pub fn kernel_forwarding(
        &mut self,
    ) -> Result<(SockHash<MapData, u64>, SockHash<MapData, u64>)> {
        let peers: SockHash<MapData, u64> = self.typed_map(map_names::FWD_PEERS)?;
        let active: SockHash<MapData, u64> = self.typed_map(map_names::FWD_ACTIVE)?;
        let name = program_names::FORWARD;
        let program: &mut SkSkb = program_named(&mut self.ebpf, name)?.try_into()?;
        program
            .load()
            .map_err(|source| InterceptError::LoadProgram {
                program: name,
                source,
            })?;
        let id = program
            .attach(active.fd())
            .map_err(|source| InterceptError::AttachToMap {
                program: name,
                map: map_names::FWD_ACTIVE,
                source,
            })?;
        self.forward_link = Some(Box::new(program.take_link(id)?));
        Ok((peers, active))
    }

    /// `--accelerate local`: attaches the fast path's programs (before `attach`, so that every
    /// socket sockops adds to `ACCEL_SOCKS` meets them).
    pub fn accelerator(&mut self) -> Result<Accelerator, AccelError> {
        Accelerator::attach(&mut self.ebpf)
    }

    /// Loads and attaches every program to `cgroup`. From here on, connects in the cgroup are
    /// redirected, so the listeners must already be up. connect4/6 come last: a connect they
    /// redirect must find sockops (which publishes its original destination) and the
    /// disguise hooks already in place.
    pub fn attach(&mut self, cgroup: &Path) -> Result<()> {
        let cgroup_dir = fs::File::open(cgroup).map_err(|source| InterceptError::OpenCgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let cgroup_fd = cgroup_dir.as_fd();
        // bpf_link attachments are always "multi"; the kernel wants no attach flags with them.
        let mode = CgroupAttachMode::Single;
        let Self { ebpf, links, .. } = self;
        // The same four steps for every program type; a macro because each type has its own
        // `attach` and link type.
        macro_rules! attach {
            ($program:ty, $name:expr) => {{
                let name = $name;
                let program: &mut $program = program_named(ebpf, name)?.try_into()?;
                program
                    .load()
                    .map_err(|source| InterceptError::LoadProgram {
                        program: name,
                        source,
                    })?;
                let id =
                    program
                        .attach(cgroup_fd, mode)
                        .map_err(|source| InterceptError::Attach {
                            program: name,
                            source,
                        })?;
                links.push(Box::new(program.take_link(id)?));
            }};
        }
        attach!(SockOps, program_names::SOCKOPS);
        attach!(CgroupSockopt, program_names::GETSOCKOPT);
        for name in [
            program_names::GETPEERNAME4,
            program_names::GETPEERNAME6,
            program_names::CONNECT4,
            program_names::CONNECT6,
        ] {
            attach!(CgroupSockAddr, name);
        }
        tracing::info!(cgroup = %cgroup.display(), programs = links.len(), "attached");
        Ok(())
    }

    /// Detaches every program: new connects in the cgroup go direct from now on. In reverse
    /// order of attaching, so connect4/6 go first and every connect they redirected still
    /// gets its original destination published. The maps stay, so connections already
    /// redirected can still be resolved.
    pub fn detach(&mut self) {
        let count = self.links.len();
        while let Some(link) = self.links.pop() {
            drop(link);
        }
        if count > 0 {
            tracing::info!(programs = count, "detached");
        }
    }
}

impl Drop for Intercept {
    fn drop(&mut self) {
        self.detach();
        self.forward_link = None;
        for name in map_names::ALL {
            let _ = fs::remove_file(self.pin_dir.join(name));
        }
        let _ = fs::remove_dir(&self.pin_dir);
    }
}

impl OriginalDstMap {
    /// Runs `f` on this thread's handle of the map (opened on first use); None when the pin
    /// cannot be opened.
    fn with_handle<R>(&self, f: impl FnOnce(&mut TupleHandle) -> R) -> Option<R> {
        TUPLE_MAP.with_borrow_mut(|slot| {
            if slot.as_ref().is_none_or(|(pin, _)| *pin != self.pin) {
                *slot = open_tuple_map(&self.pin).map(|handle| (self.pin.clone(), handle));
            }
            slot.as_mut().map(|(_, handle)| f(handle))
        })
    }

    /// `with_handle` on aya's map.
    fn with<R>(&self, f: impl FnOnce(&mut TupleMap) -> R) -> Option<R> {
        self.with_handle(|handle| f(&mut handle.map))
    }

    /// Reads and removes the entry of a connection: one system call per accepted connection
    /// where the kernel can (5.14), two where it cannot.
    pub fn take(&self, tuple: &ConnTuple) -> Option<OriginalDst> {
        if !LOOKUP_AND_DELETE_REFUSED.load(Ordering::Relaxed) {
            match self.take_at_once(tuple) {
                Some(Ok(found)) => return found,
                Some(Err(error)) if is_unsupported(&error) => {
                    tracing::debug!(%error, "this kernel cannot read and remove a map entry at once");
                    LOOKUP_AND_DELETE_REFUSED.store(true, Ordering::Relaxed);
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "reading ORIG_BY_TUPLE");
                    return None;
                }
                None => return None,
            }
        }
        self.with(|map| {
            let dst = map.get(tuple, 0).ok()?;
            let _ = map.remove(tuple);
            Some(dst)
        })
        .flatten()
    }

    /// `take` in one call; None when the pin cannot be opened.
    fn take_at_once(&self, tuple: &ConnTuple) -> Option<std::io::Result<Option<OriginalDst>>> {
        self.with_handle(|handle| crate::sys::take_original_dst(handle.fd.as_fd(), tuple))
    }

    /// Every connection with an entry (the sweep of connections never accepted reads them).
    pub fn tuples(&self) -> Vec<ConnTuple> {
        self.with(|map| map.keys().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    /// Removes the entry of a connection that will never be accepted.
    pub fn remove(&self, tuple: &ConnTuple) -> bool {
        self.with(|map| map.remove(tuple).is_ok()).unwrap_or(false)
    }

    /// Removes every entry of a namespace the agent stopped serving (connections that were
    /// redirected but never accepted). Returns how many there were.
    pub fn forget_netns(&self, netns_cookie: u64) -> usize {
        self.with(|map| forget_netns_in(map, netns_cookie))
            .unwrap_or(0)
    }
}

/// Set once the kernel refused BPF_MAP_LOOKUP_AND_DELETE_ELEM on ORIG_BY_TUPLE (before 5.14).
static LOOKUP_AND_DELETE_REFUSED: AtomicBool = AtomicBool::new(false);

fn is_unsupported(error: &std::io::Error) -> bool {
    // ENOTSUPP (524) is the kernel's own "not supported", which libc does not name.
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

fn open_tuple_map(pin: &Path) -> Option<TupleHandle> {
    let data = MapData::from_pin(pin)
        .inspect_err(|error| tracing::warn!(%error, pin = %pin.display(), "opening ORIG_BY_TUPLE"))
        .ok()?;
    let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
    let map = aya::maps::Map::from_map_data(data).ok()?;
    let map = TupleMap::try_from(map).ok()?;
    Some(TupleHandle { map, fd })
}

fn forget_netns_in(map: &mut TupleMap, netns_cookie: u64) -> usize {
    let stale: Vec<ConnTuple> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|tuple| tuple.netns == netns_cookie)
        .collect();
    for tuple in &stale {
        let _ = map.remove(tuple);
    }
    stale.len()
}

/// Inbound capture: the sk_lookup programs, the agent's inbound listeners and the pods'
/// addresses they find namespaces by, and one link per namespace they are attached to. A
/// namespace's order is listeners registered, addresses added, then attached (then
/// `ServedNetnsMap::serve` turns capture on); removal is the reverse.
pub struct Inbound {
    host_program: ProgramFd,
    pod_program: ProgramFd,
    socks: Mutex<SockHash<MapData, InboundSock>>,
    addrs: Mutex<HashMap<MapData, InboundAddr, u64>>,
    /// The meshed listening ports (sockops writes them; the agent reconciles them with what
    /// the kernel reports, for listeners sockops never saw).
    ports: Mutex<HashMap<MapData, InboundPort, MeshedListener>>,
    /// (netns cookie, link): closing a link detaches the program from that namespace.
    links: Mutex<Vec<(u64, OwnedFd)>>,
}

/// Which sk_lookup program a namespace gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundScope {
    /// The agent's own namespace: its cookie is in CONFIG.
    Host,
    /// A pod's: found by the address a connection arrives at.
    Pod,
}

impl Inbound {
    /// Registers the inbound listeners of a namespace (one per family; each stands for its
    /// SO_REUSEPORT group). The kernel removes a listener from the map when it closes.
    pub fn register_listeners(
        &self,
        netns_cookie: u64,
        listeners: &[std::net::TcpListener],
    ) -> Result<()> {
        let mut socks = self.socks.lock();
        for listener in listeners {
            let family = match listener
                .local_addr()
                .map_err(InterceptError::ListenerAddr)?
            {
                std::net::SocketAddr::V4(_) => AF_INET,
                std::net::SocketAddr::V6(_) => AF_INET6,
            };
            let key = InboundSock {
                netns: netns_cookie,
                family: u32::from(family),
                pad: 0,
            };
            socks
                .insert(key, std::os::fd::AsRawFd::as_raw_fd(listener), 0)
                .map_err(InterceptError::InboundListener)?;
        }
        Ok(())
    }

    /// A pod's addresses now lead to its namespace.
    pub fn add_addresses(&self, netns_cookie: u64, ips: &[IpAddr]) -> Result<()> {
        let mut addrs = self.addrs.lock();
        for ip in ips {
            addrs
                .insert(inbound_addr(*ip), netns_cookie, 0)
                .map_err(|source| InterceptError::InboundAddr { addr: *ip, source })?;
        }
        Ok(())
    }

    /// Removes a pod's addresses, unless another pod holds one of them by now.
    pub fn remove_addresses(&self, netns_cookie: u64, ips: &[IpAddr]) {
        let mut addrs = self.addrs.lock();
        for ip in ips {
            let key = inbound_addr(*ip);
            if addrs.get(&key, 0).ok() == Some(netns_cookie) {
                let _ = addrs.remove(&key);
            }
        }
    }

    /// Attaches the scope's sk_lookup program to the namespace `netns` refers to.
    pub fn attach(
        &self,
        netns_cookie: u64,
        netns: BorrowedFd<'_>,
        scope: InboundScope,
    ) -> Result<()> {
        let (program, name) = match scope {
            InboundScope::Host => (&self.host_program, program_names::INBOUND_HOST),
            InboundScope::Pod => (&self.pod_program, program_names::INBOUND_POD),
        };
        let link = crate::sys::link_sk_lookup(program.as_fd(), netns).map_err(|source| {
            InterceptError::AttachNetns {
                program: name,
                source,
            }
        })?;
        self.links.lock().push((netns_cookie, link));
        Ok(())
    }

    /// Detaches from one namespace: its inbound connections reach the workload directly.
    pub fn detach(&self, netns_cookie: u64) {
        self.links
            .lock()
            .retain(|(cookie, _)| *cookie != netns_cookie);
    }

    /// The meshed listening ports recorded in one namespace.
    pub fn ports_of(&self, netns_cookie: u64) -> Vec<(InboundPort, MeshedListener)> {
        let ports = self.ports.lock();
        let keys: Vec<InboundPort> = ports
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.netns == netns_cookie)
            .collect();
        keys.into_iter()
            .filter_map(|key| ports.get(&key, 0).ok().map(|value| (key, value)))
            .collect()
    }

    /// The cgroup of the process listening on `port` in a namespace, as recorded at listen(2)
    /// (or found by the listener scan).
    pub fn listener_cgroup(&self, netns_cookie: u64, port: u16) -> Option<u64> {
        let key = InboundPort {
            netns: netns_cookie,
            port,
            pad: [0; 3],
        };
        self.ports
            .lock()
            .get(&key, 0)
            .ok()
            .map(|listener| listener.cgroup)
    }

    /// Records a meshed listener unless the port already has one.
    pub fn add_port(&self, key: InboundPort, listener: MeshedListener) -> Result<()> {
        const BPF_NOEXIST: u64 = 1;
        match self.ports.lock().insert(key, listener, BPF_NOEXIST) {
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            other => other.map_err(|source| InterceptError::FillMap {
                map: map_names::INBOUND_PORTS,
                source,
            }),
        }
    }

    /// Removes every port entry of a namespace the agent stopped serving.
    pub fn forget_ports(&self, netns_cookie: u64) {
        for (key, value) in self.ports_of(netns_cookie) {
            self.remove_port(&key, value.cookie);
        }
    }

    /// Removes a port's entry if it still names the listener `cookie`.
    pub fn remove_port(&self, key: &InboundPort, cookie: u64) {
        let mut ports = self.ports.lock();
        if ports
            .get(key, 0)
            .is_ok_and(|listener| listener.cookie == cookie)
        {
            let _ = ports.remove(key);
        }
    }

    /// Detaches from every namespace (shutdown).
    pub fn detach_all(&self) {
        let count = std::mem::take(&mut *self.links.lock()).len();
        if count > 0 {
            tracing::info!(namespaces = count, "inbound capture detached");
        }
    }
}

fn inbound_addr(ip: IpAddr) -> InboundAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => InboundAddr {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            family: u32::from(AF_INET),
        },
        IpAddr::V6(v6) => InboundAddr {
            addr: ipv6_words(v6),
            family: u32::from(AF_INET6),
        },
    }
}

/// The per-workload policy maps. A policy id names one content for its whole life: a changed
/// policy is written under a new id, so a program never reads a half-written one.
pub struct PolicyMaps {
    policies: HashMap<MapData, u32, KernelPolicy>,
    cgroups: HashMap<MapData, u64, u32>,
}

impl PolicyMaps {
    pub fn write(&mut self, id: u32, policy: &KernelPolicy) -> Result<()> {
        self.policies
            .insert(id, *policy, 0)
            .map_err(|source| InterceptError::Policy { id, source })
    }

    pub fn remove(&mut self, id: u32) {
        let _ = self.policies.remove(&id);
    }

    /// Host mode: connects from processes in this cgroup follow policy `id`.
    pub fn set_cgroup(&mut self, cgroup_id: u64, id: u32) -> Result<()> {
        self.cgroups
            .insert(cgroup_id, id, 0)
            .map_err(|source| InterceptError::CgroupPolicy { cgroup_id, source })
    }

    pub fn cgroups(&self) -> Vec<u64> {
        self.cgroups.keys().filter_map(Result::ok).collect()
    }

    pub fn remove_cgroup(&mut self, cgroup_id: u64) {
        let _ = self.cgroups.remove(&cgroup_id);
    }
}

impl ServedNetnsMap {
    /// From now on, TCP connects in this namespace go to `proxy_port` there, and connections
    /// to its meshed listeners go through the agent (the namespace's sk_lookup link and
    /// inbound listeners must be in place), under policy `policy` (0: none).
    pub fn serve(&self, netns_cookie: u64, proxy_port: u16, policy: u32) -> Result<()> {
        let served = ServedNetns {
            proxy_port,
            flags: SERVED_INBOUND,
            policy,
        };
        self.0
            .lock()
            .insert(netns_cookie, served, 0)
            .map_err(InterceptError::Serve)
    }

    /// Switches a served namespace to policy `policy`; nothing for one not served.
    pub fn set_policy(&self, netns_cookie: u64, policy: u32) -> Result<()> {
        let mut map = self.0.lock();
        let Ok(mut served) = map.get(&netns_cookie, 0) else {
            return Ok(());
        };
        served.policy = policy;
        map.insert(netns_cookie, served, 0)
            .map_err(InterceptError::NetnsPolicy)
    }

    /// Connects in this namespace go direct again.
    pub fn unserve(&self, netns_cookie: u64) {
        let _ = self.0.lock().remove(&netns_cookie);
    }
}

impl KernelCounterMap {
    /// The counters summed over all CPUs.
    pub fn read(&self) -> Result<KernelCounters> {
        let per_cpu = self.0.get(&0, 0).map_err(InterceptError::ReadCounters)?;
        Ok(per_cpu
            .iter()
            .fold(KernelCounters::default(), |mut sum, cpu| {
                sum.redirected += cpu.redirected;
                sum.bypassed_port += cpu.bypassed_port;
                sum.bypassed_network += cpu.bypassed_network;
                sum.bypassed_self += cpu.bypassed_self;
                sum.errors += cpu.errors;
                sum.bypassed_unserved_netns += cpu.bypassed_unserved_netns;
                sum.bypassed_agent_unresponsive += cpu.bypassed_agent_unresponsive;
                sum.bypassed_over_capacity += cpu.bypassed_over_capacity;
                sum.inbound_redirected += cpu.inbound_redirected;
                sum.inbound_bypassed_port += cpu.inbound_bypassed_port;
                sum.inbound_bypassed_agent_unresponsive += cpu.inbound_bypassed_agent_unresponsive;
                sum.inbound_bypassed_over_capacity += cpu.inbound_bypassed_over_capacity;
                sum.bypassed_unmeshed_workload += cpu.bypassed_unmeshed_workload;
                sum.accel_redirected += cpu.accel_redirected;
                sum.accel_fell_back += cpu.accel_fell_back;
                sum
            }))
    }
}

fn program_named<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or(InterceptError::ProgramMissing(name))
}

/// One bit per port of `ports`, in the kernel's skip-port layout (`skip_port_slot`).
pub fn port_bitmap(ports: &PortSet) -> [u64; SKIP_PORT_WORDS as usize] {
    let mut words = [0u64; SKIP_PORT_WORDS as usize];
    for port in ports.ports() {
        let (word, bit) = skip_port_slot(port);
        words[word as usize] |= bit;
    }
    words
}

/// Network-order words of an IPv6 address, as the kernel's `user_ip6` holds them.
pub fn ipv6_words(addr: Ipv6Addr) -> [u32; 4] {
    let octets = addr.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[i * 4],
            octets[i * 4 + 1],
            octets[i * 4 + 2],
            octets[i * 4 + 3],
        ])
    })
}

/// Refuses a pin dir whose LIVENESS heartbeat still moves: another agent is running with it,
/// and replacing its pins would break it (its proxy threads open ORIG_BY_TUPLE by path), as
/// would removing them when this agent exits. A heartbeat that is fresh but does not move
/// within its timeout is an agent that just died (a crash, then an immediate restart): its
/// pins are replaced, as are those of any agent whose heartbeat is stale.
fn refuse_a_live_agents_pins(pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join(map_names::LIVENESS);
    let read = || {
        MapData::from_pin(&path)
            .ok()
            .and_then(|data| aya::maps::Map::from_map_data(data).ok())
            .and_then(|map| Array::<MapData, AgentLiveness>::try_from(map).ok())
            .and_then(|map| map.get(&0, 0).ok())
    };
    let Some(first) = read() else {
        return Ok(());
    };
    let age = crate::sys::monotonic_ns().saturating_sub(first.heartbeat_ns);
    if first.heartbeat_ns == 0 || age > first.timeout_ns {
        return Ok(());
    }
    // A live agent ticks every HEARTBEAT_PERIOD; wait out what is left of the timeout (at
    // most the timeout itself, 1 s by default) and look again.
    let wait = first.timeout_ns.saturating_sub(age)
        + 2 * crate::liveness::HEARTBEAT_PERIOD.as_nanos() as u64;
    #[allow(clippy::disallowed_methods)] // start-up, before any runtime work
    std::thread::sleep(std::time::Duration::from_nanos(wait));
    match read() {
        Some(now) if now.heartbeat_ns != first.heartbeat_ns => Err(InterceptError::PinDirInUse {
            path: pin_dir.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// Makes sure the pin dir exists on a bpffs, mounting bpffs at /sys/fs/bpf when it is missing.
fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        if parent != Path::new("/sys/fs/bpf") {
            return Err(InterceptError::NotBpffs(parent.to_path_buf()));
        }
        mount_bpffs(parent)?;
    }
    fs::create_dir_all(pin_dir).map_err(|source| InterceptError::CreatePinDir {
        path: pin_dir.to_path_buf(),
        source,
    })
}

fn is_bpffs(path: &Path) -> bool {
    crate::sys::file_system_type(path).is_ok_and(|kind| kind == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<()> {
    tracing::info!(path = %path.display(), "mounting bpffs");
    crate::sys::mount_bpffs(path).map_err(|source| InterceptError::Bpffs {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_words_are_network_order() {
        let words = ipv6_words(Ipv6Addr::LOCALHOST);
        assert_eq!(words[..3], [0, 0, 0]);
        assert_eq!(words[3].to_ne_bytes(), [0, 0, 0, 1]);
    }
}
