//! `--accelerate local` never shares a socket with another tool's socket map: while one is
//! loaded on the node, new connections stay on plain TCP, and they are accelerated again once
//! it is gone. Its own test binary: the foreign map it loads pauses every agent on the machine
//! that runs the fast path, so no other fast-path test may run beside it (cargo runs test
//! binaries one after another).

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use integration_tests::{
    Agent, AgentOptions, TestCgroup,
    clients::python,
    process::stdout_lines,
    require_privileged,
    servers::{EchoServer, SYSTEM_PYTHON, peer_script},
};

const LIMIT: Duration = Duration::from_secs(60);
const FOREIGN_MAP: &str = "foreign_socks";

/// A sockhash with an sk_msg program, held by a Python process (tests/peers/foreign_sockmap.py)
/// until dropped.
struct ForeignSockmap {
    child: Child,
    id: String,
}

impl ForeignSockmap {
    fn load() -> Self {
        let mut child = std::process::Command::new(SYSTEM_PYTHON)
            .args([&peer_script("foreign_sockmap.py"), FOREIGN_MAP, "300"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting foreign_sockmap.py");
        let line = stdout_lines(&mut child)
            .recv_timeout(LIMIT)
            .unwrap_or_default();
        let id = line
            .trim()
            .strip_prefix("ready id=")
            .unwrap_or_else(|| panic!("foreign_sockmap.py said {line:?}"))
            .to_string();
        Self { child, id }
    }

    /// Closes its stdin (it exits, and the kernel frees the map) and waits for it.
    fn unload(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for ForeignSockmap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `conns` edge-triggered clients through the agent, echoed byte-exact.
fn echo_through(cgroup: &TestCgroup, echo: &EchoServer, conns: u64) {
    let report = python(
        cgroup,
        &[
            &peer_script("duplex_client.py"),
            &echo.addr().to_string(),
            &conns.to_string(),
            "5",
            "200000",
        ],
        LIMIT,
    );
    assert!(
        report.starts_with(&format!("ok connections={conns}")),
        "{report}"
    );
}

/// Connections to the echo server the agent has seen so far, and how many of them went by the
/// fast path (both directions redirected).
struct Totals {
    opened: u64,
    accelerated: u64,
}

fn assert_totals(agent: &Agent, echo: &EchoServer, totals: Totals) {
    let port = echo.addr().port().to_string();
    agent.assert_metric("tcp_open_total", &[("target_port", &port)], totals.opened);
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "accelerated")],
        totals.accelerated,
    );
    agent.assert_metric(
        "sockmesh_kernel_accelerate_total",
        &[("decision", "redirected")],
        2 * totals.accelerated,
    );
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn another_tools_socket_map_pauses_the_fast_path_while_it_is_loaded() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("accelforeign");
    // Loaded before the agent starts: the fast path is off from the first connection.
    let foreign = ForeignSockmap::load();
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec![
                "--accelerate=local".to_string(),
                format!("--opaque-ports={}", echo.addr().port()),
            ],
            ..Default::default()
        },
    );
    agent.assert_metric("sockmesh_accelerate_foreign_socket_maps", &[], 1);
    let log = agent.log_text();
    assert!(
        log.contains("--accelerate local paused")
            && log.contains(&format!("{FOREIGN_MAP} (id {})", foreign.id)),
        "{log}"
    );
    // Through the agent all the same (spliced, then forwarded in the kernel once chatty),
    // but none accelerated.
    echo_through(&cgroup, &echo, 5);
    assert_totals(
        &agent,
        &echo,
        Totals {
            opened: 5,
            accelerated: 0,
        },
    );

    // Gone: new connections are accelerated again, both directions of each.
    foreign.unload();
    agent.assert_metric("sockmesh_accelerate_foreign_socket_maps", &[], 0);
    echo_through(&cgroup, &echo, 5);
    assert_totals(
        &agent,
        &echo,
        Totals {
            opened: 10,
            accelerated: 5,
        },
    );

    // Loaded while the agent runs: paused again within the check period.
    let foreign = ForeignSockmap::load();
    agent.assert_metric("sockmesh_accelerate_foreign_socket_maps", &[], 1);
    echo_through(&cgroup, &echo, 5);
    assert_totals(
        &agent,
        &echo,
        Totals {
            opened: 15,
            accelerated: 5,
        },
    );
    foreign.unload();
    agent.assert_maps_empty(&["ACCEL_SOCKS", "ACCEL_PAIRS", "ACCEL_READS"]);
}
