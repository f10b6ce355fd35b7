//! Hostile clients through the agent (issue "Overload, a hung agent and hostile input"): a
//! slow-loris attack (Debian's slowhttptest), a request head that never ends (1 GB offered),
//! and a flood of connections that never send a byte. Each time the agent keeps serving a
//! well-behaved client beside them, byte-exact, and its memory stays bounded. (A /tap watcher
//! that never reads is `admin.rs`; speed under attack is for the bench, not for assertions.)

use std::{
    fs,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use integration_tests::{
    Agent, AgentOptions, TestCgroup,
    clients::Holder,
    meshprobe_bin,
    process::{eventually, run_ok},
    require_privileged,
    servers::ServerProcess,
    temp_dir,
};

const LIMIT: Duration = Duration::from_secs(120);
const PAGE: &str = "the well-behaved client's page\n";

fn site() -> (std::path::PathBuf, ServerProcess) {
    let root = temp_dir("hostile-site");
    fs::write(root.join("index.html"), PAGE).expect("writing the page");
    let server = ServerProcess::http(&root);
    (root, server)
}

/// `count` GETs of the page from inside the meshed cgroup, one after another: each must be
/// the page exactly.
fn well_behaved_requests(cgroup: &TestCgroup, server: &ServerProcess, count: usize, gap: Duration) {
    for i in 0..count {
        let page = run_ok(
            cgroup
                .command("curl")
                .args(["-sS", "--max-time", "10"])
                .arg(format!("http://{}/index.html", server.addr)),
            LIMIT,
        );
        assert_eq!(page, PAGE, "request {i} beside the attack");
        thread::sleep(gap);
    }
}

fn http_agent(cgroup: &TestCgroup) -> Agent {
    Agent::start_with(
        cgroup,
        AgentOptions {
            args: vec!["--detect-timeout=2s".into()],
            ..AgentOptions::default()
        },
    )
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn slow_loris_connections_get_408_at_the_head_deadline_while_others_are_served() {
    require_privileged!();
    let (_root, server) = site();
    let cgroup = TestCgroup::new("slowloris");
    let agent = http_agent(&cgroup);
    // 200 connections, each sending one more header line every second, for 8 s: every one
    // would hold its head open for the whole test if the deadline restarted on each line.
    let mut attack = cgroup
        .command("slowhttptest")
        .args([
            "-H", "-c", "200", "-r", "100", "-i", "1", "-l", "8", "-p", "3",
        ])
        .arg("-u")
        .arg(format!("http://{}/", server.addr))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting slowhttptest");
    well_behaved_requests(&cgroup, &server, 10, Duration::from_millis(500));
    let finished = eventually(Duration::from_secs(60), || {
        attack.try_wait().ok().flatten().is_some()
    });
    if !finished {
        let _ = attack.kill();
    }
    assert!(finished, "slowhttptest did not end");
    let cut_off = agent
        .metrics()
        .count("sockmesh_http_errors_total", &[("reason", "head_timeout")]);
    eprintln!("slow heads cut off with 408: {cut_off}");
    assert!(
        cut_off >= 100,
        "only {cut_off} of 200 slow heads were cut off with 408"
    );
    let drained = eventually(Duration::from_secs(30), || {
        agent.metrics().count("tcp_open_connections", &[]) == 0
    });
    assert!(drained, "connections still open after the attack");
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_request_head_that_never_ends_gets_431_and_is_not_buffered() {
    require_privileged!();
    let (_root, server) = site();
    let cgroup = TestCgroup::new("junkhead");
    let agent = http_agent(&cgroup);
    let (before, _) = agent.rss_kib();
    let (report, peak) = agent.peak_rss_during(|| {
        run_ok(
            cgroup
                .command(meshprobe_bin())
                .args(["junk", &server.addr.to_string(), "1000000000"]),
            LIMIT,
        )
    });
    let sent: u64 = report
        .split_whitespace()
        .find_map(|field| field.strip_prefix("sent="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        report.contains("status=HTTP/1.1 431"),
        "the endless head was not refused: {report}"
    );
    // The agent stopped reading at its 64 KiB head limit; what else went out sat in socket
    // buffers until the close.
    eprintln!(
        "{}; agent RSS {before} KiB before, peak {peak} KiB",
        report.trim()
    );
    assert!(sent < 64 << 20, "{sent} bytes were taken for one head");
    assert!(
        peak.saturating_sub(before) < 16 * 1024,
        "the agent grew by {} KiB",
        peak.saturating_sub(before)
    );
    well_behaved_requests(&cgroup, &server, 3, Duration::ZERO);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_flood_of_silent_connections_does_not_starve_other_clients() {
    require_privileged!();
    const SILENT: u64 = 2_000;
    let (_root, server) = site();
    let mut echo = Command::new(meshprobe_bin());
    echo.args(["echo-server", "127.0.0.1:0"]);
    let echo = ServerProcess::announced(echo);
    let cgroup = TestCgroup::new("silentflood");
    let agent = http_agent(&cgroup);
    let holder = Holder::start(&cgroup, echo.addr, SILENT, true, LIMIT);
    // Past the detection timeout they are server-first connections, each with its upstream
    // connection: all held by the agent, none refused.
    agent.assert_metric("tcp_open_connections", &[("direction", "outbound")], SILENT);
    well_behaved_requests(&cgroup, &server, 10, Duration::ZERO);
    holder.release();
    let drained = eventually(Duration::from_secs(30), || {
        agent.metrics().count("tcp_open_connections", &[]) == 0
    });
    assert!(drained, "connections still open after the flood");
}
