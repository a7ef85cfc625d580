#!/usr/bin/env bash
# Build the grasp-sync runtime image as an OCI archive, without a container engine (umoci).
#
#   scripts/build-image.sh [--binary PATH] [--out FILE] [--name NAME] [--tag TAG]
#
# Same content as the Dockerfile's runtime stage (distroless/cc-debian12:nonroot): the
# stripped binary at /usr/local/bin/grasp-sync, glibc and the libraries it links, CA
# certificates, a passwd/group with the non-root user 65532 and no shell; run as
# 65532:65532, entrypoint the binary, `--help` as the default command, port 9090.
# tests/image.rs checks that this script and the Dockerfile agree.
#
# Defaults: the release binary (built if missing), the name localhost/grasp-sync and the
# crate's version as tag, written to target/image/grasp-sync-<tag>.oci.tar. Load it into
# containerd with
#   ctr -n k8s.io images import --base-name localhost/grasp-sync target/image/grasp-sync-0.1.0.oci.tar
# (a fully qualified name: the CRI rewrites short names to docker.io/...).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf '[build-image] error: %s\n' "$*" >&2; exit 1; }
log() { printf '[build-image] %s\n' "$*" >&2; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
binary="" out="" name="localhost/grasp-sync" tag="$version"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$name" in */*) ;; *) die "--name must be fully qualified (e.g. localhost/grasp-sync): the CRI rewrites short names" ;; esac
[ "$tag" != latest ] || die "--tag latest means imagePullPolicy Always (a pull that fails without a registry): use a real tag"
command -v umoci >/dev/null || die "umoci not found (Debian package umoci; scripts/test-env.sh installs it)"

if [ -z "$binary" ]; then
  binary=target/release/grasp-sync
  if [ ! -x "$binary" ]; then log "building the release binary"; cargo build --release --locked --bin grasp-sync >&2; fi
fi
[ -x "$binary" ] || die "$binary is not an executable"
out=${out:-target/image/grasp-sync-$tag.oci.tar}
mkdir -p "$(dirname "$out")"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/home/nonroot" "$root/tmp"

install -m 0755 "$binary" "$root/usr/local/bin/grasp-sync"
strip "$root/usr/local/bin/grasp-sync" 2>/dev/null || true

# glibc and what the binary links, at the paths the loader looks them up.
interp=$(readelf -l "$binary" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
[ -n "$interp" ] || die "$binary has no program interpreter (expected a dynamically linked glibc binary)"
libs=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }')
for f in $interp $libs; do
  mkdir -p "$root$(dirname "$f")"
  cp -L "$f" "$root$f"
done

cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt" \
  || die "no /etc/ssl/certs/ca-certificates.crt (Debian package ca-certificates)"
cat > "$root/etc/passwd" <<'P'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
P
cat > "$root/etc/group" <<'G'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
G
echo 'hosts: files dns' > "$root/etc/nsswitch.conf"
chown 65532:65532 "$root/home/nonroot"
chmod 1777 "$root/tmp"

layout="$work/layout"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
cp -a "$root/." "$work/bundle/rootfs/"
umoci repack --image "$layout:$tag" "$work/bundle"
umoci config --image "$layout:$tag" \
  --author grasp-sync \
  --config.user 65532:65532 \
  --config.entrypoint /usr/local/bin/grasp-sync \
  --config.cmd --help \
  --config.exposedports 9090/tcp \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --config.workingdir / \
  --clear=config.labels \
  --config.label "org.opencontainers.image.title=grasp-sync" \
  --config.label "org.opencontainers.image.version=$tag"
umoci gc --layout "$layout"
(cd "$layout" && tar -cf - .) > "$out.tmp"
mv "$out.tmp" "$out"
log "wrote $name:$tag to $out ($(du -h "$out" | cut -f1))"
echo "$out"
