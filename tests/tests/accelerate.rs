//! `--accelerate local` (experimental): connections to opaque ports move their bytes between
//! the application's socket and the agent's by sk_msg ingress redirects. Real clients and
//! servers, byte-exact both ways, and the rules that keep it safe: the bound on what either
//! side may be given unread, the application socket of a connection that is not accelerated
//! taken out of the fast path before it receives a byte (FIONREAD stays right), and an agent
//! killed with accelerated connections open leaves no application hanging.

use std::{fs, process::Stdio, sync::mpsc, thread, time::Duration};

use integration_tests::{
    Agent, AgentOptions, TestCgroup,
    clients::python,
    require_privileged,
    servers::{EchoServer, PatternServer, SYSTEM_PYTHON, ServerProcess, peer_script, write_file},
};

const LIMIT: Duration = Duration::from_secs(120);
/// `agent_common::ACCEL_BOUND` and the largest message one redirect moves.
const BOUND: u64 = 1 << 20;
const MESSAGE: u64 = 64 * 1024;
const ACCEL_MAPS: [&str; 3] = ["ACCEL_SOCKS", "ACCEL_PAIRS", "ACCEL_READS"];

fn accelerated_agent(cgroup: &TestCgroup, opaque_port: u16) -> Agent {
    Agent::start_with(
        cgroup,
        AgentOptions {
            args: vec![
                "--accelerate=local".to_string(),
                format!("--opaque-ports={opaque_port}"),
            ],
            ..Default::default()
        },
    )
}

/// duplex_client.py in the background: `conns` connections to `addr`, each `rounds` round
/// trips and then `bulk` bytes echoed; its output once it is done.
fn spawn_duplex_client(
    cgroup: &TestCgroup,
    addr: std::net::SocketAddr,
    conns: u64,
    rounds: u64,
    bulk: u64,
) -> thread::JoinHandle<std::process::Output> {
    let child = cgroup
        .command(SYSTEM_PYTHON)
        .arg(peer_script("duplex_client.py"))
        .args([
            addr.to_string(),
            conns.to_string(),
            rounds.to_string(),
            bulk.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("duplex client");
    thread::spawn(move || child.wait_with_output().expect("duplex client"))
}

/// The agent forwarded `bytes` each way to the server on `port`.
fn assert_bytes_each_way(agent: &Agent, port: &str, bytes: u64) {
    for metric in ["tcp_write_bytes_total", "tcp_read_bytes_total"] {
        agent.assert_metric(metric, &[("target_port", port)], bytes);
    }
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn chatty_and_bulk_connections_are_byte_exact_through_the_fast_path() {
    require_privileged!();
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        let echo = EchoServer::start(listen);
        let cgroup = TestCgroup::new("accel");
        let agent = accelerated_agent(&cgroup, echo.addr().port());
        let (conns, rounds, bulk) = (20u64, 20u64, 2_000_000u64);
        // Round trips of 100 bytes, then 2 MB echoed while sending, half-close, EOF; the
        // client non-blocking and edge-triggered (blocking ones: see the EAGAIN test below).
        let report = python(
            &cgroup,
            &[
                &peer_script("duplex_client.py"),
                &echo.addr().to_string(),
                &conns.to_string(),
                &rounds.to_string(),
                &bulk.to_string(),
            ],
            LIMIT,
        );
        assert!(report.starts_with("ok connections=20"), "{report}");

        let port = echo.addr().port().to_string();
        let per_direction = conns * (rounds * 100 + bulk);
        agent.assert_metric(
            "sockmesh_opaque_connections_total",
            &[("mode", "accelerated")],
            conns,
        );
        // Both directions of every connection redirected: the agent's from its first write,
        // the application's once the agent had read what it sent before the pairing.
        agent.assert_metric(
            "sockmesh_kernel_accelerate_total",
            &[("decision", "redirected")],
            2 * conns,
        );
        assert_bytes_each_way(&agent, &port, per_direction);
        agent.assert_metric(
            "tcp_close_total",
            &[("target_port", &port), ("errno", "")],
            conns,
        );
        agent.assert_maps_empty(&ACCEL_MAPS);
    }
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_gigabyte_each_way_and_a_thousand_chatty_connections_stay_byte_exact() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("accelbig");
    let agent = accelerated_agent(&cgroup, echo.addr().port());
    let addr = echo.addr().to_string();
    // One connection: 10 round trips, then 1 GB echoed while sending.
    let gigabyte = 1u64 << 30;
    let report = python(
        &cgroup,
        &[
            &peer_script("duplex_client.py"),
            &addr,
            "1",
            "10",
            &gigabyte.to_string(),
        ],
        Duration::from_secs(300),
    );
    assert!(report.starts_with("ok connections=1"), "{report}");
    // A thousand connections at once, each 10 round trips and 10 KB echoed.
    let report = python(
        &cgroup,
        &[
            &peer_script("duplex_client.py"),
            &addr,
            "1000",
            "10",
            "10000",
        ],
        Duration::from_secs(300),
    );
    assert!(report.starts_with("ok connections=1000"), "{report}");
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "accelerated")],
        1001,
    );
    agent.assert_metric(
        "sockmesh_kernel_accelerate_total",
        &[("decision", "redirected")],
        2 * 1001,
    );
    let port = echo.addr().port().to_string();
    agent.assert_metric(
        "tcp_read_bytes_total",
        &[("target_port", &port)],
        (1000 + gigabyte) + 1000 * (1000 + 10_000),
    );
    agent.assert_maps_empty(&ACCEL_MAPS);
}

/// Python inside the meshed cgroup: streams to the echo server at ARG1 while reading, and after
/// ARG2 bytes echoed resets the connection (SO_LINGER 0); or, with ARG2 "wait-reset", sends
/// one message and reads until the server's reset. Prints "reset" or what happened instead.
const RESETTING_CLIENT: &str = r#"
import socket, struct, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=30)
if sys.argv[2] == "wait-reset":
    s.sendall(b"go")
    got = 0
    try:
        while True:
            data = s.recv(65536)
            if not data:
                print("eof after", got); sys.exit(0)
            got += len(data)
    except ConnectionResetError:
        print("reset"); sys.exit(0)
limit, echoed = int(sys.argv[2]), 0
while echoed < limit:
    s.sendall(b"r" * 65536)
    echoed += len(s.recv(65536))
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
print("reset")
"#;

/// A server that answers every connection with 1 MiB and then a reset (SO_LINGER 0).
fn start_resetting_server() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the resetting server");
    let addr = listener.local_addr().expect("its address");
    thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let mut hello = [0u8; 2];
            let _ = stream.read_exact(&mut hello);
            let _ = stream.write_all(&vec![b's'; 1 << 20]);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    });
    addr
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_reset_mid_stream_on_either_side_reaches_the_other() {
    require_privileged!();
    // The client resets while streaming: the agent resets the server's side too.
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("accelrst");
    let agent = accelerated_agent(&cgroup, echo.addr().port());
    let report = python(
        &cgroup,
        &["-c", RESETTING_CLIENT, &echo.addr().to_string(), "4000000"],
        LIMIT,
    );
    assert_eq!(report.trim(), "reset");
    let port = echo.addr().port().to_string();
    agent.assert_metric(
        "tcp_close_total",
        &[("target_port", &port), ("errno", "ECONNRESET")],
        1,
    );
    agent.assert_maps_empty(&ACCEL_MAPS);
    drop(agent);

    // The server resets after 1 MiB: the client reads what came before it, then the reset.
    let server = start_resetting_server();
    let cgroup = TestCgroup::new("accelrst2");
    let agent = accelerated_agent(&cgroup, server.port());
    let report = python(
        &cgroup,
        &["-c", RESETTING_CLIENT, &server.to_string(), "wait-reset"],
        LIMIT,
    );
    assert_eq!(report.trim(), "reset");
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "accelerated")],
        1,
    );
    agent.assert_maps_empty(&ACCEL_MAPS);
}

/// Python inside the meshed cgroup: connects to ADDR, sends 1,000 bytes of the client pattern,
/// waits until its receive queue stops growing (FIONREAD), prints the most it held, then reads
/// the server's pattern to EOF, prints how much of it arrived intact, and half-closes.
const SLOW_READER: &str = r#"
import fcntl, socket, sys, termios, array, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host.strip("[]"), int(port)), timeout=60)
s.sendall(bytes((i % 251) ^ 1 for i in range(1000)))
def queued():
    n = array.array("i", [0]); fcntl.ioctl(s.fileno(), termios.FIONREAD, n); return n[0]
most, still, deadline = 0, 0, time.monotonic() + 20
while still < 10 and time.monotonic() < deadline:
    time.sleep(0.1)
    now = queued()
    still = still + 1 if now == most and now > 0 else 0
    most = max(most, now)
print("queued", most)
pattern = bytes((i % 251) ^ 2 for i in range(251)) * 300
total = 0
while True:
    data = s.recv(65536)
    if not data:
        break
    start = total % 251
    if data != pattern[start:start + len(data)]:
        print("corrupt at", total); sys.exit(1)
    total += len(data)
print("received", total)
s.shutdown(socket.SHUT_WR)
"#;

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_client_that_stops_reading_is_given_at_most_the_bound() {
    require_privileged!();
    let reply = 32u64 << 20;
    let server = PatternServer::start("127.0.0.1:0", reply);
    let cgroup = TestCgroup::new("accelslow");
    let agent = accelerated_agent(&cgroup, server.addr().port());
    let report = python(
        &cgroup,
        &["-c", SLOW_READER, &server.addr().to_string()],
        LIMIT,
    );
    let value = |key: &str| -> u64 {
        report
            .lines()
            .find_map(|line| line.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {report}"))
    };
    // The agent stops reading from the server once the client holds the bound unread (over
    // plain TCP the client's receive buffer would stop the server the same way).
    let queued = value("queued ");
    assert!(queued > BOUND / 2 && queued <= BOUND + MESSAGE, "{report}");
    assert_eq!(value("received "), reply, "{report}");
    let received = server.received(1);
    assert_eq!(received[0].bytes, 1000, "{:?}", received[0]);
    assert_eq!(received[0].error, None);
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "accelerated")],
        1,
    );
    agent.assert_maps_empty(&ACCEL_MAPS);
}

/// An echo server that, once a connection has sent `pause_after` bytes, stops reading it for
/// `pause`, then echoes the rest.
fn start_pausing_echo(pause_after: u64, pause: Duration) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the pausing echo");
    let addr = listener.local_addr().expect("its address");
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let (mut stream, mut buf, mut seen) = (stream, vec![0u8; 65536], 0u64);
                let mut paused = false;
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    seen += n as u64;
                    if seen >= pause_after && !paused {
                        paused = true;
                        thread::sleep(pause);
                    }
                }
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_server_that_stops_reading_sends_the_client_back_to_tcp_flow_control() {
    require_privileged!();
    // Round trips make both directions redirect; then the server stops reading for 5 s while
    // the client streams: the agent's writes to it block, the agent stops reading the client,
    // and once the client has redirected the bound unread its socket goes on by plain TCP,
    // whose window stops it. Then everything is echoed, in order.
    let (rounds, bulk) = (20u64, 16u64 << 20);
    let echo = start_pausing_echo(rounds * 100 + (256 << 10), Duration::from_secs(5));
    let cgroup = TestCgroup::new("accelfull");
    let agent = accelerated_agent(&cgroup, echo.port());
    let report = python(
        &cgroup,
        &[
            &peer_script("duplex_client.py"),
            &echo.to_string(),
            "1",
            &rounds.to_string(),
            &bulk.to_string(),
        ],
        LIMIT,
    );
    assert!(report.starts_with("ok connections=1"), "{report}");
    agent.assert_metric(
        "sockmesh_kernel_accelerate_total",
        &[("decision", "fell_back")],
        1,
    );
    let port = echo.port().to_string();
    agent.assert_metric(
        "tcp_write_bytes_total",
        &[("target_port", &port)],
        rounds * 100 + bulk,
    );
    agent.assert_maps_empty(&ACCEL_MAPS);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn nginx_serves_a_large_file_to_a_slow_client_through_the_fast_path() {
    require_privileged!();
    let dir = std::env::temp_dir().join(format!("sockmesh-accel-nginx-{}", std::process::id()));
    let root = dir.join("root");
    fs::create_dir_all(&root).expect("nginx root");
    write_file(&root.join("big.bin"), 50 << 20);
    let nginx = ServerProcess::nginx_h2c(&root);
    let cgroup = TestCgroup::new("accelnginx");
    let agent = accelerated_agent(&cgroup, nginx.addr.port());
    let fetched = dir.join("fetched.bin");
    let status = integration_tests::process::run_ok(
        cgroup
            .command("curl")
            .args(["-s", "--http2-prior-knowledge", "--limit-rate", "40M"])
            .args(["-o"])
            .arg(&fetched)
            .args(["-w", "%{http_code}"])
            .arg(format!("http://{}/big.bin", nginx.addr)),
        LIMIT,
    );
    assert_eq!(status, "200");
    let sum = |path: &std::path::Path| {
        integration_tests::process::run_ok(std::process::Command::new("sha256sum").arg(path), LIMIT)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(sum(&fetched), sum(&root.join("big.bin")));
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "accelerated")],
        1,
    );
    let _ = fs::remove_dir_all(&dir);
}

/// Python inside the meshed cgroup: one echo round trip on each of two connections, one to an
/// opaque port (ADDR1) and one not (ADDR2); on the second, the bytes the echo server sends
/// back must be counted by FIONREAD (a socket left in a sockhash would read 0 on 6.18).
const FIONREAD_CLIENT: &str = r#"
import fcntl, socket, sys, termios, array, time
def connect(addr):
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=30)
for name, addr in (("opaque", sys.argv[1]), ("detected", sys.argv[2])):
    s = connect(addr)
    s.sendall(b"x" * 1000)
    deadline, n = time.monotonic() + 10, array.array("i", [0])
    while time.monotonic() < deadline:
        fcntl.ioctl(s.fileno(), termios.FIONREAD, n)
        if n[0] >= 1000:
            break
        time.sleep(0.05)
    got = b""
    while len(got) < 1000:
        got += s.recv(1000 - len(got))
    print(name, n[0], got == b"x" * 1000)
    s.close()
"#;

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn fionread_is_right_on_accelerated_and_on_released_sockets() {
    require_privileged!();
    let opaque = EchoServer::start("127.0.0.1:0");
    let detected = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("accelfion");
    let agent = accelerated_agent(&cgroup, opaque.addr().port());
    let report = python(
        &cgroup,
        &[
            "-c",
            FIONREAD_CLIENT,
            &opaque.addr().to_string(),
            &detected.addr().to_string(),
        ],
        LIMIT,
    );
    assert!(report.contains("opaque 1000 True"), "{report}");
    assert!(report.contains("detected 1000 True"), "{report}");
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "accelerated")],
        1,
    );
    agent.assert_maps_empty(&ACCEL_MAPS);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn an_agent_stopped_with_sigterm_lets_an_accelerated_connection_finish() {
    require_privileged!();
    // The server pauses 3 s mid-stream: the connection is open when the agent is told to stop.
    let (rounds, bulk) = (10u64, 4u64 << 20);
    let echo = start_pausing_echo(rounds * 100 + (64 << 10), Duration::from_secs(3));
    let cgroup = TestCgroup::new("accelterm");
    let mut agent = accelerated_agent(&cgroup, echo.port());
    let client = spawn_duplex_client(&cgroup, echo, 1, rounds, bulk);
    let open = integration_tests::process::eventually(LIMIT, || {
        agent.metrics().count("tcp_open_connections", &[]) == 1
    });
    assert!(open, "the connection never opened");
    agent.signal(libc::SIGTERM);
    let output = client.join().expect("client thread");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.starts_with("ok connections=1"), "{output:?}");
    let status = agent.wait_exit();
    assert!(status.success(), "{status}");
}

/// Python inside the meshed cgroup: one echo round trip, then waits for the file ARG2 (the
/// agent has been killed), sends again and reports what the connection did within 10 s.
const AFTER_KILL_CLIENT: &str = r#"
import os, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=30)
s.sendall(b"ping"); assert s.recv(4) == b"ping"
print("chatted", flush=True)
deadline = time.monotonic() + 30
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.05)
s.settimeout(10)
try:
    s.sendall(b"again")
    data = s.recv(5)
    print("eof" if not data else "data")
except ConnectionResetError:
    print("reset")
except BrokenPipeError:
    print("reset")
except socket.timeout:
    print("hung")
"#;

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn an_agent_killed_with_accelerated_connections_open_leaves_nothing_hanging() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("accelkill");
    let mut agent = accelerated_agent(&cgroup, echo.addr().port());
    let killed = std::env::temp_dir().join(format!("sockmesh-accel-killed-{}", std::process::id()));
    let _ = fs::remove_file(&killed);
    let mut client = cgroup
        .command(SYSTEM_PYTHON)
        .args(["-c", AFTER_KILL_CLIENT, &echo.addr().to_string()])
        .arg(&killed)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python client");
    let line_rx = integration_tests::process::stdout_lines(&mut client);
    let first = line_rx.recv_timeout(LIMIT).expect("the client chatted");
    assert_eq!(first, "chatted");
    agent.signal(libc::SIGKILL);
    agent.wait_exit();
    fs::write(&killed, b"").expect("tell the client");
    let outcome = line_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the client reported");
    let _ = client.wait();
    let _ = fs::remove_file(&killed);
    // The agent's socket is gone: the application's next bytes go by plain TCP to a closed
    // socket and are answered with a reset (or its read sees the agent's close), never a hang.
    assert!(outcome == "reset" || outcome == "eof", "{outcome}");
}

/// Established connections to the agent's listener (accepted or not) and the bytes each has
/// queued, per `ss`.
fn queued_at_listener(port: u16) -> Vec<u64> {
    let out = integration_tests::process::run_ok(
        std::process::Command::new("ss").args([
            "-Htn",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ]),
        Duration::from_secs(10),
    );
    out.lines()
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn clients_that_send_before_the_agent_accepts_stay_byte_exact() {
    require_privileged!();
    let echo = EchoServer::start("127.0.0.1:0");
    let cgroup = TestCgroup::new("accelearly");
    let agent = accelerated_agent(&cgroup, echo.addr().port());
    // Stopped for less than the liveness timeout, so connects are still redirected: into the
    // listener's accept queue, where each client's first bytes wait by plain TCP.
    agent.signal(libc::SIGSTOP);
    let (conns, rounds, bulk) = (20u64, 5u64, 2_000_000u64);
    let client = spawn_duplex_client(&cgroup, echo.addr(), conns, rounds, bulk);
    // Every client connected and has its first 100 bytes queued at the agent, which has
    // accepted none.
    let mut queued = Vec::new();
    let sent_early = integration_tests::process::eventually(Duration::from_millis(700), || {
        queued = queued_at_listener(agent.outbound_port);
        queued.len() as u64 == conns && queued.iter().all(|&bytes| bytes > 0)
    });
    agent.signal(libc::SIGCONT);
    assert!(
        sent_early,
        "queued at the agent before it accepted: {queued:?}"
    );
    let output = client.join().expect("client thread");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.starts_with("ok connections=20"), "{output:?}");
    let port = echo.addr().port().to_string();
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "accelerated")],
        conns,
    );
    let per_direction = conns * (rounds * 100 + bulk);
    assert_bytes_each_way(&agent, &port, per_direction);
    // Both directions of every connection redirected: the agent's from its first write, the
    // application's once the agent had read the bytes it sent by TCP before being accepted.
    agent.assert_metric(
        "sockmesh_kernel_accelerate_total",
        &[("decision", "redirected")],
        2 * conns,
    );
    agent.assert_maps_empty(&ACCEL_MAPS);
}

/// A server that speaks and half-closes first: after the client's "hello" it sends 1 MiB of
/// its pattern and shuts its side down, then reads the client's stream to the end. Each
/// connection's result (bytes of the client's pattern read, or where it broke) goes to the
/// returned channel.
fn start_half_closing_server() -> (std::net::SocketAddr, mpsc::Receiver<Result<u64, String>>) {
    use std::io::Read;
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind the half-closing server");
    let addr = listener.local_addr().expect("its address");
    let (results, received) = mpsc::channel();
    thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let results = results.clone();
            thread::spawn(move || {
                let mut hello = [0u8; 5];
                let result = stream
                    .read_exact(&mut hello)
                    .and_then(|()| {
                        integration_tests::pattern::write_stream(&mut stream, 1 << 20, 2)
                    })
                    .and_then(|()| stream.shutdown(std::net::Shutdown::Write))
                    .and_then(|()| integration_tests::pattern::read_stream(&mut stream, 1));
                let _ = results.send(result.map_err(|error| error.to_string()));
            });
        }
    });
    (addr, received)
}

/// Python inside the meshed cgroup, blocking and single-threaded: "hello", then the server's
/// 1 MiB to its end of stream, then 4 MiB of its own pattern after that end, then its own.
const AFTER_EOF_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
pattern = lambda seed: bytes((i % 251) ^ seed for i in range(251)) * 1024
server_pattern, client_pattern = pattern(2), pattern(1)
for _ in range(int(sys.argv[2])):
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"hello")
    got = 0
    while True:
        data = s.recv(65536)
        if not data:
            break
        start = got % 251
        if data != server_pattern[start:start + len(data)]:
            sys.exit(f"corrupt at {got}")
        got += len(data)
    if got != 1 << 20:
        sys.exit(f"got {got} before the end of stream")
    sent = 0
    while sent < 4 << 20:
        chunk = client_pattern[sent % 251:sent % 251 + 65536]
        s.sendall(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    if s.recv(1) != b"":
        sys.exit("data after the end of stream")
    s.close()
print("ok")
"#;

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_server_that_half_closes_first_still_hears_the_client_out() {
    require_privileged!();
    let (server, results) = start_half_closing_server();
    let cgroup = TestCgroup::new("accelhalf");
    let agent = accelerated_agent(&cgroup, server.port());
    let conns = 5u64;
    let report = python(
        &cgroup,
        &[
            "-c",
            AFTER_EOF_CLIENT,
            &server.to_string(),
            &conns.to_string(),
        ],
        LIMIT,
    );
    assert_eq!(report.trim(), "ok");
    for _ in 0..conns {
        let read = results
            .recv_timeout(LIMIT)
            .expect("a result from the server");
        assert_eq!(
            read,
            Ok(4 << 20),
            "what the server read of the client after its FIN"
        );
    }
    // Both directions of each redirected: the client's once the agent had read its "hello".
    agent.assert_metric(
        "sockmesh_kernel_accelerate_total",
        &[("decision", "redirected")],
        2 * conns,
    );
    agent.assert_metric(
        "sockmesh_opaque_connections_total",
        &[("mode", "accelerated")],
        conns,
    );
    agent.assert_maps_empty(&ACCEL_MAPS);
}
