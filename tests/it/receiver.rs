//! The webhook receiver: handshake, authentication of items, hostile input, and the 202/503
//! contract with the queue.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use flagrelay::message::{self, Message};
use flagrelay::queue::{Queue, Settlement};
use secrecy::ExposeSecret;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::support::{self, Backend, Options, TENANT, TestApp};

async fn receiver(backend: Backend, name: &str) -> TestApp {
    TestApp::start(
        name,
        Options {
            backend,
            subscribe: false,
            worker: false,
            ..Options::default()
        },
    )
    .await
}

async fn call(
    app: &TestApp,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let resp = app
        .app
        .receiver_router()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn item(app: &TestApp, tenant: &str, user: &str, client_state: Option<&str>) -> serde_json::Value {
    let state = client_state.map_or_else(
        || {
            app.app
                .config
                .graph
                .client_state()
                .expose_secret()
                .to_owned()
        },
        str::to_owned,
    );
    json!({
        "subscriptionId": "sub-1", "subscriptionExpirationDateTime": "2026-12-01T10:00:00+00:00",
        "changeType": "updated", "clientState": state, "resource": format!("Users/{user}"),
        "resourceData": {"@odata.type": "#Microsoft.Graph.User", "@odata.id": format!("Users/{user}"),
            "id": user, "organizationId": tenant, "eventTime": "2026-11-23T10:00:00.1234567Z", "sequenceNumber": 1},
        "tenantId": tenant
    })
}

async fn post_items(app: &TestApp, items: Vec<serde_json::Value>) -> StatusCode {
    let body = serde_json::to_vec(&json!({ "value": items })).unwrap();
    call(
        app,
        "POST",
        "/graph/notifications",
        Some("application/json"),
        body,
    )
    .await
    .0
}

/// Consume what is on the queue for up to `wait` and return the user ids, acking each.
async fn drain_user_ids(queue: &dyn Queue, app: &TestApp, wait: Duration) -> Vec<String> {
    let stop = CancellationToken::new();
    let mut rx = queue.consume(stop.clone()).await.unwrap();
    let verifier = app.app.config.signing.verifier();
    let mut ids = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(wait, rx.recv()).await {
        let decoded = message::decode(&d.delivered.body, &d.delivered.headers, &verifier)
            .expect("receiver signs what it publishes");
        ids.push(decoded.message.subject().to_owned());
        d.settle(&Settlement::Ack).await.unwrap();
    }
    stop.cancel();
    ids.sort();
    ids
}

#[tokio::test]
async fn handshake_echoes_the_decoded_token_as_plain_text() {
    let app = receiver(Backend::Embedded, "handshake").await;
    let token =
        "Validation: Testing client application reachability for subscription Request-Id: 4c4b6a4e";
    let uri = format!(
        "/graph/notifications?validationToken={}",
        url::form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>()
    );
    let (status, headers, body) = call(&app, "POST", &uri, None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(body, token);
    let (status, _, body) = call(
        &app,
        "POST",
        &uri.replace("notifications", "lifecycle"),
        None,
        vec![],
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, token));
}

#[tokio::test]
async fn hostile_validation_tokens_are_refused() {
    let app = receiver(Backend::Embedded, "badtoken").await;
    let long = "a".repeat(5000);
    for token in [
        "<script>alert(1)</script>",
        "line\r\nSet-Cookie: x=1",
        "nul\0byte",
        "",
        long.as_str(),
    ] {
        let enc: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
        let (status, _, body) = call(
            &app,
            "POST",
            &format!("/graph/notifications?validationToken={enc}"),
            None,
            vec![],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "token {token:?}");
        assert!(!body.contains("<script>"), "never reflected: {body}");
    }
}

#[tokio::test]
async fn malformed_requests_get_clear_4xx() {
    let app = receiver(Backend::Embedded, "malformed").await;
    let json = Some("application/json");
    let cases: Vec<(&str, Option<&str>, Vec<u8>, StatusCode)> = vec![
        (
            "POST",
            Some("text/plain"),
            b"{\"value\":[]}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "POST",
            None,
            b"{\"value\":[]}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        ("POST", json, vec![], StatusCode::BAD_REQUEST),
        (
            "POST",
            json,
            b"{\"value\": [".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            json,
            b"{\"items\": []}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            json,
            "[".repeat(100_000).into_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            json,
            vec![b' '; 2 * 1024 * 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        ("GET", None, vec![], StatusCode::METHOD_NOT_ALLOWED),
        (
            "PUT",
            json,
            b"{\"value\":[]}".to_vec(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ];
    for (method, ct, body, expected) in cases {
        let len = body.len();
        let (status, _, _) = call(&app, method, "/graph/notifications", ct, body).await;
        assert_eq!(status, expected, "{method} {ct:?} body of {len} bytes");
    }
    let too_many: Vec<_> = (0..1001)
        .map(|i| item(&app, TENANT, &format!("u{i}"), None))
        .collect();
    assert_eq!(
        post_items(&app, too_many).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
}

#[tokio::test]
async fn forged_client_state_and_unknown_tenants_are_dropped_but_answered_202() {
    for backend in [Backend::Embedded, Backend::Rabbit] {
        let app = receiver(backend, "forged").await;
        let items = vec![
            item(&app, TENANT, "good-user", None),
            item(&app, TENANT, "forged-user", Some("not-the-secret-at-all")),
            json!({"changeType": "updated", "resourceData": {"id": "no-state-user", "organizationId": TENANT}, "tenantId": TENANT}),
            item(
                &app,
                "99999999-9999-9999-9999-999999999999",
                "other-tenant-user",
                None,
            ),
            json!({"garbage": true}),
        ];
        assert_eq!(
            post_items(&app, items).await,
            StatusCode::ACCEPTED,
            "{backend:?}"
        );
        let queue = app.app.queue.clone();
        assert_eq!(
            drain_user_ids(queue.as_ref(), &app, Duration::from_millis(500)).await,
            vec!["good-user"],
            "{backend:?}"
        );
        let m = &app.app.metrics;
        use flagrelay::telemetry::Metrics;
        assert_eq!(Metrics::get(&m.notifications_dropped_client_state_total), 2);
        assert_eq!(
            Metrics::get(&m.notifications_dropped_unknown_tenant_total),
            1
        );
        assert_eq!(Metrics::get(&m.notifications_dropped_malformed_total), 1);
        assert_eq!(Metrics::get(&m.notifications_enqueued_total), 1);
        app.stop().await;
    }
}

#[tokio::test]
async fn lifecycle_notifications_are_queued_as_their_own_type() {
    let app = receiver(Backend::Embedded, "lifecycle").await;
    let state = app
        .app
        .config
        .graph
        .client_state()
        .expose_secret()
        .to_owned();
    let body = json!({"value": [{"lifecycleEvent": "reauthorizationRequired", "subscriptionId": "sub-9",
        "subscriptionExpirationDateTime": "2026-12-01T10:00:00+00:00", "clientState": state, "organizationId": TENANT}]});
    let (status, _, _) = call(
        &app,
        "POST",
        "/graph/lifecycle",
        Some("application/json"),
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let stop = CancellationToken::new();
    let mut rx = app.app.queue.consume(stop.clone()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let decoded = message::decode(
        &d.delivered.body,
        &d.delivered.headers,
        &app.app.config.signing.verifier(),
    )
    .unwrap();
    match decoded.message {
        Message::Lifecycle(l) => assert_eq!(
            (l.subscription_id.as_str(), l.lifecycle_event.as_str()),
            ("sub-9", "reauthorizationRequired")
        ),
        other => panic!("expected a lifecycle message, got {other:?}"),
    }
    stop.cancel();
}

#[tokio::test]
async fn broker_unreachable_means_503_with_retry_after_and_nothing_is_acknowledged() {
    let sandbox = flagrelay::sim::sandbox::Sandbox::start(TENANT, support::ORG)
        .await
        .unwrap();
    let mut settings = support::test_queue_settings("down");
    settings.publish_timeout = Duration::from_millis(500);
    let dead = std::sync::Arc::new(flagrelay::queue::rabbitmq::RabbitQueue::new(
        secrecy::SecretString::from("amqp://guest:guest@127.0.0.1:1/%2f".to_owned()),
        settings,
    ));
    let app = flagrelay::app::App::with_parts(
        sandbox.config.clone(),
        dead,
        std::sync::Arc::new(
            flagrelay::graph::client::GraphClient::new(&sandbox.config.graph).unwrap(),
        ),
        std::sync::Arc::new(
            flagrelay::proofpoint::client::ProofpointClient::new(5, Duration::from_secs(1))
                .unwrap(),
        ),
    )
    .unwrap();
    let state = sandbox
        .config
        .graph
        .client_state()
        .expose_secret()
        .to_owned();
    let body = json!({"value": [{"changeType": "updated", "clientState": state,
        "resourceData": {"id": "u-1", "organizationId": TENANT}, "tenantId": TENANT}]});
    let started = std::time::Instant::now();
    let resp = app
        .receiver_router()
        .oneshot(
            Request::post("/graph/notifications")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
    // A functional bound, not a benchmark: Graph counts answers over 10 s as failures.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "must not hang: {:?}",
        started.elapsed()
    );
    let ready = app
        .receiver_router()
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_is_cut_off_and_the_receiver_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::start_with(
        "slowbody",
        Options {
            backend: Backend::Embedded,
            subscribe: false,
            worker: false,
            ..Options::default()
        },
        |c| c.receiver.request_timeout = Duration::from_millis(500),
    )
    .await;
    let addr = app.url.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /graph/notifications HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"value\":")
        .await
        .unwrap();
    // ...and never sends the rest.
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut answer))
        .await
        .expect("cut off, not left hanging")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    // The server goes on serving others.
    let resp = reqwest::Client::new()
        .post(format!("{}/graph/notifications", app.url))
        .header("content-type", "application/json")
        .body("{\"value\":[]}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_stalls_in_its_headers_is_disconnected_and_the_receiver_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::start_with(
        "slowheaders",
        Options {
            backend: Backend::Embedded,
            subscribe: false,
            worker: false,
            ..Options::default()
        },
        |c| c.receiver.request_timeout = Duration::from_millis(500),
    )
    .await;
    let addr = app.url.trim_start_matches("http://").to_owned();
    // Many such clients at once, each sending half its headers and then nothing.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /graph/notifications HTTP/1.1\r\nhost: x\r\ncontent-ty")
            .await
            .unwrap();
        stalled.push(s);
    }
    for mut s in stalled {
        let mut buf = vec![0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            // Whatever hyper says before closing (possibly a 408), then end of stream.
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a client stalled in its headers was not cut off"
        );
    }
    let resp = reqwest::Client::new()
        .post(format!("{}/graph/notifications", app.url))
        .header("content-type", "application/json")
        .body("{\"value\":[]}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "the receiver keeps serving");
    app.stop().await;
}

/// Saturation is answered early: while `receiver.max_in_flight` items wait for a broker that
/// went silent, further batches get `503 Retry-After` at once, before the waiting ones end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_receiver_answers_503_at_once_instead_of_slowly() {
    support::require_broker().await;
    let proxy = support::Proxy::start().await;
    let app = TestApp::start_with(
        "saturated",
        Options {
            subscribe: false,
            worker: false,
            amqp_url: Some(proxy.url()),
            ..Options::default()
        },
        |c| c.receiver.max_in_flight = 2,
    )
    .await;
    let client = reqwest::Client::new();
    let post = |user: &str| {
        let body = serde_json::to_vec(&json!({ "value": [item(&app, TENANT, user, None)] }));
        client
            .post(format!("{}/graph/notifications", app.url))
            .header("content-type", "application/json")
            .body(body.unwrap())
            .send()
    };
    // The publisher connection exists (through the proxy) and works.
    assert_eq!(post("u-warm").await.unwrap().status().as_u16(), 202);

    proxy.freeze_all();
    let frozen: Vec<_> = ["u-frozen-1", "u-frozen-2"]
        .into_iter()
        .map(|u| tokio::spawn(post(u)))
        .collect();
    // Both have taken their permit once their items are counted: nothing awaits in between
    // (the short pause covers the instant between counting and acquiring on another thread).
    let received =
        || flagrelay::telemetry::Metrics::get(&app.app.metrics.notifications_received_total) == 3;
    assert!(support::eventually(Duration::from_secs(5), received).await);
    tokio::time::sleep(Duration::from_millis(100)).await;

    for user in ["u-extra-1", "u-extra-2", "u-extra-3"] {
        let resp = post(user).await.unwrap();
        assert_eq!(resp.status().as_u16(), 503, "{user} is refused");
        assert!(resp.headers().contains_key(header::RETRY_AFTER));
    }
    assert!(
        frozen.iter().all(|f| !f.is_finished()),
        "the refusals came while the frozen publishes were still waiting"
    );
    assert_eq!(
        flagrelay::telemetry::Metrics::get(&app.app.metrics.webhook_saturated_total),
        3
    );
    // The frozen ones end with the publish timeout: 503 too, never a late 202.
    for f in frozen {
        assert_eq!(f.await.unwrap().unwrap().status().as_u16(), 503);
    }
    app.stop().await;
}
