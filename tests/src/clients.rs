//! The real clients the tests run inside a test cgroup, each to completion within a bound:
//! meshprobe, curl and the system Python (the peer scripts, or a `-c` one-off).

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::{TestCgroup, meshprobe_bin, process::run_ok, servers::SYSTEM_PYTHON};

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
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
            // The rest (its final report) is read too, or the holder's last print would fail.
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let holder = Self { child };
        let line = rx.recv_timeout(limit).unwrap_or_default();
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
