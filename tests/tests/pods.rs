//! Pod mode: pods in their own network namespaces, wired by the real CNI plugins (bridge,
//! host-local, loopback) with `sockmesh-cni` chained after them, talk through the agent. Each
//! test makes its own cgroup, bridge and namespaces and removes them afterwards; traffic stays
//! on the test's bridge and loopback.

use std::{
    collections::HashMap, fs, net::SocketAddr, path::Path, process::Command, time::Duration,
};

use integration_tests::{
    Agent, AgentOptions, TestCgroup, meshprobe_bin,
    pod::{Pod, PodNetwork, connects_from, invoke_plugin},
    process::{eventually, run_ok},
    require_privileged,
    servers::{ServerProcess, write_file},
    temp_dir,
};

const LIMIT: Duration = Duration::from_secs(60);
const REDIS_PORT: u16 = 6380;

fn agent_with_opaque_redis(cgroup: &TestCgroup, cni_dir: Option<&Path>) -> Agent {
    Agent::start_with(
        cgroup,
        AgentOptions {
            args: vec![format!("--opaque-ports={REDIS_PORT}")],
            cni_dir: cni_dir.map(Path::to_path_buf),
            ..AgentOptions::default()
        },
    )
}

fn pod_labels<'a>(pod: &'a str, port: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("namespace", "test-ns"),
        ("pod", pod),
        ("target_port", port),
    ]
}

/// redis-server in pod `b`, on the port the agents here treat as opaque.
fn redis_in(b: &Pod) -> (ServerProcess, SocketAddr) {
    let addr = SocketAddr::new(b.ip, REDIS_PORT);
    (
        b.server(ServerProcess::redis_command(addr), addr, None),
        addr,
    )
}

/// redis-cli PING from pod `a` (through the agent while `a` is served).
fn ping(a: &Pod, redis: SocketAddr) -> String {
    run_ok(
        a.command("redis-cli").args([
            "-h",
            &redis.ip().to_string(),
            "-p",
            &redis.port().to_string(),
            "PING",
        ]),
        LIMIT,
    )
}

/// The `SERVED_NETNS` entries of an agent (the host's, plus one per served pod).
fn served_namespaces(agent: &Agent) -> usize {
    agent.map_entries("SERVED_NETNS")
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn pod_to_pod_http_h2c_and_opaque_are_proxied_from_the_pods_address() {
    require_privileged!();
    let cgroup = TestCgroup::new("pods");
    let agent = agent_with_opaque_redis(&cgroup, None);
    let network = PodNetwork::new(&agent.cni_socket);
    let a = network.add_pod("a", &cgroup);
    let b = network.add_pod("b", &cgroup);
    agent.assert_metric("sockmesh_served_pods", &[], 2);
    assert_eq!(served_namespaces(&agent), 3);

    let dir = temp_dir("pods");
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap();
    write_file(&www.join("blob"), 400_000);
    let http_addr = SocketAddr::new(b.ip, 8080);
    let http_log = dir.join("http.log");
    let _http = b.server(
        ServerProcess::http_command(&www, http_addr),
        http_addr,
        Some(&http_log),
    );
    let h2_addr = SocketAddr::new(b.ip, 8081);
    let _nginx = b.server(
        ServerProcess::nginx_h2c_command(&www, h2_addr),
        h2_addr,
        None,
    );
    let (_redis, redis_addr) = redis_in(&b);

    // HTTP/1: byte-exact, and the server saw pod A's address.
    let downloaded = dir.join("h1");
    let status = run_ok(
        a.command("curl")
            .args(["-sS", "-w", "%{http_code}", "-o"])
            .arg(&downloaded)
            .arg(format!("http://{http_addr}/blob")),
        LIMIT,
    );
    assert_eq!(status, "200");
    assert_eq!(
        fs::read(&downloaded).unwrap(),
        fs::read(www.join("blob")).unwrap()
    );
    // Pod B's inbound side dials the server from the passthrough address.
    let seen = fs::read_to_string(&http_log).unwrap_or_default();
    assert!(
        seen.contains("127.0.0.6 - -"),
        "the server should see the agent's passthrough address as the client: {seen}"
    );

    // HTTP/2 prior knowledge.
    let downloaded = dir.join("h2");
    let version = run_ok(
        a.command("curl")
            .args([
                "-sS",
                "--http2-prior-knowledge",
                "-w",
                "%{http_version}",
                "-o",
            ])
            .arg(&downloaded)
            .arg(format!("http://{h2_addr}/blob")),
        LIMIT,
    );
    assert_eq!(version, "2");
    assert_eq!(
        fs::read(&downloaded).unwrap(),
        fs::read(www.join("blob")).unwrap()
    );

    // Opaque (a configured opaque port): redis sees pod A as its client.
    let redis_cli = |args: &[&str]| {
        run_ok(
            a.command("redis-cli")
                .args(["-h", &b.ip.to_string(), "-p", &REDIS_PORT.to_string()])
                .args(args),
            LIMIT,
        )
    };
    assert_eq!(redis_cli(&["SET", "mesh", "pods"]).trim(), "OK");
    assert_eq!(redis_cli(&["GET", "mesh"]).trim(), "pods");
    let clients = redis_cli(&["CLIENT", "LIST"]);
    assert!(clients.contains("addr=127.0.0.6:"), "{clients}");
    // The application in pod A sees its original peer, as in host mode.
    let peer = run_ok(
        a.command(meshprobe_bin())
            .args(["peer", &redis_addr.to_string()]),
        LIMIT,
    );
    assert_eq!(peer.trim(), format!("peer={redis_addr}"));

    // Both sides: pod A's connect outbound, and the same connection arriving in pod B.
    agent.assert_metric("tcp_open_total", &pod_labels("a", "8080"), 1);
    for (pod, direction) in [("a", "outbound"), ("b", "inbound")] {
        for port in ["8080", "8081"] {
            let labels = [&pod_labels(pod, port)[..], &[("direction", direction)]].concat();
            agent.assert_metric("request_total", &labels, 1);
        }
    }
    agent.assert_metric(
        "tcp_open_total",
        &[("pod", "b"), ("direction", "outbound")],
        0,
    );
    agent.assert_metric(
        "tcp_detect_total",
        &[("pod", "a"), ("result", "http2"), ("target_port", "8081")],
        1,
    );
    agent.assert_metric(
        "tcp_detect_total",
        &[("pod", "a"), ("result", "opaque_port")],
        4,
    );
    agent.assert_metric("tcp_close_total", &[("pod", "a"), ("errno", "")], 6);
    let metrics = agent.metrics();
    assert!(metrics.count("tcp_read_bytes_total", &pod_labels("a", "8080")) > 400_000);
    assert!(metrics.count("tcp_read_bytes_total", &pod_labels("b", "8080")) > 400_000);
    assert_eq!(metrics.count("tcp_open_total", &[("pod", "")]), 0);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn unregistered_namespaces_connect_directly() {
    require_privileged!();
    let cgroup = TestCgroup::new("unserved");
    let agent = Agent::start(&cgroup);
    // The old failure shape: a process in the meshed cgroup and in a fresh network namespace,
    // connecting to a server in that namespace. Nothing registered it, so nothing redirects.
    let netns = format!("smtu{}", std::process::id());
    run_ok(Command::new("ip").args(["netns", "add", &netns]), LIMIT);
    let _cleanup = NetnsGuard(netns.clone());
    run_ok(
        Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]),
        LIMIT,
    );
    let netns_path = Path::new("/run/netns").join(&netns);
    let dir = temp_dir("unserved");
    write_file(&dir.join("page"), 1000);
    let addr: SocketAddr = "127.0.0.1:8090".parse().unwrap();
    let server = ServerProcess::http_command(&dir, addr);
    let mut wrapped = Command::new("nsenter");
    wrapped
        .arg(format!("--net={}", netns_path.display()))
        .arg("--")
        .arg(server.get_program())
        .args(server.get_args())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let netns_for_probe = netns_path.clone();
    let _server = ServerProcess::start_checked(wrapped, addr, move |addr| {
        connects_from(&netns_for_probe, addr)
    });

    for _ in 0..3 {
        let status = run_ok(
            cgroup
                .command("nsenter")
                .arg(format!("--net={}", netns_path.display()))
                .args(["--", "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://{addr}/page")),
            LIMIT,
        );
        assert_eq!(
            status, "200",
            "a connect in an unserved namespace must go direct"
        );
    }
    agent.assert_metric(
        "sockmesh_kernel_connects_total",
        &[("decision", "bypassed_unserved_netns")],
        3,
    );
    agent.assert_metric(
        "sockmesh_kernel_connects_total",
        &[("decision", "redirected")],
        0,
    );
    agent.assert_metric("tcp_open_total", &[], 0);
}

struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn del_closes_the_pods_listeners_and_forgets_it() {
    require_privileged!();
    let cgroup = TestCgroup::new("podel");
    let agent = agent_with_opaque_redis(&cgroup, None);
    let network = PodNetwork::new(&agent.cni_socket);
    let a = network.add_pod("a", &cgroup);
    let b = network.add_pod("b", &cgroup);
    let listener = SocketAddr::from(([127, 0, 0, 1], agent.outbound_port));
    assert!(
        eventually(Duration::from_secs(10), || connects_from(
            &a.netns_path,
            listener
        )),
        "A has the agent's listener"
    );
    let (_redis, redis_addr) = redis_in(&b);
    let ping = || ping(&a, redis_addr);
    assert_eq!(ping().trim(), "PONG");
    agent.assert_metric("tcp_open_total", &[("pod", "a")], 1);
    let check = a.sockmesh_cni("CHECK");
    assert!(check.status.success(), "CHECK of a served pod: {check:?}");

    // DEL of sockmesh-cni only: the pod keeps its interface and now connects directly.
    let deleted = a.sockmesh_cni("DEL");
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(
        eventually(Duration::from_secs(10), || !connects_from(
            &a.netns_path,
            listener
        )),
        "A's listener is still open after DEL"
    );
    agent.assert_metric("sockmesh_served_pods", &[], 1);
    assert_eq!(served_namespaces(&agent), 2);
    assert_eq!(ping().trim(), "PONG");
    agent.assert_metric("tcp_open_total", &[("pod", "a")], 1);
    agent.assert_metric(
        "sockmesh_kernel_connects_total",
        &[("decision", "bypassed_unserved_netns")],
        1,
    );
    agent.assert_maps_empty(&["ORIG_BY_TUPLE"]);
    assert!(
        !agent
            .cni_socket
            .with_file_name("pods")
            .join(format!("{}.json", a.container_id))
            .exists()
    );

    // DEL again, and DEL of a pod nobody ever added: both succeed.
    assert!(a.sockmesh_cni("DEL").status.success());
    let unknown = invoke_plugin(
        "sockmesh-cni",
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "never-added"),
            ("CNI_NETNS", "/run/netns/does-not-exist"),
            ("CNI_IFNAME", "eth0"),
        ],
        format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"sockmesh-cni","agent_socket":"{}"}}"#,
            agent.cni_socket.display()
        )
        .as_bytes(),
    );
    assert!(unknown.status.success(), "{unknown:?}");
    // CHECK now reports the pod as not served, with the plugin's own error code.
    let check = a.sockmesh_cni("CHECK");
    assert!(!check.status.success());
    let error: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(error["code"], 100, "{error}");

    // A DEL whose registry file cannot be removed (here a directory stands in its place)
    // still stops serving the pod; the error reaches the plugin's log, and DEL succeeds.
    let b_file = agent
        .cni_socket
        .with_file_name("pods")
        .join(format!("{}.json", b.container_id));
    fs::remove_file(&b_file).unwrap();
    fs::create_dir(&b_file).unwrap();
    let deleted = b.sockmesh_cni("DEL");
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(
        String::from_utf8_lossy(&deleted.stderr).contains("DEL: "),
        "{deleted:?}"
    );
    agent.assert_metric("sockmesh_served_pods", &[], 0);
    assert!(
        eventually(Duration::from_secs(10), || !connects_from(
            &b.netns_path,
            listener
        )),
        "B's listener is still open after its DEL"
    );
    fs::remove_dir(&b_file).unwrap();
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_removed_pods_metric_series_go_after_the_retention_unless_it_comes_back() {
    require_privileged!();
    let cgroup = TestCgroup::new("podseries");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec![
                format!("--opaque-ports={REDIS_PORT}"),
                "--pod-metrics-retention=1s".into(),
            ],
            ..AgentOptions::default()
        },
    );
    let network = PodNetwork::new(&agent.cni_socket);
    let a = network.add_pod("a", &cgroup);
    let b = network.add_pod("b", &cgroup);
    let (_redis, redis_addr) = redis_in(&b);
    assert_eq!(ping(&a, redis_addr).trim(), "PONG");
    agent.assert_metric("tcp_open_total", &[("pod", "a")], 1);
    let series_of = |pod: &str| {
        let text = agent.get("/metrics").expect("scraping /metrics").1;
        let label = format!("pod=\"{pod}\"");
        text.lines()
            .filter(|line| !line.starts_with('#') && line.contains(&label))
            .count()
    };
    assert!(series_of("a") > 0);

    // Removed and added again under its name within the retention (a StatefulSet's pod
    // restarting): its series carry on.
    assert!(a.sockmesh_cni("DEL").status.success());
    assert!(a.sockmesh_cni("ADD").status.success());
    assert!(
        eventually(LIMIT, || agent
            .log_text()
            .contains("a pod of the same name is served again")),
        "the retention never ran out:\n{}",
        agent.log_text()
    );
    agent.assert_metric("tcp_open_total", &[("pod", "a")], 1);

    // Removed for good: once the retention has passed, nothing of pod a is left on /metrics;
    // pod b's series (its inbound connection) stay.
    assert!(a.sockmesh_cni("DEL").status.success());
    assert!(
        eventually(LIMIT, || series_of("a") == 0),
        "pod a's series are still there: {}",
        series_of("a")
    );
    assert!(
        agent
            .log_text()
            .contains("forgot a removed pod's metric series")
    );
    assert!(series_of("b") > 0, "pod b's series went too");
    agent.assert_metric("sockmesh_served_pods", &[], 1);
}

/// A removed pod's connection still open when its drain (`--shutdown-grace`) ends is cut,
/// and leaves the books right: out of `tcp_open_connections`, its close counted.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_connection_cut_at_the_pods_drain_deadline_is_counted_closed() {
    require_privileged!();
    let cgroup = TestCgroup::new("podcut");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec![
                format!("--opaque-ports={REDIS_PORT}"),
                "--shutdown-grace=1s".to_string(),
            ],
            ..AgentOptions::default()
        },
    );
    let network = PodNetwork::new(&agent.cni_socket);
    let a = network.add_pod("a", &cgroup);
    let b = network.add_pod("b", &cgroup);
    let (_redis, redis) = redis_in(&b);
    // A subscriber's connection stays open until it is cut.
    let mut subscriber = a
        .command("redis-cli")
        .args([
            "-h",
            &redis.ip().to_string(),
            "-p",
            &redis.port().to_string(),
            "SUBSCRIBE",
            "news",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let open_in_a = || {
        agent
            .metrics()
            .count("tcp_open_connections", &[("pod", "a")])
    };
    assert!(
        eventually(Duration::from_secs(10), || open_in_a() == 1),
        "the subscriber is proxied"
    );
    assert!(a.sockmesh_cni("DEL").status.success());
    assert!(
        eventually(Duration::from_secs(10), || open_in_a() == 0),
        "still open after the drain: {}",
        open_in_a()
    );
    agent.assert_metric(
        "tcp_close_total",
        &[("pod", "a"), ("errno", "ECONNABORTED")],
        1,
    );
    let _ = subscriber.kill();
    let _ = subscriber.wait();
}

/// An IPv6 link-local destination is reached through the interface its scope id names, which
/// the original destination does not keep, and a socket bound to an interface cannot reach the
/// agent on lo: both connects go direct (redirected, they failed where direct ones work).
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn link_local_destinations_go_direct() {
    require_privileged!();
    let cgroup = TestCgroup::new("podll");
    let agent = agent_with_opaque_redis(&cgroup, None);
    let network = PodNetwork::new(&agent.cni_socket);
    let a = network.add_pod("a", &cgroup);
    let b = network.add_pod("b", &cgroup);
    for (pod, address) in [(&a, "fe80::a/64"), (&b, "fe80::b/64")] {
        run_ok(
            Command::new("nsenter")
                .arg(format!("--net={}", pod.netns_path.display()))
                .args(["ip", "-6", "addr", "add", address, "dev", "eth0", "nodad"]),
            LIMIT,
        );
    }
    let any = SocketAddr::from(([0u16; 8], REDIS_PORT));
    let _redis = b.server(ServerProcess::redis_command(any), any, None);
    let pong = run_ok(
        a.command("redis-cli")
            .args(["-h", "fe80::b%eth0", "-p", &REDIS_PORT.to_string(), "PING"]),
        LIMIT,
    );
    assert_eq!(pong.trim(), "PONG");

    // A socket bound to eth0 (curl --interface: SO_BINDTODEVICE) cannot reach the agent on
    // lo; it goes direct too.
    let www = temp_dir("podll");
    write_file(&www.join("blob"), 1000);
    let http = SocketAddr::new(b.ip, 8080);
    let _http = b.server(ServerProcess::http_command(&www, http), http, None);
    let status = run_ok(
        a.command("curl").args([
            "-sS",
            "--interface",
            "eth0",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{http}/blob"),
        ]),
        LIMIT,
    );
    assert_eq!(status, "200");
    let bypassed = agent.metrics().count(
        "sockmesh_kernel_connects_total",
        &[("decision", "bypassed_network")],
    );
    assert!(bypassed >= 2, "bypassed_network {bypassed}");
    agent.assert_metric("tcp_open_total", &[("pod", "a")], 0);
    let _ = fs::remove_dir_all(&www);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn host_network_pods_are_left_alone() {
    require_privileged!();
    let cgroup = TestCgroup::new("hostnet");
    let agent = Agent::start(&cgroup);
    let prev = r#"{"cniVersion":"1.0.0","interfaces":[],"ips":[]}"#;
    let output = invoke_plugin(
        "sockmesh-cni",
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "hostnetpod"),
            ("CNI_NETNS", "/proc/1/ns/net"),
            ("CNI_IFNAME", "eth0"),
        ],
        format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"sockmesh-cni","agent_socket":"{}","prevResult":{prev}}}"#,
            agent.cni_socket.display()
        )
        .as_bytes(),
    );
    assert!(output.status.success(), "{output:?}");
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        result,
        serde_json::from_str::<serde_json::Value>(prev).unwrap()
    );
    agent.assert_metric("sockmesh_served_pods", &[], 0);
    assert_eq!(served_namespaces(&agent), 1);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_restarted_agent_readopts_its_pods_and_a_killed_one_fails_open() {
    require_privileged!();
    let cgroup = TestCgroup::new("readopt");
    let cni_dir = temp_dir("readopt");
    let first = agent_with_opaque_redis(&cgroup, Some(&cni_dir));
    let network = PodNetwork::new(&first.cni_socket);
    let a = network.add_pod("a", &cgroup);
    let b = network.add_pod("b", &cgroup);
    let (_redis, redis_addr) = redis_in(&b);
    let ping = || ping(&a, redis_addr);
    assert_eq!(ping().trim(), "PONG");
    first.assert_metric("tcp_open_total", &[("pod", "a")], 1);
    assert!(first.stop().success());

    // A new agent, the same registry: no new ADD, and the pods are proxied again.
    let second = agent_with_opaque_redis(&cgroup, Some(&cni_dir));
    second.assert_metric("sockmesh_served_pods", &[], 2);
    // redis in b listened before this agent started: found in the kernel's socket list.
    let found = eventually(Duration::from_secs(15), || {
        second.map_entries("INBOUND_PORTS") == 1
    });
    assert!(found, "the re-adopted pod's listener is not captured");
    assert_eq!(ping().trim(), "PONG");
    second.assert_metric(
        "tcp_open_total",
        &[("pod", "a"), ("namespace", "test-ns")],
        1,
    );
    second.assert_metric(
        "tcp_open_total",
        &[("pod", "b"), ("direction", "inbound")],
        1,
    );

    // SIGKILL: the links go with the process, and pods connect directly.
    second.signal(libc::SIGKILL);
    let mut second = second;
    second.wait_exit();
    for _ in 0..3 {
        assert_eq!(ping().trim(), "PONG");
    }
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn twenty_pods_come_and_go_without_leaks() {
    require_privileged!();
    let cgroup = TestCgroup::new("churn");
    let agent = Agent::start(&cgroup);
    let network = PodNetwork::new(&agent.cni_socket);
    // The first pod creates the bridge; the churn then runs against a settled agent.
    drop(network.add_pod("warmup", &cgroup));
    agent.assert_metric("sockmesh_served_pods", &[], 0);
    let fds = agent.fd_count();
    let threads = thread_count(agent.pid());

    for round in 0..10 {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..20)
                .map(|i| {
                    let (network, cgroup) = (&network, &cgroup);
                    scope.spawn(move || network.add_pod(&format!("r{round}p{i}"), cgroup))
                })
                .collect();
            let mut pods: Vec<_> = handles
                .into_iter()
                .map(|handle| handle.join().expect("adding a pod"))
                .collect();
            assert_eq!(served_namespaces(&agent), 21, "round {round}");
            let ips: HashMap<_, _> = pods.iter().map(|pod| (pod.ip, ())).collect();
            assert_eq!(ips.len(), 20, "every pod has its own address");
            std::thread::scope(|scope| {
                for pod in &mut pods {
                    scope.spawn(move || pod.delete());
                }
            });
        });
        assert_eq!(served_namespaces(&agent), 1, "round {round}");
    }
    agent.assert_metric("sockmesh_served_pods", &[], 0);
    let settled = eventually(Duration::from_secs(10), || agent.fd_count() <= fds);
    assert!(
        settled,
        "fds: {} after the churn, {fds} before",
        agent.fd_count()
    );
    // Registry changes run on tokio's blocking pool, whose idle threads exit after 10 s.
    let settled = eventually(Duration::from_secs(20), || {
        thread_count(agent.pid()) <= threads
    });
    assert!(
        settled,
        "threads: {} after, {threads} before",
        thread_count(agent.pid())
    );
    agent.assert_maps_empty(&["ORIG_BY_TUPLE", "ORIG_BY_COOKIE"]);
    let registry = agent.cni_socket.with_file_name("pods");
    let left = fs::read_dir(&registry).map(|dir| dir.count()).unwrap_or(0);
    assert_eq!(left, 0, "registrations left in {}", registry.display());
}

fn thread_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[test]
fn cni_errors_are_spec_json_and_an_absent_agent_fails_open() {
    let dir = temp_dir("cnierr");
    let socket = dir.join("cni.sock");
    let config = |extra: &str| {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"sockmesh-cni","agent_socket":"{}"{extra}}}"#,
            socket.display()
        )
    };
    let env_add = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "pod1"),
        ("CNI_NETNS", "/run/netns/not-there"),
        ("CNI_IFNAME", "eth0"),
    ];
    let error_code = |output: &std::process::Output| -> u64 {
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let error: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {output:?}"));
        assert!(error["msg"].as_str().is_some_and(|msg| !msg.is_empty()));
        error["code"].as_u64().expect("a code")
    };

    let bad_json = invoke_plugin("sockmesh-cni", &env_add, b"{\"cniVersion\": ");
    assert_eq!(error_code(&bad_json), 6);
    let unknown = invoke_plugin(
        "sockmesh-cni",
        &[("CNI_COMMAND", "FROBNICATE"), ("CNI_CONTAINERID", "pod1")],
        config("").as_bytes(),
    );
    assert_eq!(error_code(&unknown), 4);
    let no_netns = invoke_plugin(
        "sockmesh-cni",
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "pod1"),
            ("CNI_IFNAME", "eth0"),
        ],
        config("").as_bytes(),
    );
    assert_eq!(error_code(&no_netns), 4);
    let old = invoke_plugin("sockmesh-cni", &env_add, br#"{"cniVersion":"9.0.0"}"#);
    assert_eq!(error_code(&old), 1);

    let version = invoke_plugin("sockmesh-cni", &[("CNI_COMMAND", "VERSION")], b"");
    assert!(version.status.success());
    let versions: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(
        versions["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "1.0.0")
    );

    // No agent listens on the socket: ADD succeeds, passes prevResult on unchanged, and leaves
    // the pod registered for the agent to adopt when it starts.
    let prev = r#"{"cniVersion":"1.0.0","ips":[{"address":"10.213.250.9/24"}],"dns":{}}"#;
    let added = invoke_plugin(
        "sockmesh-cni",
        &env_add,
        config(&format!(r#","prevResult":{prev}"#)).as_bytes(),
    );
    assert!(added.status.success(), "{added:?}");
    let result: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    assert_eq!(
        result,
        serde_json::from_str::<serde_json::Value>(prev).unwrap()
    );
    assert!(String::from_utf8_lossy(&added.stderr).contains("unmeshed"));
    assert!(dir.join("pods/pod1.json").exists());
    let deleted = invoke_plugin(
        "sockmesh-cni",
        &[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "pod1")],
        config("").as_bytes(),
    );
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(!dir.join("pods/pod1.json").exists());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn an_agent_replaced_in_place_refuses_no_connect() {
    require_privileged!();
    let cgroup = TestCgroup::new("rollout");
    let cni_dir = temp_dir("rollout");
    let first = agent_with_opaque_redis(&cgroup, Some(&cni_dir));
    let network = PodNetwork::new(&first.cni_socket);
    let a = network.add_pod("a", &cgroup);
    let b = network.add_pod("b", &cgroup);
    let (_redis, redis_addr) = redis_in(&b);

    // A client in pod A connects over and over (bounded: 60 s at most) while the agent is
    // replaced the way the DaemonSet's rolling update does it: SIGTERM, then a new agent.
    let stop = cni_dir.join("stop");
    let script = format!(
        "end=$((SECONDS+60)); while [ ! -e {stop} ] && [ $SECONDS -lt $end ]; do \
         redis-cli -h {ip} -p {port} PING 2>&1 || echo FAILED; done",
        stop = stop.display(),
        ip = redis_addr.ip(),
        port = redis_addr.port()
    );
    let client = std::thread::spawn({
        let mut command = a.command("bash");
        command.args(["-c", &script]);
        move || run_ok(&mut command, Duration::from_secs(90))
    });
    assert!(eventually(LIMIT, || first
        .metrics()
        .count("tcp_open_total", &[("pod", "a")])
        >= 20));
    assert!(first.stop().success());
    let second = agent_with_opaque_redis(&cgroup, Some(&cni_dir));
    assert!(eventually(LIMIT, || second
        .metrics()
        .count("tcp_open_total", &[("pod", "a")])
        >= 20));
    fs::write(&stop, b"").unwrap();
    let output = client.join().expect("the client loop");
    let pongs = output.lines().filter(|line| line.trim() == "PONG").count();
    let failures: Vec<_> = output
        .lines()
        .filter(|line| line.trim() != "PONG")
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} connects failed: {failures:?}",
        failures.len(),
        pongs + failures.len()
    );
    assert!(pongs >= 40, "{pongs}");
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_pod_whose_namespace_vanishes_without_del_is_dropped() {
    require_privileged!();
    let cgroup = TestCgroup::new("vanish");
    let agent = Agent::start(&cgroup);
    let network = PodNetwork::new(&agent.cni_socket);
    let a = network.add_pod("a", &cgroup);
    agent.assert_metric("sockmesh_served_pods", &[], 1);
    // The runtime removes the namespace itself (it crashed, or cleaned up) and never sends DEL.
    run_ok(Command::new("ip").args(["netns", "del", &a.netns]), LIMIT);
    agent.assert_metric("sockmesh_served_pods", &[], 0);
    assert_eq!(served_namespaces(&agent), 1);
    let registry = agent.cni_socket.with_file_name("pods");
    assert!(!registry.join(format!("{}.json", a.container_id)).exists());
}
