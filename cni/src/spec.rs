//! The CNI specification's side of `sockmesh-cni`, as pure functions: the command, the network
//! configuration on stdin, CNI_ARGS, the previous result's addresses, and error results with
//! the specification's codes.

use std::{collections::HashMap, net::IpAddr, path::PathBuf};

use serde_json::{Value, json};

use crate::DEFAULT_AGENT_SOCKET;

/// Versions this plugin speaks (its results are the previous plugin's, in the same version).
pub const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.2.0"];
/// The version errors are reported in when the config does not say.
const FALLBACK_VERSION: &str = "1.0.0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The specification's error codes (and one of this plugin's own, from the 100+ range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    InvalidEnvironment = 4,
    DecodeFailure = 6,
    InvalidConfig = 7,
    /// CHECK: the agent is up but does not serve the pod.
    NotMeshed = 100,
}

#[derive(Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }

    /// The error result the specification asks for, on stdout.
    pub fn to_json(&self, version: &str) -> String {
        json!({
            "cniVersion": version,
            "code": self.code as u32,
            "msg": self.msg,
        })
        .to_string()
    }
}

impl Command {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, CniError> {
        let command = required(env, "CNI_COMMAND")?;
        Ok(match command {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            other => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("unknown CNI_COMMAND {other:?}"),
                ));
            }
        })
    }
}

/// A variable the command needs, present and non-empty.
pub fn required<'a>(env: &'a HashMap<String, String>, name: &str) -> Result<&'a str, CniError> {
    match env.get(name).map(String::as_str) {
        Some(value) if !value.trim().is_empty() => Ok(value),
        _ => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("{name} is not set"),
        )),
    }
}

/// The cniVersion of a config, for replies that must be in it; the fallback when unreadable.
pub fn config_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|config| config.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|version| SUPPORTED_VERSIONS.contains(&version.as_str()))
        .unwrap_or_else(|| FALLBACK_VERSION.to_string())
}

pub fn version_json(version: &str) -> String {
    json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

/// This plugin's network configuration (its entry in the conflist, plus what the runtime adds).
#[derive(Debug)]
pub struct NetConf {
    pub cni_version: String,
    /// The agent's CNI socket (`agent_socket`).
    pub agent_socket: PathBuf,
    /// The previous plugin's result, passed on unchanged.
    pub prev_result: Option<Value>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let config: Value = serde_json::from_slice(stdin).map_err(|error| {
            CniError::new(
                ErrorCode::DecodeFailure,
                format!("the network configuration is not JSON: {error}"),
            )
        })?;
        let Some(object) = config.as_object() else {
            return Err(CniError::new(
                ErrorCode::DecodeFailure,
                "the network configuration is not a JSON object",
            ));
        };
        let cni_version = match object.get("cniVersion") {
            Some(Value::String(version)) => version.clone(),
            _ => {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    "cniVersion is missing",
                ));
            }
        };
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("CNI version {cni_version} is not supported"),
            ));
        }
        let agent_socket = match object.get("agent_socket") {
            None => PathBuf::from(DEFAULT_AGENT_SOCKET),
            Some(Value::String(path)) if !path.is_empty() => PathBuf::from(path),
            Some(_) => {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    "agent_socket must be a non-empty string",
                ));
            }
        };
        let prev_result = match object.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(result @ Value::Object(_)) => Some(result.clone()),
            Some(_) => {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    "prevResult must be an object",
                ));
            }
        };
        Ok(Self {
            cni_version,
            agent_socket,
            prev_result,
        })
    }

    /// ADD's result: the previous plugin's, unchanged (an empty one when this plugin is first).
    pub fn result_json(&self) -> String {
        match &self.prev_result {
            Some(result) => result.to_string(),
            None => json!({ "cniVersion": self.cni_version }).to_string(),
        }
    }

    /// The pod's addresses from prevResult's `ips` ("10.1.0.5/24" -> 10.1.0.5).
    pub fn prev_result_ips(&self) -> Vec<IpAddr> {
        let Some(ips) = self
            .prev_result
            .as_ref()
            .and_then(|result| result.get("ips")?.as_array().cloned())
        else {
            return Vec::new();
        };
        ips.iter()
            .filter_map(|entry| entry.get("address")?.as_str())
            .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
            .collect()
    }
}

/// The Kubernetes pod identity a runtime passes in CNI_ARGS
/// (`K8S_POD_NAMESPACE=ns;K8S_POD_NAME=name;K8S_POD_UID=uid;...`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub infra_container_id: String,
}

impl PodArgs {
    pub fn parse(cni_args: &str) -> Self {
        let mut args = Self::default();
        for pair in cni_args.split(';') {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            let value = value.trim().to_string();
            match key.trim() {
                "K8S_POD_NAMESPACE" => args.namespace = value,
                "K8S_POD_NAME" => args.name = value,
                "K8S_POD_UID" => args.uid = value,
                "K8S_POD_INFRA_CONTAINER_ID" => args.infra_container_id = value,
                _ => {}
            }
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn commands_come_from_cni_command() {
        assert_eq!(
            Command::from_env(&env(&[("CNI_COMMAND", "ADD")])),
            Ok(Command::Add)
        );
        assert_eq!(
            Command::from_env(&env(&[("CNI_COMMAND", "GC")])),
            Ok(Command::Gc)
        );
        let unknown = Command::from_env(&env(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert_eq!(unknown.code, ErrorCode::InvalidEnvironment);
        let missing = Command::from_env(&env(&[])).unwrap_err();
        assert_eq!(missing.code, ErrorCode::InvalidEnvironment);
    }

    #[test]
    fn parses_the_chained_config() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"k8s","type":"sockmesh-cni",
                "agent_socket":"/run/x.sock",
                "prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.9.0.4/24"},
                              {"address":"fd00::4/64"},{"address":"junk"}]}}"#,
        )
        .unwrap();
        assert_eq!(conf.agent_socket, PathBuf::from("/run/x.sock"));
        assert_eq!(
            conf.prev_result_ips(),
            vec![
                "10.9.0.4".parse::<IpAddr>().unwrap(),
                "fd00::4".parse().unwrap()
            ]
        );
        let result: Value = serde_json::from_str(&conf.result_json()).unwrap();
        assert_eq!(result["ips"][0]["address"], "10.9.0.4/24");
    }

    #[test]
    fn bad_configs_get_the_spec_codes() {
        let code = |stdin: &[u8]| NetConf::parse(stdin).unwrap_err().code;
        assert_eq!(code(b"{not json"), ErrorCode::DecodeFailure);
        assert_eq!(code(b"[1,2]"), ErrorCode::DecodeFailure);
        assert_eq!(code(br#"{"name":"x"}"#), ErrorCode::InvalidConfig);
        assert_eq!(
            code(br#"{"cniVersion":"9.9.9"}"#),
            ErrorCode::IncompatibleVersion
        );
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","agent_socket":7}"#),
            ErrorCode::InvalidConfig
        );
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","prevResult":"x"}"#),
            ErrorCode::InvalidConfig
        );
    }

    #[test]
    fn errors_are_spec_json() {
        let error = CniError::new(ErrorCode::DecodeFailure, "bad");
        let json: Value = serde_json::from_str(&error.to_json("0.4.0")).unwrap();
        assert_eq!(json["code"], 6);
        assert_eq!(json["msg"], "bad");
        assert_eq!(json["cniVersion"], "0.4.0");
    }

    #[test]
    fn parses_kubernetes_cni_args() {
        let args = PodArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234;junk",
        );
        assert_eq!(args.namespace, "shop");
        assert_eq!(args.name, "web-0");
        assert_eq!(args.uid, "1234");
        assert_eq!(args.infra_container_id, "abc");
        assert_eq!(PodArgs::parse(""), PodArgs::default());
    }

    #[test]
    fn version_lists_what_is_supported() {
        let json: Value = serde_json::from_str(&version_json("1.0.0")).unwrap();
        assert!(json["supportedVersions"].as_array().unwrap().len() >= 4);
        assert_eq!(config_version(b"garbage"), "1.0.0");
        assert_eq!(config_version(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
    }
}
