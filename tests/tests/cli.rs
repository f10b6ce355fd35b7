//! Bad command lines exit with status 2 and a message naming the flag and the value, before
//! anything touches the kernel. These need no privileges.

use std::{process::Command, time::Duration};

use integration_tests::{process::run, sockmesh_bin};

fn sockmesh_run(args: &[&str]) -> (i32, String) {
    let output = run(
        Command::new(sockmesh_bin()).arg("run").args(args),
        Duration::from_secs(30),
    );
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_rejected(args: &[&str], flag: &str, value: &str) {
    let (code, stderr) = sockmesh_run(args);
    assert_eq!(code, 2, "{args:?} should exit 2; stderr: {stderr}");
    assert!(
        stderr.contains(flag),
        "{args:?}: stderr does not name {flag}: {stderr}"
    );
    assert!(
        stderr.contains(value),
        "{args:?}: stderr does not name {value}: {stderr}"
    );
}

#[test]
fn port_out_of_range_is_rejected() {
    assert_rejected(&["--outbound-port", "70000"], "--outbound-port", "70000");
    assert_rejected(
        &["--skip-outbound-ports", "80,70000"],
        "--skip-outbound-ports",
        "70000",
    );
}

#[test]
fn backwards_port_range_is_rejected() {
    assert_rejected(
        &["--skip-outbound-ports", "9-3"],
        "--skip-outbound-ports",
        "9-3",
    );
}

#[test]
fn bad_network_is_rejected() {
    assert_rejected(
        &["--skip-outbound-networks", "10.0.0.0/33"],
        "--skip-outbound-networks",
        "10.0.0.0/33",
    );
    assert_rejected(
        &["--skip-outbound-networks", "not-a-net"],
        "--skip-outbound-networks",
        "not-a-net",
    );
}

#[test]
fn missing_cgroup_is_rejected() {
    assert_rejected(
        &["--cgroup", "/sys/fs/cgroup/no-such-cgroup-here"],
        "--cgroup",
        "no-such-cgroup-here",
    );
}

#[test]
fn bad_admin_address_and_duration_are_rejected() {
    assert_rejected(&["--admin-addr", "localhost"], "--admin-addr", "localhost");
    assert_rejected(&["--shutdown-grace", "soon"], "--shutdown-grace", "soon");
}

#[test]
fn unknown_flag_is_rejected() {
    let (code, stderr) = sockmesh_run(&["--frobnicate"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--frobnicate"), "{stderr}");
}

#[test]
fn exec_without_command_is_rejected() {
    let output = run(
        Command::new(sockmesh_bin()).arg("exec"),
        Duration::from_secs(30),
    );
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn the_agent_ports_must_differ() {
    assert_rejected(
        &["--outbound-port", "4200", "--inbound-port", "4200"],
        "--inbound-port",
        "4200",
    );
    assert_rejected(&["--inbound-port", "4191"], "--admin-addr", "4191");
    assert_rejected(
        &["--admin-addr", "127.0.0.1:4140"],
        "--outbound-port",
        "4140",
    );
}
