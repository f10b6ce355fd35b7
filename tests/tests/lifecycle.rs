//! The agent's life as an operator sees it: inspect it with the README's bpftool commands,
//! stop it gracefully during a transfer, kill it and find traffic flowing directly (fail-open).

use std::{process::Command, sync::mpsc, time::Duration};

use integration_tests::{
    Agent, TestCgroup,
    clients::probe,
    free_port, meshprobe_bin,
    process::{eventually, run, run_ok},
    require_privileged,
    servers::{Gate, PatternServer},
};

const LIMIT: Duration = Duration::from_secs(120);
const PROGRAMS: [&str; 6] = [
    "sockmesh_conn4",
    "sockmesh_conn6",
    "sockmesh_peer4",
    "sockmesh_peer6",
    "sockmesh_getopt",
    "sockmesh_ops",
];

fn bpftool(args: &[&str]) -> String {
    run_ok(Command::new("bpftool").args(args), Duration::from_secs(30))
}

/// Names of our programs attached to `cgroup`, per `bpftool cgroup show`.
fn attached_programs(cgroup: &TestCgroup) -> Vec<&'static str> {
    let listing = bpftool(&["cgroup", "show", &cgroup.path().to_string_lossy()]);
    PROGRAMS
        .into_iter()
        .filter(|name| listing.contains(name))
        .collect()
}

/// A client in `cgroup` sends `server` 5,000 bytes in 1,000-byte writes: it reaches the
/// server itself (its peer address is the server's) and every byte arrives.
fn assert_one_bulk_transfer_arrives(cgroup: &TestCgroup, server: &PatternServer) {
    let report = probe(
        cgroup,
        &["bulk", &server.addr().to_string(), "5000", "1000"],
        LIMIT,
    );
    assert!(
        report.contains(&format!("peer={}", server.addr())),
        "{report}"
    );
    assert_eq!(server.received(1)[0].bytes, 5000);
}

/// The commands in the README's "Inspecting with bpftool" block, with the default paths
/// replaced by this test's cgroup and pin dir.
fn readme_bpftool_commands(cgroup: &TestCgroup, agent: &Agent) -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split("## Inspecting with bpftool")
        .nth(1)
        .expect("bpftool section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next());
    block
        .expect("a ```sh block in the bpftool section")
        .lines()
        .filter(|line| line.starts_with("bpftool "))
        .map(|line| {
            line.replace("/sys/fs/cgroup/sockmesh", &cgroup.path().to_string_lossy())
                .replace("/sys/fs/bpf/sockmesh", &agent.pin_dir.to_string_lossy())
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .collect()
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn readme_bpftool_commands_show_our_programs_and_maps() {
    require_privileged!();
    let server = PatternServer::start("127.0.0.1:0", 10);
    let cgroup = TestCgroup::new("bpftool");
    let agent = Agent::start(&cgroup);
    probe(
        &cgroup,
        &["bulk", &server.addr().to_string(), "10", "10"],
        LIMIT,
    );

    let commands = readme_bpftool_commands(&cgroup, &agent);
    assert!(
        commands.len() >= 4,
        "README lists too few bpftool commands: {commands:?}"
    );
    for command in &commands {
        let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
        let output = bpftool(&args);
        let expected: &[&str] = match args.as_slice() {
            ["cgroup", ..] => &PROGRAMS,
            ["prog", "show", "name", name] => &[name],
            [.., path] if path.ends_with("/COUNTERS") => &["\"redirected\": 1", "bypassed_port"],
            [.., path] if path.ends_with("/CONFIG") => &["proxy_ip4", "bypass_mark"],
            // The host's namespace, with the listener port there.
            [.., path] if path.ends_with("/SERVED_NETNS") => &["\"key\"", "proxy_port"],
            [.., path] if path.ends_with("/SKIP_PORTS") => &["\"key\""],
            [.., path] if path.ends_with("/FWD_ACTIVE") => &["sockhash", "FWD_ACTIVE"],
            _ => &[],
        };
        for word in expected {
            assert!(
                output.contains(word),
                "`bpftool {}` lacks {word}:\n{output}",
                args.join(" ")
            );
        }
    }
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn killed_agent_fails_open() {
    require_privileged!();
    let server = PatternServer::start("127.0.0.1:0", 1000);
    let cgroup = TestCgroup::new("sigkill");
    let mut agent = Agent::start(&cgroup);
    assert_eq!(attached_programs(&cgroup), PROGRAMS);

    agent.signal(libc::SIGKILL);
    agent.wait_exit();
    let detached = eventually(Duration::from_secs(10), || {
        attached_programs(&cgroup).is_empty()
    });
    assert!(
        detached,
        "programs still attached after SIGKILL: {:?}",
        attached_programs(&cgroup)
    );

    // Nothing listens on the proxy port any more, so this only works if it goes direct.
    assert_one_bulk_transfer_arrives(&cgroup, &server);
}

/// An agent started again at once after a crash (its heartbeat still fresh in the pins it
/// left) takes those pins over: a heartbeat that does not move is no running agent.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn an_agent_restarted_at_once_after_a_crash_takes_its_pins_over() {
    require_privileged!();
    let server = PatternServer::start("127.0.0.1:0", 1000);
    let cgroup = TestCgroup::new("restart");
    let mut crashed = Agent::start(&cgroup);
    crashed.signal(libc::SIGKILL);
    crashed.wait_exit();
    let restarted = Agent::start(&cgroup);
    assert_eq!(restarted.pin_dir, crashed.pin_dir);
    assert_eq!(attached_programs(&cgroup), PROGRAMS);
    assert_one_bulk_transfer_arrives(&cgroup, &server);
    restarted.assert_metric("tcp_open_total", &[], 1);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn sigterm_lets_an_open_transfer_finish() {
    require_privileged!();
    const TOTAL: u64 = 20 * 1024 * 1024;
    let (reached_tx, reached) = mpsc::channel();
    let (open, open_rx) = mpsc::channel();
    let gate = Gate {
        pause_after: 1024 * 1024,
        reached: reached_tx,
        open: open_rx,
    };
    let server = PatternServer::start_gated("127.0.0.1:0", 4096, Some(gate));
    let other = PatternServer::start("127.0.0.1:0", 10);
    let cgroup = TestCgroup::new("sigterm");
    let mut agent = Agent::start(&cgroup);

    let mut client = cgroup.command(meshprobe_bin());
    client.args([
        "bulk",
        &server.addr().to_string(),
        &TOTAL.to_string(),
        "4096",
    ]);
    let transfer = std::thread::spawn(move || run_ok(&mut client, LIMIT));
    reached
        .recv_timeout(LIMIT)
        .expect("the transfer reached the server");
    // Bytes are counted as they move, not when the connection ends.
    let port = server.addr().port().to_string();
    let moved = agent
        .metrics()
        .count("tcp_write_bytes_total", &[("target_port", port.as_str())]);
    assert!(
        moved >= 1024 * 1024,
        "only {moved} bytes counted while the transfer is open"
    );

    // Mid-transfer: stop the agent. It detaches first, so new connections go direct...
    agent.signal(libc::SIGTERM);
    let detached = eventually(Duration::from_secs(10), || {
        attached_programs(&cgroup).is_empty()
    });
    assert!(detached, "programs still attached after SIGTERM");
    assert_eq!(
        agent
            .get("/ready")
            .expect("admin still serves during the grace period")
            .0,
        503
    );
    probe(
        &cgroup,
        &["bulk", &other.addr().to_string(), "10", "10"],
        LIMIT,
    );
    let other_port = other.addr().port().to_string();
    assert_eq!(
        agent
            .metrics()
            .count("tcp_open_total", &[("target_port", other_port.as_str())]),
        0
    );

    // ...while the open transfer is allowed to finish.
    open.send(()).expect("opening the gate");
    let report = transfer.join().expect("client thread");
    assert!(report.starts_with("ok"), "{report}");
    let received = server.received(1);
    assert_eq!((received[0].bytes, &received[0].error), (TOTAL, &None));
    let status = agent.wait_exit();
    assert!(
        status.success(),
        "sockmesh exited with {status}:\n{}",
        agent.log_text()
    );
}

/// An idle HTTP keep-alive connection must not hold shutdown for the whole grace period: on
/// SIGTERM the proxy closes it once no request is in flight.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn sigterm_closes_idle_keep_alive_connections() {
    require_privileged!();
    let http = integration_tests::servers::ServerProcess::peer("http_peer.py", &[]);
    let cgroup = TestCgroup::new("keepalive");
    let mut agent = Agent::start_with(
        &cgroup,
        integration_tests::AgentOptions {
            // Longer than the harness waits for an exit: only a prompt close lets the test pass.
            args: vec!["--shutdown-grace=300s".to_string()],
            ..Default::default()
        },
    );
    let script = format!(
        "import socket, sys\n\
         s = socket.create_connection(('127.0.0.1', {}), timeout=120)\n\
         s.sendall(b'GET /status/200 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n')\n\
         print(s.recv(1000).split(b'\\r\\n')[0].decode(), flush=True)\n\
         sys.stdin.readline()\n\
         print('closed' if s.recv(1000) == b'' else 'data', flush=True)\n",
        http.addr.port()
    );
    let mut client = cgroup
        .command(integration_tests::servers::SYSTEM_PYTHON)
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "HTTP/1.1 200 OK");

    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit();
    assert!(status.success(), "sockmesh exited with {status}");
    drop(client.stdin.take());
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "closed");
    let _ = client.wait();
}

/// A second agent given a port the first one listens on refuses to start, with a message that
/// names the port, and leaves the first one serving: its listeners would otherwise join the
/// first one's SO_REUSEPORT group and take a share of its connections.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_second_agent_on_the_same_port_refuses_to_start() {
    require_privileged!();
    let server = PatternServer::start("127.0.0.1:0", 1000);
    let cgroup = TestCgroup::new("first-agent");
    let first = Agent::start(&cgroup);
    let other = TestCgroup::new("second-agent");
    let pin_dir = format!(
        "/sys/fs/bpf/{}",
        other.path().file_name().unwrap().display()
    );
    let cni_dir = integration_tests::temp_dir("second-cni");
    let cni_socket = cni_dir.join("cni.sock");
    let second = |outbound: u16, inbound: u16, pin_dir: &str| {
        let output = run(
            Command::new(integration_tests::sockmesh_bin())
                .arg("run")
                .arg("--cgroup")
                .arg(other.path())
                .args(["--outbound-port", &outbound.to_string()])
                .args(["--inbound-port", &inbound.to_string()])
                .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
                .args(["--pin-dir", pin_dir])
                .arg("--cni-socket")
                .arg(&cni_socket),
            // It fails before it attaches anything; one that started would be killed here.
            Duration::from_secs(30),
        );
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    for (outbound, inbound, taken) in [
        (first.outbound_port, free_port(), first.outbound_port),
        (free_port(), first.inbound_port, first.inbound_port),
    ] {
        let (code, stderr) = second(outbound, inbound, &pin_dir);
        assert_eq!(code, Some(1), "{stderr}");
        let message = format!("port {taken} is already in use on 127.0.0.1");
        assert!(stderr.contains(&message), "{stderr}");
        assert!(
            attached_programs(&other).is_empty(),
            "the second agent left programs attached"
        );
    }
    // Other ports, but the first agent's pin dir: its pins would be replaced under it.
    let (code, stderr) = second(free_port(), free_port(), &first.pin_dir.to_string_lossy());
    assert_eq!(code, Some(1), "{stderr}");
    let message = format!(
        "another sockmesh agent is running with the pin dir {}",
        first.pin_dir.display()
    );
    assert!(stderr.contains(&message), "{stderr}");
    assert!(attached_programs(&other).is_empty());

    assert_eq!(attached_programs(&cgroup), PROGRAMS);
    assert_one_bulk_transfer_arrives(&cgroup, &server);
    first.assert_metric("tcp_open_total", &[], 1);
    std::fs::remove_dir_all(cni_dir).ok();
}
