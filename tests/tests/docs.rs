//! Docs stay true to the code: every metric family the agent exposes is documented in
//! docs/metrics.md, and every metric the Grafana dashboard queries is one the agent exposes.

use std::collections::BTreeSet;

use integration_tests::{Agent, TestCgroup, require_privileged};

/// Metric family names from the `# TYPE` lines of a scrape.
fn exposed_families(agent: &Agent) -> BTreeSet<String> {
    let (_, body) = agent.get("/metrics").expect("GET /metrics");
    body.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The sample names a family can produce.
fn sample_names(families: &BTreeSet<String>) -> BTreeSet<String> {
    families
        .iter()
        .flat_map(|family| {
            ["", "_total", "_bucket", "_count", "_sum", "_created"]
                .map(|suffix| format!("{family}{suffix}"))
        })
        .collect()
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))).expect(path)
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn every_exposed_metric_is_documented() {
    require_privileged!();
    let cgroup = TestCgroup::new("docs");
    let agent = Agent::start(&cgroup);
    let docs = repo_file("docs/metrics.md");
    let undocumented: Vec<String> = exposed_families(&agent)
        .into_iter()
        .filter(|family| !docs.contains(&format!("`{family}")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/metrics.md: {undocumented:?}"
    );
}

#[test]
#[ignore = "needs root and cgroup v2: run by `cargo xtask test` as root"]
fn the_grafana_dashboard_queries_only_exposed_metrics() {
    require_privileged!();
    let cgroup = TestCgroup::new("dashboard");
    let agent = Agent::start(&cgroup);
    let exposed = sample_names(&exposed_families(&agent));
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana-dashboard.json")).expect("dashboard JSON");
    let promql_words = ["histogram_quantile"];
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            // Metric names are the identifiers directly followed by a selector or a range, or
            // a whole expression on their own.
            if expr.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                queried.insert(expr.to_string());
            }
            for (i, _) in expr.match_indices(['{', '[']) {
                let name: String = expr[..i]
                    .chars()
                    .rev()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                if name.contains('_') && !promql_words.contains(&name.as_str()) {
                    queried.insert(name);
                }
            }
        }
    }
    assert!(
        queried.len() >= 10,
        "found too few metric names: {queried:?}"
    );
    let unknown: Vec<&String> = queried
        .iter()
        .filter(|name| !exposed.contains(*name))
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics the agent does not expose: {unknown:?}"
    );
}

/// The README's policy example is a policy the agent accepts, as written.
#[test]
fn the_readme_policy_example_is_valid() {
    let readme = repo_file("README.md");
    let section = readme
        .split("## Per-workload policy")
        .nth(1)
        .expect("a Per-workload policy section");
    let example = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```yaml block in the policy section");
    let file = integration_tests::temp_dir("readme-policy").join("policy.yaml");
    std::fs::write(&file, example).unwrap();
    let output = integration_tests::process::run(
        std::process::Command::new(integration_tests::sockmesh_bin())
            .arg("check-policy")
            .arg(&file),
        std::time::Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("with 2 workload entries"), "{stdout}");
}

/// Every flag of `sockmesh run` has its row in the README's flag table (`| `--flag ...`).
#[test]
fn every_run_flag_is_in_the_readme() {
    let readme = repo_file("README.md");
    let output = integration_tests::process::run(
        std::process::Command::new(integration_tests::sockmesh_bin()).args(["run", "--help"]),
        std::time::Duration::from_secs(30),
    );
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("-").map_or(line, |rest| {
                // "-x, --long": the short form first.
                rest.split_once(", ").map_or(line, |(_, long)| long)
            });
            let flag = line.strip_prefix("--")?.split([' ', '=', '<']).next()?;
            (!flag.is_empty() && flag != "help").then_some(flag)
        })
        .collect();
    assert!(flags.len() > 20, "{help}");
    let missing: Vec<&&str> = flags
        .iter()
        .filter(|flag| !readme.contains(&format!("| `--{flag}")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in the README's flag table: {missing:?}"
    );
}

/// The README's commands name the binaries `cargo xtask run` builds, the release ones: a debug
/// binary is there only after `cargo xtask run --debug` (or the tests), not on a clone that
/// followed the README.
#[test]
fn the_readme_names_the_binaries_cargo_xtask_run_builds() {
    let readme = repo_file("README.md");
    let binaries: Vec<&str> = readme
        .split(|c: char| c.is_whitespace() || c == '`')
        .filter(|word| word.starts_with("target/") && word.contains("/sockmesh"))
        .collect();
    assert!(!binaries.is_empty(), "the README names no built binary");
    for binary in binaries {
        assert!(
            binary.starts_with("target/release/"),
            "{binary}: `cargo xtask run` builds target/release/"
        );
    }
}
