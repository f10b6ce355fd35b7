//! Inbound capture: connections *to* a meshed process's listening port go through the agent
//! (sk_lookup steers them into its inbound listener), with the same detection and metrics as
//! outbound, labelled direction="inbound". Real servers run inside the meshed cgroup; real
//! clients connect from outside it (or from inside, for both ends meshed).

use std::{fs, net::SocketAddr, process::Command, time::Duration};

use integration_tests::{
    Agent, AgentOptions, TestCgroup, free_port,
    process::{eventually, run, run_ok},
    require_privileged,
    servers::{SYSTEM_PYTHON, ServerProcess, peer_script, write_file},
    temp_dir,
};

const LIMIT: Duration = Duration::from_secs(60);

/// python3's http.server on a fresh loopback port, inside `cgroup` (after the agent started:
/// the agent learns a meshed port when the server listens), logging its clients to `log`.
fn meshed_http_server(cgroup: &TestCgroup, dir: &std::path::Path) -> ServerProcess {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut command = cgroup.wrap(&ServerProcess::http_command(dir, addr));
    command
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(dir.join("server.log")).expect("server log"));
    ServerProcess::start_checked(command, addr, |addr| {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
}

/// Downloads `url` with curl from outside any test cgroup; returns the status code.
fn curl_download(url: &str, out: &std::path::Path) -> String {
    run_ok(
        Command::new("curl")
            .args(["-sS", "-o"])
            .arg(out)
            .args(["-w", "%{http_code}", url]),
        LIMIT,
    )
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn inbound_connections_to_a_meshed_server_go_through_the_agent() {
    require_privileged!();
    let dir = temp_dir("inbound");
    write_file(&dir.join("blob"), 250_000);
    let cgroup = TestCgroup::new("inbound");
    let agent = Agent::start(&cgroup);
    let meshed = meshed_http_server(&cgroup, &dir);
    // Another server on the host, outside the meshed cgroup: never captured.
    let outside = ServerProcess::http(&dir);

    for server in [&meshed, &outside] {
        let out = dir.join(format!("got-{}", server.addr.port()));
        let url = format!("http://{}/blob", server.addr);
        assert_eq!(curl_download(&url, &out), "200");
        assert_eq!(fs::read(&out).unwrap(), fs::read(dir.join("blob")).unwrap());
    }

    let port = meshed.addr.port().to_string();
    let inbound = [("direction", "inbound"), ("target_port", port.as_str())];
    agent.assert_metric("request_total", &inbound, 1);
    agent.assert_metric(
        "response_total",
        &[
            ("direction", "inbound"),
            ("target_port", port.as_str()),
            ("status_code", "200"),
        ],
        1,
    );
    let metrics = agent.metrics();
    assert!(metrics.count("tcp_read_bytes_total", &inbound) > 250_000);
    assert_eq!(
        metrics.count(
            "tcp_open_total",
            &[("direction", "outbound"), ("target_port", port.as_str())]
        ),
        0,
        "the client is not meshed: nothing outbound"
    );
    let other = outside.addr.port().to_string();
    assert_eq!(
        metrics.count("tcp_open_total", &[("target_port", other.as_str())]),
        0,
        "a server outside the meshed cgroup is not captured"
    );
    assert!(
        metrics.count(
            "sockmesh_kernel_inbound_total",
            &[("decision", "redirected")]
        ) >= 1
    );
    // The workload sees the agent's passthrough address as its peer (documented).
    let log = fs::read_to_string(dir.join("server.log")).unwrap();
    assert!(
        log.contains("127.0.0.6 - - ") && log.contains("GET /blob"),
        "{log}"
    );
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn with_both_ends_meshed_a_connection_is_counted_once_each_way() {
    require_privileged!();
    let dir = temp_dir("bothmeshed");
    write_file(&dir.join("blob"), 40_000);
    let cgroup = TestCgroup::new("bothmeshed");
    let agent = Agent::start(&cgroup);
    let server = meshed_http_server(&cgroup, &dir);

    let url = format!("http://{}/blob", server.addr);
    let out = dir.join("got");
    let code = run_ok(
        cgroup
            .command("curl")
            .args(["-sS", "-o"])
            .arg(&out)
            .args(["-w", "%{http_code}", &url]),
        LIMIT,
    );
    assert_eq!(code, "200");
    assert_eq!(fs::read(&out).unwrap(), fs::read(dir.join("blob")).unwrap());
    let port = server.addr.port().to_string();
    for direction in ["outbound", "inbound"] {
        let labels = [("direction", direction), ("target_port", port.as_str())];
        agent.assert_metric("request_total", &labels, 1);
    }
    agent.assert_metric(
        "tcp_open_total",
        &[("direction", "outbound"), ("target_port", port.as_str())],
        1,
    );
}

/// Linkerd's bug, not ours: a skip list is added to the agent's own ports. The agent runs
/// inside the meshed cgroup here, so its own admin listener is a meshed listening port too.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn skipped_inbound_ports_bypass_and_the_admin_port_stays_reachable() {
    require_privileged!();
    let dir = temp_dir("skipin");
    write_file(&dir.join("blob"), 10_000);
    let cgroup = TestCgroup::new("skipin");
    let skipped = free_port();
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec![format!("--skip-inbound-ports=9000,{skipped}")],
            inside_cgroup: true,
            ..AgentOptions::default()
        },
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], skipped));
    let mut command = cgroup.wrap(&ServerProcess::http_command(&dir, addr));
    command.stderr(std::process::Stdio::null());
    let server = ServerProcess::start_checked(command, addr, |addr| {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });

    let out = dir.join("got");
    let url = format!("http://{}/blob", server.addr);
    assert_eq!(curl_download(&url, &out), "200");
    let port = skipped.to_string();
    agent.assert_metric("tcp_open_total", &[("target_port", port.as_str())], 0);
    assert!(
        agent.metrics().count(
            "sockmesh_kernel_inbound_total",
            &[("decision", "bypassed_port")]
        ) >= 1
    );

    // The admin endpoints and the tap answer directly, never through the inbound proxy.
    assert_eq!(agent.get("/ready").unwrap().0, 200);
    let (status, _) = agent.get("/metrics").unwrap();
    assert_eq!(status, 200);
    let tap = run(
        Command::new("curl").args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "1",
            &format!("http://{}/tap", agent.admin),
        ]),
        LIMIT,
    );
    // curl gives up on the endless stream after 1 s, having seen its 200.
    let tap = String::from_utf8_lossy(&tap.stdout);
    assert!(tap.starts_with("200"), "{tap}");
    let admin_port = agent.admin.port().to_string();
    agent.assert_metric("tcp_open_total", &[("target_port", admin_port.as_str())], 0);
    let (_, config) = agent.get("/config.json").unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["skip_inbound_ports"].as_str().unwrap(),
        format!(
            "{},{},{},9000,{skipped}",
            agent.admin.port(),
            agent.outbound_port,
            agent.inbound_port
        )
    );
}

/// A server that speaks first (SMTP) on a port not in the opaque list: the greeting is passed
/// on at once, the connection becomes opaque, and the exchange completes.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_server_first_protocol_inbound_is_not_stalled() {
    require_privileged!();
    let cgroup = TestCgroup::new("smtpin");
    let agent = Agent::start(&cgroup);
    let port = free_port();
    let mut command = cgroup.command(SYSTEM_PYTHON);
    command.arg(peer_script("smtp_peer.py")).args([
        "server",
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
    ]);
    let smtp = ServerProcess::command(command, SocketAddr::from(([127, 0, 0, 1], port)));

    let port = smtp.addr.port().to_string();
    let report = run_ok(
        Command::new(SYSTEM_PYTHON).args([
            &peer_script("smtp_peer.py"),
            "client",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
        ]),
        LIMIT,
    );
    assert!(report.starts_with("smtp ok"), "{report}");
    let labels = [("direction", "inbound"), ("target_port", port.as_str())];
    let metrics = agent.metrics();
    assert!(metrics.count("tcp_open_total", &labels) >= 1);
    agent.assert_metric(
        "tcp_detect_total",
        &[
            ("direction", "inbound"),
            ("target_port", port.as_str()),
            ("result", "timeout"),
        ],
        0,
    );
    // The readiness check connected and left silently; smtplib's connection got the greeting.
    assert!(
        metrics.count(
            "tcp_detect_total",
            &[("direction", "inbound"), ("result", "server_first")]
        ) >= 1
    );
}

/// A killed agent's sk_lookup links go with it: clients reach the workload directly.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn inbound_fails_open_when_the_agent_is_killed() {
    require_privileged!();
    let dir = temp_dir("inboundkill");
    write_file(&dir.join("blob"), 20_000);
    let cgroup = TestCgroup::new("inboundkill");
    let mut agent = Agent::start(&cgroup);
    let server = meshed_http_server(&cgroup, &dir);
    let url = format!("http://{}/blob", server.addr);
    let port = server.addr.port().to_string();
    assert_eq!(curl_download(&url, &dir.join("before")), "200");
    agent.assert_metric(
        "request_total",
        &[("direction", "inbound"), ("target_port", port.as_str())],
        1,
    );

    agent.signal(libc::SIGKILL);
    agent.wait_exit();
    let direct = eventually(Duration::from_secs(10), || {
        curl_download(&url, &dir.join("after")) == "200"
    });
    assert!(direct, "the workload is unreachable after the agent died");
    assert_eq!(
        fs::read(dir.join("after")).unwrap(),
        fs::read(dir.join("blob")).unwrap()
    );
}

/// A server that was listening before the agent started (an agent restart, a rolling update)
/// never passed through sockops: the agent finds it in the kernel's socket list at start, and
/// forgets it once it stops listening.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn servers_listening_before_the_agent_started_are_captured_too() {
    require_privileged!();
    let dir = temp_dir("inboundearly");
    write_file(&dir.join("blob"), 30_000);
    let cgroup = TestCgroup::new("inboundearly");
    let server = meshed_http_server(&cgroup, &dir);
    let agent = Agent::start(&cgroup);
    assert_eq!(agent.map_entries("INBOUND_PORTS"), 1);

    let url = format!("http://{}/blob", server.addr);
    let out = dir.join("got");
    assert_eq!(curl_download(&url, &out), "200");
    assert_eq!(fs::read(&out).unwrap(), fs::read(dir.join("blob")).unwrap());
    let port = server.addr.port().to_string();
    agent.assert_metric(
        "request_total",
        &[("direction", "inbound"), ("target_port", port.as_str())],
        1,
    );

    // Its close was never reported to sockops: the agent's reconcile removes the entry.
    drop(server);
    let forgotten = eventually(Duration::from_secs(15), || {
        agent.map_entries("INBOUND_PORTS") == 0
    });
    assert!(forgotten, "the stopped server's port is still captured");
}
