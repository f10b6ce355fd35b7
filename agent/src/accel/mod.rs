//! `--accelerate local` (experimental), the agent's half: pair an accepted connection's socket
//! with the application's, or take the application's socket out of the fast path.
//!
//! sockops puts every redirected client socket in `ACCEL_SOCKS` when it connects, before the
//! agent has seen the connection. Once the agent knows where the connection goes it decides:
//! an opaque-port connection is paired (the agent's socket joins under the reversed tuple, so
//! each side's sends land in the other's receive queue); any other connection has the
//! application's socket removed before the agent writes a byte to it, so that socket never
//! receives plain TCP while in a sockhash (FIONREAD, see agent-ebpf's accel.rs).
//!
//! A paired connection is copied in user space between the agent's two sockets (recv, never
//! splice: spliced reads do not see redirected bytes). Its `AccelLink` publishes what the agent
//! read (so the application's redirects stay under `ACCEL_BOUND`), and learns what the
//! application read from its socket's receive memory (sock_diag): the agent stops reading
//! from the server while the application has `ACCEL_BOUND` unread (`forward::copy`).

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use agent_common::{
    ACCEL_BOUND, ACCEL_PUBLISH_EVERY, ACCEL_SIDE_AGENT, ACCEL_UNDECIDED, AccelPair, AccelReads,
    AccelSocket, ConnTuple, map_names, program_names,
};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, SkStorage, SockHash},
    programs::{ProgramError, SkMsg},
};
use parking_lot::Mutex;
use socket2::Socket;
use tokio::net::TcpStream;

use crate::{listeners, netns::Origin};

pub mod foreign;

/// A connection's first reads are all published: the application's first bytes went by TCP
/// before pairing, and it may redirect only once the agent has read them.
const PUBLISH_FIRST_READS: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("map {0} missing from the eBPF object")]
    MapMissing(&'static str),
    #[error("program {0} missing from the eBPF object")]
    ProgramMissing(&'static str),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("loading or attaching {program}; this kernel cannot run --accelerate local")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
}

/// The fast path's programs stay attached as long as this lives.
pub struct Accelerator {
    socks: Mutex<SockHash<MapData, ConnTuple>>,
    state: Mutex<SkStorage<MapData, AccelSocket>>,
    reads: Mutex<HashMap<MapData, ConnTuple, AccelReads>>,
    pairs: Mutex<HashMap<MapData, ConnTuple, AccelPair>>,
    /// The sk_msg program's attachment to ACCEL_SOCKS: dropping it detaches.
    _link: Box<dyn Send + Sync>,
}

impl Accelerator {
    /// Loads and attaches the sk_msg program to `ACCEL_SOCKS`.
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self, AccelError> {
        let socks: SockHash<MapData, ConnTuple> = take_map(ebpf, map_names::ACCEL_SOCKS)?;
        let state: SkStorage<MapData, AccelSocket> = take_map(ebpf, map_names::ACCEL_STATE)?;
        let reads: HashMap<MapData, ConnTuple, AccelReads> =
            take_map(ebpf, map_names::ACCEL_READS)?;
        let pairs: HashMap<MapData, ConnTuple, AccelPair> = take_map(ebpf, map_names::ACCEL_PAIRS)?;
        let name = program_names::ACCEL;
        let program_error = |source| AccelError::Program {
            program: name,
            source,
        };
        let program: &mut SkMsg = ebpf
            .program_mut(name)
            .ok_or(AccelError::ProgramMissing(name))?
            .try_into()
            .map_err(program_error)?;
        program.load().map_err(program_error)?;
        let id = program.attach(socks.fd()).map_err(program_error)?;
        let link = program.take_link(id).map_err(program_error)?;
        Ok(Self {
            socks: Mutex::new(socks),
            state: Mutex::new(state),
            reads: Mutex::new(reads),
            pairs: Mutex::new(pairs),
            _link: Box::new(link),
        })
    }

    /// Pairs the agent's accepted socket with the application's (`app` is the connection as the
    /// application's socket sees it). Must run before the agent reads or writes `client`.
    /// None if the kernel would not take it: the connection then goes on by plain TCP, and the
    /// application's socket has been taken out of the fast path.
    pub fn pair(
        self: &Arc<Self>,
        client: &TcpStream,
        app: ConnTuple,
        origin: Arc<Origin>,
    ) -> Option<AccelLink> {
        let (Ok(agent_addr), Ok(app_addr)) = (client.local_addr(), client.peer_addr()) else {
            self.release(app);
            return None;
        };
        // sockops left the application's socket out (it had sent already, or a map was full):
        // nothing to pair with, and the agent's socket stays out of sockhashes too.
        // (A sockhash cannot be looked up from user space; its count entry goes with it.)
        if self.pairs.lock().get(&app, 0).is_err() {
            return None;
        }
        let state = AccelSocket {
            pair: app,
            side: ACCEL_SIDE_AGENT,
            decision: ACCEL_UNDECIDED,
        };
        let paired = self
            .reads
            .lock()
            .insert(app, AccelReads::default(), 0)
            .is_ok()
            && self.state.lock().insert(client, state, 0).is_ok()
            && self
                .socks
                .lock()
                .insert(app.reversed(), client.as_raw_fd(), 0)
                .is_ok();
        if !paired {
            tracing::debug!("the kernel would not pair this connection; plain TCP");
            self.release(app);
            let _ = self.reads.lock().remove(&app);
            return None;
        }
        Some(AccelLink {
            accelerator: Arc::clone(self),
            app,
            app_addr,
            agent_addr,
            origin,
            read: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            published: AtomicU64::new(0),
            written: AtomicU64::new(0),
            app_read: AtomicU64::new(0),
            diag: Mutex::new(None),
        })
    }

    /// Takes the application's socket out of the fast path (a connection that is not paired).
    /// Before the agent's first write to it: a socket in a sockhash that receives plain TCP
    /// misreports FIONREAD on 6.18.
    pub fn release(&self, app: ConnTuple) {
        // Absent when sockops did not add it (bytes already sent, map full): nothing to do.
        let _ = self.socks.lock().remove(&app);
    }
}

/// One paired connection's counts: what the agent read is published to the kernel as the copy
/// goes; what the application read bounds the agent's writes to it. Removed from the kernel's
/// map when dropped (the connection's end).
pub struct AccelLink {
    accelerator: Arc<Accelerator>,
    app: ConnTuple,
    /// The application's socket: its address, and the agent listener's address it is
    /// connected to (sock_diag's lookup key, in the application's namespace).
    app_addr: SocketAddr,
    agent_addr: SocketAddr,
    origin: Arc<Origin>,
    /// Bytes the agent read from the application, and in how many reads.
    read: AtomicU64,
    reads: AtomicU64,
    /// What the kernel was last told of `read`.
    published: AtomicU64,
    /// Bytes the agent wrote to the application (all redirected into its receive queue once
    /// the first was), and how many of them the application had read when last looked at.
    written: AtomicU64,
    app_read: AtomicU64,
    /// A sock_diag socket in the application's namespace, made when first needed.
    diag: Mutex<Option<Socket>>,
}

impl AccelLink {
    /// The agent read `bytes` from the application.
    pub fn read(&self, bytes: usize) {
        let read = self.read.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        let reads = self.reads.fetch_add(1, Ordering::Relaxed) + 1;
        let behind = read - self.published.load(Ordering::Relaxed);
        if reads <= PUBLISH_FIRST_READS || behind >= ACCEL_PUBLISH_EVERY {
            self.published.store(read, Ordering::Relaxed);
            let reads = AccelReads { agent_read: read };
            if let Err(error) = self.accelerator.reads.lock().insert(self.app, reads, 0) {
                tracing::debug!(%error, "publishing the read count to ACCEL_READS");
            }
        }
    }

    /// The agent wrote `bytes` to the application.
    pub fn wrote(&self, bytes: u64) {
        self.written.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Whether the application has room for more: fewer than `ACCEL_BOUND` bytes given to it
    /// unread. Past half of that since the application's reads were last looked at, look
    /// again, so that a reading application never has to wait.
    pub fn app_has_room(&self) -> bool {
        let unread = |link: &Self| {
            link.written.load(Ordering::Relaxed) - link.app_read.load(Ordering::Relaxed)
        };
        if unread(self) > ACCEL_BOUND / 2 {
            self.refresh_app_read();
        }
        unread(self) <= ACCEL_BOUND
    }

    /// The application has read what it was given minus what its receive queue still holds.
    fn refresh_app_read(&self) {
        // Before the lookup: a write after it only makes the queue look longer.
        let written = self.written.load(Ordering::Relaxed);
        let queued = match self.app_receive_memory() {
            Ok(Some(queued)) => queued,
            // Gone: the application closed; whatever the agent writes now is answered with a
            // reset, and nothing is queued any more.
            Ok(None) => 0,
            Err(error) => {
                tracing::debug!(%error, "reading the application socket's receive memory");
                return;
            }
        };
        self.app_read
            .fetch_max(written.saturating_sub(queued), Ordering::Relaxed);
    }

    fn app_receive_memory(&self) -> std::io::Result<Option<u64>> {
        let mut diag = self.diag.lock();
        if diag.is_none() {
            *diag = Some(self.origin.within(listeners::sock_diag_socket)?);
        }
        let Some(diag) = diag.as_ref() else {
            return Ok(None);
        };
        listeners::tcp_receive_memory(diag, self.app_addr, self.agent_addr)
    }
}

impl Drop for AccelLink {
    fn drop(&mut self) {
        let _ = self.accelerator.reads.lock().remove(&self.app);
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, AccelError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(AccelError::MapMissing(name))?;
    T::try_from(map).map_err(|source| AccelError::Map { map: name, source })
}
