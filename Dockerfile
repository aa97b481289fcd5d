# flagrelay container image: one binary, every role (`serve`, `work`, `run`, `sim`, ...)
# chosen by the command. Build: `docker build -t flagrelay .` Plain Dockerfile syntax: no
# frontend image is pulled and no BuildKit feature is needed (the classic builder works).
# The build context must hold what the COPY lines name; `deployment::the_build_context_…`
# builds from exactly those files.

# ---- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# native-tls (reqwest, lapin) links OpenSSL. The rust image already ships these; installing
# them explicitly keeps the build working if that ever changes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the build reads: the manifest, the lockfile (--locked refuses to change it), the
# sources (with the state store's migrations), the benchmark target the manifest names and
# the built-in policy the binary embeds. Tests, schemas and docs do not go into the image.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples/policy.toml ./examples/policy.toml

RUN cargo build --release --locked --bin flagrelay \
    && install -D -m 0755 target/release/flagrelay /out/flagrelay

# ---- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: TLS to Graph, Entra and Proofpoint. libssl3: native-tls at run time.
# No curl: the HEALTHCHECK is `flagrelay healthcheck`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid/gid so mounted config and secret files can be owned to match.
RUN groupadd --system --gid 10001 flagrelay \
    && useradd --system --uid 10001 --gid flagrelay --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin flagrelay \
    && mkdir -p /etc/flagrelay /var/lib/flagrelay \
    && chown flagrelay:flagrelay /var/lib/flagrelay

COPY --from=builder /out/flagrelay /usr/local/bin/flagrelay

# The embedded state (SQLite, when state.url is unset) and anything relative live in the one
# directory the user may write; without this the default `worker.state_dir` would resolve
# under `/` and `run`/`work` would stop with "Permission denied".
WORKDIR /var/lib/flagrelay
ENV FLAGRELAY_WORKER__STATE_DIR=/var/lib/flagrelay

USER 10001:10001
# 8080: the receiver's webhook (receiver.listen; bind 0.0.0.0 in a container, e.g. with
# FLAGRELAY_RECEIVER__LISTEN=0.0.0.0:8080); only `serve` and `run` have it.
# 9090: the admin listener (admin.listen: /healthz, /readyz, /metrics, the status page) of
# `serve`, `work` and `run`; bind 0.0.0.0:9090 for Prometheus on the container network, and
# never publish it to the internet.
EXPOSE 8080 9090
# Liveness of serve, work and run, from inside the container: the admin listener's default
# address (127.0.0.1:9090) answers there even when it is not bound to other interfaces.
# Commands without an admin listener (`sim`, one-shot commands) disable it in compose.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["flagrelay", "healthcheck", "--url", "http://127.0.0.1:9090/healthz"]
# flagrelay handles SIGTERM itself: it stops taking work and settles what is in flight.
STOPSIGNAL SIGTERM
ENTRYPOINT ["flagrelay"]
CMD ["--help"]
