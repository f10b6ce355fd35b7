//! Embeds the agent-ebpf object in the binary. `cargo xtask build` builds it first and passes
//! its path in SOCKMESH_EBPF_OBJECT; a plain `cargo build` looks in the default place and,
//! when it is missing, embeds nothing (the agent then says how to build it).

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=SOCKMESH_EBPF_OBJECT");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("SOCKMESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest_dir.join("../agent-ebpf/target/bpfel-unknown-none/release/sockmesh-ebpf")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("sockmesh-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).expect("writing OUT_DIR/sockmesh-ebpf.o"),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found; run `cargo xtask build`",
                object.display()
            );
            fs::write(&out, []).expect("writing OUT_DIR/sockmesh-ebpf.o");
        }
    }
}
