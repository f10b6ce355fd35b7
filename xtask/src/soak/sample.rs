//! Looking at the agent: its resources, its BPF maps and its metrics.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use super::{MAPS, Tally};
use crate::bench::env::Agent;

/// One look at the agent.
#[derive(Clone)]
pub(super) struct Sample {
    pub(super) seconds: f64,
    pub(super) rss_kib: u64,
    pub(super) heap_bytes: Option<u64>,
    /// Open descriptors other than pipes (sockets, epoll, eventfds, BPF objects, ...).
    pub(super) fds: usize,
    pub(super) pipe_fds: usize,
    pub(super) threads: u64,
    pub(super) open_connections: f64,
    /// OPEN_REDIRECTS slot 0.
    pub(super) redirects: u64,
    pub(super) maps: [usize; MAPS.len()],
    /// Operations so far, over every traffic kind.
    pub(super) ok: u64,
    pub(super) failed: u64,
}

impl Sample {
    pub(super) fn take(agent: &Agent, seconds: f64, tallies: &[Tally]) -> Result<Self> {
        let status = fs::read_to_string(format!("/proc/{}/status", agent.pid))
            .context("the agent is gone")?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        let (mut fds, mut pipe_fds) = (0, 0);
        for entry in fs::read_dir(format!("/proc/{}/fd", agent.pid))?.flatten() {
            match fs::read_link(entry.path()) {
                Ok(target) if target.to_string_lossy().starts_with("pipe:") => pipe_fds += 1,
                Ok(_) => fds += 1,
                // Closed between the listing and the look.
                Err(_) => {}
            }
        }
        let metrics = agent.metrics()?;
        let mut maps = [0; MAPS.len()];
        for (count, map) in maps.iter_mut().zip(MAPS) {
            *count = map_dump(&agent.pin_dir.join(map))?.len();
        }
        let (ok, failed) = tallies.iter().fold((0, 0), |(ok, failed), tally| {
            let (o, f) = tally.counts();
            (ok + o, failed + f)
        });
        Ok(Self {
            seconds,
            rss_kib: field("VmRSS:"),
            heap_bytes: metric_sum(&metrics, "sockmesh_heap_in_use_bytes").map(|v| v as u64),
            fds,
            pipe_fds,
            threads: field("Threads:"),
            open_connections: metric_sum(&metrics, "tcp_open_connections").unwrap_or(0.0),
            redirects: open_redirects(&agent.pin_dir)?,
            maps,
            ok,
            failed,
        })
    }

    pub(super) fn header() -> String {
        let mut line = format!(
            "{:>7} {:>8} {:>8} {:>5} {:>5} {:>4} {:>5} {:>9}",
            "time", "rss_MiB", "heap_MiB", "fds", "pipes", "thr", "open", "redirects"
        );
        for map in MAPS {
            let _ = write!(line, " {map:>14}");
        }
        line.push_str(&format!(" {:>10} {:>6}", "ok", "failed"));
        line
    }

    pub(super) fn line(&self, label: &str) -> String {
        let mut line = format!(
            "{:>7} {:>8.1} {:>8} {:>5} {:>5} {:>4} {:>5} {:>9}",
            label,
            mib(self.rss_kib * 1024),
            self.heap_bytes
                .map_or("-".to_string(), |heap| format!("{:.1}", mib(heap))),
            self.fds,
            self.pipe_fds,
            self.threads,
            self.open_connections,
            self.redirects,
        );
        for count in self.maps {
            let _ = write!(line, " {count:>14}");
        }
        line.push_str(&format!(" {:>10} {:>6}", self.ok, self.failed));
        line
    }
}

pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The entries of a pinned map, as `bpftool -j map dump` lists them. (JSON: without BTF
/// values, as a sockhash has, the plain dump prints `key:` lines, not `"key":`.)
fn map_dump(pinned: &Path) -> Result<Vec<serde_json::Value>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pinned)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map dump pinned {}: {}",
            pinned.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool map dump pinned {}: not JSON", pinned.display()))
}

/// OPEN_REDIRECTS slot 0 (agent-common's OPEN_REDIRECTS_SLOT): redirected client sockets still
/// open, as connect4/6 and sockops count them.
fn open_redirects(pin_dir: &Path) -> Result<u64> {
    map_dump(&pin_dir.join("OPEN_REDIRECTS"))?
        .iter()
        .find(|entry| entry["formatted"]["key"].as_u64() == Some(0))
        .and_then(|entry| entry["formatted"]["value"].as_u64())
        .context("OPEN_REDIRECTS has no slot 0")
}

/// The sum of every sample of metric `name` (any labels); None if there is none.
pub(super) fn metric_sum(metrics: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(value) = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

/// Samples of metric `name` summed by the value of its label `label`.
pub(super) fn metric_by_label(metrics: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut by = BTreeMap::new();
    let key = format!("{label}=\"");
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(labels) = rest.strip_prefix('{') else {
            continue;
        };
        let value = labels
            .split_once(&key)
            .and_then(|(_, after)| after.split_once('"'))
            .map_or("", |(value, _)| value);
        if let Some(number) = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            *by.entry(value.to_string()).or_insert(0.0) += number;
        }
    }
    by
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# TYPE tcp_open_connections gauge\n\
        tcp_open_connections{direction=\"outbound\",target_port=\"80\"} 3\n\
        tcp_open_connections{direction=\"inbound\",target_port=\"81\"} 2\n\
        tcp_open_connections_other 100\n\
        tcp_close_total{direction=\"outbound\",target_port=\"80\",errno=\"\"} 7\n\
        tcp_close_total{direction=\"outbound\",target_port=\"81\",errno=\"ECONNRESET\"} 2\n\
        tcp_close_total{direction=\"inbound\",target_port=\"81\",errno=\"\"} 1\n\
        sockmesh_heap_in_use_bytes 1048576\n";

    #[test]
    fn metrics_are_summed_over_labels_and_by_label() {
        assert_eq!(metric_sum(METRICS, "tcp_open_connections"), Some(5.0));
        assert_eq!(
            metric_sum(METRICS, "sockmesh_heap_in_use_bytes"),
            Some(1048576.0)
        );
        assert_eq!(metric_sum(METRICS, "tcp_open_total"), None);
        let closes = metric_by_label(METRICS, "tcp_close_total", "errno");
        assert_eq!(closes.get(""), Some(&8.0));
        assert_eq!(closes.get("ECONNRESET"), Some(&2.0));
    }
}
