//! State-store conformance: every behaviour the worker, the leader and the operator commands
//! rely on, checked against both backends (SQLite in a temporary directory, PostgreSQL in a
//! database of the test's own). Each scenario is one generic function over a [`Backend`]; the
//! `conformance!` macro instantiates it as `sqlite::<name>` and `postgres::<name>`.

use std::sync::Arc;

use chrono::{Duration, Utc};
use flagrelay::config::StateConfig;
use flagrelay::ids::UserKey;
use flagrelay::policy::breaker::BreakerConfig;
use flagrelay::store::{BreakerAnswer, Deactivation, SqlStore, Store, UserState};

use crate::support::PgDatabase;

/// One backend under test, plus a way to open another handle on the same data (another
/// process, as far as the store can tell).
struct Backend {
    store: Arc<dyn Store>,
    reopen: Box<dyn Fn() -> futures::future::BoxFuture<'static, Arc<dyn Store>> + Send + Sync>,
    _dir: Option<tempfile::TempDir>,
    pg: Option<PgDatabase>,
}

impl Backend {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let open = move || {
            let path = path.clone();
            Box::pin(async move {
                Arc::new(
                    SqlStore::sqlite(&path, &StateConfig::default())
                        .await
                        .unwrap(),
                ) as Arc<dyn Store>
            }) as futures::future::BoxFuture<'static, Arc<dyn Store>>
        };
        Self {
            store: open().await,
            reopen: Box::new(open),
            _dir: Some(dir),
            pg: None,
        }
    }

    async fn postgres(test: &str) -> Self {
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
            }) as futures::future::BoxFuture<'static, Arc<dyn Store>>
        };
        Self {
            store: open().await,
            reopen: Box::new(open),
            _dir: None,
            pg: Some(db),
        }
    }

    async fn cleanup(self) {
        drop(self.store);
        if let Some(db) = self.pg {
            db.drop_now().await;
        }
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                let b = super::Backend::sqlite().await;
                super::$name(&b).await;
                b.cleanup().await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                let b = super::Backend::postgres(stringify!($name)).await;
                super::$name(&b).await;
                b.cleanup().await;
            })*
        }
    };
}

conformance!(
    user_state_round_trips_under_one_normalized_key,
    the_breaker_counts_across_handles_and_trips_at_the_limit,
);

fn key(tenant: &str, user: &str) -> UserKey {
    UserKey::new(tenant.into(), user.into())
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
