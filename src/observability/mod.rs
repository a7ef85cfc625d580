//! What an operator sees of a process: the metrics registry and its helpers, and the HTTP
//! endpoints (`/metrics`, `/status`, `/healthz`).

pub mod http;
pub mod metrics;

pub use metrics::ProcessMetrics;
