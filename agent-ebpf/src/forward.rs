//! In-kernel forwarding between the proxy's two sockets of one connection (the accepted client
//! leg and the upstream leg), once the agent has decided the connection is opaque.
//!
//! The agent puts both sockets in `FWD_PEERS` (each under its own cookie, holding its peer)
//! and then in `FWD_ACTIVE`, which this stream-verdict program is attached to. From then on
//! every byte a socket receives is handed, in order, to its peer's send queue by the kernel:
//! no wake-up of the agent, no copy, and no pipe. The bytes stay charged to the receiving
//! socket until they are sent, so a slow reader closes the sender's TCP window as it would with
//! a user-space proxy.

use aya_ebpf::{
    EbpfContext, bindings::sk_action, helpers::generated::bpf_get_socket_cookie,
    programs::SkBuffContext,
};

use crate::maps::FWD_PEERS;

/// Send out of the peer's egress (not into its receive queue).
const TO_PEER_EGRESS: u64 = 0;

#[inline(always)]
pub fn verdict(ctx: &SkBuffContext) -> u32 {
    // A FIN that arrives on its own is an empty skb. TCP has already taken note of it (the
    // agent sees the end of stream and passes it on); redirected, the peer's sender would
    // "send" zero bytes, which the kernel takes for a broken pipe.
    if ctx.len() == 0 {
        return sk_action::SK_DROP;
    }
    // SAFETY: bpf_get_socket_cookie is allowed in sk_skb programs; the skb's socket is the
    // receiving proxy socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A miss means the peer socket is already closed (the kernel drops closed sockets from
    // the map): the agent is tearing the connection down, and there is nowhere to send to.
    // bpf_sk_redirect_hash answers SK_DROP then, and SK_PASS on success.
    FWD_PEERS.redirect_skb(ctx, cookie, TO_PEER_EGRESS) as u32
}
