//! Test harness for sockmesh's end-to-end tests: a cgroup the test owns, a real agent attached
//! to it, clients started inside it with `sockmesh exec`, servers on loopback, and a reader for
//! the agent's /metrics. Everything is bounded in time and cleaned up on drop.

pub mod agent;
pub mod cgroup;
pub mod clients;
pub mod metrics;
pub mod pattern;
pub mod pod;
pub mod process;
pub mod servers;

use std::{
    net::{Ipv6Addr, SocketAddr, TcpListener},
    path::PathBuf,
};

pub use agent::{Agent, AgentOptions};
pub use cgroup::TestCgroup;
pub use metrics::Metrics;

/// Whether privileged tests can run here. When they cannot, prints why and returns false, so
/// the test returns early (a skip), unless SOCKMESH_REQUIRE_PRIVILEGED=1, where it fails.
pub fn privileged() -> bool {
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else if let Err(error) = cgroup::cgroup2_mount() {
        Some(format!("no cgroup2 mount: {error}"))
    } else {
        None
    };
    match reason {
        None => {
            mount_bpffs_once();
            true
        }
        Some(reason) if std::env::var("SOCKMESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") => {
            panic!("privileged test cannot run ({reason}) and SOCKMESH_REQUIRE_PRIVILEGED=1")
        }
        Some(reason) => {
            eprintln!("SKIPPED: privileged test needs root and cgroup v2 ({reason})");
            false
        }
    }
}

/// Agents started in parallel would each mount bpffs when it is missing, stacking mounts
/// and hiding each other's pins: mount it once, before any agent starts.
fn mount_bpffs_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if !mounts.lines().any(|line| {
            line.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && line.split_whitespace().nth(2) == Some("bpf")
        }) {
            let status = std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status()
                .expect("running mount");
            assert!(status.success(), "mounting bpffs at /sys/fs/bpf failed");
        }
    });
}

/// Returns early from a test (a skip) when privileged tests cannot run here.
#[macro_export]
macro_rules! require_privileged {
    () => {
        if !$crate::privileged() {
            return;
        }
    };
}

/// The sockmesh binary: $SOCKMESH_BIN (set by `cargo xtask test`), else target/debug/sockmesh.
pub fn sockmesh_bin() -> PathBuf {
    std::env::var_os("SOCKMESH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sockmesh")
        })
}

/// The meshprobe test client, built beside the test binaries (target/debug/meshprobe; the
/// test executables live in target/debug/deps).
pub fn meshprobe_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    profile_dir.join("meshprobe")
}

/// A TCP port free on both 127.0.0.1 and ::1 right now, below the ephemeral range.
/// SO_LINGER with a zero timeout: closing `stream` sends a reset instead of a FIN.
pub fn reset_on_close(stream: &std::net::TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO))
}

pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Start from a per-process offset so parallel test binaries rarely collide.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    for _ in 0..2_000 {
        let port = base + NEXT.fetch_add(1, Ordering::SeqCst) % 10_000;
        let v4 = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)));
        let v6 = TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
        if v4.is_ok() && v6.is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}

/// A fresh temporary directory, removed by the caller (or left in /tmp for inspection).
pub fn temp_dir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sockmesh-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    dir
}
