//! flagrelay: converge Proofpoint Essentials to Entra ID sign-in state, by policy, within seconds.
//!
//! Microsoft Graph tells us "user X changed"; we queue that durably, then a worker reads the
//! user's *current* state, asks the policy what mail flow should be, and converges the
//! Proofpoint Essentials user to it. Everything downstream of the receiver is level-triggered:
//! duplicates, replays and reordering are harmless because nothing trusts the notification's
//! content, only the state read at processing time.
//!
//! # Layout
//! - [`config`]: the typed, layered configuration (defaults → TOML file → `FLAGRELAY_` env).
//! - [`telemetry`]: tracing subscriber set-up, the Prometheus metrics and the process's status.
//! - [`admin`]: the operator's listener (`/healthz`, `/readyz`, `/metrics`, status page) and
//!   the background probe behind it.
//! - [`otlp`]: which span of the distributed trace a unit of work is; OTLP export behind the
//!   cargo feature `otlp`.
//! - [`notification`]: the lenient parser for Graph change/lifecycle notification payloads.
//! - [`message`]: the queue wire format (CloudEvents envelopes) and its HMAC signing. The one
//!   place that knows what bytes travel on the bus.
//! - [`queue`]: the [`queue::Queue`] trait, with a RabbitMQ backend and an embedded in-process
//!   backend that pass the same conformance tests.
//! - [`receiver`]: the axum webhook endpoint; validates, signs and publishes, nothing else.
//! - [`reconciler`]: the delta-query backstop run by the leader.
//! - [`subscriptions`]: the Graph subscription manager run by the leader.
//! - [`sweep`]: the drift sweep (`flagrelay reconcile`, and daily in the leader).
//! - [`worker`]: consumes, verifies, coalesces, runs the evaluation, and maps each processing
//!   outcome to ack / retry / dead-letter in one function.
//! - [`evaluation`]: one user's evaluation in three steps shared by the worker, the sweep and
//!   `policy explain`: gather (IO), decide (pure), apply (IO, behind identity and breaker).
//! - [`identity`]: which address of a Graph user flagrelay may write, and identity bindings.
//! - [`ids`]: typed tenant and user ids, normalized once at the edge.
//! - [`policy`]: pure decision logic (no IO, no clock): rules, guards, grace, the breaker.
//! - [`store`]: the state store (SQLite or PostgreSQL): per-user state, due work, delta
//!   links, the breaker's counts and trips, identity bindings, the decision history.
//! - [`history`]: the decision history's batched writer and its rendering.
//! - [`scheduler`]: the leader's queue of work due at a time (rechecks, wake-ups).
//! - [`graph`], [`proofpoint`]: API traits and their HTTP clients.
//! - [`sim`]: faithful simulators of both APIs, used by tests, the demo and staging setups.
//! - [`app`]: wires the parts into the `serve` / `work` / `run` processes.
//! - [`demo`]: the one-command, end-to-end demonstration.
//! - [`bench`]: `flagrelay bench`: throughput, latency and memory against the machine's ceilings.
//! - [`explain`]: `policy check` and `policy explain`.
//! - [`cli`]: the command line; `main.rs` only calls into it.

pub mod admin;
pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod evaluation;
pub mod explain;
pub mod graph;
pub mod history;
pub mod identity;
pub mod ids;
pub mod message;
pub mod notification;
pub mod otlp;
pub mod policy;
pub mod proofpoint;
pub mod queue;
pub mod receiver;
pub mod reconciler;
pub mod retry_after;
pub mod scheduler;
pub mod shutdown;
pub mod sim;
pub mod store;
pub mod subscriptions;
pub mod sweep;
pub mod telemetry;
pub mod worker;
