//! In-kernel forwarding (`--copy-mode sockmap`, the default): once a spliced opaque connection
//! turns out chatty (`opaque::ChattyGate`), its two proxy sockets are handed to the
//! `sockmesh_fwd` stream-verdict program, which moves every byte either socket receives to the
//! other's send queue inside the kernel. The agent then neither reads nor writes: it is not
//! woken per message, which is what a proxy on a request/response workload spends its time on.
//!
//! What stays in user space is the connection's edges: it watches both sockets for end of
//! stream and errors only (one epoll instance for all connections, registered for
//! EPOLLRDHUP, which data arrival never triggers), passes a half-close on once every byte
//! before it has reached the other socket's send queue, resets both sockets on an error, and
//! reads byte counts from TCP_INFO (at /metrics scrapes and at the end).
//!
//! Order is safe by construction: the kernel forwards whole socket buffers, so a partly read
//! one would repeat bytes; detection only peeks and splice hands over only after emptying both
//! receive queues, so none is partly read. Everything spliced has reached the other socket's
//! send queue before the hand-off (no pipe holds bytes). The sockets join `FWD_PEERS` before
//! `FWD_ACTIVE` (a forwarded byte always finds its peer), and bytes that arrived before the
//! hand-off are pushed through the verdict by a SO_RCVLOWAT write, which makes the kernel
//! process the receive queue in order.
//!
//! This file is the hand-off (the socket maps, the connection's `Pair` and its byte counts);
//! `watcher` is the end-of-stream side.

use std::{
    collections::HashMap,
    io, net,
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, SockHash};
use parking_lot::{Mutex, MutexGuard};
use tokio::net::TcpStream;

use self::watcher::{Watcher, supervise};
use super::{
    ByteCounters,
    opaque::{Failure, Outcome},
};
use crate::sys::{set_rcvlowat, tcp_info};

mod watcher;

/// TCP states (include/net/tcp_states.h) as TCP_INFO reports them.
const TCP_ESTABLISHED: u32 = 1;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

/// The kernel side of forwarding: the two socket maps and the end-of-stream watcher.
pub struct KernelForwarder {
    peers: Mutex<SockHash<MapData, u64>>,
    active: Mutex<SockHash<MapData, u64>>,
    watcher: Arc<Watcher>,
    live: LiveConnections,
}

/// What became of a connection offered to the kernel.
pub enum Handoff {
    /// The kernel forwarded it; this is how it ended.
    Forwarded(Outcome),
    /// The kernel did not take it (socket maps full, a socket already closing): nothing was
    /// forwarded, the sockets are back, forward them another way.
    Declined(TcpStream, TcpStream),
}

impl KernelForwarder {
    /// Starts the end-of-stream watcher; must be called inside the tokio runtime.
    pub fn new(peers: SockHash<MapData, u64>, active: SockHash<MapData, u64>) -> io::Result<Self> {
        let watcher = Arc::new(Watcher::new()?);
        tokio::spawn(Arc::clone(&watcher).dispatch());
        Ok(Self {
            peers: Mutex::new(peers),
            active: Mutex::new(active),
            watcher,
            live: LiveConnections::default(),
        })
    }

    /// Brings the byte counters of every connection the kernel is forwarding up to date (they
    /// are otherwise updated when a connection ends). Called before /metrics is rendered.
    pub fn sync_counters(&self) {
        self.live.sync_all();
    }

    /// Connections the kernel forwards now.
    pub fn forwarding(&self) -> usize {
        self.live.lock().len()
    }

    /// Forwards `client` <-> `server` in the kernel until both directions are done or one
    /// fails. Neither receive queue may hold a partly read socket buffer (the kernel forwards
    /// whole buffers, including bytes a reader already took), and every byte read so far must
    /// already be written to the other socket.
    /// `on_forwarding` runs once the kernel has taken the connection.
    pub async fn forward(
        &self,
        client: TcpStream,
        server: TcpStream,
        counters: &ByteCounters,
        on_forwarding: impl FnOnce(),
    ) -> Handoff {
        // Out of tokio's reactor: its registration would wake the runtime on every message.
        let (client, server) = match (client.into_std(), server.into_std()) {
            (Ok(client), Ok(server)) => (client, server),
            (Err(error), _) | (_, Err(error)) => {
                return Handoff::Forwarded(Outcome::Reset(Failure {
                    step: "leaving the reactor",
                    error,
                }));
            }
        };
        let pair = Pair {
            client,
            server,
            counters: counters.clone(),
            // Bytes spliced before the hand-off are counted already, and TCP_INFO's totals
            // include them.
            reported: Mutex::new([counters.total_to_server(), counters.total_from_server()]),
            fin_seen: [AtomicBool::new(false), AtomicBool::new(false)],
        };
        let cookie = |socket: &net::TcpStream| socket2::SockRef::from(socket).cookie();
        let cookies = match (cookie(&pair.client), cookie(&pair.server)) {
            (Ok(client), Ok(server)) => [client, server],
            (Err(error), _) | (_, Err(error)) => {
                tracing::debug!(%error, "no socket cookie; not forwarding in the kernel");
                return decline(pair);
            }
        };
        if let Err(error) = self.join_peers(&pair, cookies) {
            tracing::debug!(%error, "FWD_PEERS refused the sockets; not forwarding in the kernel");
            self.leave(cookies);
            return decline(pair);
        }
        // Watched before activation, so no end of stream can go unnoticed.
        let watch = match self.watcher.watch(pair.fds()) {
            Ok(watch) => watch,
            Err(error) => {
                tracing::debug!(%error, "cannot watch the sockets; not forwarding in the kernel");
                self.leave(cookies);
                return decline(pair);
            }
        };
        match self.activate(&pair, cookies) {
            Activation::Done => {}
            Activation::NoneActive(error) => {
                tracing::debug!(%error, "FWD_ACTIVE refused the sockets; not forwarding in the kernel");
                drop(watch);
                self.leave(cookies);
                return decline(pair);
            }
            Activation::Partial(error) => {
                // Bytes may already be on their way through the kernel: no other way of
                // forwarding can take over without reordering them.
                drop(watch);
                reset_both(&pair);
                return Handoff::Forwarded(Outcome::Reset(Failure {
                    step: "handing the sockets to the kernel",
                    error,
                }));
            }
        }
        on_forwarding();
        let pair = Arc::new(pair);
        let registered = self.live.register(&pair);
        let outcome = supervise(&pair, &watch).await;
        drop(registered);
        drop(watch);
        pair.sync_counters(Sync::Final);
        if matches!(outcome, Outcome::Reset(_)) {
            reset_both(&pair);
        }
        // Closing the sockets takes them out of both maps.
        Handoff::Forwarded(outcome)
    }

    fn join_peers(
        &self,
        pair: &Pair,
        [client, server]: [u64; 2],
    ) -> Result<(), aya::maps::MapError> {
        let mut peers = self.peers.lock();
        // Under each socket's cookie, the socket its bytes go out of.
        peers.insert(client, pair.server.as_raw_fd(), 0)?;
        peers.insert(server, pair.client.as_raw_fd(), 0)
    }

    fn activate(&self, pair: &Pair, [client, server]: [u64; 2]) -> Activation {
        // The kernel takes only established sockets. A FIN that arrives between the two
        // inserts below would leave one socket active and the other not, which only a reset
        // can end; checking first leaves that to the few microseconds between the inserts.
        for socket in [&pair.client, &pair.server] {
            match tcp_info(socket) {
                Ok(info) if u32::from(info.tcpi_state) == TCP_ESTABLISHED => {}
                Ok(_) => return Activation::NoneActive(io::Error::other("a socket is closing")),
                Err(error) => return Activation::NoneActive(error),
            }
        }
        let mut active = self.active.lock();
        if let Err(error) = active.insert(client, pair.client.as_raw_fd(), 0) {
            return Activation::NoneActive(io::Error::other(error));
        }
        if let Err(error) = active.insert(server, pair.server.as_raw_fd(), 0) {
            return Activation::Partial(io::Error::other(error));
        }
        drop(active);
        // Bytes that arrived before the verdict was attached wait in the receive queues; a
        // SO_RCVLOWAT write makes TCP signal "data ready", which runs them through the
        // verdict in order (bytes arriving meanwhile join the same queue behind them).
        for socket in [&pair.client, &pair.server] {
            if let Err(error) = set_rcvlowat(socket, 1) {
                return Activation::Partial(error);
            }
        }
        Activation::Done
    }

    /// Takes the sockets out of both maps (entries that are not there are ignored).
    fn leave(&self, cookies: [u64; 2]) {
        for map in [&self.active, &self.peers] {
            let mut map = map.lock();
            for cookie in &cookies {
                let _ = map.remove(cookie);
            }
        }
    }
}

enum Activation {
    Done,
    /// Nothing is forwarded by the kernel yet: safe to forward another way.
    NoneActive(io::Error),
    /// The client socket is active, the server's is not.
    Partial(io::Error),
}

/// The connection's two proxy sockets while the kernel forwards between them.
pub(super) struct Pair {
    client: net::TcpStream,
    server: net::TcpStream,
    counters: ByteCounters,
    /// Bytes already added to the counters: client to server, server to client.
    reported: Mutex<[u64; 2]>,
    /// Whether the client / the server has sent its FIN (seen by `supervise`).
    fin_seen: [AtomicBool; 2],
}

/// When counters are brought up to date.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// While the kernel forwards (a /metrics scrape).
    Live,
    /// After forwarding ended.
    Final,
}

const CLIENT: usize = 0;
const SERVER: usize = 1;

impl Pair {
    fn fds(&self) -> [RawFd; 2] {
        [self.client.as_raw_fd(), self.server.as_raw_fd()]
    }

    /// Adds what each socket received since the last call to the byte counters. Every byte
    /// a proxy socket receives is forwarded.
    fn sync_counters(&self, when: Sync) {
        let received = [
            self.data_received(&self.client, CLIENT, when),
            self.data_received(&self.server, SERVER, when),
        ];
        let mut reported = self.reported.lock();
        if let Some(total) = received[CLIENT] {
            let new = total.saturating_sub(reported[CLIENT]);
            self.counters.client_to_server(new);
            reported[CLIENT] += new;
        }
        if let Some(total) = received[SERVER] {
            let new = total.saturating_sub(reported[SERVER]);
            self.counters.server_to_client(new);
            reported[SERVER] += new;
        }
    }

    /// Payload bytes `socket` has received. TCP counts a FIN as one byte of sequence space;
    /// it is subtracted wherever the state shows a FIN arrived. A closed socket cannot tell a
    /// FIN from a reset, so while forwarding it is skipped (the final count settles it).
    fn data_received(&self, socket: &net::TcpStream, side: usize, when: Sync) -> Option<u64> {
        let info = tcp_info(socket).ok()?;
        let settled = match when {
            Sync::Final => info,
            // TCP_INFO reads the state before, and without the lock that guards, the byte
            // count: a FIN arriving in between is counted but not yet in the state. A second
            // read settles it: if its state shows no FIN either, none had arrived when the
            // first read counted; if it shows one, its own count includes it.
            Sync::Live => {
                let again = tcp_info(socket).ok()?;
                if self.fin_received(&again, side, when)? {
                    again
                } else {
                    info
                }
            }
        };
        let fin = self.fin_received(&settled, side, when)?;
        Some(settled.tcpi_bytes_received.saturating_sub(u64::from(fin)))
    }

    /// Whether `info`'s state shows the peer's FIN; `None` for a closed socket while
    /// forwarding (a FIN or a reset: unknown).
    fn fin_received(&self, info: &libc::tcp_info, side: usize, when: Sync) -> Option<bool> {
        match u32::from(info.tcpi_state) {
            TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT => Some(true),
            TCP_CLOSE if when == Sync::Final => Some(self.fin_seen[side].load(Ordering::Relaxed)),
            TCP_CLOSE => None,
            _ => Some(false),
        }
    }
}

fn decline(pair: Pair) -> Handoff {
    match (
        TcpStream::from_std(pair.client),
        TcpStream::from_std(pair.server),
    ) {
        (Ok(client), Ok(server)) => Handoff::Declined(client, server),
        (Err(error), _) | (_, Err(error)) => Handoff::Forwarded(Outcome::Reset(Failure {
            step: "returning to the reactor",
            error,
        })),
    }
}

fn reset_both(pair: &Pair) {
    for socket in [&pair.client, &pair.server] {
        let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
    }
}

/// The connections the kernel is forwarding now, for counter updates at scrape time (and by
/// the busy sweep).
#[derive(Default)]
struct LiveConnections {
    pairs: Mutex<HashMap<usize, Weak<Pair>>>,
}

impl LiveConnections {
    fn register(&self, pair: &Arc<Pair>) -> Registered<'_> {
        let key = Arc::as_ptr(pair) as usize;
        self.lock().insert(key, Arc::downgrade(pair));
        Registered { live: self, key }
    }

    fn sync_all(&self) {
        let pairs: Vec<Arc<Pair>> = self.lock().values().filter_map(Weak::upgrade).collect();
        for pair in pairs {
            pair.sync_counters(Sync::Live);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<usize, Weak<Pair>>> {
        self.pairs.lock()
    }
}

/// Removes a connection from the live set when its forwarding ends.
struct Registered<'a> {
    live: &'a LiveConnections,
    key: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.live.lock().remove(&self.key);
    }
}
