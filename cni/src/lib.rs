//! `sockmesh-cni`: a chained CNI plugin (CNI specification 1.0.0, plus STATUS and GC of 1.1.0)
//! that hands each pod to the node's sockmesh agent, and the agent's side of the protocol.
//!
//! `spec` is the specification's side (configuration, CNI_ARGS, errors, as pure functions),
//! `plugin` the invocation (the I/O), `api` the agent socket's protocol, `store` the pod
//! registry on disk that both the plugin and the agent write.
#![forbid(unsafe_code)]

pub mod api;
mod plugin;
pub mod spec;
pub mod store;

pub use plugin::{Outcome, invoke};

/// Where the plugin finds the agent unless its config says `agent_socket` (the agent's
/// `--cni-socket` default is the same).
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/sockmesh/cni.sock";
