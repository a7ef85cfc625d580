//! The RelaySync store: Kubernetes-backed and in-memory (standalone).
//! Not implemented yet: see the discovery and Kubernetes-mode issues.
