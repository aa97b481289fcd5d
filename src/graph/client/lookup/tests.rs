//! `users_with_address` against the Graph simulator's `GET /v1.0/users?$filter=...`.

use std::time::Duration;

use super::address_filter;
use crate::graph::client::tests::{ALICE, Fixture, client_for, fixture, numbered};
use crate::graph::{GraphApi, GraphError, GraphUser};
use crate::sim::graph::RequestRecord;
use crate::sim::graph::tests::{APP, SECRET, TENANT};

const BOB: &str = "bbbbbbbb-0000-4000-8000-00000000000b";
const ROGUE: &str = "dddddddd-0000-4000-8000-00000000000d";

fn add(f: &Fixture, user: GraphUser) {
    f.sim.upsert_user(TENANT, user).unwrap();
}

fn with_mail(id: &str, mail: &str) -> GraphUser {
    GraphUser {
        id: id.into(),
        account_enabled: Some(true),
        mail: Some(mail.into()),
        ..Default::default()
    }
}

async fn holder_ids(f: &Fixture, address: &str) -> Vec<String> {
    let mut ids: Vec<String> = f
        .client
        .users_with_address(TENANT, address)
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.id)
        .collect();
    ids.sort();
    ids
}

/// The `GET /v1.0/users` requests the simulator served.
fn list_requests(f: &Fixture) -> Vec<RequestRecord> {
    f.sim
        .request_log()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/v1.0/users")
        .collect()
}

#[test]
fn the_filter_ors_every_address_property_and_doubles_quotes() {
    assert_eq!(
        address_filter("o'brien@example.com"),
        "mail eq 'o''brien@example.com' or userPrincipalName eq 'o''brien@example.com' \
         or proxyAddresses/any(p:p eq 'smtp:o''brien@example.com') \
         or proxyAddresses/any(p:p eq 'SMTP:o''brien@example.com')"
    );
}

#[tokio::test]
async fn holders_are_found_by_mail_proxy_address_or_upn() {
    let f = fixture().await;
    add(&f, with_mail(BOB, "Bob@Example.com"));
    add(
        &f,
        GraphUser {
            proxy_addresses: Some(vec![
                "SMTP:carol@example.com".into(),
                "smtp:c.alias@example.com".into(),
            ]),
            ..numbered(3)
        },
    );
    // Alice: primary SMTP address and UPN; found in any case.
    assert_eq!(holder_ids(&f, "ALICE@example.com").await, [ALICE]);
    // Bob: mail only.
    assert_eq!(holder_ids(&f, "bob@example.com").await, [BOB]);
    // A secondary (`smtp:`) proxy address, and a UPN alone.
    assert_eq!(
        holder_ids(&f, "c.alias@example.com").await,
        [numbered(3).id]
    );
    assert_eq!(holder_ids(&f, "user3@example.com").await, [numbered(3).id]);
    assert!(holder_ids(&f, "nobody@example.com").await.is_empty());

    // Each holder comes with the properties the identity check needs.
    let found = f
        .client
        .users_with_address(TENANT, " alice@example.com ")
        .await;
    let alice = &found.unwrap()[0];
    assert_eq!(alice.account_enabled, Some(true));
    assert_eq!(alice.primary_smtp(), Some("Alice@example.com"));
    assert_eq!(
        alice.user_principal_name.as_deref(),
        Some("alice@example.com")
    );
    assert_eq!(alice.department, None, "not selected");

    // No advanced query parameters: the default store answers (see the module docs).
    let last = list_requests(&f).pop().unwrap();
    let query = last.query.unwrap();
    assert!(!query.contains("$count"), "{query}");
    assert!(query.contains("$select=id,accountEnabled,mail,userPrincipalName,proxyAddresses"));
}

#[tokio::test]
async fn every_holder_is_returned_including_a_disabled_impostor() {
    let f = fixture().await;
    // A disabled object without a mailbox whose `mail` was set to Alice's address.
    add(
        &f,
        GraphUser {
            account_enabled: Some(false),
            ..with_mail(ROGUE, "alice@EXAMPLE.com")
        },
    );
    let holders = f
        .client
        .users_with_address(TENANT, "alice@example.com")
        .await
        .unwrap();
    let mut ids: Vec<(&str, Option<bool>)> = holders
        .iter()
        .map(|u| (u.id.as_str(), u.account_enabled))
        .collect();
    ids.sort();
    assert_eq!(ids, [(ALICE, Some(true)), (ROGUE, Some(false))]);
}

#[tokio::test]
async fn quotes_are_escaped_and_cannot_extend_the_filter() {
    let f = fixture().await;
    add(&f, with_mail(BOB, "o'brien@example.com"));
    assert_eq!(holder_ids(&f, "O'Brien@example.com").await, [BOB]);
    let query = list_requests(&f).pop().unwrap().query.unwrap();
    assert!(!query.contains('+'), "spaces go as %20: {query}");
    let filter: String = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "$filter")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    assert!(
        filter.starts_with("mail eq 'O''Brien@example.com' or "),
        "{filter}"
    );

    // An address that tries to close the literal stays one literal: it matches nobody
    // (rather than every enabled user), and the filter still parses.
    let hostile = "x' or userPrincipalName eq 'alice@example.com";
    assert!(holder_ids(&f, hostile).await.is_empty());
}

#[tokio::test]
async fn every_page_is_followed() {
    let f = fixture().await;
    f.sim.update_settings(|s| s.users_page_size = 2);
    for i in 0..5 {
        add(&f, with_mail(&numbered(i).id, "shared@example.com"));
    }
    let before = list_requests(&f).len();
    let mut ids = holder_ids(&f, "shared@example.com").await;
    ids.dedup();
    assert_eq!(ids.len(), 5, "{ids:?}");
    let pages = &list_requests(&f)[before..];
    assert_eq!(pages.len(), 3, "5 holders in pages of 2");
    assert!(pages[1].query.as_deref().unwrap().contains("skiptoken"));
}

#[tokio::test]
async fn throttling_holds_the_tenant_and_errors_are_classified() {
    let f = fixture().await;
    f.sim.throttle_next(1, Some(7));
    let err = f
        .client
        .users_with_address(TENANT, "alice@example.com")
        .await
        .unwrap_err();
    assert!(
        matches!(err, GraphError::Throttled { status: 429, retry_after: Some(d) } if d == Duration::from_secs(7)),
        "{err:?}"
    );
    // The tenant is held: the next lookup is not sent at all.
    let sent = f.sim.request_log().len();
    let err = f
        .client
        .users_with_address(TENANT, "alice@example.com")
        .await
        .unwrap_err();
    assert!(matches!(err, GraphError::Throttled { .. }), "{err:?}");
    assert_eq!(f.sim.request_log().len(), sent, "nothing reached Graph");

    // An empty address is refused before anything is sent.
    let client = client_for(&f.server, SECRET, Duration::from_secs(5));
    let err = client.users_with_address(TENANT, "  ").await.unwrap_err();
    assert!(
        matches!(err, GraphError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    assert_eq!(f.sim.request_log().len(), sent);

    // Without a user permission: 403, not worth retrying.
    f.sim
        .set_app_permissions(APP, &["MailboxSettings.Read"])
        .unwrap();
    let err = client
        .users_with_address(TENANT, "alice@example.com")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GraphError::Unauthorized { status: 403, .. }),
        "{err:?}"
    );
}
