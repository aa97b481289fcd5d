//! [`GraphClient`] against the Graph simulator on 127.0.0.1:0: real HTTP, real status codes.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use reqwest::header::HeaderValue;

use super::*;
use crate::graph::USER_SELECT;
use crate::sim::graph::tests::{APP, CLIENT_STATE, Handshake, SECRET, Subscriber, TENANT};
use crate::sim::graph::{GraphSim, SimServer};

const ALICE: &str = "aaaaaaaa-0000-4000-8000-00000000000a";

struct Fixture {
    sim: GraphSim,
    server: SimServer,
    client: GraphClient,
}

async fn fixture() -> Fixture {
    fixture_with(SECRET, Duration::from_secs(5)).await
}

async fn fixture_with(secret: &str, timeout: Duration) -> Fixture {
    let sim = GraphSim::new();
    sim.add_app(APP, SECRET);
    sim.add_tenant(TENANT);
    sim.upsert_user(
        TENANT,
        GraphUser {
            id: ALICE.into(),
            account_enabled: Some(true),
            user_principal_name: Some("alice@example.com".into()),
            proxy_addresses: Some(vec!["SMTP:Alice@example.com".into()]),
            ..Default::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = sim.spawn(listener).await.unwrap();
    let client = client_for(&server, secret, timeout);
    Fixture {
        sim,
        server,
        client,
    }
}

fn client_for(server: &SimServer, secret: &str, timeout: Duration) -> GraphClient {
    GraphClient::from_settings(GraphClientSettings {
        authority_url: server.authority_url(),
        api_url: server.api_url(),
        client_id: APP.into(),
        client_secret: SecretString::from(secret),
        request_timeout: timeout,
    })
    .unwrap()
}

fn new_subscription(url: &Url, resource: &str) -> NewSubscription {
    NewSubscription {
        change_type: "updated,deleted".into(),
        notification_url: url.to_string(),
        lifecycle_notification_url: None,
        resource: resource.into(),
        expiration_date_time: Utc::now() + TimeDelta::days(2),
        client_state: CLIENT_STATE.into(),
    }
}

#[tokio::test]
async fn tokens_are_cached_per_tenant() {
    let f = fixture().await;
    for _ in 0..3 {
        assert!(
            f.client
                .get_user(TENANT, ALICE, USER_SELECT)
                .await
                .unwrap()
                .is_some()
        );
    }
    assert_eq!(f.sim.token_requests(), 1);

    // Tenant ids compare case-insensitively; a second tenant gets its own token.
    f.client
        .get_user(&TENANT.to_ascii_uppercase(), ALICE, &["id"])
        .await
        .unwrap();
    assert_eq!(f.sim.token_requests(), 1);
    f.sim.add_tenant("other-tenant");
    assert!(
        f.client
            .get_user("other-tenant", ALICE, &["id"])
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(f.sim.token_requests(), 2);

    // The scope is derived from the API origin.
    let token_call = f
        .sim
        .request_log()
        .into_iter()
        .find(|r| r.path.ends_with("/oauth2/v2.0/token"))
        .unwrap();
    assert_eq!(token_call.tenant.as_deref(), Some(TENANT));
    assert_eq!(
        f.client.scope(),
        format!("http://{}/.default", f.server.addr())
    );
}

#[tokio::test]
async fn concurrent_first_calls_fetch_one_token() {
    let f = fixture().await;
    let calls = (0..8).map(|_| f.client.get_user(TENANT, ALICE, &["id"]));
    for r in futures::future::join_all(calls).await {
        assert!(r.unwrap().is_some());
    }
    assert_eq!(f.sim.token_requests(), 1);
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_of_expiry() {
    let f = fixture().await;
    f.sim
        .update_settings(|s| s.token_lifetime = Duration::from_secs(1));
    f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap();
    f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap();
    assert_eq!(f.sim.token_requests(), 1);
    // Refreshed at 90% of the lifetime, i.e. before the simulator would refuse it.
    tokio::time::sleep(Duration::from_millis(950)).await;
    f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap();
    assert_eq!(f.sim.token_requests(), 2);
    assert!(f.sim.request_log().iter().all(|r| r.status != 401));
}

#[tokio::test]
async fn a_refused_token_is_replaced_once() {
    let f = fixture().await;
    f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap();
    f.sim.revoke_tokens();
    assert!(
        f.client
            .get_user(TENANT, ALICE, &["id"])
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(f.sim.token_requests(), 2);
    let statuses: Vec<u16> = f
        .sim
        .request_log()
        .iter()
        .filter(|r| r.path.starts_with("/v1.0/"))
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [200, 401, 200]);
}

#[tokio::test]
async fn bad_credentials_are_unauthorized_without_leaking_the_secret() {
    let f = fixture_with("wrong-secret-value", Duration::from_secs(5)).await;
    let err = f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    match &err {
        GraphError::Unauthorized { status, body } => {
            assert_eq!(*status, 401);
            assert!(body.contains("invalid_client"), "{body}");
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    assert!(!err.is_retryable());
    let shown = format!("{err} {err:?} {:?}", f.client);
    assert!(!shown.contains("wrong-secret-value"), "{shown}");

    let err = f
        .client
        .get_user("no-such-tenant", ALICE, &["id"])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GraphError::Unauthorized { status: 400, body } if body.contains("AADSTS90002")),
        "{err:?}"
    );
}

#[tokio::test]
async fn debug_never_shows_secret_or_tokens() {
    let f = fixture().await;
    f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap();
    let shown = format!("{:?}", f.client);
    assert!(
        !shown.contains(SECRET) && !shown.contains("simtok"),
        "{shown}"
    );
    assert!(shown.contains("cached_tenants: 1"), "{shown}");
}

#[tokio::test]
async fn missing_users_are_none_and_select_is_respected() {
    let f = fixture().await;
    assert_eq!(
        f.client
            .get_user(TENANT, "nobody", USER_SELECT)
            .await
            .unwrap(),
        None
    );

    let narrow = f
        .client
        .get_user(TENANT, ALICE, &["id", "userPrincipalName"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(narrow.account_enabled, None);
    assert_eq!(narrow.proxy_addresses, None);
    assert_eq!(
        narrow.user_principal_name.as_deref(),
        Some("alice@example.com")
    );

    let full = f
        .client
        .get_user(TENANT, ALICE, USER_SELECT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(full.account_enabled, Some(true));
    assert_eq!(full.primary_smtp(), Some("Alice@example.com"));

    // Without $select Graph's default set applies: no accountEnabled.
    let default = f
        .client
        .get_user(TENANT, ALICE, &[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(default.account_enabled, None);

    let log = f.sim.request_log();
    let reads: Vec<_> = log
        .iter()
        .filter(|r| r.path.starts_with("/v1.0/users/"))
        .collect();
    assert_eq!(
        reads[1].query.as_deref(),
        Some("$select=id,userPrincipalName")
    );
    assert!(reads.iter().all(|r| {
        r.client_request_id
            .as_deref()
            .is_some_and(|c| c.len() == 36)
    }));
}

#[tokio::test]
async fn user_ids_are_one_encoded_path_segment() {
    let f = fixture().await;
    let guest = "guest_example.com#EXT#@tenant.onmicrosoft.com";
    f.sim
        .upsert_user(
            TENANT,
            GraphUser {
                id: guest.into(),
                ..Default::default()
            },
        )
        .unwrap();
    let got = f
        .client
        .get_user(TENANT, guest, &["id"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id, guest);
    assert_eq!(
        f.client.get_user(TENANT, "a/../b", &["id"]).await.unwrap(),
        None
    );
    assert!(matches!(
        f.client.get_user(TENANT, "..", &["id"]).await,
        Err(GraphError::Rejected { status: 400, .. })
    ));
}

#[tokio::test]
async fn throttling_server_errors_and_rejections_are_classified() {
    let f = fixture().await;
    f.sim.throttle_next(1, Some(7));
    let err = f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Throttled { status: 429, retry_after: Some(d) } if d == Duration::from_secs(7)),
        "{err:?}"
    );
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    assert!(err.is_retryable());

    f.sim.throttle_next(1, None);
    let err = f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(
            err,
            GraphError::Throttled {
                status: 429,
                retry_after: None
            }
        ),
        "{err:?}"
    );

    f.sim.fail_next(1, 503).unwrap();
    let err = f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Throttled { status: 503, .. }),
        "{err:?}"
    );

    f.sim.fail_next(1, 500).unwrap();
    let err = f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(&err, GraphError::Server { status: 500, body } if body.contains("generalException")),
        "{err:?}"
    );

    f.sim.fail_next(1, 403).unwrap();
    let err = f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Unauthorized { status: 403, .. }),
        "{err:?}"
    );

    f.sim.fail_next(1, 400).unwrap();
    let err = f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());

    // The client itself never retried any of these.
    assert!(
        f.client
            .get_user(TENANT, ALICE, &["id"])
            .await
            .unwrap()
            .is_some()
    );
    let api_calls = f
        .sim
        .request_log()
        .iter()
        .filter(|r| r.path.starts_with("/v1.0/"))
        .count();
    assert_eq!(api_calls, 7);
}

#[tokio::test]
async fn slow_answers_time_out_and_dead_hosts_are_transport_errors() {
    let f = fixture_with(SECRET, Duration::from_millis(300)).await;
    f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap();
    f.sim
        .update_faults(|x| x.api_latency = Duration::from_secs(2))
        .unwrap();
    let err = f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(matches!(err, GraphError::Timeout), "{err:?}");
    assert!(err.is_retryable());

    let addr = f.server.addr();
    f.server.shutdown().await;
    let gone = GraphClient::from_settings(GraphClientSettings {
        authority_url: Url::parse(&format!("http://{addr}")).unwrap(),
        api_url: Url::parse(&format!("http://{addr}/v1.0")).unwrap(),
        client_id: APP.into(),
        client_secret: SecretString::from(SECRET),
        request_timeout: Duration::from_secs(2),
    })
    .unwrap();
    let err = gone.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(matches!(err, GraphError::Transport(_)), "{err:?}");
}

#[tokio::test]
async fn subscriptions_are_created_conflict_and_list_across_pages() {
    let f = fixture().await;
    let endpoint = Subscriber::start(Handshake::Echo).await;
    let created = f
        .client
        .create_subscription(TENANT, &new_subscription(&endpoint.url, "users"))
        .await
        .unwrap();
    assert_eq!(created.resource, "users");
    assert_eq!(created.change_type, "updated,deleted");
    assert_eq!(created.notification_url, endpoint.url.as_str());
    assert_eq!(endpoint.validations().len(), 1);

    let err = f
        .client
        .create_subscription(TENANT, &new_subscription(&endpoint.url, "Users"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, GraphError::Rejected { status: 409, .. }),
        "{err:?}"
    );

    let mut ids = vec![created.id.clone()];
    for resource in ["users/a", "users/b"] {
        let s = f
            .client
            .create_subscription(TENANT, &new_subscription(&endpoint.url, resource))
            .await
            .unwrap();
        ids.push(s.id);
    }
    f.sim.update_settings(|s| s.page_size = 2);
    let listed = f.client.list_subscriptions(TENANT).await.unwrap();
    let mut got: Vec<_> = listed.iter().map(|s| s.id.clone()).collect();
    got.sort();
    ids.sort();
    assert_eq!(got, ids);
    assert!(listed.contains(&created));
    let pages = f
        .sim
        .request_log()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/v1.0/subscriptions")
        .count();
    assert_eq!(pages, 2);

    // A failed handshake surfaces as a rejection naming the validation.
    let bad = Subscriber::start(Handshake::WrongBody).await;
    let err = f
        .client
        .create_subscription(TENANT, &new_subscription(&bad.url, "users/c"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GraphError::Rejected { status: 400, body } if body.contains("ValidationError")),
        "{err:?}"
    );
}

#[test]
fn next_links_must_stay_on_the_api_origin() {
    let client = GraphClient::from_settings(GraphClientSettings {
        authority_url: Url::parse("https://login.microsoftonline.com").unwrap(),
        api_url: Url::parse("https://graph.microsoft.com/v1.0").unwrap(),
        client_id: APP.into(),
        client_secret: SecretString::from(SECRET),
        request_timeout: Duration::from_secs(1),
    })
    .unwrap();
    assert_eq!(client.scope(), "https://graph.microsoft.com/.default");
    assert!(
        client
            .same_origin("https://graph.microsoft.com/v1.0/subscriptions?$skiptoken=x")
            .is_ok()
    );
    assert!(
        client
            .same_origin("https://evil.example/v1.0/subscriptions")
            .is_err()
    );
    assert!(
        client
            .same_origin("http://graph.microsoft.com/v1.0/subscriptions")
            .is_err()
    );
}

#[test]
fn scope_follows_the_api_cloud() {
    let scope = |u: &str| scope_for(&Url::parse(u).unwrap());
    assert_eq!(
        scope("https://graph.microsoft.us/v1.0"),
        "https://graph.microsoft.us/.default"
    );
    assert_eq!(
        scope("http://127.0.0.1:8081/v1.0/"),
        "http://127.0.0.1:8081/.default"
    );
}

#[test]
fn retry_after_accepts_seconds_and_http_dates() {
    let now = Utc::now();
    let parse = |v: &str| {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        parse_retry_after(&h, now)
    };
    assert_eq!(parse("12"), Some(Duration::from_secs(12)));
    assert_eq!(parse(" 1.5 "), Some(Duration::from_millis(1500)));
    let date = (now + TimeDelta::seconds(30))
        .to_rfc2822()
        .replace("+0000", "GMT");
    let d = parse(&date).unwrap();
    assert!(
        d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
        "{d:?}"
    );
    assert_eq!(parse("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
    assert_eq!(parse("soon"), None);
    assert_eq!(parse("-3"), None);
    assert_eq!(parse_retry_after(&HeaderMap::new(), now), None);
}

#[test]
fn refresh_margin_is_five_minutes_or_a_tenth() {
    assert_eq!(
        refresh_margin(Duration::from_secs(3599)),
        Duration::from_secs(300)
    );
    assert_eq!(
        refresh_margin(Duration::from_secs(600)),
        Duration::from_secs(60)
    );
}

#[test]
fn config_without_secret_is_refused() {
    let cfg = GraphConfig::default();
    assert!(matches!(
        GraphClient::new(&cfg),
        Err(GraphClientError::MissingSecret)
    ));
}
