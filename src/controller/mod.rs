//! Discovery (self-subscription, repo index, relay targets) and assignment (hash ring,
//! worker leases, drain). Not implemented yet: see the discovery and Kubernetes-mode issues.
