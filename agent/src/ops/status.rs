//! `sockmesh status`: a table per destination port, like `linkerd viz stat`: connections,
//! bytes, protocol, requests, request rate, success rate and latency percentiles, computed from
//! two scrapes of /metrics `--interval` apart.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::SocketAddr,
    time::Duration,
};

use anyhow::Result;

use super::get_text;

pub fn run(admin: SocketAddr, interval: Duration) -> Result<()> {
    let before = Samples::parse(&get_text(admin, "/metrics")?);
    let after = if interval.is_zero() {
        None
    } else {
        // A synchronous command with nothing else to do between its two scrapes.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(interval);
        Some(Samples::parse(&get_text(admin, "/metrics")?))
    };
    print!("{}", render(&before, after.as_ref(), interval));
    Ok(())
}

/// One row per destination port: the latest scrape, and rates against the earlier one.
pub fn render(first: &Samples, second: Option<&Samples>, interval: Duration) -> String {
    let latest = second.unwrap_or(first);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<7} {:<22} {:>5} {:>7} {:>11} {:>11} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "PORT",
        "PROTOCOL",
        "OPEN",
        "CONNS",
        "BYTES_OUT",
        "BYTES_IN",
        "REQUESTS",
        "RPS",
        "SUCCESS",
        "P50_MS",
        "P95_MS",
        "P99_MS"
    );
    for port in latest.ports() {
        let on_port = [("target_port", port.as_str())];
        let requests = latest.sum("request_total", &on_port);
        let rps = second.map(|_| {
            let delta = requests - first.sum("request_total", &on_port);
            format!("{:.1}", delta / interval.as_secs_f64().max(f64::EPSILON))
        });
        let responses = latest.sum("response_total", &on_port);
        let success = (responses > 0.0).then(|| {
            let ok = latest.sum(
                "response_total",
                &[on_port[0], ("classification", "success")],
            );
            format!("{:.2}%", 100.0 * ok / responses)
        });
        let latency = |q: f64| {
            latest
                .quantile("response_latency_ms", &on_port, q)
                .map(|ms| format!("{ms:.1}"))
        };
        let dash = || "-".to_string();
        let _ = writeln!(
            out,
            "{:<7} {:<22} {:>5} {:>7} {:>11} {:>11} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8}",
            port,
            latest.protocols(&port),
            latest.sum("tcp_open_connections", &on_port),
            latest.sum("tcp_open_total", &on_port),
            latest.sum("tcp_write_bytes_total", &on_port),
            latest.sum("tcp_read_bytes_total", &on_port),
            requests,
            rps.unwrap_or_else(dash),
            success.unwrap_or_else(dash),
            latency(0.5).unwrap_or_else(dash),
            latency(0.95).unwrap_or_else(dash),
            latency(0.99).unwrap_or_else(dash),
        );
    }
    out
}

/// Samples of one scrape of the text exposition.
pub struct Samples(Vec<(String, BTreeMap<String, String>, f64)>);

impl Samples {
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|line| !line.starts_with('#'))
                .filter_map(parse_sample)
                .collect(),
        )
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a (String, BTreeMap<String, String>, f64)> {
        self.0.iter().filter(move |(sample, sample_labels, _)| {
            sample == name
                && labels
                    .iter()
                    .all(|(k, v)| sample_labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels)
            .fold(0.0, |sum, (_, _, value)| sum + value)
    }

    /// Destination ports with any TCP connection, in numeric order.
    fn ports(&self) -> Vec<String> {
        let mut ports: Vec<(u16, String)> = self
            .matching("tcp_open_total", &[])
            .filter_map(|(_, labels, _)| labels.get("target_port").cloned())
            .filter_map(|port| Some((port.parse().ok()?, port)))
            .collect();
        ports.sort();
        ports.dedup();
        ports.into_iter().map(|(_, port)| port).collect()
    }

    /// Detection results seen on a port, e.g. "http1" or "opaque_port".
    fn protocols(&self, port: &str) -> String {
        let on_port = [("target_port", port)];
        let results: BTreeSet<&str> = self
            .matching("tcp_detect_total", &on_port)
            .filter(|(_, _, value)| *value > 0.0)
            .filter_map(|(_, labels, _)| labels.get("result").map(String::as_str))
            .collect();
        if results.is_empty() {
            "-".to_string()
        } else {
            results.into_iter().collect::<Vec<_>>().join(",")
        }
    }

    /// The q-quantile of a histogram summed over every series matching `labels`, interpolating
    /// linearly inside the bucket, as Prometheus' histogram_quantile does.
    pub fn quantile(&self, histogram: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
        let bucket_name = format!("{histogram}_bucket");
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new(); // le bits -> (le, count)
        for (_, sample_labels, value) in self.matching(&bucket_name, labels) {
            let le = match sample_labels.get("le").map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(le) => le.parse().ok()?,
                None => continue,
            };
            buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += value;
        }
        let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = sorted.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower_le, mut lower_count) = (0.0, 0.0);
        for (le, count) in sorted {
            if count >= rank {
                if le.is_infinite() {
                    return Some(lower_le);
                }
                let in_bucket = count - lower_count;
                let fraction = if in_bucket > 0.0 {
                    (rank - lower_count) / in_bucket
                } else {
                    1.0
                };
                return Some(lower_le + (le - lower_le) * fraction);
            }
            (lower_le, lower_count) = (le, count);
        }
        None
    }
}

fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let (series, value) = line.trim().rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series.to_string(), BTreeMap::new(), value));
    };
    let labels = rest
        .strip_suffix('}')?
        .split("\",")
        .filter_map(|pair| {
            let (key, value) = pair.split_once("=\"")?;
            Some((
                key.trim().to_string(),
                value.trim_end_matches('"').to_string(),
            ))
        })
        .collect();
    Some((name.to_string(), labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "\
# TYPE tcp_open counter
tcp_open_total{direction=\"outbound\",target_port=\"8080\"} 3
tcp_open_connections{direction=\"outbound\",target_port=\"8080\"} 1
tcp_write_bytes_total{direction=\"outbound\",target_port=\"8080\"} 1000
tcp_read_bytes_total{direction=\"outbound\",target_port=\"8080\"} 5000
tcp_detect_total{direction=\"outbound\",target_port=\"8080\",result=\"http1\"} 3
tcp_open_total{direction=\"outbound\",target_port=\"6379\"} 2
tcp_detect_total{direction=\"outbound\",target_port=\"6379\",result=\"opaque_port\"} 2
request_total{direction=\"outbound\",target_port=\"8080\",authority=\"a\"} 10
response_total{direction=\"outbound\",target_port=\"8080\",authority=\"a\",status_code=\"200\",classification=\"success\",grpc_status=\"\"} 9
response_total{direction=\"outbound\",target_port=\"8080\",authority=\"a\",status_code=\"503\",classification=\"failure\",grpc_status=\"\"} 1
response_latency_ms_bucket{direction=\"outbound\",target_port=\"8080\",authority=\"a\",status_code=\"200\",le=\"1.0\"} 5
response_latency_ms_bucket{direction=\"outbound\",target_port=\"8080\",authority=\"a\",status_code=\"200\",le=\"2.0\"} 9
response_latency_ms_bucket{direction=\"outbound\",target_port=\"8080\",authority=\"a\",status_code=\"200\",le=\"+Inf\"} 9
response_latency_ms_bucket{direction=\"outbound\",target_port=\"8080\",authority=\"a\",status_code=\"503\",le=\"1.0\"} 0
response_latency_ms_bucket{direction=\"outbound\",target_port=\"8080\",authority=\"a\",status_code=\"503\",le=\"2.0\"} 0
response_latency_ms_bucket{direction=\"outbound\",target_port=\"8080\",authority=\"a\",status_code=\"503\",le=\"+Inf\"} 1
# EOF
";

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let samples = Samples::parse(SCRAPE);
        let port = [("target_port", "8080")];
        assert_eq!(
            samples.quantile("response_latency_ms", &port, 0.5),
            Some(1.0)
        );
        assert_eq!(
            samples.quantile("response_latency_ms", &port, 0.7),
            Some(1.5)
        );
        // The 99th percentile lands in +Inf: reported as the largest finite bound.
        assert_eq!(
            samples.quantile("response_latency_ms", &port, 0.99),
            Some(2.0)
        );
        assert_eq!(
            samples.quantile("response_latency_ms", &[("target_port", "1")], 0.5),
            None
        );
    }

    #[test]
    fn renders_one_row_per_port() {
        let samples = Samples::parse(SCRAPE);
        let table = render(&samples, None, Duration::ZERO);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let row_6379: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(row_6379[..4], ["6379", "opaque_port", "0", "2"]);
        let row_8080: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            row_8080[..8],
            ["8080", "http1", "1", "3", "1000", "5000", "10", "-"]
        );
        assert_eq!(row_8080[8], "90.00%");
    }

    #[test]
    fn rates_come_from_two_scrapes() {
        let first = Samples::parse(SCRAPE);
        let second = Samples::parse(&SCRAPE.replace("authority=\"a\"} 10", "authority=\"a\"} 30"));
        let table = render(&first, Some(&second), Duration::from_secs(2));
        assert!(
            table.lines().nth(2).unwrap().split_whitespace().nth(7) == Some("10.0"),
            "{table}"
        );
    }
}
