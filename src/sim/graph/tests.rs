//! Tests of the Graph simulator through its HTTP surface, plus [`Subscriber`], a tiny
//! notification endpoint (handshake + collector) that the Graph client's tests use too.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use url::Url;

use super::*;

/// `POST /$batch`.
mod batch;
/// `/users/delta` and the change log.
mod delta;
/// Tokens and permissions, groups and mailboxes.
mod directory;
/// The user list `/users` and its `$filter`.
mod users;

pub(crate) const TENANT: &str = "11111111-aaaa-4aaa-8aaa-111111111111";
pub(crate) const APP: &str = "22222222-bbbb-4bbb-8bbb-222222222222";
pub(crate) const SECRET: &str = "app-secret-value-xyz";
pub(crate) const CLIENT_STATE: &str = "client-state-secret-0123456789";

/// How a [`Subscriber`] answers validation requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Handshake {
    Echo,
    WrongBody,
    HtmlContentType,
    Status(u16),
    Slow(Duration),
}

#[derive(Debug)]
struct SubscriberState {
    handshake: Handshake,
    validations: Mutex<Vec<String>>,
    posts: Mutex<Vec<Value>>,
    fail_first: AtomicU32,
    post_delay: Mutex<Duration>,
}

/// A notification endpoint on 127.0.0.1:0: answers handshakes as told, records posts,
/// answers 202 (or 500 for the first `fail_first` posts).
#[derive(Debug)]
pub(crate) struct Subscriber {
    pub url: Url,
    state: Arc<SubscriberState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn subscriber_endpoint(
    State(s): State<Arc<SubscriberState>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let token = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "validationToken")
            .map(|(_, v)| v.into_owned())
    });
    if let Some(token) = token {
        s.validations.lock().unwrap().push(token.clone());
        let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
        return match s.handshake {
            Handshake::Echo => (StatusCode::OK, text, token).into_response(),
            Handshake::WrongBody => (StatusCode::OK, text, "nope").into_response(),
            Handshake::HtmlContentType => {
                (StatusCode::OK, [(header::CONTENT_TYPE, "text/html")], token).into_response()
            }
            Handshake::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
            Handshake::Slow(d) => {
                tokio::time::sleep(d).await;
                (StatusCode::OK, text, token).into_response()
            }
        };
    }
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.posts.lock().unwrap().push(value);
    let delay = *s.post_delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let failing = s
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::ACCEPTED
    }
    .into_response()
}

impl Subscriber {
    pub async fn start(handshake: Handshake) -> Self {
        let state = Arc::new(SubscriberState {
            handshake,
            validations: Mutex::default(),
            posts: Mutex::default(),
            fail_first: AtomicU32::new(0),
            post_delay: Mutex::new(Duration::ZERO),
        });
        let app = axum::Router::new()
            .route("/notify", axum::routing::post(subscriber_endpoint))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/notify", listener.local_addr().unwrap())).unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, state, task }
    }

    pub fn fail_first(&self, n: u32) {
        self.state.fail_first.store(n, Ordering::SeqCst);
    }

    /// Answer notification posts only after `delay`.
    pub fn set_post_delay(&self, delay: Duration) {
        *self.state.post_delay.lock().unwrap() = delay;
    }

    pub fn validations(&self) -> Vec<String> {
        self.state.validations.lock().unwrap().clone()
    }

    /// Every notification POST body received.
    pub fn posts(&self) -> Vec<Value> {
        self.state.posts.lock().unwrap().clone()
    }

    /// Every notification item received, in arrival order.
    pub fn items(&self) -> Vec<Value> {
        self.posts()
            .iter()
            .flat_map(|p| p["value"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

/// A running simulator with one app, one tenant, one user and a raw HTTP client holding a
/// token.
struct Harness {
    sim: GraphSim,
    server: SimServer,
    http: reqwest::Client,
    token: String,
}

fn alice() -> GraphUser {
    GraphUser {
        id: "aaaaaaaa-0000-4000-8000-00000000000a".into(),
        account_enabled: Some(true),
        user_principal_name: Some("alice@example.com".into()),
        mail: Some("alice@example.com".into()),
        proxy_addresses: Some(vec!["SMTP:alice@example.com".into()]),
        user_type: Some("Member".into()),
        department: Some("Sales".into()),
        ..Default::default()
    }
}

async fn harness() -> Harness {
    let sim = GraphSim::with_seed(7);
    sim.add_app(APP, SECRET);
    sim.add_tenant(TENANT);
    sim.upsert_user(TENANT, alice()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = sim.spawn(listener).await.unwrap();
    let http = reqwest::Client::new();
    let mut h = Harness {
        sim,
        server,
        http,
        token: String::new(),
    };
    let (status, body) = h.token_request(TENANT, APP, SECRET).await;
    assert_eq!(status, 200, "{body}");
    h.token = body["access_token"].as_str().unwrap().to_owned();
    h
}

impl Harness {
    async fn token_request(&self, tenant: &str, client_id: &str, secret: &str) -> (u16, Value) {
        let url = self
            .server
            .authority_url()
            .join(&format!("{tenant}/oauth2/v2.0/token"))
            .unwrap();
        let form = [
            ("client_id", client_id),
            ("client_secret", secret),
            ("scope", "https://graph.microsoft.com/.default"),
            ("grant_type", "client_credentials"),
        ];
        let resp = self.http.post(url).form(&form).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.api_url())
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            self.url(path)
        };
        let mut req = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn subscribe(&self, url: &Url, resource: &str, change_type: &str) -> (u16, Value) {
        let body = json!({
            "changeType": change_type,
            "notificationUrl": url,
            "resource": resource,
            "expirationDateTime": Utc::now() + TimeDelta::hours(2),
            "clientState": CLIENT_STATE,
        });
        self.call(reqwest::Method::POST, "/subscriptions", Some(body))
            .await
    }

    /// Control API call (not authenticated).
    async fn control(&self, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
        let url = self.server.base_url().join(path).unwrap();
        let resp = self
            .http
            .request(method, url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

const SETTLE: Duration = Duration::from_secs(10);

fn fast_delivery(sim: &GraphSim) {
    sim.update_faults(|f| {
        f.retry_base_delay = Duration::from_millis(20);
        f.hold_back = Duration::from_millis(100);
    })
    .unwrap();
}

#[tokio::test]
async fn token_endpoint_refuses_like_entra_and_counts_requests() {
    let h = harness().await;
    let cases = [
        (
            "99999999-0000-0000-0000-000000000000",
            APP,
            SECRET,
            400,
            "invalid_request",
            "AADSTS90002",
        ),
        (TENANT, APP, "wrong", 401, "invalid_client", "AADSTS7000215"),
        (
            TENANT,
            "unknown-app",
            SECRET,
            401,
            "invalid_client",
            "AADSTS700016",
        ),
    ];
    for (tenant, app, secret, status, error, code) in cases {
        let (got, body) = h.token_request(tenant, app, secret).await;
        assert_eq!(got, status, "{body}");
        assert_eq!(body["error"], error);
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .starts_with(code),
            "{body}"
        );
        assert!(!body.to_string().contains(SECRET), "{body}");
    }
    assert_eq!(h.sim.token_requests(), 4);
    // Tokens are bound to their tenant: unknown in another tenant's API is impossible, and
    // the issued one is a bearer of the right shape.
    let (status, body) = h.token_request(TENANT, APP, SECRET).await;
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
}

#[tokio::test]
async fn api_requires_a_valid_unexpired_bearer_token() {
    let h = harness().await;
    let resp = h.http.get(h.url("/users/x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "InvalidAuthenticationToken");

    let resp = h
        .http
        .get(h.url("/users/x"))
        .bearer_auth("forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    h.sim.update_settings(|s| s.token_lifetime = Duration::ZERO);
    let (_, body) = h.token_request(TENANT, APP, SECRET).await;
    let expired = body["access_token"].as_str().unwrap();
    let resp = h
        .http
        .get(h.url("/users/x"))
        .bearer_auth(expired)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );

    h.sim.revoke_tokens();
    let (status, _) = h.get(&format!("/users/{}", alice().id)).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn users_honour_select_and_the_default_property_set() {
    let h = harness().await;
    let id = alice().id;
    let (status, body) = h.get(&format!("/users/{id}")).await;
    assert_eq!(status, 200);
    let obj = body.as_object().unwrap();
    assert!(!obj.contains_key("accountEnabled"), "{body}");
    assert!(!obj.contains_key("proxyAddresses"), "{body}");
    assert!(!obj.contains_key("department"), "{body}");
    assert_eq!(body["userPrincipalName"], "alice@example.com");
    assert_eq!(body["displayName"], Value::Null);
    assert!(
        body["@odata.context"]
            .as_str()
            .unwrap()
            .contains("$metadata#users")
    );

    let (status, body) = h
        .get(&format!(
            "/users/{}?$select=accountEnabled,Department,employeeType",
            id.to_uppercase()
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut keys: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "@odata.context",
            "accountEnabled",
            "department",
            "employeeType",
            "id"
        ]
    );
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["accountEnabled"], true);
    assert_eq!(body["employeeType"], Value::Null);

    // Encoded `$` and UPN lookup work as in Graph.
    let (status, body) = h
        .get("/users/Alice@Example.com?%24select=proxyAddresses")
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["proxyAddresses"], json!(["SMTP:alice@example.com"]));

    let (status, body) = h.get(&format!("/users/{id}?$select=noSuchProperty")).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("noSuchProperty")
    );

    let (status, body) = h.get("/users/nobody").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "Request_ResourceNotFound");

    let resp = h
        .http
        .get(h.url(&format!("/users/{id}")))
        .bearer_auth(&h.token)
        .header("client-request-id", "cr-123")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("request-id"));
    assert_eq!(resp.headers()["client-request-id"], "cr-123");
    let log = h.sim.request_log();
    let last = log.last().unwrap();
    assert_eq!(last.client_request_id.as_deref(), Some("cr-123"));
    assert_eq!(last.tenant.as_deref(), Some(TENANT));
    assert_eq!((last.method.as_str(), last.status), ("GET", 200));
    assert!(last.finished >= last.started && last.finished_at >= last.started_at);
}

#[tokio::test]
async fn subscription_requests_are_validated_before_any_handshake() {
    let h = harness().await;
    let sub = Subscriber::start(Handshake::Echo).await;
    let now = Utc::now();
    let base = json!({
        "changeType": "updated,deleted",
        "notificationUrl": sub.url,
        "resource": "users",
        "expirationDateTime": now + TimeDelta::hours(1),
        "clientState": CLIENT_STATE,
    });
    let cases: [(&str, Value); 7] = [
        ("changeType", json!("created,updated")),
        ("changeType", json!("updated,bogus")),
        ("resource", json!("groups")),
        ("expirationDateTime", json!(now - TimeDelta::minutes(1))),
        (
            "expirationDateTime",
            json!(now + TimeDelta::minutes(41_770)),
        ),
        ("clientState", json!("x".repeat(129))),
        ("notificationUrl", json!("ftp://example.com/x")),
    ];
    for (field, value) in cases {
        let mut body = base.clone();
        body[field] = value.clone();
        let (status, answer) = h
            .call(reqwest::Method::POST, "/subscriptions", Some(body))
            .await;
        assert_eq!(status, 400, "{field}={value}: {answer}");
        assert_eq!(answer["error"]["code"], "InvalidRequest");
    }
    assert!(sub.validations().is_empty());
    assert!(h.sim.subscriptions(TENANT).is_empty());

    // Short lifetimes are raised to 45 minutes; `Users/{id}` is accepted case-insensitively.
    let mut body = base.clone();
    body["expirationDateTime"] = json!(now + TimeDelta::minutes(5));
    body["resource"] = json!("Users/ABC");
    let (status, answer) = h
        .call(reqwest::Method::POST, "/subscriptions", Some(body))
        .await;
    assert_eq!(status, 201, "{answer}");
    let exp: DateTime<Utc> = answer["expirationDateTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(exp >= now + TimeDelta::minutes(45) && exp < now + TimeDelta::minutes(46));
}

#[tokio::test]
async fn handshake_success_validates_both_urls_and_hides_client_state() {
    let h = harness().await;
    let sub = Subscriber::start(Handshake::Echo).await;
    let body = json!({
        "changeType": "updated,deleted",
        "notificationUrl": sub.url,
        "lifecycleNotificationUrl": sub.url,
        "resource": "users",
        "expirationDateTime": Utc::now() + TimeDelta::days(2),
        "clientState": CLIENT_STATE,
    });
    let (status, answer) = h
        .call(reqwest::Method::POST, "/subscriptions", Some(body))
        .await;
    assert_eq!(status, 201, "{answer}");
    let validations = sub.validations();
    assert_eq!(
        validations.len(),
        2,
        "notification URL and lifecycle URL, even if equal"
    );
    assert!(validations[0].contains(' ') && validations[0].contains(':'));
    assert_ne!(validations[0], validations[1]);
    for key in [
        "id",
        "resource",
        "changeType",
        "notificationUrl",
        "lifecycleNotificationUrl",
        "expirationDateTime",
        "applicationId",
        "creatorId",
    ] {
        assert!(!answer[key].is_null(), "{key} missing in {answer}");
    }
    assert_eq!(answer["applicationId"], APP.to_ascii_lowercase());
    assert!(!answer.to_string().contains(CLIENT_STATE));
    let stored = h.sim.subscriptions(TENANT);
    assert_eq!(stored.len(), 1);
    assert!(!format!("{stored:?}").contains(CLIENT_STATE));
}

#[tokio::test]
async fn handshake_failures_refuse_creation_and_store_nothing() {
    let h = harness().await;
    h.sim
        .update_settings(|s| s.handshake_timeout = Duration::from_millis(300));
    for mode in [
        Handshake::WrongBody,
        Handshake::HtmlContentType,
        Handshake::Status(500),
        Handshake::Status(202),
        Handshake::Slow(Duration::from_secs(2)),
    ] {
        let sub = Subscriber::start(mode).await;
        let (status, answer) = h.subscribe(&sub.url, "users", "updated").await;
        assert_eq!(status, 400, "{mode:?}: {answer}");
        assert_eq!(answer["error"]["code"], "ValidationError");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("validation")
        );
        assert_eq!(sub.validations().len(), 1, "{mode:?}");
    }
    assert!(h.sim.subscriptions(TENANT).is_empty());

    // Unreachable endpoint: refused too.
    let closed = Url::parse("http://127.0.0.1:9/notify").unwrap();
    let (status, _) = h.subscribe(&closed, "users", "updated").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn duplicate_subscriptions_conflict_and_lists_page_per_app() {
    let h = harness().await;
    let sub = Subscriber::start(Handshake::Echo).await;
    assert_eq!(
        h.subscribe(&sub.url, "users", "updated,deleted").await.0,
        201
    );
    let (status, answer) = h.subscribe(&sub.url, "Users", "deleted, updated").await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(h.subscribe(&sub.url, "users/abc", "updated").await.0, 201);
    assert_eq!(h.subscribe(&sub.url, "users", "updated").await.0, 201);

    h.sim.update_settings(|s| s.page_size = 2);
    let (status, page1) = h.get("/subscriptions").await;
    assert_eq!(status, 200);
    assert_eq!(page1["value"].as_array().unwrap().len(), 2);
    let next = page1["@odata.nextLink"].as_str().unwrap();
    let (_, page2) = h.get(next).await;
    assert_eq!(page2["value"].as_array().unwrap().len(), 1);
    assert!(page2.get("@odata.nextLink").is_none());
    assert!(!page1.to_string().contains("clientState"));

    // Another app sees none of them.
    h.sim.add_app("other-app", "other-secret");
    let (_, other) = h.token_request(TENANT, "other-app", "other-secret").await;
    let resp = h
        .http
        .get(h.url("/subscriptions"))
        .bearer_auth(other["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["value"], json!([]));
}

#[tokio::test]
async fn renew_reauthorize_and_delete() {
    let h = harness().await;
    let sub = Subscriber::start(Handshake::Echo).await;
    let (_, created) = h.subscribe(&sub.url, "users", "updated").await;
    let id = created["id"].as_str().unwrap();
    let path = format!("/subscriptions/{id}");
    let later = Utc::now() + TimeDelta::days(3);
    let (status, renewed) = h
        .call(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"expirationDateTime": later})),
        )
        .await;
    assert_eq!(status, 200, "{renewed}");
    let exp: DateTime<Utc> = renewed["expirationDateTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((exp - later).num_seconds().abs() < 1);
    let (status, _) = h
        .call(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"expirationDateTime": Utc::now() + TimeDelta::days(40)})),
        )
        .await;
    assert_eq!(status, 400);

    let (status, _) = h
        .call(reqwest::Method::POST, &format!("{path}/reauthorize"), None)
        .await;
    assert_eq!(status, 204);
    let (_, after) = h.get(&path).await;
    assert_eq!(after["expirationDateTime"], renewed["expirationDateTime"]);

    assert_eq!(h.call(reqwest::Method::DELETE, &path, None).await.0, 204);
    assert_eq!(h.get(&path).await.0, 404);
    assert_eq!(h.call(reqwest::Method::DELETE, &path, None).await.0, 404);
}

#[tokio::test]
async fn a_change_notifies_matching_subscriptions_in_graph_shape() {
    let h = harness().await;
    fast_delivery(&h.sim);
    let sub = Subscriber::start(Handshake::Echo).await;
    let alice_id = alice().id;
    let (_, all) = h.subscribe(&sub.url, "users", "updated,deleted").await;
    // Covers another user only, and deletions only: neither fires for Alice's update.
    assert_eq!(
        h.subscribe(&sub.url, "users/someone-else", "updated")
            .await
            .0,
        201
    );
    assert_eq!(
        h.subscribe(&sub.url, &format!("users/{alice_id}"), "deleted")
            .await
            .0,
        201
    );

    h.sim.set_account_enabled(TENANT, &alice_id, false).unwrap();
    assert!(h.sim.settle(SETTLE).await);
    let items = sub.items();
    assert_eq!(items.len(), 1, "{items:?}");
    let item = &items[0];
    assert_eq!(item["subscriptionId"], all["id"]);
    assert_eq!(item["changeType"], "updated");
    assert_eq!(item["clientState"], CLIENT_STATE);
    assert_eq!(item["tenantId"], TENANT);
    assert_eq!(item["resource"], format!("Users/{alice_id}"));
    let rd = &item["resourceData"];
    assert_eq!(rd["@odata.type"], "#Microsoft.Graph.User");
    assert_eq!(rd["@odata.id"], format!("Users/{alice_id}"));
    assert_eq!(rd["id"], alice_id.as_str());
    assert_eq!(rd["organizationId"], TENANT);
    assert!(rd["sequenceNumber"].is_u64());
    let event_time = rd["eventTime"].as_str().unwrap();
    assert_eq!(
        event_time.len(),
        "2026-11-23T10:00:00.1234567Z".len(),
        "{event_time}"
    );
    assert!(event_time.parse::<DateTime<Utc>>().is_ok());
    let exp = item["subscriptionExpirationDateTime"].as_str().unwrap();
    assert!(exp.ends_with("+00:00"), "{exp}");
    assert_eq!(
        h.sim.user(TENANT, &alice_id).unwrap().account_enabled,
        Some(false)
    );

    let records = h.sim.deliveries();
    assert_eq!(records.len(), 1);
    assert!(records[0].delivered() && records[0].final_attempt && records[0].attempt == 1);
    assert_eq!(records[0].user_id, alice_id);

    h.sim.delete_user(TENANT, &alice_id).unwrap();
    assert!(h.sim.settle(SETTLE).await);
    let deleted: Vec<_> = sub.items().into_iter().skip(1).collect();
    assert_eq!(
        deleted.len(),
        2,
        "the users sub and the users/{{id}} deleted sub"
    );
    assert!(deleted.iter().all(|i| i["changeType"] == "deleted"));
    assert!(h.sim.user(TENANT, &alice_id).is_none());
}

#[tokio::test]
async fn lenient_shape_variants_are_reachable() {
    let h = harness().await;
    fast_delivery(&h.sim);
    h.sim
        .update_faults(|f| {
            f.omit_tenant_id = true;
            f.sequence_number_as_string = true;
            f.lowercase_resource = true;
            f.wrong_odata_type = true;
        })
        .unwrap();
    let sub = Subscriber::start(Handshake::Echo).await;
    h.subscribe(&sub.url, "users", "updated").await;
    h.sim
        .set_account_enabled(TENANT, &alice().id, false)
        .unwrap();
    assert!(h.sim.settle(SETTLE).await);
    let item = &sub.items()[0];
    assert!(item.get("tenantId").is_none());
    assert_eq!(item["resourceData"]["organizationId"], TENANT);
    assert!(item["resourceData"]["sequenceNumber"].is_string());
    assert!(item["resource"].as_str().unwrap().starts_with("users/"));
    assert_ne!(item["resourceData"]["@odata.type"], "#Microsoft.Graph.User");
}

#[tokio::test]
async fn failed_deliveries_are_retried_with_backoff_then_given_up() {
    let h = harness().await;
    fast_delivery(&h.sim);
    let sub = Subscriber::start(Handshake::Echo).await;
    h.subscribe(&sub.url, "users", "updated").await;
    sub.fail_first(2);
    h.sim
        .set_account_enabled(TENANT, &alice().id, false)
        .unwrap();
    assert!(h.sim.settle(SETTLE).await);
    let records = h.sim.deliveries();
    let outcome: Vec<_> = records
        .iter()
        .map(|r| (r.attempt, r.outcome.clone(), r.final_attempt))
        .collect();
    let status = |s| DeliveryOutcome::Status { status: s };
    assert_eq!(
        outcome,
        [
            (1, status(500), false),
            (2, status(500), false),
            (3, status(202), true)
        ]
    );
    let gap1 = records[1].instant - records[0].instant;
    let gap2 = records[2].instant - records[1].instant;
    assert!(
        gap1 >= Duration::from_millis(20) && gap2 >= Duration::from_millis(40),
        "{gap1:?} {gap2:?}"
    );
    assert_eq!(sub.posts().len(), 3);

    // Always failing: gives up after max_attempts.
    h.sim.update_faults(|f| f.max_attempts = 3).unwrap();
    sub.fail_first(100);
    h.sim
        .set_account_enabled(TENANT, &alice().id, true)
        .unwrap();
    assert!(h.sim.settle(SETTLE).await);
    let later: Vec<_> = h.sim.deliveries().into_iter().skip(3).collect();
    assert_eq!(later.len(), 3);
    assert!(later.iter().all(|r| !r.delivered()));
    assert!(later[2].final_attempt && later[2].attempt == 3);
}

#[tokio::test]
async fn duplicates_and_drops_are_observable() {
    let h = harness().await;
    fast_delivery(&h.sim);
    let sub = Subscriber::start(Handshake::Echo).await;
    h.subscribe(&sub.url, "users", "updated").await;
    let id = alice().id;

    h.sim.update_faults(|f| f.duplicate_every = 2).unwrap();
    for i in 0..4 {
        h.sim
            .update_user(TENANT, &id, |u| u.department = Some(format!("d{i}")))
            .unwrap();
    }
    assert!(h.sim.settle(SETTLE).await);
    let items = sub.items();
    assert_eq!(items.len(), 6, "4 notifications, every 2nd twice");
    let dups = h.sim.deliveries().iter().filter(|r| r.duplicate).count();
    assert_eq!(dups, 2);
    let mut seqs: Vec<_> = items
        .iter()
        .map(|i| i["resourceData"]["sequenceNumber"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 4, "duplicates repeat the same item");

    h.sim
        .set_faults(GraphSimFaults {
            drop_probability: 1.0,
            ..h.sim.faults()
        })
        .unwrap();
    h.sim.update_faults(|f| f.duplicate_every = 0).unwrap();
    for _ in 0..3 {
        h.sim.set_account_enabled(TENANT, &id, false).unwrap();
    }
    assert!(h.sim.settle(SETTLE).await);
    assert_eq!(sub.items().len(), 6, "nothing more arrived");
    let dropped = h
        .sim
        .deliveries()
        .iter()
        .filter(|r| r.outcome == DeliveryOutcome::Dropped)
        .count();
    assert_eq!(dropped, 3);
}

#[tokio::test]
async fn reordering_and_batching() {
    let h = harness().await;
    fast_delivery(&h.sim);
    let sub = Subscriber::start(Handshake::Echo).await;
    h.subscribe(&sub.url, "users", "updated").await;
    let id = alice().id;

    h.sim.update_faults(|f| f.batch_size = 3).unwrap();
    for i in 0..3 {
        h.sim
            .update_user(TENANT, &id, |u| u.department = Some(format!("b{i}")))
            .unwrap();
    }
    assert!(h.sim.settle(SETTLE).await);
    assert_eq!(sub.posts().len(), 1);
    assert_eq!(sub.items().len(), 3);
    assert!(h.sim.deliveries().iter().all(|r| r.batch_len == 3));

    h.sim
        .update_faults(|f| {
            f.batch_size = 8;
            f.reorder_window = 8;
        })
        .unwrap();
    for i in 0..8 {
        h.sim
            .update_user(TENANT, &id, |u| u.department = Some(format!("r{i}")))
            .unwrap();
    }
    assert!(h.sim.settle(SETTLE).await);
    let seqs: Vec<u64> = sub.items()[3..]
        .iter()
        .map(|i| i["resourceData"]["sequenceNumber"].as_u64().unwrap())
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    assert_eq!(seqs.len(), 8);
    assert_ne!(
        seqs, sorted,
        "the window was shuffled (seeded, so this is stable)"
    );
}

#[tokio::test]
async fn injected_throttling_failures_and_latency() {
    let h = harness().await;
    let path = format!("/users/{}", alice().id);
    h.sim.throttle_next(2, Some(5));
    for _ in 0..2 {
        let resp = h
            .http
            .get(h.url(&path))
            .bearer_auth(&h.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
    }
    // The token endpoint is not throttled.
    assert_eq!(h.token_request(TENANT, APP, SECRET).await.0, 200);
    h.sim.throttle_next(1, None);
    assert_eq!(h.token_request(TENANT, APP, SECRET).await.0, 200);
    let resp = h
        .http
        .get(h.url(&path))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(!resp.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(h.get(&path).await.0, 200);

    h.sim.fail_next(1, 503).unwrap();
    assert_eq!(h.get(&path).await.0, 503);
    assert_eq!(h.get(&path).await.0, 200);
    assert!(h.sim.fail_next(1, 200).is_err());

    h.sim
        .update_faults(|f| f.api_latency = Duration::from_millis(150))
        .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(h.get(&path).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn control_api_changes_users_and_notifies() {
    let h = harness().await;
    fast_delivery(&h.sim);
    let sub = Subscriber::start(Handshake::Echo).await;
    h.subscribe(&sub.url, "users", "updated,deleted").await;
    use reqwest::Method;
    let t = format!("_sim/tenants/{TENANT}/users");

    let (status, body) = h
        .control(
            Method::PUT,
            &format!("{t}/bob"),
            r#"{"userPrincipalName":"bob@example.com","accountEnabled":true}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "bob");
    let (status, body) = h
        .control(
            Method::PATCH,
            &format!("{t}/BOB"),
            r#"{"accountEnabled":false,"department":"Ops"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        h.sim.user(TENANT, "bob").unwrap().account_enabled,
        Some(false)
    );
    assert_eq!(
        h.sim.user(TENANT, "bob").unwrap().department.as_deref(),
        Some("Ops")
    );
    let (status, _) = h
        .control(Method::PATCH, &format!("{t}/bob"), r#"{"department":null}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(h.sim.user(TENANT, "bob").unwrap().department, None);

    let bad = [
        (
            Method::PATCH,
            format!("{t}/bob"),
            r#"{"acountEnabled":false}"#,
            400,
        ),
        (
            Method::PATCH,
            format!("{t}/bob"),
            r#"{"accountEnabled":"no"}"#,
            400,
        ),
        (Method::PATCH, format!("{t}/bob"), r#"{"id":"carol"}"#, 400),
        (Method::PATCH, format!("{t}/bob"), "not json", 400),
        (Method::PUT, format!("{t}/bob"), r#"{"id":"carol"}"#, 400),
        (Method::PUT, format!("{t}/bob"), "[]", 400),
        (Method::PATCH, format!("{t}/nobody"), "{}", 404),
        (
            Method::PUT,
            "_sim/tenants/unknown/users/x".to_owned(),
            "{}",
            404,
        ),
        (
            Method::POST,
            "_sim/faults".to_owned(),
            r#"{"drop_probability":2}"#,
            400,
        ),
        (
            Method::POST,
            "_sim/faults".to_owned(),
            r#"{"no_such_knob":1}"#,
            400,
        ),
    ];
    for (method, path, body, status) in bad {
        let (got, answer) = h.control(method.clone(), &path, body).await;
        assert_eq!(got, status, "{method} {path} {body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    assert_eq!(
        h.sim.user(TENANT, "bob").unwrap().account_enabled,
        Some(false)
    );

    let (status, list) = h.control(Method::GET, &t, "").await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(
        h.control(Method::DELETE, &format!("{t}/bob"), "").await.0,
        204
    );
    assert!(h.sim.settle(SETTLE).await);
    let mut kinds: Vec<_> = sub
        .items()
        .iter()
        .map(|i| i["changeType"].as_str().unwrap().to_owned())
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["deleted", "updated", "updated", "updated"]);

    let (status, faults) = h
        .control(
            Method::POST,
            "_sim/faults",
            r#"{"duplicate_every":3,"delivery_delay":"15ms"}"#,
        )
        .await;
    assert_eq!(status, 200, "{faults}");
    assert_eq!(h.sim.faults().duplicate_every, 3);
    assert_eq!(h.sim.faults().delivery_delay, Duration::from_millis(15));
    assert_eq!(
        faults["batch_size"], 1,
        "left-out fields take their defaults"
    );
    let (_, subs) = h
        .control(
            Method::GET,
            &format!("_sim/tenants/{TENANT}/subscriptions"),
            "",
        )
        .await;
    assert_eq!(subs.as_array().unwrap().len(), 1);
    assert!(!subs.to_string().contains(CLIENT_STATE));
    let (_, stats) = h.control(Method::GET, "_sim/stats", "").await;
    assert_eq!(stats["pending_deliveries"], 0);
}

#[tokio::test]
async fn slow_subscribers_time_out_and_are_retried() {
    let h = harness().await;
    fast_delivery(&h.sim);
    h.sim
        .update_faults(|f| {
            f.delivery_timeout = Duration::from_millis(100);
            f.max_attempts = 2;
        })
        .unwrap();
    let sub = Subscriber::start(Handshake::Echo).await;
    h.subscribe(&sub.url, "users", "updated").await;
    sub.set_post_delay(Duration::from_millis(400));
    h.sim
        .set_account_enabled(TENANT, &alice().id, false)
        .unwrap();
    assert!(h.sim.settle(SETTLE).await);
    let records = h.sim.deliveries();
    assert_eq!(records.len(), 2);
    for r in &records {
        assert!(
            matches!(&r.outcome, DeliveryOutcome::Error { error } if error.contains("timed out")),
            "{r:?}"
        );
    }
    assert!(records[1].final_attempt);
}

/// Drops and duplicates by probability follow the seed: same seed, same fate.
#[tokio::test]
async fn random_faults_are_reproducible_with_a_seed() {
    async fn fates(seed: u64) -> Vec<(u64, bool, bool)> {
        let h = harness().await;
        fast_delivery(&h.sim);
        let sub = Subscriber::start(Handshake::Echo).await;
        h.subscribe(&sub.url, "users", "updated").await;
        h.sim
            .update_faults(|f| {
                f.drop_probability = 0.4;
                f.duplicate_probability = 0.3;
                f.seed = Some(seed);
            })
            .unwrap();
        for i in 0..20 {
            h.sim
                .update_user(TENANT, &alice().id, |u| u.department = Some(format!("{i}")))
                .unwrap();
        }
        assert!(h.sim.settle(SETTLE).await);
        let mut fates: Vec<_> = h
            .sim
            .deliveries()
            .iter()
            .map(|r| {
                let dropped = r.outcome == DeliveryOutcome::Dropped;
                (r.sequence_number, dropped, r.duplicate)
            })
            .collect();
        fates.sort_unstable();
        let dropped = fates.iter().filter(|f| f.1).count();
        let delivered = sub.items().len();
        assert_eq!(dropped + delivered, fates.len());
        fates
    }
    let a = fates(42).await;
    assert_eq!(a, fates(42).await);
    assert!(a.iter().any(|f| f.1) && a.iter().any(|f| f.2) && a.iter().any(|f| !f.1));
    assert_ne!(a, fates(43).await);
}

#[tokio::test]
async fn reauthorization_required_goes_to_the_lifecycle_url() {
    let h = harness().await;
    fast_delivery(&h.sim);
    let notify = Subscriber::start(Handshake::Echo).await;
    let lifecycle = Subscriber::start(Handshake::Echo).await;
    let body = json!({
        "changeType": "updated",
        "notificationUrl": notify.url,
        "lifecycleNotificationUrl": lifecycle.url,
        "resource": "users",
        "expirationDateTime": Utc::now() + TimeDelta::hours(3),
        "clientState": CLIENT_STATE,
    });
    let (status, created) = h
        .call(reqwest::Method::POST, "/subscriptions", Some(body))
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let (status, _) = h
        .control(
            reqwest::Method::POST,
            &format!("_sim/tenants/{TENANT}/subscriptions/{id}/reauthorization-required"),
            "",
        )
        .await;
    assert_eq!(status, 202);
    assert!(h.sim.settle(SETTLE).await);
    assert!(notify.items().is_empty());
    let items = lifecycle.items();
    assert_eq!(items.len(), 1);
    let item = &items[0];
    assert_eq!(item["lifecycleEvent"], "reauthorizationRequired");
    assert_eq!(item["subscriptionId"], id);
    assert_eq!(item["clientState"], CLIENT_STATE);
    assert_eq!(item["tenantId"], TENANT);
    assert!(item.get("resource").is_none());

    let (_, plain) = h.subscribe(&notify.url, "users/x", "updated").await;
    let err = h
        .sim
        .request_reauthorization(TENANT, plain["id"].as_str().unwrap())
        .unwrap_err();
    assert!(matches!(err, SimError::Invalid(_)), "{err:?}");
    assert!(matches!(
        h.sim.request_reauthorization(TENANT, "nope"),
        Err(SimError::UnknownSubscription { .. })
    ));
}
