//! `sockmesh check`'s probe of sk_msg redirects on this kernel, the mechanism of the planned
//! `--accelerate local` fast path. Attached only to `PROBE_SOCKS`, which holds nothing but the
//! probe's own loopback sockets: no application socket ever meets this program.

use agent_common::PROBE_TARGET_KEY;
use aya_ebpf::{bindings::BPF_F_INGRESS, programs::SkMsgContext};

use crate::{inbound::SK_PASS, maps::PROBE_SOCKS};

/// Redirects the message into the receive queue of the socket under `PROBE_TARGET_KEY`. On a
/// miss the helper answers SK_DROP, which would fail the sender's sendmsg with EACCES: pass
/// it on by plain TCP instead, as the fast path must.
#[inline(always)]
pub fn msg_verdict(ctx: &SkMsgContext) -> u32 {
    let _ = PROBE_SOCKS.redirect_msg(ctx, PROBE_TARGET_KEY, u64::from(BPF_F_INGRESS));
    SK_PASS
}
