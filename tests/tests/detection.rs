//! Classification of proxied connections: server-first protocols without the detection stall,
//! opaque ports without detection, TLS with its server name, and a stalled client that falls
//! back to opaque with its bytes intact.

use std::{
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{
    Agent, AgentOptions, TestCgroup,
    clients::python,
    process::run_ok,
    require_privileged,
    servers::{EchoServer, ServerProcess, peer_script},
    temp_dir,
};

const LIMIT: Duration = Duration::from_secs(120);

/// An SMTP server (it speaks first) on a port that is not opaque: the default 10 s detection
/// timeout would stall the client; instead the server's greeting makes the connection opaque.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn server_first_protocol_on_an_unconfigured_port_is_not_stalled() {
    require_privileged!();
    let smtp = ServerProcess::peer("smtp_peer.py", &[]);
    let cgroup = TestCgroup::new("smtp");
    let agent = Agent::start(&cgroup);

    let port = smtp.addr.port().to_string();
    let report = python(
        &cgroup,
        &[
            &peer_script("smtp_peer.py"),
            "client",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
        ],
        LIMIT,
    );
    assert!(report.starts_with("smtp ok"), "{report}");
    agent.assert_metric("tcp_detect_total", &[("result", "server_first")], 1);
    agent.assert_metric("tcp_detect_total", &[("result", "timeout")], 0);
    agent.assert_metric(
        "tcp_close_total",
        &[("target_port", port.as_str()), ("errno", "")],
        1,
    );
}

/// Redis on its default port 6379 is in the default opaque list: no detection at all.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn redis_on_6379_is_opaque_without_detection() {
    require_privileged!();
    // A redis-server the package installation started may already hold 6379: use it then.
    let busy = std::net::TcpListener::bind("127.0.0.1:6379").is_err();
    let _redis = (!busy).then(|| {
        let mut redis = Command::new("redis-server");
        redis.args([
            "--bind",
            "127.0.0.1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        ServerProcess::command(redis, "127.0.0.1:6379".parse().unwrap())
    });
    let cgroup = TestCgroup::new("redis6379");
    let agent = Agent::start(&cgroup);

    let pong = run_ok(
        cgroup
            .command("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379", "PING"]),
        LIMIT,
    );
    assert_eq!(pong.trim(), "PONG");
    agent.assert_metric("tcp_detect_total", &[("result", "opaque_port")], 1);
    agent.assert_metric("tcp_detect_total", &[("result", "opaque")], 0);
}

/// `--opaque-ports` adds to the defaults; `--no-default-opaque-ports` drops them.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn opaque_port_flags_add_to_and_drop_the_defaults() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let port = echo.addr().port().to_string();
    let send = |cgroup: &TestCgroup| {
        let script = format!(
            "import socket\n\
             s = socket.create_connection(('127.0.0.1', {port}), timeout=20)\n\
             s.sendall(b'GET / HTTP/1.1\\r\\n\\r\\n'); s.shutdown(socket.SHUT_WR)\n\
             print(len(s.makefile('rb').read()))\n"
        );
        python(cgroup, &["-c", &script], LIMIT)
    };

    let cgroup = TestCgroup::new("opaqueflag");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec![format!("--opaque-ports={port}")],
            ..AgentOptions::default()
        },
    );
    // An HTTP request line to an opaque port is not parsed: the echo comes back verbatim.
    assert_eq!(send(&cgroup).trim(), "18");
    agent.assert_metric("tcp_detect_total", &[("result", "opaque_port")], 1);
    drop(agent);

    let cgroup = TestCgroup::new("nodefault");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec!["--no-default-opaque-ports".to_string()],
            ..AgentOptions::default()
        },
    );
    let redis = ServerProcess::redis();
    let redis_port = redis.addr.port().to_string();
    run_ok(
        cgroup
            .command("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &redis_port, "PING"]),
        LIMIT,
    );
    agent.assert_metric("tcp_detect_total", &[("result", "opaque")], 1);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn tls_is_forwarded_opaque_with_its_server_name() {
    require_privileged!();
    let dir = temp_dir("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=api.mesh.test",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        LIMIT,
    );
    let port = integration_tests::free_port();
    let mut server = Command::new("openssl");
    server
        .args([
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            &port.to_string(),
            "-cert",
        ])
        .arg(&cert)
        .arg("-key")
        .arg(&key);
    let _tls = ServerProcess::command(server, ([127, 0, 0, 1], port).into());
    let cgroup = TestCgroup::new("tls");
    let agent = Agent::start(&cgroup);

    let url = format!("https://api.mesh.test:{port}/");
    let resolve = format!("api.mesh.test:{port}:127.0.0.1");
    let code = run_ok(
        cgroup.command("curl").args([
            "-sS",
            "-k",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--resolve",
            &resolve,
            &url,
        ]),
        LIMIT,
    );
    assert_eq!(code, "200");
    agent.assert_metric("tcp_detect_total", &[("result", "tls")], 1);
    agent.assert_metric(
        "sockmesh_tls_connections_total",
        &[("sni", "api.mesh.test")],
        1,
    );

    // A ClientHello split across three records (OpenSSL's smallest record size, and enough
    // ALPN names to need three): its server name is read from the records put together.
    let alpn: Vec<String> = (0..80).map(|i| format!("proto{i:03}")).collect();
    run_ok(
        cgroup
            .command("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "split.mesh.test", "-max_send_frag", "512"])
            .args(["-alpn", &alpn.join(",")])
            .stdin(Stdio::null()),
        LIMIT,
    );
    agent.assert_metric(
        "sockmesh_tls_connections_total",
        &[("sni", "split.mesh.test")],
        1,
    );
    fs::remove_dir_all(dir).ok();
}

/// One byte, then silence past the detection timeout: the connection falls back to opaque and
/// every byte still arrives, in order.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn stalled_client_falls_back_to_opaque_with_bytes_in_order() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("stall");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec!["--detect-timeout=500ms".to_string()],
            ..AgentOptions::default()
        },
    );

    let port = echo.addr().port().to_string();
    let echoed = python(
        &cgroup,
        &[
            &peer_script("stall_client.py"),
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--first-byte-delay",
            "2",
        ],
        LIMIT,
    );
    assert_eq!(echoed.trim(), "ZZZtail-of-stalled-client");
    agent.assert_metric("tcp_detect_total", &[("result", "timeout")], 1);
}
