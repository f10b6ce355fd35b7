//! `cargo xtask`: build, run and test sockmesh, setting up the eBPF toolchain when it is missing.
//!
//! The kernel programs are built for bpfel-unknown-none. Two routes work (see
//! ../shared/TOOLCHAIN.md): Debian's rustc (rustc-web, with a prebuilt `core` for the BPF
//! target) plus bpf-linker, or a rustup nightly with rust-src (-Z build-std=core). The first is
//! what `setup` installs.

mod bench;
mod fuzz;
mod image;
mod soak;
mod toolchain;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::toolchain::{EbpfToolchain, run_checked};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test sockmesh")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF programs needs (Debian's rustc-web, bpf-linker, bpftool).
    Setup,
    /// Build the eBPF object and the agent.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build (release, as users run it), then run `sockmesh run` as root with the given
    /// arguments.
    Run {
        /// Build and run the debug agent instead (development: about 10x slower under load).
        #[arg(long)]
        debug: bool,
        /// Arguments for `sockmesh run`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Measure sockmesh against a direct connection, HAProxy and nginx (target/bench/).
    Bench {
        /// A short smoke run: fewer runs, shorter measurements.
        #[arg(long)]
        quick: bool,
        /// Number of alternating runs (default 5, or 2 with --quick).
        #[arg(long)]
        runs: Option<usize>,
        /// Only the scenarios whose name contains this (e.g. redis, iperf, wrk).
        #[arg(long)]
        only: Option<String>,
    },
    /// Internal: the benchmark's client probes.
    #[command(hide = true)]
    BenchProbe {
        #[command(subcommand)]
        probe: Probe,
    },
    /// Drive mixed traffic through a release agent and check that its resources stay flat
    /// (target/soak/).
    Soak {
        /// How long the traffic runs.
        #[arg(long, default_value_t = 1)]
        minutes: u64,
        /// Seconds between two samples of the agent's resources.
        #[arg(long, default_value_t = 5)]
        interval: u64,
    },
    /// Internal: the soak's clients and servers.
    #[command(hide = true)]
    SoakProbe {
        #[command(subcommand)]
        probe: soak::Probe,
    },
    /// Build the OCI image localhost/sockmesh:<version> with buildah (no registry) and check it.
    Image,
    /// Build everything and run the whole test suite, privileged tests included.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the fuzz targets in fuzz/ (cargo-fuzz, nightly; installed when missing).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// The targets to run (default: all of them).
        targets: Vec<String>,
    },
}

#[derive(Subcommand)]
enum Probe {
    Greeting {
        addr: std::net::SocketAddr,
        count: usize,
    },
    Connrate {
        addr: std::net::SocketAddr,
        seconds: f64,
    },
    Hold {
        addr: std::net::SocketAddr,
        count: usize,
        /// Make one HTTP/1.1 keep-alive request on each connection first.
        #[arg(long, conflicts_with = "http2")]
        http: bool,
        /// Make one h2c request on each connection first.
        #[arg(long)]
        http2: bool,
    },
    /// Header-less junk to an HTTP server, reconnecting when closed, up to MEGABYTES.
    Junk {
        addr: std::net::SocketAddr,
        megabytes: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    let root = workspace_root()?;
    match task {
        Task::Setup => EbpfToolchain::ensure().map(|_| ()),
        Task::Build { release } => build(&root, release).map(|_| ()),
        Task::Run { debug, args } => {
            let agent = build(&root, !debug)?;
            run_agent(&agent, &args)
        }
        Task::Test { args } => test(&root, &args),
        Task::Fuzz { seconds, targets } => fuzz::run(&root, seconds, &targets),
        Task::Image => {
            let agent = build(&root, true)?;
            image::run(&root, agent.parent().context("the agent has no directory")?)
        }
        Task::Bench { quick, runs, only } => {
            let agent = build(&root, true)?;
            bench::run(&root, &agent, &bench::Options { quick, runs, only })
        }
        Task::Soak { minutes, interval } => {
            let agent = build(&root, true)?;
            soak::run(&root, &agent, minutes, interval)
        }
        Task::SoakProbe { probe } => soak::probe(probe),
        Task::BenchProbe { probe } => match probe {
            Probe::Greeting { addr, count } => bench::probe::greeting(addr, count),
            Probe::Connrate { addr, seconds } => bench::probe::connection_rate(addr, seconds),
            Probe::Hold {
                addr,
                count,
                http,
                http2,
            } => {
                let carry = match (http, http2) {
                    (true, _) => bench::probe::Carry::Http1,
                    (_, true) => bench::probe::Carry::Http2,
                    _ => bench::probe::Carry::Nothing,
                };
                bench::probe::hold(addr, count, carry)
            }
            Probe::Junk { addr, megabytes } => bench::probe::junk(addr, megabytes),
        },
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR").context("run me through `cargo xtask`")?;
    Ok(Path::new(&manifest_dir)
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

/// Builds the eBPF object, then the agent with it embedded, then the static `sockmesh-cni`,
/// copied beside the agent. Returns the `sockmesh` binary's path.
fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let toolchain = EbpfToolchain::ensure()?;
    let object = toolchain.build(&root.join("agent-ebpf"))?;
    let mut cargo = Command::new(cargo());
    cargo
        .current_dir(root)
        .args(["build", "--package", "agent"]);
    if release {
        cargo.arg("--release");
    }
    cargo.env("SOCKMESH_EBPF_OBJECT", &object);
    run_checked(&mut cargo, "building the agent")?;
    let profile = if release { "release" } else { "debug" };
    let agent = root.join("target").join(profile).join("sockmesh");
    let plugin = build_static_plugin(root, release)?;
    let beside = agent.with_file_name("sockmesh-cni");
    // Never write through a hard link cargo may have left there (it would change its artifact).
    let _ = std::fs::remove_file(&beside);
    std::fs::copy(&plugin, &beside)
        .with_context(|| format!("copying {} to {}", plugin.display(), beside.display()))?;
    Ok(agent)
}

/// The container runtime runs `sockmesh-cni` on the node itself, whose C library may be older
/// than this machine's: it is linked statically (glibc's crt-static; the plugin uses no name
/// service), so it runs on any node. An explicit --target keeps the flag off build scripts.
fn build_static_plugin(root: &Path, release: bool) -> Result<PathBuf> {
    let host = host_triple()?;
    let mut cargo = Command::new(cargo());
    cargo
        .current_dir(root)
        .args(["build", "--package", "sockmesh-cni", "--target", &host])
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    if release {
        cargo.arg("--release");
    }
    run_checked(&mut cargo, "building the static sockmesh-cni")?;
    let profile = if release { "release" } else { "debug" };
    Ok(root
        .join("target")
        .join(host)
        .join(profile)
        .join("sockmesh-cni"))
}

fn host_triple() -> Result<String> {
    let output = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV names no host")
}

fn run_agent(agent: &Path, args: &[String]) -> Result<()> {
    let mut command = if is_root() {
        Command::new(agent)
    } else {
        eprintln!("xtask: sockmesh needs root (CAP_BPF, CAP_NET_ADMIN, cgroup writes); using sudo");
        let mut sudo = Command::new("sudo");
        sudo.arg(agent);
        sudo
    };
    command.arg("run").args(args);
    eprintln!("xtask: running {command:?}");
    eprintln!(
        "xtask: it meshes the cgroup `sockmesh` under the cgroup2 mount (or --cgroup); \
         put a program in it with `{} exec -- CMD`",
        agent.display()
    );
    let status = command.status().context("starting the agent")?;
    if !status.success() {
        bail!("sockmesh exited with {status}");
    }
    Ok(())
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    let agent = build(root, false)?;
    let kubernetes_validate = toolchain::ensure_test_tools(root)?;
    let mut cargo = Command::new(cargo());
    cargo
        .current_dir(root)
        .args(["test", "--workspace"])
        .args(args);
    if is_root() {
        // Privileged tests are #[ignore]d so that a run that cannot execute them reports them
        // as ignored, never as passed; as root they run too.
        if !args.iter().any(|arg| arg == "--") {
            cargo.arg("--");
        }
        cargo.arg("--include-ignored");
    }
    cargo.env("SOCKMESH_BIN", &agent);
    cargo.env("SOCKMESH_KUBERNETES_VALIDATE", &kubernetes_validate);
    cargo.env("SOCKMESH_EBPF_OBJECT", root.join(toolchain::EBPF_OBJECT));
    if !is_root() {
        eprintln!(
            "xtask: not root: the privileged tests (#[ignore]d) will not run and are reported \
             as ignored"
        );
    }
    let (status, totals) = toolchain::run_counting_tests(&mut cargo)?;
    // One plain closing line for whoever reads the log: the sum over every test binary.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("the test suite failed ({status})");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
