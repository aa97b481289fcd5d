//! One user, one key (invariant 29): the same Graph user reaching flagrelay under every
//! spelling it arrives in — notifications with differently cased tenant and object ids and
//! one naming the user by UPN (through the receiver's HTTP endpoint), a delta poll
//! (`Reconciler::poll`) and a drift sweep (`App::sweep`) — lands on one shard, is never
//! evaluated twice at once, and has one row in the state store (one `users` row, one history
//! key). Real RabbitMQ, the sandbox's SQLite store, both simulators.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use flagrelay::graph::GraphUser;
use flagrelay::message::Message;
use flagrelay::reconciler::Reconciler;
use flagrelay::sim::sandbox::SeededUser;
use flagrelay::telemetry::Metrics;
use secrecy::ExposeSecret;

use crate::identity::Capture;
use crate::support::{ORG_B, Options, TENANT_B, TestApp, eventually, eventually_async, processed};

const WAIT: Duration = Duration::from_secs(60);

/// `s` with every other letter upper-cased: a spelling no normalization produced.
fn mixed_case(s: &str) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// A notification item as Graph posts it, with the ids spelled as given.
fn item(client_state: &str, tenant: &str, user: &str) -> serde_json::Value {
    serde_json::json!({
        "subscriptionId": "sub-test", "changeType": "updated", "clientState": client_state,
        "resource": format!("Users/{user}"),
        "resourceData": {"@odata.type": "#Microsoft.Graph.User", "id": user, "organizationId": tenant},
        "tenantId": tenant
    })
}

/// One request for the user, from either simulator's log.
#[derive(Debug)]
struct Span {
    what: String,
    graph: bool,
    started: Instant,
    finished: Instant,
}

#[tokio::test]
async fn one_user_however_named_is_one_shard_one_lock_and_one_store_row() {
    let t = TestApp::start_with(
        "ids-one-user",
        Options {
            second_tenant: true,
            ..Options::default()
        },
        // Only the delta poll this test runs; the leader's own is its baseline at start.
        |c| c.leader.delta_interval = Duration::from_secs(3600),
    )
    .await;
    let mut work = Capture::start(&t, "work", "#").await;
    let store = t.app.store().await.unwrap();
    let tenant = t
        .app
        .config
        .tenants
        .iter()
        .find(|c| c.id == TENANT_B)
        .cloned()
        .expect("second tenant configured");

    // Graph stores this user's object id upper-cased (as it answers it everywhere).
    let object_id = uuid::Uuid::new_v4().to_string().to_ascii_uppercase();
    let address = format!("ivan@{ORG_B}");
    let ivan = SeededUser {
        id: object_id.clone(),
        address: address.clone(),
        tenant_id: TENANT_B.into(),
        org: ORG_B.into(),
    };
    t.sandbox.add_proofpoint_user(ORG_B, &address);
    t.sandbox
        .graph
        .upsert_user(
            TENANT_B,
            GraphUser {
                id: object_id.clone(),
                account_enabled: Some(true),
                user_principal_name: Some(address.clone()),
                mail: Some(address.clone()),
                proxy_addresses: Some(vec![format!("SMTP:{address}")]),
                user_type: Some("Member".into()),
                ..GraphUser::default()
            },
        )
        .unwrap();
    assert!(
        eventually(WAIT, || processed(&t) >= 1).await,
        "the creation's notification processed"
    );
    assert!(
        eventually_async(WAIT, || async {
            store.delta_link(&tenant.id).await.unwrap().is_some()
        })
        .await,
        "the leader's baseline delta round stored its link"
    );

    // Every evaluation now takes a while, so two at once would overlap.
    // Sign-in is blocked without Graph's own notification: only the paths below report it.
    t.sandbox
        .graph
        .update_faults(|f| {
            f.api_latency = Duration::from_millis(150);
            f.drop_probability = 1.0;
        })
        .unwrap();
    t.sandbox
        .proofpoint
        .set_latency(Duration::from_millis(50), Duration::ZERO);
    t.sandbox.set_enabled(&ivan, false);

    // The drift sweep and the delta poll, as the leader runs them.
    let swept = t
        .app
        .sweep(&tenant, false, &mut |_, _| {})
        .await
        .expect("sweep");
    assert_eq!(swept.queued, 1, "the sweep queued the drift: {swept:?}");
    let reconciler = Reconciler {
        graph: t.app.graph.clone(),
        queue: t.app.queue.clone(),
        signer: t.app.config.signing.signer(),
        store: store.clone(),
        tenants: t.app.config.tenants.clone(),
        select: t.app.policy.current().needs().user_select(),
        interval: Duration::from_secs(3600),
    };
    let polled = reconciler.poll(&tenant).await.expect("delta poll");
    assert_eq!(polled.queued, 1, "the delta poll queued the change");

    // Notifications through the receiver, one batch: tenant and object id in other casings,
    // and one naming the user by UPN.
    let client_state = t.app.config.graph.client_state().expose_secret().to_owned();
    let lower_id = object_id.to_ascii_lowercase();
    let items = vec![
        item(&client_state, &TENANT_B.to_ascii_uppercase(), &lower_id),
        item(&client_state, TENANT_B, &object_id),
        item(&client_state, &mixed_case(TENANT_B), &mixed_case(&lower_id)),
        item(
            &client_state,
            &TENANT_B.to_ascii_uppercase(),
            &mixed_case(&address),
        ),
    ];
    let resp = reqwest::Client::new()
        .post(format!("{}/graph/notifications", t.url))
        .json(&serde_json::json!({ "value": items }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{:?}", resp.text().await);

    assert!(
        eventually(WAIT, || t.sandbox.is_active(&ivan) == Some(false)).await,
        "deactivated"
    );
    // creation + sweep + delta + 4 notifications + the UPN's message queued again by id.
    assert!(
        eventually(WAIT, || processed(&t) >= 8).await,
        "every message finished: {}",
        processed(&t)
    );
    assert_eq!(
        Metrics::get(&t.app.metrics.outcomes_dead_lettered_total),
        0,
        "every spelling was understood (none dead-lettered, e.g. as an unknown tenant)"
    );

    // One shard: every message naming the object id (in any casing) was routed to one.
    work.drain().await;
    let mut shards = BTreeSet::new();
    let mut for_object = 0;
    for c in work.all() {
        if let Message::UserChanged(m) = &c.message
            && m.user_id.as_str().eq_ignore_ascii_case(&object_id)
        {
            for_object += 1;
            let shard = c
                .routing_key
                .rsplit_once("shard.")
                .map(|(_, s)| s.to_owned())
                .unwrap_or_else(|| panic!("routing key {}", c.routing_key));
            shards.insert(shard);
        }
    }
    assert!(
        for_object >= 7,
        "captured every message for the object: {for_object}"
    );
    assert_eq!(shards.len(), 1, "one shard for one user: {shards:?}");

    // One lock: the user's requests (Graph read of the user, Proofpoint read and write)
    // never overlap, and each Graph read is followed by that evaluation's Proofpoint read
    // before the next evaluation's Graph read.
    let mut spans: Vec<Span> = Vec::new();
    for r in t.sandbox.graph.request_log() {
        let last = r.path.rsplit('/').next().unwrap_or("");
        if r.method == "GET" && r.path.contains("/users/") && last.eq_ignore_ascii_case(&object_id)
        {
            spans.push(Span {
                what: format!("graph {} {}", r.method, r.path),
                graph: true,
                started: r.started,
                finished: r.finished,
            });
        }
    }
    for r in t.sandbox.proofpoint.request_log() {
        if r.email.as_deref() == Some(address.as_str()) && r.path.contains("/users/") {
            spans.push(Span {
                what: format!("proofpoint {} {}", r.method, r.path),
                graph: false,
                started: r.started,
                finished: r.finished,
            });
        }
    }
    spans.sort_by_key(|s| s.started);
    assert!(
        spans.iter().filter(|s| s.graph).count() >= 3,
        "several evaluations: {spans:?}"
    );
    for pair in spans.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            b.started >= a.finished,
            "two evaluations of one user overlapped: {} started before {} finished",
            b.what,
            a.what
        );
        assert!(
            !(a.graph && b.graph),
            "two evaluations interleaved: {} then {} with no Proofpoint read between",
            a.what,
            b.what
        );
    }

    // One row: the store keys the user one way.
    let db = t.app.config.worker.state_dir.join("flagrelay.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let users: Vec<(String, String)> = sqlx::query_as("SELECT tenant_id, user_id FROM users")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        users,
        vec![(TENANT_B.to_owned(), lower_id.clone())],
        "one users row"
    );
    // The history is written in batches; every evaluation's entry (the UPN's hop to the
    // object id aside) under the one key.
    let deadline = Instant::now() + WAIT;
    let keys: Vec<(String, String)> = loop {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT tenant_id, user_id, reason FROM history")
                .fetch_all(&pool)
                .await
                .unwrap();
        let keys: Vec<(String, String)> = rows
            .into_iter()
            .filter(|(_, _, reason)| !reason.starts_with("requeued_by_object_id"))
            .map(|(t, u, _)| (t, u))
            .collect();
        if keys.len() >= 7 || Instant::now() >= deadline {
            break keys;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let complete = keys.len() >= 7;
    assert!(complete, "history entries: {keys:?}");
    let distinct: BTreeSet<_> = keys.iter().cloned().collect();
    assert_eq!(
        distinct,
        BTreeSet::from([(TENANT_B.to_owned(), lower_id.clone())]),
        "one history key"
    );
    pool.close().await;
    t.stop().await;
}
