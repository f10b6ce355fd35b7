//! Which opaque connections are busy: those that moved a byte within about the last second.
//! The kernel hand-off rule (`--sockmap-connections`) counts these rather than every open
//! connection: an idle connection (a pool's, a held session's) costs the kernel path nothing,
//! and counting it kept chatty connections out of the kernel on any node with a connection
//! pool open.
//!
//! Nothing is added to a connection's byte path: the sweep, a few times a second, compares
//! each connection's byte totals (its `ByteCounters`, which the kernel forwarder brings up to
//! date from TCP_INFO first) with what it saw last time.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;

/// How often the sweep looks.
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Sweeps in a row without a byte after which a connection counts as idle (about a second).
const IDLE_AFTER_SWEEPS: u32 = 4;

/// The opaque connections open now, and how many of them are busy.
pub struct Activity {
    inner: Mutex<Connections>,
    /// The busy count, for /metrics: kept equal to `Connections::busy`.
    gauge: Gauge,
}

#[derive(Default)]
struct Connections {
    next_key: u64,
    open: HashMap<u64, Watched>,
    /// Entries whose `idle_sweeps` is below `IDLE_AFTER_SWEEPS`.
    busy: usize,
}

struct Watched {
    /// Bytes so far, each direction (the connection's own totals, shared with its counters).
    bytes: Arc<[AtomicU64; 2]>,
    /// Their sum at the last sweep.
    seen: u64,
    idle_sweeps: u32,
}

impl Watched {
    fn busy(&self) -> bool {
        self.idle_sweeps < IDLE_AFTER_SWEEPS
    }

    fn total(&self) -> u64 {
        let [up, down] = &*self.bytes;
        up.load(Ordering::Relaxed)
            .wrapping_add(down.load(Ordering::Relaxed))
    }
}

impl Activity {
    pub fn new(gauge: Gauge) -> Self {
        Self {
            inner: Mutex::default(),
            gauge,
        }
    }

    /// Watches a connection from now until the returned guard is dropped. A new connection
    /// counts as busy until it has been idle for a second.
    pub fn watch(&self, bytes: Arc<[AtomicU64; 2]>) -> Watching<'_> {
        let mut inner = self.inner.lock();
        let key = inner.next_key;
        inner.next_key += 1;
        let mut watched = Watched {
            bytes,
            seen: 0,
            idle_sweeps: 0,
        };
        watched.seen = watched.total();
        inner.open.insert(key, watched);
        inner.busy += 1;
        self.publish(&inner);
        Watching {
            activity: self,
            key,
        }
    }

    /// Busy connections (open ones that moved a byte within about the last second, or opened
    /// within it), as of the last sweep and the opens and closes since.
    pub fn busy(&self) -> usize {
        self.inner.lock().busy
    }

    /// One look at every open connection; returns the busy count.
    pub fn sweep(&self) -> usize {
        let mut inner = self.inner.lock();
        let mut busy = 0;
        for watched in inner.open.values_mut() {
            let total = watched.total();
            if total == watched.seen {
                watched.idle_sweeps = watched.idle_sweeps.saturating_add(1);
            } else {
                watched.seen = total;
                watched.idle_sweeps = 0;
            }
            busy += usize::from(watched.busy());
        }
        inner.busy = busy;
        self.publish(&inner);
        busy
    }

    fn publish(&self, inner: &Connections) {
        self.gauge
            .set(i64::try_from(inner.busy).unwrap_or(i64::MAX));
    }
}

/// A watched connection; dropped when it ends.
pub struct Watching<'a> {
    activity: &'a Activity,
    key: u64,
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        let mut inner = self.activity.inner.lock();
        if let Some(watched) = inner.open.remove(&self.key)
            && watched.busy()
        {
            inner.busy -= 1;
            self.activity.publish(&inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes() -> Arc<[AtomicU64; 2]> {
        Arc::new([AtomicU64::new(0), AtomicU64::new(0)])
    }

    fn activity() -> Activity {
        Activity::new(Gauge::default())
    }

    fn sweeps(activity: &Activity, count: u32) -> usize {
        (0..count).map(|_| activity.sweep()).last().unwrap_or(0)
    }

    #[test]
    fn a_new_connection_is_busy_until_it_has_been_idle_for_a_while() {
        let activity = activity();
        let _watching = activity.watch(bytes());
        assert_eq!(activity.busy(), 1);
        assert_eq!(activity.gauge.get(), 1);
        assert_eq!(sweeps(&activity, IDLE_AFTER_SWEEPS - 1), 1);
        assert_eq!(activity.sweep(), 0);
        assert_eq!(activity.busy(), 0);
        assert_eq!(activity.gauge.get(), 0);
    }

    #[test]
    fn a_byte_in_either_direction_makes_an_idle_connection_busy_again() {
        let activity = activity();
        let counts = bytes();
        let _watching = activity.watch(Arc::clone(&counts));
        for direction in 0..2 {
            sweeps(&activity, IDLE_AFTER_SWEEPS);
            assert_eq!(activity.busy(), 0);
            counts[direction].fetch_add(1, Ordering::Relaxed);
            assert_eq!(activity.sweep(), 1);
        }
    }

    #[test]
    fn bytes_moved_before_the_watch_do_not_count() {
        let activity = activity();
        let counts = bytes();
        counts[0].store(1_000, Ordering::Relaxed);
        let _watching = activity.watch(Arc::clone(&counts));
        assert_eq!(sweeps(&activity, IDLE_AFTER_SWEEPS), 0);
    }

    #[test]
    fn a_closed_connection_leaves_the_count_busy_or_idle() {
        let activity = activity();
        let idle = activity.watch(bytes());
        sweeps(&activity, IDLE_AFTER_SWEEPS);
        let busy = activity.watch(bytes());
        assert_eq!(activity.busy(), 1);
        drop(idle);
        assert_eq!(activity.busy(), 1);
        drop(busy);
        assert_eq!(activity.busy(), 0);
        assert_eq!(activity.gauge.get(), 0);
        assert_eq!(activity.sweep(), 0);
    }
}
