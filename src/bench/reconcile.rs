//! `flagrelay bench reconcile`: the drift sweep of a large tenant. The simulators (in this
//! process) hold the tenant; `flagrelay reconcile` runs as a child process of this binary, so
//! its wall time and peak RSS are its own, against Graph pages of a realistic size and
//! latency, queueing its corrections on RabbitMQ as in production.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use secrecy::SecretString;

use super::support::{self, FlagrelayProcess, Scratch};
use crate::queue::rabbitmq::RabbitQueue;
use crate::sim::sandbox::Sandbox;

const TENANT: &str = "00000000-0000-0000-0000-00000000c0de";
const ORG: &str = "sweep.example";

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// Tenant sizes to sweep, smallest first (users are added between sweeps).
    #[arg(long, value_delimiter = ',', default_values_t = [10_000, 100_000])]
    pub users: Vec<usize>,
    /// Users per `/users/delta` page (Graph serves about 200 users per page).
    #[arg(long, default_value_t = 200)]
    pub page_size: usize,
    /// Simulated latency of every Graph API call.
    #[arg(long, default_value = "100ms", value_parser = crate::cli::parse_duration)]
    pub graph_latency: Duration,
    /// Simulated latency of every Proofpoint API call.
    #[arg(long, default_value = "100ms", value_parser = crate::cli::parse_duration)]
    pub proofpoint_latency: Duration,
    /// Every Nth user has sign-in blocked in Entra but is active in Proofpoint: a drift the
    /// sweep finds and queues a correction for.
    #[arg(long, default_value_t = 100)]
    pub drift_every: usize,
    /// Policy file (default: the built-in mirror policy).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    #[arg(long, env = "FLAGRELAY_BENCH_AMQP_URL", default_value = support::LOCAL_AMQP_URL)]
    pub amqp_url: String,
}

pub async fn run(args: ReconcileArgs) -> anyhow::Result<()> {
    let scratch = Scratch::new("reconcile")?;
    let mut sandbox = Sandbox::start(TENANT, ORG).await?;
    if let Some(policy) = &args.policy {
        let text = std::fs::read_to_string(policy)
            .with_context(|| format!("reading {}", policy.display()))?;
        sandbox.use_policy(&text)?;
    }
    sandbox
        .graph
        .update_settings(|s| s.delta_page_size = args.page_size);
    println!("flagrelay bench reconcile");
    println!("  machine:     {}", support::machine());
    println!(
        "  simulators:  Graph {:?} and Proofpoint {:?} per call, {} users per delta page; every {}th user drifted",
        args.graph_latency, args.proofpoint_latency, args.page_size, args.drift_every
    );
    println!();
    println!(
        "  {:>8} {:>10} {:>12} {:>12} {:>9} {:>9} {:>10}  result",
        "users", "wall time", "users/s", "Graph calls", "PP calls", "queued", "peak RSS"
    );
    let mut seeded = 0;
    let mut sizes = args.users.clone();
    sizes.sort_unstable();
    for size in sizes {
        // Seed without latency (the simulators' own API is not used for seeding).
        while seeded < size {
            seeded += 1;
            let drifted = args.drift_every > 0 && seeded % args.drift_every == 0;
            sandbox.seed_user(&format!("user{seeded:07}"), !drifted, "end_user");
        }
        sandbox
            .graph
            .update_faults(|f| f.api_latency = args.graph_latency)?;
        sandbox
            .proofpoint
            .set_latency(args.proofpoint_latency, Duration::ZERO);
        let dir = scratch.0.join(format!("u{size}"));
        std::fs::create_dir_all(&dir)?;
        let amqp = SecretString::from(args.amqp_url.clone());
        let mut cfg = sandbox.config.clone();
        cfg.amqp.url = Some(amqp.clone());
        cfg.amqp.prefix = support::unique_prefix("sweep");
        cfg.worker.state_dir = dir.join("state");
        let graph_before = sandbox.graph.request_log().len();
        let pp_before = sandbox.proofpoint.counters().requests;

        let started = Instant::now();
        let mut sweep = FlagrelayProcess::spawn("reconcile", &["reconcile"], &cfg, &dir)?;
        let status = sweep.wait().await?;
        let wall = started.elapsed();
        let peak = sweep.peak_rss_kib();
        let output = std::fs::read_to_string(dir.join("reconcile.log")).unwrap_or_default();
        anyhow::ensure!(
            status.success(),
            "flagrelay reconcile failed ({status}):\n{output}"
        );
        let summary = output
            .lines()
            .find(|l| l.starts_with("tenant "))
            .unwrap_or("(no summary printed)");
        let queued = output.matches(" queued: ").count();
        let graph_calls = sandbox.graph.request_log().len() - graph_before;
        let pp_calls = sandbox.proofpoint.counters().requests - pp_before;
        println!(
            "  {:>8} {:>9.1}s {:>12.0} {:>12} {:>9} {:>9} {:>10}  {}",
            size,
            wall.as_secs_f64(),
            size as f64 / wall.as_secs_f64(),
            graph_calls,
            pp_calls,
            queued,
            support::mib(peak),
            summary.split_once(": ").map_or(summary, |(_, s)| s)
        );
        if let Err(e) = RabbitQueue::new(amqp, cfg.amqp.queue_settings())
            .delete_topology()
            .await
        {
            eprintln!("note: could not delete the bench queues: {e}");
        }
        // Seeding the next size runs without latency again.
        sandbox
            .graph
            .update_faults(|f| f.api_latency = Duration::ZERO)?;
        sandbox
            .proofpoint
            .set_latency(Duration::ZERO, Duration::ZERO);
    }
    println!("  load average after: {}", support::load_average());
    Ok(())
}
