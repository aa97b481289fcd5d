//! A faithful Microsoft Graph simulator for the parts flagrelay uses: the client-credentials
//! token endpoint (JWT-shaped tokens carrying the app's permissions), `GET /users/{id}`, the
//! user list with the address `$filter` flagrelay's identity check sends, a
//! user's transitive group memberships, mailbox settings (`userPurpose`), subscriptions (with
//! the real validation handshake) and change notifications, delivered with configurable
//! delays, duplicates, drops, reordering, batching and retries.
//!
//! [`GraphSim`] is a cheap-to-clone handle. Tests and the demo drive it through its Rust API;
//! `flagrelay sim` users drive it through the HTTP control API under `/_sim`. Both go through
//! the same methods, so every user change notifies the matching subscriptions either way.
//!
//! # Layout
//! - `mod.rs` (this file): the handle, its state, the Rust control API and the server handle.
//! - `api.rs`: the Graph-facing HTTP API: token endpoint, `/v1.0/users/{id}`, the request gate.
//! - `users.rs`: the user list `/v1.0/users`, narrowed by the `$filter` subset of
//!   `filter.rs` (finding every holder of an address).
//! - `paging.rs`: `$top` / `$skiptoken` paging of directory lists.
//! - `permissions.rs`: application permissions per app, the tokens carrying them, the checks.
//! - `groups.rs`: groups with nested members, `/v1.0/users/{id}/transitiveMemberOf`.
//! - `mailbox.rs`: mailbox purpose per user, `/v1.0/users/{id}/mailboxSettings`.
//! - `batch.rs`: JSON batching, `POST /v1.0/$batch` (up to 20 requests, each served as
//!   if sent alone).
//! - `delta.rs`: the per-tenant change log and `/v1.0/users/delta`.
//! - `delivery.rs`: outbound calls to the subscriber: validation handshake and notification
//!   delivery with the fault settings applied.
//! - `subscriptions.rs`: `/v1.0/subscriptions`, including the validation handshake call.
//! - `control.rs`: the `/_sim` HTTP control API.
//! - `settings.rs`: the fault and service settings.
//!
//! Differences from the real service are deliberate and documented where they are made
//! (e.g. `http://` notification URLs are accepted for local use).

mod api;
mod batch;
mod control;
mod delivery;
mod delta;
mod filter;
mod groups;
mod mailbox;
mod paging;
mod permissions;
mod settings;
mod subscriptions;
#[cfg(test)]
pub(crate) mod tests;
mod users;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::SeedableRng;
use rand::rngs::StdRng;
use secrecy::SecretString;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::graph::{GraphUser, Subscription};

pub use batch::MAX_BATCH_REQUESTS;
pub use delivery::{DeliveryOutcome, DeliveryRecord};
pub use groups::SimGroup;
pub use mailbox::USER_PURPOSES;
pub use permissions::DEFAULT_PERMISSIONS;
#[cfg(test)]
pub(crate) use permissions::base64url;
pub use settings::{GraphSimFaults, GraphSimSettings};

/// The seed [`GraphSim::new`] uses, so that runs are reproducible unless asked otherwise.
pub const DEFAULT_SEED: u64 = 0x6772_6170_6873_696d;

/// Errors of the simulator's control API (Rust and `/_sim`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("unknown tenant {0}")]
    UnknownTenant(String),
    #[error("unknown user {user_id} in tenant {tenant_id}")]
    UnknownUser { tenant_id: String, user_id: String },
    #[error("unknown subscription {subscription_id} in tenant {tenant_id}")]
    UnknownSubscription {
        tenant_id: String,
        subscription_id: String,
    },
    #[error("unknown app registration {0}")]
    UnknownApp(String),
    #[error("unknown group {group_id} in tenant {tenant_id}")]
    UnknownGroup { tenant_id: String, group_id: String },
    #[error("no user or group {member_id} in tenant {tenant_id}")]
    UnknownMember {
        tenant_id: String,
        member_id: String,
    },
    #[error("{member_id} is not a direct member of group {group_id} in tenant {tenant_id}")]
    NotAMember {
        tenant_id: String,
        group_id: String,
        member_id: String,
    },
    #[error("invalid input: {0}")]
    Invalid(String),
}

/// A subscription as the simulator stores it. `Debug` never shows `client_state`.
#[derive(Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimSubscription {
    pub tenant_id: String,
    pub application_id: String,
    pub creator_id: String,
    #[serde(flatten)]
    pub subscription: Subscription,
    #[serde(skip)]
    pub client_state: Option<SecretString>,
}

impl std::fmt::Debug for SimSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSubscription")
            .field("tenant_id", &self.tenant_id)
            .field("application_id", &self.application_id)
            .field("subscription", &self.subscription)
            .field("client_state", &self.client_state.as_ref().map(|_| "***"))
            .finish()
    }
}

/// One HTTP request the simulator served (token endpoint, API and `/_sim` alike).
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The tenant the request was for, when known (token path, or the bearer token's tenant).
    pub tenant: Option<String>,
    pub client_request_id: Option<String>,
    pub status: u16,
    #[serde(skip)]
    pub started: Instant,
    #[serde(skip)]
    pub finished: Instant,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// One of the requests of a `POST /v1.0/$batch` (which is recorded too, after them).
    pub in_batch: bool,
}

/// A cheap-to-clone handle on one simulated Graph service.
#[derive(Clone)]
pub struct GraphSim {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GraphSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("GraphSim")
            .field("apps", &st.apps.len())
            .field("tenants", &st.tenants.len())
            .field("pending_deliveries", &*self.inner.pending.borrow())
            .finish_non_exhaustive()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Outbound client for handshakes and deliveries: no redirects (Graph follows none).
    http: reqwest::Client,
    outbox: mpsc::UnboundedSender<delivery::Outgoing>,
    /// Taken by the dispatcher task when it starts (the first time a runtime is at hand).
    outbox_rx: Mutex<Option<mpsc::UnboundedReceiver<delivery::Outgoing>>>,
    /// Notifications enqueued but not yet finished (delivered, given up or dropped).
    pending: watch::Sender<usize>,
}

struct App {
    secret: SecretString,
    /// Application permissions granted (in every tenant), copied into tokens as `roles`.
    roles: Vec<String>,
}

struct Tenant {
    /// As first given (tenant ids are compared case-insensitively).
    id: String,
    /// Keyed by lower-cased user id.
    users: BTreeMap<String, GraphUser>,
    /// The users' addresses, for `$filter` (kept in step with `users` by every change).
    addresses: filter::AddressIndex,
    subscriptions: BTreeMap<String, SimSubscription>,
    /// Service principal id per app id: the `creatorId` of app-only subscriptions and the
    /// `oid` of the app's tokens.
    service_principals: HashMap<String, String>,
    /// Keyed by lower-cased group id.
    groups: BTreeMap<String, groups::GroupRecord>,
    /// `userPurpose` per lower-cased user id; users not in here have no mailbox.
    mailboxes: HashMap<String, String>,
    next_sequence: u64,
    /// The change log and sync state behind `/users/delta`.
    delta: delta::DeltaLog,
}

impl Tenant {
    /// Forget a deleted user's memberships and mailbox (hard delete, as in Graph).
    fn forget_user(&mut self, user_key: &str) {
        for group in self.groups.values_mut() {
            group.members.remove(user_key);
        }
        self.mailboxes.remove(user_key);
    }
}

struct Grant {
    tenant_key: String,
    app_id: String,
    expires_at: Instant,
    /// The app's permissions when the token was issued (Graph authorizes by the token).
    roles: Vec<String>,
}

struct State {
    /// Keyed by lower-cased client id; an app is valid in every tenant (multi-tenant app).
    apps: HashMap<String, App>,
    /// Keyed by lower-cased tenant id.
    tenants: HashMap<String, Tenant>,
    tokens: HashMap<String, Grant>,
    settings: GraphSimSettings,
    faults: GraphSimFaults,
    rng: StdRng,
    token_requests: u64,
    requests: Vec<RequestRecord>,
    deliveries: Vec<DeliveryRecord>,
    /// Notifications generated so far (drives `duplicate_every`).
    notifications_made: u64,
}

impl State {
    fn tenant_mut(&mut self, tenant_id: &str) -> Result<&mut Tenant, SimError> {
        self.tenants
            .get_mut(&tenant_id.to_ascii_lowercase())
            .ok_or_else(|| SimError::UnknownTenant(tenant_id.to_owned()))
    }
}

/// What happened to a user, for the notification's `changeType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Creation, update and soft delete all arrive as `updated` for users.
    Updated,
    Deleted,
}

impl Default for GraphSim {
    fn default() -> Self {
        Self::new()
    }
}

impl GraphSim {
    /// An empty simulator (no apps, no tenants) seeded with [`DEFAULT_SEED`].
    pub fn new() -> Self {
        Self::with_seed(DEFAULT_SEED)
    }

    pub fn with_seed(seed: u64) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    apps: HashMap::new(),
                    tenants: HashMap::new(),
                    tokens: HashMap::new(),
                    settings: GraphSimSettings::default(),
                    faults: GraphSimFaults::default(),
                    rng: StdRng::seed_from_u64(seed),
                    token_requests: 0,
                    requests: Vec::new(),
                    deliveries: Vec::new(),
                    notifications_made: 0,
                }),
                http,
                outbox: tx,
                outbox_rx: Mutex::new(Some(rx)),
                pending: watch::Sender::new(0),
            }),
        }
    }

    /// The state lock. Never held across an `.await`; a panic while holding it cannot leave
    /// the maps half-updated in a way that matters to a simulator, so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Register a multi-tenant app registration, valid in every tenant, granted
    /// [`DEFAULT_PERMISSIONS`] (`User.Read.All`); see [`GraphSim::set_app_permissions`].
    /// Adding an app again changes its secret and keeps its permissions.
    pub fn add_app(&self, client_id: &str, client_secret: &str) {
        self.state()
            .apps
            .entry(client_id.to_ascii_lowercase())
            .and_modify(|app| app.secret = SecretString::from(client_secret))
            .or_insert_with(|| App::with_default_permissions(client_secret));
    }

    /// Add a tenant (idempotent).
    pub fn add_tenant(&self, tenant_id: &str) {
        self.state()
            .tenants
            .entry(tenant_id.to_ascii_lowercase())
            .or_insert_with(|| Tenant {
                id: tenant_id.to_owned(),
                users: BTreeMap::new(),
                addresses: filter::AddressIndex::default(),
                subscriptions: BTreeMap::new(),
                service_principals: HashMap::new(),
                groups: BTreeMap::new(),
                mailboxes: HashMap::new(),
                next_sequence: 1,
                delta: delta::DeltaLog::default(),
            });
    }

    pub fn settings(&self) -> GraphSimSettings {
        self.state().settings.clone()
    }

    pub fn update_settings(&self, f: impl FnOnce(&mut GraphSimSettings)) {
        f(&mut self.state().settings);
    }

    pub fn faults(&self) -> GraphSimFaults {
        self.state().faults.clone()
    }

    /// Replace all fault settings (validated; `seed`, when given, re-seeds the generator).
    pub fn set_faults(&self, faults: GraphSimFaults) -> Result<(), SimError> {
        faults.validate()?;
        let mut st = self.state();
        if let Some(seed) = faults.seed {
            st.rng = StdRng::seed_from_u64(seed);
        }
        st.faults = faults;
        Ok(())
    }

    /// Change some fault settings in place.
    pub fn update_faults(&self, f: impl FnOnce(&mut GraphSimFaults)) -> Result<(), SimError> {
        let mut faults = self.faults();
        f(&mut faults);
        self.set_faults(faults)
    }

    /// The next `n` API requests get 429, with `Retry-After: retry_after_secs` when given.
    pub fn throttle_next(&self, n: u32, retry_after_secs: Option<u64>) {
        let mut st = self.state();
        st.faults.throttle_next = n;
        st.faults.throttle_retry_after_secs = retry_after_secs;
    }

    /// The next `n` API requests fail with `status` (400..=599).
    pub fn fail_next(&self, n: u32, status: u16) -> Result<(), SimError> {
        self.update_faults(|f| {
            f.fail_next = n;
            f.fail_status = status;
        })
    }

    /// Invalidate every issued access token (as a revocation would): the next API call with
    /// one gets 401 `InvalidAuthenticationToken`.
    pub fn revoke_tokens(&self) {
        self.state().tokens.clear();
    }

    /// Create or replace a user; notifies `updated` (Graph reports creation as an update).
    pub fn upsert_user(&self, tenant_id: &str, user: GraphUser) -> Result<(), SimError> {
        if user.id.trim().is_empty() {
            return Err(SimError::Invalid("user id must not be empty".into()));
        }
        let mut st = self.state();
        let tenant = st.tenant_mut(tenant_id)?;
        let user_id = user.id.clone();
        if tenant.groups.contains_key(&user_id.to_ascii_lowercase()) {
            return Err(SimError::Invalid(format!(
                "{user_id} is already a group's id (directory object ids are unique)"
            )));
        }
        let key = user_id.to_ascii_lowercase();
        let before = tenant.users.insert(key.clone(), user.clone());
        tenant.addresses.replace(&key, before.as_ref(), Some(&user));
        tenant
            .delta
            .record_update(&key, &user_id, before.as_ref(), &user);
        self.notify(&mut st, tenant_id, &user_id, Change::Updated);
        Ok(())
    }

    pub fn set_account_enabled(
        &self,
        tenant_id: &str,
        user_id: &str,
        enabled: bool,
    ) -> Result<(), SimError> {
        self.update_user(tenant_id, user_id, |u| u.account_enabled = Some(enabled))
            .map(|_| ())
    }

    /// Change a user in place (the id cannot change) and notify `updated`. Returns the user
    /// as it is afterwards.
    pub fn update_user(
        &self,
        tenant_id: &str,
        user_id: &str,
        f: impl FnOnce(&mut GraphUser),
    ) -> Result<GraphUser, SimError> {
        let mut st = self.state();
        let tenant = st.tenant_mut(tenant_id)?;
        let unknown = || SimError::UnknownUser {
            tenant_id: tenant_id.to_owned(),
            user_id: user_id.to_owned(),
        };
        let key = user_id.to_ascii_lowercase();
        let user = tenant.users.get_mut(&key).ok_or_else(unknown)?;
        let before = user.clone();
        let id = user.id.clone();
        f(user);
        user.id = id.clone();
        let after = user.clone();
        tenant.addresses.replace(&key, Some(&before), Some(&after));
        tenant.delta.record_update(&key, &id, Some(&before), &after);
        self.notify(&mut st, tenant_id, &id, Change::Updated);
        Ok(after)
    }

    /// Hard-delete a user and notify `deleted`.
    pub fn delete_user(&self, tenant_id: &str, user_id: &str) -> Result<(), SimError> {
        let mut st = self.state();
        let tenant = st.tenant_mut(tenant_id)?;
        let key = user_id.to_ascii_lowercase();
        let removed = tenant
            .users
            .remove(&key)
            .ok_or_else(|| SimError::UnknownUser {
                tenant_id: tenant_id.to_owned(),
                user_id: user_id.to_owned(),
            })?;
        tenant.addresses.replace(&key, Some(&removed), None);
        tenant.forget_user(&key);
        tenant
            .delta
            .record_removal(&key, &removed.id, delta::HARD_DELETE);
        self.notify(&mut st, tenant_id, &removed.id, Change::Deleted);
        Ok(())
    }

    /// Soft-delete a user (move it to "deleted items"): it leaves `GET /users` (404), its
    /// memberships and mailbox are forgotten as for a hard delete, delta reports it as
    /// removed with reason `changed`, and subscriptions are notified `updated` (Graph
    /// reports soft deletes as updates). Restore by upserting the user again.
    pub fn soft_delete_user(&self, tenant_id: &str, user_id: &str) -> Result<(), SimError> {
        let mut st = self.state();
        let tenant = st.tenant_mut(tenant_id)?;
        let key = user_id.to_ascii_lowercase();
        let removed = tenant
            .users
            .remove(&key)
            .ok_or_else(|| SimError::UnknownUser {
                tenant_id: tenant_id.to_owned(),
                user_id: user_id.to_owned(),
            })?;
        tenant.addresses.replace(&key, Some(&removed), None);
        tenant.forget_user(&key);
        tenant
            .delta
            .record_removal(&key, &removed.id, delta::SOFT_DELETE);
        self.notify(&mut st, tenant_id, &removed.id, Change::Updated);
        Ok(())
    }

    /// Invalidate every delta and skip token of the tenant (as if they had outlived
    /// [`GraphSimSettings::delta_token_lifetime`]): calling an old link gets
    /// `syncStateNotFound`.
    pub fn expire_delta_tokens(&self, tenant_id: &str) -> Result<(), SimError> {
        self.state().tenant_mut(tenant_id)?.delta.expire_all();
        Ok(())
    }

    pub fn user(&self, tenant_id: &str, user_id: &str) -> Option<GraphUser> {
        let st = self.state();
        st.tenants
            .get(&tenant_id.to_ascii_lowercase())?
            .users
            .get(&user_id.to_ascii_lowercase())
            .cloned()
    }

    pub fn users(&self, tenant_id: &str) -> Result<Vec<GraphUser>, SimError> {
        let mut st = self.state();
        Ok(st.tenant_mut(tenant_id)?.users.values().cloned().collect())
    }

    /// The tenant's subscriptions, all apps, including expired ones not yet removed.
    pub fn subscriptions(&self, tenant_id: &str) -> Vec<SimSubscription> {
        let st = self.state();
        st.tenants
            .get(&tenant_id.to_ascii_lowercase())
            .map(|t| t.subscriptions.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every delivery attempt (and every dropped notification), oldest first.
    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        self.state().deliveries.clone()
    }

    /// Every request served, oldest first.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.state().requests.clone()
    }

    /// Requests to the token endpoint so far (successful or not).
    pub fn token_requests(&self) -> u64 {
        self.state().token_requests
    }

    /// Notifications enqueued but not yet delivered, given up on, or dropped.
    pub fn pending_deliveries(&self) -> usize {
        *self.inner.pending.borrow()
    }

    /// Wait until every enqueued notification has been delivered, given up on, or dropped.
    /// Returns `false` when `timeout` passed first.
    #[must_use = "false means deliveries were still pending"]
    pub async fn settle(&self, timeout: Duration) -> bool {
        self.ensure_dispatcher();
        let mut rx = self.inner.pending.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The simulator's whole HTTP surface: Graph API, token endpoint and `/_sim` control.
    pub fn router(&self) -> axum::Router {
        self.ensure_dispatcher();
        api::routes()
            .merge(control::routes())
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                api::log_request,
            ))
            .with_state(self.clone())
    }

    /// Serve [`GraphSim::router`] on `listener` in a background task until the returned
    /// handle is dropped or shut down.
    pub async fn spawn(&self, listener: tokio::net::TcpListener) -> std::io::Result<SimServer> {
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let router = self.router();
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "graph simulator server stopped with an error");
            }
        });
        tracing::info!(%addr, "graph simulator listening");
        Ok(SimServer {
            addr,
            cancel,
            task: Some(task),
        })
    }

    /// Start the delivery dispatcher once a tokio runtime is at hand. Notifications made
    /// before that wait in the channel.
    fn ensure_dispatcher(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let rx = self
            .inner
            .outbox_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            handle.spawn(delivery::dispatch(Arc::downgrade(&self.inner), rx));
        }
    }

    fn from_weak(weak: &Weak<Inner>) -> Option<Self> {
        weak.upgrade().map(|inner| Self { inner })
    }

    /// Enqueue a notification for every live subscription of the tenant that covers the
    /// user and the change. Called with the state lock held, right after the change.
    fn notify(&self, st: &mut State, tenant_id: &str, user_id: &str, change: Change) {
        let outgoing = delivery::notifications_for(st, tenant_id, user_id, change);
        self.enqueue(outgoing);
    }

    fn enqueue(&self, outgoing: Vec<delivery::Outgoing>) {
        if outgoing.is_empty() {
            return;
        }
        self.inner.pending.send_modify(|n| *n += outgoing.len());
        for item in outgoing {
            // The receiver lives in `Inner` until the dispatcher takes it, and the dispatcher
            // only stops once every sender is gone: sending cannot fail while `self` exists.
            let _ = self.inner.outbox.send(item);
        }
        self.ensure_dispatcher();
    }

    /// Send a `reauthorizationRequired` lifecycle notification to the subscription's
    /// `lifecycleNotificationUrl` (the only lifecycle event Graph sends for users).
    pub fn request_reauthorization(
        &self,
        tenant_id: &str,
        subscription_id: &str,
    ) -> Result<(), SimError> {
        let outgoing =
            delivery::reauthorization_required(&mut self.state(), tenant_id, subscription_id)?;
        self.enqueue(vec![outgoing]);
        Ok(())
    }

    /// Mark `n` enqueued notifications as finished.
    fn finish_pending(&self, n: usize) {
        self.inner.pending.send_modify(|p| *p = p.saturating_sub(n));
    }
}

/// A running simulator server. Dropping it stops the server.
#[derive(Debug)]
pub struct SimServer {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of the server, e.g. `http://127.0.0.1:PORT/`.
    pub fn base_url(&self) -> Url {
        // A socket address always forms a valid http URL.
        Url::parse(&format!("http://{}/", self.addr)).expect("socket address URL")
    }

    /// What to configure as `graph.authority_url`.
    pub fn authority_url(&self) -> Url {
        self.base_url()
    }

    /// What to configure as `graph.api_url`.
    pub fn api_url(&self) -> Url {
        self.base_url().join("v1.0").expect("static relative URL")
    }

    /// Stop accepting connections and wait (briefly) for the server task to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
