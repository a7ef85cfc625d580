#!/usr/bin/env bash
# The project's test command: provision the real components (cached after the first run),
# check formatting and lints, run every test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "provisioning etcd, Kubernetes (API server and a node), kubectl, helm, nostr-rs-relay, Prometheus (scripts/test-env.sh)"
env_exports=$(scripts/test-env.sh)
eval "$env_exports"

# Two cores: one test thread per core; each Kubernetes test starts its own API server.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --locked --all-targets -- -D warnings

step "cargo test"
cargo test --locked --no-fail-fast
