//! [`SqlStore`]: the [`Store`] on SQLite or PostgreSQL through sqlx. Every query is written
//! once in the SQL both dialects share (`$N` parameters, `ON CONFLICT`, times as BIGINT
//! milliseconds); [`on_pool!`] runs it on whichever pool is configured. Only the migrations
//! differ per dialect (`migrations/sqlite`, `migrations/postgres`).
//!
//! Cross-process atomicity: a transaction that must see and change shared counts (the
//! breaker) first updates the `global` row of `breaker_scopes`. On PostgreSQL that takes the
//! row's lock until commit; on SQLite the first write takes the database's write lock (and
//! starts the read snapshot at that point). Either way such transactions run one at a time
//! across every process.

mod breaker;
mod records;

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::{
    BreakerAnswer, BreakerReport, ConflictRecord, Deactivation, Due, DueKind, HistoryEntry,
    HistoryQuery, Pruned, Release, Store, StoreError, UserRecord, UserState,
};
use crate::config::StateConfig;
use crate::identity::Binding;
use crate::ids::{TenantId, UserId, UserKey};
use crate::policy::breaker::BreakerConfig;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("src/store/migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("src/store/migrations/postgres");

/// The SQLite file under `worker.state_dir`.
pub const SQLITE_FILE: &str = "flagrelay.db";

#[derive(Debug, Clone)]
pub(super) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// SQLITE_BUSY or SQLITE_LOCKED: another connection holds the lock for now.
fn sqlite_busy(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("5" | "6")))
}

/// The state store on a SQL database.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pub(super) pool: Pool,
}

/// Run `$body` with `$p` bound to the configured pool (the same code, type-checked for each
/// backend).
macro_rules! on_pool {
    ($store:expr, $p:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}
pub(super) use breaker::GLOBAL;
pub(super) use on_pool;

impl SqlStore {
    /// The embedded store: `flagrelay.db` under `dir` (created), WAL journal so that several
    /// processes on one host share it, every commit synced to disk.
    pub async fn sqlite(dir: &Path, config: &StateConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Config(format!(
                "cannot create the state directory {}: {e}",
                dir.display()
            ))
        })?;
        let options = SqliteConnectOptions::new()
            .filename(dir.join(SQLITE_FILE))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        // Switching a fresh file to WAL needs it to itself: a process starting at the same
        // moment gets SQLITE_BUSY at once (the busy timeout does not cover that switch), so
        // a busy start tries again; any other error (a corrupt file) is final.
        let mut attempts = 0u64;
        let pool = loop {
            let connected = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(config.acquire_timeout)
                .connect_with(options.clone())
                .await;
            match connected {
                Ok(pool) => break pool,
                Err(e) if attempts < 20 && sqlite_busy(&e) => {
                    attempts += 1;
                    tracing::debug!(error = %e, attempts, "SQLite busy at start; again");
                    tokio::time::sleep(Duration::from_millis(25 * attempts)).await;
                }
                Err(source) => {
                    return Err(StoreError::Database {
                        backend: "sqlite",
                        source,
                    });
                }
            }
        };
        let store = Self {
            pool: Pool::Sqlite(pool),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// PostgreSQL at `url` (migrated on the way in; waits up to ~30 s for it to answer).
    pub async fn postgres(url: &str, config: &StateConfig) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("not a PostgreSQL URL: {}", redact(&e))))?
            .application_name("flagrelay")
            .options([("statement_timeout", "15s")]);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .connect_lazy_with(options);
        let store = Self {
            pool: Pool::Postgres(pool),
        };
        let mut wait = Duration::from_millis(200);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match store.answers().await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "state store not reachable yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
        store.migrate().await?;
        Ok(store)
    }

    /// The server answers (before the migrations: the tables may not exist yet).
    async fn answers(&self) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))
            .map_err(|e| self.err(e))
    }

    /// Apply the embedded migrations. PostgreSQL serializes concurrent starts with an
    /// advisory lock; on SQLite a start that lost the race (the other process applied the
    /// migration first) simply runs them again.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut attempts = 0;
        loop {
            let result = match &self.pool {
                Pool::Sqlite(p) => SQLITE_MIGRATIONS.run(p).await,
                Pool::Postgres(p) => POSTGRES_MIGRATIONS.run(p).await,
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if attempts < 5 => {
                    attempts += 1;
                    tracing::debug!(error = %e, attempts, "migrations raced another process; again");
                    tokio::time::sleep(Duration::from_millis(50 * attempts)).await;
                }
                Err(e) => return Err(StoreError::Migrate(e)),
            }
        }
    }

    pub(crate) fn err(&self, source: sqlx::Error) -> StoreError {
        StoreError::Database {
            backend: self.backend(),
            source,
        }
    }

    /// Close the pool (tests that simulate a dead store; shutdown).
    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }
}

/// sqlx's URL errors can quote the URL; keep only what is safe to print.
fn redact(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(inner) => {
            let text = inner.to_string();
            if text.contains("://") {
                "the URL could not be parsed".into()
            } else {
                text
            }
        }
        _ => "the URL could not be parsed".into(),
    }
}

pub(super) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(super) fn time(what: &'static str, ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| StoreError::Corrupt {
        what,
        detail: format!("{ms} is not a time"),
    })
}

pub(super) fn opt_time(
    what: &'static str,
    ms: Option<i64>,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    ms.map(|m| time(what, m)).transpose()
}

/// The key of a user in a JSON state directory (file name = hex SHA-256 of `tenant/user`).
pub fn legacy_key(key: &UserKey) -> String {
    hex::encode(Sha256::digest(key.to_string()))
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Read a row, not `SELECT 1`: that touches no page, so a corrupt SQLite file (or a
        // dropped table) would still pass. The global breaker row is what every
        // deactivation needs, and its trip must parse.
        let trip: Option<(Option<String>,)> = on_pool!(self, p => sqlx::query_as(
            "SELECT trip FROM breaker_scopes WHERE scope = 'global'",
        )
        .fetch_optional(p)
        .await)
        .map_err(|e| self.err(e))?;
        match trip {
            Some((trip,)) => breaker::parse_trip(trip.as_deref()).map(|_| ()),
            None => Err(StoreError::Corrupt {
                what: "breaker scope",
                detail: "the global row is missing".into(),
            }),
        }
    }

    async fn user(&self, key: &UserKey) -> Result<UserRecord, StoreError> {
        // One round trip on the hot path: the user's row, the imported legacy state (only
        // looked at when there is no row) and a held deactivation, by primary keys.
        type Row = (
            Option<i64>,
            Option<i64>,
            Option<bool>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
        );
        let (t, u) = (key.tenant.as_str(), key.user.as_str());
        let legacy_hash = legacy_key(key);
        let (present, disabled, exemption, recheck, legacy, org, held_at, approved, conflict): Row =
            on_pool!(self, p => sqlx::query_as(
                "SELECT u.updated_at, u.disabled_since, u.exemption_added, u.recheck_at, \
                        CASE WHEN u.updated_at IS NULL THEN \
                            (SELECT state FROM legacy_users WHERE key_hash = $3) END, \
                        h.org, h.held_at, h.approved_at, c.seen_at \
                 FROM (SELECT CAST($1 AS TEXT) AS tenant_id, CAST($2 AS TEXT) AS user_id) k \
                 LEFT JOIN users u ON u.tenant_id = k.tenant_id AND u.user_id = k.user_id \
                 LEFT JOIN breaker_held h ON h.tenant_id = k.tenant_id AND h.user_id = k.user_id \
                 LEFT JOIN identity_conflicts c \
                      ON c.tenant_id = k.tenant_id AND c.object_id = k.user_id",
            )
            .bind(t).bind(u).bind(&legacy_hash).fetch_one(p).await)
            .map_err(|e| self.err(e))?;
        let row = present.map(|_| (disabled, exemption.unwrap_or(false), recheck));
        let legacy = legacy.map(|json| (json,));
        let held = match (org, held_at) {
            (Some(org), Some(held_at)) => Some((org, held_at, approved)),
            _ => None,
        };
        let state = match (row, legacy) {
            (Some((disabled, exemption_added, recheck)), _) => UserState {
                disabled_since: opt_time("users.disabled_since", disabled)?,
                exemption_added,
                recheck_at: opt_time("users.recheck_at", recheck)?,
            },
            (None, Some((json,))) => {
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                    what: "imported user state",
                    detail: e.to_string(),
                })?
            }
            (None, None) => UserState::default(),
        };
        let held = match held {
            Some((org, held_at, approved)) => Some(super::Held {
                tenant_id: key.tenant.clone(),
                user_id: key.user.clone(),
                org,
                held_at: time("breaker_held.held_at", held_at)?,
                approved_at: opt_time("breaker_held.approved_at", approved)?,
            }),
            None => None,
        };
        Ok(UserRecord {
            state,
            held,
            conflicted: conflict.is_some(),
        })
    }

    async fn put_user(
        &self,
        key: &UserKey,
        state: &UserState,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (t, u) = (key.tenant.as_str(), key.user.as_str());
        let empty = *state == UserState::default();
        let disabled = state.disabled_since.map(ms);
        let recheck = state.recheck_at.map(ms);
        on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            if empty {
                sqlx::query("DELETE FROM users WHERE tenant_id = $1 AND user_id = $2")
                    .bind(t).bind(u).execute(&mut *tx).await?;
            } else {
                sqlx::query(
                    "INSERT INTO users (tenant_id, user_id, disabled_since, exemption_added, recheck_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (tenant_id, user_id) DO UPDATE SET disabled_since = excluded.disabled_since, \
                     exemption_added = excluded.exemption_added, recheck_at = excluded.recheck_at, \
                     updated_at = excluded.updated_at",
                )
                .bind(t).bind(u).bind(disabled).bind(state.exemption_added).bind(recheck).bind(ms(now))
                .execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM legacy_users WHERE key_hash = $1")
                .bind(legacy_key(key)).execute(&mut *tx).await?;
            match recheck {
                // A moved recheck is due afresh (not queued yet); an unchanged one keeps its mark.
                Some(due) => sqlx::query(
                    "INSERT INTO due (tenant_id, user_id, kind, due_at, queued_at) VALUES ($1, $2, 'recheck', $3, NULL) \
                     ON CONFLICT (tenant_id, user_id, kind) DO UPDATE SET due_at = excluded.due_at, \
                     queued_at = CASE WHEN due.due_at = excluded.due_at THEN due.queued_at ELSE NULL END",
                )
                .bind(t).bind(u).bind(due).execute(&mut *tx).await?,
                None => sqlx::query(
                    "DELETE FROM due WHERE tenant_id = $1 AND user_id = $2 AND kind = 'recheck'",
                )
                .bind(t).bind(u).execute(&mut *tx).await?,
            };
            tx.commit().await
        }.await)
        .map_err(|e| self.err(e))
    }

    async fn delta_link(&self, tenant: &TenantId) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = on_pool!(self, p =>
            sqlx::query_as("SELECT link FROM delta_links WHERE tenant_id = $1")
                .bind(tenant.as_str()).fetch_optional(p).await)
        .map_err(|e| self.err(e))?;
        Ok(row.map(|(l,)| l))
    }

    async fn put_delta_link(
        &self,
        tenant: &TenantId,
        link: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO delta_links (tenant_id, link, saved_at) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant_id) DO UPDATE SET link = excluded.link, saved_at = excluded.saved_at",
        )
        .bind(tenant.as_str()).bind(link).bind(ms(now)).execute(p).await.map(|_| ()))

        .map_err(|e| self.err(e))
    }

    async fn attempt_deactivation(
        &self,
        request: &Deactivation<'_>,
    ) -> Result<BreakerAnswer, StoreError> {
        breaker::attempt(self, request).await
    }

    async fn forget_held(&self, key: &UserKey) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("DELETE FROM breaker_held WHERE tenant_id = $1 AND user_id = $2")
            .bind(key.tenant.as_str()).bind(key.user.as_str()).execute(p).await.map(|_| ()))

        .map_err(|e| self.err(e))
    }

    async fn breaker_report(
        &self,
        config: &BreakerConfig,
        now: DateTime<Utc>,
    ) -> Result<BreakerReport, StoreError> {
        breaker::report(self, config, now).await
    }

    async fn release_breaker(
        &self,
        org: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Release, StoreError> {
        breaker::release(self, org, now).await
    }

    async fn binding_of_object(
        &self,
        tenant: &TenantId,
        object_id: &UserId,
    ) -> Result<Option<Binding>, StoreError> {
        records::binding_where(
            self,
            "tenant_id = $1 AND object_id = $2",
            tenant.as_str(),
            object_id.as_str(),
        )
        .await
    }

    async fn binding_of_address(
        &self,
        tenant: &TenantId,
        address: &str,
    ) -> Result<Option<Binding>, StoreError> {
        let address = address.trim().to_ascii_lowercase();
        records::binding_where(
            self,
            "tenant_id = $1 AND address = $2",
            tenant.as_str(),
            &address,
        )
        .await
    }

    async fn bind(&self, binding: &Binding) -> Result<(), StoreError> {
        records::bind(self, binding).await
    }

    async fn bindings(&self, filter: Option<&str>) -> Result<Vec<Binding>, StoreError> {
        records::bindings(self, filter).await
    }

    async fn record_conflict(&self, conflict: &ConflictRecord) -> Result<(), StoreError> {
        records::record_conflict(self, conflict).await
    }

    async fn clear_conflict(&self, key: &UserKey) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("DELETE FROM identity_conflicts WHERE tenant_id = $1 AND object_id = $2")
            .bind(key.tenant.as_str()).bind(key.user.as_str()).execute(p).await.map(|_| ()))

        .map_err(|e| self.err(e))
    }

    async fn conflicts(&self) -> Result<Vec<ConflictRecord>, StoreError> {
        records::conflicts(self).await
    }

    async fn wake(&self, key: &UserKey, at: DateTime<Utc>) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO due (tenant_id, user_id, kind, due_at, queued_at) VALUES ($1, $2, 'wake', $3, NULL) \
             ON CONFLICT (tenant_id, user_id, kind) DO UPDATE SET due_at = excluded.due_at, queued_at = NULL",
        )
        .bind(key.tenant.as_str()).bind(key.user.as_str()).bind(ms(at)).execute(p).await.map(|_| ()))

        .map_err(|e| self.err(e))
    }

    async fn due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<Due>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<(String, String, String, i64)> = on_pool!(self, p => sqlx::query_as(
            "SELECT tenant_id, user_id, kind, due_at FROM due \
             WHERE due_at <= $1 AND queued_at IS NULL ORDER BY due_at LIMIT $2",
        )
        .bind(ms(now)).bind(limit).fetch_all(p).await)
        .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|(t, u, kind, at)| {
                let kind = match kind.as_str() {
                    "recheck" => DueKind::Recheck,
                    "wake" => DueKind::Wake,
                    other => {
                        return Err(StoreError::Corrupt {
                            what: "due.kind",
                            detail: format!("unknown kind {other:?}"),
                        });
                    }
                };
                Ok(Due {
                    key: UserKey::new(TenantId::new(&t), UserId::new(&u)),
                    at: time("due.due_at", at)?,
                    kind,
                })
            })
            .collect()
    }

    async fn mark_queued(&self, due: &Due, now: DateTime<Utc>) -> Result<(), StoreError> {
        let (t, u, at) = (due.key.tenant.as_str(), due.key.user.as_str(), ms(due.at));
        on_pool!(self, p => match due.kind {
            DueKind::Wake => sqlx::query(
                "DELETE FROM due WHERE tenant_id = $1 AND user_id = $2 AND kind = 'wake' AND due_at = $3",
            )
            .bind(t).bind(u).bind(at).execute(p).await.map(|_| ()),
            DueKind::Recheck => sqlx::query(
                "UPDATE due SET queued_at = $4 WHERE tenant_id = $1 AND user_id = $2 \
                 AND kind = 'recheck' AND due_at = $3",
            )
            .bind(t).bind(u).bind(at).bind(ms(now)).execute(p).await.map(|_| ()),
        })
        .map(|_| ())
        .map_err(|e| self.err(e))
    }

    async fn record_history(&self, entries: &[HistoryEntry]) -> Result<(), StoreError> {
        records::record_history(self, entries).await
    }

    async fn history(&self, query: &HistoryQuery) -> Result<Vec<HistoryEntry>, StoreError> {
        records::history(self, query).await
    }

    async fn prune(
        &self,
        history_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Pruned, StoreError> {
        // Breaker counts older than any window could reach (windows are at most 7 days).
        let counts_before = ms(now) - 8 * 24 * 3600 * 1000;
        let (history, deactivations) = on_pool!(self, p => async {
            let h = sqlx::query("DELETE FROM history WHERE at < $1")
                .bind(ms(history_before)).execute(p).await?.rows_affected();
            let d = sqlx::query("DELETE FROM breaker_deactivations WHERE at < $1")
                .bind(counts_before).execute(p).await?.rows_affected();
            Ok::<_, sqlx::Error>((h, d))
        }.await)
        .map_err(|e| self.err(e))?;
        Ok(Pruned {
            history,
            deactivations,
        })
    }

    async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = on_pool!(self, p =>
            sqlx::query_as("SELECT value FROM meta WHERE key = $1").bind(key).fetch_optional(p).await)
        .map_err(|e| self.err(e))?;
        Ok(row.map(|(v,)| v))
    }

    async fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key).bind(value).execute(p).await.map(|_| ()))

        .map_err(|e| self.err(e))
    }
}
