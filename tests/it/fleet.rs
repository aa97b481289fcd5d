//! The breaker across real processes: several `flagrelay work` processes on one PostgreSQL
//! store, real RabbitMQ, the simulators. The fleet-wide limits hold across processes, a
//! SIGKILL, a restart of every worker, and per org; a store that is corrupt, unreachable or
//! stopped under load means no deactivation ([`outage`]).
//!
//! Harness in [`procs`]. Counts come from the Proofpoint simulator's records (deactivating
//! PUTs) and from `flagrelay breaker status --json`; every wait is a generous `until`.

mod outage;
mod procs;

use std::time::Duration;

use procs::{Fleet, StateStore, held, mirror_policy, trip};

use crate::support::{ORG, ORG_B, PgDatabase, TENANT, TENANT_B};

/// Poll `check` every half second until it holds or `timeout` passes.
pub async fn until<F: Future<Output = bool>>(
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether the org's or the global scope is tripped (both limits are 25: either may be the
/// one reached first).
fn tripped(report: &serde_json::Value) -> bool {
    trip(report, ORG).is_some() || trip(report, "global").is_some()
}

#[tokio::test]
async fn three_workers_on_one_postgres_store_let_at_most_the_limit_through_a_mass_disable_and_the_standbys_hold_after_the_active_one_is_killed()
 {
    let db = PgDatabase::create("fleet-trip").await;
    let mut fleet = Fleet::start(
        "fleet-trip",
        &mirror_policy(25, 25),
        StateStore::Postgres(db.url.clone()),
        false,
    )
    .await;
    // Answers take a moment, so the batch is still in flight when the kill comes.
    fleet
        .sandbox
        .proofpoint
        .set_latency(Duration::from_millis(5), Duration::from_millis(5));
    let users = fleet.seed(TENANT, ORG, "mass", 220);
    let (first, later) = users.split_at(200);
    // The first worker subscribes first and so is the active consumer of every shard; the
    // two others are standbys.
    for _ in 0..3 {
        fleet.add_worker().await;
    }

    fleet.disable(first).await;
    assert!(
        until(Duration::from_secs(120), || async {
            tripped(&fleet.breaker_status().await)
        })
        .await,
        "the org's breaker trips during a mass disable of 200 with a limit of 25"
    );
    // Kill the process doing the work (the one that settled the most), mid-batch.
    let mut busiest = (0, -1.0);
    for (i, w) in fleet.workers.iter().enumerate() {
        let done = w.metric("flagrelay_outcomes_applied_total").await
            + w.metric("flagrelay_outcomes_held_total").await;
        if done > busiest.1 {
            busiest = (i, done);
        }
    }
    let decided_at_kill = held(&fleet.breaker_status().await, None) + fleet.deactivations(None);
    eprintln!(
        "decided when killed: {decided_at_kill}/200 (worker {})",
        busiest.0
    );
    fleet.workers.remove(busiest.0).kill().await;

    // More disables after the kill: only the standbys are left to decide them.
    fleet.disable(later).await;
    let everyone_decided = until(Duration::from_secs(180), || async {
        held(&fleet.breaker_status().await, None) + fleet.deactivations(None) >= users.len()
    })
    .await;
    let report = fleet.breaker_status().await;
    assert!(
        everyone_decided,
        "every user is deactivated or held: {} held, {} deactivated",
        held(&report, None),
        fleet.deactivations(None)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deactivated = fleet.deactivations(None);
    assert!(
        deactivated <= 25,
        "at most 25 deactivations across three processes and a kill, got {deactivated}"
    );
    assert_eq!(deactivated, fleet.inactive(&users));
    assert_eq!(held(&report, Some(ORG)), users.len() - deactivated);
    assert!(tripped(&report), "the trip is in the store: {report}");
    // Every surviving process sees the trip, and the standbys held what came after the kill.
    for w in &fleet.workers {
        assert!(
            until(Duration::from_secs(30), || async {
                w.metric("flagrelay_breaker_tripped").await == 1.0
            })
            .await,
            "worker {} shows the trip",
            w.admin
        );
    }
    let mut held_by_standbys = 0.0;
    for w in &fleet.workers {
        held_by_standbys += w.metric("flagrelay_outcomes_held_total").await;
    }
    assert!(
        held_by_standbys >= later.len() as f64,
        "the standbys held the later disables ({held_by_standbys})"
    );
    fleet.stop().await;
    db.drop_now().await;
}

#[tokio::test]
async fn restarting_every_worker_does_not_reset_the_breaker_window() {
    const LIMIT: usize = 5;
    let db = PgDatabase::create("fleet-restart").await;
    let mut fleet = Fleet::start(
        "fleet-restart",
        &mirror_policy(LIMIT as u32, 1000),
        StateStore::Postgres(db.url.clone()),
        false,
    )
    .await;
    let users = fleet.seed(TENANT, ORG, "rst", LIMIT + 10);
    let (budget, after) = users.split_at(LIMIT);
    fleet.add_worker().await;
    fleet.add_worker().await;
    fleet.disable(budget).await;
    assert!(
        until(Duration::from_secs(60), || async {
            fleet.inactive(budget) == LIMIT
        })
        .await,
        "the first {LIMIT} deactivations go through"
    );
    let report = fleet.breaker_status().await;
    assert!(trip(&report, ORG).is_none(), "not tripped yet: {report}");

    fleet.kill_workers().await;
    fleet.add_worker().await;
    fleet.add_worker().await;
    fleet.disable(after).await;
    assert!(
        until(Duration::from_secs(90), || async {
            held(&fleet.breaker_status().await, Some(ORG)) == after.len()
        })
        .await,
        "the new workers hold every later deactivation"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fleet.deactivations(None), LIMIT, "none went through");
    assert_eq!(fleet.inactive(after), 0);
    assert!(trip(&fleet.breaker_status().await, ORG).is_some());
    fleet.stop().await;
    db.drop_now().await;
}

#[tokio::test]
async fn a_mass_disable_in_one_org_does_not_hold_another_below_the_global_limit() {
    let db = PgDatabase::create("fleet-orgs").await;
    let mut fleet = Fleet::start(
        "fleet-orgs",
        &mirror_policy(25, 1000),
        StateStore::Postgres(db.url.clone()),
        true,
    )
    .await;
    let a = fleet.seed(TENANT, ORG, "orga", 60);
    let b = fleet.seed(TENANT_B, ORG_B, "orgb", 10);
    fleet.add_worker().await;
    fleet.add_worker().await;
    fleet.disable(&a).await;
    assert!(
        until(Duration::from_secs(90), || async {
            held(&fleet.breaker_status().await, Some(ORG)) + fleet.deactivations(Some(ORG))
                >= a.len()
        })
        .await,
        "every user of org A is deactivated or held"
    );
    assert!(trip(&fleet.breaker_status().await, ORG).is_some());

    // Org A is tripped; org B's leavers still go through.
    fleet.disable(&b).await;
    assert!(
        until(Duration::from_secs(60), || async {
            fleet.inactive(&b) == b.len()
        })
        .await,
        "org B is not held by org A's trip: {} of {} deactivated",
        fleet.inactive(&b),
        b.len()
    );
    let report = fleet.breaker_status().await;
    assert_eq!(fleet.deactivations(Some(ORG)), 25);
    assert_eq!(held(&report, Some(ORG)), a.len() - 25);
    assert_eq!(held(&report, Some(ORG_B)), 0);
    assert!(trip(&report, ORG_B).is_none(), "{report}");
    assert!(trip(&report, "global").is_none(), "{report}");
    fleet.stop().await;
    db.drop_now().await;
}
