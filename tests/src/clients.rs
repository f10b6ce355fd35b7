//! The real clients the tests run inside a test cgroup, each to completion within a bound:
//! meshprobe, curl and the system Python (the peer scripts, or a `-c` one-off).

use std::time::Duration;

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
