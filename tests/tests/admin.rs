//! What operators see: /metrics and `sockmesh status` after known traffic, /tap and
//! `sockmesh tap` while traffic flows, a slow tap watcher that must not slow the proxy, the
//! admin port under user skip lists, /config.json, /shutdown, `sockmesh check`, and a real
//! Prometheus server scraping the agent.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{
    Agent, AgentOptions, TestCgroup,
    agent::http_post,
    clients::{curl_status, probe},
    free_port,
    process::{eventually, run, run_ok},
    require_privileged,
    servers::{EchoServer, PatternServer, ServerProcess},
    sockmesh_bin, temp_dir,
};

const LIMIT: Duration = Duration::from_secs(120);

fn curl_statuses(cgroup: &TestCgroup, base: &str, statuses: &[u16]) {
    let mut curl = cgroup.command("curl");
    curl.arg("-sS");
    for status in statuses {
        curl.args(["-o", "/dev/null", &format!("{base}/status/{status}")]);
    }
    run_ok(&mut curl, LIMIT);
}

/// The row of `sockmesh status` for `port`, split into columns.
fn status_row(agent: &Agent, port: u16) -> Vec<String> {
    let table = run_ok(
        Command::new(sockmesh_bin()).args([
            "status",
            "--interval",
            "0s",
            "--admin-addr",
            &agent.admin.to_string(),
        ]),
        LIMIT,
    );
    let row = table
        .lines()
        .find(|line| line.split_whitespace().next() == Some(port.to_string().as_str()))
        .unwrap_or_else(|| panic!("no row for port {port}:\n{table}"));
    row.split_whitespace().map(str::to_string).collect()
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn metrics_and_status_report_known_traffic() {
    require_privileged!();
    let http = ServerProcess::peer("http_peer.py", &[]);
    let opaque = PatternServer::start("127.0.0.1:0", 77_777);
    let cgroup = TestCgroup::new("status");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec![format!("--opaque-ports={}", opaque.addr().port())],
            ..AgentOptions::default()
        },
    );

    // 10 requests on one connection: 6 x 200, 3 x 503, 1 x 404.
    let base = format!("http://{}", http.addr);
    curl_statuses(
        &cgroup,
        &base,
        &[200, 200, 503, 200, 404, 200, 503, 200, 503, 200],
    );
    // 123456 bytes out, 77777 back, opaque.
    probe(
        &cgroup,
        &["bulk", &opaque.addr().to_string(), "123456", "77777"],
        LIMIT,
    );

    let http_port = http.addr.port().to_string();
    let on_http = ("target_port", http_port.as_str());
    agent.assert_metric("request_total", &[on_http], 10);
    agent.assert_metric(
        "response_total",
        &[
            on_http,
            ("status_code", "200"),
            ("classification", "success"),
        ],
        6,
    );
    agent.assert_metric(
        "response_total",
        &[
            on_http,
            ("status_code", "503"),
            ("classification", "failure"),
        ],
        3,
    );
    agent.assert_metric(
        "response_total",
        &[
            on_http,
            ("status_code", "404"),
            ("classification", "success"),
        ],
        1,
    );
    agent.assert_metric("response_latency_ms_count", &[on_http], 10);
    let opaque_port = opaque.addr().port().to_string();
    let on_opaque = ("target_port", opaque_port.as_str());
    agent.assert_metric("tcp_write_bytes_total", &[on_opaque], 123_456);
    agent.assert_metric("tcp_read_bytes_total", &[on_opaque], 77_777);
    agent.assert_metric("tcp_close_total", &[on_opaque, ("errno", "")], 1);
    assert!(agent.metrics().count("process_open_fds", &[]) > 0);
    assert!(agent.metrics().value("process_resident_memory_bytes", &[]) > 0.0);

    // PORT PROTOCOL OPEN CONNS BYTES_OUT BYTES_IN REQUESTS RPS SUCCESS P50 P95 P99
    let http_row = status_row(&agent, http.addr.port());
    assert_eq!(http_row[1], "http1");
    assert_eq!(http_row[3], "1", "one keep-alive connection");
    assert_eq!(http_row[6], "10");
    assert_eq!(http_row[8], "70.00%");
    let opaque_row = status_row(&agent, opaque.addr().port());
    assert_eq!(
        opaque_row[1..7],
        ["opaque_port", "0", "1", "123456", "77777", "0"]
    );
}

/// Starts `sockmesh tap` in the background; its stdout lines arrive on the returned channel.
fn start_tap(
    agent: &Agent,
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(sockmesh_bin())
        .args(["tap", "--admin-addr", &agent.admin.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting sockmesh tap");
    let stdout = child.stdout.take().expect("tap stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn tap_shows_requests_made_while_watching_with_filters() {
    require_privileged!();
    let http = ServerProcess::peer("http_peer.py", &[]);
    let cgroup = TestCgroup::new("tap");
    let agent = Agent::start(&cgroup);
    let base = format!("http://{}", http.addr);
    let port = http.addr.port().to_string();

    let (mut json_tap, json_lines) = start_tap(
        &agent,
        &[
            "--output",
            "json",
            "--path-prefix",
            "/status/2",
            "--max-events",
            "3",
        ],
    );
    let (mut text_tap, text_lines) = start_tap(
        &agent,
        &["--port", &port, "--method", "GET", "--max-events", "3"],
    );
    // The taps subscribe asynchronously: keep making requests until both have seen three.
    let mut json_seen = Vec::new();
    let mut text_seen = Vec::new();
    let done = eventually(Duration::from_secs(60), || {
        curl_statuses(&cgroup, &base, &[201, 404]);
        json_seen.extend(json_lines.try_iter());
        text_seen.extend(text_lines.try_iter());
        json_seen.len() >= 3 && text_seen.len() >= 3
    });
    assert!(done, "taps saw {json_seen:?} and {text_seen:?}");
    assert!(json_tap.wait().unwrap().success() && text_tap.wait().unwrap().success());

    for line in &json_seen {
        let event: serde_json::Value = serde_json::from_str(line).expect("tap JSON");
        assert_eq!(event["type"], "http", "{line}");
        assert_eq!(
            event["path"], "/status/201",
            "the path filter lets only /status/2* through: {line}"
        );
        assert_eq!(event["status"], 201);
        assert_eq!(event["method"], "GET");
        assert_eq!(event["authority"], http.addr.to_string());
    }
    assert!(
        text_seen
            .iter()
            .all(|line| line.contains(" http ") && line.contains("GET")),
        "{text_seen:?}"
    );
    assert!(
        text_seen
            .iter()
            .any(|line| line.contains("/status/404 -> 404")),
        "{text_seen:?}"
    );
}

/// A watcher that never reads fills its socket, then its queue; it must skip events while the
/// proxy carries on at full speed.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_slow_tap_watcher_does_not_stall_the_proxy() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("slowtap");
    let agent = Agent::start(&cgroup);

    let stalled = TcpStream::connect(agent.admin).unwrap();
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt on our own socket with a valid int.
    unsafe {
        libc::setsockopt(
            stalled.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const small).cast(),
            4,
        );
    }
    (&stalled).write_all(b"GET /tap HTTP/1.0\r\n\r\n").unwrap();
    // 8 rounds of 500 connections: 8000 events, more than a watcher's queue and socket hold.
    for _ in 0..8 {
        let report = probe(
            &cgroup,
            &["echo", &echo.addr().to_string(), "500", "1000"],
            LIMIT,
        );
        assert!(report.starts_with("ok connections=500"), "{report}");
    }
    agent.assert_metric("tcp_close_total", &[("errno", "")], 4000);

    // Now read what the watcher was sent: it was told it fell behind.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 65536];
    let lagged = eventually(Duration::from_secs(30), || {
        if let Ok(n) = (&stalled).read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).contains(r#""type":"lagged""#)
    });
    assert!(lagged, "no lagged event after {} bytes of tap", seen.len());
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn admin_port_stays_reachable_when_users_skip_ports() {
    require_privileged!();
    let cgroup = TestCgroup::new("adminskip");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec!["--skip-outbound-ports=22,8000-8100".to_string()],
            ..AgentOptions::default()
        },
    );
    // A meshed process reaches the admin port directly, not through the proxy.
    let url = format!("http://{}/ready", agent.admin);
    let code = curl_status(&cgroup, &url, LIMIT);
    assert_eq!(code, "200");
    agent.assert_metric(
        "sockmesh_kernel_connects_total",
        &[("decision", "bypassed_port")],
        1,
    );
    agent.assert_metric("tcp_open_total", &[], 0);
    let (_, config) = agent.get("/config.json").unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let skipped = config["skip_outbound_ports"].as_str().unwrap();
    assert_eq!(skipped, format!("{},22,8000-8100", agent.admin.port()));
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn config_json_shows_the_effective_configuration() {
    require_privileged!();
    let cgroup = TestCgroup::new("configjson");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec![
                "--opaque-ports=4406".to_string(),
                "--detect-timeout=3s".to_string(),
            ],
            ..AgentOptions::default()
        },
    );
    let (status, body) = agent.get("/config.json").unwrap();
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        config["opaque_ports"],
        "25,587,3306,4444,5432,6379,9300,11211,4406"
    );
    assert_eq!(config["detect_timeout_ms"], 3000);
    assert_eq!(config["upstream_timeout_ms"], 30_000);
    assert_eq!(config["outbound_port"], agent.outbound_port);
    assert_eq!(config["cgroup"], cgroup.path().to_string_lossy().as_ref());
}

/// The status of a POST to the admin server; 0 when there was no answer.
fn post(addr: std::net::SocketAddr, path: &str) -> u16 {
    http_post(addr, path).map_or(0, |(status, _)| status)
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn shutdown_endpoint_is_post_only_and_off_by_default() {
    require_privileged!();
    let cgroup = TestCgroup::new("shutdown");
    let agent = Agent::start(&cgroup);
    assert_eq!(agent.get("/shutdown").unwrap().0, 405, "GET is refused");
    assert_eq!(post(agent.admin, "/shutdown"), 403, "disabled by default");
    assert_eq!(agent.get("/ready").unwrap().0, 200, "still running");
    drop(agent);

    let cgroup = TestCgroup::new("shutdownon");
    let mut agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec!["--enable-shutdown-endpoint".to_string()],
            ..AgentOptions::default()
        },
    );
    assert_eq!(
        agent.get("/shutdown").unwrap().0,
        405,
        "GET is refused even when enabled"
    );
    assert_eq!(post(agent.admin, "/shutdown"), 202);
    let status = agent.wait_exit();
    assert!(status.success(), "exit after /shutdown: {status}");
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn check_passes_here_and_names_a_missing_cgroup() {
    require_privileged!();
    let ok = run_ok(Command::new(sockmesh_bin()).arg("check"), LIMIT);
    assert!(ok.contains("all 6 checks passed"), "{ok}");
    // The sk_msg probe ran (loaded, attached to its own map, moved bytes between its own
    // sockets). Whether FIONREAD works on this kernel is the kernel's answer; that an ingress
    // redirect is readable, counted and peekable holds on every kernel with sk_msg.
    let probe = ok
        .lines()
        .find(|line| line.starts_with("[info] sk_msg"))
        .unwrap_or_else(|| panic!("no sk_msg line: {ok}"));
    assert!(
        probe.contains("as the fast path needs") || probe.contains("unsafe for the fast path"),
        "{probe}"
    );
    assert!(
        probe.contains("ingress redirect wakes the reader (FIONREAD 1000, MSG_PEEK 1000)"),
        "{probe}"
    );
    // The experimental fast path's program loads and attaches here.
    assert!(
        ok.contains("[info] accelerate     --accelerate local can run here"),
        "{ok}"
    );

    let failed = run(
        Command::new(sockmesh_bin()).args(["check", "--cgroup", "/sys/fs/cgroup/no-such-cgroup"]),
        LIMIT,
    );
    assert_eq!(failed.status.code(), Some(1));
    let out = String::from_utf8_lossy(&failed.stdout);
    assert!(
        out.contains("[FAIL] cgroup v2") && out.contains("no-such-cgroup"),
        "{out}"
    );
    assert!(out.contains("fix:"), "{out}");
}

/// `sockmesh check`'s blocking-read probe against docs/experiments/tcp_bpf_spurious_eagain.c,
/// the same experiment written without the agent (C, raw bpf(2), a `return SK_PASS` program)
/// and built here: both must say the same of this kernel. On 6.18 both find EAGAIN; on a
/// kernel with docs/experiments/tcp_bpf_wait_again.patch both find a read that waits.
#[test]
#[ignore = "needs root (bpf(2) and sockmaps): run by `cargo xtask test` as root"]
fn check_finds_what_the_c_reproducer_finds_about_blocking_reads() {
    require_privileged!();
    let dir = temp_dir("spurious-eagain");
    let reproducer = dir.join("spurious");
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/experiments/tcp_bpf_spurious_eagain.c"
    );
    run_ok(
        Command::new("cc")
            .args(["-O2", "-pthread", "-o"])
            .arg(&reproducer)
            .arg(source),
        LIMIT,
    );
    // "msg" is the application socket of --accelerate local, as in the agent's probe.
    let reproduced = run(Command::new(&reproducer).arg("msg"), LIMIT);
    let report = String::from_utf8_lossy(&reproduced.stdout).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    let kernel_answers_eagain = match reproduced.status.code() {
        Some(0) => false,
        Some(1) => true,
        _ => panic!(
            "the reproducer could not run ({}): {report}",
            reproduced.status
        ),
    };
    assert!(report.contains("msg: "), "{report}");

    let check = run_ok(Command::new(sockmesh_bin()).arg("check"), LIMIT);
    let probe = check
        .lines()
        .find(|line| line.starts_with("[info] sk_msg"))
        .unwrap_or_else(|| panic!("no sk_msg line: {check}"));
    let expected = if kernel_answers_eagain {
        "a blocking read while the same socket sends answers EAGAIN"
    } else {
        "a blocking read while the same socket sends waits for data, as plain TCP does"
    };
    assert!(
        probe.contains(expected),
        "reproducer:\n{report}\ncheck: {probe}"
    );
    if kernel_answers_eagain {
        assert!(
            probe.starts_with("[info] sk_msg         unsafe for the fast path"),
            "{probe}"
        );
    }
}

/// Debian's Prometheus scrapes the agent every second; its query API then returns our series.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn prometheus_scrapes_our_series() {
    require_privileged!();
    let http = ServerProcess::peer("http_peer.py", &[]);
    let cgroup = TestCgroup::new("prometheus");
    let agent = Agent::start(&cgroup);
    curl_statuses(
        &cgroup,
        &format!("http://{}", http.addr),
        &[200, 200, 200, 503],
    );
    agent.assert_metric("response_total", &[], 4);

    let dir = temp_dir("prometheus");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sockmesh\n    static_configs:\n      - targets: ['{}']\n",
            agent.admin
        ),
    )
    .unwrap();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut prometheus = Command::new("prometheus");
    prometheus
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"));
    let _prometheus = ServerProcess::command(prometheus, listen);

    let port = http.addr.port();
    let query = |expr: &str| -> Option<f64> {
        let path = format!("/api/v1/query?query={expr}");
        let (_, body) = integration_tests::agent::http_get(listen, &path).ok()?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let requests = format!("sum(request_total%7Btarget_port=%22{port}%22%7D)");
    let failures =
        format!("sum(response_total%7Btarget_port=%22{port}%22,classification=%22failure%22%7D)");
    let mut last = (None, None);
    let scraped = eventually(Duration::from_secs(60), || {
        last = (query(&requests), query(&failures));
        last == (Some(4.0), Some(1.0))
    });
    assert!(
        scraped,
        "Prometheus returned {last:?} for requests and failures"
    );
    assert!(query("sum(sockmesh_kernel_connects_total)").is_some_and(|v| v >= 1.0));
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn admin_answers_head_unknown_paths_and_bad_requests_with_4xx() {
    require_privileged!();
    let cgroup = TestCgroup::new("adminedge");
    let agent = Agent::start(&cgroup);
    let raw = |request: &str| {
        integration_tests::agent::http_request(agent.admin, request).expect("an admin answer")
    };
    let head = |path: &str| raw(&format!("HEAD {path} HTTP/1.0\r\nHost: a\r\n\r\n"));

    // HEAD answers like GET, without a body.
    for path in ["/metrics", "/ready", "/live", "/config.json"] {
        let (status, body) = head(path);
        assert_eq!((status, body.as_str()), (200, ""), "HEAD {path}");
    }
    assert_eq!(raw("GET /nothing-here HTTP/1.0\r\n\r\n").0, 404);
    assert_eq!(
        raw("PUT /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n").0,
        405
    );
    assert_eq!(raw("NOT-HTTP\r\n\r\n").0, 400);
    let many_headers: String = (0..500).map(|i| format!("X-{i}: {i}\r\n")).collect();
    let (status, _) = raw(&format!("GET /metrics HTTP/1.0\r\n{many_headers}\r\n"));
    assert_eq!(status, 431, "a head with 500 fields");
    // And it still serves.
    assert_eq!(agent.get("/live").unwrap().0, 200);
}
