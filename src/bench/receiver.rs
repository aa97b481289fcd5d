//! `flagrelay bench receiver`: how many Graph notification batches the webhook accepts per
//! second, how fast it answers, and how that compares with the HTTP and broker ceilings of
//! the same machine, measured in the same run.
//!
//! Each target (flagrelay's receiver, and the two reference servers of [`super::ceiling`]) is
//! a child process. For each the generator measures:
//! 1. **saturation**: a closed loop of `--concurrency` requests in flight, as fast as the
//!    target answers — its throughput ceiling (best of `--rounds`, interleaved);
//! 2. **half load**: an open loop (a fixed arrival rate, requests sent on schedule whether or
//!    not earlier ones were answered) at half that throughput; latency counts from the
//!    scheduled send time, so a stalled server cannot hide its queueing delay;
//! 3. for flagrelay, **overload**: an open loop at 1.5× its throughput, showing that
//!    saturation is answered by early `503`s, not by slow `202`s.
//!
//! With `--rate` every target gets one open-loop run at that rate instead.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::ceiling::sample_message;
use super::support::{self, FlagrelayProcess, Latencies, Scratch};
use crate::config::Config;
use crate::queue::rabbitmq::RabbitQueue;
use crate::sim::sandbox::Sandbox;

const TENANT: &str = "00000000-0000-0000-0000-0000000be7c4";
const ORG: &str = "bench.example";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// A bare axum `202` (the HTTP ceiling).
    Http,
    /// Raw lapin publishes with confirms, then `202` (the broker ceiling).
    Broker,
    /// flagrelay's receiver.
    Flagrelay,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Http => "http ceiling",
            Target::Broker => "broker ceiling",
            Target::Flagrelay => "flagrelay",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ReceiverArgs {
    /// Aim at a running receiver (`http://host:port`) instead of starting one; its
    /// clientState and first tenant are read from --config.
    #[arg(long)]
    pub url: Option<String>,
    /// The broker of the receiver started here and of the broker ceiling (default: the
    /// configured `amqp.url` with --url, else the local RabbitMQ).
    #[arg(long, env = "FLAGRELAY_BENCH_AMQP_URL")]
    pub amqp_url: Option<String>,
    /// One open-loop run per target at this many requests/s, instead of saturation + half load.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Length of each measured run.
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub duration: Duration,
    /// Notification items per request (Graph batches them; 1 is the hardest case).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Requests in flight while measuring saturation (the same for every target).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Open loop: requests in flight at most (each needs a connection); requests due while
    /// this many wait are not sent and counted as `unsent` (a client with a bounded pool, and
    /// a generator that does not drown the 2 cores it shares with its targets).
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Saturation is measured this many times per target, interleaved; the best counts
    /// (the machine's background load varies).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Which targets, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["http", "broker", "flagrelay"])]
    pub targets: Vec<Target>,
    /// `receiver.max_in_flight` of the receiver started here (default: the built-in default).
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// `amqp.shards` of the receiver started here and of the broker ceiling.
    #[arg(long, default_value_t = 8)]
    pub shards: u16,
}

/// How a run offers load.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// `n` requests in flight at all times (closed loop).
    Saturate(usize),
    /// A fixed arrival rate, requests/s (open loop).
    Open(f64),
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Saturate(n) => write!(f, "saturation ({n} in flight)"),
            Load::Open(r) => write!(f, "open loop {r:.0}/s"),
        }
    }
}

/// What one run measured.
#[derive(Debug, Default)]
struct RunResult {
    sent: u64,
    /// Open loop only: requests not sent because OPEN_LOOP_CAP were in flight.
    not_sent: u64,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    /// Latency of `202` answers.
    accepted: Latencies,
    /// Latency of every other answer (`503`s when saturated).
    refused: Latencies,
    /// Open loop: how late the generator sent requests (it shares the machine's CPUs).
    lag: Latencies,
    /// Every answer's latency from the actual send (without the generator's lag).
    from_send_accepted: Latencies,
    from_send_refused: Latencies,
    elapsed: Duration,
    /// Peak RSS of the target process during the run.
    peak_rss: Option<u64>,
}

impl RunResult {
    fn accepted_per_sec(&self) -> f64 {
        self.accepted.count() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn statuses(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect();
        if self.transport_errors > 0 {
            parts.push(format!("err:{}", self.transport_errors));
        }
        if self.not_sent > 0 {
            parts.push(format!("unsent:{}", self.not_sent));
        }
        parts.join(" ")
    }
}

/// Valid Graph-shaped change-notification collections, each item for a different user.
struct Bodies {
    bodies: Vec<bytes::Bytes>,
}

impl Bodies {
    fn new(client_state: &SecretString, tenant: &str, batch: usize) -> Self {
        let bodies = (0..2048)
            .map(|_| {
                let items: Vec<_> = (0..batch)
                    .map(|_| {
                        let user = uuid::Uuid::new_v4();
                        json!({
                            "subscriptionId": "6e0b8a51-1d8f-4a62-9a0e-8b1f0bde4c11",
                            "subscriptionExpirationDateTime": "2026-12-20T10:00:00.0000000+00:00",
                            "changeType": "updated",
                            "clientState": client_state.expose_secret(),
                            "resource": format!("Users/{user}"),
                            "resourceData": {
                                "@odata.type": "#Microsoft.Graph.User",
                                "@odata.id": format!("Users/{user}"),
                                "id": user.to_string(),
                                "organizationId": tenant,
                                "eventTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                                "sequenceNumber": 1
                            },
                            "tenantId": tenant
                        })
                    })
                    .collect();
                bytes::Bytes::from(serde_json::to_vec(&json!({ "value": items })).expect("json"))
            })
            .collect();
        Self { bodies }
    }

    fn get(&self, i: u64) -> bytes::Bytes {
        self.bodies[(i % self.bodies.len() as u64) as usize].clone()
    }
}

/// A target under load.
struct Endpoint {
    target: Target,
    url: String,
    process: Option<FlagrelayProcess>,
}

pub async fn run(args: ReceiverArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let scratch = Scratch::new("receiver")?;
    // Without --url the receiver is configured here; a sandbox provides a valid config.
    let sandbox = match &args.url {
        None => Some(Sandbox::start(TENANT, ORG).await?),
        Some(_) => None,
    };
    let mut config = match &sandbox {
        Some(s) => s.config.clone(),
        None => Config::load(config_path).context("--url needs the receiver's --config")?,
    };
    let amqp = args
        .amqp_url
        .clone()
        .map(SecretString::from)
        .or_else(|| config.amqp.url.clone())
        .unwrap_or_else(|| SecretString::from(support::LOCAL_AMQP_URL.to_owned()));
    config.amqp.url = Some(amqp.clone());
    config.amqp.shards = args.shards;
    if let Some(n) = args.max_in_flight {
        config.receiver.max_in_flight = n;
    }
    let tenant = config
        .tenants
        .first()
        .map(|t| t.id.clone())
        .context("the configuration names no tenant")?;
    let client_state = config.graph.client_state().clone();
    let bodies = Arc::new(Bodies::new(&client_state, &tenant, args.batch.max(1)));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .build()?;

    println!("flagrelay bench receiver");
    println!("  machine:     {}", support::machine());
    println!(
        "  request:     {} item(s) per batch, {} bytes; each item becomes a {}-byte signed envelope",
        args.batch.max(1),
        bodies.get(0).len(),
        sample_message(&config).body.len()
    );
    println!(
        "  broker:      {}",
        crate::config::redact_url(amqp.expose_secret())
    );

    // Start every target first, so all of them exist (and idle) while any one is measured.
    let mut prefixes = Vec::new();
    let mut endpoints = Vec::new();
    for &target in &args.targets {
        let port = support::free_port()?;
        let mut cfg = config.clone();
        cfg.amqp.prefix = support::unique_prefix(match target {
            Target::Broker => "ceiling",
            _ => "receiver",
        });
        cfg.receiver.listen = ([127, 0, 0, 1], port).into();
        let base = format!("http://127.0.0.1:{port}");
        let (url, process) = match (target, &args.url) {
            (Target::Flagrelay, Some(url)) => (url.trim_end_matches('/').to_owned(), None),
            (Target::Flagrelay, None) => {
                prefixes.push(cfg.amqp.queue_settings());
                let p = FlagrelayProcess::spawn("receiver", &["serve"], &cfg, &scratch.0)?;
                (base, Some(p))
            }
            (ceiling, _) => {
                if ceiling == Target::Broker {
                    prefixes.push(cfg.amqp.queue_settings());
                }
                let kind = if ceiling == Target::Http {
                    "http"
                } else {
                    "broker"
                };
                let listen = format!("127.0.0.1:{port}");
                let items = args.batch.max(1).to_string();
                let argv = [
                    "bench", "ceiling", "--kind", kind, "--listen", &listen, "--items", &items,
                ];
                let p =
                    FlagrelayProcess::spawn(&format!("{kind}-ceiling"), &argv, &cfg, &scratch.0)?;
                (base, Some(p))
            }
        };
        endpoints.push(Endpoint {
            target,
            url,
            process,
        });
    }
    for e in &mut endpoints {
        let ready = support::wait_until(e.target.name(), Duration::from_secs(30), || {
            let client = client.clone();
            let url = e.url.clone();
            let target = e.target;
            async move {
                match target {
                    Target::Flagrelay => support::receiver_answers(&client, &url).await,
                    _ => client
                        .get(format!("{url}/healthz"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                }
            }
        })
        .await;
        if let Err(err) = ready {
            if let Some(p) = &mut e.process {
                p.ensure_running(&scratch.0)?;
            }
            return Err(err);
        }
        // Connections up (the receiver's publisher link is made by its first publish).
        let warm = generate(
            &client,
            &e.url,
            &bodies,
            Load::Open(200.0),
            Duration::from_secs(1),
            args.max_connections,
        )
        .await;
        anyhow::ensure!(
            warm.accepted.count() > 0,
            "{} accepted nothing while warming up ({})",
            e.target.name(),
            warm.statuses()
        );
    }

    println!(
        "  duration:    {:?} per run; latency p50 / p90 / p99 / max in ms, from the scheduled send \
         (open loop) or the send (saturation); \"p99 from send\": 202 / other answers, without the \
         generator's own lag",
        args.duration
    );
    println!();
    println!(
        "  {:<16} {:<26} {:>10} {:>8}  {:<24} {:<28} {:<28} {:<13} {:>9} {:>9}",
        "target",
        "load",
        "accepted/s",
        "items/s",
        "answers",
        "202 latency",
        "other answers",
        "p99 from send",
        "gen lag99",
        "peak RSS"
    );
    let mut saturation: BTreeMap<&'static str, f64> = BTreeMap::new();
    let report = |e: &Endpoint, load: Load, r: &RunResult| {
        let p99 = |l: &Latencies| {
            if l.count() > 0 {
                format!("{:.0}", l.ms(0.99))
            } else {
                "-".into()
            }
        };
        println!(
            "  {:<16} {:<26} {:>10.0} {:>8.0}  {:<24} {:<28} {:<28} {:<13} {:>9} {:>9}",
            e.target.name(),
            load.to_string(),
            r.accepted_per_sec(),
            r.accepted_per_sec() * args.batch.max(1) as f64,
            r.statuses(),
            r.accepted.summary(),
            r.refused.summary(),
            format!(
                "{} / {}",
                p99(&r.from_send_accepted),
                p99(&r.from_send_refused)
            ),
            if r.lag.count() > 0 {
                format!("{:.1}", r.lag.ms(0.99))
            } else {
                "-".into()
            },
            support::mib(r.peak_rss)
        );
    };
    if let Some(rate) = args.rate {
        for e in &mut endpoints {
            let r = measure(
                &client,
                e,
                &bodies,
                Load::Open(rate),
                args.duration,
                args.max_connections,
            )
            .await;
            report(e, Load::Open(rate), &r);
        }
    } else {
        // Saturation of every target first, then half load: the ceilings and flagrelay are
        // measured close together in time, under the same background load.
        for _ in 0..args.rounds.max(1) {
            for e in &mut endpoints {
                let load = Load::Saturate(args.concurrency);
                let r = measure(
                    &client,
                    e,
                    &bodies,
                    load,
                    args.duration,
                    args.max_connections,
                )
                .await;
                report(e, load, &r);
                let best = saturation.entry(e.target.name()).or_default();
                *best = best.max(r.accepted_per_sec());
            }
        }
        for e in &mut endpoints {
            let load = Load::Open((saturation[e.target.name()] / 2.0).max(1.0));
            let r = measure(
                &client,
                e,
                &bodies,
                load,
                args.duration,
                args.max_connections,
            )
            .await;
            report(e, load, &r);
        }
        for e in endpoints
            .iter_mut()
            .filter(|e| e.target == Target::Flagrelay)
        {
            let load = Load::Open((saturation[e.target.name()] * 1.5).max(1.0));
            let r = measure(
                &client,
                e,
                &bodies,
                load,
                args.duration,
                args.max_connections,
            )
            .await;
            report(e, load, &r);
        }
    }
    println!();
    if let Some(f) = saturation.get(Target::Flagrelay.name()) {
        for ceiling in [Target::Http, Target::Broker] {
            if let Some(c) = saturation.get(ceiling.name()) {
                println!(
                    "  flagrelay / {:<15} {:.2}  ({f:.0} vs {c:.0} accepted/s at saturation)",
                    ceiling.name(),
                    f / c
                );
            }
        }
    }
    for e in endpoints {
        if let Some(p) = e.process {
            p.stop().await;
        }
    }
    println!("  load average after: {}", support::load_average());
    for settings in prefixes {
        if let Err(e) = RabbitQueue::new(amqp.clone(), settings)
            .delete_topology()
            .await
        {
            eprintln!("note: could not delete the bench queues: {e}");
        }
    }
    drop(sandbox);
    Ok(())
}

/// [`generate`] against `e`, with the target's peak RSS during the run.
async fn measure(
    client: &reqwest::Client,
    e: &mut Endpoint,
    bodies: &Arc<Bodies>,
    load: Load,
    duration: Duration,
    max_connections: usize,
) -> RunResult {
    if let Some(p) = &mut e.process {
        p.reset_peak_rss();
    }
    let mut r = generate(client, &e.url, bodies, load, duration, max_connections).await;
    r.peak_rss = e.process.as_mut().and_then(FlagrelayProcess::peak_rss_kib);
    r
}

/// Offer `load` to `url` for `duration` and collect the answers.
async fn generate(
    client: &reqwest::Client,
    url: &str,
    bodies: &Arc<Bodies>,
    load: Load,
    duration: Duration,
    max_connections: usize,
) -> RunResult {
    let result = Arc::new(Mutex::new(RunResult::default()));
    let endpoint: Arc<str> = format!("{url}/graph/notifications").into();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Saturate(n) => {
            for worker in 0..n.max(1) {
                let (client, endpoint, bodies, result) = (
                    client.clone(),
                    endpoint.clone(),
                    bodies.clone(),
                    result.clone(),
                );
                tasks.spawn(async move {
                    let mut i = worker as u64;
                    while start.elapsed() < duration {
                        let sent = Instant::now();
                        let answer = send(&client, &endpoint, bodies.get(i)).await;
                        record(&result, answer, sent.elapsed(), sent.elapsed());
                        i += n as u64;
                    }
                });
            }
        }
        Load::Open(rate) => {
            let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut i: u64 = 0;
            loop {
                let elapsed = start.elapsed();
                if elapsed >= duration {
                    break;
                }
                // Everything due by now goes out now (timers tick in milliseconds).
                let due_by_now = (elapsed.as_secs_f64() * rate) as u64 + 1;
                while i < due_by_now {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    if in_flight.load(std::sync::atomic::Ordering::Relaxed) >= max_connections {
                        result.lock().expect("not poisoned").not_sent += 1;
                    } else {
                        in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let (client, endpoint, body, result, in_flight) = (
                            client.clone(),
                            endpoint.clone(),
                            bodies.get(i),
                            result.clone(),
                            in_flight.clone(),
                        );
                        tasks.spawn(async move {
                            let sent = Instant::now();
                            let answer = send(&client, &endpoint, body).await;
                            result.lock().expect("not poisoned").lag.record(sent - due);
                            // From the scheduled time: queueing in the target counts.
                            record(&result, answer, due.elapsed(), sent.elapsed());
                            in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        });
                    }
                    i += 1;
                }
                let next = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(next.into()).await;
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    // Answers still outstanding count (an open loop's last requests may take a while).
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let elapsed = start.elapsed().max(duration);
    let mut r = std::mem::take(&mut *result.lock().expect("not poisoned"));
    r.elapsed = elapsed;
    r
}

async fn send(client: &reqwest::Client, endpoint: &str, body: bytes::Bytes) -> Option<u16> {
    let resp = client
        .post(endpoint)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    // Read the answer fully so the connection is reused.
    resp.bytes().await.ok()?;
    Some(status)
}

fn record(result: &Mutex<RunResult>, answer: Option<u16>, latency: Duration, from_send: Duration) {
    let mut r = result.lock().expect("not poisoned");
    r.sent += 1;
    match answer {
        Some(202) => {
            *r.statuses.entry(202).or_default() += 1;
            r.accepted.record(latency);
            r.from_send_accepted.record(from_send);
        }
        Some(status) => {
            *r.statuses.entry(status).or_default() += 1;
            r.refused.record(latency);
            r.from_send_refused.record(from_send);
        }
        None => r.transport_errors += 1,
    }
}
