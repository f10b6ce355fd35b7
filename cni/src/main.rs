//! The `sockmesh-cni` binary: a chained CNI plugin that registers each pod with the node's
//! sockmesh agent. A container runtime runs it with the CNI_* variables set and the network
//! configuration on stdin; see the library.

use std::{io::Read, process::ExitCode};

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("sockmesh-cni {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let env = std::env::vars().collect();
    let mut stdin = Vec::new();
    // VERSION may come without a configuration; an unreadable stdin is an empty one.
    let _ = std::io::stdin().take(1 << 20).read_to_end(&mut stdin);
    let outcome = sockmesh_cni::invoke(&env, &stdin);
    if !outcome.stdout.is_empty() {
        println!("{}", outcome.stdout);
    }
    ExitCode::from(outcome.status)
}
