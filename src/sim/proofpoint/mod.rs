//! A faithful Proofpoint Essentials API v1 simulator: orgs, users, Azure sync settings and
//! exemptions, with the real service's auth rules (`X-User`/`X-Password`; 401/403/404),
//! whole-object PUT in both readings of the UNDOCUMENTED semantics, license capping, fault
//! injection, and records (request log, writes) for tests and the demo.
//!
//! [`ProofpointSim`] is a cheap-to-clone handle; [`ProofpointSim::spawn`] serves it on a
//! listener (port 0 in tests) at `http://127.0.0.1:PORT/api/v1`. Control routes under
//! `/_sim` (state dump, user upsert, faults) carry no auth: bind the simulator to loopback.
//!
//! Layout: `state` holds the data and the service's rules (no IO), `api` the `/api/v1` routes
//! and the request-observing middleware, `control` the `/_sim` routes, `faults` the fault
//! injection.

mod api;
mod control;
mod faults;
mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use url::Url;

pub use faults::ProofpointSimFaults;

use crate::proofpoint::{OrgAccess, PpUser};
use faults::FaultState;
use state::State;

/// How `PUT /orgs/{domain}/users/{email}` treats the body (UNDOCUMENTED in the real API).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PutMode {
    /// The stored user becomes exactly the body: the strict reading, which catches clients
    /// that drop fields they do not know.
    #[default]
    Replace,
    /// Top-level fields of the body are merged into the stored user.
    Merge,
}

/// One API request as the simulator saw it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub method: String,
    /// The path as requested (percent-encoded).
    pub path: String,
    /// The org domain in the path, lower-cased.
    pub org: Option<String>,
    /// The user or exemption address in the path, decoded and lower-cased.
    pub email: Option<String>,
    /// The answer's status; 499 when the client went away before the answer (e.g. timed out).
    pub status: u16,
    /// The `X-User` header (never the password).
    pub user: Option<String>,
    /// Whether the answer was an injected fault.
    pub injected: bool,
    #[serde(skip)]
    pub started: Instant,
    #[serde(skip)]
    pub finished: Instant,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// What a successful state change touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteTarget {
    User,
    Exemption,
    AzureSettings,
}

/// One successful state change (API or the `upsert_user` back door, method `UPSERT`).
/// A successful user PUT is recorded even when it stored an identical value (compare `before`
/// and `after`); exemptions are recorded per address actually added or removed.
#[derive(Debug, Clone, Serialize)]
pub struct WriteRecord {
    pub at: DateTime<Utc>,
    #[serde(skip)]
    pub at_instant: Instant,
    pub method: String,
    pub domain: String,
    pub target: WriteTarget,
    pub email: Option<String>,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// Running totals (they survive the bounded logs' trimming).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SimCounters {
    pub requests: u64,
    pub writes: u64,
    pub injected_failures: u64,
    pub by_status: BTreeMap<u16, u64>,
}

/// Misuse of the Rust-side set-up API (the HTTP API answers with statuses instead).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulator refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("not a valid user object: {0}")]
    InvalidUser(#[from] serde_json::Error),
}

impl From<state::Refusal> for SimError {
    fn from(r: state::Refusal) -> Self {
        Self::Refused {
            status: r.status.as_u16(),
            message: state::error_message(&r.body)
                .unwrap_or("refused")
                .to_owned(),
        }
    }
}

/// The simulator: a cheap-to-clone handle on shared state.
#[derive(Clone)]
pub struct ProofpointSim {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    faults: Mutex<FaultState>,
    /// Bumped after every state change; `wait_for` sleeps on it instead of polling.
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for ProofpointSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // try_lock: Debug must not deadlock when called while the state is being changed.
        let mut d = f.debug_struct("ProofpointSim");
        if let Ok(st) = self.inner.state.try_lock() {
            d.field("orgs", &st.orgs.keys().collect::<Vec<_>>())
                .field("admins", &st.admins.len())
                .field("put_mode", &st.put_mode);
        }
        d.finish_non_exhaustive()
    }
}

impl Default for ProofpointSim {
    fn default() -> Self {
        Self::new()
    }
}

impl ProofpointSim {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                faults: Mutex::new(FaultState::default()),
                changed: watch::Sender::new(0),
            }),
        }
    }

    // The lock is never held across an await; a panic while holding it leaves consistent
    // data (every mutation is a single insert/remove), so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn fault_state(&self) -> MutexGuard<'_, FaultState> {
        self.inner
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Run `f` on the state; wake `wait_for` callers if it wrote anything.
    fn mutate<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, wrote) = {
            let mut st = self.state();
            let before = st.counters.writes;
            let out = f(&mut st);
            (out, st.counters.writes != before)
        };
        if wrote {
            self.inner.changed.send_modify(|n| *n += 1);
        }
        out
    }

    // ---- set-up ----

    /// Create an organization (idempotent).
    pub fn add_org(&self, domain: &str) {
        self.mutate(|st| st.add_org(domain));
    }

    /// Cap the active, billable users of an org (`None` = no capping). Activations beyond the
    /// cap are refused with 400 and an `errors` body.
    pub fn set_license_cap(&self, domain: &str, cap: Option<usize>) -> Result<(), SimError> {
        self.mutate(|st| {
            st.org_mut(domain)?.license_cap = cap;
            Ok(())
        })
    }

    /// Add (or replace) an admin. `orgs: None` = partner admin over every org; `Some` =
    /// organization admin of those domains.
    pub fn add_admin(&self, username: &str, password: &str, orgs: Option<Vec<String>>) {
        self.mutate(|st| {
            let uid = st.uid();
            st.admins.insert(
                username.to_ascii_lowercase(),
                state::Admin {
                    username: username.to_owned(),
                    password: SecretString::from(password.to_owned()),
                    orgs: orgs.map(|o| o.iter().map(|d| d.to_ascii_lowercase()).collect()),
                    read_only: false,
                    uid,
                },
            );
        });
    }

    /// Make an admin read-only (reads work, writes get 403). Unknown admins are ignored.
    pub fn set_admin_read_only(&self, username: &str, read_only: bool) {
        self.mutate(|st| {
            if let Some(a) = st.admins.get_mut(&username.to_ascii_lowercase()) {
                a.read_only = read_only;
            }
        });
    }

    /// Store a user as given ([`PpUser`] or a `serde_json::Value`), replacing any user with the
    /// same primary e-mail; a new user gets a `uid` and Proofpoint's defaults for missing
    /// fields. Skips license checks (it is a set-up back door). Returns the stored user.
    pub fn upsert_user(&self, domain: &str, user: impl Serialize) -> Result<PpUser, SimError> {
        let stored = self.upsert_user_json(domain, serde_json::to_value(user)?)?;
        Ok(serde_json::from_value(stored)?)
    }

    fn upsert_user_json(&self, domain: &str, user: Value) -> Result<Value, SimError> {
        Ok(self.mutate(|st| st.upsert_user(domain, user))?)
    }

    /// Add exemptions directly (as the console would).
    pub fn add_exemption(&self, domain: &str, email: &str) -> Result<(), SimError> {
        Ok(self.mutate(|st| st.add_exemptions(domain, &[email.to_owned()]))?)
    }

    pub fn set_put_mode(&self, mode: PutMode) {
        self.state().put_mode = mode;
    }

    // ---- inspection ----

    /// A user by primary e-mail (case-insensitive).
    pub fn user(&self, domain: &str, email: &str) -> Option<PpUser> {
        self.user_json(domain, email)
            .and_then(|v| serde_json::from_value(v).ok())
    }

    /// A user exactly as stored.
    pub fn user_json(&self, domain: &str, email: &str) -> Option<Value> {
        let st = self.state();
        let org = st.org(domain).ok()?;
        org.users
            .get(&email.to_ascii_lowercase())
            .cloned()
            .map(Value::Object)
    }

    /// All users of an org, ordered by lower-cased e-mail (empty for an unknown org).
    pub fn users(&self, domain: &str) -> Vec<PpUser> {
        let st = self.state();
        st.org(domain)
            .map(|o| {
                o.users
                    .values()
                    .filter_map(|u| serde_json::from_value(Value::Object(u.clone())).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Lower-cased exempt addresses, sorted (empty for an unknown org).
    pub fn exemptions(&self, domain: &str) -> Vec<String> {
        let st = self.state();
        st.org(domain)
            .map(|o| o.exemptions.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The org's Azure sync settings object.
    pub fn azure_settings(&self, domain: &str) -> Option<Value> {
        let st = self.state();
        st.org(domain).ok().map(|o| Value::Object(o.azure.clone()))
    }

    /// Every API request seen (the newest 10,000), oldest first.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.state().log.iter().cloned().collect()
    }

    /// Every successful state change (the newest 10,000), oldest first.
    pub fn writes(&self) -> Vec<WriteRecord> {
        self.state().writes.iter().cloned().collect()
    }

    pub fn counters(&self) -> SimCounters {
        self.state().counters.clone()
    }

    /// Forget the request log and writes (counters keep running).
    pub fn clear_records(&self) {
        let mut st = self.state();
        st.log.clear();
        st.writes.clear();
    }

    /// Wait until `predicate(self)` holds, re-checking after every state change (no polling).
    /// Returns whether it held before `timeout`.
    pub async fn wait_for(
        &self,
        mut predicate: impl FnMut(&ProofpointSim) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if predicate(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`, so it cannot close; time is up either way.
                Ok(Err(_)) | Err(_) => return predicate(self),
            }
        }
    }

    /// Wait until the user exists with `is_active == active`.
    pub async fn wait_until_active(
        &self,
        domain: &str,
        email: &str,
        active: bool,
        timeout: Duration,
    ) -> bool {
        self.wait_for(
            |sim| {
                sim.user(domain, email)
                    .is_some_and(|u| u.is_active == active)
            },
            timeout,
        )
        .await
    }

    // ---- faults ----

    /// Replace all fault settings (an outage in `fail_for` starts now).
    pub fn set_faults(&self, faults: ProofpointSimFaults) {
        self.fault_state().set(faults, Instant::now());
    }

    /// The fault settings in force, with what is left of `fail_next` and `fail_for`.
    pub fn faults(&self) -> ProofpointSimFaults {
        self.fault_state().current(Instant::now())
    }

    pub fn clear_faults(&self) {
        self.set_faults(ProofpointSimFaults::default());
    }

    /// Answer the next `n` API requests with `status` (after any already queued).
    pub fn fail_next(&self, n: usize, status: u16) {
        self.fault_state().push_failures(n, status);
    }

    /// Answer every API request with `status` for `duration` from now, then recover.
    pub fn fail_for(&self, duration: Duration, status: u16) {
        self.fault_state()
            .start_outage(duration, status, Instant::now());
    }

    /// Delay every answer by `latency` plus up to `jitter`.
    pub fn set_latency(&self, latency: Duration, jitter: Duration) {
        let mut f = self.fault_state();
        let s = f.settings_mut();
        s.latency = latency;
        s.jitter = jitter;
    }

    // ---- serving ----

    /// The whole HTTP surface: `/api/v1/...` and `/_sim/...`.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .nest("/api/v1", api::router(self.clone()))
            .nest("/_sim", control::router(self.clone()))
    }

    /// Serve on `listener` until `shutdown` is cancelled (for `flagrelay sim`).
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }

    /// Serve on `listener` in a background task; stop it with [`SimServer::stop`] or by
    /// dropping the [`SimServer`].
    pub async fn spawn(&self, listener: tokio::net::TcpListener) -> SimServer {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let host = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        let url = Url::parse(&format!("http://{host}/api/v1"))
            .expect("a socket address is a valid URL host");
        let cancel = CancellationToken::new();
        let sim = self.clone();
        let token = cancel.clone();
        let task = tokio::spawn(async move {
            if let Err(error) = sim.serve(listener, token).await {
                tracing::error!(%error, "proofpoint simulator stopped");
            }
        });
        SimServer {
            url,
            addr: host,
            cancel,
            task: Some(task),
        }
    }
}

/// A running simulator; stops when dropped.
#[derive(Debug)]
pub struct SimServer {
    url: Url,
    addr: SocketAddr,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimServer {
    /// `http://127.0.0.1:PORT/api/v1`.
    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/_sim`, the control routes.
    pub fn control_url(&self) -> Url {
        let mut u = self.url.clone();
        u.set_path("/_sim");
        u
    }

    /// An [`OrgAccess`] for `domain` on this simulator.
    pub fn org_access(&self, domain: &str, username: &str, password: &str) -> OrgAccess {
        OrgAccess {
            domain: domain.to_owned(),
            base_url: self.url.clone(),
            username: username.to_owned(),
            password: SecretString::from(password.to_owned()),
        }
    }

    /// Stop accepting, finish in-flight requests, and wait for the server task.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
