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

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

use agent_common::INBOUND_PASSTHROUGH_IP4;

use crate::{metrics::Direction, netns::Origin};

#[derive(Clone, Copy, Debug)]
pub struct Dialer {
    pub bypass_mark: u32,
    pub timeout: Duration,
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
