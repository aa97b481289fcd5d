//! Fault injection through the whole pipeline: broker connections cut under load. (The queue
//! layer's own cut-and-freeze tests are in `queue_conformance`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use secrecy::ExposeSecret;

use crate::support::{Options, Proxy, TENANT, TestApp, eventually};

#[tokio::test]
async fn broker_cuts_under_a_load_of_1000_notifications_lose_nothing_answered_202() {
    let proxy = Arc::new(Proxy::start().await);
    let opts = Options {
        amqp_url: Some(proxy.url()),
        subscribe: false,
        ..Options::default()
    };
    let t = TestApp::start_with("cut", opts, |c| {
        // Only notifications may converge the users here: no delta backstop.
        c.leader.delta_interval = Duration::from_secs(3600);
        c.receiver.retry_after = Duration::from_secs(1);
    })
    .await;
    let users: Vec<_> = (0..200)
        .map(|i| {
            t.sandbox
                .seed_user(&format!("load{i:03}"), true, "end_user")
        })
        .collect();
    // The final state, set without notifications (nobody is subscribed): every other user blocked.
    for u in users.iter().step_by(2) {
        t.sandbox.set_enabled(u, false);
    }
    let expected = |i: usize| i % 2 == 1;

    let client = reqwest::Client::new();
    let endpoint = format!("{}/graph/notifications", t.url);
    let client_state = t.app.config.graph.client_state().expose_secret().to_owned();
    let accepted = Arc::new(AtomicUsize::new(0));
    let unavailable = Arc::new(AtomicUsize::new(0));

    // Cut every broker connection twice while the load runs.
    let cutter = tokio::spawn({
        let (proxy, accepted) = (proxy.clone(), accepted.clone());
        async move {
            for mark in [300, 700] {
                while accepted.load(Ordering::SeqCst) < mark {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                proxy.kill_all();
            }
        }
    });
    // 1,000 notifications, five per user, 20 in flight; each is retried on 503 as Graph does.
    futures::stream::iter(0..1000usize)
        .for_each_concurrent(20, |n| {
            let user = &users[n % users.len()];
            let body = serde_json::json!({"value": [{
                "subscriptionId": "sub-load", "changeType": "updated", "clientState": client_state,
                "resource": format!("Users/{}", user.id),
                "resourceData": {"id": user.id, "organizationId": TENANT, "sequenceNumber": n},
                "tenantId": TENANT
            }]});
            let (client, endpoint, accepted, unavailable) =
                (&client, &endpoint, accepted.clone(), unavailable.clone());
            async move {
                for _ in 0..200 {
                    let status = client
                        .post(endpoint)
                        .json(&body)
                        .send()
                        .await
                        .expect("receiver reachable")
                        .status();
                    match status.as_u16() {
                        202 => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        503 => {
                            unavailable.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        other => panic!("unexpected status {other}"),
                    }
                }
                panic!("notification {n} never accepted: the receiver did not recover");
            }
        })
        .await;
    cutter.await.unwrap();
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1000,
        "every notification was eventually accepted"
    );

    let converged = || {
        users
            .iter()
            .enumerate()
            .all(|(i, u)| t.sandbox.is_active(u) == Some(expected(i)))
    };
    assert!(
        eventually(Duration::from_secs(90), converged).await,
        "every user converged after the cuts"
    );
    eprintln!(
        "503 answers during the cuts: {}",
        unavailable.load(Ordering::SeqCst)
    );
    t.stop().await;
}
