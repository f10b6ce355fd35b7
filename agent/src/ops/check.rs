//! `sockmesh check`: can this node run the agent? Each check prints what it found and, when it
//! fails, how to fix it. Exits non-zero when any check fails. An `[info]` line reports what the
//! kernel's sk_msg redirects do, another whether the experimental `--accelerate local` can run
//! (docs/design-sk-msg.md).

use std::{fs, path::Path};

use anyhow::{Result, bail};

/// The oldest kernel with every hook we attach: cgroup getpeername hooks (5.8), bpf_link for
/// cgroups (5.7), cgroup getsockopt (5.3).
const MIN_KERNEL: (u32, u32) = (5, 8);
/// Below this many open files a busy node runs out: each proxied connection needs 2 to 4.
const MIN_FD_LIMIT: u64 = 4096;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
    pub fix: &'static str,
}

/// `sockmesh check-policy FILE`: parses a policy file as the agent would and prints its
/// entries' count and the annotations it ignores; an error names what is wrong.
pub fn policy(path: &Path) -> Result<()> {
    let (policy, ignored) = crate::policy::Policy::load(path)?;
    println!(
        "ok: {} with {} workload entries",
        path.display(),
        policy.entries()
    );
    if !ignored.is_empty() {
        println!("ignored annotations: {}", ignored.join(", "));
    }
    Ok(())
}

/// Runs every check; `cgroup` is the --cgroup the agent would be given, if any.
pub fn run(cgroup: Option<&Path>) -> Result<()> {
    let checks = all(cgroup);
    for check in &checks {
        let mark = if check.passed { "ok  " } else { "FAIL" };
        println!("[{mark}] {:<14} {}", check.name, check.detail);
        if !check.passed {
            println!("       fix: {}", check.fix);
        }
    }
    println!("[info] {:<14} {}", "sk_msg", sk_msg_fast_path());
    println!("[info] {:<14} {}", "accelerate", accelerate_local());
    let failed = checks.iter().filter(|check| !check.passed).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", checks.len());
    }
    println!("all {} checks passed", checks.len());
    Ok(())
}

pub fn all(cgroup: Option<&Path>) -> Vec<Check> {
    vec![
        kernel(),
        cgroup2(cgroup),
        bpffs(),
        btf(),
        capabilities(),
        fd_limit(),
    ]
}

/// What the sk_msg probe found, for the `--accelerate local` fast path. Informational: the
/// agent uses sk_msg only in that experimental mode, so a kernel without it passes `check`.
fn sk_msg_fast_path() -> String {
    match super::sk_msg_probe::run() {
        Ok(findings) => findings.describe(),
        Err(error) => format!("not probed: {:#}", anyhow::Error::from(error)),
    }
}

/// Whether this kernel takes `--accelerate local`'s program (loaded and attached to a map of
/// its own, then dropped). Informational: the mode is experimental and off by default.
fn accelerate_local() -> String {
    let object = crate::intercept::ebpf_object();
    let loaded = aya::EbpfLoader::new()
        .load(object)
        .map_err(anyhow::Error::from)
        .and_then(|mut ebpf| Ok(crate::accel::Accelerator::attach(&mut ebpf).map(drop)?));
    match loaded {
        Ok(()) => format!(
            "--accelerate local can run here (experimental, off by default: the sk_msg \
             line says what this kernel does that the mode must not; docs/design-sk-msg.md){}",
            foreign_socket_maps()
        ),
        Err(error) => format!("--accelerate local cannot run here: {error:#}"),
    }
}

/// Other programs' socket maps, which pause the fast path while they are loaded.
fn foreign_socket_maps() -> String {
    match crate::accel::foreign::foreign_socket_maps() {
        Ok(maps) if maps.is_empty() => String::new(),
        Ok(maps) => {
            let maps: Vec<String> = maps.iter().map(ToString::to_string).collect();
            format!(
                "; paused while other programs' socket maps are loaded, as now: {}",
                maps.join(", ")
            )
        }
        Err(error) => format!(
            "; paused while the node's eBPF maps cannot be listed, as now: {:#}",
            anyhow::Error::from(error)
        ),
    }
}

fn kernel() -> Check {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = parse_kernel_version(&release);
    Check {
        name: "kernel",
        passed: version.is_some_and(|version| version >= MIN_KERNEL),
        detail: format!(
            "{} (needs {}.{} or newer)",
            release.trim(),
            MIN_KERNEL.0,
            MIN_KERNEL.1
        ),
        fix: "run a kernel 5.8 or newer with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF",
    }
}

fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn cgroup2(cgroup: Option<&Path>) -> Check {
    let mount = crate::cgroup::cgroup2_mount().map_err(anyhow::Error::from);
    let (passed, detail) = match (&mount, cgroup) {
        (Err(error), _) => (false, format!("{error:#}")),
        (Ok(_), Some(path)) if !path.join("cgroup.procs").exists() => (
            false,
            format!("{} is not a cgroup v2 directory", path.display()),
        ),
        (Ok(_), Some(path)) => (true, format!("{} is a cgroup v2 directory", path.display())),
        (Ok(mount), None) => (true, format!("cgroup2 mounted at {}", mount.display())),
    };
    Check {
        name: "cgroup v2",
        passed,
        detail,
        fix: "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup) and pass an existing cgroup \
              directory under it with --cgroup",
    }
}

fn bpffs() -> Check {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&"/sys/fs/bpf") && fields.get(2) == Some(&"bpf")
    });
    let can_mount = Path::new("/sys/fs/bpf").is_dir();
    Check {
        name: "bpffs",
        passed: mounted || can_mount,
        detail: if mounted {
            "bpf file system mounted at /sys/fs/bpf".to_string()
        } else if can_mount {
            "/sys/fs/bpf exists but is not mounted; the agent mounts it".to_string()
        } else {
            "/sys/fs/bpf does not exist".to_string()
        },
        fix: "mount -t bpf bpf /sys/fs/bpf (in a container: mount the host's /sys/fs/bpf)",
    }
}

fn btf() -> Check {
    let present = Path::new("/sys/kernel/btf/vmlinux").exists();
    Check {
        name: "BTF",
        passed: present,
        detail: if present {
            "/sys/kernel/btf/vmlinux present"
        } else {
            "no /sys/kernel/btf/vmlinux"
        }
        .to_string(),
        fix: "run a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    }
}

fn capabilities() -> Check {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
    let passed = bpf && has(CAP_NET_ADMIN) && has(CAP_SYS_ADMIN);
    Check {
        name: "capabilities",
        passed,
        detail: format!(
            "CAP_BPF {}, CAP_NET_ADMIN {}, CAP_SYS_ADMIN {}",
            yes_no(bpf),
            yes_no(has(CAP_NET_ADMIN)),
            yes_no(has(CAP_SYS_ADMIN))
        ),
        fix: "run as root, or in a privileged container (attaching cgroup programs and writing \
              cgroup.procs need CAP_SYS_ADMIN)",
    }
}

fn yes_no(present: bool) -> &'static str {
    if present { "yes" } else { "no" }
}

fn fd_limit() -> Check {
    let (_, hard) = crate::sys::open_file_limit().unwrap_or((0, 0));
    Check {
        name: "open files",
        passed: hard >= MIN_FD_LIMIT,
        detail: format!(
            "hard limit {hard} (the agent raises its soft limit to it; ~{} proxied connections)",
            hard / 4
        ),
        fix: "raise the hard RLIMIT_NOFILE (ulimit -Hn, LimitNOFILE=, or the container runtime)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }

    #[test]
    fn a_missing_cgroup_fails_its_check() {
        let check = cgroup2(Some(Path::new("/sys/fs/cgroup/no-such-cgroup")));
        assert!(!check.passed);
        assert!(check.detail.contains("no-such-cgroup"));
    }
}
