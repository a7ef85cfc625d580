//! The process's metrics registry and the small helpers every component's metrics struct
//! uses to declare and register itself. Components own their metrics (each has a
//! `register(&Registry)`); this room only renders them and names the process.

use prometheus::core::Collector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Metrics of the process itself: its role, and the Leases it holds.
#[derive(Clone)]
pub struct ProcessMetrics {
    pub registry: Registry,
    /// 1, labelled with this process's role (controller | worker | standalone) and version,
    /// so rules can tell which process a series comes from.
    pub info: IntGaugeVec,
    /// 1 while this worker holds its Lease.
    pub lease_held: IntGauge,
    /// 1 while this controller replica leads.
    pub leader: IntGauge,
    /// The loops `/healthz` watches.
    pub liveness: super::liveness::Liveness,
}

impl ProcessMetrics {
    /// A fresh registry holding the process metrics; components register into `registry`.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        Ok(ProcessMetrics {
            info: int_gauge_vec(
                &registry,
                "grasp_sync_info",
                "This process's role and version (always 1)",
                &["role", "version"],
            )?,
            lease_held: int_gauge(
                &registry,
                "grasp_sync_worker_lease_held",
                "1 while this worker holds its Lease",
            )?,
            leader: int_gauge(
                &registry,
                "grasp_sync_controller_leader",
                "1 while this controller replica is the leader",
            )?,
            registry,
            liveness: super::liveness::Liveness::default(),
        })
    }

    /// Declare the role of this process (`grasp_sync_info`).
    pub fn set_role(&self, role: &str) {
        self.info
            .with_label_values(&[role, env!("CARGO_PKG_VERSION")])
            .set(1);
    }

    /// Text exposition format of everything registered.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// Text exposition format of a registry.
pub fn render(registry: &Registry) -> String {
    let encoder = prometheus::TextEncoder::new();
    encoder
        .encode_to_string(&registry.gather())
        .unwrap_or_default()
}

/// Create the series of every known value of a bounded label (at 0), so dashboards and
/// `rate()` see them before the first occurrence.
pub fn init_values(vec: &IntCounterVec, values: &[&str]) {
    for v in values {
        vec.with_label_values(&[*v]);
    }
}

// Each constructor creates one metric and registers it, so a component declares each metric
// once; a second metric of the same name in one registry is an error.

fn registered<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> prometheus::Result<M> {
    let metric = metric?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

pub fn int_counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    registered(registry, IntCounter::new(name, help))
}

pub fn int_counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    registered(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

pub fn int_gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    registered(registry, IntGauge::new(name, help))
}

pub fn int_gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    registered(registry, IntGaugeVec::new(Opts::new(name, help), labels))
}

pub fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<Gauge> {
    registered(registry, Gauge::new(name, help))
}

pub fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> prometheus::Result<Histogram> {
    registered(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)),
    )
}

pub fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    registered(
        registry,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels),
    )
}
