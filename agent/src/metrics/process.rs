//! Process metrics with the standard Prometheus names, read from /proc at scrape time:
//! CPU seconds, resident and virtual memory, open and maximum file descriptors, start time;
//! and the heap in use, which shows what connections cost better than resident memory does.

use std::fmt;

use crate::sys;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

#[derive(Debug)]
pub struct ProcessCollector;

/// The fields of /proc/self/stat we report.
#[derive(Debug, Default, PartialEq)]
struct Stat {
    cpu_seconds: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
    start_time_seconds: f64,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (ticks, page) = sys::clock_ticks_and_page_size();
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s))
            .unwrap_or(0);
        if let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| parse_stat(&text, ticks as f64, page as u64, boot_time))
        {
            counter(
                &mut encoder,
                "process_cpu_seconds",
                "User and system CPU time",
                stat.cpu_seconds,
            )?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory",
                stat.resident_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory",
                stat.virtual_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time, Unix seconds",
                stat.start_time_seconds,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                fds.count() as f64,
            )?;
        }
        #[cfg(target_env = "gnu")]
        gauge(
            &mut encoder,
            "sockmesh_heap_in_use_bytes",
            "Heap bytes allocated and not freed (glibc mallinfo2); unlike resident memory, \
             it falls when connections close",
            sys::heap_in_use_bytes() as f64,
        )?;
        if let Ok((soft, _)) = sys::open_file_limit() {
            gauge(
                &mut encoder,
                "process_max_fds",
                "File descriptor limit",
                soft as f64,
            )?;
        }
        Ok(())
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// /proc/self/stat: fields after the parenthesised command name (which may hold spaces).
/// utime 14, stime 15, starttime 22, vsize 23, rss 24 (1-based, as in proc(5)).
fn parse_stat(text: &str, ticks_per_second: f64, page_size: u64, boot_time: u64) -> Option<Stat> {
    let after_comm = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // after_comm starts at field 3 (state).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = ticks_per_second.max(1.0);
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page_size,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
    })
}

fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_spaces_in_the_name() {
        let line = "42 (sock mesh) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 \
                    123456 300 18446744073709551615";
        let stat = parse_stat(line, 100.0, 4096, 1_700_000_000).unwrap();
        assert_eq!(stat.cpu_seconds, 3.0);
        assert_eq!(stat.virtual_bytes, 123_456);
        assert_eq!(stat.resident_bytes, 300 * 4096);
        assert_eq!(stat.start_time_seconds, 1_700_000_010.0);
    }

    #[test]
    fn malformed_stat_is_skipped() {
        assert_eq!(parse_stat("garbage", 100.0, 4096, 0), None);
        assert_eq!(parse_stat("1 (x) S 2", 100.0, 4096, 0), None);
    }

    #[test]
    fn finds_boot_time() {
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1700000000\nprocesses 5"),
            Some(1_700_000_000)
        );
    }
}
