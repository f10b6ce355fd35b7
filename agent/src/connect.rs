//! Connect: open the proxy's own connection to an original destination, from the network
//! namespace the client connection came from (the host's, or its pod's). Its sockets carry the
//! bypass mark, so the kernel programs let them through even when the agent runs inside the
//! cgroup it meshes (no proxying to itself).

use std::{io, net::SocketAddr, time::Duration};

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

use crate::netns::Origin;

#[derive(Clone, Copy, Debug)]
pub struct Dialer {
    pub bypass_mark: u32,
    pub timeout: Duration,
}

impl Dialer {
    pub async fn connect(&self, dst: SocketAddr, origin: &Origin) -> io::Result<TcpStream> {
        let socket = origin.within(|| {
            if dst.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
        })?;
        SockRef::from(&socket).set_mark(self.bypass_mark)?;
        socket.set_nodelay(true)?;
        match tokio::time::timeout(self.timeout, socket.connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::from(io::ErrorKind::TimedOut)),
        }
    }
}
