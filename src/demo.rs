//! `flagrelay demo`: the whole pipeline, end to end, on one machine, in one command.
//!
//! Starts both simulators and flagrelay (embedded queue, or RabbitMQ with `--amqp-url`),
//! creates the Graph subscription through the real validation handshake, seeds a tenant
//! (ordinary users, a shared mailbox, a leaver), flips users' sign-in state and reports each
//! change as it lands in Proofpoint with its end-to-end latency. Exits non-zero if anything
//! did not converge.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::graph::client::GraphClient;
use crate::proofpoint::client::ProofpointClient;
use crate::queue::embedded::EmbeddedQueue;
use crate::queue::rabbitmq::RabbitQueue;
use crate::queue::{Queue, QueueSettings};
use crate::sim::sandbox::{Sandbox, SeededUser};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Use this RabbitMQ instead of the embedded queue (a unique name prefix is used).
    #[arg(long)]
    pub amqp_url: Option<String>,
    /// Ordinary users to seed.
    #[arg(long, default_value_t = 40)]
    pub users: usize,
    /// Sign-in flips to make (each is a block or an unblock).
    #[arg(long, default_value_t = 30)]
    pub flips: usize,
    /// How long to wait for everything to converge.
    #[arg(long, default_value = "30s", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
    /// Random seed (same seed, same flips).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

const TENANT: &str = "00000000-0000-0000-0000-0000000de770";
const ORG: &str = "contoso.example";
const SHARED: &str = "shared-mailbox";
const LEAVER: &str = "leaver";

/// Run the demo; the exit code says whether everything converged.
pub async fn run(args: DemoArgs) -> ExitCode {
    match demo(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Flip {
    address: String,
    enabled: bool,
    at: Instant,
}

async fn demo(args: DemoArgs) -> anyhow::Result<bool> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);

    // 1. Both simulators, and a configuration pointing flagrelay at them as a user would.
    let sandbox = Sandbox::start(TENANT, ORG).await?;
    let mut config = sandbox.config.clone();
    config.worker.backoff_base = Duration::from_millis(200);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let receiver_url = format!("http://{}", listener.local_addr()?);

    // 2. flagrelay: receiver + worker in this process, on the embedded queue or RabbitMQ.
    let settings = QueueSettings::with_prefix(format!("flagrelay-demo-{}", uuid::Uuid::new_v4().simple()));
    let queue: Arc<dyn Queue> = match &args.amqp_url {
        Some(url) => Arc::new(RabbitQueue::new(SecretString::from(url.clone()), settings)),
        None => Arc::new(EmbeddedQueue::new(settings)),
    };
    let graph = Arc::new(GraphClient::new(&config.graph)?);
    let pp = Arc::new(ProofpointClient::new(config.proofpoint.requests_per_second, config.proofpoint.request_timeout));
    let app = App::with_parts(config, queue.clone(), graph.clone(), pp);
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let app = app.clone();
        let stop = stop.clone();
        async move { app.run(listener, stop).await }
    });

    println!("flagrelay demo");
    println!("  queue:       {}", args.amqp_url.as_deref().map_or("embedded (not durable)".to_owned(), crate::config::redact_url));
    println!("  graph sim:   {}", app.config.graph.api_url);
    println!("  proofpoint:  {}", app.config.proofpoint.base_url);
    println!("  receiver:    {receiver_url}");

    // 3. Seed the tenant: ordinary users, a shared mailbox (sign-in blocked by design; a
    // functional account in Proofpoint) and a leaver.
    let mut people: HashMap<String, SeededUser> = (1..=args.users)
        .map(|i| format!("user{i:03}"))
        .map(|name| (name.clone(), sandbox.seed_user(&name, true, "end_user")))
        .collect();
    let leaver = sandbox.seed_user(LEAVER, true, "end_user");
    sandbox.make_leaver(&leaver, 1);
    people.insert(LEAVER.into(), leaver);
    let shared = sandbox.seed_user(SHARED, false, "functional_account");
    println!("  seeded:      {} users, 1 shared mailbox, 1 leaver in tenant {TENANT} / org {ORG}", args.users);

    // 4. Subscribe: the Graph simulator performs the validation handshake against our receiver.
    let sub = sandbox.subscribe(graph.as_ref(), &receiver_url).await?;
    println!("  subscribed:  {} (handshake answered by flagrelay)\n", sub.id);

    // 5. Flip: block some users, then unblock a few of them again; the leaver and the shared
    // mailbox are always among the changes.
    let mut order: Vec<String> = people.keys().cloned().collect();
    order.sort();
    order.shuffle(&mut rng);
    let mut plan: Vec<(String, bool)> = order.iter().take(args.flips.saturating_sub(2)).map(|u| (u.clone(), false)).collect();
    let reenable: Vec<_> = plan.iter().take(plan.len() / 4).map(|(u, _)| (u.clone(), true)).collect();
    plan.extend(reenable);
    if !plan.iter().any(|(u, _)| u == LEAVER) {
        plan.push((LEAVER.into(), false));
    }
    let mut flips: Vec<Flip> = Vec::new();
    let started = Instant::now();
    for (name, enabled) in &plan {
        let user = &people[name];
        sandbox.graph.set_account_enabled(TENANT, &user.id, *enabled);
        flips.push(Flip { address: user.address.clone(), enabled: *enabled, at: Instant::now() });
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..25))).await;
    }
    // The shared mailbox is re-saved with sign-in still blocked: a notification arrives, and
    // the functional-account guard must keep its mail flowing.
    sandbox.graph.set_account_enabled(TENANT, &shared.id, false);

    // 6. Watch Proofpoint converge: the last flip per user decides its final state.
    let mut expected: HashMap<String, (bool, Instant)> = HashMap::new();
    for f in &flips {
        expected.insert(f.address.clone(), (f.enabled, f.at));
    }
    let deadline = Instant::now() + args.timeout;
    let mut landed: HashMap<String, Duration> = HashMap::new();
    while landed.len() < expected.len() && Instant::now() < deadline {
        for (address, (enabled, at)) in &expected {
            if landed.contains_key(address) {
                continue;
            }
            if sandbox.proofpoint.user(ORG, address).is_some_and(|u| u.is_active == *enabled) {
                let latency = at.elapsed();
                landed.insert(address.clone(), latency);
                let action = if *enabled { "activated  " } else { "deactivated" };
                println!("  {action} {address:<32} mirror of accountEnabled={enabled:<5}  {:>5} ms", latency.as_millis());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sandbox.graph.settle(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shared_ok = sandbox.is_active(&shared) == Some(true);
    println!(
        "  {} {SHARED}@{ORG:<18} sign-in blocked, kept active by guard (functional account)",
        if shared_ok { "kept       " } else { "LOST MAIL  " }
    );

    // 7. Summary.
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
    let mut latencies: Vec<Duration> = landed.values().copied().collect();
    latencies.sort();
    let converged = landed.len() == expected.len() && shared_ok;
    println!("\nsummary");
    println!("  changes:     {} flips on {} users in {:.1?}", flips.len(), expected.len(), started.elapsed());
    println!("  landed:      {}/{}", landed.len(), expected.len());
    println!("  latency:     p50 {} ms, p99 {} ms (flip in Entra → written in Proofpoint)", pct(&latencies, 50), pct(&latencies, 99));
    println!("  outcomes:    {}", summary_counts(&app));
    println!("  converged:   {}", if converged { "yes" } else { "NO" });
    for (address, (enabled, _)) in &expected {
        if !landed.contains_key(address) {
            println!("  not converged: {address} (expected is_active={enabled})");
        }
    }
    Ok(converged)
}

fn pct(sorted: &[Duration], p: usize) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() * p).div_ceil(100)).saturating_sub(1).min(sorted.len() - 1);
    sorted[idx].as_millis()
}

fn summary_counts(app: &App) -> String {
    use crate::telemetry::Metrics;
    let m = &app.metrics;
    format!(
        "{} applied, {} no change, {} skipped, {} retried, {} dead-lettered",
        Metrics::get(&m.outcomes_applied_total),
        Metrics::get(&m.outcomes_no_change_total),
        Metrics::get(&m.outcomes_skipped_total),
        Metrics::get(&m.outcomes_retried_total),
        Metrics::get(&m.outcomes_dead_lettered_total),
    )
}
