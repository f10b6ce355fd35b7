//! Reloading the policy file when its content changes.
//!
//! kubelet updates a mounted ConfigMap by writing the new files into a fresh `..<timestamp>`
//! directory and renaming a `..data_tmp` symlink over `..data`, which the file's own path
//! (`policy.yaml -> ..data/policy.yaml`) goes through: the path's target changes atomically
//! and neither its mtime nor an inotify watch on it says so reliably. So the watcher reads
//! through the path on every check and compares content. Synchronous and small (at most
//! [`MAX_FILE_BYTES`](super::MAX_FILE_BYTES) a read): the caller polls it from its own loop.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{Policy, PolicyError, parse_bytes, read_capped};

/// A policy as loaded, with the annotation keys it ignored (for the caller to log).
pub type Loaded = (Arc<Policy>, Vec<String>);

/// Watches the policy file and reloads it when its contents change.
#[derive(Debug)]
pub struct PolicyWatcher {
    path: PathBuf,
    /// What the last look at the file found, good or bad: a change is a difference from it,
    /// so a bad file is reported once, not on every check.
    seen: Seen,
}

#[derive(Debug)]
enum Seen {
    Content(Vec<u8>),
    /// The file could not be read: the error's message.
    Unreadable(String),
}

impl PolicyWatcher {
    /// Loads the file once (an error here is returned: the agent refuses to start with a bad policy).
    pub fn start(path: PathBuf) -> Result<(PolicyWatcher, Arc<Policy>, Vec<String>), PolicyError> {
        let bytes = read_capped(&path)?;
        let (policy, ignored) = parse_bytes(&path, &bytes)?;
        let watcher = PolicyWatcher {
            path,
            seen: Seen::Content(bytes),
        };
        Ok((watcher, Arc::new(policy), ignored))
    }

    /// The file watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the file now: Ok(Some(new)) if its content changed and parsed, Ok(None) if unchanged,
    /// Err(e) if it changed and is bad (the last good policy stays; a later check of the same bad
    /// content returns Ok(None) again, not a repeated error, until the content changes).
    ///
    /// A file that cannot be read (removed, say) is bad content too: one error, then Ok(None)
    /// while it stays so. A change back to the content of the policy in force after a bad
    /// spell is a change: Ok(Some) again, with that same policy.
    pub fn check(&mut self) -> Result<Option<Loaded>, PolicyError> {
        match read_capped(&self.path) {
            Ok(bytes) => {
                if matches!(&self.seen, Seen::Content(seen) if *seen == bytes) {
                    return Ok(None);
                }
                let parsed = parse_bytes(&self.path, &bytes);
                self.seen = Seen::Content(bytes);
                let (policy, ignored) = parsed?;
                Ok(Some((Arc::new(policy), ignored)))
            }
            Err(error) => {
                let message = error.to_string();
                if matches!(&self.seen, Seen::Unreadable(seen) if *seen == message) {
                    return Ok(None);
                }
                self.seen = Seen::Unreadable(message);
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;
    use crate::policy::tests::{EXAMPLE, TempDir};

    /// A ConfigMap volume as kubelet lays it out, updated the way kubelet updates it.
    struct ConfigMapDir {
        dir: TempDir,
        version: u32,
    }

    impl ConfigMapDir {
        fn new(name: &str, content: &str) -> Self {
            let dir = TempDir::new(name);
            let mut config_map = Self { dir, version: 0 };
            let data = config_map.write_version(content);
            symlink(&data, config_map.dir.0.join("..data")).unwrap();
            symlink("..data/policy.yaml", config_map.path()).unwrap();
            config_map
        }

        fn path(&self) -> PathBuf {
            self.dir.0.join("policy.yaml")
        }

        fn write_version(&mut self, content: &str) -> String {
            self.version += 1;
            let name = format!("..2026_01_01_v{}", self.version);
            fs::create_dir(self.dir.0.join(&name)).unwrap();
            fs::write(self.dir.0.join(&name).join("policy.yaml"), content).unwrap();
            name
        }

        /// The atomic swap: a new `..data_tmp` symlink renamed over `..data`.
        fn update(&mut self, content: &str) {
            let data = self.write_version(content);
            let tmp = self.dir.0.join("..data_tmp");
            symlink(&data, &tmp).unwrap();
            fs::rename(&tmp, self.dir.0.join("..data")).unwrap();
        }
    }

    const SECOND: &str = "workloads:\n  - namespace: payments\n    annotations:\n      config.linkerd.io/opaque-ports: 6379\n      config.linkerd.io/proxy-cpu-limit: \"1\"\n";
    const BROKEN: &str = "workloads:\n  - namespace: a\n    cgroup: /b\n";
    const THIRD: &str = "workloads:\n  - cgroup: /system.slice/*.service\n    annotations:\n      linkerd.io/inject: disabled\n";

    #[test]
    fn config_map_swap_reloads() {
        let mut config_map = ConfigMapDir::new("swap", EXAMPLE);
        let (mut watcher, policy, ignored) = PolicyWatcher::start(config_map.path()).unwrap();
        assert_eq!((policy.entries(), ignored.len()), (2, 0));
        assert_eq!(watcher.path(), config_map.path());
        assert!(watcher.check().unwrap().is_none(), "unchanged");

        config_map.update(SECOND);
        let (policy, ignored) = watcher.check().unwrap().expect("changed");
        assert!(
            policy
                .for_pod("payments", "web")
                .opaque_ports
                .contains(6379)
        );
        assert_eq!(ignored, ["config.linkerd.io/proxy-cpu-limit"]);
        assert!(watcher.check().unwrap().is_none());

        // A broken file is reported once; the same broken content again is no news.
        config_map.update(BROKEN);
        let err = watcher.check().expect_err("broken");
        assert!(
            matches!(err.without_path(), PolicyError::BothSelectors { entry: 0 }),
            "{err:?}"
        );
        assert!(watcher.check().unwrap().is_none());
        config_map.update(BROKEN);
        assert!(watcher.check().unwrap().is_none(), "same broken content");

        config_map.update(THIRD);
        let (policy, _) = watcher.check().unwrap().expect("good again");
        assert!(policy.for_cgroup("/system.slice/x.service").inject_disabled);
        assert!(watcher.check().unwrap().is_none());
    }

    #[test]
    fn content_not_mtime_decides() {
        let mut config_map = ConfigMapDir::new("same", EXAMPLE);
        let (mut watcher, _, _) = PolicyWatcher::start(config_map.path()).unwrap();
        // A new version with the same bytes is not a change.
        config_map.update(EXAMPLE);
        assert!(watcher.check().unwrap().is_none());
        // A plain rewrite in place is.
        let target = fs::canonicalize(config_map.path()).unwrap();
        fs::write(&target, SECOND).unwrap();
        assert!(watcher.check().unwrap().is_some());
    }

    #[test]
    fn missing_file_keeps_last_good() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("policy.yaml");
        fs::write(&path, EXAMPLE).unwrap();
        let (mut watcher, _, _) = PolicyWatcher::start(path.clone()).unwrap();
        fs::remove_file(&path).unwrap();
        let err = watcher.check().expect_err("missing");
        assert!(matches!(err, PolicyError::Read { .. }), "{err:?}");
        assert!(watcher.check().unwrap().is_none(), "still missing: no news");
        // Back with the very content in force: reported, so the caller sees the recovery.
        fs::write(&path, EXAMPLE).unwrap();
        let (policy, _) = watcher.check().unwrap().expect("back");
        assert_eq!(policy.entries(), 2);
    }

    #[test]
    fn start_refuses_a_bad_file() {
        let dir = TempDir::new("start");
        let path = dir.0.join("policy.yaml");
        assert!(matches!(
            PolicyWatcher::start(path.clone()),
            Err(PolicyError::Read { .. })
        ));
        fs::write(&path, BROKEN).unwrap();
        let err = PolicyWatcher::start(path.clone()).expect_err("bad");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
