//! Never miss a change: the delta backstop, subscription management, reauthorization.

use std::time::Duration;

use flagrelay::sim::graph::GraphSimFaults;
use flagrelay::subscriptions::{Ensured, SubscriptionManager};

use crate::support::{Options, TENANT, TestApp, eventually, eventually_async, processed};

const CONVERGE: Duration = Duration::from_secs(20);

/// A running app whose leader polls delta every second; returns once the baseline is stored.
async fn with_delta(name: &str) -> TestApp {
    let t = TestApp::start_with(name, Options::default(), |c| {
        c.leader.delta_interval = Duration::from_secs(1)
    })
    .await;
    let store = t.app.store().await.unwrap();
    let tenant = TENANT.into();
    assert!(
        eventually_async(CONVERGE, || async {
            matches!(store.delta_link(&tenant).await, Ok(Some(_)))
        })
        .await,
        "the first delta sync established a baseline"
    );
    t
}

fn drop_all_notifications(t: &TestApp) {
    t.sandbox
        .graph
        .set_faults(GraphSimFaults {
            drop_probability: 1.0,
            ..Default::default()
        })
        .unwrap();
}

#[tokio::test]
async fn a_dropped_notification_still_converges_within_the_poll_interval() {
    let t = with_delta("dropped").await;
    let u = t.sandbox.seed_user("unnoticed", true, "end_user");
    assert!(eventually(CONVERGE, || processed(&t) >= 1).await);
    drop_all_notifications(&t);
    t.sandbox.set_enabled(&u, false);
    assert!(
        eventually(CONVERGE, || t.sandbox.is_active(&u) == Some(false)).await,
        "the delta poll found it"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_late_notification_after_the_delta_applied_the_change_is_a_no_op() {
    let t = with_delta("late").await;
    let u = t.sandbox.seed_user("laggard", true, "end_user");
    assert!(eventually(CONVERGE, || processed(&t) >= 1).await);
    t.sandbox
        .graph
        .set_faults(GraphSimFaults {
            delivery_delay: Duration::from_secs(4),
            ..Default::default()
        })
        .unwrap();
    t.sandbox.set_enabled(&u, false);
    assert!(eventually(CONVERGE, || t.sandbox.is_active(&u) == Some(false)).await);
    let before = processed(&t);
    assert!(
        t.sandbox.graph.settle(Duration::from_secs(10)).await,
        "the late notification was delivered"
    );
    assert!(
        eventually(CONVERGE, || processed(&t) > before).await,
        "and processed"
    );
    let puts = t
        .sandbox
        .proofpoint
        .writes()
        .iter()
        .filter(|w| w.method == "PUT" && w.email.as_deref() == Some(u.address.as_str()))
        .count();
    assert_eq!(
        puts, 1,
        "one write in all: the late notification changed nothing"
    );
    t.stop().await;
}

#[tokio::test]
async fn an_expired_delta_token_triggers_a_full_resync() {
    let t = with_delta("expired").await;
    let u = t.sandbox.seed_user("resynced", true, "end_user");
    assert!(eventually(CONVERGE, || processed(&t) >= 1).await);
    drop_all_notifications(&t);
    t.sandbox.graph.expire_delta_tokens(TENANT).unwrap();
    t.sandbox.set_enabled(&u, false);
    assert!(
        eventually(CONVERGE, || t.sandbox.is_active(&u) == Some(false)).await,
        "the resync queued every user"
    );
    t.stop().await;
}

#[tokio::test]
async fn subscriptions_are_created_adopted_renewed_and_recreated() {
    let t = TestApp::start_with(
        "subs",
        Options {
            subscribe: false,
            worker: false,
            ..Options::default()
        },
        |c| {
            c.receiver.public_url = Some("http://127.0.0.1:1/unused".parse().unwrap());
        },
    )
    .await;
    // The handshake must reach the real receiver: point the public URL at it.
    let mut config = (*t.app.config).clone();
    config.receiver.public_url = Some(t.url.parse().unwrap());
    let manager = SubscriptionManager {
        graph: t.app.graph.as_ref(),
        config: &config,
        renew_before: Duration::from_secs(7 * 86_400),
    };
    let now = chrono::Utc::now();

    let (how, created) = manager.ensure(TENANT, now).await.unwrap();
    assert_eq!(how, Ensured::Created);
    let (how, adopted) = manager.ensure(TENANT, now).await.unwrap();
    assert_eq!(
        (how, adopted.id.as_str()),
        (Ensured::Adopted, created.id.as_str())
    );

    // Close to expiry (a day left, less than the 7-day margin): renewed, same subscription.
    let soon = t
        .app
        .graph
        .renew_subscription(TENANT, &created.id, now + chrono::Duration::days(1))
        .await
        .unwrap();
    let (how, renewed) = manager.ensure(TENANT, chrono::Utc::now()).await.unwrap();
    assert_eq!(
        (how, renewed.id.as_str()),
        (Ensured::Renewed, created.id.as_str())
    );
    assert!(renewed.expiration_date_time > soon.expiration_date_time + chrono::Duration::days(20));

    // Gone (deleted, expired): created again.
    t.app
        .graph
        .delete_subscription(TENANT, &created.id)
        .await
        .unwrap();
    let (how, again) = manager.ensure(TENANT, now).await.unwrap();
    assert_eq!(how, Ensured::Created);
    assert_ne!(again.id, created.id);
    assert_eq!(t.sandbox.graph.subscriptions(TENANT).len(), 1);
    t.stop().await;
}

#[tokio::test]
async fn reauthorization_required_is_answered_by_reauthorizing() {
    let t = TestApp::start("reauth", Options::default()).await;
    let sub = t
        .sandbox
        .graph
        .subscriptions(TENANT)
        .first()
        .expect("subscribed at start")
        .subscription
        .id
        .clone();
    t.sandbox
        .graph
        .request_reauthorization(TENANT, &sub)
        .unwrap();
    let reauthorized = || {
        t.sandbox.graph.request_log().iter().any(|r| {
            r.method == "POST" && r.path.ends_with(&format!("{sub}/reauthorize")) && r.status == 204
        })
    };
    assert!(
        eventually(CONVERGE, reauthorized).await,
        "the worker reauthorized the subscription"
    );
    t.stop().await;
}

#[tokio::test]
async fn the_drift_sweep_repairs_a_manual_edit_in_proofpoint() {
    let t = TestApp::start("sweep", Options::default()).await;
    let edited = t.sandbox.seed_user("edited", true, "end_user");
    let _fine = t.sandbox.seed_user("fine", true, "end_user");
    assert!(eventually(CONVERGE, || processed(&t) >= 2).await);
    // Someone deactivated the user by hand in Proofpoint (or Proofpoint's own sync did).
    let mut pp = t
        .sandbox
        .proofpoint
        .user(&t.sandbox.org, &edited.address)
        .unwrap();
    pp.is_active = false;
    t.sandbox
        .proofpoint
        .upsert_user(&t.sandbox.org, pp)
        .unwrap();

    let tenant = &t.app.config.tenants[0];
    let dry = t.app.sweep(tenant, true, &mut |_, _| {}).await.unwrap();
    assert_eq!(dry.graph_users, 2);
    assert_eq!(
        dry.drifts
            .iter()
            .map(|d| d.address.as_str())
            .collect::<Vec<_>>(),
        vec![edited.address.as_str()]
    );
    assert_eq!(dry.queued, 0);
    assert!(
        flagrelay::sweep::render(&tenant.id, &dry, true).contains("would queue: is_active → true")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        t.sandbox.is_active(&edited),
        Some(false),
        "a dry run changes nothing"
    );

    // Graph throttles the sweep: it waits out Retry-After and goes on.
    t.sandbox.graph.throttle_next(2, Some(1));
    let real = t.app.sweep(tenant, false, &mut |_, _| {}).await.unwrap();
    let throttled = t
        .sandbox
        .graph
        .request_log()
        .iter()
        .filter(|r| r.status == 429)
        .count();
    assert_eq!(
        throttled, 2,
        "the sweep met the throttling and still finished"
    );
    assert_eq!(real.queued, 1);
    assert!(
        eventually(CONVERGE, || t.sandbox.is_active(&edited) == Some(true)).await,
        "repaired through the pipeline"
    );
    t.stop().await;
}
