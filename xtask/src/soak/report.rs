//! What the soak writes: target/soak/samples.csv and target/soak/summary.md.

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Duration};

use super::{
    FD_TOLERANCE, KINDS, MAPS, RSS_GROWTH_FRACTION, RSS_GROWTH_MIB, Tally,
    sample::{Sample, metric_by_label, metric_sum, mib},
    verdict::{Growth, LogScan, proxy_threads},
};

pub(super) fn csv(baseline: &Sample, samples: &[Sample], drained: &Sample) -> String {
    let mut csv = String::from(
        "phase,seconds,rss_kib,heap_bytes,fds,pipe_fds,threads,open_connections,open_redirects",
    );
    for map in MAPS {
        let _ = write!(csv, ",{map}");
    }
    csv.push_str(",ok,failed\n");
    let phases = std::iter::once(("baseline", baseline))
        .chain(samples.iter().map(|sample| ("load", sample)))
        .chain(std::iter::once(("drained", drained)));
    for (phase, s) in phases {
        let _ = write!(
            csv,
            "{phase},{:.1},{},{},{},{},{},{},{}",
            s.seconds,
            s.rss_kib,
            s.heap_bytes.map_or(String::new(), |h| h.to_string()),
            s.fds,
            s.pipe_fds,
            s.threads,
            s.open_connections,
            s.redirects
        );
        for count in s.maps {
            let _ = write!(csv, ",{count}");
        }
        let _ = writeln!(csv, ",{},{}", s.ok, s.failed);
    }
    csv
}

pub(super) struct Summary<'a> {
    pub(super) minutes: u64,
    pub(super) interval: Duration,
    pub(super) traffic_seconds: f64,
    pub(super) drain_seconds: f64,
    pub(super) baseline: &'a Sample,
    pub(super) samples: &'a [Sample],
    pub(super) drained: &'a Sample,
    pub(super) growth: Option<&'a Growth<'a>>,
    pub(super) tallies: &'a [Tally],
    pub(super) metrics: &'a str,
    pub(super) log: &'a LogScan,
    pub(super) problems: &'a [String],
}

impl Summary<'_> {
    pub(super) fn markdown(&self, root: &Path) -> String {
        let mut md = String::new();
        let commit = Command::new("git")
            .current_dir(root)
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .unwrap_or_default();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let _ = writeln!(
            md,
            "### Soak: {} min of mixed traffic, a sample every {} s\n\n\
             Release agent (`--copy-mode sockmap`, the default), commit {commit}, kernel {}, \
             {} CPUs. Traffic ran {:.0} s; the agent drained in {:.1} s.\n",
            self.minutes,
            self.interval.as_secs(),
            kernel.trim(),
            proxy_threads(),
            self.traffic_seconds,
            self.drain_seconds
        );
        let peak = |f: &dyn Fn(&Sample) -> f64| self.samples.iter().map(f).fold(f64::NAN, f64::max);
        let (from, to) = match self.growth {
            Some(growth) => (Some(growth.from), Some(growth.to)),
            None => (None, None),
        };
        let at = |sample: Option<&Sample>| {
            sample.map_or("-".to_string(), |s| format!("{:.0}s", s.seconds))
        };
        let _ = writeln!(
            md,
            "| agent | before traffic | after warm-up ({}) | last under load ({}) | peak under load | after drain |",
            at(from),
            at(to)
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: |");
        type Column<'a> = (&'a str, Box<dyn Fn(&Sample) -> f64 + 'a>, usize);
        let mut rows: Vec<Column> = vec![
            ("RSS (MiB)", Box::new(|s: &Sample| mib(s.rss_kib * 1024)), 1),
            (
                "heap in use (MiB)",
                Box::new(|s: &Sample| s.heap_bytes.map_or(f64::NAN, mib)),
                1,
            ),
            (
                "open fds, pipes excluded",
                Box::new(|s: &Sample| s.fds as f64),
                0,
            ),
            (
                "pipe fds (in use + pooled)",
                Box::new(|s: &Sample| s.pipe_fds as f64),
                0,
            ),
            ("threads", Box::new(|s: &Sample| s.threads as f64), 0),
            (
                "tcp_open_connections",
                Box::new(|s: &Sample| s.open_connections),
                0,
            ),
            (
                "OPEN_REDIRECTS (redirected sockets open)",
                Box::new(|s: &Sample| s.redirects as f64),
                0,
            ),
        ];
        for (i, map) in MAPS.iter().enumerate() {
            rows.push((map, Box::new(move |s: &Sample| s.maps[i] as f64), 0));
        }
        for (name, value, decimals) in &rows {
            let cell = |v: f64| {
                if v.is_nan() {
                    "-".to_string()
                } else {
                    format!("{v:.decimals$}")
                }
            };
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {} |",
                cell(value(self.baseline)),
                from.map_or("-".to_string(), |s| cell(value(s))),
                to.map_or("-".to_string(), |s| cell(value(s))),
                cell(peak(value.as_ref())),
                cell(value(self.drained))
            );
        }
        if let Some(growth) = self.growth {
            let _ = writeln!(
                md,
                "\nRSS under load: {:+.1} MiB ({:+.1} %) from {:.0}s to {:.0}s; the bound is {:.1} MiB \
                 (max of {:.0} % and {RSS_GROWTH_MIB:.0} MiB).",
                growth.grew_kib / 1024.0,
                growth.percent(),
                growth.from.seconds,
                growth.to.seconds,
                growth.bound_kib / 1024.0,
                RSS_GROWTH_FRACTION * 100.0
            );
        }
        let _ = writeln!(md, "\n| traffic | what | ok | failed |");
        let _ = writeln!(md, "| --- | --- | ---: | ---: |");
        for (kind, tally) in KINDS.iter().zip(self.tallies) {
            let (ok, failed) = tally.counts();
            let _ = writeln!(md, "| {} | {} | {ok} | {failed} |", kind.name, kind.what);
        }
        for (kind, tally) in KINDS.iter().zip(self.tallies) {
            for why in tally.excused() {
                let _ = writeln!(md, "\nNot counted as failures ({}): {why}", kind.name);
            }
        }
        let sum = |name: &str| metric_sum(self.metrics, name).unwrap_or(0.0);
        let by = |name: &str, label: &str| {
            let by = metric_by_label(self.metrics, name, label);
            if by.is_empty() {
                return "none".to_string();
            }
            by.iter()
                .map(|(value, n)| {
                    let value = if value.is_empty() { "clean" } else { value };
                    format!("{value} {n}")
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let proxied = sum("tcp_open_total");
        let _ = writeln!(
            md,
            "\nThe agent proxied {proxied:.0} connections ({:.0} requests at the HTTP level). \
             Closes: {}. Opaque forwarding: {}. Detection: {}. Upstream connect errors: {:.0}; \
             accept errors: {:.0}; HTTP errors the agent answered itself: {}.",
            sum("request_total"),
            by("tcp_close_total", "errno"),
            by("sockmesh_opaque_connections_total", "mode"),
            by("tcp_detect_total", "result"),
            sum("tcp_connect_errors_total"),
            sum("sockmesh_accept_errors_total"),
            by("sockmesh_http_errors_total", "reason"),
        );
        if let Some(growth) = self.growth
            && proxied > 0.0
        {
            let _ = writeln!(
                md,
                "\nA leak of more than {:.0} bytes per proxied connection would have broken the RSS bound.",
                growth.bound_kib * 1024.0 / proxied
            );
        }
        let _ = writeln!(
            md,
            "\nAgent log (`--log-level warn`): {} warnings, {} errors.",
            self.log.warnings, self.log.errors
        );
        for message in &self.log.first {
            let _ = writeln!(md, "- `{message}`");
        }
        if self.problems.is_empty() {
            let _ = writeln!(
                md,
                "\n**Verdict: pass.** Every traffic kind succeeded; after the drain, fds (±{FD_TOLERANCE}), \
                 threads, open connections and map entries are back at their baseline; RSS stayed within its bound."
            );
        } else {
            let _ = writeln!(md, "\n**Verdict: FAIL.**");
            for problem in self.problems {
                let _ = writeln!(md, "- {problem}");
            }
        }
        md
    }
}
