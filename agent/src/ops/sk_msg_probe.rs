//! `sockmesh check`'s sk_msg probe: does this kernel do what the planned `--accelerate local`
//! fast path (sk_msg redirects on application sockets, docs/design-sk-msg.md) relies on? It
//! loads the agent's object, attaches `sockmesh_probe` to `PROBE_SOCKS` only, and moves
//! bytes between loopback sockets of its own. Two facts decide:
//! - a socket under an sk_msg program that receives plain TCP must report its bytes to
//!   FIONREAD (6.18.x with kernel commit 929e30f93125 and without its fix report 0, and event
//!   loops that size reads by FIONREAD, nginx's among them, stall: grafana/beyla#2941);
//! - a message redirected with BPF_F_INGRESS must wake the reader and show in FIONREAD and
//!   MSG_PEEK.

use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use aya::{EbpfLoader, maps::SockHash, programs::SkMsg};
use thiserror::Error;

use agent_common::{PROBE_TARGET_KEY, map_names, program_names};

use crate::sys::{bytes_readable, peek, poll_now};

const MESSAGE: usize = 1000;
/// How long the bytes may take to show up on loopback.
const ARRIVAL: Duration = Duration::from_secs(2);

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
}

impl Findings {
    pub fn fast_path_safe(&self) -> bool {
        self.plain_tcp_fionread == MESSAGE
            && self.ingress_readable
            && self.ingress_fionread == MESSAGE
            && self.ingress_peeked == MESSAGE
    }

    pub fn describe(&self) -> String {
        let verdict = if self.fast_path_safe() {
            "as the fast path needs"
        } else {
            "unsafe for the fast path"
        };
        format!(
            "{verdict}: FIONREAD {} of {MESSAGE} plain-TCP bytes on a socket under sk_msg; \
             ingress redirect {} (FIONREAD {}, MSG_PEEK {})",
            self.plain_tcp_fionread,
            if self.ingress_readable {
                "wakes the reader"
            } else {
                "never became readable"
            },
            self.ingress_fionread,
            self.ingress_peeked,
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
    })
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
    }
}
