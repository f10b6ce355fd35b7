//! connect4/connect6: decide whether a TCP connect goes to the proxy, and if so remember where
//! it was going and rewrite it. Every path returns "allow": the hooks never refuse a connect.

use agent_common::{
    AF_INET, AF_INET6, INBOUND_STEERED_SLOT, KernelCounters, OPEN_REDIRECTS_SLOT, OriginalDst,
    POLICY_INJECT_DISABLED, ProxyConfig, ServedNetns,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};

use crate::access::read_words;
use crate::maps::{
    LIVENESS, ORIG_BY_COOKIE, SERVED_NETNS, SKIP_NETS_V4, SKIP_NETS_V6, SKIP_PORTS,
    add_to_open_count, count, open_count, policy, port_in, port_in_words, proxy_config,
    workload_policy,
};

const SOCK_STREAM: u32 = 1;
/// lo's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const IPPROTO_TCP: u32 = 6;

pub(crate) enum Decision {
    Redirect,
    BypassUnservedNetns,
    BypassUnmeshedWorkload,
    BypassAgentUnresponsive,
    BypassOverCapacity,
    BypassSelf,
    BypassPort,
    BypassNetwork,
}

#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) {
    let Some(config) = proxy_config() else { return };
    // SAFETY: the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    if !is_tcp(sa) {
        return;
    }
    let dst = OriginalDst {
        addr: [sa.user_ip4, 0, 0, 0],
        port: u16::from_be(sa.user_port as u16),
        family: AF_INET,
        pad: 0,
        cgroup: current_cgroup(),
    };
    let served = served_netns(ctx);
    let decision = decide(sa, config, served, &dst, || skip_network_v4(sa.user_ip4));
    if let (true, Some(served)) = (record(ctx, decision, &dst), served) {
        sa.user_ip4 = config.proxy_ip4;
        sa.user_port = u32::from(served.proxy_port.to_be());
    }
}

#[inline(always)]
pub fn connect6(ctx: &SockAddrContext) {
    let Some(config) = proxy_config() else { return };
    // SAFETY: the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    if !is_tcp(sa) {
        return;
    }
    // SAFETY: user_ip6 is a readable field of this call's context; read word by word, as the
    // verifier wants context loads at fixed offsets.
    let ip6 = unsafe { read_words(&raw const sa.user_ip6) };
    let dst = OriginalDst {
        addr: ip6,
        port: u16::from_be(sa.user_port as u16),
        family: AF_INET6,
        pad: 0,
        cgroup: current_cgroup(),
    };
    let served = served_netns(ctx);
    let decision = decide(sa, config, served, &dst, || {
        needs_its_interface(ip6) || skip_network_v6(ip6)
    });
    if let (true, Some(served)) = (record(ctx, decision, &dst), served) {
        set_user_ip6(sa, &config.proxy_ip6);
        sa.user_port = u32::from(served.proxy_port.to_be());
    }
}

/// Link-local (fe80::/10) and multicast (ff00::/8) destinations are reached through one
/// interface, named by the connect's scope id, which the original destination does not keep:
/// the agent's own connect would fail (EINVAL), so they go direct.
#[inline(always)]
fn needs_its_interface(ip6: [u32; 4]) -> bool {
    let [first, second, ..] = ip6[0].to_ne_bytes();
    first == 0xff || (first == 0xfe && second & 0xc0 == 0x80)
}

/// Writes `user_ip6` one word at a time: the verifier refuses the byte-wise copy the compiler
/// would emit for an array assignment into the context.
#[inline(always)]
pub fn set_user_ip6(sa: &mut bpf_sock_addr, words: &[u32; 4]) {
    for (slot, word) in sa.user_ip6.iter_mut().zip(words) {
        // SAFETY: slot points into the context the kernel handed us.
        unsafe { core::ptr::write_volatile(slot, *word) };
    }
}

/// Whether the agent can take this connection: its heartbeat is fresh (not stopped, hung or
/// dead) and its budget has room (not out of descriptors). Otherwise the connect goes direct.
#[inline(always)]
pub(crate) fn agent_can_serve() -> Decision {
    let Some(liveness) = LIVENESS.get(0) else {
        return Decision::BypassAgentUnresponsive;
    };
    // SAFETY: bpf_ktime_get_ns has no arguments; it reads CLOCK_MONOTONIC.
    let now = unsafe { bpf_ktime_get_ns() };
    if liveness.heartbeat_ns == 0 || now.saturating_sub(liveness.heartbeat_ns) > liveness.timeout_ns
    {
        return Decision::BypassAgentUnresponsive;
    }
    let steered_since = open_count(INBOUND_STEERED_SLOT).saturating_sub(liveness.inbound_steered);
    let inbound = liveness.open_inbound.saturating_add(steered_since);
    if open_count(OPEN_REDIRECTS_SLOT).saturating_add(inbound) >= liveness.max_connections {
        return Decision::BypassOverCapacity;
    }
    Decision::Redirect
}

/// The settings of the caller's network namespace, if the agent serves it.
#[inline(always)]
fn served_netns(ctx: &SockAddrContext) -> Option<ServedNetns> {
    // SAFETY: bpf_get_netns_cookie is allowed in sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    SERVED_NETNS.get_ptr(netns).map(|served| unsafe { *served })
}

#[inline(always)]
fn current_cgroup() -> u64 {
    // SAFETY: bpf_get_current_cgroup_id is allowed in sock_addr programs.
    unsafe { bpf_get_current_cgroup_id() }
}

#[inline(always)]
fn is_tcp(sa: &bpf_sock_addr) -> bool {
    sa.type_ == SOCK_STREAM && sa.protocol == IPPROTO_TCP
}

#[inline(always)]
fn decide(
    sa: &bpf_sock_addr,
    config: &ProxyConfig,
    served: Option<ServedNetns>,
    dst: &OriginalDst,
    skip_network: impl Fn() -> bool,
) -> Decision {
    let Some(served) = served else {
        return Decision::BypassUnservedNetns;
    };
    // SAFETY: for sock_addr programs the verifier types ctx->sk as a non-null socket.
    let (mark, bound_dev_if) = unsafe {
        let sk = sa.__bindgen_anon_1.sk;
        ((*sk).mark, (*sk).bound_dev_if)
    };
    if mark == config.bypass_mark || is_proxy(config, &served, dst) {
        return Decision::BypassSelf;
    }
    // A socket bound to an interface (SO_BINDTODEVICE) other than lo cannot reach the agent's
    // loopback listener: redirected, its connect would fail where the direct one works.
    if bound_dev_if != 0 && bound_dev_if != LOOPBACK_IFINDEX {
        return Decision::BypassNetwork;
    }
    if port_in(&SKIP_PORTS, dst.port) {
        return Decision::BypassPort;
    }
    if let Some(policy) = policy(workload_policy(dst.cgroup, served.policy)) {
        if policy.flags & POLICY_INJECT_DISABLED != 0 {
            return Decision::BypassUnmeshedWorkload;
        }
        if port_in_words(&policy.skip_outbound, dst.port) {
            return Decision::BypassPort;
        }
    }
    if skip_network() {
        return Decision::BypassNetwork;
    }
    agent_can_serve()
}

/// Counts the decision; on Redirect, records the original destination. Returns whether the
/// caller should rewrite the destination (false when recording failed: fail open).
#[inline(always)]
fn record(ctx: &SockAddrContext, decision: Decision, dst: &OriginalDst) -> bool {
    match decision {
        Decision::BypassUnservedNetns => {
            count(|c: &mut KernelCounters| &mut c.bypassed_unserved_netns)
        }
        Decision::BypassUnmeshedWorkload => {
            count(|c: &mut KernelCounters| &mut c.bypassed_unmeshed_workload)
        }
        Decision::BypassAgentUnresponsive => {
            count(|c: &mut KernelCounters| &mut c.bypassed_agent_unresponsive)
        }
        Decision::BypassOverCapacity => {
            count(|c: &mut KernelCounters| &mut c.bypassed_over_capacity)
        }
        Decision::BypassSelf => count(|c: &mut KernelCounters| &mut c.bypassed_self),
        Decision::BypassPort => count(|c: &mut KernelCounters| &mut c.bypassed_port),
        Decision::BypassNetwork => count(|c: &mut KernelCounters| &mut c.bypassed_network),
        Decision::Redirect => {
            // SAFETY: bpf_get_socket_cookie is allowed in sock_addr programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if ORIG_BY_COOKIE
                .insert(cookie, dst, u64::from(BPF_ANY))
                .is_err()
            {
                count(|c: &mut KernelCounters| &mut c.errors);
                return false;
            }
            count(|c: &mut KernelCounters| &mut c.redirected);
            add_to_open_count(OPEN_REDIRECTS_SLOT, 1);
            return true;
        }
    }
    false
}

#[inline(always)]
fn is_proxy(config: &ProxyConfig, served: &ServedNetns, dst: &OriginalDst) -> bool {
    dst.port == served.proxy_port
        && match dst.family {
            AF_INET => dst.addr[0] == config.proxy_ip4,
            _ => dst.addr == config.proxy_ip6,
        }
}

#[inline(always)]
fn skip_network_v4(ip4: u32) -> bool {
    SKIP_NETS_V4.get(&Key::new(32, ip4.to_ne_bytes())).is_some()
}

/// IPv4-mapped IPv6 destinations (::ffff:a.b.c.d) are checked against the IPv4 networks too.
#[inline(always)]
fn skip_network_v6(ip6: [u32; 4]) -> bool {
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0xffff_u32.to_be() {
        return skip_network_v4(ip6[3]);
    }
    let mut bytes = [0u8; 16];
    for (i, word) in ip6.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    SKIP_NETS_V6.get(&Key::new(128, bytes)).is_some()
}
