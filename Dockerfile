# grasp-sync container image: a release build on Debian's Rust image, run as non-root on a
# distroless base (glibc, CA certificates, no shell); `docker build -t grasp-sync .` builds it.
# Without a container engine, scripts/build-image.sh builds the same runtime image from a
# binary (what the real-node test runs); tests/image.rs keeps the two in agreement.
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && printf 'fn main() {}\n' > benches/historic_sync.rs && cp benches/historic_sync.rs benches/kube_failover.rs \
    && cargo build --release --locked --bin grasp-sync || true
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin grasp-sync \
    && strip target/release/grasp-sync

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/grasp-sync /usr/local/bin/grasp-sync
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/grasp-sync"]
CMD ["--help"]
