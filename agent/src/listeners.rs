//! Meshed listeners the kernel did not see start: sockops records a meshed process's
//! `listen(2)` as it happens, but a server that was already listening when the agent started
//! (a restart, a rolling update, a re-adopted pod) never passes through it, and the close of
//! such a listener is never reported either. This module asks the kernel instead: a
//! `sock_diag` dump of the TCP listeners in a namespace, each with its socket cookie and the
//! cgroup of the process that made it. The agent reconciles `INBOUND_PORTS` with it every few
//! seconds: listeners of processes in the meshed cgroup are added, entries whose listener is
//! gone are removed.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use socket2::{Domain, Protocol, Socket, Type};

use agent_common::{AF_INET, AF_INET6, InboundPort, MeshedListener};

use crate::{intercept::Inbound, netns::Origin};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const IPPROTO_TCP: u8 = 6;
/// `INET_DIAG_CGROUP_ID` (linux/inet_diag.h): the socket's cgroup v2 id, a u64.
const INET_DIAG_CGROUP_ID: u16 = 21;
const NLMSG_HEADER: usize = 16;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid (48 bytes), expires, rqueue,
/// wqueue, uid, inode.
const INET_DIAG_MSG: usize = 72;
/// Bound on one dump's replies read (a namespace with this many listeners is not a pod).
const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;

/// One TCP listener, as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub addr: IpAddr,
    pub cookie: u64,
    pub cgroup_id: u64,
}

impl Listener {
    /// The `INBOUND_PORTS` value for this listener.
    pub fn meshed(&self) -> MeshedListener {
        let (addr, family) = match self.addr {
            IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
            IpAddr::V6(v6) => (crate::intercept::ipv6_words(v6), AF_INET6),
        };
        MeshedListener {
            cookie: self.cookie,
            addr,
            family: u32::from(family),
            pad: 0,
            cgroup: self.cgroup_id,
        }
    }
}

/// What one reconcile changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub added: usize,
    pub removed: usize,
}

/// Brings `INBOUND_PORTS` of `origin`'s namespace in line with its listeners: a listener of a
/// process in `meshed_cgroups` whose port has no live entry is added; an entry whose listener
/// is gone is removed. Entries recorded while this runs are left alone (the snapshot is taken
/// before the dump, and additions never overwrite).
pub fn reconcile(
    inbound: &Inbound,
    origin: &Origin,
    meshed_cgroups: &HashSet<u64>,
) -> Result<Reconciled, crate::intercept::InterceptError> {
    let netns = origin.netns_cookie;
    let recorded = inbound.ports_of(netns);
    let listeners = origin
        .within(tcp_listeners)
        .map_err(|source| crate::intercept::InterceptError::Listeners { netns, source })?;
    let listening: HashSet<u64> = listeners.iter().map(|listener| listener.cookie).collect();
    let mut done = Reconciled::default();
    for (key, value) in &recorded {
        if !listening.contains(&value.cookie) {
            inbound.remove_port(key, value.cookie);
            done.removed += 1;
        }
    }
    for listener in listeners
        .iter()
        .filter(|listener| meshed_cgroups.contains(&listener.cgroup_id))
    {
        let key = InboundPort {
            netns,
            port: listener.port,
            pad: [0; 3],
        };
        let live = recorded
            .iter()
            .any(|(k, v)| *k == key && listening.contains(&v.cookie));
        if !live {
            inbound.add_port(key, listener.meshed())?;
            done.added += 1;
        }
    }
    Ok(done)
}

/// The TCP listeners of the calling thread's network namespace (run it inside
/// `Origin::within` for a pod's).
pub fn tcp_listeners() -> io::Result<Vec<Listener>> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(NETLINK_SOCK_DIAG)),
    )?;
    let mut listeners = Vec::new();
    for family in [AF_INET, AF_INET6] {
        socket.send(&dump_request(family as u8))?;
        listeners.extend(read_dump(&socket)?);
    }
    Ok(listeners)
}

/// Whether a TCP socket with exactly these local and remote addresses exists in the calling
/// thread's network namespace, in any state (a child still in its listener's accept queue and
/// a time-wait socket count). One exact `SOCK_DIAG_BY_FAMILY` lookup, no dump.
pub fn tcp_socket_exists(local: SocketAddr, remote: SocketAddr) -> io::Result<bool> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(NETLINK_SOCK_DIAG)),
    )?;
    socket.send(&lookup_request(local, remote))?;
    let mut buf = vec![0u8; 8 * 1024];
    let n = std::io::Read::read(&mut &socket, &mut buf)?;
    lookup_reply_names(&buf[..n], remote.port())
}

/// `INET_DIAG_SKMEMINFO` (linux/inet_diag.h): the socket's memory counters, u32s of which the
/// first is `SK_MEMINFO_RMEM_ALLOC`, the bytes charged to its receive queues.
const INET_DIAG_SKMEMINFO: u16 = 7;

/// A netlink socket for sock_diag queries, in the calling thread's network namespace (create
/// it inside `Origin::within` for a pod's; it keeps that namespace).
pub fn sock_diag_socket() -> io::Result<Socket> {
    Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(NETLINK_SOCK_DIAG)),
    )
}

/// The receive memory of the TCP socket `local` -> `remote` (its unread bytes, whether they
/// arrived by TCP or by sk_msg redirect), or None if there is no such socket.
pub fn tcp_receive_memory(
    diag: &Socket,
    local: SocketAddr,
    remote: SocketAddr,
) -> io::Result<Option<u64>> {
    let mut request = lookup_request(local, remote);
    // The `ext` byte of inet_diag_req_v2: one bit per attribute wanted, (1 << (kind - 1)).
    request[NLMSG_HEADER + 2] = 1 << (INET_DIAG_SKMEMINFO - 1);
    diag.send(&request)?;
    let mut buf = [0u8; 1024];
    let n = std::io::Read::read(&mut &*diag, &mut buf)?;
    receive_memory_of(&buf[..n], remote.port())
}

/// Reads the answer to `tcp_receive_memory`'s lookup.
fn receive_memory_of(bytes: &[u8], remote_port: u16) -> io::Result<Option<u64>> {
    let Some(Message { kind, payload, .. }) = next_message(bytes)? else {
        return Err(truncated());
    };
    match kind {
        NLMSG_ERROR => match errno_of(payload) {
            0 | libc::ENOENT => Ok(None),
            errno => Err(io::Error::from_raw_os_error(errno)),
        },
        SOCK_DIAG_BY_FAMILY => {
            let ours = payload
                .get(6..8)
                .is_some_and(|port| u16::from_be_bytes([port[0], port[1]]) == remote_port);
            if !ours || payload.len() < INET_DIAG_MSG {
                return Ok(None);
            }
            Ok(attribute_u32(&payload[INET_DIAG_MSG..], INET_DIAG_SKMEMINFO).map(u64::from))
        }
        _ => Err(io::Error::other("unexpected sock_diag reply")),
    }
}

/// An exact `SOCK_DIAG_BY_FAMILY` request for the TCP socket `local` -> `remote`.
fn lookup_request(local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let family = if local.is_ipv4() { AF_INET } else { AF_INET6 } as u8;
    let mut request = Vec::with_capacity(NLMSG_HEADER + 56);
    request.extend_from_slice(&((NLMSG_HEADER + 56) as u32).to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    // struct inet_diag_req_v2: family, protocol, ext, pad, states (all), then the sockid:
    // ports and addresses in network order, no interface, INET_DIAG_NOCOOKIE.
    request.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    request.extend_from_slice(&u32::MAX.to_ne_bytes());
    request.extend_from_slice(&local.port().to_be_bytes());
    request.extend_from_slice(&remote.port().to_be_bytes());
    request.extend_from_slice(&diag_address(local.ip()));
    request.extend_from_slice(&diag_address(remote.ip()));
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&[0xff; 8]);
    request
}

/// An address as `inet_diag_sockid` holds it: 16 bytes, IPv4 in the first four.
fn diag_address(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Reads the answer to an exact lookup: a socket whose remote port is `remote_port` (the
/// kernel falls back to a listener on the local port, which has none), or ENOENT.
fn lookup_reply_names(bytes: &[u8], remote_port: u16) -> io::Result<bool> {
    let Some(Message { kind, payload, .. }) = next_message(bytes)? else {
        return Err(truncated());
    };
    match kind {
        NLMSG_ERROR => match errno_of(payload) {
            0 | libc::ENOENT => Ok(false),
            errno => Err(io::Error::from_raw_os_error(errno)),
        },
        SOCK_DIAG_BY_FAMILY => Ok(payload
            .get(6..8)
            .is_some_and(|port| u16::from_be_bytes([port[0], port[1]]) == remote_port)),
        _ => Err(io::Error::other("unexpected sock_diag reply")),
    }
}

/// A `SOCK_DIAG_BY_FAMILY` dump request for listening TCP sockets of `family`.
fn dump_request(family: u8) -> Vec<u8> {
    let mut request = Vec::with_capacity(NLMSG_HEADER + 56);
    request.extend_from_slice(&((NLMSG_HEADER + 56) as u32).to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zero sockid.
    request.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    request.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    request.extend_from_slice(&[0u8; 48]);
    request
}

fn read_dump(socket: &Socket) -> io::Result<Vec<Listener>> {
    use std::io::Read;
    let mut listeners = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = (&*socket).read(&mut buf)?;
        total += n;
        match parse_messages(&buf[..n], &mut listeners)? {
            Parsed::Done => return Ok(listeners),
            Parsed::More if total > MAX_REPLY_BYTES || n == 0 => {
                return Err(io::Error::other("sock_diag dump did not end"));
            }
            Parsed::More => {}
        }
    }
}

pub enum Parsed {
    Done,
    More,
}

/// Parses one datagram of netlink messages into `listeners`.
pub fn parse_messages(mut bytes: &[u8], listeners: &mut Vec<Listener>) -> io::Result<Parsed> {
    while let Some(Message {
        kind,
        payload,
        rest,
    }) = next_message(bytes)?
    {
        match kind {
            NLMSG_DONE => return Ok(Parsed::Done),
            NLMSG_ERROR => return Err(io::Error::from_raw_os_error(errno_of(payload))),
            SOCK_DIAG_BY_FAMILY => {
                if let Some(listener) = parse_listener(payload) {
                    listeners.push(listener);
                }
            }
            _ => {}
        }
        bytes = rest;
    }
    Ok(Parsed::More)
}

/// One netlink message of a datagram, and what follows it.
struct Message<'a> {
    kind: u16,
    payload: &'a [u8],
    rest: &'a [u8],
}

/// The first netlink message in `bytes`; None when fewer bytes than a header are left. A
/// header whose length does not fit is an error.
fn next_message(bytes: &[u8]) -> io::Result<Option<Message<'_>>> {
    if bytes.len() < NLMSG_HEADER {
        return Ok(None);
    }
    let len = u32::from_ne_bytes(bytes[0..4].try_into().unwrap_or_default()) as usize;
    let kind = u16::from_ne_bytes(bytes[4..6].try_into().unwrap_or_default());
    if len < NLMSG_HEADER || len > bytes.len() {
        return Err(truncated());
    }
    let rest = &bytes[align4(len).min(bytes.len())..];
    Ok(Some(Message {
        kind,
        payload: &bytes[NLMSG_HEADER..len],
        rest,
    }))
}

/// The positive errno of an NLMSG_ERROR payload (0 is an acknowledgement). The kernel sends
/// it negated; wrapping, so a hostile i32::MIN cannot overflow.
fn errno_of(payload: &[u8]) -> i32 {
    payload
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i32::from_ne_bytes)
        .wrapping_neg()
}

fn truncated() -> io::Error {
    io::Error::other("truncated sock_diag reply")
}

/// One `inet_diag_msg` and its attributes.
fn parse_listener(payload: &[u8]) -> Option<Listener> {
    if payload.len() < INET_DIAG_MSG {
        return None;
    }
    let family = u16::from(payload[0]);
    let port = u16::from_be_bytes([payload[4], payload[5]]);
    let src = &payload[8..24];
    let addr = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
    } else {
        let octets: [u8; 16] = src.try_into().ok()?;
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    let low = u32::from_ne_bytes(payload[44..48].try_into().ok()?);
    let high = u32::from_ne_bytes(payload[48..52].try_into().ok()?);
    let cgroup_id = attribute_u64(&payload[INET_DIAG_MSG..], INET_DIAG_CGROUP_ID)?;
    Some(Listener {
        port,
        addr,
        cookie: u64::from(low) | (u64::from(high) << 32),
        cgroup_id,
    })
}

/// The first u32 of the first attribute of `kind` that holds one, in a run of rtattrs.
fn attribute_u32(attrs: &[u8], kind: u16) -> Option<u32> {
    let value = attribute(attrs, kind, 4)?;
    Some(u32::from_ne_bytes(value[..4].try_into().ok()?))
}

/// The value of the first attribute of `kind` that holds a u64, in a run of rtattrs.
fn attribute_u64(attrs: &[u8], kind: u16) -> Option<u64> {
    let value = attribute(attrs, kind, 8)?;
    Some(u64::from_ne_bytes(value[..8].try_into().ok()?))
}

/// The value of the first attribute of `kind` with at least `min_len` bytes in a run of
/// rtattrs (a shorter one of that kind is skipped, as the kernel never sends one).
fn attribute(mut attrs: &[u8], kind: u16, min_len: usize) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let this = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if this == kind && len >= 4 + min_len {
            return Some(&attrs[4..len]);
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply as the kernel builds it: one listener (127.0.0.1:8080, cookie 7, cgroup 42)
    /// with an unrelated attribute before the cgroup id, then DONE.
    fn reply() -> Vec<u8> {
        let mut msg = vec![AF_INET as u8, TCP_LISTEN as u8, 0, 0];
        msg.extend_from_slice(&8080u16.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[127, 0, 0, 1]);
        msg.extend_from_slice(&src);
        msg.extend_from_slice(&[0u8; 16]); // dst
        msg.extend_from_slice(&0u32.to_ne_bytes()); // if
        msg.extend_from_slice(&7u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 20]); // expires .. inode
        // An attribute of 5 bytes (padded to 8), then the cgroup id.
        msg.extend_from_slice(&5u16.to_ne_bytes());
        msg.extend_from_slice(&1u16.to_ne_bytes());
        msg.extend_from_slice(&[9, 0, 0, 0]);
        msg.extend_from_slice(&12u16.to_ne_bytes());
        msg.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        msg.extend_from_slice(&42u64.to_ne_bytes());
        let mut out = header(NLMSG_HEADER + msg.len(), SOCK_DIAG_BY_FAMILY);
        out.extend_from_slice(&msg);
        out.extend(header(NLMSG_HEADER + 4, NLMSG_DONE));
        out.extend_from_slice(&0u32.to_ne_bytes());
        out
    }

    fn header(len: usize, kind: u16) -> Vec<u8> {
        let mut out = (len as u32).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0u8; 10]);
        out
    }

    #[test]
    fn parses_a_listener_and_the_end_of_the_dump() {
        let mut listeners = Vec::new();
        assert!(matches!(
            parse_messages(&reply(), &mut listeners).unwrap(),
            Parsed::Done
        ));
        assert_eq!(
            listeners,
            [Listener {
                port: 8080,
                addr: "127.0.0.1".parse().unwrap(),
                cookie: 7,
                cgroup_id: 42,
            }]
        );
    }

    #[test]
    fn truncated_or_hostile_replies_are_errors_not_panics() {
        let full = reply();
        for cut in 0..full.len() {
            let mut listeners = Vec::new();
            let _ = parse_messages(&full[..cut], &mut listeners);
        }
        let mut bogus = header(4, SOCK_DIAG_BY_FAMILY);
        bogus.extend_from_slice(&[0u8; 8]);
        assert!(parse_messages(&bogus, &mut Vec::new()).is_err());
        // Found by fuzz/ (sock_diag_reply): an errno of i32::MIN overflowed its negation.
        let mut error = header(20, NLMSG_ERROR);
        error.extend_from_slice(&i32::MIN.to_ne_bytes());
        assert!(parse_messages(&error, &mut Vec::new()).is_err());
        assert!(lookup_reply_names(&error, 1).is_err());
    }

    /// Found by fuzz/ (sock_diag_reply) after the attribute reader was shared with the
    /// receive-memory lookup: a cgroup id attribute too short to hold one must be skipped for a
    /// later whole one, as before, not end the search.
    #[test]
    fn a_short_attribute_is_skipped_for_a_whole_one() {
        let mut attrs = 8u16.to_ne_bytes().to_vec();
        attrs.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        attrs.extend_from_slice(&[1, 0, 0, 0]);
        attrs.extend_from_slice(&12u16.to_ne_bytes());
        attrs.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        attrs.extend_from_slice(&42u64.to_ne_bytes());
        assert_eq!(attribute_u64(&attrs, INET_DIAG_CGROUP_ID), Some(42));
        assert_eq!(attribute_u32(&attrs, INET_DIAG_CGROUP_ID), Some(1));
    }

    #[test]
    // A bounded wait for the reset to be processed (it usually is before close returns).
    #[allow(clippy::disallowed_methods)]
    fn exact_lookup_finds_queued_and_accepted_connections_but_not_reset_ones() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let local = client.local_addr().unwrap();
        // Still in the accept queue: both ends are sockets.
        assert!(tcp_socket_exists(local, server).unwrap());
        assert!(tcp_socket_exists(server, local).unwrap());
        let (accepted, _) = listener.accept().unwrap();
        assert!(tcp_socket_exists(server, local).unwrap());
        // A reset (SO_LINGER 0) leaves no time-wait socket on either side.
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client);
        drop(accepted);
        let gone = (0..100).any(|_| {
            let gone = !tcp_socket_exists(local, server).unwrap()
                && !tcp_socket_exists(server, local).unwrap();
            if !gone {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            gone
        });
        assert!(gone, "the reset connection is still reported");
        // The listener itself is not mistaken for a connection to it.
        assert!(
            tcp_socket_exists(server, "127.0.0.1:1".parse().unwrap()).is_ok_and(|found| !found)
        );
    }

    #[test]
    fn lookup_replies_are_read_strictly() {
        let error = |errno: i32| {
            let mut out = header(NLMSG_HEADER + 4, NLMSG_ERROR);
            out.extend_from_slice(&(-errno).to_ne_bytes());
            out
        };
        assert!(!lookup_reply_names(&error(libc::ENOENT), 8080).unwrap());
        assert!(lookup_reply_names(&error(libc::EPERM), 8080).is_err());
        // The dump reply's listener has remote port 0: not the connection asked for.
        assert!(!lookup_reply_names(&reply(), 8080).unwrap());
        let mut connection = reply();
        connection[NLMSG_HEADER + 6..NLMSG_HEADER + 8].copy_from_slice(&40000u16.to_be_bytes());
        assert!(lookup_reply_names(&connection, 40000).unwrap());
        for cut in 0..NLMSG_HEADER + 8 {
            let _ = lookup_reply_names(&connection[..cut], 40000);
        }
        assert!(lookup_reply_names(&connection[..NLMSG_HEADER - 1], 40000).is_err());
    }
}
