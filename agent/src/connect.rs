//! Connect: open the proxy's own connection to an original destination, from the network
//! namespace the client connection came from (the host's, or its pod's). Its sockets carry the
//! bypass mark, so the kernel programs let them through even when the agent runs inside the
//! cgroup it meshes (no proxying to itself). Inbound connections to a workload are dialled
//! from the passthrough address (127.0.0.6; IPv6: from the workload's own address), which the
//! sk_lookup program lets through.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};

use agent_common::INBOUND_PASSTHROUGH_IP4;

use crate::{metrics::Direction, netns::Origin};

#[derive(Clone, Copy, Debug)]
pub struct Dialer {
    pub bypass_mark: u32,
    pub timeout: Duration,
    /// TCP keepalive for the upstream sockets (None: off); the listeners pass theirs on to
    /// the sockets they accept.
    pub keepalive: Option<Duration>,
}

/// Keepalive probes after `idle` without traffic, then every `idle`: with the kernel's 9
/// probes, a peer that vanished is given up on after about ten times `idle`.
pub fn keepalive(idle: Duration) -> TcpKeepalive {
    TcpKeepalive::new().with_time(idle).with_interval(idle)
}

impl Dialer {
    pub async fn connect(
        &self,
        dst: SocketAddr,
        origin: &Origin,
        direction: Direction,
    ) -> io::Result<TcpStream> {
        let socket = origin.within(|| {
            if dst.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
        })?;
        SockRef::from(&socket).set_mark(self.bypass_mark)?;
        socket.set_nodelay(true)?;
        if let Some(idle) = self.keepalive {
            SockRef::from(&socket).set_tcp_keepalive(&keepalive(idle))?;
        }
        if direction == Direction::Inbound {
            // The source sk_lookup lets through: the passthrough address (IPv4), or the
            // workload's own address (IPv6). The port is chosen at connect: many connections
            // share the address.
            let source = match dst {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(INBOUND_PASSTHROUGH_IP4)),
                SocketAddr::V6(v6) => IpAddr::V6(*v6.ip()),
            };
            crate::sys::set_bind_address_no_port(&socket)?;
            socket.bind(SocketAddr::new(source, 0))?;
        }
        match tokio::time::timeout(self.timeout, socket.connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::from(io::ErrorKind::TimedOut)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's own connections carry its keepalive, and none when it is off.
    #[tokio::test]
    async fn upstream_sockets_carry_the_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        for keepalive in [Some(Duration::from_secs(9)), None] {
            let dialer = Dialer {
                bypass_mark: 0,
                timeout: Duration::from_secs(5),
                keepalive,
            };
            let stream = dialer
                .connect(dst, &Origin::host(0), Direction::Outbound)
                .await
                .unwrap();
            let options = SockRef::from(&stream);
            assert_eq!(options.keepalive().unwrap(), keepalive.is_some());
            if let Some(idle) = keepalive {
                assert_eq!(options.tcp_keepalive_time().unwrap(), idle);
                assert_eq!(options.tcp_keepalive_interval().unwrap(), idle);
            }
            let _ = listener.accept().await.unwrap();
        }
    }
}
