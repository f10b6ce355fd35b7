//! Connections the kernel redirected but the agent never accepted. sockops writes a
//! connection's original destination (`ORIG_BY_TUPLE`) when the client side is established,
//! and the proxy removes it at accept. A connection can end before that: the client's side
//! completed while the agent's accept queue was full (the final ACK was dropped, no child
//! socket was made), then the client reset it. Nothing would ever read or remove such an
//! entry, and the LRU only bounds them.
//!
//! The sweep asks the kernel instead of guessing from age: an entry seen on two passes in a
//! row (so at least one pass interval old) whose connection has neither its client socket nor
//! the agent's side (accepted, or still queued on the listener) left in its namespace is
//! removed. A connection that still exists keeps its entry however long the agent takes, so a
//! stopped agent that resumes finds every destination it is owed.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::SocketAddr,
    sync::Arc,
};

use agent_common::ConnTuple;

use crate::{intercept::OriginalDstMap, listeners, netns::Origin, original_dst};

/// Entries checked with the kernel per pass at most (two lookups each), so a flood of them
/// is worked through over several passes instead of in one long one.
const MAX_CHECKS_PER_PASS: usize = 4096;

/// The sweep's memory between passes: the entries seen last time.
#[derive(Default)]
pub struct Sweep {
    seen: HashSet<ConnTuple>,
}

impl Sweep {
    /// One pass over the map: returns how many entries of ended connections it removed.
    /// `origins` are the namespaces the agent serves; entries of any other namespace are left
    /// to the removal of that namespace (`OriginalDstMap::forget_netns`).
    pub fn pass(&mut self, map: &OriginalDstMap, origins: &[Arc<Origin>]) -> usize {
        let now: HashSet<ConnTuple> = map.tuples().into_iter().collect();
        let by_cookie: HashMap<u64, &Arc<Origin>> = origins
            .iter()
            .map(|origin| (origin.netns_cookie, origin))
            .collect();
        let mut removed = 0;
        let candidates = now.intersection(&self.seen).take(MAX_CHECKS_PER_PASS);
        for tuple in candidates {
            let Some(origin) = by_cookie.get(&tuple.netns) else {
                continue;
            };
            match connection_exists(origin, tuple) {
                Ok(true) => {}
                Ok(false) => removed += usize::from(map.remove(tuple)),
                Err(error) => {
                    tracing::debug!(%error, netns = tuple.netns, "checking an unaccepted connection");
                }
            }
        }
        self.seen = now;
        removed
    }
}

/// Whether either end of a redirected connection is still a socket in its namespace.
fn connection_exists(origin: &Origin, tuple: &ConnTuple) -> io::Result<bool> {
    let (client, agent) = endpoints(tuple);
    origin.within(|| {
        Ok(listeners::tcp_socket_exists(client, agent)?
            || listeners::tcp_socket_exists(agent, client)?)
    })
}

/// The client's and the agent's addresses of a connection's map key.
fn endpoints(tuple: &ConnTuple) -> (SocketAddr, SocketAddr) {
    let accepted_as = |addr: [u32; 4], port: u16| {
        original_dst::to_socket_addr(&agent_common::OriginalDst {
            addr,
            port,
            family: tuple.family,
            ..Default::default()
        })
    };
    (
        accepted_as(tuple.src_addr, tuple.src_port),
        accepted_as(tuple.dst_addr, tuple.dst_port),
    )
}
