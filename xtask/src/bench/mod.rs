//! `cargo xtask bench [--quick]`: sockmesh side by side with a direct connection, HAProxy and
//! nginx, measured in alternating runs on loopback. Writes target/bench/results.{md,json,png}.

pub(crate) mod env;
pub mod probe;
mod report;
mod scenarios;

use std::{fs, path::Path};

use anyhow::{Context, Result};

use self::{
    env::Env,
    report::Results,
    scenarios::{ALL, Scale, Scenario},
};

/// Debian packages of the tools and peers the benchmark runs.
pub const PACKAGES: &[&str] = &[
    "iperf3",
    "redis-server",
    "redis-tools",
    "wrk",
    "nghttp2-client",
    "haproxy",
    "nginx-light",
    "libnginx-mod-stream",
    "fonts-dejavu-core",
    // The slow-loris attack beside a well-behaved client.
    "slowhttptest",
];

pub struct Options {
    pub quick: bool,
    pub runs: Option<usize>,
    /// Only scenarios whose name (as `{:?}` prints it) contains this, case-insensitively.
    pub only: Option<String>,
}

fn selected(scenario: &Scenario, only: Option<&str>) -> bool {
    only.is_none_or(|only| {
        format!("{scenario:?}")
            .to_ascii_lowercase()
            .contains(&only.to_ascii_lowercase())
    })
}

pub fn run(root: &Path, sockmesh: &Path, options: &Options) -> Result<()> {
    let (scale, runs) = if options.quick {
        (Scale::QUICK, 2)
    } else {
        (Scale::FULL, 5)
    };
    let runs = options.runs.unwrap_or(runs);
    let out_dir = root.join("target/bench");
    let _ = fs::remove_dir_all(out_dir.join("work"));
    super::toolchain::ensure_packages(PACKAGES)?;
    probe::raise_fd_limit();
    let env = Env::start(&out_dir.join("work"), sockmesh).context("setting up the benchmark")?;
    let mut results = Results::default();
    let scenarios: Vec<Scenario> = ALL
        .into_iter()
        .chain([
            Scenario::IdleMemory,
            Scenario::IdleHttpMemory,
            Scenario::IdleHttp2Memory,
        ])
        .filter(|scenario| selected(scenario, options.only.as_deref()))
        .collect();
    if scenarios.is_empty() {
        anyhow::bail!("no scenario matches --only {:?}", options.only);
    }
    for run in 0..runs {
        for scenario in &scenarios {
            // Alternate the order of setups between runs so drift hits them all alike.
            let mut setups = scenario.setups().to_vec();
            if run % 2 == 1 {
                setups.reverse();
            }
            for setup in setups {
                eprintln!(
                    "bench: run {}/{runs}: {scenario:?} via {}",
                    run + 1,
                    setup.name()
                );
                let values = scenario
                    .run(&env, setup, scale)
                    .with_context(|| format!("{scenario:?} via {}", setup.name()))?;
                for (metric, value) in scenario.metrics().into_iter().zip(values) {
                    if let Some(value) = value {
                        results.record(metric, setup, value);
                    }
                }
            }
        }
    }
    drop(env);
    let markdown = results.markdown(runs);
    fs::write(out_dir.join("results.md"), &markdown)?;
    fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&results.json(runs))?,
    )?;
    results.chart(&out_dir.join("results.png"))?;
    println!("{markdown}");
    println!(
        "bench: wrote {0}/results.md, results.json and results.png",
        out_dir.display()
    );
    Ok(())
}
