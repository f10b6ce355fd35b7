//! Per-workload policy (`--policy`, Linkerd's annotation names). In pod mode: one pod's opaque
//! and skipped ports leave another pod's defaults alone; a ConfigMap-style update (kubelet's
//! atomic swap of the `..data` symlink) takes effect without a restart; `linkerd.io/inject:
//! disabled` leaves a pod unmeshed; a broken file keeps the last good policy. In host mode: a
//! cgroup's skip-inbound-ports and opaque-ports apply to that cgroup's listeners and clients only.

use std::{fs, net::SocketAddr, path::Path, process::Command, time::Duration};

use integration_tests::{
    Agent, AgentOptions, TestCgroup, free_port,
    pod::{Pod, PodNetwork},
    process::run_ok,
    require_privileged,
    servers::{ServerProcess, write_file},
    temp_dir,
};

const LIMIT: Duration = Duration::from_secs(60);

const FIRST: &str = r#"
# db pods: 8080 is opaque, 9090 is not proxied outbound
workloads:
  - namespace: test-ns
    pod: "db-*"
    annotations:
      config.linkerd.io/opaque-ports: "8080"
      config.linkerd.io/skip-outbound-ports: "9090"
      config.linkerd.io/proxy-cpu-limit: "1"
"#;

const SECOND: &str = r#"
workloads:
  - namespace: test-ns
    pod: "db-*"
    annotations:
      config.linkerd.io/opaque-ports: "8080"
      config.linkerd.io/skip-outbound-ports: "9090"
  - namespace: test-ns
    pod: web
    annotations:
      linkerd.io/inject: disabled
  - namespace: test-ns
    pod: srv
    annotations:
      config.linkerd.io/skip-inbound-ports: "9090"
"#;

/// Writes `content` as a new version of a ConfigMap volume in `dir` and swaps it in the way
/// kubelet does: a new timestamped directory, a new `..data_tmp` symlink renamed over `..data`.
fn publish(dir: &Path, version: &str, content: &str) {
    let data = dir.join(format!("..{version}"));
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("policy.yaml"), content).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("policy.yaml");
    if fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/policy.yaml", &link).unwrap();
    }
}

fn curl(from: &Pod, url: &str) -> String {
    run_ok(
        from.command("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", url]),
        LIMIT,
    )
}

fn labels<'a>(pod: &'a str, direction: &'a str, port: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("pod", pod),
        ("direction", direction),
        ("target_port", port),
    ]
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn per_pod_policy_applies_to_its_pods_only_and_reloads_without_a_restart() {
    require_privileged!();
    let dir = temp_dir("policy");
    let configmap = dir.join("configmap");
    publish(&configmap, "2026_12_02_v1", FIRST);
    let cgroup = TestCgroup::new("policy");
    let agent = Agent::start_with(
        &cgroup,
        AgentOptions {
            args: vec![format!(
                "--policy={}",
                configmap.join("policy.yaml").display()
            )],
            ..AgentOptions::default()
        },
    );
    agent.assert_metric("sockmesh_policy_reload_total", &[("result", "ok")], 1);
    let network = PodNetwork::new(&agent.cni_socket);
    let db = network.add_pod("db-1", &cgroup);
    let web = network.add_pod("web", &cgroup);
    let srv = network.add_pod("srv", &cgroup);
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap();
    write_file(&www.join("blob"), 1000);
    let servers: Vec<ServerProcess> = [8080, 9090]
        .into_iter()
        .map(|port| {
            let addr = SocketAddr::new(srv.ip, port);
            srv.server(ServerProcess::http_command(&www, addr), addr, None)
        })
        .collect();
    let url = |port: u16| format!("http://{}/blob", SocketAddr::new(srv.ip, port));

    for pod in [&db, &web] {
        assert_eq!(curl(pod, &url(8080)), "200");
        assert_eq!(curl(pod, &url(9090)), "200");
    }
    // db-1: 8080 opaque (no detection, no request metrics), 9090 not proxied at all.
    agent.assert_metric(
        "tcp_detect_total",
        &[
            ("pod", "db-1"),
            ("target_port", "8080"),
            ("result", "opaque_port"),
        ],
        1,
    );
    agent.assert_metric("request_total", &labels("db-1", "outbound", "8080"), 0);
    agent.assert_metric("tcp_open_total", &labels("db-1", "outbound", "9090"), 0);
    // web keeps the defaults: both detected as HTTP and proxied.
    agent.assert_metric("request_total", &labels("web", "outbound", "8080"), 1);
    agent.assert_metric("request_total", &labels("web", "outbound", "9090"), 1);
    // srv's inbound side saw all four (db-1's 9090 went direct, but still arrived inbound).
    agent.assert_metric("tcp_open_total", &labels("srv", "inbound", "9090"), 2);
    let (_, config) = agent.get("/config.json").unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let effective = &config["effective_policy"]["pods"];
    assert_eq!(
        effective["test-ns/db-1"]["opaque_ports"], "8080",
        "{config}"
    );
    assert!(effective.get("test-ns/web").is_none(), "{config}");

    // kubelet's update: web is unmeshed, srv's 9090 is no longer captured inbound.
    publish(&configmap, "2026_12_02_v2", SECOND);
    agent.assert_metric("sockmesh_policy_reload_total", &[("result", "ok")], 2);
    assert_eq!(curl(&web, &url(8080)), "200");
    assert_eq!(curl(&db, &url(9090)), "200");
    agent.assert_metric("tcp_open_total", &labels("web", "outbound", "8080"), 1);
    agent.assert_metric("tcp_open_total", &labels("srv", "inbound", "9090"), 2);
    let metrics = agent.metrics();
    assert!(
        metrics.count(
            "sockmesh_kernel_connects_total",
            &[("decision", "bypassed_unmeshed_workload")]
        ) >= 1
    );
    assert!(
        metrics.count(
            "sockmesh_kernel_inbound_total",
            &[("decision", "bypassed_port")]
        ) >= 1
    );

    // A broken update: rejected, counted, and the last good policy stays.
    publish(
        &configmap,
        "2026_12_02_v3",
        "workloads:\n  - namespce: test-ns\n",
    );
    agent.assert_metric("sockmesh_policy_reload_total", &[("result", "error")], 1);
    assert_eq!(curl(&web, &url(8080)), "200");
    agent.assert_metric("tcp_open_total", &labels("web", "outbound", "8080"), 1);
    assert!(agent.log_text().contains("policy file rejected"));

    // Removed pods leave the effective policy (which would otherwise list every pod ever
    // served); the others stay.
    let effective_pods = || {
        let (_, config) = agent.get("/config.json").unwrap();
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        config["effective_policy"]["pods"].clone()
    };
    let db2 = network.add_pod("db-2", &cgroup);
    let pods = effective_pods();
    assert_eq!(pods["test-ns/db-2"]["opaque_ports"], "8080", "{pods}");
    assert!(pods.get("test-ns/web").is_some(), "{pods}");
    assert!(db2.sockmesh_cni("DEL").status.success());
    assert!(web.sockmesh_cni("DEL").status.success());
    let pods = effective_pods();
    assert!(pods.get("test-ns/db-2").is_none(), "{pods}");
    assert!(pods.get("test-ns/web").is_none(), "{pods}");
    assert_eq!(pods["test-ns/db-1"]["opaque_ports"], "8080", "{pods}");
    drop(servers);
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn a_bad_policy_file_stops_the_start_with_a_clear_error() {
    require_privileged!();
    let dir = temp_dir("badpolicy");
    let file = dir.join("policy.yaml");
    fs::write(
        &file,
        "workloads:\n  - namespace: a\n    annotations:\n      linkerd.io/inject: ingress\n",
    )
    .unwrap();
    let output = run_ok(
        std::process::Command::new("sh").arg("-c").arg(format!(
            "{} run --policy {} 2>&1; echo exit=$?",
            integration_tests::sockmesh_bin().display(),
            file.display()
        )),
        LIMIT,
    );
    assert!(output.contains("ingress"), "{output}");
    assert!(output.contains("exit=1"), "{output}");
}

/// Host mode: entries select cgroups by path. One child cgroup of the meshed one is unmeshed
/// (`linkerd.io/inject: disabled`), another skips a port outbound, a third keeps the defaults.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn host_mode_policy_selects_cgroups_by_path() {
    require_privileged!();
    let dir = temp_dir("policyhost");
    write_file(&dir.join("blob"), 1000);
    let first = ServerProcess::http(&dir);
    let second = ServerProcess::http(&dir);
    let meshed = TestCgroup::new("policyhost");
    let legacy = TestCgroup::child_of(&meshed, "legacy");
    let app = TestCgroup::child_of(&meshed, "app");
    let plain = TestCgroup::child_of(&meshed, "plain");
    let mount = integration_tests::cgroup::cgroup2_mount().unwrap();
    let relative =
        |cgroup: &TestCgroup| format!("/{}", cgroup.path().strip_prefix(&mount).unwrap().display());
    let file = dir.join("policy.yaml");
    fs::write(
        &file,
        format!(
            "workloads:\n\
             \x20 - cgroup: \"{}\"\n    annotations:\n      linkerd.io/inject: disabled\n\
             \x20 - cgroup: \"{}/*app*\"\n    annotations:\n      config.linkerd.io/skip-outbound-ports: \"{}\"\n",
            relative(&legacy),
            relative(&meshed),
            second.addr.port()
        ),
    )
    .unwrap();
    let agent = Agent::start_with(
        &meshed,
        AgentOptions {
            args: vec![format!("--policy={}", file.display())],
            ..AgentOptions::default()
        },
    );
    let curl = |cgroup: &TestCgroup, server: &ServerProcess| {
        run_ok(
            cgroup.command("curl").args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}/blob", server.addr),
            ]),
            LIMIT,
        )
    };
    for cgroup in [&legacy, &app, &plain] {
        for server in [&first, &second] {
            assert_eq!(curl(cgroup, server), "200");
        }
    }
    let port = |server: &ServerProcess| server.addr.port().to_string();
    // legacy: nothing proxied; app: only the first server; plain: both.
    agent.assert_metric("request_total", &[("target_port", &port(&first))], 2);
    agent.assert_metric("request_total", &[("target_port", &port(&second))], 1);
    let metrics = agent.metrics();
    assert_eq!(
        metrics.count(
            "sockmesh_kernel_connects_total",
            &[("decision", "bypassed_unmeshed_workload")]
        ),
        2
    );
    assert_eq!(
        metrics.count(
            "sockmesh_kernel_connects_total",
            &[("decision", "bypassed_port")]
        ),
        1
    );
    let (_, config) = agent.get("/config.json").unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let cgroups = &config["effective_policy"]["cgroups"];
    assert_eq!(
        cgroups[relative(&legacy)]["inject_disabled"],
        true,
        "{config}"
    );
    assert!(cgroups.get(relative(&plain)).is_none(), "{config}");
    drop((legacy, app, plain));
}

/// python3's http.server on `addr`, started inside `cgroup` (after the agent: it learns a
/// meshed port, and the listener's cgroup, when the server listens).
fn http_server_in(cgroup: &TestCgroup, dir: &Path, addr: SocketAddr) -> ServerProcess {
    ServerProcess::command_quietly(cgroup.wrap(&ServerProcess::http_command(dir, addr)), addr)
}

/// Host mode: a cgroup's skip-inbound-ports and opaque-ports apply to its own servers
/// (inbound) and its own clients (outbound); a sibling cgroup keeps the defaults.
#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn host_mode_cgroup_policy_skips_inbound_and_makes_ports_opaque_both_ways() {
    require_privileged!();
    let dir = temp_dir("policyhostports");
    write_file(&dir.join("blob"), 1000);
    let meshed = TestCgroup::new("policyhostports");
    let db = TestCgroup::child_of(&meshed, "db");
    let web = TestCgroup::child_of(&meshed, "web");
    let mount = integration_tests::cgroup::cgroup2_mount().unwrap();
    let relative =
        |cgroup: &TestCgroup| format!("/{}", cgroup.path().strip_prefix(&mount).unwrap().display());
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (db_opaque, db_skipped, web_plain) = (free_port(), free_port(), free_port());
    // Outside every test cgroup: reached outbound by both db and web.
    let outside = ServerProcess::http(&dir);
    let file = dir.join("policy.yaml");
    fs::write(
        &file,
        format!(
            "workloads:\n\
             \x20 - cgroup: \"{}\"\n    annotations:\n\
             \x20     config.linkerd.io/opaque-ports: \"{db_opaque},{outside}\"\n\
             \x20     config.linkerd.io/skip-inbound-ports: \"{db_skipped}\"\n",
            relative(&db),
            outside = outside.addr.port(),
        ),
    )
    .unwrap();
    let agent = Agent::start_with(
        &meshed,
        AgentOptions {
            args: vec![format!("--policy={}", file.display())],
            ..AgentOptions::default()
        },
    );
    let servers = [
        http_server_in(&db, &dir, loopback(db_opaque)),
        http_server_in(&db, &dir, loopback(db_skipped)),
        http_server_in(&web, &dir, loopback(web_plain)),
    ];
    let curl = |command: &mut Command, addr: SocketAddr| {
        let code = run_ok(
            command.args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{addr}/blob"),
            ]),
            LIMIT,
        );
        assert_eq!(code, "200", "{addr}");
    };
    // Inbound: clients outside the meshed cgroup.
    for server in &servers {
        curl(&mut Command::new("curl"), server.addr);
    }
    // Outbound: a client in each cgroup.
    for cgroup in [&db, &web] {
        curl(&mut cgroup.command("curl"), outside.addr);
    }

    let count = |name: &str, direction: &str, port: u16| {
        let port = port.to_string();
        agent.metrics().count(
            name,
            &[("direction", direction), ("target_port", port.as_str())],
        )
    };
    // Each server had one inbound connection, curl's (its readiness was checked without
    // connecting). db's opaque port: proxied, without detection.
    agent.assert_metric(
        "tcp_detect_total",
        &[
            ("direction", "inbound"),
            ("target_port", &db_opaque.to_string()),
            ("result", "opaque_port"),
        ],
        1,
    );
    assert_eq!(count("request_total", "inbound", db_opaque), 0);
    // db's skipped port: never reached the agent; the kernel counted the bypass.
    assert_eq!(count("tcp_open_total", "inbound", db_skipped), 0);
    let metrics = agent.metrics();
    assert_eq!(
        metrics.count(
            "sockmesh_kernel_inbound_total",
            &[("decision", "bypassed_port")]
        ),
        1
    );
    // web keeps the defaults: an HTTP request, inbound.
    assert_eq!(count("request_total", "inbound", web_plain), 1);
    // Outbound to the same server: opaque for db's client, HTTP for web's.
    let outside_port = outside.addr.port();
    assert_eq!(count("tcp_open_total", "outbound", outside_port), 2);
    assert_eq!(count("request_total", "outbound", outside_port), 1);
    drop(servers);
    drop((db, web));
}
