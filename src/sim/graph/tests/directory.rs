//! The simulator's tokens and application permissions, groups (`transitiveMemberOf`) and
//! mailbox settings, through its HTTP surface.

use super::*;
use crate::graph::client::base64url_decode;

async fn token_for(h: &Harness, client_id: &str, secret: &str) -> String {
    let (status, body) = h.token_request(TENANT, client_id, secret).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

/// GET with `token`, always with `ConsistencyLevel: eventual` (needed by the cast form of
/// `transitiveMemberOf`, ignored elsewhere).
async fn get_as(h: &Harness, token: &str, path: &str) -> (u16, Value) {
    let url = if path.starts_with("http") {
        path.to_owned()
    } else {
        h.url(path)
    };
    let resp = h
        .http
        .get(url)
        .bearer_auth(token)
        .header("ConsistencyLevel", "eventual")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The JSON payload of a JWT, read without verification.
fn claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    serde_json::from_slice(&base64url_decode(parts[1]).unwrap()).unwrap()
}

/// alice ∈ Sales ∈ EMEA ∈ Everyone; Other has nobody.
fn seed_groups(sim: &GraphSim) {
    for (id, name) in [
        ("g-sales", "Sales"),
        ("g-emea", "EMEA"),
        ("g-all", "Everyone"),
        ("g-other", "Other"),
    ] {
        sim.add_group(TENANT, id, name).unwrap();
    }
    sim.add_member(TENANT, "g-sales", &alice().id).unwrap();
    sim.add_member(TENANT, "g-emea", "g-sales").unwrap();
    sim.add_member(TENANT, "g-all", "G-EMEA").unwrap();
}

fn ids(page: &Value) -> Vec<String> {
    page["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn base64url_matches_rfc_4648_vectors() {
    use super::super::permissions::base64url;
    for (raw, encoded) in [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64url(raw.as_bytes()), encoded);
        assert_eq!(base64url_decode(encoded).unwrap(), raw.as_bytes());
    }
    assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    let bytes: Vec<u8> = (0..=255).collect();
    assert_eq!(base64url_decode(&base64url(&bytes)).unwrap(), bytes);
}

#[tokio::test]
async fn tokens_are_jwts_carrying_the_permissions_granted_at_issue() {
    let h = harness().await;
    let c = claims(&h.token);
    assert_eq!(c["tid"], TENANT);
    assert_eq!(c["appid"], APP.to_ascii_lowercase());
    assert_eq!(c["roles"], json!(["User.Read.All"]));
    assert_eq!(c["idtyp"], "app");
    assert_eq!(c["aud"], "https://graph.microsoft.com");
    let (iat, exp) = (c["iat"].as_i64().unwrap(), c["exp"].as_i64().unwrap());
    assert_eq!(exp - iat, 3599);
    let header: Value =
        serde_json::from_slice(&base64url_decode(h.token.split('.').next().unwrap()).unwrap())
            .unwrap();
    assert_eq!(header["typ"], "JWT");
    assert_eq!(
        h.sim.app_permissions(APP).unwrap(),
        DEFAULT_PERMISSIONS.to_vec()
    );

    // New permissions reach new tokens only; the old token keeps what it was issued with.
    h.sim
        .set_app_permissions(APP, &["MailboxSettings.Read", "MailboxSettings.Read"])
        .unwrap();
    let narrow = token_for(&h, APP, SECRET).await;
    assert_eq!(claims(&narrow)["roles"], json!(["MailboxSettings.Read"]));
    let user = format!("/users/{}", alice().id);
    assert_eq!(get_as(&h, &h.token, &user).await.0, 200);
    let (status, body) = get_as(&h, &narrow, &user).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "Authorization_RequestDenied");

    // No permissions at all: Entra leaves the claim out.
    h.sim.set_app_permissions(APP, &[]).unwrap();
    let none = token_for(&h, APP, SECRET).await;
    assert!(claims(&none).get("roles").is_none(), "{}", claims(&none));

    // Opaque tokens carry their grant all the same.
    h.sim.set_app_permissions(APP, DEFAULT_PERMISSIONS).unwrap();
    h.sim.update_settings(|s| s.opaque_tokens = true);
    let opaque = token_for(&h, APP, SECRET).await;
    assert!(opaque.starts_with("simtok."), "{opaque}");
    assert_eq!(get_as(&h, &opaque, &user).await.0, 200);

    // Re-adding an app changes its secret and keeps its permissions.
    h.sim
        .set_app_permissions(APP, &["Directory.Read.All"])
        .unwrap();
    h.sim.add_app(APP, "new-secret");
    assert_eq!(h.sim.app_permissions(APP).unwrap(), ["Directory.Read.All"]);
    assert!(matches!(
        h.sim.set_app_permissions("no-such-app", &[]),
        Err(SimError::UnknownApp(_))
    ));
    assert!(h.sim.set_app_permissions(APP, &["User Read"]).is_err());
}

#[tokio::test]
async fn every_route_checks_the_permissions_in_the_token() {
    let h = harness().await;
    seed_groups(&h.sim);
    let alice_id = alice().id;
    h.sim
        .set_mailbox_purpose(TENANT, &alice_id, Some("user"))
        .unwrap();
    let user = format!("/users/{alice_id}");
    let groups = format!("/users/{alice_id}/transitiveMemberOf/microsoft.graph.group?$count=true");
    let mailbox = format!("/users/{alice_id}/mailboxSettings?$select=userPurpose");

    // Default (User.Read.All): users, subscriptions and memberships; no mailbox settings.
    assert_eq!(h.get(&user).await.0, 200);
    assert_eq!(h.get("/subscriptions").await.0, 200);
    assert_eq!(get_as(&h, &h.token, &groups).await.0, 200);
    let (status, body) = h.get(&mailbox).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "ErrorAccessDenied");

    // Mailbox settings only: everything else is refused.
    h.sim
        .set_app_permissions(APP, &["MailboxSettings.Read"])
        .unwrap();
    let token = token_for(&h, APP, SECRET).await;
    for path in [&user, &groups, &"/subscriptions".to_owned()] {
        let (status, body) = get_as(&h, &token, path).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["error"]["code"], "Authorization_RequestDenied");
    }
    let sub = Subscriber::start(Handshake::Echo).await;
    let resp = h
        .http
        .post(h.url("/subscriptions"))
        .bearer_auth(&token)
        .json(&json!({
            "changeType": "updated",
            "notificationUrl": sub.url,
            "resource": "users",
            "expirationDateTime": Utc::now() + TimeDelta::hours(2),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(sub.validations().is_empty());
    let (status, body) = get_as(&h, &token, &mailbox).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["userPurpose"], "user");

    // Group permission alone lists memberships, with names.
    h.sim
        .set_app_permissions(APP, &["GroupMember.Read.All"])
        .unwrap();
    let token = token_for(&h, APP, SECRET).await;
    let (status, body) = get_as(&h, &token, &groups).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["value"][0]["displayName"], "Everyone");
    assert_eq!(get_as(&h, &token, &user).await.0, 403);
}

#[tokio::test]
async fn employee_leave_date_needs_the_lifecycle_permission() {
    let h = harness().await;
    let alice_id = alice().id;
    h.sim
        .update_user(TENANT, &alice_id, |u| {
            u.employee_leave_date_time = Some("2026-03-31T17:00:00Z".parse().unwrap());
        })
        .unwrap();
    let path = format!("/users/{alice_id}?$select=id,accountEnabled,employeeLeaveDateTime");
    let (status, body) = h.get(&path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accountEnabled"], true);
    assert!(
        !body
            .as_object()
            .unwrap()
            .contains_key("employeeLeaveDateTime"),
        "left out, not null: {body}"
    );

    h.sim
        .set_app_permissions(APP, &["User.Read.All", "User-LifeCycleInfo.Read.All"])
        .unwrap();
    let token = token_for(&h, APP, SECRET).await;
    let (_, body) = get_as(&h, &token, &path).await;
    assert_eq!(body["employeeLeaveDateTime"], "2026-03-31T17:00:00Z");
}

#[tokio::test]
async fn transitive_memberships_follow_nesting_and_page() {
    let h = harness().await;
    seed_groups(&h.sim);
    let alice_id = alice().id;
    let tok = h.token.clone();
    let cast = format!("/users/{alice_id}/transitiveMemberOf/microsoft.graph.group?$count=true");
    let (status, page) = get_as(&h, &tok, &format!("{cast}&$select=id,displayName")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page), ["g-all", "g-emea", "g-sales"]);
    assert_eq!(page["@odata.count"], 3);
    assert_eq!(page["value"][0]["@odata.type"], "#microsoft.graph.group");
    // User.Read.All alone: ids only ("limited information").
    assert!(page["value"][0]["displayName"].is_null(), "{page}");
    assert_eq!(
        h.sim.transitive_groups(TENANT, &alice_id).unwrap()[2],
        crate::graph::Group {
            id: "g-sales".into(),
            display_name: Some("Sales".into())
        }
    );

    // The cast is an advanced query: without the header or $count, Graph's documented 400.
    let (status, body) = h.get(&cast).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "Request_UnsupportedQuery");
    let no_count = cast.replace("?$count=true", "");
    assert_eq!(get_as(&h, &tok, &no_count).await.0, 400);
    // The uncast form needs neither; a UPN addresses the same user.
    let (status, uncast) = h.get("/users/alice@example.com/transitiveMemberOf").await;
    assert_eq!(status, 200, "{uncast}");
    assert_eq!(ids(&uncast), ids(&page));

    // Pages: capped by the setting, $top honoured, nextLink keeps the query.
    h.sim.update_settings(|s| s.member_of_page_size = 2);
    let (_, first) = get_as(&h, &tok, &format!("{cast}&$select=id,displayName&$top=999")).await;
    assert_eq!(ids(&first), ["g-all", "g-emea"]);
    assert_eq!(first["@odata.count"], 3);
    let next = first["@odata.nextLink"].as_str().unwrap();
    assert!(
        next.contains("skiptoken") && next.contains("select") && next.contains("count"),
        "{next}"
    );
    let (_, second) = get_as(&h, &tok, next).await;
    assert_eq!(ids(&second), ["g-sales"]);
    assert!(second.get("@odata.nextLink").is_none());
    let (_, one) = get_as(&h, &tok, &format!("{cast}&$top=1")).await;
    assert_eq!(ids(&one), ["g-all"]);
    for top in ["0", "1000", "x"] {
        let (status, body) = get_as(&h, &tok, &format!("{cast}&$top={top}")).await;
        assert_eq!(status, 400, "$top={top}: {body}");
    }

    let (status, body) = get_as(
        &h,
        &tok,
        "/users/nobody/transitiveMemberOf/microsoft.graph.group?$count=true",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "Request_ResourceNotFound");

    // Removing the middle link cuts the chain above it.
    h.sim.remove_member(TENANT, "g-emea", "g-sales").unwrap();
    let (_, page) = get_as(&h, &tok, &cast).await;
    assert_eq!(ids(&page), ["g-sales"]);
    // A deleted user leaves its groups.
    h.sim.delete_user(TENANT, &alice_id).unwrap();
    assert!(h.sim.groups(TENANT).unwrap()[3].members.is_empty());
}

#[tokio::test]
async fn group_changes_are_checked_and_notify_nobody() {
    let h = harness().await;
    fast_delivery(&h.sim);
    let sub = Subscriber::start(Handshake::Echo).await;
    assert_eq!(
        h.subscribe(&sub.url, "users", "updated,deleted").await.0,
        201
    );
    seed_groups(&h.sim);
    h.sim.add_group(TENANT, "g-all", "All staff").unwrap();
    assert!(h.sim.settle(SETTLE).await);
    assert!(sub.items().is_empty(), "{:?}", sub.items());

    let groups = h.sim.groups(TENANT).unwrap();
    assert_eq!(groups[0].display_name, "All staff");
    assert_eq!(groups[0].members, ["g-emea"]);
    assert_eq!(groups[3].members, [alice().id]);

    let cycle = h.sim.add_member(TENANT, "g-sales", "g-all");
    assert!(matches!(cycle, Err(SimError::Invalid(_))), "{cycle:?}");
    assert!(h.sim.add_member(TENANT, "g-sales", "g-sales").is_err());
    assert!(matches!(
        h.sim.add_member(TENANT, "g-sales", "nobody"),
        Err(SimError::UnknownMember { .. })
    ));
    assert!(matches!(
        h.sim.add_member(TENANT, "g-nope", &alice().id),
        Err(SimError::UnknownGroup { .. })
    ));
    assert!(matches!(
        h.sim.remove_member(TENANT, "g-other", &alice().id),
        Err(SimError::NotAMember { .. })
    ));
    assert!(h.sim.add_group(TENANT, &alice().id, "Clash").is_err());
    let clash = GraphUser {
        id: "G-OTHER".into(),
        ..Default::default()
    };
    assert!(h.sim.upsert_user(TENANT, clash).is_err());
}

#[tokio::test]
async fn mailbox_settings_purpose_and_errors() {
    let h = harness().await;
    h.sim
        .set_app_permissions(APP, &["User.Read.All", "MailboxSettings.Read"])
        .unwrap();
    let token = token_for(&h, APP, SECRET).await;
    let alice_id = alice().id;
    let path = format!("/users/{alice_id}/mailboxSettings");

    let (status, body) = get_as(&h, &token, &path).await;
    assert_eq!(status, 404, "no mailbox yet: {body}");
    assert_eq!(body["error"]["code"], "MailboxNotEnabledForRESTAPI");
    let (status, body) = get_as(&h, &token, "/users/nobody/mailboxSettings").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "ErrorInvalidUser");

    h.sim
        .set_mailbox_purpose(TENANT, &alice_id, Some("Shared"))
        .unwrap();
    assert_eq!(
        h.sim.mailbox_purpose(TENANT, &alice_id).as_deref(),
        Some("shared")
    );
    let (status, body) = get_as(&h, &token, &format!("{path}?$select=userPurpose")).await;
    assert_eq!(status, 200, "{body}");
    let mut keys: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["@odata.context", "userPurpose"]);
    assert_eq!(body["userPurpose"], "shared");
    let (_, full) = get_as(&h, &token, "/users/alice@example.com/mailboxSettings").await;
    assert_eq!(full["userPurpose"], "shared");
    assert_eq!(full["timeZone"], "UTC");
    let (_, loose) = get_as(&h, &token, &format!("{path}?$select=userPurpose,bogus")).await;
    assert_eq!(loose["userPurpose"], "shared");

    assert!(matches!(
        h.sim
            .set_mailbox_purpose(TENANT, &alice_id, Some("mailbox")),
        Err(SimError::Invalid(_))
    ));
    assert!(matches!(
        h.sim.set_mailbox_purpose(TENANT, "nobody", Some("room")),
        Err(SimError::UnknownUser { .. })
    ));
    h.sim.set_mailbox_purpose(TENANT, &alice_id, None).unwrap();
    assert_eq!(get_as(&h, &token, &path).await.0, 404);
    h.sim
        .set_mailbox_purpose(TENANT, &alice_id, Some("room"))
        .unwrap();
    h.sim.delete_user(TENANT, &alice_id).unwrap();
    h.sim.upsert_user(TENANT, alice()).unwrap();
    assert_eq!(h.sim.mailbox_purpose(TENANT, &alice_id), None);
}

#[tokio::test]
async fn faults_and_the_request_log_cover_the_new_routes() {
    let h = harness().await;
    seed_groups(&h.sim);
    let alice_id = alice().id;
    let groups = format!("/users/{alice_id}/transitiveMemberOf/microsoft.graph.group?$count=true");
    let mailbox = format!("/users/{alice_id}/mailboxSettings");
    h.sim.throttle_next(1, Some(3));
    assert_eq!(get_as(&h, &h.token, &groups).await.0, 429);
    h.sim.fail_next(1, 500).unwrap();
    assert_eq!(h.get(&mailbox).await.0, 500);
    assert_eq!(get_as(&h, &h.token, &groups).await.0, 200);
    h.sim
        .update_faults(|f| f.api_latency = Duration::from_millis(120))
        .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(h.get(&mailbox).await.0, 403);
    assert!(started.elapsed() >= Duration::from_millis(120));

    let log = h.sim.request_log();
    let seen: Vec<(String, u16)> = log
        .iter()
        .filter(|r| r.path.starts_with("/v1.0/users/"))
        .map(|r| (r.path.rsplit('/').next().unwrap().to_owned(), r.status))
        .collect();
    assert_eq!(
        seen,
        [
            ("microsoft.graph.group".to_owned(), 429),
            ("mailboxSettings".to_owned(), 500),
            ("microsoft.graph.group".to_owned(), 200),
            ("mailboxSettings".to_owned(), 403),
        ]
    );
    assert!(
        log.iter()
            .rev()
            .take(4)
            .all(|r| r.tenant.as_deref() == Some(TENANT))
    );
}

#[tokio::test]
async fn control_api_for_groups_mailboxes_and_permissions() {
    let h = harness().await;
    use reqwest::Method;
    let t = format!("_sim/tenants/{TENANT}");
    let alice_id = alice().id;

    let (status, body) = h
        .control(
            Method::PUT,
            &format!("{t}/groups/g-1"),
            r#"{"displayName":"One"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["displayName"], "One");
    h.control(
        Method::PUT,
        &format!("{t}/groups/g-2"),
        r#"{"displayName":"Two"}"#,
    )
    .await;
    for (group, member) in [("g-1", alice_id.as_str()), ("g-2", "g-1")] {
        let path = format!("{t}/groups/{group}/members/{member}");
        assert_eq!(h.control(Method::PUT, &path, "").await.0, 204);
    }
    let (status, list) = h.control(Method::GET, &format!("{t}/groups"), "").await;
    assert_eq!(status, 200);
    assert_eq!(list[1]["members"], json!(["g-1"]));
    assert_eq!(
        h.sim
            .transitive_groups(TENANT, &alice_id)
            .unwrap()
            .iter()
            .map(|g| g.id.as_str())
            .collect::<Vec<_>>(),
        ["g-1", "g-2"]
    );
    let path = format!("{t}/groups/g-2/members/g-1");
    assert_eq!(h.control(Method::DELETE, &path, "").await.0, 204);
    assert_eq!(h.control(Method::DELETE, &path, "").await.0, 404);

    let mailbox = format!("{t}/users/{alice_id}/mailbox");
    assert_eq!(
        h.control(Method::PUT, &mailbox, r#"{"userPurpose":"equipment"}"#)
            .await
            .0,
        204
    );
    let (_, body) = h.control(Method::GET, &mailbox, "").await;
    assert_eq!(body["userPurpose"], "equipment");
    assert_eq!(
        h.control(Method::PUT, &mailbox, r#"{"userPurpose":null}"#)
            .await
            .0,
        204
    );
    assert_eq!(h.sim.mailbox_purpose(TENANT, &alice_id), None);

    let perms = format!("_sim/apps/{APP}/permissions");
    let (status, body) = h
        .control(
            Method::PUT,
            &perms,
            r#"["User.Read.All","GroupMember.Read.All"]"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!(["User.Read.All", "GroupMember.Read.All"]));
    let (_, body) = h.control(Method::GET, &perms, "").await;
    assert_eq!(body[1], "GroupMember.Read.All");

    let bad = [
        (Method::PUT, format!("{t}/groups/g-3"), "{}", 400),
        (Method::PUT, format!("{t}/groups/g-9/members/g-1"), "", 404),
        (
            Method::PUT,
            format!("{t}/groups/g-1/members/nobody"),
            "",
            404,
        ),
        (Method::PUT, format!("{t}/groups/g-1/members/g-1"), "", 400),
        (
            Method::PUT,
            mailbox.clone(),
            r#"{"userPurpose":"castle"}"#,
            400,
        ),
        (Method::PUT, mailbox.clone(), r#"{}"#, 400),
        (
            Method::PUT,
            format!("{t}/users/nobody/mailbox"),
            r#"{"userPurpose":"room"}"#,
            404,
        ),
        (
            Method::PUT,
            "_sim/apps/unknown/permissions".to_owned(),
            "[]",
            404,
        ),
        (Method::PUT, perms.clone(), r#"{"roles":[]}"#, 400),
        (
            Method::GET,
            "_sim/tenants/unknown/groups".to_owned(),
            "",
            404,
        ),
    ];
    for (method, path, body, status) in bad {
        let (got, answer) = h.control(method.clone(), &path, body).await;
        assert_eq!(got, status, "{method} {path} {body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
}
