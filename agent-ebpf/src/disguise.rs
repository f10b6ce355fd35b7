//! Keep the redirect invisible. getpeername4/6 show a redirected client its original peer;
//! getsockopt(SO_ORIGINAL_DST) on the proxy's accepted socket answers like iptables REDIRECT.

use agent_common::{AF_INET, AF_INET6, ConnTuple, OriginalDst, SO_ORIGINAL_DST};

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock, bpf_sockopt},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockoptContext},
};

use crate::{
    access::{read_field, read_words},
    maps::{ORIG_BY_COOKIE, ORIG_BY_TUPLE},
    redirect::set_user_ip6,
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

#[inline(always)]
fn original_dst_of(ctx: &SockAddrContext) -> Option<OriginalDst> {
    // SAFETY: bpf_get_socket_cookie is allowed in sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    ORIG_BY_COOKIE.get_ptr(cookie).map(|dst| unsafe { *dst })
}

#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) {
    let Some(dst) = original_dst_of(ctx) else {
        return;
    };
    if dst.family == AF_INET {
        // SAFETY: the kernel's bpf_sock_addr for this call.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = dst.addr[0];
        sa.user_port = u32::from(dst.port.to_be());
    }
}

#[inline(always)]
pub fn getpeername6(ctx: &SockAddrContext) {
    let Some(dst) = original_dst_of(ctx) else {
        return;
    };
    if dst.family == AF_INET6 {
        // SAFETY: the kernel's bpf_sock_addr for this call.
        let sa = unsafe { &mut *ctx.sock_addr };
        set_user_ip6(sa, &dst.addr);
        sa.user_port = u32::from(dst.port.to_be());
    }
}

#[inline(always)]
pub fn getsockopt(ctx: &SockoptContext) {
    // SAFETY: the kernel's bpf_sockopt for this call.
    let opt = unsafe { &mut *ctx.sockopt };
    if opt.optname != SO_ORIGINAL_DST || (opt.level != SOL_IP && opt.level != SOL_IPV6) {
        return;
    }
    // SAFETY: for sockopt programs ctx->sk is a non-null full socket.
    let sk = unsafe { opt.__bindgen_anon_1.sk };
    // SAFETY: bpf_get_netns_cookie is allowed in cgroup sockopt programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(dst) = ORIG_BY_TUPLE
        .get_ptr(accepted_tuple(sk, netns))
        .map(|d| unsafe { *d })
    else {
        return;
    };
    let written = match (opt.level, dst.family) {
        (SOL_IP, AF_INET) => write_sockaddr_in(opt, &dst),
        (SOL_IPV6, AF_INET6) => write_sockaddr_in6(opt, &dst),
        _ => false,
    };
    if written {
        opt.retval = 0;
    }
}

/// The proxy's accepted socket is the far end of the client's: swap local and remote.
/// Socket fields are read one load each: the verifier forbids pointer arithmetic on `sk`.
#[inline(always)]
fn accepted_tuple(sk: *const bpf_sock, netns: u64) -> ConnTuple {
    // SAFETY (all reads): sk is the kernel's socket for this call; each is a plain field load.
    let family = unsafe { read_field(&raw const (*sk).family) } as u16;
    let (src_addr, dst_addr) = if family == AF_INET {
        let remote = unsafe { read_field(&raw const (*sk).dst_ip4) };
        let local = unsafe { read_field(&raw const (*sk).src_ip4) };
        ([remote, 0, 0, 0], [local, 0, 0, 0])
    } else {
        let remote = unsafe { read_words(&raw const (*sk).dst_ip6) };
        let local = unsafe { read_words(&raw const (*sk).src_ip6) };
        (remote, local)
    };
    ConnTuple {
        src_addr,
        dst_addr,
        src_port: u16::from_be(unsafe { read_field(&raw const (*sk).dst_port) }),
        dst_port: unsafe { read_field(&raw const (*sk).src_port) } as u16,
        family,
        pad: 0,
        netns,
    }
}

/// Returns a pointer to `len` writable bytes of the option buffer, if the caller gave that many.
#[inline(always)]
fn option_buffer(opt: &mut bpf_sockopt, len: usize) -> Option<*mut u8> {
    // SAFETY: reading the buffer bounds the kernel set up for this call.
    let (start, end) = unsafe { (opt.__bindgen_anon_2.optval, opt.__bindgen_anon_3.optval_end) };
    let start = start as *mut u8;
    // SAFETY: only compared against end, as the verifier requires before any access.
    if unsafe { start.add(len) } > end as *mut u8 || (opt.optlen as usize) < len {
        return None;
    }
    Some(start)
}

#[inline(always)]
fn write_sockaddr_in(opt: &mut bpf_sockopt, dst: &OriginalDst) -> bool {
    let Some(buf) = option_buffer(opt, SOCKADDR_IN_LEN) else {
        return false;
    };
    let mut sa = [0u8; SOCKADDR_IN_LEN];
    sa[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
    sa[2..4].copy_from_slice(&dst.port.to_be_bytes());
    sa[4..8].copy_from_slice(&dst.addr[0].to_ne_bytes());
    // SAFETY: option_buffer checked that SOCKADDR_IN_LEN bytes are in bounds.
    unsafe { core::ptr::copy_nonoverlapping(sa.as_ptr(), buf, SOCKADDR_IN_LEN) };
    opt.optlen = SOCKADDR_IN_LEN as i32;
    true
}

#[inline(always)]
fn write_sockaddr_in6(opt: &mut bpf_sockopt, dst: &OriginalDst) -> bool {
    let Some(buf) = option_buffer(opt, SOCKADDR_IN6_LEN) else {
        return false;
    };
    let mut sa = [0u8; SOCKADDR_IN6_LEN];
    sa[0..2].copy_from_slice(&AF_INET6.to_ne_bytes());
    sa[2..4].copy_from_slice(&dst.port.to_be_bytes());
    for (i, word) in dst.addr.iter().enumerate() {
        sa[8 + i * 4..12 + i * 4].copy_from_slice(&word.to_ne_bytes());
    }
    // SAFETY: option_buffer checked that SOCKADDR_IN6_LEN bytes are in bounds.
    unsafe { core::ptr::copy_nonoverlapping(sa.as_ptr(), buf, SOCKADDR_IN6_LEN) };
    opt.optlen = SOCKADDR_IN6_LEN as i32;
    true
}
