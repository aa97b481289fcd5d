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
const DEFAULT_POLICY: &str = include_str!("../examples/policy.toml");
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
    // The policy is the shipped default (examples/policy.toml) with its breaker opened: the
    // demo disables most of a small org on purpose, which is exactly what the breaker stops.
    let mut sandbox = Sandbox::start(TENANT, ORG).await?;
    let policy = DEFAULT_POLICY
        .replace("max_deactivations = 25", "max_deactivations = 100000")
        .replace("max_share = 0.10", "max_share = 1.0")
        .replace(
            "# [breaker.global]\n# max_deactivations = 100",
            "[breaker.global]\nmax_deactivations = 100000",
        );
    anyhow::ensure!(
        policy.contains("[breaker.global]\nmax_deactivations = 100000"),
        "the demo relaxes the example policy's breaker; its settings moved"
    );
    sandbox.use_policy(&policy)?;
    let mut config = sandbox.config.clone();
    config.worker.backoff_base = Duration::from_millis(200);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let receiver_url = format!("http://{}", listener.local_addr()?);

    // 2. flagrelay: receiver + worker in this process, on the embedded queue or RabbitMQ.
    let settings =
        QueueSettings::with_prefix(format!("flagrelay-demo-{}", uuid::Uuid::new_v4().simple()));
    // With RabbitMQ, the demo's uniquely named topology is deleted again at the end.
    let rabbit = args
        .amqp_url
        .as_ref()
        .map(|url| RabbitQueue::new(SecretString::from(url.clone()), settings.clone()));
    let queue: Arc<dyn Queue> = match &rabbit {
        Some(r) => Arc::new(r.clone()),
        None => Arc::new(EmbeddedQueue::new(settings)),
    };
    let graph = Arc::new(GraphClient::new(&config.graph)?);
    let pp = Arc::new(ProofpointClient::from_config(&config.proofpoint)?);
    let app = App::with_parts(config, queue.clone(), graph.clone(), pp)?;
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let app = app.clone();
        let stop = stop.clone();
        async move { app.run(listener, stop).await }
    });

    println!("flagrelay demo");
    println!(
        "  queue:       {}",
        args.amqp_url.as_deref().map_or(
            "embedded (not durable)".to_owned(),
            crate::config::redact_url
        )
    );
    println!("  graph sim:   {}", app.config.graph.api_url);
    println!("  proofpoint:  {}", app.config.proofpoint.base_url);
    println!("  receiver:    {receiver_url}");
    println!("  policy:      examples/policy.toml (breaker relaxed for the demo)");

    // 3. Seed the tenant: ordinary users, a shared mailbox (sign-in blocked by design) and a
    // leaver (left yesterday).
    let people: HashMap<String, SeededUser> = (1..=args.users)
        .map(|i| format!("user{i:03}"))
        .map(|name| (name.clone(), sandbox.seed_user(&name, true, "end_user")))
        .collect();
    let leaver = sandbox.seed_user(LEAVER, true, "end_user");
    sandbox.make_leaver(&leaver, 1);
    let shared = sandbox.seed_user(SHARED, true, "end_user");
    sandbox
        .graph
        .set_mailbox_purpose(TENANT, &shared.id, Some("shared"))?;
    println!(
        "  seeded:      {} users, 1 shared mailbox, 1 leaver in tenant {TENANT} / org {ORG}",
        args.users
    );

    // 4. Subscribe: the Graph simulator performs the validation handshake against our receiver.
    for sub in sandbox.subscribe(graph.as_ref(), &receiver_url).await? {
        println!(
            "  subscribed:  {} (handshake answered by flagrelay)\n",
            sub.id
        );
    }

    // 5. Flip: block some users, then unblock a few of them again.
    let mut order: Vec<String> = people.keys().cloned().collect();
    order.sort();
    order.shuffle(&mut rng);
    let mut plan: Vec<(String, bool)> = order
        .iter()
        .take(args.flips)
        .map(|u| (u.clone(), false))
        .collect();
    let reenable: Vec<_> = plan
        .iter()
        .take(plan.len() / 4)
        .map(|(u, _)| (u.clone(), true))
        .collect();
    plan.extend(reenable);
    // Flip from a separate task, so landings are reported while flips still happen.
    let (flip_tx, mut flip_rx) = tokio::sync::mpsc::unbounded_channel::<Flip>();
    let started = Instant::now();
    let flipper = tokio::spawn({
        let graph = sandbox.graph.clone();
        let targets: Vec<(SeededUser, bool, u64)> = plan
            .iter()
            .map(|(name, enabled)| (people[name].clone(), *enabled, rng.random_range(5..25)))
            .collect();
        async move {
            for (user, enabled, pause) in targets {
                let at = Instant::now();
                if graph.set_account_enabled(TENANT, &user.id, enabled).is_ok() {
                    let _ = flip_tx.send(Flip {
                        address: user.address,
                        enabled,
                        at,
                    });
                }
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    });

    // 6. Report each flip when its write lands in Proofpoint (the simulator records every
    // write with its time); the last flip per user decides its final state.
    let deadline = Instant::now() + args.timeout;
    let mut pending: Vec<Flip> = Vec::new();
    let mut flips = 0usize;
    let mut latencies: Vec<Duration> = Vec::new();
    let mut seen_writes = 0usize;
    loop {
        while let Ok(f) = flip_rx.try_recv() {
            flips += 1;
            pending.push(f);
        }
        let writes = sandbox.proofpoint.writes();
        for w in writes.iter().skip(seen_writes) {
            let active = w
                .after
                .as_ref()
                .and_then(|a| a.get("is_active"))
                .and_then(serde_json::Value::as_bool);
            let Some(pos) = pending.iter().position(|f| {
                w.email.as_deref() == Some(f.address.as_str())
                    && Some(f.enabled) == active
                    && w.at_instant >= f.at
            }) else {
                continue;
            };
            let f = pending.remove(pos);
            let latency = w.at_instant - f.at;
            latencies.push(latency);
            let action = if f.enabled {
                "activated  "
            } else {
                "deactivated"
            };
            println!(
                "  {action} {:<32} accountEnabled={:<5} → is_active={:<5} {:>5} ms",
                f.address,
                f.enabled,
                f.enabled,
                latency.as_millis()
            );
        }
        seen_writes = writes.len();
        if (flipper.is_finished() && pending.is_empty() && flip_rx.is_empty())
            || Instant::now() >= deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let flip_time = started.elapsed();
    // The cases mirroring gets wrong: sign-in blocked on a shared mailbox, and on a leaver.
    sandbox.set_enabled(&shared, false);
    sandbox.set_enabled(&leaver, false);
    let store = app.store().await?;
    let leaver_key = crate::ids::UserKey::new(TENANT.into(), leaver.id.as_str().into());
    let deadline = Instant::now() + args.timeout;
    let shared_ok = loop {
        let exempt = sandbox.proofpoint.exemptions(ORG).contains(&shared.address);
        if exempt && sandbox.is_active(&shared) == Some(true) {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!(
        "  {} {:<32} sign-in blocked, mailbox purpose shared → keep_mail_flowing: active and exempt from sync",
        if shared_ok {
            "kept       "
        } else {
            "LOST MAIL  "
        },
        shared.address
    );
    let grace = loop {
        let recheck = store.user(&leaver_key).await?.state.recheck_at;
        if recheck.is_some() || Instant::now() >= deadline {
            break recheck;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let leaver_ok = grace.is_some() && sandbox.is_active(&leaver) == Some(true);
    println!(
        "  {} {:<32} left yesterday, sign-in blocked → deactivate_after 7d: active until {}",
        if leaver_ok {
            "in grace   "
        } else {
            "WRONG      "
        },
        leaver.address,
        grace.map_or("?".into(), |t| t.format("%Y-%m-%d %H:%M UTC").to_string())
    );

    // Converged means: every user's Proofpoint state is what its last flip asked for.
    let mut last: HashMap<String, bool> = HashMap::new();
    for (name, enabled) in &plan {
        last.insert(people[name].address.clone(), *enabled);
    }
    let wrong: Vec<_> = last
        .iter()
        .filter(|(address, enabled)| {
            sandbox.proofpoint.user(ORG, address).map(|u| u.is_active) != Some(**enabled)
        })
        .collect();

    // 7. Summary.
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
    if let Some(r) = rabbit
        && let Err(e) = r.delete_topology().await
    {
        eprintln!("note: could not delete the demo queues: {e}");
    }
    latencies.sort();
    let converged = wrong.is_empty() && shared_ok && leaver_ok;
    println!("\nsummary");
    println!(
        "  changes:     {flips} flips on {} users in {flip_time:.1?}",
        last.len()
    );
    println!(
        "  landed:      {}/{flips} flips written to Proofpoint ({} not written: superseded by a later flip, or lost)",
        latencies.len(),
        pending.len()
    );
    println!(
        "  latency:     p50 {} ms, p99 {} ms (flip in Entra → written in Proofpoint)",
        pct(&latencies, 50),
        pct(&latencies, 99)
    );
    println!("  outcomes:    {}", summary_counts(&app));
    println!("  converged:   {}", if converged { "yes" } else { "NO" });
    for (address, enabled) in wrong {
        println!("  not converged: {address} (expected is_active={enabled})");
    }
    Ok(converged)
}

fn pct(sorted: &[Duration], p: usize) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() * p).div_ceil(100))
        .saturating_sub(1)
        .min(sorted.len() - 1);
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
