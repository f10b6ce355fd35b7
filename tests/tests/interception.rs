//! Which connections the kernel sends to the proxy, and what applications see: real clients
//! (curl, redis-cli, meshprobe) inside a test cgroup talk to real servers on loopback.

use std::{process::Command, time::Duration};

use integration_tests::{
    Agent, AgentOptions, TestCgroup,
    clients::probe,
    meshprobe_bin,
    process::run_ok,
    require_privileged,
    servers::{PatternServer, ServerProcess, write_file},
    temp_dir,
};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn curl_reaches_an_http_server_through_the_proxy() {
    require_privileged!();
    let dir = temp_dir("http");
    write_file(&dir.join("blob"), 300_000);
    let http = ServerProcess::http(&dir);
    let cgroup = TestCgroup::new("curl");
    let agent = Agent::start(&cgroup);

    let url = format!("http://{}/blob", http.addr);
    let out_file = dir.join("downloaded");
    let report = run_ok(
        cgroup
            .command("curl")
            .args(["-sS", "-o"])
            .arg(&out_file)
            .args(["-w", "%{http_code}", &url]),
        LIMIT,
    );
    assert_eq!(report, "200");
    assert_eq!(
        std::fs::read(&out_file).unwrap(),
        std::fs::read(dir.join("blob")).unwrap()
    );

    let port = http.addr.port().to_string();
    let labels = [("direction", "outbound"), ("target_port", port.as_str())];
    agent.assert_metric("tcp_open_total", &labels, 1);
    agent.assert_metric("tcp_close_total", &labels, 1);
    let metrics = agent.metrics();
    assert!(metrics.count("tcp_read_bytes_total", &labels) > 300_000);
    assert!(metrics.count("tcp_write_bytes_total", &labels) > 0);
    agent.assert_metric(
        "sockmesh_kernel_connects_total",
        &[("decision", "redirected")],
        1,
    );
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn redis_cli_talks_to_redis_through_the_proxy() {
    require_privileged!();
    let redis = ServerProcess::redis();
    let cgroup = TestCgroup::new("redis");
    let agent = Agent::start(&cgroup);
    let port = redis.addr.port().to_string();
    let redis_cli = |args: &[&str]| {
        run_ok(
            cgroup
                .command("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port])
                .args(args),
            LIMIT,
        )
    };

    assert_eq!(redis_cli(&["SET", "mesh", "sockmesh"]).trim(), "OK");
    assert_eq!(redis_cli(&["GET", "mesh"]).trim(), "sockmesh");
    assert_eq!(redis_cli(&["INCRBY", "counter", "41"]).trim(), "41");

    let labels = [("target_port", port.as_str())];
    agent.assert_metric("tcp_open_total", &labels, 3);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn applications_see_the_original_peer() {
    require_privileged!();
    let server = PatternServer::start("127.0.0.1:0", 0);
    let cgroup = TestCgroup::new("peer");
    let agent = Agent::start(&cgroup);

    let report = probe(&cgroup, &["peer", &server.addr().to_string()], LIMIT);
    assert_eq!(report.trim(), format!("peer={}", server.addr()));
    // It really went through the proxy.
    let port = server.addr().port().to_string();
    agent.assert_metric("tcp_open_total", &[("target_port", port.as_str())], 1);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn ipv6_loopback_is_proxied_like_ipv4() {
    require_privileged!();
    let server = PatternServer::start("[::1]:0", 123_456);
    let cgroup = TestCgroup::new("ipv6");
    let agent = Agent::start(&cgroup);

    let addr = server.addr().to_string();
    let report = probe(&cgroup, &["bulk", &addr, "654321", "123456"], LIMIT);
    assert!(report.contains(&format!("peer={addr}")), "{report}");
    assert_eq!(server.received(1)[0].bytes, 654_321);

    let port = server.addr().port().to_string();
    let labels = [("target_port", port.as_str())];
    agent.assert_metric("tcp_write_bytes_total", &labels, 654_321);
    agent.assert_metric("tcp_read_bytes_total", &labels, 123_456);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn skipped_ports_and_networks_bypass_the_proxy() {
    require_privileged!();
    let skipped_port = PatternServer::start("127.0.0.1:0", 10);
    // 127.0.0.2 is loopback too; its /32 is skipped.
    let skipped_net = PatternServer::start("127.0.0.2:0", 10);
    let proxied = PatternServer::start("127.0.0.1:0", 10);
    let cgroup = TestCgroup::new("skip");
    let port = skipped_port.addr().port();
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec![
                format!("--skip-outbound-ports=1-3,{port}"),
                "--skip-outbound-networks=127.0.0.2/32,fd00::/8".to_string(),
            ],
            ..AgentOptions::default()
        },
    );

    for server in [&skipped_port, &skipped_net, &proxied] {
        probe(
            &cgroup,
            &["bulk", &server.addr().to_string(), "1000", "10"],
            LIMIT,
        );
    }

    agent.assert_metric(
        "sockmesh_kernel_connects_total",
        &[("decision", "bypassed_port")],
        1,
    );
    agent.assert_metric(
        "sockmesh_kernel_connects_total",
        &[("decision", "bypassed_network")],
        1,
    );
    agent.assert_metric(
        "sockmesh_kernel_connects_total",
        &[("decision", "redirected")],
        1,
    );
    agent.assert_metric("tcp_open_total", &[], 1);
    let proxied_port = proxied.addr().port().to_string();
    agent.assert_metric(
        "tcp_open_total",
        &[("target_port", proxied_port.as_str())],
        1,
    );
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn processes_outside_the_cgroup_are_never_redirected() {
    require_privileged!();
    let server = PatternServer::start("127.0.0.1:0", 100);
    let cgroup = TestCgroup::new("outside");
    let agent = Agent::start(&cgroup);

    // The same client, not through `sockmesh exec`: it stays in the test's own cgroup.
    let report = run_ok(
        Command::new(meshprobe_bin()).args(["bulk", &server.addr().to_string(), "5000", "100"]),
        LIMIT,
    );
    assert!(report.starts_with("ok"), "{report}");

    agent.assert_metric("tcp_open_total", &[], 0);
    agent.assert_metric("sockmesh_kernel_connects_total", &[], 0);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn agent_inside_the_meshed_cgroup_does_not_proxy_itself() {
    require_privileged!();
    let server = PatternServer::start("127.0.0.1:0", 4096);
    let cgroup = TestCgroup::new("self");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            inside_cgroup: true,
            ..Default::default()
        },
    );
    assert!(
        cgroup.pids().contains(&agent.pid()),
        "the agent runs inside the meshed cgroup"
    );

    let report = probe(
        &cgroup,
        &["bulk", &server.addr().to_string(), "4096", "4096"],
        LIMIT,
    );
    assert!(report.starts_with("ok"), "{report}");

    let metrics = agent.metrics();
    // The agent's upstream connect carried the bypass mark: no loop through itself.
    agent.assert_metric(
        "sockmesh_kernel_connects_total",
        &[("decision", "redirected")],
        1,
    );
    assert!(
        metrics.count(
            "sockmesh_kernel_connects_total",
            &[("decision", "bypassed_self")]
        ) >= 1
    );
    // Inside the cgroup, the getsockopt(SO_ORIGINAL_DST) hook answered, as for iptables users.
    agent.assert_metric(
        "sockmesh_original_dst_lookups_total",
        &[("result", "getsockopt")],
        1,
    );
    agent.assert_metric("tcp_open_total", &[], 1);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn refused_upstream_closes_the_client_connection() {
    require_privileged!();
    // A port nothing listens on: bind, note it, close.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cgroup = TestCgroup::new("refused");
    let agent = Agent::start(&cgroup);

    let report = probe(&cgroup, &["expect-close", &closed_port.to_string()], LIMIT);
    assert!(report.starts_with("closed="), "{report}");

    let port = closed_port.port().to_string();
    let refused = [("target_port", port.as_str()), ("errno", "ECONNREFUSED")];
    agent.assert_metric("tcp_connect_errors_total", &refused, 1);
    agent.assert_metric("tcp_close_total", &refused, 1);
    agent.assert_metric("tcp_open_connections", &[], 0);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn udp_is_left_alone() {
    require_privileged!();
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = echo.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, from) = echo.recv_from(&mut buf).unwrap();
        echo.send_to(&buf[..n], from).unwrap();
    });
    let cgroup = TestCgroup::new("udp");
    let agent = Agent::start(&cgroup);

    // A connected UDP socket goes through connect4 too; it must not be touched.
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(10)\n\
         s.connect(('127.0.0.1', {}))\n\
         s.send(b'ping')\n\
         print(s.recv(64).decode(), s.getpeername()[1])\n",
        addr.port()
    );
    let reply = run_ok(cgroup.command("python3").args(["-c", &script]), LIMIT);
    assert_eq!(reply.trim(), format!("ping {}", addr.port()));
    server.join().unwrap();
    agent.assert_metric("sockmesh_kernel_connects_total", &[], 0);
    agent.assert_metric("tcp_open_total", &[], 0);
}
