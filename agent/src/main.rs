//! The `sockmesh` binary: parses the command line and hands each subcommand to the library.
#![forbid(unsafe_code)]

use std::{os::unix::process::CommandExt, process::ExitCode};

use anyhow::Context;
use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;

use agent::{
    cgroup,
    cli::{self, Cli, Command, ExecArgs, LogArgs, LogFormat},
    ops, run,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            if let Err(message) = args.check_ports() {
                Cli::command()
                    .error(clap::error::ErrorKind::ArgumentConflict, message)
                    .exit();
            }
            init_logging(&args.log);
            run::run(*args)
        }
        Command::Exec(args) => exec(args),
        Command::Status(args) => ops::status::run(args.admin.admin_addr, args.interval),
        Command::Tap(args) => ops::tap::run(args.admin.admin_addr, &tap_request(args)),
        Command::Check(args) => ops::check::run(args.cgroup.as_deref()),
        Command::CheckPolicy(args) => ops::check::policy(&args.path),
        Command::InstallCni(args) => {
            init_logging(&args.log);
            ops::install_cni::run(&args)
        }
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
