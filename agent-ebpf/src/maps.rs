//! Map definitions. BTF-style (`.maps` section) so the kernel knows each key and value type and
//! `bpftool map dump` prints named fields. Names, sizes and types come from agent-common.

use agent_common::{
    ACCEL_CONNECTIONS, AccelPair, AccelReads, AccelSocket, AgentLiveness, ConnTuple,
    FWD_MAP_ENTRIES, InboundAddr, InboundPort, InboundSock, KernelCounters, KernelPolicy,
    MAX_INBOUND_ADDRS, MAX_INBOUND_PORTS, MAX_INBOUND_SOCKS, MAX_POLICIES, MAX_POLICY_CGROUPS,
    MAX_SERVED_NETNS, MAX_SKIP_NETWORKS, MAX_TRACKED_CONNECTIONS, MeshedListener, OriginalDst,
    PROBE_SOCKS_ENTRIES, ProxyConfig, SKIP_PORT_WORDS, ServedNetns, skip_port_slot,
};
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SkStorage, SockHash},
    macros::btf_map,
};

const TRACKED: usize = MAX_TRACKED_CONNECTIONS as usize;
const NETWORKS: usize = MAX_SKIP_NETWORKS as usize;
const FORWARDED_SOCKETS: usize = FWD_MAP_ENTRIES as usize;
const NAMESPACES: usize = MAX_SERVED_NETNS as usize;

/// Slot 0: where to redirect to. Written by the agent before any program is attached.
#[btf_map]
pub static CONFIG: Array<ProxyConfig, 1> = Array::new();

/// The network namespaces the agent has listeners in, by netns cookie. A connect from any
/// other namespace is left alone: its 127.0.0.1 is not where the agent listens.
#[btf_map]
pub static SERVED_NETNS: HashMap<u64, ServedNetns, NAMESPACES> = HashMap::new();

/// One bit per destination port that connect4/6 leave alone.
#[btf_map]
pub static SKIP_PORTS: Array<u64, { SKIP_PORT_WORDS as usize }> = Array::new();

/// Destination networks that connect4/6 leave alone (value unused).
#[btf_map]
pub static SKIP_NETS_V4: LpmTrie<[u8; 4], u8, NETWORKS> = LpmTrie::new();

#[btf_map]
pub static SKIP_NETS_V6: LpmTrie<[u8; 16], u8, NETWORKS> = LpmTrie::new();

/// Original destination of each redirected client socket, by socket cookie. Lives as long as
/// the socket, for getpeername.
#[btf_map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OriginalDst, TRACKED> = LruHashMap::new();

/// Original destination of each established redirected connection, by its address tuple, for
/// the proxy (map lookup or SO_ORIGINAL_DST).
#[btf_map]
pub static ORIG_BY_TUPLE: LruHashMap<ConnTuple, OriginalDst, TRACKED> = LruHashMap::new();

/// In-kernel forwarding: under each proxy socket's cookie, the socket its bytes go out of.
/// Filled by the agent; the kernel removes a socket when it closes.
#[btf_map]
pub static FWD_PEERS: SockHash<u64, FORWARDED_SOCKETS> = SockHash::new();

/// In-kernel forwarding: the proxy sockets whose received bytes `sockmesh_fwd` forwards
/// (membership is what matters; the agent keys them by cookie). Joined only after both sockets
/// of a connection are in `FWD_PEERS`, so a forwarded byte always has somewhere to go.
#[btf_map]
pub static FWD_ACTIVE: SockHash<u64, FORWARDED_SOCKETS> = SockHash::new();

/// `sockmesh check`'s sk_msg probe: the test sockets it creates, by `PROBE_TARGET_KEY` or not.
#[btf_map]
pub static PROBE_SOCKS: SockHash<u32, { PROBE_SOCKS_ENTRIES as usize }> = SockHash::new();

/// `--accelerate local`: the application's socket under its own view of the connection, the
/// agent's accepted socket under the reversed one (`sockmesh_accel` is attached here).
#[btf_map]
pub static ACCEL_SOCKS: SockHash<ConnTuple, { 2 * ACCEL_CONNECTIONS as usize }> = SockHash::new();

/// `--accelerate local`: the kernel's byte counts per connection, under the application
/// socket's tuple. Removed when the application's socket closes; LRU so that a lost close
/// cannot fill it.
#[btf_map]
pub static ACCEL_PAIRS: LruHashMap<ConnTuple, AccelPair, { ACCEL_CONNECTIONS as usize }> =
    LruHashMap::new();

/// `--accelerate local`: the agent's read counts per paired connection (written by the agent
/// only; it removes an entry when its connection ends).
#[btf_map]
pub static ACCEL_READS: LruHashMap<ConnTuple, AccelReads, { ACCEL_CONNECTIONS as usize }> =
    LruHashMap::new();

/// `--accelerate local`: per-socket side and decision.
#[btf_map]
pub static ACCEL_STATE: SkStorage<AccelSocket> = SkStorage::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<KernelCounters, 1> = PerCpuArray::new();

/// Inbound: ports meshed processes listen on, per namespace, with the listening socket (only
/// its close removes the entry) and its bound address.
#[btf_map]
pub static INBOUND_PORTS: HashMap<InboundPort, MeshedListener, { MAX_INBOUND_PORTS as usize }> =
    HashMap::new();

/// Inbound: the agent's inbound listeners (per namespace and family). The kernel drops a
/// listener from the map when it closes, so a dead agent's entries vanish with it.
#[btf_map]
pub static INBOUND_SOCKS: SockHash<InboundSock, { MAX_INBOUND_SOCKS as usize }> = SockHash::new();

/// Inbound: a served pod's addresses -> its netns cookie.
#[btf_map]
pub static INBOUND_ADDRS: HashMap<InboundAddr, u64, { MAX_INBOUND_ADDRS as usize }> =
    HashMap::new();

/// Inbound: one bit per destination port sk_lookup leaves alone (the user's list and the
/// agent's own ports).
#[btf_map]
pub static SKIP_IN_PORTS: Array<u64, { SKIP_PORT_WORDS as usize }> = Array::new();

/// Per-workload policies, by id (`ServedNetns::policy`, `CGROUP_POLICY`).
#[btf_map]
pub static POLICIES: HashMap<u32, KernelPolicy, { MAX_POLICIES as usize }> = HashMap::new();

/// Host mode: cgroup id -> policy id, for the cgroups a policy entry selects.
#[btf_map]
pub static CGROUP_POLICY: HashMap<u64, u32, { MAX_POLICY_CGROUPS as usize }> = HashMap::new();

/// Whether `port` has its bit set in a skip-port bitmap.
#[inline(always)]
pub fn port_in(bitmap: &Array<u64, { SKIP_PORT_WORDS as usize }>, port: u16) -> bool {
    let (word, bit) = skip_port_slot(port);
    bitmap.get(word).is_some_and(|bits| bits & bit != 0)
}

/// Whether `port` has its bit set in a policy's bitmap.
#[inline(always)]
pub fn port_in_words(words: &[u64; SKIP_PORT_WORDS as usize], port: u16) -> bool {
    let (word, bit) = skip_port_slot(port);
    words.get(word as usize).is_some_and(|bits| bits & bit != 0)
}

/// The policy id of a workload in `cgroup`: its cgroup's (host mode: a policy entry selected
/// it), else `netns_policy`, its namespace's (pod mode).
#[inline(always)]
pub fn workload_policy(cgroup: u64, netns_policy: u32) -> u32 {
    // SAFETY: copied out at once.
    CGROUP_POLICY
        .get_ptr(cgroup)
        .map_or(netns_policy, |id| unsafe { *id })
}

/// A policy by id; None for 0 (no policy) or an id the agent has not written.
#[inline(always)]
pub fn policy(id: u32) -> Option<&'static KernelPolicy> {
    if id == 0 {
        return None;
    }
    // SAFETY: the value lives in the map for as long as the map; the agent writes a changed
    // policy under a new id and removes the old one only after no namespace or cgroup names it.
    POLICIES.get_ptr(id).map(|policy| unsafe { &*policy })
}

/// Slot 0: the agent's heartbeat and budget, rewritten by the agent every 100 ms.
#[btf_map]
pub static LIVENESS: Array<AgentLiveness, 1> = Array::new();

/// Slot `OPEN_REDIRECTS_SLOT`: redirected client sockets still open. connect4/6 add one for
/// every redirect, sockops takes it off again when that socket closes. Slot
/// `INBOUND_STEERED_SLOT`: inbound connections sk_lookup steered to the agent, ever.
#[btf_map]
pub static OPEN_REDIRECTS: Array<u64, 2> = Array::new();

/// Adds `delta` (wrapping: -1 is u64::MAX) to an OPEN_REDIRECTS slot, atomically: connects
/// and closes run on every CPU at once.
#[inline(always)]
pub fn add_to_open_count(slot: u32, delta: u64) {
    if let Some(open) = OPEN_REDIRECTS.get_ptr_mut(slot) {
        // SAFETY: `open` points at the map's u64 value, valid for as long as the map.
        unsafe { atomic_add(open, delta) };
    }
}

/// Adds `delta` to the u64 at `value`, atomically.
///
/// # Safety
/// `value` must point at a u64 in a map value (or other memory the program may write).
#[inline(always)]
pub unsafe fn atomic_add(value: *mut u64, delta: u64) {
    // SAFETY: upheld by the caller. BPF's atomic add (the instruction behind
    // __sync_fetch_and_add with an unused result); core's AtomicU64 has no fetch_add on this
    // target.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({ptr} + 0) += {delta}",
            ptr = in(reg) value,
            delta = in(reg) delta,
        );
    }
}

/// An OPEN_REDIRECTS slot now.
#[inline(always)]
pub fn open_count(slot: u32) -> u64 {
    OPEN_REDIRECTS.get(slot).copied().unwrap_or(0)
}

/// Adds one to a kernel counter on this CPU.
#[inline(always)]
pub fn count(field: fn(&mut KernelCounters) -> &mut u64) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this program instance touches it while it runs.
        unsafe { *field(&mut *counters) += 1 };
    }
}

#[inline(always)]
pub fn proxy_config() -> Option<&'static ProxyConfig> {
    CONFIG.get(0).filter(|config| config.enabled != 0)
}
