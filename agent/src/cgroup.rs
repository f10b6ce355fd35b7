//! cgroup v2 plumbing: find the cgroup2 mount, create the default meshed cgroup, and move a
//! process into a cgroup (for `sockmesh exec`).

use std::{
    fs,
    path::{Path, PathBuf},
};

/// Name of the cgroup `sockmesh run` creates when `--cgroup` is not given.
pub const DEFAULT_CGROUP_NAME: &str = "sockmesh";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading /proc/self/mountinfo")]
    Mountinfo(#[source] std::io::Error),
    #[error("no cgroup2 file system is mounted")]
    NoCgroup2Mount,
    #[error("creating cgroup {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a cgroup v2 directory", .0.display())]
    NotACgroup(PathBuf),
    #[error("joining cgroup {}", path.display())]
    Join {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// The cgroup2 mount point, from /proc/self/mountinfo (it is /sys/fs/cgroup on most systems,
/// /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
    find_cgroup2_mount(&mountinfo).ok_or(CgroupError::NoCgroup2Mount)
}

/// Parses mountinfo: field 5 is the mount point, the field after " - " is the fs type.
fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount_fields, fs_fields) = line.split_once(" - ")?;
        let fs_type = fs_fields.split_whitespace().next()?;
        let mount_point = mount_fields.split_whitespace().nth(4)?;
        (fs_type == "cgroup2").then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup given on the command line, or the default one (created if missing).
pub fn resolve(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let path = cgroup2_mount()?.join(DEFAULT_CGROUP_NAME);
    if !path.exists() {
        fs::create_dir(&path).map_err(|source| CgroupError::Create {
            path: path.clone(),
            source,
        })?;
        tracing::info!(cgroup = %path.display(), "created the meshed cgroup");
    }
    Ok(path)
}

/// Cgroups walked at most below the meshed one.
const MAX_CGROUPS_WALKED: usize = 4096;

/// `root` and the cgroups below it: (cgroup id, path under the cgroup2 mount `mount`). On
/// cgroup v2 a cgroup's id (what bpf_get_current_cgroup_id and sock_diag report) is its
/// directory's inode number.
pub fn subtree(root: &Path, mount: &Path) -> Vec<(u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        if found.len() >= MAX_CGROUPS_WALKED {
            tracing::warn!(root = %root.display(), "more than {MAX_CGROUPS_WALKED} cgroups below the meshed one; the rest are not looked at");
            break;
        }
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        let relative = dir.strip_prefix(mount).unwrap_or(&dir);
        found.push((meta.ino(), format!("/{}", relative.display())));
        if let Ok(entries) = fs::read_dir(&dir) {
            pending.extend(
                entries
                    .filter_map(std::result::Result::ok)
                    .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                    .map(|entry| entry.path()),
            );
        }
    }
    found
}

/// Whether this process runs in `root` or below it (its sockets then meet the hooks attached to
/// `root`). True when that cannot be told: the caller then asks as if it did.
pub fn own_cgroup_within(root: &Path) -> bool {
    let Some(own) = own_cgroup() else {
        return true;
    };
    match (fs::canonicalize(own), fs::canonicalize(root)) {
        (Ok(own), Ok(root)) => own.starts_with(root),
        _ => true,
    }
}

/// This process's cgroup v2 directory, under the cgroup2 mount.
fn own_cgroup() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = unified_path(&text)?;
    Some(cgroup2_mount().ok()?.join(own.trim_start_matches('/')))
}

/// The cgroup v2 path in /proc/self/cgroup (the line "0::PATH").
fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
}

/// Moves the calling process into `cgroup`.
pub fn enter(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    if !procs.exists() {
        return Err(CgroupError::NotACgroup(cgroup.to_path_buf()));
    }
    // Writing "0" moves the writing process itself.
    fs::write(&procs, "0").map_err(|source| CgroupError::Join {
        path: cgroup.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let mountinfo = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            find_cgroup2_mount(mountinfo),
            Some("/sys/fs/cgroup/unified".into())
        );
    }

    #[test]
    fn no_cgroup2_mount() {
        assert_eq!(
            find_cgroup2_mount("25 30 0:23 / /sys rw - sysfs sysfs rw"),
            None
        );
        assert_eq!(find_cgroup2_mount("garbage"), None);
    }

    #[test]
    fn reads_the_unified_cgroup_of_proc_self_cgroup() {
        let hybrid = "12:cpu,cpuacct:/user.slice\n1:name=systemd:/user.slice\n0::/sockmesh/pod1\n";
        assert_eq!(unified_path(hybrid), Some("/sockmesh/pod1"));
        assert_eq!(unified_path("0::/\n"), Some("/"));
        assert_eq!(unified_path("3:memory:/x\n"), None);
    }

    #[test]
    fn this_process_is_within_its_own_cgroup_and_not_a_sibling() {
        let (Some(own), Ok(mount)) = (own_cgroup(), cgroup2_mount()) else {
            return;
        };
        assert!(own_cgroup_within(&own));
        assert!(own_cgroup_within(&mount));
        // A directory that is no ancestor of ours (the test cannot create cgroups unprivileged).
        assert!(!own_cgroup_within(Path::new("/proc")));
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_octal(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape_octal(r"/plain\"), r"/plain\");
    }
}
