//! Who writes what on a RelaySync, and the drain handshake between controller and worker.
//!
//! Three field managers keep the writers apart under server-side apply: the controller's
//! discovery owns the spec, the controller's assigner owns the assignment labels, and the
//! assigned worker owns the status. The drain is a conversation in those fields: the
//! assigner sets [`DRAIN_LABEL`]; the worker closes its session and answers with the
//! condition `Assigned=False` / [`RELEASED`] in status; only then does the assigner move
//! [`WORKER_LABEL`].

use super::conditions::ASSIGNED;
use super::relay_sync::{ConditionStatus, RelaySyncStatus};

/// Field manager of everything discovery writes (spec).
pub const CONTROLLER_MANAGER: &str = "grasp-sync-controller";
/// Field manager of the assignment labels ([`WORKER_LABEL`], [`DRAIN_LABEL`]).
pub const ASSIGNER_MANAGER: &str = "grasp-sync-assigner";
/// Field manager of everything a worker writes (status; its own Lease).
pub const WORKER_MANAGER: &str = "grasp-sync-worker";

/// The assignment: which worker holds this relay's session. Written only by the assigner.
pub const WORKER_LABEL: &str = "grasp-sync.dev/worker";
/// Set while the object moves between two live workers.
pub const DRAIN_LABEL: &str = "grasp-sync.dev/drain";

/// Reason of the `Assigned=False` condition with which a worker acknowledges a drain.
pub const RELEASED: &str = "Released";

/// Whether the API server refused a JSON patch because one of its `test` operations (on an
/// assignment label) failed: it answers 422 without details, where a write failing the
/// schema names the object and its causes.
pub fn label_test_failed(s: &kube::core::Status) -> bool {
    s.code == 422
        && s.details
            .as_ref()
            .is_none_or(|d| d.kind.is_empty() && d.causes.is_empty())
}

/// Whether `worker` has acknowledged a drain of the object with this status.
pub fn is_released_by(status: Option<&RelaySyncStatus>, worker: &str) -> bool {
    status.is_some_and(|s| {
        s.worker.as_deref() == Some(worker)
            && s.conditions.iter().any(|c| {
                c.type_ == ASSIGNED && c.status == ConditionStatus::False && c.reason == RELEASED
            })
    })
}
