//! The store gone: corrupt (the SQLite file overwritten with garbage), unreachable (nothing
//! listens where PostgreSQL was; the database dropped), or stopped under load (a private
//! PostgreSQL node, `pg_ctl stop -m immediate`). Nothing is deactivated while the breaker's
//! state is unknown, messages are retried (never settled as done), `/readyz` names the store;
//! once it is back everything converges and nothing is lost.

use std::sync::Arc;
use std::time::Duration;

use flagrelay::sim::sandbox::SeededUser;
use tokio_util::sync::CancellationToken;

use super::procs::{Fleet, StateStore, free_port, mirror_policy};
use super::until;
use crate::pg_node::PgNode;
use crate::support::{ORG, PgDatabase, TENANT, pg_admin_url};

/// Limits so high only the store can stop a deactivation.
fn open_breaker() -> String {
    mirror_policy(100_000, 100_000)
}

/// Sum of a metric over every worker.
async fn total(fleet: &Fleet, metric: &str) -> f64 {
    let mut sum = 0.0;
    for w in &fleet.workers {
        sum += w.metric(metric).await;
    }
    sum
}

/// Every worker's `/readyz` fails and names the store.
async fn assert_readyz_names_the_store(fleet: &Fleet) {
    for w in &fleet.workers {
        let named = until(Duration::from_secs(60), || async {
            w.readyz()
                .await
                .is_some_and(|(status, body)| status == 503 && body.contains("store: FAIL"))
        })
        .await;
        assert!(
            named,
            "{}: /readyz names the store: {:?}",
            w.admin,
            w.readyz().await
        );
    }
}

/// With the store down: disabling `users` deactivates none of them, every notification is
/// accepted, and the workers retry (nothing settled, nothing dead-lettered).
async fn assert_nothing_deactivated_while_down(fleet: &Fleet, users: &[SeededUser]) {
    assert_readyz_names_the_store(fleet).await;
    let before = fleet.deactivations(None);
    let retried = total(fleet, "flagrelay_outcomes_retried_total").await;
    for u in users {
        fleet.sandbox.set_enabled(u, false);
    }
    assert_eq!(
        fleet.notify(users).await,
        0,
        "the receiver accepts (202) while the store is down"
    );
    let retrying = until(Duration::from_secs(60), || async {
        total(fleet, "flagrelay_outcomes_retried_total").await >= retried + 2.0 * users.len() as f64
    })
    .await;
    assert!(retrying, "the workers retry the messages");
    assert_eq!(fleet.deactivations(None), before, "nothing deactivated");
    assert_eq!(fleet.inactive(users), 0);
    assert_eq!(total(fleet, "flagrelay_outcomes_applied_total").await, 0.0);
    assert_eq!(
        total(fleet, "flagrelay_outcomes_dead_lettered_total").await,
        0.0
    );
}

/// A TCP forwarder on a port of its own: closed, nothing listens there (connections cut);
/// reopened, it forwards again.
struct PortProxy {
    port: u16,
    upstream: String,
    stop: CancellationToken,
}

impl PortProxy {
    async fn start(upstream: &str) -> Self {
        let p = Self {
            port: free_port(),
            upstream: upstream.to_owned(),
            stop: CancellationToken::new(),
        };
        p.open().await;
        p
    }

    async fn open(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("the proxy's port is free again");
        let (stop, upstream) = (self.stop.clone(), Arc::new(self.upstream.clone()));
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => return,
                    },
                };
                let (stop, upstream) = (stop.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream.as_str()).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
    }

    /// Close the listener and cut every connection.
    fn close(&mut self) {
        self.stop.cancel();
        self.stop = CancellationToken::new();
    }
}

#[tokio::test]
async fn postgres_unreachable_while_running_deactivates_nothing_retries_and_converges_when_it_returns()
 {
    let db = PgDatabase::create("fleet-unreach").await;
    let admin = url::Url::parse(&pg_admin_url()).unwrap();
    let upstream = format!(
        "{}:{}",
        admin.host_str().unwrap_or("127.0.0.1"),
        admin.port().unwrap_or(5432)
    );
    let mut proxy = PortProxy::start(&upstream).await;
    let mut through = url::Url::parse(&db.url).unwrap();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.port)).unwrap();
    let mut fleet = Fleet::start(
        "fleet-unreach",
        &open_breaker(),
        StateStore::Postgres(through.to_string()),
        false,
    )
    .await;
    let users = fleet.seed(TENANT, ORG, "unr", 20);
    fleet.add_worker().await;
    fleet.add_worker().await;

    proxy.close();
    assert_nothing_deactivated_while_down(&fleet, &users).await;

    proxy.open().await;
    assert!(
        until(Duration::from_secs(120), || async {
            fleet.inactive(&users) == users.len()
        })
        .await,
        "every user converges once the store answers: {} of {}",
        fleet.inactive(&users),
        users.len()
    );
    assert_eq!(fleet.deactivations(None), users.len());
    for w in &fleet.workers {
        w.wait_ready().await;
    }
    fleet.stop().await;
    db.drop_now().await;
}

#[tokio::test]
async fn a_dropped_postgres_database_deactivates_nothing_and_readyz_names_the_store() {
    let db = PgDatabase::create("fleet-dropped").await;
    let mut fleet = Fleet::start(
        "fleet-dropped",
        &open_breaker(),
        StateStore::Postgres(db.url.clone()),
        false,
    )
    .await;
    let users = fleet.seed(TENANT, ORG, "drp", 10);
    fleet.add_worker().await;
    db.drop_now().await;
    assert_nothing_deactivated_while_down(&fleet, &users).await;
    fleet.stop().await;
}

#[tokio::test]
async fn a_sqlite_store_overwritten_with_garbage_deactivates_nothing_and_readyz_names_the_store() {
    let mut fleet = Fleet::start("fleet-corrupt", &open_breaker(), StateStore::Sqlite, false).await;
    let users = fleet.seed(TENANT, ORG, "cor", 10);
    fleet.add_worker().await;
    let dir = fleet.sandbox.config.worker.state_dir.clone();
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for file in ["flagrelay.db", "flagrelay.db-wal", "flagrelay.db-shm"] {
        let path = dir.join(file);
        if path.exists() {
            std::fs::write(&path, &garbage).unwrap();
        }
    }
    assert_nothing_deactivated_while_down(&fleet, &users).await;
    fleet.stop().await;
}

#[tokio::test]
async fn postgres_stopped_under_load_deactivates_nothing_while_down_and_everything_converges_after()
{
    let node = PgNode::start().await;
    let url = node.create_database("flagrelay").await;
    let mut fleet = Fleet::start(
        "fleet-pgstop",
        &open_breaker(),
        StateStore::Postgres(url),
        false,
    )
    .await;
    fleet
        .sandbox
        .proofpoint
        .set_latency(Duration::from_millis(5), Duration::from_millis(5));
    let leavers = fleet.seed(TENANT, ORG, "ldv", 120);
    // Users that come back: not active in Proofpoint, enabled in Graph.
    let returning = fleet.seed(TENANT, ORG, "ret", 20);
    for u in &returning {
        let mut pp = fleet.sandbox.proofpoint.user(ORG, &u.address).unwrap();
        pp.is_active = false;
        fleet.sandbox.proofpoint.upsert_user(ORG, pp).unwrap();
    }
    fleet.add_worker().await;
    fleet.add_worker().await;

    let (early, late) = leavers.split_at(40);
    fleet.disable(early).await;
    assert!(
        until(Duration::from_secs(60), || async {
            fleet.deactivations(None) >= 5
        })
        .await,
        "the load is being worked"
    );
    node.stop_immediate();
    assert_readyz_names_the_store(&fleet).await;
    let at_stop = fleet.deactivations(None);
    let retried = total(&fleet, "flagrelay_outcomes_retried_total").await;
    for u in late {
        fleet.sandbox.set_enabled(u, false);
    }
    let mut notified = late.to_vec();
    notified.extend_from_slice(&returning);
    assert_eq!(
        fleet.notify(&notified).await,
        0,
        "the receiver accepts (202) while the store is down"
    );
    assert!(
        until(Duration::from_secs(60), || async {
            total(&fleet, "flagrelay_outcomes_retried_total").await >= retried + 100.0
        })
        .await,
        "the workers retry"
    );
    assert_eq!(
        fleet.deactivations(None),
        at_stop,
        "no deactivation while the breaker's state is unknown"
    );
    assert_eq!(
        total(&fleet, "flagrelay_outcomes_dead_lettered_total").await,
        0.0
    );

    node.start_again();
    let converged = until(Duration::from_secs(180), || async {
        fleet.inactive(&leavers) == leavers.len() && fleet.inactive(&returning) == 0
    })
    .await;
    assert!(
        converged,
        "everything converges after the restart: {}/{} leavers inactive, {}/{} returning active",
        fleet.inactive(&leavers),
        leavers.len(),
        returning.len() - fleet.inactive(&returning),
        returning.len()
    );
    assert_eq!(
        total(&fleet, "flagrelay_outcomes_dead_lettered_total").await,
        0.0
    );
    for w in &fleet.workers {
        w.wait_ready().await;
    }
    fleet.stop().await;
}
