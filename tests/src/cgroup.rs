//! A cgroup v2 the test creates, attaches the agent to, and removes afterwards (killing any
//! process left in it). Tests never attach anything to the root cgroup.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

pub fn cgroup2_mount() -> Result<PathBuf, String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs_type) = line.split_once(" - ")?;
            let mount_point = mount.split_whitespace().nth(4)?;
            (fs_type.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or_else(|| "no cgroup2 entry in /proc/self/mountinfo".to_string())
}

pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        Self::new_in(&cgroup2_mount().expect("cgroup2 mount"), name)
    }

    /// A cgroup inside `parent` (a pod's cgroup under the meshed one); drop it before the parent.
    pub fn child_of(parent: &TestCgroup, name: &str) -> Self {
        Self::new_in(parent.path(), name)
    }

    fn new_in(parent: &Path, name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = parent.join(format!(
            "sockmesh-test-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs `program` inside this cgroup, through `sockmesh exec`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(crate::sockmesh_bin());
        command
            .arg("exec")
            .arg("--cgroup")
            .arg(&self.path)
            .arg("--")
            .arg(program);
        command
    }

    /// `command` (program and arguments) run inside this cgroup instead.
    pub fn wrap(&self, command: &Command) -> Command {
        let mut wrapped = self.command(command.get_program());
        wrapped.args(command.get_args());
        wrapped
    }

    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pids().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}
