//! Decision history as an operator asks it (README "Decision history"): after real changes
//! through the pipeline, `flagrelay history` (the real binary, on the same store) finds the
//! user by object id, UPN and address, text and `--json`, with the writes and Proofpoint's
//! state before and after; the admin listener's `/history?user=…` shows the same, and the
//! status page lists the decisions of every worker (one written by "another host" too) from
//! the store.

use std::time::Duration;

use chrono::Utc;
use flagrelay::ids::{TenantId, UserId};
use flagrelay::store::HistoryEntry;

use crate::support::{Options, TENANT, TestApp, eventually_async};

const WAIT: Duration = Duration::from_secs(30);

async fn history_cli(t: &TestApp, args: &[&str]) -> String {
    crate::identity::flagrelay_cli(t, &[&["history"], args].concat()).await
}

/// An entry as another worker process (on another host) would have stored it.
fn foreign_entry(user: &str) -> HistoryEntry {
    HistoryEntry {
        at: Utc::now(),
        tenant_id: TenantId::new(TENANT),
        user_id: UserId::new(&uuid::Uuid::new_v4().to_string()),
        upn: None,
        address: Some(user.to_owned()),
        origin: "delta".into(),
        result: "no_change".into(),
        action: Some("activate".into()),
        rule: Some("default".into()),
        reason: "default: already as decided".into(),
        writes: Vec::new(),
        was_active: Some(true),
        is_active: Some(true),
        was_exempt: None,
        is_exempt: None,
        dry_run: false,
        latency_ms: Some(7),
        trace_id: None,
        worker: "other-host:4242".into(),
    }
}

#[tokio::test]
async fn history_answers_why_a_user_stopped_receiving_mail_by_id_upn_and_address() {
    let t = TestApp::start_with("history", Options::default(), |c| {
        c.admin.check_every = Duration::from_millis(200);
    })
    .await;
    let alice = t.sandbox.seed_user("alice", true, "end_user");
    let upn = format!("alice.sandbox@{}", alice.org);
    t.sandbox
        .graph
        .update_user(TENANT, &alice.id, |u| {
            u.user_principal_name = Some(upn.clone());
            u.account_enabled = Some(false);
        })
        .unwrap();
    assert!(
        eventually_async(WAIT, || async {
            t.sandbox.is_active(&alice) == Some(false)
        })
        .await
    );
    let store = t.app.store().await.unwrap();
    // The history writer batches: wait until the applied entry is stored.
    let stored = |query: flagrelay::store::HistoryQuery| {
        let store = store.clone();
        async move { store.history(&query).await.unwrap() }
    };
    let by_id = flagrelay::store::HistoryQuery {
        user: Some(alice.id.clone()),
        since: None,
        limit: 50,
    };
    assert!(
        eventually_async(WAIT, || async {
            stored(by_id.clone())
                .await
                .iter()
                .any(|e| e.result == "applied")
        })
        .await,
        "the deactivation is in the history"
    );

    for who in [alice.id.as_str(), upn.as_str(), alice.address.as_str()] {
        let json = history_cli(&t, &["--user", who, "--since", "1h", "--json"]).await;
        let entries: Vec<HistoryEntry> = serde_json::from_str(&json).unwrap();
        let e = entries
            .iter()
            .find(|e| e.result == "applied")
            .unwrap_or_else(|| panic!("--user {who}: no applied entry in {json}"));
        assert_eq!(e.user_id.as_str(), alice.id, "{e:?}");
        assert_eq!(e.address.as_deref(), Some(alice.address.as_str()));
        assert_eq!(e.upn.as_deref(), Some(upn.as_str()));
        assert_eq!(e.action.as_deref(), Some("deactivate"));
        assert_eq!((e.was_active, e.is_active), (Some(true), Some(false)));
        assert!(!e.writes.is_empty(), "the write is named: {e:?}");
        assert!(e.trace_id.is_some() && !e.worker.is_empty(), "{e:?}");
        assert!(!e.dry_run);
    }
    let text = history_cli(&t, &["--user", &upn, "--since", "1h"]).await;
    let line = text
        .lines()
        .find(|l| l.contains(" applied "))
        .unwrap_or_else(|| panic!("no applied line: {text}"));
    for expected in [
        alice.id.as_str(),
        alice.address.as_str(),
        "deactivate",
        "wrote: ",
    ] {
        assert!(line.contains(expected), "{expected:?} missing in {line}");
    }
    let none = history_cli(&t, &["--user", "nobody@nowhere.test", "--since", "1h"]).await;
    assert!(none.contains("no decisions recorded"), "{none}");

    // The admin listener: the same user's page, and the fleet's decisions on the status page.
    let admin = t.admin_url().await;
    let page = reqwest::get(format!("{admin}/history?user={upn}"))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    for expected in ["applied", "deactivate", "active yes → no", &alice.address] {
        assert!(page.contains(expected), "{expected:?} missing in {page}");
    }
    let refused = reqwest::get(format!("{admin}/history")).await.unwrap();
    assert_eq!(refused.status(), 400, "a user is required");

    store
        .record_history(&[foreign_entry("carol@elsewhere.test")])
        .await
        .unwrap();
    let mut status = String::new();
    for _ in 0..100 {
        status = reqwest::get(format!("{admin}/"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if status.contains("other-host:4242") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        status.contains("other-host:4242") && status.contains("carol@elsewhere.test"),
        "another worker's decision is on this process's status page: {status}"
    );
    assert!(
        status.contains("Of every worker, from the state store"),
        "{status}"
    );
    assert!(
        status.contains(&format!("/history?user={}", percent(&alice.id))),
        "{status}"
    );
    t.stop().await;
}

fn percent(id: &str) -> String {
    id.replace('-', "%2D")
}
