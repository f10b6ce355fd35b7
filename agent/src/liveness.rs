//! Liveness and capacity, as the kernel sees them. Every proxy thread ticks its own heartbeat
//! every 100 ms; a publisher writes the oldest of them, with the connection budget, into the
//! `LIVENESS` map. connect4/6 redirect only while that heartbeat is fresh (a stopped, hung or
//! dead agent stops ticking) and while `OPEN_REDIRECTS` (kept by the kernel itself, so a burst
//! of connects cannot overrun it between two publications) is under the budget. Otherwise the
//! connect goes straight to its destination: the agent is never why a connection fails.
//! sk_lookup applies the same gate to inbound connections, which share the budget: the agent
//! counts the inbound connections it holds (`OpenInbound`) and publishes that count.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_common::{AgentLiveness, INBOUND_STEERED_SLOT, OPEN_REDIRECTS_SLOT};
use aya::maps::{Array, MapData, MapError};
use tokio_util::sync::CancellationToken;

use crate::{metrics::ErrorChain, sys};

#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    #[error("writing LIVENESS")]
    Write(#[source] MapError),
}

/// How often proxy threads tick and the publisher writes the map.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_millis(100);
/// File descriptors kept for the agent's own files (maps, listeners, epoll, admin, logs) when
/// the connection budget is derived from the open-file limit.
pub const RESERVED_FDS: u64 = 256;
/// Descriptors one proxied connection may hold: its two sockets, plus a pipe pair while bytes
/// are being spliced.
pub const FDS_PER_CONNECTION: u64 = 4;

/// The most connections the agent takes at once, whatever the open-file limit or
/// --max-connections say: the kernel's original-destination maps hold
/// MAX_TRACKED_CONNECTIONS entries and evict the oldest beyond (an evicted entry's connection
/// is reset on accept, or its close goes uncounted and shrinks the budget for good). A
/// quarter is left for closes not yet reported and for the LRU, which may evict before it is
/// quite full.
pub const MAX_BUDGET: u64 = agent_common::MAX_TRACKED_CONNECTIONS as u64 * 3 / 4;

/// The connection budget a limit of `open_files` descriptors allows.
pub fn budget_for(open_files: u64, other_reserved: u64) -> u64 {
    (open_files.saturating_sub(RESERVED_FDS + other_reserved) / FDS_PER_CONNECTION).min(MAX_BUDGET)
}

/// One heartbeat per proxy thread: CLOCK_MONOTONIC nanoseconds of its latest tick.
#[derive(Clone, Default)]
pub struct Heartbeats(Arc<Vec<AtomicU64>>);

impl Heartbeats {
    pub fn new(threads: usize) -> Self {
        Self(Arc::new((0..threads).map(|_| AtomicU64::new(0)).collect()))
    }

    /// Proxy thread `index` is alive: called from its own runtime, so a runtime that stops
    /// polling stops ticking.
    pub fn tick(&self, index: usize) {
        if let Some(beat) = self.0.get(index) {
            beat.store(sys::monotonic_ns(), Ordering::Relaxed);
        }
    }

    /// The oldest thread's latest tick (0 until every thread has ticked once).
    pub fn oldest(&self) -> u64 {
        self.0
            .iter()
            .map(|beat| beat.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
}

/// Inbound connections the agent holds now. The kernel counts redirected connects itself;
/// sk_lookup sees an inbound connection's SYN but never its close, so the agent counts those
/// and publishes the count with the heartbeat: both kinds share one budget.
#[derive(Clone, Default)]
pub struct OpenInbound(Arc<AtomicU64>);

impl OpenInbound {
    /// Counts one connection until the returned guard drops.
    pub fn hold(&self) -> HeldInbound {
        self.0.fetch_add(1, Ordering::Relaxed);
        HeldInbound(Arc::clone(&self.0))
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One inbound connection counted in `OpenInbound`, for as long as it lives.
pub struct HeldInbound(Arc<AtomicU64>);

impl Drop for HeldInbound {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the publisher needs: the map, the timeout, how the budget is derived.
pub struct Publisher {
    pub map: Array<MapData, AgentLiveness>,
    pub heartbeats: Heartbeats,
    pub timeout: Duration,
    /// The budget given with --max-connections; None: derived from the open-file limit.
    pub max_connections: Option<u64>,
    /// Descriptors held besides connections and the fixed reserve (each served pod's
    /// listeners), read at every publication.
    pub other_reserved: Box<dyn Fn() -> u64 + Send + Sync>,
    /// The kernel's count of redirected connections still open, read for /metrics.
    pub open_redirects: Array<MapData, u64>,
    /// The agent's count of inbound connections, published for the kernel's budget check.
    pub open_inbound: OpenInbound,
    /// Told the budget and the open count at every publication (for /metrics).
    pub report: Box<dyn Fn(u64, u64) + Send + Sync>,
}

impl Publisher {
    /// The budget now.
    pub fn budget(&self) -> u64 {
        if let Some(max) = self.max_connections {
            return max.min(MAX_BUDGET);
        }
        let limit = sys::open_file_limit().map_or(0, |(soft, _)| soft);
        budget_for(limit, (self.other_reserved)())
    }

    /// Writes the map once; before the programs are attached, so the first connect already
    /// finds a fresh heartbeat.
    pub fn publish(&mut self) -> Result<(), LivenessError> {
        let budget = self.budget();
        let open = self
            .open_redirects
            .get(&OPEN_REDIRECTS_SLOT, 0)
            .unwrap_or(0);
        (self.report)(budget, open);
        // Read before counting: a connection steered in between is counted twice (briefly
        // conservative), never missed.
        let inbound_steered = self
            .open_redirects
            .get(&INBOUND_STEERED_SLOT, 0)
            .unwrap_or(0);
        let liveness = AgentLiveness {
            heartbeat_ns: self.heartbeats.oldest(),
            timeout_ns: u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX),
            max_connections: budget,
            open_inbound: self.open_inbound.get(),
            inbound_steered,
        };
        self.map.set(0, liveness, 0).map_err(LivenessError::Write)
    }

    /// Publishes every heartbeat period until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT_PERIOD);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.publish() {
                tracing::warn!(
                    error = ErrorChain(&error).to_string(),
                    "publishing the heartbeat failed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_a_reserve_and_counts_four_descriptors_per_connection() {
        assert_eq!(budget_for(20_000, 0), (20_000 - 256) / 4);
        assert_eq!(budget_for(300, 0), 11);
        assert_eq!(budget_for(300, 8), 9);
        assert_eq!(budget_for(100, 0), 0);
        // A node's usual hard limits (2^20) would allow more than the kernel's maps track.
        assert_eq!(budget_for(1 << 20, 0), MAX_BUDGET);
        assert_eq!(MAX_BUDGET, 49_152);
    }

    #[test]
    fn an_inbound_connection_is_counted_while_it_lives() {
        let open = OpenInbound::default();
        let first = open.hold();
        let second = open.hold();
        assert_eq!(open.get(), 2);
        drop(first);
        assert_eq!(open.get(), 1);
        drop(second);
        assert_eq!(open.get(), 0);
    }

    #[test]
    fn the_oldest_thread_decides() {
        let beats = Heartbeats::new(2);
        assert_eq!(
            beats.oldest(),
            0,
            "a thread that never ticked holds everything back"
        );
        beats.tick(0);
        assert_eq!(beats.oldest(), 0);
        beats.tick(1);
        assert!(beats.oldest() > 0);
    }
}
