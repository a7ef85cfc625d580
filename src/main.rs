use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tracing_subscriber::EnvFilter;

mod cli;

use cli::{Cli, Command, LogFormat, LogOpts};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_tracing(&cli.log) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Crd => {
            let yaml = grasp_sync::crd::crd_yaml().context("rendering the CRD")?;
            std::io::stdout()
                .write_all(yaml.as_bytes())
                .context("writing to stdout")?;
            Ok(())
        }
        Command::Controller(_) => not_implemented("controller", "Kubernetes mode"),
        Command::Worker(_) => not_implemented("worker", "Kubernetes mode"),
        Command::Standalone(_) => not_implemented("standalone", "discovery and standalone mode"),
        Command::Demo(_) => not_implemented("demo", "discovery and standalone mode"),
    }
}

fn not_implemented(command: &str, issue: &str) -> Result<()> {
    anyhow::bail!(
        "`grasp-sync {command}` is not implemented yet (it arrives with the {issue} work); \
         nothing was started"
    )
}

fn init_tracing(opts: &LogOpts) -> Result<()> {
    let filter = EnvFilter::try_new(&opts.log_level)
        .with_context(|| format!("invalid --log-level {:?}", opts.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match opts.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
