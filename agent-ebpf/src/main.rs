//! sockmesh kernel programs, attached to one cgroup v2 by the agent.
//!
//! One entry point per program; the logic lives in small modules, one per concern:
//! `redirect` (connect4/6), `tracking` (sockops), `disguise` (getpeername4/6, getsockopt),
//! `forward` (stream verdict: in-kernel forwarding between the proxy's own sockets),
//! `inbound` (sk_lookup, attached per network namespace: connections to meshed listeners),
//! `probe` (sk_msg, only on `sockmesh check`'s own test sockets), `accel` (sk_msg: the
//! experimental `--accelerate local` fast path between applications and the agent).
//! Every hook on application sockets returns "allow": sockmesh never makes a socket call fail.
#![no_std]
#![no_main]
// Inline BPF assembly (the atomic add in maps.rs), as aya-ebpf itself uses.
#![feature(asm_experimental_arch)]

mod accel;
mod access;
mod disguise;
mod forward;
mod inbound;
mod maps;
mod probe;
mod redirect;
mod tracking;

use aya_ebpf::{
    macros::{cgroup_sock_addr, cgroup_sockopt, sk_lookup, sk_msg, sock_ops, stream_verdict},
    programs::{
        SkBuffContext, SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext,
        SockoptContext,
    },
};

use inbound::{Attached, SK_PASS};

const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sockmesh_conn4(ctx: SockAddrContext) -> i32 {
    redirect::connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn sockmesh_conn6(ctx: SockAddrContext) -> i32 {
    redirect::connect6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn sockmesh_peer4(ctx: SockAddrContext) -> i32 {
    disguise::getpeername4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn sockmesh_peer6(ctx: SockAddrContext) -> i32 {
    disguise::getpeername6(&ctx);
    ALLOW
}

#[cgroup_sockopt(getsockopt)]
pub fn sockmesh_getopt(ctx: SockoptContext) -> i32 {
    disguise::getsockopt(&ctx);
    ALLOW
}

#[sock_ops]
pub fn sockmesh_ops(ctx: SockOpsContext) -> u32 {
    tracking::on_sock_op(&ctx);
    ALLOW as u32
}

#[stream_verdict]
pub fn sockmesh_fwd(ctx: SkBuffContext) -> u32 {
    forward::verdict(&ctx)
}

#[sk_lookup]
pub fn sockmesh_inhost(ctx: SkLookupContext) -> u32 {
    inbound::lookup(&ctx, Attached::Host);
    SK_PASS
}

#[sk_lookup]
pub fn sockmesh_in_pod(ctx: SkLookupContext) -> u32 {
    inbound::lookup(&ctx, Attached::Pod);
    SK_PASS
}

#[sk_msg]
pub fn sockmesh_probe(ctx: SkMsgContext) -> u32 {
    probe::msg_verdict(&ctx)
}

#[sk_msg]
pub fn sockmesh_accel(ctx: SkMsgContext) -> u32 {
    accel::msg_verdict(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
