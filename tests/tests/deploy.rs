//! The Kubernetes deployment: the manifests in deploy/ are valid against the Kubernetes schema
//! and mount what pod mode needs, and `sockmesh install-cni` chains sockmesh-cni into a node's
//! CNI config, keeps it chained, and takes it out again on SIGTERM. These need no root: they
//! work on temporary directories standing in for /opt/cni/bin and /etc/cni/net.d.
//!
//! The manifest checks run PyPI's kubernetes-validate (offline) from the venv `cargo xtask test`
//! installs (target/venv; SOCKMESH_KUBERNETES_VALIDATE names its executable).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    process::{eventually, run},
    sockmesh_bin, temp_dir,
};
use serde_json::Value;

/// The Kubernetes version the manifests are validated against (a fixed one, not the
/// validator's newest, so a validator upgrade cannot change the verdict silently).
const KUBERNETES_VERSION: &str = "1.33";
const LIMIT: Duration = Duration::from_secs(30);

fn repo_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn kubernetes_validate() -> PathBuf {
    let path = std::env::var_os("SOCKMESH_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_path("target/venv/bin/kubernetes-validate"));
    assert!(
        path.is_file(),
        "{} is missing: `cargo xtask test` installs it, or run \
         `/usr/bin/python3 -m venv target/venv && target/venv/bin/pip install \
         kubernetes-validate==1.37.0`",
        path.display()
    );
    path
}

fn validate(manifest: &Path) -> (bool, String) {
    let output = run(
        Command::new(kubernetes_validate())
            .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
            .arg(manifest),
        LIMIT,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn manifests() -> Vec<PathBuf> {
    let mut manifests: Vec<PathBuf> = fs::read_dir(repo_path("deploy"))
        .expect("deploy/")
        .map(|entry| entry.expect("deploy/ entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    manifests.sort();
    assert!(!manifests.is_empty(), "no manifests in deploy/");
    manifests
}

/// Every document of a YAML file, as JSON (PyYAML comes with kubernetes-validate).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let python = kubernetes_validate().with_file_name("python3");
    let output = run(
        Command::new(python)
            .args([
                "-c",
                "import json, sys, yaml; \
                 print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
            ])
            .arg(path),
        LIMIT,
    );
    assert!(
        output.status.success(),
        "reading {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice::<Value>(&output.stdout)
        .expect("JSON from PyYAML")
        .as_array()
        .expect("a list of documents")
        .clone()
}

#[test]
fn manifests_validate_against_the_kubernetes_schema() {
    for manifest in manifests() {
        let (passed, output) = validate(&manifest);
        assert!(
            passed,
            "{} is not valid for Kubernetes {KUBERNETES_VERSION}:\n{output}",
            manifest.display()
        );
    }
    // The validator really checks (strictly): a misspelt field fails.
    let dir = temp_dir("deploy-validate");
    let broken = dir.join("broken.yaml");
    let daemonset = fs::read_to_string(repo_path("deploy/daemonset.yaml")).unwrap();
    assert!(daemonset.contains("      hostPID: true\n"));
    fs::write(
        &broken,
        daemonset.replace("      hostPID: true\n", "      hostPid: true\n"),
    )
    .unwrap();
    let (passed, output) = validate(&broken);
    assert!(!passed, "a misspelt field passed validation:\n{output}");
    fs::remove_dir_all(&dir).unwrap();
}

fn daemonset() -> Value {
    yaml_documents(&repo_path("deploy/daemonset.yaml"))
        .into_iter()
        .find(|doc| doc["kind"] == "DaemonSet")
        .expect("a DaemonSet in deploy/daemonset.yaml")
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|container| container["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|var| var["name"] == name)?["value"]
        .as_str()
}

/// The host path mounted at `mount_path` in `container`, and the mount itself.
fn host_path_at<'a>(pod: &'a Value, container: &'a Value, mount_path: &str) -> (String, &'a Value) {
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|mount| mount["mountPath"] == mount_path)
        .unwrap_or_else(|| panic!("{} mounts nothing at {mount_path}", container["name"]));
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    let path = volume["hostPath"]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("volume {} is not a hostPath", mount["name"]));
    (path.to_string(), mount)
}

#[test]
fn the_daemonset_mounts_what_pod_mode_needs() {
    let daemonset = daemonset();
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true, "CNI_NETNS may be /proc/PID/ns/net");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"]
            .as_array()
            .expect("tolerations")
            .iter()
            .any(|toleration| toleration["operator"] == "Exists" && toleration.get("key").is_none()),
        "the DaemonSet must tolerate every taint"
    );
    assert_eq!(
        daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );

    let volume_paths: Vec<&str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|volume| volume["hostPath"]["path"].as_str())
        .collect();
    for path in [
        "/var/run/netns",
        "/var/run/sockmesh",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
    ] {
        assert!(
            volume_paths.contains(&path),
            "no hostPath volume for {path}"
        );
    }

    let image = format!("localhost/sockmesh:{}", env!("CARGO_PKG_VERSION"));
    let agent = container(pod, "agent");
    assert_eq!(agent["args"], serde_json::json!(["run"]));
    assert_eq!(
        agent["image"],
        image.as_str(),
        "the tag `cargo xtask image` builds"
    );
    assert_eq!(agent["imagePullPolicy"], "IfNotPresent");
    assert_eq!(agent["securityContext"]["privileged"], true);
    assert_eq!(env(agent, "SOCKMESH_SERVE_HOST_NETNS"), Some("false"));
    assert!(
        env(agent, "SOCKMESH_CGROUP").is_some_and(|cgroup| cgroup.starts_with("/sys/fs/cgroup/"))
    );
    let (path, _) = host_path_at(pod, agent, "/sys/fs/cgroup");
    assert_eq!(path, "/sys/fs/cgroup");
    let (path, bpffs) = host_path_at(pod, agent, "/sys/fs/bpf");
    assert_eq!(path, "/sys/fs/bpf");
    assert_eq!(bpffs["mountPropagation"], "Bidirectional");
    let (path, netns) = host_path_at(pod, agent, "/var/run/netns");
    assert_eq!(path, "/var/run/netns");
    assert_eq!(netns["mountPropagation"], "HostToContainer");
    let (path, _) = host_path_at(pod, agent, "/var/run/sockmesh");
    assert_eq!(path, "/var/run/sockmesh");
    let socket = env(agent, "SOCKMESH_CNI_SOCKET").unwrap_or("/var/run/sockmesh/cni.sock");
    assert!(socket.starts_with("/var/run/sockmesh/"));

    let install = container(pod, "install-cni");
    assert_eq!(install["args"], serde_json::json!(["install-cni"]));
    assert_eq!(install["image"], image.as_str());
    let (path, _) = host_path_at(pod, install, "/host/opt/cni/bin");
    assert_eq!(path, "/opt/cni/bin");
    let (path, _) = host_path_at(pod, install, "/host/etc/cni/net.d");
    assert_eq!(path, "/etc/cni/net.d");
    assert_eq!(
        env(install, "SOCKMESH_AGENT_SOCKET").unwrap_or("/var/run/sockmesh/cni.sock"),
        socket,
        "the plugin must be told the socket the agent listens on"
    );

    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let shutdown = env(agent, "SOCKMESH_SHUTDOWN_GRACE").unwrap_or("30s");
    let shutdown: u64 = shutdown
        .strip_suffix('s')
        .and_then(|seconds| seconds.parse().ok())
        .expect("SOCKMESH_SHUTDOWN_GRACE in seconds");
    assert!(
        grace > shutdown,
        "terminationGracePeriodSeconds {grace} <= shutdown grace {shutdown}s"
    );
}

/// A node's network config as a runtime finds it (bridge + portmap, like kubenet or the CNI
/// examples), in the layout install-cni writes JSON: unchaining gives back exactly these bytes.
const NODE_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [
          [
            {
              "subnet": "10.244.0.0/24"
            }
          ]
        ],
        "routes": [
          {
            "dst": "0.0.0.0/0"
          }
        ]
      }
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"#;
const CONFLIST_NAME: &str = "10-bridge.conflist";
const AGENT_SOCKET: &str = "/var/run/sockmesh/cni.sock";

struct Node {
    dir: PathBuf,
    bin: PathBuf,
    conf: PathBuf,
}

impl Node {
    fn new(name: &str) -> Self {
        let dir = temp_dir(name);
        let node = Self {
            bin: dir.join("opt/cni/bin"),
            conf: dir.join("etc/cni/net.d"),
            dir,
        };
        fs::create_dir_all(&node.bin).unwrap();
        fs::create_dir_all(&node.conf).unwrap();
        // Another plugin the runtime has: left alone.
        fs::write(node.bin.join("bridge"), b"not ours").unwrap();
        node
    }

    fn conflist(&self) -> PathBuf {
        self.conf.join(CONFLIST_NAME)
    }

    fn write_conflist(&self, text: &str) {
        // As a CNI's installer does: a temp file renamed into place.
        let temp = self.conf.join(".10-bridge.tmp");
        fs::write(&temp, text).unwrap();
        fs::rename(&temp, self.conflist()).unwrap();
    }

    fn plugin_types(&self) -> Option<Vec<String>> {
        let text = fs::read_to_string(self.conflist()).ok()?;
        let config: Value = serde_json::from_str(&text).ok()?;
        Some(
            config["plugins"]
                .as_array()?
                .iter()
                .map(|plugin| plugin["type"].as_str().unwrap_or("").to_string())
                .collect(),
        )
    }

    fn is_chained(&self) -> bool {
        self.plugin_types()
            .is_some_and(|types| types == ["bridge", "portmap", "sockmesh-cni"])
    }

    fn installed_plugin(&self) -> PathBuf {
        self.bin.join("sockmesh-cni")
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut command = Command::new(sockmesh_bin());
        command
            .arg("install-cni")
            .arg("--cni-bin-dir")
            .arg(&self.bin)
            .arg("--cni-conf-dir")
            .arg(&self.conf)
            .args(["--agent-socket", AGENT_SOCKET])
            .args(extra)
            .env_remove("SOCKMESH_CNI_BIN_DIR")
            .env_remove("SOCKMESH_CNI_CONF_DIR");
        command
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The sockmesh-cni the tests install: beside the sockmesh binary under test.
fn built_plugin() -> PathBuf {
    let plugin = sockmesh_bin().with_file_name("sockmesh-cni");
    assert!(
        plugin.is_file(),
        "{} is missing: build the agent first",
        plugin.display()
    );
    plugin
}

fn assert_plugin_installed(node: &Node) {
    let installed = node.installed_plugin();
    assert_eq!(
        fs::read(&installed).expect("the installed plugin"),
        fs::read(built_plugin()).unwrap(),
        "{} is not a copy of sockmesh-cni",
        installed.display()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&installed).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
}

#[test]
fn install_cni_once_chains_the_node_config() {
    let node = Node::new("install-cni-once");
    node.write_conflist(NODE_CONFLIST);
    // Not the config the runtime uses (sorts after ours): left alone.
    fs::write(
        node.conf.join("99-loopback.conf"),
        r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
    )
    .unwrap();
    let output = run(&mut node.command(&["--once"]), LIMIT);
    assert!(
        output.status.success(),
        "install-cni --once failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(node.is_chained(), "not chained: {:?}", node.plugin_types());
    let config: Value =
        serde_json::from_str(&fs::read_to_string(node.conflist()).unwrap()).unwrap();
    let original: Value = serde_json::from_str(NODE_CONFLIST).unwrap();
    assert_eq!(
        config["plugins"][2],
        serde_json::json!({"type": "sockmesh-cni", "agent_socket": AGENT_SOCKET})
    );
    assert_eq!(config["plugins"][0], original["plugins"][0]);
    assert_eq!(config["plugins"][1], original["plugins"][1]);
    assert_eq!(config["name"], original["name"]);
    assert_eq!(
        fs::read_to_string(node.conf.join("99-loopback.conf")).unwrap(),
        r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#
    );
    assert_plugin_installed(&node);
    assert_eq!(fs::read(node.bin.join("bridge")).unwrap(), b"not ours");

    // Once more: idempotent, the file is not even rewritten.
    let before = fs::read_to_string(node.conflist()).unwrap();
    let output = run(&mut node.command(&["--once"]), LIMIT);
    assert!(output.status.success());
    assert_eq!(fs::read_to_string(node.conflist()).unwrap(), before);
    let names: Vec<String> = fs::read_dir(&node.conf)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "temporary files left behind: {names:?}");
}

#[test]
fn install_cni_once_refuses_a_malformed_config() {
    let node = Node::new("install-cni-malformed");
    let broken = "{\"cniVersion\": \"1.0.0\", \"plugins\": [{\"type\": \"bridge\"}";
    node.write_conflist(broken);
    let output = run(&mut node.command(&["--once"]), LIMIT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(CONFLIST_NAME) && stderr.contains("not valid JSON"),
        "{stderr}"
    );
    assert_eq!(fs::read_to_string(node.conflist()).unwrap(), broken);
}

/// Sends SIGTERM and waits (bounded) for the exit.
fn terminate(child: &mut Child, limit: Duration) -> ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    let pid = i32::try_from(child.id()).expect("pid");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for install-cni") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("install-cni did not exit within {limit:?} of SIGTERM");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the child if the test fails half-way.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn install_cni_keeps_the_plugin_chained_until_sigterm() {
    let node = Node::new("install-cni-daemon");
    let log = node.dir.join("install-cni.log");
    let mut command = node.command(&["--interval", "200ms"]);
    command
        .env("SOCKMESH_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    let mut child = Running(command.spawn().expect("starting install-cni"));
    let logged = || fs::read_to_string(&log).unwrap_or_default();

    // No network config yet (the node's CNI has not written it): the binary goes in, and
    // install-cni waits.
    assert!(
        eventually(LIMIT, || node.installed_plugin().is_file()),
        "the plugin was not installed; log:\n{}",
        logged()
    );
    assert!(
        eventually(LIMIT, || logged().contains("no CNI network config yet")),
        "no log line about waiting; log:\n{}",
        logged()
    );
    assert_eq!(
        child.0.try_wait().unwrap(),
        None,
        "install-cni exited:\n{}",
        logged()
    );

    node.write_conflist(NODE_CONFLIST);
    assert!(
        eventually(LIMIT, || node.is_chained()),
        "not chained after the config appeared: {:?}; log:\n{}",
        node.plugin_types(),
        logged()
    );
    assert_plugin_installed(&node);

    // The node's CNI rewrites its file, without our entry: chained again within a few
    // intervals.
    node.write_conflist(NODE_CONFLIST);
    let rewritten = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || node.is_chained()),
        "not re-chained after the rewrite; log:\n{}",
        logged()
    );
    assert!(
        rewritten.elapsed() < Duration::from_secs(2),
        "re-chaining took {:?} with a 200ms interval",
        rewritten.elapsed()
    );

    let status = terminate(&mut child.0, LIMIT);
    assert!(
        status.success(),
        "install-cni exited with {status}; log:\n{}",
        logged()
    );
    // Our entry is gone and everything else is byte for byte what the node's CNI wrote.
    assert_eq!(fs::read_to_string(node.conflist()).unwrap(), NODE_CONFLIST);
    assert!(
        !node.installed_plugin().exists(),
        "the plugin binary is still installed"
    );
    assert_eq!(fs::read(node.bin.join("bridge")).unwrap(), b"not ours");
    let names: Vec<String> = fs::read_dir(&node.conf)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [CONFLIST_NAME], "left behind in the conf dir");
}

/// The runtime runs sockmesh-cni on the node itself, whatever its C library: a plugin that
/// cannot start would fail every pod's ADD before its own fail-open logic runs.
#[test]
fn the_cni_plugin_is_statically_linked() {
    let plugin = sockmesh_bin().with_file_name("sockmesh-cni");
    let output = std::process::Command::new("ldd")
        .arg(&plugin)
        .output()
        .expect("running ldd");
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("statically linked") || text.contains("not a dynamic executable"),
        "{} links shared libraries:\n{text}",
        plugin.display()
    );
}

/// The policy ConfigMap is mounted as a directory (kubelet never updates a subPath mount), the
/// agent is pointed at its file, and its content is a policy the agent accepts.
#[test]
fn the_policy_config_map_is_mounted_and_valid() {
    let documents = yaml_documents(&repo_path("deploy/daemonset.yaml"));
    let config_map = documents
        .iter()
        .find(|document| document["kind"] == "ConfigMap")
        .expect("a ConfigMap in deploy/daemonset.yaml");
    let policy = config_map["data"]["policy.yaml"]
        .as_str()
        .expect("a policy.yaml key");
    let daemonset = daemonset();
    let pod = &daemonset["spec"]["template"]["spec"];
    let agent = container(pod, "agent");
    assert_eq!(
        env(agent, "SOCKMESH_POLICY"),
        Some("/etc/sockmesh/policy.yaml")
    );
    let mount = agent["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|mount| mount["mountPath"] == "/etc/sockmesh")
        .expect("the policy mount");
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount is never updated"
    );
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .expect("the policy volume");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);

    let dir = integration_tests::temp_dir("configmap");
    let file = dir.join("policy.yaml");
    fs::write(&file, policy).unwrap();
    let checked = run(
        Command::new(integration_tests::sockmesh_bin())
            .arg("check-policy")
            .arg(&file),
        LIMIT,
    );
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
}
