//! `/v1.0/users/delta` through the simulator's HTTP surface: page shape, tokens, the error
//! answers and the gate. The client-side round trips are in `graph::client::tests`.

use super::*;

fn bob() -> GraphUser {
    GraphUser {
        id: "bbbbbbbb-0000-4000-8000-00000000000b".into(),
        account_enabled: Some(true),
        user_principal_name: Some("bob@example.com".into()),
        department: Some("Ops".into()),
        ..Default::default()
    }
}

/// Follow `@odata.nextLink`s from `first`; every item and the final delta link.
async fn round(h: &Harness, first: &str) -> (Vec<Value>, String) {
    let mut items = Vec::new();
    let mut next = first.to_owned();
    loop {
        let (status, body) = h.get(&next).await;
        assert_eq!(status, 200, "{body}");
        items.extend(body["value"].as_array().unwrap().iter().cloned());
        if let Some(link) = body["@odata.nextLink"].as_str() {
            assert!(body.get("@odata.deltaLink").is_none());
            next = link.to_owned();
        } else {
            return (items, body["@odata.deltaLink"].as_str().unwrap().to_owned());
        }
    }
}

#[tokio::test]
async fn delta_pages_have_graph_shape_and_opaque_tokens() {
    let h = harness().await;
    h.sim.upsert_user(TENANT, bob()).unwrap();
    h.sim.update_settings(|s| s.delta_page_size = 1);

    let (status, first) = h.get("/users/delta?$select=id,accountEnabled").await;
    assert_eq!(status, 200, "{first}");
    assert!(
        first["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("/$metadata#users(id,accountEnabled)")
    );
    assert_eq!(first["value"].as_array().unwrap().len(), 1);
    let item = &first["value"][0];
    assert_eq!(item["accountEnabled"], json!(true));
    assert!(item.get("@odata.context").is_none() && item.get("department").is_none());
    let next = first["@odata.nextLink"].as_str().unwrap();
    assert!(
        next.starts_with(&h.url("/users/delta?$skiptoken=")),
        "{next}"
    );

    let (items, delta_link) = round(&h, "/users/delta?$select=id,accountEnabled").await;
    assert_eq!(items.len(), 2);
    assert!(delta_link.starts_with(&h.url("/users/delta?$deltatoken=")));
    assert!(!delta_link.contains("select"), "the token carries $select");
    // A link can be called again (a client retrying after a timeout).
    assert_eq!(h.get(next).await.0, 200);
    assert_eq!(h.get(&delta_link).await.0, 200);

    // No-op updates are no change; soft and hard deletes are `@removed`.
    h.sim.update_user(TENANT, &bob().id, |_| {}).unwrap();
    h.sim.soft_delete_user(TENANT, &alice().id).unwrap();
    h.sim.delete_user(TENANT, &bob().id).unwrap();
    assert_eq!(h.get(&format!("/users/{}", alice().id)).await.0, 404);
    let (items, _) = round(&h, &delta_link).await;
    assert_eq!(
        items,
        [
            json!({"id": alice().id, "@removed": {"reason": "changed"}}),
            json!({"id": bob().id, "@removed": {"reason": "deleted"}}),
        ]
    );
}

#[tokio::test]
async fn unknown_and_expired_tokens_get_sync_state_not_found() {
    let h = harness().await;
    let (_, delta_link) = round(&h, "/users/delta").await;
    for path in [
        "/users/delta?$deltatoken=nope",
        "/users/delta?$skiptoken=nope",
        "/users/delta?$skiptoken=nope.1",
    ] {
        let (status, body) = h.get(path).await;
        assert_eq!(status, 410, "{path}: {body}");
        assert_eq!(body["error"]["code"], "syncStateNotFound");
    }
    h.sim.expire_delta_tokens(TENANT).unwrap();
    assert_eq!(h.get(&delta_link).await.0, 410);

    h.sim.update_settings(|s| {
        s.delta_token_expired_status = 400;
        s.delta_token_lifetime = Duration::from_millis(100);
    });
    let (_, delta_link) = round(&h, "/users/delta").await;
    assert_eq!(h.get(&delta_link).await.0, 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, body) = h.get(&delta_link).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "syncStateNotFound");
    assert!(matches!(
        h.sim.expire_delta_tokens("no-such-tenant"),
        Err(SimError::UnknownTenant(_))
    ));
}

#[tokio::test]
async fn latest_starts_from_now_and_select_is_validated() {
    let h = harness().await;
    let (status, body) = h
        .get("/users/delta?$deltatoken=latest&$select=id,mail")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["value"], json!([]));
    let link = body["@odata.deltaLink"].as_str().unwrap().to_owned();
    h.sim
        .update_user(TENANT, &alice().id, |u| {
            u.mail = Some("a2@example.com".into())
        })
        .unwrap();
    let (items, _) = round(&h, &link).await;
    assert_eq!(
        items,
        [json!({"id": alice().id, "mail": "a2@example.com"})],
        "selected properties only"
    );

    for path in [
        "/users/delta?$select=id,noSuchProperty",
        "/users/delta?$deltatoken=latest&$select=bogus",
    ] {
        let (status, body) = h.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
    }
}

#[tokio::test]
async fn delta_passes_the_gate_and_is_logged() {
    let h = harness().await;
    h.sim.throttle_next(1, Some(3));
    assert_eq!(h.get("/users/delta").await.0, 429);
    assert_eq!(h.get("/users/delta").await.0, 200);

    h.sim
        .set_app_permissions(APP, &["MailboxSettings.Read"])
        .unwrap();
    let (_, token) = h.token_request(TENANT, APP, SECRET).await;
    let resp = h
        .http
        .get(h.url("/users/delta"))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);

    let logged: Vec<_> = h
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.path == "/v1.0/users/delta")
        .map(|r| (r.status, r.tenant))
        .collect();
    let tenant = Some(TENANT.to_owned());
    assert_eq!(
        logged,
        [(429, tenant.clone()), (200, tenant.clone()), (403, tenant)]
    );
}

#[tokio::test]
async fn duplicate_knob_repeats_users_on_a_page() {
    let h = harness().await;
    h.sim.upsert_user(TENANT, bob()).unwrap();
    assert!(
        h.sim
            .update_faults(|f| f.delta_duplicate_probability = 1.5)
            .is_err()
    );
    h.sim
        .update_faults(|f| f.delta_duplicate_probability = 1.0)
        .unwrap();
    let (items, _) = round(&h, "/users/delta?$select=id").await;
    let ids: Vec<_> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [&alice().id, &alice().id, &bob().id, &bob().id]);
}

#[tokio::test]
async fn control_api_soft_deletes_and_expires_tokens() {
    let h = harness().await;
    let (_, delta_link) = round(&h, "/users/delta").await;
    let id = alice().id;
    let soft = format!("/_sim/tenants/{TENANT}/users/{id}/soft-delete");
    assert_eq!(h.control(reqwest::Method::POST, &soft, "").await.0, 204);
    assert_eq!(h.control(reqwest::Method::POST, &soft, "").await.0, 404);
    let (items, _) = round(&h, &delta_link).await;
    assert_eq!(
        items,
        [json!({"id": id, "@removed": {"reason": "changed"}})]
    );
    let expire = format!("/_sim/tenants/{TENANT}/delta/expire");
    assert_eq!(h.control(reqwest::Method::POST, &expire, "").await.0, 204);
    assert_eq!(h.get(&delta_link).await.0, 410);
}
