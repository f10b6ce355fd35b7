//! What the CNI path parses: the agent's CNI socket request (one JSON line from
//! `sockmesh-cni`; the socket is root-only, but a request names files the agent opens), and
//! the plugin's own inputs from the container runtime (the network configuration on stdin,
//! CNI_ARGS).
//!
//! Asserts, for any bytes:
//! - a request the agent accepts survives a round trip through its one-line wire form, and
//!   that form has no newline in it (the protocol is line-framed);
//! - every container id `valid_container_id` accepts is one plain file name (the registry
//!   stores a pod under it): one normal path component, no separator, not `.` or `..`;
//! - an accepted network configuration has a supported cniVersion (the one `config_version`
//!   reports), a non-empty agent socket, and a result that is JSON; a refused one's error is
//!   JSON; the previous result's addresses never panic;
//! - CNI_ARGS values come out trimmed, without `;`, and the same values written back as
//!   CNI_ARGS read the same.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use sockmesh_cni::{
    api::{Request, valid_container_id},
    spec::{NetConf, PodArgs, SUPPORTED_VERSIONS, config_version},
};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<Request>(bytes) {
        let line = serde_json::to_string(&request).expect("serializable");
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(
            serde_json::from_str::<Request>(&line).ok(),
            Some(request.clone())
        );
        let id = match &request {
            Request::Add { pod } => &pod.container_id,
            Request::Del { container_id } | Request::Check { container_id } => container_id,
        };
        check_container_id(id);
    }
    let text = String::from_utf8_lossy(bytes);
    check_container_id(&text);
    for word in text.split(['"', ' ', '\n']) {
        check_container_id(word);
    }

    match NetConf::parse(bytes) {
        Ok(conf) => {
            assert!(SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()));
            assert_eq!(config_version(bytes), conf.cni_version);
            assert!(!conf.agent_socket.as_os_str().is_empty());
            let result: serde_json::Value =
                serde_json::from_str(&conf.result_json()).expect("the result is JSON");
            assert!(result.is_object());
            let _ = conf.prev_result_ips();
        }
        Err(error) => {
            let version = config_version(bytes);
            assert!(SUPPORTED_VERSIONS.contains(&version.as_str()));
            let json: serde_json::Value =
                serde_json::from_str(&error.to_json(&version)).expect("the error is JSON");
            assert!(json.is_object());
        }
    }

    let args = PodArgs::parse(&text);
    for value in [
        &args.namespace,
        &args.name,
        &args.uid,
        &args.infra_container_id,
    ] {
        assert_eq!(value.trim(), value.as_str());
        assert!(!value.contains(';'), "{value:?}");
    }
    let written = format!(
        "K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={};K8S_POD_INFRA_CONTAINER_ID={}",
        args.namespace, args.name, args.uid, args.infra_container_id
    );
    assert_eq!(PodArgs::parse(&written), args, "{written:?}");
});

fn check_container_id(id: &str) {
    if !valid_container_id(id) {
        return;
    }
    let components: Vec<Component<'_>> = Path::new(id).components().collect();
    assert_eq!(components, [Component::Normal(id.as_ref())], "{id:?}");
    assert!(!id.contains('/') && id != "." && id != "..", "{id:?}");
}
