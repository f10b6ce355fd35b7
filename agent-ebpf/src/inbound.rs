//! sk_lookup: steer connections to a meshed process's listening port into the agent's inbound
//! listener in the same namespace. The connection keeps its addresses (the agent reads the
//! original destination from its own local address); the agent then dials the workload from
//! the passthrough address, which this program lets through. Every path returns SK_PASS:
//! without an assigned socket the kernel's own lookup runs, so nothing ever fails here.
//!
//! sk_lookup has no netns helper, so each attachment knows its namespace another way: the
//! host's program reads the agent's own namespace from CONFIG, a pod's finds its pod by the
//! address the connection arrives at (pod addresses are unique on a node).

use agent_common::{
    AF_INET, AF_INET6, INBOUND_STEERED_SLOT, InboundAddr, InboundPort, InboundSock, KernelCounters,
    MeshedListener, POLICY_INJECT_DISABLED, ProxyConfig, SERVED_INBOUND,
};
use aya_ebpf::{bindings::bpf_sk_lookup, programs::SkLookupContext};

use crate::{
    access::{read_field, read_words},
    maps::{
        INBOUND_ADDRS, INBOUND_PORTS, INBOUND_SOCKS, SERVED_NETNS, SKIP_IN_PORTS,
        add_to_open_count, count, policy, port_in, port_in_words, proxy_config, workload_policy,
    },
    redirect::{Decision, agent_can_serve},
};

pub const SK_PASS: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// The loopback device is always ifindex 1.
const LOOPBACK_IFINDEX: u32 = 1;

/// Where a lookup's program is attached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// The agent's own namespace (host mode).
    Host,
    /// A served pod's namespace.
    Pod,
}

/// The addresses of the connection being looked up.
struct Lookup {
    family: u32,
    local: [u32; 4],
    local_port: u16,
    remote: [u32; 4],
    ingress_ifindex: u32,
}

#[inline(always)]
pub fn lookup(ctx: &SkLookupContext, attached: Attached) {
    let Some(config) = proxy_config() else { return };
    let lookup = ctx.lookup;
    // SAFETY: lookup is the kernel's bpf_sk_lookup for this call.
    if unsafe { read_field(&raw const (*lookup).protocol) } != IPPROTO_TCP {
        return;
    }
    // SAFETY: as above.
    let conn = unsafe { read_lookup(lookup) };
    if is_passthrough(config, &conn, attached) {
        return;
    }
    let Some(netns) = namespace_of(config, &conn, attached) else {
        return;
    };
    let Some(netns_policy) = served_policy(netns) else {
        return;
    };
    let Some(listener) = meshed_listener(netns, &conn) else {
        return;
    };
    let policy = policy(workload_policy(listener.cgroup, netns_policy));
    if policy.is_some_and(|p| p.flags & POLICY_INJECT_DISABLED != 0) {
        return;
    }
    if port_in(&SKIP_IN_PORTS, conn.local_port)
        || policy.is_some_and(|p| port_in_words(&p.skip_inbound, conn.local_port))
    {
        count(|c: &mut KernelCounters| &mut c.inbound_bypassed_port);
        return;
    }
    match agent_can_serve() {
        Decision::Redirect => assign(ctx, netns, conn.family),
        Decision::BypassOverCapacity => {
            count(|c: &mut KernelCounters| &mut c.inbound_bypassed_over_capacity)
        }
        _ => count(|c: &mut KernelCounters| &mut c.inbound_bypassed_agent_unresponsive),
    }
}

/// # Safety
/// `lookup` must be the kernel's bpf_sk_lookup for this call.
#[inline(always)]
unsafe fn read_lookup(lookup: *mut bpf_sk_lookup) -> Lookup {
    // SAFETY (all reads): upheld by the caller; context loads at fixed offsets.
    unsafe {
        let family = read_field(&raw const (*lookup).family);
        let (local, remote) = if family == u32::from(AF_INET) {
            (
                [read_field(&raw const (*lookup).local_ip4), 0, 0, 0],
                [read_field(&raw const (*lookup).remote_ip4), 0, 0, 0],
            )
        } else {
            (
                read_words(&raw const (*lookup).local_ip6),
                read_words(&raw const (*lookup).remote_ip6),
            )
        };
        Lookup {
            family,
            local,
            // local_port is host order.
            local_port: read_field(&raw const (*lookup).local_port) as u16,
            remote,
            ingress_ifindex: read_field(&raw const (*lookup).ingress_ifindex),
        }
    }
}

/// The agent's own connections to workloads, and everything a pod sends itself. IPv4: the
/// agent dials from the passthrough address. IPv6 has none: the agent dials from the
/// workload's own address, so a connection whose two ends share an address is let through
/// (on the host that leaves out IPv6 clients of the host's own addresses, ::1 included). In
/// a pod the same rule, and loopback, cover the pod talking to itself, which is not inbound.
#[inline(always)]
fn is_passthrough(config: &ProxyConfig, conn: &Lookup, attached: Attached) -> bool {
    let ipv6 = conn.family == u32::from(AF_INET6);
    if !ipv6 && conn.remote[0] == config.passthrough_ip4 {
        return true;
    }
    (ipv6 || attached == Attached::Pod)
        && (conn.remote == conn.local || conn.ingress_ifindex == LOOPBACK_IFINDEX)
}

#[inline(always)]
fn namespace_of(config: &ProxyConfig, conn: &Lookup, attached: Attached) -> Option<u64> {
    match attached {
        Attached::Host => (config.host_netns != 0).then_some(config.host_netns),
        Attached::Pod => {
            let key = InboundAddr {
                addr: conn.local,
                family: conn.family,
            };
            // SAFETY: copied out at once.
            INBOUND_ADDRS.get_ptr(key).map(|netns| unsafe { *netns })
        }
    }
}

/// The namespace's policy id, if the agent captures inbound connections there.
#[inline(always)]
fn served_policy(netns: u64) -> Option<u32> {
    // SAFETY: copied out at once.
    let served = unsafe { *SERVED_NETNS.get_ptr(netns)? };
    (served.flags & SERVED_INBOUND != 0).then_some(served.policy)
}

/// The meshed process's listener on this port in this namespace, if it listens on this
/// address (or on every address).
#[inline(always)]
fn meshed_listener(netns: u64, conn: &Lookup) -> Option<MeshedListener> {
    let key = InboundPort {
        netns,
        port: conn.local_port,
        pad: [0; 3],
    };
    // SAFETY: copied out at once.
    let listener = unsafe { *INBOUND_PORTS.get_ptr(key)? };
    (listener.addr == [0; 4] || (listener.family == conn.family && listener.addr == conn.local))
        .then_some(listener)
}

#[inline(always)]
fn assign(ctx: &SkLookupContext, netns: u64, family: u32) {
    let key = InboundSock {
        netns,
        family,
        pad: 0,
    };
    match INBOUND_SOCKS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => {
            add_to_open_count(INBOUND_STEERED_SLOT, 1);
            count(|c: &mut KernelCounters| &mut c.inbound_redirected)
        }
        // No listener (the agent is stopping or has not opened it): the workload answers.
        Err(_) => count(|c: &mut KernelCounters| &mut c.errors),
    }
}
