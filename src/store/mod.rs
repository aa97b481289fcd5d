//! The state store: everything safety-critical that must hold across processes, hosts and
//! restarts — per-user state (grace starts, exemptions flagrelay added, the pending recheck),
//! work due at a time, delta links, the blast-radius breaker's counts, trips and held users,
//! identity bindings and the decision history.
//!
//! One trait, [`Store`], two backends behind one SQL implementation ([`sql::SqlStore`]):
//! SQLite, the embedded default (one file under `worker.state_dir`; `run`, `demo` and single
//! hosts need nothing else; several processes on one host share it), and PostgreSQL
//! (`state.url`) for several hosts. Both pass the same conformance suite
//! (`tests/it/store_conformance.rs`). Migrations are embedded in the binary and applied at
//! start; an existing JSON state directory is imported once ([`import`]).
//!
//! Every failure is a [`StoreError`]; callers treat it as "state unknown" and fail closed: the
//! worker retries later and never deactivates without a breaker answer.

pub mod import;
pub mod sql;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::identity::Binding;
use crate::ids::{TenantId, UserId, UserKey};
use crate::policy::breaker::{BreakerConfig, Trip};

pub use sql::SqlStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database did not answer, refused, or failed the statement: retry later.
    #[error("state store ({backend}): {source}")]
    Database {
        backend: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A value in the store cannot be read (never taken as "nothing stored").
    #[error("state store holds an unreadable {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("state store migrations failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("invalid configuration value for `state.url`: {0}")]
    Config(String),
    #[error("importing the JSON state directory {path}: {reason}")]
    Import { path: String, reason: String },
}

/// What flagrelay remembers about one user between evaluations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserState {
    /// First time a worker saw the account with sign-in blocked (cleared when re-enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_since: Option<DateTime<Utc>>,
    /// flagrelay added this user to the sync-exemption list (so it may remove it again).
    #[serde(default)]
    pub exemption_added: bool,
    /// The recheck currently scheduled; rechecks for other times are stale and dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recheck_at: Option<DateTime<Utc>>,
}

/// A user's stored state plus what the breaker holds for it (read-only here: only the
/// breaker's own transactions write it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserRecord {
    pub state: UserState,
    pub held: Option<Held>,
    /// An identity conflict is recorded for this user (listed for the operator).
    pub conflicted: bool,
}

/// A deactivation the breaker holds until an operator releases it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Held {
    pub tenant_id: TenantId,
    pub user_id: UserId,
    pub org: String,
    pub held_at: DateTime<Utc>,
    /// Set by a release: the next attempt goes through without being counted.
    pub approved_at: Option<DateTime<Utc>>,
}

/// One deactivation about to be written, asked of the breaker.
#[derive(Debug, Clone, Copy)]
pub struct Deactivation<'a> {
    pub key: &'a UserKey,
    /// The Proofpoint org domain (lower-case): the org scope counted.
    pub org: &'a str,
    /// Users in the org (the share rule's denominator); 0 when unknown (strictest).
    pub total_users: usize,
    pub config: &'a BreakerConfig,
    pub now: DateTime<Utc>,
}

/// The breaker's answer, decided and recorded in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum BreakerAnswer {
    /// Deactivate. `approved`: an operator's release approved it (not counted).
    Allow { approved: bool },
    /// Do not deactivate; the user is recorded as held. `newly`: this attempt tripped it.
    Held { trip: Trip, newly: bool },
}

/// One scope of the breaker as `breaker status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScopeStatus {
    /// `global`, or an org domain.
    pub scope: String,
    pub trip: Option<Trip>,
    pub released_at: Option<DateTime<Utc>>,
    /// Deactivations counted in the scope's window and in the last 24 h (since a release).
    pub in_window: usize,
    pub in_day: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BreakerReport {
    pub scopes: Vec<ScopeStatus>,
    pub held: Vec<Held>,
}

impl BreakerReport {
    /// The trips in force, broadest first.
    pub fn trips(&self) -> impl Iterator<Item = &Trip> {
        self.scopes.iter().filter_map(|s| s.trip.as_ref())
    }
}

/// What a release did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Release {
    /// The trips cleared, by scope.
    pub released: Vec<Trip>,
    /// Held deactivations approved (they proceed within seconds).
    pub approved: Vec<Held>,
}

/// An identity conflict waiting for an operator (`flagrelay identity show|accept`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConflictRecord {
    pub tenant_id: TenantId,
    pub object_id: UserId,
    pub address: String,
    /// Machine reason (`address_held_by_other`, `address_changed`, `outside_org_domains`, ...).
    pub reason: String,
    /// The other Graph objects involved.
    pub others: Vec<String>,
    /// The human sentence.
    pub detail: String,
    pub seen_at: DateTime<Utc>,
}

/// Work due at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub key: UserKey,
    pub at: DateTime<Utc>,
    pub kind: DueKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueKind {
    /// The user's scheduled recheck (`UserState::recheck_at`).
    Recheck,
    /// Look at the user again now: a released deactivation or an accepted identity.
    Wake,
}

impl DueKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DueKind::Recheck => "recheck",
            DueKind::Wake => "wake",
        }
    }
}

/// One evaluation's result, as `flagrelay history` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub tenant_id: TenantId,
    pub user_id: UserId,
    pub upn: Option<String>,
    pub address: Option<String>,
    /// `notification`, `delta`, `sweep`, `recheck`, `manual`, `redrive`.
    pub origin: String,
    /// `applied`, `no_change`, `skipped`, `held`, `identity_conflict`, `dead_lettered`.
    pub result: String,
    pub action: Option<String>,
    pub rule: Option<String>,
    pub reason: String,
    /// The writes made, one line each (`is_active true → false`, `exemption added`).
    pub writes: Vec<String>,
    pub was_active: Option<bool>,
    pub is_active: Option<bool>,
    pub was_exempt: Option<bool>,
    pub is_exempt: Option<bool>,
    pub dry_run: bool,
    pub latency_ms: Option<i64>,
    pub trace_id: Option<String>,
    /// Which process decided (`host:pid`).
    pub worker: String,
}

/// Which entries `history` returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// An object id, a UPN or a Proofpoint address.
    pub user: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub limit: usize,
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub history: u64,
    pub deactivations: u64,
}

/// The state store. Every method is one transaction; every error means "unknown".
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// `sqlite` or `postgres`, for logs and `/readyz`.
    fn backend(&self) -> &'static str;
    /// Whether the store answers (the readiness probe).
    async fn ping(&self) -> Result<(), StoreError>;

    async fn user(&self, key: &UserKey) -> Result<UserRecord, StoreError>;
    /// Write the user's state (an all-default state removes the row) and keep its recheck in
    /// the due list.
    async fn put_user(
        &self,
        key: &UserKey,
        state: &UserState,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    async fn delta_link(&self, tenant: &TenantId) -> Result<Option<String>, StoreError>;
    async fn put_delta_link(
        &self,
        tenant: &TenantId,
        link: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Ask to deactivate one user: counted and decided atomically across every process.
    async fn attempt_deactivation(
        &self,
        request: &Deactivation<'_>,
    ) -> Result<BreakerAnswer, StoreError>;
    /// The user no longer needs the held deactivation (its decision changed).
    async fn forget_held(&self, key: &UserKey) -> Result<(), StoreError>;
    async fn breaker_report(
        &self,
        config: &BreakerConfig,
        now: DateTime<Utc>,
    ) -> Result<BreakerReport, StoreError>;
    /// Clear the trips of `org` (or every trip), approve the deactivations held for that org
    /// (or all) at this moment, and wake those users. Counting starts afresh from `now`.
    async fn release_breaker(
        &self,
        org: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Release, StoreError>;

    async fn binding_of_object(
        &self,
        tenant: &TenantId,
        object_id: &UserId,
    ) -> Result<Option<Binding>, StoreError>;
    async fn binding_of_address(
        &self,
        tenant: &TenantId,
        address: &str,
    ) -> Result<Option<Binding>, StoreError>;
    /// Record `binding`, replacing any binding of its object or of its address, and clear the
    /// object's conflict.
    async fn bind(&self, binding: &Binding) -> Result<(), StoreError>;
    /// Bindings whose object id or address is `filter` (all when `None`).
    async fn bindings(&self, filter: Option<&str>) -> Result<Vec<Binding>, StoreError>;
    async fn record_conflict(&self, conflict: &ConflictRecord) -> Result<(), StoreError>;
    async fn clear_conflict(&self, key: &UserKey) -> Result<(), StoreError>;
    async fn conflicts(&self) -> Result<Vec<ConflictRecord>, StoreError>;

    /// Look at the user again at `at` (an operator action made it worth it).
    async fn wake(&self, key: &UserKey, at: DateTime<Utc>) -> Result<(), StoreError>;
    /// Due work not queued yet, oldest first.
    async fn due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<Due>, StoreError>;
    /// `due` has been queued: a wake-up is done, a recheck is not queued again (unless the
    /// worker moves it).
    async fn mark_queued(&self, due: &Due, now: DateTime<Utc>) -> Result<(), StoreError>;

    async fn record_history(&self, entries: &[HistoryEntry]) -> Result<(), StoreError>;
    async fn history(&self, query: &HistoryQuery) -> Result<Vec<HistoryEntry>, StoreError>;
    /// Drop history older than `history_before`, and breaker counts no window needs.
    async fn prune(
        &self,
        history_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Pruned, StoreError>;

    async fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;
    async fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError>;
}

/// The store a configuration names: PostgreSQL at `state.url`, else SQLite under
/// `worker.state_dir`; migrated, and the JSON state directory imported if there is one.
pub async fn open(config: &crate::config::Config) -> Result<Arc<dyn Store>, StoreError> {
    let store = match &config.state.url {
        Some(url) => {
            use secrecy::ExposeSecret as _;
            SqlStore::postgres(url.expose_secret(), &config.state).await?
        }
        None => SqlStore::sqlite(&config.worker.state_dir, &config.state).await?,
    };
    import::json_state_dir(&store, &config.worker.state_dir).await?;
    Ok(Arc::new(store))
}
