//! [`GraphClient`]: the HTTP implementation of [`GraphApi`] over one `reqwest::Client`.
//!
//! Authentication is app-only, by the client-credentials grant with a secret. Tokens are
//! cached per tenant and refreshed ahead of expiry (5 minutes, or a tenth of the lifetime
//! when that is shorter), one refresh at a time per tenant. A 401 from Graph drops the cached
//! token and retries once (tokens can be revoked). Throttling is *not* retried here: the
//! worker's queue retry does that, honouring [`GraphError::retry_after`]. A `Retry-After`
//! holds for the whole tenant (Graph throttles per app and tenant): until it has passed, no
//! request for that tenant is sent; each fails at once as throttled, with the time left.
//!
//! All status handling is in `into_result`; nothing else looks at status codes except to
//! read `404` as "no such user" (or, for mailbox settings, "no mailbox"; for deleting a
//! subscription, "already deleted").
//!
//! Delta links and next links are followed only on the configured API origin
//! ([`super::paging::same_origin`]). Delta requests are classified as their own endpoint so
//! that `410 Gone` and the `syncStateNotFound`/`resyncRequired` error codes become
//! [`GraphError::DeltaTokenExpired`] there and nowhere else.
//!
//! [`GraphApi::granted_permissions`] reads the `roles` claim of our own access token. The
//! token is not verified: it came from Entra over TLS and is only read to report
//! configuration problems, never to decide what we may do (Graph decides that). Microsoft
//! documents access tokens as opaque to clients, so an unreadable token is "unknown", not
//! an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use url::Url;

mod batch;
mod lookup;

use super::paging::{self, DeltaWire, Page};
/// Re-exported for the simulator's tests, which read the tokens it mints.
#[cfg(test)]
pub(crate) use super::token::base64url_decode;
use super::token::{TokenAnswer, refresh_margin, roles_in_token};
use super::{DeltaPage, GraphApi, GraphError, GraphUser, Group, NewSubscription, Subscription};
use crate::config::GraphConfig;
pub use batch::MAX_BATCH;

/// `POST /subscriptions` waits for Graph's validation handshake (up to 10 s) to complete,
/// so it gets at least this much time whatever the configured request timeout.
const CREATE_SUBSCRIPTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Error bodies are kept in errors and logs up to this many bytes.
const MAX_ERROR_BODY: usize = 2048;
/// A guard against a server that pages forever.
const MAX_PAGES: usize = 1000;
/// `$top` of `transitiveMemberOf`: Graph's largest page (its default is 100).
const MEMBER_OF_PAGE_SIZE: usize = 999;
/// Graph documents the OData cast (`/microsoft.graph.group`) on membership lists as an
/// "advanced query" that needs `ConsistencyLevel: eventual` and `$count=true`. Whether it
/// enforces that on this path is unclear; both are accepted either way, so they are always
/// sent. The eventual index may lag recent membership changes a little; membership changes
/// are not notified anyway.
const ADVANCED_QUERY: &[(&str, &str)] = &[("ConsistencyLevel", "eventual")];

/// Why a [`GraphClient`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GraphClientError {
    #[error("graph.client_secret is not set")]
    MissingSecret,
    #[error("`{key}` must be an http(s) URL, got {url}")]
    InvalidUrl { key: &'static str, url: Url },
    #[error("could not build the HTTP client")]
    Http(#[source] reqwest::Error),
}

/// What a [`GraphClient`] needs, when not built from [`GraphConfig`].
pub struct GraphClientSettings {
    /// Entra authority, e.g. `https://login.microsoftonline.com`.
    pub authority_url: Url,
    /// Graph API base with the version segment, e.g. `https://graph.microsoft.com/v1.0`.
    pub api_url: Url,
    pub client_id: String,
    pub client_secret: SecretString,
    /// Whole-request timeout (connect, send, read the answer).
    pub request_timeout: Duration,
    /// Single-document reads in flight per tenant before waiting reads are batched
    /// (`graph.reads_in_flight`; 0: no batching, no limit). See [`batch`].
    pub reads_in_flight: usize,
}

impl std::fmt::Debug for GraphClientSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphClientSettings")
            .field("authority_url", &self.authority_url.as_str())
            .field("api_url", &self.api_url.as_str())
            .field("client_id", &self.client_id)
            .field("request_timeout", &self.request_timeout)
            .field("reads_in_flight", &self.reads_in_flight)
            .finish_non_exhaustive()
    }
}

/// A cached app-only token of one tenant.
struct CachedToken {
    access_token: SecretString,
    /// Fetch a new one from here on.
    refresh_at: Instant,
    /// Still usable until here if a refresh fails transiently.
    expires_at: Instant,
}

/// Per-tenant token slot. The async mutex makes refreshes single-flight per tenant.
type TokenSlot = Arc<tokio::sync::Mutex<Option<CachedToken>>>;

/// The Microsoft Graph client. `Debug` never shows the secret or tokens.
pub struct GraphClient {
    http: reqwest::Client,
    authority_url: Url,
    api_url: Url,
    /// `{api origin}/.default`: see [`scope_for`].
    scope: String,
    client_id: String,
    client_secret: SecretString,
    request_timeout: Duration,
    /// Keyed by lower-cased tenant id (tenant GUIDs compare case-insensitively).
    tokens: Mutex<HashMap<String, TokenSlot>>,
    /// Per lower-cased tenant id: no request before this (Graph's last `Retry-After`).
    throttled_until: Mutex<HashMap<String, Instant>>,
    /// `None`: every read is sent on its own, at once.
    reads: Option<batch::ReadQueues>,
}

impl std::fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tenants = self.tokens.lock().map(|t| t.len()).unwrap_or(0);
        f.debug_struct("GraphClient")
            .field("authority_url", &self.authority_url.as_str())
            .field("api_url", &self.api_url.as_str())
            .field("scope", &self.scope)
            .field("client_id", &self.client_id)
            .field("cached_tenants", &tenants)
            .finish_non_exhaustive()
    }
}

/// The client-credentials scope for a Graph API base: `{origin}/.default`, i.e.
/// `https://graph.microsoft.com/.default` for the public cloud. Deriving it from the API
/// URL (rather than hard-coding the public host) makes national clouds
/// (`graph.microsoft.us`, `microsoftgraph.chinacloudapi.cn`) and simulators work with the
/// one `api_url` setting.
pub fn scope_for(api_url: &Url) -> String {
    format!("{}/.default", api_url.origin().ascii_serialization())
}

impl GraphClient {
    /// Build from the validated configuration.
    pub fn new(cfg: &GraphConfig) -> Result<Self, GraphClientError> {
        Self::from_settings(GraphClientSettings {
            authority_url: cfg.authority_url.clone(),
            api_url: cfg.api_url.clone(),
            client_id: cfg.client_id.clone(),
            client_secret: cfg
                .client_secret
                .clone()
                .ok_or(GraphClientError::MissingSecret)?,
            request_timeout: cfg.request_timeout,
            reads_in_flight: cfg.reads_in_flight,
        })
    }

    pub fn from_settings(s: GraphClientSettings) -> Result<Self, GraphClientError> {
        for (key, url) in [
            ("graph.authority_url", &s.authority_url),
            ("graph.api_url", &s.api_url),
        ] {
            if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
                return Err(GraphClientError::InvalidUrl {
                    key,
                    url: url.clone(),
                });
            }
        }
        let http = reqwest::Client::builder()
            .timeout(s.request_timeout)
            .connect_timeout(s.request_timeout)
            .user_agent(concat!("flagrelay/", env!("CARGO_PKG_VERSION")))
            // A redirect would re-send the client secret (token endpoint) or be trusted as
            // user data from another origin (API). Graph does not redirect these calls: a 3xx
            // is an error (`Rejected`), never followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(GraphClientError::Http)?;
        Ok(Self {
            http,
            scope: scope_for(&s.api_url),
            authority_url: s.authority_url,
            api_url: s.api_url,
            client_id: s.client_id,
            client_secret: s.client_secret,
            request_timeout: s.request_timeout,
            tokens: Mutex::new(HashMap::new()),
            throttled_until: Mutex::new(HashMap::new()),
            reads: (s.reads_in_flight > 0).then(|| batch::ReadQueues::new(s.reads_in_flight)),
        })
    }

    /// The scope requested with every token (`{api origin}/.default`).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// `.`/`..` would be dropped or resolved by URL path handling and read another resource.
    fn check_user_id(user_id: &str) -> Result<(), GraphError> {
        Self::check_id("user", user_id)
    }

    /// An id that goes into the URL path as one segment (see [`Self::check_user_id`]).
    fn check_id(kind: &str, id: &str) -> Result<(), GraphError> {
        if id.trim().is_empty() || id == "." || id == ".." {
            return Err(GraphError::Rejected {
                status: 400,
                body: format!("refused locally: {id:?} is not a {kind} id"),
            });
        }
        Ok(())
    }

    /// `$select=a,b,c`, each name form-encoded.
    fn select_query(select: &[&str]) -> String {
        let list: Vec<String> = select
            .iter()
            .map(|p| url::form_urlencoded::byte_serialize(p.as_bytes()).collect())
            .collect();
        format!("$select={}", list.join(","))
    }

    /// `base` with `segments` appended, each percent-encoded as one path segment.
    fn url_with(base: &Url, segments: &[&str]) -> Url {
        let mut url = base.clone();
        // Cannot fail: both bases were checked to be http(s) URLs in `from_settings`.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn slot(&self, tenant_id: &str) -> TokenSlot {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .entry(tenant_id.to_ascii_lowercase())
            .or_default()
            .clone()
    }

    /// A valid token for the tenant: cached, or fetched (one fetch at a time per tenant).
    async fn access_token(&self, tenant_id: &str) -> Result<SecretString, GraphError> {
        let slot = self.slot(tenant_id);
        let mut cached = slot.lock().await;
        let now = Instant::now();
        if let Some(t) = cached.as_ref()
            && now < t.refresh_at
        {
            return Ok(t.access_token.clone());
        }
        match self.fetch_token(tenant_id).await {
            Ok(fresh) => {
                let token = fresh.access_token.clone();
                *cached = Some(fresh);
                Ok(token)
            }
            // Entra hiccups while the old token still has minutes left: keep using it.
            Err(error) if error.is_retryable() => match cached.as_ref() {
                Some(t) if Instant::now() < t.expires_at => {
                    tracing::warn!(tenant = tenant_id, %error, "graph token refresh failed; using the current token until it expires");
                    Ok(t.access_token.clone())
                }
                _ => Err(error),
            },
            Err(error) => Err(error),
        }
    }

    /// Forget the tenant's token if it is still the one Graph refused.
    async fn invalidate_token(&self, tenant_id: &str, refused: &SecretString) {
        let slot = self.slot(tenant_id);
        let mut cached = slot.lock().await;
        if cached
            .as_ref()
            .is_some_and(|t| t.access_token.expose_secret() == refused.expose_secret())
        {
            *cached = None;
        }
    }

    async fn fetch_token(&self, tenant_id: &str) -> Result<CachedToken, GraphError> {
        let url = Self::url_with(&self.authority_url, &[tenant_id, "oauth2", "v2.0", "token"]);
        let form = [
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose_secret()),
            ("scope", self.scope.as_str()),
            ("grant_type", "client_credentials"),
        ];
        let started = Instant::now();
        let resp = self
            .http
            .post(url)
            .form(&form)
            .send()
            .await
            .map_err(send_error)?;
        let resp = into_result(resp, Endpoint::Token).await?;
        let answer: TokenAnswer = read_json(resp).await?;
        let lifetime = answer
            .expires_in
            .seconds()
            // Entra tokens live about an hour; a hostile answer's huge number must not
            // overflow the expiry arithmetic below, nor keep a token forever.
            .map(|secs| Duration::from_secs(secs.min(MAX_TOKEN_LIFETIME.as_secs())))
            .ok_or_else(|| GraphError::Rejected {
                status: 200,
                body: "token answer without a usable expires_in".into(),
            })?;
        if !answer.token_type.eq_ignore_ascii_case("bearer") || answer.access_token.is_empty() {
            return Err(GraphError::Rejected {
                status: 200,
                body: format!(
                    "unexpected token answer (token_type {:?})",
                    answer.token_type
                ),
            });
        }
        tracing::debug!(
            tenant = tenant_id,
            expires_in_secs = lifetime.as_secs(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "graph token acquired"
        );
        let expires_at = started + lifetime;
        Ok(CachedToken {
            access_token: SecretString::from(answer.access_token),
            refresh_at: expires_at - refresh_margin(lifetime),
            expires_at,
        })
    }

    /// Refuse to send while the tenant's last `Retry-After` has not passed.
    fn check_throttle(&self, tenant_id: &str) -> Result<(), GraphError> {
        let key = tenant_id.to_ascii_lowercase();
        let mut gates = self
            .throttled_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match gates
            .get(&key)
            .map(|until| until.checked_duration_since(Instant::now()))
        {
            Some(Some(left)) if !left.is_zero() => Err(GraphError::Throttled {
                status: 429,
                retry_after: Some(left),
            }),
            Some(_) => {
                gates.remove(&key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Hold every request for `tenant_id` back for `wait` (never shortening a longer hold).
    fn throttle(&self, tenant_id: &str, wait: Duration) {
        let now = Instant::now();
        let until = now.checked_add(wait).unwrap_or(now);
        let mut gates = self
            .throttled_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let slot = gates.entry(tenant_id.to_ascii_lowercase()).or_insert(until);
        *slot = (*slot).max(until);
        tracing::warn!(
            tenant = tenant_id,
            retry_after_ms = wait.as_millis() as u64,
            "graph is throttling this tenant; holding its requests back"
        );
    }

    /// Send an authenticated API request built by `build` (called again for the one retry
    /// after a 401), with a fresh `client-request-id` each time.
    async fn send(
        &self,
        tenant_id: &str,
        op: &'static str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, GraphError> {
        self.send_to(tenant_id, op, Endpoint::Api, build).await
    }

    /// [`Self::send`], with the endpoint kind that decides how error statuses read.
    async fn send_to(
        &self,
        tenant_id: &str,
        op: &'static str,
        endpoint: Endpoint,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, GraphError> {
        let mut retried_401 = false;
        loop {
            self.check_throttle(tenant_id)?;
            let token = self.access_token(tenant_id).await?;
            let client_request_id = uuid::Uuid::new_v4().to_string();
            let request = build(&self.http)
                .bearer_auth(token.expose_secret())
                .header("client-request-id", &client_request_id)
                .build()
                .map_err(send_error)?;
            let method = request.method().clone();
            let path = request.url().path().to_owned();
            let started = Instant::now();
            let resp = match self.http.execute(request).await {
                Ok(resp) => resp,
                Err(error) => {
                    tracing::debug!(
                        tenant = tenant_id,
                        op,
                        %method,
                        path = %path,
                        client_request_id = %client_request_id,
                        %error,
                        "graph request failed"
                    );
                    return Err(send_error(error));
                }
            };
            tracing::debug!(
                tenant = tenant_id,
                op,
                %method,
                path = %path,
                client_request_id = %client_request_id,
                request_id = header_str(resp.headers(), "request-id").unwrap_or(""),
                status = resp.status().as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "graph response"
            );
            match into_result(resp, endpoint).await {
                Err(GraphError::Throttled {
                    status,
                    retry_after: Some(wait),
                }) => {
                    self.throttle(tenant_id, wait);
                    return Err(GraphError::Throttled {
                        status,
                        retry_after: Some(wait),
                    });
                }
                Err(GraphError::Unauthorized { status: 401, .. }) if !retried_401 => {
                    tracing::info!(
                        tenant = tenant_id,
                        op,
                        "graph refused the cached token; fetching a new one"
                    );
                    retried_401 = true;
                    self.invalidate_token(tenant_id, &token).await;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl GraphApi for GraphClient {
    async fn get_user(
        &self,
        tenant_id: &str,
        user_id: &str,
        select: &[&str],
    ) -> Result<Option<GraphUser>, GraphError> {
        Self::check_user_id(user_id)?;
        let mut url = Self::url_with(&self.api_url, &["users", user_id]);
        if !select.is_empty() {
            url.set_query(Some(&Self::select_query(select)));
        }
        self.get_one(tenant_id, "get_user", url).await
    }

    async fn create_subscription(
        &self,
        tenant_id: &str,
        sub: &NewSubscription,
    ) -> Result<Subscription, GraphError> {
        let url = Self::url_with(&self.api_url, &["subscriptions"]);
        let timeout = self.request_timeout.max(CREATE_SUBSCRIPTION_TIMEOUT);
        tracing::debug!(
            tenant = tenant_id,
            resource = %sub.resource,
            change_type = %sub.change_type,
            notification_url = %sub.notification_url,
            "creating graph subscription"
        );
        let resp = self
            .send(tenant_id, "create_subscription", |h| {
                h.post(url.clone()).timeout(timeout).json(sub)
            })
            .await?;
        read_json(resp).await
    }

    async fn list_subscriptions(&self, tenant_id: &str) -> Result<Vec<Subscription>, GraphError> {
        let url = Self::url_with(&self.api_url, &["subscriptions"]);
        self.get_pages(tenant_id, "list_subscriptions", url, &[])
            .await
    }

    async fn member_of(
        &self,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<Option<Vec<Group>>, GraphError> {
        Self::check_user_id(user_id)?;
        let mut url = Self::url_with(
            &self.api_url,
            &[
                "users",
                user_id,
                "transitiveMemberOf",
                "microsoft.graph.group",
            ],
        );
        url.set_query(Some(&format!(
            "$select=id,displayName&$top={MEMBER_OF_PAGE_SIZE}&$count=true"
        )));
        // A 404 on a later page means the user went away while we paged: gone all the same.
        match self
            .get_pages(tenant_id, "member_of", url, ADVANCED_QUERY)
            .await
        {
            Ok(groups) => Ok(Some(groups)),
            Err(GraphError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn mailbox_purpose(
        &self,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<Option<String>, GraphError> {
        Self::check_user_id(user_id)?;
        let mut url = Self::url_with(&self.api_url, &["users", user_id, "mailboxSettings"]);
        url.set_query(Some("$select=userPurpose"));
        let settings: Option<MailboxSettings> =
            self.get_one(tenant_id, "mailbox_purpose", url).await?;
        Ok(settings.and_then(|s| s.user_purpose))
    }

    async fn granted_permissions(
        &self,
        tenant_id: &str,
    ) -> Result<Option<Vec<String>>, GraphError> {
        let token = self.access_token(tenant_id).await?;
        Ok(roles_in_token(token.expose_secret()))
    }

    async fn users_delta_start(
        &self,
        tenant_id: &str,
        select: &[&str],
    ) -> Result<DeltaPage, GraphError> {
        let mut url = Self::url_with(&self.api_url, &["users", "delta"]);
        if !select.is_empty() {
            url.set_query(Some(&Self::select_query(select)));
        }
        self.delta_page(tenant_id, "users_delta_start", url).await
    }

    async fn users_delta_next(&self, tenant_id: &str, link: &str) -> Result<DeltaPage, GraphError> {
        let url = self.same_origin(link)?;
        self.delta_page(tenant_id, "users_delta_next", url).await
    }

    async fn users_with_address(
        &self,
        tenant_id: &str,
        address: &str,
    ) -> Result<Vec<GraphUser>, GraphError> {
        self.holders_of(tenant_id, address).await
    }

    async fn renew_subscription(
        &self,
        tenant_id: &str,
        subscription_id: &str,
        expiration: DateTime<Utc>,
    ) -> Result<Subscription, GraphError> {
        Self::check_id("subscription", subscription_id)?;
        let url = Self::url_with(&self.api_url, &["subscriptions", subscription_id]);
        let body = serde_json::json!({ "expirationDateTime": expiration });
        let resp = self
            .send(tenant_id, "renew_subscription", |h| {
                h.patch(url.clone()).json(&body)
            })
            .await?;
        read_json(resp).await
    }

    async fn delete_subscription(
        &self,
        tenant_id: &str,
        subscription_id: &str,
    ) -> Result<(), GraphError> {
        Self::check_id("subscription", subscription_id)?;
        let url = Self::url_with(&self.api_url, &["subscriptions", subscription_id]);
        match self
            .send(tenant_id, "delete_subscription", |h| h.delete(url.clone()))
            .await
        {
            Ok(_) | Err(GraphError::Rejected { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn reauthorize_subscription(
        &self,
        tenant_id: &str,
        subscription_id: &str,
    ) -> Result<(), GraphError> {
        Self::check_id("subscription", subscription_id)?;
        let url = Self::url_with(
            &self.api_url,
            &["subscriptions", subscription_id, "reauthorize"],
        );
        self.send(tenant_id, "reauthorize_subscription", |h| {
            h.post(url.clone())
        })
        .await
        .map(drop)
    }
}

impl GraphClient {
    /// GET one JSON document, through the read queue when batching is on; `Ok(None)` on 404.
    async fn get_one<T: DeserializeOwned>(
        &self,
        tenant_id: &str,
        op: &'static str,
        url: Url,
    ) -> Result<Option<T>, GraphError> {
        let read = match &self.reads {
            Some(queues) => self.read(queues, tenant_id, url).await,
            None => self.get_json(tenant_id, op, &url).await,
        };
        match read {
            Ok(json) => serde_json::from_value(json)
                .map(Some)
                .map_err(|e| GraphError::Rejected {
                    status: 200,
                    body: format!("unexpected answer ({e})"),
                }),
            Err(GraphError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every item of a paged collection, following `@odata.nextLink` (same origin only),
    /// with `headers` on every page's request.
    async fn get_pages<T: DeserializeOwned>(
        &self,
        tenant_id: &str,
        op: &'static str,
        first: Url,
        headers: &[(&str, &str)],
    ) -> Result<Vec<T>, GraphError> {
        let mut next = Some(first);
        let mut all = Vec::new();
        let mut pages = 0;
        while let Some(url) = next.take() {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(GraphError::Rejected {
                    status: 200,
                    body: format!("{op}: more than {MAX_PAGES} pages"),
                });
            }
            let resp = self
                .send(tenant_id, op, |h| {
                    headers
                        .iter()
                        .fold(h.get(url.clone()), |req, (k, v)| req.header(*k, *v))
                })
                .await?;
            let page: Page<T> = read_json(resp).await?;
            all.extend(page.value);
            if let Some(link) = page.next_link {
                next = Some(self.same_origin(&link)?);
            }
        }
        Ok(all)
    }

    /// One page of a users delta round.
    async fn delta_page(
        &self,
        tenant_id: &str,
        op: &'static str,
        url: Url,
    ) -> Result<DeltaPage, GraphError> {
        let resp = self
            .send_to(tenant_id, op, Endpoint::Delta, |h| h.get(url.clone()))
            .await?;
        let wire: DeltaWire = read_json(resp).await?;
        paging::delta_page(wire)
    }

    /// A link Graph handed back, refused unless it points at the configured API origin.
    fn same_origin(&self, link: &str) -> Result<Url, GraphError> {
        paging::same_origin(&self.api_url, link)
    }
}

/// The longest a token is cached, whatever `expires_in` said.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Which endpoint answered: the token endpoint reports bad credentials as 400 or 401; delta
/// queries report an expired or unknown token as 410 or a 4xx with a sync-state code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Token,
    Api,
    Delta,
}

/// Graph error codes (`error.code`) meaning "this delta token is no good: resync".
const DELTA_RESYNC_CODES: &[&str] = &["syncStateNotFound", "resyncRequired"];

/// The one place where HTTP statuses become [`GraphError`]s. 2xx passes the response on.
async fn into_result(
    resp: reqwest::Response,
    endpoint: Endpoint,
) -> Result<reqwest::Response, GraphError> {
    let status = resp.status().as_u16();
    if resp.status().is_success() {
        return Ok(resp);
    }
    let retry_after = parse_retry_after(resp.headers(), Utc::now());
    // The body of an Entra or Graph error carries no secret (the request form is never
    // echoed); it is kept, capped, for the operator.
    let body = error_body(resp).await;
    Err(status_error(status, retry_after, body, endpoint))
}

/// What a non-2xx status means (for a request of its own or one answer of a batch).
fn status_error(
    status: u16,
    retry_after: Option<Duration>,
    body: String,
    endpoint: Endpoint,
) -> GraphError {
    match status {
        429 | 503 => GraphError::Throttled {
            status,
            retry_after,
        },
        500..=599 => GraphError::Server { status, body },
        401 | 403 => GraphError::Unauthorized { status, body },
        400 if endpoint == Endpoint::Token => GraphError::Unauthorized { status, body },
        410 if endpoint == Endpoint::Delta => GraphError::DeltaTokenExpired { status, body },
        400..=499 if endpoint == Endpoint::Delta && is_resync_code(&body) => {
            GraphError::DeltaTokenExpired { status, body }
        }
        _ => GraphError::Rejected { status, body },
    }
}

/// Whether a Graph error body (`{"error":{"code":...}}`) carries one of
/// [`DELTA_RESYNC_CODES`] (compared case-insensitively: Graph's casing of codes varies).
fn is_resync_code(body: &str) -> bool {
    #[derive(Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: String,
    }
    serde_json::from_str::<Body>(body).is_ok_and(|b| {
        DELTA_RESYNC_CODES
            .iter()
            .any(|c| c.eq_ignore_ascii_case(&b.error.code))
    })
}

fn send_error(error: reqwest::Error) -> GraphError {
    if error.is_timeout() {
        GraphError::Timeout
    } else {
        GraphError::Transport(Arc::new(error))
    }
}

async fn error_body(resp: reqwest::Response) -> String {
    match resp.bytes().await {
        Ok(bytes) => capped(&bytes),
        Err(e) => format!("<error body unreadable: {}>", e.without_url()),
    }
}

/// An error body as kept in errors and logs: its first [`MAX_ERROR_BODY`] bytes.
fn capped(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_ERROR_BODY)]).into_owned()
}

/// Read a 2xx answer as JSON; a body that does not parse is [`GraphError::Rejected`].
async fn read_json<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, GraphError> {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(send_error)?;
    serde_json::from_slice(&bytes).map_err(|e| GraphError::Rejected {
        status,
        body: format!("unexpected answer ({e})"),
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `Retry-After` (Graph sends delta-seconds), clamped: see [`crate::retry_after`].
fn parse_retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    crate::retry_after::parse(header_str(headers, RETRY_AFTER.as_str())?, now)
}

/// `GET /users/{id}/mailboxSettings?$select=userPurpose`.
#[derive(Deserialize)]
struct MailboxSettings {
    #[serde(rename = "userPurpose")]
    user_purpose: Option<String>,
}

#[cfg(test)]
mod tests;
