//! `sockmesh check`'s sk_msg probe: does this kernel do what the planned `--accelerate local`
//! fast path (sk_msg redirects on application sockets, docs/design-sk-msg.md) relies on? It
//! loads the agent's object, attaches `sockmesh_probe` to `PROBE_SOCKS` only, and moves
//! bytes between loopback sockets of its own. Two facts decide:
//! - a socket under an sk_msg program that receives plain TCP must report its bytes to
//!   FIONREAD (6.18.x with kernel commit 929e30f93125 and without its fix report 0, and event
//!   loops that size reads by FIONREAD, nginx's among them, stall: grafana/beyla#2941);
//! - a message redirected with BPF_F_INGRESS must wake the reader and show in FIONREAD and
//!   MSG_PEEK;
//! - a blocking read on a socket under the program must wait for data while another thread
//!   sends on that socket (6.12 and 6.18 answer EAGAIN on the first wake-up without data, the
//!   write space of the socket's own sends; docs/experiments/tcp_bpf_wait_again.patch is the
//!   kernel fix).

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use aya::{
    EbpfLoader,
    maps::{MapData, SockHash},
    programs::SkMsg,
};
use thiserror::Error;

use agent_common::{PROBE_TARGET_KEY, map_names, program_names};

use crate::sys::{bytes_readable, peek, poll_now};

const MESSAGE: usize = 1000;
/// How long the bytes may take to show up on loopback.
const ARRIVAL: Duration = Duration::from_secs(2);
/// The blocking-read probe's socket; not `PROBE_TARGET_KEY`, which is not in the map while it
/// runs, so the program passes its messages on by plain TCP.
const BLOCKING_READER_KEY: u32 = 0;
/// The blocking-read probe's writer sends blocks of this size, and its peer answers once it
/// has 256 of them: far past the few send buffers after which an affected kernel's first
/// wake-up without data reaches the blocked reader (within 100 blocks on 6.12 and 6.18).
const WRITE_BLOCK: usize = 64 * 1024;
const PEER_ANSWERS_AFTER: usize = 256 * WRITE_BLOCK;
/// How long the blocked read may take before the probe gives up on it: the peer answers
/// after about 0.3 s, the bound is for a kernel that never wakes the reader.
const READ_BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("this build has no kernel object")]
    NoObject,
    #[error("loading the kernel object")]
    Load(#[source] aya::EbpfError),
    #[error("program or map {0} missing from the object")]
    Missing(&'static str),
    #[error("the sk_msg program")]
    Program(#[source] aya::programs::ProgramError),
    #[error("the probe's socket map")]
    Map(#[source] aya::maps::MapError),
    #[error("the probe's sockets")]
    Io(#[source] std::io::Error),
}

/// What the probe saw.
#[derive(Debug, PartialEq, Eq)]
pub struct Findings {
    /// FIONREAD of a socket under the program after MESSAGE bytes of plain TCP.
    pub plain_tcp_fionread: usize,
    /// After MESSAGE bytes redirected into a socket: readable, FIONREAD, MSG_PEEK.
    pub ingress_readable: bool,
    pub ingress_fionread: usize,
    pub ingress_peeked: usize,
    /// What a blocking read answered while another thread sent on the same socket.
    pub blocking_read: BlockingRead,
}

/// What a blocking read on a socket under the program answered while another thread of the
/// probe sent on that socket and the peer answered only after 16 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockingRead {
    /// It waited for the peer's byte, as plain TCP does.
    Waits,
    /// EAGAIN from a blocking socket without a receive timeout.
    Eagain,
    /// Nothing within READ_BOUND.
    NoAnswer,
    /// EOF or an error before the peer's byte.
    Ended,
}

impl BlockingRead {
    fn describe(self) -> &'static str {
        match self {
            Self::Waits => "waits for data, as plain TCP does",
            Self::Eagain => {
                "answers EAGAIN, so blocking applications that send and receive at once fail \
                 (kernel fix: docs/experiments/tcp_bpf_wait_again.patch)"
            }
            Self::NoAnswer => "never answered (bounded at 10 s)",
            Self::Ended => "ended before the peer's byte",
        }
    }
}

impl Findings {
    pub fn fast_path_safe(&self) -> bool {
        self.plain_tcp_fionread == MESSAGE
            && self.ingress_readable
            && self.ingress_fionread == MESSAGE
            && self.ingress_peeked == MESSAGE
            && self.blocking_read == BlockingRead::Waits
    }

    pub fn describe(&self) -> String {
        let verdict = if self.fast_path_safe() {
            "as the fast path needs"
        } else {
            "unsafe for the fast path"
        };
        format!(
            "{verdict}: FIONREAD {} of {MESSAGE} plain-TCP bytes on a socket under sk_msg; \
             ingress redirect {} (FIONREAD {}, MSG_PEEK {}); a blocking read while the same \
             socket sends {}",
            self.plain_tcp_fionread,
            if self.ingress_readable {
                "wakes the reader"
            } else {
                "never became readable"
            },
            self.ingress_fionread,
            self.ingress_peeked,
            self.blocking_read.describe(),
        )
    }
}

/// Runs the probe (needs CAP_BPF and CAP_NET_ADMIN). Everything it creates goes when it
/// returns: the maps and program with the object, the sockets with their owners.
pub fn run() -> Result<Findings, ProbeError> {
    let object = crate::intercept::ebpf_object();
    if object.is_empty() {
        return Err(ProbeError::NoObject);
    }
    let mut ebpf = EbpfLoader::new().load(object).map_err(ProbeError::Load)?;
    let mut socks: SockHash<_, u32> = ebpf
        .take_map(map_names::PROBE_SOCKS)
        .ok_or(ProbeError::Missing(map_names::PROBE_SOCKS))?
        .try_into()
        .map_err(ProbeError::Map)?;
    let program: &mut SkMsg = ebpf
        .program_mut(program_names::SK_MSG_PROBE)
        .ok_or(ProbeError::Missing(program_names::SK_MSG_PROBE))?
        .try_into()
        .map_err(ProbeError::Program)?;
    program.load().map_err(ProbeError::Program)?;
    program.attach(socks.fd()).map_err(ProbeError::Program)?;

    let blocking_read = blocking_read(&mut socks)?;

    // A receiver under the program (not the redirect target) gets plain TCP.
    let (plain_sender, plain_receiver) = loopback_pair()?;
    socks
        .insert(1, plain_receiver.as_raw_fd(), 0)
        .map_err(ProbeError::Map)?;
    (&plain_sender)
        .write_all(&[b'p'; MESSAGE])
        .map_err(ProbeError::Io)?;
    wait_readable(&plain_receiver);
    let plain_tcp_fionread = bytes_readable(&plain_receiver).map_err(ProbeError::Io)?;

    // A sender under the program has its bytes redirected into the target's receive side.
    let (target, _target_peer) = loopback_pair()?;
    let (sender, _sender_peer) = loopback_pair()?;
    socks
        .insert(PROBE_TARGET_KEY, target.as_raw_fd(), 0)
        .map_err(ProbeError::Map)?;
    socks
        .insert(3, sender.as_raw_fd(), 0)
        .map_err(ProbeError::Map)?;
    (&sender)
        .write_all(&[b'i'; MESSAGE])
        .map_err(ProbeError::Io)?;
    let ingress_readable = wait_readable(&target);
    let ingress_fionread = bytes_readable(&target).map_err(ProbeError::Io)?;
    let mut buf = [0u8; 2 * MESSAGE];
    let ingress_peeked = if ingress_readable {
        peek(&target, &mut buf).map_err(ProbeError::Io)?
    } else {
        0
    };
    Ok(Findings {
        plain_tcp_fionread,
        ingress_readable,
        ingress_fionread,
        ingress_peeked,
        blocking_read,
    })
}

/// One thread blocks in read(2) on a socket under the program while another writes to a peer
/// that reads slowly and sends one byte once it has PEER_ANSWERS_AFTER bytes. The writer
/// sleeps on a full send buffer and is woken by the peer's ACKs on the socket's wait queue,
/// which the reader sleeps on too: the wake-up an affected kernel answers EAGAIN to. Every
/// wait is bounded: a watchdog shuts the socket down after READ_BOUND, which ends all three.
fn blocking_read(socks: &mut SockHash<MapData, u32>) -> Result<BlockingRead, ProbeError> {
    let (reader, peer) = loopback_pair()?;
    socks
        .insert(BLOCKING_READER_KEY, reader.as_raw_fd(), 0)
        .map_err(ProbeError::Map)?;
    let (reader, peer) = (&reader, &peer);
    let done = AtomicBool::new(false);
    let timed_out = AtomicBool::new(false);
    let (read_returned, watchdog) = mpsc::channel::<()>();
    let answer = std::thread::scope(|scope| {
        scope.spawn(|| write_until_done(reader, &done));
        scope.spawn(|| read_slowly_then_answer(peer, &done));
        let timed_out = &timed_out;
        scope.spawn(move || {
            if watchdog.recv_timeout(READ_BOUND).is_err() {
                timed_out.store(true, Ordering::SeqCst);
                let _ = reader.shutdown(Shutdown::Both);
            }
        });
        let mut byte = [0u8; 1];
        let answer = (&*reader).read(&mut byte).map(|len| (len, byte[0]));
        let _ = read_returned.send(());
        done.store(true, Ordering::SeqCst);
        let _ = reader.shutdown(Shutdown::Both);
        answer
    });
    let _ = socks.remove(&BLOCKING_READER_KEY);
    Ok(classify_blocking_read(
        answer,
        timed_out.load(Ordering::SeqCst),
    ))
}

fn classify_blocking_read(answer: io::Result<(usize, u8)>, timed_out: bool) -> BlockingRead {
    match answer {
        Ok((1, b'x')) => BlockingRead::Waits,
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => BlockingRead::Eagain,
        _ if timed_out => BlockingRead::NoAnswer,
        _ => BlockingRead::Ended,
    }
}

fn write_until_done(socket: &TcpStream, done: &AtomicBool) {
    let block = vec![0u8; WRITE_BLOCK];
    while !done.load(Ordering::SeqCst) {
        if (&*socket).write(&block).is_err() {
            return;
        }
    }
}

/// Reads PEER_ANSWERS_AFTER bytes, 16 KiB at a time with a pause after each read so that the
/// writer fills its send buffer, then sends b"x" and its FIN and drains until the probe is done.
fn read_slowly_then_answer(socket: &TcpStream, done: &AtomicBool) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut received = 0;
    while received < PEER_ANSWERS_AFTER {
        match (&*socket).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(len) => received += len,
        }
        // A thread of a synchronous command (`sockmesh check`), not of the proxy.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = (&*socket).write_all(b"x");
    let _ = socket.shutdown(Shutdown::Write);
    while !done.load(Ordering::SeqCst) {
        match (&*socket).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn loopback_pair() -> Result<(TcpStream, TcpStream), ProbeError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(ProbeError::Io)?;
    let addr = listener.local_addr().map_err(ProbeError::Io)?;
    let client = TcpStream::connect(addr).map_err(ProbeError::Io)?;
    let (server, _) = listener.accept().map_err(ProbeError::Io)?;
    Ok((client, server))
}

/// Whether `socket` became readable within ARRIVAL (bounded polling: loopback delivers at
/// once, the bound is for a kernel that never does).
fn wait_readable(socket: &TcpStream) -> bool {
    let deadline = Instant::now() + ARRIVAL;
    loop {
        if poll_now(socket, libc::POLLIN) & libc::POLLIN != 0 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_needs_fionread_for_plain_tcp_and_a_readable_ingress() {
        let good = Findings {
            plain_tcp_fionread: MESSAGE,
            ingress_readable: true,
            ingress_fionread: MESSAGE,
            ingress_peeked: MESSAGE,
            blocking_read: BlockingRead::Waits,
        };
        assert!(good.fast_path_safe());
        assert!(good.describe().starts_with("as the fast path needs"));
        // 6.18.44 here: FIONREAD reads 0 for plain TCP on a socket under sk_msg.
        let broken_fionread = Findings {
            plain_tcp_fionread: 0,
            ..good
        };
        assert!(!broken_fionread.fast_path_safe());
        assert!(
            broken_fionread
                .describe()
                .starts_with("unsafe for the fast path: FIONREAD 0 of 1000"),
            "{}",
            broken_fionread.describe()
        );
        let never_readable = Findings {
            ingress_readable: false,
            ingress_peeked: 0,
            ..good
        };
        assert!(never_readable.describe().contains("never became readable"));
        // 6.12 and 6.18 without docs/experiments/tcp_bpf_wait_again.patch.
        let eagain = Findings {
            blocking_read: BlockingRead::Eagain,
            ..good
        };
        assert!(!eagain.fast_path_safe());
        assert!(
            eagain
                .describe()
                .contains("a blocking read while the same socket sends answers EAGAIN"),
            "{}",
            eagain.describe()
        );
    }

    #[test]
    fn a_blocking_read_is_judged_by_what_it_returned() {
        let would_block = || Err(io::Error::from(io::ErrorKind::WouldBlock));
        assert_eq!(
            classify_blocking_read(Ok((1, b'x')), false),
            BlockingRead::Waits
        );
        assert_eq!(
            classify_blocking_read(would_block(), false),
            BlockingRead::Eagain
        );
        // The watchdog's shutdown ends the read with EOF.
        assert_eq!(
            classify_blocking_read(Ok((0, 0)), true),
            BlockingRead::NoAnswer
        );
        assert_eq!(
            classify_blocking_read(Ok((0, 0)), false),
            BlockingRead::Ended
        );
        let reset = Err(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(classify_blocking_read(reset, false), BlockingRead::Ended);
    }
}
