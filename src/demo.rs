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

use chrono::Utc;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::{Config, TenantConfig};
use crate::graph::client::GraphClient;
use crate::graph::{GraphApi, GraphUser, NewSubscription};
use crate::proofpoint::PpUser;
use crate::proofpoint::client::ProofpointClient;
use crate::queue::embedded::EmbeddedQueue;
use crate::queue::rabbitmq::RabbitQueue;
use crate::queue::{Queue, QueueSettings};
use crate::sim::graph::GraphSim;
use crate::sim::proofpoint::ProofpointSim;

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
    user: String,
    address: String,
    enabled: bool,
    at: Instant,
}

async fn demo(args: DemoArgs) -> anyhow::Result<bool> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let client_secret = random_secret(&mut rng);
    let pp_password = random_secret(&mut rng);

    // 1. Simulators.
    let graph_sim = GraphSim::new();
    graph_sim.add_app("flagrelay-demo", &client_secret);
    graph_sim.add_tenant(TENANT);
    let graph_server = graph_sim.spawn(TcpListener::bind("127.0.0.1:0").await?).await;
    let pp_sim = ProofpointSim::new();
    pp_sim.add_org(ORG);
    pp_sim.add_admin("admin@contoso.example", &pp_password, None);
    let pp_server = pp_sim.spawn(TcpListener::bind("127.0.0.1:0").await?).await;

    // 2. flagrelay itself, configured as a user would, pointing at the simulators.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let receiver_url = format!("http://{}", listener.local_addr()?);
    let mut config = Config::default();
    config.graph.authority_url = graph_server.authority_url();
    config.graph.api_url = graph_server.api_url();
    config.graph.client_id = "flagrelay-demo".into();
    config.graph.client_secret = Some(SecretString::from(client_secret));
    config.graph.client_state = Some(SecretString::from(random_secret(&mut rng)));
    config.proofpoint.base_url = pp_server.base_url();
    config.proofpoint.username = "admin@contoso.example".into();
    config.proofpoint.password = Some(SecretString::from(pp_password));
    config.proofpoint.requests_per_second = 200;
    config.signing.key = Some(SecretString::from(random_secret(&mut rng)));
    config.tenants = vec![TenantConfig { id: TENANT.into(), org_domain: ORG.into() }];
    config.worker.backoff_base = Duration::from_millis(200);
    config.validate()?;

    let settings = QueueSettings::with_prefix(format!("flagrelay-demo-{}", uuid::Uuid::new_v4().simple()));
    let queue: Arc<dyn Queue> = match &args.amqp_url {
        Some(url) => Arc::new(RabbitQueue::new(SecretString::from(url.clone()), settings)),
        None => Arc::new(EmbeddedQueue::new(settings)),
    };
    let graph = Arc::new(GraphClient::new(&config.graph)?);
    let pp = Arc::new(ProofpointClient::new(config.proofpoint.requests_per_second, config.proofpoint.request_timeout));
    let app = App::with_parts(config.clone(), queue.clone(), graph.clone(), pp);
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let app = app.clone();
        let stop = stop.clone();
        async move { app.run(listener, stop).await }
    });

    println!("flagrelay demo");
    println!("  queue:       {}", args.amqp_url.as_deref().map_or("embedded (not durable)".to_owned(), crate::config::redact_url));
    println!("  graph sim:   {}", graph_server.api_url());
    println!("  proofpoint:  {}", pp_server.base_url());
    println!("  receiver:    {receiver_url}");

    // 3. Seed the tenant: ordinary users, a shared mailbox (sign-in blocked by design; a
    // functional account in Proofpoint) and a leaver.
    let mut people: Vec<String> = (1..=args.users).map(|i| format!("user{i:03}")).collect();
    people.push(LEAVER.into());
    for name in people.iter().chain([&SHARED.to_owned()]) {
        let shared = name == SHARED;
        let address = format!("{name}@{ORG}");
        pp_sim.upsert_user(ORG, PpUser {
            primary_email: address.clone(),
            user_type: Some(if shared { "functional_account" } else { "end_user" }.into()),
            is_active: true,
            other: serde_json::json!({"firstname": name, "surname": "Demo", "alias_emails": []})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        });
        graph_sim.upsert_user(TENANT, GraphUser {
            id: user_id(name),
            account_enabled: Some(!shared),
            user_principal_name: Some(address.clone()),
            mail: Some(address.clone()),
            proxy_addresses: Some(vec![format!("SMTP:{address}")]),
            user_type: Some("Member".into()),
            employee_leave_date_time: (name == LEAVER).then(|| Utc::now() - chrono::Duration::days(1)),
            ..GraphUser::default()
        });
    }
    println!("  seeded:      {} users, 1 shared mailbox, 1 leaver in tenant {TENANT} / org {ORG}", args.users);

    // 4. Subscribe: the Graph simulator performs the validation handshake against our receiver.
    let sub = graph
        .create_subscription(TENANT, &NewSubscription {
            change_type: "updated,deleted".into(),
            notification_url: format!("{receiver_url}/graph/notifications"),
            lifecycle_notification_url: Some(format!("{receiver_url}/graph/lifecycle")),
            resource: "users".into(),
            expiration_date_time: Utc::now() + chrono::Duration::minutes(41_000),
            client_state: secrecy::ExposeSecret::expose_secret(config.graph.client_state()).to_owned(),
        })
        .await?;
    println!("  subscribed:  {} (handshake answered by flagrelay)\n", sub.id);

    // 5. Flip: block some users, then unblock a few of them again; the leaver and the shared
    // mailbox are always among the changes.
    let mut order = people.clone();
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
        graph_sim.set_account_enabled(TENANT, &user_id(name), *enabled);
        flips.push(Flip { user: name.clone(), address: format!("{name}@{ORG}"), enabled: *enabled, at: Instant::now() });
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..25))).await;
    }
    // The shared mailbox is re-saved with sign-in still blocked: a notification arrives, and
    // the functional-account guard must keep its mail flowing.
    graph_sim.set_account_enabled(TENANT, &user_id(SHARED), false);

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
            if pp_sim.user(ORG, address).is_some_and(|u| u.is_active == *enabled) {
                let latency = at.elapsed();
                landed.insert(address.clone(), latency);
                let action = if *enabled { "activated  " } else { "deactivated" };
                println!("  {action} {address:<32} mirror of accountEnabled={enabled:<5}  {:>5} ms", latency.as_millis());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    graph_sim.settle(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shared_ok = pp_sim.user(ORG, &format!("{SHARED}@{ORG}")).is_some_and(|u| u.is_active);
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

fn user_id(name: &str) -> String {
    let mut id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string();
    id.make_ascii_lowercase();
    id
}

fn random_secret(rng: &mut impl Rng) -> String {
    (0..40).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect()
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
