//! One plugin invocation: the CNI command applied, talking to the agent over its socket.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    os::unix::{fs::MetadataExt, net::UnixStream},
    path::Path,
    time::Duration,
};

use crate::{
    api::{PodInfo, Request, Response},
    spec::{self, CniError, Command, ErrorCode, NetConf, PodArgs},
    store::Store,
};

/// How long the plugin waits for the agent (connect, request, answer) before failing open.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the plugin prints on stdout and its exit status.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub status: u8,
}

/// Runs one plugin invocation: `env` is the process environment, `stdin` the network config.
pub fn invoke(env: &HashMap<String, String>, stdin: &[u8]) -> Outcome {
    let version = spec::config_version(stdin);
    match dispatch(env, stdin) {
        Ok(stdout) => Outcome { stdout, status: 0 },
        Err(error) => Outcome {
            stdout: error.to_json(&version),
            status: 1,
        },
    }
}

fn dispatch(env: &HashMap<String, String>, stdin: &[u8]) -> Result<String, CniError> {
    let command = Command::from_env(env)?;
    if command == Command::Version {
        return Ok(spec::version_json(&spec::config_version(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    match command {
        Command::Add => add(env, &conf),
        Command::Del => del(env, &conf).map(|()| String::new()),
        Command::Check => check(env, &conf).map(|()| String::new()),
        // Always ready: the plugin fails open, so nothing can stop it from serving ADD.
        Command::Status => Ok(String::new()),
        // The agent forgets a pod on DEL and drops vanished ones at start; nothing to collect.
        Command::Gc => Ok(String::new()),
        Command::Version => unreachable!("answered above"),
    }
}

fn add(env: &HashMap<String, String>, conf: &NetConf) -> Result<String, CniError> {
    let container_id = spec::required(env, "CNI_CONTAINERID")?;
    let netns = spec::required(env, "CNI_NETNS")?;
    let args = PodArgs::parse(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""));
    let result = conf.result_json();
    if is_host_network(Path::new(netns)) {
        log(&format!(
            "{container_id}: host network namespace, not meshed"
        ));
        return Ok(result);
    }
    let pod = PodInfo {
        container_id: container_id.to_string(),
        netns: netns.into(),
        namespace: args.namespace,
        name: args.name,
        uid: args.uid,
        ips: conf.prev_result_ips(),
    };
    match ask_agent(&conf.agent_socket, &Request::Add { pod: pod.clone() }) {
        Ok(response) if response.ok => {
            if !response.meshed {
                log(&format!("{container_id}: not meshed: {}", response.message));
            }
        }
        // The agent is up but could not serve the pod: it runs unmeshed rather than not at all.
        Ok(response) => log(&format!(
            "{container_id}: the agent could not mesh the pod, it runs unmeshed: {}",
            response.message
        )),
        Err(error) => {
            log(&format!(
                "{container_id}: agent unreachable at {} ({error}); the pod runs unmeshed \
                 until the agent adopts it",
                conf.agent_socket.display()
            ));
            register_for_later(&conf.agent_socket, &pod);
        }
    }
    Ok(result)
}

fn del(env: &HashMap<String, String>, conf: &NetConf) -> Result<(), CniError> {
    // DEL must succeed for a pod that is already gone, so only the id is required.
    let container_id = spec::required(env, "CNI_CONTAINERID")?;
    let request = Request::Del {
        container_id: container_id.to_string(),
    };
    match ask_agent(&conf.agent_socket, &request) {
        Ok(response) if !response.ok => log(&format!("{container_id}: DEL: {}", response.message)),
        Ok(_) => {}
        Err(error) => {
            log(&format!("{container_id}: DEL: agent unreachable ({error})"));
            let _ = Store::beside(&conf.agent_socket).remove(container_id);
        }
    }
    Ok(())
}

fn check(env: &HashMap<String, String>, conf: &NetConf) -> Result<(), CniError> {
    let container_id = spec::required(env, "CNI_CONTAINERID")?;
    spec::required(env, "CNI_NETNS")?;
    if conf.prev_result.is_none() {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "CHECK needs prevResult",
        ));
    }
    let request = Request::Check {
        container_id: container_id.to_string(),
    };
    match ask_agent(&conf.agent_socket, &request) {
        Ok(response) if response.ok && !response.meshed => Err(CniError::new(
            ErrorCode::NotMeshed,
            format!("pod {container_id} is not served by the sockmesh agent"),
        )),
        // Unreachable agent: pods run unmeshed by design, which is their expected state.
        _ => Ok(()),
    }
}

/// Whether `netns` is the namespace this plugin runs in (the host's).
fn is_host_network(netns: &Path) -> bool {
    let same =
        |a: std::fs::Metadata, b: std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    match (
        std::fs::metadata(netns),
        std::fs::metadata("/proc/self/ns/net"),
    ) {
        (Ok(pod), Ok(own)) => same(pod, own),
        _ => false,
    }
}

fn ask_agent(socket: &Path, request: &Request) -> std::io::Result<Response> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(AGENT_TIMEOUT))?;
    stream.set_write_timeout(Some(AGENT_TIMEOUT))?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .take(64 * 1024)
        .read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad answer from the agent: {error}"),
        )
    })
}

/// Leaves the registration where the agent looks at start, if the agent is installed here.
fn register_for_later(socket: &Path, pod: &PodInfo) {
    let store = Store::beside(socket);
    if !socket.parent().is_some_and(Path::is_dir) {
        return;
    }
    if let Err(error) = store.save(pod) {
        log(&format!(
            "{}: could not register for later: {error}",
            pod.container_id
        ));
    }
}

fn log(message: &str) {
    eprintln!("sockmesh-cni: {message}");
}
