//! `cargo xtask fuzz`: runs the cargo-fuzz targets in fuzz/ for a fixed time each, installing
//! what they need (a rustup nightly, cargo-fuzz) on a machine that lacks it.
//!
//! Every target starts from its seed corpus in fuzz/corpus/<target>/, which stays untouched:
//! libFuzzer writes new inputs into the first corpus directory it is given, so that is a
//! working directory under target/fuzz/ (kept between runs, so local runs build on earlier
//! ones), and the seeds come second, read only. A crash, a timeout (hang) or running out of
//! memory fails the run, with the reproducer's path.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result, bail};

use crate::toolchain::run_checked;

/// Seconds per target when not told (`--seconds`).
pub const DEFAULT_SECONDS: u64 = 15;
/// One input running longer than this is a hang.
const TIMEOUT_SECONDS: u64 = 5;
const RSS_LIMIT_MB: u64 = 2048;
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Runs `targets` (all of fuzz/'s when empty) for `seconds` each.
pub fn run(root: &Path, seconds: u64, targets: &[String]) -> Result<()> {
    let fuzz_dir = root.join("fuzz");
    let targets = if targets.is_empty() {
        all_targets(&fuzz_dir)?
    } else {
        targets.to_vec()
    };
    ensure_tools()?;
    let started = Instant::now();
    build(&fuzz_dir)?;
    let mut failed = Vec::new();
    for target in &targets {
        if let Err(error) = run_target(root, &fuzz_dir, target, seconds) {
            eprintln!("xtask: fuzz: {error:#}");
            failed.push(target.as_str());
        }
    }
    eprintln!(
        "xtask: fuzz: {} targets, {seconds} s each, {:.0} s with the build",
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        bail!("fuzzing found problems in: {}", failed.join(", "));
    }
    Ok(())
}

/// The `[[bin]]` targets in fuzz/fuzz_targets/, by file name.
fn all_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut targets: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    targets.sort();
    if targets.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(targets)
}

/// A rustup nightly (libFuzzer's instrumentation needs it; it only builds host code, so no
/// rust-src) and cargo-fuzz, each installed when missing.
fn ensure_tools() -> Result<()> {
    if !succeeds(Command::new("cargo").args(["+nightly", "--version"])) {
        eprintln!("xtask: fuzz: no nightly toolchain; installing one with rustup");
        run_checked(
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
            "installing the nightly toolchain",
        )?;
    }
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        eprintln!("xtask: fuzz: cargo-fuzz is missing; installing it (about a minute)");
        run_checked(
            Command::new("cargo").args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ]),
            "installing cargo-fuzz",
        )?;
    }
    Ok(())
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `cargo fuzz` with the nightly, outside xtask's own (stable) toolchain environment.
fn cargo_fuzz(fuzz_dir: &Path) -> Command {
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(fuzz_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .args(["+nightly", "fuzz"]);
    cargo
}

/// Builds every target at once (their dependencies once). No sanitizer: the agent's parsers
/// are safe Rust, where AddressSanitizer only slows the build and each run; overflow checks
/// and debug assertions stay on (cargo fuzz's default).
fn build(fuzz_dir: &Path) -> Result<()> {
    run_checked(
        cargo_fuzz(fuzz_dir).args(["build", "--sanitizer", "none"]),
        "building the fuzz targets",
    )
}

fn run_target(root: &Path, fuzz_dir: &Path, target: &str, seconds: u64) -> Result<()> {
    let seeds = fuzz_dir.join("corpus").join(target);
    if !seeds.is_dir() {
        bail!("{target}: no seed corpus at {}", seeds.display());
    }
    let work = root.join("target/fuzz/corpus").join(target);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // libFuzzer reports every new input: that goes to a log, and the CI log gets a summary.
    let log_path = root.join("target/fuzz").join(format!("{target}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let artifacts = fuzz_dir.join("artifacts").join(target);
    let started = SystemTime::now();
    eprintln!(
        "xtask: fuzz: {target} for {seconds} s (log: {})",
        log_path.display()
    );
    let status = cargo_fuzz(fuzz_dir)
        .args(["run", "--sanitizer", "none", target])
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={TIMEOUT_SECONDS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .stdout(log.try_clone().context("the fuzz log")?)
        .stderr(log)
        .status()
        .with_context(|| format!("{target}: starting cargo fuzz"))?;
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    if status.success() {
        // libFuzzer's last status line: runs, coverage, corpus size, speed.
        let summary = log.lines().rev().find(|line| line.contains("DONE "));
        eprintln!(
            "xtask: fuzz: {target}: nothing found ({})",
            summary.map_or("no summary", str::trim)
        );
        return Ok(());
    }
    // What went wrong: the panic message (or libFuzzer's report of a hang or OOM) and the
    // input, not the backtrace that follows.
    let lines: Vec<&str> = log.lines().collect();
    let first = lines
        .iter()
        .position(|line| line.contains("panicked at") || line.contains("ERROR: libFuzzer"))
        .unwrap_or(lines.len().saturating_sub(20));
    for line in lines.iter().skip(first).take(12) {
        eprintln!("  {line}");
    }
    let found = new_files(&artifacts, started);
    if found.is_empty() {
        bail!("{target}: cargo fuzz failed ({status}) without a reproducer");
    }
    let paths: Vec<String> = found
        .iter()
        .map(|path| path.display().to_string())
        .collect();
    bail!(
        "{target}: failed ({status}); reproduce with `cd fuzz && cargo +nightly fuzz run \
         --sanitizer none {target} FILE`, FILE one of:\n  {}",
        paths.join("\n  ")
    )
}

/// Files in `dir` written since `since` (the crash-, timeout- and oom- inputs of this run).
fn new_files(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .metadata()
                .and_then(|meta| meta.modified())
                .is_ok_and(|modified| modified >= since)
        })
        .map(|entry| entry.path())
        .collect();
    found.sort();
    found
}
