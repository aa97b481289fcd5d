# syntax=docker/dockerfile:1
#
# flagrelay container image: one binary, every role (`serve`, `work`, `run`, `sim`, ...)
# chosen by the command. Build: `docker build -t flagrelay .` (BuildKit, the default since
# Docker 23, is needed for the cache mounts).

# ---- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# native-tls (reqwest, lapin) links OpenSSL. The rust image already ships these; installing
# them explicitly keeps the build working if that ever changes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the build reads: the manifest, the lockfile (--locked refuses to change it) and
# the sources. Tests, schemas and docs do not go into the image.
COPY Cargo.toml Cargo.lock ./
COPY src ./src

# Cache mounts keep the registry and compiled dependencies between builds; the target
# directory lives only in the cache, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/flagrelay /out/flagrelay

# ---- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: TLS to Graph, Entra and Proofpoint. libssl3: native-tls at run time.
# curl: the HEALTHCHECK below (GET /healthz); the image has nothing else to do it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 curl \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid/gid so mounted config and secret files can be owned to match.
RUN groupadd --system --gid 10001 flagrelay \
    && useradd --system --uid 10001 --gid flagrelay --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin flagrelay \
    && mkdir -p /etc/flagrelay /var/lib/flagrelay \
    && chown flagrelay:flagrelay /var/lib/flagrelay

COPY --from=builder /out/flagrelay /usr/local/bin/flagrelay

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
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9090/healthz"]
# flagrelay handles SIGTERM itself: it stops taking work and settles what is in flight.
STOPSIGNAL SIGTERM
ENTRYPOINT ["flagrelay"]
CMD ["--help"]
