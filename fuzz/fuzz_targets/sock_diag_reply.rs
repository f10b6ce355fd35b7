//! The sock_diag dump reply parser (`agent::listeners::parse_messages`): one netlink datagram
//! of `inet_diag_msg`s, from which the agent adds and removes INBOUND_PORTS entries. The
//! seeds are real replies (a TCP listener dump for IPv4 and IPv6, and an error).
//!
//! Asserts, for any bytes, that it agrees with a reference written from the kernel's formats
//! (linux/netlink.h, linux/inet_diag.h, with absolute offsets): the same outcome (the dump is
//! done, more is to come, or the same error: a truncated message or the kernel's errno), and
//! the same listeners, in order: each SOCK_DIAG_BY_FAMILY message with a whole inet_diag_msg
//! and a well-formed INET_DIAG_CGROUP_ID attribute; and that it never consumes listeners from
//! messages after NLMSG_DONE or an error.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent::listeners::{Listener, Parsed, parse_messages};
use libfuzzer_sys::fuzz_target;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_CGROUP_ID: u16 = 21;
const AF_INET: u8 = 2;

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    More,
    /// `raw_os_error`, None for the parser's own "truncated" error.
    Error(Option<i32>),
}

fuzz_target!(|bytes: &[u8]| {
    let mut listeners = Vec::new();
    let outcome = match parse_messages(bytes, &mut listeners) {
        Ok(Parsed::Done) => Outcome::Done,
        Ok(Parsed::More) => Outcome::More,
        Err(error) => Outcome::Error(error.raw_os_error()),
    };
    let (want_outcome, want_listeners) = reference(bytes);
    assert_eq!(outcome, want_outcome);
    assert_eq!(listeners, want_listeners);
});

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn reference(bytes: &[u8]) -> (Outcome, Vec<Listener>) {
    let mut listeners = Vec::new();
    let mut at = 0;
    // struct nlmsghdr: len u32, type u16, flags u16, seq u32, pid u32; messages 4-aligned.
    while bytes.len() - at >= 16 {
        let len = u32_at(bytes, at) as usize;
        if len < 16 || len > bytes.len() - at {
            return (Outcome::Error(None), listeners);
        }
        let payload = &bytes[at + 16..at + len];
        match u16_at(bytes, at + 4) {
            NLMSG_DONE => return (Outcome::Done, listeners),
            NLMSG_ERROR => {
                // struct nlmsgerr: a negative errno first (0 if it is cut off).
                let errno = if payload.len() >= 4 {
                    i32::from_ne_bytes(payload[..4].try_into().expect("4 bytes"))
                } else {
                    0
                };
                return (Outcome::Error(Some(errno.wrapping_neg())), listeners);
            }
            SOCK_DIAG_BY_FAMILY => listeners.extend(listener(payload)),
            _ => {}
        }
        at = (at + len.next_multiple_of(4)).min(bytes.len());
    }
    (Outcome::More, listeners)
}

/// struct inet_diag_msg (72 bytes): family u8, state, timer, retrans, then inet_diag_sockid:
/// sport be16 @4, dport @6, src[16] @8, dst[16] @24, if u32 @40, cookie[2] u32 @44; then
/// expires, rqueue, wqueue, uid, inode; then rtattrs (len u16, type u16, 4-aligned).
fn listener(payload: &[u8]) -> Option<Listener> {
    if payload.len() < 72 {
        return None;
    }
    let src = &payload[8..24];
    let addr = if payload[0] == AF_INET {
        IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(src).expect("16 bytes")))
    };
    let cookie = u64::from(u32_at(payload, 44)) | (u64::from(u32_at(payload, 48)) << 32);
    let mut at = 72;
    let cgroup_id = loop {
        if payload.len() - at < 4 {
            return None;
        }
        let len = usize::from(u16_at(payload, at));
        if len < 4 || len > payload.len() - at {
            return None;
        }
        if u16_at(payload, at + 2) == INET_DIAG_CGROUP_ID && len >= 12 {
            break u64::from_ne_bytes(payload[at + 4..at + 12].try_into().expect("8 bytes"));
        }
        at = (at + len.next_multiple_of(4)).min(payload.len());
    };
    Some(Listener {
        port: u16::from_be_bytes([payload[4], payload[5]]),
        addr,
        cookie,
        cgroup_id,
    })
}
