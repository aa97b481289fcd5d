//! `flagrelay bench history`: one user's decision history out of millions of rows — the
//! lookup behind `flagrelay history --user …` and the admin `/history` page.
//!
//! The store's history table is filled with `--rows` entries (spread over `--users` users
//! and 30 days, through the store's own batched writes), and at each checkpoint (every
//! tenfold: 100k, 1M, 10M rows) a random sample of users is looked up by object id and by
//! address. The ceiling is the store's own round trip (`ping`: one indexed row) measured at
//! the same moment, so the ratio says what the history's size costs on this machine.
//! Then a retention prune of the oldest tenth is timed.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::Rng as _;

use super::support::{self, Latencies};
use crate::config::StateConfig;
use crate::ids::{TenantId, UserId};
use crate::store::sql::SqlStore;
use crate::store::{HistoryEntry, HistoryQuery, Store};

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// History entries written in total.
    #[arg(long, default_value_t = 10_000_000)]
    pub rows: u64,
    /// Users the entries are spread over (one tenant).
    #[arg(long, default_value_t = 100_000)]
    pub users: u64,
    /// Lookups per checkpoint (each of a random user, by id and by address).
    #[arg(long, default_value_t = 300)]
    pub lookups: usize,
    /// A PostgreSQL database to fill instead of a SQLite file in a scratch directory. Its
    /// history must be empty (a database of its own): the bench refuses to touch real history.
    #[arg(long)]
    pub state_url: Option<String>,
}

/// Entries per `record_history` call while filling.
const BATCH: u64 = 5_000;
/// The history spans this many days back from now.
const SPAN_DAYS: i64 = 30;

pub async fn run(args: HistoryArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.users > 0 && args.rows > 0,
        "--rows and --users must be positive"
    );
    let scratch = support::Scratch::new("history")?;
    let config = StateConfig::default();
    let (store, backend) = match &args.state_url {
        Some(url) => (
            SqlStore::postgres(url, &config).await?,
            format!("PostgreSQL {}", crate::config::redact_url(url)),
        ),
        None => (
            SqlStore::sqlite(&scratch.0, &config).await?,
            "SQLite (one file, WAL, synchronous=FULL)".to_owned(),
        ),
    };
    let probe = HistoryQuery {
        limit: 1,
        ..HistoryQuery::default()
    };
    anyhow::ensure!(
        store.history(&probe).await?.is_empty(),
        "the store already holds decision history: bench history needs an empty database of its own"
    );
    println!(
        "bench history: {} rows over {} users, {backend}",
        args.rows, args.users
    );
    println!("machine: {}", support::machine());
    println!(
        "{:>11}  {:>9}  {:>27}  {:>27}  {:>17}  {:>7}",
        "rows",
        "fill/s",
        "by id p50/p90/p99/max ms",
        "by address p50/p90/p99/max",
        "ceiling p50/p99",
        "p99 ×"
    );
    let now = Utc::now();
    let mut written = 0u64;
    let mut checkpoint = 100_000.min(args.rows);
    let mut filling = Duration::ZERO;
    while written < args.rows {
        let n = BATCH.min(args.rows - written).min(checkpoint - written);
        let batch: Vec<HistoryEntry> = (written..written + n)
            .map(|i| entry(i, args.users, args.rows, now))
            .collect();
        let t = Instant::now();
        store.record_history(&batch).await?;
        filling += t.elapsed();
        written += n;
        if written == checkpoint {
            let rate = written as f64 / filling.as_secs_f64();
            measure(&store, &args, written, rate).await?;
            checkpoint = (checkpoint * 10).min(args.rows);
        }
    }
    let cut = now - chrono::Duration::days(SPAN_DAYS - SPAN_DAYS / 10);
    let t = Instant::now();
    let pruned = store.prune(cut, now).await?;
    println!(
        "prune of the oldest tenth: {} rows in {:.1} s",
        pruned.history,
        t.elapsed().as_secs_f64()
    );
    if args.state_url.is_some() {
        store.prune(now + chrono::Duration::days(1), now).await?;
        println!("(the PostgreSQL history was emptied again)");
    }
    store.close().await;
    Ok(())
}

/// Entry `i`: user `i % users`, times spread evenly over the span, newest last.
fn entry(i: u64, users: u64, rows: u64, now: DateTime<Utc>) -> HistoryEntry {
    let user = i % users;
    let span_ms = SPAN_DAYS * 24 * 3600 * 1000;
    let back = span_ms - (i as i64).saturating_mul(span_ms) / (rows.max(1) as i64);
    let applied = i.is_multiple_of(7);
    HistoryEntry {
        at: now - chrono::Duration::milliseconds(back),
        tenant_id: TenantId::new("bench-tenant"),
        user_id: UserId::new(&object_id(user)),
        upn: Some(address(user)),
        address: Some(address(user)),
        origin: ["notification", "delta", "sweep", "recheck"][(i % 4) as usize].into(),
        result: if applied { "applied" } else { "no_change" }.into(),
        action: Some(
            if i.is_multiple_of(2) {
                "deactivate"
            } else {
                "activate"
            }
            .into(),
        ),
        rule: Some("default".into()),
        reason: "default: mirror the sign-in flag".into(),
        writes: if applied {
            vec!["is_active true → false".into()]
        } else {
            Vec::new()
        },
        was_active: Some(true),
        is_active: Some(!applied),
        was_exempt: Some(false),
        is_exempt: Some(false),
        dry_run: false,
        latency_ms: Some((i % 90) as i64 + 10),
        trace_id: Some(format!("{:032x}", i)),
        worker: "bench-host:1".into(),
    }
}

fn object_id(user: u64) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &user.to_le_bytes()).to_string()
}

fn address(user: u64) -> String {
    format!("user{user}@bench.test")
}

/// Lookups of random users by id and by address, against the store's own round trip.
async fn measure(store: &SqlStore, args: &HistoryArgs, rows: u64, rate: f64) -> anyhow::Result<()> {
    let (mut by_id, mut by_address, mut ceiling) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    let mut found = 0usize;
    for _ in 0..args.lookups {
        let user = rand::rng().random_range(0..args.users.min(rows));
        let t = Instant::now();
        store.ping().await?;
        ceiling.record(t.elapsed());
        for (who, into) in [
            (object_id(user), &mut by_id),
            (address(user), &mut by_address),
        ] {
            let query = HistoryQuery {
                user: Some(who),
                since: None,
                limit: crate::admin::history::LIMIT,
            };
            let t = Instant::now();
            found += store.history(&query).await?.len();
            into.record(t.elapsed());
        }
    }
    anyhow::ensure!(
        found > 0,
        "the lookups found nothing: the fill did not land"
    );
    let ratio = by_id.ms(0.99).max(by_address.ms(0.99)) / ceiling.ms(0.99).max(0.001);
    println!(
        "{rows:>11}  {rate:>9.0}  {:>27}  {:>27}  {:>7.2} / {:>7.2}  {ratio:>7.1}",
        by_id.summary(),
        by_address.summary(),
        ceiling.ms(0.5),
        ceiling.ms(0.99),
    );
    Ok(())
}
