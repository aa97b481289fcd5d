//! `flagrelay bench`: benchmarks that print numbers, measured against the machine's own
//! ceilings in the same run so that the figures hold on a noisy machine. Performance claims
//! live here (and in `BENCHMARKS.md`), never in timed test assertions.
//!
//! - [`receiver`]: an open-loop load generator against the webhook, and against two reference
//!   servers started beside it: a bare axum `202` (the HTTP ceiling) and a raw lapin
//!   publisher with confirms (the broker ceiling), both in [`ceiling`].
//! - [`e2e`]: the whole pipeline on the simulators, flip → Proofpoint write, with the receiver
//!   and the workers as child processes of this binary (so their peak RSS is their own).
//! - [`history`]: one user's decision history out of millions of stored rows, against the
//!   store's own round trip.
//! - [`reconcile`]: the drift sweep of a large simulated tenant, as a child process.
//! - [`support`]: latency histograms, child processes, peak RSS, machine facts.

pub mod ceiling;
pub mod e2e;
pub mod history;
pub mod receiver;
pub mod reconcile;
pub mod support;

use std::path::Path;

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Webhook throughput and accept latency (open loop), against the HTTP and broker
    /// ceilings measured in the same run.
    Receiver(receiver::ReceiverArgs),
    /// End to end on the simulators: flip → Proofpoint write latency, changes/s, API calls
    /// per change, peak RSS; scaling with workers and shards.
    E2e(e2e::E2eArgs),
    /// One user's decision history out of 10 million stored rows (SQLite or PostgreSQL),
    /// against the store's round trip; retention prune time.
    History(history::HistoryArgs),
    /// Drift sweep of 10k and 100k simulated users: wall time, Graph calls, peak RSS.
    Reconcile(reconcile::ReconcileArgs),
    /// A reference server for `bench receiver` (started by it as a child process).
    #[command(hide = true)]
    Ceiling(ceiling::CeilingArgs),
}

/// Run one benchmark. `config` is read by `bench receiver --url` (the clientState and tenant
/// of the receiver under test) and by the reference servers (broker, prefix, signing key).
pub async fn run(command: BenchCommand, config: Option<&Path>) -> anyhow::Result<()> {
    match command {
        BenchCommand::Receiver(args) => receiver::run(args, config).await,
        BenchCommand::E2e(args) => e2e::run(args).await,
        BenchCommand::Reconcile(args) => reconcile::run(args).await,
        BenchCommand::History(args) => history::run(args).await,
        BenchCommand::Ceiling(args) => ceiling::serve(args, config).await,
    }
}
