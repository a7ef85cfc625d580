//! Relay sessions, the sync engine, the publisher and the status reporter.
//! Not implemented yet: see the sync-engine and Kubernetes-mode issues.
