//! The agent's CNI socket protocol, spoken by `sockmesh-cni` (the client) and the agent's pod
//! server: one JSON request per connection, on one line, and one JSON response line back.

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Longest request line the agent reads; a request is a few hundred bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A pod as the CNI plugin hands it over (and as the agent's registry keeps it on disk).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// The runtime's id of the pod sandbox (CNI_CONTAINERID): the registry's key.
    pub container_id: String,
    /// The pod's network namespace (CNI_NETNS).
    pub netns: PathBuf,
    /// Kubernetes namespace, name and uid (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID), empty
    /// when the runtime did not pass them.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uid: String,
    /// The pod's addresses, from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Serve this pod; answered once its listeners exist.
    Add { pod: PodInfo },
    /// Stop serving the pod (idempotent: an unknown pod is fine).
    Del { container_id: String },
    /// Is the pod served?
    Check { container_id: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// Whether the pod is served now (ADD, CHECK).
    #[serde(default)]
    pub meshed: bool,
    /// Why not, when the agent chose not to mesh it (host network) or failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Response {
    pub fn served(meshed: bool, message: impl Into<String>) -> Self {
        Self {
            ok: true,
            meshed,
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            meshed: false,
            message: message.into(),
        }
    }
}

/// A container id is a file name in the registry: the characters runtimes use (CNI 1.0 allows
/// alphanumerics, `_`, `.` and `-`), at most 256 of them, not starting with a dot.
pub fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let request = Request::Add {
            pod: PodInfo {
                container_id: "abc123".into(),
                netns: "/var/run/netns/cni-1".into(),
                namespace: "default".into(),
                name: "web-0".into(),
                uid: "u-1".into(),
                ips: vec!["10.1.0.5".parse().unwrap()],
            },
        };
        let line = serde_json::to_string(&request).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.starts_with(r#"{"op":"add""#), "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
    }

    #[test]
    fn container_ids_are_safe_file_names() {
        assert!(valid_container_id("a1b2c3_d.e-f"));
        for bad in ["", ".hidden", "../etc", "a/b", "a b", &"x".repeat(257)] {
            assert!(!valid_container_id(bad), "{bad}");
        }
    }
}
