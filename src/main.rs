use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tracing_subscriber::EnvFilter;

mod cli;

use cli::{Cli, Command, LogFormat, LogOpts, StandaloneArgs, StatusArgs, SyncOpts};
use grasp_sync::controller::ssrf::AddressPolicy;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The demo prints its own progress; keep library chatter (and the embedded relays'
    // complaints about connections closed at shutdown) out of it unless asked for.
    if matches!(cli.command, Command::Demo(_)) && cli.log.log_level == "info" {
        cli.log.log_level = "warn,nostr_relay_builder=off".into();
    }
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
        Command::Standalone(args) => runtime()?.block_on(standalone(args)),
        Command::Status(args) => runtime()?.block_on(status(args)),
        Command::Demo(args) => runtime()?.block_on(demo(args)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    grasp_sync::tls::install_default_crypto();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn address_policy(sync: &SyncOpts) -> AddressPolicy {
    let mut policy = AddressPolicy {
        deny_nets: sync.deny_nets.clone(),
        ..AddressPolicy::default()
    };
    for entry in &sync.allow {
        let entry = entry.trim();
        if let Ok(net) = entry.parse::<ipnet::IpNet>() {
            policy.allow_nets.push(net);
        } else if let Ok(ip) = entry.parse::<std::net::IpAddr>() {
            policy.allow_nets.push(ipnet::IpNet::from(ip));
        } else if !entry.is_empty() {
            policy.allow_hosts.insert(entry.to_ascii_lowercase());
        }
    }
    policy
}

fn auth_keys(sync: &SyncOpts) -> Result<Option<nostr::Keys>> {
    let Some(path) = &sync.auth_key_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --auth-key-file {}", path.display()))?;
    let keys = nostr::Keys::parse(text.trim()).with_context(|| {
        format!(
            "{} does not hold a nostr secret key (nsec or hex)",
            path.display()
        )
    })?;
    Ok(Some(keys))
}

async fn standalone(args: StandaloneArgs) -> Result<()> {
    let mut opts = grasp_sync::standalone::StandaloneOptions::new(
        args.relays.local_relay.clone(),
        args.relays.service_domain.clone(),
    );
    opts.bootstrap = args.relays.bootstrap.clone();
    opts.state_file = Some(args.state_file.clone());
    opts.http_addr = args.metrics_addr;
    opts.addresses = address_policy(&args.sync);
    opts.grace = args.sync.grace;
    opts.status_interval = args.sync.status_interval;
    opts.publisher_connections = args.sync.publisher_connections;
    opts.auth_keys = auth_keys(&args.sync)?;
    let running = grasp_sync::standalone::start(opts)
        .await
        .context("starting standalone mode")?;
    tracing::info!(
        local_relay = %args.relays.local_relay,
        http = %running.http_addr,
        state_file = %args.state_file.display(),
        "grasp-sync standalone running; Ctrl-C to stop"
    );
    wait_for_signal().await;
    tracing::info!("stopping: closing sessions and saving state");
    running.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn status(args: StatusArgs) -> Result<()> {
    let url = format!("{}/status", args.url.trim_end_matches('/'));
    let body = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("is grasp-sync standalone running? GET {url} failed"))?
        .error_for_status()
        .with_context(|| format!("GET {url}"))?
        .text()
        .await?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let entries: Vec<grasp_sync::http::StatusEntry> = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not return RelaySync status"))?;
    print!(
        "{}",
        grasp_sync::http::render_table(&entries, std::time::SystemTime::now())
    );
    Ok(())
}

async fn demo(args: cli::DemoArgs) -> Result<()> {
    let report = grasp_sync::demo::run(grasp_sync::demo::DemoOptions {
        repos: args.repos,
        timeout: args.timeout,
        nostr_rs_relay: args.nostr_rs_relay,
        progress: true,
        seed: args.seed,
    })
    .await
    .context("running the demo")?;
    println!("{report}");
    if report.ok() {
        Ok(())
    } else {
        anyhow::bail!(
            "the local relay does not hold exactly the expected events ({} missing, {} extra)",
            report.missing,
            report.extra
        )
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
