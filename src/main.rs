use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

mod cli;

use cli::{
    Cli, Command, ControllerArgs, LogFormat, LogOpts, PolicyOpts, StandaloneArgs, StatusArgs,
    SyncOpts, WorkerArgs,
};
use grasp_sync::observability::logging;
use grasp_sync::relay::address_policy::AddressPolicy;

fn main() -> ExitCode {
    // Two malloc arenas, not eight per core: the processes' threads are few and mostly idle,
    // and glibc's per-thread arenas otherwise hold freed memory apart (a controller with
    // 5,000 RelaySyncs: RSS measured in `cargo bench --bench kube_failover`).
    // SAFETY: called before any other thread exists; mallopt only tunes the allocator.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
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
    let vars = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
    for variable in cli::unused_env(cli.command.name(), vars) {
        tracing::warn!(%variable, command = cli.command.name(), "environment variable not read by this command: ignored (misspelt, or meant for another command?)");
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
        Command::Controller(args) => run_to_end(controller(args)),
        Command::Worker(args) => run_to_end(worker(args)),
        Command::Standalone(args) => run_to_end(standalone(args)),
        Command::Status(args) => run_to_end(status(args)),
        Command::Demo(args) => run_to_end(demo(args)),
    }
}

/// Run `work` to its end, then leave without waiting on blocking threads still busy (a name
/// look-up of a reconnect in flight): dropping the runtime would wait for them without
/// bound, and a pod that lingers delays its return under the same name.
fn run_to_end(work: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let rt = runtime()?;
    let out = rt.block_on(work);
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    out
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    grasp_sync::relay::tls::install_default_crypto();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn address_policy(opts: &PolicyOpts) -> AddressPolicy {
    let mut policy = AddressPolicy {
        deny_nets: opts.deny_nets.clone(),
        ..AddressPolicy::default()
    };
    for entry in &opts.allow {
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

fn refusal_memory(sync: &SyncOpts) -> grasp_sync::worker::publisher::RefusalMemory {
    grasp_sync::worker::publisher::RefusalMemory {
        entries: sync.refusal_memory,
        ttl: sync.refusal_memory_ttl,
    }
}

fn auth_keys(sync: &SyncOpts) -> Result<Option<nostr::Keys>> {
    sync.auth_key_file
        .as_deref()
        .map(|p| read_key(p, "--auth-key-file"))
        .transpose()
}

/// The key remote relays' AUTH challenges are answered with: the configured one, or one
/// generated now (never the local relay's key).
fn remote_auth_keys(sync: &SyncOpts) -> Result<nostr::Keys> {
    match &sync.remote_auth_key_file {
        Some(p) => read_key(p, "--remote-auth-key-file"),
        None => Ok(nostr::Keys::generate()),
    }
}

fn read_key(path: &std::path::Path, flag: &str) -> Result<nostr::Keys> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {flag} {}", path.display()))?;
    nostr::Keys::parse(text.trim()).with_context(|| {
        format!(
            "{} does not hold a nostr secret key (nsec or hex)",
            path.display()
        )
    })
}

/// Session settings from the command line; the publisher's connections share the liveness.
fn session_config(sync: &SyncOpts) -> Result<grasp_sync::worker::session::SessionConfig> {
    if sync.ping_interval.is_zero() || sync.pong_timeout.is_zero() {
        anyhow::bail!("--ping-interval and --pong-timeout must be longer than zero");
    }
    if sync.batch_timeout.is_zero() || sync.reconcile_every.is_zero() {
        anyhow::bail!("--batch-timeout and --reconcile-every must be longer than zero");
    }
    let mut c = grasp_sync::worker::session::SessionConfig::default();
    c.connect.ping_every = sync.ping_interval;
    c.connect.pong_timeout = sync.pong_timeout;
    c.slack = sync.resume_overlap;
    c.batch_timeout = sync.batch_timeout;
    c.batch_retry = sync.batch_retry;
    c.overflow_poll = sync.overflow_poll;
    c.health.base_backoff = sync.reconnect_delay;
    c.health.rate_limit_cooldown = sync.rate_limit_cooldown;
    c.assumed_subscription_cap =
        (sync.assumed_subscription_cap > 0).then_some(sync.assumed_subscription_cap);
    let period = sync.reconcile_every;
    c.reconcile_every = (period / 24 * 23, period / 24 * 25);
    if sync.refusal_memory > 0 && sync.refusal_memory_ttl >= c.reconcile_every.0 {
        tracing::warn!(
            ttl = ?sync.refusal_memory_ttl,
            reconcile_every = ?period,
            "--refusal-memory-ttl is not under --reconcile-every: a reconciliation may skip an event the local relay refused once and would take now"
        );
    }
    Ok(c)
}

fn discovery_limits(d: &cli::DiscoveryOpts) -> grasp_sync::controller::discovery::DiscoveryLimits {
    use grasp_sync::controller::discovery::{DiscoveryLimits, caps::RelayCaps};
    DiscoveryLimits {
        per_announcement: d.max_relays_per_announcement as usize,
        caps: RelayCaps {
            per_host: d.max_relays_per_host as usize,
            total: d.max_relays as usize,
        },
    }
}

async fn standalone(args: StandaloneArgs) -> Result<()> {
    let mut opts = grasp_sync::modes::standalone::StandaloneOptions::new(
        args.relays.local_relay.clone(),
        args.relays.service_domain.clone(),
    );
    opts.bootstrap = args.relays.bootstrap.clone();
    opts.state_file = Some(args.state_file.clone());
    opts.http_addr = args.metrics_addr;
    opts.addresses = address_policy(&args.policy);
    opts.grace = args.grace;
    opts.limits = discovery_limits(&args.discovery);
    opts.status_interval = args.sync.status_interval;
    opts.publisher_connections = args.sync.publisher_connections;
    opts.publisher_max_connections = args.sync.publisher_max_connections;
    opts.refusals = refusal_memory(&args.sync);
    opts.purgatory_ttl = args.sync.purgatory_ttl;
    opts.auth_keys = auth_keys(&args.sync)?;
    opts.remote_auth_keys = Some(remote_auth_keys(&args.sync)?);
    opts.session = session_config(&args.sync)?;
    opts.local_reread_every = reread_every(args.relays.local_reread_every)?;
    let running = grasp_sync::modes::standalone::start(opts)
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

/// A shutdown flag that turns true on SIGTERM or Ctrl-C.
fn shutdown_on_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: stopping");
        let _ = tx.send(true);
    });
    rx
}

fn kube_target(kube: &cli::KubeOpts) -> grasp_sync::modes::kube::KubeTarget {
    grasp_sync::modes::kube::KubeTarget {
        context: kube.kube_context.clone(),
        namespace: kube.namespace.clone(),
    }
}

async fn controller(args: ControllerArgs) -> Result<()> {
    use grasp_sync::controller::assignment::reconciler::AssignerConfig;
    use grasp_sync::coordination::leader::LeaderConfig;
    let identity = match args.identity.clone() {
        Some(id) if !id.is_empty() => id,
        _ => hostname().context("no --identity/POD_NAME given and the host name is unknown")?,
    };
    if args.leader_renew.is_zero() || args.leader_renew * 3 > args.leader_lease_duration {
        anyhow::bail!(
            "--leader-renew must be at most a third of --leader-lease-duration (a leader that \
             cannot renew steps down a renew interval before its Lease expires, and each \
             request may take most of an interval)"
        );
    }
    let (client, namespace) = grasp_sync::modes::kube::connect(&kube_target(&args.kube)).await?;
    let mut leader = LeaderConfig::new(identity.clone());
    leader.duration = args.leader_lease_duration;
    leader.renew_every = args.leader_renew;
    let members =
        args.worker_statefulset
            .clone()
            .zip(args.max_workers)
            .map(
                |(statefulset, max)| grasp_sync::coordination::membership::MemberRule {
                    statefulset,
                    max,
                    scale: None,
                },
            );
    let assigner = AssignerConfig {
        max_moves: args.max_moves.max(1),
        members,
        restart_grace: args.restart_grace,
        ..AssignerConfig::default()
    };
    let opts = grasp_sync::modes::controller::ControllerOptions {
        identity,
        local_relay: args.relays.local_relay.clone(),
        service_domain: args.relays.service_domain.clone(),
        bootstrap: args.relays.bootstrap.clone(),
        addresses: address_policy(&args.policy),
        grace: args.grace,
        limits: discovery_limits(&args.discovery),
        http_addr: args.kube.metrics_addr,
        leader,
        assigner,
        owner: args.kube.owner.clone(),
        local_reread_every: reread_every(args.relays.local_reread_every)?,
    };
    grasp_sync::modes::controller::run_controller(opts, client, namespace, shutdown_on_signal())
        .await?;
    Ok(())
}

async fn worker(args: WorkerArgs) -> Result<()> {
    grasp_sync::modes::kube::check_worker_name(&args.name)?;
    if args.lease_renew.is_zero() || args.lease_renew * 3 > args.lease_duration {
        anyhow::bail!(
            "--lease-renew must be at most a third of --lease-duration (a worker that cannot \
             renew stops its sessions a renew interval before its Lease expires, and each \
             request may take most of an interval)"
        );
    }
    let (client, namespace) = grasp_sync::modes::kube::connect(&kube_target(&args.kube)).await?;
    let opts = grasp_sync::modes::worker::WorkerOptions {
        name: args.name.clone(),
        local_relay: args.local_relay.clone(),
        addresses: address_policy(&args.policy),
        status_interval: args.sync.status_interval,
        publisher_connections: args.sync.publisher_connections,
        publisher_max_connections: args.sync.publisher_max_connections,
        refusals: refusal_memory(&args.sync),
        purgatory_ttl: args.sync.purgatory_ttl,
        auth_keys: auth_keys(&args.sync)?,
        remote_auth_keys: Some(remote_auth_keys(&args.sync)?),
        http_addr: args.kube.metrics_addr,
        lease: grasp_sync::coordination::membership::LeaseConfig {
            duration: args.lease_duration,
            renew_every: args.lease_renew,
            owner: None,
        },
        session: session_config(&args.sync)?,
        owner: args.kube.owner.clone(),
        local_reread_every: reread_every(args.local_reread_every)?,
    };
    grasp_sync::modes::worker::run_worker(opts, client, namespace, shutdown_on_signal()).await?;
    Ok(())
}

/// `--local-reread-every`: 0s turns the re-read off; a shorter period than ten seconds would
/// read the relay's whole history again and again.
fn reread_every(d: std::time::Duration) -> Result<Option<std::time::Duration>> {
    if d.is_zero() {
        return Ok(None);
    }
    if d < std::time::Duration::from_secs(10) {
        anyhow::bail!("--local-reread-every must be 0s (never) or at least 10s, not {d:?}");
    }
    Ok(Some(d))
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
}

async fn wait_for_signal() {
    match signals() {
        Ok(signal) => signal.await,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A future that completes on SIGINT or SIGTERM, the handlers installed now rather than when
/// it is first polled: a signal between the two would end the process as it stands.
fn signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
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
    let entries: Vec<grasp_sync::observability::http::StatusEntry> = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not return RelaySync status"))?;
    print!(
        "{}",
        grasp_sync::observability::http::render_table(&entries, std::time::SystemTime::now())
    );
    Ok(())
}

async fn demo(args: cli::DemoArgs) -> Result<()> {
    let run = grasp_sync::modes::demo::run(grasp_sync::modes::demo::DemoOptions {
        repos: args.repos,
        timeout: args.timeout,
        nostr_rs_relay: args.nostr_rs_relay,
        stock_limits: args.stock_limits,
        progress: true,
        seed: args.seed,
        reconcile_every: None,
        idle_window: None,
    });
    // Interrupted, the run is dropped, and with it the relays' stores: in /dev/shm they
    // would otherwise hold memory until the machine restarts. The handlers are in place
    // before the run starts making stores (a signal before them would end the process as
    // it stands).
    let signal = signals().context("listening for SIGINT and SIGTERM")?;
    let report = tokio::select! {
        report = run => report.context("running the demo")?,
        () = signal => anyhow::bail!("interrupted; the demo's relays were stopped and their stores removed"),
    };
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

fn init_tracing(opts: &LogOpts) -> Result<()> {
    let format = match opts.log_format {
        LogFormat::Text => logging::LogFormat::Text,
        LogFormat::Json => logging::LogFormat::Json,
    };
    logging::init(&opts.log_level, format)
        .with_context(|| format!("invalid --log-level {:?}", opts.log_level))
}
