//! Tap: a live feed of what the proxy does — connections opened and closed, HTTP requests
//! answered — for the admin server's /tap stream. Publishing never waits: events go into a
//! bounded broadcast channel, a watcher that falls behind skips events (and is told so), and
//! with no watcher nothing is even built.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::metrics::{Direction, WorkloadLabels};

/// Events buffered per watcher before a slow one starts skipping.
const CAPACITY: usize = 4096;

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TapEvent {
    TcpOpen {
        ts_ms: u64,
        id: u64,
        /// `outbound` or `inbound`.
        direction: Direction,
        client: SocketAddr,
        dst: SocketAddr,
        /// `namespace` and `pod` (empty in host mode).
        #[serde(flatten)]
        workload: WorkloadLabels,
    },
    TcpClose {
        ts_ms: u64,
        id: u64,
        direction: Direction,
        #[serde(flatten)]
        workload: WorkloadLabels,
        client: SocketAddr,
        dst: SocketAddr,
        protocol: &'static str,
        bytes_to_server: u64,
        bytes_from_server: u64,
        duration_ms: f64,
        /// Empty for a clean close.
        errno: &'static str,
    },
    Http {
        ts_ms: u64,
        id: u64,
        direction: Direction,
        #[serde(flatten)]
        workload: WorkloadLabels,
        dst: SocketAddr,
        method: String,
        authority: String,
        path: String,
        status: u16,
        /// Time to response headers.
        latency_ms: f64,
        grpc_status: Option<String>,
    },
    /// This watcher fell behind and missed `skipped` events.
    Lagged { skipped: u64 },
}

impl TapEvent {
    fn dst_port(&self) -> Option<u16> {
        match self {
            Self::TcpOpen { dst, .. } | Self::TcpClose { dst, .. } | Self::Http { dst, .. } => {
                Some(dst.port())
            }
            Self::Lagged { .. } => None,
        }
    }
}

/// Milliseconds since the Unix epoch, for event timestamps.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct Tap {
    sender: broadcast::Sender<TapEvent>,
    next_id: AtomicU64,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
            next_id: AtomicU64::new(1),
        }
    }
}

impl Tap {
    /// A fresh connection id (ids tie a connection's events together).
    pub fn connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether anybody is watching: callers skip building events otherwise.
    pub fn is_watched(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    pub fn publish(&self, event: impl FnOnce() -> TapEvent) {
        if self.is_watched() {
            let _ = self.sender.send(event());
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<TapEvent> {
        self.sender.subscribe()
    }
}

/// What a watcher asked for, from the query string of /tap:
/// `port`, `authority`, `path_prefix`, `method`. Filters on HTTP fields match HTTP events only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TapFilter {
    pub port: Option<u16>,
    pub authority: Option<String>,
    pub path_prefix: Option<String>,
    pub method: Option<String>,
}

impl TapFilter {
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut filter = Self::default();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)?;
            match key {
                "port" => {
                    let port = value
                        .parse()
                        .map_err(|_| format!("port: '{value}' is not a port"))?;
                    filter.port = Some(port);
                }
                "authority" => filter.authority = Some(value.to_ascii_lowercase()),
                "path_prefix" => filter.path_prefix = Some(value),
                "method" => filter.method = Some(value.to_ascii_uppercase()),
                other => {
                    return Err(format!(
                        "unknown filter '{other}' (port, authority, path_prefix, method)"
                    ));
                }
            }
        }
        Ok(filter)
    }

    pub fn matches(&self, event: &TapEvent) -> bool {
        if let TapEvent::Lagged { .. } = event {
            return true;
        }
        if self.port.is_some() && event.dst_port() != self.port {
            return false;
        }
        let http_filtered =
            self.authority.is_some() || self.path_prefix.is_some() || self.method.is_some();
        match event {
            TapEvent::Http {
                authority,
                path,
                method,
                ..
            } => {
                self.authority
                    .as_ref()
                    .is_none_or(|wanted| authority.eq_ignore_ascii_case(wanted))
                    && self
                        .path_prefix
                        .as_ref()
                        .is_none_or(|prefix| path.starts_with(prefix.as_str()))
                    && self.method.as_ref().is_none_or(|wanted| method == wanted)
            }
            _ => !http_filtered,
        }
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                // Exactly two hex digits (from_str_radix alone would also take a sign: "+a").
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(byte.ok_or_else(|| format!("bad percent-encoding in '{text}'"))?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{text}' is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(port: u16, method: &str, authority: &str, path: &str) -> TapEvent {
        TapEvent::Http {
            ts_ms: 0,
            id: 1,
            direction: Direction::Outbound,
            workload: WorkloadLabels::default(),
            dst: SocketAddr::from(([127, 0, 0, 1], port)),
            method: method.into(),
            authority: authority.into(),
            path: path.into(),
            status: 200,
            latency_ms: 1.0,
            grpc_status: None,
        }
    }

    fn open(port: u16) -> TapEvent {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        TapEvent::TcpOpen {
            ts_ms: 0,
            id: 1,
            direction: Direction::Outbound,
            client: addr,
            dst: addr,
            workload: WorkloadLabels::default(),
        }
    }

    #[test]
    fn parses_filters() {
        let filter =
            TapFilter::parse("port=8080&authority=API.test&path_prefix=%2Fv1%2F&method=get")
                .unwrap();
        assert_eq!(filter.port, Some(8080));
        assert_eq!(filter.authority.as_deref(), Some("api.test"));
        assert_eq!(filter.path_prefix.as_deref(), Some("/v1/"));
        assert_eq!(filter.method.as_deref(), Some("GET"));
        assert_eq!(TapFilter::parse("").unwrap(), TapFilter::default());
    }

    #[test]
    fn rejects_bad_filters() {
        assert!(TapFilter::parse("port=99999").is_err());
        assert!(TapFilter::parse("colour=red").is_err());
        assert!(TapFilter::parse("path_prefix=%zz").is_err());
    }

    #[test]
    fn filters_match() {
        let everything = TapFilter::default();
        assert!(everything.matches(&open(80)) && everything.matches(&http(80, "GET", "a", "/")));
        let port = TapFilter::parse("port=80").unwrap();
        assert!(port.matches(&open(80)) && !port.matches(&open(81)));
        let path = TapFilter::parse("path_prefix=/api&method=POST").unwrap();
        assert!(path.matches(&http(80, "POST", "a", "/api/x")));
        assert!(!path.matches(&http(80, "GET", "a", "/api/x")));
        assert!(!path.matches(&http(80, "POST", "a", "/other")));
        assert!(
            !path.matches(&open(80)),
            "HTTP filters leave TCP events out"
        );
        let authority = TapFilter::parse("authority=a.test").unwrap();
        assert!(authority.matches(&http(80, "GET", "A.test", "/")));
        assert!(!authority.matches(&http(80, "GET", "b.test", "/")));
    }

    #[test]
    fn percent_escapes_are_two_hex_digits() {
        assert_eq!(percent_decode("%2Fv1+x").unwrap(), "/v1 x");
        for bad in ["%+a", "%-1", "%2", "%zz", "%"] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn events_serialize_as_tagged_json() {
        let json = serde_json::to_string(&open(80)).unwrap();
        assert!(json.starts_with(r#"{"type":"tcp_open""#), "{json}");
    }

    #[test]
    fn unwatched_tap_builds_nothing() {
        let tap = Tap::default();
        tap.publish(|| panic!("built an event nobody watches"));
        let mut watcher = tap.subscribe();
        tap.publish(|| open(80));
        assert_eq!(watcher.try_recv().unwrap(), open(80));
    }
}
