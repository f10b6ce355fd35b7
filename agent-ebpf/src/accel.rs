//! `--accelerate local` (experimental): the bytes between an application's socket and the
//! agent's accepted socket of the same connection skip TCP. Each side's sends are put straight
//! into the other side's receive queue (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`, the only
//! redirect that ever touches an application socket), so the loopback hop costs no segments,
//! no ACKs and no softirq.
//!
//! The rules that keep this invisible to the application (docs/design-sk-msg.md):
//! - Order: a socket reads its redirected bytes before any plain TCP bytes, so a direction may
//!   go from redirect to plain TCP, never back; and bytes the application sent by TCP before
//!   the agent's socket was paired must all be read by the agent before a redirect may follow.
//! - Both directions redirect: on 6.18 an application socket in a sockhash that receives plain
//!   TCP reports FIONREAD 0, which stalls nginx, Java NIO and .NET. Towards the application the
//!   agent's side therefore never falls back; the agent drops the application's socket from
//!   the map before its first write when a connection is not accelerated.
//! - Bounds: the kernel does not bound a receive queue filled by redirects; `ACCEL_BOUND` does:
//!   into the agent, here, against the read count the agent publishes in `ACCEL_READS` (a
//!   tracing program could count reads in the kernel, but fentry/fexit do not load here); into
//!   the application, the agent itself, the only writer.
//! - A miss never fails the application's send: it becomes plain TCP (a miss means the peer
//!   socket closed, or was never paired).

use agent_common::{
    ACCEL_BOUND, ACCEL_PLAIN, ACCEL_REDIRECTING, ACCEL_SIDE_APP, ACCEL_UNDECIDED, AccelPair,
    AccelReads, AccelSocket, ConnTuple, KernelCounters,
};
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::generated::bpf_sk_storage_get,
    programs::{SkMsgContext, SockOpsContext},
};

use crate::{
    access::read_field,
    inbound::SK_PASS,
    maps::{ACCEL_PAIRS, ACCEL_READS, ACCEL_SOCKS, ACCEL_STATE, atomic_add, count},
};

/// The per-socket state of `sk`, if the fast path knows this socket.
#[inline(always)]
fn socket_state(sk: *mut bpf_sock, create: Option<&mut AccelSocket>) -> *mut AccelSocket {
    let (value, flags) = match create {
        Some(value) => (
            core::ptr::from_mut(value).cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        ),
        None => (core::ptr::null_mut(), 0),
    };
    // SAFETY: the helper checks `sk` (NULL included) and returns NULL when it has no storage
    // and none was asked for; the map pointer is the address of the map definition, as the
    // loader expects.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&ACCEL_STATE).cast_mut().cast(),
            sk.cast(),
            value,
            flags,
        )
    }
    .cast()
}

/// sockops, ACTIVE_ESTABLISHED of a redirected client socket: join the fast path if nothing
/// was sent yet (TCP Fast Open data would already be on its way by TCP).
#[inline(always)]
pub fn on_app_established(ctx: &SockOpsContext, tuple: ConnTuple) {
    let ops = ctx.ops;
    // SAFETY: ops is the kernel's bpf_sock_ops for this call.
    if unsafe { read_field(&raw const (*ops).data_segs_out) } != 0 {
        return;
    }
    // SAFETY: as above; `sk` is the established socket (the verifier wants the NULL check).
    let sk = unsafe { read_field(&raw const (*ops).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return;
    }
    let mut state = AccelSocket {
        pair: tuple,
        side: ACCEL_SIDE_APP,
        decision: ACCEL_UNDECIDED,
    };
    // A failure anywhere here leaves the connection on plain TCP: the agent's socket then finds
    // no peer in ACCEL_SOCKS and never redirects (not counted as a kernel error: the connect
    // itself went where it should).
    if socket_state(sk, Some(&mut state)).is_null()
        || ACCEL_PAIRS
            .insert(tuple, AccelPair::default(), u64::from(BPF_NOEXIST))
            .is_err()
    {
        return;
    }
    // SAFETY: ops is the kernel's bpf_sock_ops for this call, which the helper takes.
    let ops = unsafe { &mut *ops };
    if ACCEL_SOCKS
        .update(tuple, ops, u64::from(BPF_NOEXIST))
        .is_err()
    {
        let _ = ACCEL_PAIRS.remove(tuple);
    }
}

/// sockops, the application's socket closed: its counts go (the kernel already took the socket
/// out of `ACCEL_SOCKS`).
#[inline(always)]
pub fn on_app_close(ctx: &SockOpsContext) {
    // SAFETY: ops is the kernel's bpf_sock_ops for this call.
    let sk = unsafe { read_field(&raw const (*ctx.ops).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return;
    }
    let state = socket_state(sk, None);
    if state.is_null() {
        return;
    }
    // SAFETY: storage of this socket, valid while the socket is.
    let state = unsafe { *state };
    if state.side == ACCEL_SIDE_APP {
        let _ = ACCEL_PAIRS.remove(state.pair);
    }
}

/// sk_msg on a socket in `ACCEL_SOCKS`: where this message goes.
#[inline(always)]
pub fn msg_verdict(ctx: &SkMsgContext) -> u32 {
    // SAFETY: msg is the kernel's sk_msg_md for this call; `sk` is the sending socket.
    let sk = unsafe { read_field(&raw const (*ctx.msg).__bindgen_anon_3.sk) };
    let state = socket_state(sk, None);
    if state.is_null() {
        return SK_PASS;
    }
    // SAFETY: storage of the sending socket, whose lock this program runs under.
    let state = unsafe { &mut *state };
    let Some(pair) = ACCEL_PAIRS.get_ptr_mut(state.pair) else {
        // The application's socket closed: nothing to pair with any more.
        return SK_PASS;
    };
    let size = u64::from(ctx.size());
    // SAFETY: copied out at once; only the agent writes these, whole.
    let reads = ACCEL_READS
        .get_ptr(state.pair)
        .map(|reads| unsafe { *reads });
    if state.side == ACCEL_SIDE_APP {
        from_app(ctx, state, pair, reads, size)
    } else {
        from_agent(ctx, state, pair, size)
    }
}

/// The application sends. Never fails its send: every path that does not redirect is TCP.
/// `reads` is None until the agent has paired the connection.
#[inline(always)]
fn from_app(
    ctx: &SkMsgContext,
    state: &mut AccelSocket,
    pair: *mut AccelPair,
    reads: Option<AccelReads>,
    size: u64,
) -> u32 {
    // SAFETY (both reads of `pair`): the map value lives as long as the entry.
    let (plain, redirected) = unsafe {
        (
            read_field(&raw const (*pair).app_plain),
            read_field(&raw const (*pair).app_redirected),
        )
    };
    match state.decision {
        ACCEL_UNDECIDED => {
            // Bytes sent by TCP so far must all be read before a redirect may overtake them:
            // then none is in flight or queued. `agent_read` only grows, so a stale value
            // only delays the switch.
            let drained = reads.is_some_and(|reads| reads.agent_read >= plain);
            if !drained || !redirect(ctx, state.pair.reversed()) {
                // SAFETY: `pair` as above; counted before TCP carries them.
                unsafe { atomic_add(&raw mut (*pair).app_plain, size) };
                return SK_PASS;
            }
            state.decision = ACCEL_REDIRECTING;
            count(|c: &mut KernelCounters| &mut c.accel_redirected);
            // SAFETY: as above.
            unsafe { atomic_add(&raw mut (*pair).app_redirected, size) };
            SK_PASS
        }
        ACCEL_REDIRECTING => {
            // The agent's count includes the TCP bytes before the switch.
            let read = reads.map_or(0, |reads| reads.agent_read);
            let queued = (redirected + plain).saturating_sub(read);
            if queued > ACCEL_BOUND || !redirect(ctx, state.pair.reversed()) {
                state.decision = ACCEL_PLAIN;
                count(|c: &mut KernelCounters| &mut c.accel_fell_back);
                return SK_PASS;
            }
            // SAFETY: as above.
            unsafe { atomic_add(&raw mut (*pair).app_redirected, size) };
            SK_PASS
        }
        _ => SK_PASS,
    }
}

/// The agent sends to the application. Its first message decides; after that it never goes by
/// TCP while the application's socket is in the map (FIONREAD, above). The bound on what the
/// application has not read is the agent's to keep (it is the only writer, and returning
/// SK_DROP would not do: on 6.18 a dropped message leaves the psock's verdict at "drop", so
/// every later send fails with EACCES without the program running again).
#[inline(always)]
fn from_agent(ctx: &SkMsgContext, state: &mut AccelSocket, pair: *mut AccelPair, size: u64) -> u32 {
    match state.decision {
        ACCEL_UNDECIDED => {
            if !redirect(ctx, state.pair) {
                // The application's socket is not in the map: plain TCP both ways, for good.
                state.decision = ACCEL_PLAIN;
                return SK_PASS;
            }
            state.decision = ACCEL_REDIRECTING;
            count(|c: &mut KernelCounters| &mut c.accel_redirected);
        }
        // A miss: the application's socket closed between the lookup and now. TCP to a closed
        // socket is answered with a reset, as it would be without the fast path.
        ACCEL_REDIRECTING if !redirect(ctx, state.pair) => return SK_PASS,
        ACCEL_REDIRECTING => {}
        _ => return SK_PASS,
    }
    // SAFETY: as in from_app.
    unsafe { atomic_add(&raw mut (*pair).agent_redirected, size) };
    SK_PASS
}

/// Redirects the message into the receive queue of the socket under `to`; false on a miss.
#[inline(always)]
fn redirect(ctx: &SkMsgContext, to: ConnTuple) -> bool {
    ACCEL_SOCKS.redirect_msg(ctx, to, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS)
}
