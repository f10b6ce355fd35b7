//! Original destination: where a redirected client meant to connect. Asked first the way
//! iptables REDIRECT users ask (getsockopt SO_ORIGINAL_DST, answered by our cgroup hook when the
//! agent runs inside the meshed cgroup, and only asked then), then from the pinned map by the
//! connection's addresses.
//! Either way the map entry is removed once read: the proxy is its only consumer.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd,
};

use socket2::SockRef;

use agent_common::{AF_INET, AF_INET6, ConnTuple, OriginalDst};

use crate::intercept::OriginalDstMap;

/// How an accepted connection's original destination was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Answered by SO_ORIGINAL_DST (the agent runs inside the meshed cgroup).
    Getsockopt,
    /// Answered from the pinned ORIG_BY_TUPLE map.
    Map,
    /// Not a redirected connection; it is reset.
    NotFound,
}

impl Lookup {
    /// The `result` label of `sockmesh_original_dst_lookups_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Getsockopt => "getsockopt",
            Self::Map => "map",
            Self::NotFound => "not_found",
        }
    }
}

/// An accepted connection as the map knows it: its addresses and its network namespace.
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub netns_cookie: u64,
}

/// Where a redirected connection was going, and who made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub dst: SocketAddr,
    /// cgroup v2 id of the connecting process (0 if unknown): host mode's per-cgroup policy.
    pub cgroup: u64,
}

/// Resolves the original destination of an accepted connection. `ask_getsockopt`: whether
/// SO_ORIGINAL_DST can be answered at all (the agent's sockets are in the meshed cgroup); if
/// not, asking would only cost a failing system call per connection.
pub fn lookup(
    socket: &impl AsFd,
    accepted: &Accepted,
    map: &OriginalDstMap,
    ask_getsockopt: bool,
) -> (Option<Found>, Lookup) {
    let tuple = conn_tuple(accepted);
    // SO_ORIGINAL_DST is answered from the map entry, so the entry is taken after it. It goes
    // either way (the proxy is its only reader), and it names the cgroup.
    let answered = if ask_getsockopt {
        so_original_dst(socket, accepted.local.is_ipv4())
    } else {
        Err(io::ErrorKind::NotFound.into())
    };
    let entry = map.take(&tuple);
    decide(answered, entry)
}

/// The lookup's answer from what getsockopt said and the map entry. The entry decides: the
/// hook answers from it, so an answer without one, or another answer, came from the kernel's
/// conntrack (the hook passes on a miss, and is detached first when the agent stops), which
/// names this connection's own destination, the agent's listener: dialing that would loop
/// through the agent until it ran out of descriptors.
fn decide(answered: io::Result<SocketAddr>, entry: Option<OriginalDst>) -> (Option<Found>, Lookup) {
    let Some(entry) = entry else {
        return (None, Lookup::NotFound);
    };
    let dst = to_socket_addr(&entry);
    let how = if answered.is_ok_and(|answer| answer == dst) {
        Lookup::Getsockopt
    } else {
        Lookup::Map
    };
    let found = Found {
        dst,
        cgroup: entry.cgroup,
    };
    (Some(found), how)
}

/// getsockopt(SOL_IP|SOL_IPV6, SO_ORIGINAL_DST), through socket2.
fn so_original_dst(socket: &impl AsFd, ipv4: bool) -> io::Result<SocketAddr> {
    let socket = SockRef::from(socket);
    let addr = if ipv4 {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    addr.as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST returned a non-IP address"))
}

/// The map key: the client's address -> the proxy listener in their namespace, as sockops
/// recorded it.
pub fn conn_tuple(accepted: &Accepted) -> ConnTuple {
    let Accepted { peer, local, .. } = *accepted;
    ConnTuple {
        src_addr: ip_words(peer.ip()),
        dst_addr: ip_words(local.ip()),
        src_port: peer.port(),
        dst_port: local.port(),
        family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
        pad: 0,
        netns: accepted.netns_cookie,
    }
}

fn ip_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => crate::intercept::ipv6_words(v6),
    }
}

pub fn to_socket_addr(dst: &OriginalDst) -> SocketAddr {
    if dst.family == AF_INET {
        let ip = Ipv4Addr::from(dst.addr[0].to_ne_bytes());
        return SocketAddr::V4(SocketAddrV4::new(ip, dst.port));
    }
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(dst.addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    canonical(SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(octets),
        dst.port,
        0,
        0,
    )))
}

/// An IPv4-mapped IPv6 destination (::ffff:a.b.c.d) is dialled as plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_values_become_socket_addrs() {
        let v4 = OriginalDst {
            addr: [u32::from_ne_bytes([10, 1, 2, 3]), 0, 0, 0],
            port: 8080,
            family: AF_INET,
            ..OriginalDst::default()
        };
        assert_eq!(to_socket_addr(&v4), "10.1.2.3:8080".parse().unwrap());
        let v6 = OriginalDst {
            addr: crate::intercept::ipv6_words("fd00::1".parse().unwrap()),
            port: 443,
            family: AF_INET6,
            ..OriginalDst::default()
        };
        assert_eq!(to_socket_addr(&v6), "[fd00::1]:443".parse().unwrap());
    }

    #[test]
    fn the_map_entry_decides_what_getsockopt_said() {
        let entry = OriginalDst {
            addr: [u32::from_ne_bytes([10, 1, 2, 3]), 0, 0, 0],
            port: 8080,
            family: AF_INET,
            cgroup: 7,
            ..OriginalDst::default()
        };
        let dst: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let listener: SocketAddr = "127.0.0.1:4140".parse().unwrap();
        let found = Some(Found { dst, cgroup: 7 });
        // The hook answered from the entry.
        assert_eq!(decide(Ok(dst), Some(entry)), (found, Lookup::Getsockopt));
        // conntrack answered (the hook detached while the backlog drains): the entry wins.
        assert_eq!(decide(Ok(listener), Some(entry)), (found, Lookup::Map));
        assert_eq!(
            decide(Err(io::ErrorKind::NotFound.into()), Some(entry)),
            (found, Lookup::Map)
        );
        // No entry: conntrack's answer is the agent's own listener, never dialled.
        assert_eq!(decide(Ok(listener), None), (None, Lookup::NotFound));
        assert_eq!(
            decide(Err(io::ErrorKind::NotFound.into()), None),
            (None, Lookup::NotFound)
        );
    }

    #[test]
    fn mapped_ipv4_destinations_are_dialled_as_ipv4() {
        let mapped = OriginalDst {
            addr: crate::intercept::ipv6_words("::ffff:127.0.0.1".parse().unwrap()),
            port: 6379,
            family: AF_INET6,
            ..OriginalDst::default()
        };
        assert_eq!(to_socket_addr(&mapped), "127.0.0.1:6379".parse().unwrap());
    }

    #[test]
    fn tuple_is_client_to_proxy() {
        let tuple = conn_tuple(&Accepted {
            peer: "127.0.0.1:50000".parse().unwrap(),
            local: "127.0.0.1:4140".parse().unwrap(),
            netns_cookie: 7,
        });
        assert_eq!(tuple.netns, 7);
        assert_eq!(tuple.src_port, 50000);
        assert_eq!(tuple.dst_port, 4140);
        assert_eq!(tuple.family, AF_INET);
        assert_eq!(tuple.src_addr[0].to_ne_bytes(), [127, 0, 0, 1]);
    }
}
