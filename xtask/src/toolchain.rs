//! Finding, installing and using a toolchain that builds Rust for bpfel-unknown-none, and the
//! Debian packages the test suite runs against.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// Where the eBPF object lands, relative to the workspace root.
pub const EBPF_OBJECT: &str = "agent-ebpf/target/bpfel-unknown-none/release/sockmesh-ebpf";

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const TOOLCHAIN_PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
];

/// Debian packages of the real clients and servers the tests run.
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "curl",
    "redis-server",
    "redis-tools",
    "iproute2",
    // The real CNI plugins (bridge, host-local, loopback) the pod-mode tests wire pods with.
    "containernetworking-plugins",
    "python3",
    "python3-venv",
    "python3-grpcio",
    "python3-websockets",
    "python3-aiosmtpd",
    "openssl",
    "nginx-light",
    "prometheus",
    // slow-loris and friends, for the hostile-client tests.
    "slowhttptest",
    // h2load, for the HTTP/2 tests (an origin closing its connections every 1,000 requests).
    "nghttp2-client",
    "fonts-dejavu-core",
];

const RUSTFLAGS: &str = "-C debuginfo=2 -C link-arg=--btf";

pub enum EbpfToolchain {
    /// Debian's rustc 1.96 with a prebuilt core for the BPF target.
    Debian,
    /// A rustup nightly with rust-src, building core itself.
    NightlyBuildStd,
}

impl EbpfToolchain {
    /// A working toolchain, installing the Debian route when nothing usable is present.
    pub fn ensure() -> Result<Self> {
        if let Some(found) = Self::detect() {
            return Ok(found);
        }
        eprintln!("xtask: no toolchain for bpfel-unknown-none found; setting one up");
        install_debian_route()?;
        Self::detect().context("the eBPF toolchain is still missing after installing it")
    }

    fn detect() -> Option<Self> {
        if !command_exists("bpf-linker") {
            return None;
        }
        if Path::new(DEBIAN_RUSTC).exists() && Path::new(DEBIAN_BPF_CORE).exists() {
            return Some(Self::Debian);
        }
        nightly_has_rust_src().then_some(Self::NightlyBuildStd)
    }

    /// Builds the agent-ebpf crate and returns the object's path.
    pub fn build(&self, crate_dir: &Path) -> Result<PathBuf> {
        let mut cargo = match self {
            Self::Debian => {
                let mut cargo = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
                cargo.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
                cargo.args(["build", "--release", "--target", "bpfel-unknown-none"]);
                cargo
            }
            Self::NightlyBuildStd => {
                let mut cargo = Command::new("cargo");
                cargo.env_remove("RUSTUP_TOOLCHAIN").env_remove("RUSTC");
                cargo.args([
                    "+nightly",
                    "build",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                ]);
                cargo.args(["-Z", "build-std=core"]);
                cargo
            }
        };
        cargo
            .current_dir(crate_dir)
            .env("RUSTFLAGS", RUSTFLAGS)
            .env_remove("CARGO_TARGET_DIR");
        run_checked(&mut cargo, "building the eBPF programs")?;
        let object = crate_dir.join("target/bpfel-unknown-none/release/sockmesh-ebpf");
        if !object.exists() {
            bail!(
                "the eBPF build finished but {} is missing",
                object.display()
            );
        }
        Ok(object)
    }
}

fn install_debian_route() -> Result<()> {
    require_apt("the eBPF toolchain", TOOLCHAIN_PACKAGES)?;
    apt_install(TOOLCHAIN_PACKAGES)?;
    if !command_exists("bpf-linker") {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)"
        );
        let path = format!("{LLVM_PREFIX}/bin:{}", env::var("PATH").unwrap_or_default());
        let mut cargo = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path);
        run_checked(&mut cargo, "installing bpf-linker")?;
    }
    Ok(())
}

/// Installs whichever test packages are missing, and kubernetes-validate (the manifest tests)
/// into a venv under target/. Returns the kubernetes-validate executable.
pub fn ensure_test_tools(root: &Path) -> Result<PathBuf> {
    ensure_packages(TEST_PACKAGES)?;
    ensure_kubernetes_validate(root)
}

/// PyPI's kubernetes-validate (Kubernetes' JSON schemas, checked offline), pinned.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// Where its venv lives, relative to the workspace root.
pub const VENV: &str = "target/venv";

/// Creates target/venv with Debian's python3 (not a pyenv one on PATH) and installs
/// kubernetes-validate into it, once: an existing install is reused.
fn ensure_kubernetes_validate(root: &Path) -> Result<PathBuf> {
    let venv = root.join(VENV);
    let executable = venv.join("bin/kubernetes-validate");
    if executable.is_file() {
        return Ok(executable);
    }
    if !venv.join("bin/pip").is_file() {
        run_checked(
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(&venv),
            "creating the Python venv for kubernetes-validate",
        )?;
    }
    run_checked(
        Command::new(venv.join("bin/pip")).args(["install", "--quiet", KUBERNETES_VALIDATE]),
        "installing kubernetes-validate",
    )?;
    if !executable.is_file() {
        bail!("{} is missing after pip install", executable.display());
    }
    Ok(executable)
}

/// Installs whichever of `packages` are missing.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    ensure_packages_for("the tests and benchmarks", packages)
}

/// Installs whichever of `packages` are missing; `purpose` says what for when we cannot.
pub fn ensure_packages_for(purpose: &str, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !package_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_apt(purpose, &missing)?;
    apt_install(&missing)
}

/// Fails with the exact install command when we cannot install packages ourselves.
fn require_apt(purpose: &str, packages: &[&str]) -> Result<()> {
    if is_root() && command_exists("apt-get") {
        return Ok(());
    }
    bail!(
        "{purpose} needs Debian packages that are missing. As root, run:\n  \
         apt-get update && apt-get install -y {}\n  \
         LLVM_PREFIX={LLVM_PREFIX} PATH={LLVM_PREFIX}/bin:$PATH cargo install bpf-linker \
         --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22",
        packages.join(" ")
    )
}

fn apt_install(packages: &[&str]) -> Result<()> {
    run_checked(
        Command::new("apt-get").arg("update").arg("-q"),
        "apt-get update",
    )?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages);
    install.env("DEBIAN_FRONTEND", "noninteractive");
    run_checked(&mut install, "apt-get install")
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        })
}

fn command_exists(name: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

fn is_root() -> bool {
    crate::is_root()
}

/// Totals over every `test result:` line cargo test printed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestTotals {
    /// Adds one libtest summary line: `test result: ok. 8 passed; 0 failed; 1 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(counts) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in counts.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(number)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += number,
                "failed" => self.failed += number,
                "ignored" => self.ignored += number,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test`, passing its output through while adding up the per-binary results.
pub fn run_counting_tests(command: &mut Command) -> Result<(std::process::ExitStatus, TestTotals)> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: running the tests: {command:?}");
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let mut totals = TestTotals::default();
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        totals.add_line(&line);
    }
    Ok((child.wait().context("waiting for cargo test")?, totals))
}

/// Runs a command, echoing it first, and fails with `what` when it fails.
pub fn run_checked(command: &mut Command, what: &str) -> Result<()> {
    eprintln!("xtask: {what}: {command:?}");
    let status = command
        .status()
        .with_context(|| format!("{what}: could not start"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_up_libtest_summaries() {
        let mut totals = TestTotals::default();
        totals.add_line("test result: ok. 8 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.96s");
        totals.add_line(
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        totals.add_line("running 3 tests");
        assert_eq!(
            totals,
            TestTotals {
                passed: 10,
                failed: 1,
                ignored: 1
            }
        );
    }
}
