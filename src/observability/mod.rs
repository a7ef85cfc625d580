//! What an operator sees of a process: the metrics registry and its helpers, the log
//! set-up, and the HTTP endpoints (`/metrics`, `/status`, `/healthz`).

pub mod http;
pub mod liveness;
pub mod logging;
pub mod metrics;

pub use metrics::ProcessMetrics;
