//! State-store conformance: every behaviour the worker, the leader and the operator commands
//! rely on, checked against both backends (SQLite in a temporary directory, PostgreSQL in a
//! database of the test's own). Each scenario is one generic function over a [`Backend`]; the
//! `conformance!` macro instantiates it as `sqlite::<name>` and `postgres::<name>`.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use flagrelay::config::StateConfig;
use flagrelay::ids::{TenantId, UserKey};
use flagrelay::policy::breaker::BreakerConfig;
use flagrelay::store::{BreakerAnswer, Deactivation, SqlStore, Store, UserState};
use futures::future::BoxFuture;

use crate::support::PgDatabase;

/// One backend under test, plus a way to open another handle on the same data (another
/// process, as far as the store can tell).
pub(crate) struct Backend {
    pub store: Arc<dyn Store>,
    pub reopen: Box<dyn Fn() -> BoxFuture<'static, Arc<dyn Store>> + Send + Sync>,
    /// The SQLite file or the PostgreSQL URL, for [`Backend::execute`].
    at: Location,
    _dir: Option<tempfile::TempDir>,
    pg: Option<PgDatabase>,
}

enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Backend {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let file = path.join(flagrelay::store::sql::SQLITE_FILE);
        let open = move || {
            let path = path.clone();
            Box::pin(async move {
                Arc::new(
                    SqlStore::sqlite(&path, &StateConfig::default())
                        .await
                        .unwrap(),
                ) as Arc<dyn Store>
            }) as BoxFuture<'static, Arc<dyn Store>>
        };
        Self {
            store: open().await,
            reopen: Box::new(open),
            at: Location::Sqlite(file),
            _dir: Some(dir),
            pg: None,
        }
    }

    pub async fn postgres(test: &str) -> Self {
        let db = PgDatabase::create(test).await;
        let url = db.url.clone();
        let open = move || {
            let url = url.clone();
            Box::pin(async move {
                Arc::new(
                    SqlStore::postgres(&url, &StateConfig::default())
                        .await
                        .unwrap(),
                ) as Arc<dyn Store>
            }) as BoxFuture<'static, Arc<dyn Store>>
        };
        Self {
            store: open().await,
            reopen: Box::new(open),
            at: Location::Postgres(db.url.clone()),
            _dir: None,
            pg: Some(db),
        }
    }

    /// Run one statement on the database behind the store, as an outsider (to damage a
    /// value the way a bad restore or a manual edit would).
    pub async fn execute(&self, sql: &str) {
        use sqlx::Connection as _;
        match &self.at {
            Location::Sqlite(file) => {
                let url = format!("sqlite://{}", file.display());
                let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::query(sql).execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
            Location::Postgres(url) => {
                let mut c = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::query(sql).execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
        }
    }

    async fn cleanup(self) {
        drop(self.store);
        if let Some(db) = self.pg {
            db.drop_now().await;
        }
    }
}

/// Instantiate each scenario `$name` (a function in the invoking module) on both backends,
/// as `sqlite::$name` and `postgres::$name`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let b = $crate::store_conformance::Backend::sqlite().await;
                super::$name(&b).await;
                b.cleanup().await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let b = $crate::store_conformance::Backend::postgres(stringify!($name)).await;
                super::$name(&b).await;
                b.cleanup().await;
            })*
        }
    };
}

mod breaker;
mod records;

conformance!(
    user_state_round_trips_under_one_normalized_key,
    the_breaker_counts_across_handles_and_trips_at_the_limit,
    delta_links_round_trip_per_tenant_under_normalized_ids,
    meta_round_trips_and_overwrites,
    reopening_migrates_again_and_keeps_every_row,
);

fn key(tenant: &str, user: &str) -> UserKey {
    UserKey::new(tenant.into(), user.into())
}

/// The `n`th user of tenant `t` (an object id).
fn user(n: usize) -> UserKey {
    key("t", &format!("bbbb0000-0000-4000-8000-{n:012}"))
}

fn ask<'a>(
    k: &'a UserKey,
    org: &'a str,
    config: &'a BreakerConfig,
    now: DateTime<Utc>,
) -> Deactivation<'a> {
    Deactivation {
        key: k,
        org,
        total_users: 1000,
        config,
        now,
    }
}

/// `t` as the store keeps it (milliseconds).
fn to_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap()
}

async fn user_state_round_trips_under_one_normalized_key(b: &Backend) {
    let s = b.store.as_ref();
    let now = Utc::now();
    let state = UserState {
        disabled_since: Some(now - Duration::hours(1)),
        exemption_added: true,
        recheck_at: Some(now + Duration::hours(2)),
    };
    s.put_user(
        &key("T-1", "AAAA0000-0000-4000-8000-000000000001"),
        &state,
        now,
    )
    .await
    .unwrap();
    let read = s
        .user(&key("t-1", "aaaa0000-0000-4000-8000-000000000001"))
        .await
        .unwrap();
    // Times are kept to the millisecond.
    assert_eq!(
        read.state.disabled_since.map(|t| t.timestamp_millis()),
        state.disabled_since.map(|t| t.timestamp_millis())
    );
    assert!(read.state.exemption_added);
    let other = (b.reopen)().await;
    assert!(
        other
            .user(&key("t-1", "aaaa0000-0000-4000-8000-000000000001"))
            .await
            .unwrap()
            .state
            .exemption_added,
        "another handle (process) reads the same row"
    );
    s.put_user(
        &key("t-1", "aaaa0000-0000-4000-8000-000000000001"),
        &UserState::default(),
        now,
    )
    .await
    .unwrap();
    assert_eq!(
        s.user(&key("t-1", "aaaa0000-0000-4000-8000-000000000001"))
            .await
            .unwrap()
            .state,
        UserState::default()
    );
}

async fn the_breaker_counts_across_handles_and_trips_at_the_limit(b: &Backend) {
    let config = BreakerConfig {
        max_deactivations: 3,
        max_share: 1.0,
        ..BreakerConfig::default()
    };
    let handles = [b.store.clone(), (b.reopen)().await, (b.reopen)().await];
    let now = Utc::now();
    let mut allowed = 0;
    let mut tripped = 0;
    for i in 0..10 {
        let k = key("t", &format!("bbbb0000-0000-4000-8000-{i:012}"));
        let ask = Deactivation {
            key: &k,
            org: "contoso.test",
            total_users: 1000,
            config: &config,
            now,
        };
        match handles[i % 3].attempt_deactivation(&ask).await.unwrap() {
            BreakerAnswer::Allow { approved: false } => allowed += 1,
            BreakerAnswer::Held { newly, trip } => {
                assert_eq!(trip.scope, "contoso.test");
                tripped += usize::from(newly);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((allowed, tripped), (3, 1));
    let report = b.store.breaker_report(&config, now).await.unwrap();
    assert_eq!(report.held.len(), 7, "{report:?}");
}

async fn delta_links_round_trip_per_tenant_under_normalized_ids(b: &Backend) {
    let s = b.store.as_ref();
    let now = Utc::now();
    let (one, two) = (TenantId::new("Tenant-ONE"), TenantId::new("tenant-two"));
    assert_eq!(s.delta_link(&one).await.unwrap(), None);
    s.put_delta_link(&one, "https://graph.test/delta?token=1", now)
        .await
        .unwrap();
    s.put_delta_link(&two, "https://graph.test/delta?token=A", now)
        .await
        .unwrap();
    assert_eq!(
        s.delta_link(&TenantId::new(" tenant-one "))
            .await
            .unwrap()
            .as_deref(),
        Some("https://graph.test/delta?token=1"),
        "one tenant, however it was spelled"
    );
    s.put_delta_link(
        &TenantId::new("TENANT-ONE"),
        "https://graph.test/delta?token=2",
        now,
    )
    .await
    .unwrap();
    let other = (b.reopen)().await;
    assert_eq!(
        other.delta_link(&one).await.unwrap().as_deref(),
        Some("https://graph.test/delta?token=2"),
        "the newer link replaces the older, seen by another handle"
    );
    assert_eq!(
        other.delta_link(&two).await.unwrap().as_deref(),
        Some("https://graph.test/delta?token=A"),
        "the other tenant's link is its own"
    );
}

async fn meta_round_trips_and_overwrites(b: &Backend) {
    let s = b.store.as_ref();
    assert_eq!(s.meta("conformance:key").await.unwrap(), None);
    s.put_meta("conformance:key", "one").await.unwrap();
    s.put_meta("conformance:other", "x").await.unwrap();
    s.put_meta("conformance:key", "two").await.unwrap();
    assert_eq!(
        s.meta("conformance:key").await.unwrap().as_deref(),
        Some("two")
    );
    assert_eq!(
        (b.reopen)()
            .await
            .meta("conformance:other")
            .await
            .unwrap()
            .as_deref(),
        Some("x")
    );
}

/// Every start applies the migrations again: nothing fails and nothing is lost.
async fn reopening_migrates_again_and_keeps_every_row(b: &Backend) {
    let now = Utc::now();
    let config = BreakerConfig {
        max_deactivations: 1,
        max_share: 1.0,
        ..BreakerConfig::default()
    };
    b.store.put_meta("kept", "yes").await.unwrap();
    b.store
        .put_user(
            &user(1),
            &UserState {
                exemption_added: true,
                ..UserState::default()
            },
            now,
        )
        .await
        .unwrap();
    for i in 0..2 {
        let k = user(10 + i);
        b.store
            .attempt_deactivation(&ask(&k, "contoso.test", &config, now))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let again = (b.reopen)().await;
        assert_eq!(again.meta("kept").await.unwrap().as_deref(), Some("yes"));
        assert!(again.user(&user(1)).await.unwrap().state.exemption_added);
        let report = again.breaker_report(&config, now).await.unwrap();
        assert_eq!(report.trips().count(), 1, "{report:?}");
        assert_eq!(report.held.len(), 1, "{report:?}");
    }
}

/// Several processes starting at once on a fresh PostgreSQL database: every one migrates
/// (or waits for the one that does) and opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_opens_at_once_on_a_fresh_database_all_succeed() {
    let db = PgDatabase::create("concurrent_open").await;
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { SqlStore::postgres(&url, &StateConfig::default()).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap().expect("every concurrent open succeeds"));
    }
    for (i, s) in stores.iter().enumerate() {
        s.put_meta(&format!("opened:{i}"), "yes").await.unwrap();
    }
    for s in &stores {
        for i in 0..stores.len() {
            assert!(s.meta(&format!("opened:{i}")).await.unwrap().is_some());
        }
        s.close().await;
    }
    drop(stores);
    db.drop_now().await;
}

/// The same on SQLite: several processes starting at once on a fresh state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_opens_at_once_on_a_fresh_file_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let path = dir.path().to_owned();
            tokio::spawn(async move { SqlStore::sqlite(&path, &StateConfig::default()).await })
        })
        .collect();
    for open in opens {
        let s = open.await.unwrap().expect("every concurrent open succeeds");
        s.put_meta("opened", "yes").await.unwrap();
        s.close().await;
    }
}

/// A SQLite file that is not a database (a bad restore, a disk fault) is an error, never
/// a fresh store without the trip it held.
#[tokio::test]
async fn a_corrupt_sqlite_file_is_an_error_not_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = BreakerConfig {
        max_deactivations: 1,
        max_share: 1.0,
        ..BreakerConfig::default()
    };
    let now = Utc::now();
    let store = SqlStore::sqlite(dir.path(), &StateConfig::default())
        .await
        .unwrap();
    for i in 0..2 {
        let k = user(i);
        store
            .attempt_deactivation(&ask(&k, "contoso.test", &config, now))
            .await
            .unwrap();
    }
    store.close().await;
    drop(store);
    let file = dir.path().join(flagrelay::store::sql::SQLITE_FILE);
    // SQLite's last close checkpoints the log into the file and deletes it, on sqlx's
    // connection threads, after `close` returned: wait for that, or it would write valid
    // pages over the garbage below.
    let wal = dir
        .path()
        .join(format!("{}-wal", flagrelay::store::sql::SQLITE_FILE));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while wal.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let len = std::fs::metadata(&file).unwrap().len() as usize;
    let garbage: Vec<u8> = (0..len.max(4096)).map(|i| (i * 7 + 13) as u8).collect();
    std::fs::write(&file, garbage).unwrap();
    // A bad restore brings the main file alone: without this, SQLite may read every page
    // (header included) from a write-ahead log the closed pool left behind.
    for suffix in ["-wal", "-shm"] {
        let side = dir
            .path()
            .join(format!("{}{suffix}", flagrelay::store::sql::SQLITE_FILE));
        let _ = std::fs::remove_file(side);
    }

    match SqlStore::sqlite(dir.path(), &StateConfig::default()).await {
        Err(e) => assert!(
            matches!(
                e,
                flagrelay::store::StoreError::Database { .. }
                    | flagrelay::store::StoreError::Migrate(_)
            ),
            "{e}"
        ),
        Ok(opened) => {
            let k = user(5);
            let answer = opened
                .attempt_deactivation(&ask(&k, "contoso.test", &config, now))
                .await;
            panic!("a garbage file opened as a store; a deactivation got {answer:?}");
        }
    }
}
