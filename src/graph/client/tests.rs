//! [`GraphClient`] against the Graph simulator on 127.0.0.1:0: real HTTP, real status codes.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use reqwest::header::HeaderValue;

use super::*;
use crate::graph::{DeltaNext, RemovedUser, USER_SELECT};
use crate::sim::graph::tests::{APP, CLIENT_STATE, Handshake, SECRET, Subscriber, TENANT};
use crate::sim::graph::{GraphSim, SimServer};

pub(super) const ALICE: &str = "aaaaaaaa-0000-4000-8000-00000000000a";

pub(super) struct Fixture {
    pub(super) sim: GraphSim,
    pub(super) server: SimServer,
    pub(super) client: GraphClient,
}

pub(super) async fn fixture() -> Fixture {
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

pub(super) fn client_for(server: &SimServer, secret: &str, timeout: Duration) -> GraphClient {
    GraphClient::from_settings(GraphClientSettings {
        authority_url: server.authority_url(),
        api_url: server.api_url(),
        client_id: APP.into(),
        client_secret: SecretString::from(secret),
        request_timeout: timeout,
        reads_in_flight: crate::config::DEFAULT_READS_IN_FLIGHT,
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
    // Tokens are JWTs: base64url of `{"` starts with `eyJ`.
    assert!(!shown.contains(SECRET) && !shown.contains("eyJ"), "{shown}");
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

    // The Retry-After holds for the whole tenant: the next request is not even sent, and
    // says how long is left.
    let sent = f.sim.request_log().len();
    let err = f.client.member_of(TENANT, ALICE).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Throttled { status: 429, retry_after: Some(left) }
            if left <= Duration::from_secs(7) && left > Duration::from_secs(5)),
        "{err:?}"
    );
    assert_eq!(f.sim.request_log().len(), sent, "nothing reached Graph");

    // A client that was not throttled (another process) sees the next faults as they come.
    let client = client_for(&f.server, SECRET, Duration::from_secs(5));
    f.sim.throttle_next(1, None);
    let err = client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
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
    let err = client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Throttled { status: 503, .. }),
        "{err:?}"
    );

    f.sim.fail_next(1, 500).unwrap();
    let err = client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(&err, GraphError::Server { status: 500, body } if body.contains("generalException")),
        "{err:?}"
    );

    f.sim.fail_next(1, 403).unwrap();
    let err = client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Unauthorized { status: 403, .. }),
        "{err:?}"
    );

    f.sim.fail_next(1, 400).unwrap();
    let err = client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());

    // The client itself never retried any of these.
    assert!(
        client
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
        reads_in_flight: 0,
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
        reads_in_flight: 0,
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
fn retry_after_is_read_from_the_header_and_clamped() {
    let mut h = HeaderMap::new();
    assert_eq!(parse_retry_after(&h, Utc::now()), None);
    h.insert(
        RETRY_AFTER,
        HeaderValue::from_static("99999999999999999999"),
    );
    assert_eq!(
        parse_retry_after(&h, Utc::now()),
        Some(crate::retry_after::MAX)
    );
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

/// Bob ∈ Sales ∈ EMEA ∈ Everyone, plus two more groups Bob is directly in (5 in all).
const BOB: &str = "bbbbbbbb-0000-4000-8000-00000000000b";

fn seed_memberships(sim: &GraphSim) {
    sim.upsert_user(
        TENANT,
        GraphUser {
            id: BOB.into(),
            ..Default::default()
        },
    )
    .unwrap();
    for (id, name) in [
        ("g1-sales", "Sales"),
        ("g2-emea", "EMEA"),
        ("g3-all", "Everyone"),
        ("g4-vpn", "VPN"),
        ("g5-mfa", "MFA"),
        ("g6-other", "Other"),
    ] {
        sim.add_group(TENANT, id, name).unwrap();
    }
    for (group, member) in [
        ("g1-sales", BOB),
        ("g2-emea", "g1-sales"),
        ("g3-all", "g2-emea"),
        ("g4-vpn", BOB),
        ("g5-mfa", BOB),
        ("g6-other", ALICE),
    ] {
        sim.add_member(TENANT, group, member).unwrap();
    }
}

fn group(id: &str, name: Option<&str>) -> Group {
    Group {
        id: id.into(),
        display_name: name.map(str::to_owned),
    }
}

#[tokio::test]
async fn member_of_is_transitive_and_follows_pages() {
    let f = fixture().await;
    seed_memberships(&f.sim);
    f.sim
        .set_app_permissions(APP, &["User.Read.All", "GroupMember.Read.All"])
        .unwrap();
    f.sim.update_settings(|s| s.member_of_page_size = 2);
    let groups = f.client.member_of(TENANT, BOB).await.unwrap().unwrap();
    assert_eq!(
        groups,
        [
            group("g1-sales", Some("Sales")),
            group("g2-emea", Some("EMEA")),
            group("g3-all", Some("Everyone")),
            group("g4-vpn", Some("VPN")),
            group("g5-mfa", Some("MFA")),
        ]
    );
    let pages: Vec<_> = f
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.path.contains("/transitiveMemberOf/"))
        .collect();
    assert_eq!(pages.len(), 3);
    assert_eq!(
        pages[0].query.as_deref(),
        Some("$select=id,displayName&$top=999&$count=true")
    );
    assert!(pages.iter().all(|p| p.status == 200));

    // Membership changes need no notification to be seen: the next read has them.
    f.sim.remove_member(TENANT, "g2-emea", "g1-sales").unwrap();
    let ids: Vec<_> = f
        .client
        .member_of(TENANT, BOB)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(ids, ["g1-sales", "g4-vpn", "g5-mfa"]);
}

#[tokio::test]
async fn member_of_without_group_permissions() {
    let f = fixture().await;
    seed_memberships(&f.sim);
    // User.Read.All alone (the default): the groups, by id only.
    let groups = f.client.member_of(TENANT, ALICE).await.unwrap().unwrap();
    assert_eq!(groups, [group("g6-other", None)]);
    assert_eq!(f.client.member_of(TENANT, "nobody").await.unwrap(), None);
    assert!(matches!(
        f.client.member_of(TENANT, "..").await,
        Err(GraphError::Rejected { status: 400, .. })
    ));

    // Neither user nor group permissions: 403, not worth retrying.
    f.sim
        .set_app_permissions(APP, &["MailboxSettings.Read"])
        .unwrap();
    let client = client_for(&f.server, SECRET, Duration::from_secs(5));
    let err = client.member_of(TENANT, ALICE).await.unwrap_err();
    assert!(
        matches!(&err, GraphError::Unauthorized { status: 403, body } if body.contains("Authorization_RequestDenied")),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn mailbox_purpose_reads_user_purpose_and_none_without_a_mailbox() {
    let f = fixture().await;
    f.sim
        .set_app_permissions(APP, &["User.Read.All", "MailboxSettings.Read"])
        .unwrap();
    f.sim
        .upsert_user(
            TENANT,
            GraphUser {
                id: "room-1".into(),
                ..Default::default()
            },
        )
        .unwrap();
    f.sim
        .set_mailbox_purpose(TENANT, ALICE, Some("shared"))
        .unwrap();
    f.sim
        .set_mailbox_purpose(TENANT, "room-1", Some("room"))
        .unwrap();
    f.sim
        .upsert_user(
            TENANT,
            GraphUser {
                id: "no-mailbox".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let purpose = |id: &'static str| f.client.mailbox_purpose(TENANT, id);
    assert_eq!(purpose(ALICE).await.unwrap().as_deref(), Some("shared"));
    assert_eq!(purpose("room-1").await.unwrap().as_deref(), Some("room"));
    // No mailbox and no user read the same.
    assert_eq!(purpose("no-mailbox").await.unwrap(), None);
    assert_eq!(purpose("nobody").await.unwrap(), None);
    let query = f
        .sim
        .request_log()
        .into_iter()
        .find(|r| r.path.ends_with("/mailboxSettings"))
        .and_then(|r| r.query);
    assert_eq!(query.as_deref(), Some("$select=userPurpose"));

    // Without MailboxSettings.Read: 403 ErrorAccessDenied.
    f.sim.set_app_permissions(APP, &["User.Read.All"]).unwrap();
    let client = client_for(&f.server, SECRET, Duration::from_secs(5));
    let err = client.mailbox_purpose(TENANT, ALICE).await.unwrap_err();
    assert!(
        matches!(&err, GraphError::Unauthorized { status: 403, body } if body.contains("ErrorAccessDenied")),
        "{err:?}"
    );
}

#[tokio::test]
async fn new_operations_see_injected_faults() {
    let f = fixture().await;
    f.sim
        .set_app_permissions(APP, &["User.Read.All", "MailboxSettings.Read"])
        .unwrap();
    f.sim.throttle_next(1, Some(4));
    let err = f.client.member_of(TENANT, ALICE).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(4)));
    // The throttled client holds its requests back; a fresh one sees the next faults.
    let f = Fixture {
        client: client_for(&f.server, SECRET, Duration::from_secs(5)),
        ..f
    };
    f.sim.fail_next(1, 503).unwrap();
    let err = f.client.mailbox_purpose(TENANT, ALICE).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Throttled { status: 503, .. }),
        "{err:?}"
    );
    f.sim.fail_next(1, 500).unwrap();
    let err = f.client.member_of(TENANT, ALICE).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Server { status: 500, .. }),
        "{err:?}"
    );
    assert_eq!(
        f.client.member_of(TENANT, ALICE).await.unwrap(),
        Some(vec![])
    );
}

#[tokio::test]
async fn granted_permissions_come_from_the_token_in_use() {
    let f = fixture().await;
    assert_eq!(
        f.client.granted_permissions(TENANT).await.unwrap(),
        Some(vec!["User.Read.All".to_owned()])
    );
    assert_eq!(f.sim.token_requests(), 1, "fetched a token to read it");

    let wanted = [
        "User.Read.All",
        "GroupMember.Read.All",
        "MailboxSettings.Read",
    ];
    f.sim.set_app_permissions(APP, &wanted).unwrap();
    // The cached token still carries the old grant, and Graph authorizes by it.
    assert_eq!(
        f.client.granted_permissions(TENANT).await.unwrap(),
        Some(vec!["User.Read.All".to_owned()])
    );
    assert!(f.client.mailbox_purpose(TENANT, ALICE).await.is_err());
    // A new client (or a refreshed token) sees the new grant.
    let fresh = client_for(&f.server, SECRET, Duration::from_secs(5));
    let got = fresh.granted_permissions(TENANT).await.unwrap().unwrap();
    assert_eq!(got, wanted);
    f.sim.revoke_tokens();
    f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap();
    assert_eq!(
        f.client.granted_permissions(TENANT).await.unwrap().unwrap(),
        wanted
    );
    assert_eq!(f.client.mailbox_purpose(TENANT, ALICE).await.unwrap(), None);

    // No roles claim (nothing granted), and an opaque token: unknown.
    f.sim.set_app_permissions(APP, &[]).unwrap();
    let none = client_for(&f.server, SECRET, Duration::from_secs(5));
    assert_eq!(none.granted_permissions(TENANT).await.unwrap(), None);
    f.sim.set_app_permissions(APP, &wanted).unwrap();
    f.sim.update_settings(|s| s.opaque_tokens = true);
    let opaque = client_for(&f.server, SECRET, Duration::from_secs(5));
    assert_eq!(opaque.granted_permissions(TENANT).await.unwrap(), None);
    assert!(
        opaque
            .get_user(TENANT, ALICE, &["id"])
            .await
            .unwrap()
            .is_some()
    );

    // Token errors surface as they do for any call.
    let wrong = client_for(&f.server, "wrong-secret", Duration::from_secs(5));
    assert!(matches!(
        wrong.granted_permissions(TENANT).await,
        Err(GraphError::Unauthorized { status: 401, .. })
    ));
}

#[tokio::test]
async fn employee_leave_date_needs_the_lifecycle_permission() {
    let f = fixture().await;
    let leave: DateTime<Utc> = "2026-06-30T16:00:00Z".parse().unwrap();
    f.sim
        .update_user(TENANT, ALICE, |u| u.employee_leave_date_time = Some(leave))
        .unwrap();
    let user = f
        .client
        .get_user(TENANT, ALICE, USER_SELECT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.employee_leave_date_time, None, "left out by Graph");
    assert_eq!(user.account_enabled, Some(true));

    f.sim
        .set_app_permissions(APP, &["User.Read.All", "User-LifeCycleInfo.Read.All"])
        .unwrap();
    let client = client_for(&f.server, SECRET, Duration::from_secs(5));
    let user = client
        .get_user(TENANT, ALICE, USER_SELECT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.employee_leave_date_time, Some(leave));
}

#[test]
fn roles_are_read_from_jwt_payloads_only() {
    // The simulator's encoder: an independent implementation to check the decoder against.
    let b64 = |s: &str| crate::sim::graph::base64url(s.as_bytes());
    let jwt = |payload: &str| format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(payload));
    assert_eq!(
        roles_in_token(&jwt(
            r#"{"tid":"t","roles":["User.Read.All","Group.Read.All"]}"#
        )),
        Some(vec!["User.Read.All".into(), "Group.Read.All".into()])
    );
    assert_eq!(roles_in_token(&jwt(r#"{"roles":[]}"#)), Some(vec![]));
    assert_eq!(roles_in_token(&jwt(r#"{"tid":"t"}"#)), None);
    assert_eq!(roles_in_token(&jwt(r#"{"roles":"User.Read.All"}"#)), None);
    assert_eq!(roles_in_token(&jwt("not json")), None);
    // Padded payloads are tolerated.
    let padded = format!("h.{}==.s", b64(r#"{"roles":["A"]}"#));
    assert_eq!(roles_in_token(&padded), Some(vec!["A".into()]));
    for token in ["", "opaque", "a.b", "a.b.c.d.e", "h.*bad*.s", "h.A.s"] {
        assert_eq!(roles_in_token(token), None, "{token}");
    }

    assert_eq!(base64url_decode("").unwrap(), b"");
    assert_eq!(base64url_decode("Zm9vYmFy").unwrap(), b"foobar");
    assert_eq!(base64url_decode("Zm9vYg==").unwrap(), b"foob");
    assert_eq!(base64url_decode("-_8").unwrap(), [0xfb, 0xff]);
    assert_eq!(
        base64url_decode("+/8"),
        None,
        "standard alphabet is not base64url"
    );
}

// ---------------------------------------------------------------------------------------
// Delta query and subscription maintenance

const DELTA_SELECT: &[&str] = &["id", "accountEnabled", "userPrincipalName"];

pub(super) fn numbered(i: usize) -> GraphUser {
    GraphUser {
        id: format!("cccccccc-0000-4000-8000-{i:012}"),
        account_enabled: Some(true),
        user_principal_name: Some(format!("user{i}@example.com")),
        department: Some("Sales".into()),
        ..Default::default()
    }
}

/// Everything one delta round returned, and how it ended.
#[derive(Debug)]
struct Round {
    users: Vec<GraphUser>,
    removed: Vec<RemovedUser>,
    delta_link: String,
    pages: usize,
}

impl Round {
    fn user_ids(&self) -> Vec<&str> {
        self.users.iter().map(|u| u.id.as_str()).collect()
    }
}

/// Follow `page` through its next links to the delta link.
async fn follow(client: &GraphClient, mut page: DeltaPage) -> Round {
    let mut round = Round {
        users: Vec::new(),
        removed: Vec::new(),
        delta_link: String::new(),
        pages: 0,
    };
    loop {
        round.pages += 1;
        round.users.append(&mut page.users);
        round.removed.append(&mut page.removed);
        match page.next {
            DeltaNext::NextLink(link) => {
                page = client.users_delta_next(TENANT, &link).await.unwrap();
            }
            DeltaNext::DeltaLink(link) => {
                round.delta_link = link;
                return round;
            }
        }
    }
}

/// The next round from a stored delta link.
async fn next_round(f: &Fixture, delta_link: &str) -> Round {
    let first = f.client.users_delta_next(TENANT, delta_link).await.unwrap();
    follow(&f.client, first).await
}

/// Alice plus `n` numbered users, synced once with [`DELTA_SELECT`].
async fn synced(n: usize, page_size: usize) -> (Fixture, Round) {
    let f = fixture().await;
    for i in 0..n {
        f.sim.upsert_user(TENANT, numbered(i)).unwrap();
    }
    f.sim.update_settings(|s| s.delta_page_size = page_size);
    let first = f
        .client
        .users_delta_start(TENANT, DELTA_SELECT)
        .await
        .unwrap();
    let round = follow(&f.client, first).await;
    (f, round)
}

#[tokio::test]
async fn delta_initial_sync_pages_to_a_delta_link_then_reports_changes_only() {
    let (f, initial) = synced(4, 2).await;
    assert_eq!(initial.pages, 3);
    let mut ids = initial.user_ids();
    ids.sort_unstable();
    let mut expected: Vec<String> = (0..4).map(|i| numbered(i).id).collect();
    expected.push(ALICE.into());
    expected.sort_unstable();
    assert_eq!(ids, expected);
    assert!(initial.removed.is_empty());
    let alice = initial.users.iter().find(|u| u.id == ALICE).unwrap();
    assert_eq!(alice.account_enabled, Some(true), "selected");
    assert_eq!(alice.proxy_addresses, None, "not selected");
    let first_call = f
        .sim
        .request_log()
        .into_iter()
        .find(|r| r.path == "/v1.0/users/delta")
        .unwrap();
    assert_eq!(
        first_call.query.as_deref(),
        Some("$select=id,accountEnabled,userPrincipalName")
    );

    let quiet = next_round(&f, &initial.delta_link).await;
    assert!(
        quiet.users.is_empty() && quiet.removed.is_empty(),
        "{quiet:?}"
    );

    f.sim.set_account_enabled(TENANT, ALICE, false).unwrap();
    let changed = next_round(&f, &quiet.delta_link).await;
    assert_eq!(changed.user_ids(), [ALICE]);
    assert_eq!(changed.users[0].account_enabled, Some(false));
    // A delta link can be replayed: it still reports the same changes.
    let replay = next_round(&f, &quiet.delta_link).await;
    assert_eq!(replay.user_ids(), [ALICE]);
    // New users appear in the next round.
    f.sim.upsert_user(TENANT, numbered(9)).unwrap();
    let created = next_round(&f, &changed.delta_link).await;
    assert_eq!(created.user_ids(), [numbered(9).id]);
}

#[tokio::test]
async fn delta_select_narrows_tracking() {
    let (f, initial) = synced(1, 100).await;
    f.sim
        .update_user(TENANT, ALICE, |u| u.department = Some("Legal".into()))
        .unwrap();
    let unselected = next_round(&f, &initial.delta_link).await;
    assert!(unselected.users.is_empty(), "{unselected:?}");

    f.sim
        .update_user(TENANT, ALICE, |u| {
            u.user_principal_name = Some("alice.new@example.com".into())
        })
        .unwrap();
    let selected = next_round(&f, &unselected.delta_link).await;
    assert_eq!(selected.user_ids(), [ALICE]);
    assert_eq!(
        selected.users[0].user_principal_name.as_deref(),
        Some("alice.new@example.com")
    );
}

#[tokio::test]
async fn delta_reports_soft_and_hard_deletes_as_removed() {
    let (f, initial) = synced(2, 100).await;
    let (soft, hard) = (numbered(0).id, numbered(1).id);
    f.sim.soft_delete_user(TENANT, &soft).unwrap();
    f.sim.delete_user(TENANT, &hard).unwrap();
    assert_eq!(
        f.client.get_user(TENANT, &soft, &["id"]).await.unwrap(),
        None
    );

    let gone = next_round(&f, &initial.delta_link).await;
    assert!(gone.users.is_empty(), "{gone:?}");
    assert_eq!(
        gone.removed,
        [
            RemovedUser {
                id: soft.clone(),
                reason: "changed".into()
            },
            RemovedUser {
                id: hard,
                reason: "deleted".into()
            },
        ]
    );
    assert!(gone.removed[0].is_soft_delete() && !gone.removed[1].is_soft_delete());

    // Restoring a soft-deleted user brings it back as a user.
    f.sim.upsert_user(TENANT, numbered(0)).unwrap();
    let restored = next_round(&f, &gone.delta_link).await;
    assert_eq!(restored.user_ids(), [soft.as_str()]);
    assert!(restored.removed.is_empty());
}

#[tokio::test]
async fn delta_latest_starts_from_now() {
    let f = fixture().await;
    let latest = format!(
        "{}/users/delta?$deltatoken=latest&$select=id,accountEnabled",
        f.server.api_url()
    );
    let page = f.client.users_delta_next(TENANT, &latest).await.unwrap();
    assert!(page.users.is_empty() && page.removed.is_empty());
    let link = page.delta_link().unwrap().to_owned();
    assert!(next_round(&f, &link).await.users.is_empty());
    f.sim.set_account_enabled(TENANT, ALICE, false).unwrap();
    assert_eq!(next_round(&f, &link).await.user_ids(), [ALICE]);
}

#[tokio::test]
async fn expired_delta_tokens_are_delta_token_expired_in_both_readings() {
    let (f, initial) = synced(0, 100).await;
    f.sim.expire_delta_tokens(TENANT).unwrap();
    let err = f
        .client
        .users_delta_next(TENANT, &initial.delta_link)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GraphError::DeltaTokenExpired { status: 410, body } if body.contains("syncStateNotFound")),
        "{err:?}"
    );
    assert!(!err.is_retryable());

    // The 400 reading, with an expired next link in the middle of a round.
    f.sim.update_settings(|s| {
        s.delta_token_expired_status = 400;
        s.delta_page_size = 1;
    });
    f.sim.upsert_user(TENANT, numbered(0)).unwrap();
    let first = f.client.users_delta_start(TENANT, &["id"]).await.unwrap();
    let DeltaNext::NextLink(next) = first.next else {
        panic!("expected more pages: {first:?}");
    };
    f.sim.expire_delta_tokens(TENANT).unwrap();
    let err = f.client.users_delta_next(TENANT, &next).await.unwrap_err();
    assert!(
        matches!(&err, GraphError::DeltaTokenExpired { status: 400, .. }),
        "{err:?}"
    );

    // Tokens outlive neither the configured lifetime.
    f.sim
        .update_settings(|s| s.delta_token_lifetime = Duration::from_millis(100));
    let round = follow(
        &f.client,
        f.client.users_delta_start(TENANT, &["id"]).await.unwrap(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let err = f
        .client
        .users_delta_next(TENANT, &round.delta_link)
        .await
        .unwrap_err();
    assert!(
        matches!(err, GraphError::DeltaTokenExpired { .. }),
        "{err:?}"
    );

    // Other 4xx answers of a delta call stay ordinary rejections.
    f.sim.fail_next(1, 400).unwrap();
    let err = f
        .client
        .users_delta_start(TENANT, &["id"])
        .await
        .unwrap_err();
    assert!(
        matches!(err, GraphError::Rejected { status: 400, .. }),
        "{err:?}"
    );
}

#[test]
fn resync_codes_are_read_from_graph_error_bodies() {
    assert!(is_resync_code(
        r#"{"error":{"code":"syncStateNotFound","message":"x"}}"#
    ));
    assert!(is_resync_code(r#"{"error":{"code":"ResyncRequired"}}"#));
    assert!(!is_resync_code(r#"{"error":{"code":"invalidRequest"}}"#));
    assert!(!is_resync_code("syncStateNotFound"));
}

#[tokio::test]
async fn delta_links_off_the_api_origin_are_refused_unsent() {
    let f = fixture().await;
    for link in [
        "https://evil.example/v1.0/users/delta?$deltatoken=x",
        "not a link",
    ] {
        let err = f.client.users_delta_next(TENANT, link).await.unwrap_err();
        assert!(
            matches!(err, GraphError::Rejected { status: 200, .. }),
            "{err:?}"
        );
    }
    assert_eq!(f.sim.token_requests(), 0);
    assert!(f.sim.request_log().is_empty());
}

#[tokio::test]
async fn delta_duplicates_reach_the_caller() {
    let f = fixture().await;
    f.sim
        .update_faults(|x| x.delta_duplicate_probability = 1.0)
        .unwrap();
    let round = follow(
        &f.client,
        f.client.users_delta_start(TENANT, &["id"]).await.unwrap(),
    )
    .await;
    assert_eq!(round.user_ids(), [ALICE, ALICE]);
}

#[tokio::test]
async fn subscriptions_are_renewed_reauthorized_and_deleted() {
    let f = fixture().await;
    let sub = Subscriber::start(Handshake::Echo).await;
    let created = f
        .client
        .create_subscription(TENANT, &new_subscription(&sub.url, "users"))
        .await
        .unwrap();
    let later = Utc::now() + TimeDelta::days(3);
    let renewed = f
        .client
        .renew_subscription(TENANT, &created.id, later)
        .await
        .unwrap();
    assert_eq!(renewed.id, created.id);
    assert!((renewed.expiration_date_time - later).num_seconds().abs() < 1);
    let stored = f.sim.subscriptions(TENANT);
    assert_eq!(
        stored[0].subscription.expiration_date_time,
        renewed.expiration_date_time
    );
    let err = f
        .client
        .renew_subscription(TENANT, &created.id, Utc::now() + TimeDelta::days(40))
        .await
        .unwrap_err();
    assert!(
        matches!(err, GraphError::Rejected { status: 400, .. }),
        "{err:?}"
    );

    f.client
        .reauthorize_subscription(TENANT, &created.id)
        .await
        .unwrap();
    let reauthorize = f
        .sim
        .request_log()
        .into_iter()
        .find(|r| r.path.ends_with("/reauthorize"))
        .unwrap();
    assert_eq!(reauthorize.status, 204);

    f.client
        .delete_subscription(TENANT, &created.id)
        .await
        .unwrap();
    assert!(f.sim.subscriptions(TENANT).is_empty());
    // Already gone, or never there: deleted all the same.
    f.client
        .delete_subscription(TENANT, &created.id)
        .await
        .unwrap();
    f.client
        .delete_subscription(TENANT, "no-such-subscription")
        .await
        .unwrap();
    for err in [
        f.client
            .renew_subscription(TENANT, &created.id, later)
            .await
            .unwrap_err(),
        f.client
            .reauthorize_subscription(TENANT, &created.id)
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(err, GraphError::Rejected { status: 404, .. }),
            "{err:?}"
        );
    }
    let err = f
        .client
        .delete_subscription(TENANT, "..")
        .await
        .unwrap_err();
    assert!(
        matches!(err, GraphError::Rejected { status: 400, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_huge_retry_after_is_clamped_and_never_panics() {
    let f = fixture().await;
    f.sim.throttle_next(1, Some(u64::MAX));
    let err = f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(crate::retry_after::MAX), "{err:?}");
    // The tenant's hold is the clamped wait: the next call is refused locally, no panic.
    let err = f.client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Throttled { retry_after: Some(left), .. } if left <= crate::retry_after::MAX),
        "{err:?}"
    );
}

/// A server that answers every request with `status` and `Location: {to}`.
async fn redirector(status: u16, to: String) -> Url {
    use axum::http::{StatusCode, header::LOCATION};
    let app = axum::Router::new().fallback(move || {
        let to = to.clone();
        async move { (StatusCode::from_u16(status).unwrap(), [(LOCATION, to)]) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/").parse().unwrap()
}

fn client_at(authority_url: Url, api_url: Url) -> GraphClient {
    GraphClient::from_settings(GraphClientSettings {
        authority_url,
        api_url,
        client_id: APP.into(),
        client_secret: SecretString::from(SECRET),
        request_timeout: Duration::from_secs(5),
        reads_in_flight: 0,
    })
    .unwrap()
}

#[tokio::test]
async fn redirects_are_never_followed_so_the_secret_stays_home() {
    // The origin a redirect points at: it records every request it gets.
    let f = fixture().await;
    let before = f.sim.request_log().len();
    let elsewhere = format!("{}{TENANT}/oauth2/v2.0/token", f.server.authority_url());
    for status in [301, 302, 307, 308] {
        let authority = redirector(status, elsewhere.clone()).await;
        let client = client_at(authority, f.server.api_url());
        let err = client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
        assert!(
            matches!(err, GraphError::Rejected { status: s, .. } if s == status),
            "{status}: {err:?}"
        );
    }
    // A redirected API answer is not taken as user data either.
    let api = redirector(302, format!("{}users/{ALICE}", f.server.api_url())).await;
    let client = client_at(f.server.authority_url(), api);
    let err = client.get_user(TENANT, ALICE, &["id"]).await.unwrap_err();
    assert!(
        matches!(err, GraphError::Rejected { status: 302, .. }),
        "{err:?}"
    );
    let tokens = f
        .sim
        .request_log()
        .iter()
        .skip(before)
        .filter(|r| r.path.ends_with("/token"))
        .count();
    assert_eq!(
        tokens, 1,
        "only the last client's own token request reached Graph"
    );
}
