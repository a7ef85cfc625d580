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
}

impl ProcessMetrics {
    /// A fresh registry holding the process metrics; components register into `registry`.
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = ProcessMetrics {
            info: int_gauge_vec(
                "grasp_sync_info",
                "This process's role and version (always 1)",
                &["role", "version"],
            ),
            lease_held: int_gauge(
                "grasp_sync_worker_lease_held",
                "1 while this worker holds its Lease",
            ),
            leader: int_gauge(
                "grasp_sync_controller_leader",
                "1 while this controller replica is the leader",
            ),
            registry,
        };
        // Three distinct static names into a new registry: cannot collide.
        let _ = register_all(
            &m.registry,
            vec![
                Box::new(m.info.clone()),
                Box::new(m.lease_held.clone()),
                Box::new(m.leader.clone()),
            ],
        );
        m
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

impl Default for ProcessMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Text exposition format of a registry.
pub fn render(registry: &Registry) -> String {
    let encoder = prometheus::TextEncoder::new();
    encoder
        .encode_to_string(&registry.gather())
        .unwrap_or_default()
}

/// Register every collector; the first duplicate name fails.
pub fn register_all(
    registry: &Registry,
    collectors: Vec<Box<dyn Collector>>,
) -> prometheus::Result<()> {
    for c in collectors {
        registry.register(c)?;
    }
    Ok(())
}

/// Create the series of every known value of a bounded label (at 0), so dashboards and
/// `rate()` see them before the first occurrence.
pub fn init_values(vec: &IntCounterVec, values: &[&str]) {
    for v in values {
        vec.with_label_values(&[*v]);
    }
}

// Constructors for static metric definitions: names and label sets are compile-time
// constants checked by the tests, so a failure here is a programming error.

pub fn int_counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("static metric")
}

pub fn int_counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric")
}

pub fn int_gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("static metric")
}

pub fn int_gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric")
}

pub fn gauge(name: &str, help: &str) -> Gauge {
    Gauge::new(name, help).expect("static metric")
}

pub fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("static metric")
}

pub fn histogram_vec(name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("static metric")
}
