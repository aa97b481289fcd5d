//! [`ProofpointClient`], the HTTP implementation of [`ProofpointApi`]: one `reqwest::Client`,
//! `X-User`/`X-Password` per organization, a client-side throttle per org, and every HTTP
//! answer mapped to a result in one function (`classify`).
//!
//! The client does not retry. Retrying belongs to the worker, whose queue redelivers with
//! exponential backoff and jitter, using [`PpError::is_retryable`] and
//! [`PpError::retry_after`]; retrying here as well would multiply attempts and hide outages.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::time::Instant;
use url::Url;

use super::{OrgAccess, PpError, PpUser, ProofpointApi};
use crate::config::ProofpointConfig;

/// Characters left as they are in a path segment; everything else is percent-encoded, `+`
/// included (some servers decode `+` in paths as a space).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@');

/// Error bodies are cut to this many characters in [`PpError`]s.
const ERROR_BODY_CHARS: usize = 500;
/// Raw bodies are cut to this many characters in logs.
const LOG_BODY_CHARS: usize = 2000;

/// The HTTP client for Proofpoint Essentials API v1.
pub struct ProofpointClient {
    http: reqwest::Client,
    throttle: Throttle,
    requests_per_second: u32,
    request_timeout: Duration,
}

impl std::fmt::Debug for ProofpointClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProofpointClient")
            .field("requests_per_second", &self.requests_per_second)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl ProofpointClient {
    /// At most `requests_per_second` requests per org domain (0 is treated as 1); each request
    /// (connect, send, read the answer) limited to `request_timeout`. Fails only when the
    /// HTTP stack cannot be initialised (e.g. no TLS backend).
    pub fn new(requests_per_second: u32, request_timeout: Duration) -> Result<Self, PpError> {
        let requests_per_second = requests_per_second.max(1);
        let http = reqwest::Client::builder()
            .user_agent(concat!("flagrelay/", env!("CARGO_PKG_VERSION")))
            .timeout(request_timeout)
            .connect_timeout(request_timeout)
            // A redirect would carry X-Password (a custom header, not stripped cross-origin)
            // to wherever it points. Proofpoint does not redirect API calls; refuse them.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(PpError::Transport)?;
        Ok(Self {
            http,
            throttle: Throttle::new(requests_per_second),
            requests_per_second,
            request_timeout,
        })
    }

    pub fn from_config(config: &ProofpointConfig) -> Result<Self, PpError> {
        Self::new(config.requests_per_second, config.request_timeout)
    }

    /// `GET /me`: a cheap credentials check; returns the admin's own record.
    pub async fn me(&self, org: &OrgAccess) -> Result<Value, PpError> {
        let answer = self
            .call(org, "me", Method::GET, &["me"], None, false)
            .await?;
        parse_json(answer)
    }

    /// `GET /orgs/{domain}/settings/azure`: checks credentials (401), rights (403) and that
    /// the org exists (404 → [`PpError::Rejected`]) in one cheap call, and returns the sync
    /// settings (`secret_expiry`, `last_successful_sync`, ...). Worth calling per org at
    /// startup: `get_user` reads any 404 as "no such user", so a mistyped org domain would
    /// otherwise look like an org without users.
    pub async fn azure_settings(&self, org: &OrgAccess) -> Result<Value, PpError> {
        let path = ["orgs", &org.domain, "settings", "azure"];
        let answer = self.call(org, "azure_settings", Method::GET, &path, None, false);
        parse_json(answer.await?)
    }

    /// Send one request and map the answer. `Ok(None)` is a 404 the caller treats as absent
    /// (`absent_ok`); `Ok(Some(_))` any 2xx.
    async fn call(
        &self,
        org: &OrgAccess,
        op: &'static str,
        method: Method,
        segments: &[&str],
        body: Option<Vec<u8>>,
        absent_ok: bool,
    ) -> Result<Option<Answer>, PpError> {
        let url = endpoint(&org.base_url, segments)?;
        let headers = auth_headers(org)?;
        self.throttle.acquire(&org.domain).await;
        let started = Instant::now();
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .headers(headers);
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(body);
        }
        let answer = async {
            let response = request.send().await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(parse_retry_after);
            let bytes = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, retry_after, bytes))
        }
        .await;
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let (status, retry_after, bytes) = match answer {
            Ok(a) => a,
            Err(error) => {
                let error = transport_error(error);
                tracing::warn!(op, org = %org.domain, %method, path = url.path(), elapsed_ms,
                    error = %error, "proofpoint request failed");
                return Err(error);
            }
        };
        let text = redact(&String::from_utf8_lossy(&bytes), org);
        match classify(&org.domain, status, retry_after, &text, absent_ok) {
            Ok(found) => {
                tracing::debug!(op, org = %org.domain, %method, path = url.path(),
                    status = status.as_u16(), elapsed_ms, "proofpoint request done");
                Ok(found.then_some(Answer {
                    status: status.as_u16(),
                    bytes,
                }))
            }
            Err(error) => {
                tracing::warn!(op, org = %org.domain, %method, path = url.path(),
                    status = status.as_u16(), elapsed_ms, body = %truncate(&text, LOG_BODY_CHARS),
                    "proofpoint answered with an error");
                Err(error)
            }
        }
    }
}

#[async_trait]
impl ProofpointApi for ProofpointClient {
    async fn get_user(&self, org: &OrgAccess, email: &str) -> Result<Option<PpUser>, PpError> {
        let path = ["orgs", &org.domain, "users", email];
        let answer = self.call(org, "get_user", Method::GET, &path, None, true);
        answer.await?.map(parse_json).transpose()
    }

    async fn put_user(&self, org: &OrgAccess, user: &PpUser) -> Result<(), PpError> {
        let body = serde_json::to_vec(user).map_err(|e| PpError::Rejected {
            status: 0,
            body: format!("user could not be serialised: {e}"),
        })?;
        let path = ["orgs", &org.domain, "users", &user.primary_email];
        self.call(org, "put_user", Method::PUT, &path, Some(body), false)
            .await
            .map(drop)
    }

    async fn list_users(&self, org: &OrgAccess) -> Result<Vec<PpUser>, PpError> {
        let path = ["orgs", &org.domain, "users"];
        let answer = self.call(org, "list_users", Method::GET, &path, None, false);
        Ok(users_from(parse_json(answer.await?)?, &org.domain))
    }

    async fn count_users(&self, org: &OrgAccess) -> Result<usize, PpError> {
        let path = ["orgs", &org.domain, "users"];
        let answer = self.call(org, "count_users", Method::GET, &path, None, false);
        Ok(parse_json::<UserCount>(answer.await?)?.0)
    }

    async fn exemptions(&self, org: &OrgAccess) -> Result<Vec<String>, PpError> {
        let path = ["orgs", &org.domain, "settings", "azure", "exemptions"];
        let answer = self.call(org, "exemptions", Method::GET, &path, None, false);
        Ok(exemptions_from(&parse_json(answer.await?)?))
    }

    async fn add_exemption(&self, org: &OrgAccess, email: &str) -> Result<(), PpError> {
        // The body shape is UNDOCUMENTED: the reference only says "the address(es) to add
        // (comma-separated list)". We send `{"emails": "<address>"}` — a JSON object (the API
        // is JSON in, JSON out) whose value is a one-item comma-separated list. If Proofpoint
        // turns out to want another shape, it answers 400 and the error log shows its message;
        // this is the one place to change.
        let body = serde_json::json!({ "emails": email.trim() })
            .to_string()
            .into_bytes();
        let path = ["orgs", &org.domain, "settings", "azure", "exemptions"];
        self.call(org, "add_exemption", Method::PUT, &path, Some(body), false)
            .await
            .map(drop)
    }

    async fn remove_exemption(&self, org: &OrgAccess, email: &str) -> Result<(), PpError> {
        let path = [
            "orgs",
            &org.domain,
            "settings",
            "azure",
            "exemptions",
            email,
        ];
        // 404: already gone, which is what we wanted.
        self.call(org, "remove_exemption", Method::DELETE, &path, None, true)
            .await
            .map(drop)
    }
}

/// The one place HTTP answers become results. `Ok(true)`: success with a body to read;
/// `Ok(false)`: a 404 the caller accepts as "absent".
fn classify(
    org: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &str,
    absent_ok: bool,
) -> Result<bool, PpError> {
    let code = status.as_u16();
    match code {
        200..=299 => Ok(true),
        404 if absent_ok => Ok(false),
        401 | 403 => Err(PpError::Unauthorized {
            org: org.to_owned(),
            status: code,
        }),
        429 => Err(PpError::Throttled { retry_after }),
        // A gateway's "you were too slow": retryable like our own timeout.
        408 => Err(PpError::Timeout),
        500..=599 => Err(PpError::Server {
            status: code,
            body: summarize_error(body),
        }),
        // Other 4xx, and 1xx/3xx (redirects are not followed, see `new`).
        _ => Err(PpError::Rejected {
            status: code,
            body: summarize_error(body),
        }),
    }
}

fn transport_error(e: reqwest::Error) -> PpError {
    if e.is_timeout() {
        PpError::Timeout
    } else {
        PpError::Transport(e)
    }
}

/// `Retry-After` (Proofpoint has not been seen to send one), clamped: see
/// [`crate::retry_after`].
fn parse_retry_after(v: &HeaderValue) -> Option<Duration> {
    crate::retry_after::parse(v.to_str().ok()?, chrono::Utc::now())
}

/// The error message(s) in a body, whatever its shape: the batch shape
/// `{"errors":[{"status","error_message","identifier"}]}`, a single `error_message` /
/// `message` / `error` / `detail`, or else the raw text, cut to [`ERROR_BODY_CHARS`].
fn summarize_error(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let messages: Vec<String> = parsed
        .as_ref()
        .map(|v| {
            let listed = v.get("errors").and_then(Value::as_array);
            match listed {
                Some(items) => items.iter().filter_map(item_message).collect(),
                None => item_message(v).into_iter().collect(),
            }
        })
        .unwrap_or_default();
    let text = if messages.is_empty() {
        body.split_whitespace().collect::<Vec<_>>().join(" ")
    } else {
        messages.join("; ")
    };
    truncate(&text, ERROR_BODY_CHARS)
}

fn item_message(v: &Value) -> Option<String> {
    let msg = ["error_message", "message", "error", "detail"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))?;
    Some(match v.get("identifier").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => format!("{msg} ({id})"),
        _ => msg.to_owned(),
    })
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

/// Defence in depth: never log or return the password, even if a server echoes it.
fn redact(text: &str, org: &OrgAccess) -> String {
    let password = org.password.expose_secret();
    if password.is_empty() {
        text.to_owned()
    } else {
        text.replace(password, "***")
    }
}

/// A successful answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    bytes: Bytes,
}

/// A 2xx body we cannot read is a [`PpError::Rejected`] carrying the status and the body.
/// `None` (only possible when the caller allowed a 404) reads as an empty body.
fn parse_json<T: serde::de::DeserializeOwned>(
    answer: impl Into<Option<Answer>>,
) -> Result<T, PpError> {
    let Answer { status, bytes } = answer.into().unwrap_or(Answer {
        status: 404,
        bytes: Bytes::new(),
    });
    serde_json::from_slice(&bytes).map_err(|e| PpError::Rejected {
        status,
        body: format!(
            "unparseable answer ({e}): {}",
            truncate(&String::from_utf8_lossy(&bytes), ERROR_BODY_CHARS)
        ),
    })
}

/// `base` + percent-encoded segments. Dot segments are refused: the URL parser would resolve
/// them and the request would go to another resource.
fn endpoint(base: &Url, segments: &[&str]) -> Result<Url, PpError> {
    let mut path = base.path().trim_end_matches('/').to_owned();
    for segment in segments {
        if segment.is_empty() || *segment == "." || *segment == ".." {
            return Err(PpError::Rejected {
                status: 0,
                body: format!("refusing to build a request path with segment {segment:?}"),
            });
        }
        path.push('/');
        path.extend(utf8_percent_encode(segment, SEGMENT));
    }
    let mut url = base.clone();
    url.set_path(&path);
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

fn auth_headers(org: &OrgAccess) -> Result<HeaderMap, PpError> {
    let unusable = || PpError::Rejected {
        status: 0,
        body: format!(
            "the credentials for org {} contain characters not allowed in HTTP headers",
            org.domain
        ),
    };
    let user = HeaderValue::from_str(&org.username).map_err(|_| unusable())?;
    let mut password =
        HeaderValue::from_bytes(org.password.expose_secret().as_bytes()).map_err(|_| unusable())?;
    // Keeps it out of any Debug output of the request (and out of HPACK tables).
    password.set_sensitive(true);
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert("x-user", user);
    headers.insert("x-password", password);
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    Ok(headers)
}

/// `{"users":[...]}` or, leniently, a bare list. Entries that are not users (no
/// `primary_email`) are skipped with a warning rather than failing the whole org.
fn users_from(value: Value, org: &str) -> Vec<PpUser> {
    let items = match value {
        Value::Array(items) => items,
        Value::Object(mut m) => match m.remove("users") {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let total = items.len();
    let users: Vec<PpUser> = items
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    if users.len() != total {
        tracing::warn!(
            org,
            skipped = total - users.len(),
            "proofpoint user list had entries that are not users"
        );
    }
    users
}

/// The number of entries of a user list answer (a bare array or `{"users": [...]}`, as
/// [`users_from`] reads it), counted without keeping them.
struct UserCount(usize);

impl<'de> serde::Deserialize<'de> for UserCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct Counter;
        impl<'de> Visitor<'de> for Counter {
            type Value = UserCount;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of users")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UserCount, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(UserCount(n))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UserCount, A::Error> {
                let mut n = 0;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "users" {
                        n = map.next_value::<UserCount>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(UserCount(n))
            }
        }
        d.deserialize_any(Counter)
    }
}

/// A list of `{"email": ...}` objects or, leniently, of strings, possibly wrapped in an
/// object; lower-cased, trimmed, duplicates removed, order kept.
fn exemptions_from(value: &Value) -> Vec<String> {
    let items = match value {
        Value::Array(items) => items.as_slice(),
        Value::Object(m) => ["exemptions", "emails", "data"]
            .iter()
            .find_map(|k| m.get(*k).and_then(Value::as_array))
            .map_or(&[][..], Vec::as_slice),
        _ => &[],
    };
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let email = match item {
            Value::String(s) => Some(s.as_str()),
            Value::Object(m) => m.get("email").and_then(Value::as_str),
            _ => None,
        };
        if let Some(e) = email.map(|e| e.trim().to_ascii_lowercase())
            && !e.is_empty()
            && !out.contains(&e)
        {
            out.push(e);
        }
    }
    out
}

/// At most `rate` requests per second per key, evenly spaced: each request reserves the next
/// free slot and waits for it (so callers queue rather than fail). Keys are org domains, a
/// small fixed set, so the map does not need pruning.
#[derive(Debug)]
struct Throttle {
    interval: Duration,
    next_free: Mutex<HashMap<String, Instant>>,
}

impl Throttle {
    fn new(rate: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / rate.max(1),
            next_free: Mutex::new(HashMap::new()),
        }
    }

    /// The instant the caller may send at; books the following slot.
    fn reserve(&self, key: &str, now: Instant) -> Instant {
        let mut next = self
            .next_free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = key.to_ascii_lowercase();
        let slot = next.get(&key).map_or(now, |&free| free.max(now));
        next.insert(key, slot + self.interval);
        slot
    }

    async fn acquire(&self, key: &str) {
        let slot = self.reserve(key, Instant::now());
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use tokio::net::TcpListener;

    use super::*;
    use crate::sim::proofpoint::{ProofpointSim, ProofpointSimFaults, SimServer};

    const ORG: &str = "example.com";
    const ADMIN: &str = "admin@example.com";
    const PASSWORD: &str = "correct-horse-battery";

    async fn sim() -> (ProofpointSim, SimServer, OrgAccess) {
        let sim = ProofpointSim::new();
        sim.add_org(ORG);
        sim.add_org("other.com");
        sim.add_admin(ADMIN, PASSWORD, Some(vec![ORG.into()]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = sim.spawn(listener).await;
        let org = server.org_access(ORG, ADMIN, PASSWORD);
        (sim, server, org)
    }

    fn client() -> ProofpointClient {
        ProofpointClient::new(1000, Duration::from_secs(5)).unwrap()
    }

    fn full_user(email: &str) -> Value {
        json!({
            "uid": 4242, "primary_email": email, "firstname": "Ada", "surname": "L",
            "type": "end_user", "is_active": true, "is_billable": true,
            "alias_emails": ["ada.alias@example.com"], "safe_list_senders": [],
            "block_list_senders": ["spam@bad.example"], "read_only_user": false,
            "odin_settings": {"quarantine": {"digest": true}}, "future_field": {"kept": [1, 2]}
        })
    }

    #[tokio::test]
    async fn read_modify_write_keeps_every_field_it_does_not_know() {
        let (sim, _server, org) = sim().await;
        sim.upsert_user(ORG, full_user("ada@example.com")).unwrap();
        let c = client();

        let mut user = c.get_user(&org, "ADA@example.com").await.unwrap().unwrap();
        assert!(user.is_active);
        user.is_active = false;
        c.put_user(&org, &user).await.unwrap();

        let mut expected = full_user("ada@example.com");
        expected["is_active"] = json!(false);
        // The default PutMode::Replace stores exactly the body: nothing may have been dropped.
        assert_eq!(sim.user_json(ORG, "ada@example.com").unwrap(), expected);
        let write = sim.writes().pop().unwrap();
        assert_eq!(write.method, "PUT");
        assert_eq!(write.after, Some(expected));

        let all = c.list_users(&org).await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].other["future_field"], json!({"kept": [1, 2]}));
    }

    #[tokio::test]
    async fn count_users_counts_what_list_users_lists() {
        let (sim, _server, org) = sim().await;
        let c = client();
        assert_eq!(c.count_users(&org).await.unwrap(), 0);
        for i in 0..3 {
            sim.upsert_user(ORG, full_user(&format!("u{i}@example.com")))
                .unwrap();
        }
        assert_eq!(c.count_users(&org).await.unwrap(), 3);
        assert_eq!(c.list_users(&org).await.unwrap().len(), 3);
    }

    #[test]
    fn user_counts_read_both_list_shapes() {
        let count = |v: Value| serde_json::from_value::<UserCount>(v).unwrap().0;
        assert_eq!(
            count(json!([{"primary_email": "a@x"}, {"primary_email": "b@x"}])),
            2
        );
        assert_eq!(
            count(json!({"total": 9, "users": [{"primary_email": "a@x"}]})),
            1
        );
        assert_eq!(count(json!({"total": 9})), 0);
    }

    #[tokio::test]
    async fn unknown_user_is_none_and_plus_addresses_are_encoded() {
        let (sim, _server, org) = sim().await;
        let c = client();
        assert_eq!(c.get_user(&org, "nobody@example.com").await.unwrap(), None);

        sim.upsert_user(ORG, json!({"primary_email": "a+tag@example.com"}))
            .unwrap();
        let u = c
            .get_user(&org, "a+tag@example.com")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(u.primary_email, "a+tag@example.com");
        let path = sim.request_log().pop().unwrap().path;
        assert_eq!(path, "/api/v1/orgs/example.com/users/a%2Btag@example.com");
    }

    #[tokio::test]
    async fn bad_credentials_and_missing_rights_are_unauthorized() {
        let (sim, server, org) = sim().await;
        let c = client();

        let wrong = server.org_access(ORG, ADMIN, "wrong-password-value");
        let err = c.get_user(&wrong, "a@example.com").await.unwrap_err();
        assert!(
            matches!(&err, PpError::Unauthorized { org, status: 401 } if org == ORG),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        assert!(!format!("{err} {err:?}").contains("wrong-password-value"));

        let elsewhere = server.org_access("other.com", ADMIN, PASSWORD);
        let err = c.list_users(&elsewhere).await.unwrap_err();
        assert!(
            matches!(err, PpError::Unauthorized { status: 403, .. }),
            "{err:?}"
        );
        assert!(c.me(&org).await.unwrap()["primary_email"] == ADMIN);
        let settings = c.azure_settings(&org).await.unwrap();
        assert!(settings["secret_expiry"].is_string());

        // An org that does not exist is an error here, not an empty org.
        sim.add_admin("partner@msp.example", PASSWORD, None);
        let typo = server.org_access("exmaple.com", "partner@msp.example", PASSWORD);
        let err = c.azure_settings(&typo).await.unwrap_err();
        assert!(
            matches!(err, PpError::Rejected { status: 404, .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn throttling_and_server_errors_are_retryable() {
        let (sim, _server, org) = sim().await;
        let c = client();

        sim.fail_next(1, 429);
        let err = c.exemptions(&org).await.unwrap_err();
        assert!(
            matches!(err, PpError::Throttled { retry_after: None }),
            "{err:?}"
        );
        assert!(err.is_retryable());

        sim.set_faults(ProofpointSimFaults {
            fail_next: vec![429],
            retry_after_secs: Some(7),
            ..Default::default()
        });
        let err = c.exemptions(&org).await.unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));

        sim.fail_next(1, 503);
        match c.list_users(&org).await.unwrap_err() {
            e @ PpError::Server { status: 503, .. } => {
                assert!(e.is_retryable());
                assert!(e.to_string().contains("Service Unavailable"), "{e}");
            }
            other => panic!("expected Server, got {other:?}"),
        }
        assert!(c.list_users(&org).await.is_ok(), "recovers after the fault");
    }

    #[tokio::test]
    async fn a_slow_answer_is_a_timeout_and_a_closed_port_is_transport() {
        let (sim, server, org) = sim().await;
        sim.set_latency(Duration::from_secs(2), Duration::ZERO);
        let c = ProofpointClient::new(1000, Duration::from_millis(200)).unwrap();
        let err = c.get_user(&org, "a@example.com").await.unwrap_err();
        assert!(matches!(err, PpError::Timeout), "{err:?}");
        assert!(err.is_retryable());
        drop(server);

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let mut nowhere = org.clone();
        nowhere.base_url = format!("http://127.0.0.1:{port}/api/v1").parse().unwrap();
        let err = c.get_user(&nowhere, "a@example.com").await.unwrap_err();
        assert!(matches!(err, PpError::Transport(_)), "{err:?}");
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn license_refusal_is_rejected_with_the_servers_message() {
        let (sim, _server, org) = sim().await;
        sim.set_license_cap(ORG, Some(1)).unwrap();
        sim.upsert_user(
            ORG,
            json!({"primary_email": "on@example.com", "is_active": true}),
        )
        .unwrap();
        sim.upsert_user(
            ORG,
            json!({"primary_email": "off@example.com", "is_active": false}),
        )
        .unwrap();
        let c = client();
        let mut off = c.get_user(&org, "off@example.com").await.unwrap().unwrap();
        off.is_active = true;
        match c.put_user(&org, &off).await.unwrap_err() {
            e @ PpError::Rejected { status: 400, .. } => {
                assert!(!e.is_retryable());
                assert!(e.to_string().contains("License limit reached"), "{e}");
                assert!(e.to_string().contains("off@example.com"), "{e}");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn exemptions_are_added_listed_and_removed() {
        let (sim, _server, org) = sim().await;
        let c = client();
        assert!(c.exemptions(&org).await.unwrap().is_empty());
        c.add_exemption(&org, "Shared+Box@Example.com")
            .await
            .unwrap();
        c.add_exemption(&org, "b@example.com").await.unwrap();
        assert_eq!(
            c.exemptions(&org).await.unwrap(),
            ["b@example.com", "shared+box@example.com"]
        );
        assert_eq!(
            sim.exemptions(ORG),
            ["b@example.com", "shared+box@example.com"]
        );
        c.remove_exemption(&org, "shared+box@example.com")
            .await
            .unwrap();
        c.remove_exemption(&org, "shared+box@example.com")
            .await
            .expect("removing an absent exemption is fine");
        assert_eq!(c.exemptions(&org).await.unwrap(), ["b@example.com"]);
    }

    #[tokio::test]
    async fn requests_per_org_are_spaced_by_the_rate_limit() {
        let (sim, _server, org) = sim().await;
        let (n, rate) = (4u32, 10u32);
        let c = ProofpointClient::new(rate, Duration::from_secs(5)).unwrap();
        let calls = (0..n).map(|_| c.exemptions(&org));
        for r in futures::future::join_all(calls).await {
            r.unwrap();
        }
        let log = sim.request_log();
        assert_eq!(log.len(), n as usize);
        let first = log.iter().map(|r| r.started).min().unwrap();
        let last = log.iter().map(|r| r.started).max().unwrap();
        // Sends are spaced exactly; arrival can shift by scheduling noise, hence the slack.
        let expected = Duration::from_secs(1) * (n - 1) / rate;
        assert!(
            last - first + Duration::from_millis(50) >= expected,
            "{:?} < {expected:?}",
            last - first
        );
    }

    #[test]
    fn the_throttle_spaces_each_org_on_its_own() {
        let t = Throttle::new(4);
        let now = Instant::now();
        let step = Duration::from_millis(250);
        assert_eq!(t.reserve("a.com", now), now);
        assert_eq!(t.reserve("A.com", now), now + step);
        assert_eq!(t.reserve("a.com", now), now + step * 2);
        assert_eq!(t.reserve("b.com", now), now, "another org is not held up");
        let later = now + Duration::from_secs(10);
        assert_eq!(t.reserve("a.com", later), later, "idle time is not banked");
    }

    #[test]
    fn classify_maps_every_status_class() {
        let c = |status: u16, absent_ok| {
            classify(
                "o.com",
                StatusCode::from_u16(status).unwrap(),
                None,
                "{}",
                absent_ok,
            )
        };
        assert!(matches!(c(200, false), Ok(true)));
        assert!(matches!(c(204, false), Ok(true)));
        assert!(matches!(c(404, true), Ok(false)));
        assert!(matches!(
            c(404, false),
            Err(PpError::Rejected { status: 404, .. })
        ));
        assert!(matches!(
            c(401, true),
            Err(PpError::Unauthorized { status: 401, .. })
        ));
        assert!(matches!(
            c(403, false),
            Err(PpError::Unauthorized { status: 403, .. })
        ));
        assert!(matches!(c(429, false), Err(PpError::Throttled { .. })));
        assert!(matches!(c(408, false), Err(PpError::Timeout)));
        assert!(matches!(
            c(500, false),
            Err(PpError::Server { status: 500, .. })
        ));
        assert!(matches!(
            c(302, false),
            Err(PpError::Rejected { status: 302, .. })
        ));
        assert!(matches!(
            c(409, false),
            Err(PpError::Rejected { status: 409, .. })
        ));
    }

    #[test]
    fn error_bodies_are_summarised_whatever_their_shape() {
        let batch = r#"{"errors":[{"status":409,"error_message":"User already exists","identifier":"a@x.com"},{"status":400,"error_message":"bad"}]}"#;
        assert_eq!(summarize_error(batch), "User already exists (a@x.com); bad");
        assert_eq!(summarize_error(r#"{"message":"nope"}"#), "nope");
        assert_eq!(
            summarize_error("<html>\n <h1>Bad   Gateway</h1></html>"),
            "<html> <h1>Bad Gateway</h1></html>"
        );
        let long = "é".repeat(2 * ERROR_BODY_CHARS);
        assert_eq!(summarize_error(&long).chars().count(), ERROR_BODY_CHARS + 1);
    }

    #[test]
    fn lenient_list_shapes() {
        let users = users_from(
            json!([{"primary_email": "a@x.com"}, {"no": "email"}]),
            "x.com",
        );
        assert_eq!(users.len(), 1);
        let wrapped = users_from(json!({"users": [{"primary_email": "a@x.com"}]}), "x.com");
        assert_eq!(wrapped.len(), 1);
        assert_eq!(
            exemptions_from(&json!([{"email": "A@x.com"}, "b@x.com", {"email": "a@x.com"}, 7])),
            ["a@x.com", "b@x.com"]
        );
        assert_eq!(
            exemptions_from(&json!({"exemptions": [{"email": "c@x.com"}]})),
            ["c@x.com"]
        );
    }

    #[test]
    fn paths_are_encoded_and_dot_segments_refused() {
        let base: Url = "https://us1.proofpointessentials.com/api/v1/"
            .parse()
            .unwrap();
        let url = endpoint(&base, &["orgs", "x.com", "users", "a+b c/d@x.com"]).unwrap();
        assert_eq!(url.path(), "/api/v1/orgs/x.com/users/a%2Bb%20c%2Fd@x.com");
        assert!(endpoint(&base, &["orgs", "..", "users"]).is_err());
        assert!(endpoint(&base, &["orgs", "", "users"]).is_err());
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        let v = |s: &'static str| parse_retry_after(&HeaderValue::from_static(s));
        assert_eq!(v("12"), Some(Duration::from_secs(12)));
        assert_eq!(v("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(v("soon"), None);
    }

    #[test]
    fn debug_and_redaction_never_show_the_password() {
        let org = OrgAccess {
            domain: ORG.into(),
            base_url: "http://127.0.0.1:1/api/v1".parse().unwrap(),
            username: ADMIN.into(),
            password: secrecy::SecretString::from(PASSWORD.to_owned()),
        };
        assert_eq!(redact(&format!("echo: {PASSWORD}!"), &org), "echo: ***!");
        let headers = auth_headers(&org).unwrap();
        assert!(!format!("{headers:?}").contains(PASSWORD));
        assert!(!format!("{:?}", client()).contains(PASSWORD));
    }
}
