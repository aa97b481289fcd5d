//! `flagrelay bench e2e`: the whole pipeline on the simulators. Users' sign-in is flipped in
//! the Graph simulator at a fixed rate; the simulator notifies the receiver as Graph would;
//! workers read Graph and converge Proofpoint. Reported per configuration (worker processes ×
//! shards): flip → Proofpoint-write latency, changes applied per second, Graph and Proofpoint
//! calls per change, and the peak RSS of the receiver and of each worker.
//!
//! The simulators run in this process (their request and write logs carry `Instant`s, so a
//! flip and its write are timed on one clock); the receiver and the workers are child
//! processes of this binary (`flagrelay serve`, `flagrelay work`) on RabbitMQ, so their RSS is
//! their own and they compete for the CPU as they would in production.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use secrecy::SecretString;

use super::support::{self, FlagrelayProcess, Latencies, Scratch};
use crate::graph::GraphApi as _;
use crate::graph::client::GraphClient;
use crate::queue::rabbitmq::RabbitQueue;
use crate::sim::sandbox::{MIRROR_OPEN_BREAKER, Sandbox, SeededUser};

const TENANT: &str = "00000000-0000-0000-0000-0000000e2e00";
const ORG: &str = "e2e.example";
/// Flips made (and awaited) before measuring, proving that every process is consuming.
const WARM_UP: usize = 20;

#[derive(Debug, clap::Args)]
pub struct E2eArgs {
    /// Users seeded in both simulators.
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Sign-in flips per configuration (each a different user).
    #[arg(long, default_value_t = 3_000)]
    pub flips: usize,
    /// Flips per second (open loop).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Notifications per flip: Graph often sends several for one change (the extra ones
    /// are updates of another attribute); the worker should coalesce them.
    #[arg(long, default_value_t = 1)]
    pub burst: usize,
    /// Worker processes; a list runs each (e.g. `1,2,4`).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2])]
    pub workers: Vec<usize>,
    /// `amqp.shards`; a list runs each.
    #[arg(long, value_delimiter = ',', default_values_t = [8])]
    pub shards: Vec<u16>,
    /// `worker.concurrency` of each worker process.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// `amqp.prefetch` (unacked deliveries per shard consumer).
    #[arg(long, default_value_t = 32)]
    pub prefetch: u16,
    /// `graph.reads_in_flight` of the workers (0: no `$batch`, every read on its own).
    #[arg(long, default_value_t = crate::config::DEFAULT_READS_IN_FLIGHT)]
    pub reads_in_flight: usize,
    /// Simulated latency of every Graph API call.
    #[arg(long, default_value = "50ms", value_parser = crate::cli::parse_duration)]
    pub graph_latency: Duration,
    /// Simulated latency of every Proofpoint API call.
    #[arg(long, default_value = "50ms", value_parser = crate::cli::parse_duration)]
    pub proofpoint_latency: Duration,
    /// `proofpoint.requests_per_second` of the workers (the client-side limit per org; the
    /// default of 5 would cap a worker at 2.5 changes/s).
    #[arg(long, default_value_t = 5_000)]
    pub proofpoint_rps: u32,
    /// Policy file (default: mirror `accountEnabled`, one Graph read per change). Its
    /// breaker is opened: the benchmark deactivates thousands of users on purpose.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    #[arg(long, env = "FLAGRELAY_BENCH_AMQP_URL", default_value = support::LOCAL_AMQP_URL)]
    pub amqp_url: String,
    /// The workers' state store: a PostgreSQL URL (`postgres://…`, an existing database the
    /// bench may fill). Default: one SQLite file every worker process shares.
    #[arg(long, env = "FLAGRELAY_BENCH_STATE_URL")]
    pub state_url: Option<String>,
    /// Another process's disk load while measuring: a writer that writes and fsyncs 1 MiB
    /// blocks to the scratch directory's disk as fast as it can.
    #[arg(long)]
    pub disk_load: bool,
    /// How long one configuration may take to converge.
    #[arg(long, default_value = "120s", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
}

/// What one configuration measured.
#[derive(Debug, Default)]
struct RunResult {
    workers: usize,
    shards: u16,
    latency: Latencies,
    converged: usize,
    applied_per_sec: f64,
    offered_per_sec: f64,
    /// Graph reads about single users (the user, its groups, its mailbox settings), alone
    /// or in a `$batch`.
    graph_calls: usize,
    /// HTTP requests that carried them (a `$batch` counts once).
    graph_requests: usize,
    other_graph: usize,
    pp_requests: u64,
    pp_writes: u64,
    receiver_rss: Option<u64>,
    worker_rss: Vec<Option<u64>>,
}

pub async fn run(args: E2eArgs) -> anyhow::Result<()> {
    let scratch = Scratch::new("e2e")?;
    let mut sandbox = Sandbox::start(TENANT, ORG).await?;
    let policy = match &args.policy {
        Some(file) => open_breaker(
            &std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?,
        ),
        None => MIRROR_OPEN_BREAKER.to_owned(),
    };
    sandbox.use_policy(&policy)?;
    let seeding = Instant::now();
    let mut users: Vec<(SeededUser, bool)> = (1..=args.users)
        .map(|i| {
            (
                sandbox.seed_user(&format!("user{i:06}"), true, "end_user"),
                true,
            )
        })
        .collect();
    let seeded_in = seeding.elapsed();
    sandbox
        .graph
        .update_faults(|f| f.api_latency = args.graph_latency)?;
    sandbox
        .proofpoint
        .set_latency(args.proofpoint_latency, Duration::ZERO);
    let per_change_api = args.graph_latency + 2 * args.proofpoint_latency;

    println!("flagrelay bench e2e");
    println!("  machine:     {}", support::machine());
    println!(
        "  tenant:      {} users seeded in {seeded_in:.1?}; policy {} (breaker opened)",
        args.users,
        args.policy
            .as_ref()
            .map_or("mirror accountEnabled".into(), |p| p.display().to_string())
    );
    println!(
        "  load:        {} flips per configuration at {}/s, {} notification(s) per flip",
        args.flips, args.rate, args.burst
    );
    println!(
        "  simulators:  Graph {:?}, Proofpoint {:?} per call (a mirror change = Graph GET + Proofpoint GET + PUT = {per_change_api:?})",
        args.graph_latency, args.proofpoint_latency
    );
    println!(
        "  workers:     worker.concurrency {}, amqp.prefetch {}, proofpoint.requests_per_second {}, graph.reads_in_flight {}",
        args.concurrency, args.prefetch, args.proofpoint_rps, args.reads_in_flight
    );
    println!(
        "  state store: {}{}",
        args.state_url.as_deref().map_or_else(
            || "SQLite, one file shared by the worker processes".to_owned(),
            |u| format!("PostgreSQL {}", crate::config::redact_url(u))
        ),
        if args.disk_load {
            "; another process writes and fsyncs to the disk while measuring"
        } else {
            ""
        }
    );
    println!(
        "  columns:     Graph rd/ch = user reads per change (alone or in a $batch); Graph rq/ch = HTTP requests that carried them"
    );
    anyhow::ensure!(
        args.users >= WARM_UP + args.flips,
        "--users must be at least --flips + {WARM_UP}"
    );

    let mut results = Vec::new();
    let mut cursor = 0usize;
    for &shards in &args.shards {
        for &workers in &args.workers {
            let r = run_one(
                &args,
                &sandbox,
                &scratch,
                &mut users,
                &mut cursor,
                workers,
                shards,
            )
            .await
            .with_context(|| format!("{workers} worker(s), {shards} shards"))?;
            results.push(r);
        }
    }

    println!();
    println!(
        "  {:>7} {:>6} {:>10} {:>10} {:>12} {:<30} {:>11} {:>11} {:>11} {:>11} {:>9} workers (peak RSS)",
        "workers",
        "shards",
        "offered/s",
        "applied/s",
        "converged",
        "flip→write p50/p90/p99/max ms",
        "Graph rd/ch",
        "Graph rq/ch",
        "PP calls/ch",
        "PP PUT/ch",
        "receiver",
    );
    for r in &results {
        let n = args.flips.max(1) as f64;
        println!(
            "  {:>7} {:>6} {:>10.0} {:>10.0} {:>12} {:<30} {:>11.2} {:>11.2} {:>11.2} {:>11.2} {:>9} {}",
            r.workers,
            r.shards,
            r.offered_per_sec,
            r.applied_per_sec,
            format!("{}/{}", r.converged, args.flips),
            r.latency.summary(),
            r.graph_calls as f64 / n,
            r.graph_requests as f64 / n,
            r.pp_requests as f64 / n,
            r.pp_writes as f64 / n,
            support::mib(r.receiver_rss),
            r.worker_rss
                .iter()
                .map(|k| support::mib(*k))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!();
    // The simulated API time of one change: its calls, one after the other.
    let api_ms = |r: &RunResult| {
        let n = args.flips.max(1) as f64;
        (r.graph_calls as f64 / n * args.graph_latency.as_secs_f64()
            + r.pp_requests as f64 / n * args.proofpoint_latency.as_secs_f64())
            * 1000.0
    };
    println!(
        "  p99 above the simulated API time of a change (its calls × their latency): {}",
        results
            .iter()
            .map(|r| format!(
                "{}w/{}s {:.0} ms (API {:.0} ms)",
                r.workers,
                r.shards,
                r.latency.ms(0.99) - api_ms(r),
                api_ms(r)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  other Graph requests during the runs (tokens, the leader's delta baseline): {}",
        results
            .iter()
            .map(|r| r.other_graph.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  load average after: {}", support::load_average());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_one(
    args: &E2eArgs,
    sandbox: &Sandbox,
    scratch: &Scratch,
    users: &mut [(SeededUser, bool)],
    cursor: &mut usize,
    workers: usize,
    shards: u16,
) -> anyhow::Result<RunResult> {
    let dir = scratch.0.join(format!("w{workers}-s{shards}"));
    std::fs::create_dir_all(&dir)?;
    let amqp = SecretString::from(args.amqp_url.clone());
    let mut cfg = sandbox.config.clone();
    cfg.amqp.url = Some(amqp.clone());
    cfg.amqp.prefix = support::unique_prefix("e2e");
    cfg.amqp.shards = shards;
    cfg.amqp.prefetch = args.prefetch;
    cfg.worker.concurrency = args.concurrency;
    cfg.graph.reads_in_flight = args.reads_in_flight;
    cfg.proofpoint.requests_per_second = args.proofpoint_rps;
    let port = support::free_port()?;
    cfg.receiver.listen = ([127, 0, 0, 1], port).into();
    let receiver_url = format!("http://127.0.0.1:{port}");
    let topology = cfg.amqp.queue_settings();

    let mut receiver = FlagrelayProcess::spawn("receiver", &["serve"], &cfg, &dir)?;
    let http = reqwest::Client::new();
    support::wait_until("the receiver", Duration::from_secs(30), || {
        support::receiver_answers(&http, &receiver_url)
    })
    .await
    .or_else(|e| receiver.ensure_running(&dir).and(Err(e)))?;
    let graph = GraphClient::new(&cfg.graph)?;
    let subscriptions = sandbox.subscribe(&graph, &receiver_url).await?;
    // One state store for all the workers, as in production: a shared SQLite file on this
    // host, or PostgreSQL.
    cfg.worker.state_dir = dir.join("state");
    cfg.state.url = args.state_url.clone().map(SecretString::from);
    let mut procs = Vec::new();
    for i in 0..workers {
        let c = cfg.clone();
        procs.push(FlagrelayProcess::spawn(
            &format!("worker-{i}"),
            &["work"],
            &c,
            &dir,
        )?);
    }

    // Warm up: every consumer attached and every connection made.
    let warm: Vec<usize> = (0..WARM_UP).map(|k| (*cursor + k) % users.len()).collect();
    *cursor += WARM_UP;
    for &i in &warm {
        users[i].1 = !users[i].1;
        sandbox.set_enabled(&users[i].0, users[i].1);
    }
    let warmed = converge(sandbox, users, &warm, Duration::from_secs(60)).await;
    if warmed < warm.len() {
        for p in &mut procs {
            p.ensure_running(&dir)?;
        }
        receiver.ensure_running(&dir)?;
        anyhow::bail!(
            "the pipeline did not converge while warming up (logs in {})",
            dir.display()
        );
    }

    // Measure.
    let disk_load = if args.disk_load {
        Some(support::DiskLoad::start(&dir)?)
    } else {
        None
    };
    sandbox.proofpoint.clear_records();
    let pp_before = sandbox.proofpoint.counters();
    let chosen: Vec<usize> = (0..args.flips)
        .map(|k| (*cursor + k) % users.len())
        .collect();
    *cursor += args.flips;
    let mut flipped_at: HashMap<String, (Instant, bool)> = HashMap::new();
    let start = Instant::now();
    for (n, &i) in chosen.iter().enumerate() {
        let due = start + Duration::from_secs_f64(n as f64 / args.rate);
        tokio::time::sleep_until(due.into()).await;
        users[i].1 = !users[i].1;
        let (user, enabled) = (&users[i].0, users[i].1);
        flipped_at.insert(user.address.clone(), (Instant::now(), enabled));
        sandbox.set_enabled(user, enabled);
        for extra in 1..args.burst {
            sandbox
                .graph
                .update_user(TENANT, &user.id, |u| {
                    u.department = Some(format!("burst {extra}"));
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let offered = args.flips as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let converged = converge(sandbox, users, &chosen, args.timeout).await;
    if let Some(load) = disk_load {
        println!(
            "  disk load:   another writer synced {:.0} MiB/s to this disk meanwhile",
            load.mib_per_second()
        );
    }

    let mut latency = Latencies::default();
    let mut last_write = start;
    for w in sandbox.proofpoint.writes() {
        let Some((at, enabled)) = w.email.as_ref().and_then(|e| flipped_at.get(e)) else {
            continue;
        };
        let active = w
            .after
            .as_ref()
            .and_then(|a| a.get("is_active"))
            .and_then(serde_json::Value::as_bool);
        if active == Some(*enabled) && w.at_instant >= *at {
            latency.record(w.at_instant - *at);
            last_write = last_write.max(w.at_instant);
            flipped_at.remove(w.email.as_deref().unwrap_or_default());
        }
    }
    let pp_after = sandbox.proofpoint.counters();
    // The simulator keeps its newest 10,000 requests: enough for one run of the defaults.
    let log = sandbox.graph.request_log();
    anyhow::ensure!(
        log.first().is_none_or(|r| r.started <= start),
        "more Graph requests than the simulator's log keeps: use fewer --flips"
    );
    let window: Vec<_> = log.iter().filter(|r| r.started >= start).collect();
    let is_user_read = |r: &&&crate::sim::graph::RequestRecord| {
        r.method == "GET"
            && r.path.starts_with("/v1.0/users/")
            && !r.path.starts_with("/v1.0/users/delta")
    };
    let graph_calls = window.iter().filter(is_user_read).count();
    let alone = window
        .iter()
        .filter(is_user_read)
        .filter(|r| !r.in_batch)
        .count();
    let batches = window
        .iter()
        .filter(|r| r.path == "/v1.0/$batch" && !r.in_batch)
        .count();
    let requests = window.iter().filter(|r| !r.in_batch).count();

    let mut result = RunResult {
        workers,
        shards,
        converged: latency.count() as usize,
        applied_per_sec: latency.count() as f64 / (last_write - start).as_secs_f64().max(1e-9),
        offered_per_sec: offered,
        latency,
        graph_calls,
        graph_requests: alone + batches,
        other_graph: requests - alone - batches,
        pp_requests: pp_after.requests - pp_before.requests,
        pp_writes: pp_after.writes - pp_before.writes,
        receiver_rss: receiver.stop().await,
        worker_rss: Vec::new(),
    };
    let mut split = Vec::new();
    for p in procs {
        split.push(p.rss_split_kib());
        result.worker_rss.push(p.stop().await);
    }
    println!(
        "  worker RSS at the end, anonymous + file-backed (the binary's code): {}",
        split
            .iter()
            .map(|s| s.map_or("?".into(), |(anon, file)| format!(
                "{} + {}",
                support::mib(Some(anon)),
                support::mib(Some(file))
            )))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if converged < chosen.len() {
        eprintln!(
            "  note: {workers} worker(s), {shards} shards: {} of {} flips did not converge within {:?}",
            chosen.len() - converged,
            chosen.len(),
            args.timeout
        );
    }
    for s in subscriptions {
        let _ = graph.delete_subscription(TENANT, &s.id).await;
    }
    if let Err(e) = RabbitQueue::new(amqp, topology).delete_topology().await {
        eprintln!("note: could not delete the bench queues: {e}");
    }
    println!(
        "  ran {workers} worker(s) × {shards} shards: {}/{} converged",
        result.converged, args.flips
    );
    Ok(result)
}

/// Wait until every user in `which` has the Proofpoint state of its last flip; returns how
/// many do.
async fn converge(
    sandbox: &Sandbox,
    users: &[(SeededUser, bool)],
    which: &[usize],
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<usize> = which.to_vec();
    loop {
        pending.retain(|&i| sandbox.is_active(&users[i].0) != Some(users[i].1));
        if pending.is_empty() || Instant::now() >= deadline {
            return which.len() - pending.len();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `policy` with its blast-radius breaker opened wide (its limits replaced, or a section added).
fn open_breaker(policy: &str) -> String {
    // Every limit goes (the org's, the day's and the global section), then wide ones come
    // back in front of the rules.
    let limits = regex::Regex::new(
        r"(?m)^\s*(max_deactivations|max_share|max_per_day|window)\s*=.*$|^\s*\[breaker(\.global)?\]\s*$",
    )
    .expect("static regex");
    let opened = limits.replace_all(policy, "");
    format!(
        "[breaker]\nmax_deactivations = 10000000\nmax_share = 1.0\nwindow = \"1h\"\n\n\
         [breaker.global]\nmax_deactivations = 10000000\n\n{opened}"
    )
}
