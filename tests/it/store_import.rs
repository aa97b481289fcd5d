//! The one-time import of a JSON `worker.state_dir` (flagrelay before the state store),
//! through the real entry point `store::open(config)`, on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use flagrelay::config::Config;
use flagrelay::ids::{TenantId, UserKey};
use flagrelay::policy::breaker::BreakerConfig;
use flagrelay::store::{self, BreakerAnswer, Deactivation, UserState};
use sha2::{Digest, Sha256};

use crate::support::PgDatabase;

const TENANT: &str = "Tenant-Legacy";
const USER: &str = "DDDD0000-0000-4000-8000-000000000001";
const LINK: &str = "https://graph.test/v1.0/users/delta?$deltatoken=legacy-1";

fn legacy_key() -> UserKey {
    UserKey::new(TENANT.into(), USER.into())
}

/// The state the legacy file holds for [`legacy_key`].
fn legacy_state() -> UserState {
    UserState {
        disabled_since: DateTime::from_timestamp_millis(1_700_000_000_000),
        exemption_added: true,
        recheck_at: DateTime::from_timestamp_millis(1_900_000_000_000),
    }
}

/// Write a JSON state directory the way the old flagrelay did: `users/<xx>/<sha256 of
/// tenant/user>.json`, `delta/<tenant>.json`, `breaker.json` (a trip of the old
/// per-process breaker: no scope, `in_window`).
fn write_legacy_dir(dir: &Path) -> PathBuf {
    let hash = hex::encode(Sha256::digest(
        format!("{}/{}", TENANT.to_lowercase(), USER.to_lowercase()).as_bytes(),
    ));
    let user_dir = dir.join("users").join(&hash[..2]);
    std::fs::create_dir_all(&user_dir).unwrap();
    let user_file = user_dir.join(format!("{hash}.json"));
    std::fs::write(
        &user_file,
        serde_json::to_vec_pretty(&legacy_state()).unwrap(),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("delta")).unwrap();
    std::fs::write(
        dir.join("delta").join("tenant-legacy.json"),
        serde_json::json!({ "tenant_id": TENANT, "delta_link": LINK }).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("breaker.json"),
        serde_json::json!({
            "tripped": {
                "at": "2024-05-01T10:00:00Z",
                "in_window": 25,
                "limit": 25,
                "total_users": 400,
                "reason": "25 deactivations within the last 1h"
            }
        })
        .to_string(),
    )
    .unwrap();
    user_file
}

/// Every file under `dir` except the SQLite store's own, byte for byte.
fn json_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "json") {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

async fn import_once(config: Config) {
    let dir = config.worker.state_dir.clone();
    let user_file = write_legacy_dir(&dir);
    let before = json_files(&dir);
    assert_eq!(before.len(), 3);

    let s = store::open(&config).await.unwrap();
    let record = s.user(&legacy_key()).await.unwrap();
    assert_eq!(record.state, legacy_state(), "the user's state is imported");
    assert_eq!(
        s.delta_link(&TenantId::new(TENANT))
            .await
            .unwrap()
            .as_deref(),
        Some(LINK)
    );
    let breaker = BreakerConfig::default();
    let now = Utc::now();
    let report = s.breaker_report(&breaker, now).await.unwrap();
    let trips: Vec<_> = report.trips().collect();
    assert_eq!(trips.len(), 1, "{report:?}");
    assert_eq!((trips[0].scope.as_str(), trips[0].counted), ("global", 25));
    // The imported trip holds a deactivation in any org.
    let k = UserKey::new(TENANT.into(), "dddd0000-0000-4000-8000-000000000002".into());
    let answer = s
        .attempt_deactivation(&Deactivation {
            key: &k,
            org: "contoso.test",
            total_users: 1000,
            config: &breaker,
            now,
        })
        .await
        .unwrap();
    match answer {
        BreakerAnswer::Held { trip, newly: false } => assert_eq!(trip.scope, "global"),
        other => panic!("the imported trip holds: {other:?}"),
    }
    assert_eq!(
        json_files(&dir),
        before,
        "the JSON files are left untouched"
    );

    // Operator releases; the JSON changes (or is restored from an old backup) afterwards.
    s.release_breaker(None, now).await.unwrap();
    drop(s);
    std::fs::write(
        &user_file,
        serde_json::to_vec(&UserState::default()).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("delta").join("tenant-legacy.json"),
        serde_json::json!({ "tenant_id": TENANT, "delta_link": "https://graph.test/other" })
            .to_string(),
    )
    .unwrap();

    let again = store::open(&config).await.unwrap();
    assert_eq!(
        again.user(&legacy_key()).await.unwrap().state,
        legacy_state(),
        "a second start does not import again"
    );
    assert_eq!(
        again
            .delta_link(&TenantId::new(TENANT))
            .await
            .unwrap()
            .as_deref(),
        Some(LINK)
    );
    let report = again.breaker_report(&breaker, now).await.unwrap();
    assert_eq!(
        report.trips().count(),
        0,
        "the released trip stays released"
    );

    // The user's first write replaces the imported state.
    let fresh = UserState {
        exemption_added: true,
        ..UserState::default()
    };
    again.put_user(&legacy_key(), &fresh, now).await.unwrap();
    assert_eq!(again.user(&legacy_key()).await.unwrap().state, fresh);
}

#[tokio::test]
async fn a_json_state_dir_is_imported_once_into_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.worker.state_dir = dir.path().join("state");
    std::fs::create_dir_all(&config.worker.state_dir).unwrap();
    import_once(config).await;
}

#[tokio::test]
async fn a_json_state_dir_is_imported_once_into_postgres() {
    let db = PgDatabase::create("json_import").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.worker.state_dir = dir.path().to_owned();
    config.state.url = Some(db.url.clone().into());
    import_once(config).await;
    db.drop_now().await;
}
