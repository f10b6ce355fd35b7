//! The real clients the tests run inside a test cgroup, each to completion within a bound:
//! meshprobe, curl and the system Python (the peer scripts, or a `-c` one-off).

use std::{
    io::Write,
    net::SocketAddr,
    process::{Child, Stdio},
    time::Duration,
};

use crate::{
    TestCgroup, meshprobe_bin,
    process::{run_ok, stdout_lines},
    servers::SYSTEM_PYTHON,
};

/// Runs meshprobe with `args` inside `cgroup`; its report (stdout), failing on a non-zero exit.
pub fn probe(cgroup: &TestCgroup, args: &[&str], limit: Duration) -> String {
    run_ok(cgroup.command(meshprobe_bin()).args(args), limit)
}

/// The status code curl (inside `cgroup`) gets for `url`, as curl prints it ("000" when none).
pub fn curl_status(cgroup: &TestCgroup, url: &str, limit: Duration) -> String {
    run_ok(
        cgroup
            .command("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url]),
        limit,
    )
}

/// Runs the system Python with `args` (a peer script and its arguments, or `-c` and a script)
/// inside `cgroup`; its stdout, failing on a non-zero exit.
pub fn python(cgroup: &TestCgroup, args: &[&str], limit: Duration) -> String {
    run_ok(cgroup.command(SYSTEM_PYTHON).args(args), limit)
}

/// `meshprobe hold` inside a test cgroup: connections held open until released.
pub struct Holder {
    child: Child,
}

impl Holder {
    /// Opens `count` connections to the echo server at `echo` (each echoing one message, or
    /// `silent`: never sending) and waits, up to `limit`, until meshprobe says it holds them all.
    pub fn start(
        cgroup: &TestCgroup,
        echo: SocketAddr,
        count: u64,
        silent: bool,
        limit: Duration,
    ) -> Self {
        let (addr, count_text) = (echo.to_string(), count.to_string());
        let mut args = vec!["hold", addr.as_str(), count_text.as_str()];
        if silent {
            args.push("silent");
        }
        let mut child = cgroup
            .command(meshprobe_bin())
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting meshprobe hold");
        // The rest of its output (its final report) is read too, or its last print would fail.
        let line = stdout_lines(&mut child)
            .recv_timeout(limit)
            .unwrap_or_default();
        let holder = Self { child };
        assert_eq!(line.trim(), format!("held {count}"));
        holder
    }

    /// Closes every connection and checks that meshprobe exits cleanly.
    pub fn release(mut self) {
        let _ = self
            .child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(b"done\n"));
        let status = self.child.wait().expect("meshprobe hold");
        assert!(status.success(), "meshprobe hold: {status}");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // A failed test must not leave thousands of connections behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
