//! sockmesh: an eBPF-accelerated, node-level transparent proxy agent.
//!
//! A connection's life, one module per stage: `intercept` (kernel programs on a cgroup) ->
//! `accept` -> `connection` (`original_dst` -> `connect` -> `classify`/`detect` -> `forward`:
//! http | opaque, then kernel once chatty) -> `metrics` and `tap`, served by `admin`. `run`
//! wires them together; `config` and `cli` parse the flags once; `ops` holds the operator
//! commands; `socket` holds the raw socket calls several stages share.

mod accept;
mod admin;
mod cgroup;
mod classify;
mod cli;
mod config;
mod connect;
mod connection;
mod detect;
mod forward;
mod intercept;
mod metrics;
mod ops;
mod original_dst;
mod run;
mod socket;
mod tap;

use std::{os::unix::process::CommandExt, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, ExecArgs, LogArgs, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            init_logging(&args.log);
            run::run(*args)
        }
        Command::Exec(args) => exec(args),
        Command::Status(args) => ops::status::run(args.admin.admin_addr, args.interval),
        Command::Tap(args) => ops::tap::run(args.admin.admin_addr, &tap_request(args)),
        Command::Check(args) => ops::check::run(args.cgroup.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sockmesh: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn tap_request(args: cli::TapArgs) -> ops::tap::TapRequest {
    ops::tap::TapRequest {
        port: args.port,
        authority: args.authority,
        path_prefix: args.path_prefix,
        method: args.method,
        json: args.output == cli::TapOutput::Json,
        max_events: args.max_events,
    }
}

fn init_logging(args: &LogArgs) {
    let filter = match &args.log_level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `sockmesh exec -- CMD ARGS`: join the meshed cgroup, then become CMD.
fn exec(args: ExecArgs) -> anyhow::Result<()> {
    let cgroup = cgroup::resolve(args.cgroup.cgroup)?;
    cgroup::enter(&cgroup)?;
    let (program, rest) = args.command.split_first().context("no command given")?;
    let error = std::process::Command::new(program).args(rest).exec();
    Err(error).with_context(|| format!("executing {}", program.to_string_lossy()))
}
