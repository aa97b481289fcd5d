//! The user list `GET /v1.0/users` and its `$filter` subset, through the HTTP surface:
//! what is answered, and what is refused rather than guessed.

use super::*;

const BOB: &str = "bbbbbbbb-0000-4000-8000-00000000000b";

/// `/users?` with each `(name, value)` form-encoded.
fn users_path(options: &[(&str, &str)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in options {
        q.append_pair(k, v);
    }
    format!("/users?{}", q.finish())
}

fn ids(page: &Value) -> Vec<String> {
    page["value"]
        .as_array()
        .unwrap_or_else(|| panic!("no value in {page}"))
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Alice (from the harness) and Bob, whose `mail` claims Alice's address.
async fn two_holders() -> Harness {
    let h = harness().await;
    h.sim
        .upsert_user(
            TENANT,
            GraphUser {
                id: BOB.into(),
                account_enabled: Some(false),
                mail: Some("ALICE@example.com".into()),
                user_principal_name: Some("bob@example.com".into()),
                proxy_addresses: Some(vec!["smtp:o'brien@example.com".into()]),
                ..Default::default()
            },
        )
        .unwrap();
    h
}

#[tokio::test]
async fn filters_find_users_by_mail_upn_or_proxy_address() {
    let h = two_holders().await;
    let alice = alice().id;
    let select = ("$select", "id,accountEnabled,mail");
    for (filter, want) in [
        (
            "mail eq 'alice@EXAMPLE.com'",
            vec![alice.clone(), BOB.into()],
        ),
        ("userPrincipalName eq 'BOB@example.com'", vec![BOB.into()]),
        (
            "proxyAddresses/any(x:x eq 'smtp:alice@example.com')",
            vec![alice.clone()],
        ),
        (
            "proxyAddresses/any(addr:addr eq 'SMTP:O''Brien@example.com')",
            vec![BOB.into()],
        ),
        (
            "userPrincipalName eq 'nobody@x.com' or proxyAddresses/any(p:p eq 'smtp:o''brien@example.com')",
            vec![BOB.into()],
        ),
        ("mail eq 'nobody@example.com'", vec![]),
    ] {
        let (status, page) = h.get(&users_path(&[("$filter", filter), select])).await;
        assert_eq!(status, 200, "{filter}: {page}");
        assert_eq!(ids(&page), want, "{filter}");
    }
    // Selected properties only, no per-item context; unselected ones are absent.
    let (_, page) = h
        .get(&users_path(&[
            ("$filter", "userPrincipalName eq 'bob@example.com'"),
            select,
        ]))
        .await;
    assert_eq!(
        page["value"][0],
        json!({"id": BOB, "accountEnabled": false, "mail": "ALICE@example.com"})
    );
    assert!(
        page["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("/$metadata#users(id,accountEnabled,mail)")
    );
    // Without $select: Graph's default set (no accountEnabled); without $filter: everyone.
    let (status, page) = h.get("/users").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page), [alice, BOB.to_owned()]);
    assert!(page["value"][0].get("accountEnabled").is_none(), "{page}");
    assert_eq!(page["value"][0]["displayName"], Value::Null);
}

#[tokio::test]
async fn the_filter_needs_no_advanced_query_and_counts_only_with_one() {
    let h = two_holders().await;
    let path = users_path(&[
        ("$filter", "mail eq 'alice@example.com'"),
        ("$count", "true"),
    ]);
    // Without ConsistencyLevel: answered, `$count` silently ignored (as documented).
    let (status, page) = h.get(&path).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page).len(), 2);
    assert!(page.get("@odata.count").is_none(), "{page}");
    // With it: the same users, and the count.
    let resp = h
        .http
        .get(h.url(&path))
        .bearer_auth(&h.token)
        .header("ConsistencyLevel", "eventual")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let page: Value = resp.json().await.unwrap();
    assert_eq!(page["@odata.count"], 2, "{page}");
}

#[tokio::test]
async fn filters_outside_the_grammar_are_refused_like_graph() {
    let h = two_holders().await;
    for (filter, code) in [
        ("startswith(mail,'alice')", "Request_UnsupportedQuery"),
        ("accountEnabled eq false", "Request_UnsupportedQuery"),
        ("mail ne 'alice@example.com'", "Request_UnsupportedQuery"),
        (
            "mail eq 'a@x.com' and userPrincipalName eq 'a@x.com'",
            "Request_UnsupportedQuery",
        ),
        (
            "proxyAddresses/any(p:q eq 'smtp:a@x.com')",
            "Request_UnsupportedQuery",
        ),
        ("mail eq 'o'brien@example.com'", "BadRequest"),
        ("mail eq 'unterminated", "BadRequest"),
        ("", "BadRequest"),
    ] {
        let (status, body) = h.get(&users_path(&[("$filter", filter)])).await;
        assert_eq!(status, 400, "{filter}: {body}");
        assert_eq!(body["error"]["code"], code, "{filter}: {body}");
        assert!(body["error"]["innerError"]["date"].is_string());
    }
    // Other query options are refused, not ignored; so are page sizes Graph refuses.
    for path in [
        users_path(&[("$search", "\"mail:alice\"")]),
        users_path(&[("$orderby", "displayName")]),
        users_path(&[("$top", "0")]),
        users_path(&[("$top", "1000")]),
        users_path(&[("$select", "id,noSuchProperty")]),
    ] {
        let (status, body) = h.get(&path).await;
        assert_eq!(status, 400, "{path}: {body}");
    }
    // Every request, refused or not, is in the log with its query.
    let logged = h
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.path == "/v1.0/users" && r.status == 400)
        .count();
    assert_eq!(logged, 13);
}

#[tokio::test]
async fn listing_users_needs_a_user_read_permission() {
    let h = two_holders().await;
    h.sim
        .set_app_permissions(APP, &["MailboxSettings.Read"])
        .unwrap();
    let (status, body) = h.token_request(TENANT, APP, SECRET).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    let path = users_path(&[("$filter", "mail eq 'alice@example.com'")]);
    let resp = h
        .http
        .get(h.url(&path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Authorization_RequestDenied");
    // Directory.Read.All is as good as User.Read.All.
    h.sim
        .set_app_permissions(APP, &["Directory.Read.All"])
        .unwrap();
    let (_, body) = h.token_request(TENANT, APP, SECRET).await;
    let token = body["access_token"].as_str().unwrap();
    let resp = h
        .http
        .get(h.url(&path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn pages_hold_at_most_top_and_link_to_the_rest() {
    let h = harness().await;
    for i in 0..4 {
        let user = GraphUser {
            id: format!("cccccccc-0000-4000-8000-{i:012}"),
            mail: Some("shared@example.com".into()),
            ..Default::default()
        };
        h.sim.upsert_user(TENANT, user).unwrap();
    }
    let filter = ("$filter", "mail eq 'shared@example.com'");
    let (_, first) = h
        .get(&users_path(&[filter, ("$top", "3"), ("$select", "id")]))
        .await;
    assert_eq!(ids(&first).len(), 3);
    let next = first["@odata.nextLink"]
        .as_str()
        .expect("a nextLink")
        .to_owned();
    assert!(next.starts_with(&h.url("/users?")), "{next}");
    let (status, second) = h.get(&next).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(ids(&second).len(), 1);
    assert!(second.get("@odata.nextLink").is_none(), "{second}");
    let mut all = [ids(&first), ids(&second)].concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4);
    // The service-side cap applies whatever $top asks for; without $top, 100.
    h.sim.update_settings(|s| s.users_page_size = 2);
    let (_, capped) = h.get(&users_path(&[filter, ("$top", "999")])).await;
    assert_eq!(ids(&capped).len(), 2);
    assert!(capped["@odata.nextLink"].is_string());
}
