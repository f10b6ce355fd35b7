//! In-kernel forwarding: an opaque connection that turns chatty (small messages back and
//! forth) is handed from splice to the kernel's sockmap verdict. These tests drive real
//! connections across that hand-off and check the bytes (pattern streams, both ways), the
//! half-close and reset that end them, and the byte counts /metrics reports live and at close.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    process::Stdio,
    thread,
    time::Duration,
};

use integration_tests::{
    Agent, AgentOptions, TestCgroup,
    clients::{Holder, probe},
    meshprobe_bin, require_privileged,
    servers::EchoServer,
};

/// Round trips per connection: enough for the agent to call it chatty (8 small messages).
const ROUNDS: u64 = 20;
/// Bytes per round trip message (meshprobe's chat message).
const MESSAGE: u64 = 100;
const LIMIT: Duration = Duration::from_secs(300);
/// Longer than a connection takes to count as idle (about a second without a byte).
const QUIET_LONGER_THAN_IDLE: Duration = Duration::from_secs(2);
/// Bytes each connection of `meshprobe hold` echoes before it goes idle ("idle connection\n").
const HELD_MESSAGE: u64 = 16;

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn chatty_connections_move_to_the_kernel_and_stay_byte_exact() {
    require_privileged!();
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        let echo = EchoServer::start(listen);
        let cgroup = TestCgroup::new("kfwd");
        // All 50 in the kernel at once (by default only while few connections are open).
        let agent = Agent::start_with(
            &cgroup,
            AgentOptions {
                args: vec!["--sockmap-connections=100".to_string()],
                ..Default::default()
            },
        );
        let (conns, bulk) = (50u64, 4_000_000u64);

        // Round trips, then megabytes echoed in both directions at once, then a half-close
        // from the client that the echo server answers with its own: all after the hand-off.
        let report = probe(
            &cgroup,
            &[
                "chat",
                &echo.addr().to_string(),
                &conns.to_string(),
                &ROUNDS.to_string(),
                &bulk.to_string(),
            ],
            LIMIT,
        );
        assert!(report.starts_with("ok connections=50"), "{report}");

        let port = echo.addr().port().to_string();
        let labels = [("target_port", port.as_str())];
        let per_direction = conns * (ROUNDS * MESSAGE + bulk);
        agent.assert_metric(
            "sockmesh_opaque_connections_total",
            &[("mode", "sockmap")],
            conns,
        );
        agent.assert_metric("tcp_close_total", &[labels[0], ("errno", "")], conns);
        agent.assert_metric("tcp_write_bytes_total", &labels, per_direction);
        agent.assert_metric("tcp_read_bytes_total", &labels, per_direction);
        // Closed sockets leave the socket maps on their own.
        agent.assert_maps_empty(&["FWD_PEERS", "FWD_ACTIVE"]);
    }
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn bytes_of_a_kernel_forwarded_connection_are_counted_while_it_is_open() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("kfwdlive");
    let agent = Agent::start(&cgroup);
    let bulk = 1_000_000u64;

    let held = HeldChat::start(&cgroup, &echo, bulk);

    // The connection is open and idle in the kernel: a scrape reads its counts from TCP_INFO.
    let port = echo.addr().port().to_string();
    let labels = [("target_port", port.as_str())];
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "sockmap")],
        1,
    );
    agent.assert_metric("tcp_open_connections", &labels, 1);
    agent.assert_metric("tcp_write_bytes_total", &labels, ROUNDS * MESSAGE);
    agent.assert_metric("tcp_read_bytes_total", &labels, ROUNDS * MESSAGE);

    held.finish();

    // Nothing counted twice across scrapes, nothing lost at close.
    agent.assert_metric("tcp_open_connections", &labels, 0);
    agent.assert_metric("tcp_write_bytes_total", &labels, ROUNDS * MESSAGE + bulk);
    agent.assert_metric("tcp_read_bytes_total", &labels, ROUNDS * MESSAGE + bulk);
}

/// `meshprobe chat ADDR 1 ROUNDS BULK hold|hold-chatting`: one connection that has chatted
/// (so it has been handed off) and waits, open, until told to send its bulk bytes; idle, or
/// making a round trip every 20 ms (busy).
struct HeldChat {
    child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
    bulk: u64,
}

impl HeldChat {
    /// Chats, then holds the connection idle.
    fn start(cgroup: &TestCgroup, echo: &EchoServer, bulk: u64) -> Self {
        Self::spawn(cgroup, echo, bulk, "hold")
    }

    /// Chats, then keeps chatting while held.
    fn start_chatting(cgroup: &TestCgroup, echo: &EchoServer, bulk: u64) -> Self {
        Self::spawn(cgroup, echo, bulk, "hold-chatting")
    }

    fn spawn(cgroup: &TestCgroup, echo: &EchoServer, bulk: u64, hold: &str) -> Self {
        let mut child = cgroup
            .command(meshprobe_bin())
            .args(["chat", &echo.addr().to_string(), "1", &ROUNDS.to_string()])
            .arg(bulk.to_string())
            .arg(hold)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting meshprobe");
        let mut stdout = BufReader::new(child.stdout.take().expect("probe stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("reading meshprobe");
        assert_eq!(line.trim(), "chatted");
        Self {
            child,
            stdout,
            bulk,
        }
    }

    /// Sends the bulk bytes, checks their echo and the clean end. Returns the bytes the
    /// connection moved each way.
    fn finish(mut self) -> u64 {
        self.child
            .stdin
            .take()
            .expect("probe stdin")
            .write_all(b"go\n")
            .expect("releasing meshprobe");
        let mut rest = String::new();
        self.stdout
            .read_to_string(&mut rest)
            .expect("reading meshprobe");
        let status = self.child.wait().expect("waiting for meshprobe");
        assert!(status.success(), "meshprobe failed: {rest}");
        assert!(rest.starts_with("ok connections=1"), "{rest}");
        let held_rounds = rest
            .split_whitespace()
            .find_map(|field| field.strip_prefix("extra_rounds="))
            .map_or(0, |rounds| rounds.parse::<u64>().expect("a round count"));
        (ROUNDS + held_rounds) * MESSAGE + self.bulk
    }
}

/// With more than `--sockmap-connections` opaque connections busy, a chatty one is copied in
/// user space (each kernel redirect wakes a kworker, which costs more than it saves with many
/// busy connections at once); once fewer are busy, the kernel takes chatty ones again. The
/// busy connections here are in the kernel: their activity comes from TCP_INFO.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn chatty_connections_are_copied_in_user_space_while_many_are_busy() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("kfwdlimit");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec!["--sockmap-connections=2".to_string()],
            ..Default::default()
        },
    );
    let bulk = 2_000_000u64;
    let mode = |mode: &str, expected: u64| {
        agent.assert_metric(
            "sockmesh_opaque_connections_total",
            &[("mode", mode)],
            expected,
        )
    };
    let first = HeldChat::start_chatting(&cgroup, &echo, bulk);
    mode("sockmap", 1);
    let second = HeldChat::start_chatting(&cgroup, &echo, bulk);
    mode("sockmap", 2);
    // Every scrape brings the kernel-forwarded connections' byte counts up to date; with none
    // for longer than a connection takes to count as idle, their activity must come from the
    // agent's own sweep (TCP_INFO).
    thread::sleep(QUIET_LONGER_THAN_IDLE);
    // Three busy: the third is copied.
    let third = HeldChat::start_chatting(&cgroup, &echo, bulk);
    mode("userspace", 1);
    mode("sockmap", 2);
    assert_eq!(agent.map_entries("FWD_ACTIVE"), 4);
    let mut moved = first.finish() + third.finish();
    agent.assert_metric("tcp_open_connections", &[], 1);
    // Two busy again: the kernel takes the fourth.
    let fourth = HeldChat::start_chatting(&cgroup, &echo, bulk);
    mode("sockmap", 3);
    moved += second.finish() + fourth.finish();
    mode("userspace", 1);
    let port = echo.addr().port().to_string();
    let labels = [("target_port", port.as_str())];
    agent.assert_metric("tcp_write_bytes_total", &labels, moved);
    agent.assert_metric("tcp_read_bytes_total", &labels, moved);
    agent.assert_maps_empty(&["FWD_PEERS", "FWD_ACTIVE"]);
}

/// Idle connections do not keep chatty ones out of the kernel: with three times
/// `--sockmap-connections` open but idle (a connection pool), a chatty connection is still
/// forwarded by the kernel, and once it is idle there (TCP_INFO shows no bytes) it does not
/// count either.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn idle_connections_leave_the_kernel_to_chatty_ones() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("kfwdidle");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec!["--sockmap-connections=1".to_string()],
            ..Default::default()
        },
    );
    let bulk = 100_000u64;
    let mode = |mode: &str, expected: u64| {
        agent.assert_metric(
            "sockmesh_opaque_connections_total",
            &[("mode", mode)],
            expected,
        )
    };
    let pool = Holder::start(&cgroup, echo.addr(), 3, false, LIMIT);
    // A connection counts as idle after about a second without a byte.
    agent.assert_metric("sockmesh_opaque_busy_connections", &[], 0);
    let first = HeldChat::start(&cgroup, &echo, bulk);
    mode("sockmap", 1);
    agent.assert_metric("sockmesh_opaque_busy_connections", &[], 0);
    let second = HeldChat::start(&cgroup, &echo, bulk);
    mode("sockmap", 2);
    let moved = first.finish() + second.finish();
    pool.release();
    mode("userspace", 0);
    // The pool's three connections stayed spliced (one message each way: not chatty).
    mode("splice", 3);
    agent.assert_metric("tcp_open_connections", &[], 0);
    let port = echo.addr().port().to_string();
    let labels = [("target_port", port.as_str())];
    let pool_bytes = 3 * HELD_MESSAGE;
    agent.assert_metric("tcp_write_bytes_total", &labels, moved + pool_bytes);
    agent.assert_maps_empty(&["FWD_PEERS", "FWD_ACTIVE"]);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_server_reset_after_the_hand_off_resets_the_client() {
    require_privileged!();
    // Echoes ROUNDS messages, then resets (SO_LINGER 0) instead of closing.
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
    let addr = listener.local_addr().expect("address");
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accepting");
        let mut message = [0u8; MESSAGE as usize];
        for _ in 0..ROUNDS {
            stream.read_exact(&mut message).expect("reading a message");
            stream.write_all(&message).expect("echoing");
        }
        integration_tests::reset_on_close(&stream).expect("SO_LINGER");
    });
    let cgroup = TestCgroup::new("kfwdreset");
    let agent = Agent::start(&cgroup);

    let report = probe(
        &cgroup,
        &[
            "chat",
            &addr.to_string(),
            "1",
            &ROUNDS.to_string(),
            "0",
            "expect-reset",
        ],
        LIMIT,
    );
    assert!(report.contains("closed=reset"), "{report}");
    server.join().expect("server thread");

    let port = addr.port().to_string();
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "sockmap")],
        1,
    );
    agent.assert_metric(
        "tcp_close_total",
        &[("target_port", port.as_str()), ("errno", "ECONNRESET")],
        1,
    );
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn splice_only_mode_never_hands_off() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("kfwdsplice");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec!["--copy-mode=splice".to_string()],
            ..Default::default()
        },
    );
    let report = probe(
        &cgroup,
        &[
            "chat",
            &echo.addr().to_string(),
            "5",
            &ROUNDS.to_string(),
            "100000",
        ],
        LIMIT,
    );
    assert!(report.starts_with("ok connections=5"), "{report}");
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "splice")],
        5,
    );
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "sockmap")],
        0,
    );
}
