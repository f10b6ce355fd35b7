//! `sockmesh tap`: follow the agent's /tap stream, one readable line per event (or the raw
//! JSON with `--output json`).

use std::{io::BufRead, net::SocketAddr};

use anyhow::Result;
use serde_json::Value;

use super::get;

#[derive(Debug, Default)]
pub struct TapRequest {
    pub port: Option<u16>,
    pub authority: Option<String>,
    pub path_prefix: Option<String>,
    pub method: Option<String>,
    pub json: bool,
    /// Stop after this many events (0: follow until interrupted).
    pub max_events: u64,
}

impl TapRequest {
    /// The /tap path with its filters as query parameters.
    pub fn path(&self) -> String {
        let mut query = Vec::new();
        if let Some(port) = self.port {
            query.push(format!("port={port}"));
        }
        for (key, value) in [
            ("authority", &self.authority),
            ("path_prefix", &self.path_prefix),
            ("method", &self.method),
        ] {
            if let Some(value) = value {
                query.push(format!("{key}={}", percent_encode(value)));
            }
        }
        if query.is_empty() {
            "/tap".to_string()
        } else {
            format!("/tap?{}", query.join("&"))
        }
    }
}

pub fn run(admin: SocketAddr, request: &TapRequest) -> Result<()> {
    let reader = get(admin, &request.path(), None)?;
    let mut seen = 0;
    for line in reader.lines() {
        let line = line?;
        if request.json {
            println!("{line}");
        } else {
            println!("{}", describe(&line));
        }
        seen += 1;
        if request.max_events > 0 && seen >= request.max_events {
            break;
        }
    }
    Ok(())
}

/// One readable line for one JSON event.
pub fn describe(line: &str) -> String {
    let Ok(event) = serde_json::from_str::<Value>(line) else {
        return line.to_string();
    };
    let field = |name: &str| match &event[name] {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let time = clock(event["ts_ms"].as_u64().unwrap_or(0));
    match event["type"].as_str().unwrap_or("") {
        "tcp_open" => format!(
            "{time} open  #{} {} -> {}",
            field("id"),
            field("client"),
            field("dst")
        ),
        "tcp_close" => format!(
            "{time} close #{} {} -> {} {} out={}B in={}B {:.1}ms{}",
            field("id"),
            field("client"),
            field("dst"),
            field("protocol"),
            field("bytes_to_server"),
            field("bytes_from_server"),
            event["duration_ms"].as_f64().unwrap_or(0.0),
            match field("errno").as_str() {
                "" => String::new(),
                errno => format!(" {errno}"),
            }
        ),
        "http" => format!(
            "{time} http  #{} {} {}{} -> {} {:.1}ms{}",
            field("id"),
            field("method"),
            field("authority"),
            field("path"),
            field("status"),
            event["latency_ms"].as_f64().unwrap_or(0.0),
            match &event["grpc_status"] {
                Value::String(code) => format!(" grpc-status={code}"),
                _ => String::new(),
            }
        ),
        "lagged" => format!("(tap fell behind: {} events skipped)", field("skipped")),
        _ => line.to_string(),
    }
}

/// HH:MM:SS.mmm (UTC) of a Unix millisecond timestamp.
fn clock(ts_ms: u64) -> String {
    let of_day = ts_ms % 86_400_000;
    let (h, m, s, ms) = (
        of_day / 3_600_000,
        of_day / 60_000 % 60,
        of_day / 1000 % 60,
        of_day % 1000,
    );
    format!("{h:02}:{m:02}:{s:02}.{ms:03}")
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_tap_path() {
        assert_eq!(TapRequest::default().path(), "/tap");
        let request = TapRequest {
            port: Some(8080),
            path_prefix: Some("/a b".into()),
            method: Some("GET".into()),
            ..TapRequest::default()
        };
        assert_eq!(
            request.path(),
            "/tap?port=8080&path_prefix=/a%20b&method=GET"
        );
    }

    #[test]
    fn describes_events() {
        let http = r#"{"type":"http","ts_ms":3723004,"id":7,"dst":"127.0.0.1:80","method":"GET","authority":"a.test","path":"/x","status":200,"latency_ms":1.25,"grpc_status":null}"#;
        assert_eq!(
            describe(http),
            "01:02:03.004 http  #7 GET a.test/x -> 200 1.2ms"
        );
        let close = r#"{"type":"tcp_close","ts_ms":0,"id":7,"client":"c","dst":"d","protocol":"opaque","bytes_to_server":5,"bytes_from_server":6,"duration_ms":2.0,"errno":""}"#;
        assert_eq!(
            describe(close),
            "00:00:00.000 close #7 c -> d opaque out=5B in=6B 2.0ms"
        );
        assert_eq!(describe("not json"), "not json");
    }
}
