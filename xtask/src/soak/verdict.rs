//! Whether the agent passed: alive, drained back to its baseline, RSS within its bound, and
//! what its log says.

use std::{fs, path::Path, thread, time::Duration};

use super::{
    AGENT_MAX_IDLE_PIPES, FD_TOLERANCE, MAPS, RSS_GROWTH_FRACTION, RSS_GROWTH_MIB, sample::Sample,
};

pub(super) fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// What is not back at its baseline after the drain.
pub(super) fn drain_problems(baseline: &Sample, now: &Sample) -> Vec<String> {
    let mut problems = Vec::new();
    let pool_bound = 2 * AGENT_MAX_IDLE_PIPES * proxy_threads();
    if (now.fds as i64 - baseline.fds as i64).abs() > FD_TOLERANCE {
        problems.push(format!(
            "open fds (not pipes): {} after the drain, {} before the traffic (tolerance ±{FD_TOLERANCE})",
            now.fds, baseline.fds
        ));
    }
    if now.pipe_fds > baseline.pipe_fds + pool_bound {
        problems.push(format!(
            "pipe fds: {} after the drain, more than the idle pipe pool can hold ({pool_bound})",
            now.pipe_fds
        ));
    }
    if now.threads != baseline.threads {
        problems.push(format!(
            "threads: {} after the drain, {} before the traffic",
            now.threads, baseline.threads
        ));
    }
    if now.open_connections != baseline.open_connections {
        problems.push(format!(
            "tcp_open_connections: {} after the drain, {} before the traffic",
            now.open_connections, baseline.open_connections
        ));
    }
    if now.redirects != baseline.redirects {
        problems.push(format!(
            "OPEN_REDIRECTS (redirected sockets open): {} after the drain, {} before the traffic",
            now.redirects, baseline.redirects
        ));
    }
    for ((map, after), before) in MAPS.iter().zip(now.maps).zip(baseline.maps) {
        if after != before {
            problems.push(format!(
                "{map}: {after} entries after the drain, {before} before the traffic"
            ));
        }
    }
    problems
}

/// The agent runs one proxy thread per CPU (agent/src/run.rs).
pub(super) fn proxy_threads() -> usize {
    thread::available_parallelism().map_or(1, usize::from)
}

pub(super) struct Growth<'a> {
    pub(super) from: &'a Sample,
    pub(super) to: &'a Sample,
    pub(super) grew_kib: f64,
    pub(super) bound_kib: f64,
}

impl Growth<'_> {
    pub(super) fn percent(&self) -> f64 {
        self.grew_kib / self.from.rss_kib.max(1) as f64 * 100.0
    }
}

/// RSS growth from the first sample after the warm-up (3 intervals or 20 % of the run,
/// whichever is later) to the last one under load.
pub(super) fn rss_growth(
    samples: &[Sample],
    duration: Duration,
    interval: Duration,
) -> Option<Growth<'_>> {
    let warm_up = (3 * interval).max(duration / 5).as_secs_f64();
    let from = samples
        .iter()
        .find(|sample| sample.seconds >= warm_up - 0.5)
        .or(samples.first())?;
    let to = samples.last()?;
    let bound_kib = (from.rss_kib as f64 * RSS_GROWTH_FRACTION).max(RSS_GROWTH_MIB * 1024.0);
    Some(Growth {
        from,
        to,
        grew_kib: to.rss_kib as f64 - from.rss_kib as f64,
        bound_kib,
    })
}

/// Warnings and errors in the agent's log: their count and the first few distinct messages.
pub(super) struct LogScan {
    pub(super) warnings: usize,
    pub(super) errors: usize,
    pub(super) first: Vec<String>,
}

pub(super) fn scan_log(path: &Path) -> LogScan {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut scan = LogScan {
        warnings: 0,
        errors: 0,
        first: Vec::new(),
    };
    for line in text.lines() {
        let line = strip_ansi(line);
        let level = if line.contains(" WARN ") {
            &mut scan.warnings
        } else if line.contains(" ERROR ") {
            &mut scan.errors
        } else {
            continue;
        };
        *level += 1;
        // Without the timestamp, so that repeats look alike.
        let message = line
            .split_once(' ')
            .map_or(line.as_str(), |(_, rest)| rest)
            .trim()
            .to_string();
        if scan.first.len() < 5 && !scan.first.contains(&message) {
            scan.first.push(message);
        }
    }
    scan
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seconds: f64, rss_mib: u64) -> Sample {
        Sample {
            seconds,
            rss_kib: rss_mib * 1024,
            heap_bytes: None,
            fds: 80,
            pipe_fds: 1,
            threads: 8,
            open_connections: 0.0,
            redirects: 0,
            maps: [0, 0, 0, 0, 1],
            ok: 0,
            failed: 0,
        }
    }

    #[test]
    fn rss_growth_starts_after_the_warm_up() {
        let samples: Vec<Sample> = (1..=12).map(|i| sample(i as f64 * 5.0, 10 + i)).collect();
        let growth =
            rss_growth(&samples, Duration::from_secs(60), Duration::from_secs(5)).expect("samples");
        assert_eq!(growth.from.seconds, 15.0);
        assert_eq!(growth.to.seconds, 60.0);
        assert_eq!(growth.grew_kib, 9.0 * 1024.0);
        // 20 % of 13 MiB is less than the 16 MiB floor.
        assert_eq!(growth.bound_kib, 16.0 * 1024.0);
        // 10 minutes: 20 % of the run (120 s) is after 3 intervals.
        let long: Vec<Sample> = (1..=120).map(|i| sample(i as f64 * 5.0, 200)).collect();
        let growth =
            rss_growth(&long, Duration::from_secs(600), Duration::from_secs(5)).expect("samples");
        assert_eq!(growth.from.seconds, 120.0);
        assert_eq!(growth.bound_kib, 40.0 * 1024.0);
    }

    #[test]
    fn the_drain_check_names_what_grew() {
        let baseline = sample(0.0, 10);
        let mut after = sample(70.0, 12);
        after.fds += FD_TOLERANCE as usize;
        after.pipe_fds = 13;
        assert!(drain_problems(&baseline, &after).is_empty());
        after.fds += 1;
        after.threads += 1;
        after.open_connections = 1.0;
        after.redirects = 2;
        after.maps[2] = 4;
        after.pipe_fds = 2 + 2 * AGENT_MAX_IDLE_PIPES * proxy_threads();
        let problems = drain_problems(&baseline, &after).join("\n");
        for what in [
            "open fds",
            "pipe fds",
            "threads",
            "tcp_open_connections",
            "OPEN_REDIRECTS",
            "FWD_PEERS: 4 entries",
        ] {
            assert!(problems.contains(what), "{what} missing in {problems}");
        }
    }

    #[test]
    fn log_lines_lose_their_colours() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x"),
            "2026-01-01T00:00:00Z  WARN x"
        );
    }
}
