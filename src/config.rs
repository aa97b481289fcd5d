//! Typed, layered configuration: built-in defaults, then a TOML file, then `FLAGRELAY_`
//! environment variables (`FLAGRELAY_<SECTION>__<KEY>`, e.g. `FLAGRELAY_GRAPH__CLIENT_ID`).
//!
//! Secrets are held in [`SecretString`] (never printed) and can be given inline, through the
//! environment, or as a path in the matching `*_file` key. [`Config::load`] validates every
//! value and names the offending key when it refuses one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::message::{Signer, Verifier};
use crate::proofpoint::OrgAccess;
use crate::queue::QueueSettings;

mod load_error;

/// The top-level sections; environment variables outside them are ignored (so that
/// `FLAGRELAY_CONFIG` or test variables do not trip the unknown-key check).
const SECTIONS: &[&str] = &[
    "policy",
    "leader",
    "receiver",
    "graph",
    "proofpoint",
    "tenants",
    "amqp",
    "signing",
    "worker",
    "log",
    "admin",
    "state",
    "network",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Told without source excerpts or secret values: see [`load_error`].
    #[error("configuration could not be read: {0}")]
    Load(String),
    #[error("invalid configuration value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("could not read `{key}` from file {path}: {source}")]
    SecretFile {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub receiver: ReceiverConfig,
    pub graph: GraphConfig,
    pub proofpoint: ProofpointConfig,
    /// The Entra tenants served, each mapped to its Proofpoint organization.
    pub tenants: Vec<TenantConfig>,
    pub amqp: AmqpConfig,
    pub signing: SigningConfig,
    pub worker: WorkerConfig,
    pub policy: PolicyConfig,
    pub leader: LeaderConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub state: StateConfig,
    pub network: NetworkConfig,
}

/// How flagrelay may reach the outside services.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Host names that may be reached over plain `http://` besides loopback (e.g. `sim`, the
    /// simulators on a private compose network). Every other URL must be `https://`: the
    /// client secret, the Proofpoint password and the directory data travel on them.
    pub plain_http_hosts: Vec<String>,
}

/// Where flagrelay keeps what must survive processes, hosts and restarts (the breaker's
/// counts, per-user state, identity bindings, the decision history): see [`crate::store`].
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `postgres://user:password@host:5432/db` for several hosts. Absent: SQLite, one file
    /// `flagrelay.db` under `worker.state_dir`. Secret: it can hold a password.
    #[serde(skip_serializing)]
    pub url: Option<SecretString>,
    pub url_file: Option<PathBuf>,
    /// Connections per process (PostgreSQL; SQLite uses a few of its own).
    pub max_connections: u32,
    /// How long a statement may wait for a connection (a store that does not answer within
    /// it counts as unreachable: the work is retried, nothing is deactivated).
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// How long decisions are kept in the history; older ones are pruned in the background.
    #[serde(with = "humantime_serde")]
    pub history_retention: Duration,
}

impl std::fmt::Debug for StateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateConfig")
            .field(
                "url",
                &self.url.as_ref().map(|u| redact_url(u.expose_secret())),
            )
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("history_retention", &self.history_retention)
            .finish_non_exhaustive()
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(3),
            history_retention: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// The operator's listener: health, readiness, Prometheus metrics and the status page. Kept
/// off the public webhook listener, which Graph (and so the internet) reaches.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener, or `"off"` for none. Every long-running role (`serve`,
    /// `work`, `run`) starts it.
    #[serde(with = "listen_or_off")]
    pub listen: Option<SocketAddr>,
    /// How often readiness (broker, Graph token, Proofpoint credentials), queue depths and the
    /// breaker state are checked; `/readyz` and `/metrics` answer from the last check.
    #[serde(with = "humantime_serde")]
    pub check_every: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Some("127.0.0.1:9090".parse().expect("valid default")),
            check_every: Duration::from_secs(15),
        }
    }
}

/// What the leader (one process of the deployment, elected through RabbitMQ) does.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderConfig {
    /// Delta-query poll interval: the bound on how late a change with a lost notification
    /// reaches Proofpoint (plus processing time).
    #[serde(with = "humantime_serde")]
    pub delta_interval: Duration,
    /// How often subscriptions are checked (created, adopted, renewed).
    #[serde(with = "humantime_serde")]
    pub subscription_check_every: Duration,
    /// Renew a subscription when less than this is left (Graph's maximum is ~29 days).
    #[serde(with = "humantime_serde")]
    pub subscription_renew_before: Duration,
    /// How often the leader runs the drift sweep over every tenant.
    #[serde(with = "humantime_serde")]
    pub sweep_every: Duration,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        Self {
            delta_interval: Duration::from_secs(30),
            subscription_check_every: Duration::from_secs(3600),
            subscription_renew_before: Duration::from_secs(7 * 24 * 3600),
            sweep_every: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The policy file (see `examples/policy.toml`). Absent: the built-in mirror policy
    /// (guards, then `accountEnabled` mirrored onto `is_active`).
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverConfig {
    /// Address the webhook listens on.
    pub listen: SocketAddr,
    /// Public https base URL Graph reaches the receiver at (used to build subscription URLs).
    pub public_url: Option<Url>,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest number of items in one notification collection; more gets 413.
    pub max_items: usize,
    /// Notification items being published (awaiting the broker's confirm) at once. A batch
    /// that does not fit is answered `503 Retry-After` at once: saturation degrades by
    /// refusing early, never by slow `202`s (Graph gives up on endpoints slower than 3 s).
    pub max_in_flight: usize,
    /// `Retry-After` sent with 503 when the broker cannot take the batch.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Time allowed to send the request headers (then the connection is closed) and, from
    /// then on, to send the body and be answered (then `408`): slow clients are cut off.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid default"),
            public_url: None,
            max_body_bytes: 1024 * 1024,
            max_items: 1000,
            max_in_flight: 256,
            retry_after: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GraphConfig {
    /// Entra authority (national clouds and simulators use other hosts).
    pub authority_url: Url,
    /// Graph API base including the version segment.
    pub api_url: Url,
    /// Application (client) id of the Entra app registration.
    pub client_id: String,
    #[serde(skip_serializing)]
    pub client_secret: Option<SecretString>,
    pub client_secret_file: Option<PathBuf>,
    /// Shared secret Graph echoes in every notification's `clientState` (at most 128 chars).
    #[serde(skip_serializing)]
    pub client_state: Option<SecretString>,
    pub client_state_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// User (and mailbox-settings) reads in flight per tenant. Reads that arrive while all
    /// are busy wait and go out together, up to 20 per `$batch` request, when one returns:
    /// no delay while Graph keeps up, fewer requests under a backlog. 0 turns batching off
    /// (every read its own request, no limit).
    pub reads_in_flight: usize,
}

impl std::fmt::Debug for GraphConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphConfig")
            .field("authority_url", &self.authority_url.as_str())
            .field("api_url", &self.api_url.as_str())
            .field("client_id", &self.client_id)
            .field("request_timeout", &self.request_timeout)
            .field("reads_in_flight", &self.reads_in_flight)
            .finish_non_exhaustive()
    }
}

impl Default for GraphConfig {
    fn default() -> Self {
        Self {
            authority_url: "https://login.microsoftonline.com"
                .parse()
                .expect("valid default"),
            api_url: "https://graph.microsoft.com/v1.0"
                .parse()
                .expect("valid default"),
            client_id: String::new(),
            client_secret: None,
            client_secret_file: None,
            client_state: None,
            client_state_file: None,
            request_timeout: Duration::from_secs(10),
            reads_in_flight: DEFAULT_READS_IN_FLIGHT,
        }
    }
}

/// 8 requests of up to 20 reads each at ~0.2 s per batch carry ~800 reads/s: Graph's read
/// budget for a large tenant (8,000 resource units per 10 s); more would only be throttled.
pub const DEFAULT_READS_IN_FLIGHT: usize = 8;

impl GraphConfig {
    pub fn client_secret(&self) -> &SecretString {
        self.client_secret
            .as_ref()
            .expect("resolved by Config::validate")
    }

    pub fn client_state(&self) -> &SecretString {
        self.client_state
            .as_ref()
            .expect("resolved by Config::validate")
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProofpointConfig {
    /// `https://{us1..us5,eu1}.proofpointessentials.com/api/v1`, or a simulator.
    pub base_url: Url,
    /// Admin (organization or partner) e-mail sent as `X-User`.
    pub username: String,
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
    pub password_file: Option<PathBuf>,
    /// Client-side rate limit per organization (Proofpoint's limits are undocumented).
    pub requests_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl std::fmt::Debug for ProofpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProofpointConfig")
            .field("base_url", &self.base_url.as_str())
            .field("username", &self.username)
            .field("requests_per_second", &self.requests_per_second)
            .finish_non_exhaustive()
    }
}

impl Default for ProofpointConfig {
    fn default() -> Self {
        Self {
            base_url: "https://us1.proofpointessentials.com/api/v1"
                .parse()
                .expect("valid default"),
            username: String::new(),
            password: None,
            password_file: None,
            requests_per_second: 5,
            request_timeout: Duration::from_secs(15),
        }
    }
}

/// One Entra tenant and the Proofpoint organization it maps to. The Proofpoint settings
/// default to `[proofpoint]` (an MSP's partner admin usually reaches every org); set them
/// here for an org on another stack or with its own admin.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Entra tenant id (GUID), lower-cased when read.
    pub id: crate::ids::TenantId,
    /// The Proofpoint Essentials organization's primary domain.
    pub org_domain: String,
    #[serde(default)]
    pub proofpoint_base_url: Option<Url>,
    #[serde(default)]
    pub proofpoint_username: Option<String>,
    #[serde(default, skip_serializing)]
    pub proofpoint_password: Option<SecretString>,
    #[serde(default)]
    pub proofpoint_password_file: Option<PathBuf>,
    /// Mail domains of the org besides `org_domain`: flagrelay writes only addresses in these
    /// domains (an address elsewhere is an identity conflict, never written).
    #[serde(default)]
    pub accepted_domains: Vec<String>,
}

impl std::fmt::Debug for TenantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantConfig")
            .field("id", &self.id)
            .field("org_domain", &self.org_domain)
            .field(
                "proofpoint_base_url",
                &self.proofpoint_base_url.as_ref().map(Url::as_str),
            )
            .field("proofpoint_username", &self.proofpoint_username)
            .field("accepted_domains", &self.accepted_domains)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:5672/vhost`. Absent: `run` and `demo` use the embedded,
    /// non-durable queue; `serve` and `work` refuse to start. Secret: it holds a password.
    #[serde(skip_serializing)]
    pub url: Option<SecretString>,
    pub url_file: Option<PathBuf>,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Number of shard queues (per-user serialization unit). Drain before changing.
    pub shards: u16,
    /// Unacknowledged deliveries per shard consumer.
    pub prefetch: u16,
    /// Publish + confirm deadline.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Retry delay tiers (one queue each), ascending.
    #[serde(with = "duration_list")]
    pub retry_tiers: Vec<Duration>,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field(
                "url",
                &self.url.as_ref().map(|u| redact_url(u.expose_secret())),
            )
            .field("prefix", &self.prefix)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        let q = QueueSettings::with_prefix("flagrelay");
        Self {
            url: None,
            url_file: None,
            prefix: q.prefix,
            shards: 8,
            prefetch: q.prefetch,
            publish_timeout: q.publish_timeout,
            retry_tiers: [1, 5, 30, 120, 600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
        }
    }
}

impl AmqpConfig {
    pub fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            prefix: self.prefix.clone(),
            shards: self.shards,
            retry_tiers: self.retry_tiers.clone(),
            publish_timeout: self.publish_timeout,
            prefetch: self.prefetch,
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// Id of the key new messages are signed with.
    pub key_id: String,
    #[serde(skip_serializing)]
    pub key: Option<SecretString>,
    pub key_file: Option<PathBuf>,
    /// Older keys still accepted for verification during a rotation (id → key).
    #[serde(skip_serializing)]
    pub previous_keys: BTreeMap<String, SecretString>,
}

impl std::fmt::Debug for SigningConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningConfig")
            .field("key_id", &self.key_id)
            .field(
                "previous_key_ids",
                &self.previous_keys.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Default for SigningConfig {
    fn default() -> Self {
        Self {
            key_id: "k1".into(),
            key: None,
            key_file: None,
            previous_keys: BTreeMap::new(),
        }
    }
}

impl SigningConfig {
    pub fn signer(&self) -> Signer {
        Signer::new(
            self.key_id.clone(),
            self.key.clone().expect("resolved by Config::validate"),
        )
    }

    pub fn verifier(&self) -> Verifier {
        let current = (
            self.key_id.clone(),
            self.key.clone().expect("resolved by Config::validate"),
        );
        Verifier::new(std::iter::once(current).chain(self.previous_keys.clone()))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Messages processed at once per worker process.
    pub concurrency: usize,
    /// Attempts (first try included) before a transient failure is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with ±20 % jitter, capped at `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Compute and publish decisions without writing to Proofpoint.
    pub dry_run: bool,
    /// Where the embedded SQLite state store lives (`flagrelay.db`), unless `state.url`
    /// names PostgreSQL; a JSON state directory of an older flagrelay here is imported once.
    pub state_dir: PathBuf,
    /// Removed (held deactivations wait in the state store until `flagrelay breaker
    /// release`, which wakes them at once): kept only so that a file that still sets it is
    /// refused with an explanation.
    #[doc(hidden)]
    #[serde(skip_serializing)]
    pub breaker_recheck: Option<String>,
    /// Removed (the admin listener serves `/metrics` for every role): kept only so that a
    /// file that still sets it is refused with a pointer to `admin.listen`.
    #[doc(hidden)]
    #[serde(skip_serializing)]
    pub metrics_listen: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_attempts: 8,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            dry_run: false,
            state_dir: PathBuf::from("flagrelay-state"),
            breaker_recheck: None,
            metrics_listen: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A `tracing` filter, e.g. `info,flagrelay=debug`; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            filter: "info".into(),
        }
    }
}

impl Config {
    /// Defaults, then `file` (when given), then the environment; then [`Config::validate`].
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(invalid(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        Self::from_figment(fig.merge(env_provider()))
    }

    /// Parse a TOML document (plus the environment): used by tests and `config check`.
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        let fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml));
        Self::from_figment(fig)
    }

    fn from_figment(fig: Figment) -> Result<Self, ConfigError> {
        let mut cfg: Config = fig
            .extract()
            .map_err(|e| ConfigError::Load(load_error::describe(e)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Resolve `*_file` secrets and check every value; errors name the key.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        resolve_secret(
            "graph.client_secret",
            &mut self.graph.client_secret,
            &self.graph.client_secret_file,
        )?;
        resolve_secret(
            "graph.client_state",
            &mut self.graph.client_state,
            &self.graph.client_state_file,
        )?;
        resolve_secret(
            "proofpoint.password",
            &mut self.proofpoint.password,
            &self.proofpoint.password_file,
        )?;
        resolve_secret("signing.key", &mut self.signing.key, &self.signing.key_file)?;
        if self.amqp.url.is_none() && self.amqp.url_file.is_some() {
            resolve_secret("amqp.url", &mut self.amqp.url, &self.amqp.url_file)?;
        }
        if self.state.url.is_none() && self.state.url_file.is_some() {
            resolve_secret("state.url", &mut self.state.url, &self.state.url_file)?;
        }
        if let Some(url) = &self.state.url {
            let parsed = Url::parse(url.expose_secret())
                .map_err(|_| invalid("state.url", "is not a valid URL"))?;
            if !matches!(parsed.scheme(), "postgres" | "postgresql") {
                return Err(invalid(
                    "state.url",
                    "must start with postgres:// (leave it unset for the embedded SQLite file)",
                ));
            }
        }
        if self.state.max_connections == 0 {
            return Err(invalid("state.max_connections", "must be at least 1"));
        }

        let plain = &self.network.plain_http_hosts;
        require_http("graph.authority_url", &self.graph.authority_url, plain)?;
        require_http("graph.api_url", &self.graph.api_url, plain)?;
        require_http("proofpoint.base_url", &self.proofpoint.base_url, plain)?;
        if let Some(u) = &self.receiver.public_url {
            require_http("receiver.public_url", u, plain)?;
        }
        if self.graph.client_id.trim().is_empty() {
            return Err(invalid(
                "graph.client_id",
                "is required (the Entra app registration's client id)",
            ));
        }
        let state_len = self.graph.client_state().expose_secret().chars().count();
        if !(16..=128).contains(&state_len) {
            return Err(invalid(
                "graph.client_state",
                "must be 16 to 128 characters (Graph allows at most 128)",
            ));
        }
        if self.proofpoint.username.trim().is_empty() || !self.proofpoint.username.contains('@') {
            return Err(invalid(
                "proofpoint.username",
                "must be the Proofpoint admin's e-mail address",
            ));
        }
        if self.proofpoint.requests_per_second == 0 {
            return Err(invalid(
                "proofpoint.requests_per_second",
                "must be at least 1",
            ));
        }
        if self
            .signing
            .key
            .as_ref()
            .expect("resolved")
            .expose_secret()
            .len()
            < 32
        {
            return Err(invalid(
                "signing.key",
                "must be at least 32 characters (use a random string)",
            ));
        }
        if self.signing.key_id.trim().is_empty() {
            return Err(invalid("signing.key_id", "must not be empty"));
        }
        for (id, key) in &self.signing.previous_keys {
            if key.expose_secret().len() < 32 {
                return Err(invalid(
                    format!("signing.previous_keys.{id}"),
                    "must be at least 32 characters",
                ));
            }
        }
        if self.tenants.is_empty() {
            return Err(invalid(
                "tenants",
                "at least one [[tenants]] entry (id, org_domain) is required",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter_mut().enumerate() {
            if t.proofpoint_password.is_some() || t.proofpoint_password_file.is_some() {
                let key = format!("tenants[{i}].proofpoint_password");
                resolve_secret(
                    &key,
                    &mut t.proofpoint_password,
                    &t.proofpoint_password_file,
                )?;
            }
            if let Some(u) = &t.proofpoint_base_url {
                require_http(
                    &format!("tenants[{i}].proofpoint_base_url"),
                    u,
                    &self.network.plain_http_hosts,
                )?;
            }
            if t.proofpoint_username.is_some() != t.proofpoint_password.is_some() {
                return Err(invalid(
                    format!("tenants[{i}].proofpoint_username"),
                    "give both proofpoint_username and proofpoint_password (or neither, to use [proofpoint])",
                ));
            }
            if t.id.trim().is_empty() {
                return Err(invalid(format!("tenants[{i}].id"), "must not be empty"));
            }
            if !seen.insert(t.id.clone()) {
                return Err(invalid(
                    format!("tenants[{i}].id"),
                    format!("tenant {} is listed twice", t.id),
                ));
            }
            if !t.org_domain.contains('.') || t.org_domain.contains('/') {
                return Err(invalid(
                    format!("tenants[{i}].org_domain"),
                    "must be a domain such as example.com",
                ));
            }
            t.org_domain = t.org_domain.trim().to_ascii_lowercase();
            for (j, d) in t.accepted_domains.iter_mut().enumerate() {
                *d = d.trim().to_ascii_lowercase();
                if !d.contains('.') || d.contains(['/', '@', '*']) {
                    return Err(invalid(
                        format!("tenants[{i}].accepted_domains[{j}]"),
                        "must be a domain such as example.co.uk (no wildcards)",
                    ));
                }
            }
        }
        if let Some(url) = &self.amqp.url {
            let parsed = Url::parse(url.expose_secret())
                .map_err(|_| invalid("amqp.url", "is not a valid URL"))?;
            if !matches!(parsed.scheme(), "amqp" | "amqps") {
                return Err(invalid("amqp.url", "must start with amqp:// or amqps://"));
            }
        }
        if self.amqp.prefix.is_empty()
            || !self
                .amqp
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "amqp.prefix",
                "must be non-empty and use only letters, digits, '-', '_', '.'",
            ));
        }
        if self.amqp.shards == 0 || self.amqp.shards > 256 {
            return Err(invalid("amqp.shards", "must be between 1 and 256"));
        }
        if self.amqp.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        if self.amqp.retry_tiers.is_empty()
            || !self.amqp.retry_tiers.windows(2).all(|w| w[0] < w[1])
        {
            return Err(invalid(
                "amqp.retry_tiers",
                "must be a non-empty, strictly ascending list of durations",
            ));
        }
        if self.receiver.max_body_bytes < 1024 {
            return Err(invalid("receiver.max_body_bytes", "must be at least 1024"));
        }
        if self.receiver.max_in_flight == 0 {
            return Err(invalid("receiver.max_in_flight", "must be at least 1"));
        }
        if self.worker.concurrency == 0 {
            return Err(invalid("worker.concurrency", "must be at least 1"));
        }
        if self.worker.max_attempts == 0 {
            return Err(invalid("worker.max_attempts", "must be at least 1"));
        }
        // A retry waits in the smallest tier not shorter than its delay; a backoff longer
        // than every tier would silently be cut to the largest one.
        if let Some(largest) = self.amqp.retry_tiers.last()
            && self.worker.backoff_max > *largest
        {
            return Err(invalid(
                "worker.backoff_max",
                format!(
                    "must not exceed the largest of amqp.retry_tiers ({})",
                    humantime::format_duration(*largest)
                ),
            ));
        }
        if let Some(path) = &self.policy.file
            && !path.is_file()
        {
            return Err(invalid(
                "policy.file",
                format!("{} is not a readable file", path.display()),
            ));
        }
        if self.leader.delta_interval < Duration::from_secs(1) {
            return Err(invalid(
                "leader.delta_interval",
                "must be at least 1s (Graph throttles)",
            ));
        }
        if self.worker.metrics_listen.is_some() {
            return Err(invalid(
                "worker.metrics_listen",
                "was removed: every role now serves /metrics on the admin listener; \
                 set `admin.listen` ([admin] listen = \"0.0.0.0:9090\", or FLAGRELAY_ADMIN__LISTEN) instead",
            ));
        }
        if self.worker.breaker_recheck.is_some() {
            return Err(invalid(
                "worker.breaker_recheck",
                "was removed: held deactivations wait in the state store and proceed within \
                 seconds of `flagrelay breaker release`; delete the key",
            ));
        }
        if self.admin.check_every < Duration::from_millis(100) {
            return Err(invalid("admin.check_every", "must be at least 100ms"));
        }
        if self.worker.state_dir.as_os_str().is_empty() {
            return Err(invalid("worker.state_dir", "must name a directory"));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid("log.format", "must be \"text\" or \"json\""));
        }
        Ok(())
    }

    /// The tenant entry for an Entra tenant id (case-insensitive, as GUIDs are).
    pub fn tenant(&self, tenant_id: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.id == tenant_id)
    }

    /// How to reach the Proofpoint organization of a tenant.
    pub fn org_access(&self, tenant: &TenantConfig) -> OrgAccess {
        OrgAccess {
            domain: tenant.org_domain.clone(),
            base_url: tenant
                .proofpoint_base_url
                .clone()
                .unwrap_or_else(|| self.proofpoint.base_url.clone()),
            username: tenant
                .proofpoint_username
                .clone()
                .unwrap_or_else(|| self.proofpoint.username.clone()),
            password: tenant
                .proofpoint_password
                .clone()
                .or_else(|| self.proofpoint.password.clone())
                .expect("resolved by Config::validate"),
        }
    }
}

fn env_provider() -> Env {
    Env::prefixed("FLAGRELAY_")
        .split("__")
        // Keys are not lower-cased yet when the filter sees them, and may still hold `__`.
        .filter(|key| {
            let section = key.as_str().split(['.', '_']).next().unwrap_or("");
            SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(section))
        })
}

fn resolve_secret(
    key: &str,
    value: &mut Option<SecretString>,
    file: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    match (value.as_ref(), file) {
        (Some(_), Some(_)) => Err(invalid(
            key,
            format!("give either `{key}` or `{key}_file`, not both"),
        )),
        (Some(v), None) if v.expose_secret().trim().is_empty() => {
            Err(invalid(key, "must not be empty"))
        }
        (Some(_), None) => Ok(()),
        (None, Some(path)) => {
            let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                key: format!("{key}_file"),
                path: path.clone(),
                source,
            })?;
            let trimmed = raw.trim_end_matches(['\n', '\r']).to_owned();
            if trimmed.is_empty() {
                return Err(invalid(
                    format!("{key}_file"),
                    format!("{} is empty", path.display()),
                ));
            }
            *value = Some(SecretString::from(trimmed));
            Ok(())
        }
        (None, None) => Err(invalid(
            key,
            format!("is required (inline, FLAGRELAY_ env, or `{key}_file`)"),
        )),
    }
}

fn require_http(key: &str, url: &Url, plain_ok: &[String]) -> Result<(), ConfigError> {
    if !url.has_host() || !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(key, format!("must be an http(s) URL, got {url}")));
    }
    if url.scheme() == "http" && !plain_http_allowed(url, plain_ok) {
        return Err(invalid(
            key,
            format!(
                "must be https:// (plain http:// only to loopback or a host listed in \
                 network.plain_http_hosts), got {url}"
            ),
        ));
    }
    Ok(())
}

/// Plain http is allowed to loopback (`localhost`, 127.0.0.0/8, ::1) and the listed hosts.
fn plain_http_allowed(url: &Url, plain_ok: &[String]) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || plain_ok.iter().any(|h| h.eq_ignore_ascii_case(d))
        }
        None => false,
    }
}

/// A list of humantime durations (`["1s", "5m"]`).
mod duration_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// A listen address, or `"off"` (`None`).
mod listen_or_off {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let raw = String::deserialize(d)?;
        if raw.trim().eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        raw.trim().parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "expected an address such as 127.0.0.1:9090, or \"off\"; got {raw:?}"
            ))
        })
    }
}

/// `amqp://user:***@host/vhost`, for logs.
pub fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            // libpq-style URLs can carry the password as a parameter too.
            if u.query_pairs().any(|(k, _)| k.contains("password")) {
                let kept: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k.contains("password") {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(kept);
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
        [graph]
        client_id = "app-id"
        client_secret = "graph-secret-value"
        client_state = "client-state-at-least-16"
        [proofpoint]
        username = "admin@example.com"
        password = "pp-password-value"
        [signing]
        key = "0123456789abcdef0123456789abcdef"
        [[tenants]]
        id = "11111111-1111-1111-1111-111111111111"
        org_domain = "example.com"
    "#;

    fn with(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(&format!("{VALID}\n{extra}"))
    }

    fn key_of(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { key, .. } => key,
            other => format!("{other}"),
        }
    }

    #[test]
    fn plain_http_only_to_loopback_or_listed_hosts() {
        let graph_api = |url: &str, network: &str| {
            let toml = VALID.replace(
                "[graph]\n",
                &format!("[graph]\n        api_url = \"{url}\"\n"),
            );
            Config::from_toml_str(&format!("{toml}\n[network]\n{network}"))
        };
        for ok in [
            "https://graph.microsoft.com/v1.0",
            "http://127.0.0.1:9100/v1.0",
            "http://[::1]:9100/v1.0",
            "http://localhost:9100/v1.0",
        ] {
            assert!(graph_api(ok, "").is_ok(), "{ok}");
        }
        for refused in [
            "http://graph.microsoft.com/v1.0",
            "http://10.0.0.5/v1.0",
            "http://sim:9100/v1.0",
        ] {
            assert_eq!(
                key_of(graph_api(refused, "").unwrap_err()),
                "graph.api_url",
                "{refused}"
            );
        }
        assert!(graph_api("http://sim:9100/v1.0", "plain_http_hosts = [\"sim\"]").is_ok());
    }

    #[test]
    fn valid_minimal_file_loads_with_defaults() {
        let c = Config::from_toml_str(VALID).unwrap();
        assert_eq!(c.amqp.prefix, "flagrelay");
        assert!(c.amqp.url.is_none());
        assert!(c.tenant("11111111-1111-1111-1111-111111111111").is_some());
        assert!(c.tenant("22222222-1111-1111-1111-111111111111").is_none());
    }

    #[test]
    fn invalid_values_are_refused_naming_the_key() {
        let cases = [
            ("[amqp]\nshards = 0", "amqp.shards"),
            ("[amqp]\nurl = \"http://nope\"", "amqp.url"),
            ("[amqp]\nprefix = \"bad prefix\"", "amqp.prefix"),
            ("[receiver]\nmax_body_bytes = 10", "receiver.max_body_bytes"),
            ("[receiver]\nmax_in_flight = 0", "receiver.max_in_flight"),
            ("[log]\nformat = \"xml\"", "log.format"),
            (
                "[[tenants]]\nid = \"11111111-1111-1111-1111-111111111111\"\norg_domain = \"x.com\"",
                "tenants[1].id",
            ),
        ];
        for (extra, key) in cases {
            let err = with(extra).expect_err(extra);
            assert_eq!(key_of(err), key, "{extra}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused_with_the_key_named() {
        let err = with("[worker]\nconcurency = 3").unwrap_err().to_string();
        assert!(err.contains("concurency"), "{err}");
        let err = with("[worker]\nbackoff_base = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("backoff_base"), "{err}");
    }

    #[test]
    fn secrets_come_from_files_and_never_from_debug() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "from-a-file-secret\n").unwrap();
        let toml = VALID.replace(
            "password = \"pp-password-value\"",
            &format!("password_file = {:?}", path.display().to_string()),
        );
        let c = Config::from_toml_str(&toml).unwrap();
        assert_eq!(
            c.proofpoint.password.as_ref().unwrap().expose_secret(),
            "from-a-file-secret"
        );
        let debug = format!("{c:?}");
        for secret in [
            "from-a-file-secret",
            "graph-secret-value",
            "client-state-at-least-16",
            "0123456789abcdef",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked in {debug}");
        }
    }

    #[test]
    fn missing_secret_and_both_forms_are_refused() {
        let toml = VALID.replace("client_secret = \"graph-secret-value\"", "");
        assert_eq!(
            key_of(Config::from_toml_str(&toml).unwrap_err()),
            "graph.client_secret"
        );
        let toml = VALID.replace(
            "client_secret = \"graph-secret-value\"",
            "client_secret = \"x\"\nclient_secret_file = \"/nonexistent\"",
        );
        assert_eq!(
            key_of(Config::from_toml_str(&toml).unwrap_err()),
            "graph.client_secret"
        );
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/flagrelay.toml");
        let c = Config::from_toml_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(c.tenants.len(), 1);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the error type
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("f.toml", VALID)?;
            jail.set_env("FLAGRELAY_AMQP__SHARDS", "12");
            jail.set_env("FLAGRELAY_GRAPH__CLIENT_ID", "from-env");
            jail.set_env("FLAGRELAY_CONFIG", "ignored.toml");
            jail.set_env("FLAGRELAY_TEST_AMQP_URL", "amqp://ignored");
            let c = Config::load(Some(Path::new("f.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.amqp.shards, 12);
            assert_eq!(c.graph.client_id, "from-env");
            jail.set_env("FLAGRELAY_AMQP__SHARDS", "many");
            let err = Config::load(Some(Path::new("f.toml")))
                .unwrap_err()
                .to_string();
            assert!(
                err.to_lowercase().contains("amqp.shards"),
                "names the key: {err}"
            );
            Ok(())
        });
    }

    #[test]
    fn admin_listener_defaults_to_localhost_and_can_be_turned_off() {
        let c = Config::from_toml_str(VALID).unwrap();
        assert_eq!(c.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
        let c = with("[admin]\nlisten = \"off\"").unwrap();
        assert_eq!(c.admin.listen, None);
        let c = with("[admin]\nlisten = \"0.0.0.0:9191\"").unwrap();
        assert_eq!(c.admin.listen, Some("0.0.0.0:9191".parse().unwrap()));
        let err = with("[admin]\nlisten = \"everywhere\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.listen") && err.contains("off"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the error type
    fn the_admin_listener_is_set_or_turned_off_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("f.toml", VALID)?;
            jail.set_env("FLAGRELAY_ADMIN__LISTEN", "0.0.0.0:9191");
            let c = Config::load(Some(Path::new("f.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.admin.listen, Some("0.0.0.0:9191".parse().unwrap()));
            jail.set_env("FLAGRELAY_ADMIN__LISTEN", "off");
            let c = Config::load(Some(Path::new("f.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.admin.listen, None);
            Ok(())
        });
    }

    #[test]
    fn the_removed_metrics_listen_points_at_admin_listen() {
        let err = with("[worker]\nmetrics_listen = \"0.0.0.0:9090\"").unwrap_err();
        let text = err.to_string();
        assert_eq!(key_of(err), "worker.metrics_listen");
        assert!(text.contains("admin.listen"), "{text}");
    }

    #[test]
    fn redacts_amqp_passwords() {
        assert_eq!(
            redact_url("amqp://guest:guest@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
    }
    #[test]
    fn a_backoff_longer_than_every_retry_tier_is_refused() {
        let err = with("[worker]\nbackoff_max = \"1h\"\n[amqp]\nretry_tiers = [\"1s\", \"10m\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`worker.backoff_max`"), "{err}");
        assert!(err.contains("10m"), "{err}");
    }
}
