//! Command-line interface. Every flag has an environment variable so the same binary is
//! configured by Helm values (env) or by hand (flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use grasp_sync::nostr::RelayUrl;

#[derive(Debug, Parser)]
#[command(
    name = "grasp-sync",
    version,
    about = "Kubernetes-native GRASP-02 proactive sync for nostr git relays",
    long_about = "grasp-sync fetches the NIP-34 events (announcements, state, patches, PRs, issues, \
comments, statuses…) of every repository your GRASP relay has accepted from the other relays \
each announcement lists, historic and live, and publishes them to your relay.\n\n\
In Kubernetes, `controller` discovers relays into RelaySync resources and assigns them to \
`worker` pods; without Kubernetes, `standalone` runs both in one process.",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct LogOpts {
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// `info,grasp_sync::worker=debug`.
    #[arg(long, env = "GRASP_SYNC_LOG", default_value = "info", global = true)]
    pub log_level: String,
    /// Log output format.
    #[arg(long, env = "GRASP_SYNC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the RelaySync CustomResourceDefinition as YAML (`grasp-sync crd | kubectl apply -f -`).
    Crd,
    /// Run the controller: discover relays into RelaySync objects and assign them to workers
    /// (leader-elected; run two replicas).
    Controller(ControllerArgs),
    /// Run a worker: hold the relay sessions assigned to this pod and report their status.
    Worker(WorkerArgs),
    /// Run discovery and one worker in a single process, without Kubernetes.
    Standalone(StandaloneArgs),
    /// Run an offline, loopback-only demonstration: embedded relays, a synthetic corpus, and
    /// a check that exactly the expected events arrive.
    Demo(DemoArgs),
    /// Print the relays a running `grasp-sync standalone` syncs, like `kubectl get relaysyncs`.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The standalone's HTTP endpoint (its --metrics-addr).
    #[arg(
        long,
        env = "GRASP_SYNC_STATUS_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    pub url: String,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RelayOpts {
    /// WebSocket URL of the local GRASP relay that synced events are published to.
    #[arg(long, env = "GRASP_SYNC_LOCAL_RELAY", value_parser = parse_relay_url)]
    pub local_relay: RelayUrl,
    /// The relay's own service domain; announcements must list it, and it is never synced
    /// from as a remote.
    #[arg(long, env = "GRASP_SYNC_SERVICE_DOMAIN")]
    pub service_domain: String,
    /// Relays always synced from, whatever announcements say (comma-separated).
    #[arg(long, env = "GRASP_SYNC_BOOTSTRAP", value_delimiter = ',', value_parser = parse_relay_url)]
    pub bootstrap: Vec<RelayUrl>,
    /// How often the local relay's stored announcements (and, standalone, root events) are read again, the safety net under its
    /// live stream (nostr-relay-builder drops live events for a slow reader); 0s: never.
    #[arg(long, env = "GRASP_SYNC_LOCAL_REREAD_EVERY", default_value = "10m", value_parser = humantime::parse_duration)]
    pub local_reread_every: Duration,
}

#[derive(Debug, Args)]
pub struct KubeOpts {
    /// Namespace holding the RelaySync objects and Leases (default: the kubeconfig's or the
    /// pod's namespace).
    #[arg(long, env = "GRASP_SYNC_NAMESPACE")]
    pub namespace: Option<String>,
    /// kubeconfig context to use (default: in-cluster configuration, or the current context).
    #[arg(long, env = "GRASP_SYNC_KUBE_CONTEXT")]
    pub kube_context: Option<String>,
    /// Address of the /metrics, /status and /healthz endpoint.
    #[arg(long, env = "GRASP_SYNC_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// The workload owning what this process creates: `deployment/<name>` for the
    /// controller (its RelaySyncs and leader Lease), `statefulset/<name>` for a worker (its
    /// Lease). They carry an owner reference, so deleting the workload (`helm uninstall`)
    /// deletes them. Unset: they outlive it. The chart sets it.
    #[arg(long, env = "GRASP_SYNC_OWNER")]
    pub owner: Option<grasp_sync::crd::owner::OwnerTarget>,
}

/// Which relay addresses may be connected to.
#[derive(Debug, Args)]
pub struct PolicyOpts {
    /// Relay hosts or networks allowed even though they are private, loopback or
    /// cluster-internal (comma-separated host names, IPs or CIDRs). Announcements are
    /// untrusted: by default such relays are refused.
    #[arg(long, env = "GRASP_SYNC_ALLOW", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Networks refused in addition to private ranges, e.g. the cluster's pod and service
    /// CIDRs (comma-separated).
    #[arg(long, env = "GRASP_SYNC_DENY_NETS", value_delimiter = ',')]
    pub deny_nets: Vec<ipnet::IpNet>,
}

/// How much announcements (untrusted: anyone can publish one) can make us sync. What a cap
/// leaves out is counted in `grasp_sync_discovery_capped_relays` and
/// `grasp_sync_discovery_rejected_targets_total{reason="announcement_cap"}`, and logged.
#[derive(Debug, Args)]
pub struct DiscoveryOpts {
    /// Relays taken from one announcement (its first ones, in tag order).
    #[arg(long, env = "GRASP_SYNC_MAX_RELAYS_PER_ANNOUNCEMENT", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_relays_per_announcement: u32,
    /// Relay URLs (ports, paths) synced on one host; those named by the most repositories
    /// are kept.
    #[arg(long, env = "GRASP_SYNC_MAX_RELAYS_PER_HOST", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_relays_per_host: u32,
    /// Relays synced in all, bootstrap relays included (and always kept); those named by the
    /// most repositories are kept.
    #[arg(long, env = "GRASP_SYNC_MAX_RELAYS", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_relays: u32,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub relays: RelayOpts,
    #[command(flatten)]
    pub kube: KubeOpts,
    #[command(flatten)]
    pub policy: PolicyOpts,
    #[command(flatten)]
    pub discovery: DiscoveryOpts,
    /// This replica's identity in leader election (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a repo or relay must stay out of every announcement before it stops being
    /// synced.
    #[arg(long, env = "GRASP_SYNC_GRACE", default_value = "15m", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Leader Lease duration: a standby takes over this long after the leader stopped
    /// renewing.
    #[arg(long, env = "GRASP_SYNC_LEADER_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_lease_duration: Duration,
    /// How often the leader renews (and a standby retries).
    #[arg(long, env = "GRASP_SYNC_LEADER_RENEW", default_value = "3s", value_parser = humantime::parse_duration)]
    pub leader_renew: Duration,
    /// Most relays moving between live workers at once (scale-out drains).
    #[arg(long, env = "GRASP_SYNC_MAX_MOVES", default_value_t = 100)]
    pub max_moves: usize,
    /// The workers' StatefulSet: only its pods `<name>-0` … `<name>-<max-workers - 1>` join
    /// the ring (a Lease any other identity creates is ignored and counted in
    /// `grasp_sync_foreign_leases`). Unset: every worker Lease counts.
    #[arg(long, env = "GRASP_SYNC_WORKER_STATEFULSET", requires = "max_workers")]
    pub worker_statefulset: Option<String>,
    /// Most worker pods (the most the StatefulSet may be scaled to, or the autoscaler's
    /// maximum).
    #[arg(long, env = "GRASP_SYNC_MAX_WORKERS", requires = "worker_statefulset")]
    pub max_workers: Option<u32>,
    /// How long the relays of a worker pod that stopped gracefully wait for it to come back
    /// under the same name (a rolling restart: the pod is below the StatefulSet's replica
    /// count) before they move to other workers. A pod scaled away, or one that crashed,
    /// hands over at once (on its Lease's expiry). The grace runs from the stop, or from the
    /// last sight of its pod still terminating (the kubelet may take over 30 s to delete it),
    /// whichever is later; at most ten graces in all. Needs --worker-statefulset; 0 turns it
    /// off.
    #[arg(long, env = "GRASP_SYNC_RESTART_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub restart_grace: Duration,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// This worker's name: its Lease and the value of the `grasp-sync.dev/worker` label on
    /// the relays it holds.
    #[arg(long, env = "POD_NAME")]
    pub name: String,
    /// WebSocket URL of the local GRASP relay that synced events are published to.
    #[arg(long, env = "GRASP_SYNC_LOCAL_RELAY", value_parser = parse_relay_url)]
    pub local_relay: RelayUrl,
    /// How often the local relay's stored root events and announcements of this worker's repos are read again, the safety net under its
    /// live stream (nostr-relay-builder drops live events for a slow reader); 0s: never.
    #[arg(long, env = "GRASP_SYNC_LOCAL_REREAD_EVERY", default_value = "10m", value_parser = humantime::parse_duration)]
    pub local_reread_every: Duration,
    #[command(flatten)]
    pub kube: KubeOpts,
    #[command(flatten)]
    pub policy: PolicyOpts,
    #[command(flatten)]
    pub sync: SyncOpts,
    /// Worker Lease duration: the controller reassigns a crashed worker's relays this long
    /// after it last saw a renewal (crash failover within 10 s at the default; each renewal
    /// is one API write per worker).
    #[arg(long, env = "GRASP_SYNC_LEASE_DURATION", default_value = "6s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// How often the worker renews its Lease.
    #[arg(long, env = "GRASP_SYNC_LEASE_RENEW", default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_renew: Duration,
}

#[derive(Debug, Args)]
pub struct StandaloneArgs {
    #[command(flatten)]
    pub relays: RelayOpts,
    /// Where cursors and relay state are saved so a restart resumes instead of resyncing.
    #[arg(
        long,
        env = "GRASP_SYNC_STATE_FILE",
        default_value = "grasp-sync-state.json"
    )]
    pub state_file: PathBuf,
    /// Address of the /metrics, /status and /healthz endpoint.
    #[arg(
        long,
        env = "GRASP_SYNC_METRICS_ADDR",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_addr: SocketAddr,
    #[command(flatten)]
    pub policy: PolicyOpts,
    #[command(flatten)]
    pub discovery: DiscoveryOpts,
    /// How long a repo or relay must stay out of every announcement before it stops being
    /// synced.
    #[arg(long, env = "GRASP_SYNC_GRACE", default_value = "15m", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    #[command(flatten)]
    pub sync: SyncOpts,
}

/// Tuning shared by every process that syncs.
#[derive(Debug, Args)]
pub struct SyncOpts {
    /// Most one status write per relay per interval (phase changes are written at once).
    #[arg(long, env = "GRASP_SYNC_STATUS_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub status_interval: Duration,
    /// Connections publishing into the local relay, at least (kept open). Relays limit
    /// ingress per connection (nostr-relay-builder and ngit-grasp: 60 events a minute).
    #[arg(long, env = "GRASP_SYNC_PUBLISHER_CONNECTIONS", default_value_t = 1)]
    pub publisher_connections: usize,
    /// Connections publishing into the local relay, at most. While the relay answers
    /// `rate-limited:` and events wait, more are opened (doubling) as long as a new
    /// connection gets room of its own; without push-back, while events wait and more
    /// connections raise the relay's intake by a fifth. Idle ones close after 30 s. Set it
    /// to --publisher-connections for a fixed number.
    #[arg(long, env = "GRASP_SYNC_PUBLISHER_MAX_CONNECTIONS", default_value_t = grasp_sync::worker::publisher::DEFAULT_MAX_CONNECTIONS)]
    pub publisher_max_connections: usize,
    /// Events the local relay refused on policy grounds (`blocked:`, `invalid:`, …) that
    /// are remembered, so later copies of them (from other relays, or a reconciliation) are
    /// answered without spending the relay's ingress limit; 0 remembers none. Up to about
    /// 1 KB each (metric grasp_sync_publish_refused_remembered_events). Forgotten on a new
    /// connection, and one by one when the relay is seen holding what a refusal waits for
    /// (it takes a related event from grasp-sync, or the worker reads an announcement or
    /// root event of its repos there).
    #[arg(long, env = "GRASP_SYNC_REFUSAL_MEMORY", default_value_t = 16_384)]
    pub refusal_memory: usize,
    /// How long a remembered refusal stands. Keep it under --reconcile-every: each
    /// reconciliation after it offers every refused event to the local relay again.
    #[arg(long, env = "GRASP_SYNC_REFUSAL_MEMORY_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub refusal_memory_ttl: Duration,
    /// How long an event the local relay accepted into purgatory (`OK true "purgatory:
    /// …"`: a GRASP relay holds new announcements, state and PRs until their git data
    /// arrives) is not sent again; later copies are answered without a send (metric
    /// grasp_sync_publish_purgatory_events). Keep it well under your relay's purgatory
    /// expiry (30 min on ngit-grasp, counted from when it first got the event); 0 sends
    /// every copy.
    #[arg(long, env = "GRASP_SYNC_PURGATORY_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub purgatory_ttl: Duration,
    /// File holding a nostr secret key (nsec or hex) for NIP-42 authentication to the local
    /// relay (the key your relay may exempt from its limits). Never used with remote relays.
    #[arg(long, env = "GRASP_SYNC_AUTH_KEY_FILE")]
    pub auth_key_file: Option<PathBuf>,
    /// File holding the nostr secret key for remote relays that require NIP-42 (e.g. one
    /// they allow-list). Default: a key generated for this process, so remotes never see a
    /// signature of the key your relay exempts.
    #[arg(long, env = "GRASP_SYNC_REMOTE_AUTH_KEY_FILE")]
    pub remote_auth_key_file: Option<PathBuf>,
    /// Ping a connection (to a remote relay, or a publisher connection to the local relay)
    /// that has been silent this long.
    #[arg(long, env = "GRASP_SYNC_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,
    /// Give a pinged connection up as dead (and reconnect) after this long without an
    /// answer: NAT idle drops and remotes that crashed without closing are found this way.
    #[arg(long, env = "GRASP_SYNC_PONG_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub pong_timeout: Duration,
    /// A session that reconnects (or restarts) asks again for everything dated from this long
    /// before its cursor: covers clock skew between relays and events that reached a relay
    /// a little after their `created_at`.
    #[arg(long, env = "GRASP_SYNC_RESUME_OVERLAP", default_value = "15m", value_parser = humantime::parse_duration)]
    pub resume_overlap: Duration,
    /// A historic page that gets neither an event nor EOSE for this long fails its batch
    /// (waiting on our own local relay does not count).
    #[arg(long, env = "GRASP_SYNC_BATCH_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub batch_timeout: Duration,
    /// A failed historic batch is asked for again after this long.
    #[arg(long, env = "GRASP_SYNC_BATCH_RETRY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub batch_retry: Duration,
    /// Pause after a relay says we are rate-limited (a `rate-limited:` CLOSED or NOTICE)
    /// before asking it again.
    #[arg(long, env = "GRASP_SYNC_RATE_LIMIT_COOLDOWN", default_value = "65s", value_parser = humantime::parse_duration)]
    pub rate_limit_cooldown: Duration,
    /// Subscriptions per connection assumed for a remote relay that neither publishes
    /// `max_subscriptions` in NIP-11 nor has refused one yet (strfry's default is 20,
    /// nostr-rs-relay's 32); refusals by CLOSED or NOTICE then teach the real cap. Live REQs
    /// beyond what fits are reported as a standing gap (LiveWithGaps). 0: assume none.
    #[arg(
        long,
        env = "GRASP_SYNC_ASSUMED_SUBSCRIPTION_CAP",
        default_value_t = 20
    )]
    pub assumed_subscription_cap: usize,
    /// Live subscriptions that do not fit under a relay's subscription cap are polled this
    /// often instead (a historic query over their filters).
    #[arg(long, env = "GRASP_SYNC_OVERFLOW_POLL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub overflow_poll: Duration,
    /// First reconnect delay after a relay failed; doubles with each consecutive failure.
    #[arg(long, env = "GRASP_SYNC_RECONNECT_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub reconnect_delay: Duration,
    /// A full reconciliation of every repo and root runs about this often (±1/24, so relays
    /// do not all reconcile at once): the safety net under live delivery.
    #[arg(long, env = "GRASP_SYNC_RECONCILE_EVERY", default_value = "24h", value_parser = humantime::parse_duration)]
    pub reconcile_every: Duration,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of repositories in the synthetic corpus (about 25 events each).
    #[arg(long, env = "GRASP_SYNC_DEMO_REPOS", default_value_t = 20)]
    pub repos: usize,
    /// Give up (and fail) if the sync has not completed by then.
    #[arg(long, env = "GRASP_SYNC_DEMO_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Seed of the corpus' random placement.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// nostr-rs-relay binary to use as a third source (default: GRASP_SYNC_NOSTR_RS_RELAY,
    /// the test cache, or PATH; skipped when none is found).
    #[arg(long)]
    pub nostr_rs_relay: Option<PathBuf>,
    /// Give the local relay the stock ingress limits of a relay built on
    /// nostr-relay-builder, as ngit-grasp ships them: 60 events a minute and 500 REQs per
    /// connection (default: limits raised out of the way).
    #[arg(long, env = "GRASP_SYNC_DEMO_STOCK_LIMITS")]
    pub stock_limits: bool,
}

fn parse_relay_url(s: &str) -> Result<RelayUrl, String> {
    RelayUrl::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_relay_url_is_a_usage_error_naming_the_reason() {
        let err = Cli::try_parse_from([
            "grasp-sync",
            "worker",
            "--name",
            "w0",
            "--local-relay",
            "https://relay.example",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("ws://"), "{err}");
    }

    #[test]
    fn bootstrap_list_is_comma_separated_and_normalised() {
        let cli = Cli::try_parse_from([
            "grasp-sync",
            "standalone",
            "--local-relay",
            "ws://127.0.0.1:7000",
            "--service-domain",
            "git.example",
            "--bootstrap",
            "wss://Relay.Damus.io/,wss://nos.lol",
        ])
        .unwrap();
        let Command::Standalone(args) = cli.command else {
            panic!("wrong subcommand")
        };
        let urls: Vec<_> = args.relays.bootstrap.iter().map(|u| u.as_str()).collect();
        assert_eq!(urls, ["wss://relay.damus.io", "wss://nos.lol"]);
    }
}

impl Command {
    /// The subcommand's name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Crd => "crd",
            Command::Controller(_) => "controller",
            Command::Worker(_) => "worker",
            Command::Standalone(_) => "standalone",
            Command::Status(_) => "status",
            Command::Demo(_) => "demo",
        }
    }
}

/// The `GRASP_SYNC_*` variables among `vars` that `grasp-sync <sub>` does not read: clap
/// ignores them, so a misspelt or misplaced setting would otherwise pass unnoticed.
pub fn unused_env(sub: &str, vars: impl IntoIterator<Item = String>) -> Vec<String> {
    use clap::CommandFactory;
    let root = Cli::command();
    let names = |c: &clap::Command| -> Vec<String> {
        c.get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect()
    };
    let mut known = names(&root);
    if let Some(c) = root.find_subcommand(sub) {
        known.extend(names(c));
    }
    vars.into_iter()
        .filter(|v| v.starts_with("GRASP_SYNC_") && !known.contains(v))
        .collect()
}

#[cfg(test)]
mod env_tests {
    use super::*;

    #[test]
    fn variables_a_subcommand_does_not_read_are_named() {
        let vars = [
            "GRASP_SYNC_LOG",
            "GRASP_SYNC_LEASE_DURATION",
            "GRASP_SYNC_MAX_RELAY",
            "GRASP_SYNC_RESTART_GRACE",
            "PATH",
        ]
        .map(String::from);
        assert_eq!(
            unused_env("worker", vars.clone()),
            ["GRASP_SYNC_MAX_RELAY", "GRASP_SYNC_RESTART_GRACE"]
        );
        assert_eq!(
            unused_env("controller", vars),
            ["GRASP_SYNC_LEASE_DURATION", "GRASP_SYNC_MAX_RELAY"]
        );
    }
}
