//! sockops: follow each redirected client socket through its life. When it connects we ask for
//! state callbacks; once established we publish its original destination under the connection's
//! addresses (what the proxy sees on accept, and removes once read); when it closes we forget
//! its cookie entry. And for inbound: every listen(2) of a meshed process records its port
//! (what sk_lookup captures), which the listener's close removes again.

use agent_common::{
    AF_INET, ConnTuple, InboundPort, KernelCounters, MeshedListener, OPEN_REDIRECTS_SLOT,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_TCP_CLOSE, BPF_TCP_LISTEN,
    },
    helpers::generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};

use crate::{
    accel,
    access::{read_field, read_words},
    maps::{INBOUND_PORTS, ORIG_BY_COOKIE, ORIG_BY_TUPLE, add_to_open_count, count, proxy_config},
};

#[inline(always)]
pub fn on_sock_op(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            if ctx.arg(0) == BPF_TCP_LISTEN {
                on_listener_close(ctx);
            } else {
                on_close(ctx);
            }
        }
        _ => {}
    }
}

/// A meshed process listens: connections to this port in its namespace go through the
/// agent's inbound listener (unless skipped). The latest listener on a port owns the entry.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let listener = MeshedListener {
        cookie: cookie(ctx),
        addr: local_addr(ctx),
        // SAFETY: ops is the kernel's bpf_sock_ops for this call.
        family: unsafe { read_field(&raw const (*ctx.ops).family) },
        pad: 0,
        // listen(2) runs in the listening process: its cgroup is the workload's.
        // SAFETY: bpf_get_current_cgroup_id takes no arguments.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
    };
    if INBOUND_PORTS
        .insert(listening_port(ctx), listener, u64::from(BPF_ANY))
        .is_err()
    {
        count(|c: &mut KernelCounters| &mut c.errors);
        return;
    }
    // The close callback removes the entry again.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        count(|c: &mut KernelCounters| &mut c.errors);
    }
}

/// A meshed listener closes: its port is no longer captured, unless another socket took the
/// entry over since (SO_REUSEPORT).
#[inline(always)]
fn on_listener_close(ctx: &SockOpsContext) {
    let port = listening_port(ctx);
    // SAFETY: copied out at once.
    let owner = INBOUND_PORTS.get_ptr(port).map(|l| unsafe { (*l).cookie });
    if owner == Some(cookie(ctx)) {
        let _ = INBOUND_PORTS.remove(port);
    }
}

#[inline(always)]
fn listening_port(ctx: &SockOpsContext) -> InboundPort {
    InboundPort {
        // SAFETY: bpf_get_netns_cookie is allowed in sock_ops programs.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        // SAFETY: ops is the kernel's bpf_sock_ops for this call; local_port is host order.
        port: unsafe { read_field(&raw const (*ctx.ops).local_port) } as u16,
        pad: [0; 3],
    }
}

#[inline(always)]
fn local_addr(ctx: &SockOpsContext) -> [u32; 4] {
    let ops = ctx.ops;
    // SAFETY (all reads): ops is the kernel's bpf_sock_ops for this call.
    if unsafe { read_field(&raw const (*ops).family) } as u16 == AF_INET {
        [unsafe { read_field(&raw const (*ops).local_ip4) }, 0, 0, 0]
    } else {
        unsafe { read_words(&raw const (*ops).local_ip6) }
    }
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: bpf_get_socket_cookie is allowed in sock_ops programs.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Only sockets that connect4/6 redirected get state callbacks: everything else costs nothing.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: only checked for presence; no reference is kept.
    if unsafe { ORIG_BY_COOKIE.get(cookie(ctx)) }.is_some() {
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
        if ctx.set_cb_flags(flags as i32).is_err() {
            count(|c: &mut KernelCounters| &mut c.errors);
        }
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let Some(dst) = ORIG_BY_COOKIE.get_ptr(cookie(ctx)) else {
        return;
    };
    // SAFETY: copied out at once; the entry is only removed by this socket's own close.
    let dst = unsafe { *dst };
    let tuple = client_tuple(ctx);
    if ORIG_BY_TUPLE
        .insert(tuple, dst, u64::from(BPF_ANY))
        .is_err()
    {
        count(|c: &mut KernelCounters| &mut c.errors);
    }
    if proxy_config().is_some_and(|config| config.accelerate != 0) {
        accel::on_app_established(ctx, tuple);
    }
}

/// The client socket is gone: getpeername will not be asked again. The tuple entry stays for the
/// proxy, which removes it once it has read it: a client that sends and closes at once can be
/// fully closed before the proxy even accepts its connection, and its bytes still need their
/// destination. Entries the proxy never reads age out of the LRU map.
#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    if ORIG_BY_COOKIE.remove(cookie(ctx)).is_ok() {
        // This socket was counted when connect4/6 redirected it.
        add_to_open_count(OPEN_REDIRECTS_SLOT, u64::MAX);
        accel::on_app_close(ctx);
    }
}

/// The client socket's view: local address -> proxy listener, in its network namespace.
#[inline(always)]
fn client_tuple(ctx: &SockOpsContext) -> ConnTuple {
    let ops = ctx.ops;
    // SAFETY (all reads): ops is the kernel's bpf_sock_ops for this call.
    let family = unsafe { read_field(&raw const (*ops).family) } as u16;
    let (src_addr, dst_addr) = if family == AF_INET {
        let local = unsafe { read_field(&raw const (*ops).local_ip4) };
        let remote = unsafe { read_field(&raw const (*ops).remote_ip4) };
        ([local, 0, 0, 0], [remote, 0, 0, 0])
    } else {
        let local = unsafe { read_words(&raw const (*ops).local_ip6) };
        let remote = unsafe { read_words(&raw const (*ops).remote_ip6) };
        (local, remote)
    };
    let local_port = unsafe { read_field(&raw const (*ops).local_port) };
    let remote_port = unsafe { read_field(&raw const (*ops).remote_port) };
    ConnTuple {
        src_addr,
        dst_addr,
        // local_port is host order; remote_port holds the network-order port in its upper half.
        src_port: local_port as u16,
        dst_port: u16::from_be((remote_port >> 16) as u16),
        family,
        pad: 0,
        // SAFETY: bpf_get_netns_cookie is allowed in sock_ops programs.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    }
}
